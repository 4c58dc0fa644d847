"""Learning-curve plots of a run (``pymeta train --plot``)."""

from __future__ import annotations

from pathlib import Path

from pymeta.training.evaluation import Stats


def plot_history(
    history: list[dict[str, float]], path: str | Path, title: str = "", test: Stats | None = None,
    columns: str = "position",
) -> Path:
    """Write a PNG of the learning curves: running meta-loss and validation metric per step;
    with a ``test`` metric of K values per task, also each value's mean (``columns``: their
    axis label, e.g. MANN's instance of a class)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    panels = 3 if test is not None and test.columns else 2
    fig, (loss_ax, val_ax, *rest) = plt.subplots(1, panels, figsize=(5 * panels, 4))
    loss_ax.plot(steps, [h["meta_loss"] for h in history], marker="o")
    loss_ax.set(xlabel="meta-step", ylabel="meta-loss (running mean)", title="training")
    val = [h["val"] for h in history]
    ci = [h["val_ci95"] for h in history]
    val_ax.errorbar(steps, val, yerr=ci, marker="o", capsize=3)
    val_ax.set(xlabel="meta-step", ylabel="validation metric (95% CI)", title="validation")
    for ax in rest:
        positions = range(1, len(test.columns) + 1)
        ax.errorbar(positions, [c.mean for c in test.columns], yerr=[c.ci95 for c in test.columns], marker="o",
                    capsize=3)
        ax.set(xlabel=columns, ylabel="test metric (95% CI)", title=f"test ({test.tasks} tasks)", xticks=positions)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
