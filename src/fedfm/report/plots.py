"""PNG plots from metrics lines (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def plot_runs(runs: Sequence[tuple[str, list[dict[str, Any]]]], path: Path) -> Path:
    """Test accuracy and loss per round, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    for label, lines in runs:
        ev = [r for r in lines if r.get("accuracy") is not None]
        rounds = [r["round"] for r in ev]
        ax_acc.plot(rounds, [r["accuracy"] for r in ev], marker="o", label=label)
        ax_loss.plot(rounds, [r["loss"] for r in ev], marker="o", label=f"{label} test")
        tr = [r for r in lines if r.get("train_loss") is not None]
        ax_loss.plot([r["round"] for r in tr], [r["train_loss"] for r in tr], linestyle="--", label=f"{label} train")
    ax_acc.set(xlabel="round", ylabel="test accuracy", title="Accuracy")
    ax_loss.set(xlabel="round", ylabel="cross-entropy", title="Loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
