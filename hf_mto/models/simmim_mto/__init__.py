from .configuration_simmim_mto import SimMIMMTOConfig
from .modeling_simmim_mto import (
    SimMIMMTOForMaskedImageModeling,
    SimMIMMTOModel,
    SimMIMMTOOutput,
    SimMIMMTOPreTrainedModel,
)

__all__ = [
    "SimMIMMTOConfig",
    "SimMIMMTOForMaskedImageModeling",
    "SimMIMMTOModel",
    "SimMIMMTOOutput",
    "SimMIMMTOPreTrainedModel",
]
