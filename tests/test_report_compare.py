"""`slmforge report RUN_A RUN_B` head to head: two real tiny runs that differ only by optim.kind (AdamW +
cosine against Muon + WSD) in one table (optimizer, schedule, final validation loss, tokens and seconds to
reach the other's final loss) and one figure of both validation curves against tokens trained."""

from __future__ import annotations


import pytest

from conftest import MarkovSource, markov_run_data
from slmforge import config
from slmforge.report import collect, make_report
from slmforge.report.compare import ValPoint, head_to_head, reach, val_points
from slmforge.train.config import PretrainConfig
from slmforge.train.pretrain import pretrain

STEPS, BATCH, SEQ = 20, 4, 32


@pytest.fixture(scope="module")
def adamw_and_muon(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report-compare")
    source = MarkovSource(vocab=16, seed=0)
    data = markov_run_data(tmp, source, [f"s{i}" for i in range(16)])
    runs = {}
    for name, extra in (("adamw", []), ("muon", ["optim.kind=muon", "schedule.decay=wsd"])):
        runs[name] = tmp / name
        pretrain(config.load(PretrainConfig, overrides=[
            f"train.data={data}", "model.preset=test-tiny", f"train.seq_len={SEQ}", f"train.batch_size={BATCH}",
            "schedule.warmup_steps=2", f"train.out_dir={runs[name]}", "train.log_every=5", "train.eval_every=5",
            "train.eval_batches=2", f"train.max_steps={STEPS}", "optim.lr=3e-3", *extra]))
    return runs["adamw"], runs["muon"]


def test_reach_is_linear_between_evaluations():
    points = [ValPoint(10, 100.0, 1.0, 5.0, None), ValPoint(20, 200.0, 3.0, 3.0, None),
              ValPoint(30, 300.0, 4.0, 3.5, None)]
    assert reach(points, 4.0, "tokens") == 150.0 and reach(points, 4.0, "seconds") == 2.0
    assert reach(points, 3.0, "tokens") == 200.0  # the first evaluation at the target, not a later one
    assert reach(points, 6.0, "tokens") == 100.0 and reach(points, 2.9, "tokens") is None


def test_tokens_at_a_validation_step_come_from_the_train_records(adamw_and_muon):
    adamw, _ = adamw_and_muon
    points = val_points(collect(adamw))
    assert [p.step for p in points] == [5, 10, 15, 20]
    assert [p.tokens for p in points] == [step * BATCH * SEQ for step in (5, 10, 15, 20)]  # not the val set's size
    assert all(p.seconds and p.seconds > 0 for p in points) and points[-1].bpb is not None


def test_two_runs_differing_by_optimizer_side_by_side(adamw_and_muon, tmp_path):
    adamw, muon = adamw_and_muon
    html_path, md_path = make_report([adamw, muon], tmp_path / "compare.html")
    md, html = md_path.read_text(), html_path.read_text()
    assert "## Head to head" in md and "<h2>Head to head</h2>" in html
    table = md.split("## Head to head")[1].split("## Config")[0]
    assert "| optimizer | adamw, lr 0.003 | muon, lr 0.003 (muon_lr 0.02) |" in table
    assert "| schedule | cosine, warmup 2 steps, floor 0.1 | wsd (cooldown 0.2, 1-sqrt), warmup 2 steps, floor 0.1 |" \
        in table
    assert f"| tokens trained | {STEPS * BATCH * SEQ:,} | {STEPS * BATCH * SEQ:,} |" in table

    finals = {name: val_points(collect(run))[-1].loss for name, run in (("adamw", adamw), ("muon", muon))}
    rows = {row[0]: row[1:] for row in head_to_head([collect(adamw), collect(muon)])[1]}
    for target in ("adamw", "muon"):
        tokens = rows[f"tokens to reach {target}'s final loss"]
        assert f"| tokens to reach {target}'s final loss | {tokens[0]} | {tokens[1]} |" in table
        for name, cell in zip(("adamw", "muon"), tokens):
            if finals[name] <= finals[target]:  # the run that ends lower (or the target itself) gets there
                value = float(cell.split(" ")[0].replace(",", ""))
                assert 0 < value <= STEPS * BATCH * SEQ, (target, name, cell)
                assert cell.endswith("x)"), cell
            elif all(p.loss > finals[target] for p in val_points(collect(adamw if name == "adamw" else muon))):
                assert cell == "not reached", (target, name, cell)
        assert all(cell.endswith(" s") or " s (" in cell or cell == "not reached"
                   for cell in rows[f"training time to reach {target}'s final loss"])
    # Both validation curves against tokens trained, in one figure, and in the page as in the Markdown.
    assert (tmp_path / "compare-val-loss-tokens.png").is_file() and "(compare-val-loss-tokens.png)" in md
    assert html.count("data:image/png;base64,") == md.count("![")


def test_one_run_has_no_head_to_head(adamw_and_muon, tmp_path):
    adamw, _ = adamw_and_muon
    make_report([adamw], tmp_path / "one.html")
    md = (tmp_path / "one.md").read_text()
    assert "Head to head" not in md and not (tmp_path / "one-val-loss-tokens.png").exists()
