"""Masked LM: masking statistics and rules, whole words, learning a source to its entropy, exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import crash_at_step, untimed
from slmforge import config
from slmforge.data.loader import WindowLoader
from slmforge.data.shards import ShardSet
from slmforge.errors import SlmforgeError
from slmforge.objectives.base import EVAL_SEED
from slmforge.objectives.mlm import MaskedLM, MlmConfig, word_start_table
from slmforge.train.config import PretrainConfig
from slmforge.train.metrics import read_metrics
from slmforge.train.pretrain import pretrain

SPECIAL = {0, 1, 2, 3, 4}
MASK = 4


def objective(**fields) -> MaskedLM:
    return MaskedLM(MlmConfig(**fields), mask_id=MASK, vocab_size=1000, special_ids=SPECIAL)


def test_masking_rates_match_the_config_within_sampling_error():
    mlm = objective(mask_rate=0.3, mask_token_share=0.8, random_token_share=0.1)
    chosen = masked = randomised = total = 0
    for step in range(200):
        tokens = torch.randint(5, 1000, (8, 64))
        batch = mlm.collate({"tokens": tokens, "sample_ids": torch.arange(8) + 8 * step}, 0)
        picked = batch["targets"] != -100
        assert torch.equal(batch["targets"][picked], tokens[picked])
        chosen += int(picked.sum())
        masked += int((batch["input_ids"] == MASK).sum())
        randomised += int((picked & (batch["input_ids"] != MASK) & (batch["input_ids"] != tokens)).sum())
        total += tokens.numel()
        assert torch.equal(batch["input_ids"][~picked], tokens[~picked])  # unchosen tokens are untouched

    def within(count, n, p):  # 5 standard deviations of a binomial
        return abs(count - n * p) < 5 * (n * p * (1 - p)) ** 0.5

    assert within(chosen, total, 0.3), chosen / total
    assert within(masked, chosen, 0.8), masked / chosen
    assert within(randomised, chosen, 0.1 * (1 - 1 / 995)), randomised / chosen


def test_special_and_padding_tokens_are_never_chosen_or_used_as_replacements():
    mlm = objective(mask_rate=0.9, mask_token_share=0.0, random_token_share=1.0)
    tokens = torch.randint(5, 1000, (16, 48))
    tokens[:, 0], tokens[:, -1], tokens[:, 30:40] = 2, 3, 0  # [CLS] ... [SEP] and a run of padding
    batch = mlm.collate({"tokens": tokens, "scored": tokens != 7}, 1)
    special = (tokens <= 4) | (tokens == 7)
    assert (batch["targets"][special] == -100).all()
    assert torch.equal(batch["input_ids"][special], tokens[special])
    assert not torch.isin(batch["input_ids"][~special], torch.tensor(sorted(SPECIAL))).any()


def test_shares_that_sum_to_one_are_accepted_despite_float_rounding():
    from slmforge import config as config_io

    cfg = config_io.from_dict(MlmConfig, {"mask_token_share": 0.8, "random_token_share": 0.2}, "objective")
    assert cfg.random_token_share == 0.2
    with pytest.raises(SlmforgeError, match="random_token_share"):
        config_io.from_dict(MlmConfig, {"mask_token_share": 0.8, "random_token_share": 0.3}, "objective")


def test_masks_depend_on_the_seed_and_the_sample_only():
    """Not on the step, the rank, the batch a sample lands in, or its row: so 1 and N processes, any
    micro-batch split and a resumed run all mask a window the same way."""
    mlm = objective()
    tokens = torch.randint(5, 1000, (4, 32))
    ids = torch.tensor([10, 11, 12, 13])
    first = mlm.collate({"tokens": tokens, "sample_ids": ids}, 7)["input_ids"]
    assert torch.equal(first, mlm.collate({"tokens": tokens, "sample_ids": ids}, 7)["input_ids"])
    reordered = mlm.collate({"tokens": tokens[[2, 0]], "sample_ids": ids[[2, 0]]}, 7)["input_ids"]
    assert torch.equal(reordered, first[[2, 0]])
    assert not torch.equal(mlm.collate({"tokens": tokens, "sample_ids": ids}, 8)["input_ids"], first)
    assert not torch.equal(mlm.collate({"tokens": tokens, "sample_ids": ids + 4}, 7)["input_ids"], first)


def test_whole_word_masking_keeps_words_and_their_matras_together(tmp_path):
    from conftest import word_level_tokenizer

    # SentencePiece-style pieces: "▁" begins a word; "ि" and "्य" begin with combining marks and so
    # continue the word before them even though they carry a "▁"-less or "▁" spelling.
    pieces = ["▁क", "ि", "त", "ा", "ब", "▁घ", "र", "▁\u094dय", "▁म", "ैं"]
    tokenizer = word_level_tokenizer(tmp_path / "tok", pieces)
    starts = word_start_table(tokenizer)
    ids = {p: tokenizer.token_to_id(p) for p in pieces}
    assert starts[ids["▁क"]] and starts[ids["▁घ"]] and starts[ids["▁म"]]
    assert not starts[ids["ि"]] and not starts[ids["ैं"]] and not starts[ids["▁\u094dय"]]  # marks never start
    mlm = MaskedLM.for_tokenizer(MlmConfig(whole_word=True, mask_rate=0.4, mask_token_share=1.0,
                                           random_token_share=0.0), tokenizer)
    # किताब घर्य मैं: three words of 5, 3 and 2 pieces, repeated, between [CLS] and [SEP]
    word_ids = [[ids[p] for p in w] for w in (["▁क", "ि", "त", "ा", "ब"], ["▁घ", "र", "▁\u094dय"], ["▁म", "ैं"])]
    row = [tokenizer.bos_id] + [i for _ in range(6) for w in word_ids for i in w] + [tokenizer.eos_id]
    tokens = torch.tensor([row] * 64)
    chosen_words = total_words = 0
    for step in range(20):
        picked = mlm.collate({"tokens": tokens, "sample_ids": torch.arange(64) + 64 * step}, 0)["targets"] != -100
        for b in range(tokens.shape[0]):
            position = 1
            for _ in range(6):
                for word in word_ids:
                    group = picked[b, position:position + len(word)]
                    assert group.all() or not group.any(), (step, b, position)
                    chosen_words += int(group.all())
                    total_words += 1
                    position += len(word)
            assert not picked[b, 0] and not picked[b, -1]
    assert abs(chosen_words / total_words - 0.4) < 0.03


def test_mlm_needs_a_mask_token_and_an_encoder(mlm_markov_shards, markov_shards, tmp_path):
    _, data = mlm_markov_shards
    clm = config.load(PretrainConfig, overrides=["model.preset=bert-tiny", f"train.data={data}", "train.seq_len=64",
                                                 f"train.out_dir={tmp_path / 'a'}", "objective.kind=clm"])
    with pytest.raises(SlmforgeError, match=r"objective.kind: 'clm' cannot train model family 'bert' \(an encoder\)"):
        pretrain(clm)
    with pytest.raises(SlmforgeError, match=r"'mlm' cannot train model family 'llama' \(a decoder\)"):
        pretrain(mlm_config(data, tmp_path / "b", "model.preset=test-tiny", "objective.kind=mlm"))
    _, no_tokenizer = markov_shards
    with pytest.raises(SlmforgeError, match="needs the tokenizer's mask token"):
        pretrain(mlm_config(no_tokenizer, tmp_path / "c"))


def mlm_config(data, out, *extra) -> PretrainConfig:
    return config.load(PretrainConfig, overrides=[
        "model.preset=bert-tiny", "model.hidden_size=64", "model.num_layers=2", "model.intermediate_size=128",
        f"train.data={data}", "train.seq_len=64", "train.batch_size=16", "optim.lr=3e-3",
        "optim.weight_decay=0.0", "schedule.warmup_steps=20", f"train.out_dir={out}", "train.log_every=10",
        "train.device=cpu", "objective.mask_rate=0.15", "objective.mask_token_share=1.0",
        "objective.random_token_share=0.0", *extra])


def bayes_optimal_mlm_loss(source, raw_batches, mlm: MaskedLM, offset: int = 5) -> float:
    """The lowest possible masked-token loss on exactly the masks evaluation draws: the posterior of each
    masked token given every visible one, by forward-backward over the chain (masked = unobserved)."""
    transition, prior = source.transition, source.stationary
    total, count = 0.0, 0
    for raw in raw_batches:
        batch = mlm.collate(raw, EVAL_SEED)
        for inputs, targets in zip(batch["input_ids"].numpy(), batch["targets"].numpy()):
            hidden = targets != -100
            evidence = np.ones((len(inputs), source.vocab))
            for t in np.nonzero(~hidden)[0]:
                evidence[t] = 0.0
                evidence[t, inputs[t] - offset] = 1.0
            alpha = np.empty_like(evidence)
            alpha[0] = prior * evidence[0]
            alpha[0] /= alpha[0].sum()
            for t in range(1, len(inputs)):
                alpha[t] = (alpha[t - 1] @ transition) * evidence[t]
                alpha[t] /= alpha[t].sum()
            beta = np.ones_like(evidence)
            for t in range(len(inputs) - 2, -1, -1):
                beta[t] = transition @ (evidence[t + 1] * beta[t + 1])
                beta[t] /= beta[t].sum()
            posterior = alpha * beta
            posterior /= posterior.sum(axis=1, keepdims=True)
            for t in np.nonzero(hidden)[0]:
                total -= np.log(posterior[t, targets[t] - offset])
                count += 1
    return total / count


def test_encoder_learns_a_markov_chain_down_to_the_bayes_optimal_masked_loss(mlm_markov_shards, tmp_path):
    """ModernBERT's layout (seed 004's student). BERT's learned absolute positions need far more steps on
    this task to find the neighbours (its forward pass is checked against transformers instead)."""
    from slmforge.tokenizer import load_tokenizer

    source, data = mlm_markov_shards
    run = tmp_path / "run"
    pretrain(mlm_config(data, run, "model.preset=modernbert-tiny", "train.max_steps=600", "train.eval_every=0",
                        "train.eval_batches=8", "optim.lr=5e-3", "objective.mask_rate=0.3"))
    final = [r for r in read_metrics(run / "metrics.jsonl") if r["split"] == "val"][-1]
    mlm = MaskedLM.for_tokenizer(MlmConfig(mask_rate=0.3, mask_token_share=1.0, random_token_share=0.0),
                                 load_tokenizer(run / "tokenizer"))
    loader = WindowLoader(ShardSet(data, "val"), 64, 16, shuffle=False, training=False, window=64)
    optimal = bayes_optimal_mlm_loss(source, loader.epoch_batches(8), mlm)
    # Seeing both neighbours beats the chain's entropy rate (left context only): the bound is real.
    assert optimal < 0.9 * source.entropy_rate
    assert final["loss"] < 1.08 * optimal, (final["loss"], optimal)
    assert "bpb" not in final and 0 < final["accuracy"] < 1


def test_mlm_resume_after_a_crash_is_bitwise_equal(mlm_markov_shards, tmp_path, monkeypatch):
    _, data = mlm_markov_shards
    common = ("train.max_steps=30", "train.save_every=10", "train.eval_every=10", "model.dropout=0.1",
              "objective.mask_token_share=0.8", "objective.random_token_share=0.1", "train.grad_accum=2")
    pretrain(mlm_config(data, tmp_path / "straight", *common))
    with crash_at_step(monkeypatch, 17):
        pretrain(mlm_config(data, tmp_path / "resumed", *common))
    pretrain(mlm_config(data, tmp_path / "resumed", *common))
    a = load_file(tmp_path / "straight" / "checkpoints" / "step-000030" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "checkpoints" / "step-000030" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert untimed(tmp_path / "straight") == untimed(tmp_path / "resumed")


def test_a_tokenizer_without_a_mask_token_is_one_line_naming_the_fix(tmp_path):
    from tokenizers import Tokenizer as Backend
    from tokenizers import models

    from slmforge.tokenizer import Tokenizer

    backend = Backend(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "a": 2}, unk_token="[UNK]"))
    tokenizer = Tokenizer(backend, roles={"pad": "[PAD]", "unk": "[UNK]"})
    with pytest.raises(SlmforgeError, match=r"data/manifest.json: the tokenizer has no mask token; train one with "
                                            r"tokenizer.mask"):
        MaskedLM.for_tokenizer(MlmConfig(), tokenizer, where="data/manifest.json")
