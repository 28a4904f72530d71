from .configuration_vit_gap import ViTGAPConfig
from .modeling_vit_gap import ViTGAPForImageClassification, ViTGAPModel

__all__ = ["ViTGAPConfig", "ViTGAPForImageClassification", "ViTGAPModel"]
