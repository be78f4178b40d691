"""optim.kind = "muon" (Muon for the blocks' matrices, AdamW for the rest) and schedule.decay = "wsd"."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import crash_at_step, untimed
from slmforge import config
from slmforge.errors import ConfigError, SlmforgeError
from slmforge.models import build_model
from slmforge.train.config import OptimConfig, PretrainConfig, ScheduleConfig
from slmforge.train.metrics import read_metrics
from slmforge.train.optim import MuonWithAdamW, build_optimizer, learning_rate, parameter_groups
from slmforge.train.pretrain import pretrain

BLOCK_MATRICES = ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                  "mlp.down_proj"]


def run_config(data, out, *extra) -> PretrainConfig:
    return config.load(PretrainConfig, overrides=[
        "model.preset=test-tiny", f"train.data={data}", "train.seq_len=64", "train.batch_size=16",
        "optim.lr=3e-3", "optim.weight_decay=0.0", "schedule.warmup_steps=4", f"train.out_dir={out}",
        "train.log_every=10", "train.device=cpu", *extra])


def tiny_model(*overrides: str):
    cfg = config.load(PretrainConfig, overrides=["model.preset=test-tiny", "train.seq_len=64", *overrides])
    return build_model(cfg.model, device=torch.device("cpu"), seed=0), cfg


@pytest.mark.parametrize("tied", [True, False])
def test_muon_takes_the_blocks_matrices_and_adamw_the_rest(tied):
    model, cfg = tiny_model(f"model.tie_embeddings={str(tied).lower()}", "optim.kind=muon")
    groups = {k: [name for name, _ in v] for k, v in parameter_groups(model, "muon").items()}
    assert groups["muon"] == [f"layers.{i}.{m}.weight" for i in range(2) for m in BLOCK_MATRICES]
    # embeddings and the output head (tied: the embedding itself) stay on AdamW, with decay
    assert groups["decay"] == (["embed.weight"] if tied else ["embed.weight", "lm_head.weight"])
    assert groups["no_decay"] == [f"layers.{i}.{n}_norm.weight" for i in range(2) for n in ("attn", "mlp")] + \
        ["norm.weight"]
    # adamw: the same matrices decay under AdamW, nothing goes to Muon
    plain = {k: [name for name, _ in v] for k, v in parameter_groups(model, "adamw").items()}
    assert plain["muon"] == [] and sorted(plain["decay"]) == sorted(groups["decay"] + groups["muon"])

    optimizer = build_optimizer(model, cfg.optim, "cpu")
    assert isinstance(optimizer, MuonWithAdamW) and isinstance(optimizer, torch.optim.Optimizer)
    decay, no_decay, muon = optimizer.param_groups
    assert isinstance(optimizer.muon, torch.optim.Muon) and isinstance(optimizer.adamw, torch.optim.AdamW)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (cfg.optim.weight_decay, 0.0)
    assert (muon["weight_decay"], muon["momentum"], muon["adjust_lr_fn"]) == (0.01, 0.95, "original")
    assert len(muon["params"]) == 14 and optimizer.muon_lr_scale == pytest.approx(0.02 / cfg.optim.lr)
    assert isinstance(build_optimizer(model, OptimConfig(), "cpu"), torch.optim.AdamW)  # the default


def test_an_encoders_mlm_head_and_embeddings_stay_on_adamw():
    cfg = config.load(PretrainConfig, overrides=["model.preset=bert-tiny", "train.seq_len=64"])
    model = build_model(cfg.model, device=torch.device("cpu"), seed=0)
    groups = parameter_groups(model, "muon")
    assert groups["muon"] and all(name.startswith("layers.") for name, _ in groups["muon"])
    assert not any(name.startswith("layers.") for name, _ in groups["decay"])  # embeddings, the head's dense
    assert all(p.ndim == 2 for _, p in groups["muon"])


def test_each_group_follows_the_schedule_from_its_own_peak(monkeypatch):
    """The trainer sets every group's lr to the AdamW curve; Muon steps with muon_lr / lr times it."""
    model, cfg = tiny_model("optim.kind=muon", "optim.lr=1e-3", "optim.muon_lr=0.05")
    optimizer = build_optimizer(model, cfg.optim, "cpu")
    seen = {}
    for name in ("adamw", "muon"):
        part = getattr(optimizer, name)
        monkeypatch.setattr(part, "step", lambda name=name, part=part: seen.setdefault(name, part.param_groups[0]["lr"]))
    for group in optimizer.param_groups:
        group["lr"] = 4e-4  # the schedule at 40% of the peak
    optimizer.step()
    assert seen["adamw"] == 4e-4 and seen["muon"] == pytest.approx(0.05 * 0.4)
    assert all(group["lr"] == 4e-4 for group in optimizer.param_groups)  # put back after the step


