from .configuration_vit_mae_mto import ViTMAEMTOConfig
from .modeling_vit_mae_mto import (
    ViTMAEMTOForPreTraining,
    ViTMAEMTOForPreTrainingOutput,
    ViTMAEMTOModel,
    ViTMAEMTOPreTrainedModel,
)

__all__ = [
    "ViTMAEMTOConfig",
    "ViTMAEMTOForPreTraining",
    "ViTMAEMTOForPreTrainingOutput",
    "ViTMAEMTOModel",
    "ViTMAEMTOPreTrainedModel",
]
