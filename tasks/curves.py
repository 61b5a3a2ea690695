"""Training curves as PNG images for people: written into a training stage's artifact, logged to MLflow with it
(``register.log_stage`` logs every ``*.png``) and shown as a Prefect artifact (``flows/steps.py``)."""

from __future__ import annotations

from pathlib import Path


def plot_curve(path: Path, history: list[dict], evals: list[dict], eval_lines: dict[str, str],
               eval_ylabel: str | None = None, kept_step: int | None = None) -> None:
    """Training loss by step (``history``) and validation metrics by step (``evals``) into ``path``.

    ``eval_lines`` maps a key of the validation rows to its label. Without ``eval_ylabel`` they share the loss
    axis (a validation loss); with it they get a second y axis of their own, from 0 to 1 (a score such as
    macro-F1). ``kept_step``: the step whose weights were kept, marked with a vertical line.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    lines = ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)" if eval_ylabel is None else "train loss")
    ax.grid(alpha=0.3)
    eval_ax = ax if eval_ylabel is None else ax.twinx()
    if eval_ylabel is not None:
        eval_ax.set_ylabel(eval_ylabel)
        eval_ax.set_ylim(0.0, 1.02)
    styles = iter(["o-", "s--", "^:", "d-."])
    for key, label in eval_lines.items():
        points = [(e["step"], e[key]) for e in evals if key in e]
        if points:
            color = None if eval_ylabel is None else f"C{len(lines)}"
            lines += eval_ax.plot(*zip(*points, strict=True), next(styles, "o-"), color=color, label=label)
    if kept_step is not None:
        lines.append(ax.axvline(kept_step, color="grey", linestyle=":", label=f"weights kept (step {kept_step})"))
    labels = [line.get_label() for line in lines]
    if eval_ax is ax:
        ax.legend(lines, labels, loc="best")
    else:  # two axes: above the plot, where it hides no line of either
        ax.legend(lines, labels, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False,
                  fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
