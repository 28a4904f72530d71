"""BEiT + MTO as generic code sees it (see `hf_mto.methods`). Not imported by the modeling files, so not part of the
remote code saved beside checkpoints."""

from __future__ import annotations

import json
import logging
import os

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F
from transformers import BeitConfig, BeitForMaskedImageModeling, BeitModel

from ...data import build_eval_transform, to_rgb
from ...methods import PreTrainingMethod, register_method
from .configuration_beit_mto import BeitMTOConfig
from .modeling_beit_mto import (
    KMEANS_FILE,
    TOKENIZER_FOLDER,
    BeitMTOForMaskedImageModeling,
    BeitMTOModel,
    KMeansImageTokenizer,
)

logger = logging.getLogger(__name__)

# The k-means tokenizer's fit: patches of this many training images (seeded choice), this many Lloyd iterations.
KMEANS_FIT_IMAGES = 2048
KMEANS_ITERATIONS = 30


class TwoViewCrop:
    """BEiT's augmentation (official `datasets.py`): colour jitter 0.4, horizontal flip, then one random resized
    crop (scale 0.08-1, aspect 3/4-4/3) resampled twice, bicubic at the encoder's size and Lanczos at the tokenizer's,
    each normalised with its own statistics. PIL image -> ``{"pixel_values": [3, H, W], "tokenizer_pixel_values":
    [3, S, S]}``."""

    def __init__(self, image_size: int, image_mean, image_std, config: BeitMTOConfig):
        self.image_size, self.tokenizer_size = image_size, config.tokenizer_image_size
        self.jitter_flip = T.Compose([T.ColorJitter(0.4, 0.4, 0.4), T.RandomHorizontalFlip()])
        self.crop = T.RandomResizedCrop(image_size, scale=(0.08, 1.0))
        self.normalize = T.Normalize(image_mean, image_std)
        self.tokenizer_normalize = T.Normalize(config.tokenizer_image_mean, config.tokenizer_image_std)

    def __call__(self, image) -> dict[str, torch.Tensor]:
        image = self.jitter_flip(to_rgb(image))
        top, left, height, width = self.crop.get_params(image, self.crop.scale, self.crop.ratio)
        views = {}
        for name, size, interpolation, normalize in (
            ("pixel_values", self.image_size, T.InterpolationMode.BICUBIC, self.normalize),
            ("tokenizer_pixel_values", self.tokenizer_size, T.InterpolationMode.LANCZOS, self.tokenizer_normalize),
        ):
            view = F.resized_crop(image, top, left, height, width, [size, size], interpolation=interpolation)
            views[name] = normalize(F.to_tensor(view))
        return views


class TwoViewCentreCrop:
    """`TwoViewCrop`'s deterministic counterpart for evaluation: resize and centre crop at the encoder's and the
    tokenizer's sizes (the same region of the image), each normalised with its own statistics. A class, not a
    closure, so that spawned data-loader workers can pickle it."""

    def __init__(self, image_size: int, image_mean, image_std, config: BeitMTOConfig):
        self.encoder_view = build_eval_transform(image_size, image_mean, image_std)
        self.tokenizer_view = build_eval_transform(
            config.tokenizer_image_size, config.tokenizer_image_mean, config.tokenizer_image_std
        )

    def __call__(self, image) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.encoder_view(image), "tokenizer_pixel_values": self.tokenizer_view(image)}


def fit_kmeans(vectors: torch.Tensor, num_codes: int, iterations: int, generator: torch.Generator) -> torch.Tensor:
    """Lloyd's k-means from a k-means++ start.

    Args:
        vectors: ``[M, D]`` float32, M >= ``num_codes``.
        num_codes: K.
        iterations: Lloyd steps after the start.
        generator: the seeded source of the start's draws.

    Returns:
        ``[K, D]`` centroids. A centroid left without members takes the vector farthest from its own centroid.
    """
    if vectors.shape[0] < num_codes:
        raise ValueError(f"k-means needs at least {num_codes} patches (vocab_size), the sample has {vectors.shape[0]}")
    first = torch.randint(vectors.shape[0], (1,), generator=generator)
    centroids = [vectors[first[0]]]
    nearest = (vectors - centroids[0]).square().sum(dim=1)  # [M] squared distance to the closest centroid so far
    for _ in range(1, num_codes):
        pick = torch.multinomial(nearest + 1e-12, 1, generator=generator)[0]
        centroids.append(vectors[pick])
        nearest = torch.minimum(nearest, (vectors - vectors[pick]).square().sum(dim=1))
    codebook = torch.stack(centroids)
    squared = vectors.square().sum(dim=1)
    for _ in range(iterations):
        distance = squared[:, None] - 2 * vectors @ codebook.T + codebook.square().sum(dim=1)  # [M, K]
        closest, assignment = distance.min(dim=1)
        counts = torch.bincount(assignment, minlength=num_codes)
        sums = torch.zeros_like(codebook).index_add_(0, assignment, vectors)
        updated = sums / counts.clamp(min=1)[:, None]
        empty = (counts == 0).nonzero().flatten()
        if len(empty):
            updated[empty] = vectors[closest.topk(len(empty)).indices]
        codebook = updated
    return codebook


