"""LongLoRA (arXiv 2309.12307): shifted sparse attention (S2-Attn) and the trainable set.

S2-Attn, the paper's Algorithm 1 in its "roll" form (LongLoRA's ``forward_noflashattn`` in
``llama_attn_replace.py``, dvlab-research/LongLoRA):

1. split the sequence of length ``n`` into ``n / G`` groups of ``G`` consecutive tokens;
2. roll the second half of the heads by ``-G // 2`` along the sequence first, so that
   their groups straddle the first half's group borders;
3. causal attention inside each group only (cost ``n * G`` instead of ``n * n``);
4. roll the second half of the heads back by ``+G // 2``.

Used for training only: the model is evaluated (and served) with ordinary full attention,
which :func:`patch_s2attn` keeps for ``model.eval()``.

The other half of LongLoRA is the trainable set: LoRA on the attention projections plus
trainable embeddings and normalization layers; :data:`LONGLORA_MODULES_TO_SAVE` is that
set for :func:`lora_course.add_lora` (the repository's ``trainable_params="embed,norm"``).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .checks import check_bool, check_float_input, check_real

__all__ = [
    "LONGLORA_MODULES_TO_SAVE",
    "LONGLORA_TARGET_MODULES",
    "group_size_for",
    "is_s2attn_patched",
    "patch_s2attn",
    "roll_half_heads",
    "s2attn_mask",
    "shift_short_attention",
    "unpatch_s2attn",
]

# LoRA on the attention projections (the paper's setting) ...
LONGLORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
# ... plus embeddings and every norm trained whole (PEFT-style suffix match: "norm" catches
# input_layernorm, post_attention_layernorm and the final model.norm).
LONGLORA_MODULES_TO_SAVE = ["embed_tokens", "norm"]


def _check_group_size(seq_len: int, group_size: int) -> None:
    """LongLoRA raises only for ``seq_len % group_size != 0``; an odd size runs there but
    its roll (``-G // 2``) and roll back (``G // 2``) differ by one token, so we refuse it."""
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise ValueError(f"group_size must be an int, got {group_size!r}")
    if group_size < 2 or group_size % 2:
        raise ValueError(
            f"group_size={group_size} is not allowed: it must be an even int >= 2 "
            f"(with an odd size the roll by -{group_size}//2 and the roll back by {group_size}//2 "
            "do not cancel)")
    if seq_len % group_size:
        raise ValueError(
            f"group_size={group_size} does not divide the sequence length {seq_len}: allowed "
            f"values are the even divisors of {seq_len} (LongLoRA raises here too)")


def group_size_for(seq_len: int, group_size_ratio: float = 0.25) -> int:
    """LongLoRA's group size for a sequence: ``int(seq_len * group_size_ratio)``."""
    return int(seq_len * group_size_ratio)


def roll_half_heads(x: torch.Tensor, shifts: int) -> torch.Tensor:
    """Roll the second half of the heads of ``x`` (batch, heads, seq, dim) along the sequence."""
    half = x.shape[1] // 2
    return torch.cat([x[:, :half], x[:, half:].roll(shifts, dims=2)], dim=1)


def shift_short_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group_size: int,
    *,
    scaling: float | None = None,
    shift: bool = True,
) -> torch.Tensor:
    """S2-Attn of q (batch, heads, seq, dim) over k, v (batch, kv_heads, seq, dim).

    ``kv_heads`` may divide ``heads`` (grouped-query attention; k/v heads are repeated as
    transformers' ``repeat_kv`` does, before the shift, as LongLoRA does). Scores are divided
    by ``sqrt(dim)`` (LongLoRA) unless ``scaling`` is given (multiplied, as transformers);
    the softmax runs in float32 (float64 for float64 input) and is cast back to q's dtype. ``shift=False`` gives plain
    short (grouped) attention, the paper's ablation. Returns (batch, heads, seq, dim).

    Raises:
        ValueError: ``group_size`` odd, < 2 or not dividing seq; an odd head count;
            mismatched shapes; q, k or v not a floating-point tensor (an integer input would
            be truncated), or of different dtypes; a bad ``scaling`` or ``shift``.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float_input(name, t)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if scaling is not None:
        check_real("scaling", scaling, low=0.0, low_open=True, what="multiplies the scores")
    check_bool("shift", shift)
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be (batch, heads, seq, dim), got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    b, h, n, d = q.shape
    hkv = k.shape[1]
    if k.shape != v.shape or k.shape[0] != b or k.shape[2:] != (n, d):
        raise ValueError(f"k and v must be (batch={b}, kv_heads, seq={n}, dim={d}), got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if h % 2:
        raise ValueError(f"heads={h} is not allowed: the number of heads must be even, half of them "
                         "are shifted (LongLoRA's noflash forward would silently shift the larger half)")
    if h % hkv:
        raise ValueError(f"kv_heads={hkv} is not allowed: it must divide heads={h}")
    _check_group_size(n, group_size)
    g = group_size
    if hkv != h:  # GQA: query head i uses kv head i // (h // hkv)
        k, v = (t.repeat_interleave(h // hkv, dim=1) for t in (k, v))  # (b, h, n, d)
    if shift:
        q, k, v = (roll_half_heads(t, -g // 2) for t in (q, k, v))

    def grouped(t: torch.Tensor) -> torch.Tensor:  # (b, h, n, d) -> (b * n/g, h, g, d)
        return t.transpose(1, 2).reshape(b * (n // g), g, h, d).transpose(1, 2)

    qg, kg, vg = grouped(q), grouped(k), grouped(v)
    scores = qg @ kg.transpose(-2, -1)  # (b * n/g, h, g, g)
    scores = scores / math.sqrt(d) if scaling is None else scores * scaling
    causal = torch.ones(g, g, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    # LongLoRA upcasts the softmax to float32 (for fp16/bf16); float64 stays float64
    weights = F.softmax(scores, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
    out = weights @ vg  # (b * n/g, h, g, d)
    out = out.transpose(1, 2).reshape(b, n, h, d).transpose(1, 2)  # (b, h, n, d)
    return roll_half_heads(out, g // 2) if shift else out


def s2attn_mask(seq_len: int, group_size: int, shifted: bool) -> torch.Tensor:
    """(seq, seq) bool: which key (column) each query (row) sees, in original positions.

    ``shifted=False`` is the first half of the heads (block-diagonal causal groups);
    ``shifted=True`` the second half (groups moved by G/2; the last group wraps around, so
    its first-half-of-the-sequence tokens see the sequence's end).
    """
    _check_group_size(seq_len, group_size)
    pos = torch.arange(seq_len)
    idx = (pos - group_size // 2) % seq_len if shifted else pos  # index after the roll
    grp = idx // group_size
    return (grp[:, None] == grp[None, :]) & (idx[None, :] <= idx[:, None])


# -- patching transformers' Llama-family attention --------------------------------------------

_PREFIX = "s2attn_"


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules()
            if all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "num_key_value_groups"))]


def _make_interface(original: str) -> Callable[..., Any]:
    """An attention function for transformers' registry: S2-Attn when the module is training,
    else the ``original`` implementation with exactly the arguments it would have got."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import eager_attention_forward

    def fallback() -> Callable[..., Any]:
        return eager_attention_forward if original == "eager" else ALL_ATTENTION_FUNCTIONS[original]

    def s2attn_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, scaling: float | None = None,
                       dropout: float = 0.0, **kwargs: Any):
        if not module.training:
            return fallback()(module, query, key, value, attention_mask, scaling=scaling,
                              dropout=dropout, **kwargs)
        n = query.shape[2]  # query (b, h, n, d); key, value (b, h_kv, n, d)
        if key.shape[2] != n:
            raise ValueError(f"S2-Attn trains on whole sequences: query length {n} != key length "
                             f"{key.shape[2]} (a cache in training mode? pass use_cache=False)")
        if attention_mask is not None:  # the last row of a padding-free causal mask sees every key
            last = attention_mask[..., -1, :]
            ok = last.all() if last.dtype == torch.bool else (last == 0).all()
            if not ok:
                raise ValueError("S2-Attn does not support padding: train on full-length sequences")
        group = group_size_for(n, module.s2attn_group_size_ratio)
        out = shift_short_attention(query, key, value, group, scaling=scaling, shift=module.s2attn_shift)
        return out.transpose(1, 2).contiguous(), None  # (b, n, h, d), as transformers expects

    return s2attn_forward


