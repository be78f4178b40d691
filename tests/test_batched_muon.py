"""BatchedMuon (train/muon.py) against torch.optim.Muon: the same parameters and momentum buffers, bit for
bit, after several steps; and checkpoints written by either load into the other."""

from __future__ import annotations

import copy

import pytest
import torch

from slmforge.train.muon import BatchedMuon

pytestmark = pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")

SHAPES = [(8, 8), (8, 8), (8, 8), (16, 8), (16, 8), (8, 24), (8, 24), (5, 7)]


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in SHAPES]


def _groups(params, nesterov: bool, adjust: str):
    return [{"params": params[:4], "lr": 0.02, "weight_decay": 0.01},
            {"params": params[4:], "lr": 0.05, "weight_decay": 0.1, "nesterov": nesterov}], \
        {"momentum": 0.9, "nesterov": True, "adjust_lr_fn": adjust}


def _set_grads(params, step: int, skip: int | None = None) -> None:
    g = torch.Generator().manual_seed(1000 + step)
    for i, p in enumerate(params):
        p.grad = None if i == skip else torch.randn(p.shape, generator=g)


@pytest.mark.parametrize("nesterov,adjust", [(True, "original"), (False, "match_rms_adamw")])
def test_updates_equal_torch_muon_bit_for_bit(nesterov, adjust):
    ours, theirs = _params(0), _params(0)
    groups, kwargs = _groups(ours, nesterov, adjust)
    batched = BatchedMuon(groups, **kwargs)
    groups, kwargs = _groups(theirs, nesterov, adjust)
    reference = torch.optim.Muon(groups, **kwargs)
    for step in range(4):
        skip = 2 if step == 1 else None  # a parameter without a gradient this step keeps its state
        _set_grads(ours, step, skip)
        _set_grads(theirs, step, skip)
        batched.step()
        reference.step()
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
        assert torch.equal(batched.state[a]["momentum_buffer"], reference.state[b]["momentum_buffer"])
    assert not torch.equal(ours[0], _params(0)[0])  # it did train


def test_state_dicts_are_interchangeable():
    ours, theirs = _params(1), _params(1)
    reference = torch.optim.Muon(theirs, lr=0.02)
    _set_grads(theirs, 0)
    reference.step()
    with torch.no_grad():
        for a, b in zip(ours, theirs):
            a.copy_(b)
    batched = BatchedMuon(ours, lr=0.02)
    batched.load_state_dict(copy.deepcopy(reference.state_dict()))  # as if read back from disk (no shared buffers)
    for step in (1, 2):
        _set_grads(ours, step)
        _set_grads(theirs, step)
        batched.step()
        reference.step()
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert batched.state_dict()["state"].keys() == reference.state_dict()["state"].keys()
