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
