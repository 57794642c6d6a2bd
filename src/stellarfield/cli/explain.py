"""The ``explain`` sub-command of ``stellarfield`` (a thin wrapper over :func:`stellarfield.eval.explain.run_explain`).

    stellarfield explain --model RUN --data DATASET [DATASET ...] --out DIR [--max-per-product N]
                         [--refine-steps N] [--random-directions N] [--threads T] [--device auto|cpu|cuda]
                         [--seed S] [--label-patterns conditional|marginal] [--no-plots] [--force] [--quiet]
"""

from __future__ import annotations

import argparse

from stellarfield.cli.arguments import DEVICE_HELP, MODEL_HELP, non_negative_int, positive_int
from stellarfield.device import DEVICES
#: The defaults of :mod:`stellarfield.eval.explain` (repeated so that building the parser imports no torch).
DEFAULT_MAX_PER_PRODUCT, DEFAULT_REFINE_STEPS, N_RANDOM = 1500, 60, 512


def add_commands(sub) -> None:
    p = sub.add_parser("explain", help="read the latent space: responses, lines and elements, label directions")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--data", nargs="+", default=[],
                   help="dataset folder(s) whose labelled train/validation stars give the label directions and the "
                        "stars across the HR diagram (none: the typical star only, no label sections)")
    p.add_argument("--out", required=True, help="report folder (explain.md, explain.json, latents.parquet, plots/)")
    p.add_argument("--max-per-product", type=positive_int, default=DEFAULT_MAX_PER_PRODUCT,
                   help=f"labelled stars fitted per product (random subset; default {DEFAULT_MAX_PER_PRODUCT})")
    p.add_argument("--refine-steps", type=non_negative_int, default=DEFAULT_REFINE_STEPS,
                   help=f"latent optimisation steps per fitted spectrum (default {DEFAULT_REFINE_STEPS})")
    p.add_argument("--random-directions", type=positive_int, default=N_RANDOM,
                   help=f"random latent directions of the baseline (default {N_RANDOM})")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch threads (default 1: with more threads than idle cores torch's fits slow down 20x)")
    p.add_argument("--device", choices=DEVICES, default="cpu",
                   help=DEVICE_HELP + "; default cpu")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the star subsets and the random directions")
    p.add_argument("--label-patterns", choices=("conditional", "marginal"), default="conditional",
                   help="d flux / d label with the other labels held (conditional, default) or of one label alone "
                        "(marginal: carries the labels it co-varies with, e.g. [alpha/M] with -[Fe/H])")
    p.add_argument("--no-plots", action="store_true", help="skip the figures")
    p.add_argument("--force", action="store_true", help="overwrite a report already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_explain)


def cmd_explain(args: argparse.Namespace) -> int:
    from stellarfield.cli.arguments import CommandError, check_inputs, resolve_cli_device
    from stellarfield.eval.explain import ExplainInputError, ExplainOptions, run_explain
    from stellarfield.model.checkpoint import load_model

    out = check_inputs(args, "explain.json", "an explain report",
                       {"max_per_product": 1, "refine_steps": 0, "random_directions": 2, "threads": 1})
    device = resolve_cli_device(args.device)
    trained = load_model(args.model, device=device)  # a broken run folder fails here, with its reason
    options = ExplainOptions(max_per_product=args.max_per_product, refine_steps=args.refine_steps,
                             n_random=args.random_directions, seed=args.seed, plots=not args.no_plots,
                             label_patterns=args.label_patterns)
    try:
        report = run_explain(trained, args.data, out, options, progress=not args.quiet, threads=args.threads)
    except ExplainInputError as exc:
        raise CommandError(str(exc)) from exc
    print(summary(report))
    print(f"report: {out / 'explain.md'} (numbers: {out / 'explain.json'}"
          + (f", {len(report.get('plots') or [])} plots in {out / 'plots'}" if report.get("plots") else "") + ")")
    return 0


def summary(report: dict) -> str:
    """A few lines for the terminal."""
    classes: dict[str, int] = {}
    for e in report["latents"]:
        key = e["class"].split(":")[0]
        classes[key] = classes.get(key, 0) + 1
    lines = [f"{report['model']['latent_dim']} latents: " + ", ".join(f"{v} {k}" for k, v in sorted(classes.items()))]
    ld = report["label_directions"]
    for n, d in ld["directions"].items():
        r2 = d.get("cv_r2_within_source")
        lines.append(f"  {n}: ridge on latents of {d['n']} stars, CV R^2 (within source) {r2:.3f}" if r2 is not None else f"  {n}: -")
    a = ld["numbers"].get("apogee_alpha_to_fe_window_ratio")
    if a:
        fmt = lambda x: "-" if x is None else f"{x:.3f}"
        lines.append(f"  APOGEE alpha/Fe window response ratio: [alpha/M] direction {fmt(a.get('alpha_m'))}, "
                     f"[Fe/H] direction {fmt(a.get('fe_h'))}")
    g = ld["numbers"].get("galah_teff_lines")
    if g and g.get("h_alpha_rank") is not None:
        lines.append(f"  GALAH Teff direction: H-alpha ranks {g['h_alpha_rank']} of {g['n_lines']} lines")
    t = report.get("timings", {}).get("total_s")
    if t is not None:
        lines.append(f"  {t:.0f} s")
    return "\n".join(lines)
