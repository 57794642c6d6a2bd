"""The ``bench`` sub-command of ``stellarfield`` (a thin wrapper over :func:`stellarfield.bench.run.run_bench`).

    stellarfield bench --model RUN --data DATASET [DATASET ...] --out DIR [--max-per-product N]
                       [--max-train-per-product N] [--probe-max-cells C] [--pca both|weighted|plain] [--pca-max-cells C]
                       [--refine-steps N]
                       [--threads T] [--device auto|cpu|cuda] [--seed S] [--no-plots] [--force]
"""

from __future__ import annotations

import argparse

from stellarfield.cli.arguments import (DEVICE_HELP, MODEL_HELP, check_inputs, non_negative_int, positive_int,
                                       resolve_cli_device)
from stellarfield.device import DEVICES


def add_commands(sub) -> None:
    p = sub.add_parser("bench", help="measure a trained model on the test split against PCA and the surveys' numbers")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--data", required=True, nargs="+", help="dataset folder(s); only their test split is scored")
    p.add_argument("--out", required=True, help="report folder (report.md, report.json, metrics.json, plots/)")
    p.add_argument("--max-per-product", type=positive_int, default=500, help="test spectra per product (random subset; default 500)")
    p.add_argument("--max-train-per-product", type=positive_int, default=20_000,
                   help="train spectra per product the probes are fitted on (default 20000; the PCA "
                        "baselines use every train spectrum, up to --pca-max-cells)")
    p.add_argument("--probe-max-cells", type=positive_int, default=16_000_000,
                   help="largest train spectra x pixels per product the probes are fitted on: fewer spectra "
                        "of high-resolution products (default 16,000,000: ~1,900 APOGEE, ~980 GALAH spectra)")
    p.add_argument("--pca", choices=["both", "weighted", "plain"], default="both",
                   help="PCA baselines at K = the model's latent dimension: weighted EM-PCA (the comparison) and "
                        "plain SVD PCA side by side (default 'both'), or only one of them")
    p.add_argument("--pca-max-cells", type=positive_int, default=16_000_000,
                   help="largest train spectra x pixels a PCA is fitted on; beyond it a random subset of the "
                        "loaded train spectra (reported as n_train; default 16,000,000)")
    p.add_argument("--refine-steps", type=non_negative_int, default=100, help="latent/RV optimisation steps per fitted spectrum")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads (default 1; reported with the speeds)")
    p.add_argument("--device", choices=DEVICES, default="cpu",
                   help=DEVICE_HELP + "; default cpu; the generation speed "
                        "against the Payne emulator is measured on the CPU either way")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the subsets, generated stars and probes")
    p.add_argument("--no-plots", action="store_true", help="skip the figures")
    p.add_argument("--force", action="store_true", help="overwrite a report already in --out")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from stellarfield.cli.arguments import CommandError
    from stellarfield.bench.run import BenchInputError, run_bench
    from stellarfield.model.checkpoint import load_model

    out = check_inputs(args, "report.json", "a bench report", {"max_per_product": 1, "max_train_per_product": 1,
                                                               "probe_max_cells": 1, "pca_max_cells": 1, "refine_steps": 0, "threads": 1})
    load_model(args.model)  # a broken run folder fails here, with its one-line reason, before any work
    resolve_cli_device(args.device)  # --device cuda without a GPU fails here, saying what to do
    try:
        report = run_bench(
            args.model, args.data, out, max_per_product=args.max_per_product, seed=args.seed,
            max_train_per_product=args.max_train_per_product, probe_max_cells=args.probe_max_cells,
            pca=args.pca, pca_max_cells=args.pca_max_cells,
            refine_steps=args.refine_steps,
            threads=args.threads, device=args.device, plots=not args.no_plots,
        )
    except BenchInputError as exc:
        raise CommandError(str(exc)) from exc
    print(_summary(report))
    print(f"report: {out / 'report.md'} (numbers: {out / 'report.json'}, headline: {out / 'metrics.json'})")
    return 0


def _summary(report: dict) -> str:
    """A few lines for the terminal: chi2_nu (or RMS) per product, model vs PCA, and the speeds."""
    k = (report.get("inputs") or {}).get("latent_dim")
    lines = [f"held-out reconstruction, median over test spectra (model vs weighted PCA, K={k}; plain PCA in brackets):"]
    for product, e in report["reconstruction"].items():
        model, pca, plain = e.get("model") or {}, e.get("pca") or {}, e.get("pca_plain") or {}
        what = "chi2_nu" if (model.get("chi2_nu") or {}).get("n") else "rms_residual"
        m, p, q = ((d.get(what) or {}).get("median") for d in (model, pca, plain))
        fmt = lambda x: "-" if x is None else f"{x:.3g}"  # noqa: E731
        lines.append(f"  {product:<22s} n={e['n_test']:<5d} {what.replace('_residual', ''):<8s} model {fmt(m):>8s}  "
                     f"wPCA {fmt(p):>8s}  ({fmt(q)})")
    s = report["speed"]
    if s.get("model_spectra_per_s"):
        lines.append(f"generation on {s['headline_grid']} ({s['pixels']} px): {s['model_spectra_per_s']:.0f} spectra/s "
                     f"vs Payne {s['payne_spectra_per_s']:.0f}; fit {s['fit_ms_per_spectrum']:.0f} ms/spectrum; "
                     f"{s['cpu_cores']} cores, {s['torch_threads']} torch thread(s)")
    return "\n".join(lines)
