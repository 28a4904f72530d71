"""Image datasets and transforms for masked-image-modeling pre-training.

Three sources give a `datasets.DatasetDict` with "train" and "validation" splits whose image column is named
"image" (and whose label column, when there is one, is named "label"):

* a Hub dataset (`--dataset_name`, `--dataset_config_name`), loaded with `datasets.load_dataset`;
* local image folders (`--train_dir`, `--validation_dir`), loaded with datasets' "imagefolder" builder;
* with neither, Fashion-MNIST read straight from the IDX files of Debian's `dataset-fashion-mnist` package, so a
  pre-training run works offline with no download.

The transforms follow transformers' `run_mae.py` example: random resized crops and flips for pre-training, resize
and centre crop for evaluation, giving `pixel_values` of shape [3, H, W]. `PixelCollator` stacks them into the
[B, 3, H, W] batch the models take. Evaluation ends in `ToTensor` + `Normalize` (float32). Pre-training, where the
loader must keep up with the GPU, works on 8-bit images (`PretrainingTransform`): JPEGs are decoded by torchvision's
`decode_jpeg` (libjpeg-turbo) straight into uint8 tensors, everything else by PIL (`decode_image_tensor`); crop and
flip act on uint8 tensors, with torchvision's random draws, so the crops are those of the PIL pipeline
(`build_pil_pretraining_transform`) for the same random state; and the float conversion and normalisation happen
once per batch on the device (`PixelCollator.on_device`, which `MTOTrainer` calls). About 2x the images per second
per core of the PIL pipeline (`benchmarks/data_throughput.py`).

Unusual and unreadable images (what a real image folder or Hub dataset contains sooner or later):

* Every image becomes 8-bit RGB (`to_rgb`). Grayscale ("L", "1") is replicated into three equal channels;
  palette and CMYK go through PIL. Images with transparency (RGBA, LA, a palette or grayscale with a transparent
  colour) are composited onto white, as transformers' `convert_to_rgb` does, rather than having the alpha channel
  dropped (which would expose whatever colour the transparent pixels happen to hold). 16-bit images ("I;16*", and
  "I", which is how some Pillow versions open 16-bit PNGs) are scaled to 8 bits by 255/65535 with rounding: PIL's
  own `convert("RGB")` clips them at 255, so almost every 16-bit photograph would come out white.
* Images smaller than the model's input are upscaled: `RandomResizedCrop` resizes its crop to `image_size` whatever
  the source size (down to 1x1), and the eval transform's `Resize` scales the shorter side up before the centre crop.
* Unreadable images (random bytes with an image extension, a truncated JPEG/PNG, an unsupported mode, a file that
  has disappeared) are **skipped**, not fatal: `apply_transform` has the dataset hand over the encoded image and
  decodes it itself, so a decoding error becomes a logged warning naming the file (once per file and process, with a
  running count; `skipped_images()` lists them) and `pixel_values=None`, and `PixelCollator` drops such examples
  from the batch. A batch whose every image is unreadable stops the run with an error instead (there is nothing to
  train on; clean the data or use a larger batch). Decoding happens anyway when an image is read, so this costs
  nothing extra, unlike a full validation pass over a large folder at start-up; `--verify_images` does that pass
  when wanted (every image decoded once at load time, unreadable ones dropped from the splits and listed, with a
  count). PIL's `ImageFile.LOAD_TRUNCATED_IMAGES` must stay False (its default; this module never sets it): set, it
  makes a truncated file decode silently as a partly grey image, and `apply_transform` warns about it.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import datasets
import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder
from huggingface_hub.errors import LocalEntryNotFoundError
from PIL import Image, ImageFile
from torchvision import transforms as T
from torchvision.io import decode_jpeg
from torchvision.transforms.functional import pil_to_tensor
from torchvision.transforms.v2.functional import resized_crop
from transformers import ViTImageProcessor

logger = logging.getLogger(__name__)

# ImageNet statistics, as the official MAE/SimMIM and `facebook/vit-mae-base`'s image processor use; grayscale data
# is converted to RGB first so checkpoints fine-tune with the stock RGB pipelines.
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def build_image_processor(config) -> ViTImageProcessor:
    """The image processor saved beside every checkpoint: resize to the model's size, ImageNet normalisation."""
    size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    return ViTImageProcessor(
        size={"height": size, "width": size}, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, do_convert_rgb=True
    )


DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

# Class names in label order, as in the original release and the Hub's `fashion_mnist` dataset.
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# IDX magic numbers: two zero bytes, the element type (0x08 = unsigned byte), then the number of dimensions.
_IDX_IMAGES_MAGIC = 0x00000803
_IDX_LABELS_MAGIC = 0x00000801

_INSTALL_HINT = (
    "Install it with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), point --fashion_mnist_dir at a "
    "folder holding the four IDX files, or train on other data with --dataset_name (Hub) or --train_dir (local images)."
)


