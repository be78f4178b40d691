"""meta.json as one typed record (checkpoint.meta.CheckpointMeta): what real runs write reads back to
the same JSON, old files without the newer keys load, a wrong type is one line naming the file and
the field, and no module outside the record reads meta keys by hand."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from slmforge import config
from slmforge.checkpoint.meta import CheckpointMeta, FinetuneMeta
from slmforge.checkpoint.reading import open_run, read_meta
from slmforge.checkpoint.writing import save_checkpoint, seal_folder
from slmforge.errors import SlmforgeError
from slmforge.models import build_model, config_from_dict

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "slmforge"


def tiny_pretrain(data: Path, out: Path) -> Path:
    from slmforge.train.config import PretrainConfig
    from slmforge.train.pretrain import pretrain

    pretrain(config.load(PretrainConfig, overrides=[
        "model.preset=test-tiny", f"train.data={data}", "train.seq_len=32", "train.batch_size=4",
        "train.max_steps=2", "train.save_every=2", "train.eval_every=0", "train.log_every=1",
        f"train.out_dir={out}"]))
    return out / "checkpoints" / "step-000002"


def rewrite_meta(step_dir: Path, meta: dict) -> None:
    """Replace a step folder's meta.json and seal the folder again (as if training had written it)."""
    (step_dir / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    seal_folder(step_dir)


def test_a_pretrain_runs_meta_reads_back_to_the_same_json(markov_shards, tmp_path):
    _, data = markov_shards
    step_dir = tiny_pretrain(data, tmp_path / "run")
    text = (step_dir / "meta.json").read_text(encoding="utf-8")
    info = CheckpointMeta.read(step_dir)
    assert json.dumps(info.to_json(), indent=2, ensure_ascii=False) == text  # same keys, values and order
    assert info.step == 2 and info.tokens_seen == 2 * 4 * 32 and info.seq_len == 32
    assert info.objective_kind == "clm" and info.process_count == 1 and info.hardware["device"] == "cpu"
    assert isinstance(info.add_bos, bool) and isinstance(info.dropout_seeds, tuple)
    assert info.model_config().vocab_size == 16 and info.extra == {}
    assert info.path == step_dir / "meta.json"
    run = open_run(tmp_path / "run")
    assert run.info == info and run.meta == json.loads(text)
    run.meta["model"]["vocab_size"] = 99  # the plain dict is a copy: the record stays as read
    assert run.info.model["vocab_size"] == 16


def test_a_finetune_runs_meta_has_a_typed_finetune_record(tmp_path, capsys):
    from test_finetune import finetune_config

    from slmforge.finetune.run import finetune

    run = finetune(finetune_config(tmp_path, "train.max_steps=2", "train.save_every=2", "finetune.eval_samples=0",
                                   "train.batch_size=4", examples=32))
    step_dir = run / "checkpoints" / "step-000002"
    raw = json.loads((step_dir / "meta.json").read_text(encoding="utf-8"))
    info = CheckpointMeta.read(step_dir)
    assert info.to_json() == raw and list(info.to_json()) == list(raw)
    assert isinstance(info.finetune, FinetuneMeta) and info.finetune.task == "chat"
    assert info.stop_token == raw["finetune"]["stop_token"] and info.stop_token
    assert info.lora is None and info.finetune.examples == tuple(raw["finetune"]["examples"])
    assert info.config_section("finetune")["task"] == "chat" and info.config_section("nope") is None
    # `eval --examples` takes the example format and seq_len from the record.
    from slmforge.cli import main

    assert main(["eval", str(run), "--examples", f"held={tmp_path / 'val.jsonl'}", "--samples", "0", "--json"]) == 0
    assert (step_dir / "eval.json").is_file()


def test_an_old_meta_without_the_optional_keys_loads(tmp_path):
    model = build_model(config_from_dict({"preset": "test-tiny", "vocab_size": 16}), device="cpu", seed=0)
    step_dir = save_checkpoint(tmp_path / "run", 3, model)
    rewrite_meta(step_dir, {"step": 3, "model": read_meta(step_dir)["model"]})  # what the first versions wrote
    run = open_run(tmp_path / "run")
    info = run.info
    assert info.step == 3 and info.add_bos is True and info.seq_len is None and info.finetune is None
    assert info.objective_kind is None and info.tokenizer_sha256 is None and info.training_seconds is None
    assert run.data_dir() is None and info.to_json() == {"step": 3, "model": info.model}
    # Keys of older files are still understood; keys nobody knows are kept.
    old = CheckpointMeta.from_json({"elapsed_s": 12.5, "hardware": {"processes": 2}, "future": [1]}, Path("m.json"))
    assert old.training_seconds == 12.5 and old.process_count == 2 and old.extra == {"future": [1]}
    assert old.to_json() == {"elapsed_s": 12.5, "hardware": {"processes": 2}, "future": [1]}


@pytest.mark.parametrize("meta, field", [
    ({"seq_len": "64"}, "seq_len must be an integer or null, got str '64'"),
    ({"step": True}, "step must be an integer or null, got bool True"),
    ({"add_bos": "yes"}, "add_bos must be true or false, got str"),
    ({"add_bos": None}, "add_bos must be true or false, got NoneType"),
    ({"wall_time_s": "1s"}, "wall_time_s must be a number"),
    ({"model": []}, "model must be a JSON object"),
    ({"tokenizer_sha256": 12}, "tokenizer_sha256 must be a string"),
    ({"dropout_seeds": [1, "2"]}, "dropout_seeds must be a list of integers"),
    ({"objective": {"kind": 3}}, "objective.kind must be a string or null"),
    ({"hardware": {"processes": "2"}}, "hardware.processes must be an integer or null"),
    ({"finetune": ["chat"]}, "finetune must be a JSON object"),
    ({"finetune": {"stop_token": 5}}, "finetune.stop_token must be a string or null"),
    ({"finetune": {"examples": "a.jsonl"}}, "finetune.examples must be a list of strings"),
    ([1, 2], "the file must be a JSON object"),
])
def test_a_wrong_type_is_one_line_naming_the_file_and_field(meta, field):
    with pytest.raises(SlmforgeError) as e:
        CheckpointMeta.from_json(meta, Path("run/checkpoints/step-000002/meta.json"))
    message = str(e.value)
    assert message.startswith("run/checkpoints/step-000002/meta.json: ") and field in message
    assert "\n" not in message


def test_every_verb_refuses_a_meta_json_of_the_wrong_type_in_one_line(tmp_path):
    model = build_model(config_from_dict({"preset": "test-tiny", "vocab_size": 16}), device="cpu", seed=0)
    step_dir = save_checkpoint(tmp_path / "run", 1, model, extra_meta={"seq_len": 32})
    rewrite_meta(step_dir, {**read_meta(step_dir), "seq_len": "32"})
    with pytest.raises(SlmforgeError, match=r"step-000001/meta\.json: seq_len must be an integer or null, got str"):
        open_run(tmp_path / "run")
    # The report shows what it can, and says what it could not read.
    from slmforge.report.collect import collect

    facts = collect(tmp_path / "run")
    assert any("meta.json: seq_len must be an integer" in line for line in facts.warnings())


# ---------------------------------------------------------------- no meta keys read by hand

# Every reader asks CheckpointMeta (checkpoint.reading.Run.info, CheckpointMeta.read); none reads a key by hand.
# Other files named meta.json, or meta being built to be written: not a checkpoint's record.
OTHER_RECORDS = {
    "tokenizer/tokenizer.py": "the tokenizer's own meta (slmforge_tokenizer.json), a different record",
    "finetune/vocab.py": "the tokenizer's own meta (slmforge_tokenizer.json), a different record",
    "distill/cache.py": "the teacher cache's meta.json, a different record",
    "distill/run.py": "the teacher cache's meta.json, and the distill meta it writes",
}


def _meta_object(node: ast.AST, aliases: set[str]) -> bool:
    """`meta`, a name bound to a meta object, `anything.meta` (but a tokenizer's: `tokenizer.meta`,
    `tok.meta`) or `read_meta(...)`."""
    if isinstance(node, ast.Name):
        return node.id == "meta" or node.id in aliases
    if isinstance(node, ast.Attribute):
        return node.attr == "meta" and not (isinstance(node.value, ast.Name) and node.value.id in ("tokenizer", "tok"))
    if isinstance(node, ast.IfExp):  # saved = read_meta(d) if resuming else None
        return _meta_object(node.body, aliases) or _meta_object(node.orelse, aliases)
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "read_meta"


def _listed(name: str, listed) -> bool:
    return any(name == entry or (entry.endswith("/") and name.startswith(entry)) for entry in listed)


def hand_reads(package: Path, skip=tuple(OTHER_RECORDS)) -> list[str]:
    """`file:line` of every `meta[...]` / `meta.get(...)` read outside checkpoint/meta.py and `skip`."""
    found = []
    for path in sorted(package.rglob("*.py")):
        name = path.relative_to(package).as_posix()
        if name == "checkpoint/meta.py" or _listed(name, skip):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and _meta_object(node.value, aliases):
                aliases.update(t.id for t in node.targets if isinstance(t, ast.Name))
        for node in ast.walk(tree):
            read = (isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load)
                    and _meta_object(node.value, aliases)) or \
                   (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                    and _meta_object(node.func.value, aliases))
            if read:
                found.append(f"{name}:{node.lineno}")
    return sorted(found, key=lambda place: (place.split(":")[0], int(place.split(":")[1])))


def test_no_module_reads_checkpoint_meta_keys_by_hand():
    assert not hand_reads(PACKAGE), "read these through CheckpointMeta (run.info): " + ", ".join(hand_reads(PACKAGE))


def test_a_planted_hand_read_is_found(tmp_path):
    package = tmp_path / "slmforge"
    (package / "eval").mkdir(parents=True)
    (package / "eval" / "commands.py").write_text(
        "def f(run, step_dir, tokenizer):\n"
        "    a = run.meta.get('seq_len')\n"
        "    b = read_meta(step_dir)['step']\n"
        "    c = tokenizer.meta.get('kind')\n"  # the tokenizer's own record: not this one
        "    run.meta['x'] = 1\n"  # a write, not a read
        "    saved = read_meta(step_dir) if c else None\n"
        "    return saved.get('resume_identity')\n")
    assert hand_reads(package) == ["eval/commands.py:2", "eval/commands.py:3", "eval/commands.py:7"]
