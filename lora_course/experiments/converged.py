"""The converged comparisons: every accuracy comparison of the course, trained to a plateau
under the one protocol, each configuration at its own learning rate chosen on validation
and repeated over 3 seeds at that rate.

All runs fine-tune the pretrained MiniLM-L6 with a linear head on mean-pooled features
(:func:`~lora_course.models.minilm_mean_pooled`, the features of the frozen probe in
``data/results/baseline.json``) on the shipped text-classification data, under
:class:`~lora_course.train.Protocol` (:func:`~lora_course.train.fit`), and are chosen and
repeated by :class:`~lora_course.experiments.tuning.Suite`. The head trains whole in every
method (``modules_to_save=["head"]``).

Studies (one results file each, written to ``data/results/in_progress/`` while runs are
missing and moved to ``data/results/<study>.json`` once complete):

* ``rank_sweep``: LoRA on query/value at r in {1, 4, 8, 16, 64} (alpha = 16, scaling 16/r,
  PEFT's convention of a fixed alpha); rsLoRA (alpha/sqrt(r), arXiv 2312.03732) at r in
  {4, 8, 64} (at r = 1 the two conventions are the same adapter); placement at an equal
  budget (q r=16, q+v r=8, q+k+v+o r=4: 12,288 adapter parameters per layer each,
  as the LoRA paper's Table 5 compares placements at one budget); full fine-tuning and the
  head alone on the frozen encoder.
* ``adalora_minilm``: AdaLoRA on q, k, v and the attention output (init_r 6 -> target_r 4,
  PEFT's orthogonality weight 0.5) against LoRA r=4 on the same layers (equal final budget).
* ``dora_minilm``: DoRA against LoRA, query/value, r = 8.
* ``qlora_minilm``: QLoRA (every linear layer of the encoder in NF4 with double
  quantization, LoRA on query/value) against LoRA on the float32 base.
* ``variants_zoo``: rsLoRA, PiSSA, LoRA+, LoRA-FA, VeRA, Delta-LoRA, LoRA-Pro and DoRA beside
  LoRA, query/value, r = 8 (VeRA r = 256, its shared projections). LoRA-drop is left out of the
  converged comparison (its costs are in ``variants_zoo_fixed_budget.json``): the course's
  LoRA-drop gives the layers it drops no adapter, where the paper (arXiv 2402.07721) lets them
  share one, so its accuracy would not test the paper's claim, and each of its runs adds a
  selection run; the five runs it would take go to the 8 CPU-hour budget of the suite.

Run (resumable; a finished run is never run again)::

    python -m lora_course.experiments.converged                 # every study, in the order above
    python -m lora_course.experiments.converged --study rank_sweep
    python -m lora_course.experiments.converged --summary       # what the files hold, run nothing
"""

from __future__ import annotations

import argparse
import numbers
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checks import check_bool, check_int, check_real
from ..data import DATA_DIR, label_names, load_text_classification
from ..lora import add_lora, count_parameters
from ..models import minilm_mean_pooled
from ..results import check_study
from ..train import Protocol, ProtocolRun, fit
from .tuning import Config, Suite, log_grid

RESULTS_DIR = DATA_DIR / "results"
IN_PROGRESS_DIR = RESULTS_DIR / "in_progress"
COMMAND = "python -m lora_course.experiments.converged"
PROTOCOL = Protocol(max_steps=2000, eval_every=50, patience=5, warmup_steps=50)
QV = ("query", "value")
QKVO = ("query", "key", "value", "attention.output.dense")
ALPHA = 16.0
HEAD = ["head"]
LORA_LRS = log_grid(2.5e-4, 4e-3, 3)  # 2.5e-4, 1e-3, 4e-3
_SPLITS: dict[str, Any] = {}


def splits() -> Any:
    """The shipped splits, loaded once per process."""
    if not _SPLITS:
        _SPLITS.update(load_text_classification())
    return _SPLITS


def _train(prepare: Callable[[nn.Module, int], dict[str, Any] | None], name: str) -> Callable:
    """A ``Config.run``: fresh MiniLM + head from ``seed``, ``prepare(model, seed)`` adapts it
    (and may return :func:`fit` keyword arguments), then one protocol run."""

    def run(lr: float, seed: int, protocol: Protocol, **fit_kwargs: Any) -> tuple[ProtocolRun, dict[str, Any]]:
        model, tokenizer = minilm_mean_pooled(len(label_names()), seed=seed)
        torch.manual_seed(seed)  # adapters draw their initial factors from the global generator
        extra = prepare(model, seed) or {}
        trainable, total = count_parameters(model)
        result = fit(model, tokenizer, splits(), lr, seed, protocol, desc=f"{name} lr={lr:g} seed={seed}",
                     **extra, **fit_kwargs)
        return result, {"trainable_parameters": trainable, "total_parameters": total,
                        "seconds_per_step": round(result.seconds / result.steps, 4)}

    return run


