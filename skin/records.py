"""The clinic's record: which bundle said what about which photograph, and what reviewers said back.

    records = Records.open("sqlite:////var/lib/skinray/records.sqlite")   # or postgresql+psycopg://...
    records.add_answers([answer_row(...)])             # the service, off the answer's path (service.records)
    records.review("req-1", reviewer="dr-a", right_class="Malign", note="biopsy")
    records.queue()                                    # uncertain and disputed answers, oldest first
    records.export(since, "out/", photos)              # corrected and confirmed photographs -> `skin data scan`

A real database through SQLAlchemy Core: SQLite in the service's state folder by default (embedded, nothing
to start; several processes on one machine share it), any SQLAlchemy URL (PostgreSQL) where ingress
replicas on several nodes write. Two tables:

    answers  request_id (key), at, bundle, route, answer_class, probabilities, uncertain, reasons,
             explanation, latency_ms, image_sha256, photo (content address under the photo store, or
             NULL: kept only with the deployment's permission and the request's consent)
    reviews  id, request_id -> answers, at, reviewer, confirmed, right_class, note

A photograph's bytes are never in the database: its SHA-256 always, the file only under `PhotoStore`
(content-addressed) when consent allowed it. Every failure is a RecordError with one line saying what is
wrong and how to fix it.
"""
from __future__ import annotations

import csv
import datetime as dt
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import sqlalchemy as sa

UTC = dt.timezone.utc
metadata = sa.MetaData()
answers = sa.Table(
    "answers", metadata,
    sa.Column("request_id", sa.String(128), primary_key=True),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("bundle", sa.String(64), nullable=False),
    sa.Column("route", sa.String(16), nullable=False),
    sa.Column("answer_class", sa.String(128), nullable=False),
    sa.Column("probabilities", sa.JSON, nullable=False),
    sa.Column("uncertain", sa.Boolean, nullable=False),
    sa.Column("reasons", sa.JSON, nullable=False),
    sa.Column("explanation", sa.JSON, nullable=False),
    sa.Column("latency_ms", sa.Float, nullable=False),
    sa.Column("image_sha256", sa.String(64), nullable=False, index=True),
    sa.Column("photo", sa.String(256)),
)
reviews = sa.Table(
    "reviews", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("request_id", sa.String(128), sa.ForeignKey("answers.request_id", ondelete="CASCADE"),
              nullable=False, index=True),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("reviewer", sa.String(128), nullable=False),
    sa.Column("confirmed", sa.Boolean, nullable=False),
    sa.Column("right_class", sa.String(128), nullable=False),
    sa.Column("note", sa.Text, nullable=False),
)


