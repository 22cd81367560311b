"""Drawing helpers shared by the notebooks' accuracy plots.

Every accuracy plot of the course shows where a configuration lands against two references:
the frozen encoder with a trained linear head (the probe, ``baseline.json``) and full
fine-tuning trained to convergence under the same protocol (``rank_sweep.json``, config
``full``). :func:`draw_references` draws both as horizontal lines, full fine-tuning with a
band of one standard error over its seeds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .checks import check_real
from .results import Summary, check_results, check_summary, chosen_run, complete_summaries, probe_accuracy, seeds_of

PROBE_STYLE = dict(color="0.35", linestyle="--", linewidth=1.2)
FULL_STYLE = dict(color="C3", linestyle="-", linewidth=1.2)


SPLIT_NAMES = {"test": "test", "val": "validation"}


def draw_references(ax: Any, probe: float, full: Summary | None = None, split: str = "test") -> None:
    """Horizontal lines at the probe's accuracy on ``split`` ("test" or "val") and (if given)
    full fine-tuning's mean test accuracy, with a shaded band of +- one standard error around
    the latter; both labelled for the legend, the probe's label naming its split.

    Everything is checked before anything is drawn: on an error ``ax`` is left as it was.

    Raises:
        ValueError: if ``ax`` is not a matplotlib Axes, ``probe`` is not an accuracy in [0, 1],
            ``split`` is not "test" or "val", ``full`` is not None or a
            :class:`~lora_course.results.Summary` with a finite mean and standard error, or
            ``full`` is given on the "val" split (a Summary holds test accuracies).
    """
    if not (callable(getattr(ax, "axhline", None)) and callable(getattr(ax, "axhspan", None))):
        raise ValueError(f"ax must be a matplotlib Axes (e.g. from plt.subplots()), got ax={ax!r}")
    check_real("probe", probe, 0.0, 1.0, what="the probe's accuracy")
    if not isinstance(split, str) or split not in SPLIT_NAMES:
        raise ValueError(f"split={split!r} is not allowed; allowed values: {', '.join(map(repr, SPLIT_NAMES))}")
    if full is not None:
        check_summary("full", full)
    if full is not None and split != "test":
        raise ValueError(f"full is a summary of test accuracies; it cannot be drawn on the {split!r} split")
    ax.axhline(probe, label=f"frozen encoder + trained head (probe), {SPLIT_NAMES[split]}: {probe:.4f}", **PROBE_STYLE)
    if full is not None:
        ax.axhline(full.mean, label=f"full fine-tuning, test: {full.mean:.4f} +- {full.se:.4f} (n={full.n})",
                   **FULL_STYLE)
        ax.axhspan(full.mean - full.se, full.mean + full.se, color=FULL_STYLE["color"], alpha=0.12, linewidth=0)


def plot_converged(results: dict[str, Any], labels: Mapping[str, str], full: Summary | None = None,
                   curve_seeds: str = "all", title: str = "") -> Any:
    """The two panels every converged comparison shows, for the complete configurations among
    ``labels`` (config name -> label, in drawing order):

    * left: validation accuracy against steps at each configuration's chosen rate (every seed,
      or seed 0 only with ``curve_seeds="first"``), a dot at the best step, the probe's
      validation accuracy as a reference;
    * right: test accuracy, mean +- one standard error over the seeds (crosses: the seeds, one
      column each in seed order, so that tied seeds stay visible), with :func:`draw_references`
      (probe, and full fine-tuning when ``full`` is given).

    Returns the matplotlib figure (not shown).

    Raises:
        ValueError: if ``results`` is not a results dict, ``labels`` is not a mapping from
            configuration names to labels (str), ``full`` is not None or a valid Summary,
            ``curve_seeds`` is not "all" or "first", ``title`` is not a str, or no configuration
            in ``labels`` is complete in ``results``.
    """
    import matplotlib.pyplot as plt

    from .data import load_text_classification

    check_results(results)
    file_seeds = seeds_of(results)
    if not isinstance(labels, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise ValueError(f"labels must be a mapping config name -> label (both str), e.g. {{'lora_qv_r8': 'LoRA'}}, "
                         f"got labels={labels!r}")
    if full is not None:
        check_summary("full", full)
    if not isinstance(curve_seeds, str) or curve_seeds not in ("all", "first"):
        raise ValueError(f"curve_seeds={curve_seeds!r} is not allowed; allowed values: 'all', 'first'")
    if not isinstance(title, str):
        raise ValueError(f"title must be a str ('' for none), got title={title!r}")
    done = complete_summaries(results)
    names = [n for n in labels if n in done]
    if not names:
        raise ValueError(f"labels: none of {list(labels)} is complete in results; complete: {list(done) or 'none'}")
    seeds = file_seeds if curve_seeds == "all" else file_seeds[:1]
    probe_val, probe_test = probe_accuracy("val"), probe_accuracy()  # read before a figure exists
    n_val, n_test = (len(load_text_classification()[split]) for split in ("val", "test"))
    wide = len(names) > 4
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12 if wide else 10, 5.2 if wide else 4.6),
                                   constrained_layout=True)
    for k, name in enumerate(names):
        color = f"C{k % 10}"
        for seed in seeds:
            run = chosen_run(results, name, seed=seed)
            steps, vals = zip(*run["val_curve"])
            first = seed == seeds[0]
            ax1.plot(steps, vals, "-", color=color, linewidth=1, alpha=0.8,
                     label=f"{labels[name]}, lr {run['lr']:g}" if first else None)
            ax1.plot(run["best_step"], run["best_val_accuracy"], "o", color=color, markersize=4)
        s = done[name]
        ax2.errorbar([k], [s.mean], yerr=[s.se], fmt="o", color=color, capsize=4)
        tests = [chosen_run(results, name, seed=seed)["test_accuracy"] for seed in file_seeds]
        offsets = [0.12 + 0.06 * j for j in range(len(tests))]  # one column per seed: tied seeds stay visible
        ax2.plot([k + o for o in offsets], tests, "x", color=color, markersize=5)
    draw_references(ax1, probe_val, split="val")  # the probe on the same validation split
    ax1.set_xlabel("training step (batch of 32 texts)")
    ax1.set_ylabel(f"validation accuracy (fraction of {n_val})")
    ax1.set_title("learning curves at the chosen rates" + (" (seed 0)" if curve_seeds == "first" else "")
                  + "; dot: best step", fontsize=10)
    ax1.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2 if wide else 1)
    draw_references(ax2, probe_test, full)
    ax2.set_xticks(range(len(names)), [labels[n] for n in names], rotation=30 if wide else 0,
                   ha="right" if wide else "center")
    ax2.set_xlim(-0.6, len(names) - 0.4)
    ax2.set_ylabel(f"test accuracy (fraction of {n_test})")
    ax2.set_title(f"converged: mean ± 1 s.e.; crosses: seeds {', '.join(map(str, file_seeds))} in order", fontsize=10)
    ax2.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22 if wide else -0.12))
    if title:
        fig.suptitle(title)
    return fig
