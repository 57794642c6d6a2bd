"""Dense Adam on the auto-decoder's latent table, lean in memory: :class:`LatentAdam`.

The auto-decoder keeps one latent per training star (``StellarModel.latents``, 16 float32 each) and
trains it with *dense* Adam: every step moves every row, the batch's by its gradient and the others
by their moment estimates (sparse lazy updates were measured to train the latents far less, see
``StellarModel.__init__``). ``torch.optim.Adam`` on the whole table needs a dense gradient of the
table's size (the embedding's backward pass writes one, zeros outside the batch) and, in its step,
a full-size ``sqrt`` temporary: two more tables (128 bytes per latent) on top of the table and its
two moments, and what made the auto-decoder's peak memory grow 1.36x from 100,000 to 1,000,000
Gaia XP spectra.

:class:`LatentAdam` computes exactly the same update without them:

* :meth:`LatentAdam.gather` reads the batch's rows as a leaf tensor (B, D): the loss's backward
  pass gives the gradient of those rows only, never a dense table;
* :meth:`LatentAdam.step` sums the gradient of repeated rows (two observations of one star), and
  walks the table in chunks of :data:`CHUNK_ROWS` rows, building each chunk's dense gradient (zeros
  outside the batch) and applying ``torch.optim.Adam``'s own single-tensor operations to it, in the
  same order (``m.lerp_(g, 1 - b1)``, ``v.mul_(b2).addcmul_(g, g, 1 - b2)``,
  ``z.addcdiv_(m, sqrt(v) / sqrt(bc2) + eps, -lr / bc1)``, weight decay as Adam's options have it).

The result is the same, bit for bit, as ``torch.optim.Adam`` (its single-tensor implementation,
the one it uses on the CPU) on the whole table with a zero gradient outside the batch
(``tests/test_latent_table.py``), and what a step allocates beyond the table and its two moments is
chunk- and batch-sized: a few MB whatever the table's size.

Its :meth:`~LatentAdam.state_dict` is the latent group's part of the ``torch.optim.Adam`` state the
training loop saved before (:func:`merge_state_dicts`, :func:`split_state_dict`): checkpoints are
written as they were, and a checkpoint of either kind resumes with either.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

#: Rows of the table per chunk of a step: 65,536 x 16 float32 is 4 MB per temporary.
CHUNK_ROWS = 1 << 16


def adam_group(lr: float, **options) -> dict:
    """The parameter group ``torch.optim.Adam`` makes of ``lr`` and ``options`` (its defaults
    filled in), without "params": the hyperparameters of a :class:`LatentAdam`."""
    group = dict(torch.optim.Adam([torch.zeros(0)], lr=lr, **options).param_groups[0])
    del group["params"]
    return group


class LatentAdam:
    """Dense Adam on ``table`` (N, D), from the gradients of the batch rows only (see the module docstring).

    ``group``: the hyperparameters, ``{"lr": ...}`` and any ``torch.optim.Adam`` option (betas, eps,
    weight_decay, decoupled_weight_decay, maximize; amsgrad is not supported) and any extra key,
    kept as the training loop keeps them (``base_lr``, ``clip``). ``param_groups`` holds that one
    group, so a learning-rate schedule sets ``latent_adam.param_groups[0]["lr"]`` as on an optimiser.

    Per step: ``z = latent_adam.gather(index)`` (the batch's latents, a leaf), the loss of ``z``,
    ``loss.backward()``, ``latent_adam.step()``. Under ``torch.distributed`` (more than one rank)
    the step gathers every rank's rows and gradients and averages them over the ranks, as an
    all-reduce (mean) of the dense gradients would, so that every rank's table stays the same.
    """

    def __init__(self, table: torch.Tensor, group: dict, chunk_rows: int = CHUNK_ROWS):
        if table.dim() != 2:
            raise ValueError(f"the latent table must be (N, D), not {tuple(table.shape)}")
        self.table = table
        options = {k: v for k, v in group.items() if k != "params"}
        lr = options.pop("lr")
        self.param_groups = [{**adam_group(lr), **options, "lr": lr}]
        if self.param_groups[0]["amsgrad"]:
            raise NotImplementedError("LatentAdam does not implement amsgrad")
        self.chunk_rows = int(chunk_rows)
        self.state: dict[str, torch.Tensor] = {}  # "step", "exp_avg", "exp_avg_sq" once stepped (as Adam's)
        self._index: torch.Tensor | None = None
        self._leaf: torch.Tensor | None = None

    # --- a step ---------------------------------------------------------------------------------
    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """The rows ``index`` (B,) of the table as a leaf tensor (B, D) that requires grad; the next
        :meth:`step` applies its gradient."""
        self._index = index.to(self.table.device)
        self._leaf = self.table.detach()[self._index].requires_grad_(True)
        return self._leaf

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget the gathered rows' gradient (the rows stay gathered)."""
        if self._leaf is not None:
            self._leaf.grad = None

    def _batch_gradient(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows, gradient): the distinct table rows the batch touched (sorted) and the sum of their
        gradients, averaged over ranks under torch.distributed; None if there is no gradient."""
        index = self._index
        grad = None if self._leaf is None else self._leaf.grad
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world > 1:
            mine = (index.cpu(), grad.detach().cpu()) if grad is not None else None
            parts = [None] * world
            dist.all_gather_object(parts, mine)
            parts = [p for p in parts if p is not None]
            if not parts:
                return None
            index = torch.cat([p[0] for p in parts]).to(self.table.device)
            grad = torch.cat([p[1] for p in parts]).to(self.table.device)
        elif grad is None:
            return None
        rows, inverse = torch.unique(index, sorted=True, return_inverse=True)
        # in the order of the batch, as the embedding's backward pass sums repeated rows
        summed = torch.zeros(len(rows), self.table.shape[1], dtype=grad.dtype, device=grad.device)
        summed.index_add_(0, inverse, grad)
        if world > 1:
            summed /= world
        return rows, summed

    @torch.no_grad()
    def step(self) -> None:
        """One Adam step on every row of the table (see the module docstring). Without a gradient
        (nothing gathered, or no backward pass) nothing changes, as Adam skips a parameter without one."""
        batch = self._batch_gradient()
        self._index = self._leaf = None
        if batch is None:
            return
        rows, grad_rows = batch
        group = self.param_groups[0]
        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        weight_decay, maximize = group["weight_decay"], group["maximize"]
        table = self.table.detach()
        if not self.state:
            self.state = {"step": torch.tensor(0.0, dtype=torch.get_default_dtype()),
                          "exp_avg": torch.zeros_like(table, memory_format=torch.preserve_format),
                          "exp_avg_sq": torch.zeros_like(table, memory_format=torch.preserve_format)}
        step_t, exp_avg, exp_avg_sq = self.state["step"], self.state["exp_avg"], self.state["exp_avg_sq"]
        # torch.optim.adam._single_tensor_adam, non-capturable, non-differentiable, without amsgrad
        step_t += 1
        step = step_t.item()
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        bias_correction2_sqrt = bias_correction2**0.5
        bounds = torch.searchsorted(rows, torch.arange(0, len(table) + self.chunk_rows, self.chunk_rows,
                                                       device=rows.device)).tolist()
        for c, start in enumerate(range(0, len(table), self.chunk_rows)):
            stop = min(start + self.chunk_rows, len(table))
            param, m, v = table[start:stop], exp_avg[start:stop], exp_avg_sq[start:stop]
            grad = torch.zeros_like(param)
            lo, hi = bounds[c], bounds[c + 1]
            if hi > lo:
                grad.index_copy_(0, rows[lo:hi] - start, grad_rows[lo:hi].to(grad.dtype))
            if maximize:
                grad = -grad
            if weight_decay != 0:
                if group["decoupled_weight_decay"]:
                    param.mul_(1 - lr * weight_decay)
                else:
                    grad = grad.add(param, alpha=weight_decay)
            m.lerp_(grad, 1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
            param.addcdiv_(m, denom, value=-step_size)

    # --- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """``{"state": {"step", "exp_avg", "exp_avg_sq"} (empty before the first step), "param_groups": [group]}``:
        the tensors themselves, not copies (as ``torch.optim.Optimizer.state_dict``)."""
        return {"state": dict(self.state), "param_groups": [dict(self.param_groups[0])]}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore :meth:`state_dict` (moments moved to the table's device and dtype, as Adam does;
        ``step`` kept as saved)."""
        group = {k: v for k, v in state_dict["param_groups"][0].items() if k != "params"}
        self.param_groups = [{**self.param_groups[0], **group}]
        state = state_dict["state"]
        if state:
            for key in ("exp_avg", "exp_avg_sq"):
                if state[key].shape != self.table.shape:
                    raise ValueError(f"the saved latent moments are {tuple(state[key].shape)}, "
                                     f"the latent table {tuple(self.table.shape)}")
            self.state = {"step": state["step"],
                          **{k: state[k].to(device=self.table.device, dtype=self.table.dtype)
                             for k in ("exp_avg", "exp_avg_sq")}}
        else:
            self.state = {}


def merge_state_dicts(adam_state: dict, latent_state: dict) -> dict:
    """One ``torch.optim.Adam`` state dict of the dense weights' Adam state ``adam_state`` and a
    :class:`LatentAdam`'s: the latent group appended with the next parameter id, as one Adam over
    both groups saves it (the format of the checkpoints written before LatentAdam)."""
    ids = [i for g in adam_state["param_groups"] for i in g["params"]]
    pid = max(ids, default=-1) + 1
    state = dict(adam_state["state"])
    if latent_state["state"]:
        state[pid] = dict(latent_state["state"])
    groups = list(adam_state["param_groups"]) + [{**latent_state["param_groups"][0], "params": [pid]}]
    return {"state": state, "param_groups": groups}


def split_state_dict(state_dict: dict, n_groups: int) -> tuple[dict, dict | None]:
    """Inverse of :func:`merge_state_dicts`: ``(adam_state, latent_state)`` from an Adam state dict of
    ``n_groups`` dense groups followed by the latent group (``latent_state`` None if it has none)."""
    groups = state_dict["param_groups"]
    if len(groups) == n_groups:
        return state_dict, None
    if len(groups) != n_groups + 1 or len(groups[-1]["params"]) != 1:
        raise ValueError(f"the saved optimiser has {len(groups)} parameter groups; expected {n_groups} "
                         f"and the latent table's")
    pid = groups[-1]["params"][0]
    state = dict(state_dict["state"])
    latent = state.pop(pid, None)
    return ({"state": state, "param_groups": groups[:-1]},
            {"state": latent or {}, "param_groups": [groups[-1]]})
