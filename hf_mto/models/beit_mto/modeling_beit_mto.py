"""BEiT pre-training (transformers' `BeitForMaskedImageModeling`) with Masked Token Optimization in the encoder, and
its pluggable image tokenizer.

The model subclasses upstream: same modules and state-dict keys, same head (final LayerNorm + linear over the visual
vocabulary) and the same loss, cross-entropy over the masked patches only. What it adds:

- the targets: visual-token ids of the *unmasked* image from an image tokenizer, computed inside the forward from
  `tokenizer_pixel_values` (the tokenizer's own view of the same crop) when no `labels` are given;
- the MTO terms on the encoder's states (as SimMIM's: the mask token is substituted in the encoder);
- the official BEiT initialisation: CLS and mask tokens normal (std 0.02) truncated at +-0.02 where upstream sets
  zeros, and the output projections of block l (attention and MLP) scaled by 1 / sqrt(2 l).

The image tokenizer is any module mapping the tokenizer's view ``[B, C, S, S]`` to ids ``[B, N]`` in
``[0, vocab_size)`` (`ImageTokenizer`): a DALL-E-style dVAE (`DVAEImageTokenizer`, transformers'
`FlavaImageCodebook`) or a k-means codebook over patches (`KMeansImageTokenizer`). It is frozen and kept *outside*
the module tree: it holds no parameter of the model (so never a gradient, never an optimizer entry), its weights are
not in the model's state dict (so checkpoints keep upstream's keys exactly, both ways), and `save_pretrained` writes
it beside the weights, in `image_tokenizer/`, so a checkpoint is complete. Moving the model to a device (`.to`) moves
it too; it stays float32 whatever the model's dtype.
"""

import itertools
import logging
import os
from dataclasses import dataclass

import torch
from huggingface_hub import snapshot_download
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import BeitForMaskedImageModeling, BeitModel, FlavaImageCodebook, FlavaImageCodebookConfig
from transformers import initialization as init
from transformers.conversion_mapping import (
    get_checkpoint_conversion_mapping,
    register_checkpoint_conversion_mapping,
)
from transformers.modeling_outputs import MaskedLMOutput
from transformers.models.beit.modeling_beit import BeitEmbeddings, BeitPreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import resolve_hidden_states_indices, selected_hidden_states

from .configuration_beit_mto import BeitMTOConfig
from .mto import mto_terms

logger = logging.getLogger(__name__)

# The folder beside a checkpoint's weights that holds its image tokenizer.
TOKENIZER_FOLDER = "image_tokenizer"
KMEANS_FILE = "kmeans_codebook.safetensors"


class ImageTokenizer(nn.Module):
    """The interface of an image tokenizer: ``tokenizer view [B, C, S, S] -> ids [B, N]`` (long, in
    ``[0, vocab_size)``, raster order over a ``grid x grid`` token map), deterministic, without gradients.

    Attributes:
        vocab_size: the number of codes.
    """

    vocab_size: int

    def token_grid(self, image_size: int) -> int:
        """Tokens per side for a view of ``image_size`` pixels."""
        raise NotImplementedError

    def save(self, directory: str | os.PathLike) -> None:
        """Write what `build_image_tokenizer` reads back (its ``source``)."""
        raise NotImplementedError


class DVAEImageTokenizer(ImageTokenizer):
    """A DALL-E-style discrete VAE (transformers' `FlavaImageCodebook`, DALL-E's encoder): the argmax code of each
    8 x 8 pixel cell (`get_codebook_indices`) of the view, which BEiT normalises with `map_pixels`."""

    def __init__(self, codebook: FlavaImageCodebook):
        super().__init__()
        self.codebook = codebook
        self.vocab_size = codebook.config.vocab_size

    def token_grid(self, image_size: int) -> int:
        return image_size // 2 ** (self.codebook.config.num_groups - 1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.codebook.get_codebook_indices(pixel_values).flatten(1)

    def save(self, directory: str | os.PathLike) -> None:
        self.codebook.save_pretrained(directory)


