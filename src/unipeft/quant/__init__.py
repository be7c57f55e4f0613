"""Quantized frozen bases: NF4 with double quantization (QLoRA) or int8 weight-only via bitsandbytes, or FP8 (e4m3,
per-channel scales) through FP8 GEMMs on Hopper/Ada GPUs.

    model = load_quantized(path, "nf4")            # layer by layer: never the full-precision model in memory
    model = quantize_model(model, "int8")          # or quantize a loaded model in place
    peft = get_peft_model(model, LoraConfig(...))  # adapters are made in the compute dtype and train as usual
    merged, report = merge_and_export(peft, batch, torch.bfloat16)  # dequantize → merge → export

nf4/int8 need the `quant` extra: pip install 'unipeft[quant]'; fp8 needs only torch.
"""

from .bnb import quantized_bytes
from .schemes import SCHEMES, dequantize_weight, is_quantized, quantized_linear
from .build import Quantization, load_quantized, quantize_model, random_source, safetensors_source, swap_module
from .merge import dequantize_model, merge_and_export

__all__ = ["SCHEMES", "Quantization", "quantize_model", "load_quantized", "random_source", "safetensors_source",
           "dequantize_model", "merge_and_export", "dequantize_weight", "is_quantized", "quantized_bytes",
           "quantized_linear", "swap_module"]
