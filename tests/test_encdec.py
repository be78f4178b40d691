"""Encoder-decoders: cached decoding, beam search, Hugging Face T5 parity both ways, span-corruption
pretraining through `slmforge pretrain` (loss falls, resume is bitwise exact)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from conftest import assert_same_run, crash_at_step, launch
from slmforge import config
from slmforge.checkpoint.reading import checkpoint_tensors
from slmforge.errors import SlmforgeError
from slmforge.inference.seq2seq import Seq2SeqConfig, generate_seq2seq
from slmforge.models import EncDecConfig, build_model
from slmforge.train.config import PretrainConfig
from slmforge.train.metrics import read_metrics
from slmforge.train.pretrain import pretrain

TOLERANCE_FP32 = 1e-4
VOCAB = 64
EOS = 1  # T5's ids: pad 0 (also the decoder start), eos 1


def tiny(family: str, **changes) -> EncDecConfig:
    return EncDecConfig.from_name(f"{'t5' if family == 't5' else 'encdec'}-tiny", vocab_size=VOCAB, **changes)


def sources(batch: int = 3, length: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Source ids (never pad or eos) and a mask whose second row is right-padded."""
    ids = torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, length - 7:] = 0
    return ids, mask


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights large enough that every detail (norms, bias buckets, gating) moves the logits."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        if param.ndim == 1:
            param.copy_(1.0 + 0.3 * noise)
        else:
            param.copy_(noise / param.shape[-1] ** 0.5)


# ---------------------------------------------------------------- the model on its own


