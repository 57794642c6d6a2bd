"""Training: one readable loop (nanoGPT style) from spectra to a saved, loadable run folder.

>>> from stellarfield.model import TrainConfig, train
>>> result = train("datasets/all", "runs/demo", TrainConfig(minutes=10))          # doctest: +SKIP
>>> result.validation["apogee_apstar"]["chi2_nu_median"]                         # doctest: +SKIP

Each step takes ``batch_per_product`` spectra of each product (instrument-balanced), a window of
``window_pixels`` pixels of each where the product allows it, and minimises the mean Gaussian NLL
per pixel (:func:`stellarfield.model.objectives.training_loss`). Every epoch (as many spectra as the
training split holds) it prints and logs the per-product validation chi2_nu. Checkpoints are
written atomically every ``checkpoint_every_s`` seconds (or ``checkpoint_every_steps`` steps) and at the end; ``resume=True`` continues
from the latest one, giving the same weights as an uninterrupted run (the sampler, the optimisers
and the step counters are saved). After training, a normalizing-flow prior is fitted to the
training latents (:mod:`stellarfield.model.prior`).

Data: dataset folders with more than :data:`STREAMING_AUTO_SPECTRA` training spectra (or
``TrainConfig(streaming=True)``) are **streamed** (:class:`~stellarfield.model.batching.StreamingTrainingData`):
each product is read a buffer of row groups at a time, the row groups in a random order per pass and
the spectra in a random order per buffer, into the same instrument-balanced batches, so memory does
not grow with the dataset (the auto-decoder's latent table still does: 16 float32 per spectrum plus
Adam's two moments, 192 bytes, stepped without a dense gradient by
:class:`~stellarfield.model.latent_table.LatentAdam`; the ``gon`` and ``encoder`` objectives have none). Smaller datasets are
held in memory as padded tensors (:class:`~stellarfield.model.batching.TrainingData`).

Step sizes: a linear warm-up, then constant (the default) or a cosine decay to the run's limit
(``lr_schedule``, :func:`learning_rate_factor`). **Fine-tuning** (``init_from``, :func:`warm_start`):
a run may start from a trained model (a run folder or ``"reference"``), its decoder's weights and
architecture, its latent table at that model's fits of the training spectra; with a cosine decay
this continues a model on new data, or anneals one trained at a constant step size.

Under ``torchrun --nproc_per_node N`` (CPU, gloo) each rank keeps a disjoint 1/N of every product
(streaming: whole shards, shard ``i`` on rank ``i % N``),
gradients are averaged across ranks after each backward pass, and rank 0 validates and writes.
Reproducibility: the same seed, data and limits in steps or epochs give the same weights; a limit
in ``minutes`` stops at a step that depends on the machine's speed.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from stellarfield.data.store import iter_spectra_of
from stellarfield.model.batching import (STREAM_BUFFER_PIXELS, BalancedSampler, StreamingTrainingData, TrainingData,
                                        latent_layout)
from stellarfield.model.checkpoint import (
    LATEST,
    build_model,
    load_checkpoint,
    model_config,
    save_checkpoint,
    write_json_atomic,
)
from stellarfield.model.convergence import METRICS, PLOT, update_convergence_plot
from stellarfield.device import resolve_device
from stellarfield.model.encoding import encoding_arguments
from stellarfield.model.inference import infer, summarise
from stellarfield.model.latent_table import merge_state_dicts, split_state_dict
from stellarfield.model.objectives import training_loss
from stellarfield.model.prior import LatentPrior
from stellarfield.model.stellar_model import StellarModel

#: The encoder trained jointly with the decoder (``objective="encoder"``) reads the pooled gradient
#: only: its least-squares coefficients would render every basis function at every pixel of every
#: training spectrum at each step (:mod:`stellarfield.model.encoder`); an encoder for a trained
#: decoder (:mod:`stellarfield.model.amortise`) pools once and reads both.
JOINT_ENCODER = {"inputs": "gradient"}


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved in every checkpoint's config.json)."""

    seed: int = 0
    objective: str = "autodecoder"  # "autodecoder" (default: best on validation, README), "gon" or "encoder" (amortised)
    latent_per_star: bool = True  # auto-decoder: all observations of one star share its latent
    gon_nested: bool = True  # GON: keep the nested gradient (False: the detached ablation)
    # decoder (the architecture: DecoderConfig keys, see decoder_config())
    latent_dim: int = 16  # against PCA at equal K (README): a nonlinear decoder gains most at small K
    n_basis: int = 64
    trunk_hidden: tuple[int, ...] = (128, 128)
    branch_hidden: tuple[int, ...] = (256, 256)
    encoding: str = "hybrid"  # "grid" (multi-resolution feature tables), "fourier" or "hybrid" (both; README)
    encoding_kwargs: dict = field(default_factory=dict)
    # likelihood (saved with the model: inference scores spectra the same way)
    loss: str = "logchi2"  # "logchi2" (survey errors, scale profiled out, unit-normal prior on z) or "nll"
    noise_floor: float = 1e-3  # sigma >= this x median |flux| on every pixel
    latent_l2: float = 1e-3  # "nll" only: weight of |z|^2 per spectrum
    # batches
    batch_per_product: int = 16  # x N/500 for products of N > 500 spectra (at most x64)
    products_per_step: int | None = 1  # expensive products per step, drawn at random (None: all); cheap always
    window_pixels: int = 4096  # pixels per spectrum per step (a whole GALAH CCD or APOGEE chip; 0: all)
    # data loading: stream the datasets' row groups (memory flat in the dataset's size) or hold them in memory;
    # None: stream when the dataset folders hold more than STREAMING_AUTO_SPECTRA training spectra
    streaming: bool | None = None
    stream_buffer_pixels: int = STREAM_BUFFER_PIXELS  # per product buffer when streaming (~18 bytes each)
    # optimisation
    lr: float = 2e-3  # dense weights (Adam)
    lr_tables: float = 1e-2  # grid-encoding tables (SparseAdam)
    lr_latents: float = 1e-2  # auto-decoder latents (dense Adam)
    warmup_steps: int = 100
    lr_schedule: str = "constant"  # after the warm-up: "constant", or "cosine" down to lr_final_ratio x at the run's limit
    lr_final_ratio: float = 0.0  # "cosine": the step sizes' last fraction of their base values
    grad_clip: float = 10.0  # on the dense weights' gradient norm
    # warm start: a run folder or "reference" whose decoder (with its architecture and likelihood)
    # this run starts from; an auto-decoder's latent table starts at its fits of the training spectra
    init_from: str | None = None
    init_refine_steps: int = 100  # Adam steps of those fits
    # limits (the first reached stops training; at least one should be set)
    minutes: float | None = 15.0
    epochs: int | None = None
    max_steps: int | None = None
    # bookkeeping
    checkpoint_every_s: float | None = 180.0  # None: never by the clock (steps only: reproducible runs, tests)
    checkpoint_every_steps: int | None = None  # or every so many steps instead (reproducible runs, tests)
    log_every: int = 25
    validate_every_s: float | None = 120.0  # validation chi2_nu per product, logged with the wall time (None: not by the clock)
    validate_every_steps: int | None = None  # or every so many steps (reproducible runs, tests)
    val_max_per_product: int = 16  # spectra per product in the periodic validation (the final one: below)
    val_method: str | None = None  # None: "gon" for GON, "refine" for the auto-decoder
    val_refine_steps: int = 50  # 20 steps from z = 0 leave |z| ~ 3 latents far from converged
    final_val_max_per_product: int = 32
    final_val_refine_steps: int = 100
    prior_steps: int = 500
    prior_max_spectra: int = 20000
    prior_passes: int | None = 2  # passes to draw from the prior flow: 2 = coupling layers, None = autoregressive
    split_spectra: bool = True  # data given as a list: split it by object id (else train on all)
    threads: int | None = 1  # torch threads: small tensors gain little from more, and shared cores lose a lot
    device: str = "auto"  # "auto" (CUDA if available), "cpu", "cuda" or "cuda:N" (see stellarfield.device)
    mixed_precision: bool = True  # bfloat16 decoder MLPs on CUDA (never on the CPU; see model/device.py)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig keys {unknown}; known keys: {sorted(known)}")
        d = dict(d)
        for key in ("trunk_hidden", "branch_hidden"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "TrainConfig":
        """Read a JSON file of TrainConfig keys."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    def decoder_config(self) -> dict:
        return dict(latent_dim=self.latent_dim, n_basis=self.n_basis, trunk_hidden=list(self.trunk_hidden),
                    branch_hidden=list(self.branch_hidden), encoding=self.encoding,
                    encoding_kwargs=encoding_arguments(self.encoding, self.encoding_kwargs))

    def likelihood(self) -> dict:
        return dict(loss=self.loss, noise_floor=self.noise_floor, latent_l2=self.latent_l2)

    def inference_method(self) -> str:
        return self.val_method or {"gon": "gon", "encoder": "encoder+refine"}.get(self.objective, "refine")


@dataclass
class RunResult:
    """What :func:`train` returns; everything is also in ``run_dir``."""

    run_dir: Path
    model: StellarModel
    prior: LatentPrior | None
    steps: int
    epochs: int
    seconds: float
    stopped_by: str
    validation: dict  # per product: n, chi2_nu_median, chi2_nu_mean, nll_median (validation split)
    train_spectra_per_s: float
    config: dict = field(default_factory=dict)  # the checkpoint's config (model_config)


# --- distributed helpers ----------------------------------------------------------------------
def _distributed(device: torch.device) -> tuple[int, int, bool]:
    """(rank, world, created): initialise the process group under torchrun (WORLD_SIZE > 1): NCCL when
    the model is on CUDA (one GPU per local rank), gloo on the CPU; else (0, 1). ``created``: this call
    made the group (whoever makes it destroys it, :func:`_end_distributed`)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    created = world > 1 and not dist.is_initialized()
    if created:
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank(), dist.get_world_size(), created) if dist.is_initialized() else (0, 1, False)


