"""Model sub-commands of ``stellarfield``: train, generate, fit, predict, demo (thin wrappers over the API).

    stellarfield train --data DATASET --out RUN [--config FILE] [--minutes M] [--epochs N] [--seed S] [--resume]
    stellarfield generate --model RUN (--instrument NAME | --wave-range A B --resolution R | --wave-grid FILE)
                          --n N [--rv KMS | --rv-random] [--snr S] --out (FOLDER | FILE.parquet | FILE.fits) [--plot PNG] [--force]
    stellarfield fit --model RUN INPUTS... --out RESULT.parquet [--force]
    stellarfield predict --model RUN --from INPUTS... [--star ID] (--to PRODUCT [--wave-grid FILE] |
                         --wave-range A B --resolution R | --wave-grid FILE [--resolution R]) --out FILE [--force]
    stellarfield export RUN --out DIR [--float16] [--max-mb MB] [--force] [--span-data DATASET ...]
    stellarfield amortise --model RUN --data DATASET... --out DIR [--steps N] [--inputs gradient]
    stellarfield demo [--out DIR]

``--model`` is a run folder, or ``reference`` for the reference model shipped with the package
(resolved in one place, :func:`stellarfield.model.checkpoint.load_model`). No command here replaces
an existing ``--out`` without ``--force``: fit and predict check first
(:func:`~stellarfield.cli.arguments.refuse_existing_output`), generate, export and prior in their
library functions before any work; amortise never replaces one.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from stellarfield.cli.arguments import (
    DEVICE_HELP,
    MODEL_HELP,
    non_negative_int,
    positive_float,
    positive_int,
    radial_velocity,
    refuse_existing_output,
    require_datasets,
)
from stellarfield.data.split import SPLITS
from stellarfield.data.store import is_dataset
from stellarfield.errors import StellarfieldError
from stellarfield.device import DEVICES

#: ``stellarfield amortise --inputs``: :data:`stellarfield.model.encoder.INPUTS`, spelled out here so that
#: the parser does not import torch (a test checks that the two agree).
ENCODER_INPUTS = ("gradient", "gradient+least-squares")

#: Generated spectra drawn in the --plot gallery of 'generate'.
GALLERY_STARS = 16


def add_commands(sub) -> None:
    p = sub.add_parser("train", help="train a model on a dataset (GON / auto-decoder, explicit physics)")
    p.add_argument("--data", required=True, nargs="+", help="dataset folder(s) made by 'stellarfield ingest'")
    p.add_argument("--out", required=True, help="run folder (weights, config, metrics, checkpoints)")
    p.add_argument("--config", help="TrainConfig keys: a JSON file, or the JSON object itself ('{\"minutes\": 30}'); "
                   "unknown keys are refused")
    p.add_argument("--minutes", type=positive_float, help="stop after this many minutes")
    p.add_argument("--epochs", type=positive_int, help="stop after this many epochs")
    p.add_argument("--max-steps", type=positive_int, help="stop after this many steps")
    p.add_argument("--seed", type=non_negative_int, help="random seed (default: the config's, 0)")
    p.add_argument("--objective", choices=["autodecoder", "gon", "encoder"],
                   help="training objective: %(choices)s (default: the config's, autodecoder)")
    p.add_argument("--streaming", action=argparse.BooleanOptionalAction, default=None,
                   help="read the dataset's Parquet row groups as training goes, in bounded memory (default: "
                        "the config's; automatic above 50,000 training spectra)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--init-from", metavar="MODEL", help="start from a trained model's decoder (a run folder or "
                   "'reference'; its architecture and likelihood come with it), the latents from its fits: "
                   "fine-tuning (default: the config's, none)")
    p.add_argument("--device", choices=DEVICES, help=DEVICE_HELP + "; default: the config's, auto")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="draw new stars from the prior and render them on a grid")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    grid = p.add_mutually_exclusive_group(required=True)
    grid.add_argument("--instrument", help="a product the model was trained on (its native grid; a wrong name "
                                           "lists the model's products)")
    grid.add_argument("--wave-range", nargs=2, type=positive_float, metavar=("A", "B"),
                      help="vacuum Angstrom range (with --resolution)")
    grid.add_argument("--wave-grid", help="text/.npy file of vacuum Angstrom wavelengths")
    p.add_argument("--resolution", type=positive_float, help="resolving power R for --wave-range / --wave-grid")
    p.add_argument("--n", type=positive_int, default=16, help="number of stars (default 16)")
    rv = p.add_mutually_exclusive_group()
    rv.add_argument("--rv", type=radial_velocity, default=None,
                    help="radial velocity in km/s applied to all stars (|v| below the speed of light)")
    rv.add_argument("--rv-random", action="store_true", help="draw RVs from N(0, 50 km/s)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the latents and velocities (default 0)")
    p.add_argument("--population", default="auto",
                   help="whose stars to draw: a product's population (e.g. miles: the stars MILES observed), 'all' "
                        "(every product's), or 'auto' (default: --instrument's own where at least 20 of its stars "
                        "fitted it; 'all' otherwise and on other grids)")
    p.add_argument("--snr", type=positive_float,
                   help="add white Gaussian noise of sigma = median|flux| / SNR to each star and record its ivar "
                        "(default: noiseless)")
    p.add_argument("--out", required=True,
                   help="a folder: a stellarfield dataset of Parquet shards written as it goes (any --n; 'stellarfield "
                        "info', training and Dataset read it); FILE.parquet: one table file, also written as it goes; "
                        "FILE.fits: made in memory, refused above 2 GB of flux")
    p.add_argument("--chunk", type=positive_int,
                   help="stars rendered and written at a time (default: ~16 M pixels' worth, at most 8192)")
    p.add_argument("--shard-size", type=positive_int, default=4096, help="stars per Parquet shard of a dataset (default 4096)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--plot", help=f"optional PNG gallery of the first {GALLERY_STARS} generated spectra")
    p.add_argument("--device", choices=DEVICES, default="cpu", help=DEVICE_HELP + "; default cpu")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("fit", help="fit latents, RV and chi2 of survey files or a dataset")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("inputs", nargs="+", help="survey files, folders or dataset folders")
    p.add_argument("--split", default=None, choices=SPLITS, help="with a dataset: only this split (%(choices)s)")
    p.add_argument("--refine-steps", type=non_negative_int, default=None,
                   help="latent/RV optimisation steps per spectrum (default 100; for a model with an encoder, "
                        "the steps after the encoder chosen on the validation split and saved with it)")
    p.add_argument("--out", required=True, help="output .parquet")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--device", choices=DEVICES, default="cpu", help=DEVICE_HELP + "; default cpu")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("predict", help="fit one latent to all spectra of one star and render it as another "
                                        "instrument would see it, with a 1-sigma band")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--from", dest="inputs", nargs="+", required=True, metavar="INPUT",
                   help="the star's spectra: survey files, folders of them, or dataset folders (with --star)")
    p.add_argument("--star", help="keep only the inputs of this star (its star_id or object id, e.g. 'HD 2857')")
    p.add_argument("--to", help="target product: its native grid and LSF (with --wave-grid: its LSF at those pixels)")
    p.add_argument("--wave-range", nargs=2, type=positive_float, metavar=("A", "B"),
                   help="target vacuum Angstrom range, uniform in ln(lambda) (with --resolution)")
    p.add_argument("--wave-grid", help="text/.npy file of target vacuum Angstrom wavelengths")
    p.add_argument("--resolution", type=positive_float,
                   help="resolving power R of a Gaussian LSF for --wave-range / --wave-grid (not with --to)")
    p.add_argument("--rv", type=radial_velocity, default=None,
                   help="render the prediction at this radial velocity in km/s (default: the star's rest frame)")
    p.add_argument("--refine-steps", type=non_negative_int, default=200,
                   help="Adam steps on the shared latent and the velocities (default 200)")
    p.add_argument("--samples", type=non_negative_int, default=200,
                   help="latents drawn from the Laplace posterior for the 16-84%% band (default 200; 0: no band)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of those draws (default 0)")
    p.add_argument("--no-normalise", action="store_true",
                   help="keep the model's flux for a continuum-normalised target product (default: divided by a "
                        "pseudo-continuum as the survey normalises, as generate does)")
    p.add_argument("--allow-different-stars", action="store_true",
                   help="fit inputs that name different stars together anyway")
    p.add_argument("--out", required=True, help="output .fits or .parquet (prediction, band, latent, inputs' RVs)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--device", choices=DEVICES, default="cpu", help=DEVICE_HELP + "; default cpu")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="write a small inference-only copy of a run (no training latents or state)")
    p.add_argument("run", help="run folder (or 'reference')")
    p.add_argument("--out", required=True, help="folder to create")
    p.add_argument("--float16", action="store_true", help="store the grid-encoding tables as float16 (about half the size)")
    p.add_argument("--max-mb", type=positive_float, default=10.0,
                   help="refuse if the export is larger than this (MB, default 10)")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")
    p.add_argument("--span-data", nargs="+", metavar="DATASET",
                   help="datasets whose training split gives Gaia XP (a product sampled from a basis "
                        "expansion) the span of its spectra, where the run's instrument has none")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("prior", help="fit a trained model's latent prior again, one population per product, and "
                                      "write the model with it to a new run folder")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--data", nargs="+", required=True, help="dataset folders (their train split gives the latents)")
    p.add_argument("--out", required=True, help="run folder to create (the model's weights with the new prior)")
    p.add_argument("--steps", type=positive_int, help="Adam steps of the flow (default: the run's prior_steps)")
    p.add_argument("--max-spectra", type=positive_int,
                   help="training spectra fitted for their latents, over all products (default: the run's prior_max_spectra)")
    p.add_argument("--from-table", action="store_true",
                   help="fit to the run's own latent table, as training does (an auto-decoder run folder, and the "
                        "datasets it was trained on), instead of latents fitted to a sample of the train split")
    p.add_argument("--flow", choices=["coupling", "autoregressive"],
                   help="the flow's layers: coupling (draws ~8x faster) or autoregressive (default: the run's)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_prior)

    p = sub.add_parser("amortise", help="train an encoder for a trained model's frozen decoder (fits start from it), "
                                         "its fit settings chosen on the validation split")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--data", nargs="+", required=True, help="dataset folders (train split trains, validation chooses)")
    p.add_argument("--out", required=True, help="run folder to create (the model with its encoder)")
    p.add_argument("--steps", type=positive_int, default=600, help="encoder training steps (default 600)")
    p.add_argument("--inputs", choices=ENCODER_INPUTS, default=None,
                   help="what the encoder reads: the pooled gradient, or also its least-squares coefficients "
                        "(default gradient+least-squares; model/encoder.py)")
    p.set_defaults(func=cmd_amortise)

    p = sub.add_parser("demo", help="ingest the [demo] spectra; the reference model fits and generates; train briefly; plot")
    p.add_argument("--out", default="demo_out", help="output folder")
    p.add_argument("--minutes", type=positive_float, default=3.0,
                   help="training time of the demo's own model (the reference model does the rest; default 3)")
    p.add_argument("--force", action="store_true", help="start from scratch even if --out holds a previous demo")
    p.set_defaults(func=cmd_demo)


def cmd_train(args: argparse.Namespace) -> int:
    from stellarfield.cli.arguments import CommandError
    from stellarfield.model.train import TrainConfig, train

    config = load_train_config(args.config) if args.config else TrainConfig()
    overrides = {k: getattr(args, k) for k in ("minutes", "epochs", "max_steps", "seed", "objective", "device",
                                               "streaming", "init_from") if getattr(args, k) is not None}
    if overrides:
        config = TrainConfig.from_dict({**config.to_dict(), **overrides})
    require_datasets(args.data)
    data = args.data[0] if len(args.data) == 1 else args.data
    try:
        result = train(data, args.out, config, resume=args.resume, progress=not args.quiet)
    except (ValueError, FloatingPointError) as exc:  # no training spectra, no stopping rule, a diverged loss
        if isinstance(exc, StellarfieldError):
            raise
        raise CommandError(f"{args.out}: {exc}") from exc
    print(f"trained {result.steps} steps ({result.epochs} epochs) in {result.seconds:.0f} s, stopped by {result.stopped_by}; "
          f"{result.train_spectra_per_s:.1f} training spectra/s")
    print("validation chi2_nu per product (median over validation-split spectra):")
    for product, stats in sorted(result.validation.items()):
        print(f"  {product:<22s} n={stats.get('n', 0):>5}  chi2_nu median {stats.get('chi2_nu_median', float('nan')):8.3f}")
    print(f"run folder: {result.run_dir}")
    return 0


def load_train_config(path: str | Path):
    """A :class:`~stellarfield.model.train.TrainConfig` from a JSON file, or from the JSON object
    itself (a value starting with ``{``, as ``--config '{"minutes": 30}'``), or a
    :class:`~stellarfield.errors.ConfigError` naming the file (or the text), what is wrong and what to do."""
    import dataclasses
    import json

    from stellarfield.errors import ConfigError
    from stellarfield.model.train import TrainConfig

    inline = isinstance(path, str) and path.lstrip().startswith("{")
    what = "--config takes a JSON object of TrainConfig keys, or a file holding one"
    path = path if inline else Path(path)
    try:
        text = path if inline else path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file; {what}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a config file; {what}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc})") from None
    try:
        values = json.loads(text)
    except ValueError as exc:
        where = f" at line {exc.lineno}, column {exc.colno}" if hasattr(exc, "lineno") else ""
        raise ConfigError(f"{path}: not valid JSON ({getattr(exc, 'msg', exc)}{where}); {what}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: holds a JSON {type(values).__name__}, not an object; {what}")
    known = {f.name: f for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; known TrainConfig keys: {sorted(known)}")
    defaults = TrainConfig()
    for key, value in values.items():
        default = getattr(defaults, key)
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, (int, float)):
            ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
        elif isinstance(default, str):
            ok = value is None or isinstance(value, str)
        else:
            ok = True
        if not ok:
            raise ConfigError(f"{path}: {key} must be a {type(default).__name__} like {default!r}, got {value!r}")
    try:
        return TrainConfig.from_dict(values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from None


def cmd_generate(args: argparse.Namespace) -> int:
    from stellarfield.cli.arguments import CommandError
    from stellarfield.model.checkpoint import load_model
    from stellarfield.model.generate import FitsTooLargeError, write_generated

    if args.wave_range is not None and args.resolution is None:
        raise CommandError("--wave-range needs --resolution R")
    if args.wave_range is not None and not args.wave_range[0] < args.wave_range[1]:
        raise CommandError(f"--wave-range {args.wave_range[0]:g} {args.wave_range[1]:g}: A must be below B")
    wave_grid = None
    if args.wave_grid:
        wave_grid = _read_wave_grid(Path(args.wave_grid))
    model = load_model(args.model, device=args.device)  # a broken run folder fails here, naming the file
    if model.prior is None:
        raise CommandError(
            f"{args.model}: this run stopped before its latent prior was fitted (the last step of training), "
            "so it cannot draw new stars; finish it with 'stellarfield train --resume --data DATASET --out "
            f"{args.model}' (or use 'stellarfield fit', which needs no prior)"
        )
    if args.instrument is not None and args.instrument not in model.model.instruments:
        raise CommandError(f"--instrument {args.instrument}: the model was not trained on that product; "
                           f"choose one of {sorted(model.model.instruments)}")
    rv = "random" if args.rv_random else args.rv
    first = []
    keep_first = lambda g: first.append(g) if not first else None
    try:
        write_generated(model, args.out, args.n, chunk=args.chunk, shard_size=args.shard_size, overwrite=args.force,
                        progress=not args.quiet, on_chunk=keep_first if args.plot else None,
                        instrument=args.instrument, wave_range=tuple(args.wave_range) if args.wave_range else None,
                        resolution=args.resolution, wave_grid=wave_grid, rv_kms=rv, seed=args.seed, snr=args.snr,
                        population=args.population)
    except (KeyError, ValueError, FileExistsError) as exc:  # an argument the model cannot honour, said in one line
        if isinstance(exc, StellarfieldError) or type(exc).__name__ == "OutOfRangeError":
            raise
        if isinstance(exc, FitsTooLargeError):
            raise CommandError(str(exc)) from exc
        raise CommandError(str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)) from exc
    print(f"wrote {args.n:,} generated spectra to {args.out}")
    if args.plot and first:
        from stellarfield.eval.plots import plot_gallery

        g = first[0]
        plot_gallery(g.wavelength, g.flux[:GALLERY_STARS], out=args.plot, title=f"stars drawn from the prior ({g.grid})")
        print(f"wrote {args.plot}")
    return 0


def _read_wave_grid(path: Path):
    import numpy as np

    from stellarfield.cli.arguments import CommandError

    if not path.exists():
        raise CommandError(f"{path}: no such file")
    try:
        grid = np.load(path) if path.suffix == ".npy" else np.loadtxt(path)
    except Exception as exc:
        raise CommandError(f"{path}: cannot read a wavelength grid ({exc})") from exc
    grid = np.asarray(grid, dtype=float).ravel()
    if grid.size < 2 or not np.all(np.isfinite(grid)) or not np.all(np.diff(grid) > 0):
        raise CommandError(f"{path}: a wavelength grid must be >= 2 finite, increasing values in vacuum Angstrom")
    return grid


def cmd_fit(args: argparse.Namespace) -> int:
    from stellarfield.cli.arguments import CommandError
    from stellarfield.model.checkpoint import load_model
    from stellarfield.model.fit import fit_spectra, write_fit_table

    if Path(args.out).suffix.lower() != ".parquet":
        raise CommandError(f"{args.out}: output must end in .parquet")
    refuse_existing_output(args.out, args.force)
    missing = [item for item in args.inputs if not Path(item).exists()]
    if missing:
        raise CommandError(f"{missing[0]}: no such file or folder" + (f" (nor {missing[1:]})" if missing[1:] else "")
                           + "; fit takes survey files, folders of them, or dataset folders")
    if args.split is not None and not any(is_dataset(i) for i in args.inputs):
        raise CommandError(f"--split {args.split} selects rows of a dataset, and no input is a dataset folder")
    model = load_model(args.model, device=args.device)  # a broken run folder fails here, before any input is read
    spectra = _input_spectra(args.inputs, args.split)
    first = next(spectra, None)
    if first is None:
        where = f" in split {args.split!r}" if args.split else ""
        raise CommandError(f"no spectrum to fit{where} in {', '.join(args.inputs)} (files skipped are listed above)")
    steps = args.refine_steps if args.refine_steps is not None or model.model.encoder is not None else 100
    table = fit_spectra(model, itertools.chain([first], spectra), refine_steps=steps, progress=True)
    write_fit_table(table, args.out)
    print(f"fitted {table.num_rows} spectra -> {args.out}")
    warn_out_of_domain(dict(zip(table.column("key").to_pylist(), table.column("flags").to_pylist())),
                       dict(zip(table.column("key").to_pylist(), table.column("product").to_pylist())))
    return 0


#: Flags of a fit that mean the model answered outside what it learned, and what each means.
OUT_OF_DOMAIN = {
    "new_instrument": "of a product the model was never trained on (observed through an instrument built from "
                      "the files themselves): their latents and chi2 are extrapolations",
    "pixels_outside_training_range": "with pixels outside the wavelengths the model was trained on (those pixels "
                                     "were masked, not fitted)",
    "no_usable_pixels": "with no usable pixel (nothing was fitted)",
}


def warn_out_of_domain(flags: dict[str, list[str]], products: dict[str, str]) -> None:
    """One warning line per kind of out-of-domain fit (counts and products), so that a user sees on the
    terminal what the output table only flags."""
    from stellarfield.cli.arguments import warn

    for flag, meaning in OUT_OF_DOMAIN.items():
        keys = [k for k, f in flags.items() if flag in (f or [])]
        if keys:
            names = sorted({products[k] for k in keys})
            warn(f"{len(keys)} of {len(flags)} spectra {meaning} [{flag}; products: {', '.join(names)}]")


def _input_spectra(inputs: list[str], split: str | None):
    """Spectra from dataset folders (optionally one split), or survey files and folders.

    Files that cannot be read are reported on stderr and skipped: one bad file never stops a fit.
    """
    import sys

    from stellarfield.data.store import Dataset
    from stellarfield.ingest import spectra_from_sources

    def report(skip: dict) -> None:
        print(f"skipped {skip['file']}: {skip['reason']}", file=sys.stderr)

    for item in inputs:
        if is_dataset(item):
            yield from Dataset(item).iter_spectra(split=split)
        else:
            yield from spectra_from_sources([item], on_skip=report)


def cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np

    from stellarfield.cli.arguments import CommandError
    from stellarfield.data.stars import candidate_id
    from stellarfield.model.checkpoint import load_model
    from stellarfield.model.predict import DifferentStarsError, predict

    if Path(args.out).suffix.lower() not in (".fits", ".parquet"):
        raise CommandError(f"{args.out}: output must end in .fits or .parquet")
    refuse_existing_output(args.out, args.force)
    if args.to is None and args.wave_range is None and args.wave_grid is None:
        raise CommandError("no target: give --to PRODUCT, --wave-range A B --resolution R, or --wave-grid FILE")
    if args.wave_range is not None and (args.to is not None or args.wave_grid is not None):
        raise CommandError("--wave-range makes its own grid: give it without --to and --wave-grid")
    if args.wave_range is not None and args.resolution is None:
        raise CommandError("--wave-range needs --resolution R")
    if args.wave_range is not None and not args.wave_range[0] < args.wave_range[1]:
        raise CommandError(f"--wave-range {args.wave_range[0]:g} {args.wave_range[1]:g}: A must be below B")
    if args.to is not None and args.resolution is not None:
        raise CommandError("--resolution is for --wave-range / --wave-grid; --to renders through the product's own LSF")
    missing = [item for item in args.inputs if not Path(item).exists()]
    if missing:
        raise CommandError(f"{missing[0]}: no such file or folder" + (f" (nor {missing[1:]})" if missing[1:] else "")
                           + "; --from takes survey files, folders of them, or dataset folders")
    wave_grid = _read_wave_grid(Path(args.wave_grid)) if args.wave_grid else None
    model = load_model(args.model, device=args.device)  # a broken run folder fails here, naming the file
    if args.star is None:
        spectra = list(_input_spectra(args.inputs, None))
    else:
        wanted = {args.star.strip(), candidate_id(args.star)} - {None}
        spectra = list(_star_spectra(args.inputs, wanted))
        if not spectra:
            raise CommandError(f"no spectrum of star {args.star!r} in {', '.join(args.inputs)}")
    if not spectra:
        raise CommandError(f"no spectrum to fit in {', '.join(args.inputs)} (files skipped are listed above)")
    try:
        result = predict(model, spectra, to=args.to, wave_range=tuple(args.wave_range) if args.wave_range else None,
                         resolution=args.resolution, wave_grid=wave_grid, rv_kms=args.rv,
                         refine_steps=args.refine_steps, n_samples=args.samples, seed=args.seed,
                         same_star=not args.allow_different_stars, normalise=False if args.no_normalise else None)
    except DifferentStarsError as exc:
        raise CommandError(f"{exc.args[0].split(';')[0]}; pick one with --star ID, or fit them together with "
                           "--allow-different-stars") from exc
    result.write(args.out)
    print(f"fitted one latent to {len(result.inputs)} spectra:")
    for i in result.inputs:
        rv = "no RV fitted" if i.rv_kms is None else f"RV {i.rv_kms:9.2f} +- {i.rv_err_kms:.2f} km/s"
        flags = f"  [{', '.join(i.flags)}]" if i.flags else ""
        print(f"  {i.key:<48s} {i.product:<20s} {rv}  chi2_nu {i.chi2_nu:.3g}  n {i.n_pixels}{flags}")
    warn_out_of_domain({i.key: i.flags for i in result.inputs}, {i.key: i.product for i in result.inputs})
    width = float(np.nanmedian(result.flux_hi - result.flux_lo)) / max(float(np.nanmedian(np.abs(result.flux))), 1e-30)
    print(f"latent: {np.array2string(result.latent, precision=3, max_line_width=200)} "
          f"(+- {np.array2string(result.latent_err, precision=3, max_line_width=200)})")
    print(f"wrote the prediction on {result.grid} ({len(result.wavelength)} px, {result.frame} frame; 16-84% band "
          f"median width {100 * width:.2f}% of the flux) to {args.out}"
          + (f"  [{', '.join(result.flags)}]" if result.flags else ""))
    return 0


def _star_spectra(inputs: list[str], wanted: set[str]):
    """The spectra whose star_id or object_id is in ``wanted``: from a dataset by its table (only those
    rows are decoded), from files by reading them."""
    from stellarfield.data.store import Dataset

    for item in inputs:
        if is_dataset(item):
            store = Dataset(item)
            for row in store.table(["key", "star_id", "object_id"]).to_pylist():
                if row["star_id"] in wanted or row["object_id"] in wanted:
                    yield store.get(row["key"])
        else:
            yield from (s for s in _input_spectra([item], None) if s.star_id in wanted or s.object_id in wanted)


def cmd_prior(args: argparse.Namespace) -> int:
    from stellarfield.cli.arguments import CommandError
    from stellarfield.model.checkpoint import load_model
    from stellarfield.model.train import refit_prior

    require_datasets(args.data)
    model = load_model(args.model)
    try:  # refit_prior refuses the model's own folder and an existing --out before any work
        passes = {"coupling": 2, "autoregressive": None, None: "run"}[args.flow]
        refit_prior(model, args.data, args.out, steps=args.steps, max_spectra=args.max_spectra, overwrite=args.force,
                    from_table=args.from_table, passes=passes)
    except FileExistsError as exc:
        raise CommandError(f"{exc} (use --force to replace it)") from exc
    except ValueError as exc:  # --out is the model's own folder, or the datasets hold none of its products
        raise CommandError(str(exc)) from exc
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from stellarfield.cli.arguments import CommandError
    from stellarfield.model.reference import ModelExportError, export_model

    try:  # export_model refuses an existing --out without --force before any work
        report = export_model(args.run, args.out, float16=args.float16, max_bytes=int(args.max_mb * 1e6),
                              overwrite=args.force, span_data=args.span_data)
    except ModelExportError as exc:
        raise CommandError(str(exc)) from exc
    print(report.summary())
    return 0


def cmd_amortise(args: argparse.Namespace) -> int:
    from stellarfield.cli.arguments import CommandError
    from stellarfield.model.amortise import AmortiseConfig, amortise

    if Path(args.out).exists():  # an encoder run is never replaced (no --force): choose another folder
        raise CommandError(f"{args.out} already exists; choose another folder")
    report = amortise(args.model, args.data, args.out, AmortiseConfig(steps=args.steps, **({"inputs": args.inputs} if args.inputs else {})))
    print(f"encoder trained {report.steps} steps (best on validation: step {report.best_step}) in "
          f"{report.seconds / 60:.1f} min -> {args.out}; fits continue after it, per product (chosen on validation):")
    for name, s in report.fit_settings.items():
        print(f"  {name:22s} {s['refine_steps']} {s['refiner']} steps, RV search {s['rv_search']}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from stellarfield.demo import run_demo

    summary = run_demo(args.out, minutes=args.minutes, force=args.force)
    print(summary)
    return 0