class RecordError(Exception):
    """A records operation that cannot be done, with its HTTP status: 404 unknown request id, 422 bad review,
    503 the store is unreachable."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def default_url() -> str:
    """SQLite in the service's state folder: $SKINRAY_STATE_DIR, else $XDG_STATE_HOME/skinray, else
    ~/.local/state/skinray."""
    state = os.environ.get("SKINRAY_STATE_DIR") or str(
        Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "skinray")
    return f"sqlite:///{Path(state).resolve() / 'records.sqlite'}"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def now() -> dt.datetime:
    return dt.datetime.now(UTC)


def answer_row(request_id: str, answer: dict, image_sha256: str, route: str, latency_ms: float,
               explanation: dict | None = None, photo: str | None = None, at: dt.datetime | None = None) -> dict:
    """One row of `answers` from an answer (the /v1/predict JSON's fields; no image bytes, no maps)."""
    return {"request_id": request_id, "at": at or now(), "bundle": answer["bundle"], "route": route,
            "answer_class": answer["class"], "probabilities": {k: float(v) for k, v in answer["probabilities"].items()},
            "uncertain": bool(answer.get("uncertain")), "reasons": list(answer.get("uncertain_reasons") or []),
            "explanation": explanation or {}, "latency_ms": float(latency_ms), "image_sha256": image_sha256,
            "photo": photo}


@dataclass(frozen=True)
class PhotoStore:
    """Photographs kept with consent, content-addressed: ROOT/ab/abcdef....<ext>, written whole or not at all
    (a temporary file renamed into place)."""
    root: Path

    def put(self, data: bytes, suffix: str = ".jpg") -> str:
        digest = sha256(data)
        rel = f"{digest[:2]}/{digest}{suffix}"
        path = self.root / rel
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return rel

    def path(self, rel: str) -> Path:
        return self.root / rel

    def remove(self, rel: str) -> None:
        self.path(rel).unlink(missing_ok=True)


class Records:
    """The answers and reviews tables at one SQLAlchemy URL."""

    def __init__(self, engine: sa.engine.Engine, url: str) -> None:
        self.engine, self.url = engine, url

    @classmethod
    def open(cls, url: str | None = None) -> "Records":
        """The store at `url` (default: default_url()), its tables created when missing. A URL SQLAlchemy
        cannot use, or a server that does not answer, is a RecordError (503) naming the URL without its
        password."""
        url = url or default_url()
        shown = _redacted(url)
        try:
            if url.startswith("sqlite:///"):
                Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            engine = sa.create_engine(url, pool_pre_ping=True, **_engine_options(url))
            if engine.dialect.name == "sqlite":
                sa.event.listen(engine, "connect", _sqlite_pragmas)
            metadata.create_all(engine)
        except (sa.exc.SQLAlchemyError, OSError, ValueError, ImportError) as e:
            raise RecordError(f"the records store {shown} cannot be opened ({_first_line(e)}); check the URL "
                              "(records_url) and that the database is up", 503) from None
        return cls(engine, url)

    # ---------------------------------------------------------------- writing
    def add_answers(self, rows: Sequence[dict]) -> int:
        """Insert answer rows in one transaction; a request id already there is kept as it is (a retried
        write never duplicates). Returns the rows inserted. Store failures raise RecordError (503)."""
        if not rows:
            return 0
        try:
            with self.engine.begin() as c:
                have = {r for (r,) in c.execute(sa.select(answers.c.request_id).where(
                    answers.c.request_id.in_([r["request_id"] for r in rows])))}
                new = list({r["request_id"]: r for r in rows if r["request_id"] not in have}.values())
                if new:
                    c.execute(answers.insert(), new)
                return len(new)
        except sa.exc.SQLAlchemyError as e:
            raise RecordError(f"the records store is unavailable ({_first_line(e)})", 503) from None

    def review(self, request_id: str, reviewer: str, confirmed: bool = False, right_class: str | None = None,
               note: str = "", classes: Sequence[str] | None = None) -> dict:
        """A reviewer's word on an answer: `confirmed` (the answer was right) or the `right_class`. Unknown
        request id: 404; neither or both, a class not in `classes`, no reviewer: 422."""
        reviewer = (reviewer or "").strip()
        if not reviewer:
            raise RecordError("a review needs `reviewer` (who reviewed it)")
        if confirmed == bool(right_class):
            raise RecordError("a review is either `confirmed: true` (the answer was right) or `right_class` (the "
                              "class it should have been), not both or neither")
        if right_class and classes is not None and right_class not in classes:
            raise RecordError(f"unknown class {right_class!r}; one of {list(classes)}")
        try:
            with self.engine.begin() as c:
                row = c.execute(sa.select(answers.c.answer_class).where(answers.c.request_id == request_id)).first()
                if row is None:
                    raise RecordError(f"no answer with request id {request_id!r} on record (the X-Request-ID of "
                                      "the answer, or its `request_id`)", 404)
                right = row.answer_class if confirmed else right_class
                review = {"request_id": request_id, "at": now(), "reviewer": reviewer, "confirmed": bool(confirmed),
                          "right_class": right, "note": note or ""}
                c.execute(reviews.insert(), [review])
        except sa.exc.SQLAlchemyError as e:
            raise RecordError(f"the records store is unavailable ({_first_line(e)}); the review was not saved: "
                              "send it again", 503) from None
        return review | {"answer_class": row.answer_class, "agreed": right == row.answer_class,
                         "at": review["at"].isoformat()}

    # ---------------------------------------------------------------- reading
    def answer(self, request_id: str) -> dict | None:
        with self.engine.connect() as c:
            row = c.execute(sa.select(answers).where(answers.c.request_id == request_id)).mappings().first()
            if row is None:
                return None
            out = dict(row)
            out["reviews"] = [dict(r) for r in c.execute(sa.select(reviews).where(
                reviews.c.request_id == request_id).order_by(reviews.c.id)).mappings()]
        return out

    def queue(self, limit: int = 50, why: str | None = None) -> list[dict]:
        """What waits for a specialist, oldest first: answers flagged uncertain that no review settled, and
        disputed ones (a reviewer gave another class, or reviewers disagree) — each with its reviews and
        `why`; `why` ("uncertain" or "disputed") keeps only those."""
        if why not in (None, "uncertain", "disputed"):
            raise RecordError(f"why={why!r}: give uncertain or disputed (or nothing for both)")
        with self.engine.connect() as c:
            rows = [dict(r) for r in c.execute(sa.select(answers).order_by(answers.c.at)).mappings()]
            revs: dict[str, list[dict]] = {}
            for r in c.execute(sa.select(reviews).order_by(reviews.c.id)).mappings():
                revs.setdefault(r["request_id"], []).append(dict(r))
        out = []
        for a in rows:
            rs = revs.get(a["request_id"], [])
            said = {r["right_class"] for r in rs}
            disputed = bool(rs) and (len(said) > 1 or said != {a["answer_class"]})
            if disputed or (a["uncertain"] and not rs):
                reason = "disputed" if disputed else "uncertain"
                if why in (None, reason):
                    out.append(a | {"reviews": rs, "why": reason})
            if len(out) >= limit:
                break
        return out

    def agreement(self) -> dict[str, dict]:
        """Per answered class: answers reviewed, and the share whose latest review agreed with the model."""
        latest = self._latest_reviews()
        out: dict[str, dict] = {}
        for cls, right in latest.values():
            d = out.setdefault(cls, {"reviewed": 0, "agreed": 0})
            d["reviewed"] += 1
            d["agreed"] += int(right == cls)
        return {k: v | {"agreement": v["agreed"] / v["reviewed"]} for k, v in sorted(out.items())}

    def _class_map(self) -> list[str] | None:
        """The answering bundles' class names in their order (the probabilities' keys: JSON keeps the order);
        None when answers disagree on it (bundles of different class maps) or there are none."""
        with self.engine.connect() as c:
            maps = {tuple(p) for (p,) in c.execute(sa.select(answers.c.probabilities).order_by(
                answers.c.at.desc()).limit(200))}  # the latest answers' (JSON has no equality in PostgreSQL)
        return list(next(iter(maps))) if len(maps) == 1 else None

    def _latest_reviews(self, since: dt.datetime | None = None) -> dict[str, tuple[str, str]]:
        """{request_id: (answer class, latest review's class)}, for reviews at or after `since`."""
        q = sa.select(reviews.c.request_id, answers.c.answer_class, reviews.c.right_class).join(
            answers, answers.c.request_id == reviews.c.request_id).order_by(reviews.c.id)
        if since is not None:
            q = q.where(reviews.c.at >= since)
        with self.engine.connect() as c:
            return {r.request_id: (r.answer_class, r.right_class) for r in c.execute(q)}

    # ---------------------------------------------------------------- deleting, exporting
    def delete(self, request_id: str, photos: PhotoStore | None = None) -> bool:
        """Forget an answer: its row, its reviews and, when no other answer refers to it, its photograph."""
        with self.engine.begin() as c:
            row = c.execute(sa.select(answers.c.photo).where(answers.c.request_id == request_id)).first()
            if row is None:
                return False
            c.execute(reviews.delete().where(reviews.c.request_id == request_id))
            c.execute(answers.delete().where(answers.c.request_id == request_id))
            shared = row.photo and c.execute(sa.select(sa.func.count()).select_from(answers).where(
                answers.c.photo == row.photo)).scalar()
        if row.photo and photos is not None and not shared:
            photos.remove(row.photo)
        return True

    def purge(self, older_than: dt.timedelta, photos: PhotoStore | None = None) -> int:
        """The retention period: forget every answer older than `older_than` (as `delete`). Returns how many."""
        cut = now() - older_than
        with self.engine.connect() as c:
            old = [r for (r,) in c.execute(sa.select(answers.c.request_id).where(answers.c.at < cut))]
        return sum(self.delete(r, photos) for r in old)

    def export(self, out: str | Path, photos: PhotoStore, since: dt.datetime | None = None) -> dict:
        """The reviewed photographs as a dataset `skin data scan` takes: OUT/photos/<sha>.<ext> and
        OUT/manifest.csv (path, label = the latest review's class, group = the photograph's hash, so copies
        of one photograph never straddle splits). Reviewed answers without a kept photograph are counted,
        not exported (only their hash was kept). Written to a temporary folder and renamed: whole or not
        at all."""
        out = Path(out)
        if out.exists() and any(out.iterdir()):
            raise RecordError(f"{out} exists and is not empty; give a new folder for the export")
        latest = self._latest_reviews(since)
        with self.engine.connect() as c:
            rows = {r.request_id: r for r in c.execute(sa.select(
                answers.c.request_id, answers.c.photo, answers.c.image_sha256).where(
                answers.c.request_id.in_(list(latest))))} if latest else {}
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "photos").mkdir(parents=True)
        manifest, skipped, seen = [], 0, set()
        for rid, (answered, right) in latest.items():
            r = rows.get(rid)
            if r is None or not r.photo or not photos.path(r.photo).is_file():
                skipped += 1
                continue
            name = Path(r.photo).name
            if name not in seen:
                shutil.copyfile(photos.path(r.photo), tmp / "photos" / name)
                seen.add(name)
            manifest.append({"path": str((out / "photos" / name).resolve()), "label": right,
                             "group": r.image_sha256, "request_id": rid, "answered": answered})
        classes = self._class_map()
        if classes:  # the answering bundles' class map, so the next dataset keeps it (skin data scan --classes)
            (tmp / "classes.json").write_text(json.dumps({"classes": classes}, indent=2) + "\n")
        with open(tmp / "manifest.csv", "w", newline="") as f:
            w = csv.DictWriter(f, ["path", "label", "group", "request_id", "answered"])
            w.writeheader()
            w.writerows(manifest)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
        return {"exported": len(manifest), "photos": len(seen), "without_photo": skipped,
                "corrected": sum(m["label"] != m["answered"] for m in manifest), "manifest": str(out / "manifest.csv")}


def _engine_options(url: str) -> dict:
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 10}}  # several writers on one machine wait for the lock
    return {"pool_size": 2, "max_overflow": 2, "connect_args": {"connect_timeout": 5}}


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _redacted(url: str) -> str:
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - shown in an error only
        return "<unparsable URL>"


def _first_line(e: BaseException) -> str:
    return (str(getattr(e, "orig", None) or e).strip().splitlines() or [type(e).__name__])[0][:200]


def parse_since(text: str | None) -> dt.datetime | None:
    """YYYY-MM-DD (UTC midnight) or an ISO time; None for None."""
    if not text:
        return None
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        raise RecordError(f"--since {text!r} is not a date; give YYYY-MM-DD or an ISO time") from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)

