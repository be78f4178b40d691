"""The training loop learns, resumes exactly, and leaves a readable run folder."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import crash_at_step, untimed
from slmforge import config
from slmforge.errors import SlmforgeError
from slmforge.train.config import OptimConfig, PretrainConfig, ScheduleConfig
from slmforge.train.metrics import read_metrics
from slmforge.train.optim import learning_rate
from slmforge.train.pretrain import pretrain


def run_config(data, out, *extra) -> PretrainConfig:
    return config.load(PretrainConfig, overrides=[
        "model.preset=test-tiny", f"train.data={data}", "train.seq_len=64", "train.batch_size=16",
        "optim.lr=3e-3", "optim.weight_decay=0.0", "schedule.warmup_steps=20", f"train.out_dir={out}",
        "train.log_every=10", *extra])


def test_learns_a_markov_chain_down_to_its_entropy(markov_shards, tmp_path):
    source, data = markov_shards
    pretrain(run_config(data, tmp_path / "run", "train.max_steps=300", "train.eval_every=100"))
    final = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "val"][-1]
    # The best possible loss is the chain's entropy rate; a model that learned the transition table
    # gets within 10% of it (a unigram model would sit at the stationary entropy, far above).
    assert final["loss"] < 1.10 * source.entropy_rate, (final["loss"], source.entropy_rate)
    unigram = -(source.stationary * torch.tensor(source.stationary).log().numpy()).sum()
    assert unigram > 1.15 * source.entropy_rate  # the check above can fail for a model that did not learn
    assert final["bpb"] == pytest.approx(final["loss"] / math.log(2), rel=1e-6)  # 1 "byte" per token here


def test_resume_after_a_crash_equals_an_uninterrupted_run(markov_shards, tmp_path, monkeypatch):
    _, data = markov_shards
    common = ("train.max_steps=40", "train.save_every=20", "train.eval_every=20", "model.dropout=0.1")
    pretrain(run_config(data, tmp_path / "straight", *common))

    with crash_at_step(monkeypatch, 27):
        pretrain(run_config(data, tmp_path / "resumed", *common))
    pretrain(run_config(data, tmp_path / "resumed", *common))  # same command: resumes from step 20

    a = load_file(tmp_path / "straight" / "checkpoints" / "step-000040" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "checkpoints" / "step-000040" / "model.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert untimed(tmp_path / "straight") == untimed(tmp_path / "resumed")


def test_run_folder_layout(markov_shards, tmp_path):
    _, data = markov_shards
    run = tmp_path / "run"
    pretrain(run_config(data, run, "train.max_steps=12", "train.save_every=5", "train.keep_last=2"))
    assert (run / "config.toml").is_file() and (run / "plots" / "loss.png").stat().st_size > 1000
    saved = config.load(PretrainConfig, run / "config.toml")
    assert saved.train.max_steps == 12 and saved.model.vocab_size == 16
    steps = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert steps == ["step-000010", "step-000012"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000012"
    meta = json.loads((run / "checkpoints" / "step-000012" / "meta.json").read_text())
    assert meta["step"] == 12 and meta["tokens_seen"] == 12 * 16 * 64
    assert meta["data"] == os.path.relpath(data, run)  # relative to the run folder: both can move
    step = run / "checkpoints" / "step-000012"
    # safetensors writes 0600; the weights get the permissions of every other file of the run
    assert (step / "model.safetensors").stat().st_mode & 0o777 == (step / "meta.json").stat().st_mode & 0o777
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line)["step"] <= 12 for line in lines)
    with pytest.raises(SlmforgeError, match="already holds checkpoints"):
        pretrain(run_config(data, run, "train.max_steps=12", "train.resume=never"))


def test_missing_or_tiny_data_is_one_clear_error(tmp_path, markov_shards):
    with pytest.raises(SlmforgeError, match="no manifest"):
        pretrain(run_config(tmp_path / "nothing", tmp_path / "run"))
    _, data = markov_shards
    with pytest.raises(SlmforgeError, match="fewer than"):
        pretrain(run_config(data, tmp_path / "run2", "train.batch_size=5000"))


def test_schedule_warmup_then_cosine_to_floor():
    optim, schedule = OptimConfig(lr=1.0), ScheduleConfig(warmup_steps=10, min_lr_ratio=0.1)
    lrs = [learning_rate(s, 110, optim, schedule) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55)  # half way through the decay: midpoint of 1.0 and 0.1
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert learning_rate(110, 110, optim, schedule) == pytest.approx(0.1)
    linear = ScheduleConfig(warmup_steps=0, decay="linear", min_lr_ratio=0.0)
    assert learning_rate(50, 100, optim, linear) == pytest.approx(0.5)


def test_init_from_starts_from_the_given_weights(markov_shards, tmp_path):
    _, data = markov_shards
    pretrain(run_config(data, tmp_path / "a", "train.max_steps=5"))
    # A learning rate of ~0 keeps the weights where init_from put them.
    pretrain(run_config(data, tmp_path / "b", "train.max_steps=1", f"train.init_from={tmp_path / 'a'}",
                        "optim.lr=1e-30", "model.preset=llama-tiny"))  # [model] is ignored with init_from
    a = load_file(tmp_path / "a" / "checkpoints" / "step-000005" / "model.safetensors")
    b = load_file(tmp_path / "b" / "checkpoints" / "step-000001" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)


def test_wandb_tracker_receives_every_record(markov_shards, tmp_path, monkeypatch):
    """The tracker adapter logs what metrics.jsonl gets (a stand-in module: no network, no account)."""
    import sys
    import types

    logged, finished = [], []

    class FakeRun:
        def log(self, values, step):
            logged.append((step, values))

        def finish(self):
            finished.append(True)

    fake = types.SimpleNamespace(init=lambda **kw: FakeRun())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    _, data = markov_shards
    pretrain(run_config(data, tmp_path / "run", "train.max_steps=20", "train.eval_every=10",
                        "tracking.backends=['wandb']"))
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [step for step, _ in logged] == [r["step"] for r in records]
    assert logged[-1][1]["val/loss"] == records[-1]["loss"] and finished == [True]


def test_missing_tracker_package_is_reported_once_and_training_continues(markov_shards, tmp_path, monkeypatch,
                                                                         capsys):
    import sys

    # `import mlflow` (and its submodules, which another test may have imported) raise ImportError
    for name in ["mlflow", "mlflow.tracking", "mlflow.entities", *[m for m in sys.modules if m.startswith("mlflow.")]]:
        monkeypatch.setitem(sys.modules, name, None)
    _, data = markov_shards
    pretrain(run_config(data, tmp_path / "run", "train.max_steps=3", "tracking.backends=['mlflow']"))
    err = capsys.readouterr().err
    assert err.count("tracker 'mlflow' unavailable") == 1
    assert (tmp_path / "run" / "checkpoints" / "latest").is_file()


@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGINT", "SIGTERM"])
def test_resume_after_a_signal_equals_an_uninterrupted_run(markov_shards, tmp_path, signal_name):
    """A real `kill -9` (nothing saved at the kill) or Ctrl-C (saves at the next step boundary) of a
    training process mid-run, then the same command again: the same weights and metrics as a straight run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    _, data = markov_shards
    args = [f"train.data={data}", "model.preset=test-tiny", "train.seq_len=64", "train.batch_size=16",
            "train.max_steps=400", "train.save_every=50", "train.log_every=10", "train.eval_every=100",
            "optim.lr=3e-3", "schedule.warmup_steps=20"]
    command = [sys.executable, "-m", "slmforge", "pretrain", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command + [f"train.out_dir={tmp_path / 'straight'}"], check=True, env=env,
                   capture_output=True)
    stopped = tmp_path / "stopped"
    proc = subprocess.Popen(command + [f"train.out_dir={stopped}"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    latest = stopped / "checkpoints" / "latest"
    deadline = time.time() + 300  # generous: a loaded 2-core machine can take minutes to start torch
    while not (latest.is_file() and latest.read_text().strip() >= "step-000100") and time.time() < deadline:
        time.sleep(0.05)
    assert latest.is_file(), "no checkpoint within the deadline: the machine is too loaded for this test"
    proc.send_signal(getattr(signal, signal_name))
    _, err = proc.communicate()
    assert latest.read_text().strip() < "step-000400", "the run finished before it could be stopped"
    if signal_name == "SIGINT":
        assert proc.returncode == 130 and "interrupted: saved" in err
    if signal_name == "SIGTERM":  # schedulers send it before killing: save, say so, exit 143
        assert proc.returncode == 143 and "terminated (SIGTERM): saved" in err
    subprocess.run(command + [f"train.out_dir={stopped}"], check=True, env=env, capture_output=True)
    a = load_file(tmp_path / "straight" / "checkpoints" / "step-000400" / "model.safetensors")
    b = load_file(stopped / "checkpoints" / "step-000400" / "model.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert untimed(tmp_path / "straight") == untimed(stopped)


def test_init_from_refuses_data_made_with_another_tokenizer(tmp_path):
    import json

    from slmforge.data.prepare import load_config, prepare_data
    from slmforge.tokenizer import TokenizerConfig, train_tokenizer

    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"line {i} of some text to learn from\n" for i in range(400)), encoding="utf-8")
    datasets = {}
    for name, vocab in (("a", 300), ("b", 310)):
        tok = train_tokenizer(TokenizerConfig(vocab_size=vocab, inputs=[str(corpus)]), tmp_path / f"tok-{name}")
        datasets[name] = prepare_data(load_config(flags={
            "sources": [{"path": str(corpus)}], "tokenizer": str(tok), "out": str(tmp_path / f"data-{name}"),
            "workers": 1}), show_progress=False)
    common = ["model.preset=test-tiny", "train.seq_len=32", "train.batch_size=4", "train.max_steps=2"]
    pretrain(config.load(PretrainConfig, overrides=common + [f"train.data={datasets['a']}",
                                                            f"train.out_dir={tmp_path / 'run-a'}"]))
    assert json.loads((tmp_path / "run-a" / "checkpoints" / "step-000002" / "meta.json").read_text())["tokenizer_sha256"]
    with pytest.raises(SlmforgeError, match="tokenized with a different tokenizer"):
        pretrain(config.load(PretrainConfig, overrides=common + [
            f"train.data={datasets['b']}", f"train.out_dir={tmp_path / 'run-b'}",
            f"train.init_from={tmp_path / 'run-a'}"]))


@pytest.mark.slow
def test_compiled_training_matches_eager_and_saves_plain_names(markov_shards, tmp_path):
    """train.compile compiles in place (CPU inductor here), per block or the whole step's forward (model
    and chunked loss in one graph): same numbers, clean names."""
    _, data = markov_shards
    for name, value in (("eager", "false"), ("blocks", "true"), ("model", "model")):
        pretrain(run_config(data, tmp_path / name, "train.max_steps=3", "train.batch_size=4",
                            f"train.compile={value}"))
    eager = load_file(tmp_path / "eager" / "checkpoints" / "step-000003" / "model.safetensors")
    for name in ("blocks", "model"):
        compiled = load_file(tmp_path / name / "checkpoints" / "step-000003" / "model.safetensors")
        assert compiled.keys() == eager.keys() and not any("_orig_mod" in k for k in compiled)
        for key in eager:
            torch.testing.assert_close(compiled[key], eager[key], atol=1e-5, rtol=1e-4, msg=f"{name}: {key}")


def test_train_compile_reaches_the_wrapping(markov_shards, tmp_path, monkeypatch):
    """Fast (nothing compiled): train.compile gets to compile_for_training, which compiles the whole
    ObjectiveModule ("model") or each block ("blocks") in place."""
    from slmforge.train import parallel

    _, data = markov_shards
    scopes = []
    monkeypatch.setattr(parallel, "compile_for_training", lambda module, scope, strategy: scopes.append(scope))
    pretrain(run_config(data, tmp_path / "run", "train.max_steps=1", "train.batch_size=4", "train.compile=model"))
    assert scopes == ["model"]
    monkeypatch.undo()
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(type(self).__name__))
    from slmforge.objectives.base import TrainingHooks

    module = parallel.ObjectiveModule(torch.nn.Module(), TrainingHooks())  # no loss needed: never run
    module.model.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)])
    parallel.compile_for_training(module, "model", "ddp")
    parallel.compile_for_training(module, True, "none")
    assert compiled == ["ObjectiveModule", "Linear", "Linear"]