class KMeansImageTokenizer(ImageTokenizer):
    """A codebook of ``vocab_size`` centroids over the view's ``patch x patch`` pixel patches (flattened, channels
    last): each patch's id is its nearest centroid (squared Euclidean distance; ties to the lower id). Fitted on the
    training images (iGPT's colour clusters, here whole patches); unfitted until `set_codebook` takes a fitted or a
    saved codebook.

    Args:
        vocab_size: the number of centroids K.
        patch_size: side p of a token's pixel patch in the tokenizer's view.
        num_channels: C.

    Attributes:
        fit: what the codebook was fitted with (seed, view, data; strings), saved with it as file metadata.
    """

    def __init__(self, vocab_size: int, patch_size: int, num_channels: int = 3):
        super().__init__()
        self.vocab_size, self.patch_size = vocab_size, patch_size
        self.register_buffer("codebook", torch.zeros(vocab_size, patch_size * patch_size * num_channels))
        self.fitted = False
        self.fit: dict[str, str] = {}

    def token_grid(self, image_size: int) -> int:
        return image_size // self.patch_size

    def patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, C, S, S]`` -> ``[B, N, p * p * C]``, patches in raster order."""
        batch, channels, height, width = pixel_values.shape
        p = self.patch_size
        grid = pixel_values.reshape(batch, channels, height // p, p, width // p, p)
        return grid.permute(0, 2, 4, 3, 5, 1).reshape(batch, (height // p) * (width // p), p * p * channels)

    def set_codebook(self, codebook: torch.Tensor, fit: dict[str, str] | None = None) -> None:
        """Take ``codebook [K, p * p * C]`` as the fitted centroids, ``fit`` as what they were fitted with."""
        if codebook.shape != self.codebook.shape:
            raise ValueError(
                f"a k-means codebook of shape {list(codebook.shape)} does not fit this tokenizer "
                f"({list(self.codebook.shape)}: vocab_size x patch pixels)"
            )
        self.codebook.copy_(codebook)
        self.fitted, self.fit = True, dict(fit or {})

    @staticmethod
    def read(path: str | os.PathLike) -> tuple[torch.Tensor, dict[str, str]]:
        """``(codebook [K, p * p * C], fit)`` from a file `save` wrote."""
        with safe_open(path, "pt") as file:
            metadata = file.metadata() or {}
            return file.get_tensor("codebook"), {key: value for key, value in metadata.items() if key != "format"}

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if not self.fitted:
            raise ValueError(
                "the k-means image tokenizer is not fitted: the trainer fits it on the training images at the start "
                "of the run (MTOTrainer with a train dataset), or load a checkpoint whose image_tokenizer/ folder "
                "holds one"
            )
        patches = self.patches(pixel_values.float())  # [B, N, D]
        codebook = self.codebook.float()
        # |x - c|^2 = |x|^2 - 2 x.c + |c|^2; |x|^2 is the same for every code of a patch
        distance = codebook.square().sum(dim=1) - 2 * patches @ codebook.T  # [B, N, K]
        return distance.argmin(dim=-1)

    def save(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, KMEANS_FILE)
        # Whole or not at all (a temporary file, then a rename): another process waiting for the cache, or a run
        # resumed after a crash, never reads half a codebook.
        temporary = f"{path}.{os.getpid()}.tmp"
        try:
            codebook = {"codebook": self.codebook.detach().cpu().contiguous()}
            save_file(codebook, temporary, metadata={"format": "pt", **self.fit})
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)


def tokenizer_unavailable(source: str, error: Exception) -> OSError:
    """The error for dVAE weights that cannot be found, saying how to provide them offline."""
    return OSError(
        f"the dVAE image tokenizer's weights were not found at {source!r} ({type(error).__name__}: {error}). "
        "Offline, provide them locally: on a machine with access run `hf download facebook/flava-image-codebook "
        "--local-dir <dir>` (or `FlavaImageCodebook.from_pretrained(...).save_pretrained(<dir>)`), copy <dir> over, "
        "and set the config's tokenizer_name_or_path to <dir> (pretrain.py: --config_overrides "
        "tokenizer_name_or_path=<dir>), or put them in the checkpoint's image_tokenizer/ folder. Without any "
        "download, use tokenizer_type=kmeans."
    )


def build_image_tokenizer(config: BeitMTOConfig, source: str | None = None) -> ImageTokenizer:
    """The image tokenizer `config` declares, frozen and in eval mode.

    Args:
        config: the model's config (tokenizer kind, vocab size, view size).
        source: a directory holding a saved tokenizer (a checkpoint's `image_tokenizer/`; for a dVAE, also a Hub
            id), if any. Without one, a dVAE comes from `config.tokenizer_config` (random weights) or
            `config.tokenizer_name_or_path`, and a k-means tokenizer is unfitted.

    Raises:
        OSError: dVAE weights not found (the message says how to provide them offline).
        ValueError: the tokenizer's vocabulary or token grid disagrees with the model.
    """
    if config.tokenizer_type == "kmeans":
        patch = config.tokenizer_image_size // config.patch_grid
        tokenizer = KMeansImageTokenizer(config.vocab_size, patch, config.num_channels)
        if source is not None and os.path.isfile(os.path.join(source, KMEANS_FILE)):
            tokenizer.set_codebook(*KMeansImageTokenizer.read(os.path.join(source, KMEANS_FILE)))
    else:
        if source is None and config.tokenizer_config is not None:
            codebook = FlavaImageCodebook(FlavaImageCodebookConfig(**config.tokenizer_config))
        else:
            location = source or config.tokenizer_name_or_path
            try:
                codebook = FlavaImageCodebook.from_pretrained(location)
            except (OSError, ValueError) as error:
                raise tokenizer_unavailable(location, error) from None
        tokenizer = DVAEImageTokenizer(codebook)
    check_tokenizer(tokenizer, config)
    tokenizer.requires_grad_(False)
    return tokenizer.eval()


def check_tokenizer(tokenizer: ImageTokenizer, config: BeitMTOConfig) -> None:
    """Raise a `ValueError` when the tokenizer's vocabulary or token grid disagrees with the model's."""
    if tokenizer.vocab_size != config.vocab_size:
        raise ValueError(
            f"the image tokenizer has {tokenizer.vocab_size} codes but the model's head predicts vocab_size "
            f"{config.vocab_size}: set vocab_size to {tokenizer.vocab_size}"
        )
    grid = tokenizer.token_grid(config.tokenizer_image_size)
    if grid != config.patch_grid:
        raise ValueError(
            f"the image tokenizer gives a {grid} x {grid} token grid for its {config.tokenizer_image_size} px view, "
            f"the encoder a {config.patch_grid} x {config.patch_grid} patch grid: they must match"
        )


@dataclass
class BeitMTOOutput(MaskedLMOutput):
    r"""
    Output of [`BeitMTOForMaskedImageModeling`]: upstream's fields plus the targets, the mask and the raw (unweighted)
    MTO terms, which are `None` when MTO is off or no mask was given.

    loss (`torch.FloatTensor` of shape `()`):
        Upstream's cross-entropy over the masked patches. The MTO terms are *not* added: the trainer weights them.
    logits (`torch.FloatTensor` of shape `(batch_size, num_patches, vocab_size)`):
        Upstream's prediction scores for every patch.
    visual_tokens (`torch.LongTensor` of shape `(batch_size, num_patches)`):
        The tokenizer's ids of the whole image, when the forward computed them (from `tokenizer_pixel_values`).
    mask (`torch.FloatTensor` of shape `(batch_size, num_patches)`):
        The `bool_masked_pos` the forward used as float32, 1 = masked.
    sparsity_loss, singularity_loss, ranking_loss (`torch.FloatTensor` of shape `()`):
        L_spa (Eq. 3, mean over `config.mto_spa_layers`), L_e (Eq. 6), L_r (Eq. 7): batch means.
    heterogeneity (`torch.FloatTensor` of shape `(batch_size, num_hidden_layers + 1)`):
        Heterogeneity H^0..H^L of the encoder (Eq. 2) per image.
    """

    visual_tokens: torch.LongTensor | None = None
    mask: torch.FloatTensor | None = None
    sparsity_loss: torch.FloatTensor | None = None
    singularity_loss: torch.FloatTensor | None = None
    ranking_loss: torch.FloatTensor | None = None
    heterogeneity: torch.FloatTensor | None = None


class BeitMTOPreTrainedModel(BeitPreTrainedModel):
    config: BeitMTOConfig

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, BeitEmbeddings):  # the official BEiT's, where upstream sets zeros: truncated at +-std
            std = self.config.initializer_range
            init.trunc_normal_(module.cls_token, std=std, a=-std, b=std)
            if module.mask_token is not None:
                init.trunc_normal_(module.mask_token, std=std, a=-std, b=std)


class BeitMTOModel(BeitMTOPreTrainedModel, BeitModel):
    """Upstream's `BeitModel` (the encoder), with the official BEiT token initialisation."""


