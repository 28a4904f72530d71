"""ConMIM (Yi et al., ICLR 2023: masked image modeling with denoising contrast) with Masked Token Optimization (MTO)
applied in the encoder.

Built on transformers' BEiT pieces, following the official code (TencentARC/ConMIM, `modeling_pretrain.py`,
`engine_for_pretraining.py`):
- the encoder is upstream's `BeitModel` with a mask token (substituted for the masked patches before the blocks), a
  relative position bias shared by all blocks, layer scale and a final LayerNorm on every token;
- a projector on every token of the encoder's output: linear layers without bias, BatchNorm + ReLU between them, a
  BatchNorm without affine parameters at the end (over all tokens of the batch, CLS included, as the official
  projector sees them flattened);
- a momentum encoder (`teacher`: an EMA copy of encoder and projector, frozen, saved with the checkpoint) runs without
  gradients on the unmasked image in its own (stronger) augmentation, `teacher_pixel_values`;
- the denoising contrastive loss (`denoising_contrastive_loss`): every masked patch's L2-normalised projection is
  compared with the teacher's L2-normalised projections of all patches of the same image, divided by the
  temperature; cross-entropy with the patch's own position as the target, averaged over the masked patches;
- the official initialisation: truncated normal with std `initializer_range` cut at +-1 std for linear and patch
  layers, CLS and mask tokens, zero biases, each block's output projections divided by sqrt(2 * block number), zero
  relative position bias, layer scale at `layer_scale_init_value`; the teacher starts as a copy.

The EMA update is `update_teacher(progress)`, which the method's `on_step_end` calls after every optimizer step.
"""

import math
from copy import deepcopy
from dataclasses import dataclass

import torch
from torch import nn
from transformers import BeitModel
from transformers import initialization as init
from transformers.conversion_mapping import (
    get_checkpoint_conversion_mapping,
    register_checkpoint_conversion_mapping,
)
from transformers.models.beit.modeling_beit import BeitEmbeddings, BeitPreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs
from transformers.utils.generic import can_return_tuple

from .configuration_conmim_mto import ConMIMMTOConfig
from .mto import mto_terms


