"""Quantizers (GPTQ, round-to-nearest), bit packing and the GPTQ checkpoint format."""
from qrobust.quant.checkpoint import load_quantized, save_quantized
from qrobust.quant.driver import METHODS, LayerRecord, QuantizeConfig, StageTimer, quantize_model
from qrobust.quant.gptq import GPTQ, output_error
from qrobust.quant.grid import SUPPORTED_BITS, QuantResult, QuantSpec, rtn
from qrobust.quant.plan import load_plan, parse_plan
from qrobust.quant.qlinear import QuantLinear, dequantize_modules

quantize = quantize_model

__all__ = [
    "GPTQ", "LayerRecord", "dequantize_modules", "METHODS", "QuantLinear", "QuantResult", "QuantSpec", "QuantizeConfig",
    "SUPPORTED_BITS", "StageTimer", "load_plan", "load_quantized", "output_error", "parse_plan", "quantize",
    "quantize_model", "rtn", "save_quantized",
]
