"""Ingest and streaming-read throughput, peak memory, and dataset size vs raw size.

    python benchmarks/ingest.py [SOURCE ...] [--workers N] [--json]

Default source: ../shared/data. Prints spectra/s for ingest (read + write), spectra/s for streaming
the dataset back (``Dataset.iter_spectra``) with the peak resident memory of a separate streaming
process next to the dataset's size on disk, and the on-disk size of the dataset vs the raw files.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

STREAM_SNIPPET = """
import resource, sys, time
from stellarfield.data.store import Dataset
ds = Dataset(sys.argv[1])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter(); n = 0; pixels = 0
for s in ds.iter_spectra():
    n += 1; pixels += s.n_pixels
dt = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(n, pixels, dt, base, peak)
"""


def folder_bytes(paths) -> int:
    total = 0
    for p in paths:
        p = Path(p)
        files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
        total += sum(f.stat().st_size for f in files)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="*", default=[str(REPO.parent / "shared" / "data")])
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from stellarfield.data.ingest import expand_sources, ingest

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "DS"
        t = time.perf_counter()
        report = ingest(args.sources, out, workers=args.workers, progress=False)
        ingest_s = time.perf_counter() - t
        spectrum_files, _ = expand_sources(args.sources)
        raw = sum(f.stat().st_size for f in spectrum_files if not any(a["file"] == str(f) for a in report.auxiliary))
        ds_bytes = folder_bytes([out])
        res = subprocess.run([sys.executable, "-c", STREAM_SNIPPET, str(out)], capture_output=True, text=True, check=True)
        n, pixels, stream_s, base_kb, peak_kb = res.stdout.split()
    result = {
        "cores": os.cpu_count(),
        "workers": args.workers,
        "spectra": report.n_spectra,
        "skipped_files": len(report.skipped),
        "ingest_seconds": round(ingest_s, 2),
        "ingest_spectra_per_s": round(report.n_spectra / ingest_s, 1),
        "stream_seconds": round(float(stream_s), 2),
        "stream_spectra_per_s": round(int(n) / float(stream_s), 1),
        "stream_pixels": int(pixels),
        "stream_peak_rss_mib": round(int(peak_kb) / 1024, 1),
        "stream_rss_growth_mib": round((int(peak_kb) - int(base_kb)) / 1024, 1),
        "raw_spectrum_file_mib": round(raw / 2**20, 1),
        "dataset_mib": round(ds_bytes / 2**20, 1),
        "dataset_over_raw": round(ds_bytes / raw, 3) if raw else None,
        "bench_process_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"machine: {result['cores']} cores; ingest with {args.workers} workers")
    print(f"ingest:    {result['spectra']} spectra in {result['ingest_seconds']} s = {result['ingest_spectra_per_s']} spectra/s "
          f"({result['skipped_files']} files skipped)")
    print(f"streaming: {n} spectra ({int(pixels):,} px) in {result['stream_seconds']} s = {result['stream_spectra_per_s']} spectra/s; "
          f"peak RSS {result['stream_peak_rss_mib']} MiB (growth while streaming {result['stream_rss_growth_mib']} MiB) "
          f"for a {result['dataset_mib']} MiB dataset")
    print(f"size:      raw spectrum files {result['raw_spectrum_file_mib']} MiB -> dataset {result['dataset_mib']} MiB "
          f"(ratio {result['dataset_over_raw']})")


if __name__ == "__main__":
    main()