@dataclass
class ConMIMMTOForPreTrainingOutput(ModelOutput):
    r"""
    Output of [`ConMIMMTOForPreTraining`].

    loss (`torch.FloatTensor` of shape `()`):
        The denoising contrastive loss. The MTO terms are *not* added: the trainer weights them.
    logits (`torch.FloatTensor` of shape `(batch_size, num_patches, projector_size)`):
        The projector's output for every patch of the masked view (before L2 normalisation).
    teacher_features (`torch.FloatTensor` of shape `(batch_size, num_patches, projector_size)`):
        The momentum encoder's projections of every patch of the unmasked view (before L2 normalisation).
    mask (`torch.FloatTensor` of shape `(batch_size, num_patches)`):
        The `bool_masked_pos` the forward used as float32, 1 = masked.
    hidden_states (`tuple(torch.FloatTensor)`, *optional*):
        The encoder's L+1 states (embeddings, then each block's output), `[batch_size, 1 + num_patches, hidden]`,
        when asked for with `output_hidden_states`.
    attentions (`tuple(torch.FloatTensor)`, *optional*):
        The encoder's attention maps, when asked for with `output_attentions`.
    sparsity_loss, singularity_loss, ranking_loss (`torch.FloatTensor` of shape `()`):
        L_spa (Eq. 3, mean over `config.mto_spa_layers`), L_e (Eq. 6), L_r (Eq. 7) of the encoder: batch means;
        `None` with MTO off.
    heterogeneity (`torch.FloatTensor` of shape `(batch_size, num_hidden_layers + 1)`):
        Heterogeneity H^0..H^L of the encoder (Eq. 2) per image; `None` with MTO off.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    teacher_features: torch.FloatTensor | None = None
    mask: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    sparsity_loss: torch.FloatTensor | None = None
    singularity_loss: torch.FloatTensor | None = None
    ranking_loss: torch.FloatTensor | None = None
    heterogeneity: torch.FloatTensor | None = None


def denoising_contrastive_loss(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float
) -> torch.Tensor:
    """ConMIM's loss: for each masked patch i of image b, cross-entropy of
    ``softmax_j(<s_bi, t_bj> / temperature)`` over the N patches j of the same image, target j = i; s and t
    L2-normalised. Computed in float32 whatever the inputs' precision.

    Args:
        student: ``[B, N, P]`` projections of the masked view.
        teacher: ``[B, N, P]`` projections of the unmasked view (no gradient flows into them here or in the model).
        mask: ``[B, N]`` bool, True = masked.
        temperature: > 0.

    Returns:
        ``()`` the mean over the masked patches of the batch.
    """
    student = nn.functional.normalize(student.float(), dim=-1)
    teacher = nn.functional.normalize(teacher.float(), dim=-1)
    logits = torch.bmm(student, teacher.transpose(1, 2)) / temperature  # [B, N, N]: patch i against all j
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return nn.functional.cross_entropy(logits[mask], positions[mask])


def teacher_momentum(start: float, progress: float) -> float:
    """The EMA decay at training progress ``progress`` in [0, 1]: from ``start`` to 1 along a half cosine (the
    official `cosine_scheduler(t_momentum, 1, ...)`): ``1 - (1 - start) * (1 + cos(pi * progress)) / 2``."""
    return 1.0 - (1.0 - start) * (1.0 + math.cos(math.pi * progress)) / 2.0


class ConMIMMTOProjector(nn.Module):
    """The projector on every token: ``projector_num_layers`` bias-free linear layers, BatchNorm + ReLU after each
    but the last, a BatchNorm without affine parameters after the last (SimCLR's design, as the official
    `_build_mlp`). The BatchNorms normalise over all tokens of the batch."""

    def __init__(self, config: ConMIMMTOConfig):
        super().__init__()
        layers = []
        for index in range(config.projector_num_layers):
            last = index == config.projector_num_layers - 1
            size_in = config.hidden_size if index == 0 else config.projector_hidden_size
            size_out = config.projector_size if last else config.projector_hidden_size
            layers.append(nn.Linear(size_in, size_out, bias=False))
            layers.append(nn.BatchNorm1d(size_out, affine=not last))
            if not last:
                layers.append(nn.ReLU())
        # not `layers`: upstream BEiT's key renaming (which save_pretrained applies to every key) would rename it
        self.mlp = nn.Sequential(*layers)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[B, T, D]`` -> ``[B, T, projector_size]``."""
        batch_size, num_tokens, _ = hidden_states.shape
        return self.mlp(hidden_states.flatten(0, 1)).view(batch_size, num_tokens, -1)


class ConMIMMTOPreTrainedModel(BeitPreTrainedModel):
    config: ConMIMMTOConfig
    _no_split_modules = ["BeitLayer", "ConMIMMTOProjector"]

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **kwargs):
        """Upstream's (also behind `gradient_checkpointing_enable`), always non-reentrant: the relative position bias
        shared by the blocks reaches each block as a keyword argument, which reentrant checkpointing does not detach,
        so the backward of the second recomputed block would run through the bias's graph a second time (upstream
        BEiT with a shared bias fails so)."""
        checkpoint_kwargs = {**(activation_checkpointing_kwargs or {}), "use_reentrant": False}
        super().activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module):
        """The official ConMIM initialisation (see the module docstring). Every write checks `_is_hf_initialized`,
        so weights loaded by `from_pretrained` are never overwritten."""
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            weight = module.weight
            if not getattr(weight, "_is_hf_initialized", False):  # never overwrite loaded weights
                init.trunc_normal_(weight, std=std, a=-std, b=std)  # the official cut at +-1 std
                weight.mul_(getattr(module, "_depth_scale", 1.0))  # see ConMIMMTOModel.post_init
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, BeitEmbeddings):
            init.trunc_normal_(module.cls_token, std=std, a=-std, b=std)
            if module.mask_token is not None:
                init.trunc_normal_(module.mask_token, std=std, a=-std, b=std)
            if module.position_embeddings is not None:  # the official `--abs_pos_emb` (off by default)
                init.trunc_normal_(module.position_embeddings, std=std, a=-std, b=std)


