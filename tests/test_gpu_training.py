"""The training verbs on a CUDA device, in bf16: what CPU tests cannot reach (pinned non-blocking
copies, a bf16 teacher beside an autocast student, fused AdamW, MFU). Skipped without a GPU."""

from __future__ import annotations

import json

import pytest
import torch

from slmforge import config
from slmforge.distill.config import DistillRunConfig
from slmforge.distill.run import distill
from slmforge.train.config import PretrainConfig
from slmforge.train.metrics import read_metrics
from slmforge.train.pretrain import pretrain

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_pretrain_and_distill_on_cuda_in_bf16(mlm_markov_shards, tmp_path):
    _, data = mlm_markov_shards
    common = [f"train.data={data}", "train.seq_len=32", "train.batch_size=16", "train.device=cuda",
              "train.precision=bf16", "train.log_every=5"]
    teacher = pretrain(config.load(PretrainConfig, overrides=[
        "model.preset=test-tiny", "train.max_steps=60", "optim.lr=3e-3", *common,
        f"train.out_dir={tmp_path / 'teacher'}"]))
    records = [r for r in read_metrics(teacher / "metrics.jsonl") if r["split"] == "train"]
    assert records[-1]["loss"] < records[0]["loss"]
    meta = json.loads((teacher / "checkpoints" / "step-000060" / "meta.json").read_text())
    assert meta["hardware"]["gpu"] and meta["hardware"]["precision"] == "bf16"
    student = distill(config.load(DistillRunConfig, overrides=[
        "model.preset=test-tiny", "model.hidden_size=16", "model.num_heads=2", "model.num_kv_heads=1",
        "train.max_steps=20", f"distill.teacher={teacher}", "distill.hidden_weight=1", *common,
        f"train.out_dir={tmp_path / 'student'}"]))
    meta = json.loads((student / "checkpoints" / "step-000020" / "meta.json").read_text())
    assert meta["distill"]["teacher_dtype"] == "auto"
    records = [r for r in read_metrics(student / "metrics.jsonl") if r["split"] == "train"]
    assert all(r["distill_loss"] == r["distill_loss"] for r in records)  # finite (not NaN)


def test_lora_finetuning_on_cuda_in_bf16(tmp_path):
    pytest.importorskip("peft")
    from test_finetune import finetune_config

    from slmforge.finetune.run import finetune

    base = finetune(finetune_config(tmp_path, "train.max_steps=20", "train.device=cuda", "train.precision=bf16",
                                    "finetune.eval_samples=0", f"train.out_dir={tmp_path / 'base'}"))
    run = finetune(finetune_config(tmp_path, f"train.init_from={base}", "lora.rank=4", "train.max_steps=20",
                                   "train.device=cuda", "train.precision=bf16", "finetune.eval_samples=4",
                                   f"train.out_dir={tmp_path / 'lora'}"))
    assert (run / "checkpoints" / "step-000020" / "adapter_model.safetensors").is_file()
    assert "finetune_held_out" in json.loads((run / "checkpoints" / "step-000020" / "eval.json").read_text())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs one GPU per process: two GPUs")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gpus_with_nccl_train_like_one_with_twice_the_batch(markov_shards, tmp_path, strategy):
    """The NCCL path (device binding per local rank, bf16 reduce in fp32 under FSDP2, sharded
    checkpoints written from GPU shards) trains like one GPU at the same global batch."""
    from conftest import launch

    _, data = markov_shards
    common = [f"train.data={data}", "model.preset=test-tiny", "train.seq_len=32", "train.max_steps=8",
              "train.log_every=1", "train.eval_every=0", "train.device=cuda", "train.precision=fp32",
              "optim.lr=3e-3"]
    launch(1, *common, "train.batch_size=8", f"train.out_dir={tmp_path / 'one'}")
    result = launch(2, *common, "train.batch_size=4", f"parallel.strategy={strategy}",
                    f"train.out_dir={tmp_path / 'two'}")
    assert f"2 processes ({strategy})" in result.stderr
    one = [r["loss"] for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if r["split"] == "train"]
    two = [r["loss"] for r in read_metrics(tmp_path / "two" / "metrics.jsonl") if r["split"] == "train"]
    assert one == pytest.approx(two, abs=1e-4)  # TF32 and NCCL's reduction order: looser than gloo's 1e-5