@register_method
class BeitMTOMethod(PreTrainingMethod):
    """BEiT: masks reach the model as `bool_masked_pos`; the default masking is BEiT's block-wise masking
    (`beit_block`: rectangles of at least 16 patches, aspect 0.3-1/0.3, exactly 75 of 196 patches at 224 px). The
    targets come from the image tokenizer inside the forward (`tokenizer_pixel_values`, BEiT's second view); MTO acts
    on the encoder. A k-means tokenizer is fitted on the training images before the first step
    (`prepare_training`)."""

    name = "BEiT"
    config_class = BeitMTOConfig
    model_class = BeitMTOForMaskedImageModeling
    base_model_class = BeitMTOModel
    auto_class_name = "AutoModelForPreTraining"
    extends = (BeitForMaskedImageModeling,)
    upstream_encoder_classes = (BeitModel,)
    reconstructs_pixels = False
    mask_input_name = "bool_masked_pos"
    default_masking = "beit_block"
    mto_stacks = ("encoder",)
    export_dropped_keys = ("embeddings.mask_token",)
    # `BeitForImageClassification` builds its encoder with the pooler (with `use_mean_pooling`, the official
    # fine-tuning's `fc_norm`): exported as initialised (weight 1, bias 0), as the official fine-tuning starts it.
    stock_encoder_class = BeitModel
    stock_encoder_kwargs = {}
    stock_encoder_new_keys = ("pooler.",)
    citation = """\
@inproceedings{bao2022beit,
  title     = {{BEiT}: {BERT} Pre-Training of Image Transformers},
  author    = {Bao, Hangbo and Dong, Li and Piao, Songhao and Wei, Furu},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2022}
}"""
    card_notes = (
        "BEiT's mask token and visual-token head were dropped. Position information is BEiT's relative position "
        "bias (shared by all blocks when pre-trained so); layer scale is kept. With `use_mean_pooling` (BEiT's "
        "fine-tuning) the pooler's LayerNorm is new to fine-tuning, exported at its initial values (1 and 0)."
    )

    @classmethod
    def card_architecture(cls, config) -> list[tuple[str, str]]:
        if config.tokenizer_type == "dvae":
            source = config.tokenizer_name_or_path if config.tokenizer_config is None else "built from a config"
            tokenizer = f"DALL-E-style dVAE (FlavaImageCodebook, {source})"
        else:
            tokenizer = "k-means codebook over patches, fitted on the training images"
        return [
            ("targets", f"visual-token ids of the whole image ({config.vocab_size} codes), masked patches only"),
            ("image tokenizer", f"{tokenizer}, on a {config.tokenizer_image_size} px view of each crop"),
        ]

    # -- data ----------------------------------------------------------------------------------------------------------

    @classmethod
    def pretraining_transform(cls, image_size: int, image_mean, image_std, config: BeitMTOConfig | None = None):
        """BEiT's two views of one crop (`TwoViewCrop`): the encoder's and the tokenizer's."""
        return TwoViewCrop(image_size, image_mean, image_std, cls._config(config))

    @classmethod
    def evaluation_transform(cls, image_size: int, image_mean, image_std, config: BeitMTOConfig | None = None):
        """The evaluation views: resize and centre crop at both sizes (the same region of the image)."""
        return TwoViewCentreCrop(image_size, image_mean, image_std, cls._config(config))

    @staticmethod
    def _config(config: BeitMTOConfig | None) -> BeitMTOConfig:
        if config is None:
            raise ValueError("BEiT's transforms need the model's config (the tokenizer's view size and normalisation)")
        return config

    # -- before training -----------------------------------------------------------------------------------------------

    @classmethod
    def prepare_training(cls, model, train_dataset, output_dir: str, seed: int) -> None:
        """Make the image tokenizer ready before the first step: a dVAE is loaded (a missing download fails now, not
        at the first step); an unfitted k-means tokenizer takes the codebook cached in
        ``output_dir/image_tokenizer/`` when it was fitted as this run would fit it (`kmeans_fit`), else is fitted on
        the patches of `KMEANS_FIT_IMAGES` training images (seeded, the global RNG untouched) and cached there.

        Raises:
            ValueError: for upstream's `BeitForMaskedImageModeling`, which has no image tokenizer to make its targets.
        """
        if not isinstance(model, BeitMTOForMaskedImageModeling):
            raise ValueError(
                f"{type(model).__name__} has no image tokenizer to make BEiT's targets: load the checkpoint as "
                f"{BeitMTOForMaskedImageModeling.__name__} (same weights; hf_mto.analysis.load_checkpoint or "
                f"{BeitMTOForMaskedImageModeling.__name__}.from_pretrained)"
            )
        tokenizer = model.image_tokenizer
        if not isinstance(tokenizer, KMeansImageTokenizer) or tokenizer.fitted:
            return
        fit = cls.kmeans_fit(model.config, len(train_dataset), seed)
        cache = os.path.join(output_dir, TOKENIZER_FOLDER, KMEANS_FILE)
        if os.path.isfile(cache):
            codebook, cached = KMeansImageTokenizer.read(cache)
            differs = sorted(key for key in fit if cached.get(key) != fit[key])
            if not differs and codebook.shape == tokenizer.codebook.shape:
                tokenizer.set_codebook(codebook.to(tokenizer.codebook.device), fit)
                logger.info("k-means image tokenizer: the codebook cached in %s", cache)
                return
            logger.warning(
                "k-means image tokenizer: the codebook cached in %s was fitted with %s where this run has %s: "
                "fitting a new one, which replaces it",
                cache,
                {key: cached.get(key) for key in differs} if differs else f"shape {list(codebook.shape)}",
                {key: fit[key] for key in differs} if differs else f"shape {list(tokenizer.codebook.shape)}",
            )
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(len(train_dataset), generator=generator)[:KMEANS_FIT_IMAGES].tolist()
        with torch.random.fork_rng(devices=[]):
            # the augmentations draw from the global CPU RNG; `torch.manual_seed` would reseed the accelerators' RNGs
            # too, which fork_rng(devices=[]) does not restore
            torch.default_generator.manual_seed(seed)
            views = [train_dataset[index].get("tokenizer_pixel_values") for index in chosen]
        views = torch.stack([view for view in views if view is not None])  # unreadable images are None
        patches = tokenizer.patches(views).flatten(0, 1).float()  # [images * N, p * p * C]
        codebook = fit_kmeans(patches, tokenizer.vocab_size, KMEANS_ITERATIONS, generator)
        tokenizer.set_codebook(codebook.to(tokenizer.codebook.device), fit)
        tokenizer.save(os.path.dirname(cache))
        logger.info(
            "k-means image tokenizer: %d codes fitted on %d patches of %d training images, cached in %s",
            tokenizer.vocab_size,
            len(patches),
            len(views),
            cache,
        )

    @staticmethod
    def kmeans_fit(config: BeitMTOConfig, num_images: int, seed: int) -> dict[str, str]:
        """What a k-means fit depends on, as the strings its cache records: the seed, the tokenizer's view (size,
        normalisation), the vocabulary and the training set's size."""
        return {
            "seed": str(seed),
            "vocab_size": str(config.vocab_size),
            "tokenizer_image_size": str(config.tokenizer_image_size),
            "tokenizer_image_mean": json.dumps(list(config.tokenizer_image_mean)),
            "tokenizer_image_std": json.dumps(list(config.tokenizer_image_std)),
            "training_images": str(num_images),
        }

    # -- the encoder over whole images ---------------------------------------------------------------------------------

    @classmethod
    def unmasked_embeddings(cls, model, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, 1 + N, D]`` BEiT's embeddings with nothing masked (CLS, patches, absolute positions where
        configured), without the embedding dropout: built from the module's parameters, as in eval mode."""
        embeddings = cls.encoder(model).embeddings
        patches = embeddings.patch_embeddings(pixel_values)  # [B, N, D]
        hidden = torch.cat([embeddings.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1)
        if embeddings.position_embeddings is not None:
            hidden = hidden + embeddings.interpolate_pos_encoding(hidden, *pixel_values.shape[2:])
        return hidden

    @classmethod
    def unmasked_encoder_output(cls, encoder, pixel_values: torch.Tensor) -> torch.Tensor:
        """Upstream's encoder forward with no mask (its relative position bias included).

        With `use_mean_pooling` (BEiT's default, in pre-training as in its fine-tuning) the encoder's final
        `layernorm` is an Identity, so this is the last block's output, not normalised: pre-training's final norm is
        the head's `layernorm` (outside the encoder), and fine-tuning's is the pooler's LayerNorm over the mean of the
        patch tokens, new at fine-tuning (its initial 1 and 0 in an export). The frozen-encoder evaluation
        (`hf_mto.evaluation.encoder_features`) hence pools these raw outputs; a LayerNorm at its initial values would
        only centre and rescale each feature vector, which the linear probe's standardisation covers but the k-NN's
        cosine similarity would not, so none is added."""
        return cls.encoder(encoder)(pixel_values).last_hidden_state

    @classmethod
    def encoder_attention_maps(cls, model, pixel_values: torch.Tensor, num_layers: int) -> list[torch.Tensor]:
        """As `PreTrainingMethod.encoder_attention_maps`, with BEiT's relative position bias (shared and/or per block)
        added to the attention logits and its layer scale on the residual branches. The rest of each block is rebuilt
        from the probabilities at hand, with no drop path and no dropout: the trainer runs this with the model in
        training mode, where calling the blocks would drop paths at random (and draw from the global RNG)."""
        encoder = cls.encoder(model)
        hidden = cls.unmasked_embeddings(model, pixel_values)  # [B, T, D]
        batch_size, num_tokens, _ = hidden.shape
        grid = (pixel_values.shape[2] // encoder.config.patch_size, pixel_values.shape[3] // encoder.config.patch_size)
        shared = None
        if encoder.shared_position_bias is not None:
            shared = encoder.shared_position_bias(grid, dim_size=num_tokens).float()  # [1, heads, T, T]
        maps = []
        for index, layer in enumerate(cls.encoder_blocks(model)[:num_layers]):
            bias = shared  # [1, heads, T, T] or None: this block's, computed once
            if layer.relative_position_bias is not None:
                own = layer.relative_position_bias(grid, dim_size=num_tokens).float()
                bias = own if bias is None else bias + own
            attention = layer.attention
            normed = layer.layernorm_before(hidden)
            shape = (batch_size, num_tokens, -1, attention.head_dim)
            query = attention.q_proj(normed).view(shape).transpose(1, 2).float()  # [B, heads, T, hd]
            key = attention.k_proj(normed).view(shape).transpose(1, 2).float()
            logits = torch.matmul(query, key.transpose(-1, -2)) * attention.scaling
            probs = torch.softmax(logits if bias is None else logits + bias, dim=-1)  # [B, heads, T, T]
            maps.append(probs.mean(dim=1, keepdim=True))  # [B, 1, T, T]
            if index == num_layers - 1:
                break  # the last block's output is never used
            # BEiT's block: x + lambda_1 * attn(ln(x)), then x + lambda_2 * mlp(ln(x)); drop path and dropout off
            value = attention.v_proj(normed).view(shape).transpose(1, 2)
            context = torch.matmul(probs.to(value.dtype), value).transpose(1, 2).reshape(batch_size, num_tokens, -1)
            hidden = hidden + layer.lambda_1 * attention.o_proj(context)
            hidden = hidden + layer.lambda_2 * layer.mlp(layer.layernorm_after(hidden))
        return maps

    # -- analysis ------------------------------------------------------------------------------------------------------

    @classmethod
    def analysis_pass(cls, model, pixel_values: torch.Tensor, mask_inputs: dict[str, torch.Tensor]):
        """The encoder's states (BEiT's MTO stack, in patch order) and the mask; BEiT predicts visual tokens, not
        pixels, so there is no reconstruction (None). See `PreTrainingMethod.analysis_pass`."""
        outputs = model(pixel_values, use_mto=False, output_hidden_states=True, **mask_inputs)
        states = [state[:, 1:].float() for state in outputs.hidden_states]
        return {"encoder": states}, mask_inputs["bool_masked_pos"].bool(), None

    # -- export --------------------------------------------------------------------------------------------------------

    @classmethod
    def stock_encoder_config(cls, config) -> BeitConfig:
        """A stock `BeitConfig` with every field the encoder and BEiT's classifier read (no mask token: fine-tuning
        masks nothing), so `BeitForImageClassification` builds on it with only its classifier new."""
        fields = BeitConfig().to_dict()
        kwargs = {name: value for name, value in config.to_dict().items() if name in fields}
        for name in ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path", "dtype"):
            kwargs.pop(name, None)
        return BeitConfig(**{**kwargs, "use_mask_token": False})
