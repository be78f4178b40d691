"""The distillation control's alone twin and smoothed adaptive alpha under torchrun and across a resume:
2 gloo processes give the verdict, the twin's numbers and the alphas of 1 process (to float rounding: sums
over ranks add in another order), and a run stopped and resumed inside the twin's window gives the
verdict and metrics of an uninterrupted one."""

from __future__ import annotations

import io
import re

import pytest
import torch

from conftest import crash_at_step, launch, untimed
from slmforge import config
from slmforge.distill.adaptive import AdaptiveAlpha, adaptive_alpha
from slmforge.distill.config import DistillRunConfig
from slmforge.distill.control import AloneTwin
from slmforge.distill.run import distill
from slmforge.objectives.clm import CausalLM
from slmforge.objectives.losses import HeadLoss
from slmforge.train.config import PretrainConfig
from slmforge.train.metrics import read_metrics
from slmforge.train.pretrain import pretrain

VERDICT = re.compile(r"distill: over steps (\d+)-(\d+), .* averaged ([0-9.]+), a twin .* schedule\) ([0-9.]+)")


def twin_figures(stderr: str) -> tuple[int, int, float, float]:
    """(first step, last step, student's mean loss, twin's) of the twin's verdict line."""
    (match,) = [VERDICT.search(line) for line in stderr.splitlines() if VERDICT.search(line)]
    return int(match[1]), int(match[2]), float(match[3]), float(match[4])


def student(data, out, teacher, *extra):
    return (f"train.data={data}", f"train.out_dir={out}", "train.seq_len=32", "train.max_steps=16",
            "train.log_every=1", "train.eval_every=8", "train.eval_batches=4", "train.save_every=4",
            "train.keep_last=0", "optim.lr=3e-3", "schedule.warmup_steps=3", "train.device=cpu",
            "model.preset=bert-tiny", "model.num_layers=1", "model.hidden_size=16", "model.num_heads=2",
            "model.intermediate_size=32", "model.max_seq_len=64", "model.dropout=0", "objective.kind=mlm",
            f"distill.teacher={teacher}", "distill.control_steps=8", *extra)


def teacher_run(data, out):
    return pretrain(config.load(PretrainConfig, overrides=[
        "model.preset=bert-tiny", "model.max_seq_len=64", "objective.kind=mlm", f"train.data={data}",
        "train.seq_len=32", "train.batch_size=16", "train.max_steps=40", "train.eval_every=0", "optim.lr=3e-3",
        "schedule.warmup_steps=0", f"train.out_dir={out}"]))


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_two_processes_give_the_twins_verdict_and_the_adaptive_alphas_of_one(mlm_markov_shards, tmp_path):
    """Masked LM (each rank's share holds its own number of targets), adaptive alpha smoothed over steps."""
    _, data = mlm_markov_shards
    teacher = teacher_run(data, tmp_path / "teacher")
    settings = ("distill.adaptive=true", "distill.adaptive_smoothing=0.5", "distill.adaptive_margin=0.5")
    one = launch(1, *student(data, tmp_path / "one", teacher, "train.batch_size=8", *settings), verb="distill")
    two = launch(2, *student(data, tmp_path / "two", teacher, "train.batch_size=4", *settings), verb="distill")
    assert "2 processes (ddp)" in two.stderr
    first, last, student_loss, twin_loss = twin_figures(one.stderr)
    assert (first, last) == (4, 7)
    figures = twin_figures(two.stderr)  # printed to 4 decimals: 1.5e-4 allows the rounding of either
    assert figures[:2] == (first, last)
    assert figures[2:] == pytest.approx((student_loss, twin_loss), abs=1.5e-4), (one.stderr, two.stderr)
    records = [[r for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"]
               for run in (tmp_path / "one", tmp_path / "two")]
    for x, y in zip(*records, strict=True):
        for name in ("loss", "alpha", "teacher_loss", "hard_loss"):
            assert x[name] == pytest.approx(y[name], abs=1e-5), (name, x, y)
    assert len({round(r["alpha"], 6) for r in records[0]}) > 1  # alpha moved, so the comparison means something


def test_a_run_resumed_inside_the_twins_window_gives_the_uninterrupted_verdict_and_metrics(
        mlm_markov_shards, tmp_path, monkeypatch, capsys):
    _, data = mlm_markov_shards
    teacher = teacher_run(data, tmp_path / "teacher")
    settings = ("train.batch_size=8", "distill.adaptive=true", "distill.adaptive_smoothing=0.5",
                "train.save_every=3")
    capsys.readouterr()
    straight = distill(config.load(DistillRunConfig, overrides=list(student(data, tmp_path / "straight", teacher,
                                                                            *settings))))
    expected = twin_figures(capsys.readouterr().err)
    resumed = tmp_path / "resumed"
    with crash_at_step(monkeypatch, 7):  # the checkpoint of step 6: inside the twin's second half (steps 4-7)
        distill(config.load(DistillRunConfig, overrides=list(student(data, resumed, teacher, *settings))))
    assert VERDICT.search(capsys.readouterr().err) is None  # the crash came before the twin's verdict
    distill(config.load(DistillRunConfig, overrides=list(student(data, resumed, teacher, *settings))))
    said = capsys.readouterr().err
    assert "resumed from" in said
    assert twin_figures(said) == expected
    assert untimed(resumed) == untimed(straight)
    state = torch.load(resumed / "checkpoints" / "step-000006" / "state.pt", weights_only=True)
    assert state["objective"]["twin"]["state"] == "running" and state["objective"]["adaptive"]["average"] is not None


# ---------------------------------------------------------------- the pieces, on one process


def tiny_training():
    from slmforge.models import build_model, config_from_dict
    from slmforge.train.config import OptimConfig, ScheduleConfig, TrainLoopConfig

    model = build_model(config_from_dict({"preset": "test-tiny", "vocab_size": 21}), "cpu", seed=0)
    objective = CausalLM()
    objective.use_head_loss(HeadLoss())
    return model, objective, (OptimConfig(lr=1e-2), ScheduleConfig(warmup_steps=2), TrainLoopConfig())


def run_twin(twin: AloneTwin, model, objective, steps: range, max_steps: int = 16) -> None:
    """The twin beside a student that stays as it is (its scores are the student's at the start)."""
    for step in steps:
        twin.advance(step, max_steps)
        tokens = torch.randint(5, 21, (4, 17), generator=torch.Generator().manual_seed(step))
        batch = objective.collate({"tokens": tokens})
        with torch.no_grad():
            hard, _ = objective.head_loss(*objective.predictions(model, batch))
        if twin.state == "waiting":
            twin.start(model)
        if twin.state == "running":
            twin.train_on(objective, model, batch, hard, 4 * 16)


def test_the_twins_state_goes_through_a_checkpoint_and_continues_exactly(capsys):
    model, objective, training = tiny_training()
    straight = AloneTwin(8, training)
    run_twin(straight, model, objective, range(9))
    capsys.readouterr()
    first = AloneTwin(8, training)
    run_twin(first, model, objective, range(6))
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)  # as the trainer state is written, and read back (weights_only)
    buffer.seek(0)
    second = AloneTwin(8, training)
    second.load_state_dict(torch.load(buffer, weights_only=True))
    run_twin(second, model, objective, range(6, 9))
    assert second.state == straight.state == "done"
    assert (second.student_sum, second.twin_sum, second.tokens) == (
        straight.student_sum, straight.twin_sum, straight.tokens)
    assert straight.twin_sum < straight.student_sum  # the twin learned: its scores moved away from the student's


