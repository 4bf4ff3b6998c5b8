"""Answer records written off the answer's path (skin.records is the store).

`RecordWriter.submit` only appends to an in-memory list (microseconds; it never waits on the store): a
thread of its own writes what is pending in batches. A store that fails or is slow never fails or slows an
answer: its rows stay pending and are retried with a growing pause (0.5 s to 30 s), every failed attempt
counted (`ray_skinray_records_failed_total`), what waits shown (`ray_skinray_records_pending`). Past
`max_pending` rows (a store down for long under load) the oldest are given up and counted
(`ray_skinray_records_lost_total`) — stated, never silent. A photograph kept with consent is written by the
same thread, before its row, so a row never names a photo that is not there.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

logger = logging.getLogger("ray.serve")


class RecordWriter:
    def __init__(self, url: Optional[str], photos_dir: Optional[str] = None, max_pending: int = 10_000,
                 batch: int = 256, on_change: Optional[Callable[[str, int], None]] = None) -> None:
        from skin.records import PhotoStore
        self.url, self.max_pending, self.batch = url, max_pending, batch
        self.photos = PhotoStore(Path(photos_dir)) if photos_dir else None
        self.on_change = on_change or (lambda what, n: None)
        self.pending: List[Dict[str, Any]] = []
        self.failed = self.lost = self.written = 0
        self.last_error = ""
        self._records = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="records", daemon=True)
        self._thread.start()

    def submit(self, row: Dict[str, Any], photo: Optional[bytes] = None, suffix: str = ".jpg") -> None:
        """Queue one answer row (skin.records.answer_row) and, with consent, its photograph's bytes."""
        with self._lock:
            self.pending.append({"row": row, "photo": photo, "suffix": suffix})
            over = len(self.pending) - self.max_pending
            if over > 0:
                del self.pending[:over]
                self.lost += over
                self.on_change("lost", over)
            self._idle.clear()
        self.on_change("pending", len(self.pending))
        self._wake.set()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until nothing is pending (a review must find the answer it reviews); False on time-out."""
        self._wake.set()
        return self._idle.wait(timeout)

    def store(self):
        """The store, opened on first use (and again after it failed to open)."""
        from skin.records import Records
        if self._records is None:
            self._records = Records.open(self.url)
        return self._records

    def _run(self) -> None:
        pause = 0.5
        while not self._stop:
            self._wake.wait(pause if self.pending else None)
            self._wake.clear()
            while self.pending and not self._stop:
                with self._lock:
                    items = self.pending[:self.batch]
                try:
                    self._write(items)
                except Exception as e:  # noqa: BLE001 - the store's failure is counted and retried, never raised
                    self.failed += 1
                    self.last_error = str(e)[:300]
                    self.on_change("failed", 1)
                    logger.warning("records: %d answer(s) not written yet (%s); retrying in %.1f s",
                                   len(self.pending), self.last_error, pause)
                    self._records = None if "cannot be opened" in self.last_error else self._records
                    break
                with self._lock:
                    done = {id(i) for i in items}
                    self.pending = [p for p in self.pending if id(p) not in done]
                self.written += len(items)
                self.on_change("pending", len(self.pending))
                pause = 0.5
            else:
                with self._lock:
                    if not self.pending:
                        self._idle.set()
                continue
            time.sleep(pause)
            pause = min(30.0, pause * 2)

    def _write(self, items: List[Dict[str, Any]]) -> None:
        rows = []
        for it in items:
            if it["photo"] is not None and self.photos is not None:
                # the photograph first (a folder of its own, up while the database may be down), then its
                # bytes dropped: a row waiting for the database holds its content address, not the image
                it["row"]["photo"] = self.photos.put(it["photo"], it["suffix"])
                it["photo"] = None
            rows.append(it["row"])
        self.store().add_answers(rows)

    def snapshot(self) -> Dict[str, Any]:
        return {"url": _shown(self.url), "pending": len(self.pending), "written": self.written,
                "failed_attempts": self.failed, "lost": self.lost, "last_error": self.last_error or None,
                "photos": str(self.photos.root) if self.photos else None}

    def close(self) -> None:
        self._stop = True
        self._wake.set()


def _shown(url: Optional[str]) -> str:
    from skin.records import _redacted, default_url
    return _redacted(url or default_url())
