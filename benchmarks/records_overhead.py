"""What recording an answer costs the answer (service.dataplane.DataPlane.record): the upload's SHA-256, the
row, and the hand-over to the writer thread (service.records.RecordWriter.submit), per answer, with the
store up (SQLite, the default) and down (a PostgreSQL URL where nothing listens: every write fails and is
retried), for a 224 px upload and a phone photograph. Against the answer's own latency at the shipped
defaults (benchmarks/results/admission_cpu.txt: 148 ms unloaded, cheap explanation).

    python benchmarks/records_overhead.py [--answers 2000]
"""
from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

import _harness  # noqa: F401  (the repository on sys.path)
from service.records import RecordWriter
from skin.records import answer_row, sha256
from skin.synth import make_sample

ANSWER = {"class": "Akne", "probabilities": {c: 1 / 6 for c in ("Enfeksiyonel", "Ekzama", "Akne", "Pigment",
                                                                  "Benign", "Malign")},
          "uncertain": True, "uncertain_reasons": ["low confidence"], "bundle": "sk-bench"}


def jpeg(side: int) -> bytes:
    buf = io.BytesIO()
    make_sample(2, 0, 0, side).image.save(buf, "JPEG", quality=92)
    return buf.getvalue()


def per_answer_us(writer: RecordWriter, data: bytes, n: int) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        writer.submit(answer_row(f"r{i}-{time.time_ns()}", ANSWER, sha256(data), "v1", 150.0, {"cam": True}))
        out.append((time.perf_counter() - t0) * 1e6)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--answers", type=int, default=2000)
    a = ap.parse_args()
    uploads = {"224 px JPEG": jpeg(224), "phone photo (3024 px JPEG)": jpeg(3024)}
    with tempfile.TemporaryDirectory() as tmp:
        stores = {"store up (SQLite)": f"sqlite:///{Path(tmp) / 'records.sqlite'}",
                  "store down (PostgreSQL unreachable)": f"postgresql+psycopg://u@/db?host={tmp}/none&port=1"}
        print(f"{'store':<38}{'upload':<30}{'bytes':>10}{'median us':>11}{'p99 us':>9}{'max us':>9}"
              f"{'÷ answer (148 ms)':>19}{'pending':>9}{'failed':>8}")
        for store, url in stores.items():
            writer = RecordWriter(url, max_pending=a.answers * len(uploads) + 10)
            for name, data in uploads.items():
                t = sorted(per_answer_us(writer, data, a.answers))
                p99 = t[int(0.99 * (len(t) - 1))]
                print(f"{store:<38}{name:<30}{len(data):>10}{statistics.median(t):>11.0f}{p99:>9.0f}{t[-1]:>9.0f}"
                      f"{statistics.median(t) / 148e3:>19.5f}{len(writer.pending):>9}{writer.failed:>8}")
            writer.flush(30)
            writer.close()


if __name__ == "__main__":
    main()