def _end_distributed(created: bool) -> None:
    """Destroy the process group that :func:`_distributed` made, once every rank is done. Without it a
    rank can abort at exit ("terminate called without an active exception": gloo's threads outlive
    the interpreter; pytorch/pytorch#190489). Called after a successful run only: destroying the
    group while another rank is still in a collective would hang it."""
    if created and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _on_cpu(state: dict) -> dict:
    """CPU copies of a state dict's tensors (checkpoints are written from the host)."""
    return {k: v.detach().cpu() for k, v in state.items()}


def _average_gradients(model: StellarModel, world: int) -> None:
    """All-reduce (mean) every gradient across ranks; sparse ones go through a dense copy.

    Every rank reduces every parameter, in the same order: ranks draw different products in a step,
    so a parameter without a gradient on this rank (None: zeros) may have one on another; one
    without a gradient on every rank keeps None, as in a single process."""
    params = list(model.parameters())
    has_grad = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
    dist.all_reduce(has_grad)
    for p, anywhere in zip(params, has_grad.tolist()):
        if not anywhere:
            continue
        sparse = p.grad is not None and p.grad.is_sparse
        dense = torch.zeros_like(p) if p.grad is None else (p.grad.to_dense() if sparse else p.grad)
        dist.all_reduce(dense)
        dense /= world
        p.grad = dense.to_sparse(sparse_dim=1) if sparse or _sparse_parameter(model, p) else dense


