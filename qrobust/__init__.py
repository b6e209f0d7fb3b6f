"""qrobust: how post-training quantization hurts autoregressive and masked-diffusion code LMs."""
__version__ = "0.1.0"

from qrobust.errors import QrobustError  # noqa: E402
from qrobust.models import ModelAdapter, load_model  # noqa: E402
from qrobust.quant import QuantizeConfig, QuantSpec, load_quantized, quantize, save_quantized  # noqa: E402

__all__ = [
    "QrobustError", "ModelAdapter", "load_model", "QuantizeConfig", "QuantSpec", "quantize",
    "save_quantized", "load_quantized", "__version__",
]
