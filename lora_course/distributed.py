"""What data-parallel training moves and stores per GPU, for full fine-tuning and LoRA.

* :func:`allreduce_bytes_per_step`: DistributedDataParallel (arXiv 2006.15704) all-reduces
  the gradient of every parameter that requires grad, once per optimizer step; frozen
  parameters have no gradient and cross no wire. With LoRA only the adapters' gradients do.
* :func:`zero_bytes_per_gpu`: model states per GPU under ZeRO stages 0-3 (arXiv 1910.02054,
  section 5 and Figure 1): with P parameters, N GPUs, 16-bit parameters and gradients and K
  bytes of optimizer state per parameter (K = 12 for mixed-precision Adam: a float32 master
  copy and two float32 moments), stage 0 (plain DDP) keeps (2 + 2 + K) P on every GPU;
  stage 1 shards the optimizer states (2 + 2) P + K P / N; stage 2 also the gradients
  2 P + (2 + K) P / N; stage 3 (= FSDP's full sharding, arXiv 2304.11277) everything,
  (2 + 2 + K) P / N. Activations and workspace come on top.
"""

from __future__ import annotations

from torch import nn

from .checks import check_int, check_real

ZERO_STAGES = (0, 1, 2, 3)


def allreduce_bytes_per_step(model: nn.Module) -> int:
    """Bytes of gradient DDP all-reduces per optimizer step: every trainable parameter, once."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def zero_bytes_per_gpu(n_params: int, n_gpus: int, stage: int, param_bytes: int = 2, grad_bytes: int = 2,
                       optimizer_bytes: int = 12, trainable: int | None = None) -> int:
    """Model-state bytes per GPU (parameters + gradients + optimizer states) under ZeRO ``stage``.

    ``trainable`` (default: all ``n_params``) is how many parameters have gradients and
    optimizer states; with LoRA it is the adapters only, while the frozen base is still
    stored (and sharded at stage 3).
    """
    n_params = check_int("n_params", n_params)
    n_gpus = check_int("n_gpus", n_gpus)
    if stage not in ZERO_STAGES:
        raise ValueError(f"stage must be one of {ZERO_STAGES}, got {stage!r}")
    for name, value in (("param_bytes", param_bytes), ("grad_bytes", grad_bytes), ("optimizer_bytes", optimizer_bytes)):
        check_real(name, value, low=0)
    trainable = n_params if trainable is None else trainable
    if isinstance(trainable, bool) or not isinstance(trainable, int) or not 0 <= trainable <= n_params:
        raise ValueError(f"trainable must be an int between 0 and n_params={n_params}, got {trainable!r}")
    params = param_bytes * n_params
    grads = grad_bytes * trainable
    states = optimizer_bytes * trainable
    if stage >= 1:
        states /= n_gpus
    if stage >= 2:
        grads /= n_gpus
    if stage >= 3:
        params /= n_gpus
    return round(params + grads + states)
