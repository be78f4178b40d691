"""Distillation: divergences (chunked = unchunked = reference gradients), the mixed objective, the
vocabulary map, and a distilled student beating the same student trained alone."""

from __future__ import annotations

import json

import statistics

import pytest
import torch
import torch.nn.functional as F

from slmforge import config
from slmforge.distill.config import DistillConfig, DistillRunConfig
from slmforge.distill.objective import Distillation
from slmforge.distill.run import distill
from slmforge.distill.teacher import Teacher, vocabulary_map
from slmforge.errors import SlmforgeError
from slmforge.models.heads import OutputProjection
from slmforge.objectives.clm import CausalLM
from slmforge.objectives.divergence import DIVERGENCES, chunked_divergence, row_divergence
from slmforge.train.config import PretrainConfig
from slmforge.train.metrics import read_metrics
from slmforge.train.pretrain import pretrain


def projections(seed=0, rows=37, d_s=8, d_t=12, vocab=23, bias=True):
    g = torch.Generator().manual_seed(seed)
    student = OutputProjection(torch.randn(rows, d_s, generator=g, requires_grad=True),
                               torch.randn(vocab, d_s, generator=g, requires_grad=True),
                               torch.randn(vocab, generator=g, requires_grad=True) if bias else None)
    teacher = OutputProjection(torch.randn(rows, d_t, generator=g), torch.randn(vocab, d_t, generator=g),
                               torch.randn(vocab, generator=g))
    return student, teacher


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_chunked_divergence_equals_the_unchunked_one_in_value_and_gradient(kind):
    student, teacher = projections()
    reference = row_divergence(student.logits().float(), teacher.logits().float(), kind, 2.0).mean()
    expected = torch.autograd.grad(reference, [student.features, student.weight, student.bias])
    for chunk in (1, 5, 64):
        value = chunked_divergence(student, teacher, kind, 2.0, chunk_rows=chunk)
        grads = torch.autograd.grad(value, [student.features, student.weight, student.bias])
        torch.testing.assert_close(value, reference, rtol=1e-5, atol=1e-6)
        for got, want in zip(grads, expected):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_forward_kl_gradient_is_t_times_q_minus_p():
    """Hand-computed: d/dz_s [T^2 KL(p || q)] = T (q - p) per row, with p, q at temperature T."""
    student, teacher = projections(seed=1, bias=False)
    logits = student.logits().detach().requires_grad_(True)
    T = 3.0
    loss = chunked_divergence(OutputProjection(torch.eye(23)[:0], student.weight), teacher, "forward_kl", T) * 0
    value = row_divergence(logits, teacher.logits(), "forward_kl", T).sum()
    (grad,) = torch.autograd.grad(value, logits)
    q, p = F.softmax(logits / T, -1), F.softmax(teacher.logits() / T, -1)
    torch.testing.assert_close(grad, T * (q - p), rtol=1e-5, atol=1e-6)
    assert float(loss) == 0.0  # zero rows: zero loss, no error


def test_a_student_identical_to_its_teacher_has_zero_divergence():
    _, teacher = projections(seed=2)
    same = OutputProjection(teacher.features.clone().requires_grad_(True), teacher.weight.clone(), teacher.bias.clone())
    for kind in DIVERGENCES:
        assert abs(float(chunked_divergence(same, teacher, kind, 1.7))) < 1e-6


def test_teacher_columns_renormalize_the_teacher_over_the_student_vocabulary():
    student, teacher = projections(seed=3, vocab=10)
    _, big = projections(seed=4, vocab=30)
    columns = torch.tensor([3, 7, 0, 29, 12, 5, 8, 21, 17, 2])
    value = chunked_divergence(student, big, "forward_kl", 1.0, teacher_columns=columns)
    kept = big.logits()[:, columns]  # log-softmax over the kept columns = renormalized probabilities
    reference = row_divergence(student.logits(), kept, "forward_kl", 1.0).mean()
    torch.testing.assert_close(value, reference, rtol=1e-5, atol=1e-6)


