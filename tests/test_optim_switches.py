"""optim.decay_embeddings (embeddings without weight decay) and optim.lr_width_base (the hidden matrices'
lr scaled by base / width): which parameters go where, the lr each group steps with, and resume."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from conftest import assert_same_run, crash_at_step
from slmforge import config
from slmforge.errors import ConfigError
from slmforge.models import build_model
from slmforge.train.checkpointer import FULL_STATE
from slmforge.train.config import OptimConfig, PretrainConfig, ScheduleConfig
from slmforge.train.optim import build_optimizer, learning_rate, parameter_groups
from slmforge.train.pretrain import pretrain
from slmforge.train.resume_check import apply_optimizer_settings

BLOCK_MATRICES = ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                  "mlp.down_proj"]
HIDDEN = [f"layers.{i}.{m}.weight" for i in range(2) for m in BLOCK_MATRICES]  # test-tiny: 2 blocks
NORMS = [f"layers.{i}.{n}_norm.weight" for i in range(2) for n in ("attn", "mlp")] + ["norm.weight"]


def tiny_model(*overrides: str, preset: str = "test-tiny"):
    cfg = config.load(PretrainConfig, overrides=[f"model.preset={preset}", "train.seq_len=64", *overrides])
    return build_model(cfg.model, device=torch.device("cpu"), seed=0), cfg


def names(groups) -> dict[str, list[str]]:
    return {k: [name for name, _ in v] for k, v in groups.items()}


@pytest.mark.parametrize("kind", ["adamw", "muon"])
@pytest.mark.parametrize("tied", [True, False])
def test_embeddings_and_an_untied_head_leave_the_decaying_group(kind, tied):
    model, _ = tiny_model(f"model.tie_embeddings={str(tied).lower()}")
    embeddings = ["embed.weight"] if tied else ["embed.weight", "lm_head.weight"]
    before = names(parameter_groups(model, kind))
    after = names(parameter_groups(model, kind, decay_embeddings=False))
    assert [n for n in embeddings if n in before["decay"]] == embeddings  # today's grouping: they decay
    assert sorted(after["no_decay"]) == sorted(NORMS + embeddings)
    assert after["decay"] == ([] if kind == "muon" else HIDDEN)
    assert after["muon"] == before["muon"] == (HIDDEN if kind == "muon" else [])


def test_an_encoders_embeddings_leave_the_decaying_group_and_its_mlm_transform_stays():
    model, _ = tiny_model(preset="bert-tiny")
    groups = names(parameter_groups(model, "adamw", decay_embeddings=False))
    embeddings = {"embed.weight", "pos_embed.weight", "type_embed.weight"}  # the MLM head's matrix is embed
    assert embeddings <= set(groups["no_decay"])
    assert "head.dense.weight" in groups["decay"]  # a transform, not an embedding
    assert not embeddings & set(groups["decay"])


def test_lora_adapters_keep_their_group_under_both_switches():
    pytest.importorskip("peft")
    from slmforge.finetune.config import LoraConfig
    from slmforge.finetune.lora import apply_lora

    model, _ = tiny_model()
    apply_lora(model, LoraConfig(rank=4, target_modules=["q_proj", "v_proj"]))
    plain = names(parameter_groups(model, "adamw"))
    switched = names(parameter_groups(model, "adamw", decay_embeddings=False, width_scaled=True))
    assert plain["decay"] and all(".lora_" in n for n in plain["decay"])
    assert switched == plain  # adapters decay at lr, neither embeddings nor the scaled hidden matrices


def test_width_scaled_hidden_matrices_get_their_own_group():
    model, cfg = tiny_model("optim.lr_width_base=64", "optim.weight_decay=0.05")
    groups = names(parameter_groups(model, "adamw", width_scaled=True))
    assert groups["width_scaled"] == HIDDEN and groups["decay"] == ["embed.weight"] and groups["muon"] == []
    optimizer = build_optimizer(model, cfg.optim, "cpu")
    decay, no_decay, hidden = optimizer.param_groups
    assert [g["weight_decay"] for g in (decay, no_decay, hidden)] == [0.05, 0.0, 0.05]
    assert len(hidden["params"]) == len(HIDDEN) and len(build_optimizer(model, OptimConfig(), "cpu").param_groups) == 2


@pytest.mark.parametrize("base, scale", [(64, 2.0), (16, 0.5), (32, 1.0)])
def test_the_hidden_matrices_step_at_the_schedules_lr_times_base_over_width(base, scale):
    """Whatever the schedule sets as every group's lr, the hidden group steps with it x base / 32
    (test-tiny's hidden size), the others with it; the groups hold the schedule's value again after."""
    model, cfg = tiny_model(f"optim.lr_width_base={base}", "optim.lr=1e-3")
    optimizer = build_optimizer(model, cfg.optim, "cpu")
    seen = []
    optimizer.register_step_pre_hook(lambda opt, a, k: seen.append([g["lr"] for g in opt.param_groups]))
    schedule = ScheduleConfig(warmup_steps=4, decay="cosine")
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for step in (0, 2, 7, 19):
        lr = learning_rate(step, 20, cfg.optim, schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr  # as the trainer sets the schedule
        optimizer.step()
        assert seen[-1] == [lr, lr, pytest.approx(lr * scale)], step
        assert [g["lr"] for g in optimizer.param_groups] == [lr, lr, lr]


def test_adams_first_update_is_the_groups_lr():
    """Adam's first step moves each weight by ~lr (m / sqrt(v) = sign(g)): the hidden matrices by lr x 4
    (base 128 / width 32), the embedding by lr."""
    model, cfg = tiny_model("optim.lr_width_base=128", "optim.lr=1e-3", "optim.weight_decay=0", "optim.eps=1e-12")
    optimizer = build_optimizer(model, cfg.optim, "cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    model.logits(model(ids)).logsumexp(-1).mean().backward()
    optimizer.step()
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters()}
    assert moved["layers.0.attn.q_proj.weight"] == pytest.approx(4e-3, rel=1e-3)
    assert moved["embed.weight"] == pytest.approx(1e-3, rel=1e-3)


def run_config(data, out, *extra) -> PretrainConfig:
    return config.load(PretrainConfig, overrides=[
        "model.preset=test-tiny", f"train.data={data}", "train.seq_len=64", "train.batch_size=16",
        "optim.lr=3e-3", "schedule.warmup_steps=4", f"train.out_dir={out}", "train.log_every=1",
        "train.device=cpu", *extra])


@pytest.mark.parametrize("switches", [
    ("optim.decay_embeddings=false", "optim.lr_width_base=64", "model.tie_embeddings=false"),
    ("optim.decay_embeddings=false", "optim.kind=muon", "schedule.decay=wsd"),
])
def test_a_run_with_the_switches_on_resumes_bitwise(markov_shards, tmp_path, monkeypatch, switches):
    _, data = markov_shards
    common = (*switches, "train.max_steps=24", "train.save_every=12", "train.eval_every=12", "model.dropout=0.1")
    pretrain(run_config(data, tmp_path / "straight", *common))
    with crash_at_step(monkeypatch, 17):
        pretrain(run_config(data, tmp_path / "resumed", *common))
    pretrain(run_config(data, tmp_path / "resumed", *common))  # resumes from step 12

    assert_same_run(tmp_path / "straight", tmp_path / "resumed", 24)


@pytest.mark.parametrize("first, second", [
    ((), ("optim.decay_embeddings=false", "optim.lr_width_base=64")),
    (("optim.decay_embeddings=false", "optim.lr_width_base=64"), ()),
])
def test_a_checkpoint_of_other_groups_loads_each_parameters_moments_by_name(first, second):
    """What the trainer does on resume (torch.distributed.checkpoint's optimizer state, keyed by
    parameter names): each parameter's moments land in the group that holds it now, and the config's
    group settings are applied after (the restored groups may carry another group's weight decay)."""
    model, cfg_a = tiny_model(*first, "optim.weight_decay=0.1")
    _, cfg_b = tiny_model(*second, "optim.weight_decay=0.1")
    saved_by = build_optimizer(model, cfg_a.optim, "cpu")
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    saved_by.step()
    state = copy.deepcopy(get_optimizer_state_dict(model, saved_by, options=FULL_STATE))
    model.zero_grad(set_to_none=True)

    restored = build_optimizer(model, cfg_b.optim, "cpu")
    set_optimizer_state_dict(model, restored, state, options=FULL_STATE)
    no_decay = restored.param_groups[restored.group_roles.index("no_decay")]
    no_decay["weight_decay"] = 0.1  # what a group may inherit from a parameter's saved group (not here)
    said = []
    apply_optimizer_settings(restored, cfg_b.optim, said.append)
    assert said == ["optimizer settings changed since the checkpoint, applied: weight_decay 0.1 -> 0.0"]
    for p in model.parameters():
        assert torch.equal(restored.state[p]["exp_avg"], saved_by.state[p]["exp_avg"])
    embed = dict(model.named_parameters())["embed.weight"]
    holder = next(g for g in restored.param_groups if any(p is embed for p in g["params"]))
    assert holder["weight_decay"] == (0.0 if second else 0.1)
    # second: test-tiny's tied embedding leaves the decaying group empty, which is not built
    assert restored.group_roles == (["no_decay", "width_scaled"] if second else ["decay", "no_decay"])
    assert [g["weight_decay"] for g in restored.param_groups] == ([0.0, 0.1] if second else [0.1, 0.0])


def test_a_run_resumes_with_the_switches_turned_on(markov_shards, tmp_path, capsys):
    _, data = markov_shards
    common = ("train.eval_every=0", "train.save_every=5")
    pretrain(run_config(data, tmp_path / "run", "train.max_steps=5", *common))
    capsys.readouterr()
    pretrain(run_config(data, tmp_path / "run", "train.max_steps=8", "optim.decay_embeddings=false",
                        "optim.lr_width_base=64", *common))
    assert (tmp_path / "run" / "checkpoints" / "step-000008" / "model.safetensors").is_file()
    said = capsys.readouterr().err  # the change is applied and said, as every schedule setting's
    assert "schedule settings changed since the checkpoint, applied:" in said
    assert "optim.decay_embeddings" in said and "optim.lr_width_base" in said


@pytest.mark.parametrize("overrides, message", [
    (("optim.lr_width_base=-1",), r"optim.lr_width_base: must be >= 0 \(0: off\), got -1"),
    (("optim.lr_width_base=128", "optim.kind=muon"),
     r'optim.lr_width_base: scales AdamW\'s hidden matrices; under kind = "muon" .* set it to 0'),
    (("optim.decay_embeddings=2",), r"optim.decay_embeddings"),
])
def test_bad_switch_values_are_refused_by_name(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config.load(PretrainConfig, overrides=["model.preset=test-tiny", "train.seq_len=64", *overrides])


def test_the_defaults_are_unchanged():
    optim = PretrainConfig().optim
    assert optim.decay_embeddings is True and optim.lr_width_base == 0