def test_a_resume_into_the_window_without_the_twins_state_says_there_is_no_verdict(capsys):
    model, objective, training = tiny_training()
    twin = AloneTwin(8, training)
    run_twin(twin, model, objective, range(3, 9))
    said = capsys.readouterr().err
    assert "resumed at step 3, inside the alone twin's steps 0-7" in said and "no twin verdict" in said
    assert VERDICT.search(said) is None and twin.model is None
    after = AloneTwin(8, training)
    run_twin(after, model, objective, range(9, 10))  # after the window: nothing to say
    assert capsys.readouterr().err == ""


def test_smoothed_adaptive_alpha_follows_the_moving_average_of_the_gap():
    margin, smoothing = 0.1, 0.5
    adaptive = AdaptiveAlpha(margin, smoothing)
    count = torch.tensor(10)
    first = adaptive(torch.tensor(2.0), torch.tensor(1.9), count)  # no history yet: the batch's own gap
    torch.testing.assert_close(first, adaptive_alpha(torch.tensor(2.0), torch.tensor(1.9), margin))
    adaptive(torch.tensor(4.0), torch.tensor(3.9), torch.tensor(30))
    adaptive.step_done()  # the step's gap over its 40 targets: (2 x 10 + 4 x 30 - 1.9 x 10 - 3.9 x 30) / 140
    step_gap = (140 - 136) / 140
    torch.testing.assert_close(float(adaptive.average), step_gap)
    alpha = adaptive(torch.tensor(2.0), torch.tensor(2.0), count)  # a batch with no gap
    torch.testing.assert_close(float(alpha), 1 - smoothing * step_gap / margin, rtol=1e-5, atol=1e-6)
    assert float(adaptive_alpha(torch.tensor(2.0), torch.tensor(2.0), margin)) == 1.0  # unsmoothed: jumps to 1
    adaptive.step_done()
    torch.testing.assert_close(float(adaptive.average), smoothing * step_gap, rtol=1e-5, atol=1e-7)
    restored = AdaptiveAlpha(margin, smoothing)
    restored.load_state_dict(adaptive.state_dict())
    batch = (torch.tensor(3.0), torch.tensor(2.8), count)
    assert float(restored(*batch)) == float(adaptive(*batch))
    unsmoothed = AdaptiveAlpha(margin, 0.0)
    unsmoothed(torch.tensor(2.0), torch.tensor(1.0), count)
    unsmoothed.step_done()
    assert unsmoothed.average is None  # smoothing 0: nothing kept, the batch's gap alone
