"""Data sub-commands of ``stellarfield``: ingest, merge, info, plot (thin wrappers over the API).

    stellarfield ingest SOURCE... --out DATASET [--force] [--workers N] [--part I/N]
    stellarfield merge PART... --out DATASET [--force]
    stellarfield info PATH [--quick] [--stars]
    stellarfield plot PATH [--row KEY|INDEX] [--zoom L1 L2] --out FILE.png|pdf [--force]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stellarfield.cli.arguments import CommandError, positive_float, positive_int, refuse_existing_output
from stellarfield.data.store import is_dataset


def add_commands(sub) -> None:
    p = sub.add_parser("ingest", help="read survey files into a dataset (Parquet shards + manifest)")
    p.add_argument("sources", nargs="+", help="files, folders, or 'demo' for the stellarfield[demo] spectra")
    p.add_argument("--out", required=True, help="dataset folder to create")
    p.add_argument("--force", action="store_true",
                   help="replace an existing dataset (only once the new one is complete and checked)")
    p.add_argument("--workers", type=positive_int, default=None, help="reader processes (default: cores, at most 8)")
    p.add_argument("--part", type=part_spec, default=None, metavar="I/N",
                   help="read only part I (0-based) of N of the sorted file list, into a part dataset for "
                        "'stellarfield merge' (e.g. --part $SLURM_ARRAY_TASK_ID/100)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("merge", help="merge part datasets (ingest --part I/N) into one dataset")
    p.add_argument("parts", nargs="+", help="part dataset folders (every part of the split, any order)")
    p.add_argument("--out", required=True, help="dataset folder to create")
    p.add_argument("--force", action="store_true",
                   help="replace an existing dataset (only once the merged one is complete and checked)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("info", help="print what a survey file or a dataset holds; verify a dataset")
    p.add_argument("path", help="survey file, or dataset folder (then every shard is read and checked)")
    p.add_argument("--max-rows", type=positive_int, default=5, help="records to describe for multi-spectrum files")
    p.add_argument("--quick", action="store_true",
                   help="for a dataset, check only the shards' footers and row counts, not every page")
    p.add_argument("--stars", action="store_true",
                   help="for a dataset, list the stars seen by two or more products (by star_id)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("plot", help="plot a spectrum from a survey file or a dataset row")
    p.add_argument("path", help="survey file or dataset folder")
    p.add_argument("--row", default=None, help="dataset key (product/object_id[/obs]) or row index")
    p.add_argument("--zoom", nargs=2, type=positive_float, metavar=("LAMBDA1", "LAMBDA2"), help="vacuum Angstrom range")
    p.add_argument("--out", required=True, help="output .png or .pdf")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_plot)


# --- ingest ----------------------------------------------------------------------------------
def part_spec(text: str) -> tuple[int, int]:
    """argparse type: ``I/N`` with 0 <= I < N."""
    index, slash, count = text.partition("/")
    if not (slash and index.strip().isdigit() and count.strip().isdigit()):
        raise argparse.ArgumentTypeError(f"expected I/N (part I of N, counted from 0), got {text!r}")
    index, count = int(index), int(count)
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"must be I/N with 0 <= I < N, got {text}")
    return index, count


def cmd_ingest(args: argparse.Namespace) -> int:
    from stellarfield.ingest import REPORT_NAME, NothingToIngestError, ingest

    try:
        report = ingest(args.sources, args.out, force=args.force, workers=args.workers, progress=not args.quiet,
                        part=args.part)
    except NothingToIngestError as exc:
        for skipped in exc.report.skipped:  # the reason for each file, then the one-line error
            print(f"  skipped {skipped['file']}: {skipped['reason']}", file=sys.stderr)
        raise
    print(report.summary())
    print(f"report: {Path(args.out) / REPORT_NAME}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from stellarfield.ingest import REPORT_NAME, merge

    report = merge(args.parts, args.out, force=args.force, progress=not args.quiet)
    print(report.summary())
    print(f"report: {Path(args.out) / REPORT_NAME}")
    return 0


# --- info ------------------------------------------------------------------------------------
def cmd_info(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if path.is_dir():  # a dataset, or a clear error saying why this folder is not one
        from stellarfield.data.store import Dataset

        dataset = Dataset(path)
        print(dataset.summary())
        problems = dataset.verify(full=not args.quick)
        if problems:
            for problem in problems:
                print(f"  damaged: {problem}", file=sys.stderr)
            raise CommandError(
                f"{path}: {len(problems)} problem(s) found (listed above); the dataset cannot be used as it is: "
                "ingest its sources again (stellarfield ingest ... --out DATASET --force)"
            )
        what = "every shard read, counts match the manifest" if not args.quick else "shard footers and row counts match the manifest"
        print(f"  verified: {what}")
        if args.stars:
            from stellarfield.data.stars import describe_dataset_stars

            print(describe_dataset_stars(dataset))
        return 0
    if args.stars:
        raise CommandError(f"{path}: --stars lists the stars of a dataset; this is a file (ingest it first)")
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
        if s.star_id:
            print(f"      star: {s.star_id}")
        if s.meta.get("quality_reason"):
            print(f"      quality: {s.meta.get('quality', 'bad')}: {s.meta['quality_reason']}")
        print(f"      from: {s.provenance}")
    if len(spectra) > args.max_rows:
        print(f"  ... {len(spectra) - args.max_rows} more (use --max-rows)")
    return 0


# --- plot ------------------------------------------------------------------------------------
def cmd_plot(args: argparse.Namespace) -> int:
    from stellarfield.plotting import plot_spectrum

    refuse_existing_output(args.out, args.force)
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
    if is_dataset(path):
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
