"""Drawing helpers shared by the notebooks' accuracy plots.

Every accuracy plot of the course shows where a configuration lands against two references:
the frozen encoder with a trained linear head (the probe, ``baseline.json``) and full
fine-tuning trained to convergence under the same protocol (``rank_sweep.json``, config
``full``). :func:`draw_references` draws both as horizontal lines, full fine-tuning with a
band of one standard error over its seeds.
"""

from __future__ import annotations

from typing import Any

from .results import Summary

PROBE_STYLE = dict(color="0.35", linestyle="--", linewidth=1.2)
FULL_STYLE = dict(color="C3", linestyle="-", linewidth=1.2)


def draw_references(ax: Any, probe: float, full: Summary | None = None) -> None:
    """Horizontal lines at the probe's test accuracy and (if given) full fine-tuning's mean,
    with a shaded band of +- one standard error around the latter; both labelled for the legend."""
    ax.axhline(probe, label=f"frozen encoder + trained head (probe): {probe:.4f}", **PROBE_STYLE)
    if full is not None:
        ax.axhline(full.mean, label=f"full fine-tuning: {full.mean:.4f} +- {full.se:.4f} (n={full.n})", **FULL_STYLE)
        ax.axhspan(full.mean - full.se, full.mean + full.se, color=FULL_STYLE["color"], alpha=0.12, linewidth=0)
