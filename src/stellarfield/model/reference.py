"""The reference model shipped with the package, and :func:`export_model` that makes such a folder.

``load_model("reference")`` (and ``--model reference`` on every command that takes a model:
generate, fit, bench) loads the folder ``stellarfield/reference_model/`` of the installed package,
found through :mod:`importlib.resources`. Only the exact string ``"reference"`` means it: a run
folder that happens to be called ``reference`` is ``./reference`` (or a ``Path``).

An exported folder is a run folder for inference only::

    OUT/
        latest.json          {"checkpoint": ".", "step": N}: the checkpoint is the folder itself
        config.json          the run's config with n_latents = 0 and an "export" entry
        model.safetensors    every weight except the training latents (latents.weight)
        prior.safetensors    the latent prior (needed to generate)
        manifest.json        sha256 of the three files above

so the ordinary :func:`~stellarfield.model.checkpoint.load_model` reads it (and checks every file
against the manifest). With ``float16=True`` the grid-encoding tables
(``decoder.trunk.encoding.tables.*``, most of the bytes) are stored as float16;
:func:`~stellarfield.model.checkpoint.load_checkpoint` turns every float16 tensor back into float32.
The folder is written under a temporary name next to ``OUT`` and renamed into place, so ``OUT`` is
either absent, the previous export, or complete. ``span_data=`` (``--span-data``) gives a run
trained before instruments measured Gaia XP's sample span that span, from a dataset's training
split (:func:`sample_spans`); the shipped model was exported again so.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from stellarfield.model.checkpoint import (LATEST, MANIFEST, ModelLoadError, _sha256, load_checkpoint, load_model,
                                           write_json_atomic)

#: The model name that means the packaged reference model.
REFERENCE = "reference"
#: Folder of the packaged reference model, inside the ``stellarfield`` package.
REFERENCE_DIR = "reference_model"
#: Default size limit of an export, bytes (10 MB: what a wheel can carry comfortably).
DEFAULT_MAX_BYTES = 10_000_000
#: Weights stored as float16 by ``export_model(..., float16=True)``: the grid-encoding tables.
FLOAT16_PREFIX = "decoder.trunk.encoding.tables."
#: Weights never exported: one latent per training spectrum, used only during training.
DROPPED = ("latents.weight",)


class ModelExportError(ValueError):
    """An export that cannot be made (no prior, over the size limit, existing output, ...)."""


# --- the packaged reference model ------------------------------------------------------------
def reference_model_dir() -> Path:
    """The packaged reference-model folder (it may not exist: see :func:`resolve_model_path`)."""
    from importlib.resources import files

    return Path(str(files("stellarfield").joinpath(REFERENCE_DIR)))


def resolve_model_path(model: str | os.PathLike) -> Path:
    """The run folder a ``--model`` argument names: ``"reference"`` is the packaged reference model,
    anything else is a path. A missing reference model is a clear :class:`ModelLoadError`."""
    if isinstance(model, str) and model == REFERENCE:
        folder = reference_model_dir()
        if not (folder / LATEST).is_file():
            raise ModelLoadError(
                f"the reference model is not installed: {folder} holds no {LATEST} (this stellarfield build "
                f"ships without one; make one with 'stellarfield export RUN --out {folder}', or pass a run folder; "
                f"a local folder named '{REFERENCE}' is './{REFERENCE}')")
        return folder
    return Path(model)


# --- export ----------------------------------------------------------------------------------
@dataclass
class ExportReport:
    """What :func:`export_model` wrote: the folder, each file's size in bytes, and what it dropped."""

    path: Path
    files: dict[str, int]
    float16: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())

    def summary(self) -> str:
        sizes = ", ".join(f"{name} {_mb(n)}" for name, n in self.files.items())
        return (f"exported {self.path}: {_mb(self.total_bytes)} ({sizes}); "
                f"{len(self.float16)} tensors stored as float16, dropped {', '.join(self.dropped) or 'nothing'}")


