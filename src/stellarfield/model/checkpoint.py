"""Saving and loading runs: safetensors weights + JSON config, written atomically.

A run folder::

    RUN/
        latest.json                 {"checkpoint": "checkpoints/step-00001234"}: replaced atomically
        checkpoints/step-00001234/
            config.json             model config (decoder, instruments), TrainConfig, seed, versions
            model.safetensors       every weight of the StellarModel
            prior.safetensors       the latent prior's weights (once fitted)
            train_state.pt          optimiser, sampler and step counters (resuming only)
            manifest.json           sha256 of each file above, written last in the folder
        metrics.jsonl, validation.json, ...

A checkpoint is written into a fresh folder, its ``manifest.json`` last, and only then does
``latest.json`` (written to a temporary name and ``os.replace``-d, an atomic rename on POSIX) point
to it; the previous checkpoint is deleted after that. A process killed at any moment leaves
``latest.json`` pointing at a complete checkpoint. :func:`load_checkpoint` checks every file
against the manifest, so a missing, truncated or corrupt file gives a clear :class:`ModelLoadError`.

An exported model (:func:`stellarfield.model.reference.export_model`, inference only: no training
latents, no train_state, optionally float16 tables, read back as float32) is a run folder whose
``latest.json`` points at ``"."``: the checkpoint files lie in the folder itself. :func:`load_model`
also takes ``"reference"``, the exported model shipped in the package.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from stellarfield.atomic import write_json_atomic
from stellarfield.errors import StellarfieldError
from stellarfield.model.instrument import Instrument
from stellarfield.model.stellar_model import StellarModel

LATEST = "latest.json"
MANIFEST = "manifest.json"
KEEP = 2  # checkpoints kept in checkpoints/ (the newest ones)


class ModelLoadError(StellarfieldError, RuntimeError):
    """A run folder that cannot be loaded; the message names the file and the reason."""


def versions() -> dict[str, str]:
    """Versions recorded in every checkpoint."""
    import stellarfield

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "stellarfield": stellarfield.__version__,
    }


# --- the model's config: what rebuilds it --------------------------------------------------
def model_config(model: StellarModel, train_config=None, prior=None) -> dict:
    """The JSON config of a checkpoint: enough to rebuild the model (:func:`build_model`), and how it was
    trained (``train_config``: a :class:`~stellarfield.model.train.TrainConfig`; ``prior``: a
    :class:`~stellarfield.model.prior.LatentPrior`)."""
    return {
        "format": "stellarfield-model",
        "version": 1,
        "decoder": model.decoder_config,
        "instruments": {name: inst.to_dict() for name, inst in model.instruments.items()},
        "n_latents": 0 if model.latents is None else model.latents.num_embeddings,
        "likelihood": dict(model.likelihood),
        "encoder": None if model.encoder is None else model.encoder.config(),
        "train_config": None if train_config is None else train_config.to_dict(),
        "prior": None if prior is None else prior.config(),
        "versions": versions(),
    }


def build_model(config: dict) -> StellarModel:
    """A :class:`StellarModel` with fresh weights from a checkpoint's config."""
    instruments = {name: Instrument.from_dict(d) for name, d in config["instruments"].items()}
    # a checkpoint without a "likelihood" entry predates it: it was trained with the learned-scatter NLL
    likelihood = config.get("likelihood", {"loss": "nll", "noise_floor": 0.0})
    return StellarModel(instruments, config["decoder"], n_latents=config.get("n_latents", 0), likelihood=likelihood,
                        encoder_config=config.get("encoder"))


# --- checkpoints on disk -------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(run_dir: str | os.PathLike, step: int, config: dict, model_state: dict[str, torch.Tensor],
                    prior_state: dict[str, torch.Tensor] | None = None, train_state: dict | None = None) -> Path:
    """Write a complete checkpoint for ``step`` and point ``latest.json`` at it (see module docstring).

    The checkpoint is written into a hidden temporary folder, renamed to ``step-NNNNNNNN`` (or, when
    a checkpoint of the same step already exists, as on the resume of a finished run or a final
    checkpoint at a multiple of the interval, ``step-NNNNNNNN.<random>``: the live checkpoint is
    never deleted or overwritten before its replacement is complete), then ``latest.json`` is
    switched atomically, and only then are older checkpoints deleted.
    """
    run_dir = Path(run_dir)
    checkpoints = run_dir / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(4)
    for stale in checkpoints.glob(".tmp-*"):  # left by a writer killed mid-checkpoint (never ours)
        if f"-{os.getpid()}-" not in stale.name:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = checkpoints / f".tmp-step-{step:08d}-{os.getpid()}-{token}"
    tmp.mkdir()
    try:
        save_file({k: v.detach().contiguous() for k, v in model_state.items()}, tmp / "model.safetensors")
        if prior_state is not None:
            save_file({k: v.detach().contiguous() for k, v in prior_state.items()}, tmp / "prior.safetensors")
        if train_state is not None:
            torch.save(train_state, tmp / "train_state.pt")
        (tmp / "config.json").write_text(json.dumps(config, indent=1, default=float))
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
        (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1))
        folder = checkpoints / f"step-{step:08d}"
        if folder.exists():  # a rewrite of this step: the live copy stays until the switch below
            folder = checkpoints / f"step-{step:08d}.{token}"
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_json_atomic(run_dir / LATEST, {"checkpoint": str(folder.relative_to(run_dir)), "step": step})
    _prune_checkpoints(checkpoints, folder)
    return folder


