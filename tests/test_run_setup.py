"""The one run set-up (train/run.py) and the checkpointer (train/checkpointer.py): every training verb
goes through the set-up, and their step folders keep the meta.json keys readers know."""

from __future__ import annotations

import json

import pytest
import torch

from slmforge import config
from slmforge.checkpoint.reading import resolve_checkpoint
from slmforge.distill.config import DistillRunConfig
from slmforge.distill.run import distill
from slmforge.errors import SlmforgeError
from slmforge.finetune.config import FinetuneConfig
from slmforge.finetune.run import finetune
from slmforge.models import build_model, config_from_dict
from slmforge.train.checkpointer import Checkpointer
from slmforge.train.config import PretrainConfig
from slmforge.train.parallel import Distributed, ParallelConfig
from slmforge.train.pretrain import pretrain
from slmforge.train.run import TrainingRun

# What every step folder's meta.json holds (the keys of the runs before the set-up was one).
COMMON_KEYS = {"step", "model", "slmforge_version", "tokenizer_sha256", "seq_len", "add_bos", "processes", "config",
               "data_fingerprint", "resume_identity", "dropout_seeds", "hardware", "versions", "tokens_seen",
               "wall_time_s"}
KEYS = {PretrainConfig: COMMON_KEYS | {"data", "objective"},
        DistillRunConfig: COMMON_KEYS | {"data", "objective", "distill"},
        FinetuneConfig: COMMON_KEYS | {"objective", "finetune"}}


@pytest.fixture
def set_up_calls(monkeypatch):
    """Each call of the set-up's steps, by the config class of the verb that made it."""
    calls: list[tuple[str, type]] = []
    start, fit_resolved = TrainingRun.start.__func__, TrainingRun.fit_resolved

    def recording_start(cls, cfg, session):
        calls.append(("start", type(cfg)))
        return start(cls, cfg, session)

    def recording_fit(self, parts):
        calls.append(("fit", type(self.cfg)))
        return fit_resolved(self, parts)

    monkeypatch.setattr(TrainingRun, "start", classmethod(recording_start))
    monkeypatch.setattr(TrainingRun, "fit_resolved", recording_fit)
    return calls


def last_meta(run) -> dict:
    return json.loads((resolve_checkpoint(run) / "meta.json").read_text())


def test_pretrain_distill_and_finetune_each_go_through_the_one_set_up(mlm_markov_shards, tmp_path, set_up_calls):
    from conftest import word_level_tokenizer

    _, data = mlm_markov_shards
    short = ("model.preset=test-tiny", "train.seq_len=32", "train.batch_size=8", "train.max_steps=2",
             "train.eval_every=0")
    teacher = pretrain(config.load(PretrainConfig, overrides=[*short, f"train.data={data}",
                                                              f"train.out_dir={tmp_path / 'teacher'}"]))
    student = distill(config.load(DistillRunConfig, overrides=[
        *short, "model.num_layers=1", f"train.data={data}", f"distill.teacher={teacher}",
        f"train.out_dir={tmp_path / 'student'}"]))
    word_level_tokenizer(tmp_path / "tok", ["a", "b", "user", "assistant", "system"])
    examples = tmp_path / "train.jsonl"
    examples.write_text("".join(json.dumps({"prompt": "a b", "response": "b a"}) + "\n" for _ in range(100)))
    tuned = finetune(config.load(FinetuneConfig, overrides=[
        *short, f"finetune.tokenizer={tmp_path / 'tok'}", f'finetune.train_files=["{examples}"]',
        "finetune.val_fraction=0", "finetune.eval_samples=0", f"train.out_dir={tmp_path / 'tuned'}"]))

    verbs = [PretrainConfig, DistillRunConfig, FinetuneConfig]
    assert set_up_calls == [(step, verb) for verb in verbs for step in ("start", "fit")]
    for run, verb in zip((teacher, student, tuned), verbs):
        meta = last_meta(run)
        assert set(meta) == KEYS[verb], (verb.__name__, set(meta) ^ KEYS[verb])
        assert meta["step"] == 2 and meta["processes"] == 1 and meta["dropout_seeds"] == [1337]
        assert meta["resume_identity"]["data_fingerprint"] == meta["data_fingerprint"]
    assert last_meta(tuned)["resume_identity"]["finetune.packing"] is True  # the verb's own identity fields


def tiny(seed: int = 0):
    return build_model(config_from_dict({"preset": "test-tiny", "vocab_size": 16}), device="cpu", seed=seed)


def checkpointer_for(run_dir, model, keep_last: int = 0) -> Checkpointer:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return Checkpointer(run_dir, model, optimizer, meta={"seq_len": 8}, where=Distributed(),
                        device=torch.device("cpu"), strategy="none", model_sharded=False,
                        parallel=ParallelConfig(), keep_last=keep_last)


def test_the_checkpointer_writes_prunes_refuses_nan_and_restores(tmp_path):
    model = tiny(seed=1)
    checkpointer = checkpointer_for(tmp_path, model, keep_last=2)
    for step in (1, 2, 3, 4):
        state = {"trainer": {"step": step}}
        folder = checkpointer.save(step, lambda optimizer, s=state: (s, {"tokens_seen": 10, "wall_time_s": 0.5}),
                                   protect={"step-000001"})  # the best: never pruned
    assert folder.name == "step-000004"
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == \
        ["step-000001", "step-000003", "step-000004"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-000004"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["step"] == 4 and meta["seq_len"] == 8 and meta["tokens_seen"] == 10 and "model" in meta
    assert (folder / "checksums.json").is_file()

    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    with pytest.raises(SlmforgeError, match="step 5: weights are not finite"):
        checkpointer.save(5, lambda optimizer: ({}, {}), protect=set())
    assert not (tmp_path / "checkpoints" / "step-000005").exists()

    other = tiny(seed=2)
    restored = checkpointer_for(tmp_path, other).restore(tmp_path)
    assert restored.folder.name == "step-000004" and restored.state == {"trainer": {"step": 4}}
    saved = tiny(seed=1)
    for (name, a), b in zip(saved.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name
