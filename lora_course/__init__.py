"""lora-course: LoRA and its family built from scratch, checked against PEFT and bitsandbytes.

Importing the package applies the profile first (``LORA_COURSE_PROFILE``): the default
``offline`` profile switches the Hugging Face libraries offline before they are imported.
"""

from .config import apply_profile as _apply_profile

_apply_profile()

from .config import pick_device, profile, seed_everything  # noqa: E402
from .adalora import RankAllocator, SVDLinear, add_adalora, orth_regularization  # noqa: E402
from .longlora import patch_s2attn, shift_short_attention  # noqa: E402
from .lora import LoRALinear, add_lora, count_parameters, merge_lora  # noqa: E402
from .dora import DoRALinear, add_dora  # noqa: E402
from .memory_estimate import estimate_training_memory  # noqa: E402
from .memory_measure import track_peak_memory  # noqa: E402
from .qlora import QLoRALinear, add_qlora  # noqa: E402
from .peft_io import load_adapter, save_adapter  # noqa: E402
from .quant import (  # noqa: E402
    NF4_CODE,
    NF4Weight,
    dequantize_blockwise_8bit,
    dynamic_map,
    nf4_code,
    quantize_blockwise_8bit,
    quantize_nf4,
)
from .quant import Int8Linear, dequantize_int8_vectorwise, quantize_int8_vectorwise  # noqa: E402
from .int8_lora import Int8LoRALinear, add_int8, add_int8_lora  # noqa: E402
from .optim8bit import AdamW8bit  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "NF4_CODE",
    "NF4Weight",
    "dequantize_blockwise_8bit",
    "dynamic_map",
    "nf4_code",
    "quantize_blockwise_8bit",
    "quantize_nf4",
    "Int8Linear",
    "Int8LoRALinear",
    "add_int8",
    "add_int8_lora",
    "dequantize_int8_vectorwise",
    "quantize_int8_vectorwise",
    "AdamW8bit",
    "RankAllocator",
    "SVDLinear",
    "add_adalora",
    "orth_regularization",
    "DoRALinear",
    "add_dora",
    "LoRALinear",
    "add_lora",
    "count_parameters",
    "load_adapter",
    "merge_lora",
    "estimate_training_memory",
    "track_peak_memory",
    "QLoRALinear",
    "add_qlora",
    "patch_s2attn",
    "save_adapter",
    "shift_short_attention",
    "pick_device",
    "profile",
    "seed_everything",
]
