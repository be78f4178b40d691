"""Sharded (torch.distributed.checkpoint) step folders, on one process: what every rank writes, sealed
and checked like any step folder, read whole by eval/export, and loaded back into model and AdamW. The
multi-process side (FSDP2 writing them, resuming on 1 and 2 processes) is in test_distributed.py."""

from __future__ import annotations

import json

import pytest
import torch

from slmforge.checkpoint.reading import check_integrity, checkpoint_tensors, newest_good_checkpoint, open_run, read_weights
from slmforge.errors import SlmforgeError
from slmforge.models.registry import build_model, config_from_dict
from slmforge.train.parallel import Distributed
from slmforge.train.sharded import ShardedCheckpoints, load_sharded


def tiny(**changes):
    return config_from_dict({"preset": "test-tiny", **changes})


def trained(seed: int = 0):
    model = build_model(tiny(), seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    step_once(model, optimizer, seed)
    return model, optimizer


def step_once(model, optimizer, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():  # any gradient will do: what matters is what gets saved
        param.grad = torch.randn(param.shape, generator=generator)
    optimizer.step()
    optimizer.zero_grad()


@pytest.mark.parametrize("background", [False, True])
def test_a_sharded_step_folder_holds_weights_and_optimizer_and_is_sealed(tmp_path, background):
    model, optimizer = trained()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    saved_moments = {k: v["exp_avg"].clone() for k, v in optimizer.state_dict()["state"].items()}
    writer = ShardedCheckpoints(tmp_path, Distributed(), torch.device("cpu"), background=background)
    folder = writer.save(3, model, optimizer, {"trainer": {"step": 3}}, {"note": "x"}, keep_last=None, protect=set())
    step_once(model, optimizer)  # a background write must hold the weights of the moment it was asked for
    assert writer.wait() in (None, folder)
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-000003"
    assert not (folder / "model.safetensors").exists() and (folder / "sharded" / ".metadata").is_file()
    listed = json.loads((folder / "checksums.json").read_text())
    assert "sharded/.metadata" in listed and any(name.endswith(".distcp") for name in listed)
    assert "optimizer" not in torch.load(folder / "state.pt")
    assert check_integrity(folder) is None

    tensors = checkpoint_tensors(folder)
    assert tensors.keys() == saved.keys()
    for name in saved:
        assert torch.equal(tensors[name], saved[name]), name

    fresh, fresh_optimizer = trained(seed=1)
    load_sharded(folder, fresh, fresh_optimizer)
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    for index, state in fresh_optimizer.state_dict()["state"].items():
        assert torch.equal(state["exp_avg"], saved_moments[index])

    run = open_run(tmp_path)  # eval, generate and export open it like any run
    for name, tensor in run.model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name


def test_a_damaged_shard_is_found_and_the_previous_checkpoint_used(tmp_path):
    model, optimizer = trained()
    writer = ShardedCheckpoints(tmp_path, Distributed(), torch.device("cpu"), background=False)
    first = writer.save(1, model, optimizer, {}, {}, keep_last=None, protect=set())
    step_once(model, optimizer)
    second = writer.save(2, model, optimizer, {}, {}, keep_last=None, protect=set())
    shard = next((second / "sharded").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert "sharded/" in check_integrity(second) and "sha256" in check_integrity(second)
    said = []
    assert newest_good_checkpoint(tmp_path, said.append) == first
    assert "step-000002" in said[0]


def test_a_sharded_checkpoint_of_another_architecture_is_refused_in_one_line(tmp_path):
    model, optimizer = trained()
    folder = ShardedCheckpoints(tmp_path, Distributed(), torch.device("cpu"), False).save(
        1, model, optimizer, {}, {}, keep_last=None, protect=set())
    other = build_model(tiny(intermediate_size=48), seed=0)
    with pytest.raises(SlmforgeError, match="shape"):
        read_weights(other, folder)
    with pytest.raises(SlmforgeError, match="shape"):
        load_sharded(folder, other, None)


def test_keep_last_prunes_sharded_folders_but_not_the_protected_one(tmp_path):
    model, optimizer = trained()
    writer = ShardedCheckpoints(tmp_path, Distributed(), torch.device("cpu"), background=True)
    for step in range(1, 5):
        writer.save(step, model, optimizer, {}, {}, keep_last=2, protect={"step-000001"})
    writer.wait()
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert names == ["step-000001", "step-000003", "step-000004"]


def test_a_shard_missing_from_the_folder_is_found_before_and_after_sealing(tmp_path, monkeypatch):
    """A rank whose checkpoints folder is not the shared one writes its shard elsewhere: rank 0 must not
    seal a folder without it, and a folder sealed so must not pass as intact."""
    from slmforge.checkpoint.reading import missing_shards
    from slmforge.train import sharded

    model, optimizer = trained()
    writer = ShardedCheckpoints(tmp_path, Distributed(), torch.device("cpu"), background=False)
    first = writer.save(1, model, optimizer, {}, {}, keep_last=None, protect=set())
    real_seal = sharded.seal_folder

    def lose_the_shard_then_seal(folder):
        for shard in (folder / "sharded").glob("*.distcp"):
            shard.unlink()
        real_seal(folder)

    monkeypatch.setattr(sharded, "missing_shards", lambda folder: ["__1_0.distcp"])
    with pytest.raises(SlmforgeError, match="shard __1_0.distcp written by another rank is not visible here"):
        writer.save(2, model, optimizer, {}, {}, keep_last=None, protect=set())
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == first.name
    assert not list((tmp_path / "checkpoints").glob("*.partial"))
    monkeypatch.setattr(sharded, "missing_shards", missing_shards)
    monkeypatch.setattr(sharded, "seal_folder", lose_the_shard_then_seal)  # what a sealed bad folder looks like
    third = writer.save(3, model, optimizer, {}, {}, keep_last=None, protect=set())
    assert "__0_0.distcp is missing" in check_integrity(third)
    assert newest_good_checkpoint(tmp_path) == first


def test_a_failed_seal_keeps_the_previous_checkpoint_and_a_failing_run_keeps_a_finished_write(tmp_path,
                                                                                             monkeypatch):
    from slmforge.train import sharded

    model, optimizer = trained()
    writer = ShardedCheckpoints(tmp_path, Distributed(), torch.device("cpu"), background=True)
    writer.save(1, model, optimizer, {}, {}, keep_last=None, protect=set())
    writer.wait()

    def full_disk(folder):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sharded, "seal_folder", full_disk)
    writer.save(2, model, optimizer, {}, {}, keep_last=None, protect=set())
    with pytest.raises(SlmforgeError, match="disk full while writing step-000002"):
        writer.wait()
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-000001"
    assert not (tmp_path / "checkpoints" / "step-000002.partial").exists()
    monkeypatch.undo()
    writer.save(3, model, optimizer, {}, {}, keep_last=None, protect=set())
    writer._pending.future.result()  # the shards are written; then the run fails
    writer.abandon()
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-000003"
    assert check_integrity(tmp_path / "checkpoints" / "step-000003") is None