def test_alpha_one_is_the_plain_objective(mlm_markov_shards, tmp_path):
    from slmforge.models import build_model, config_from_dict

    cfg = config_from_dict({"preset": "test-tiny", "vocab_size": 21})
    student, teacher_model = build_model(cfg, "cpu", seed=0), build_model(cfg, "cpu", seed=1)
    objective = CausalLM()
    tokens = torch.randint(5, 21, (4, 17), generator=torch.Generator().manual_seed(0))
    batch = objective.collate({"tokens": tokens})
    teacher = Teacher(teacher_model, None, "test", torch.arange(21), True)
    plain, _ = objective.loss(student, batch)
    mixed, metrics = Distillation(objective, teacher, DistillConfig(teacher="x", alpha=1.0)).loss(student, batch)
    assert torch.equal(plain, mixed) and float(metrics["distill_loss"]) == 0.0
    half, metrics = Distillation(objective, teacher, DistillConfig(teacher="x", alpha=0.5)).loss(student, batch)
    assert float(metrics["distill_loss"]) > 0
    torch.testing.assert_close(half, 0.5 * plain + 0.5 * metrics["distill_loss"])


def test_scheduled_alpha_and_temperature_move_linearly():
    cfg = DistillConfig(teacher="x", alpha=0.2, alpha_end=0.8, temperature=4.0, temperature_end=1.0)
    assert cfg.at(0.0) == (0.2, 4.0) and cfg.at(1.0) == pytest.approx((0.8, 1.0))
    assert cfg.at(0.5) == pytest.approx((0.5, 2.5))


def test_vocabularies_without_a_mapping_fail_saying_how_to_trim(tmp_path):
    from conftest import word_level_tokenizer

    student = word_level_tokenizer(tmp_path / "s", ["a", "b", "zz"])
    teacher = word_level_tokenizer(tmp_path / "t", ["b", "a", "c"])
    with pytest.raises(SlmforgeError, match=r"1 of the student's 8 tokens .* 'zz'.* vocabulary cut from the teacher's"):
        vocabulary_map(student, teacher, "T")
    subset = word_level_tokenizer(tmp_path / "sub", ["a", "b"])
    mapping, identity = vocabulary_map(subset, teacher, "T")
    assert not identity and mapping.tolist() == [0, 1, 2, 3, 4, 6, 5]  # specials by role, words by string


# ---------------------------------------------------------------- training


def student_config(data, out, seed, *extra):
    return config.load(DistillRunConfig, overrides=[
        "model.preset=test-tiny", "model.hidden_size=16", "model.num_heads=2", "model.num_kv_heads=1",
        "model.intermediate_size=32", "model.num_layers=1", f"train.data={data}", "train.seq_len=32",
        "train.batch_size=8", "train.max_steps=60", "train.eval_every=0", "train.eval_batches=8",
        "train.save_every=60", "optim.lr=1e-2", "schedule.warmup_steps=5", f"train.seed={seed}",
        f"train.out_dir={out}", *extra])


def final_val_loss(run) -> float:
    return [r for r in read_metrics(run / "metrics.jsonl") if r["split"] == "val"][-1]["loss"]


def test_a_distilled_student_beats_the_same_student_trained_alone(mlm_markov_shards, tmp_path):
    _, data = mlm_markov_shards
    teacher = pretrain(config.load(PretrainConfig, overrides=[
        "model.preset=test-tiny", f"train.data={data}", "train.seq_len=32", "train.batch_size=16",
        "train.max_steps=300", "train.eval_every=0", "optim.lr=3e-3", "schedule.warmup_steps=20",
        f"train.out_dir={tmp_path / 'teacher'}"]))
    margins = []
    for seed in (1, 2, 3):
        alone = distill(student_config(data, tmp_path / f"alone{seed}", seed, f"distill.teacher={teacher}",
                                       "distill.alpha=1.0"))
        taught = distill(student_config(data, tmp_path / f"taught{seed}", seed, f"distill.teacher={teacher}",
                                        "distill.alpha=0.0", "distill.temperature=1.0"))
        margins.append(final_val_loss(alone) - final_val_loss(taught))
    print(f"held-out loss, alone - distilled, per seed: {', '.join(f'{m:.4f}' for m in margins)}; "
          f"mean {statistics.mean(margins):.4f}")
    assert statistics.mean(margins) > 0.01, margins
    records = read_metrics(tmp_path / "taught1" / "metrics.jsonl")
    assert all("distill_loss" in r and "hard_loss" in r for r in records if r["split"] == "train")
    # validation measures the student alone: no distillation figures (not zeros) there
    assert all("distill_loss" not in r and "hard_loss" not in r for r in records if r["split"] == "val")