@pytest.mark.parametrize("family", ["t5", "encdec"])
def test_cached_decoding_equals_uncached(family):
    model = build_model(tiny(family, num_decoder_layers=3), seed=1).eval()
    ids, mask = sources()
    targets = torch.randint(2, VOCAB, (3, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids, mask, decoder_input_ids=targets)
        encoded = model.encode(ids, mask)
        cache = model.new_cache(3, 20)
        pieces = [model.decode(targets[:, :7], encoded, mask, cache=cache)]  # a prefix, then one token at a time
        pieces += [model.decode(targets[:, t:t + 1], encoded, mask, cache=cache) for t in range(7, 20)]
    assert (torch.cat(pieces, dim=1) - full).abs().max() < 1e-5
    for beams in (1, 3):
        cfg = Seq2SeqConfig(max_new_tokens=40, num_beams=beams)
        cached = generate_seq2seq(model, ids, cfg, eos_id=EOS, attention_mask=mask)
        uncached = generate_seq2seq(model, ids, cfg, eos_id=EOS, attention_mask=mask, use_cache=False)
        assert torch.equal(cached, uncached), beams


@pytest.mark.parametrize("family", ["t5", "encdec"])
def test_beam_search_with_one_beam_is_greedy(family):
    model = build_model(tiny(family), seed=3).eval()
    randomize(model, 3)
    with torch.no_grad():
        (model.lm_head.weight if model.lm_head is not None else model.embed.weight)[EOS] *= 3  # eos is reachable
    ids, mask = sources(4)
    greedy = generate_seq2seq(model, ids, Seq2SeqConfig(max_new_tokens=30), eos_id=EOS, attention_mask=mask)
    one = generate_seq2seq(model, ids, Seq2SeqConfig(max_new_tokens=30, num_beams=1), eos_id=EOS,
                           attention_mask=mask)
    assert torch.equal(greedy, one)
    assert (greedy == EOS).any() and not (greedy == EOS).all()  # rows ended, at different steps
    wide = generate_seq2seq(model, ids, Seq2SeqConfig(max_new_tokens=30, num_beams=5), eos_id=EOS,
                            attention_mask=mask)
    assert not torch.equal(wide[:, :greedy.shape[1]], greedy)  # the search does something


def test_generate_ids_dispatches_encoder_decoders_with_sampling():
    """`slmforge generate` goes through generate.generate_ids: source in, source + target out."""
    from slmforge.inference.generate import SamplingConfig, generate_ids

    model = build_model(tiny("t5"), seed=4).eval()
    randomize(model, 4)
    ids, _ = sources(2)
    greedy = generate_ids(model, ids, SamplingConfig(max_new_tokens=12, temperature=0), eos_id=EOS)
    assert torch.equal(greedy[:, :ids.shape[1]], ids)
    assert torch.equal(greedy[:, ids.shape[1]:], generate_seq2seq(model, ids, Seq2SeqConfig(max_new_tokens=12),
                                                                  eos_id=EOS))
    sampled = [generate_ids(model, ids, SamplingConfig(max_new_tokens=12, temperature=1.0, top_k=20, seed=s),
                            eos_id=EOS) for s in (1, 1, 2)]
    assert torch.equal(sampled[0], sampled[1]) and not torch.equal(sampled[0], sampled[2])
    with pytest.raises(SlmforgeError, match="goes through slmforge.inference.generate.generate_ids"):
        generate_seq2seq(model, ids, Seq2SeqConfig(temperature=0.7))


def test_layers_lists_every_block_once_for_sharding_and_checkpointing():
    from slmforge.train.parallel import checkpoint_blocks

    cfg = tiny("t5", num_decoder_layers=3)
    model = build_model(cfg, seed=0)
    assert model.layers == [*model.encoder.layers, *model.decoder.layers] and len(model.layers) == 5
    names = list(model.state_dict())
    assert len(names) == len(set(names)) and all(n.startswith(("embed.", "encoder.", "decoder.", "lm_head."))
                                                 for n in names)
    ids, mask = sources()
    targets = torch.randint(2, VOCAB, (3, 10))

    def gradients(m):
        m.zero_grad()
        m.logits(m(ids, mask, decoder_input_ids=m.shift_right(targets))).logsumexp(-1).sum().backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    plain = gradients(model)
    checkpoint_blocks(model)  # what train.parallel.activation_checkpointing does to `model.layers`
    recomputed = gradients(model)
    for name, grad in plain.items():
        assert torch.allclose(grad, recomputed[name], atol=1e-6), name


# ---------------------------------------------------------------- Hugging Face T5 parity

transformers = pytest.importorskip("transformers", reason="transformers is an optional extra (pip install 'slmforge[hf]')")


@pytest.mark.parametrize("preset", ["t5-small", "t5-base"])
def test_t5_presets_have_the_shapes_of_t5_v1_1(preset):
    """Parameter counts equal transformers' T5 v1.1 with the same config.json fields (built on meta)."""
    from slmforge.models.hf.t5 import config_to_hf
    from slmforge.models.registry import count_parameters

    cfg = EncDecConfig.from_name(preset)
    fields = {k: v for k, v in config_to_hf(cfg).items() if k not in ("architectures", "model_type", "torch_dtype",
                                                                       "dtype", "bos_token_id", "n_positions")}
    with torch.device("meta"):
        theirs = transformers.T5ForConditionalGeneration(transformers.T5Config(**fields))
    count = sum(p.numel() for p in theirs.parameters())  # shared tensors once; 5.x ties lm_head in memory
    if theirs.lm_head.weight is theirs.shared.weight:
        count += theirs.lm_head.weight.numel()
    assert count_parameters(cfg) == count == {"t5-small": 76_961_152, "t5-base": 247_577_856}[preset]


def t5_tokenizer(folder, sentinels: int = 4):
    """A word-level tokenizer in T5's order: <pad> 0, </s> 1, <unk> 2, sentinels, then words."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    from slmforge.tokenizer import Tokenizer

    specials = {"pad": "<pad>", "eos": "</s>", "unk": "<unk>"}
    extra = [f"<extra_id_{i}>" for i in range(sentinels)]
    words = [f"w{i}" for i in range(VOCAB - len(specials) - sentinels)]
    vocab = {t: i for i, t in enumerate([*specials.values(), *extra, *words])}
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens([*specials.values(), *extra])
    tokenizer = Tokenizer(backend, roles=specials, sentinels=extra, meta={"kind": "wordlevel"})
    tokenizer.save(folder)
    return tokenizer


def hf_t5(tied: bool, decoder_layers: int = 3):
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=decoder_layers,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
        feed_forward_proj="gated-gelu", tie_word_embeddings=tied, dropout_rate=0.0, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=EOS)
    return transformers.T5ForConditionalGeneration(config)


@torch.no_grad()
def max_diff(ours, theirs) -> float:
    """Largest |logit| difference over a padded batch (real source tokens; every target position),
    and again through our cache one token at a time."""
    ids, mask = sources(2, 40)  # 40 > relative_max_distance: the log buckets and the last one are used
    targets = torch.randint(2, VOCAB, (2, 25), generator=torch.Generator().manual_seed(5))
    decoder_ids = ours.shift_right(targets)
    expected = theirs(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    actual = ours.logits(ours(ids, mask, decoder_input_ids=decoder_ids))
    encoded, cache = ours.encode(ids, mask), ours.new_cache(2, 25)
    stepped = torch.cat([ours.logits(ours.decode(decoder_ids[:, t:t + 1], encoded, mask, cache=cache))
                         for t in range(25)], dim=1)
    return max((actual - expected).abs().max().item(), (stepped - expected).abs().max().item())


@pytest.mark.parametrize("tied", [False, True], ids=["v1.1-unscaled", "v1.0-tied-scaled"])
def test_import_matches_transformers(tmp_path, tied):
    from slmforge.checkpoint.reading import load_model
    from slmforge.interop import import_hf

    torch.manual_seed(0)
    theirs = hf_t5(tied).eval()
    randomize(theirs)
    theirs.save_pretrained(tmp_path / "hf")
    t5_tokenizer(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "run")
    ours, _, meta = load_model(tmp_path / "run")
    assert meta["imported_from"]["architecture"] == "T5ForConditionalGeneration"
    assert ours.cfg.family == "t5" and ours.cfg.num_decoder_layers == 3 and ours.cfg.activation == "gelu_tanh"
    assert ours.cfg.output_scale == (32 ** -0.5 if tied else None)
    diff = max_diff(ours.eval(), theirs)
    print(f"\nimport t5 ({'tied' if tied else 'untied'}): max abs diff {diff:.3g}")
    assert diff <= TOLERANCE_FP32
    # Negative control: buckets off by one distance, or the scaling switched, break the comparison.
    for change in (dict(relative_max_distance=21), dict(tie_embeddings=not tied)):
        wrong = build_model(dataclasses.replace(ours.cfg, **change), seed=None)
        wrong.load_state_dict(ours.state_dict(), strict=False)
        if wrong.lm_head is not None and ours.lm_head is None:
            with torch.no_grad():
                wrong.lm_head.weight.copy_(ours.embed.weight)
        assert max_diff(wrong.eval(), theirs) > 100 * TOLERANCE_FP32, change


def make_t5_run(tmp_path, seed: int = 0):
    from slmforge.checkpoint.writing import save_checkpoint

    model = build_model(tiny("t5", num_decoder_layers=2, max_seq_len=64), seed=seed).eval()
    randomize(model, seed)
    with torch.no_grad():
        model.lm_head.weight[EOS] *= 2.5  # generations end at different steps
    run = tmp_path / "run"
    save_checkpoint(run, 1, model)
    t5_tokenizer(run / "tokenizer")
    return run, model


def test_export_loads_cleanly_matches_and_generates_the_same_tokens(tmp_path):
    from slmforge.checkpoint.reading import load_model
    from slmforge.interop import export_hf, import_hf

    run, ours = make_t5_run(tmp_path)
    out = export_hf(run, tmp_path / "hf")
    assert json.loads((out / "generation_config.json").read_text())["decoder_start_token_id"] == 0
    theirs, info = transformers.T5ForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    theirs.eval()
    assert theirs.lm_head.weight is not theirs.shared.weight  # v1.1: untied, as exported
    diff = max_diff(ours, theirs)
    print(f"\nexport t5: max abs diff {diff:.3g}")
    assert diff <= TOLERANCE_FP32
    # Greedy and beam search: the same tokens as transformers' generate on the exported folder.
    ids, mask = sources(3, 24)
    ended = 0
    for beams, penalty in ((1, 1.0), (4, 1.0), (4, 0.6)):
        with torch.no_grad():
            expected = theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=30, num_beams=beams,
                                       length_penalty=penalty, early_stopping=True, do_sample=False)[:, 1:]
        actual = generate_seq2seq(ours, ids, Seq2SeqConfig(max_new_tokens=30, num_beams=beams, length_penalty=penalty),
                                  eos_id=EOS, attention_mask=mask)
        for row in range(3):
            a, e = actual[row].tolist(), expected[row].tolist()
            a, e = a[:a.index(EOS) + 1] if EOS in a else a, e[:e.index(EOS) + 1] if EOS in e else e
            assert a == e, (beams, penalty, row)
            ended += EOS in a
    assert ended >= 3  # finished hypotheses were compared, not only running ones
    # The tokenizer: sentinels survive, and a source ends with eos as span corruption made them.
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.convert_tokens_to_ids("<extra_id_3>") == 6 and "<extra_id_0>" in tokenizer.all_special_tokens
    assert tokenizer("w1 w2").input_ids == [7 + 1, 7 + 2, EOS]
    # And back: the same config and bit-identical weights.
    import_hf(out, tmp_path / "again")
    again, _, _ = load_model(tmp_path / "again")
    assert again.cfg == dataclasses.replace(ours.cfg, preset=None)
    for name, tensor in ours.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


def test_the_modern_layout_does_not_export(tmp_path):
    from slmforge.checkpoint.writing import save_checkpoint
    from slmforge.interop import export_hf

    run = tmp_path / "run"
    save_checkpoint(run, 1, build_model(tiny("encdec"), seed=0))
    t5_tokenizer(run / "tokenizer")
    with pytest.raises(SlmforgeError, match=r"'encdec' \(RoPE, grouped-query attention\) has no Hugging Face class"):
        export_hf(run, tmp_path / "hf")


# ---------------------------------------------------------------- span-corruption pretraining


@pytest.fixture
def span_shards(tmp_path):
    """A Markov chain as words of a tokenizer with the BERT-style specials (0-4) and 8 sentinels (5-12)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    from conftest import SPECIALS, MarkovSource, write_shards
    from slmforge.fileio import write_json_atomic
    from slmforge.tokenizer import Tokenizer

    extra = [f"<extra_id_{i}>" for i in range(8)]
    vocab = {t: i for i, t in enumerate([*SPECIALS.values(), *extra, *(f"s{i}" for i in range(16))])}
    backend = Backend(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens([*SPECIALS.values(), *extra])
    tokenizer = Tokenizer(backend, roles=dict(SPECIALS), sentinels=extra, meta={"kind": "wordlevel"})
    tokenizer.save(tmp_path / "tokenizer")
    source = MarkovSource(vocab=16, seed=0)
    folder = write_shards(tmp_path / "data", {"train": [source.sample(30_000, seed=1) + 13],
                                              "val": [source.sample(4_000, seed=2) + 13]}, vocab_size=len(vocab))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["tokenizer"] = {"path": str(tmp_path / "tokenizer"), "sha256": tokenizer.sha256}
    manifest["pad_id"] = tokenizer.pad_id
    write_json_atomic(folder / "manifest.json", manifest)
    return folder


def span_config(data, out, *extra) -> PretrainConfig:
    return config.load(PretrainConfig, overrides=[
        "model.preset=t5-tiny", "model.hidden_size=32", "model.head_dim=8", "model.intermediate_size=64",
        f"train.data={data}", "train.seq_len=32", "train.batch_size=16", "optim.lr=3e-3", "optim.weight_decay=0.0",
        "schedule.warmup_steps=10", f"train.out_dir={out}", "train.log_every=10", "train.device=cpu",
        "train.eval_batches=4", *extra])


@pytest.mark.parametrize("preset", ["t5-tiny", "encdec-tiny"])
def test_a_tiny_encoder_decoder_pretrains_with_span_corruption(span_shards, tmp_path, preset):
    run = tmp_path / "run"
    # No [objective] section: an encoder-decoder gets span corruption.
    pretrain(span_config(span_shards, run, f"model.preset={preset}", "train.max_steps=150", "train.eval_every=0"))
    records = read_metrics(run / "metrics.jsonl")
    train = [r for r in records if r["split"] == "train"]
    final = [r for r in records if r["split"] == "val"][-1]
    saved = config.load(PretrainConfig, run / "config.toml")
    assert saved.objective.kind == "span" and saved.model.family == preset.split("-")[0]
    # A uniform guess over the 29 ids costs ln 29 = 3.37 nats; the sentinels and eos (3 of the 8 targets
    # of a 34-token window) are free to predict once learned, and the dropped tokens follow the chain
    # from their kept neighbours. Measured: t5-tiny 3.10 -> 1.68, encdec-tiny 3.22 -> 1.91.
    print(f"\n{preset}: first logged train loss {train[0]['loss']:.3f}, final validation loss {final['loss']:.3f}")
    assert final["loss"] < 0.65 * train[0]["loss"], (train[0]["loss"], final["loss"])
    assert final["loss"] < 0.6 * math.log(29)
    assert 0 < final["accuracy"] < 1 and "bpb" not in final


def test_span_corruption_trains_a_decoder_in_prefix_form(span_shards, tmp_path):
    run = tmp_path / "run"
    pretrain(span_config(span_shards, run, "model.preset=test-tiny", "objective.kind=span", "train.max_steps=150",
                         "train.eval_every=0"))
    records = read_metrics(run / "metrics.jsonl")
    first = [r for r in records if r["split"] == "train"][0]
    final = [r for r in records if r["split"] == "val"][-1]
    assert final["loss"] < 0.8 * first["loss"]


def test_span_resume_after_a_crash_is_bitwise_equal(span_shards, tmp_path, monkeypatch):
    common = ("train.max_steps=24", "train.save_every=8", "train.eval_every=8", "model.dropout=0.1",
              "train.grad_accum=2", "train.batch_size=8")
    pretrain(span_config(span_shards, tmp_path / "straight", *common))
    with crash_at_step(monkeypatch, 13):
        pretrain(span_config(span_shards, tmp_path / "resumed", *common))
    pretrain(span_config(span_shards, tmp_path / "resumed", *common))  # resumes from step 8
    assert_same_run(tmp_path / "straight", tmp_path / "resumed", 24)


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_fsdp2_with_checkpointed_blocks_trains_like_one_process(span_shards, tmp_path):
    """`model.layers` is what FSDP2 shards and activation checkpointing recomputes, block by block: two
    CPU processes with batch 4 each train the same T5 as one with batch 8."""
    def run(processes: int, out, *extra):
        return launch(processes, "model.preset=t5-tiny", "model.hidden_size=32", "model.head_dim=8",
                      "model.intermediate_size=64", f"train.data={span_shards}", f"train.out_dir={out}",
                      "train.seq_len=32", "train.max_steps=6", "train.log_every=1", "train.eval_every=0",
                      "train.eval_batches=2", "optim.lr=3e-3", "schedule.warmup_steps=2", "train.device=cpu", *extra)

    run(1, tmp_path / "one", "train.batch_size=8")
    result = run(2, tmp_path / "two", "train.batch_size=4", "parallel.strategy=fsdp",
                    "parallel.activation_checkpointing=true")
    assert "2 processes (fsdp)" in result.stderr
    one = [r for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if r["split"] == "train"]
    two = [r for r in read_metrics(tmp_path / "two" / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, 7))
    for x, y in zip(one, two):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5), (x, y)
    a = checkpoint_tensors(tmp_path / "one" / "checkpoints" / "step-000006")
    b = checkpoint_tensors(tmp_path / "two" / "checkpoints" / "step-000006")  # sharded: read whole
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4, msg=name)
