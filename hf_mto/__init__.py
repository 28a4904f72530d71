"""hf_mto: Masked Token Optimization and Evolved Hierarchical Masking for ViT pre-training on the HF stack.

Importing the package registers each pre-training method (`hf_mto.methods.register_method`, from the method's
declaration in its model folder) and so its configs and models with transformers' Auto classes:
`AutoModelForPreTraining.from_pretrained(path)` works on our checkpoints without `trust_remote_code`, and `AutoModel`
gives the encoder of each pre-training model.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification, ViTImageProcessor

from .models.beit_mto import BeitMTOConfig, BeitMTOForMaskedImageModeling, BeitMTOModel, BeitMTOOutput
from .models.beit_mto.method_beit_mto import BeitMTOMethod
from .models.bootmae_mto import (
    BootMAEMTOConfig,
    BootMAEMTOForPreTraining,
    BootMAEMTOForPreTrainingOutput,
    BootMAEMTOModel,
)

# The methods' declarations for generic code (hf_mto.methods): importing them registers them.
from .models.bootmae_mto.method_bootmae_mto import BootMAEMTOMethod
from .models.conmim_mto import (
    ConMIMMTOConfig,
    ConMIMMTOForPreTraining,
    ConMIMMTOForPreTrainingOutput,
    ConMIMMTOModel,
)
from .models.conmim_mto.method_conmim_mto import ConMIMMTOMethod
from .models.simmim_mto import (
    SimMIMMTOConfig,
    SimMIMMTOForMaskedImageModeling,
    SimMIMMTOModel,
    SimMIMMTOOutput,
)
from .models.simmim_mto.method_simmim_mto import SimMIMMTOMethod
from .models.vit_gap import ViTGAPConfig, ViTGAPForImageClassification, ViTGAPModel
from .models.vit_mae_mto import (
    ViTMAEMTOConfig,
    ViTMAEMTOForPreTraining,
    ViTMAEMTOForPreTrainingOutput,
    ViTMAEMTOModel,
)
from .models.vit_mae_mto.method_vit_mae_mto import ViTMAEMTOMethod

__version__ = "0.1.0"


def _register() -> None:
    # The pre-training methods register their Auto classes with their declarations (imported above); the fine-tuning
    # classifier with global average pooling (recipes/finetune.py --global_pool) is registered here.
    AutoConfig.register(ViTGAPConfig.model_type, ViTGAPConfig, exist_ok=True)
    AutoModelForImageClassification.register(ViTGAPConfig, ViTGAPForImageClassification, exist_ok=True)
    ViTGAPConfig.register_for_auto_class("AutoConfig")
    ViTGAPForImageClassification.register_for_auto_class("AutoModelForImageClassification")
    AutoModel.register(ViTGAPConfig, ViTGAPModel, exist_ok=True)
    ViTGAPModel.register_for_auto_class("AutoModel")
    AutoImageProcessor.register(ViTGAPConfig, slow_image_processor_class=ViTImageProcessor, exist_ok=True)


_register()

__all__ = [
    "BeitMTOConfig",
    "BeitMTOForMaskedImageModeling",
    "BeitMTOMethod",
    "BeitMTOModel",
    "BeitMTOOutput",
    "BootMAEMTOConfig",
    "BootMAEMTOForPreTraining",
    "BootMAEMTOForPreTrainingOutput",
    "BootMAEMTOMethod",
    "BootMAEMTOModel",
    "ConMIMMTOConfig",
    "ConMIMMTOForPreTraining",
    "ConMIMMTOForPreTrainingOutput",
    "ConMIMMTOMethod",
    "ConMIMMTOModel",
    "SimMIMMTOConfig",
    "SimMIMMTOMethod",
    "SimMIMMTOForMaskedImageModeling",
    "SimMIMMTOModel",
    "SimMIMMTOOutput",
    "ViTGAPConfig",
    "ViTGAPForImageClassification",
    "ViTGAPModel",
    "ViTMAEMTOConfig",
    "ViTMAEMTOForPreTraining",
    "ViTMAEMTOForPreTrainingOutput",
    "ViTMAEMTOMethod",
    "ViTMAEMTOModel",
    "__version__",
]