def export_model(run_dir: str | os.PathLike, out_dir: str | os.PathLike, float16: bool = False,
                 max_bytes: int | None = DEFAULT_MAX_BYTES, overwrite: bool = False,
                 span_data: Sequence[str | os.PathLike] | None = None) -> ExportReport:
    """Write a minimal run folder for inference from the latest checkpoint of ``run_dir``.

    Args:
        run_dir: a run folder (``"reference"`` works too: re-export the packaged model).
        out_dir: the folder to create (see the module docstring for its files).
        float16: store the grid-encoding tables as float16 (about half the size; spectra agree with
            the original to float16 rounding of those weights). Other tensors stay float32.
        max_bytes: refuse (:class:`ModelExportError`, nothing left behind) if the files total more;
            None: no limit.
        overwrite: replace an existing ``out_dir`` (else it is an error).
        span_data: dataset folders whose training split gives each product sampled from a
            basis expansion (Gaia XP) the span of its spectra, where the run's instrument has none
            (a model trained before :attr:`~stellarfield.model.instrument.Instrument.sample_basis`
            existed): :func:`sample_spans`. The decoder is not retrained; what the instrument renders
            on its native samples is then projected onto that span. Recorded in the config's
            ``export`` entry.

    Returns an :class:`ExportReport` (``.total_bytes``, ``.summary()``).
    """
    src = resolve_model_path(run_dir)
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise ModelExportError(f"{out} already exists; pass overwrite=True (--force) to replace it")
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise ModelExportError(f"{out}: the export cannot go into the run folder it is exported from")
    ckpt = load_checkpoint(src)
    config = ckpt["config"]
    if not isinstance(config, dict) or config.get("format") != "stellarfield-model":
        raise ModelLoadError(f"{ckpt['folder'] / 'config.json'} is not a stellarfield model config")
    if ckpt["prior"] is None or not config.get("prior"):
        raise ModelExportError(f"{src} has no fitted latent prior (training stopped before fitting it): "
                               "an exported model could not generate")
    step = ckpt["step"]

    model, dropped, halved = {}, [], []
    for name, tensor in ckpt["model"].items():
        if name in DROPPED:
            dropped.append(name)
            continue
        tensor = tensor.detach().contiguous()
        if float16 and name.startswith(FLOAT16_PREFIX) and tensor.is_floating_point():
            half = tensor.to(torch.float16)
            if not torch.isfinite(half).all():
                raise ModelExportError(f"{name} has values beyond the float16 range (|x| > 65504); export without float16")
            tensor = half
            halved.append(name)
        model[name] = tensor
    export = {"from": str(src), "step": step, "float16": halved, "dropped": dropped,
              "note": "inference-only folder written by stellarfield export; float16 tensors load as float32"}
    if "export" in config:  # an export of an export (--model reference): where the first came from stays
        export["previous"] = config["export"]
    if span_data:
        instruments = {name: dict(d) for name, d in config["instruments"].items()}
        missing = [name for name, d in instruments.items() if d.get("sample_basis") is None]
        spans = sample_spans(span_data, missing)
        if not spans:
            raise ModelExportError(
                f"--span-data: no product of {src} sampled from a basis expansion (Gaia XP) without a span has "
                f"spectra in the training split of {', '.join(map(str, span_data))}; nothing to add")
        for name, (basis, u, n) in spans.items():
            instruments[name].update(sample_basis=basis, sample_u=u)
        config = {**config, "instruments": instruments}
        export["sample_spans"] = {"data": [str(p) for p in span_data], "split": "train",
                                  **{name: {"spectra": n, "rank": len(basis)} for name, (basis, _, n) in spans.items()}}
    config = {**config, "n_latents": 0, "export": export}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.export-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_file(model, tmp / "model.safetensors")
        save_file({k: v.detach().contiguous() for k, v in ckpt["prior"].items()}, tmp / "prior.safetensors")
        write_json_atomic(tmp / "config.json", config)
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
        write_json_atomic(tmp / MANIFEST, {"step": step, "files": files})
        write_json_atomic(tmp / LATEST, {"checkpoint": ".", "step": step})
        sizes = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        report = ExportReport(out, sizes, halved, dropped)
        if max_bytes is not None and report.total_bytes > max_bytes:
            hint = "" if float16 else "; float16=True (--float16) stores the encoding tables in half the bytes"
            raise ModelExportError(f"the export of {src} would be {_mb(report.total_bytes)}, over the limit of "
                                   f"{_mb(max_bytes)} ({', '.join(f'{k} {_mb(v)}' for k, v in sizes.items())}){hint}")
        load_model(tmp)  # the folder loads (manifest, config, every weight) before it takes its place
        _replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def sample_spans(data: Sequence[str | os.PathLike], products: Sequence[str]) -> dict[str, tuple[list, list, int]]:
    """For each of ``products`` sampled from a basis expansion (``ProductProfile.sampled_from_basis``:
    Gaia XP), the span of its spectra in the training split of the datasets ``data`` (a record in two
    of them counts once), as training measures it (:class:`~stellarfield.model.instrument.SampleSpan`):
    ``{product: (sample_basis, sample_u, spectra used)}``, the instrument's fields. Products with no
    such span (not sampled, no spectra, several grids, full rank) are left out."""
    from stellarfield.data.store import iter_spectra_of
    from stellarfield.io.registry import product_profile
    from stellarfield.model.instrument import SampleSpan

    wanted = [p for p in products if (profile := product_profile(p)) is not None and profile.sampled_from_basis]
    spans = {p: SampleSpan() for p in wanted}
    if wanted:
        for spectrum in iter_spectra_of(data, "train", products=wanted):
            spans[spectrum.product].add(spectrum)
    out = {}
    for product, span in spans.items():
        basis, u = span.instrument_fields()
        if basis is not None:
            out[product] = (basis, u, span.n)
    return out


def _mb(n: int) -> str:
    """A size for people: 3.21 MB, 12.3 kB, 340 B (decimal units, as the limit)."""
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB" if n >= 1e3 else f"{n} B"


def _replace_folder(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is first renamed aside, then deleted."""
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if old.exists():
        shutil.rmtree(old)
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)
