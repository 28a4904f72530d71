"""ConMIM + MTO as generic code sees it (see `hf_mto.methods`). Not imported by the modeling files, so not part of
the remote code saved beside checkpoints."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torchvision.transforms as T
from PIL import Image, ImageFilter
from transformers import BeitModel

from ...data import to_rgb
from ...methods import PreTrainingMethod, register_method
from ..beit_mto.method_beit_mto import BeitMTOMethod
from .configuration_conmim_mto import ConMIMMTOConfig
from .modeling_conmim_mto import ConMIMMTOForPreTraining, ConMIMMTOModel, teacher_momentum


class _RandomGaussianBlur:
    """PIL's Gaussian blur with probability ``p``, radius uniform in [0.1, 2] (the official `GaussianBlur(0.1)` of
    `datasets.py`); drawn from torch's RNG, which the data loader seeds per worker."""

    def __init__(self, p: float, radius_min: float = 0.1, radius_max: float = 2.0):
        self.p, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, image: Image.Image) -> Image.Image:
        if torch.rand(()).item() >= self.p:
            return image
        radius = self.radius_min + (self.radius_max - self.radius_min) * torch.rand(()).item()
        return image.filter(ImageFilter.GaussianBlur(radius=radius))


class ConMIMViews:
    """PIL image -> ``{"pixel_values": [3, H, W], "teacher_pixel_values": [3, H, W]}``: ConMIM's two views of one
    crop (official `DataAugmentationForConMIM`). A flip and a random resized crop (scale 0.08-1, bicubic) common to
    both, so that patch i of one view is patch i of the other; the encoder's view is that crop as it is, the momentum
    encoder's gets the strong augmentation on top: colour jitter (0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale p 0.2,
    Gaussian blur p 0.1, solarisation p 0.2."""

    def __init__(self, image_size: int, image_mean, image_std):
        self.common = T.Compose(
            [
                T.Lambda(to_rgb),
                T.RandomHorizontalFlip(),
                T.RandomResizedCrop(image_size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            ]
        )
        self.strong = T.Compose(
            [
                T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
                T.RandomGrayscale(p=0.2),
                _RandomGaussianBlur(p=0.1),
                T.RandomSolarize(threshold=128, p=0.2),
            ]
        )
        self.to_tensor = T.Compose([T.ToTensor(), T.Normalize(mean=image_mean, std=image_std)])

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        crop = self.common(image)
        return {"pixel_values": self.to_tensor(crop), "teacher_pixel_values": self.to_tensor(self.strong(crop))}


@register_method
class ConMIMMTOMethod(PreTrainingMethod):
    """ConMIM: the mask reaches the model as ``bool_masked_pos`` (a mask token on the masked patches, as SimMIM); the
    default masking is the official one, SimMIM's 32-pixel random squares at mask ratio 0.75 (`--mask_type
    random_mps32`). MTO acts on the encoder, where the masked tokens live. Every training example gives two views of
    one crop (`ConMIMViews`); after every optimizer step the momentum encoder takes one EMA step (`on_step_end`).
    The model predicts features, not pixels: there is no reconstruction to draw."""

    name = "ConMIM"
    config_class = ConMIMMTOConfig
    model_class = ConMIMMTOForPreTraining
    base_model_class = ConMIMMTOModel
    auto_class_name = "AutoModelForPreTraining"
    extends = ()  # no upstream ConMIM
    reconstructs_pixels = False
    mask_input_name = "bool_masked_pos"
    default_masking = "simmim_block"
    mto_stacks = ("encoder",)
    export_dropped_keys = ("embeddings.mask_token",)
    # ConMIM's encoder is a BEiT encoder: the export writes stock `beit`, with its (parameter-free) CLS pooler
    stock_encoder_class = BeitModel
    stock_encoder_kwargs = {}
    citation = """\
@inproceedings{yi2023conmim,
  title     = {Masked Image Modeling with Denoising Contrast},
  author    = {Yi, Kun and Ge, Yixiao and Li, Xiaotong and Yang, Shusheng and Li, Dian and Wu, Jianping and Shan, Ying and Qie, Xiaohu},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2023}
}"""
    card_notes = (
        "This is ConMIM's momentum encoder (the EMA copy of the online encoder that the official code saves for "
        "fine-tuning), a BEiT encoder: relative position bias shared by all blocks, layer scale. The online encoder, "
        "its mask token and both projectors were dropped. The config keeps `use_mean_pooling: false` so that every pre-trained weight (the final LayerNorm "
        "included) is used and a classifier takes the CLS token; the official fine-tuning instead averages the patch "
        "tokens under a new LayerNorm (`use_mean_pooling: true`, whose new `fc_norm` is initialised then) and turns "
        "the shared bias into one per block."
    )

    @classmethod
    def card_architecture(cls, config) -> list[tuple[str, str]]:
        return [
            (
                "projector",
                f"{config.projector_num_layers} bias-free linear layers {config.hidden_size} -> "
                f"{config.projector_hidden_size} -> {config.projector_size}, BatchNorm + ReLU between, a BatchNorm "
                "without affine parameters at the end",
            ),
            ("targets", "the momentum encoder's projections of every patch of the unmasked, strongly augmented view"),
            ("loss", f"intra-image denoising contrast (InfoNCE), temperature {config.contrastive_temperature:g}"),
            (
                "momentum encoder EMA decay",
                f"{config.teacher_momentum:g} -> 1 along a half cosine over training "
                f"(e.g. {teacher_momentum(config.teacher_momentum, 0.5):.4g} half way)",
            ),
        ]

    @classmethod
    def pretraining_transform(cls, image_size: int, image_mean, image_std, config=None) -> Callable:
        return ConMIMViews(image_size, image_mean, image_std)

    @classmethod
    def released_encoder(cls, model):
        """The momentum encoder (without its projector): the official code saves it as the checkpoint to fine-tune
        (`checkpoint_copy-*.pth`, README's fine-tuning command). The online encoder alone when no teacher is at hand
        (a `ConMIMMTOModel`)."""
        teacher = getattr(model, "teacher", None)
        return cls.encoder(model) if teacher is None else teacher.beit

    # BEiT's declarations for the encoder over whole images (its relative position bias and layer scale included)
    unmasked_embeddings = BeitMTOMethod.__dict__["unmasked_embeddings"]
    unmasked_encoder_output = BeitMTOMethod.__dict__["unmasked_encoder_output"]
    encoder_attention_maps = BeitMTOMethod.__dict__["encoder_attention_maps"]

    @classmethod
    def analysis_pass(cls, model, pixel_values: torch.Tensor, mask_inputs: dict[str, torch.Tensor]):
        """The encoder's states (ConMIM's MTO stack, in patch order), the mask and no prediction (ConMIM predicts
        features); see `PreTrainingMethod.analysis_pass`."""
        outputs = model.beit(pixel_values, output_hidden_states=True, **mask_inputs)
        states = [state[:, 1:].float() for state in outputs.hidden_states]
        return {"encoder": states}, mask_inputs["bool_masked_pos"].bool(), None

    @classmethod
    def loss_components(cls, outputs) -> dict[str, torch.Tensor]:
        return {"contrastive_loss": outputs.loss}

    @classmethod
    def on_step_end(cls, model, progress: float) -> None:
        """One EMA step of the momentum encoder at the progress after this optimizer step."""
        model.update_teacher(progress)

    # the stock BeitConfig of the encoder alone, as BEiT's (every BeitConfig field of the config, no mask token)
    stock_encoder_config = BeitMTOMethod.__dict__["stock_encoder_config"]
