"""PNG figures of the slimming stages (matplotlib Agg: no display on compute nodes)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch


def gamma_histogram(gammas: torch.Tensor, path: str | Path, title: str, bins: int = 60) -> Path:
    """Histogram of |gamma| over all BN channels (log count axis: most mass sits near 0)."""
    values = gammas.abs().double().cpu().numpy()
    lo, hi = float(values.min()), float(values.max())
    # all-equal scales (a fresh model) or a spread below float resolution get a visible range
    span = (lo, max(hi, lo + 1e-3 * max(abs(lo), 1.0)))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(values, bins=bins, range=span, log=True, color="tab:blue")
    ax.set_xlabel("|gamma|")
    ax.set_ylabel("channels")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def widths_plot(per_layer: dict[str, dict[str, int]], path: str | Path, title: str) -> Path:
    """Bar plot of kept vs total channels per BN layer; a tick marks the width the threshold
    asked for where rounding (`prune.round_to`) changed it."""
    names = list(per_layer)
    total = [per_layer[n]["total"] for n in names]
    kept = [per_layer[n]["kept"] for n in names]
    fig, ax = plt.subplots(figsize=(max(6, 0.18 * len(names) + 2), 4))
    x = range(len(names))
    ax.bar(x, total, color="lightgray", label="before")
    ax.bar(x, kept, color="tab:green", label="kept")
    asked = [per_layer[n].get("requested", per_layer[n]["kept"]) for n in names]
    if asked != kept:
        ax.scatter(list(x), asked, marker="_", s=60, color="black", label="before rounding")
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_ylabel("channels")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
