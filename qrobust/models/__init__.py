"""Model adapters: one interface over autoregressive and masked-diffusion code LMs."""
from qrobust.models.adapters import ARAdapter, BlockLayers, DiffusionAdapter, Generation, ModelAdapter
from qrobust.models.diffusion import SamplerConfig
from qrobust.models.files import save_native
from qrobust.models.loading import MODELS, ModelSpec, load_model
from qrobust.models.transformer import TransformerConfig, TransformerLM

__all__ = [
    "ARAdapter", "BlockLayers", "DiffusionAdapter", "Generation", "ModelAdapter", "SamplerConfig",
    "MODELS", "ModelSpec", "load_model", "save_native", "TransformerConfig", "TransformerLM",
]
