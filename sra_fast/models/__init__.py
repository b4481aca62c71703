"""SiT and DiT models with the released state-dict layout (see dit.py)."""
from .dit import (ALL_MODELS, DiffusionTransformer, DiT, DiT_models, SiT, SiT_models,
                  build_model)

__all__ = ["ALL_MODELS", "DiffusionTransformer", "DiT", "DiT_models", "SiT", "SiT_models",
           "build_model"]
