"""train.attention = "flex": FlexAttention with block masks computes what SDPA with boolean masks does,
for sliding-window layers, packed documents, both, and padding, in value and gradient.

torch 2.13 refuses FlexAttention's backward pass on CPU, though its reference (unfused) implementation
has one. The `cpu_backward` fixture lifts that check so that CPU tests can compare gradients through
the reference implementation: this checks our block masks and the model's wiring, not the fused GPU
kernel, whose gradients the gpu-marked tests at the end compare.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.attention.flex_attention as torch_flex
import torch.nn.functional as F

from slmforge import config
from slmforge.errors import ConfigError
from slmforge.models import DecoderConfig, EncoderConfig, build_model, flex
from slmforge.objectives.clm import CausalLM
from slmforge.runtime import apply_attention
from slmforge.train.config import PretrainConfig, TrainLoopConfig
from slmforge.train.metrics import read_metrics
from slmforge.train.pretrain import pretrain

# The reference implementation's note that it is not the fused kernel (said once per process).
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

T = 40  # longer than the sliding window (6): sliding layers need a mask
CASES = {  # name -> (model config changes, raw batch entries besides tokens)
    "sliding": ({}, ()),
    "documents": ({"sliding_window": None}, ("document_ids",)),
    "both": ({}, ("document_ids",)),
    "padding": ({}, ("attention_mask",)),
}


def tiny(**changes) -> DecoderConfig:
    """Gemma 3-shaped: sliding layers with global ones between them, QK-norm, grouped-query heads (4:2)."""
    base = dict(vocab_size=97, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8,
                intermediate_size=64, max_seq_len=64, sliding_window=6, global_every=2, query_pre_attn_scalar=8.0)
    return DecoderConfig.from_name("gemma3-tiny", **{**base, **changes})


def raw_batch(entries=("document_ids",)) -> dict[str, torch.Tensor]:
    """Tokens (2, T + 1) with documents of uneven lengths (one longer than the window), or padding (left
    in one row, right in the other)."""
    generator = torch.Generator().manual_seed(0)
    raw = {"tokens": torch.randint(0, 97, (2, T + 1), generator=generator)}
    if "document_ids" in entries:
        raw["document_ids"] = torch.tensor([[0] * 9 + [1] * 3 + [2] * 20 + [3] * 9, [0] * 30 + [1] * 11])
    if "attention_mask" in entries:
        mask = torch.ones(2, T + 1, dtype=torch.long)
        mask[0, :5] = 0
        mask[1, 27:] = 0
        raw["attention_mask"] = mask
    return raw


@pytest.fixture
def eager_flex(monkeypatch):
    """Flex without torch.compile: the reference implementation, seconds faster per test on CPU."""
    monkeypatch.setattr(flex.attention_kernel, "eager", True)
    monkeypatch.setattr(flex.mask_builder, "eager", True)


@pytest.fixture
def cpu_backward(monkeypatch):
    monkeypatch.setattr(torch_flex, "_validate_device", lambda *tensors: None)


def loss_and_gradients(model, batch):
    model.zero_grad()
    loss, _ = CausalLM().loss(model, batch)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_flex_equals_sdpa_in_value_and_gradient(case, eager_flex, cpu_backward):
    changes, entries = CASES[case]
    model = build_model(tiny(**changes), seed=0)
    batch = CausalLM().collate(raw_batch(entries))
    hidden = {}
    grads = {}
    for kernel in ("sdpa", "flex"):
        model.set_attention(kernel)
        packed = {"document_ids": batch["document_ids"]} if "document_ids" in batch else {}
        hidden[kernel] = model(batch["input_ids"], batch.get("attention_mask"), **packed).detach()
        grads[kernel] = loss_and_gradients(model, batch)
    torch.testing.assert_close(hidden["flex"], hidden["sdpa"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads["flex"][0], grads["sdpa"][0], atol=1e-5, rtol=1e-5)
    for name, grad in grads["sdpa"][1].items():
        torch.testing.assert_close(grads["flex"][1][name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_flex_gives_sdpa_no_boolean_mask_and_one_block_mask_per_layer_kind(eager_flex, monkeypatch):
    """With flex, SDPA sees no (T, T) mask (full layers stay is_causal) and each forward builds one block
    mask per layer kind, shared by the layers of that kind; sdpa passes boolean masks as before."""
    sdpa_masks, built = [], []
    real_sdpa, real_builder = F.scaled_dot_product_attention, flex.mask_builder

    def sdpa(*args, attn_mask=None, **kwargs):
        sdpa_masks.append(attn_mask)
        return real_sdpa(*args, attn_mask=attn_mask, **kwargs)

    def builder(*args, **kwargs):
        built.append(args[1])  # the batch dimension: None = one mask for every row
        return real_builder(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    monkeypatch.setattr(flex, "mask_builder", builder)
    model = build_model(tiny(), seed=0).eval()  # layers: sliding, full, sliding, full
    ids = raw_batch()["tokens"][:, :T]
    documents = raw_batch()["document_ids"][:, :T]
    with torch.no_grad():
        model(ids, document_ids=documents)  # sdpa
        assert len(sdpa_masks) == 4 and all(mask is not None for mask in sdpa_masks) and not built
        sdpa_masks.clear()
        model.set_attention("flex")
        model(ids)  # sliding layers get a block mask, full layers SDPA's is_causal
        assert built == [None] and sdpa_masks == [None, None]
        model(ids, document_ids=documents)  # every layer gets a block mask: one per kind, per row
        assert built == [None, 2, 2] and sdpa_masks == [None, None]
        model(ids[:, :5], document_ids=documents[:, :5])  # the window covers the whole row: one mask serves both
        assert built == [None, 2, 2, 2]
        model(ids[:, :5])  # nothing to mask: is_causal everywhere
        assert built == [None, 2, 2, 2] and sdpa_masks == [None, None] + [None] * 4


def test_decoding_with_a_cache_keeps_sdpa(eager_flex):
    model = build_model(tiny(), seed=0).eval()
    model.set_attention("flex")
    ids = raw_batch()["tokens"][:, :T]
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, T)
        steps = [model(ids[:, :20], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(20, T)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_short_training_gives_the_same_losses(eager_flex, cpu_backward):
    """Eight AdamW steps on one batch of packed documents with sliding layers: flex and sdpa stay together."""
    batch = CausalLM().collate(raw_batch(("document_ids",)))
    losses = {}
    for kernel in ("sdpa", "flex"):
        model = build_model(tiny(), seed=0)
        model.set_attention(kernel)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses[kernel] = []
        for _ in range(8):
            loss, _ = CausalLM().loss(model, batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses[kernel].append(loss.item())
    assert losses["flex"][-1] < losses["flex"][0]
    torch.testing.assert_close(torch.tensor(losses["flex"]), torch.tensor(losses["sdpa"]), atol=1e-5, rtol=1e-5)


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ConfigError) as error:
        config.parse(TrainLoopConfig, {"attention": "flash"}, "train")
    assert str(error.value) == "train.attention: must be one of 'sdpa' | 'flex', got 'flash'"
    model = build_model(tiny(), seed=0)
    with pytest.raises(ValueError, match="must be sdpa or flex, got 'flash'"):
        model.set_attention("flash")
    # The device is only compared by type here: nothing runs on it.
    with pytest.raises(ConfigError, match=r"^train.attention: FlexAttention has no attention dropout"):
        apply_attention(build_model(tiny(dropout=0.1), seed=0), "flex", torch.device("cuda"))
    encoder = build_model(EncoderConfig.from_name("bert-tiny"), seed=0)
    with pytest.raises(ConfigError, match=r"^train.attention: flex is implemented for decoders"):
        apply_attention(encoder, "flex", torch.device("cuda"))
    apply_attention(model, "flex", torch.device("cuda"))
    assert model.attention == "flex"


def test_cpu_training_with_flex_says_so_and_keeps_sdpa(markov_shards, tmp_path, capsys):
    _, data = markov_shards
    run = pretrain(config.load(PretrainConfig, overrides=[
        "model.preset=test-tiny", "model.sliding_window=8", f"train.data={data}", "train.seq_len=32",
        "train.batch_size=4", "train.max_steps=2", "train.device=cpu", "train.attention=flex",
        f"train.out_dir={tmp_path / 'run'}"]))
    assert "train.attention=flex: torch" in capsys.readouterr().err
    assert all(r["loss"] is not None for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train")


def test_a_failed_compile_is_said_once_then_the_fallback_runs(monkeypatch):
    def broken_compile(fn, **kwargs):
        def compiled(*args):
            raise RuntimeError("Cannot find a working triton installation\nmore detail")
        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    kernel = flex.CompiledOnce(lambda x: x + 1, lambda x: x + 2, "kernel", "the plain path runs")
    with pytest.raises(TypeError):
        kernel("not a tensor")  # bad arguments fail in the fallback too: raised, no switch
    assert kernel.state == "untried"
    with pytest.warns(RuntimeWarning, match=r"^kernel: torch.compile failed \(RuntimeError: Cannot find a "
                                            r"working triton installation\); the plain path runs$"):
        assert kernel(torch.tensor(1)) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernel(torch.tensor(1)) == 3
    assert kernel.state == "failed"


def test_a_backward_that_fails_to_compile_falls_back_too(monkeypatch):
    """AOTAutograd compiles the backward lazily: the first call builds it at once, inside the check, so a
    backward the compiler cannot make falls back like a forward would, instead of failing the run at
    the first loss.backward()."""
    class ForwardOnly(torch.autograd.Function):  # what a compiled forward with a broken backward gives
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            raise RuntimeError("out of resource: shared memory")

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: ForwardOnly.apply)
    kernel = flex.CompiledOnce(lambda x: x * 2, lambda x: x * 2.0, "kernel", "the plain path runs")
    x = torch.ones(3, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="out of resource"):
        out = kernel(x)
    assert kernel.state == "failed"
    out.sum().backward()  # the fallback's graph
    assert torch.equal(x.grad, torch.full((3,), 2.0))


@pytest.mark.slow
def test_compiled_flex_equals_sdpa_on_cpu(monkeypatch):
    """The compiled path (inductor's CPU template for flex_attention, compiled create_block_mask),
    forward only: torch 2.13 compiles no FlexAttention backward for CPU. 300 tokens span three of the
    kernel's 128-token blocks, and the document ids come sliced from CausalLM.collate, as in training:
    such strided ids once made the compiled CPU kernel index out of bounds."""
    monkeypatch.setattr(flex, "attention_kernel", flex.CompiledOnce(
        torch_flex.flex_attention, flex._sdpa_with_block_mask, "FlexAttention", "fallback"))
    monkeypatch.setattr(flex, "mask_builder", flex.CompiledOnce(
        torch_flex.create_block_mask, torch_flex.create_block_mask, "create_block_mask", "fallback"))
    model = build_model(tiny(max_seq_len=300, sliding_window=64), seed=0).eval()
    generator = torch.Generator().manual_seed(0)
    lengths = torch.tensor([[100, 3, 150, 48], [200, 80, 1, 20]])
    raw = {"tokens": torch.randint(0, 97, (2, 301), generator=generator),
           "document_ids": torch.stack([torch.repeat_interleave(torch.arange(4), row) for row in lengths])}
    batch = CausalLM().collate(raw)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback would warn: fail instead
        for packed in ({}, {"document_ids": batch["document_ids"]}):
            model.set_attention("sdpa")
            expected = model(batch["input_ids"], **packed)
            model.set_attention("flex")
            torch.testing.assert_close(model(batch["input_ids"], **packed), expected, atol=1e-5, rtol=1e-5)
    assert flex.attention_kernel.state == "compiled" and flex.mask_builder.state == "compiled"


@pytest.mark.slow
def test_flex_inside_a_whole_model_compile(eager_flex):
    """train.compile = "model" traces Decoder.forward: the block masks are built outside that graph
    (Decoder.set_attention) and flex_attention is compiled inside it. Forward only (CPU)."""
    model = build_model(tiny(), seed=0).eval()
    raw = raw_batch()
    ids, documents = raw["tokens"][:, :T], raw["document_ids"][:, :T]
    with torch.no_grad():
        expected = model(ids, document_ids=documents)
        model.set_attention("flex")
        compiled = torch.compile(model)
        torch.testing.assert_close(compiled(ids, document_ids=documents), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_benchmark_runs_and_reports_a_ratio_per_case(monkeypatch, capsys):
    """`python -m benchmarks.bench_flex_attention` at its smallest, so that it cannot rot."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    from benchmarks import bench_flex_attention

    ratios = bench_flex_attention.main(["--device", "cpu", "--seq-len", "256", "--batch", "1", "--window", "64",
                                        "--document-length", "50", "--rounds", "1", "--steps", "1"])
    assert len(ratios) == 2 and all(ratio > 0 for ratio in ratios.values())
    assert "ratio flex / sdpa" in capsys.readouterr().out


# ---------------------------------------------------------------- the fused kernel (CUDA)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_flex_equals_sdpa_on_cuda(case, monkeypatch):
    """The compiled, fused kernel forward and backward (float32, TF32 off) against SDPA's math."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    changes, entries = CASES[case]
    model = build_model(tiny(**changes), device="cuda", seed=0)
    batch = {k: v.cuda() for k, v in CausalLM().collate(raw_batch(entries)).items()}
    results = {}
    for kernel in ("sdpa", "flex"):
        model.set_attention(kernel)
        results[kernel] = loss_and_gradients(model, batch)
    assert flex.attention_kernel.state == "compiled"
    torch.testing.assert_close(results["flex"][0], results["sdpa"][0], atol=1e-5, rtol=1e-5)
    for name, grad in results["sdpa"][1].items():
        torch.testing.assert_close(results["flex"][1][name], grad, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pretrain_with_flex_on_cuda_gives_the_losses_of_sdpa(markov_shards, tmp_path):
    _, data = markov_shards
    losses = {}
    for kernel in ("sdpa", "flex"):
        run = pretrain(config.load(PretrainConfig, overrides=[
            "model.preset=test-tiny", "model.sliding_window=8", "model.global_every=2", f"train.data={data}",
            "train.seq_len=64", "train.batch_size=8", "train.max_steps=10", "train.log_every=1",
            "train.device=cuda", "train.precision=fp32", f"train.attention={kernel}",
            f"train.out_dir={tmp_path / kernel}"]))
        losses[kernel] = [r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"]
    torch.testing.assert_close(torch.tensor(losses["flex"]), torch.tensor(losses["sdpa"]), atol=1e-4, rtol=1e-4)
