"""Streaming training: peak memory on a dataset of 100,000 and of 1,000,000 spectra, side by side.

    python benchmarks/train_memory.py [--sizes 100000 1000000] [--steps 30] [--objectives gon encoder autodecoder]
                                      [--data-dir DIR] [--model reference] [--instrument gaia_xp] [--snr 50]

1. The datasets: ``stellarfield generate --model reference --instrument gaia_xp --n N --snr 50 --seed 1
   --out DIR/gaia_xp_N`` (stars drawn from the shipped reference model's prior on the Gaia XP grid,
   343 pixels, with white noise of S/N 50 and its ivar: a survey-like dataset, cheap per spectrum).
   A complete dataset already in ``--data-dir`` with the same size is reused (generation of a
   million takes ~15-40 min on one core; its time is printed when it is made).
2. For each objective, training runs ``--steps`` steps on each dataset in a child process
   (``TrainConfig(streaming=True)``, the default architecture and batches: 1,024 Gaia XP spectra per
   step for both datasets), one after the other, and the child reports its peak RSS (``getrusage``)
   and its time. ``gon`` and ``encoder`` (the amortised encoder) keep nothing per training spectrum,
   so what grows with the dataset is the streaming reader's alone; ``autodecoder`` (the default objective) adds its latent table: 16 float32
   per training spectrum plus Adam's two moments, 192 bytes (154 MB for 800,000 training spectra;
   stepped by ``LatentAdam``, without a dense gradient or full-size temporaries), printed next to the
   measured difference.

Prints, per objective, both peak RSS figures and their ratio (1M / 100k): the target is < 1.2.
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

#: Bytes per training spectrum of the auto-decoder's latent table with Adam (weights, two moments;
#: ``LatentAdam`` makes no dense gradient): 3 x 16 float32.
LATENT_BYTES_PER_SPECTRUM = 3 * 16 * 4


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_train(args) -> dict:
    import torch

    torch.set_num_threads(1)
    from stellarfield.model.train import TrainConfig, train

    config = TrainConfig(objective=args.objective, streaming=True, max_steps=args.steps, minutes=None, seed=0,
                         checkpoint_every_s=None, validate_every_s=None, val_max_per_product=8,
                         final_val_max_per_product=8, final_val_refine_steps=5, prior_steps=50, threads=1)
    t = time.perf_counter()
    result = train(args.data, args.out, config, progress=False)
    return {"objective": args.objective, "data": args.data, "steps": result.steps, "seconds": time.perf_counter() - t,
            "train_spectra": sum(json.loads((Path(args.out) / "summary.json").read_text())["train_counts"].values()),
            "peak_rss_mb": _peak_rss_mb()}


def make_dataset(n: int, args) -> Path:
    from stellarfield.data.store import Dataset, NotADatasetError

    path = Path(args.data_dir) / f"{args.instrument}_{n}"
    try:
        if len(Dataset(path)) == n:
            print(f"dataset of {n:,}: reusing {path}", flush=True)
            return path
    except (FileNotFoundError, NotADatasetError):
        pass
    script = Path(sys.executable).with_name("stellarfield")  # the console script of this environment
    command = [str(script), "generate", "--model", args.model, "--instrument", args.instrument, "--n", str(n),
               "--snr", str(args.snr), "--seed", "1", "--out", str(path), "--force"]
    t = time.perf_counter()
    subprocess.run(command, check=True, env=_env())
    print(f"dataset of {n:,}: made in {time.perf_counter() - t:.0f} s by: stellarfield {' '.join(command[1:])}", flush=True)
    return path


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--objectives", nargs="+", default=["gon", "encoder", "autodecoder"])
    ap.add_argument("--data-dir", default=None, help="where the datasets are made or reused (default: a temporary folder)")
    ap.add_argument("--model", default="reference")
    ap.add_argument("--instrument", default="gaia_xp")
    ap.add_argument("--snr", type=float, default=50.0)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--objective", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child_train(args)))
        return {}

    with tempfile.TemporaryDirectory(prefix="train_memory_") as tmp:
        args.data_dir = args.data_dir or tmp
        Path(args.data_dir).mkdir(parents=True, exist_ok=True)
        datasets = {n: make_dataset(n, args) for n in args.sizes}
        rows = []
        for objective in args.objectives:
            for n, path in datasets.items():
                out = Path(tmp) / f"run-{objective}-{n}"
                command = [sys.executable, __file__, "--child", "--data", str(path), "--objective", objective,
                           "--steps", str(args.steps), "--out", str(out)]
                done = subprocess.run(command, capture_output=True, text=True, env=_env())
                if done.returncode != 0:
                    raise RuntimeError(f"training {objective} on {n:,} failed:\n{done.stderr[-3000:]}")
                rows.append({"n": n, **json.loads(done.stdout.strip().splitlines()[-1])})
                r = rows[-1]
                if not args.json:
                    print(f"{objective:12s} {n:>10,} spectra ({r['train_spectra']:,} train): {r['steps']} steps in "
                          f"{r['seconds']:.0f} s, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    summary = {"instrument": args.instrument, "steps": args.steps, "rows": rows, "ratios": {}}
    for objective in args.objectives:
        mine = [r for r in rows if r["objective"] == objective]
        if len(mine) > 1:
            small, large = mine[0], mine[-1]
            table = LATENT_BYTES_PER_SPECTRUM * (large["train_spectra"] - small["train_spectra"]) / 2**20
            summary["ratios"][objective] = {
                "peak_rss_mb": [small["peak_rss_mb"], large["peak_rss_mb"]],
                "ratio": large["peak_rss_mb"] / small["peak_rss_mb"],
                "latent_table_difference_mb": table if objective == "autodecoder" else 0.0}
    if args.json:
        print(json.dumps(summary))
    else:
        for objective, r in summary["ratios"].items():
            note = (f"; of the difference, the latent table with Adam's two moments accounts for "
                    f"{r['latent_table_difference_mb']:.0f} MB" if objective == "autodecoder" else "")
            print(f"{objective}: peak RSS {r['peak_rss_mb'][0]:.0f} MB ({args.sizes[0]:,}) vs "
                  f"{r['peak_rss_mb'][1]:.0f} MB ({args.sizes[-1]:,}): ratio {r['ratio']:.2f} (target < 1.20){note}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
