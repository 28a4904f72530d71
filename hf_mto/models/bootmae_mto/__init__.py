from .configuration_bootmae_mto import BootMAEMTOConfig
from .modeling_bootmae_mto import (
    BootMAEMTOForPreTraining,
    BootMAEMTOForPreTrainingOutput,
    BootMAEMTOModel,
    BootMAEMTOPreTrainedModel,
    BootMAEMTOTerms,
)

__all__ = [
    "BootMAEMTOConfig",
    "BootMAEMTOForPreTraining",
    "BootMAEMTOForPreTrainingOutput",
    "BootMAEMTOModel",
    "BootMAEMTOPreTrainedModel",
    "BootMAEMTOTerms",
]
