"""Generation at scale: streamed to a Parquet dataset vs in memory, spectra/s and peak RSS, side by side.

    python benchmarks/generate_scale.py [--model reference] [--instrument gaia_xp] [--n 10000 100000]
                                        [--snr 50] [--threads 1] [--json]

For each ``n`` three child processes run one after the other (each its own peak RSS, from
``getrusage``; the same machine load for all):

* ``stream``: :func:`stellarfield.model.generate.write_generated` to a dataset folder of Parquet
  shards (``stellarfield generate --out FOLDER``: prior draws, rendering, noise, zstd shards), memory
  one chunk;
* ``memory``: :func:`stellarfield.model.generate.generate`, all ``n`` spectra in one array (the
  in-memory path, prior draws included, nothing written);
* ``render``: the in-memory path with the latents given (standard normal, no prior draws): what
  ``benchmarks/generate_speed.py`` times (decoder + rendered basis), for the cost of the flow prior.

Each child reports its RSS after loading the model (before generating) and its peak; the table gives
spectra/s, peak RSS and the growth over the loaded model, and the ratio stream / memory of the rates.
Gaia XP (343 pixels) is the default grid: the cheapest, so the rate is the generator's, not the disk's.
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


def _rss_mb() -> float:
    """Peak resident set size of this process so far, MB (Linux ru_maxrss is in kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from stellarfield.model import load_model
    from stellarfield.model.generate import generate, write_generated

    model = load_model(args.model)
    loaded_mb = _rss_mb()
    grid = dict(instrument=args.instrument, seed=0, snr=args.snr)
    t = time.perf_counter()
    if args.mode == "stream":
        write_generated(model, Path(args.out) / "generated", args.n, progress=False, **grid)
    elif args.mode == "memory":
        out = generate(model, args.n, **grid)
        assert out.flux.shape[0] == args.n
    else:  # render: latents given, no prior draws
        z = torch.randn(args.n, model.model.latent_dim, generator=torch.Generator().manual_seed(0))
        out = generate(model, args.n, latents=z.numpy(), **grid)
        assert out.flux.shape[0] == args.n
    seconds = time.perf_counter() - t
    return {"mode": args.mode, "n": args.n, "seconds": seconds, "spectra_per_s": args.n / seconds,
            "loaded_rss_mb": loaded_mb, "peak_rss_mb": _rss_mb()}


def run_child(mode: str, n: int, args, workdir: Path) -> dict:
    out = workdir / f"{mode}-{n}"
    out.mkdir()
    command = [sys.executable, __file__, "--child", mode, "--n", str(n), "--model", args.model, "--instrument",
               args.instrument, "--snr", str(args.snr), "--threads", str(args.threads), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "OPENBLAS_NUM_THREADS": str(args.threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} n={n} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if mode == "stream":
        from stellarfield.data.store import Dataset

        ds = Dataset(out / "generated")
        assert len(ds) == n
        result["disk_mb"] = ds.size_on_disk() / 1e6
    return result


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="reference")
    ap.add_argument("--instrument", default="gaia_xp")
    ap.add_argument("--n", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--snr", type=float, default=50.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--modes", nargs="+", default=["stream", "memory", "render"])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", choices=["stream", "memory", "render"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        args.mode, args.n = args.child, args.n[0]
        print(json.dumps(child(args)))
        return {}

    rows = []
    with tempfile.TemporaryDirectory(prefix="generate_scale_") as tmp:
        for n in args.n:
            for mode in args.modes:
                rows.append(run_child(mode, n, args, Path(tmp)))
                if not args.json:
                    r = rows[-1]
                    print(f"{mode:7s} n={n:>9,}  {r['spectra_per_s']:9.0f} spectra/s  {r['seconds']:7.1f} s  peak RSS "
                          f"{r['peak_rss_mb']:7.0f} MB (model loaded: {r['loaded_rss_mb']:.0f} MB)"
                          + (f"  {r['disk_mb']:.0f} MB on disk" if "disk_mb" in r else ""), flush=True)
    by = {(r["mode"], r["n"]): r for r in rows}
    summary = {"instrument": args.instrument, "model": args.model, "threads": args.threads, "rows": rows, "ratios": {}}
    for n in args.n:
        if ("stream", n) in by and ("memory", n) in by:
            s, m = by["stream", n], by["memory", n]
            summary["ratios"][n] = {"stream_over_memory_rate": s["spectra_per_s"] / m["spectra_per_s"],
                                    "stream_peak_rss_mb": s["peak_rss_mb"], "memory_peak_rss_mb": m["peak_rss_mb"]}
    streams = [by["stream", n] for n in args.n if ("stream", n) in by]
    if len(streams) > 1:
        summary["stream_peak_rss_ratio_largest_over_smallest"] = streams[-1]["peak_rss_mb"] / streams[0]["peak_rss_mb"]
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"grid {args.instrument}, model {args.model}, {args.threads} thread(s), noise S/N {args.snr:g}")
        for n, r in summary["ratios"].items():
            print(f"n={n:>9,}: streamed / in-memory rate {r['stream_over_memory_rate']:.2f}; peak RSS streamed "
                  f"{r['stream_peak_rss_mb']:.0f} MB vs in memory {r['memory_peak_rss_mb']:.0f} MB")
        if "stream_peak_rss_ratio_largest_over_smallest" in summary:
            print(f"streamed peak RSS, n={args.n[-1]:,} / n={args.n[0]:,}: "
                  f"{summary['stream_peak_rss_ratio_largest_over_smallest']:.2f}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
