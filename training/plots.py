"""Loss curve PNG written beside the adapter (`<out>.loss.png`)."""
from __future__ import annotations

from pathlib import Path


def loss_curve_path(adapter_path: str | Path) -> Path:
    p = Path(adapter_path)
    return p.with_name(p.name.removesuffix(".safetensors") + ".loss.png")


def save_loss_curve(losses: list[float], out: str | Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps = list(range(1, len(losses) + 1))
    ax.plot(steps, losses, lw=1, alpha=0.4, label="loss")
    if len(losses) >= 10:  # a moving average makes the trend readable on short noisy runs
        k = max(5, len(losses) // 20)
        smooth = [sum(losses[max(0, i - k + 1) : i + 1]) / len(losses[max(0, i - k + 1) : i + 1]) for i in range(len(losses))]
        ax.plot(steps, smooth, lw=2, label=f"mean of last {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (completion tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out)
    plt.close(fig)
    return out
