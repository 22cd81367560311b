"""LoRA variants, one small module each, built from scratch and checked against PEFT or the paper.

Notebook 11 walks through them; DoRA and AdaLoRA have chapters of their own
(:mod:`lora_course.dora`, :mod:`lora_course.adalora`).
"""

from .rslora import add_rslora, rslora_scaling
from .pissa import add_pissa, pissa_factors
from .loraplus import create_loraplus_optimizer, loraplus_param_groups
from .delta_lora import DeltaLoRA
from .lora_drop import lora_output_importance, select_lora_layers
from .lora_pro import apply_lora_pro, equivalent_gradient, lora_pro_gradients
from .lora_ga import add_lora_ga, estimate_gradients, lora_ga_factors
from .lorafa import LoRAFAOptimizer, create_lorafa_optimizer
from .vera import VeRALinear, add_vera, vera_projections

__all__ = [
    "add_rslora", "rslora_scaling",
    "add_pissa", "pissa_factors",
    "create_loraplus_optimizer", "loraplus_param_groups",
    "DeltaLoRA",
    "lora_output_importance", "select_lora_layers",
    "apply_lora_pro", "equivalent_gradient", "lora_pro_gradients",
    "add_lora_ga", "estimate_gradients", "lora_ga_factors",
    "LoRAFAOptimizer", "create_lorafa_optimizer",
    "VeRALinear", "add_vera", "vera_projections",
]