def patch_s2attn(model: nn.Module, group_size_ratio: float = 0.25, *, shift: bool = True) -> nn.Module:
    """Train ``model`` (a transformers Llama-family model) with S2-Attn; eval keeps full attention.

    Registers an attention function ``"s2attn_<original>"`` in transformers'
    ``AttentionInterface`` (and the original's mask function under the same name) and switches
    the model to it with ``set_attn_implementation``: projections, RoPE and GQA stay
    transformers' own. In training mode each attention layer runs :func:`shift_short_attention`
    with ``group_size = int(seq_len * group_size_ratio)``; in eval mode it calls the original
    implementation with the same arguments, so eval outputs are unchanged. ``shift=False``
    trains with plain grouped attention (the paper's ablation). Undo with
    :func:`unpatch_s2attn`. In place; returns ``model``.
    """
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    if isinstance(group_size_ratio, bool) or not isinstance(group_size_ratio, numbers.Real) \
            or not 0 < group_size_ratio <= 1:
        raise ValueError(f"group_size_ratio must be a number in (0, 1], got {group_size_ratio!r}")
    shift = check_bool("shift", shift)
    modules = _attention_modules(model)
    config = getattr(model, "config", None)
    if not modules or config is None or not hasattr(model, "set_attn_implementation"):
        raise ValueError(f"patch_s2attn needs a transformers Llama-family model (attention modules "
                         f"with q/k/v/o_proj); got {type(model).__name__}")
    if getattr(config, "attention_dropout", 0.0):
        raise ValueError(f"attention_dropout={config.attention_dropout} is not supported (allowed: 0.0)")
    original = config._attn_implementation
    if original.startswith(_PREFIX):  # already patched: only the ratio changes
        original = original[len(_PREFIX):]
    if original not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        raise ValueError(f"attention implementation {original!r} is not supported; allowed: "
                         f"{sorted(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping)}")
    name = _PREFIX + original
    AttentionInterface.register(name, _make_interface(original))  # global registries: harmless if unused
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    before = [{a: getattr(m, a) for a in ("s2attn_group_size_ratio", "s2attn_shift") if hasattr(m, a)}
              for m in modules]
    implementation = config._attn_implementation
    try:
        for m in modules:
            m.s2attn_group_size_ratio = float(group_size_ratio)
            m.s2attn_shift = shift
        model.set_attn_implementation(name)
    except BaseException:  # put every module back as it was
        for m, attrs in zip(modules, before):
            for a in ("s2attn_group_size_ratio", "s2attn_shift"):
                if a in attrs:
                    setattr(m, a, attrs[a])
                elif hasattr(m, a):
                    delattr(m, a)
        if config._attn_implementation != implementation:
            model.set_attn_implementation(implementation)
        raise
    return model


def is_s2attn_patched(model: nn.Module) -> bool:
    """Whether :func:`patch_s2attn` is active on ``model``."""
    config = getattr(model, "config", None)
    return config is not None and str(config._attn_implementation).startswith(_PREFIX)


def unpatch_s2attn(model: nn.Module) -> nn.Module:
    """Restore the attention implementation ``model`` had before :func:`patch_s2attn`."""
    if not is_s2attn_patched(model):
        raise ValueError("the model is not patched with patch_s2attn")
    model.set_attn_implementation(model.config._attn_implementation[len(_PREFIX):])
    for m in _attention_modules(model):
        for attr in ("s2attn_group_size_ratio", "s2attn_shift"):
            if hasattr(m, attr):
                delattr(m, attr)
    return model
