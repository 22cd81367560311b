"""Estimating training memory: where the bytes of one training step go, from shapes alone.

:func:`estimate_training_memory` splits the memory of one training step of full
fine-tuning, LoRA or QLoRA into weights, quantization constants, gradients, optimizer
states and activations, in bytes, from a model (or a transformers config, or a parameter
count). Parameter counts are exact: the model is built on PyTorch's ``meta`` device from
its config (no memory, no weights), and the adapted layers are matched by the same rules
as :func:`~lora_course.add_lora` / :func:`~lora_course.add_qlora`. Measuring the same
memory is :mod:`lora_course.memory_measure`.

The activation model is written for Llama-family decoders (transformers' ``LlamaForCausalLM``
and its relatives: RMSNorm, rotary embeddings, SwiGLU MLP, grouped-query attention; the
``model_type`` values in :data:`LLAMA_FAMILY`) with
PyTorch's fused ``scaled_dot_product_attention`` (no (seq x seq) matrix is kept); it counts
the tensors autograd saves for backward, layer by layer (see :func:`activation_bytes`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .checks import check_blocksize, check_bool, check_float_dtype, check_int

__all__ = ["METHODS", "OPTIMIZERS", "MemoryBreakdown", "activation_bytes", "estimate_training_memory",
           "model_on_meta"]

METHODS = ("full", "lora", "qlora")
OPTIMIZERS = ("adamw", "adamw8bit", "sgd")
#: config ``model_type`` values whose activations :func:`activation_bytes` models (other configs
#: get no activation estimate, with a note saying so)
LLAMA_FAMILY = ("llama", "mistral", "qwen2")
#: the projections inside a Llama decoder layer (what ``trained`` may name)
LAYER_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# integer size fields of a config, checked before a model is built from it (>= 1; layers >= 0)
_SIZE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size")
# bitsandbytes' blockwise 8-bit optimizers: one uint8 per state value plus one float32
# absmax per block of 256 values (bitsandbytes.optim.optimizer.Optimizer8bit, block_wise=True).
ADAM8BIT_BLOCKSIZE = 256
MiB = 2**20
GiB = 2**30

@dataclass
class MemoryBreakdown:
    """Bytes of one training step, part by part (see :func:`estimate_training_memory`).

    ``total`` is the sum of the parts: the memory a step needs if every part is alive at
    once, which is the usual back-of-the-envelope figure. ``peak`` is a closer estimate of
    the worst moment: autograd frees the saved activations while backward creates the
    gradients, so both are never whole at the same time. Either the start of backward is
    the worst (activations + ``backward_workspace``) or the optimizer step (all gradients +
    ``optimizer_workspace``, the temporaries of PyTorch's per-tensor AdamW update).
    """

    method: str
    weights: int
    quant_constants: int
    gradients: int
    optimizer_states: int
    activations: int
    backward_workspace: int = 0
    optimizer_workspace: int = 0
    trainable_params: int = 0
    total_params: int = 0
    notes: list[str] = field(default_factory=list)

    PARTS = ("weights", "quant_constants", "gradients", "optimizer_states", "activations")

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is unknown; allowed values: {', '.join(METHODS)}")
        for name in (*self.PARTS, "backward_workspace", "optimizer_workspace", "trainable_params", "total_params"):
            setattr(self, name, check_int(name, getattr(self, name), low=0))  # bytes or counts
        if not isinstance(self.notes, list) or not all(isinstance(note, str) for note in self.notes):
            raise ValueError(f"notes must be a list of str, got notes={self.notes!r:.80}")

    @property
    def total(self) -> int:
        """Sum of the five parts."""
        return sum(getattr(self, part) for part in self.PARTS)

    @property
    def peak(self) -> int:
        """Estimated peak: static parts plus the larger of (activations + the first gradients
        of backward) and (all gradients + the optimizer's per-tensor workspace)."""
        static = self.weights + self.quant_constants + self.optimizer_states
        return static + max(self.activations + self.backward_workspace,
                            self.gradients + self.optimizer_workspace)

    def as_dict(self) -> dict[str, Any]:
        """The parts, ``total`` and ``peak`` as a plain dict (for JSON and tables)."""
        out = {k: v for k, v in asdict(self).items() if k != "notes"}
        return {**out, "total": self.total, "peak": self.peak, "notes": list(self.notes)}

    def __str__(self) -> str:
        lines = [f"{self.method}: {self.trainable_params:,} trainable of {self.total_params:,} parameters"]
        for part in (*self.PARTS, "total", "peak"):
            lines.append(f"  {part:<17} {getattr(self, part) / GiB:10.3f} GiB")
        return "\n".join(lines)


def _bytes_of(dtype: torch.dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()


def model_on_meta(config: Any) -> nn.Module:
    """Build the causal-LM model of a transformers ``config`` on the ``meta`` device: every
    tensor has its shape and dtype but no memory, so a 65B model is built in a second."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


_META_MODELS: dict[str, nn.Module] = {}


def _meta_model_cached(config: Any) -> nn.Module:
    """:func:`model_on_meta`, built once per distinct config (the estimate is called in loops)."""
    key = f"{type(config).__name__}:{config.to_json_string(use_diff=False)}"
    if key not in _META_MODELS:
        _META_MODELS[key] = model_on_meta(config)
    return _META_MODELS[key]


def _unique_params(model: nn.Module) -> dict[str, nn.Parameter]:
    seen: dict[int, str] = {}
    out: dict[str, nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in seen:
            seen[id(p)] = name
            out[name] = p
    return out


def _numels(numels: Any) -> list[int]:
    """``numels`` (an iterable of element counts, integers >= 0) as a list, or a ``ValueError``."""
    if isinstance(numels, (str, bytes)) or not isinstance(numels, Iterable):
        raise ValueError(f"numels must be an iterable of element counts (integers >= 0), got numels={numels!r:.80}")
    return [check_int(f"numels[{k}]", n, low=0) for k, n in enumerate(list(numels))]


def adam8bit_state_bytes(numels: Iterable[int]) -> int:
    """Two moments per value; bitsandbytes keeps tensors under 4,096 values in float32, and
    all 8-bit tensors share two 256-entry float32 code books (``qmap1``, ``qmap2``).
    ``numels``: the element count of each trained tensor (integers >= 0)."""
    total, any_8bit = 0, False
    for n in _numels(numels):
        if n >= 4096:
            total += 2 * (n + 4 * math.ceil(n / ADAM8BIT_BLOCKSIZE))
            any_8bit = True
        else:
            total += 2 * 4 * n
    return total + (2 * 256 * 4 if any_8bit else 0)


def _nf4_bytes(numel: int, blocksize: int, double_quant: bool) -> tuple[int, int]:
    """(packed codes, block constants) bytes of one NF4 weight, as :func:`~lora_course.quantize_nf4`."""
    blocks = math.ceil(numel / blocksize)
    if double_quant:  # uint8 per block + float32 absmax per 256 blocks + one float32 offset
        return (numel + 1) // 2, blocks + 4 * math.ceil(blocks / 256) + 4
    return (numel + 1) // 2, 4 * blocks


def _llama_dims(config: Any) -> dict[str, int]:
    model_type = getattr(config, "model_type", None)
    if model_type not in LLAMA_FAMILY:
        raise ValueError(f"the activation model needs a Llama-family config (model_type {', '.join(LLAMA_FAMILY)}); "
                         f"config is {type(config).__name__} with model_type {model_type!r}")
    needed = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in needed if getattr(config, k, None) is None]
    if missing:
        raise ValueError(
            f"the activation model needs a Llama-family config (fields {', '.join(needed)}); "
            f"{type(config).__name__} lacks {', '.join(missing)}"
        )
    size = {k: check_int(f"config.{k}", getattr(config, k), low=0 if k == "num_hidden_layers" else 1) for k in needed}
    heads = size["num_attention_heads"]
    head_dim = check_int("config.head_dim (or hidden_size // num_attention_heads)",
                         getattr(config, "head_dim", None) or size["hidden_size"] // heads)
    kv_heads = check_int("config.num_key_value_heads", getattr(config, "num_key_value_heads", None) or heads)
    return dict(h=size["hidden_size"], i=size["intermediate_size"], layers=size["num_hidden_layers"],
                heads=heads, kv_heads=kv_heads, head_dim=head_dim, vocab=size["vocab_size"])


def activation_bytes(
    config: Any,
    batch: int,
    seq_len: int,
    dtype: torch.dtype = torch.float32,
    trained: Iterable[str] | None = None,
    lora_r: int | None = None,
    adapter_dtype: torch.dtype = torch.float32,
    gradient_checkpointing: bool = False,
    dequantize_bytes: int = 0,
) -> tuple[int, int]:
    """Bytes autograd keeps for backward in one step of a Llama-family model, and the extra
    bytes at the start of backward. Returns ``(activations, backward_workspace)``.

    Counted tensor by tensor, as transformers' Llama modules with SDPA attention save them
    (per token; ``d`` = bytes of ``dtype``, ``a`` = bytes of ``adapter_dtype``):

    * each RMSNorm: its input in float32 (``4h``) and ``1/rms`` (4 bytes) when the input
      needs a gradient; the normalised input (``d*h``) when the norm's weight trains;
    * a projection's input: once (``d*width``) when its weight trains or a LoRA factor of
      ``dtype`` reads it; nothing when it is frozen without adapter;
    * attention (fused SDPA: no seq x seq matrix is kept): rotated q (``d*heads*hd``), k and
      v (``d*kv_heads*hd`` each), the output (``d*heads*hd``, also o_proj's input) and the
      log-sum-exp (4 bytes per head);
    * SwiGLU MLP: gate and up outputs, silu(gate) (``d*i`` each), their product (``d*i``)
      when down_proj trains;
    * each LoRA factor pair: ``A x`` (``r*a``); when the adapter dtype differs from ``dtype``
      each adapter keeps its own ``a``-typed copy of the input instead (PEFT casts x to the
      factors' dtype: q, k and v make three copies of one input);
    * once per model: the final norm, the float32 log-softmax of the logits (``4V``; the
      logits themselves are freed when the caller drops them: ``loss = model(...).loss``),
      the labels, and RoPE's cos/sin
      (per position, not per sequence).

    ``trained``: names of the trained projections inside a decoder layer (``"q_proj"``,
    ``"down_proj"``...); ``None`` means full fine-tuning (every weight, norms and embeddings
    included). With ``gradient_checkpointing`` each layer keeps only its input (``d*h``) and
    one layer is recomputed at a time during backward (counted in the workspace). The
    workspace is what backward adds before it frees anything: the float32 gradients of the
    log-probabilities and of the logits (``8V`` per token), or with checkpointing the larger
    of that and one recomputed layer. ``dequantize_bytes`` (QLoRA): the transient of
    dequantizing the largest 4-bit weight in backward, which happens after the log-softmax
    output (``4V`` per token) was freed, next to the MLP's gradients (``d*(2i + h)`` per token)
    (with checkpointing: next to the recomputed layer). This QLoRA moment is modelled to
    within a few percent of a small model's peak; the others are exact for this implementation.

    Arguments (a ``ValueError`` names a bad one): ``config`` of a ``model_type`` in
    :data:`LLAMA_FAMILY` with integer sizes (``num_hidden_layers >= 1`` with checkpointing);
    ``batch``, ``seq_len``: integers >= 1; ``dtype``, ``adapter_dtype``: float32, float16 or
    bfloat16; ``trained``: None or a collection (not a str) of names in :data:`LAYER_PROJECTIONS`;
    ``lora_r``: an integer >= 1, needed when ``trained`` is given; ``gradient_checkpointing``:
    True or False; ``dequantize_bytes``: an integer >= 0.
    """
    batch, seq_len = check_int("batch", batch), check_int("seq_len", seq_len)
    check_float_dtype("dtype", dtype)
    check_float_dtype("adapter_dtype", adapter_dtype)
    check_bool("gradient_checkpointing", gradient_checkpointing)
    dequantize_bytes = check_int("dequantize_bytes", dequantize_bytes, low=0)
    lora_r = check_int("lora_r", lora_r, allow_none=True)
    full = trained is None
    if not full:
        if isinstance(trained, (str, bytes)) or not isinstance(trained, Iterable):
            raise ValueError(f"trained must be None (full fine-tuning) or a collection of projection names such as "
                             f"['q_proj', 'v_proj'], got trained={trained!r:.80}")
        trained = list(trained)
        unknown = [n for n in trained if not isinstance(n, str) or n not in LAYER_PROJECTIONS]
        if unknown:
            raise ValueError(f"trained={trained!r:.80} names {unknown!r:.60}, which are not projections of a "
                             f"Llama decoder layer; allowed values: {', '.join(LAYER_PROJECTIONS)}")
        if lora_r is None:
            raise ValueError("lora_r must be an integer >= 1 (the LoRA rank) when trained is given, got lora_r=None")
    dims = _llama_dims(config)
    if gradient_checkpointing and dims["layers"] < 1:
        raise ValueError(f"gradient_checkpointing needs config.num_hidden_layers >= 1, got "
                         f"config.num_hidden_layers={dims['layers']!r}")
    h, i, heads, kv, hd, vocab = (dims[k] for k in ("h", "i", "heads", "kv_heads", "head_dim", "vocab"))
    d, a = _bytes_of(dtype), _bytes_of(adapter_dtype)
    names = set() if full else set(trained)

    def inputs_saved(group: tuple[str, ...], width: int, already_saved: bool = False) -> int:
        """Bytes the projections in ``group`` keep of their shared input (``width`` wide)."""
        if full:
            return 0 if already_saved else d * width  # weight gradients need the input
        adapted = [n for n in group if n in names]
        if not adapted:
            return 0  # a frozen projection keeps nothing of its input
        kept = lora_r * a * len(adapted)  # A x, kept for B's gradient
        if a != d:
            return kept + a * width * len(adapted)  # each adapter casts its own copy
        return kept + (0 if already_saved else d * width)

    def norm(input_grad: bool) -> int:
        return (4 * h + 4 if input_grad else 0) + (d * h if full else 0)

    trains = lambda name: full or name in names  # noqa: E731

    def layer(grad: bool) -> tuple[int, bool]:
        """Bytes one decoder layer keeps, and whether its output needs a gradient; ``grad``:
        whether its input does (not so in LoRA's first layer: the embedding is frozen)."""
        b = norm(input_grad=grad)
        b += inputs_saved(("q_proj", "k_proj", "v_proj"), h)
        attn = grad or full or any(map(trains, ("q_proj", "k_proj", "v_proj")))
        if attn:
            b += 2 * d * heads * hd + 2 * d * kv * hd + 4 * heads  # SDPA's saved q, k, v, out, lse
        b += inputs_saved(("o_proj",), heads * hd, already_saved=attn)  # SDPA keeps its output
        grad = grad or attn or trains("o_proj")  # the residual stream after attention
        b += norm(input_grad=grad)
        b += inputs_saved(("gate_proj", "up_proj"), h)
        gate, up = grad or trains("gate_proj"), grad or trains("up_proj")
        # silu(gate) * up: silu keeps its input, the product keeps the factor of the other side
        b += (2 * d * i if gate else 0) + (d * i if up else 0)
        b += inputs_saved(("down_proj",), i)
        return b, grad or gate or up or trains("down_proj")

    tokens = batch * seq_len
    per_layer, grad = [], full
    for _ in range(dims["layers"]):
        kept_bytes, grad = layer(grad)
        per_layer.append(kept_bytes)
    logits_grads = tokens * 8 * vocab  # grad of the log-probabilities and of the logits
    if gradient_checkpointing:  # layer inputs only; backward recomputes one layer at a time
        kept, workspace = dims["layers"] * d * h, max(logits_grads, tokens * max(per_layer))
    else:
        kept, workspace = sum(per_layer), logits_grads
    if dequantize_bytes and gradient_checkpointing:  # a recomputed layer dequantizes its weights again
        workspace = max(workspace, tokens * max(per_layer) + dequantize_bytes)
    elif dequantize_bytes:
        workspace = max(workspace, dequantize_bytes - tokens * 4 * vocab + tokens * d * (2 * i + h))
    head = norm(input_grad=grad) + (d * h if full else 0) + 4 * vocab + 8  # final norm, lm_head input
    activations = tokens * (kept + head) + seq_len * 2 * hd * d
    return activations, workspace


def estimate_training_memory(
    model: int | nn.Module | Any,
    method: str = "lora",
    r: int = 8,
    target_modules: str | Sequence[str] = "all-linear",
    optimizer: str = "adamw",
    dtype: torch.dtype = torch.bfloat16,
    batch: int = 1,
    seq_len: int = 512,
    gradient_checkpointing: bool = False,
    adapter_dtype: torch.dtype = torch.float32,
    optimizer_state_dtype: torch.dtype = torch.float32,
    master_weights: bool = False,
    blocksize: int = 64,
    double_quant: bool = True,
) -> MemoryBreakdown:
    """Per-part memory of one training step of ``method`` in {"full", "lora", "qlora"}.

    Args:
        model: a transformers config (built on the ``meta`` device to count parameters
            exactly) or a dict of one (with its ``"model_type"``, as in ``config.json``), a
            model (a transformers model; a plain ``nn.Module`` has no config, so its
            activations are not estimated), or a parameter count (an integer, or a whole
            float such as ``7e9``: weights, gradients and optimizer states of ``full`` only;
            no activations).
        method: ``"full"`` trains every parameter in ``dtype``; ``"lora"`` freezes the base in
            ``dtype`` and trains rank-``r`` factors (``adapter_dtype``) on ``target_modules``
            (matched as :func:`~lora_course.add_lora`); ``"qlora"`` as LoRA with the targeted
            weights in NF4 (``blocksize``, ``double_quant``) as :func:`~lora_course.add_qlora`;
            the other weights (embeddings, norms, output head) stay in ``dtype``.
        optimizer: ``"adamw"`` (two moments per trained value in ``optimizer_state_dtype``),
            ``"adamw8bit"`` (bitsandbytes' blockwise 8-bit moments: 1 byte each plus a float32
            absmax per 256 values; tensors under 4,096 values stay float32), ``"sgd"`` (no
            state: plain SGD without momentum).
        master_weights: keep a float32 copy of trained weights that are not float32 (mixed
            precision), counted with the optimizer states.
        batch, seq_len, gradient_checkpointing: the activations (see :func:`activation_bytes`).

    Returns:
        :class:`MemoryBreakdown` (bytes): ``weights`` (base weights, adapters, 4-bit codes),
        ``quant_constants`` (NF4 block constants), ``gradients`` (of the trained parameters,
        in their dtype), ``optimizer_states``, ``activations``; ``total`` sums them; ``peak``
        is the closer estimate described there (the worst moment of a step: the start of
        backward or the optimizer step).

    Raises:
        ValueError: unknown method or optimizer, r < 1, batch/seq_len < 1, a dtype that is
            not float32/float16/bfloat16, a flag that is not True/False, a parameter count
            with lora/qlora, a ``model`` of none of the kinds above, a config (or dict) whose
            sizes are not integers >= 1 or that transformers refuses, or a model without
            parameters (the message names the argument). A config whose ``model_type`` is not
            in :data:`LLAMA_FAMILY` gets no activation estimate (0, with a note saying so).
    """
    from .surgery import find_lora_targets  # surgery imports nothing from the package
    from .quant.nf4 import BLOCKSIZES_4BIT

    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method={method!r} is unknown; allowed values: {', '.join(METHODS)}")
    if not isinstance(optimizer, str) or optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} is unknown; allowed values: {', '.join(OPTIMIZERS)}")
    r, batch, seq_len = check_int("r", r), check_int("batch", batch), check_int("seq_len", seq_len)
    for value, arg in ((gradient_checkpointing, "gradient_checkpointing"), (master_weights, "master_weights"),
                       (double_quant, "double_quant")):
        check_bool(arg, value)
    model = _parameter_count(model)
    for value, arg in ((dtype, "dtype"), (adapter_dtype, "adapter_dtype"), (optimizer_state_dtype, "optimizer_state_dtype")):
        check_float_dtype(arg, value)
    check_blocksize(blocksize, BLOCKSIZES_4BIT)
    d, a = _bytes_of(dtype), _bytes_of(adapter_dtype)
    notes: list[str] = []

    if isinstance(model, int) and not isinstance(model, bool):
        check_int("model (a parameter count)", model)
        if method != "full":
            raise ValueError(
                f"method={method!r} needs the model's layers to count the adapter's parameters; "
                "pass a transformers config or a model instead of a parameter count"
            )
        n = model
        states = optimizer_state_bytes(optimizer, [n], optimizer_state_dtype, master_weights and d != 4)
        notes.append("activations not estimated: pass a config to include them")
        return MemoryBreakdown("full", weights=n * d, quant_constants=0, gradients=n * d,
                               optimizer_states=states, activations=0, trainable_params=n,
                               total_params=n, notes=notes)

    if isinstance(model, nn.Module):
        config, net = getattr(model, "config", None), model
    else:
        config = _as_config(model)
        _check_config_sizes(config)  # before a model is built from it
        net = _meta_model_cached(config)
    params = _unique_params(net)
    n_total = sum(p.numel() for p in params.values())
    if n_total == 0:
        raise ValueError(f"model has no parameters, nothing to train: got {type(model).__name__}")
    targets = [] if method == "full" else find_lora_targets(net, target_modules)
    shapes = {name: tuple(net.get_submodule(name).weight.shape) for name in targets}
    lora_numels = [k for name, (out_f, in_f) in shapes.items() for k in (r * in_f, out_f * r)]
    n_lora = sum(lora_numels)

    if method == "full":
        trained_numels = [p.numel() for p in params.values()]
        weights, constants, grads = n_total * d, 0, n_total * d
        states = optimizer_state_bytes(optimizer, trained_numels, optimizer_state_dtype, master_weights and d != 4)
        trained_in_layer = None
        workspace_extra = 0
    else:
        states = optimizer_state_bytes(optimizer, lora_numels, optimizer_state_dtype, master_weights and a != 4)
        grads = n_lora * a
        constants = 0
        if method == "lora":
            weights = n_total * d + n_lora * a
            workspace_extra = 0
        else:
            quantized = sum(o * i for o, i in shapes.values())
            codes_and_constants = [_nf4_bytes(o * i, blocksize, double_quant) for o, i in shapes.values()]
            weights = (n_total - quantized) * d + sum(c for c, _ in codes_and_constants) + n_lora * a
            constants = sum(k for _, k in codes_and_constants)
            workspace_extra = _dequantize_workspace(max((o * i for o, i in shapes.values()), default=0), d, blocksize)
            notes.append("qlora: targeted layers in NF4; other weights in dtype")
        layer_prefix = _first_layer_prefix(targets)
        trained_in_layer = {t[len(layer_prefix):].rsplit(".", 1)[-1] for t in targets if t.startswith(layer_prefix)}
        trained_in_layer &= set(LAYER_PROJECTIONS)  # other names (lm_head...) change no layer's activations
    activations, workspace = 0, 0
    if config is None:  # a plain nn.Module: no config to read the shapes of activations from
        notes.append("activations not estimated: the model has no transformers config")
    else:  # a config outside LLAMA_FAMILY: activation_bytes refuses it, and the note says why
        try:
            activations, workspace = activation_bytes(
                config, batch, seq_len, dtype, trained_in_layer, r if method != "full" else None,
                adapter_dtype, gradient_checkpointing, dequantize_bytes=workspace_extra)
        except ValueError as exc:
            notes.append(f"activations not estimated: {exc}")
    trainable = n_total if method == "full" else n_lora
    largest = max(trained_numels if method == "full" else lora_numels, default=0)
    # PyTorch's AdamW (per tensor on CPU) makes two temporaries the size of the tensor it updates
    opt_workspace = 2 * largest * (_bytes_of(optimizer_state_dtype)) if optimizer == "adamw" else 0
    total = n_total + (n_lora if method != "full" else 0)
    return MemoryBreakdown(method, weights=weights, quant_constants=constants, gradients=grads,
                           optimizer_states=states, activations=activations,
                           backward_workspace=workspace,
                           optimizer_workspace=opt_workspace,
                           trainable_params=trainable, total_params=total, notes=notes)


def _parameter_count(model: Any) -> Any:
    """A parameter count as an ``int`` (numpy integers, whole floats such as ``7e9``); any other
    ``model`` is returned as it is."""
    if isinstance(model, bool):
        raise ValueError(f"model must be a transformers config, a model or a parameter count, got model={model!r}")
    if isinstance(model, numbers.Integral):
        return check_int("model (a parameter count)", model)
    if isinstance(model, numbers.Real):
        if not (math.isfinite(model) and float(model).is_integer() and model >= 1):
            raise ValueError(f"model as a parameter count must be a whole number >= 1, got model={model!r}")
        return int(model)
    return model


def _as_config(model: Any) -> Any:
    """A transformers config from ``model`` (a config, or a dict with ``"model_type"``)."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return model
    if isinstance(model, dict):
        if not isinstance(model.get("model_type"), str):
            raise ValueError("model as a dict must be a transformers config's dict with its \"model_type\" "
                             f"(as in config.json), got keys {sorted(model)[:10]}")
        fields = {k: v for k, v in model.items() if k != "model_type"}
        try:
            return AutoConfig.for_model(model["model_type"], **fields)
        except (ValueError, KeyError) as exc:
            raise ValueError(f"model={{'model_type': {model['model_type']!r}, ...}} is not a config "
                             f"transformers knows: {exc}") from None
        except (TypeError, *_config_field_errors()) as exc:  # a field of the wrong type or an inconsistent set
            raise ValueError(f"model={{'model_type': {model['model_type']!r}, ...}} has fields transformers "
                             f"refuses: {' '.join(str(exc).split())}") from None
    raise ValueError("model must be a transformers config (or its dict), a model (nn.Module) or a "
                     f"parameter count, got {type(model).__name__}: {model!r:.80}")


def _config_field_errors() -> tuple[type[Exception], ...]:
    """The exceptions transformers' strict config dataclasses raise for a bad field (huggingface_hub)."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # an older huggingface_hub: configs are not strict dataclasses
        return ()
    return (StrictDataclassError,)


def _check_config_sizes(config: Any) -> None:
    """The integer sizes of a config (:data:`_SIZE_FIELDS` it has) are integers >= 1 (layers >= 0):
    a ``ValueError`` naming ``model.<field>`` rather than a failure while the model is built."""
    for k in _SIZE_FIELDS:
        value = getattr(config, k, None)
        if value is not None and not isinstance(value, (list, tuple)):  # some configs give one per layer
            check_int(f"model.{k}", value, low=0 if k == "num_hidden_layers" else 1)


def _dequantize_workspace(numel: int, d: int, blocksize: int) -> int:
    """Transient bytes of dequantizing the largest NF4 weight (:func:`~lora_course.quant.dequantize_nf4`):
    the (out x in) result in the weight's dtype, one chunk of int32 indices (one per byte, 2 bytes
    per value; a float32 output is decoded in place), a float32 chunk buffer when the dtype is not
    float32, and the float32 block absmax values. One decoding thread, as on a GPU and under a
    memory tracker: on a CPU, :func:`~lora_course.quant.nf4.decode_workers` threads each hold
    their own buffers of ``THREAD_DEQUANT_CHUNK`` values (at most 6 MiB per thread), which the
    estimate leaves out so that it does not depend on the machine it is computed on."""
    from .quant.nf4 import DEQUANT_CHUNK

    chunk = min(numel, DEQUANT_CHUNK)
    return numel * d + chunk * (2 if d == 4 else 6) + 4 * math.ceil(numel / blocksize)


def _first_layer_prefix(names: Sequence[str]) -> str:
    """``"model.layers.0."`` for Llama-family names (the first decoder layer's prefix)."""
    for name in names:
        parts = name.split(".")
        for k, part in enumerate(parts):
            if part.isdigit():
                return ".".join(parts[: k + 1]) + "."
    return ""


def optimizer_state_bytes(optimizer: str, numels: Sequence[int], state_dtype: torch.dtype, master: bool) -> int:
    """Bytes of ``optimizer``'s state (one of :data:`OPTIMIZERS`) for trained tensors of ``numels``
    elements (integers >= 0): ``"adamw"`` two moments in ``state_dtype`` (float32/float16/bfloat16),
    ``"adamw8bit"`` :func:`adam8bit_state_bytes`, ``"sgd"`` none; ``master`` (True or False) adds a
    float32 copy of every value. A ``ValueError`` names a bad argument."""
    if not isinstance(optimizer, str) or optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} is unknown; allowed values: {', '.join(OPTIMIZERS)}")
    numels = _numels(numels)
    check_float_dtype("state_dtype", state_dtype)
    check_bool("master", master)
    n = sum(numels)
    extra = 4 * n if master else 0
    if optimizer == "adamw":
        return 2 * n * _bytes_of(state_dtype) + extra
    if optimizer == "adamw8bit":
        return adam8bit_state_bytes(numels) + extra
    return extra  # sgd without momentum keeps no state