def lora_config(name: str, targets: Sequence[str] | str, r: int, alpha: float = ALPHA, use_rslora: bool = False,
                lrs: tuple[float, ...] = LORA_LRS, method: str | None = None) -> Config:
    """LoRA (or rsLoRA) on ``targets`` at rank ``r``."""
    def prepare(model: nn.Module, seed: int) -> None:
        add_lora(model, list(targets) if not isinstance(targets, str) else targets, r=r, alpha=alpha,
                 use_rslora=use_rslora, modules_to_save=HEAD)

    scaling = alpha / (r**0.5 if use_rslora else r)
    fields = {"method": method or ("rslora" if use_rslora else "lora"), "r": r, "alpha": alpha,
              "scaling": round(scaling, 6), "targets": targets if isinstance(targets, str) else list(targets)}
    return Config(name, lrs, _train(prepare, name), fields)


def full_config() -> Config:
    def prepare(model: nn.Module, seed: int) -> None:
        model.requires_grad_(True)

    return Config("full", log_grid(1e-5, 1e-4, 3), _train(prepare, "full"), {"method": "full"})


def head_config() -> Config:
    def prepare(model: nn.Module, seed: int) -> None:
        model.requires_grad_(False)
        model.head.requires_grad_(True)

    return Config("head", log_grid(1e-3, 1.6e-2, 3), _train(prepare, "head"), {"method": "head"})


def rank_sweep_configs() -> list[Config]:
    # Order only sets which runs come first: the configurations other studies share (rsLoRA
    # r=8 with the zoo, q+k+v+o r=4 with AdaLoRA) early, then the rest of the ranks (the
    # rank-vs-accuracy curve), the two references every accuracy plot draws (the head alone is
    # cheap; full fine-tuning), then the other rsLoRA ranks and the last placement.
    ranks = [lora_config(f"lora_qv_r{r}", QV, r) for r in (8, 1, 64, 4, 16)]
    rslora = [lora_config(f"rslora_qv_r{r}", QV, r, use_rslora=True) for r in (8, 4, 64)]
    # Placement at one budget of 12,288 adapter parameters per layer: q alone, q+v, all four
    # attention projections (the LoRA paper's Table 5 compares placements at one budget).
    placement = [lora_config("lora_qkvo_r4", QKVO, 4), lora_config("lora_q_r16", ["query"], 16)]
    baselines = [full_config(), head_config()]
    return ranks[:2] + [rslora[0], placement[0]] + ranks[2:] + baselines[::-1] + rslora[1:] + placement[1:]


# AdaLoRA's budget schedule, fitted to the converged length of LoRA under the protocol (its
# best validation step falls at 300-700 steps): warm-up 50 steps, rank budget falling until
# step 350, final mask fixed from there; training may not stop before ADALORA_TOTAL.
ADALORA = dict(init_r=6, target_r=4, tinit=50, tfinal=150, deltaT=10, total_step=500, orth_reg_weight=0.5)


def adalora_config() -> Config:
    from ..adalora import RankAllocator, add_adalora, orth_regularization

    s = ADALORA

    def prepare(model: nn.Module, seed: int) -> dict[str, Any]:
        add_adalora(model, list(QKVO), init_r=s["init_r"], alpha=4.0 * s["init_r"], modules_to_save=HEAD)
        alloc = RankAllocator(model, init_r=s["init_r"], target_r=s["target_r"], tinit=s["tinit"],
                              tfinal=s["tfinal"], deltaT=s["deltaT"], total_step=s["total_step"])
        return {"extra_loss": lambda m: s["orth_reg_weight"] * orth_regularization(m),
                "after_step": lambda step: alloc.update_and_allocate(model, step),
                "min_steps": s["total_step"]}

    fields = {"method": "adalora", "r": s["target_r"], "init_r": s["init_r"], "alpha": 4.0 * s["init_r"],
              "targets": list(QKVO), "schedule": {k: v for k, v in s.items()}}
    return Config("adalora_qkvo", LORA_LRS, _train(prepare, "adalora_qkvo"), fields)


def adalora_configs() -> list[Config]:
    return [adalora_config(), lora_config("lora_qkvo_r4", QKVO, 4)]


