"""The ``stellarfield`` command: thin sub-commands over the Python API.

    stellarfield ingest SOURCE... --out DATASET [--force] [--workers N]
    stellarfield info PATH
    stellarfield plot PATH [--row KEY|INDEX] [--zoom L1 L2] --out FILE.png|pdf
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

#: Exit status for errors in the user's input (a bad file, an existing dataset, ...).
EXIT_USAGE = 2


class CommandError(Exception):
    """An error to show the user as one line, without a traceback."""


# --- ingest ----------------------------------------------------------------------------------
def cmd_ingest(args: argparse.Namespace) -> int:
    from stellarfield.data.ingest import ingest

    report = ingest(args.sources, args.out, force=args.force, workers=args.workers, progress=not args.quiet)
    print(report.summary())
    print(f"report: {Path(args.out) / 'ingest_report.json'}")
    if report.n_spectra == 0:
        raise CommandError("no spectrum could be read from the sources given")
    return 0


# --- info ------------------------------------------------------------------------------------
def cmd_info(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if path.is_dir():  # a dataset, or a clear error saying why this folder is not one
        from stellarfield.data.store import Dataset

        print(Dataset(path).summary())
        return 0
    from stellarfield.io import identify_format, read_spectra

    fmt = identify_format(path)
    spectra = read_spectra(path, format=fmt)
    print(f"{path}: format {fmt}, {len(spectra)} spectra")
    for s in spectra[: args.max_rows]:
        print(f"  {s.key}: {s.survey}/{s.instrument}, {s.frame} frame, {s.normalisation}, "
              f"{s.n_pixels} px, {int(s.mask.sum())} good"
              + (f", R={s.resolution:g}" if s.resolution else "")
              + ("" if s.noise_known else ", noise unknown"))
        for seg in s.segments:
            lsf = f", LSF FWHM {seg.lsf_fwhm.min():.3f}-{seg.lsf_fwhm.max():.3f} A" if seg.lsf_fwhm is not None else ""
            print(f"      {seg.name:<8s} {seg.n_pixels:>6d} px  {seg.wavelength[0]:10.3f} - {seg.wavelength[-1]:10.3f} A (vacuum){lsf}")
        if s.labels:
            print("      labels: " + ", ".join(f"{k}={v:.4g}" for k, v in s.labels.items()))
        print(f"      from: {s.provenance}")
    if len(spectra) > args.max_rows:
        print(f"  ... {len(spectra) - args.max_rows} more (use --max-rows)")
    return 0


def _is_dataset(path: Path) -> bool:
    return path.is_dir() and (path / "manifest.json").exists()


# --- plot ------------------------------------------------------------------------------------
def cmd_plot(args: argparse.Namespace) -> int:
    from stellarfield.plotting import plot_spectrum

    spectrum = _select_spectrum(Path(args.path), args.row)
    zoom = tuple(args.zoom) if args.zoom else None
    try:
        plot_spectrum(spectrum, zoom=zoom, out=args.out)
    except ValueError as exc:
        raise CommandError(str(exc)) from exc
    print(f"wrote {args.out} ({spectrum.key})")
    return 0


def _select_spectrum(path: Path, row: str | None):
    """One record from a survey file or a dataset, by key or by index (default: the first)."""
    if _is_dataset(path):
        from stellarfield.data.store import Dataset

        records, what = Dataset(path), "dataset"
    else:
        from stellarfield.io import read_spectra

        records, what = read_spectra(path), "file"
    if row is None:
        row = "0"
    if row.lstrip("-").isdigit():
        index = int(row)
        if not -len(records) <= index < len(records):
            raise CommandError(f"{path}: row {index} out of range ({what} has {len(records)} spectra)")
        return records[index]
    if what == "dataset":
        try:
            return records.get(row)
        except KeyError as exc:
            raise CommandError(f"{path}: no spectrum with key {row!r}") from exc
    matches = [s for s in records if s.key == row or s.object_id == row]
    if not matches:
        raise CommandError(f"{path}: no spectrum with key or object id {row!r}")
    return matches[0]


# --- parser ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stellarfield",
        description="Learn one generative model of stellar spectra from many surveys at native resolution.",
    )
    from stellarfield import __version__

    parser.add_argument("--version", action="version", version=f"stellarfield {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", help="read survey files into a dataset (Parquet shards + manifest)")
    p.add_argument("sources", nargs="+", help="files, folders, or 'demo' for the stellarfield[demo] spectra")
    p.add_argument("--out", required=True, help="dataset folder to create")
    p.add_argument("--force", action="store_true", help="replace an existing dataset")
    p.add_argument("--workers", type=int, default=None, help="reader processes (default: cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("info", help="print what a survey file or a dataset holds")
    p.add_argument("path")
    p.add_argument("--max-rows", type=int, default=5, help="records to describe for multi-spectrum files")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("plot", help="plot a spectrum from a survey file or a dataset row")
    p.add_argument("path", help="survey file or dataset folder")
    p.add_argument("--row", default=None, help="dataset key (product/object_id[/obs]) or row index")
    p.add_argument("--zoom", nargs=2, type=float, metavar=("LAMBDA1", "LAMBDA2"), help="vacuum Angstrom range")
    p.add_argument("--out", required=True, help="output .png or .pdf")
    p.set_defaults(func=cmd_plot)

    _add_model_commands(sub)
    return parser


def _add_model_commands(sub) -> None:
    """Model commands (train, generate, fit, demo, bench) live in ``cli_model`` and ``cli_bench``."""
    from stellarfield import cli_bench, cli_model

    cli_model.add_commands(sub)
    cli_bench.add_commands(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except Exception as exc:
        if not isinstance(exc, _user_errors()):
            raise
        print(f"stellarfield {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"stellarfield {args.command}: interrupted", file=sys.stderr)
        return 130


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by the input (bad files, existing folders, broken runs): one line, no traceback."""
    from stellarfield.data.store import NotADatasetError
    from stellarfield.io.errors import SpectrumReadError

    errors: list[type[BaseException]] = [CommandError, SpectrumReadError, NotADatasetError, FileExistsError,
                                         FileNotFoundError, NotADirectoryError]
    # model modules are imported only by the model commands
    for module, name in (("stellarfield.model.checkpoint", "ModelLoadError"),
                         ("stellarfield.model.generate", "OutOfRangeError")):
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
