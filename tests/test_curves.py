"""Training curves for people: the fine-tuning curve (loss and validation scores) and the pretraining one."""

from __future__ import annotations

from pathlib import Path

from tasks.curves import plot_curve

HISTORY = [{"step": s, "loss": 0.7 - 0.01 * s} for s in (5, 10, 15, 20)]


def _png_size(path: Path) -> tuple[int, int]:
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(path).shape
    return width, height


def test_fine_tuning_curve_puts_scores_on_an_axis_of_their_own_and_marks_the_kept_step(tmp_path: Path,
                                                                                       monkeypatch) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    evals = [{"step": 10, "val_accuracy": 0.7, "val_macro_f1": 0.65}, {"step": 20, "val_accuracy": 0.8,
                                                                        "val_macro_f1": 0.79}]
    path = tmp_path / "training_curve.png"
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure, to look at what was drawn
    plot_curve(path, HISTORY, evals, {"val_macro_f1": "validation macro-F1", "val_accuracy": "validation accuracy"},
               "validation score", kept_step=20)
    monkeypatch.undo()
    assert _png_size(path) == (600, 350) and path.stat().st_size > 5000
    (fig,) = figures
    loss_ax, score_ax = fig.axes
    assert [t.get_text() for t in loss_ax.get_legend().get_texts()] == [
        "train loss", "validation macro-F1", "validation accuracy", "weights kept (step 20)"]
    assert score_ax.get_ylabel() == "validation score" and score_ax.get_ylim() == (0.0, 1.02)
    f1, accuracy = score_ax.get_lines()
    assert list(f1.get_xdata()) == [10, 20] and list(f1.get_ydata()) == [0.65, 0.79]
    assert list(accuracy.get_ydata()) == [0.7, 0.8]
    plt.close(fig)


def test_pretraining_curve_keeps_one_loss_axis(tmp_path: Path) -> None:
    path = tmp_path / "loss_curve.png"
    plot_curve(path, HISTORY, [{"step": 20, "val_loss": 0.5}], {"val_loss": "validation loss"})
    assert _png_size(path) == (600, 350)