def dora_config() -> Config:
    from ..dora import add_dora

    def prepare(model: nn.Module, seed: int) -> None:
        add_dora(model, list(QV), r=8, alpha=ALPHA, modules_to_save=HEAD)

    return Config("dora_qv_r8", LORA_LRS, _train(prepare, "dora_qv_r8"),
                  {"method": "dora", "r": 8, "alpha": ALPHA, "targets": list(QV)})


def dora_configs() -> list[Config]:
    return [dora_config(), lora_config("lora_qv_r8", QV, 8)]


QLORA = dict(blocksize=64, double_quant=True, compute_dtype="float32")


def qlora_configs() -> list[Config]:
    from ..qlora import add_qlora, quantize_linear_layers

    def prepare(model: nn.Module, seed: int) -> None:
        add_qlora(model, list(QV), r=8, alpha=ALPHA, blocksize=QLORA["blocksize"], double_quant=QLORA["double_quant"],
                  modules_to_save=HEAD)
        quantize_linear_layers(model, skip_modules=HEAD, blocksize=QLORA["blocksize"],
                               double_quant=QLORA["double_quant"])  # every other linear layer in NF4 too

    qlora = Config("qlora_qv_r8", LORA_LRS, _train(prepare, "qlora_qv_r8"),
                   {"method": "qlora", "r": 8, "alpha": ALPHA, "targets": list(QV), **QLORA})
    return [qlora, lora_config("lora_qv_r8", QV, 8)]


ZOO = dict(vera_r=256, loraplus_ratio=16.0, delta_update_ratio=2.0, delta_start_step=50)


def _variant(name: str, prepare: Callable, lrs: tuple[float, ...] = LORA_LRS, **fields: Any) -> Config:
    return Config(f"{name}_qv", lrs, _train(prepare, name), {"method": name, "targets": list(QV), **fields})


def variants_zoo_configs() -> list[Config]:
    from ..variants import (DeltaLoRA, add_pissa, add_vera, apply_lora_pro, create_lorafa_optimizer,
                            create_loraplus_optimizer)

    def lora(model: nn.Module, seed: int) -> None:
        add_lora(model, list(QV), r=8, alpha=ALPHA, modules_to_save=HEAD)

    def pissa(model, seed):
        add_pissa(model, list(QV), r=8, alpha=ALPHA, modules_to_save=HEAD)

    def loraplus(model, seed):
        lora(model, seed)
        return {"make_optimizer": lambda m, lr, wd: create_loraplus_optimizer(
            m, torch.optim.AdamW, lr=lr, lr_ratio=ZOO["loraplus_ratio"], weight_decay=wd)}

    def lorafa(model, seed):
        lora(model, seed)
        return {"make_optimizer": lambda m, lr, wd: create_lorafa_optimizer(m, lr=lr, weight_decay=wd)}

    def vera(model, seed):
        add_vera(model, list(QV), r=ZOO["vera_r"], projection_prng_key=seed, modules_to_save=HEAD)

    def delta(model, seed):
        lora(model, seed)
        d = DeltaLoRA(model, ZOO["delta_update_ratio"], ZOO["delta_start_step"])
        return {"after_step": lambda step: d.step()}

    def lora_pro(model, seed):
        lora(model, seed)
        return {"before_step": lambda step: apply_lora_pro(model)}

    r8 = dict(r=8, alpha=ALPHA)
    return [
        lora_config("lora_qv_r8", QV, 8),
        lora_config("rslora_qv_r8", QV, 8, use_rslora=True),
        _variant("pissa", pissa, **r8),
        _variant("loraplus", loraplus, lr_ratio=ZOO["loraplus_ratio"], **r8),
        _variant("lorafa", lorafa, **r8),
        _variant("vera", vera, lrs=log_grid(2e-3, 3.2e-2, 3), r=ZOO["vera_r"]),
        _variant("delta_lora", delta, update_ratio=ZOO["delta_update_ratio"], start_step=ZOO["delta_start_step"], **r8),
        _variant("lora_pro", lora_pro, **r8),
        dora_config(),
    ]


STUDIES: dict[str, Callable[[], list[Config]]] = {
    "rank_sweep": rank_sweep_configs,
    "dora_minilm": dora_configs,
    "adalora_minilm": adalora_configs,
    "qlora_minilm": qlora_configs,
    "variants_zoo": variants_zoo_configs,
}