def test_a_muon_run_learns_the_markov_chain(markov_shards, tmp_path):
    source, data = markov_shards
    pretrain(run_config(data, tmp_path / "run", "optim.kind=muon", "train.max_steps=150", "train.eval_every=50"))
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    first = next(r for r in records if r["split"] == "train")
    final = [r for r in records if r["split"] == "val"][-1]
    # Measured: first logged train loss 2.75, validation 2.02 at step 150 (entropy rate 1.97; AdamW with
    # the same settings reaches 2.04).
    assert first["loss"] > 2.5 and final["loss"] < 1.1 * source.entropy_rate, (first["loss"], final["loss"])


def test_a_muon_wsd_run_resumes_bitwise(markov_shards, tmp_path, monkeypatch):
    _, data = markov_shards
    # cooldown over the last 10 of 40 steps: the resumed part crosses into it
    common = ("optim.kind=muon", "schedule.decay=wsd", "schedule.cooldown_ratio=0.25", "train.max_steps=40",
              "train.save_every=20", "train.eval_every=20", "model.dropout=0.1", "train.log_every=1")
    pretrain(run_config(data, tmp_path / "straight", *common))
    with crash_at_step(monkeypatch, 27):
        pretrain(run_config(data, tmp_path / "resumed", *common))
    pretrain(run_config(data, tmp_path / "resumed", *common))  # the same command: resumes from step 20

    a = load_file(tmp_path / "straight" / "checkpoints" / "step-000040" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "checkpoints" / "step-000040" / "model.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert untimed(tmp_path / "straight") == untimed(tmp_path / "resumed")
    lrs = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "straight" / "metrics.jsonl") if r["split"] == "train"}
    assert lrs[30] == lrs[31] == 3e-3 and lrs[40] < lrs[35] < 3e-3  # record N logs the lr of step N - 1