def _checkpoint_step(folder: Path) -> int | None:
    """The step of a checkpoint folder ``step-NNNNNNNN[.suffix]``, or None for anything else."""
    digits = folder.name[len("step-"):].split(".", 1)[0]
    return int(digits) if folder.name.startswith("step-") and digits.isdigit() else None


def _prune_checkpoints(checkpoints: Path, live: Path) -> None:
    """Delete all but the live checkpoint and the newest ``KEEP - 1`` other steps (older copies of
    the live step included); called only after ``latest.json`` points at ``live``."""
    live_step = _checkpoint_step(live)
    by_step: dict[int, list[Path]] = {}
    for path in checkpoints.glob("step-*"):
        step = _checkpoint_step(path)
        if step is not None and path.is_dir() and path != live:
            by_step.setdefault(step, []).append(path)
    others = sorted(s for s in by_step if s != live_step)
    keep = set(others[len(others) - (KEEP - 1):]) if KEEP > 1 else set()
    for step, paths in by_step.items():
        if step == live_step or step not in keep:
            for path in paths:
                shutil.rmtree(path, ignore_errors=True)


def checkpoint_folder(run_dir: str | os.PathLike) -> Path:
    """The folder of the run's latest complete checkpoint, or a clear error."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise ModelLoadError(f"no model at {run_dir}: the path does not exist")
    if not run_dir.is_dir():
        raise ModelLoadError(f"{run_dir} is a file; a model is a run folder written by `stellarfield train`")
    latest = run_dir / LATEST
    if not latest.is_file():
        raise ModelLoadError(f"{run_dir} is not a stellarfield run: {LATEST} is missing (no checkpoint was written)")
    try:
        folder = run_dir / json.loads(latest.read_text())["checkpoint"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{latest} is corrupt ({exc})") from None
    if not folder.is_dir():
        raise ModelLoadError(f"{latest} points at {folder}, which is missing")
    return folder


def load_checkpoint(run_dir: str | os.PathLike, with_train_state: bool = False) -> dict:
    """Read the latest checkpoint: ``{"config", "model", "prior" (or None), "train_state" (or None),
    "folder", "step"}`` (``step``: the training step its weights are from, None if the manifest has
    none). Every file is checked against the manifest first."""
    folder = checkpoint_folder(run_dir)
    manifest_path = folder / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except FileNotFoundError:
        raise ModelLoadError(f"{manifest_path} is missing: the checkpoint is incomplete") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{manifest_path} is corrupt ({exc})") from None
    for name in ("config.json", "model.safetensors"):
        if name not in files:
            raise ModelLoadError(f"{manifest_path} does not list {name}")
    for name, digest in files.items():
        path = folder / name
        if not path.is_file():
            raise ModelLoadError(f"{path} is missing")
        if _sha256(path) != digest:
            raise ModelLoadError(f"{path} is corrupt: its checksum does not match {MANIFEST}")
    try:
        config = json.loads((folder / "config.json").read_text())
        model = _as_float32(load_file(folder / "model.safetensors"))
        prior = _as_float32(load_file(folder / "prior.safetensors")) if "prior.safetensors" in files else None
        train_state = None
        if with_train_state and "train_state.pt" in files:
            train_state = torch.load(folder / "train_state.pt", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a corrupt file
        raise ModelLoadError(f"cannot read the checkpoint in {folder}: {exc}") from None
    return {"config": config, "model": model, "prior": prior, "train_state": train_state, "folder": folder,
            "step": manifest.get("step")}


def _as_float32(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """float16 tensors (an export's encoding tables, see :mod:`stellarfield.model.reference`) as float32;
    training writes only float32, so other checkpoints are unchanged."""
    return {k: v.float() if v.dtype == torch.float16 else v for k, v in state.items()}


@dataclass
class TrainedModel:
    """A loaded run: the model, its latent prior (None if training stopped before fitting it), the
    checkpoint's config, where it came from and the training step of its weights (None: unknown)."""

    model: "torch.nn.Module"
    prior: "torch.nn.Module | None"
    config: dict
    path: Path | None = None
    step: int | None = None


def load_model(run_dir: str | os.PathLike, device: str = "cpu") -> TrainedModel:
    """Load the latest checkpoint of a run folder (see :func:`load_checkpoint` for the checks).

    ``device``: where the model's weights go ("cpu", "auto", "cuda", "cuda:N"; see
    :mod:`stellarfield.device`); the prior stays on the host.

    ``"reference"`` loads the reference model shipped with the package (see
    :func:`stellarfield.model.reference.resolve_model_path`, the one place a model name is resolved).
    Raises :class:`ModelLoadError` with the file and the reason for a missing or corrupt run.
    """
    from stellarfield.model.prior import LatentPrior
    from stellarfield.model.reference import resolve_model_path

    run_dir = resolve_model_path(run_dir)
    ckpt = load_checkpoint(run_dir)
    config = ckpt["config"]
    if not isinstance(config, dict) or config.get("format") != "stellarfield-model":
        raise ModelLoadError(f"{ckpt['folder'] / 'config.json'} is not a stellarfield model config")
    try:
        model = build_model(config)
        model.load_state_dict(ckpt["model"])
        prior = None
        if ckpt["prior"] is not None and config.get("prior"):
            p = config["prior"]
            prior = LatentPrior(p["latent_dim"], p["transforms"], tuple(p["hidden"]), p.get("products"), p.get("counts"),
                                p.get("passes"))
            prior.load_state_dict(ckpt["prior"])
    except (KeyError, RuntimeError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"the checkpoint in {ckpt['folder']} does not match its config: {exc}") from None
    from stellarfield.device import resolve_device

    model.eval()
    model.to(resolve_device(device))
    return TrainedModel(model, prior, config, Path(run_dir), ckpt["step"])
