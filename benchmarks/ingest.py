"""Ingest throughput against a plain astropy read of the same files, streaming read-back, sizes.

    python benchmarks/ingest.py [SOURCE ...] [--workers N] [--repeat R] [--json]

Default source: ../shared/data (``demo`` stands for the ``stellarfield[demo]`` spectra, as in
``stellarfield ingest demo``). In one run, on the same file list, it measures side by side:

* **baseline**: a plain ``astropy.io.fits`` read of every file in this process (one core): open,
  read every HDU's data array (a file astropy cannot open, a README, is read as bytes), close;
* **ingest**: ``stellarfield.ingest.ingest`` of the same sources into a temporary dataset
  with ``--workers`` reader processes (default: every core);

alternating the two ``--repeat`` times (the machine may be shared: the best of each is compared,
the median shown too), and prints files/s and spectra/s of both and the ratio ingest/baseline
(issue 16 asks for at least 0.5 on 2 cores). Then spectra/s streaming the dataset back
(``Dataset.iter_spectra``) with the peak memory of a separate streaming process, and the dataset's
size on disk against the raw files.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
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


def cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children (ingest's worker processes)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def astropy_read(files: list[Path]) -> tuple[float, int, int]:
    """Seconds to open every file with astropy and read every HDU's data; (seconds, FITS files, data bytes)."""
    from astropy.io import fits

    t = time.perf_counter()
    n_fits = n_bytes = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in files:
            try:
                with fits.open(path, memmap=False) as hdul:
                    for hdu in hdul:
                        data = hdu.data
                        n_bytes += getattr(data, "nbytes", 0) if data is not None else 0
                n_fits += 1
            except Exception:  # not FITS (a README, a table as text) or damaged: read its bytes
                n_bytes += len(path.read_bytes())
    return time.perf_counter() - t, n_fits, n_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="*", default=[str(REPO.parent / "shared" / "data")])
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--repeat", type=int, default=3, help="alternate baseline and ingest this many times")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from stellarfield.ingest import expand_sources, ingest

    files, _ = expand_sources(args.sources)
    baseline_s, ingest_s, baseline_cpu, ingest_cpu = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "DS"
        for _ in range(args.repeat):
            cpu = cpu_seconds()
            seconds, n_fits, data_bytes = astropy_read(files)
            baseline_s.append(seconds)
            baseline_cpu.append(cpu_seconds() - cpu)
            cpu, t = cpu_seconds(), time.perf_counter()
            report = ingest(args.sources, out, workers=args.workers, progress=False, force=True)
            ingest_s.append(time.perf_counter() - t)
            ingest_cpu.append(cpu_seconds() - cpu)
        raw = sum(f.stat().st_size for f in files if not any(a["file"] == str(f) for a in report.auxiliary))
        ds_bytes = folder_bytes([out])
        res = subprocess.run([sys.executable, "-c", STREAM_SNIPPET, str(out)], capture_output=True, text=True, check=True)
        n, pixels, stream_s, base_kb, peak_kb = res.stdout.split()
    best_base, best_ingest = min(baseline_s), min(ingest_s)
    n_files, n_spectra = len(files), report.n_spectra
    result = {
        "cores": os.cpu_count(),
        "workers": args.workers,
        "files": n_files,
        "fits_files": n_fits,
        "spectra": n_spectra,
        "skipped_files": len(report.skipped),
        "repeats": args.repeat,
        "baseline_seconds": [round(s, 2) for s in baseline_s],
        "ingest_seconds": [round(s, 2) for s in ingest_s],
        "baseline_cpu_seconds": [round(s, 2) for s in baseline_cpu],
        "ingest_cpu_seconds": [round(s, 2) for s in ingest_cpu],
        "ingest_cpu_over_baseline_cpu": round(min(ingest_cpu) / min(baseline_cpu), 2),
        "baseline_files_per_s": round(n_files / best_base, 1),
        "baseline_spectra_per_s": round(n_spectra / best_base, 1),
        "ingest_files_per_s": round(n_files / best_ingest, 1),
        "ingest_spectra_per_s": round(n_spectra / best_ingest, 1),
        "ingest_over_baseline": round(best_base / best_ingest, 3),
        "ingest_over_baseline_median": round(statistics.median(baseline_s) / statistics.median(ingest_s), 3),
        "baseline_data_mib": round(data_bytes / 2**20, 1),
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
    print(f"machine: {result['cores']} cores; ingest with {args.workers} workers; {n_files} files "
          f"({n_fits} FITS), {n_spectra} spectra; best of {args.repeat} alternating runs (median in brackets)")
    print(f"baseline:  plain astropy read, 1 core: {best_base:.2f} s = {result['baseline_files_per_s']} files/s, "
          f"{result['baseline_spectra_per_s']} spectra/s ({statistics.median(baseline_s):.2f} s; "
          f"{result['baseline_data_mib']} MiB of data arrays)")
    print(f"ingest:    stellarfield ingest: {best_ingest:.2f} s = {result['ingest_files_per_s']} files/s, "
          f"{result['ingest_spectra_per_s']} spectra/s ({statistics.median(ingest_s):.2f} s; "
          f"{result['skipped_files']} files skipped)")
    print(f"ratio:     ingest / baseline throughput = {result['ingest_over_baseline']} "
          f"(median {result['ingest_over_baseline_median']}; target >= 0.5)")
    print(f"cpu:       baseline {min(baseline_cpu):.2f} s, ingest {min(ingest_cpu):.2f} s (all processes) = "
          f"{result['ingest_cpu_over_baseline_cpu']}x the baseline's CPU work; on a machine shared with other "
          f"jobs the wall-clock ratio above varies from run to run")
    print(f"streaming: {n} spectra ({int(pixels):,} px) in {result['stream_seconds']} s = {result['stream_spectra_per_s']} spectra/s; "
          f"peak RSS {result['stream_peak_rss_mib']} MiB (growth while streaming {result['stream_rss_growth_mib']} MiB) "
          f"for a {result['dataset_mib']} MiB dataset")
    print(f"size:      raw spectrum files {result['raw_spectrum_file_mib']} MiB -> dataset {result['dataset_mib']} MiB "
          f"(ratio {result['dataset_over_raw']})")


if __name__ == "__main__":
    main()