class BeitMTOForMaskedImageModeling(BeitMTOPreTrainedModel, BeitForMaskedImageModeling):
    r"""BEiT pre-training model: visual-token prediction of the masked patches, MTO terms on the encoder.

    Same inputs as [`~transformers.BeitForMaskedImageModeling`] (`pixel_values`, `bool_masked_pos`, `labels`) plus
    `tokenizer_pixel_values` (the targets are then computed by the image tokenizer) and `use_mto`. `loss` is
    upstream's cross-entropy alone; the MTO terms come back separately, unweighted.
    """

    def __init__(self, config: BeitMTOConfig):
        # Not `BeitForMaskedImageModeling.__init__`: it would build upstream's encoder only for us to replace it. Same
        # attribute names and head, so the state-dict keys are upstream's.
        BeitPreTrainedModel.__init__(self, config)
        # Outside the module tree on purpose (see the module docstring), hence not `self.x = ...`; built on first use.
        object.__setattr__(self, "_image_tokenizer", None)
        self.num_labels = config.num_labels
        self.beit = BeitMTOModel(config, add_pooling_layer=False)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()
        self._rescale_output_projections()

    @torch.no_grad()
    def _rescale_output_projections(self) -> None:
        """The official BEiT's `fix_init_weight`: block l's (1-based) attention and MLP output projections divided by
        sqrt(2 l), so the residual stream does not grow with depth at initialisation. Loaded weights replace these."""
        for depth, layer in enumerate(self.beit.layers, start=1):
            layer.attention.o_proj.weight.div_((2.0 * depth) ** 0.5)
            layer.mlp.fc2.weight.div_((2.0 * depth) ** 0.5)

    # -- the image tokenizer -------------------------------------------------------------------------------------------

    @property
    def image_tokenizer(self) -> ImageTokenizer:
        """The frozen image tokenizer, built on first use: the one saved beside the checkpoint this model was loaded
        from (its `image_tokenizer/` folder, local or on the Hub), else the one the config declares (see
        `build_image_tokenizer`)."""
        if self._image_tokenizer is None:
            self.set_image_tokenizer(build_image_tokenizer(self.config, self._saved_tokenizer()))
        return self._image_tokenizer

    def _saved_tokenizer(self) -> str | None:
        """The local folder of the tokenizer saved beside the checkpoint this model was loaded from: its
        `image_tokenizer/` folder, downloaded (at the weights' commit) when the checkpoint is a Hub id. None when the
        checkpoint has none, or the Hub cannot be reached and it is not cached (a warning says so)."""
        source = self.name_or_path
        if not source:
            return None
        if os.path.isdir(source):
            folder = os.path.join(source, TOKENIZER_FOLDER)
            return folder if os.path.isdir(folder) else None
        try:
            snapshot = snapshot_download(
                source, allow_patterns=[f"{TOKENIZER_FOLDER}/*"], revision=getattr(self.config, "_commit_hash", None)
            )
        except (OSError, ValueError) as error:  # offline and not cached, no such repo, or not a repo id at all
            logger.warning(
                "the image tokenizer saved beside %s could not be fetched (%s: %s): using the one the config declares",
                source,
                type(error).__name__,
                error,
            )
            return None
        folder = os.path.join(snapshot, TOKENIZER_FOLDER)
        return folder if os.path.isdir(folder) else None

    def set_image_tokenizer(self, tokenizer: ImageTokenizer) -> None:
        """Use ``tokenizer`` (frozen, eval mode, float32, on the model's device)."""
        check_tokenizer(tokenizer, self.config)
        tokenizer.requires_grad_(False)
        tokenizer = tokenizer.eval().to(self.lm_head.weight.device, torch.float32)
        object.__setattr__(self, "_image_tokenizer", tokenizer)

    def _apply(self, fn, recurse=True):
        # `.to()`, `.cuda()` move the tokenizer with the model, although it is not a submodule; a dtype cast does not
        # reach it: it stays float32, so the same image gives the same ids whatever the model's precision.
        super()._apply(fn, recurse)
        tokenizer = self.__dict__.get("_image_tokenizer")  # absent while upstream's __init__ runs
        if tokenizer is not None:
            tokenizer.to(self.lm_head.weight.device)
        return self

    @torch.no_grad()
    def tokenize(self, tokenizer_pixel_values: torch.Tensor) -> torch.Tensor:
        """Visual-token ids ``[B, N]`` of the tokenizer's view ``[B, C, S, S]`` (no gradient, eval mode, full
        precision whatever the autocast: the same image always gives the same ids)."""
        tokenizer = self.image_tokenizer
        expected = self.config.tokenizer_image_size
        if tokenizer_pixel_values.ndim != 4 or tuple(tokenizer_pixel_values.shape[-2:]) != (expected, expected):
            raise ValueError(
                f"tokenizer_pixel_values must be [batch, channels, {expected}, {expected}] (tokenizer_image_size), "
                f"got {list(tokenizer_pixel_values.shape)}"
            )
        weight = next(itertools.chain(tokenizer.parameters(), tokenizer.buffers()))
        with torch.autocast(tokenizer_pixel_values.device.type, enabled=False):
            ids = tokenizer(tokenizer_pixel_values.to(weight.device, weight.dtype))
        if ids.shape != (tokenizer_pixel_values.shape[0], self.config.patch_grid**2):
            raise ValueError(
                f"the image tokenizer gave ids of shape {list(ids.shape)}, the encoder has "
                f"{self.config.patch_grid**2} patches per image"
            )
        return ids.long()

    def save_pretrained(self, save_directory, is_main_process: bool = True, *args, **kwargs):
        """Upstream's `save_pretrained` (upstream's keys), plus the image tokenizer in `image_tokenizer/`, written
        first: with `push_to_hub=True` the upload then holds it (see `_get_files_timestamps`)."""
        if is_main_process and self._image_tokenizer is not None:
            self._image_tokenizer.save(os.path.join(save_directory, TOKENIZER_FOLDER))
        super().save_pretrained(save_directory, is_main_process, *args, **kwargs)

    def _get_files_timestamps(self, working_dir) -> dict[str, float]:
        # `save_pretrained(push_to_hub=True)` uploads the entries of the folder that are new or changed since this
        # call, which it makes before writing: the tokenizer, written just before it, must count as changed.
        timestamps = super()._get_files_timestamps(working_dir)
        timestamps.pop(TOKENIZER_FOLDER, None)
        return timestamps

    # -- the forward ---------------------------------------------------------------------------------------------------

    def _check_mask(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor) -> torch.Tensor:
        expected = [pixel_values.shape[0], self.config.patch_grid**2]
        if list(bool_masked_pos.shape) != expected:
            raise ValueError(
                f"bool_masked_pos must have shape [batch, num_patches] = {expected}, got {list(bool_masked_pos.shape)}"
            )
        if bool_masked_pos.dtype != torch.bool:
            if bool_masked_pos.is_floating_point() or bool_masked_pos.is_complex():
                raise ValueError(f"bool_masked_pos must be bool (True = masked), got dtype {bool_masked_pos.dtype}")
            bool_masked_pos = bool_masked_pos.bool()
        return bool_masked_pos

    def _requested_hidden_states(
        self, states: tuple[torch.Tensor, ...], output_hidden_states: bool | int | list[int] | None
    ) -> tuple[torch.Tensor | None, ...] | None:
        """What upstream returns for `output_hidden_states` (a flag, or the indices to keep), from all L+1 states."""
        if not output_hidden_states:
            return None
        selected = selected_hidden_states(output_hidden_states)
        if selected is None:
            return states
        keep = resolve_hidden_states_indices(self.beit, selected, num_hidden_states=len(states))
        return tuple(state if index in keep else None for index, state in enumerate(states))

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        bool_masked_pos: torch.BoolTensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        attention_mask: torch.Tensor | None = None,
        tokenizer_pixel_values: torch.Tensor | None = None,
        use_mto: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BeitMTOOutput:
        r"""
        bool_masked_pos (`torch.BoolTensor` of shape `(batch_size, num_patches)`):
            True (or 1) = masked. The generators of `hf_mto.masking` make BEiT's block masks and the others.
        labels (`torch.LongTensor` of shape `(num_masked,)`, *optional*):
            Upstream's targets: the visual-token ids of the masked patches, in mask order.
        tokenizer_pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, S, S)`, *optional*):
            The tokenizer's view of the same crops (S = `config.tokenizer_image_size`, normalised with
            `config.tokenizer_image_mean/std`): without `labels`, the targets are its ids at the masked patches.
        use_mto (`bool`, *optional*):
            Compute the MTO terms; defaults to `config.use_mto`. They need `bool_masked_pos`.
        """
        use_mto = (self.config.use_mto if use_mto is None else use_mto) and bool_masked_pos is not None
        if bool_masked_pos is not None:
            bool_masked_pos = self._check_mask(pixel_values, bool_masked_pos)
        visual_tokens = None
        if labels is None and tokenizer_pixel_values is not None:
            if bool_masked_pos is None:
                raise ValueError("tokenizer_pixel_values needs bool_masked_pos: the loss is over the masked patches")
            visual_tokens = self.tokenize(tokenizer_pixel_values)  # [B, N]
            labels = visual_tokens[bool_masked_pos]  # [num_masked], upstream's form
        output_hidden_states = kwargs.get("output_hidden_states", self.config.output_hidden_states)
        if use_mto:
            kwargs["output_hidden_states"] = True  # the MTO terms need every state
        outputs = super().forward(
            pixel_values,
            bool_masked_pos=bool_masked_pos,
            labels=labels,
            interpolate_pos_encoding=interpolate_pos_encoding,
            attention_mask=attention_mask,
            return_dict=True,
            **kwargs,
        )
        hidden_states, terms = outputs.hidden_states, None
        if use_mto:
            terms = mto_terms(
                [state[:, 1:] for state in hidden_states],  # the CLS token never counts
                bool_masked_pos,
                spa_layers=self.config.mto_spa_layers,
                affinity=self.config.mto_affinity,
                temperature=self.config.mto_temperature,
                eps=self.config.mto_eps,
                ranking=self.config.mto_ranking,
            )
            hidden_states = self._requested_hidden_states(hidden_states, output_hidden_states)
        return BeitMTOOutput(
            loss=outputs.loss,
            logits=outputs.logits,
            hidden_states=hidden_states,
            attentions=outputs.attentions,
            visual_tokens=visual_tokens,
            mask=bool_masked_pos.float() if bool_masked_pos is not None else None,
            sparsity_loss=terms.sparsity_loss if terms else None,
            singularity_loss=terms.singularity_loss if terms else None,
            ranking_loss=terms.ranking_loss if terms else None,
            heterogeneity=terms.heterogeneity if terms else None,
        )


__all__ = [
    "BeitMTOForMaskedImageModeling",
    "BeitMTOModel",
    "BeitMTOOutput",
    "BeitMTOPreTrainedModel",
    "DVAEImageTokenizer",
    "ImageTokenizer",
    "KMeansImageTokenizer",
    "build_image_tokenizer",
]


def _register_checkpoint_conversion() -> None:
    """Give our encoder upstream `BeitModel`'s key renaming, looked up by class name (transformers 5 applies a
    conversion mapping only to the class names and `model_type`s it knows): loading maps the legacy names of
    upstream's `save_pretrained` and of the Hub's 4.x checkpoints (``beit.encoder.layer.N.attention.attention.query``,
    ``beit.encoder.relative_position_bias``) to the modules' names, and `save_pretrained` writes upstream's names.
    Done here, in the modeling file, so that `trust_remote_code` loading gets it too."""
    register_checkpoint_conversion_mapping(
        BeitMTOModel.__name__, get_checkpoint_conversion_mapping(BeitModel.__name__), overwrite=True
    )


_register_checkpoint_conversion()