@dataclass
class DataArguments:
    """Which images to pre-train on; parsed by `transformers.HfArgumentParser`."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub dataset to load with `datasets.load_dataset`. Leave unset (and --train_dir unset) to use "
            "the embedded Fashion-MNIST default."
        },
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Configuration of the Hub dataset, if it has several."}
    )
    train_dir: str | None = field(
        default=None,
        metadata={"help": "Local folder of training images (datasets' imagefolder layout; subfolders become labels)."},
    )
    validation_dir: str | None = field(
        default=None, metadata={"help": "Local folder of validation images. Default: split off --train_dir."}
    )
    image_column_name: str | None = field(
        default=None,
        metadata={"help": "Image column. Default: 'image', 'img', or the only column holding images."},
    )
    label_column_name: str | None = field(
        default=None,
        metadata={"help": "Label column, used by evaluation (pre-training ignores it). Default: 'label' or 'labels'."},
    )
    train_val_split: float = field(
        default=0.15,
        metadata={"help": "Fraction of train split off as validation when the data has no validation split."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep at most this many (randomly chosen) training examples."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep at most this many (randomly chosen) validation examples."}
    )
    fashion_mnist_dir: str = field(
        default=DEFAULT_FASHION_MNIST_DIR,
        metadata={"help": "Folder of the Fashion-MNIST IDX files (.gz or not) for the embedded default dataset."},
    )
    verify_images: bool = field(
        default=False,
        metadata={
            "help": "Decode every image once at load time (after max_*_samples) and drop the unreadable ones, "
            "logging each file and the count. Costs a full decoding pass; without it unreadable images are skipped, "
            "with a warning, when they are read."
        },
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.train_val_split < 1.0:
            raise ValueError(f"train_val_split must be in [0, 1), got {self.train_val_split}.")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value}.")
        if self.dataset_name is not None and self.train_dir is not None:
            raise ValueError(
                f"Give either dataset_name ({self.dataset_name!r}) or train_dir ({self.train_dir!r}), not both."
            )
        if self.validation_dir is not None and self.train_dir is None:
            raise ValueError(f"validation_dir ({self.validation_dir!r}) needs train_dir as well.")


# ----------------------------------------------------------------------------------------------------------------
# Fashion-MNIST from IDX files
# ----------------------------------------------------------------------------------------------------------------


def _find_idx_file(data_dir: Path, stem: str) -> Path:
    """Return `stem.gz` (as Debian ships it) or the uncompressed `stem` (as after a manual gunzip)."""
    for candidate in (data_dir / f"{stem}.gz", data_dir / stem):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"Fashion-MNIST file {stem}.gz not found in {data_dir}. {_INSTALL_HINT}")


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes into a uint8 array of shape [N] (labels) or [N, rows, cols] (images)."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError; truncation gives EOFError
        raise ValueError(f"Corrupt Fashion-MNIST file {path}: {err}. Reinstall the files ({_INSTALL_HINT})") from err

    header_size = 4 * (1 + ndim)
    if len(raw) < header_size:
        raise ValueError(f"Corrupt Fashion-MNIST file {path}: {len(raw)} bytes is shorter than the IDX header.")
    found_magic, *shape = struct.unpack(f">{1 + ndim}I", raw[:header_size])
    if found_magic != magic:
        raise ValueError(
            f"Corrupt Fashion-MNIST file {path}: IDX magic number {found_magic:#010x}, expected {magic:#010x}."
        )
    expected = int(np.prod(shape))
    if len(raw) - header_size != expected:
        raise ValueError(
            f"Corrupt Fashion-MNIST file {path}: header says shape {tuple(shape)} ({expected} bytes) but the file "
            f"holds {len(raw) - header_size} bytes of data."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(shape)


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def _encode_grayscale_pngs(images: np.ndarray) -> list[bytes]:
    """Encode uint8 images [N, H, W] as 8-bit grayscale PNG files.

    `datasets.Image` stores encoded bytes. Encoding through PIL spends almost all its time in per-image overhead and
    deflate; writing the (tiny, fixed) PNG structure by hand with stored, uncompressed deflate blocks avoids both.
    The files are bigger than deflated ones (held in memory) and decode faster, since there is nothing to inflate.
    """
    n, height, width = images.shape
    header = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    end = _png_chunk(b"IEND", b"")
    # Each PNG scanline starts with a filter-type byte; 0 means "None" (raw pixels follow).
    scanlines = np.zeros((n, height, width + 1), dtype=np.uint8)
    scanlines[:, :, 1:] = images
    return [header + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 0)) + end for rows in scanlines]


def read_fashion_mnist(
    split: str = "train", data_dir: str | Path = DEFAULT_FASHION_MNIST_DIR
) -> tuple[np.ndarray, np.ndarray]:
    """Read a Fashion-MNIST split from its IDX files as arrays, without building a dataset.

    Args:
        split: "train" (60,000 images) or "test" (10,000 images).
        data_dir: Folder holding the four `*-ubyte.gz` files (Debian's `dataset-fashion-mnist` package).

    Returns:
        ``(images [N, 28, 28] uint8, labels [N] uint8)``, labels indexing `FASHION_MNIST_CLASSES`.

    Raises:
        ValueError: Unknown split, or a corrupt file.
        FileNotFoundError: The folder or a file is missing; the message says how to install them.
    """
    if split not in _FASHION_MNIST_FILES:
        raise ValueError(f"Fashion-MNIST split must be one of {sorted(_FASHION_MNIST_FILES)}, got {split!r}.")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"Fashion-MNIST folder {data_dir} does not exist. {_INSTALL_HINT}")
    images_stem, labels_stem = _FASHION_MNIST_FILES[split]
    images = _read_idx(_find_idx_file(data_dir, images_stem), _IDX_IMAGES_MAGIC, ndim=3)
    labels = _read_idx(_find_idx_file(data_dir, labels_stem), _IDX_LABELS_MAGIC, ndim=1)
    if len(images) != len(labels):
        raise ValueError(
            f"Corrupt Fashion-MNIST {split} split in {data_dir}: {len(images)} images, {len(labels)} labels."
        )
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"Corrupt Fashion-MNIST {split} labels in {data_dir}: found label {labels.max()} > 9.")
    return images, labels


def load_fashion_mnist(split: str = "train", data_dir: str | Path = DEFAULT_FASHION_MNIST_DIR) -> datasets.Dataset:
    """Load a Fashion-MNIST split from its IDX files into an in-memory `datasets.Dataset`.

    Args:
        split: "train" (60,000 images) or "test" (10,000 images).
        data_dir: Folder holding the four `*-ubyte.gz` files (Debian's `dataset-fashion-mnist` package).

    Returns:
        A Dataset with columns "image" (`datasets.Image`, decoding to 28×28 PIL images of mode "L") and "label"
        (`ClassLabel` over `FASHION_MNIST_CLASSES`).

    Raises:
        ValueError: Unknown split, or a corrupt file.
        FileNotFoundError: The folder or a file is missing; the message says how to install them.
    """
    images, labels = read_fashion_mnist(split, data_dir)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=FASHION_MNIST_CLASSES)}
    )
    mapping = {
        "image": [{"bytes": png, "path": None} for png in _encode_grayscale_pngs(images)],
        "label": labels.astype(np.int64),
    }
    return datasets.Dataset.from_dict(mapping, features=features, split=datasets.NamedSplit(split))


# ----------------------------------------------------------------------------------------------------------------
# Loading and preparing splits
# ----------------------------------------------------------------------------------------------------------------


def resolve_image_column(dataset: datasets.Dataset, name: str | None = None) -> str:
    """Name of `dataset`'s image column: `name` if given, else "image", "img", or the only `datasets.Image` column."""
    columns = dataset.column_names
    if name is not None:
        if name not in columns:
            raise ValueError(f"image_column_name {name!r} is not a column of the dataset; columns: {columns}.")
        return name
    for candidate in ("image", "img"):
        if candidate in columns:
            return candidate
    image_columns = [col for col, feature in dataset.features.items() if isinstance(feature, datasets.Image)]
    if len(image_columns) == 1:
        return image_columns[0]
    raise ValueError(
        f"Cannot tell which column holds the images (found {len(image_columns)} Image columns); "
        f"pass --image_column_name. Columns: {columns}."
    )


def resolve_label_column(dataset: datasets.Dataset, name: str | None = None) -> str | None:
    """Name of `dataset`'s label column: `name` if given, else "label" or "labels", else None (unlabelled)."""
    columns = dataset.column_names
    if name is not None:
        if name not in columns:
            raise ValueError(f"label_column_name {name!r} is not a column of the dataset; columns: {columns}.")
        return name
    return next((candidate for candidate in ("label", "labels") if candidate in columns), None)


def _standardise_columns(dataset: datasets.Dataset, data_args: DataArguments) -> datasets.Dataset:
    """Rename the image column to "image" and the label column to "label", so downstream code uses one name each."""
    renames = {
        resolve_image_column(dataset, data_args.image_column_name): "image",
        resolve_label_column(dataset, data_args.label_column_name): "label",
    }
    renames = {old: new for old, new in renames.items() if old is not None and old != new}
    clashes = [new for new in renames.values() if new in dataset.column_names and new not in renames]
    if clashes:
        raise ValueError(f"Cannot rename to {clashes}: the dataset already has such columns ({dataset.column_names}).")
    return dataset.rename_columns(renames) if renames else dataset


def _load_hub_dataset(
    data_args: DataArguments, cache_dir: str | None, token: str | bool | None
) -> datasets.DatasetDict:
    try:
        return datasets.load_dataset(
            data_args.dataset_name, data_args.dataset_config_name, cache_dir=cache_dir, token=token
        )
    # Offline (HF_HUB_OFFLINE=1) or unreachable Hub; an uncached file when offline is a LocalEntryNotFoundError.
    # DatasetNotFoundError (a FileNotFoundError too) is left alone: the Hub answered, and its message is clear.
    except (ConnectionError, LocalEntryNotFoundError) as err:
        # Keep the message to one line: the cause's first line only. `from None` keeps datasets' own ~15-line
        # traceback out of what a user sees; the original exception stays available as `__context__`.
        cause = (str(err).splitlines() or [""])[0] or type(err).__name__
        raise ConnectionError(
            f"Cannot load dataset {data_args.dataset_name!r}: the Hugging Face Hub is unreachable or offline mode is "
            f"on (HF_HUB_OFFLINE=1), and it is not in the local cache [{cause}]. Download it while "
            "online, or use --train_dir DIR for local images, or drop --dataset_name to use the embedded "
            "Fashion-MNIST default."
        ) from None


# Names datasets' data-file patterns pass over (hidden files, and `__MACOSX`-style folders).
_SKIPPED_PREFIXES = (".", "__")


def _check_image_folder(flag: str, folder: str) -> None:
    """Stop with a message naming `folder` (the value of `--flag`) when it is missing or holds no image file that
    datasets' imagefolder reads; imagefolder itself says only 'Instruction "train" corresponds to no data!'.

    Walks only until the first image, so a large folder costs next to nothing. Hidden files and folders are passed
    over, as the "**" pattern `_load_raw` gives imagefolder passes over them.
    """
    path = Path(folder)
    if not path.exists():
        raise ValueError(f"--{flag} {folder!r} does not exist.")
    if not path.is_dir():
        raise ValueError(f"--{flag} {folder!r} is a file, not a folder of images.")
    extensions = set(ImageFolder.EXTENSIONS)
    for _, subfolders, files in os.walk(path):
        subfolders[:] = [name for name in subfolders if not name.startswith(_SKIPPED_PREFIXES)]
        if any(not name.startswith(_SKIPPED_PREFIXES) and Path(name).suffix.lower() in extensions for name in files):
            return
    raise ValueError(
        f"--{flag} {folder!r} holds no images: no file in it or its subfolders has an image extension "
        "(.jpg, .png, .webp, ...)."
    )


def _load_raw(data_args: DataArguments, cache_dir: str | None, token: str | bool | None) -> datasets.DatasetDict:
    """Load the source named by `data_args`, splits as the source has them."""
    if data_args.dataset_name is not None:
        return _load_hub_dataset(data_args, cache_dir, token)
    if data_args.train_dir is not None:
        _check_image_folder("train_dir", data_args.train_dir)
        if data_args.validation_dir is not None:
            _check_image_folder("validation_dir", data_args.validation_dir)
        # "**" takes images in subfolders too; imagefolder then turns the first subfolder level into labels.
        data_files = {"train": str(Path(data_args.train_dir) / "**")}
        if data_args.validation_dir is not None:
            data_files["validation"] = str(Path(data_args.validation_dir) / "**")
        return datasets.load_dataset("imagefolder", data_files=data_files, cache_dir=cache_dir)
    return datasets.DatasetDict(
        {
            "train": load_fashion_mnist("train", data_args.fashion_mnist_dir),
            "validation": load_fashion_mnist("test", data_args.fashion_mnist_dir),
        }
    )


def _subsample(dataset: datasets.Dataset, max_samples: int | None, seed: int) -> datasets.Dataset:
    """A random subset of at most `max_samples` examples (shuffled first, so the subset is not the first classes)."""
    if max_samples is None or max_samples >= len(dataset):
        return dataset
    return dataset.shuffle(seed=seed).select(range(max_samples))


def load_datasets(
    data_args: DataArguments, cache_dir: str | None = None, token: str | bool | None = None, seed: int = 42
) -> datasets.DatasetDict:
    """Load the data named by `data_args` as "train" and "validation" splits with columns "image" (and "label").

    Source: `data_args.dataset_name` (Hub), else `train_dir`/`validation_dir` (imagefolder), else Fashion-MNIST
    (train → "train", test → "validation"). Without a "validation" split, `train_val_split` of train is split off
    (seeded); with `train_val_split == 0` the result then has "train" only. Other splits (e.g. "test") are dropped.
    `max_train_samples`/`max_eval_samples` then keep a seeded random subset. With `verify_images`, every image
    of the result is decoded once and the unreadable ones are dropped (see `drop_unreadable_images`).

    Raises:
        ConnectionError: `dataset_name` cannot be fetched (offline / no network) and is not cached.
        FileNotFoundError: Fashion-MNIST default requested but not installed.
        ValueError: No "train" split, no image column can be found, or `train_dir`/`validation_dir` is missing or
            holds no images.
    """
    raw = _load_raw(data_args, cache_dir, token)
    if "train" not in raw:
        raise ValueError(f"The dataset has no 'train' split; splits: {list(raw)}.")
    splits = {"train": raw["train"]}
    if "validation" in raw:
        splits["validation"] = raw["validation"]
    elif data_args.train_val_split > 0:
        parts = raw["train"].train_test_split(test_size=data_args.train_val_split, seed=seed)
        splits = {"train": parts["train"], "validation": parts["test"]}

    splits = {name: _standardise_columns(split, data_args) for name, split in splits.items()}
    splits["train"] = _subsample(splits["train"], data_args.max_train_samples, seed)
    if "validation" in splits:
        splits["validation"] = _subsample(splits["validation"], data_args.max_eval_samples, seed)
    if data_args.verify_images:
        splits = {name: drop_unreadable_images(split, name) for name, split in splits.items()}
    return datasets.DatasetDict(splits)


# ----------------------------------------------------------------------------------------------------------------
# Transforms and collation
# ----------------------------------------------------------------------------------------------------------------


# Modes holding more than 8 bits per sample that PIL's convert("RGB") would clip at 255 rather than scale. "I" is
# 32-bit signed, but it is what some Pillow versions give for 16-bit PNGs, so it is read as 16-bit data too.
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image → 8-bit "RGB", as the ViT patch embedding expects (see the module docstring).

    Grayscale is replicated into three channels; transparency is composited onto white (as transformers'
    `convert_to_rgb`); 16-bit data ("I;16*", "I") is scaled by 255/65535 and rounded, not clipped at 255 as PIL's
    `convert` does; anything else goes through `convert("RGB")`.
    """
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        eight_bit = np.clip(np.rint(np.asarray(image, dtype=np.float64) * (255.0 / 65535.0)), 0, 255)
        return Image.fromarray(eight_bit.astype(np.uint8), mode="L").convert("RGB")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


# Decoding follows datasets' own `Image.decode_example` (local path, bytes or remote file; `load()`; EXIF rotation).
_DECODER = datasets.Image()

# How many dropped files `drop_unreadable_images` names in its summary (each is also named in its own warning).
_MAX_NAMES_LOGGED = 20

# Unreadable images met by this process: name → reason. Per process: DataLoader workers keep their own.
_SKIPPED: dict[str, str] = {}


def skipped_images() -> dict[str, str]:
    """The unreadable images skipped so far by this process (file name or description → error), in order met.

    DataLoader worker processes keep their own records (their warnings still name every file)."""
    return dict(_SKIPPED)


def _describe_image(value: Any) -> str:
    """The file name of a stored image (Hub datasets usually keep it next to the bytes), else what it is."""
    if isinstance(value, dict):
        if value.get("path"):
            return str(value["path"])
        if value.get("bytes") is not None:
            return f"<in-memory image of {len(value['bytes'])} bytes>"
    return f"<{type(value).__name__}>"


def decode_image(value: Any, on_error: Callable[[str], None] | None = None) -> Image.Image | None:
    """Decode one stored image (a `datasets.Image(decode=False)` value: {"path", "bytes"}, or a PIL image) to RGB.

    Returns None for an unreadable image (corrupt or truncated file, unsupported mode, missing file) after logging a
    warning that names it, the first time this process meets it (`skipped_images()` lists them), and calling
    `on_error(name)` when given.
    """
    try:
        image = value if isinstance(value, Image.Image) else _DECODER.decode_example(value)
        return to_rgb(image)
    # Corrupt data makes PIL raise many kinds of errors (OSError for truncation, UnidentifiedImageError, SyntaxError,
    # ValueError, struct.error, DecompressionBombError, ...); only the decoding and the conversion are guarded here.
    except Exception as err:  # noqa: BLE001
        name = _describe_image(value)
        if on_error is not None:
            on_error(name)
        if name not in _SKIPPED:
            _SKIPPED[name] = f"{type(err).__name__}: {err}"
            logger.warning(
                "Skipping unreadable image %s (%s: %s); %d unreadable image(s) skipped so far by this process.",
                name,
                type(err).__name__,
                err,
                len(_SKIPPED),
            )
        return None


# Every JPEG starts with the SOI marker (FF D8) and a marker segment (FF ..).
_JPEG_SIGNATURE = b"\xff\xd8\xff"


def _jpeg_bytes(value: Any) -> bytes | None:
    """The bytes of a stored image ({"path", "bytes"}) when it is a JPEG held in memory or in a local file, else
    None (a PIL image, another format, a remote or missing file: `decode_image` handles those)."""
    if not isinstance(value, dict):
        return None
    data = value.get("bytes")
    if data is None and value.get("path"):
        try:
            with open(value["path"], "rb") as file:
                data = file.read()
        except OSError:  # remote (hf://...) or missing: decode_image opens it, or names it
            return None
    return data if data is not None and data[:3] == _JPEG_SIGNATURE else None


def decode_image_tensor(value: Any, on_error: Callable[[str], None] | None = None) -> torch.Tensor | None:
    """`decode_image`, as a uint8 RGB tensor [3, H, W]: JPEGs are decoded by torchvision's `decode_jpeg`
    (libjpeg-turbo, ~20 % faster than through PIL, the same pixels), with their EXIF orientation applied as
    `decode_image` does; grayscale JPEGs are replicated into three channels as `to_rgb` does.

    Everything else goes through `decode_image` (PIL): other formats, CMYK JPEGs (PIL's colour conversion is kept),
    images larger than PIL's `MAX_IMAGE_PIXELS` (so that PIL's decompression-bomb check stays), and any JPEG that
    libjpeg-turbo rejects, so an unreadable image is named and skipped exactly as there (None).
    """
    data = _jpeg_bytes(value)
    if data is not None:
        try:
            image = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), apply_exif_orientation=True)
        except RuntimeError:  # corrupt or truncated: PIL decodes it again below and names it
            image = None
        within_limit = image is not None and (
            Image.MAX_IMAGE_PIXELS is None or image.shape[1] * image.shape[2] <= Image.MAX_IMAGE_PIXELS
        )
        if within_limit and image.shape[0] in (1, 3):
            return image.expand(3, -1, -1)
    image = decode_image(value, on_error)
    return None if image is None else pil_to_tensor(image)


def _without_decoding(dataset: datasets.Dataset) -> datasets.Dataset:
    """`dataset` with its "image" column left encoded ({"path", "bytes"}), so that `decode_image` can catch errors."""
    feature = dataset.features["image"]
    if isinstance(feature, datasets.Image) and feature.decode:
        return dataset.cast_column("image", datasets.Image(mode=feature.mode, decode=False))
    return dataset


def process_share(num_examples: int, state: PartialState) -> range:
    """This process's contiguous share of `range(num_examples)`; the shares, in process order, cover it once."""
    per_process = math.ceil(num_examples / state.num_processes)
    start = min(num_examples, state.process_index * per_process)
    return range(start, min(num_examples, start + per_process))


def drop_unreadable_images(dataset: datasets.Dataset, split: str = "train") -> datasets.Dataset:
    """Decode every image of `dataset` once and return it without the unreadable ones (`--verify_images`).

    Each dropped file is named in a warning, and the count is logged. Costs one full decoding pass, which several
    processes share: each decodes its `process_share` and the readable indices are gathered, so every process
    returns the same dataset.
    """
    if "image" not in dataset.column_names:
        raise ValueError(f"drop_unreadable_images needs an 'image' column; columns: {dataset.column_names}.")
    state = PartialState()
    share = process_share(len(dataset), state)
    readable, dropped = _readable_indices(dataset.select(share), split)
    readable = [share.start + index for index in readable]
    if state.num_processes > 1:
        shares = gather_object([(readable, dropped)])  # one per process, in process order
        readable = [index for share_readable, _ in shares for index in share_readable]
        dropped = [name for _, share_dropped in shares for name in share_dropped]
    if state.is_main_process:  # the summary is logged once
        _log_verification(dropped, len(dataset), split)
    return dataset.select(readable) if len(readable) < len(dataset) else dataset


def _log_verification(dropped: list[str], num_images: int, split: str) -> None:
    if not dropped:
        logger.info("verify_images: all %d %s images are readable.", num_images, split)
        return
    shown = ", ".join(dropped[:_MAX_NAMES_LOGGED])
    more = f" and {len(dropped) - _MAX_NAMES_LOGGED} more" if len(dropped) > _MAX_NAMES_LOGGED else ""
    logger.warning(
        "verify_images: dropped %d unreadable image(s) of %d from the %s split: %s%s.",
        len(dropped),
        num_images,
        split,
        shown,
        more,
    )


def _readable_indices(dataset: datasets.Dataset, split: str) -> tuple[list[int], list[str]]:
    """Indices of the images of `dataset` that decode, and the names of those that do not."""
    dropped: list[str] = []
    flags = _without_decoding(dataset).map(
        lambda images: {"readable": [decode_image(image, on_error=dropped.append) is not None for image in images]},
        input_columns=["image"],
        remove_columns=dataset.column_names,
        batched=True,
        keep_in_memory=True,
        load_from_cache_file=False,
        desc=f"Verifying {split} images",
    )["readable"]
    return np.flatnonzero(np.asarray(flags, dtype=bool)).tolist(), dropped


def build_pretraining_transform(image_size: int | tuple[int, int]) -> PretrainingTransform:
    """MAE's augmentation on 8-bit images: uint8 [3, H, W] (or a PIL image) → uint8 [3, image_size], normalised later
    by `PixelCollator`, once per batch (see `PretrainingTransform`)."""
    return PretrainingTransform(image_size)


@dataclass
class PretrainingTransform:
    """Random resized crop (20-100 % of the area, MAE's `scale=(0.2, 1.0)`, aspect ratio 3/4-4/3, bicubic as in
    run_mae.py) and horizontal flip, on uint8 tensors: [3, H', W'] (or a PIL image, converted) → uint8 [3, H, W].

    The distribution of `build_pil_pretraining_transform`, and the same draws: for the same torch random state both
    crop the same box and flip alike. Pixels agree within 2 levels of 255 (torch's antialiased bicubic computes in
    float, PIL's in fixed point; `tests/test_data.py` measures it). Working on uint8 tensors and leaving the float
    conversion and normalisation to the batch (`PixelCollator.on_device`) makes the augmentation ~3.5x cheaper per
    image (`benchmarks/data_throughput.py`).
    """

    image_size: int | tuple[int, int]
    # `apply_transform` hands it decoded uint8 tensors (`decode_image_tensor`: JPEGs by libjpeg-turbo, no PIL)
    takes_tensors: ClassVar[bool] = True
    scale: ClassVar[tuple[float, float]] = (0.2, 1.0)
    ratio: ClassVar[tuple[float, float]] = (3 / 4, 4 / 3)

    def __call__(self, image: torch.Tensor | Image.Image) -> torch.Tensor:
        if isinstance(image, Image.Image):  # a method's own transform may hand over PIL images
            image = pil_to_tensor(to_rgb(image))
        size = [self.image_size] * 2 if isinstance(self.image_size, int) else list(self.image_size)
        # The random draws of torchvision's RandomResizedCrop and RandomHorizontalFlip, in their order; the resize is
        # transforms.v2's, which resamples uint8 natively (~2.7x faster than v1's, which goes through float32).
        top, left, height, width = T.RandomResizedCrop.get_params(image, self.scale, self.ratio)
        image = resized_crop(image, top, left, height, width, size, T.InterpolationMode.BICUBIC, antialias=True)
        return image.flip(-1) if torch.rand(1) < 0.5 else image


def build_pil_pretraining_transform(
    image_size: int | tuple[int, int], image_mean: Sequence[float], image_std: Sequence[float]
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image → normalised float32 tensor [3, H, W], MAE's augmentation through PIL, as run_mae.py: the reference
    `PretrainingTransform` is measured against, for transforms that need PIL images or float output."""
    return T.Compose(
        [
            T.Lambda(to_rgb),
            T.RandomResizedCrop(
                image_size,
                scale=PretrainingTransform.scale,
                ratio=PretrainingTransform.ratio,
                interpolation=T.InterpolationMode.BICUBIC,
            ),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(mean=image_mean, std=image_std),
        ]
    )


def build_eval_transform(
    image_size: int | tuple[int, int], image_mean: Sequence[float], image_std: Sequence[float], crop_pct: float = 0.875
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image → normalised float32 tensor [3, H, W], deterministic: resize, then centre crop to `image_size`.

    The shorter side is resized to `image_size / crop_pct` (224 → 256 with the usual 0.875, as MAE's linear probe);
    `crop_pct=1.0` keeps the whole (square) image, which suits small centred images such as Fashion-MNIST.
    """
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}.")
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    resize = int(min(size) / crop_pct)
    return T.Compose(
        [
            T.Lambda(to_rgb),
            T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(mean=image_mean, std=image_std),
        ]
    )


@dataclass
class _PixelValuesTransform:
    """Batch transform for `set_transform`: {"image": [encoded], "label"?: [int]} → {"pixel_values": [...], ...}, or
    one column per entry when the transform gives a dict of views (a method's `pretraining_transform`).

    Images arrive encoded (`datasets.Image(decode=False)`) and are decoded here by `decode_image`, so an unreadable
    one gives `pixel_values=None` (and a warning) instead of an exception that would abort the whole batch.

    A module-level class rather than a closure so that the dataset stays picklable (DataLoader workers under the
    "spawn" start method, the default on macOS and Windows, pickle it).
    """

    transform: Callable[[Image.Image], torch.Tensor | dict[str, torch.Tensor]]
    keep_label: bool

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        # a transform that declares `takes_tensors` gets uint8 tensors, decoded without PIL where possible
        decode = decode_image_tensor if getattr(self.transform, "takes_tensors", False) else decode_image
        views = [None if image is None else self.transform(image) for image in map(decode, batch["image"])]
        names = next((list(view) for view in views if isinstance(view, dict)), ["pixel_values"])
        if "pixel_values" not in names:  # the collator tells unreadable images by it
            raise ValueError(f"a transform's dict of views must hold 'pixel_values'; it holds {names}")
        # an unreadable image is None in every column (`pixel_values` included, which the collator looks at)
        out = {
            name: [view if view is None or not isinstance(view, dict) else view[name] for view in views]
            for name in names
        }
        if self.keep_label:
            out["label"] = batch["label"]
        return out


def apply_transform(
    dataset: datasets.Dataset | datasets.DatasetDict,
    transform: Callable[[Image.Image], torch.Tensor | dict[str, torch.Tensor]],
) -> datasets.Dataset | datasets.DatasetDict:
    """Set an on-the-fly transform: each example reads as {"pixel_values": [3, H, W] float tensor, "label"?: int}
    (or, for a transform that gives a dict of views, one entry per view, `pixel_values` among them).

    Uses `set_transform`, so the images are decoded and augmented when read (fresh augmentation every epoch) and
    nothing is written to the cache. An unreadable image reads as `pixel_values=None` with a logged warning naming
    it; `PixelCollator` drops such examples. Expects the "image" column (see `load_datasets`); "label" is passed
    through when present. Use with `remove_unused_columns=False` in Trainer.

    Returns:
        For a `Dataset`, a new `Dataset` (the image column is recast to stay encoded until the transform decodes
        it; `dataset` itself is not changed): use the returned object. A `DatasetDict` is updated in place and
        returned.
    """
    if isinstance(dataset, datasets.DatasetDict):
        for name in list(dataset):
            dataset[name] = apply_transform(dataset[name], transform)
        return dataset
    if "image" not in dataset.column_names:
        raise ValueError(f"apply_transform needs an 'image' column; columns: {dataset.column_names}.")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        logger.warning(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process: truncated image files will decode as "
            "partly grey images instead of being skipped. Leave it False (its default)."
        )
    dataset = _without_decoding(dataset)
    has_label = "label" in dataset.column_names
    # Restricting to the needed columns keeps other (possibly large) columns from being decoded on every read.
    dataset.set_transform(
        _PixelValuesTransform(transform, keep_label=has_label), columns=["image", "label"] if has_label else ["image"]
    )
    return dataset


_LABELS = ("label", "labels")


@dataclass
class PixelCollator:
    """Stack examples into a batch: {"pixel_values": [B, 3, H, W]} (and every other view an example holds as a
    tensor, stacked under its name) and, with `include_labels`, "labels" [B] long.

    Examples whose `pixel_values` is None (unreadable images, see `apply_transform`; already reported by a warning)
    are dropped, so the batch can be smaller than requested; a batch with no readable image raises ValueError.
    Pre-training uses the default (the model takes `pixel_values` only); evaluation (linear probe, k-NN) sets
    `include_labels=True`.

    uint8 views (`PretrainingTransform`'s 8-bit images) stay uint8 here, a quarter of the bytes of floats to pass
    between processes and to the device, and need `image_mean` and `image_std`: `on_device` converts them to
    normalised float32, once per batch, where the batch ends up (`MTOTrainer` calls it after moving the batch).
    """

    include_labels: bool = False
    image_mean: Sequence[float] | None = None
    image_std: Sequence[float] | None = None

    def __post_init__(self) -> None:
        if (self.image_mean is None) != (self.image_std is None):
            raise ValueError(f"give both image_mean and image_std or neither, got {self.image_mean}, {self.image_std}")

    def on_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch with every uint8 view [B, 3, H, W] (0-255) as normalised float32: (x / 255 - mean) / std, as
        `ToTensor` + `Normalize` compute it per image; other entries unchanged (so it can run twice)."""
        if self.image_mean is None:
            return batch
        out = dict(batch)
        for name, value in batch.items():
            if name not in _LABELS and isinstance(value, torch.Tensor) and value.dtype == torch.uint8:
                mean = torch.tensor(self.image_mean, device=value.device).view(-1, 1, 1)
                std = torch.tensor(self.image_std, device=value.device).view(-1, 1, 1)
                out[name] = value.float().div_(255).sub_(mean).div_(std)
        return out

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        kept = [example for example in examples if example.get("pixel_values") is not None]
        if not kept:
            raise ValueError(
                f"All {len(examples)} images of this batch are unreadable (their files are named in the warnings "
                "above): remove or repair them, or pass --verify_images to drop them at load time."
            )
        # every view an example holds (a tensor), not its label, which only `include_labels` passes on
        views = [name for name, value in kept[0].items() if isinstance(value, torch.Tensor) and name not in _LABELS]
        batch = {name: torch.stack([example[name] for example in kept]) for name in views}
        eight_bit = [name for name, value in batch.items() if value.dtype == torch.uint8]
        if eight_bit and self.image_mean is None:
            raise ValueError(
                f"the views {eight_bit} are 8-bit images (a uint8 transform such as PretrainingTransform): give "
                "PixelCollator the image_mean and image_std to normalise them with"
            )
        if self.include_labels:
            if any("label" not in example for example in kept):
                raise ValueError("PixelCollator(include_labels=True) got examples without a 'label'.")
            batch["labels"] = torch.tensor([int(example["label"]) for example in kept], dtype=torch.long)
        return batch


def collate_pixel_values(examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Pre-training collate function: {"pixel_values": [B, 3, H, W]}; labels, if any, are dropped."""
    return PixelCollator()(examples)


def first_readable_pixels(dataset, count: int) -> torch.Tensor:
    """``[count, 3, H, W]``: the `pixel_values` of the first `count` readable examples of a transformed dataset
    (unreadable images, already reported by a warning, are passed over). Raises ValueError when there are fewer."""
    pixels = []
    for index in range(len(dataset)):
        value = dataset[index]["pixel_values"]
        if value is not None:
            pixels.append(value)
            if len(pixels) == count:
                return torch.stack(pixels)
    raise ValueError(f"needed {count} readable images, the dataset has {len(pixels)} (of {len(dataset)} examples)")