def test_whole_model_compile_is_refused_with_fsdp():
    from slmforge.objectives.base import TrainingHooks
    from slmforge.train.parallel import ObjectiveModule, compile_for_training

    with pytest.raises(SlmforgeError, match='train.compile: "model" cannot be combined'):
        compile_for_training(ObjectiveModule(torch.nn.Linear(2, 2), TrainingHooks()), "model", "fsdp")


def test_resume_accepts_a_tokenizer_folder_not_written_by_slmforge(tmp_path):
    """A raw HF folder (compact tokenizer.json) hashes the same way in the manifest and at resume."""
    import shutil

    from slmforge.data.prepare import load_config, prepare_data
    from slmforge.tokenizer import TokenizerConfig, load_tokenizer, train_tokenizer

    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"line {i} of some text to learn from\n" for i in range(400)), encoding="utf-8")
    ours = train_tokenizer(TokenizerConfig(vocab_size=300, inputs=[str(corpus)]), tmp_path / "ours")
    raw = tmp_path / "raw"
    raw.mkdir()
    load_tokenizer(ours).backend.save(str(raw / "tokenizer.json"), pretty=False)  # as a hub folder has it
    shutil.copy(ours / "tokenizer_config.json", raw / "tokenizer_config.json")
    data = prepare_data(load_config(flags={"sources": [{"path": str(corpus)}], "tokenizer": str(raw),
                                           "out": str(tmp_path / "data"), "workers": 1}), show_progress=False)
    common = ["model.preset=test-tiny", "train.seq_len=32", "train.batch_size=4", f"train.data={data}",
              f"train.out_dir={tmp_path / 'run'}"]
    pretrain(config.load(PretrainConfig, overrides=common + ["train.max_steps=2"]))
    pretrain(config.load(PretrainConfig, overrides=common + ["train.max_steps=4"]))  # resumes
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step-000004"