class ConMIMMTOModel(ConMIMMTOPreTrainedModel, BeitModel):
    """Upstream's `BeitModel` (the encoder, without pooling layer by default: ConMIM has none), initialised as the
    official ConMIM when built from a config."""

    def __init__(self, config: ConMIMMTOConfig, add_pooling_layer: bool = False):
        super().__init__(config, add_pooling_layer=add_pooling_layer)

    def post_init(self):
        """Marks each block's output projections for the official `fix_init_weight` (their initial weights divided
        by sqrt(2 * block number), applied in `_init_weights`), then upstream's."""
        for number, layer in enumerate(self.layers, start=1):
            for linear in (layer.attention.o_proj, layer.mlp.fc2):
                linear._depth_scale = 1.0 / math.sqrt(2.0 * number)
        super().post_init()


class ConMIMMTOMomentumEncoder(ConMIMMTOPreTrainedModel):
    """The momentum encoder: an EMA copy of the encoder (without its mask token, which it never uses) and of the
    projector, frozen (`ConMIMMTOForPreTraining.update_teacher`). A class of its own so that nothing takes it for the
    base model."""

    def __init__(self, config: ConMIMMTOConfig):
        super().__init__(config)
        teacher_config = deepcopy(config)
        teacher_config.use_mask_token = False
        self.beit = BeitModel(teacher_config, add_pooling_layer=False)
        self.projector = ConMIMMTOProjector(config)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` whole images -> ``[B, N, projector_size]`` projections of the patch tokens."""
        return self.projector(self.beit(pixel_values).last_hidden_state)[:, 1:]


class ConMIMMTOForPreTraining(ConMIMMTOPreTrainedModel):
    r"""ConMIM pre-training model with the MTO terms (L_spa, L_e, L_r and the heterogeneity) computed on the encoder.

    Inputs: `pixel_values` (the masked view), `bool_masked_pos`, optionally `teacher_pixel_values` (the momentum
    encoder's view of the same crop, more strongly augmented; defaults to `pixel_values`) and `use_mto`. The returned
    `loss` is the denoising contrastive loss; the MTO terms come back separately, unweighted.
    """

    def __init__(self, config: ConMIMMTOConfig):
        super().__init__(config)
        self.config = config
        self.beit = ConMIMMTOModel(config)
        self.projector = ConMIMMTOProjector(config)
        # The momentum encoder: frozen, updated only by `update_teacher`; saved with the checkpoint.
        self.teacher = ConMIMMTOMomentumEncoder(config)
        self.teacher.requires_grad_(False)
        self.post_init()

    @property
    def num_patches(self) -> int:
        return self.beit.embeddings.patch_embeddings.num_patches

    @torch.no_grad()
    def initialize_weights(self):
        """Upstream's, then the momentum encoder as a copy of encoder and projector where it was not loaded (built
        from a config, or loaded from a checkpoint without a teacher). Here rather than in `_init_weights`: a module
        without parameters of its own, as this one, is never handed to it in custom code."""
        super().initialize_weights()
        student = self.student_tensors()
        for name, tensor in self.teacher_tensors().items():
            init.copy_(tensor, student[name])

    def tie_weights(self, *args, **kwargs):
        """Upstream's, then the teacher frozen again: transformers 5's `from_pretrained` loads every floating weight
        as a fresh trainable `nn.Parameter` and calls this after loading."""
        super().tie_weights(*args, **kwargs)
        self.teacher.requires_grad_(False)

    # ---------------------------------------------------------------------------------------------------------------
    # Momentum encoder
    # ---------------------------------------------------------------------------------------------------------------

    def student_tensors(self) -> dict[str, torch.Tensor]:
        """Encoder and projector parameters by their names in the teacher (``beit.*``, ``projector.*``)."""
        return {name: tensor for name, tensor in self.named_parameters() if name.startswith(("beit.", "projector."))}

    def teacher_tensors(self) -> dict[str, torch.Tensor]:
        """The teacher's parameters, each the EMA of the student parameter of the same name. Its buffers (the
        BatchNorms' running statistics) are its own, as in the official code, which averages parameters only."""
        return dict(self.teacher.named_parameters())

    @torch.no_grad()
    def update_teacher(self, progress: float) -> float:
        """One EMA step, ``teacher = m * teacher + (1 - m) * student`` for every teacher parameter, ``m`` from
        `teacher_momentum` at training progress ``progress``. Returns ``m``."""
        low_precision = sorted({str(t.dtype) for t in self.teacher.parameters() if t.dtype != torch.float32})
        if low_precision:
            # (1 - m) x a weight's change falls below bf16's resolution as m nears 1: the teacher would stop moving
            raise ValueError(
                f"the momentum encoder must stay float32 to take EMA steps, got {low_precision} weights: train in "
                "float32 with mixed precision (--bf16 / --fp16 autocast), not a cast model"
            )
        if not 0.0 <= progress <= 1.0:
            raise ValueError(f"progress must be in [0, 1], got {progress}")
        momentum = teacher_momentum(self.config.teacher_momentum, progress)
        student = self.student_tensors()
        for name, tensor in self.teacher_tensors().items():
            # lerp: t + (1 - m) (s - t) = m t + (1 - m) s
            tensor.lerp_(student[name].detach().to(tensor.dtype), 1.0 - momentum)
        return momentum

    @torch.no_grad()
    def teacher_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, N, projector_size]`` the momentum encoder's projections of every patch of the whole image: ConMIM's
        targets (the positives and the negatives of each masked patch)."""
        return self.teacher(pixel_values)

    # ---------------------------------------------------------------------------------------------------------------
    # Forward
    # ---------------------------------------------------------------------------------------------------------------

    def _check_mask(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None) -> torch.Tensor:
        """``bool_masked_pos`` as bool ``[B, N]``; a ValueError naming the problem for a missing or malformed mask or
        one that masks no patch or every patch of an image (the loss needs masked patches to predict and visible ones
        to predict them from)."""
        if bool_masked_pos is None:
            raise ValueError("ConMIM needs bool_masked_pos ([batch, num_patches], True = masked)")
        expected = [pixel_values.shape[0], self.num_patches]
        if list(bool_masked_pos.shape) != expected:
            raise ValueError(
                f"bool_masked_pos must have shape [batch, num_patches] = {expected}, got {list(bool_masked_pos.shape)}"
            )
        if bool_masked_pos.is_floating_point() or bool_masked_pos.is_complex():
            raise ValueError(f"bool_masked_pos must be bool (True = masked), got dtype {bool_masked_pos.dtype}")
        bool_masked_pos = bool_masked_pos.bool()
        if not torch.compiler.is_compiling():  # one host read; a compiled forward trusts its mask
            counts = bool_masked_pos.sum(dim=1)
            fewest, most = torch.stack(torch.aminmax(counts)).tolist()
            if fewest == 0 or most == self.num_patches:
                image = int((counts == (0 if fewest == 0 else self.num_patches)).nonzero()[0])
                raise ValueError(
                    f"bool_masked_pos masks {int(counts[image])} of {self.num_patches} patches in image {image}: "
                    "ConMIM needs at least one masked and one visible patch per image"
                )
        return bool_masked_pos

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        bool_masked_pos: torch.BoolTensor | None = None,
        teacher_pixel_values: torch.Tensor | None = None,
        use_mto: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ConMIMMTOForPreTrainingOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
            The view the encoder sees, masked (official: the weakly augmented one).
        bool_masked_pos (`torch.BoolTensor` of shape `(batch_size, num_patches)`):
            True (or 1) = masked; every image needs at least one masked and one visible patch.
        teacher_pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`, *optional*):
            The momentum encoder's view of the same crop (official: colour jitter, grayscale, blur and solarisation
            on top); defaults to `pixel_values`.
        use_mto (`bool`, *optional*):
            Compute the MTO terms; defaults to `config.use_mto`. When `False` no MTO work is done.
        """
        use_mto = self.config.use_mto if use_mto is None else use_mto
        bool_masked_pos = self._check_mask(pixel_values, bool_masked_pos)
        if teacher_pixel_values is None:
            teacher_pixel_values = pixel_values
        elif teacher_pixel_values.shape != pixel_values.shape:
            raise ValueError(
                f"teacher_pixel_values must have the shape of pixel_values {list(pixel_values.shape)}, got "
                f"{list(teacher_pixel_values.shape)}"
            )
        return_hidden = kwargs.pop("output_hidden_states", None)
        return_hidden = self.config.output_hidden_states if return_hidden is None else return_hidden

        teacher_features = self.teacher_features(teacher_pixel_values)  # [B, N, P]
        outputs = self.beit(
            pixel_values,
            bool_masked_pos=bool_masked_pos,
            output_hidden_states=bool(use_mto or return_hidden),
            **kwargs,
        )
        features = self.projector(outputs.last_hidden_state)[:, 1:]  # [B, N, P]
        loss = denoising_contrastive_loss(
            features, teacher_features, bool_masked_pos, self.config.contrastive_temperature
        )

        terms = None
        if use_mto:
            terms = mto_terms(
                [state[:, 1:] for state in outputs.hidden_states],  # the CLS token never counts
                bool_masked_pos,
                spa_layers=self.config.mto_spa_layers,
                affinity=self.config.mto_affinity,
                temperature=self.config.mto_temperature,
                eps=self.config.mto_eps,
                ranking=self.config.mto_ranking,
            )
        hidden_states = outputs.hidden_states if return_hidden else None
        if hidden_states is not None and isinstance(return_hidden, (list, tuple)):  # indices of the states asked for
            kept = {index % len(hidden_states) for index in return_hidden}
            hidden_states = tuple(state if i in kept else None for i, state in enumerate(hidden_states))
        return ConMIMMTOForPreTrainingOutput(
            loss=loss,
            logits=features,
            teacher_features=teacher_features,
            mask=bool_masked_pos.float(),
            hidden_states=hidden_states,
            attentions=outputs.attentions,
            sparsity_loss=terms.sparsity_loss if terms else None,
            singularity_loss=terms.singularity_loss if terms else None,
            ranking_loss=terms.ranking_loss if terms else None,
            heterogeneity=terms.heterogeneity if terms else None,
        )


__all__ = [
    "ConMIMMTOForPreTraining",
    "ConMIMMTOForPreTrainingOutput",
    "ConMIMMTOModel",
    "ConMIMMTOMomentumEncoder",
    "ConMIMMTOPreTrainedModel",
    "ConMIMMTOProjector",
    "denoising_contrastive_loss",
    "teacher_momentum",
]


def _register_checkpoint_conversion() -> None:
    """Give our encoder upstream `BeitModel`'s key renaming, looked up by class name (transformers 5 applies a
    conversion mapping only to the class names and `model_type`s it knows): it loads BEiT checkpoints in their legacy
    names, and `save_pretrained` writes upstream's names. Without upstream's renaming of per-block biases, which
    ConMIM's encoder does not have (its bias is shared). Done here, in the modeling file, so that `trust_remote_code`
    loading gets it too."""
    renamings = [
        renaming
        for renaming in get_checkpoint_conversion_mapping(BeitModel.__name__)
        if not any("attention.attention.relative_position_bias" in pattern for pattern in renaming.source_patterns)
    ]
    register_checkpoint_conversion_mapping(ConMIMMTOModel.__name__, renamings, overwrite=True)


_register_checkpoint_conversion()
