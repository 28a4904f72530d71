"""What generic code needs to know about a pre-training method, declared once per method (DESIGN.md, "One method,
one place").

Each method's folder under `hf_mto/models/` holds, beside its configuration and modeling files, a `method_*.py` with
a `PreTrainingMethod` subclass: how a mask reaches the model, the default masking, which stacks of states MTO acts
on, how to run the encoder over a whole (unmasked) image, what an export keeps, what the model card says, and a
per-step hook (a teacher update, for methods that have one). The trainer, analysis, evaluation, export, model card
and recipes read these declarations through `method_for` and hold no switch over methods.

The declarations live outside the modeling files on purpose: the modeling files travel beside every checkpoint as
remote code and must import nothing from hf_mto, while a declaration may use all of it.

A method also covers the upstream transformers class its model extends (`extends`): `MTOTrainer`, the analysis and
the export then treat an upstream `ViTMAEForPreTraining` as MAE, on its own weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
import transformers
from transformers import AutoConfig, AutoImageProcessor, PretrainedConfig, PreTrainedModel, ViTImageProcessor, ViTModel

from .data import build_eval_transform, build_pretraining_transform
from .masking import mask_to_noise

_METHODS: dict[str, type[PreTrainingMethod]] = {}


class PreTrainingMethod:
    """The declarations of one pre-training method. Subclass it in the method's folder and `register_method` it.

    Class attributes:
        name: the method as papers and model cards name it ("MAE", "SimMIM").
        config_class / model_class: ours; `model_class.config_class.model_type` keys the registry.
        auto_class_name: the transformers Auto class that loads the model ("AutoModelForPreTraining").
        base_model_class: ours, the encoder `AutoModel` gives for the method's checkpoints.
        extends: the upstream classes the model extends; checkpoints and models of those (their configs' model
            types) are handled as this method, on their own weights.
        upstream_encoder_classes: the upstream classes of the encoders of `extends` (`encoder(model)`): an encoder
            alone, ours (`base_model_class`) or one of these, is recognised as this method's too (for export and
            evaluation).
        mask_input_name: the forward argument a mask reaches the model through ("noise", "bool_masked_pos").
        default_masking: the `hf_mto.masking` strategy used when the user chooses none.
        own_masking: a strategy the model draws by itself when given no mask (MAE's random masking, upstream's
            path): the trainer then passes none. None when the model needs a mask from outside.
        mto_stacks: names of the stacks of states MTO acts on (MAE: its decoder; BootMAE: two decoders), in the
            order the model returns them; `mto_outputs` finds each stack's terms in a forward's outputs.
        export_dropped_keys: encoder weights that have no place in the stock encoder (SimMIM's mask token).
        stock_encoder_new_keys: prefixes of the stock encoder's keys that pre-training has no weights for (BEiT's
            fine-tuning pooler): exported at the stock model's initial values. Every other key comes from the encoder.
        stock_encoder_class / stock_encoder_kwargs: the stock transformers encoder the export writes and reloads
            (`ViTModel` without pooling layer; BEiT: `BeitModel` with the pooler its classifier uses).
        card_notes: sentences the exported encoder's model card adds about this method's encoder.
        citation: the BibTeX entry of the method's paper, which model cards cite beside MTO's and EHM's.
        reconstructs_pixels: whether the model predicts pixels (`analysis_pass` gives a reconstruction to draw); a
            method whose targets are features or tokens only says False.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[PretrainedConfig]]
    model_class: ClassVar[type[PreTrainedModel]]
    auto_class_name: ClassVar[str]
    base_model_class: ClassVar[type[PreTrainedModel]]
    extends: ClassVar[tuple[type[PreTrainedModel], ...]] = ()
    upstream_encoder_classes: ClassVar[tuple[type[PreTrainedModel], ...]] = ()
    reconstructs_pixels: ClassVar[bool] = True
    mask_input_name: ClassVar[str]
    default_masking: ClassVar[str]
    own_masking: ClassVar[str | None] = None
    mto_stacks: ClassVar[tuple[str, ...]]
    export_dropped_keys: ClassVar[tuple[str, ...]] = ()
    stock_encoder_new_keys: ClassVar[tuple[str, ...]] = ()
    stock_encoder_class: ClassVar[type[PreTrainedModel]] = ViTModel
    stock_encoder_kwargs: ClassVar[dict] = {"add_pooling_layer": False}
    card_notes: ClassVar[str] = ""
    citation: ClassVar[str] = ""

    @classmethod
    def card_architecture(cls, config) -> list[tuple[str, str]]:
        """Model-card rows about the parts beyond the encoder (decoders, targets, a teacher), as ``(label, value)``;
        none by default."""
        return []

    @classmethod
    def model_type(cls) -> str:
        return cls.config_class.model_type

    @classmethod
    def extended_class(cls, model_type: str) -> type[PreTrainedModel] | None:
        """The upstream class of `extends` whose model type ``model_type`` is; None for the method's own."""
        return next((upstream for upstream in cls.extends if upstream.config_class.model_type == model_type), None)

    @classmethod
    def num_patches(cls, model: PreTrainedModel) -> int:
        """N, the patches of the model's input image."""
        return cls.encoder(model).embeddings.patch_embeddings.num_patches

    # ---------------------------------------------------------------------------------------------------------------
    # Data
    # ---------------------------------------------------------------------------------------------------------------

    @classmethod
    def pretraining_transform(
        cls, image_size: int, image_mean, image_std, config: PretrainedConfig | None = None
    ) -> Callable:
        """PIL image -> what one training example gives the model: a ``[3, H, W]`` tensor (`pixel_values`), or a dict
        with one ``[...]`` tensor per forward argument for a method that needs more than one view of an image (a
        second augmented view, a tokenizer's input); `hf_mto.data.PixelCollator` stacks every entry, and normalises
        the uint8 ones with ``image_mean``/``image_std`` once per batch. ``config`` is the model's, for views it
        shapes (BEiT's tokenizer view). Default: MAE's augmentation (random resized crop + flip) on uint8 tensors,
        `hf_mto.data.PretrainingTransform`."""
        return build_pretraining_transform(image_size)

    @classmethod
    def evaluation_transform(
        cls, image_size: int, image_mean, image_std, config: PretrainedConfig | None = None
    ) -> Callable:
        """PIL image -> what one evaluation example gives the model (the pre-training loss on held-out images), as
        `pretraining_transform` but deterministic. Default: resize and centre crop. The frozen-encoder evaluation
        (k-NN, linear probe) always takes one view, `hf_mto.data.build_eval_transform`'s."""
        return build_eval_transform(image_size, image_mean, image_std)

    # ---------------------------------------------------------------------------------------------------------------
    # Masks
    # ---------------------------------------------------------------------------------------------------------------

    @classmethod
    def mask_inputs(cls, model: PreTrainedModel, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """The forward argument(s) that make the model mask exactly ``mask`` (``[B, N]`` bool, True = masked)."""
        return {cls.mask_input_name: mask}

    @classmethod
    def own_mask_inputs(
        cls, model: PreTrainedModel, batch_size: int, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """The forward argument(s) with which the model draws its `own_masking` from ``generator`` (on the CPU), for
        ``batch_size`` images: seeded masks for the analysis, distributed as the model's own. Only methods with an
        `own_masking` define it."""
        raise NotImplementedError(f"{cls.__name__} declares no own_masking")

    @classmethod
    def check_num_masked(cls, config, num_patches: int, drawn: int) -> None:
        """Raise a `ValueError` naming the ratio that would agree when the model would not mask exactly the
        ``drawn`` patches per image a generator gives it (MAE keeps a count of its own); every count is fine by
        default."""

    # ---------------------------------------------------------------------------------------------------------------
    # The encoder over whole images (evolved masking, analysis, evaluation, export)
    # ---------------------------------------------------------------------------------------------------------------

    @classmethod
    def encoder(cls, model: PreTrainedModel) -> PreTrainedModel:
        """The ViT encoder of a pre-training model (its base model)."""
        return model.base_model

    @classmethod
    def released_encoder(cls, model: PreTrainedModel) -> PreTrainedModel:
        """The encoder a pre-training run gives its users: the one `hf_mto.export` writes and the frozen-encoder
        evaluation (k-NN, linear probe) scores. Default: `encoder`, the network that trains (ConMIM: its momentum
        encoder, as the official code releases and fine-tunes it)."""
        return cls.encoder(model)

    @classmethod
    def unmasked_embeddings(cls, model: PreTrainedModel, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, 1 + N, D]`` token embeddings of the whole image (CLS first), nothing masked: patch projection plus
        position embedding, CLS plus its position. Built from the embedding module's parameters because a
        pre-training embedding module may always mask (MAE's drops patches)."""
        embeddings = cls.encoder(model).embeddings
        patches = embeddings.patch_embeddings(pixel_values)  # [B, N, D]
        position = embeddings.position_embeddings  # [1, 1 + N, D]
        cls_token = (embeddings.cls_token + position[:, :1]).expand(patches.shape[0], -1, -1)
        return torch.cat([cls_token, patches + position[:, 1:]], dim=1)

    @classmethod
    def encoder_blocks(cls, model: PreTrainedModel) -> torch.nn.ModuleList:
        """The encoder's transformer blocks, in order."""
        return cls.encoder(model).layers

    @classmethod
    def unmasked_encoder_output(cls, model: PreTrainedModel, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, 1 + N, D]`` the encoder's output over the whole image (nothing masked), after its final layernorm:
        `unmasked_embeddings`, then `encoder_blocks`, then the layernorm."""
        hidden = cls.unmasked_embeddings(model, pixel_values)
        for layer in cls.encoder_blocks(model):
            hidden = layer(hidden)
        return cls.encoder(model).layernorm(hidden)

    @classmethod
    def encoder_attention_maps(
        cls, model: PreTrainedModel, pixel_values: torch.Tensor, num_layers: int
    ) -> list[torch.Tensor]:
        """Post-softmax attention of the first ``num_layers`` encoder blocks over the whole image (nothing masked),
        averaged over heads: ``num_layers`` tensors ``[B, 1, 1 + N, 1 + N]`` float32 (evolved masking's similarity).
        The caller holds `no_grad`.

        Computed from each block's own query/key projections, so the training forward keeps its attention
        implementation. Default: ViT blocks (`layernorm_before`, `attention.q_proj/k_proj/v_proj/o_proj`, `mlp`,
        `layernorm_after`), pre-norm residuals.
        """
        hidden = cls.unmasked_embeddings(model, pixel_values)  # [B, 1 + N, D]
        batch_size, num_tokens, _ = hidden.shape
        maps = []
        for index, layer in enumerate(cls.encoder_blocks(model)[:num_layers]):
            attention = layer.attention
            normed = layer.layernorm_before(hidden)
            shape = (batch_size, num_tokens, -1, attention.head_dim)
            query = attention.q_proj(normed).view(shape).transpose(1, 2)  # [B, heads, T, hd]
            key = attention.k_proj(normed).view(shape).transpose(1, 2)
            logits = torch.matmul(query.float(), key.float().transpose(-1, -2)) * attention.scaling
            probs = torch.softmax(logits, dim=-1)
            maps.append(probs.mean(dim=1, keepdim=True))  # [B, 1, T, T], mean over heads
            if index == num_layers - 1:
                break  # the last block's output is never used: its attention map is all we need from it
            # The rest of the block (ViT pre-norm: x + attn(ln(x)), then x + mlp(ln(x)); dropout off, as in eval)
            # from the probabilities already at hand: calling the block would project the queries and keys again.
            value = attention.v_proj(normed).view(shape).transpose(1, 2)
            context = torch.matmul(probs.to(value.dtype), value).transpose(1, 2).reshape(batch_size, num_tokens, -1)
            hidden = hidden + attention.o_proj(context)
            hidden = hidden + layer.mlp(layer.layernorm_after(hidden))
        return maps

    @classmethod
    def analysis_pass(
        cls, model: PreTrainedModel, pixel_values: torch.Tensor, mask_inputs: dict[str, torch.Tensor]
    ) -> tuple[dict[str, list[torch.Tensor]], torch.Tensor, torch.Tensor]:
        """One forward for `hf_mto.analysis` (the caller holds `no_grad` and has moved the inputs to the model).

        Args:
            pixel_values: ``[B, C, H, W]`` normalised pixels.
            mask_inputs: the masking argument(s) of the forward (`mask_inputs` or `own_mask_inputs`).

        Returns:
            ``(states, mask, prediction)``: ``states`` per MTO stack (every one of `mto_stacks`), its L+1 states
            H^0..H^L, each ``[B, N, D]`` float32, patch tokens only, in patch (raster) order; ``mask`` ``[B, N]``
            bool, True = masked; ``prediction`` ``[B, C, H, W]`` float32, the reconstruction in the normalised space
            of ``pixel_values`` (None for a method that predicts no pixels, `reconstructs_pixels` False).
        """
        raise NotImplementedError(f"{cls.__name__} does not declare an analysis pass")

    @classmethod
    def stock_encoder_config(cls, config) -> PretrainedConfig:
        """The config of the stock encoder (`stock_encoder_class`) the export writes for a pre-training ``config``.
        Default: a `ViTConfig` with the encoder's fields (`hf_mto.export.encoder_config`)."""
        from .export import encoder_config  # export imports this module

        return encoder_config(config)

    # ---------------------------------------------------------------------------------------------------------------
    # Training
    # ---------------------------------------------------------------------------------------------------------------

    @classmethod
    def prepare_training(cls, model: PreTrainedModel, train_dataset, output_dir: str, seed: int) -> None:
        """Called once before training, with the training dataset (examples as `pretraining_transform` gives them):
        for what a method fits on the training data (BEiT's k-means image tokenizer), cached under ``output_dir``
        so that a resumed run finds it. The trainer runs it on the main process first, then on the others (which
        then find the cache). ``seed`` seeds any draw. No-op by default."""

    @classmethod
    def loss_components(cls, outputs) -> dict[str, torch.Tensor]:
        """The parts of ``outputs.loss`` the trainer logs beside it, by log key: ``{"reconstruction_loss": loss}`` by
        default (MAE and SimMIM have one); a method whose loss has several parts (BootMAE's pixel and feature losses)
        names each."""
        return {"reconstruction_loss": outputs.loss}

    @classmethod
    def mto_outputs(cls, outputs) -> dict[str, object]:
        """Per MTO stack (`mto_stacks`, in order), the object of a forward's outputs that holds that stack's raw terms
        (`sparsity_loss`, `singularity_loss`, `ranking_loss` and `heterogeneity` ``[B, L+1]``, as `hf_mto.mto.MTOTerms`
        names them). With one stack the outputs hold them as fields; with several, each stack's are in the output
        field ``<stack>_mto``."""
        if len(cls.mto_stacks) == 1:
            return {cls.mto_stacks[0]: outputs}
        return {stack: getattr(outputs, f"{stack}_mto") for stack in cls.mto_stacks}

    @classmethod
    def on_step_end(cls, model: PreTrainedModel, progress: float) -> None:
        """Called after every optimizer step with the training progress t in [0, 1] (a teacher's EMA update goes
        here). No-op by default."""


def decoder_row(config, label: str = "decoder", prefix: str = "decoder_") -> tuple[str, str]:
    """The model-card row of a decoder configured by ``<prefix>num_hidden_layers`` and so on (ViTMAE's fields)."""
    layers, hidden = getattr(config, f"{prefix}num_hidden_layers"), getattr(config, f"{prefix}hidden_size")
    heads, mlp = getattr(config, f"{prefix}num_attention_heads"), getattr(config, f"{prefix}intermediate_size")
    return label, f"{layers} blocks, hidden size {hidden}, {heads} heads, MLP {mlp}"


class KeptCountMethod(PreTrainingMethod):
    """Declarations shared by the methods whose encoder drops the masked patches, as MAE's: the mask reaches the model
    as ``noise`` (it keeps the ``int(N * (1 - mask_ratio))`` patches of lowest noise, whatever the noise says), so a
    generator's count must agree with the model's."""

    mask_input_name = "noise"

    @staticmethod
    def model_num_masked(config, num_patches: int) -> int:
        """The patches the model masks per image: ``N - int(N * (1 - mask_ratio))``."""
        return num_patches - int(num_patches * (1 - config.mask_ratio))

    @classmethod
    def check_num_masked(cls, config, num_patches: int, drawn: int) -> None:
        expected = cls.model_num_masked(config, num_patches)
        if drawn != expected:
            raise ValueError(
                f"{drawn} of {num_patches} patches masked per image, but {cls.name} with mask_ratio "
                f"{config.mask_ratio} masks {expected}: choose a mask_ratio for which they agree (e.g. "
                f"{drawn / num_patches})"
            )

    @classmethod
    def mask_inputs(cls, model: PreTrainedModel, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        expected = cls.model_num_masked(model.config, mask.shape[1])
        return {"noise": mask_to_noise(mask, expected_num_masked=expected)}


def register_method(method: type[PreTrainingMethod]) -> type[PreTrainingMethod]:
    """Make ``method`` known to generic code (its model type and those of the upstream classes it extends) and its
    classes to transformers' Auto classes: `AutoConfig`, its `auto_class_name` (the pre-training model) and
    `AutoModel` (the encoder) load its checkpoints where hf_mto is imported, and `save_pretrained` writes `auto_map`
    and copies the model files beside the weights, so they also load with `trust_remote_code=True` where it is
    not installed. The image processor is the stock ViT one (scripts that look it up by model type, such as
    transformers' run_mim.py, find it)."""
    declared = ("name", "config_class", "model_class", "base_model_class", "auto_class_name", "mask_input_name")
    missing = [name for name in (*declared, "default_masking", "mto_stacks") if not hasattr(method, name)]
    if missing:
        raise TypeError(f"{method.__name__} does not declare {', '.join(missing)} (see PreTrainingMethod)")
    for model_type in (method.model_type(), *(upstream.config_class.model_type for upstream in method.extends)):
        _METHODS[model_type] = method
    config_class = method.config_class
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    config_class.register_for_auto_class("AutoConfig")
    for auto_class_name, model_class in (
        (method.auto_class_name, method.model_class),
        ("AutoModel", method.base_model_class),
    ):
        getattr(transformers, auto_class_name).register(config_class, model_class, exist_ok=True)
        model_class.register_for_auto_class(auto_class_name)
    AutoImageProcessor.register(config_class, slow_image_processor_class=ViTImageProcessor, exist_ok=True)
    return method


def registered_methods() -> list[type[PreTrainingMethod]]:
    """Every registered method, once each, in registration order."""
    return list(dict.fromkeys(_METHODS.values()))


def model_types() -> list[str]:
    """The model types of our pre-training models."""
    return [method.model_type() for method in registered_methods()]


def method_for(target) -> type[PreTrainingMethod]:
    """The method of a model (or its encoder), a config, a config dict or a `model_type` string, ours or an
    upstream one a method extends.

    A method's own model type is always its own, whatever the config's `architectures` (an encoder saved alone is
    still that method's). An upstream model type a method extends can be shared with other architectures (a `vit`
    checkpoint may be a SimMIM model or an image classifier): a model must then be an instance of a class the
    method declares (its encoder classes included), a config dict (a saved `config.json`) must name the method's
    pre-training class or one it extends in its `architectures`, and a config object must not name another (built
    in memory from a config, an upstream model's names none).

    Raises:
        ValueError: naming the class or model type when no method declares it.
    """
    target = getattr(target, "module", target)  # DistributedDataParallel
    if isinstance(target, str):
        model_type, architectures, described = target, None, repr(target)
    elif isinstance(target, dict):
        model_type, architectures = target.get("model_type"), target.get("architectures")
        described = "a config"
    else:
        config = getattr(target, "config", target)
        model_type, architectures = getattr(config, "model_type", None), getattr(config, "architectures", None)
        described = type(target).__name__
    method = _METHODS.get(model_type)
    if method is not None:
        classes = (method.model_class, *method.extends)
        names = {cls.__name__ for cls in classes}
        if isinstance(target, torch.nn.Module):
            known = isinstance(target, (*classes, method.base_model_class, *method.upstream_encoder_classes))
        elif isinstance(target, str) or method.extended_class(model_type) is None:
            known = True
        elif architectures:
            known = any(name in names for name in architectures)
        else:  # save_pretrained always writes `architectures`: a saved config without them is not known to be ours
            known = not isinstance(target, dict)
        method = method if known else None
    if method is None:
        raise ValueError(
            f"{described} (model_type {model_type!r}) is not a pre-training model hf_mto knows; model types: "
            f"{sorted(_METHODS)}"
        )
    return method


__all__ = [
    "KeptCountMethod",
    "PreTrainingMethod",
    "method_for",
    "model_types",
    "register_method",
    "registered_methods",
]
