"""hf_mto: Masked Token Optimization and Evolved Hierarchical Masking for ViT pre-training on the HF stack.

Importing the package registers its configs and models with transformers' Auto classes, so
`AutoModelForPreTraining.from_pretrained(path)` works on our checkpoints without `trust_remote_code`, and `AutoModel`
gives the encoder of either pre-training model.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForMaskedImageModeling,
    AutoModelForPreTraining,
    ViTImageProcessor,
)

from .models.simmim_mto import (
    SimMIMMTOConfig,
    SimMIMMTOForMaskedImageModeling,
    SimMIMMTOModel,
    SimMIMMTOOutput,
)

# The methods' declarations for generic code (hf_mto.methods): importing them registers them.
from .models.simmim_mto.method_simmim_mto import SimMIMMTOMethod  # noqa: E402
from .models.vit_gap import ViTGAPConfig, ViTGAPForImageClassification
from .models.vit_mae_mto import (
    ViTMAEMTOConfig,
    ViTMAEMTOForPreTraining,
    ViTMAEMTOForPreTrainingOutput,
    ViTMAEMTOModel,
)
from .models.vit_mae_mto.method_vit_mae_mto import ViTMAEMTOMethod  # noqa: E402

__version__ = "0.1.0"


def _register() -> None:
    AutoConfig.register(ViTMAEMTOConfig.model_type, ViTMAEMTOConfig, exist_ok=True)
    AutoModelForPreTraining.register(ViTMAEMTOConfig, ViTMAEMTOForPreTraining, exist_ok=True)
    # `save_pretrained` then writes `auto_map` and copies the model files beside the weights, so the checkpoint
    # also loads with `trust_remote_code=True` where hf_mto is not installed.
    ViTMAEMTOConfig.register_for_auto_class("AutoConfig")
    ViTMAEMTOForPreTraining.register_for_auto_class("AutoModelForPreTraining")
    AutoModel.register(ViTMAEMTOConfig, ViTMAEMTOModel, exist_ok=True)
    ViTMAEMTOModel.register_for_auto_class("AutoModel")
    AutoConfig.register(SimMIMMTOConfig.model_type, SimMIMMTOConfig, exist_ok=True)
    AutoModelForMaskedImageModeling.register(SimMIMMTOConfig, SimMIMMTOForMaskedImageModeling, exist_ok=True)
    SimMIMMTOConfig.register_for_auto_class("AutoConfig")
    SimMIMMTOForMaskedImageModeling.register_for_auto_class("AutoModelForMaskedImageModeling")
    AutoModel.register(SimMIMMTOConfig, SimMIMMTOModel, exist_ok=True)
    SimMIMMTOModel.register_for_auto_class("AutoModel")
    # Both are plain ViTs to their inputs: scripts that look up an image processor by model type (run_mim.py,
    # run_image_classification.py) get the stock ViT one.
    # The fine-tuning classifier with global average pooling (recipes/finetune.py --global_pool).
    AutoConfig.register(ViTGAPConfig.model_type, ViTGAPConfig, exist_ok=True)
    AutoModelForImageClassification.register(ViTGAPConfig, ViTGAPForImageClassification, exist_ok=True)
    ViTGAPConfig.register_for_auto_class("AutoConfig")
    ViTGAPForImageClassification.register_for_auto_class("AutoModelForImageClassification")
    for config_class in (ViTMAEMTOConfig, SimMIMMTOConfig, ViTGAPConfig):
        AutoImageProcessor.register(config_class, slow_image_processor_class=ViTImageProcessor, exist_ok=True)


_register()

__all__ = [
    "SimMIMMTOConfig",
    "SimMIMMTOMethod",
    "SimMIMMTOForMaskedImageModeling",
    "SimMIMMTOModel",
    "SimMIMMTOOutput",
    "ViTGAPConfig",
    "ViTGAPForImageClassification",
    "ViTMAEMTOConfig",
    "ViTMAEMTOForPreTraining",
    "ViTMAEMTOForPreTrainingOutput",
    "ViTMAEMTOMethod",
    "ViTMAEMTOModel",
    "__version__",
]
