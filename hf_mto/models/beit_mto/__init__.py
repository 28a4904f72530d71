from .configuration_beit_mto import BeitMTOConfig
from .modeling_beit_mto import (
    BeitMTOForMaskedImageModeling,
    BeitMTOModel,
    BeitMTOOutput,
    BeitMTOPreTrainedModel,
    DVAEImageTokenizer,
    ImageTokenizer,
    KMeansImageTokenizer,
    build_image_tokenizer,
)

__all__ = [
    "BeitMTOConfig",
    "BeitMTOForMaskedImageModeling",
    "BeitMTOModel",
    "BeitMTOOutput",
    "BeitMTOPreTrainedModel",
    "DVAEImageTokenizer",
    "ImageTokenizer",
    "KMeansImageTokenizer",
    "build_image_tokenizer",
]
