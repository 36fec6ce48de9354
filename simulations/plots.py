"""The one place the benchmarks make and save their matplotlib figures (headless)."""

from __future__ import annotations

from pathlib import Path


def new_figure(ncols: int = 1, size: tuple[float, float] = (5.5, 4)):
    """(figure, axes) on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=size)


def save_figure(fig, path: Path) -> Path:
    """Lay out, write ``path`` (PNG, folders made) and free the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
