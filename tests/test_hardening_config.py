"""Hardening: non-finite and float32-overflowing config floats, resume messages that name what changed,
and token accuracy that counts only the token the model would emit."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pytest
import torch

from slmforge import config
from slmforge.distill.config import DistillRunConfig
from slmforge.errors import ConfigError, SlmforgeError
from slmforge.finetune.config import FinetuneConfig
from slmforge.objectives.losses import linear_cross_entropy
from slmforge.train.config import PretrainConfig
from slmforge.train.pretrain import pretrain


def run_config(data, out, *extra) -> PretrainConfig:
    return config.load(PretrainConfig, overrides=[
        "model.preset=test-tiny", f"train.data={data}", "train.seq_len=32", "train.batch_size=4",
        "optim.lr=3e-3", "schedule.warmup_steps=1", f"train.out_dir={out}", "train.log_every=1",
        "train.eval_every=0", "train.device=cpu", *extra])


# ---------------------------------------------------------------- item 8: finite floats


@pytest.mark.parametrize("value, message", [
    ("inf", "must be a finite number, got inf"),
    ("-inf", "must be a finite number, got -inf"),
    ("nan", "must be a finite number, got nan"),
    ("1e39", "out of range"),
    ("-1e39", "out of range"),
])
@pytest.mark.parametrize("cls, key", [
    (PretrainConfig, "optim.lr"), (PretrainConfig, "train.clip_grad"), (PretrainConfig, "train.epochs"),
    (PretrainConfig, "schedule.warmup_ratio"), (FinetuneConfig, "lora.alpha"),
    (DistillRunConfig, "distill.temperature"), (DistillRunConfig, "distill.alpha_end"),
])
def test_every_float_field_refuses_non_finite_values_in_one_line(cls, key, value, message):
    with pytest.raises(ConfigError) as err:
        config.load(cls, overrides=["model.preset=test-tiny", "train.seq_len=64", f"{key}={value}"])
    assert str(err.value).startswith(f"{key}: ") and message in str(err.value)
    assert "\n" not in str(err.value)


@dataclass
class _Section:
    ratio: float = 0.5
    maybe: float | None = None
    scales: dict[str, float] = field(default_factory=dict)
    many: list[float] = field(default_factory=list)


@pytest.mark.parametrize("data, where", [
    ({"ratio": float("inf")}, "sec.ratio"), ({"maybe": float("nan")}, "sec.maybe"),
    ({"scales": {"a": float("-inf")}}, "sec.scales.a"), ({"many": [1.0, 1e39]}, "sec.many[1]"),
    ({"ratio": 10 ** 400}, "sec.ratio"),  # a TOML integer beyond any float
])
def test_the_check_is_the_config_layers_not_a_fields(data, where):
    with pytest.raises(ConfigError, match="^" + re.escape(f"{where}: ")):
        config.from_dict(_Section, data, "sec")
    assert config.from_dict(_Section, {"ratio": 3.4e38, "many": [-1e-30]}, "sec").ratio == 3.4e38


def test_a_toml_file_with_inf_is_refused(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[model]\npreset = \"test-tiny\"\n[train]\nseq_len = 64\n[optim]\nlr = inf\n")
    with pytest.raises(ConfigError, match=r"optim\.lr: must be a finite number, got inf"):
        config.load(PretrainConfig, path)


def test_an_lr_whose_update_overflows_float32_stops_in_one_line(markov_shards, tmp_path):
    """3e38 is a float32, but AdamW's step size lr / (1 - beta1) is not: one line, not torch's traceback."""
    _, data = markov_shards
    with pytest.raises(SlmforgeError, match=r"^optim\.lr: the update of step 1 overflows float32"):
        pretrain(run_config(data, tmp_path / "run", "optim.lr=3e38", "schedule.warmup_steps=0",
                            "train.max_steps=2"))


# ---------------------------------------------------------------- item 10: a changed [model] on resume


def test_a_changed_model_on_resume_names_the_fields_and_gives_advice_that_works(markov_shards, tmp_path):
    _, data = markov_shards
    pretrain(run_config(data, tmp_path / "run", "train.max_steps=2"))
    with pytest.raises(SlmforgeError) as err:
        pretrain(run_config(data, tmp_path / "run", "train.max_steps=4", "model.num_layers=3",
                            "model.intermediate_size=96"))
    message = str(err.value)
    assert "model.intermediate_size 64 -> 96, model.num_layers 2 -> 3" in message, message
    assert "train.resume=never" not in message and "train.out_dir" in message and "\n" not in message
    # The advice works: another out_dir trains the new model.
    pretrain(run_config(data, tmp_path / "other", "train.max_steps=2", "model.num_layers=3",
                        "model.intermediate_size=96"))


# ---------------------------------------------------------------- item 12: applied schedule changes said


def test_resume_says_every_applied_schedule_change(markov_shards, tmp_path, capsys):
    _, data = markov_shards
    pretrain(run_config(data, tmp_path / "run", "train.max_steps=2"))
    capsys.readouterr()
    pretrain(run_config(data, tmp_path / "run", "train.max_steps=3", "optim.lr=1e-3", "schedule.decay=linear",
                        "schedule.min_lr_ratio=0.2", "train.clip_grad=0.5", "optim.beta1=0.8"))
    err = capsys.readouterr().err
    assert ("schedule settings changed since the checkpoint, applied: optim.lr 0.003 -> 0.001, "
            "schedule.decay cosine -> linear, schedule.min_lr_ratio 0.1 -> 0.2, train.clip_grad 1.0 -> 0.5") in err, err
    assert "optimizer settings changed since the checkpoint, applied: betas (0.9, 0.95) -> (0.8, 0.95)" in err
    # An unchanged resume says nothing of the kind.
    pretrain(run_config(data, tmp_path / "run", "train.max_steps=4", "optim.lr=1e-3", "schedule.decay=linear",
                        "schedule.min_lr_ratio=0.2", "train.clip_grad=0.5", "optim.beta1=0.8"))
    assert "settings changed" not in capsys.readouterr().err


# ---------------------------------------------------------------- item 15: accuracy without ties


def test_uniform_logits_are_correct_only_where_the_target_is_the_first_index():
    vocab, d = 50, 8
    hidden = torch.randn(3, 40, d)
    weight = torch.zeros(vocab, d)  # every logit 0: argmax picks index 0
    targets = torch.randint(1, vocab, (3, 40))
    targets[0, :5] = 0
    targets[2, -3:] = -100
    for chunk_rows in (1, 7, 1000):
        _, correct = linear_cross_entropy(hidden, weight, targets, chunk_rows=chunk_rows, with_correct=True)
        assert int(correct) == 5


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_accuracy_counts_exactly_torch_argmax_hits(softcap):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 30, 6, generator=generator)
    # Rounded weights make exact ties between vocabulary entries common.
    weight = torch.randint(-1, 2, (20, 6), generator=generator).float()
    targets = torch.randint(0, 20, (2, 30), generator=generator)
    hidden = hidden.round()
    logits = hidden @ weight.t()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    ties = (logits == logits.amax(-1, keepdim=True)).sum(-1) > 1
    assert ties.any()  # the case the fix is about is exercised
    expected = int((logits.argmax(-1) == targets).sum())
    _, correct = linear_cross_entropy(hidden, weight, targets, softcap=softcap, chunk_rows=7, with_correct=True)
    assert int(correct) == expected
