"""Parity with transformers: tiny random Gemma 3 and Llama models, both directions, through the same
import/export code the CLI uses.

Import: build a random `transformers` model, save_pretrained, `import_hf` -> our logits and greedy
tokens must match. Export: our random model -> `export_hf` -> `AutoModelForCausalLM.from_pretrained`
with no missing/unexpected-weight warnings -> same comparisons. Sequences are longer than the sliding
window, so the window and the per-layer RoPE bases are exercised, with and without the KV cache.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from conftest import randomize_weights

transformers = pytest.importorskip("transformers",
                                   reason="transformers is an optional extra (pip install 'slmforge[hf]')")

from slmforge.checkpoint.reading import load_model  # noqa: E402
from slmforge.checkpoint.writing import save_checkpoint
from slmforge.interop import export_hf, import_hf  # noqa: E402
from slmforge.models import DecoderConfig, build_model  # noqa: E402

TOLERANCE_FP32 = 1e-4
VOCAB = 320  # >= the test tokenizer's 300 ids
SEQ_LEN = 40  # > every sliding window below
WINDOW = 8

# ---------------------------------------------------------------- tiny models on the transformers side


def hf_gemma3(**overrides):
    fields = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=5, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24, sliding_window=WINDOW,
                  sliding_window_pattern=3, max_position_embeddings=128, rope_theta=1_000_000.0,
                  rope_local_base_freq=10_000.0, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    fields.update(overrides)
    return transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**fields))


def hf_llama(**overrides):
    fields = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rope_theta=500_000.0, tie_word_embeddings=False,
                  bos_token_id=2, eos_token_id=1, pad_token_id=0)
    fields.update(overrides)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields))


# llama3 / linear scaling with a short original context so that the scaling changes the frequencies.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 500_000.0}
HF_CASES = {
    "gemma3": lambda: hf_gemma3(),
    "gemma3-softcap-linear-rope-mqa": lambda: hf_gemma3(
        num_hidden_layers=4, num_key_value_heads=1, sliding_window_pattern=2, final_logit_softcapping=30.0,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}),
    # Not "every n-th layer global": sliding, full, sliding, sliding.
    "gemma3-irregular-layer-types": lambda: hf_gemma3(
        num_hidden_layers=4, layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                          "sliding_attention"]),
    "llama-gqa-untied-llama3-rope": lambda: hf_llama(rope_parameters=dict(LLAMA3_ROPE)),
    "llama-tied": lambda: hf_llama(tie_word_embeddings=True, num_key_value_heads=1),
    "llama-linear-rope": lambda: hf_llama(
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10_000.0}),
}

# ---------------------------------------------------------------- tiny models on our side

OUR_CASES = {
    "gemma3": DecoderConfig.from_name(
        "gemma3-tiny", vocab_size=VOCAB, hidden_size=64, num_layers=5, num_heads=4, num_kv_heads=2, head_dim=32,
        intermediate_size=96, max_seq_len=128, sliding_window=WINDOW, global_every=3, query_pre_attn_scalar=24.0,
        final_logit_softcap=30.0, rope_scaling="linear", rope_scaling_factor=4.0),
    "gemma3-layer-types": DecoderConfig.from_name(
        "gemma3-tiny", vocab_size=VOCAB, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
        intermediate_size=96, max_seq_len=128, sliding_window=WINDOW, query_pre_attn_scalar=24.0, global_every=1,
        layer_types=["full_attention", "sliding_attention", "full_attention", "sliding_attention"]),
    "llama-untied-llama3-rope": DecoderConfig(
        family="llama", vocab_size=VOCAB, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2,
        intermediate_size=96, max_seq_len=128, rope_theta=500_000.0, tie_embeddings=False, rope_scaling="llama3",
        rope_scaling_factor=8.0, rope_original_max_seq_len=16),
    "llama-tied": DecoderConfig.from_name("llama-tiny", vocab_size=VOCAB, hidden_size=64, num_layers=3,
                                        intermediate_size=96, max_seq_len=128),
}


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights large enough that every detail (norm offsets, window, RoPE) moves the logits visibly."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        if param.ndim == 1:  # norm scales: around 1 for Llama, around 0 for Gemma's (1 + w)
            unit = 0.0 if model.config.model_type == "gemma3_text" else 1.0
            param.copy_(unit + 0.3 * noise)
        else:
            param.copy_(noise / param.shape[-1] ** 0.5)


# ---------------------------------------------------------------- helpers


def make_tokenizer_dir(path: Path) -> Path:
    """A 300-id byte-level BPE with <pad>=0, <eos>=1, <bos>=2, saved as training saves a run's tokenizer."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    from slmforge.tokenizer import Tokenizer as SlmforgeTokenizer

    texts = ["the quick brown fox jumps over the lazy dog", "नमस्ते दुनिया, यह एक परीक्षण है", "hello 123 world"] * 20
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<eos>", "<bos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return SlmforgeTokenizer(tokenizer, {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>"}).save(path)


def make_run(root: Path, cfg: DecoderConfig, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    """A run folder with a randomised model checkpoint and a tokenizer, as training would leave it."""
    model = build_model(cfg, seed=seed).eval()
    randomize_weights(model, seed, vector_mean=0.0 if cfg.norm_unit_offset else 1.0)
    run = root / "run"
    save_checkpoint(run, 7, model)
    make_tokenizer_dir(run / "tokenizer")
    return run, model


def token_ids(seed: int = 1, length: int = SEQ_LEN, batch: int = 2) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def our_greedy(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding with our KV cache: one prefill, then one token at a time."""
    cache = model.new_cache(prompt.shape[0], prompt.shape[1] + new_tokens)
    logits = model.logits(model(prompt, cache=cache))
    out = []
    for _ in range(new_tokens):
        token = logits[:, -1].argmax(-1, keepdim=True)
        out.append(token)
        logits = model.logits(model(token, cache=cache))
    return torch.cat(out, dim=1)


@torch.no_grad()
def hf_greedy(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    config = transformers.GenerationConfig(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=0,
                                           eos_token_id=None, pad_token_id=0)
    # transformers 5 merges the model's own generation_config.json (an export writes eos there) into
    # the one given, which would stop at eos where our greedy run goes on: no eos on either side.
    model.generation_config.eos_token_id = None
    out = model.generate(prompt, generation_config=config, attention_mask=torch.ones_like(prompt))
    return out[:, prompt.shape[1]:]


@torch.no_grad()
def compare(ours, theirs, label: str) -> None:
    """Full-sequence logits within 1e-4 and identical greedy continuations past the window."""
    ids = token_ids()
    expected = theirs(ids).logits
    actual = ours.logits(ours(ids))
    diff = (actual - expected).abs().max().item()
    print(f"\n{label}: max |logit| {expected.abs().max().item():.2f}, max abs diff {diff:.3g}")
    assert diff <= TOLERANCE_FP32, f"{label}: logits differ by {diff}"
    # Cached prefill + decoding must give the same logits as one uncached pass.
    cache = ours.new_cache(2, SEQ_LEN)
    steps = [ours.logits(ours(ids[:, :13], cache=cache)),
             *(ours.logits(ours(ids[:, t:t + 1], cache=cache)) for t in range(13, SEQ_LEN))]
    stepped = torch.cat(steps, dim=1)
    assert (stepped - expected).abs().max().item() <= TOLERANCE_FP32
    prompt = token_ids(seed=2, length=12, batch=1)
    assert torch.equal(our_greedy(ours, prompt, 30), hf_greedy(theirs, prompt, 30)), f"{label}: greedy tokens differ"


@contextmanager
def captured_transformers_warnings():
    """Warnings logged by transformers (where its load report goes) and Python warnings, as strings."""
    messages: list[str] = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
        messages.extend(str(w.message) for w in caught)
    finally:
        logger.removeHandler(handler)


def load_exported(out: Path):
    """AutoModelForCausalLM.from_pretrained(out), asserting a clean load report."""
    with captured_transformers_warnings() as messages:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    flags = ("missing", "unexpected", "not initialized", "not used", "mismatch")
    weight_warnings = [m for m in messages if any(flag in m.lower() for flag in flags)]
    assert not weight_warnings, weight_warnings
    return model.eval(), messages


# ---------------------------------------------------------------- import: transformers -> slmforge


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_import_matches_transformers(tmp_path, case):
    torch.manual_seed(0)
    theirs = HF_CASES[case]().eval()
    randomize(theirs)
    theirs.save_pretrained(tmp_path / "hf")
    make_tokenizer_dir(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "run")
    ours, _, meta = load_model(tmp_path / "run")
    assert meta["imported_from"]["architecture"] == type(theirs).__name__
    compare(ours.eval(), theirs, f"import {case}")


# ---------------------------------------------------------------- export: slmforge -> transformers


@pytest.mark.parametrize("case", sorted(OUR_CASES))
def test_export_loads_cleanly_and_matches(tmp_path, case):
    run, ours = make_run(tmp_path, OUR_CASES[case])
    out = export_hf(run, tmp_path / "hf")
    theirs, _ = load_exported(out)
    expected_class = {"gemma3": "Gemma3ForCausalLM", "llama": "LlamaForCausalLM"}[OUR_CASES[case].family]
    assert type(theirs).__name__ == expected_class
    compare(ours, theirs, f"export {case}")
    # And back again: the exported folder imports to the same config and weights.
    import_hf(out, tmp_path / "again")
    again, _, _ = load_model(tmp_path / "again")
    assert again.cfg == dataclasses.replace(ours.cfg, preset=None)
    for (name, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_export_bfloat16_weights(tmp_path):
    run, ours = make_run(tmp_path, OUR_CASES["gemma3"])
    out = export_hf(run, tmp_path / "hf", dtype="bfloat16")
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    theirs, _ = load_exported(out)
    assert theirs.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(theirs.model.embed_tokens.weight, ours.embed.weight.to(torch.bfloat16))


def test_load_report_capture_sees_a_missing_weight(tmp_path):
    """Negative control for `load_exported`: a dropped tensor must show up in what we capture."""
    from safetensors.torch import load_file, save_file

    run, _ = make_run(tmp_path, OUR_CASES["llama-tied"])
    out = export_hf(run, tmp_path / "hf")
    tensors = load_file(out / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(AssertionError, match="model.norm.weight"):
        load_exported(out)


def test_window_and_rope_base_are_visible_to_the_parity_check(tmp_path):
    """Negative control: an off-by-one window or swapped RoPE bases would fail the 1e-4 comparison."""
    torch.manual_seed(0)
    theirs = hf_gemma3().eval()
    randomize(theirs)
    theirs.save_pretrained(tmp_path / "hf")
    make_tokenizer_dir(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "run")
    ours, _, _ = load_model(tmp_path / "run")
    ids = token_ids()
    with torch.no_grad():
        expected = theirs(ids).logits
        for change in (dict(sliding_window=WINDOW + 1), dict(sliding_window=WINDOW - 1),
                       dict(rope_theta=ours.cfg.rope_local_theta, rope_local_theta=ours.cfg.rope_theta)):
            cfg = DecoderConfig(**{**ours.cfg.__dict__, **change})
            wrong = build_model(cfg, seed=None)
            wrong.load_state_dict(ours.state_dict())
            assert (wrong.logits(wrong(ids)) - expected).abs().max().item() > 100 * TOLERANCE_FP32, change


def test_layer_types_are_visible_to_the_parity_check(tmp_path):
    """Negative control for the irregular case: reading it as any "every n-th layer global" pattern,
    or with one layer's kind flipped, would fail the 1e-4 comparison."""
    torch.manual_seed(0)
    theirs = HF_CASES["gemma3-irregular-layer-types"]().eval()
    randomize(theirs)
    theirs.save_pretrained(tmp_path / "hf")
    make_tokenizer_dir(tmp_path / "hf")
    ours, _, _ = load_model(import_hf(tmp_path / "hf", tmp_path / "run"))
    ids = token_ids()
    kinds = ours.cfg.layer_types
    flipped = [["full_attention" if k == "sliding_attention" else "sliding_attention" for k in kinds][:1] + kinds[1:],
               kinds[:3] + ["full_attention"]]
    with torch.no_grad():
        expected = theirs(ids).logits
        for change in [dict(layer_types=None, global_every=n) for n in (2, 3, 4, 5)] + [
                dict(layer_types=k) for k in flipped]:
            wrong = build_model(dataclasses.replace(ours.cfg, **change), seed=None)
            wrong.load_state_dict(ours.state_dict())
            assert (wrong.logits(wrong(ids)) - expected).abs().max().item() > 100 * TOLERANCE_FP32, change


def test_long_context_parity_with_270m_head_shape(tmp_path):
    """2048 positions with Gemma 3 270M's head_dim 256 and window 512: small RoPE-table differences
    (a float64 table instead of transformers' float32 one moved logits by 5e-4 here) show up."""
    torch.manual_seed(0)
    theirs = hf_gemma3(num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=256,
                       query_pre_attn_scalar=256, sliding_window=512, max_position_embeddings=2048).eval()
    randomize(theirs)
    theirs.save_pretrained(tmp_path / "hf")
    make_tokenizer_dir(tmp_path / "hf")
    ours, _, _ = load_model(import_hf(tmp_path / "hf", tmp_path / "run"))
    ids = token_ids(length=2048, batch=1)
    with torch.no_grad():
        diff = (ours.logits(ours(ids)) - theirs(ids).logits).abs().max().item()
    print(f"\nimport gemma3 head_dim 256, 2048 tokens: max abs diff {diff:.3g}")
    assert diff <= TOLERANCE_FP32


# ---------------------------------------------------------------- tokenizer


def test_exported_tokenizer_encodes_like_ours(tmp_path):
    from tokenizers import Tokenizer

    run, _ = make_run(tmp_path, OUR_CASES["llama-tied"])
    out = export_hf(run, tmp_path / "hf")
    ours = Tokenizer.from_file(str(run / "tokenizer" / "tokenizer.json"))
    with captured_transformers_warnings():
        theirs = transformers.AutoTokenizer.from_pretrained(out)
    for text in ("the quick brown fox", "नमस्ते दुनिया 123", "  spaces\tand\nnewlines  ", ""):
        assert theirs(text).input_ids == ours.encode(text).ids, text
        assert theirs.decode(ours.encode(text).ids, skip_special_tokens=True) == ours.decode(ours.encode(text).ids)
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (2, 1, 0)
    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (2, 1, 0)
    assert generation == {"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}
    assert theirs.model_max_length == OUR_CASES["llama-tied"].max_seq_len


# ---------------------------------------------------------------- bf16 (GPU when available)

CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                         reason="needs a CUDA device")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("case", ["gemma3", "llama-gqa-untied-llama3-rope"])
def test_bf16_parity(tmp_path, case, device):
    """bf16 weights as users run them: transformers via from_pretrained(dtype=bfloat16), ours via .to().

    Kernels may round differently from transformers', so the bar is looser than in float32: our bf16 error
    against the float32 reference may not exceed transformers' own bf16 error by much, nor may top-1
    agreement with it drop. On CPU both run the same kernels, so the two bf16 models must also be close.
    """
    torch.manual_seed(0)
    reference = HF_CASES[case]().eval()
    randomize(reference)
    reference.save_pretrained(tmp_path / "hf")
    make_tokenizer_dir(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "run")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16).to(device).eval()
    ours, _, _ = load_model(tmp_path / "run", device=device)
    ours = ours.to(torch.bfloat16).eval()
    ids = token_ids(length=100).to(device)
    with torch.no_grad():
        exact = reference.to(device)(ids).logits
        expected = theirs(ids).logits.float()
        actual = ours.logits(ours(ids)).float()
    diff = (actual - expected).abs().max().item()
    our_error = (actual - exact).abs().max().item()
    their_error = (expected - exact).abs().max().item()
    print(f"\nbf16 {device} {case}: max |logit| {exact.abs().max().item():.2f}, ours vs transformers {diff:.3g}, "
          f"vs float32: ours {our_error:.3g}, transformers {their_error:.3g}")
    assert our_error <= 1.5 * their_error + 0.02
    agreement = lambda logits: (logits.argmax(-1) == exact.argmax(-1)).float().mean().item()  # noqa: E731
    assert agreement(actual) >= agreement(expected) - 0.05
    if device == "cpu":
        assert diff <= 0.05  # ~1 bf16 ulp at these magnitudes; float32 RoPE tables in bf16 keep this at 0 here
