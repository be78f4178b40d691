"""torchrun on CPU (gloo): N processes with micro-batch B train the same model as 1 with N x B, and a
run continues on another number of processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import launch
from slmforge.checkpoint.reading import check_integrity, checkpoint_tensors
from slmforge.train.metrics import read_metrics

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def train_records(run):
    return [r for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"]


def assert_same_training(a, b, step: int, atol: float = 1e-5):
    for x, y in zip(train_records(a), train_records(b), strict=True):
        assert x["step"] == y["step"] and x["tokens"] == y["tokens"]
        assert x["loss"] == pytest.approx(y["loss"], abs=atol), (x, y)
        assert x["accuracy"] == pytest.approx(y["accuracy"], abs=atol), (x, y)
    weights_a = checkpoint_tensors(a / "checkpoints" / f"step-{step:06d}")
    weights_b = checkpoint_tensors(b / "checkpoints" / f"step-{step:06d}")
    for name in weights_a:
        torch.testing.assert_close(weights_a[name], weights_b[name], atol=atol, rtol=1e-4, msg=name)


def common(data, out, *extra):
    return (f"train.data={data}", f"train.out_dir={out}", "train.seq_len=32", "train.max_steps=12",
            "train.log_every=1", "train.eval_every=6", "train.eval_batches=4", "train.save_every=6",
            "train.keep_last=0", "optim.lr=3e-3", "schedule.warmup_steps=3", "train.device=cpu", *extra)


def test_two_processes_train_like_one_with_twice_the_batch_clm(markov_shards, tmp_path):
    _, data = markov_shards
    one, two = tmp_path / "one", tmp_path / "two"
    launch(1, *common(data, one, "model.preset=test-tiny", "train.batch_size=8", "train.grad_accum=2"))
    result = launch(2, *common(data, two, "model.preset=test-tiny", "train.batch_size=4", "train.grad_accum=2"))
    lines = result.stderr.splitlines()
    assert sum(line.startswith("run folder") for line in lines) == 1  # only rank 0 speaks
    assert sum(line.startswith("step     12/12") for line in lines) == 1
    assert "2 processes (ddp)" in result.stderr
    assert_same_training(one, two, 12)


def test_two_processes_train_like_one_with_twice_the_batch_mlm(mlm_markov_shards, tmp_path):
    """Masked batches hold different numbers of targets on each rank: the loss is normalised over the
    whole step, and masks follow the sample, not the rank."""
    _, data = mlm_markov_shards
    one, two = tmp_path / "one", tmp_path / "two"
    launch(1, *common(data, one, "model.preset=modernbert-tiny", "train.batch_size=8"))
    launch(2, *common(data, two, "model.preset=modernbert-tiny", "train.batch_size=4"))
    assert_same_training(one, two, 12)
    val_one = [r for r in read_metrics(one / "metrics.jsonl") if r["split"] == "val"]
    val_two = [r for r in read_metrics(two / "metrics.jsonl") if r["split"] == "val"]
    for x, y in zip(val_one, val_two, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5) and x["tokens"] == y["tokens"]


@pytest.mark.slow
def test_a_run_continues_on_another_number_of_processes(markov_shards, tmp_path):
    """Checkpointed by 2 processes, resumed by 1 (and the reverse): the same curve as a straight run."""
    _, data = markov_shards
    straight, two_then_one, one_then_two = tmp_path / "straight", tmp_path / "2to1", tmp_path / "1to2"
    launch(1, *common(data, straight, "model.preset=test-tiny", "train.batch_size=8"))
    for run, first, second in ((two_then_one, 2, 1), (one_then_two, 1, 2)):
        launch(first, *common(data, run, "model.preset=test-tiny", f"train.batch_size={8 // first}"))
        # Go back to the step-6 checkpoint, as if the first job had died after it.
        shutil.rmtree(run / "checkpoints" / "step-000012")
        (run / "checkpoints" / "latest").write_text("step-000006\n")
        launch(second, *common(data, run, "model.preset=test-tiny", f"train.batch_size={8 // second}"))
        assert_same_training(straight, run, 12)


def test_fsdp2_trains_like_ddp_and_its_sharded_checkpoints_resume_on_two_and_one_processes(mlm_markov_shards,
                                                                                         tmp_path):
    """FSDP2 shards parameters, gradients and optimizer state, and each rank writes its own shard of
    them (torch.distributed.checkpoint, in the background here): the run resumes on 2 processes and on
    1 (DCP reshards), continuing the DDP run's curve, and eval/export read the folder whole."""
    _, data = mlm_markov_shards
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    model = ("model.preset=modernbert-tiny", "train.batch_size=4", "train.grad_accum=2")
    launch(2, *common(data, ddp, *model, "parallel.strategy=ddp"))
    result = launch(2, *common(data, fsdp, *model, "parallel.strategy=fsdp", "parallel.async_checkpoint=true"))
    assert "2 processes (fsdp)" in result.stderr
    for step in (6, 12):
        folder = fsdp / "checkpoints" / f"step-{step:06d}"
        assert (folder / "sharded" / ".metadata").is_file() and not (folder / "model.safetensors").exists()
        assert check_integrity(folder) is None
    assert_same_training(ddp, fsdp, 12)
    for processes, batch in ((2, 4), (1, 8)):  # the same global batch
        shutil.rmtree(fsdp / "checkpoints" / "step-000012")
        (fsdp / "checkpoints" / "latest").write_text("step-000006\n")
        launch(processes, *common(data, fsdp, "model.preset=modernbert-tiny", f"train.batch_size={batch}",
                                  "train.grad_accum=2", "parallel.strategy=fsdp"))
        assert_same_training(ddp, fsdp, 12)
    # 1 process writes a full checkpoint; FSDP2 on 2 processes continues from it and writes sharded ones
    assert (fsdp / "checkpoints" / "step-000012" / "model.safetensors").is_file()
    launch(2, *common(data, fsdp, *model, "parallel.strategy=fsdp", "train.max_steps=14"))
    assert (fsdp / "checkpoints" / "step-000014" / "sharded" / ".metadata").is_file()
    launch(2, *common(data, ddp, *model, "parallel.strategy=ddp", "train.max_steps=14"))
    assert_same_training(ddp, fsdp, 14)
    exported = tmp_path / "hf"
    subprocess.run([sys.executable, "-m", "slmforge", "export", str(fsdp), "--format", "hf", "--out", str(exported)],
                   check=True, capture_output=True)
    assert (exported / "model.safetensors").is_file()