def test_distill_runs_resumes_and_records_its_teacher(mlm_markov_shards, tmp_path):
    import json

    _, data = mlm_markov_shards
    teacher = pretrain(config.load(PretrainConfig, overrides=[
        "model.preset=test-tiny", f"train.data={data}", "train.seq_len=32", "train.batch_size=8",
        "train.max_steps=5", f"train.out_dir={tmp_path / 'teacher'}"]))
    text = tmp_path / "markov.txt"
    text.write_text("".join(" ".join(f"s{(i * 7 + j) % 16}" for j in range(20)) + "\n" for i in range(10)))
    common = (f"distill.teacher={teacher}", "train.save_every=3", "distill.divergence=js",
              f"distill.eval_texts.markov={text}")
    run = distill(student_config(data, tmp_path / "student", 0, "train.max_steps=6", *common))
    again = distill(student_config(data, tmp_path / "student", 0, "train.max_steps=8", *common))
    assert again == run
    meta = json.loads((run / "checkpoints" / "step-000008" / "meta.json").read_text())
    assert meta["distill"]["teacher"] == str(teacher) and meta["distill"]["divergence"] == "js"
    report = json.loads((run / "distill_report.json").read_text())
    assert report["teacher"]["parameters"] > report["student"]["parameters"] and report["compression"] > 1
    for side in ("teacher", "student"):
        assert report[side]["markov"]["bpb"] > 0 and report[side]["forward_tokens_per_s"] > 0
    rows = json.loads((run / "checkpoints" / "step-000008" / "eval.json").read_text())
    assert rows["markov"]["model"] == "student" and rows["teacher markov"]["model"] == "teacher"
    with pytest.raises(SlmforgeError, match="distill.teacher: required"):
        config.load(DistillRunConfig, overrides=[f"train.data={data}"])


def test_topk_forward_kl_with_every_token_is_the_full_forward_kl():
    student, teacher = projections(seed=5, vocab=23)
    ids = torch.arange(23).expand(37, 23).contiguous()
    full = chunked_divergence(student, teacher, "forward_kl", 2.0, chunk_rows=8)
    grads_full = torch.autograd.grad(full, [student.features, student.weight])
    from slmforge.objectives.divergence import topk_forward_kl

    top = topk_forward_kl(student, ids, teacher.logits().detach(), 2.0, chunk_rows=5)
    grads_top = torch.autograd.grad(top, [student.features, student.weight])
    torch.testing.assert_close(top, full, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_top, grads_full):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_training_from_the_teacher_cache_follows_the_online_teacher(mlm_markov_shards, tmp_path, capsys):
    """A cache of every token's logit (k = vocabulary) is the online teacher up to float16 storage; a
    cache built for another seed is refused."""
    from slmforge.cli import main

    _, data = mlm_markov_shards
    teacher = pretrain(config.load(PretrainConfig, overrides=[
        "model.preset=test-tiny", f"train.data={data}", "train.seq_len=32", "train.batch_size=8",
        "train.max_steps=20", "model.max_seq_len=32", f"train.out_dir={tmp_path / 'teacher'}"]))
    common = ["model.preset=test-tiny", "model.num_layers=1", f"train.data={data}", "train.seq_len=32",
              "train.batch_size=8", "train.max_steps=12", "train.log_every=1", "train.eval_every=0",
              f"distill.teacher={teacher}", "distill.alpha=0.3", "distill.temperature=2", "distill.top_k=21"]
    assert main(["distill", *common, "--build-cache", str(tmp_path / "cache")]) == 0
    said = capsys.readouterr().err
    assert "covering 100.0% of the teacher's probability" in said and "warning" not in said
    assert main(["distill", *common, "distill.top_k=2", "--build-cache", str(tmp_path / "cache2")]) == 0
    coverage = json.loads((tmp_path / "cache2" / "meta.json").read_text())["coverage"]
    assert 0 < coverage < 0.8  # two of 21 tokens of a barely trained teacher
    assert f"warning: the teacher's top-2 tokens hold only {coverage:.1%}" in capsys.readouterr().err
    online = distill(config.load(DistillRunConfig, overrides=[*common, f"train.out_dir={tmp_path / 'online'}"]))
    cached = distill(config.load(DistillRunConfig, overrides=[
        *common, f"distill.teacher_cache={tmp_path / 'cache'}", f"train.out_dir={tmp_path / 'cached'}"]))
    a = [r for r in read_metrics(online / "metrics.jsonl") if r["split"] == "train"]
    b = [r for r in read_metrics(cached / "metrics.jsonl") if r["split"] == "train"]
    assert len(a) == len(b) == 12
    for x, y in zip(a, b):
        assert x["distill_loss"] == pytest.approx(y["distill_loss"], rel=3e-3, abs=1e-4), (x, y)
        assert x["hard_loss"] == pytest.approx(y["hard_loss"], rel=3e-3), (x, y)
    with pytest.raises(SlmforgeError, match=r"covers 1 epoch\(s\) of the data, this run reaches \d+"):
        distill(config.load(DistillRunConfig, overrides=[
            *common, "train.max_steps=500", f"distill.teacher_cache={tmp_path / 'cache'}",
            f"train.out_dir={tmp_path / 'long'}"]))
    assert not (tmp_path / "long" / "checkpoints").exists()  # refused before training
    with pytest.raises(SlmforgeError, match="distill.eval_texts.hi: nope.txt: no such file"):
        distill(config.load(DistillRunConfig, overrides=[*common, "distill.eval_texts.hi=nope.txt"]))
    with pytest.raises(SlmforgeError, match="train.seq_len: 40 exceeds the teacher's context"):
        distill(config.load(DistillRunConfig, overrides=[*common, "train.seq_len=40", "model.max_seq_len=64",
                                                         f"train.out_dir={tmp_path / 'wide'}"]))
    with pytest.raises(SlmforgeError, match="built for another seed"):
        distill(config.load(DistillRunConfig, overrides=[
            *common, "train.seed=7", f"distill.teacher_cache={tmp_path / 'cache'}", f"train.out_dir={tmp_path / 'x'}"]))


