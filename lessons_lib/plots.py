"""The course's figure style and a few plots that several chapters draw."""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch


def set_style() -> None:
    """One look for every figure in the book: readable sizes, light grid, no top/right spines."""
    plt.rcParams.update({
        "figure.figsize": (7.0, 4.0),
        "figure.dpi": 100,
        "savefig.dpi": 150,
        "axes.grid": True,
        "grid.alpha": 0.3,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.titlesize": 12,
        "axes.labelsize": 11,
        "legend.frameon": False,
    })


def attention_heatmap(weights, row_labels, col_labels, ax=None, title: str = "", cmap: str = "Blues"):
    """Draw one attention matrix (rows attend to columns) with token labels on both axes."""
    weights = torch.as_tensor(weights).detach().float().cpu()
    if weights.ndim != 2:
        raise ValueError(f"expected a 2-D (rows, columns) weight matrix, got shape {tuple(weights.shape)}")
    if weights.shape != (len(row_labels), len(col_labels)):
        raise ValueError(f"weights have shape {tuple(weights.shape)} but there are {len(row_labels)} row "
                         f"labels and {len(col_labels)} column labels")
    if ax is None:
        _, ax = plt.subplots(figsize=(0.45 * len(col_labels) + 2, 0.45 * len(row_labels) + 1.5))
    image = ax.imshow(weights.numpy(), cmap=cmap, vmin=0.0, vmax=max(1e-9, float(weights.max())))
    ax.set_xticks(range(len(col_labels)), [repr(c)[1:-1] for c in col_labels], rotation=90)
    ax.set_yticks(range(len(row_labels)), [repr(r)[1:-1] for r in row_labels])
    ax.set_xlabel("attends to (key)")
    ax.set_ylabel("query")
    ax.grid(False)
    if title:
        ax.set_title(title)
    return image
