"""LatentAdam: the auto-decoder latent table's dense Adam from the batch rows' gradient only.

Synthetic and fast: the same latents as ``torch.optim.Adam`` on the whole table, no allocation of
the table's size per step, and state dicts that interchange with the single Adam used before.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from stellarfield.model.latent_table import LatentAdam, merge_state_dicts, split_state_dict

N, D, B = 1000, 16, 64


def _batches(steps: int, n: int = N, seed: int = 0):
    """Per step: random row indices (repeats included, as two observations of one star) and a
    random linear-quadratic loss of those rows."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randint(0, n, (B,), generator=gen)
        index[:4] = index[4:8]  # surely some rows twice in the batch
        yield index, torch.randn(B, D, generator=gen), torch.randn(B, D, generator=gen)


def _loss(z, a, b):
    return ((z - a) ** 2 * b.abs()).sum() + (z * b).sum().sin()


def _run_reference(table: torch.Tensor, steps: int, optim_kwargs: dict, lrs, **adam_kw) -> torch.Tensor:
    """torch.optim.Adam on the whole table (the embedding's dense gradient: zero outside the batch)."""
    param = torch.nn.Parameter(table.clone())
    opt = torch.optim.Adam([param], **optim_kwargs, **adam_kw)
    for lr, (index, a, b) in zip(lrs, _batches(steps)):
        opt.param_groups[0]["lr"] = lr
        opt.zero_grad(set_to_none=True)
        _loss(torch.nn.functional.embedding(index, param), a, b).backward()
        opt.step()
    return param.detach()


def _run_latent_adam(table: torch.Tensor, steps: int, optim_kwargs: dict, lrs, chunk_rows: int) -> torch.Tensor:
    table = table.clone()
    opt = LatentAdam(table, optim_kwargs, chunk_rows=chunk_rows)
    for lr, (index, a, b) in zip(lrs, _batches(steps)):
        opt.param_groups[0]["lr"] = lr
        z = opt.gather(index)
        opt.zero_grad()
        _loss(z, a, b).backward()
        opt.step()
    return table


@pytest.mark.parametrize("options, chunk_rows", [
    ({}, 1 << 16), ({}, 128), ({}, 333),  # one chunk; chunks dividing the table; a last chunk shorter
    ({"weight_decay": 1e-2}, 333), ({"weight_decay": 1e-2, "decoupled_weight_decay": True}, 333),
    ({"betas": (0.8, 0.99), "eps": 1e-6, "maximize": True}, 333)])
def test_the_same_latents_as_adam_on_the_whole_table(options, chunk_rows):
    """50 steps with random batches, a warmup of the step size and rows repeated in a batch: the
    same table as torch.optim.Adam (its single-tensor implementation, the CPU's default) bit for
    bit, whatever the chunking; and within 1e-6 of its foreach implementation."""
    table = torch.randn(N, D, generator=torch.Generator().manual_seed(1)) * 0.01
    steps = 50
    lrs = [1e-2 * min(1.0, (s + 1) / 10) for s in range(steps)]
    kwargs = {"lr": lrs[0], **options}
    ours = _run_latent_adam(table, steps, kwargs, lrs, chunk_rows)
    assert torch.equal(ours, _run_reference(table, steps, kwargs, lrs))
    assert torch.equal(ours, _run_reference(table, steps, kwargs, lrs, foreach=False))
    torch.testing.assert_close(ours, _run_reference(table, steps, kwargs, lrs, foreach=True), rtol=0, atol=1e-6)
    assert not torch.equal(ours, table)  # it moved


def test_a_step_without_a_gradient_changes_nothing():
    table = torch.randn(10, D)
    before = table.clone()
    opt = LatentAdam(table, {"lr": 0.1})
    opt.step()  # nothing gathered
    opt.gather(torch.tensor([1, 2]))
    opt.step()  # no backward pass
    assert torch.equal(table, before) and opt.state == {}


class _LargeAllocations(TorchDispatchMode):
    """Records every op output of at least ``numel`` elements whose memory is none of ``allowed``
    (the table and its moments; in-place updates and views of them share their storage)."""

    def __init__(self, numel: int, allowed: list[torch.Tensor]):
        super().__init__()
        self.numel, self.allowed = numel, allowed
        self.found: list[tuple[str, tuple]] = []
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        storages = {t.untyped_storage().data_ptr() for t in self.allowed}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in storages:
                self.largest = max(self.largest, t.numel())
                if t.numel() >= self.numel:
                    self.found.append((str(func), tuple(t.shape)))
        return out


