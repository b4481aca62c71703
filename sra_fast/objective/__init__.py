"""Training objectives: SiT transport, DiT DDPM, the SRA alignment loss and the EMA teacher."""
from .ddpm import GaussianDiffusion
from .ema import ema_update, make_ema
from .sra import (WEIGHT_SCHEDULES, SRAConfig, SRAObjective, align_weight,
                  released_weight_schedule)
from .transport import PATHS, TIME_SAMPLERS, Transport

__all__ = ["GaussianDiffusion", "ema_update", "make_ema", "WEIGHT_SCHEDULES", "SRAConfig",
           "SRAObjective", "align_weight", "released_weight_schedule", "PATHS", "TIME_SAMPLERS",
           "Transport"]