def _sparse_parameter(model: StellarModel, param: torch.Tensor) -> bool:
    """Parameters that SparseAdam updates (the grid-encoding tables) need sparse gradients."""
    return any(param is t for t in getattr(model.decoder.trunk.encoding, "tables", []))


# --- data -------------------------------------------------------------------------------------
def _is_paths(data) -> bool:
    return isinstance(data, (str, os.PathLike)) or (
        isinstance(data, (list, tuple)) and len(data) > 0 and all(isinstance(d, (str, os.PathLike)) for d in data))


#: ``TrainConfig(streaming=None)`` streams dataset folders holding more training spectra than this
#: (a choice: 50,000 Gaia XP spectra are ~300 MB as padded tensors; the real datasets of
#: ../shared/data, ~40,000 spectra, stay in memory, where the sampler's order is a permutation of all).
STREAMING_AUTO_SPECTRA = 50_000


def _use_streaming(data, config: TrainConfig) -> bool:
    """Whether to stream the dataset folder(s) ``data`` (see ``TrainConfig.streaming``)."""
    if not _is_paths(data):
        if config.streaming:
            raise ValueError("TrainConfig(streaming=True) needs dataset folders, not a list of spectra")
        return False
    if config.streaming is not None:
        return bool(config.streaming)
    from stellarfield.data.store import Dataset

    paths = [data] if isinstance(data, (str, os.PathLike)) else data
    return sum(Dataset(p).manifest["splits"].get("train", 0) for p in paths) > STREAMING_AUTO_SPECTRA


def _load_data(data, config: TrainConfig, rank: int, world: int) -> tuple[TrainingData | StreamingTrainingData, object]:
    """Training part of this rank, and what validation is read from (dataset paths or a list)."""
    if _use_streaming(data, config):
        # stars are only resolved for a latent table (it costs a pass over every star id)
        per_star = config.latent_per_star and config.objective == "autodecoder"
        return StreamingTrainingData(data, "train", rank=rank, world=world, latent_per_star=per_star,
                                     buffer_pixels=config.stream_buffer_pixels, seed=config.seed), data
    if _is_paths(data):
        return TrainingData(iter_spectra_of(data, "train"), rank=rank, world=world,
                            latent_per_star=config.latent_per_star), data
    from stellarfield.data.split import assign_split
    from stellarfield.data.stars import identity_of, resolve_star_ids

    spectra = list(data)
    if config.split_spectra:  # by star, as datasets are split (the caller's records are not modified)
        star_ids = resolve_star_ids({str(i): identity_of(s) for i, s in enumerate(spectra)})
        splits = [assign_split(star_ids[str(i)] or s.object_id) for i, s in enumerate(spectra)]
        train_list = [s for s, split in zip(spectra, splits) if split == "train"]
        val_list = [s for s, split in zip(spectra, splits) if split == "validation"]
    else:
        train_list, val_list = spectra, []
    if not train_list:
        raise ValueError("no training spectra: the data is empty, or no object id falls in the train split "
                         "(pass TrainConfig(split_spectra=False) to train on all of a small list)")
    # records without a star_id (read from files, not ingested) share latents by object_id
    return TrainingData(train_list, rank=rank, world=world, latent_per_star=config.latent_per_star), val_list


def _until_full(spectra, instruments, max_per_product: int):
    """``spectra`` until every product of ``instruments`` has had ``max_per_product`` of them (the
    rest would be skipped anyway): the validation sample of a large dataset without reading it all."""
    counts = dict.fromkeys(instruments, 0)
    for s in spectra:
        yield s
        if s.product in counts:
            counts[s.product] += 1
            if min(counts.values()) >= max_per_product:
                return


def random_per_product(spectra, products, k: int, seed: int = 0) -> list:
    """A uniform random sample of at most ``k`` spectra of each of ``products`` from the stream
    ``spectra`` (reservoir sampling, seeded: memory ``k`` spectra per product, one pass). A dataset's
    order follows its source files, so its first spectra are not a fair sample of a product."""
    rng = np.random.default_rng(seed)
    kept: dict[str, list] = {p: [] for p in products}
    seen = dict.fromkeys(products, 0)
    for s in spectra:
        if s.product not in kept:
            continue
        seen[s.product] += 1
        if len(kept[s.product]) < k:
            kept[s.product].append(s)
        else:
            j = int(rng.integers(seen[s.product]))
            if j < k:
                kept[s.product][j] = s
    return [s for p in products for s in kept[p]]


def _validation_data(source, instruments, max_per_product: int) -> TrainingData | None:
    if source is None or (isinstance(source, list) and not source):
        return None
    if _is_paths(source):
        data = TrainingData(_until_full(iter_spectra_of(source, "validation"), instruments, max_per_product),
                            instruments=instruments, max_per_product=max_per_product)
    else:
        data = TrainingData(source, instruments=instruments, max_per_product=max_per_product)
    return data if len(data) else None