def test_a_step_allocates_nothing_of_the_table_size():
    """Over whole steps (gather, loss, backward, step), every tensor made that is not the table or
    one of its two moments (or a view of them) is at most a chunk: the check, by a dispatch hook
    on every op, flags the old way (the embedding's dense gradient, Adam's full-size sqrt)."""
    n, chunk = 50_000, 4096
    table = torch.randn(n, D) * 0.01
    opt = LatentAdam(table, {"lr": 1e-2}, chunk_rows=chunk)
    batches = list(_batches(4, n=n))
    index, a, b = batches[0]
    _loss(opt.gather(index), a, b).backward()
    opt.step()  # the first step makes the moments (Adam's state, as torch.optim.Adam's first step)
    mode = _LargeAllocations(n * D // 4, [table, opt.state["exp_avg"], opt.state["exp_avg_sq"]])
    with mode:
        for index, a, b in batches[1:]:
            z = opt.gather(index)
            opt.zero_grad()
            _loss(z, a, b).backward()
            opt.step()
    assert mode.found == [], mode.found
    assert 0 < mode.largest <= chunk * D

    # the hook sees the old way's dense tables
    param = torch.nn.Parameter(table.clone())
    adam = torch.optim.Adam([param], lr=1e-2)
    _loss(torch.nn.functional.embedding(index, param), a, b).backward()
    adam.step()
    old = _LargeAllocations(n * D // 4, [param, adam.state[param]["exp_avg"], adam.state[param]["exp_avg_sq"]])
    with old:
        adam.zero_grad(set_to_none=True)
        _loss(torch.nn.functional.embedding(index, param), a, b).backward()
        adam.step()
    assert len(old.found) >= 2 and all(shape == (n, D) for _, shape in old.found), old.found


def _weights_and_table(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(5, 3, generator=gen)), torch.randn(N, D, generator=gen) * 0.01


def _step_both(weight, opt, latent_opt, index, a, b):
    z = latent_opt.gather(index)
    opt.zero_grad(set_to_none=True)
    latent_opt.zero_grad()
    (_loss(z, a, b) + (weight**2).sum() * a.mean()).backward()
    opt.step()
    latent_opt.step()


def test_state_dicts_interchange_with_one_adam_over_both():
    """The merged state dict (what checkpoints hold) is one torch.optim.Adam's over the weights
    and the table: an old checkpoint's resumes with Adam + LatentAdam, a new one with the old
    single Adam, and either continues exactly as an uninterrupted run."""
    batches = list(_batches(12))
    # uninterrupted, the old way: one Adam over [weights] and [table]
    w_old, t = _weights_and_table()
    t_old = torch.nn.Parameter(t.clone())
    old = torch.optim.Adam([{"params": [w_old], "lr": 1e-2, "clip": True}, {"params": [t_old], "lr": 5e-2, "clip": False}])
    saved_old = None
    for i, (index, a, b) in enumerate(batches):
        old.zero_grad(set_to_none=True)
        (_loss(torch.nn.functional.embedding(index, t_old), a, b) + (w_old**2).sum() * a.mean()).backward()
        old.step()
        if i == 5:
            saved_old = {"opt": _clone(old.state_dict()), "w": w_old.detach().clone(), "t": t_old.detach().clone()}

    # the new way, uninterrupted: the same weights and table, bit for bit
    w_new, t = _weights_and_table()
    opt = torch.optim.Adam([{"params": [w_new], "lr": 1e-2, "clip": True}])
    lat = LatentAdam(t, {"lr": 5e-2, "clip": False})
    for i, (index, a, b) in enumerate(batches):
        _step_both(w_new, opt, lat, index, a, b)
        if i == 5:
            merged = _clone(merge_state_dicts(opt.state_dict(), lat.state_dict()))
            saved_new = {"opt": merged, "w": w_new.detach().clone(), "t": t.clone()}
    assert torch.equal(w_new, w_old) and torch.equal(t, t_old)
    assert merged["param_groups"][1].keys() == saved_old["opt"]["param_groups"][1].keys()
    assert all(torch.equal(merged["state"][1][k], saved_old["opt"]["state"][1][k]) for k in merged["state"][1])

    # an old checkpoint resumed the new way, and a new one the old way
    for saved in (saved_old, saved_new):
        w = torch.nn.Parameter(saved["w"].clone())
        table = saved["t"].clone()
        opt = torch.optim.Adam([{"params": [w], "lr": 1.0, "clip": True}])
        lat = LatentAdam(table, {"lr": 1.0, "clip": False})
        adam_state, latent_state = split_state_dict(_clone(saved["opt"]), len(opt.param_groups))
        opt.load_state_dict(adam_state)
        lat.load_state_dict(latent_state)
        for index, a, b in batches[6:]:
            _step_both(w, opt, lat, index, a, b)
        assert torch.equal(w, w_old) and torch.equal(table, t_old)

        w = torch.nn.Parameter(saved["w"].clone())
        tp = torch.nn.Parameter(saved["t"].clone())
        single = torch.optim.Adam([{"params": [w], "lr": 1.0}, {"params": [tp], "lr": 1.0}])
        single.load_state_dict(_clone(saved["opt"]))
        for index, a, b in batches[6:]:
            single.zero_grad(set_to_none=True)
            (_loss(torch.nn.functional.embedding(index, tp), a, b) + (w**2).sum() * a.mean()).backward()
            single.step()
        assert torch.equal(w, w_old) and torch.equal(tp, t_old)


def test_split_without_a_latent_group_and_a_mismatch():
    w = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.Adam([w])
    assert split_state_dict(opt.state_dict(), 1) == (opt.state_dict(), None)
    with pytest.raises(ValueError, match="parameter groups"):
        split_state_dict(opt.state_dict(), 3)
    lat = LatentAdam(torch.zeros(4, 2), {"lr": 0.1})
    merged = merge_state_dicts(opt.state_dict(), lat.state_dict())  # never stepped: no latent state
    assert split_state_dict(merged, 1)[1]["state"] == {}
    with pytest.raises(ValueError, match="latent moments"):
        LatentAdam(torch.zeros(5, 2), {"lr": 0.1}).load_state_dict(
            {"state": {"step": torch.tensor(1.0), "exp_avg": torch.zeros(4, 2), "exp_avg_sq": torch.zeros(4, 2)},
             "param_groups": [{"lr": 0.1}]})


def _clone(state):
    if isinstance(state, torch.Tensor):
        return state.clone()
    if isinstance(state, dict):
        return {k: _clone(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_clone(v) for v in state]
    return state
