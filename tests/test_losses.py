"""The chunked linear cross-entropy against the plain `F.cross_entropy(h @ W.T + b)`: bf16 autocast,
bias and softcap, chunk sizes, and the weight cast once per call (issue 17)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from slmforge.objectives.losses import default_chunk_rows, linear_cross_entropy


def plain_loss(hidden, weight, targets, bias=None, softcap=None):
    logits = F.linear(hidden, weight, bias)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.reshape(-1, weight.shape[0]), targets.reshape(-1), ignore_index=-100)


def make_inputs(dtype=torch.float32, with_bias=False, vocab=300, d=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 37, d, generator=generator, dtype=dtype).requires_grad_()
    weight = (torch.randn(vocab, d, generator=generator, dtype=dtype) * 0.3).requires_grad_()
    bias = (torch.randn(vocab, generator=generator, dtype=dtype) * 0.5).requires_grad_() if with_bias else None
    targets = torch.randint(0, vocab, (2, 37), generator=generator)
    targets[1, :9] = -100
    return hidden, weight, bias, targets


@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("chunk_rows", [1, 16, 74, 500])
def test_matches_plain_loss_in_float64(softcap, with_bias, chunk_rows):
    hidden, weight, bias, targets = make_inputs(torch.float64, with_bias)
    inputs = [t for t in (hidden, weight, bias) if t is not None]
    loss = linear_cross_entropy(hidden, weight, targets, softcap=softcap, chunk_rows=chunk_rows, bias=bias)
    grads = torch.autograd.grad(loss, inputs)
    ref = plain_loss(hidden, weight, targets, bias, softcap)
    ref_grads = torch.autograd.grad(ref, inputs)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == r.dtype
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_plain_loss_under_bf16_autocast(softcap, with_bias):
    """fp32 parameters, bf16 autocast as in training: the loss and every gradient agree with autograd
    through the plain path within bf16 rounding, and come back in the parameters' dtype."""
    hidden, weight, bias, targets = make_inputs(torch.float32, with_bias)
    inputs = [t for t in (hidden, weight, bias) if t is not None]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, targets, softcap=softcap, chunk_rows=16, bias=bias)
        ref = plain_loss(hidden, weight, targets, bias, softcap)
    grads = torch.autograd.grad(loss, inputs)
    ref_grads = torch.autograd.grad(ref, inputs)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=2e-3, atol=2e-3)
    for g, r, p in zip(grads, ref_grads, inputs):
        assert g.dtype == p.dtype == torch.float32
        # bf16 has 8 bits of mantissa: compare relative to the gradient's scale.
        assert (g - r).abs().max() <= 2e-2 * r.abs().max(), (g - r).abs().max() / r.abs().max()
    # And the bf16 numbers are a rounding of the fp32 ones, not something else.
    exact = plain_loss(hidden.detach().double(), weight.detach().double(), targets,
                       None if bias is None else bias.detach().double(), softcap)
    assert abs(float(loss.detach()) - float(exact)) < 2e-2


def test_bf16_parameters_without_autocast():
    hidden, weight, _, targets = make_inputs(torch.bfloat16)
    loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=10)
    grads = torch.autograd.grad(loss, (hidden, weight))
    ref_grads = torch.autograd.grad(plain_loss(hidden, weight, targets), (hidden, weight))
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.bfloat16
        assert (g.float() - r.float()).abs().max() <= 3e-2 * r.float().abs().max()


