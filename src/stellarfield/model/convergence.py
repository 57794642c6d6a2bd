"""Convergence in view: validation chi2_nu per product and the training loss against wall time.

``train`` appends JSON lines to ``RUN/metrics.jsonl``: every ``log_every`` steps
``{"step", "epoch", "time_s", "loss", ...}`` and at each validation
``{"step", "epoch", "time_s", "validation": {product: {"n", "chi2_nu_median", ...}}}``.
:func:`plot_convergence` reads them and writes ``RUN/convergence.png``: on top the median validation
chi2_nu of each product (log scale, one line per product, legend outside the axes), below the
training loss, both against wall time in minutes.

Tolerated: a last line cut short (a run killed mid-write) or any other unreadable line (skipped and
counted), records without ``time_s`` (then the x axis is the training step, and its label says so),
no validation records (the top panel says so; the loss is still drawn), and a resumed run (records
whose step goes back supersede the earlier ones from that step on, as the resumed run re-did them).
:func:`convergence_series` returns the numbers that are plotted.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogFormatter

METRICS = "metrics.jsonl"
PLOT = "convergence.png"
TIME_LABEL = "wall time (min)"


@dataclass
class ConvergenceSeries:
    """What :func:`plot_convergence` draws. ``x`` is minutes when every record used has ``time_s``
    (``uses_time``), else the training step; ``x_label`` says which."""

    uses_time: bool
    x_label: str
    validation: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # product -> (x, chi2_nu median)
    loss: tuple[np.ndarray, np.ndarray] = field(default_factory=lambda: (np.empty(0), np.empty(0)))  # (x, loss)
    skipped_lines: int = 0
    n_validations: int = 0


def _metrics_path(run_dir: str | os.PathLike) -> Path:
    path = Path(run_dir)
    return path if path.suffix == ".jsonl" else path / METRICS


def read_metrics(run_dir: str | os.PathLike) -> tuple[list[dict], int]:
    """The records of ``RUN/metrics.jsonl`` (or a ``.jsonl`` path) and how many lines were skipped
    as unreadable (a cut-short last line, ...). A missing file is a :class:`FileNotFoundError`."""
    path = _metrics_path(run_dir)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: no metrics recorded (train logs every log_every steps)")
    records, skipped = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                skipped += 1
                continue
            if isinstance(record, dict) and _number(record.get("step")) is not None:
                records.append(record)
            else:
                skipped += 1
    return records, skipped


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _without_rewinds(records: list[dict]) -> list[dict]:
    """Records in file order, where a step at or before the last kept one (a resumed run re-doing
    steps after the last checkpoint) drops the kept records from that step on."""
    kept: list[dict] = []
    for r in records:
        step = float(r["step"])
        while kept and float(kept[-1]["step"]) >= step:
            kept.pop()
        kept.append(r)
    return kept


def convergence_series(run_dir: str | os.PathLike) -> ConvergenceSeries:
    """The numbers plotted by :func:`plot_convergence`, from ``RUN/metrics.jsonl``: per product the
    (x, validation chi2_nu median) points with a finite median, and the (x, training loss) points."""
    records, skipped = read_metrics(run_dir)
    losses = _without_rewinds([r for r in records if _number(r.get("loss")) is not None])
    validations = _without_rewinds([r for r in records if isinstance(r.get("validation"), dict) and r["validation"]])
    used = losses + validations
    uses_time = bool(used) and all(_number(r.get("time_s")) is not None for r in used)
    if uses_time:
        x_label = TIME_LABEL
    else:
        missing = [what for what, rs in (("loss", losses), ("validation", validations))
                   if any(_number(r.get("time_s")) is None for r in rs)]
        x_label = "training step" + (f" (no time_s in the {' and '.join(missing)} records of {METRICS})" if missing else "")

    def x_of(r: dict) -> float:
        return float(r["time_s"]) / 60.0 if uses_time else float(r["step"])

    per_product: dict[str, tuple[list[float], list[float]]] = {}
    for r in validations:
        for product, stats in r["validation"].items():
            value = _number(stats.get("chi2_nu_median")) if isinstance(stats, dict) else None
            if value is None or not math.isfinite(value):
                continue
            xs, ys = per_product.setdefault(str(product), ([], []))
            xs.append(x_of(r))
            ys.append(value)
    loss = [(x_of(r), float(r["loss"])) for r in losses if math.isfinite(float(r["loss"]))]
    return ConvergenceSeries(
        uses_time=uses_time, x_label=x_label,
        validation={p: (np.asarray(xs), np.asarray(ys)) for p, (xs, ys) in sorted(per_product.items())},
        loss=(np.asarray([x for x, _ in loss], dtype=float), np.asarray([y for _, y in loss], dtype=float)),
        skipped_lines=skipped, n_validations=len(validations),
    )


def convergence_figure(series: ConvergenceSeries, title: str = "") -> Figure:
    """The figure of :func:`plot_convergence` (matplotlib object API, no pyplot state): axes[0] has
    one line per product (label = product), axes[1] the training loss (label "training loss")."""
    fig = Figure(figsize=(8.0, 5.5))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for product, (x, y) in series.validation.items():
        top.plot(x, y, marker="o", markersize=3, linewidth=1.2, label=product)
    if series.validation:
        if all((y > 0).all() for _, y in series.validation.values()):
            _log_y(top)
        top.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False, title="product")
    else:
        top.text(0.5, 0.5, f"no validation records in {METRICS} yet\n(validation runs every validate_every_epochs epochs)",
                 transform=top.transAxes, ha="center", va="center", fontsize=9, color="0.4")
        top.set_yticks([])
    top.set_ylabel("validation chi2_nu (median)")
    top.grid(True, which="both", alpha=0.3)

    x, y = series.loss
    if len(x):
        bottom.plot(x, y, color="0.3", linewidth=1.0, label="training loss")
        if (y > 0).all():
            _log_y(bottom)
    else:
        bottom.text(0.5, 0.5, f"no training-loss records in {METRICS} yet", transform=bottom.transAxes,
                    ha="center", va="center", fontsize=9, color="0.4")
    bottom.set_ylabel("training loss", fontsize=8)
    bottom.set_xlabel(series.x_label)
    bottom.grid(True, which="both", alpha=0.3)
    note = f" ({series.skipped_lines} unreadable line(s) skipped)" if series.skipped_lines else ""
    if title or note:
        fig.suptitle(title + note, fontsize=10)
    return fig


def _log_y(ax) -> None:
    """Log y axis with plain tick labels (2, 3, 10 rather than 2x10^0)."""
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))


def plot_convergence(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Plot ``RUN/metrics.jsonl`` (see the module docstring) to ``out`` (default
    ``RUN/convergence.png``; .png or .pdf), written to a temporary name then ``os.replace``-d.
    Returns the path. A missing metrics file is a :class:`FileNotFoundError`."""
    path = _metrics_path(run_dir)
    series = convergence_series(path)
    out = Path(out) if out is not None else path.parent / PLOT
    suffix = out.suffix.lower()
    if suffix not in (".png", ".pdf"):
        raise ValueError(f"{out}: plot output must end in .png or .pdf")
    fig = convergence_figure(series, title=f"{path.parent.name}: convergence")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp-{os.getpid()}{out.suffix}")
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format=suffix[1:])
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def update_convergence_plot(run_dir: str | os.PathLike) -> Path | None:
    """:func:`plot_convergence` for the training loop: does nothing (None) before the first metrics
    line, and turns any failure into a warning, so a plot never stops a training."""
    if not _metrics_path(run_dir).is_file():
        return None
    try:
        return plot_convergence(run_dir)
    except Exception as exc:  # noqa: BLE001 - a figure must never cost a run
        warnings.warn(f"could not plot convergence for {run_dir}: {exc}", RuntimeWarning, stacklevel=2)
        return None