def test_rerunning_a_finished_run_changes_nothing(markov_shards, tmp_path):
    _, data = markov_shards
    run = tmp_path / "run"
    pretrain(run_config(data, run, "train.max_steps=6"))
    before = (run / "metrics.jsonl").read_text()
    weights = (run / "checkpoints" / "step-000006" / "model.safetensors").read_bytes()
    pretrain(run_config(data, run, "train.max_steps=6"))
    assert (run / "metrics.jsonl").read_text() == before
    assert (run / "checkpoints" / "step-000006" / "model.safetensors").read_bytes() == weights


def test_epochs_and_warmup_ratio_become_step_counts(markov_shards, tmp_path):
    _, data = markov_shards
    run = tmp_path / "run"
    pretrain(run_config(data, run, "train.epochs=2", "train.grad_accum=2", "schedule.warmup_ratio=0.25",
                        "train.eval_every=0"))
    saved = config.load(PretrainConfig, run / "config.toml")
    windows = (60_000 - 1) // 64  # the train split: one document of 60,000 tokens, windows of 65
    batches = windows // 16
    assert saved.train.max_steps == -(-2 * batches // 2)
    assert saved.schedule.warmup_steps == round(0.25 * saved.train.max_steps)
    assert (run / "checkpoints" / f"step-{saved.train.max_steps:06d}").is_dir()


def test_trainer_equals_a_plain_reference_loop(markov_shards, tmp_path):
    """The reshaped engine (raw windows -> objective collate -> fused loss through the output projection)
    trains a causal LM exactly as a plain loop over the same batches with F.cross_entropy on full logits."""
    from slmforge.data.loader import WindowLoader
    from slmforge.data.shards import ShardSet
    from slmforge.models import build_model
    from slmforge.train.optim import build_optimizer

    _, data = markov_shards
    cfg = run_config(data, tmp_path / "run", "train.max_steps=8", "train.eval_every=0", "train.grad_accum=2",
                     "optim.weight_decay=0.1")
    pretrain(cfg)
    trained = load_file(tmp_path / "run" / "checkpoints" / "step-000008" / "model.safetensors")

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, seed=cfg.train.seed)
    optimizer = build_optimizer(model, cfg.optim, "cpu")
    loader = WindowLoader(ShardSet(data, "train"), 64, 16, seed=cfg.train.seed)
    for step in range(8):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, 8, cfg.optim, cfg.schedule)
        for _ in range(2):
            tokens = loader.next_batch()["tokens"]
            logits = model.logits(model(tokens[:, :-1]))
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
            (loss / 2).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(trained[name], tensor, atol=2e-6, rtol=1e-5, msg=name)