class _CountCasts(TorchDispatchMode):
    """Counts copies that produce a tensor of `shape` (casts and clones of the weight)."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.count = torch.Size(shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten._to_copy, torch.ops.aten.clone, torch.ops.aten.copy_) \
                and isinstance(out, torch.Tensor) and out.shape == self.shape:
            self.count += 1
        return out


def test_weight_is_cast_once_per_call_under_autocast():
    """Issue 17 (a): `h @ weight.t()` under autocast cast the whole weight again for every chunk."""
    hidden, weight, _, targets = make_inputs(torch.float32, vocab=300, d=32)
    with torch.autocast("cpu", dtype=torch.bfloat16), _CountCasts(weight.shape) as counter:
        loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=8)  # 10 chunks
    assert counter.count == 1
    with _CountCasts(weight.shape) as counter:
        loss.backward()
    assert counter.count == 0  # the fp32 weight gradient is scaled in place, not copied


def test_no_grad_evaluation_matches_and_counts_hits():
    hidden, weight, bias, targets = make_inputs(torch.float64, with_bias=True)
    with torch.no_grad():
        loss, correct = linear_cross_entropy(hidden, weight, targets, bias=bias, chunk_rows=7, with_correct=True)
        logits = F.linear(hidden, weight, bias)
    torch.testing.assert_close(loss, plain_loss(hidden, weight, targets, bias))
    valid = targets != -100
    assert int(correct) == int(((logits.argmax(-1) == targets) & valid).sum())


def test_default_chunk_rows_by_device_and_vocabulary():
    assert default_chunk_rows(262_144, "cpu") == 1024
    assert default_chunk_rows(262_144, "cuda") == 2048
    assert default_chunk_rows(50_304, "cuda") == 8192  # clamped
    assert default_chunk_rows(10_000_000, "cpu") == 256  # clamped
    with pytest.raises(ValueError, match="chunk_rows"):
        linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long), chunk_rows=0)


def test_a_second_backward_is_refused_not_wrong():
    hidden, weight, _, targets = make_inputs(torch.float32)
    loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=16)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


def test_head_loss_uses_the_configured_chunk_rows_and_equals_the_plain_loss(monkeypatch):
    """train.loss_chunk_rows reaches the chunked loss: 7-row chunks (a ragged last one) give the plain
    loss and gradient, and the chunk loop really runs in 7-row steps."""
    from slmforge.models.heads import OutputProjection
    from slmforge.objectives import losses
    from slmforge.objectives.losses import HeadLoss

    hidden, weight, _, targets = make_inputs()
    seen = []
    original = losses._chunk_loss

    def spy(logits, *args, **kwargs):
        seen.append(logits.shape[0])
        return original(logits, *args, **kwargs)

    monkeypatch.setattr(losses, "_chunk_loss", spy)
    loss, correct = HeadLoss(chunk_rows=7)(OutputProjection(hidden, weight, None, None), targets)
    assert set(seen[:-1]) == {7} and 0 < seen[-1] <= 7
    expected = plain_loss(hidden, weight, targets)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    (grad,) = torch.autograd.grad(loss, hidden)
    (expected_grad,) = torch.autograd.grad(plain_loss(hidden, weight, targets), hidden)
    torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=1e-5)


def test_liger_kernel_is_refused_off_cuda_in_one_line():
    from slmforge.errors import SlmforgeError
    from slmforge.objectives.losses import HeadLoss

    with pytest.raises(SlmforgeError, match="train.loss_kernel: 'liger' runs Triton kernels on CUDA only"):
        HeadLoss("liger").check(torch.device("cpu"))
    HeadLoss("chunked").check(torch.device("cpu"))  # the default runs anywhere


def test_trainer_hands_the_loss_settings_to_the_objective(markov_shards, tmp_path, monkeypatch):
    """train.loss_chunk_rows reaches the loss the Trainer runs: the chunks really are that small, and the
    losses equal the default chunking's."""
    from slmforge import config
    from slmforge.errors import ConfigError
    from slmforge.objectives import losses
    from slmforge.train.config import PretrainConfig
    from slmforge.train.metrics import read_metrics
    from slmforge.train.pretrain import pretrain

    _, data = markov_shards
    seen, original = [], losses._chunk_loss

    def spy(logits, *args, **kwargs):
        seen.append(logits.shape[0])
        return original(logits, *args, **kwargs)

    monkeypatch.setattr(losses, "_chunk_loss", spy)
    losses_by_rows = {}
    for rows in ("default", 5):
        seen.clear()
        extra = [] if rows == "default" else [f"train.loss_chunk_rows={rows}"]
        pretrain(config.load(PretrainConfig, overrides=[
            f"train.data={data}", f"train.out_dir={tmp_path / str(rows)}", "model.preset=test-tiny",
            "train.seq_len=16", "train.batch_size=4", "train.max_steps=3", "train.log_every=1",
            "train.eval_every=0", "train.device=cpu", *extra]))
        losses_by_rows[rows] = [r["loss"] for r in read_metrics(tmp_path / str(rows) / "metrics.jsonl")
                                if r["split"] == "train"]
        assert max(seen) == (64 if rows == "default" else 5)  # 4 x 16 rows in one chunk by default
    assert losses_by_rows["default"] == pytest.approx(losses_by_rows[5], abs=1e-5)
    with pytest.raises(ConfigError, match="loss_chunk_rows"):
        config.load(PretrainConfig, overrides=["train.loss_chunk_rows=0"])


def test_liger_kernel_call_gives_the_loss_and_the_argmax_count(monkeypatch):
    """What slmforge asks of Liger's fused linear cross-entropy and makes of its answer, checked against a
    stand-in with Liger's signature (the real kernel needs CUDA and Triton)."""
    import importlib.machinery
    import sys
    import types
    from dataclasses import dataclass

    from slmforge.errors import SlmforgeError
    from slmforge.models.heads import OutputProjection
    from slmforge.objectives.losses import HeadLoss

    @dataclass
    class Output:
        loss: torch.Tensor
        token_accuracy: torch.Tensor

    calls = []

    def liger_fused_linear_cross_entropy(input, weight, target, bias=None, ce_weight=None, ignore_index=-100,
                                         lse_square_scale=0.0, label_smoothing=0.0, reduction="mean",
                                         softcap=None, return_z_loss=False, return_token_accuracy=False):
        calls.append(dict(shape=tuple(input.shape), ignore_index=ignore_index, softcap=softcap,
                          accuracy=return_token_accuracy))
        logits = input @ weight.t() + (bias if bias is not None else 0)
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        scored = target != ignore_index
        hits = (logits.argmax(-1) == target) & scored
        return Output(F.cross_entropy(logits, target, ignore_index=ignore_index), hits.sum() / scored.sum())

    package = types.ModuleType("liger_kernel")
    package.__spec__ = importlib.machinery.ModuleSpec("liger_kernel", None)
    functional = types.ModuleType("liger_kernel.transformers.functional")
    functional.liger_fused_linear_cross_entropy = liger_fused_linear_cross_entropy
    monkeypatch.setitem(sys.modules, "liger_kernel", package)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", types.ModuleType("liger_kernel.transformers"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional", functional)

    HeadLoss("liger").check(torch.device("cuda"))  # package and signature accepted
    hidden, weight, bias, targets = make_inputs(with_bias=True)
    projection = OutputProjection(hidden, weight, bias, 4.0)
    loss, correct = HeadLoss("liger")(projection, targets)
    expected_loss, expected_correct = HeadLoss()(projection, targets)
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=1e-5)
    assert float(correct) == pytest.approx(float(expected_correct))
    assert calls[0] == dict(shape=(74, 32), ignore_index=-100, softcap=4.0, accuracy=True)

    def old_signature(input, weight, target, bias=None, ignore_index=-100):
        return None

    functional.liger_fused_linear_cross_entropy = old_signature
    with pytest.raises(SlmforgeError, match="cannot report token accuracy"):
        HeadLoss("liger").check(torch.device("cuda"))
