from .configuration_conmim_mto import ConMIMMTOConfig
from .modeling_conmim_mto import (
    ConMIMMTOForPreTraining,
    ConMIMMTOForPreTrainingOutput,
    ConMIMMTOModel,
    ConMIMMTOMomentumEncoder,
    ConMIMMTOPreTrainedModel,
)

__all__ = [
    "ConMIMMTOConfig",
    "ConMIMMTOForPreTraining",
    "ConMIMMTOForPreTrainingOutput",
    "ConMIMMTOModel",
    "ConMIMMTOMomentumEncoder",
    "ConMIMMTOPreTrainedModel",
]
