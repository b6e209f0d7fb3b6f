"""qrobust: how post-training quantization hurts autoregressive and masked-diffusion code LMs."""
from qrobust.errors import QrobustError
from qrobust.models import ModelAdapter, load_model
from qrobust.quant import QuantizeConfig, QuantSpec, load_quantized, quantize, save_quantized
from qrobust.version import __version__

__all__ = [
    "QrobustError", "ModelAdapter", "load_model", "QuantizeConfig", "QuantSpec", "quantize",
    "save_quantized", "load_quantized", "__version__",
]
