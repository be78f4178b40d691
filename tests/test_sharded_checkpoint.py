"""Sharded (torch.distributed.checkpoint) step folders, on one process: what every rank writes, sealed
and checked like any step folder, read whole by eval/export, and loaded back into model and AdamW. The
multi-process side (FSDP2 writing them, resuming on 1 and 2 processes) is in test_distributed.py."""

from __future__ import annotations

import json

import pytest
import torch

from slmforge.errors import SlmforgeError
from slmforge.models.registry import build_model, config_from_dict
from slmforge.runs import check_integrity, checkpoint_tensors, newest_good_checkpoint, open_run, read_weights
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