def test_quiet_run_records_hardware_versions_and_training_time(markov_shards, tmp_path, capsys, monkeypatch):
    """`slmforge --quiet` prints no progress lines; meta.json records what ran where and for how long
    (training time summed over attempts), and train records carry the elapsed training time."""
    from slmforge.cli import main

    _, data = markov_shards
    monkeypatch.setenv("SLMFORGE_QUIET", "")  # restored after the test (main sets it for --quiet)
    args = ["pretrain", "model.preset=test-tiny", f"train.data={data}", "train.seq_len=32", "train.batch_size=8",
            "train.log_every=5", "train.save_every=10", f"train.out_dir={tmp_path / 'run'}"]
    assert main(["--quiet", *args, "train.max_steps=10"]) == 0
    assert main(["--quiet", *args, "train.max_steps=20"]) == 0  # resumed: time keeps adding up
    err = capsys.readouterr().err
    assert all(line.startswith("warning") for line in err.splitlines()), err
    meta = json.loads((tmp_path / "run" / "checkpoints" / "step-000020" / "meta.json").read_text())
    assert meta["hardware"]["device"] == "cpu" and meta["hardware"]["processes"] == 1
    assert meta["versions"]["torch"] == torch.__version__
    first = json.loads((tmp_path / "run" / "checkpoints" / "step-000010" / "meta.json").read_text())
    assert 0 < first["wall_time_s"] < meta["wall_time_s"]
    elapsed = [r["elapsed_s"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "train"]
    assert len(elapsed) == 4 and elapsed == sorted(elapsed) and elapsed[-1] <= meta["wall_time_s"]


def test_documents_option_keeps_documents_apart_inside_a_window(tmp_path):
    """objective.documents: a window holding the end of one document and the start of the next computes
    the second exactly as if it were alone, and its first token is not predicted from the first."""
    from conftest import word_level_tokenizer, write_shards

    from slmforge.fileio import write_json_atomic
    from slmforge.models import build_model, config_from_dict
    from slmforge.objectives.clm import CausalLM, ClmConfig

    tokenizer = word_level_tokenizer(tmp_path / "tok", [f"w{i}" for i in range(10)])
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    objective = CausalLM.for_tokenizer(ClmConfig(documents=True), tokenizer)
    window = torch.tensor([[7, 8, eos, bos, 9, 10, 11, eos, bos, 12]])
    batch = objective.collate({"tokens": window})
    assert batch["document_ids"].tolist() == [[0, 0, 0, 1, 1, 1, 1, 1, 2]]
    assert batch["targets"].tolist() == [[8, eos, -100, 9, 10, 11, eos, -100, 12]]
    model = build_model(config_from_dict({"preset": "test-tiny", "vocab_size": tokenizer.vocab_size}), seed=0).eval()
    with torch.no_grad():
        together = model(batch["input_ids"], document_ids=batch["document_ids"])[0, 3:8]
        alone = model(window[:, 3:8])[0]
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    with pytest.raises(SlmforgeError, match="objective.documents: needs the eos token"):
        CausalLM.for_tokenizer(ClmConfig(documents=True), None)

    rng = np.random.default_rng(0)
    documents = [np.array([bos, *rng.integers(5, 15, size=rng.integers(5, 30)), eos]) for _ in range(400)]
    data = write_shards(tmp_path / "data", {"train": documents[:360], "val": documents[360:]},
                        vocab_size=tokenizer.vocab_size)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["tokenizer"] = {"path": str(tmp_path / "tok"), "sha256": tokenizer.sha256}
    manifest["bos_id"] = bos
    write_json_atomic(data / "manifest.json", manifest)
    run = pretrain(run_config(data, tmp_path / "run", "train.max_steps=6", "train.seq_len=32",
                              "train.batch_size=4", "objective.documents=true"))
    assert config.load(PretrainConfig, run / "config.toml").objective.documents
    from slmforge.cli import main

    assert main(["eval", str(run), "--json"]) == 0  # evaluated as trained: documents apart


def test_parallel_settings_a_run_cannot_apply_are_said(markov_shards, tmp_path, capsys):
    _, data = markov_shards
    pretrain(run_config(data, tmp_path / "run", "train.max_steps=1", "train.batch_size=4",
                        "parallel.strategy=fsdp", "parallel.async_checkpoint=true"))
    err = capsys.readouterr().err
    assert 'note: parallel.strategy = "fsdp" on one process: nothing to spread' in err
    assert "note: parallel.async_checkpoint applies to FSDP2 runs" in err


def test_a_resumed_run_leaves_its_tokenizer_folder_untouched(mlm_markov_shards, tmp_path):
    """Other ranks read run/tokenizer while rank 0 prepares the run folder: on a resume, where it is
    already the data's tokenizer, it must not be rewritten under them (it was, file by file)."""
    from slmforge.data.shards import read_manifest
    from slmforge.train.pretrain import copy_tokenizer

    _, data = mlm_markov_shards
    run = tmp_path / "run"
    run.mkdir()
    manifest = read_manifest(data)
    copy_tokenizer(manifest, data, run)
    files = {p: (p.stat().st_ino, p.stat().st_ctime_ns) for p in (run / "tokenizer").iterdir()}
    assert files
    copy_tokenizer(manifest, data, run)
    assert {p: (p.stat().st_ino, p.stat().st_ctime_ns) for p in (run / "tokenizer").iterdir()} == files
