"""8-bit AdamW from scratch: block-wise quantized optimizer states (arXiv 2110.02861).

Adam keeps two moments per parameter, m (first) and v (second), 8 bytes per value in float32.
Dettmers et al.'s 8-bit optimizers store each moment as one byte: a code of the *dynamic map*
(``lora_course.dynamic_map``) and one float32 absmax per block of 256 values. Each step:

    m, v = dequantize(codes, absmax)                  # float32, only for this step
    m = beta1 m + (1 - beta1) g ;  v = beta2 v + (1 - beta2) g*g
    p = p (1 - lr wd) - lr/c1 * m / (sqrt(v)/c2 + eps),   c1 = 1 - beta1^t, c2 = sqrt(1 - beta2^t)
    codes, absmax = quantize(m), quantize(v)          # back to 8 bits

The first moment uses the signed map, the second (never negative) the unsigned map
(``create_dynamic_map(signed=False)``: twice the resolution on [0, 1]). Block-wise absmax keeps
one large gradient from flattening the codes of a whole tensor (only its block of 256 suffers).

Everything matches bitsandbytes 0.50's CPU ``AdamW8bit`` bit for bit (read in
``bitsandbytes/optim/optimizer.py``: ``Optimizer2State.init_state`` / ``update_step``;
``bitsandbytes/backends/cpu/ops.py``: ``_optimizer_update_8bit_blockwise_cpu`` and
``_optimizer_update_32bit_cpu``):

* tensors with fewer than ``min_8bit_size`` (4096) values keep float32 moments and use the
  32-bit kernel, whose formula is arranged differently:
  ``p += (-lr * c2 / c1) * m / (sqrt(v) + eps * c2)``;
* the 8-bit kernel computes ``denom = sqrt(v) / c2 + eps`` and ``p.addcdiv_(m, denom, -lr / c1)``;
* decoupled weight decay ``p *= 1 - lr * wd`` comes first (when ``wd > 0``), on the float32 copy;
* codes come from bitsandbytes' 65,536-slot lookup table (not the nearest code), as
  :func:`~lora_course.quantize_blockwise_8bit`; bitsandbytes' CPU kernel always uses blocks of 256;
* c1 and c2 are Python (double) numbers; every tensor operation is float32 and in place, in
  bitsandbytes' order (a different order changes the last bit of some values).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import torch

from .checks import check_blocksize
from .quant.double_quant import (
    BLOCKSIZES_8BIT,
    code_lut,
    dequantize_blockwise_8bit,
    dynamic_map,
    lut_slot,
    quantize_blockwise_8bit,
)

_UNSIGNED: dict[str, torch.Tensor] = {}
CHUNK_BLOCKS = 256  # blocks per chunk of the 8-bit update (256 x 256 values = 64K: fits in L2)


def _unsigned_lut() -> torch.Tensor:
    if "lut" not in _UNSIGNED:
        _UNSIGNED["lut"] = code_lut(dynamic_map(signed=False))
    return _UNSIGNED["lut"]


def _unsigned_map(device: torch.device) -> torch.Tensor:
    if "map" not in _UNSIGNED:
        _UNSIGNED["map"] = dynamic_map(signed=False)
    return _UNSIGNED["map"].to(device)


def quantize_blockwise_unsigned(x: torch.Tensor, blocksize: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`~lora_course.quantize_blockwise_8bit`, on the *unsigned* dynamic map (for v >= 0).

    The lookup table still spans [-1, 1] (bitsandbytes' CPU kernel is the same for both maps);
    non-negative values only use its upper half.
    """
    flat = x.detach().reshape(-1).float()  # (n,)
    n, nb = flat.numel(), -(-flat.numel() // blocksize)
    blocks = torch.nn.functional.pad(flat, (0, nb * blocksize - n)).view(nb, blocksize)  # (nb, bs)
    absmax = blocks.abs().amax(dim=1)  # (nb,)
    zero = absmax == 0  # all-zero blocks get code 0
    inv = torch.where(zero, 0.0, 1.0 / absmax)  # reciprocal, then multiply (as the C kernel)
    slots = lut_slot(blocks * inv[:, None]).view(-1)  # (nb*bs,) int64 table slots
    q = _unsigned_lut().to(x.device).index_select(0, slots).view(nb, blocksize)  # (nb, bs) uint8
    q = torch.where(zero[:, None], torch.zeros((), dtype=torch.uint8), q)
    return q.reshape(-1)[:n].clone().reshape(x.shape), absmax


def dequantize_blockwise_unsigned(q: torch.Tensor, absmax: torch.Tensor, blocksize: int = 256) -> torch.Tensor:
    """``unsigned_map[q] * absmax[block]`` in float32, shape of ``q``."""
    n, nb = q.numel(), absmax.numel()
    vals = _unsigned_map(q.device).index_select(0, q.reshape(-1).long())  # (n,) float32
    vals = torch.nn.functional.pad(vals, (0, nb * blocksize - n)).view(nb, blocksize)
    return (vals * absmax.reshape(nb, 1)).reshape(-1)[:n].reshape(q.shape)


def _check_args(lr, betas, eps, weight_decay, blocksize, min_8bit_size) -> None:
    def real(v):
        return isinstance(v, numbers.Real) and not isinstance(v, bool)

    if not real(lr) or not lr >= 0:
        raise ValueError(f"lr must be a number >= 0, got lr={lr!r}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2 or not all(real(b) and 0 <= b < 1 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got betas={betas!r}")
    if not real(eps) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got eps={eps!r}")
    if not real(weight_decay) or not weight_decay >= 0:
        raise ValueError(f"weight_decay must be a number >= 0, got weight_decay={weight_decay!r}")
    check_blocksize(blocksize, BLOCKSIZES_8BIT)
    if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 1:
        raise ValueError(f"min_8bit_size must be an int >= 1, got min_8bit_size={min_8bit_size!r}")


class AdamW8bit(torch.optim.Optimizer):
    """AdamW with 8-bit block-wise moments, equal to bitsandbytes' CPU ``AdamW8bit``.

    Args:
        params: parameters or parameter groups.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (decoupled weight decay).
        blocksize: values per absmax block (bitsandbytes' CPU kernel always uses 256; other
            sizes from 64 to 4096 work here but have no bitsandbytes counterpart on CPU).
        min_8bit_size: tensors with fewer values keep float32 moments (bitsandbytes: 4096).

    State per parameter (bitsandbytes' names): ``step``; 8-bit: ``state1`` / ``state2`` (uint8
    codes, the parameter's shape), ``absmax1`` / ``absmax2`` (float32 per block), ``qmap1`` /
    ``qmap2`` (the shared signed / unsigned 256-value maps); 32-bit: ``state1`` / ``state2`` float32.

    A step is all or none. Every gradient is checked before the first parameter moves: a
    NaN or inf gradient (or one of the wrong shape, dtype or layout) raises a ``ValueError``
    naming the parameter (group and index, shape), and no parameter, state or step counter
    changes, so the caller can skip the batch (or lower the loss scale) and go on. Measured
    with torch 2.13 and bitsandbytes 0.50.2 on CPU, neither library raises:
    ``torch.optim.AdamW`` and bitsandbytes' ``AdamW8bit`` update every parameter and count
    the step; the entry with a NaN gradient becomes NaN in the parameter and in both moments
    (bitsandbytes: the 8-bit codes hide it, the parameter keeps it); with an inf gradient
    bitsandbytes' 8-bit state gets an inf block absmax, and on the next (finite) step the
    whole block of 256 parameter values turns NaN (torch: one value). We refuse instead of
    copying that silent corruption; for finite gradients the results are bitsandbytes'
    bit for bit.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, blocksize: int = 256,
                 min_8bit_size: int = 4096) -> None:
        _check_args(lr, betas, eps, weight_decay, blocksize, min_8bit_size)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.blocksize, self.min_8bit_size = blocksize, min_8bit_size
        self.qmap_signed, self.qmap_unsigned = dynamic_map(True), dynamic_map(False)

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        state["step"] = 0
        if p.numel() < self.min_8bit_size:
            state["state1"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            state["state2"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        else:
            blocks = -(-p.numel() // self.blocksize)
            state["state1"] = torch.zeros(p.shape, dtype=torch.uint8, device=p.device)
            state["state2"] = torch.zeros(p.shape, dtype=torch.uint8, device=p.device)
            state["absmax1"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
            state["absmax2"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
            state["qmap1"] = self.qmap_signed = self.qmap_signed.to(p.device)
            state["qmap2"] = self.qmap_unsigned = self.qmap_unsigned.to(p.device)
        return state

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_grads()  # all or none: nothing changes unless every gradient can be used
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.data = p.data.contiguous()  # as bitsandbytes: the update works on flat views
                p.grad = p.grad.contiguous()
                state = self.state[p] if len(self.state[p]) else self._init_state(p)
                state["step"] += 1
                if state["state1"].dtype == torch.uint8:
                    self._update_8bit(p, state, group)
                else:
                    self._update_32bit(p, state, group)
        return loss

    def _check_grads(self) -> None:
        """Raise a ValueError naming the first parameter whose gradient the step cannot use."""
        found = [(i, j, p) for i, group in enumerate(self.param_groups)
                 for j, p in enumerate(group["params"]) if p.grad is not None]
        for i, j, p in found:
            g, where = p.grad, f"param_groups[{i}]['params'][{j}] (shape {tuple(p.shape)})"
            if g.is_sparse or g.shape != p.shape or not g.is_floating_point() or not p.is_floating_point():
                raise ValueError(f"{where} has a gradient AdamW8bit cannot use ({g.dtype}, shape {tuple(g.shape)}, "
                                 f"{g.layout}); a dense float gradient of the parameter's shape is needed; "
                                 "nothing was updated")
        if not found:
            return
        finite = torch.stack([torch.isfinite(p.grad).all() for _, _, p in found])  # one check, one sync
        if not bool(finite.all()):
            i, j, p = found[int((~finite).nonzero()[0])]
            raise ValueError(f"param_groups[{i}]['params'][{j}] (shape {tuple(p.shape)}) has a NaN or inf "
                             "gradient; nothing was updated (no parameter, state or step count changed): "
                             "skip this batch or lower the learning rate / loss scale")

    def _update_8bit(self, p: torch.Tensor, state: dict, group: dict) -> None:
        # Blocks are independent, so the update walks the tensor in chunks of CHUNK_BLOCKS blocks:
        # the same arithmetic value for value, but each chunk's temporaries stay in cache.
        beta1, beta2 = group["betas"]
        lr, eps, wd, t, bs = group["lr"], group["eps"], group["weight_decay"], state["step"], self.blocksize
        c1 = 1.0 - beta1**t  # bias corrections (Python doubles)
        c2 = math.sqrt(1.0 - beta2**t)
        flat_p, flat_g = p.data.view(-1), p.grad.reshape(-1)
        q1, a1 = state["state1"].view(-1), state["absmax1"]
        q2, a2 = state["state2"].view(-1), state["absmax2"]
        step = CHUNK_BLOCKS * bs
        for start in range(0, flat_p.numel(), step):
            sl, bl = slice(start, start + step), slice(start // bs, (start + step) // bs)
            m = dequantize_blockwise_8bit(q1[sl], a1[bl], bs)  # float32 first moment
            v = dequantize_blockwise_unsigned(q2[sl], a2[bl], bs)  # float32 second moment
            g = flat_g[sl].float()
            p32 = flat_p[sl].float()  # a view of p itself when p is float32 (updated in place)
            m.mul_(beta1).add_(g, alpha=1.0 - beta1)  # first moment
            v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)  # second moment
            denom = (v.sqrt() / c2).add_(eps)
            if wd > 0.0:
                p32.mul_(1.0 - lr * wd)  # decoupled weight decay
            p32.addcdiv_(m, denom, value=-lr / c1)
            if p32.data_ptr() != flat_p[sl].data_ptr():
                flat_p[sl].copy_(p32)  # round once to a float16 / bfloat16 parameter
            new_q1, new_a1 = quantize_blockwise_8bit(m, bs)  # back to 8 bits, signed map
            new_q2, new_a2 = quantize_blockwise_unsigned(v, bs)  # unsigned map
            q1[sl], a1[bl], q2[sl], a2[bl] = new_q1, new_a1, new_q2, new_a2

    @staticmethod
    def _update_32bit(p: torch.Tensor, state: dict, group: dict) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, wd, t = group["lr"], group["eps"], group["weight_decay"], state["step"]
        m, v = state["state1"], state["state2"]
        g = p.grad.float()
        p32 = p.data.float()
        m.mul_(beta1).add_(g, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        c1 = 1.0 - beta1**t
        c2 = math.sqrt(1.0 - beta2**t)
        step_size = -lr * c2 / c1  # bitsandbytes' 32-bit kernel folds c2 into the step size
        if wd > 0.0:
            p32.mul_(1.0 - lr * wd)
        p32.add_(m / (v.sqrt() + eps * c2), alpha=step_size)
        p.data.copy_(p32)

    def state_bytes(self) -> int:
        """Bytes of all optimizer-state tensors (shared code maps once), as ``memory.storage_bytes``."""
        from .memory_measure import storage_bytes

        return storage_bytes(t for s in self.state.values() for t in s.values() if isinstance(t, torch.Tensor))
