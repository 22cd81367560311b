"""Weight quantization built from scratch: NF4 (QLoRA), double quantization of its constants, LLM.int8().

Formats and frozen quantized layers only; the adapters on top of them and the functions that
put them into a model live at the method level (``qlora.py``, ``int8_lora.py``).
"""

from .double_quant import dequantize_blockwise_8bit, dynamic_map, quantize_blockwise_8bit
from .int8 import Int8Linear, dequantize_int8_vectorwise, quantize_int8_vectorwise
from .nf4 import NF4_CODE, NF4Weight, dequantize_nf4, nf4_code, quantize_nf4

__all__ = [
    "NF4_CODE",
    "NF4Weight",
    "dequantize_blockwise_8bit",
    "dequantize_nf4",
    "dynamic_map",
    "nf4_code",
    "quantize_blockwise_8bit",
    "quantize_nf4",
    "Int8Linear",
    "dequantize_int8_vectorwise",
    "quantize_int8_vectorwise",
]