def test_hidden_state_matching_trains_its_projection_and_resumes_exactly(mlm_markov_shards, tmp_path, monkeypatch):
    """Student width 16, teacher 32: a learned projection maps one to the other; it is optimized with
    the student (the hidden-state distance falls) and saved with the trainer state, so a crashed and
    resumed run ends bitwise equal to a straight one."""
    from slmforge.distill.objective import hidden_distance
    from conftest import crash_at_step

    features = torch.randn(5, 8)
    assert float(hidden_distance(features, features, None, "cosine")) < 1e-6
    assert float(hidden_distance(features, features, None, "mse")) == 0.0

    _, data = mlm_markov_shards
    teacher = pretrain(config.load(PretrainConfig, overrides=[
        "model.preset=test-tiny", f"train.data={data}", "train.seq_len=32", "train.batch_size=8",
        "train.max_steps=5", f"train.out_dir={tmp_path / 'teacher'}"]))
    common = (f"distill.teacher={teacher}", "distill.hidden_weight=1.0", "distill.hidden_loss=mse",
              "train.max_steps=16", "train.save_every=8", "train.log_every=4")
    straight = distill(student_config(data, tmp_path / "straight", 0, *common))
    losses = [r["hidden_loss"] for r in read_metrics(straight / "metrics.jsonl") if r["split"] == "train"]
    assert losses[-1] < losses[0], losses
    with crash_at_step(monkeypatch, 11):
        distill(student_config(data, tmp_path / "resumed", 0, *common))
    resumed = distill(student_config(data, tmp_path / "resumed", 0, *common))
    from safetensors.torch import load_file

    a = load_file(straight / "checkpoints" / "step-000016" / "model.safetensors")
    b = load_file(resumed / "checkpoints" / "step-000016" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = torch.load(resumed / "checkpoints" / "step-000016" / "state.pt", weights_only=True)
    assert state["objective_parameters"]["weight"].shape == (32, 16)


def test_divergences_keep_finite_gradients_for_tokens_both_models_find_impossible():
    student = torch.tensor([[0.0, -200.0, 5.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, -300.0, 3.0]])
    for kind in DIVERGENCES:
        value = row_divergence(student, teacher, kind, 1.0).sum()
        (grad,) = torch.autograd.grad(value, student)
        assert torch.isfinite(value) and torch.isfinite(grad).all(), kind


def test_the_cache_covers_every_epoch_the_loader_reaches():
    """The loader drops each epoch's last partial global batch: 10 windows in batches of 4 give two
    batches per epoch, so 5 steps reach into the third epoch."""
    from slmforge.distill.cache import epochs_needed

    assert epochs_needed(max_steps=5, global_batch=4, grad_accum=1, windows=10) == 3
    assert epochs_needed(max_steps=4, global_batch=4, grad_accum=1, windows=10) == 2
    assert epochs_needed(max_steps=2, global_batch=2, grad_accum=2, windows=10) == 1