# --- the loop ---------------------------------------------------------------------------------
#: What a run writes in its folder (a folder holding only these, without ``latest.json``, is a run
#: stopped before its first checkpoint).
RUN_FILES = frozenset({LATEST, "checkpoints", METRICS, PLOT, "validation.json", "summary.json"})


def _check_run_folder(out: Path) -> None:
    """Refuse a run folder that is a file, or a folder holding anything a run does not write (a
    dataset, someone's files): a run is never written into them. A run stopped before its first
    checkpoint (run files, no ``latest.json``) starts afresh: its metrics are dropped."""
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"{out} already exists and is not a stellarfield run (a file); choose a new folder")
    if (out / LATEST).exists():
        return
    foreign = sorted(p.name for p in out.iterdir() if p.name not in RUN_FILES)
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise FileExistsError(f"{out} already exists and is not a stellarfield run (it holds {shown}); "
                              "choose a new folder")
    (out / METRICS).unlink(missing_ok=True)


#: What ``TrainConfig.lr_schedule`` may be.
LR_SCHEDULES = ("constant", "cosine")


def _due(step: int, every_steps: int | None, since_s: float, every_s: float | None) -> bool:
    """Whether periodic work (validation, a checkpoint) is due at ``step``: every ``every_steps`` steps
    when that is set, else every ``every_s`` seconds of wall time (never when that is None)."""
    if every_steps:
        return step % every_steps == 0
    return every_s is not None and since_s >= every_s


def run_fraction(step: int, limit_steps: int | None, elapsed_s: float = 0.0, minutes: float | None = None) -> float:
    """How far the run is towards the limit that stops it, in [0, 1]: the larger of ``step /
    limit_steps`` and ``elapsed_s / (60 minutes)`` (whichever limit is nearer to stopping it; a
    limit that is None is not counted)."""
    done = step / limit_steps if limit_steps else 0.0
    if minutes:
        done = max(done, elapsed_s / (60 * minutes))
    return min(max(done, 0.0), 1.0)


def learning_rate_factor(config: TrainConfig, step: int, fraction: float) -> float:
    """The factor on every optimiser's base step size at ``step`` (counted from 0), ``fraction`` of
    the way through the run (:func:`run_fraction`): a linear warm-up over ``warmup_steps``, then
    constant, or with ``lr_schedule="cosine"`` half a cosine from 1 down to ``lr_final_ratio`` at the
    run's limit (Loshchilov & Hutter 2017, SGDR, without restarts). A run limited in minutes decays
    with the wall time, so its schedule, like its length, depends on the machine's speed."""
    factor = min(1.0, (step + 1) / max(config.warmup_steps, 1))
    if config.lr_schedule == "cosine":
        floor = config.lr_final_ratio
        factor *= floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * fraction))
    return factor


def warm_start(config: TrainConfig, train_data, device: torch.device | None = None,
               progress: bool = False) -> tuple[StellarModel, dict]:
    """A fresh run's model that starts from the trained model ``config.init_from`` (a run folder or
    "reference"): its decoder's weights, architecture and likelihood (``config``'s own are replaced
    by them, so the run's saved config says what was trained); the instruments of ``train_data``
    (products the source never saw get theirs as in any run). An auto-decoder's latent table starts
    at the source's fits of the training spectra (``init_refine_steps`` Adam steps from z = 0; a
    star seen several times starts at the mean of its spectra's latents), so the first steps refine
    the decoder instead of undoing it against latents at zero. An encoder starts fresh. Under
    torchrun each rank fits its own part and the table is summed across ranks.

    Returns ``(model, record)``, the model on ``device`` (default the CPU); ``record`` says where the
    run started (saved with its checkpoints).
    """
    from stellarfield.model.generate import as_trained

    source = as_trained(config.init_from)
    src = source.model
    if config.objective == "autodecoder" and isinstance(train_data, StreamingTrainingData):
        raise ValueError("init_from with a streamed dataset: the latent table's fits need the training spectra in "
                         "memory (train with streaming=False, or start the latents from zero without init_from)")
    # the source's decoder and likelihood keys are TrainConfig fields of the same names (decoder_config(), likelihood())
    for key, value in {**src.decoder_config, **src.likelihood}.items():
        setattr(config, key, tuple(value) if isinstance(value, list) else value)
    model = StellarModel(train_data.instruments, config.decoder_config(),
                         n_latents=train_data.n_total if config.objective == "autodecoder" else 0,
                         encoder_config=JOINT_ENCODER if config.objective == "encoder" else None, likelihood=config.likelihood())
    model.decoder.load_state_dict(src.decoder.state_dict())
    model.to(device or torch.device("cpu"))
    record = {"model": str(source.path) if source.path is not None else str(config.init_from), "step": source.step,
              "export": (source.config.get("export") or {}).get("from"), "refine_steps": config.init_refine_steps}
    if model.latents is not None:
        t0 = time.time()
        with tqdm(total=len(train_data), disable=not progress, unit="spectrum", desc="latents from the source's fits",
                  dynamic_ncols=True) as bar:
            results = infer(model, train_data, method="refine", refine_steps=config.init_refine_steps, progress=bar)
        total = torch.zeros(model.latents.weight.shape, dtype=torch.float64)
        count = torch.zeros(len(total), 1, dtype=torch.float64)
        for name, rows in train_data.latent_rows().items():
            total.index_add_(0, rows, torch.from_numpy(results[name].latent).double())
            count.index_add_(0, rows, torch.ones(len(rows), 1, dtype=torch.float64))
        if dist.is_initialized():  # every rank fitted its own spectra: one table for all (NCCL: on the GPU)
            sums = torch.cat([total, count], 1).to(model.device)
            dist.all_reduce(sums)
            total, count = sums.cpu().split([total.shape[1], 1], 1)
        fitted = count[:, 0] > 0
        with torch.no_grad():
            table = model.latents.weight.detach().cpu()
            table[fitted] = (total[fitted] / count[fitted]).float()
            model.latents.weight.copy_(table)
        record.update(latent_fits=int(fitted.sum()), latent_fit_seconds=round(time.time() - t0, 1),
                      latent_fit_chi2_nu_median={k: v["chi2_nu_median"] for k, v in summarise(results).items()})
    return model, record


