"""The ``bench`` sub-command of ``stellarfield`` (a thin wrapper over :func:`stellarfield.eval.bench.run_bench`).

    stellarfield bench --model RUN --data DATASET [DATASET ...] --out DIR [--max-per-product N]
                       [--max-train-per-product N] [--pca plain|weighted] [--refine-steps N]
                       [--threads T] [--seed S] [--no-plots] [--force]
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_commands(sub) -> None:
    p = sub.add_parser("bench", help="measure a trained model on the test split against PCA and the surveys' numbers")
    p.add_argument("--model", required=True, help="run folder written by 'stellarfield train'")
    p.add_argument("--data", required=True, nargs="+", help="dataset folder(s); only their test split is scored")
    p.add_argument("--out", required=True, help="report folder (report.md, report.json, metrics.json, plots/)")
    p.add_argument("--max-per-product", type=int, default=500, help="test spectra per product (random subset; default 500)")
    p.add_argument("--max-train-per-product", type=int, default=2000,
                   help="train spectra per product for the PCA baseline and the probes (default 2000)")
    p.add_argument("--pca", choices=["plain", "weighted"], default="plain",
                   help="PCA baseline: plain SVD (default, fast) or weighted EM-PCA (minutes per large product)")
    p.add_argument("--refine-steps", type=int, default=100, help="latent/RV optimisation steps per fitted spectrum")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1; reported with the speeds)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subsets, generated stars and probes")
    p.add_argument("--no-plots", action="store_true", help="skip the figures")
    p.add_argument("--force", action="store_true", help="overwrite a report already in --out")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from stellarfield.cli import CommandError
    from stellarfield.eval.bench import BenchInputError, run_bench
    from stellarfield.model.checkpoint import load_model

    out = Path(args.out)
    if (out / "report.json").exists() and not args.force:
        raise CommandError(f"{out} already holds a bench report; pass --force to overwrite it, or choose another folder")
    for path in args.data:
        if not (Path(path) / "manifest.json").exists():
            raise CommandError(f"{path} is not a dataset (no manifest.json); make one with 'stellarfield ingest'")
    for name in ("max_per_product", "max_train_per_product", "refine_steps", "threads"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "refine_steps" else 1):
            raise CommandError(f"--{name.replace('_', '-')} must be positive, got {value}")
    load_model(args.model)  # a broken run folder fails here, with its one-line reason, before any work
    try:
        report = run_bench(
            args.model, args.data, out, max_per_product=args.max_per_product, seed=args.seed,
            max_train_per_product=args.max_train_per_product, pca=args.pca, refine_steps=args.refine_steps,
            threads=args.threads, plots=not args.no_plots,
        )
    except BenchInputError as exc:
        raise CommandError(str(exc)) from exc
    print(_summary(report))
    print(f"report: {out / 'report.md'} (numbers: {out / 'report.json'}, headline: {out / 'metrics.json'})")
    return 0


def _summary(report: dict) -> str:
    """A few lines for the terminal: chi2_nu (or RMS) per product, model vs PCA, and the speeds."""
    lines = ["held-out reconstruction, median over test spectra (model vs PCA):"]
    for product, e in report["reconstruction"].items():
        model, pca = e.get("model") or {}, e.get("pca") or {}
        if (model.get("chi2_nu") or {}).get("n"):
            what, m, p = "chi2_nu", model["chi2_nu"]["median"], (pca.get("chi2_nu") or {}).get("median")
        else:
            what, m, p = "RMS", (model.get("rms_residual") or {}).get("median"), (pca.get("rms_residual") or {}).get("median")
        fmt = lambda x: "-" if x is None else f"{x:.3g}"  # noqa: E731
        lines.append(f"  {product:<22s} n={e['n_test']:<5d} {what:<8s} model {fmt(m):>8s}  PCA {fmt(p):>8s}")
    s = report["speed"]
    if s.get("model_spectra_per_s"):
        lines.append(f"generation on {s['headline_grid']} ({s['pixels']} px): {s['model_spectra_per_s']:.0f} spectra/s "
                     f"vs Payne {s['payne_spectra_per_s']:.0f}; fit {s['fit_ms_per_spectrum']:.0f} ms/spectrum; "
                     f"{s['cpu_cores']} cores, {s['torch_threads']} torch thread(s)")
    return "\n".join(lines)