def test_extending_in_the_stable_phase_and_branching_a_cooldown(markov_shards, tmp_path):
    """A wsd run resumed from a stable-phase checkpoint with a larger train.max_steps ends bitwise where a
    run given that max_steps from the start does: the branch below is a copy of the run folder whose
    `latest` names that checkpoint."""
    _, data = markov_shards
    common = ("schedule.decay=wsd", "schedule.cooldown_ratio=0.25", "schedule.cooldown_shape=linear",
              "train.save_every=10", "train.eval_every=0", "optim.kind=muon")
    pretrain(run_config(data, tmp_path / "long", "train.max_steps=60", *common))  # cools down from step 45
    pretrain(run_config(data, tmp_path / "short", "train.max_steps=40", *common))  # cools down from step 30

    branch = tmp_path / "branch"
    shutil.copytree(tmp_path / "short", branch)
    shutil.rmtree(branch / "checkpoints" / "step-000040")  # keep the stable-phase checkpoints only
    (branch / "checkpoints" / "latest").write_text("step-000030\n")
    pretrain(run_config(data, branch, "train.max_steps=60", *common))

    a = load_file(tmp_path / "long" / "checkpoints" / "step-000060" / "model.safetensors")
    b = load_file(branch / "checkpoints" / "step-000060" / "model.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert untimed(tmp_path / "long") == untimed(branch)


def test_wsd_learning_rate_at_the_phase_boundaries():
    optim = OptimConfig(lr=1e-3)
    for shape in ("linear", "1-sqrt"):
        schedule = ScheduleConfig(warmup_steps=10, decay="wsd", cooldown_ratio=0.2, cooldown_shape=shape,
                                  min_lr_ratio=0.1)
        lr = lambda step: learning_rate(step, 100, optim, schedule)  # noqa: E731
        assert lr(0) == pytest.approx(1e-4) and lr(9) == 1e-3  # warmup ends at the peak
        assert lr(10) == lr(50) == lr(79) == 1e-3  # stable
        assert lr(80) == 1e-3  # the cooldown's first step (80 = 100 - 0.2 x 100) still at the peak
        assert lr(100) == pytest.approx(1e-4) and lr(150) == pytest.approx(1e-4)  # the floor
        halfway, last = lr(90), lr(99)
        if shape == "linear":
            assert halfway == pytest.approx(5.5e-4) and last == pytest.approx(1e-3 - 0.9e-3 * 0.95)
        else:
            assert halfway == pytest.approx(1e-4 + 0.9e-3 * (1 - 0.5 ** 0.5))
            assert last == pytest.approx(1e-4 + 0.9e-3 * (1 - 0.95 ** 0.5))
        assert lr(79) > lr(85) > lr(95) > lr(100)
    # 1-sqrt falls faster at first than linear
    sqrt_cfg = ScheduleConfig(warmup_steps=10, decay="wsd", cooldown_shape="1-sqrt")
    lin_cfg = ScheduleConfig(warmup_steps=10, decay="wsd", cooldown_shape="linear")
    assert learning_rate(85, 100, optim, sqrt_cfg) < learning_rate(85, 100, optim, lin_cfg)
    # a cooldown that would start inside the warmup starts when the warmup ends
    short = ScheduleConfig(warmup_steps=5, decay="wsd", cooldown_ratio=0.8, cooldown_shape="linear", min_lr_ratio=0)
    assert learning_rate(4, 10, optim, short) == 1e-3 and learning_rate(5, 10, optim, short) == 1e-3
    assert learning_rate(9, 10, optim, short) == pytest.approx(1e-3 * 0.2)
    assert learning_rate(50, 100, optim, ScheduleConfig(warmup_steps=10, decay="wsd", cooldown_ratio=0.0)) == 1e-3


def test_the_default_schedule_and_optimizer_are_unchanged():
    defaults = PretrainConfig()
    assert defaults.optim.kind == "adamw" and defaults.schedule.decay == "cosine"


def test_muon_without_torch_muon_is_refused_in_one_line(monkeypatch):
    monkeypatch.delattr(torch.optim, "Muon")
    with pytest.raises(ConfigError, match=r'optim.kind: "muon" needs torch >= 2\.9 \(torch.optim.Muon\)'):
        config.load(PretrainConfig, overrides=["model.preset=test-tiny", "train.seq_len=64", "optim.kind=muon"])
    model, _ = tiny_model()
    with pytest.raises(SlmforgeError, match=r"needs torch >= 2\.9"):
        build_optimizer(model, OptimConfig(kind="muon"), "cpu")
    assert isinstance(build_optimizer(model, OptimConfig(), "cpu"), torch.optim.AdamW)  # adamw needs no Muon


def test_muon_under_fsdp2_is_refused_in_one_line(tmp_path):
    """FSDP2 leaves each rank a DTensor shard of every matrix; one CPU process (gloo) shards as N would."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    model, cfg = tiny_model("optim.kind=muon")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        with pytest.raises(SlmforgeError, match=r'"muon" orthogonalises whole matrices, and parallel.strategy = '
                                                r'"fsdp" shards them'):
            build_optimizer(model, cfg.optim, "cpu")
        build_optimizer(model, OptimConfig(), "cpu")  # AdamW shards fine
    finally:
        dist.destroy_process_group()


def test_muon_with_lora_is_refused_in_one_line():
    pytest.importorskip("peft")
    from slmforge.finetune.config import LoraConfig
    from slmforge.finetune.lora import apply_lora

    model, _ = tiny_model()
    apply_lora(model, LoraConfig(rank=4, target_modules=["q_proj", "v_proj"]))
    assert not parameter_groups(model, "muon")["muon"]  # adapters are AdamW's
    with pytest.raises(SlmforgeError, match=r"no trainable hidden matrix.*LoRA trains only its adapters"):
        build_optimizer(model, OptimConfig(kind="muon"), "cpu")


def test_switching_optim_kind_on_resume_is_refused_in_one_line(markov_shards, tmp_path):
    _, data = markov_shards
    common = ("train.eval_every=0", "train.log_every=5")
    pretrain(run_config(data, tmp_path / "adamw", "train.max_steps=5", *common))
    with pytest.raises(SlmforgeError, match=r'written with optim.kind = "adamw", not "muon"; resume with'):
        pretrain(run_config(data, tmp_path / "adamw", "train.max_steps=10", "optim.kind=muon", *common))
    pretrain(run_config(data, tmp_path / "muon", "train.max_steps=5", "optim.kind=muon", *common))
    with pytest.raises(SlmforgeError, match=r'written with optim.kind = "muon", not "adamw"'):
        pretrain(run_config(data, tmp_path / "muon", "train.max_steps=10", *common))


def test_resuming_applies_changed_muon_settings(markov_shards, tmp_path, capsys):
    _, data = markov_shards
    common = ("train.eval_every=0", "train.log_every=5", "optim.kind=muon")
    pretrain(run_config(data, tmp_path / "run", "train.max_steps=5", *common))
    capsys.readouterr()
    pretrain(run_config(data, tmp_path / "run", "train.max_steps=8", "optim.muon_momentum=0.9",
                        "optim.muon_weight_decay=0.0", "optim.muon_lr=0.01", *common))
    said = capsys.readouterr().err
    assert "muon_momentum 0.95 -> 0.9" in said and "muon_weight_decay 0.01 -> 0.0" in said, said
    assert "optim.muon_lr 0.02 -> 0.01" in said, said


@pytest.mark.parametrize("override, message", [
    ("optim.muon_lr=0", "optim.muon_lr: must be positive"),
    ("optim.muon_momentum=1", "optim.muon_momentum: must be in"),
    ("schedule.cooldown_ratio=1.5", "schedule.cooldown_ratio: must be in"),
    ("schedule.cooldown_shape=cosine", "schedule.cooldown_shape"),
    ("optim.kind=sgd", "optim.kind"),
])
def test_bad_values_are_refused_by_name(override, message):
    with pytest.raises(ConfigError, match=message):
        config.load(PretrainConfig, overrides=["model.preset=test-tiny", "train.seq_len=64", override])
