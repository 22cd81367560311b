"""PEFT's on-disk LoRA format: ``adapter_config.json`` + ``adapter_model.safetensors``.

This file knows names and shapes only; the math lives in ``lora.py``, the matching of module
names in ``surgery.py``.

State-dict keys, as PEFT's ``save_pretrained`` writes them (the adapter name "default"
removed):

    base_model.model.<module>.lora_A.weight      (r, in)
    base_model.model.<module>.lora_B.weight      (out, r)
    base_model.model.<module to save>.<param>    every entry of that module's state_dict

Loading validates everything (config fields, module names, key set, shapes) before it
touches the model, so a mismatched file never leaves a half-loaded model behind.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .lora import LoRALinear, lora_layers, wrap_layers
from .surgery import (
    ModuleSnapshot,
    adapter_layers,
    find_lora_targets,
    find_modules_to_save,
    freeze_all_but_adapters,
    modules_to_save_names,
    swap_modules,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# our init names <-> PEFT's init_lora_weights values
INIT_TO_PEFT: dict[str, Any] = {"kaiming": True, "gaussian": "gaussian", "pissa": "pissa"}
PEFT_TO_INIT: dict[Any, str] = {True: "kaiming", False: "kaiming", "gaussian": "gaussian",
                                 "pissa": "pissa"}
# transformers class-name suffix -> PEFT task_type (decides the PeftModel subclass on load)
TASK_TYPES = {
    "ForCausalLM": "CAUSAL_LM",
    "ForSequenceClassification": "SEQ_CLS",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
    "ForConditionalGeneration": "SEQ_2_SEQ_LM",
}
# config fields whose non-default values we cannot honour on load (field -> allowed values)
UNSUPPORTED_FIELDS: dict[str, tuple] = {
    "bias": ("none",),
    "use_dora": (False, None),
    "lora_bias": (False, None),
    "layers_to_transform": (None, []),
    "layers_pattern": (None, [], ""),
    "target_parameters": (None, []),
    "trainable_token_indices": (None,),
    "layer_replication": (None,),
    "megatron_config": (None,),
    "use_qalora": (False, None),
    "alora_invocation_tokens": (None,),
    "arrow_config": (None,),
    "use_bdlora": (None, False),
    "velora_config": (None,),
    "monteclora_config": (None,),
    "kasa_config": (None,),
}


def _lora_key(module: str, factor: str) -> str:
    return f"{PREFIX}{module}.lora_{factor}.weight"


def _number(x: float) -> float | int:
    """8.0 -> 8 (PEFT's configs hold ints for integral alphas)."""
    return int(x) if float(x).is_integer() else float(x)


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    return next((task for suffix, task in TASK_TYPES.items() if name.endswith(suffix)), None)


def _single(values: dict[str, Any], what: str) -> Any:
    distinct = set(values.values())
    if len(distinct) > 1:
        raise ValueError(f"PEFT's adapter format holds one {what} for all layers; "
                         f"this model mixes {sorted(map(str, distinct))}")
    return distinct.pop()


def _pattern(values: dict[str, Any], default: Any) -> dict[str, Any]:
    """Per-layer exceptions as PEFT's rank_pattern/alpha_pattern (a regex per full name)."""
    return {re.escape(name): _number(v) for name, v in values.items() if v != default}


def adapter_config(model: nn.Module) -> dict[str, Any]:
    """The ``adapter_config.json`` content PEFT would write for this model's LoRA layers."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRALinear layers; call add_lora(model, ...) first")
    others = [f"{n} ({type(m).__name__})" for n, m in adapter_layers(model).items()
              if type(m) is not LoRALinear]
    if others:
        raise ValueError(f"save_adapter writes plain LoRA adapters only; the model also has {others}")
    ranks = {n: layer.r for n, layer in layers.items()}
    alphas = {n: layer.alpha for n, layer in layers.items()}
    r = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common rank
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    inits = {n: INIT_TO_PEFT[layer.init] for n, layer in layers.items()}
    if "pissa" in inits.values():  # PiSSA re-runs on load, so every layer must be PiSSA
        _single(inits, "init (PiSSA changes the base weights)")
    init = "pissa" if "pissa" in inits.values() else next(iter(inits.values()))
    dropout = _single({n: float(getattr(layer.dropout, "p", 0.0)) for n, layer in layers.items()},
                      "lora_dropout")
    save = modules_to_save_names(model)
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": _task_type(model),
        "base_model_name_or_path": getattr(model, "name_or_path", None) or None,
        "r": r,
        "lora_alpha": _number(alpha),
        "target_modules": sorted(layers),
        "exclude_modules": None,
        "lora_dropout": dropout,
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
        "bias": "none",
        "use_rslora": _single({n: layer.use_rslora for n, layer in layers.items()}, "use_rslora"),
        "init_lora_weights": init,
        "modules_to_save": save or None,
        "rank_pattern": _pattern(ranks, r),
        "alpha_pattern": _pattern(alphas, alpha),
        "use_dora": False,
        "lora_bias": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
        "revision": None,
    }
    if config["task_type"] is None:  # PEFT records the class for AutoPeftModel
        cls = type(model)
        config["auto_mapping"] = {"base_model_class": cls.__name__, "parent_library": cls.__module__}
    return config


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors PEFT saves: every A and B, and every module to save, under PEFT's keys."""
    tensors = {}
    for name, layer in lora_layers(model).items():
        tensors[_lora_key(name, "A")] = layer.lora_A
        tensors[_lora_key(name, "B")] = layer.lora_B
    for name in modules_to_save_names(model):
        for key, value in model.get_submodule(name).state_dict().items():
            tensors[f"{PREFIX}{name}.{key}"] = value
    out, seen = {}, set()
    for key, value in tensors.items():
        value = value.detach().cpu().contiguous()
        if value.untyped_storage().data_ptr() in seen:  # tied weights: safetensors refuses shared storage
            value = value.clone()
        seen.add(value.untyped_storage().data_ptr())
        out[key] = value
    return out


def _json_value(value: Any) -> Any:
    """``json.dumps``' fallback: a numpy scalar is written as its Python value; anything else
    is refused with a ValueError before a file is written."""
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return value.item()
    raise ValueError(f"adapter config value {value!r} ({type(value).__name__}) cannot be written as JSON; "
                     "nothing was written")


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` in PEFT's format.

    The directory loads with ``peft.PeftModel.from_pretrained(base_model, path)`` or with
    :func:`load_adapter`. A PiSSA adapter is saved with ``init_lora_weights="pissa"``: load
    it into the *original* base model, and the loader redoes the SVD split (as PEFT does).
    Returns the directory.

    Atomic: both files are written completely under temporary names (a new directory is
    built as a temporary sibling and renamed into place), and only then moved over the old
    ones, weights first, then the config. A save that fails (a value JSON cannot hold, a full
    disk, an interrupt while writing) leaves a previous adapter in ``path`` loadable and
    leaves no half-written directory; other files in ``path`` are left alone.
    """
    from safetensors.torch import save_file

    config = adapter_config(model)  # validates before anything is written
    text = json.dumps(config, indent=2, sort_keys=True, default=_json_value) + "\n"
    tensors = adapter_state_dict(model)
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"path={str(path)!r} is a file; save_adapter writes a directory")
    fresh = not out.exists()
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = f"tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    work = out.with_name(f".{out.name}.{tag}") if fresh else out
    names = {CONFIG_NAME: f".{CONFIG_NAME}.{tag}", WEIGHTS_NAME: f".{WEIGHTS_NAME}.{tag}"}
    try:
        work.mkdir(exist_ok=True)
        (work / names[CONFIG_NAME]).write_text(text, encoding="utf-8")
        save_file(tensors, str(work / names[WEIGHTS_NAME]), metadata={"format": "pt"})
        for final in (WEIGHTS_NAME, CONFIG_NAME):  # both complete: now replace, weights first
            os.replace(work / names[final], work / final)
        if fresh:
            os.replace(work, out)  # a new directory appears whole
    finally:
        for tmp in names.values():
            (work / tmp).unlink(missing_ok=True)
        if fresh and work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return out


# -- loading -------------------------------------------------------------------------------


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a PEFT adapter directory: ``(config, tensors)``; safetensors only.

    Raises:
        FileNotFoundError: no such directory, or a file missing in it.
        ValueError: a config that is not a JSON object, or a weights file that safetensors
            cannot read (truncated, not safetensors); the message names the file.
    """
    from safetensors.torch import load_file

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter directory not found: {str(path)!r}")
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{CONFIG_NAME} is missing in {str(path)!r}")
    if not (folder / WEIGHTS_NAME).is_file():
        found = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
        raise FileNotFoundError(
            f"{WEIGHTS_NAME} is missing in {str(path)!r} (found: {found}); only safetensors "
            "adapters are loaded (a pickled adapter_model.bin can run code when loaded)"
        )
    config_file, weights_file = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{str(config_file)!r} is not valid JSON ({exc}); the adapter cannot be loaded") from None
    if not isinstance(config, dict):
        raise ValueError(f"{str(config_file)!r} must hold a JSON object, got {type(config).__name__}")
    try:
        tensors = load_file(str(weights_file))
    except Exception as exc:  # safetensors raises its own SafetensorError (or OSError) for a bad file
        raise ValueError(f"{str(weights_file)!r} cannot be read as safetensors (truncated or not a "
                         f"safetensors file?): {exc}") from None
    return config, tensors


def _check_config(config: dict[str, Any], source: str = CONFIG_NAME) -> None:
    """Every field load_adapter uses, checked; a ValueError naming ``source`` (the file) and the field."""
    def bad(field: str, allowed: str) -> ValueError:
        return ValueError(f"{source}: {field}={config[field]!r} is not allowed ({allowed}); nothing was loaded")

    if config.get("peft_type") != "LORA":
        raise ValueError(f"peft_type={config.get('peft_type')!r} is not supported; "
                         "load_adapter reads 'LORA' adapters")
    for field, allowed in UNSUPPORTED_FIELDS.items():
        if config.get(field, allowed[0]) not in allowed:
            raise ValueError(
                f"adapter config field {field}={config[field]!r} is not supported by load_adapter "
                f"(allowed: {allowed[0]!r})"
            )
    init = config.get("init_lora_weights", True)
    if not isinstance(init, (bool, str)) or init not in PEFT_TO_INIT:
        raise ValueError(
            f"init_lora_weights={init!r} is not supported by load_adapter; allowed: true, false, "
            "'gaussian', 'pissa' (other inits change the base weights in ways we do not reproduce)"
        )
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise bad("r", "an integer >= 1")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise bad("lora_alpha", "a finite number > 0")
    dropout = config.get("lora_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise bad("lora_dropout", "a probability in [0, 1)")
    for flag in ("use_rslora", "fan_in_fan_out"):
        if flag in config and not isinstance(config[flag], bool):
            raise bad(flag, "true or false")
    for field in ("rank_pattern", "alpha_pattern"):
        if config.get(field) is not None and not isinstance(config[field], dict):
            raise bad(field, "a JSON object {regex: value}")
    target = config.get("target_modules")
    if not (isinstance(target, str) or (isinstance(target, list) and all(isinstance(t, str) for t in target))):
        raise bad("target_modules", "a regex string or a list of module names") if "target_modules" in config \
            else ValueError(f"{source}: target_modules is missing; nothing was loaded")
    for field in ("modules_to_save", "exclude_modules"):
        value = config.get(field)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)) \
                and not (field == "exclude_modules" and isinstance(value, str)):
            raise bad(field, "null or a list of module names")


def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's get_pattern_key: the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", name)``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _expected_shapes(
    model: nn.Module, config: dict[str, Any], source: str = CONFIG_NAME
) -> tuple[dict[str, dict], dict[str, tuple], list[str]]:
    """Per-layer settings {name: {r, alpha}}, expected tensor shapes {key: shape} and the
    modules to save, for this config on this model."""
    try:
        targets = find_lora_targets(model, config.get("target_modules") or [],
                                    config.get("modules_to_save"), config.get("exclude_modules"))
    except ValueError as exc:
        raise ValueError(f"the adapter does not fit this model ({source}): {exc}") from None
    settings, shapes = {}, {}
    for name in targets:
        layer = model.get_submodule(name)
        w = layer.weight  # Linear: (out, in); Conv1D: (in, out)
        out_f, in_f = w.shape if isinstance(layer, nn.Linear) else w.shape[::-1]
        r = _pattern_value(config.get("rank_pattern") or {}, name, config.get("r", 8))
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8))
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"{source}: rank_pattern gives layer {name!r} r={r!r}; an integer >= 1 is "
                             "needed; nothing was loaded")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"{source}: alpha_pattern gives layer {name!r} alpha={alpha!r}; a finite number "
                             "> 0 is needed; nothing was loaded")
        settings[name] = {"r": r, "alpha": alpha}
        shapes[_lora_key(name, "A")] = (r, in_f)
        shapes[_lora_key(name, "B")] = (out_f, r)
    save = find_modules_to_save(model, config.get("modules_to_save"), strict=False)
    for name in save:
        for key, value in model.get_submodule(name).state_dict().items():
            shapes[f"{PREFIX}{name}.{key}"] = tuple(value.shape)
    return settings, shapes, save


def _check_tensors(tensors: dict[str, torch.Tensor], shapes: dict[str, tuple], source: str = WEIGHTS_NAME) -> None:
    missing = sorted(set(shapes) - set(tensors))
    unexpected = sorted(set(tensors) - set(shapes))
    wrong = [f"{k}: file {tuple(tensors[k].shape)}, model needs {shapes[k]}"
             for k in sorted(set(shapes) & set(tensors)) if tuple(tensors[k].shape) != shapes[k]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatches (e.g. {wrong[:3]})")
    not_float = [f"{k} ({tensors[k].dtype})" for k in sorted(set(shapes) & set(tensors))
                 if "lora_" in k and not tensors[k].is_floating_point()]
    if not_float:
        problems.append(f"{len(not_float)} LoRA factors that are not floating point (e.g. {not_float[:3]})")
    if problems:
        raise ValueError(f"the adapter in {source} does not match this model (was it trained on another base?): "
                         + "; ".join(problems) + ". The model was not modified.")


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a LoRA adapter saved by PEFT (or by :func:`save_adapter`) into a plain model.

    Injects :class:`LoRALinear` layers as the config says (targets, r, alpha, rank/alpha
    patterns, dropout, rsLoRA, PiSSA), then copies the weights in. The result is ready to
    train, as after :func:`add_lora` (only the LoRA factors and ``modules_to_save`` are
    trainable). Returns ``model``.

    Raises:
        FileNotFoundError: no such directory, or no config / safetensors file in it.
        ValueError: a file that cannot be read (invalid JSON, truncated safetensors; the
            message names the file), a non-LoRA, unsupported or invalid config (a bad ``r``,
            ``lora_alpha``, ``rank_pattern``/``alpha_pattern`` entry: the message names the
            file, the field and the layer), a model that already has adapter layers, or
            tensors that do not match the model (missing or unexpected keys, wrong shapes).
            Nothing is modified in these cases (all is checked first; anything that still
            fails while loading is undone).
    """
    config, tensors = read_adapter(path)
    _check_config(config, str(Path(path) / CONFIG_NAME))
    if adapter_layers(model):
        raise ValueError("model already has adapter layers; load into a plain model (or merge_lora first)")
    settings, shapes, save = _expected_shapes(model, config, str(Path(path) / CONFIG_NAME))
    _check_tensors(tensors, shapes, str(Path(path) / WEIGHTS_NAME))
    base_name = config.get("base_model_name_or_path")
    model_name = getattr(model, "name_or_path", None)
    if base_name and model_name and Path(str(base_name)).name != Path(str(model_name)).name:
        warnings.warn(f"the adapter was trained on {Path(str(base_name)).name!r}, the model is "
                      f"{Path(str(model_name)).name!r}; shapes match, loading anyway",
                      UserWarning, stacklevel=2)

    # everything checked: now modify the model; should anything still fail, it is undone
    init = PEFT_TO_INIT[config.get("init_lora_weights", True)]
    originals = {name: model.get_submodule(name) for name in settings}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    changed_in_place = [model.get_submodule(n) for n in save] + (list(originals.values()) if init == "pissa" else [])
    snapshot = ModuleSnapshot(changed_in_place)  # PiSSA rewrites the base weights
    try:
        wrap_layers(model, settings, dropout=float(config.get("lora_dropout", 0.0)), init=init,
                    use_rslora=config.get("use_rslora", False))
        freeze_all_but_adapters(model, save)
        with torch.no_grad():
            for name, layer in lora_layers(model).items():
                layer.lora_A.copy_(tensors[_lora_key(name, "A")])  # copy_ keeps our dtype, as PEFT
                layer.lora_B.copy_(tensors[_lora_key(name, "B")])
            for name in save:
                module = model.get_submodule(name)
                module.load_state_dict({k: tensors[f"{PREFIX}{name}.{k}"] for k in module.state_dict()})
    except BaseException:
        swap_modules(model, originals)
        snapshot.restore()
        for p, flag in flags:
            p.requires_grad_(flag)
        raise
    return model