def train(data, out_dir: str | os.PathLike, config: TrainConfig | None = None, resume: bool = False,
          progress: bool = True) -> RunResult:
    """Train a model on ``data`` and write it to ``out_dir``.

    Args:
        data: a dataset folder or a list of them (their "train" split trains, "validation"
            validates; a spectrum key found twice is used once) or a list of
            :class:`~stellarfield.spectrum.Spectrum` (split by object id, see
            ``TrainConfig.split_spectra``).
        out_dir: the run folder (created; an existing empty folder is used). An existing run is
            continued only with ``resume=True``; any other existing file or folder is refused
            (:func:`_check_run_folder`).
        config: :class:`TrainConfig` (defaults if None). On resume the saved config is used, except
            for its limits (``minutes``, ``epochs``, ``max_steps``), taken from ``config`` if given.
        resume: continue from the latest checkpoint in ``out_dir`` (fresh start if there is none).
        progress: show a progress bar.
    """
    config = config or TrainConfig()
    device = resolve_device(config.device)
    rank, world, created_group = _distributed(device)
    if device.type == "cuda" and device.index is None and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    out = Path(out_dir)
    if config.threads:
        torch.set_num_threads(config.threads)

    state = None
    _check_run_folder(out)
    if (out / LATEST).exists():
        if not resume:
            raise FileExistsError(f"{out} already holds a run; pass resume=True (--resume) to continue it, "
                                  "or choose another folder")
        state = load_checkpoint(out, with_train_state=True)
        saved = TrainConfig.from_dict(state["config"]["train_config"])
        for key in ("minutes", "epochs", "max_steps"):
            setattr(saved, key, getattr(config, key))
        config = saved
    if not any((config.minutes, config.epochs, config.max_steps)):
        raise ValueError("set at least one of minutes, epochs, max_steps")
    if config.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr_schedule {config.lr_schedule!r}; choose one of {LR_SCHEDULES}")
    torch.manual_seed(config.seed)

    train_data, val_source = _load_data(data, config, rank, world)
    # which latent row each spectrum has (one rank sees all of them only when it is alone; streamed
    # data: None); where it cannot be computed, the fingerprint the run recorded is kept
    layout = latent_layout(train_data) if world == 1 and config.objective == "autodecoder" else None
    recorded = state["config"].get("latent_layout") if state is not None else None
    if layout and recorded not in (None, layout):
        raise ValueError(f"the training data given do not give the latent rows {out} was trained with: "
                         "resume with the same datasets, in the same order")
    layout = layout or recorded
    started_from = state["config"].get("init_from") if state is not None else None
    if state is not None:
        model = build_model(state["config"])
        model.load_state_dict(state["model"])
    elif config.init_from:
        model, started_from = warm_start(config, train_data, device, progress=progress and rank == 0)
    else:
        model = StellarModel(train_data.instruments, config.decoder_config(),
                             n_latents=train_data.n_total if config.objective == "autodecoder" else 0,
                             encoder_config=JOINT_ENCODER if config.objective == "encoder" else None,
                             likelihood=config.likelihood())
    model.to(device)  # before the optimisers are built: their state lives with the weights
    model.decoder.mixed_precision = config.mixed_precision
    dense_groups, sparse_groups = model.optimizer_groups(config.lr, config.lr_tables)
    clipped = [p for g in dense_groups if g["clip"] for p in g["params"]]
    opt = torch.optim.Adam(dense_groups)
    # the latent table's dense Adam, without a dense gradient (saved inside "opt", as one Adam over both)
    latent_opt = model.latent_optimizer(config.lr_latents) if config.objective == "autodecoder" else None
    sparse_opt = torch.optim.SparseAdam(sparse_groups) if sparse_groups else None
    sampler = BalancedSampler(train_data, config.batch_per_product, config.products_per_step,
                              config.window_pixels, config.seed + 1000 * rank)
    step, epoch, elapsed_before = 0, 0, 0.0
    if state is not None and state["train_state"] is not None:
        ts = state["train_state"]
        adam_state, latent_state = split_state_dict(ts["opt"], len(opt.param_groups))
        opt.load_state_dict(adam_state)
        if latent_opt is not None and latent_state is not None:
            latent_opt.load_state_dict(latent_state)
        if sparse_opt is not None and ts.get("sparse_opt") is not None:
            sparse_opt.load_state_dict(ts["sparse_opt"])
        sampler.load_state_dict(ts["sampler"][rank] if isinstance(ts["sampler"], list) else ts["sampler"])
        step, epoch, elapsed_before = int(ts["step"]), int(ts["epoch"]), float(ts["elapsed_s"])

    val_max = max(config.val_max_per_product, config.final_val_max_per_product)
    val_data = _validation_data(val_source, model.instruments, val_max) if rank == 0 else None
    steps_per_epoch = sampler.steps_per_epoch()
    limit_steps = min(x for x in (config.max_steps, config.epochs and config.epochs * steps_per_epoch) if x) \
        if (config.max_steps or config.epochs) else None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        print(f"training on {train_data.counts()} ({train_data.n_total} spectra over {world} rank(s)); "
              f"{steps_per_epoch} steps per epoch; objective {config.objective}"
              + (f"; started from {started_from['model']} (step {started_from['step']})" if started_from else ""))
        if train_data.skipped:
            print(f"skipped (no instrument): {train_data.skipped}")
    metrics_path = out / METRICS

    def log(record: dict) -> None:
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def checkpoint(prior: LatentPrior | None = None) -> None:
        samplers = [sampler.state_dict()]
        if world > 1:
            samplers = [None] * world
            dist.all_gather_object(samplers, sampler.state_dict())
        if rank == 0:
            opt_state = opt.state_dict() if latent_opt is None else merge_state_dicts(opt.state_dict(),
                                                                                      latent_opt.state_dict())
            train_state = {"opt": opt_state, "sparse_opt": None if sparse_opt is None else sparse_opt.state_dict(),
                           "sampler": samplers if world > 1 else samplers[0], "step": step, "epoch": epoch,
                           "elapsed_s": elapsed_before + time.time() - t_start}
            save_checkpoint(out, step, {**model_config(model, config, prior), "latent_layout": layout,
                                        "init_from": started_from},
                            _on_cpu(model.state_dict()),
                            None if prior is None else prior.state_dict(), train_state)

    def validate(max_per_product: int, refine_steps: int) -> dict:
        if val_data is None:
            return {}
        results = infer(model, val_data, method=config.inference_method(), refine_steps=refine_steps,
                        max_per_product=max_per_product)
        return summarise(results)

    t_start = last_ckpt = last_val = time.time()
    bar = tqdm(total=limit_steps, initial=step, disable=not progress or rank != 0, unit="step", dynamic_ncols=True)
    stopped_by, spectra_seen, t_loop = "", 0, time.time()
    loss = None
    while True:
        elapsed = elapsed_before + time.time() - t_start
        stop = (limit_steps is not None and step >= limit_steps) or (config.minutes and elapsed >= 60 * config.minutes)
        fraction = run_fraction(step, limit_steps, elapsed, config.minutes)
        if world > 1:  # rank 0's clock decides for everyone (when to stop, and the step sizes)
            flag = torch.tensor([float(bool(stop)), fraction], dtype=torch.float64)
            dist.broadcast(flag, 0)
            stop, fraction = bool(flag[0]), float(flag[1])
        if stop:
            stopped_by = "minutes" if limit_steps is None or step < limit_steps else (
                "epochs" if config.epochs and step >= config.epochs * steps_per_epoch else "max_steps")
            break

        factor = learning_rate_factor(config, step, fraction)
        for group in opt.param_groups + (latent_opt.param_groups if latent_opt else []) + (
                sparse_opt.param_groups if sparse_opt else []):
            base = group.setdefault("base_lr", group["lr"])
            group["lr"] = base * factor
        batches = [b.to(device) for b in sampler.next()]
        loss, stats = training_loss(model, batches, config.objective, config.gon_nested,
                                    gather_latents=latent_opt.gather if latent_opt else None)
        opt.zero_grad(set_to_none=True)
        if latent_opt is not None:
            latent_opt.zero_grad()
        if sparse_opt is not None:
            sparse_opt.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            _average_gradients(model, world)
        torch.nn.utils.clip_grad_norm_(clipped, config.grad_clip)
        opt.step()
        if latent_opt is not None:
            latent_opt.step()  # averaged over ranks inside, as _average_gradients does the others
        if sparse_opt is not None:
            sparse_opt.step()
        step += 1
        spectra_seen += sum(b.size for b in batches) * world
        loss_value = loss.item()  # one device sync per step, not one per use
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"the loss became {loss_value} at step {step}; lower the learning rate")

        bar.update(1)
        rate = (time.time() - t_loop) / max(step - (0 if state is None else int(state["train_state"]["step"])), 1)
        bar.set_postfix(loss=f"{loss_value:.3f}", s_per_step=f"{rate:.2f}", epoch=epoch)
        if step % config.log_every == 0:
            log({"step": step, "epoch": epoch, "time_s": round(elapsed, 1), "loss": loss_value,
                 "s_per_step": rate, "lr_factor": factor, "chi2_per_pixel": {k: v["chi2_per_pixel"] for k, v in stats.items()}})
        if step % steps_per_epoch == 0:
            epoch += 1
        due_val = _due(step, config.validate_every_steps, time.time() - last_val, config.validate_every_s)
        if rank == 0 and due_val:
            t_val = time.time()
            summary = validate(config.val_max_per_product, config.val_refine_steps)
            log({"step": step, "epoch": epoch, "time_s": round(elapsed_before + t_val - t_start, 1),
                 "validation": summary})
            bar.write(f"step {step} ({(elapsed_before + t_val - t_start) / 60:.1f} min): validation chi2_nu "
                      "(median) " + ", ".join(f"{k} {v['chi2_nu_median']:.3g}" for k, v in summary.items()))
            update_convergence_plot(out)
            last_val = time.time()
            t_loop += last_val - t_val  # the rate is of training steps, not validation
        due = _due(step, config.checkpoint_every_steps, time.time() - last_ckpt, config.checkpoint_every_s)
        if world > 1:
            flag = torch.tensor([float(bool(due))])
            dist.broadcast(flag, 0)
            due = bool(flag.item())
        if due:
            checkpoint()
            last_ckpt = time.time()
    bar.close()
    seconds = elapsed_before + time.time() - t_start
    if loss is not None:  # the last step's loss, whatever log_every
        log({"step": step, "epoch": epoch, "time_s": round(seconds, 1), "loss": loss.item(), "last": True})
    train_rate = spectra_seen / max(time.time() - t_loop, 1e-9)

    prior = fit_prior(model, train_data, config, world, progress=progress and rank == 0)
    validation = {}
    if rank == 0:
        validation = validate(config.final_val_max_per_product, config.final_val_refine_steps)
        if validation:  # the last point of the convergence curve (more spectra and steps: marked final)
            log({"step": step, "epoch": epoch, "time_s": round(seconds, 1), "validation": validation, "final": True})
        write_json_atomic(out / "validation.json", {
            "split": "validation", "method": config.inference_method(), "refine_steps": config.final_val_refine_steps,
            "max_per_product": config.final_val_max_per_product, "per_product": validation,
        })
        print("validation chi2_nu per product (median over held-out spectra, survey errors):")
        for k, v in validation.items():
            print(f"  {k:22s} n={v['n']:4d}  chi2_nu median {v['chi2_nu_median']:.3g}  mean {v['chi2_nu_mean']:.3g}")
        if not validation:
            print("  (no validation spectra)")
    checkpoint(prior)
    if rank == 0:
        write_json_atomic(out / "summary.json", {
            "steps": step, "epochs": epoch, "seconds": round(seconds, 1), "stopped_by": stopped_by,
            "train_spectra_per_s": train_rate, "train_counts": train_data.counts(), "world_size": world,
            "validation": validation,
        })
        update_convergence_plot(out)  # RUN/convergence.png: validation chi2_nu per product vs wall time
    _end_distributed(created_group)
    return RunResult(out, model, prior, step, epoch, seconds, stopped_by, validation, train_rate,
                     {**model_config(model, config, prior), "latent_layout": layout})