def suite_for(study: str, fresh: bool = False) -> Suite:
    """The study's suite, resumed from ``in_progress/`` (or from the complete file).

    Raises:
        ValueError: ``study`` is not one of :data:`STUDIES`, or ``fresh`` is not True or False
            (a truthy ``fresh`` would set the finished runs aside).
    """
    check_study(study)
    check_bool("fresh", fresh)
    done, partial = RESULTS_DIR / f"{study}.json", IN_PROGRESS_DIR / f"{study}.json"
    path = partial
    if not partial.exists() and done.exists() and not fresh:
        try:
            return Suite.open(done, PROTOCOL, f"{COMMAND} --study {study}", description=DESCRIPTION,
                              shared=_shared(study))
        except (ValueError, KeyError):
            pass  # an older file under another protocol or schema: start in in_progress/
    return Suite.open(path, PROTOCOL, f"{COMMAND} --study {study}", fresh=fresh, description=DESCRIPTION,
                      shared=_shared(study))


def _shared(study: str) -> tuple[Path, ...]:
    """The other studies' files (complete or in progress): a configuration two studies share
    (LoRA q+v r=8 is the reference of four) is trained once and copied, marked ``copied_from``."""
    return tuple(folder / f"{other}.json" for other in STUDIES if other != study
                 for folder in (IN_PROGRESS_DIR, RESULTS_DIR))


DESCRIPTION = ("stdlib_docstrings (data/stdlib_docstrings), pretrained MiniLM-L6 + linear head on mean-pooled "
               "features, every configuration trained to a validation plateau")


def run_study(study: str, fresh: bool = False) -> Path:
    """Run what is missing of ``study``; once complete, move its file out of ``in_progress/``.

    Raises:
        ValueError: ``study`` is not one of :data:`STUDIES`, or ``fresh`` is not True or False.
    """
    check_study(study)
    check_bool("fresh", fresh)
    configs = STUDIES[study]()
    suite = suite_for(study, fresh)
    suite.names = tuple(c.name for c in configs)
    suite.run_all(configs, desc=study)
    suite.save([c.name for c in configs])
    final = RESULTS_DIR / f"{study}.json"
    if suite.complete([c.name for c in configs]) and suite.path != final:
        shutil.move(str(suite.path), final)
        suite.path = final
    return suite.path


def replay(study: str, config: str, lr: float, seed: int = 0, steps: int = 50) -> ProtocolRun:
    """The first ``steps`` steps of one recorded run of ``study``, trained again exactly as the
    suite trained it (same configuration, rate, seed and schedule: ``fit(..., stop_after=steps)``),
    so a notebook can compare its validation accuracy at step ``steps`` with the file's curve.

    Raises:
        ValueError: ``study`` or ``config`` unknown, ``steps`` not a positive multiple of the
            protocol's ``eval_every`` up to its ``max_steps`` (the curve has no point elsewhere),
            ``lr`` not a finite number > 0, or ``seed`` not an integer >= 0.
    """
    check_study(study)
    found = {c.name: c for c in STUDIES[study]()}
    if not isinstance(config, str) or config not in found:
        raise ValueError(f"config={config!r} is not in study {study!r}; allowed values: {', '.join(found)}")
    if (isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps <= 0 or steps % PROTOCOL.eval_every
            or steps > PROTOCOL.max_steps):
        raise ValueError(f"steps={steps!r} must be a positive multiple of eval_every={PROTOCOL.eval_every} "
                         f"and <= max_steps={PROTOCOL.max_steps} (where the recorded curve has points)")
    check_real("lr", lr, low=0, low_open=True, what="the recorded run's learning rate")
    seed = check_int("seed", seed, low=0)
    result, _ = found[config].run(lr, seed, PROTOCOL, stop_after=int(steps), progress=False)
    return result


def summary_lines(study: str) -> list[str]:
    """What ``--summary`` prints for ``study``: :func:`~lora_course.results.read_study`'s lines for
    every configuration of the study (means only for complete ones), then each complete
    configuration against LoRA q+v r=8 as a verdict."""
    from ..results import read_study, verdict_line

    check_study(study)
    names = [c.name for c in STUDIES[study]()]
    _, done, lines = read_study(study, names, RESULTS_DIR)
    reference = done.get("lora_qv_r8")
    lines += ["  " + verdict_line(s, reference) for name, s in done.items() if reference and name != "lora_qv_r8"]
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", choices=list(STUDIES), action="append", help="default: every study, in order")
    parser.add_argument("--fresh", action="store_true", help="ignore runs already in the files")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--summary", action="store_true", help="print what the files hold; run nothing")
    args = parser.parse_args(argv)
    if args.summary:
        for study in args.study or list(STUDIES):
            print("\n".join(summary_lines(study)))
        return
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    for study in args.study or list(STUDIES):
        path = run_study(study, args.fresh)
        print(f"{study}: -> {path.relative_to(DATA_DIR.parent)}")
    print(f"wall {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