def test_an_uneven_validation_split_does_not_deadlock(mlm_markov_shards, tmp_path):
    """The last validation batch exists for rank 0 only: rank 1 still runs a forward (scoring nothing),
    so FSDP2's gathers pair up, and the figures equal one process's."""
    import json

    _, data = mlm_markov_shards
    manifest = json.loads((data / "manifest.json").read_text())
    windows = manifest["splits"]["val"]["tokens"] // 32
    batches = -(-windows // 8)  # global batches of 8 windows; the last one is short
    assert windows % 8 and windows % 8 <= 4  # so rank 1 has nothing in the last one
    one, two = tmp_path / "one", tmp_path / "two"
    extra = ("model.preset=modernbert-tiny", f"train.eval_batches={batches}", "train.max_steps=2",
             "train.eval_every=0")
    launch(1, *common(data, one, *extra, "train.batch_size=8"))
    launch(2, *common(data, two, *extra, "train.batch_size=4", "parallel.strategy=fsdp"))
    val_one = [r for r in read_metrics(one / "metrics.jsonl") if r["split"] == "val"]
    val_two = [r for r in read_metrics(two / "metrics.jsonl") if r["split"] == "val"]
    assert val_one[-1]["tokens"] == val_two[-1]["tokens"]
    assert val_one[-1]["loss"] == pytest.approx(val_two[-1]["loss"], abs=1e-5)


def test_two_processes_finetune_with_lora_like_one_with_twice_the_batch(tmp_path):
    """Fine-tuning (packed examples, prompt-masked loss, LoRA adapters under DDP) is the same training
    on 1 and 2 processes at the same global batch."""
    pytest.importorskip("peft")
    from conftest import word_level_tokenizer
    from test_finetune import WORDS, reverse_examples, write_jsonl

    word_level_tokenizer(tmp_path / "tok", WORDS)
    train = write_jsonl(tmp_path / "train.jsonl", reverse_examples(300, seed=3))
    val = write_jsonl(tmp_path / "val.jsonl", reverse_examples(20, seed=4))

    def args(out, *extra):
        return (f'finetune.train_files=["{train}"]', f'finetune.val_files=["{val}"]', "finetune.eval_samples=0",
                "train.seq_len=40", "train.max_steps=8", "train.log_every=1", "train.eval_every=4",
                "train.save_every=4", "optim.lr=1e-2", "schedule.warmup_steps=2", "train.device=cpu",
                f"train.out_dir={out}", *extra)

    base = tmp_path / "base"
    launch(1, *args(base, "model.preset=test-tiny", f"finetune.tokenizer={tmp_path / 'tok'}", "train.batch_size=8"),
           verb="finetune")
    lora = (f"train.init_from={base}", "lora.rank=4", "lora.dropout=0")
    one, two = tmp_path / "one", tmp_path / "two"
    launch(1, *args(one, *lora, "train.batch_size=8"), verb="finetune")
    result = launch(2, *args(two, *lora, "train.batch_size=4"), verb="finetune")
    assert "2 processes (ddp)" in result.stderr
    assert_same_training(one, two, 8)
    a = load_file(one / "checkpoints" / "step-000008" / "adapter_model.safetensors")
    b = load_file(two / "checkpoints" / "step-000008" / "adapter_model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4, msg=name)


def test_two_processes_distill_like_one_with_twice_the_batch(mlm_markov_shards, tmp_path):
    """Distillation (a frozen teacher beside the DDP-wrapped student, masked LM) is the same training on
    1 and 2 processes at the same global batch."""
    _, data = mlm_markov_shards
    teacher = tmp_path / "teacher"
    launch(1, *common(data, teacher, "model.preset=bert-tiny", "train.batch_size=8", "train.max_steps=6"))
    one, two = tmp_path / "one", tmp_path / "two"
    student = ("model.preset=bert-tiny", "model.num_layers=1", "model.dropout=0", f"distill.teacher={teacher}",
               "distill.alpha=0.5")
    launch(1, *common(data, one, *student, "train.batch_size=8"), verb="distill")
    result = launch(2, *common(data, two, *student, "train.batch_size=4"), verb="distill")
    assert "2 processes (ddp)" in result.stderr
    assert_same_training(one, two, 12)
    for x, y in zip(train_records(one), train_records(two), strict=True):
        assert x["distill_loss"] == pytest.approx(y["distill_loss"], abs=1e-5)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_together(commands: list[tuple[list[str], dict[str, str]]]) -> list[subprocess.CompletedProcess]:
    """Start every (command, extra environment) at once, as a cluster starts its nodes' tasks."""
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    running = [subprocess.Popen(command, env={**base, "OMP_NUM_THREADS": "1", **extra}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for command, extra in commands]
    results = []
    for process in running:
        out, err = process.communicate(timeout=600)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    return results


def test_two_nodes_and_slurm_tasks_train_like_one_process(markov_shards, tmp_path):
    """Two torchrun 'nodes' meeting through a c10d rendezvous, and two tasks started the way `srun`
    starts them (SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, MASTER_ADDR from the batch script), each
    train the same model as one process with twice the batch."""
    _, data = markov_shards
    one, nodes, slurm = tmp_path / "one", tmp_path / "nodes", tmp_path / "slurm"
    launch(1, *common(data, one, "model.preset=test-tiny", "train.batch_size=8"))
    port = free_port()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=slmforge-test"]
    args = ["-m", "slmforge", "pretrain", *common(data, nodes, "model.preset=test-tiny", "train.batch_size=4")]
    results = run_together([(torchrun + [f"--node-rank={rank}"] + args, {}) for rank in (0, 1)])
    assert any("2 processes (ddp)" in r.stderr for r in results)
    assert_same_training(one, nodes, 12)

    port = free_port()
    args = [sys.executable, "-m", "slmforge", "pretrain", *common(data, slurm, "model.preset=test-tiny",
                                                                   "train.batch_size=4")]
    tasks = [(args, {"SLURM_PROCID": str(rank), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(rank),
                     "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}) for rank in (0, 1)]
    results = run_together(tasks)
    assert "2 processes (ddp)" in results[0].stderr
    assert_same_training(one, slurm, 12)
