"""The clinic's record (skin.records, service.records): every answer on record, reviews, the queue, consent-
gated photographs, retention and deletion, the export that `skin data scan` takes — against SQLite and a
real PostgreSQL server the tests start (Debian's binaries, as the postgres user, on a Unix socket only);
and the writer that keeps answers off the store's path: a store that is down loses nothing."""
import datetime as dt
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from skin.records import PhotoStore, RecordError, Records, answer_row, sha256
from skin.synth import jpeg_bytes, make_sample

PG_BIN = Path("/usr/lib/postgresql/15/bin")
CLASSES = ["Enfeksiyonel", "Ekzama", "Akne", "Pigment", "Benign", "Malign"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Postgres:
    """A PostgreSQL server of the test's own in a temporary folder: no TCP (listen_addresses=''), its socket
    in that folder; started and stopped at will (a store that goes down)."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, _free_port()
        self.data = root / "data"
        root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(root, "postgres", "postgres")
        self._as_postgres([str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres"])
        self.url = f"postgresql+psycopg://postgres@/postgres?host={root}&port={self.port}"

    def _as_postgres(self, cmd: list[str]) -> None:
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--"] + cmd
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        self._as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-w", "-l", str(self.root / "log"), "-o",
                           f"-c listen_addresses='' -c unix_socket_directories={self.root} -p {self.port}", "start"])

    def stop(self) -> None:
        self._as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-w", "-m", "fast", "stop"])


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    if not (PG_BIN / "initdb").exists():
        pytest.skip("PostgreSQL 15's binaries are not installed (Debian's postgresql-15)")
    import tempfile
    root = Path(tempfile.mkdtemp(prefix="skinray-test-pg-"))  # under /tmp: pytest's own folders are root's only
    pg = Postgres(root)
    pg.start()
    yield pg
    try:
        pg.stop()
    except subprocess.CalledProcessError:
        pass
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path) -> Records:
    if request.param == "sqlite":
        return Records.open(f"sqlite:///{tmp_path / 'state' / 'records.sqlite'}")
    pg = request.getfixturevalue("postgres")
    records = Records.open(pg.url)
    with records.engine.begin() as c:  # each test from empty tables
        c.exec_driver_sql("TRUNCATE reviews, answers")
    return records


def _answer(cls="Malign", uncertain=False, bundle="sk-1") -> dict:
    probs = {c: (0.5 if c == cls else 0.1) for c in CLASSES}
    return {"class": cls, "probabilities": probs, "uncertain": uncertain, "bundle": bundle,
            "uncertain_reasons": ["low confidence"] if uncertain else []}


def _row(rid, cls="Malign", uncertain=False, data=b"photo", at=None, photo=None) -> dict:
    return answer_row(rid, _answer(cls, uncertain), sha256(data), "v1", 12.5, {"cam": True}, photo, at)


def test_answers_reviews_queue_and_agreement(store):
    assert store.add_answers([_row("a", "Malign"), _row("b", "Akne", uncertain=True), _row("c", "Benign")]) == 3
    assert store.add_answers([_row("a", "Malign")]) == 0  # a retried write never duplicates
    got = store.answer("a")
    assert got["answer_class"] == "Malign" and got["image_sha256"] == sha256(b"photo") and got["photo"] is None
    assert got["probabilities"]["Malign"] == 0.5 and got["route"] == "v1"
    # the queue: the uncertain answer no one reviewed; then a correction puts the other one there too
    assert [q["request_id"] for q in store.queue()] == ["b"] == [q["request_id"] for q in store.queue(why="uncertain")]
    assert store.queue(why="disputed") == []
    with pytest.raises(RecordError, match="give uncertain or disputed"):
        store.queue(why="all")
    r = store.review("a", "dr-a", right_class="Pigment", note="dermoscopy says pigment", classes=CLASSES)
    assert not r["agreed"] and r["answer_class"] == "Malign"
    assert store.review("b", "dr-a", confirmed=True, classes=CLASSES)["agreed"]  # settles the uncertain one
    store.review("c", "dr-b", confirmed=True, classes=CLASSES)
    queue = store.queue()
    assert [(q["request_id"], q["why"]) for q in queue] == [("a", "disputed")]
    assert queue[0]["reviews"][0]["note"] == "dermoscopy says pigment"
    agreement = store.agreement()
    assert agreement["Malign"] == {"reviewed": 1, "agreed": 0, "agreement": 0.0}
    assert agreement["Akne"]["agreement"] == 1.0 and agreement["Benign"]["reviewed"] == 1


@pytest.mark.parametrize("kwargs,status,says", [
    ({"request_id": "nope", "reviewer": "dr", "confirmed": True}, 404, "no answer with request id 'nope'"),
    ({"request_id": "a", "reviewer": "dr", "right_class": "Mole"}, 422, "unknown class 'Mole'"),
    ({"request_id": "a", "reviewer": "dr"}, 422, "not both or neither"),
    ({"request_id": "a", "reviewer": "dr", "confirmed": True, "right_class": "Akne"}, 422, "not both or neither"),
    ({"request_id": "a", "reviewer": " ", "confirmed": True}, 422, "needs `reviewer`"),
])
def test_a_bad_review_says_what_is_wrong_and_writes_nothing(store, kwargs, status, says):
    store.add_answers([_row("a")])
    with pytest.raises(RecordError) as e:
        store.review(classes=CLASSES, **kwargs)
    assert e.value.status == status and says in str(e.value) and len(str(e.value).splitlines()) == 1
    assert store.answer("a")["reviews"] == []


def test_delete_retention_and_photographs(store, tmp_path):
    photos = PhotoStore(tmp_path / "photos")
    kept = photos.put(b"consented photo")
    assert photos.path(kept).read_bytes() == b"consented photo" and kept.startswith(sha256(b"consented photo")[:2])
    old = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=40)
    store.add_answers([_row("old", at=old), _row("new", data=b"consented photo", photo=kept)])
    store.review("new", "dr", confirmed=True)
    assert store.purge(dt.timedelta(days=30), photos) == 1  # the retention period
    assert store.answer("old") is None and store.answer("new") is not None
    assert store.delete("new", photos) and store.answer("new") is None  # deletion by request id, reviews too
    assert not photos.path(kept).exists()
    assert not store.delete("new", photos)


def test_export_is_a_dataset_scan_takes(store, tmp_path):
    photos = PhotoStore(tmp_path / "photos")
    rows = []
    for i in range(8):
        data = jpeg_bytes(make_sample(i % 2, 0, i, 96), 0, i)
        rows.append(_row(f"r{i}", "Malign", data=data, photo=photos.put(data)))
    rows.append(_row("no-photo", "Malign", data=b"only its hash"))
    store.add_answers(rows)
    for i in range(8):  # half corrected to Akne, half confirmed
        store.review(f"r{i}", "dr", **({"right_class": "Akne"} if i % 2 else {"confirmed": True}))
    store.review("no-photo", "dr", confirmed=True)
    summary = store.export(tmp_path / "export", photos)
    assert summary == {"exported": 8, "photos": 8, "without_photo": 1, "corrected": 4,
                       "manifest": str(tmp_path / "export" / "manifest.csv")}
    m = pd.read_csv(summary["manifest"])
    assert sorted(m["label"].value_counts().to_dict().items()) == [("Akne", 4), ("Malign", 4)]
    assert all(Path(p).is_file() for p in m["path"]) and (m["group"].str.len() == 64).all()
    from skin.cli import main
    from skin.classes import ClassMap
    # the answering bundle's class map travels with the export: two classes reviewed, six kept
    assert ClassMap.load(tmp_path / "export" / "classes.json").names == tuple(CLASSES)
    assert main(["data", "scan", summary["manifest"], "--out", str(tmp_path / "scanned"), "--quiet",
                 "--workers", "1", "--classes", str(tmp_path / "export" / "classes.json")]) == 0
    assert ClassMap.load(tmp_path / "scanned" / "classes.json").names == tuple(CLASSES)
    assert main(["data", "scan", summary["manifest"], "--out", str(tmp_path / "inferred"), "--quiet",
                 "--workers", "1"]) == 0  # without it, the labels' own (two classes)
    assert ClassMap.load(tmp_path / "inferred" / "classes.json").names == ("Akne", "Malign")
    ClassMap(("Akne", "Benign")).save(tmp_path / "two.json")  # a class map without a label used: one line, exit 2
    assert main(["data", "scan", summary["manifest"], "--out", str(tmp_path / "bad"), "--quiet", "--workers", "1",
                 "--classes", str(tmp_path / "two.json")]) == 2
    with pytest.raises(RecordError, match="not empty"):  # never over an earlier export
        store.export(tmp_path / "export", photos)
    later = store.export(tmp_path / "none", photos, since=dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1))
    assert later["exported"] == 0


def test_a_store_that_cannot_be_opened_says_so_in_one_line(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    for url, says in ((f"sqlite:///{tmp_path / 'file' / 'db.sqlite'}", "cannot be opened"),
                      ("nosuchdb://x", "cannot be opened"),
                      ("postgresql+psycopg://u:secret@/db?host=/nonexistent&port=1", "cannot be opened")):
        with pytest.raises(RecordError) as e:
            Records.open(url)
        assert says in str(e.value) and len(str(e.value).splitlines()) == 1 and "secret" not in str(e.value)


def test_the_writer_keeps_answers_off_the_stores_path_and_loses_none_while_it_is_down(postgres, tmp_path):
    """The store goes down: submits still return at once, every failed attempt is counted, the rows wait
    (a consented photograph already in its folder, its bytes no longer held); the store comes back: all of
    them are written, once."""
    from service.records import RecordWriter
    events = []
    store = Records.open(postgres.url)  # tables exist
    writer = RecordWriter(postgres.url, str(tmp_path / "photos"), on_change=lambda what, n: events.append(what))
    writer.submit(_row("w0"))
    assert writer.flush(30)
    postgres.stop()
    try:
        for i in range(1, 6):
            writer.submit(_row(f"w{i}"), b"consented photo" if i == 5 else None)
        deadline = time.time() + 30
        while writer.failed < 2 and time.time() < deadline:
            time.sleep(0.2)
        assert writer.failed >= 2 and len(writer.pending) == 5 and "failed" in events
        assert writer.snapshot()["pending"] == 5 and writer.snapshot()["lost"] == 0
        waiting = writer.pending[-1]
        assert waiting["photo"] is None and (tmp_path / "photos" / waiting["row"]["photo"]).is_file()
        with pytest.raises(RecordError) as e:  # a reviewer's word cannot wait: it is refused, saying so
            store.review("w0", "dr", confirmed=True)
        assert e.value.status == 503 and "the review was not saved: send it again" in str(e.value)
    finally:
        postgres.start()
    assert writer.flush(60), writer.snapshot()
    store = Records.open(postgres.url)
    from skin.records import answers
    with store.engine.connect() as c:
        ids = sorted(r for (r,) in c.execute(answers.select().with_only_columns(answers.c.request_id).where(
            answers.c.request_id.like("w%"))))
    assert ids == [f"w{i}" for i in range(6)]
    assert store.answer("w5")["photo"] == waiting["row"]["photo"]
    writer.close()


def test_past_its_bound_the_writer_counts_what_it_gives_up(tmp_path):
    from service.records import RecordWriter
    lost = []
    (tmp_path / "file").write_text("x")
    writer = RecordWriter(f"sqlite:///{tmp_path / 'file' / 'db.sqlite'}", max_pending=3,
                          on_change=lambda what, n: lost.append(n) if what == "lost" else None)
    for i in range(5):
        writer.submit(_row(f"x{i}"))
    assert writer.lost == 2 and sum(lost) == 2 and [p["row"]["request_id"] for p in writer.pending][-3:] == \
        ["x2", "x3", "x4"]
    writer.close()


def test_the_records_commands(tmp_path, capsys):
    """`skin records queue|export|delete|purge` on the service's SQLite; bad input: one line, exit 2."""
    from skin.cli import main
    url = f"sqlite:///{tmp_path / 'records.sqlite'}"
    photos = PhotoStore(tmp_path / "photos")
    data = jpeg_bytes(make_sample(2, 0, 1, 96), 0, 1)
    store = Records.open(url)
    store.add_answers([_row("q1", "Akne", uncertain=True), _row("q2", "Malign", data=data, photo=photos.put(data))])
    store.review("q2", "dr", right_class="Benign")
    assert main(["records", "queue", "--db", url]) == 0
    out = capsys.readouterr().out
    assert "q1" in out and "uncertain" in out and "q2" in out and "disputed" in out and "dr: Benign" in out
    assert main(["records", "export", "--db", url, "--photos", str(photos.root), "--out", str(tmp_path / "e")]) == 0
    assert "exported 1 reviewed photograph(s) (1 corrected" in capsys.readouterr().out
    for argv, says in ((["records", "export", "--db", url, "--out", str(tmp_path / "f")], "--photos"),
                       (["records", "delete", "nope", "--db", url], "no answer with request id 'nope'"),
                       (["records", "export", "--db", url, "--photos", "p", "--since", "May", "--out", "g"],
                        "is not a date")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, err
    assert main(["records", "delete", "q2", "--db", url, "--photos", str(photos.root)]) == 0
    assert not list(photos.root.rglob("*.jpg")) and store.answer("q2") is None
    assert main(["records", "purge", "--older-than-days", "0", "--db", url]) == 0 and store.answer("q1") is None


def test_the_report_compares_the_new_bundle_on_reviewed_cases(random_bundle, tmp_path):
    """jobs/evaluate.py --reviewed: on the reviewed photographs among the rows scored, this bundle's accuracy
    against the reviewers' classes beside the answering bundle's, and the answers it fixed and broke."""
    from skin.bundle import Bundle
    from skin.evaluation import readable, reviewed_summary, score_locally
    from skin.report import reviewed_lines
    bundle = Bundle.load(random_bundle)
    paths = []
    for i in range(6):
        p = tmp_path / f"r{i}.jpg"
        p.write_bytes(jpeg_bytes(make_sample(i % 6, 3, i, 96), 3, i))
        paths.append(str(p))
    scored = score_locally(str(random_bundle), pd.DataFrame({"path": paths, "label_index": 0}))
    _, _, ens = readable(scored, bundle)
    now = [bundle.classes.names[k] for k in ens.argmax(1)]
    other = [next(c for c in CLASSES if c != n) for n in now]
    # reviewers' classes: the new answer for rows 0-3, another class for 4-5; the old answers: wrong for
    # rows 0-2, right for 3-5 -> fixed 3 (rows 0-2), broken 2 (rows 4, 5)
    label = now[:4] + other[4:]
    answered = [other[0], other[1], other[2]] + label[3:]
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame({"path": paths, "label": label, "group": "g", "request_id": "x", "answered": answered}).to_csv(
        manifest, index=False)
    r = reviewed_summary(scored, bundle, manifest)
    assert (r["images"], r["fixed"], r["broken"]) == (6, 3, 2)
    assert r["accuracy"] == pytest.approx(4 / 6) and r["answered_accuracy"] == pytest.approx(3 / 6)
    assert r["difference"] == pytest.approx(1 / 6) and r["interval"][0] <= r["difference"] <= r["interval"][1]
    assert "fixed 3 answer(s) and broke 2" in "\n".join(reviewed_lines(r))
    elsewhere = tmp_path / "elsewhere.csv"  # none of its photographs scored here
    pd.DataFrame({"path": ["/nope.jpg"], "label": ["Akne"], "answered": ["Akne"]}).to_csv(elsewhere, index=False)
    assert reviewed_summary(scored, bundle, elsewhere) is None
    with pytest.raises(RecordError, match="not a `skin records export` manifest"):
        pd.DataFrame({"path": paths}).to_csv(tmp_path / "bad.csv", index=False)
        reviewed_summary(scored, bundle, tmp_path / "bad.csv")


def test_a_full_disk_loses_no_answer_and_leaves_no_half_written_photo(tmp_path, monkeypatch):
    """The photo store's disk is full: the write fails as a whole (no partial file under its name), the
    failure is counted, the answer waits; with room again, the photo and its row are written."""
    from service.records import RecordWriter
    real_put, full = PhotoStore.put, {"on": True}

    def put(self, data, suffix=".jpg"):
        if full["on"]:
            raise OSError(28, "No space left on device")
        return real_put(self, data, suffix)
    monkeypatch.setattr(PhotoStore, "put", put)
    url = f"sqlite:///{tmp_path / 'records.sqlite'}"
    writer = RecordWriter(url, str(tmp_path / "photos"))
    data = jpeg_bytes(make_sample(1, 0, 0, 64), 0, 0)
    writer.submit(_row("full", data=data), data)
    deadline = time.time() + 20
    while writer.failed < 1 and time.time() < deadline:
        time.sleep(0.1)
    assert writer.failed >= 1 and len(writer.pending) == 1 and "No space left" in writer.last_error
    assert Records.open(url).answer("full") is None and not list((tmp_path / "photos").rglob("*"))
    full["on"] = False
    assert writer.flush(30)
    row = Records.open(url).answer("full")
    assert row["photo"] and (tmp_path / "photos" / row["photo"]).read_bytes() == data
    writer.close()
