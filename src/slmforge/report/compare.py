"""Runs head to head: how each was optimized, where its validation loss ended, and how many tokens and
seconds of training each needed to reach every other run's final validation loss (an optimizer or
schedule compared at a glance: `slmforge report runs/adamw runs/muon`).

A validation record's `tokens` is the size of the validation set, so the tokens *trained* at a
validation step come from the train records around it (exact where one was logged at that step, linear
between logged steps otherwise), and so does the training time (`elapsed_s`, wall seconds spent
training). A loss target between two evaluations is reached where the line between them crosses it,
the rule of `python -m benchmarks.time_to_quality`.
"""

from __future__ import annotations

from dataclasses import dataclass

from slmforge.report.collect import RunFacts


@dataclass
class ValPoint:
    step: int
    tokens: float | None  # tokens trained by this step
    seconds: float | None  # wall seconds spent training by this step
    loss: float
    bpb: float | None


def val_points(run: RunFacts) -> list[ValPoint]:
    """The run's validation records with the tokens and training seconds behind each."""
    bpb = dict(run.series("bpb", "val"))
    return [ValPoint(step, _at(run, "tokens", step), _at(run, "elapsed_s", step), loss, bpb.get(step))
            for step, loss in run.series("loss", "val")]


def reach(points: list[ValPoint], target: float, key: str) -> float | None:
    """`key` ("tokens" or "seconds") at which the validation loss first falls to `target`, linear
    between evaluations; None if it never does (or the run did not record `key`)."""
    prev = None
    for p in points:
        if p.loss <= target:
            here = getattr(p, key)
            if prev is None or getattr(prev, key) is None or here is None:
                return here
            f = (prev.loss - target) / (prev.loss - p.loss)
            return getattr(prev, key) + f * (here - getattr(prev, key))
        prev = p
    return None


def optimizer_label(run: RunFacts) -> str:
    """optim.kind and its peak learning rate(s), from the resolved config."""
    optim = run.config.get("optim") or {}
    if not optim:
        return ""
    kind = optim.get("kind", "adamw")
    label = f"{kind}, lr {optim['lr']:g}" if "lr" in optim else str(kind)
    if kind == "muon" and "muon_lr" in optim:
        label += f" (muon_lr {optim['muon_lr']:g})"
    return label


def schedule_label(run: RunFacts) -> str:
    """Warmup, decay (with a WSD cooldown's share and shape) and floor, from the resolved config."""
    schedule = run.config.get("schedule") or {}
    if not schedule:
        return ""
    decay = str(schedule.get("decay", "cosine"))
    if decay == "wsd":
        decay += f" (cooldown {schedule.get('cooldown_ratio', 0.2):g}, {schedule.get('cooldown_shape', '1-sqrt')})"
    warmup = (f"warmup {schedule['warmup_steps']} steps" if schedule.get("warmup_steps")
              else f"warmup {schedule['warmup_ratio']:g} of the run" if schedule.get("warmup_ratio") else "no warmup")
    floor = f", floor {schedule['min_lr_ratio']:g}" if "min_lr_ratio" in schedule else ""
    return f"{decay}, {warmup}{floor}"


def head_to_head(runs: list[RunFacts]) -> tuple[list[str], list[list[str]]] | None:
    """(headers, rows) of one table, a column per run; None unless two or more runs evaluated."""
    points = [val_points(r) for r in runs]
    if len(runs) < 2 or sum(1 for p in points if p) < 2:
        return None
    rows = [["optimizer", *[optimizer_label(r) for r in runs]],
            ["schedule", *[schedule_label(r) for r in runs]],
            ["final validation loss", *[f"{p[-1].loss:.4f} (step {p[-1].step:,})" if p else "" for p in points]],
            ["final validation bits per byte", *[f"{p[-1].bpb:.4f}" if p and p[-1].bpb is not None else ""
                                                 for p in points]],
            ["tokens trained", *[_tokens(p[-1].tokens) if p else "" for p in points]],
            ["training time (wall)", *[_seconds(p[-1].seconds) if p else "" for p in points]]]
    for target_run, target in zip(runs, points):
        if not target or not same_objective(runs):  # a masked-LM loss is no target for a causal LM
            continue
        goal, own_tokens, own_seconds = target[-1].loss, target[-1].tokens, target[-1].seconds
        tokens_row, seconds_row = [f"tokens to reach {target_run.name}'s final loss"], \
            [f"training time to reach {target_run.name}'s final loss"]
        for p in points:
            if p and not any(q.loss <= goal for q in p):
                tokens_row.append("not reached")
                seconds_row.append("not reached")
                continue
            tokens, seconds = reach(p, goal, "tokens"), reach(p, goal, "seconds")
            tokens_row.append(_tokens(tokens) + _ratio(tokens, own_tokens))
            seconds_row.append(_seconds(seconds) + _ratio(seconds, own_seconds))
        rows += [tokens_row, seconds_row]
    rows = [row for row in rows if any(row[1:])]
    return ["", *[r.name for r in runs]], rows


def same_objective(runs: list[RunFacts]) -> bool:
    """Whether the runs' losses measure the same thing (one objective.kind in their resolved configs)."""
    return len({(r.config.get("objective") or {}).get("kind") for r in runs}) == 1


def _at(run: RunFacts, key: str, step: int) -> float | None:
    """`key` of the train records at `step`, linear between the logged steps around it (from 0 at step
    0); None past the last logged step or if no train record holds `key`."""
    known = [(0, 0.0), *run.series(key)]
    for (s0, v0), (s1, v1) in zip(known, known[1:]):
        if s0 <= step <= s1:
            return v1 if s1 == s0 else v0 + (v1 - v0) * (step - s0) / (s1 - s0)
    return None


def _tokens(value: float | None) -> str:
    return "" if value is None else f"{value:,.0f}"


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:,.1f} s"


def _ratio(value: float | None, own: float | None) -> str:
    """" (0.49x)": `value` as a share of what the target run itself needed."""
    return f" ({value / own:.2f}x)" if value is not None and own else ""