def fit_prior(model: StellarModel, data: TrainingData, config: TrainConfig, world: int = 1,
              refine_steps: int | None = None, from_table: bool = True, progress: bool = False) -> LatentPrior:
    """Fit the latent prior, conditional on the product (:mod:`stellarfield.model.prior`), to the
    training latents: the auto-decoder's table (each latent row with the products of its spectra),
    or the latents the model's inference method gives for (up to ``prior_max_spectra``) training
    spectra (``refine_steps``: its refinement steps, default ``val_refine_steps``). ``from_table``
    False: inferred latents even where the model has a table (whose rows are ``data``'s only when
    ``data`` is the training data itself). ``progress``: a bar (spectra, spectra/s) while latents are
    inferred, which takes minutes on thousands of spectra."""
    products = sorted(data.products)
    if model.latents is not None and from_table:
        z = model.latents.weight.detach().cpu()  # the prior lives on the host; read, not copied (fit keeps no reference)
        pairs = data.latent_rows()  # {product: latent rows of its spectra on this rank}
        rows = [pairs[p] for p in products]
        index = [torch.full((len(r),), k, dtype=torch.long) for k, r in enumerate(rows)]
        rows, index = torch.cat(rows), torch.cat(index)
        if world > 1:
            parts = [None] * world
            dist.all_gather_object(parts, (rows, index))
            rows, index = torch.cat([r for r, _ in parts]), torch.cat([i for _, i in parts])
        # one latent per star: a star seen twice by one product (two visits) counts once there
        pairs = torch.unique(torch.stack([rows, index], 1), dim=0)
        rows, index = pairs[:, 0], pairs[:, 1]
    else:
        per_product = max(1, config.prior_max_spectra // max(len(data.products), 1))
        if isinstance(data, StreamingTrainingData):  # a sample in memory: the first spectra of each product
            data = data.head(per_product)
        from tqdm.auto import tqdm

        total = sum(min(len(pd), per_product) for pd in data.products.values())
        with tqdm(total=total, disable=not progress, unit="spectrum", desc="latents for the prior",
                  dynamic_ncols=True) as bar:
            results = infer(model, data, method=config.inference_method(),
                            refine_steps=config.val_refine_steps if refine_steps is None else refine_steps,
                            max_per_product=per_product, progress=bar)
        z = torch.from_numpy(np.concatenate([results[p].latent for p in products if p in results])).float()
        index = torch.cat([torch.full((len(results[p].latent),), k, dtype=torch.long)
                           for k, p in enumerate(products) if p in results])
        if world > 1:
            parts = [None] * world
            dist.all_gather_object(parts, (z, index))
            z, index = torch.cat([a for a, _ in parts]), torch.cat([b for _, b in parts])
        rows = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        prior = LatentPrior(model.latent_dim, products=products, passes=config.prior_passes)
        prior.fit(z, steps=config.prior_steps, seed=config.seed, rows=rows, product_index=index)
    return prior


def refit_prior(model, datasets, out_dir: str | os.PathLike, steps: int | None = None,
                max_spectra: int | None = None, overwrite: bool = False, progress: bool = True,
                from_table: bool = False, passes: int | None | str = "run") -> LatentPrior:
    """Fit a trained model's latent prior again, conditional on the product, and write the model with
    it to ``out_dir`` (a run folder: the same weights and config, the new prior; nothing else changes).

    The latents are those the model's inference method gives for the train split of ``datasets``
    (a seeded random sample of at most ``max_spectra`` over all products, default the run's
    ``prior_max_spectra``, the same number from each product that has as many) with the
    final validation's refinement steps (``final_val_refine_steps``: the latents a fit gives, not
    the 20-step ones of training's quick estimates); ``steps``: the flow's Adam steps (default the
    run's ``prior_steps``). For a model trained before the prior was conditional (the shipped
    reference model) or to give the prior more steps. ``from_table``: an auto-decoder run's own
    latent table instead, each row with the products of its spectra, exactly as training fits it
    (``datasets`` must be the ones the run was trained on: ValueError where their train split does
    not give the table's rows). ``passes``: the flow's kind (:class:`LatentPrior`; default
    ``"run"``: the run's ``prior_passes``, or today's default for a run saved before it had one). Refuses an existing ``out_dir`` unless ``overwrite``,
    and the model's own folder always (ValueError).
    """
    from stellarfield.model.generate import as_trained

    trained = as_trained(model)
    out = Path(out_dir)
    if trained.path is not None and out.resolve() == Path(trained.path).resolve():
        raise ValueError(f"{out} is the model's own run folder; write the refitted model to another folder")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; choose another folder or overwrite")
    known = {f.name for f in fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in (trained.config.get("train_config") or {}).items() if k in known})
    if steps is not None:
        config.prior_steps = int(steps)
    if max_spectra is not None:
        config.prior_max_spectra = int(max_spectra)
    if passes != "run":
        config.prior_passes = passes
    m = trained.model
    if from_table:
        return _refit_prior_to_table(trained, datasets, out, config, progress)
    per_product = max(1, config.prior_max_spectra // max(len(m.instruments), 1))
    sample = random_per_product(iter_spectra_of(datasets, "train"), sorted(m.instruments), per_product, config.seed)
    found = sorted({s.product for s in sample})
    if not found:
        raise ValueError(f"the train split of {', '.join(map(str, datasets))} holds none of the model's products "
                         f"({', '.join(sorted(m.instruments))})")
    missing = sorted(set(m.instruments) - set(found))
    if missing and progress:
        print(f"warning: no training spectra of {', '.join(missing)}: the new prior has no population for them "
              "(generation on their grids draws every product's stars)")
    data = TrainingData(sample, instruments=m.instruments)
    t0 = time.time()
    prior = fit_prior(m, data, config, refine_steps=config.final_val_refine_steps, from_table=False, progress=progress)
    _save_refit(trained, out, prior, {"datasets": [str(d) for d in datasets], "spectra": data.counts(),
                                      "steps": config.prior_steps, "seed": config.seed,
                                      "refine_steps": config.final_val_refine_steps, "seconds": round(time.time() - t0, 1)})
    if progress:
        print(f"prior refitted on {sum(data.counts().values()):,} training spectra "
              f"({', '.join(f'{k} {v:,}' for k, v in data.counts().items())}) in {time.time() - t0:.0f} s -> {out}")
    return prior


def _refit_prior_to_table(trained, datasets, out: Path, config: TrainConfig, progress: bool) -> LatentPrior:
    """:func:`refit_prior` with ``from_table``: the run's latent table, its rows' products from the
    run's training data rebuilt as training built it."""
    m = trained.model
    if m.latents is None:
        raise ValueError("this model has no latent table (an exported model, or not an auto-decoder): "
                         "refit its prior to fitted latents instead (without from_table / --from-table)")
    t0 = time.time()
    data, _ = _load_data(list(datasets), config, 0, 1)
    rows = torch.cat([r for r in data.latent_rows().values()])
    recorded = trained.config.get("latent_layout")  # runs before it was recorded, streamed data: the rows only
    layout = latent_layout(data) if recorded else None
    if (len(rows) == 0 or int(rows.max()) >= len(m.latents.weight) or len(torch.unique(rows)) != len(m.latents.weight)
            or (recorded and layout and layout != recorded)):
        raise ValueError(f"the train split of {', '.join(map(str, datasets))} does not give this run's "
                         f"{len(m.latents.weight):,} latent rows: give the datasets it was trained on, in the same order")
    prior = fit_prior(m, data, config)
    _save_refit(trained, out, prior, {"datasets": [str(d) for d in datasets], "latent_table": len(m.latents.weight),
                                      "steps": config.prior_steps, "seed": config.seed,
                                      "seconds": round(time.time() - t0, 1)})
    if progress:
        print(f"prior refitted to the run's {len(m.latents.weight):,} training latents in {time.time() - t0:.0f} s -> {out}")
    return prior


def _save_refit(trained, out: Path, prior: LatentPrior, record: dict) -> None:
    """Write the model with its new prior to ``out`` (a run folder), with how the prior was made."""
    cfg = {**trained.config, "prior": prior.config(), "prior_refit": {"from": str(trained.path or ""), **record}}
    cfg["train_config"] = {**(cfg.get("train_config") or {}), "prior_passes": prior.passes}
    state = {k: v.detach().cpu() for k, v in trained.model.state_dict().items()}
    save_checkpoint(out, trained.step or 0, cfg, state, prior.state_dict())  # the weights' own training step
    load_checkpoint(out)  # the folder reads back before it is reported
