"""Configuration of `ViTGAPForImageClassification`: a ViT classifier on the average of the patch tokens (MAE's
`global_pool`)."""

from huggingface_hub.dataclasses import strict
from transformers import ViTConfig


@strict
class ViTGAPConfig(ViTConfig):
    r"""
    Configuration of [`ViTGAPForImageClassification`]: exactly [`~transformers.ViTConfig`]'s fields. A model type of
    its own (`"vit_gap"`) so that a checkpoint pooled this way is never loaded, silently, as a CLS-token
    `ViTForImageClassification` by code that does not know the pooling: without `hf_mto` it needs
    `trust_remote_code=True` (the model code is saved beside the weights).

    Example:

    ```python
    >>> from hf_mto.models.vit_gap import ViTGAPConfig, ViTGAPForImageClassification

    >>> model = ViTGAPForImageClassification(ViTGAPConfig(image_size=32, patch_size=4, num_labels=10))
    ```
    """

    model_type = "vit_gap"


__all__ = ["ViTGAPConfig"]
