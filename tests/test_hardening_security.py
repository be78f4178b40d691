"""Files we read cannot run code or send a write outside their folder: a planted pickle in a sharded
checkpoint, names in progress/manifest/checksums files, `checkpoints/latest`, a missing checksums list."""

from __future__ import annotations

import io
import json
import pickle
import shutil

import numpy as np
import pytest
import torch

from slmforge.checkpoint.reading import UNVERIFIED, check_integrity, newest_good_checkpoint, open_run, resolve_checkpoint
from slmforge.checkpoint.safe_dcp import UnsafeCheckpoint, safe_planner
from slmforge.checkpoint.writing import save_checkpoint, seal_folder
from slmforge.cli import main
from slmforge.data.shards import ShardSet, ShardWriter
from slmforge.errors import SlmforgeError
from slmforge.models.registry import build_model, config_from_dict
from slmforge.train.parallel import Distributed
from slmforge.train.sharded import ShardedCheckpoints, load_sharded


class Payload:
    """Unpickling this calls open(marker, "w"): a stand-in for os.system that leaves a trace."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def sharded_run(root):
    """A run folder whose one checkpoint is a sealed torch.distributed.checkpoint folder."""
    model = build_model(config_from_dict({"preset": "test-tiny"}), seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    writer = ShardedCheckpoints(root, Distributed(), torch.device("cpu"), background=False)
    return writer.save(2, model, optimizer, {"trainer": {"step": 2}}, {}, keep_last=None, protect=set())


def plant(step_dir, marker):
    """Replace .metadata with a payload, then reseal so the checksums match (as an attacker would)."""
    (step_dir / "sharded" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    (step_dir / "checksums.json").unlink()
    seal_folder(step_dir)


def test_a_planted_metadata_pickle_runs_for_no_verb(tmp_path, markov_shards, capsys):
    data = markov_shards[1]
    run = tmp_path / "run"
    step = sharded_run(run)
    marker = tmp_path / "pwned"
    plant(step, marker)

    assert "refuses to load io.open" in check_integrity(step)
    with pytest.raises(SlmforgeError, match="damaged"):
        open_run(run)  # what eval, generate, export, fill-mask, translate and a teacher open
    assert newest_good_checkpoint(run) is None  # what a resume picks
    with pytest.raises(UnsafeCheckpoint):
        load_sharded(step, build_model(config_from_dict({"preset": "test-tiny"}), seed=0), None)
    for argv in (["eval", str(run)], ["generate", str(run), "-p", "x"],
                 ["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf")],
                 ["pretrain", "model.preset=test-tiny", f"train.out_dir={run}", f"train.data={data}",
                  "train.seq_len=32", "train.device=cpu"],
                 ["pretrain", f"train.init_from={run}", f"train.out_dir={tmp_path / 'new'}", f"train.data={data}",
                  "train.seq_len=32", "train.device=cpu"]):
        assert main(argv) == 2, argv
        assert not marker.exists(), argv
    assert "io.open" in capsys.readouterr().err


def test_a_planted_byte_item_is_refused_by_the_load_planner(tmp_path):
    marker = tmp_path / "pwned"
    blob = io.BytesIO()
    torch.save(Payload(marker), blob)
    blob.seek(0)

    class Item:
        class dest_index:
            fqn = "optimizer.param_groups.0.lr"

    with pytest.raises(UnsafeCheckpoint, match="optimizer.param_groups.0.lr"):
        safe_planner().load_bytes(Item, blob)
    assert not marker.exists()


def test_metadata_naming_a_shard_outside_its_folder_is_refused(tmp_path):
    step = sharded_run(tmp_path / "run")
    from slmforge.checkpoint.safe_dcp import read_metadata

    metadata = read_metadata(step / "sharded")
    info = next(iter(metadata.storage_data.values()))
    info.relative_path = "../../../elsewhere.distcp"
    (step / "sharded" / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(SlmforgeError, match="not a file name inside this folder"):
        read_metadata(step / "sharded")


def test_a_resumed_prepare_never_writes_outside_its_folder(tmp_path):
    folder = tmp_path / "data" / "out"
    folder.mkdir(parents=True)
    writer = ShardWriter(folder, "train", np.dtype(np.uint16), shard_tokens=100)
    writer.add(np.arange(10, dtype=np.uint16), text_bytes=10)
    writer.sync()
    state = json.loads(json.dumps(writer.state()))
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    state["current"]["name"] = "../../victim.txt"
    with pytest.raises(SlmforgeError, match="progress names the open train shard"):
        ShardWriter.resume(folder, "train", np.dtype(np.uint16), 100, state)
    state["current"]["name"] = "train-00000.bin"
    state["shards"] = [{"name": "/etc/passwd", "tokens": 0, "documents": 0, "bytes": 0}]
    with pytest.raises(SlmforgeError, match="not a file name inside"):
        ShardWriter.resume(folder, "train", np.dtype(np.uint16), 100, state)
    assert victim.read_text() == "keep me"


def test_a_manifest_naming_a_shard_outside_its_folder_is_refused(tmp_path):
    from conftest import write_shards

    data = write_shards(tmp_path / "data", {"train": [np.arange(50) % 16]}, vocab_size=16)
    outside = tmp_path / "outside.bin"
    shutil.copy(data / "train-00000.bin", outside)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["name"] = "../outside.bin"
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SlmforgeError, match="not a file name inside"):
        ShardSet(data, "train")


def test_a_checksums_list_naming_a_file_outside_the_folder_is_a_damaged_checkpoint(tmp_path):
    model = build_model(config_from_dict({"preset": "test-tiny"}), seed=0)
    step = save_checkpoint(tmp_path / "run", 1, model)
    listed = json.loads((step / "checksums.json").read_text())
    (tmp_path / "run" / "secret").write_text("x")
    listed["../../secret"] = {"bytes": 1, "sha256": "0" * 64}
    (step / "checksums.json").write_text(json.dumps(listed))
    assert "not a file of this folder" in check_integrity(step)


@pytest.mark.parametrize("target", ["/elsewhere/step-000001", "../../other/checkpoints/step-000001", "step-1/../x"])
def test_latest_may_name_only_a_step_folder_of_its_own_checkpoints(tmp_path, target, capsys):
    model = build_model(config_from_dict({"preset": "test-tiny"}), seed=0)
    other = tmp_path / "other"
    save_checkpoint(other, 1, model)
    run = tmp_path / "a" / "b"
    save_checkpoint(run, 1, model)
    save_checkpoint(run, 2, model)
    (run / "checkpoints" / "latest").write_text(target.replace("/elsewhere", str(other / "checkpoints")) + "\n")
    with pytest.raises(SlmforgeError, match="not a step-N folder"):
        resolve_checkpoint(run)
    warnings = []
    assert newest_good_checkpoint(run, warnings.append) == run / "checkpoints" / "step-000002"
    assert "not a step-N folder" in warnings[0]
    assert main(["eval", str(run)]) == 2
    assert not (other / "checkpoints" / "step-000001" / "eval.json").exists()


def test_a_checkpoint_without_checksums_is_unverified_and_resume_falls_back(tmp_path, capsys):
    model = build_model(config_from_dict({"preset": "test-tiny"}), seed=0)
    run = tmp_path / "run"
    save_checkpoint(run, 1, model)
    newest = save_checkpoint(run, 2, model)
    (newest / "checksums.json").unlink()
    raw = bytearray((newest / "model.safetensors").read_bytes())
    raw[-3] ^= 0xFF  # damage nobody can see any more
    (newest / "model.safetensors").write_bytes(bytes(raw))
    assert check_integrity(newest) == UNVERIFIED
    warnings = []
    assert newest_good_checkpoint(run, warnings.append) == run / "checkpoints" / "step-000001"
    assert "cannot be verified" in warnings[0]
    # With no verified one left, the unverified one is used, saying so.
    shutil.rmtree(run / "checkpoints" / "step-000001")
    warnings.clear()
    assert newest_good_checkpoint(run, warnings.append) == newest
    assert "no verified checkpoint" in warnings[-1]
    # A read verb opens it with a warning (its weights are still checked when read).
    open_run(newest)
    assert "cannot be verified" in capsys.readouterr().err


def test_a_damaged_safetensors_header_falls_back_even_with_matching_checksums(tmp_path):
    model = build_model(config_from_dict({"preset": "test-tiny"}), seed=0)
    run = tmp_path / "run"
    save_checkpoint(run, 1, model)
    newest = save_checkpoint(run, 2, model)
    raw = bytearray((newest / "model.safetensors").read_bytes())
    raw[8:12] = b"\xff\xfe\x00{"  # the JSON header's first bytes
    (newest / "model.safetensors").write_bytes(bytes(raw))
    (newest / "checksums.json").unlink()
    seal_folder(newest)
    assert "model.safetensors cannot be read" in check_integrity(newest)
    assert newest_good_checkpoint(run) == run / "checkpoints" / "step-000001"
