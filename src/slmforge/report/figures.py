"""The report's figures as PNG bytes: curves of every run overlaid (one colour per run, train solid,
validation dashed with markers) and per-set evaluation bars. A figure no run has data for is not made."""

from __future__ import annotations

import io
from dataclasses import dataclass

from slmforge.report.collect import RunFacts, eval_columns

# One colour per run, in order (matplotlib's tab10); the browser test looks for the first two.
RUN_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
              "#bcbd22", "#17becf"]

# (key, split(s), y label, log scale); MFU is shown when recorded, else achieved TFLOP/s.
CURVES = [
    ("loss", ("train", "val"), "loss (nats / token)", False),
    ("lr", ("train",), "learning rate", False),
    ("grad_norm", ("train",), "gradient norm (before clipping)", True),
    ("tokens_per_s", ("train",), "tokens / s", False),
    ("mfu", ("train",), "MFU (model FLOPs utilisation)", False),
    ("tflops", ("train",), "achieved TFLOP/s", False),
    ("bpb", ("val",), "validation bits per byte", False),
    ("accuracy", ("train", "val"), "accuracy (next-token or masked-token)", False),
]
# Record fields that are not curves of their own (perplexity is exp(loss): the loss figure shows it).
NOT_CURVES = {"step", "split", "tokens", "ppl", "skipped", "skipped_steps", "elapsed_s", "time"}
MAX_EXTRA_CURVES = 12


@dataclass
class Figure:
    name: str  # file stem: loss, lr, eval-bpb, ...
    title: str
    png: bytes


def color(index: int) -> str:
    return RUN_COLORS[index % len(RUN_COLORS)]


def make_figures(runs: list[RunFacts]) -> list[Figure]:
    figures = []
    has_mfu = any(r.has("mfu") for r in runs)
    for key, splits, label, log_y in CURVES:
        if key == "tflops" and has_mfu:
            continue
        if any(r.has(key, split) for r in runs for split in splits):
            figures.append(_curves(runs, key, splits, label, log_y))
    # What else an objective logs (a distillation loss, a teacher's loss, ...) gets a figure too.
    known = NOT_CURVES | {key for key, *_ in CURVES}
    extra = sorted({k for r in runs for record in r.train + r.val for k in record if k not in known
                    and (r.has(k) or r.has(k, "val"))})
    for key in extra[:MAX_EXTRA_CURVES]:
        figures.append(_curves(runs, key, ("train", "val"), key, False))
    if len(runs) > 1:
        figures.extend(_validation_against_tokens(runs))
    figures.extend(_eval_bars(runs))
    return figures


def _new_axes(width: float = 6.4, height: float = 3.6):
    # A Figure with its own Agg canvas: no pyplot state, so a notebook's backend is left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _png(fig) -> bytes:
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _curves(runs: list[RunFacts], key: str, splits: tuple[str, ...], label: str, log_y: bool) -> Figure:
    fig, ax = _new_axes()
    for i, run in enumerate(runs):
        for split in splits:
            points = run.series(key, split)
            if not points:
                continue
            steps, values = zip(*points)
            name = run.name if len(splits) == 1 else f"{run.name} {'train' if split == 'train' else 'validation'}"
            if split == "train":
                ax.plot(steps, values, color=color(i), linewidth=1.6, label=name)
            else:
                ax.plot(steps, values, "o--", color=color(i), linewidth=1.6, markersize=4, label=name)
    if log_y:
        ax.set_yscale("log")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    title = label.split(" (")[0]
    ax.set_title(title)
    return Figure(key, title, _png(fig))


def _validation_against_tokens(runs: list[RunFacts]) -> list[Figure]:
    """Every run's validation loss against the tokens it trained on, each run's final value as a dotted
    line in its colour: where a curve crosses another run's line is what it needed to match that run."""
    from slmforge.report.compare import val_points

    curves = [(i, run, [p for p in val_points(run) if p.tokens is not None]) for i, run in enumerate(runs)]
    curves = [(i, run, points) for i, run, points in curves if points]
    if len(curves) < 2:
        return []
    fig, ax = _new_axes()
    for i, run, points in curves:
        ax.plot([p.tokens for p in points], [p.loss for p in points], "o-", color=color(i), linewidth=1.6,
                markersize=4, label=run.name)
        ax.axhline(points[-1].loss, color=color(i), linestyle=":", linewidth=1)
    ax.set_xlabel("tokens trained")
    ax.set_ylabel("validation loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    title = "validation loss against tokens"
    ax.set_title(title)
    return [Figure("val-loss-tokens", title, _png(fig))]


def _eval_bars(runs: list[RunFacts]) -> list[Figure]:
    """Grouped bars: one group per evaluated set (language), one bar per run."""
    columns = dict(eval_columns(runs))
    shown = (["bpb"] if "bpb" in columns else ["ppl"] if "ppl" in columns else []) + \
        [k for k in ("accuracy", "exact_match", "bleu", "chrf") if k in columns]
    sets = list(dict.fromkeys(name for r in runs for name in r.evals))
    figures = []
    for key in shown:
        fig, ax = _new_axes(max(6.4, 0.9 * len(sets) * max(1, len(runs)) ** 0.5 + 2), 3.6)
        width = 0.8 / len(runs)
        values = []
        for i, run in enumerate(runs):
            xs, heights = [], []
            for j, name in enumerate(sets):
                value = (run.evals.get(name) or {}).get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    xs.append(j - 0.4 + width * (i + 0.5))
                    heights.append(value)
            if xs:
                ax.bar(xs, heights, width=width, color=color(i), label=run.name)
                values += heights
                zeros = [x for x, h in zip(xs, heights) if h == 0]
                if zeros:  # a bar of height 0 draws nothing: mark it at 0 in the run's colour, labelled
                    ax.plot(zeros, [0] * len(zeros), linestyle="none", marker="_", markersize=max(8, 120 * width),
                            markeredgewidth=3, color=color(i))
                    for x in zeros:
                        ax.annotate("0", (x, 0), xytext=(0, 4), textcoords="offset points", ha="center",
                                    va="bottom", fontsize=8)
        title = f"evaluation: {columns[key]}"
        if values and not any(values):
            title += " (all 0)"
            ax.set_ylim(-0.05, 1)  # the zero line sits at the bottom of a visible scale, not mid-air
            ax.text(0.5, 0.55, f"every {columns[key]} is 0", transform=ax.transAxes, ha="center",
                    va="center", fontsize=11, color="#555")
        ax.set_xticks(range(len(sets)), sets, rotation=20 if len(sets) > 4 else 0, fontsize=8)
        ax.set_ylabel(columns[key])
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
        figures.append(Figure(f"eval-{key}", title, _png(fig)))
    return figures
