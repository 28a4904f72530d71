"""Tests for hf_mto.data: Fashion-MNIST IDX loading, dataset assembly, transforms and collation.

Most cases use tiny synthetic IDX files or in-memory datasets, so they run without the Debian package; the cases
that read the real Fashion-MNIST files skip when it is not installed.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from pathlib import Path
from types import SimpleNamespace

import datasets
import huggingface_hub.constants
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms.functional import pil_to_tensor
from transformers import HfArgumentParser

from hf_mto import data as data_mod
from hf_mto.data import (
    DEFAULT_FASHION_MNIST_DIR,
    FASHION_MNIST_CLASSES,
    DataArguments,
    PixelCollator,
    apply_transform,
    build_eval_transform,
    build_pil_pretraining_transform,
    build_pretraining_transform,
    collate_pixel_values,
    decode_image,
    decode_image_tensor,
    load_datasets,
    load_fashion_mnist,
    process_share,
    resolve_image_column,
    resolve_label_column,
)

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
REAL_FASHION_MNIST = Path(DEFAULT_FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz").is_file()
needs_real_fashion_mnist = pytest.mark.skipif(
    not REAL_FASHION_MNIST, reason="needs `apt-get install dataset-fashion-mnist`"
)


def write_fake_fashion_mnist(root: Path, n_train: int = 12, n_test: int = 4, seed: int = 0) -> np.ndarray:
    """Write gzipped IDX files like Debian's; returns the train images [n_train, 28, 28]."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    train_images = None
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        with gzip.open(root / f"{split}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes())
        with gzip.open(root / f"{split}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 0x801, n) + labels.tobytes())
        if split == "train":
            train_images = images
    return train_images


def write_image_folder(root: Path, n_per_class: int = 3) -> None:
    """Two class subfolders: RGB images in one, grayscale in the other, of varied sizes."""
    rng = np.random.default_rng(0)
    for cls, channels in (("cat", 3), ("dog", 1)):
        (root / cls).mkdir(parents=True)
        for i in range(n_per_class):
            shape = (20 + i, 30) if channels == 1 else (20 + i, 30, 3)
            Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8)).save(root / cls / f"{i}.png")


# ---------------------------------------------------------------------------------------------------------------
# Fashion-MNIST
# ---------------------------------------------------------------------------------------------------------------


def test_fake_fashion_mnist_round_trip(tmp_path):
    images = write_fake_fashion_mnist(tmp_path)
    ds = load_fashion_mnist("train", tmp_path)
    assert len(ds) == 12
    assert ds.features["label"].names == FASHION_MNIST_CLASSES
    assert isinstance(ds.features["image"], datasets.Image)
    for i in (0, 5, 11):
        example = ds[i]
        assert example["image"].mode == "L" and example["image"].size == (28, 28)
        # The hand-written PNG encoding must be lossless.
        np.testing.assert_array_equal(np.asarray(example["image"]), images[i])
        assert example["label"] == i % 10
    assert len(load_fashion_mnist("test", tmp_path)) == 4


def test_fashion_mnist_reads_uncompressed_files(tmp_path):
    write_fake_fashion_mnist(tmp_path)
    for gz in tmp_path.glob("*.gz"):
        gz.with_suffix("").write_bytes(gzip.decompress(gz.read_bytes()))
        gz.unlink()
    assert len(load_fashion_mnist("test", tmp_path)) == 4


@needs_real_fashion_mnist
def test_real_fashion_mnist():
    test = load_fashion_mnist("test")
    assert len(test) == 10_000
    labels = np.asarray(test["label"])
    assert labels.min() == 0 and labels.max() == 9 and len(np.unique(labels)) == 10
    image = test[0]["image"]
    assert image.mode == "L" and image.size == (28, 28)
    assert len(load_fashion_mnist("train")) == 60_000


def test_fashion_mnist_bad_split(tmp_path):
    with pytest.raises(ValueError, match="'validation'"):
        load_fashion_mnist("validation", tmp_path)


def test_fashion_mnist_missing_dir_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError) as excinfo:
        load_fashion_mnist("train", tmp_path / "nowhere")
    message = str(excinfo.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert "--dataset_name" in message and "--train_dir" in message


def test_fashion_mnist_missing_file(tmp_path):
    write_fake_fashion_mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="train-labels-idx1-ubyte.*apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", tmp_path)


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"not gzip at all", "Corrupt.*train-images"),  # not a gzip stream
        (gzip.compress(struct.pack(">IIII", 0x801, 12, 28, 28)), "magic number"),  # labels magic on an image file
        (gzip.compress(struct.pack(">IIII", 0x803, 12, 28, 28) + bytes(100)), "holds 100 bytes"),  # truncated data
        (gzip.compress(b"\x00\x00"), "shorter than the IDX header"),
        (gzip.compress(struct.pack(">IIII", 0x803, 12, 28, 28) + bytes(12 * 784))[:-20], "Corrupt"),  # cut gzip
    ],
    # named ids: a gzip stream holds its creation time, so ids made from the payloads differ between xdist workers
    # whose collection falls in different seconds, and xdist then refuses to run
    ids=["not-gzip", "labels-magic", "truncated-data", "short-header", "cut-gzip"],
)
def test_fashion_mnist_corrupt_file(tmp_path, payload, match):
    write_fake_fashion_mnist(tmp_path)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(payload)
    with pytest.raises(ValueError, match=match):
        load_fashion_mnist("train", tmp_path)


def test_fashion_mnist_image_label_count_mismatch(tmp_path):
    write_fake_fashion_mnist(tmp_path)
    with gzip.open(tmp_path / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 0x801, 3) + bytes(3))
    with pytest.raises(ValueError, match="12 images, 3 labels"):
        load_fashion_mnist("train", tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# load_datasets
# ---------------------------------------------------------------------------------------------------------------


def test_load_datasets_default_is_fashion_mnist(tmp_path):
    write_fake_fashion_mnist(tmp_path)
    args = DataArguments(fashion_mnist_dir=str(tmp_path), max_train_samples=5, max_eval_samples=2)
    dsd = load_datasets(args)
    assert set(dsd) == {"train", "validation"}
    assert (len(dsd["train"]), len(dsd["validation"])) == (5, 2)
    assert dsd["train"].column_names == ["image", "label"]
    # Seeded: the same subset every time, and a random one rather than the first five.
    assert dsd["train"]["label"] == load_datasets(args)["train"]["label"]
    assert dsd["train"]["label"] != [0, 1, 2, 3, 4]


def test_load_datasets_default_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_datasets(DataArguments(fashion_mnist_dir=str(tmp_path / "nowhere")))


def test_load_datasets_imagefolder_split(tmp_path):
    write_image_folder(tmp_path / "images", n_per_class=10)
    args = DataArguments(train_dir=str(tmp_path / "images"), train_val_split=0.25)
    dsd = load_datasets(args, cache_dir=str(tmp_path / "cache"))
    assert (len(dsd["train"]), len(dsd["validation"])) == (15, 5)
    assert set(dsd["train"].column_names) == {"image", "label"}
    assert dsd["train"].features["label"].names == ["cat", "dog"]
    assert {dsd["train"][i]["image"].mode for i in range(15)} == {"RGB", "L"}


def test_load_datasets_imagefolder_validation_dir(tmp_path):
    write_image_folder(tmp_path / "train", n_per_class=3)
    write_image_folder(tmp_path / "val", n_per_class=2)
    args = DataArguments(train_dir=str(tmp_path / "train"), validation_dir=str(tmp_path / "val"), max_eval_samples=3)
    dsd = load_datasets(args, cache_dir=str(tmp_path / "cache"))
    assert (len(dsd["train"]), len(dsd["validation"])) == (6, 3)


def test_load_datasets_no_split_when_ratio_zero(tmp_path):
    write_image_folder(tmp_path / "images", n_per_class=2)
    args = DataArguments(train_dir=str(tmp_path / "images"), train_val_split=0.0)
    dsd = load_datasets(args, cache_dir=str(tmp_path / "cache"))
    assert list(dsd) == ["train"] and len(dsd["train"]) == 4


def _folder_without_images(root: Path, content: str) -> Path:
    """A folder holding nothing imagefolder reads: empty, text files only, or an image only in a hidden or `__` folder."""
    if content == "missing":
        return root / "nowhere"
    if content == "a file":
        (root / "notes.txt").write_text("not a folder")
        return root / "notes.txt"
    folder = root / "images"
    folder.mkdir()
    if content == "text only":
        (folder / "cat").mkdir()
        (folder / "cat" / "notes.txt").write_text("no image here")
        (folder / "labels.csv").write_text("file_name,label\n")
    elif content == "hidden image":
        (folder / ".thumbnails").mkdir()
        Image.new("RGB", (8, 8)).save(folder / ".thumbnails" / "0.png")
    elif content == "image in __MACOSX":  # datasets' patterns pass over "__" names too
        (folder / "__MACOSX").mkdir()
        Image.new("RGB", (8, 8)).save(folder / "__MACOSX" / "0.png")
    return folder


@pytest.mark.parametrize(
    "content, says",
    [
        ("missing", "does not exist"),
        ("a file", "is a file, not a folder of images"),
        ("empty", "holds no images"),
        ("text only", "holds no images"),
        ("hidden image", "holds no images"),
        ("image in __MACOSX", "holds no images"),
    ],
)
@pytest.mark.parametrize("flag", ["train_dir", "validation_dir"])
def test_load_datasets_image_folder_without_images_names_it(tmp_path, flag, content, says):
    # datasets' own error, 'Instruction "train" corresponds to no data!', names neither the folder nor the flag
    bad = _folder_without_images(tmp_path, content)
    write_image_folder(tmp_path / "good", n_per_class=1)
    folders = {"train_dir": str(tmp_path / "good"), flag: str(bad)}
    with pytest.raises(ValueError, match=f"^--{flag} '{bad}' {says}") as error:
        load_datasets(DataArguments(**folders), cache_dir=str(tmp_path / "cache"))
    assert "\n" not in str(error.value)


def test_load_datasets_finds_images_in_subfolders_with_upper_case_extensions(tmp_path):
    (tmp_path / "images" / "a" / "b").mkdir(parents=True)
    (tmp_path / "images" / "notes.txt").write_text("beside the images")
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a" / "b" / "0.PNG", format="PNG")
    args = DataArguments(train_dir=str(tmp_path / "images"), train_val_split=0.0)
    assert len(load_datasets(args, cache_dir=str(tmp_path / "cache"))["train"]) == 1


def _tiny_image_dataset(n: int = 4, **extra_columns) -> datasets.Dataset:
    images = [Image.new("RGB", (8, 6), color=(i, i, i)) for i in range(n)]
    features = {name: datasets.Value("int64") for name in extra_columns}
    return datasets.Dataset.from_dict(
        {"img": images, **extra_columns}, features=datasets.Features({"img": datasets.Image(), **features})
    )


def test_load_datasets_hub_renames_columns(monkeypatch):
    """A Hub dataset (stubbed) with "img"/"labels" columns and no validation split."""
    hub = datasets.DatasetDict(
        {"train": _tiny_image_dataset(10, labels=list(range(10))), "test": _tiny_image_dataset(2, labels=[0, 1])}
    )
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: calls.append(args) or hub)
    dsd = load_datasets(DataArguments(dataset_name="org/cifar-like", dataset_config_name="plain", train_val_split=0.2))
    assert calls == [("org/cifar-like", "plain")]
    assert set(dsd) == {"train", "validation"}  # "test" is not used as validation
    assert (len(dsd["train"]), len(dsd["validation"])) == (8, 2)
    assert dsd["train"].column_names == ["image", "label"]


def test_load_datasets_hub_explicit_missing_column(monkeypatch):
    hub = datasets.DatasetDict({"train": _tiny_image_dataset(4), "validation": _tiny_image_dataset(2)})
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: hub)
    with pytest.raises(ValueError, match=r"'pixels' is not a column.*\['img'\]"):
        load_datasets(DataArguments(dataset_name="org/x", image_column_name="pixels"))


def test_load_datasets_offline_unknown_dataset_is_one_actionable_line(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 with a dataset that is in no cache: one line naming it and the local alternatives."""
    # The env var is parsed once, at import, into these two constants; datasets and huggingface_hub read the
    # constants at call time, so patching them switches offline mode on for this test without a fresh interpreter.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConnectionError) as excinfo:
        load_datasets(DataArguments(dataset_name="no-such-org/no-such-dataset"), cache_dir=str(tmp_path))
    message = str(excinfo.value)
    assert "\n" not in message
    assert "no-such-org/no-such-dataset" in message and "HF_HUB_OFFLINE=1" in message
    assert "--train_dir" in message and "Fashion-MNIST" in message


# ---------------------------------------------------------------------------------------------------------------
# Column resolution
# ---------------------------------------------------------------------------------------------------------------


def test_resolve_image_column_by_name_and_feature():
    assert resolve_image_column(_tiny_image_dataset(1)) == "img"
    renamed = _tiny_image_dataset(1).rename_column("img", "picture")
    assert resolve_image_column(renamed) == "picture"  # the only Image column
    assert resolve_image_column(renamed, "picture") == "picture"


def test_resolve_image_column_errors_list_columns():
    no_images = datasets.Dataset.from_dict({"path": ["a.png"], "caption": ["x"]})
    with pytest.raises(ValueError, match=r"--image_column_name.*\['path', 'caption'\]"):
        resolve_image_column(no_images)
    two = datasets.Dataset.from_dict(
        {"a": [Image.new("L", (2, 2))], "b": [Image.new("L", (2, 2))]},
        features=datasets.Features({"a": datasets.Image(), "b": datasets.Image()}),
    )
    with pytest.raises(ValueError, match="found 2 Image columns"):
        resolve_image_column(two)
    with pytest.raises(ValueError, match=r"'photo' is not a column.*\['img'\]"):
        resolve_image_column(_tiny_image_dataset(1), "photo")


def test_resolve_label_column():
    assert resolve_label_column(_tiny_image_dataset(1, labels=[3])) == "labels"
    assert resolve_label_column(_tiny_image_dataset(1, label=[3], labels=[3])) == "label"
    assert resolve_label_column(_tiny_image_dataset(1)) is None
    with pytest.raises(ValueError, match="'fine_label' is not a column"):
        resolve_label_column(_tiny_image_dataset(1), "fine_label")


# ---------------------------------------------------------------------------------------------------------------
# Transforms and collation
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
@pytest.mark.parametrize("build", [build_pil_pretraining_transform, build_eval_transform])
def test_transforms_give_3_channel_float_tensors(mode, build):
    image = Image.new(mode, (28, 40), color=128 if mode == "L" else (128,) * len(mode))
    out = build(32, MEAN, STD)(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
def test_pretraining_transform_gives_3_channel_uint8_tensors_from_pil_images_too(mode):
    image = Image.new(mode, (28, 40), color=128 if mode == "L" else (128,) * len(mode))
    out = build_pretraining_transform(32)(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8


def _photo_like(width: int, height: int, seed: int) -> np.ndarray:
    """uint8 [height, width, 3]: a smooth random colour field with a little noise (compresses like a photograph),
    and no symmetry, so a crop box or flip that differs shows in the pixels."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(height // 16 + 2, width // 16 + 2, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
    return np.clip(smooth + rng.integers(-8, 9, size=smooth.shape), 0, 255).astype(np.uint8)


def _jpeg(image: Image.Image, **save_kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, **save_kwargs)
    return buffer.getvalue()


def _exif_rotated(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation  # EXIF Orientation
    return _jpeg(Image.fromarray(_photo_like(60, 40, seed=orientation)), exif=exif)


# One image of each kind the JPEG fast path handles (or hands to PIL): colour, grayscale, EXIF-rotated, CMYK.
DECODE_CASES = {
    "rgb.jpg": lambda: _jpeg(Image.fromarray(_photo_like(75, 50, seed=0))),
    "gray.jpg": lambda: _jpeg(Image.fromarray(_photo_like(75, 50, seed=1)).convert("L")),
    "cmyk.jpg": lambda: _jpeg(Image.fromarray(_photo_like(75, 50, seed=2)).convert("CMYK")),
    **{f"exif{orientation}.jpg": (lambda o=orientation: _exif_rotated(o)) for orientation in (3, 6, 8)},
    "rgb.png": lambda: _png(Image.fromarray(_photo_like(30, 20, seed=3))),
}


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("name", sorted(DECODE_CASES))
def test_tensor_decoding_gives_the_pixels_of_pil_decoding(name, tmp_path, monkeypatch):
    """libjpeg-turbo decodes JPEGs for both, with the same (default) settings: exact here; one level of 255 is
    allowed for a torchvision and a Pillow built with different libjpeg-turbo versions (their SIMD colour
    conversion may round differently). Shape [3, H, W] uint8 after the EXIF rotation, as `decode_image`."""
    (tmp_path / name).write_bytes(DECODE_CASES[name]())
    through_pil = []
    monkeypatch.setattr(data_mod, "decode_image", lambda value, on_error=None: through_pil.append(value) or None)
    for value in ({"bytes": DECODE_CASES[name](), "path": name}, {"bytes": None, "path": str(tmp_path / name)}):
        got = decode_image_tensor(value)
        if name in ("cmyk.jpg", "rgb.png"):  # PIL's colour conversion / another format: handed to decode_image
            assert got is None and through_pil[-1] is value
            got = pil_to_tensor(data_mod.to_rgb(Image.open(io.BytesIO(DECODE_CASES[name]()))))
        expected = pil_to_tensor(decode_image(value))
        assert got.dtype == torch.uint8 and got.shape == expected.shape, name
        assert (got.int() - expected.int()).abs().max() <= 1, name
    assert len(through_pil) == (2 if name in ("cmyk.jpg", "rgb.png") else 0)


def test_uint8_pipeline_crops_and_flips_as_the_pil_pipeline_and_agrees_within_two_levels(monkeypatch):
    """Same random state → the same crop boxes, flips and random-number consumption (so a loader worker's stream,
    and an exact resume, are unchanged), and pixels within 2 levels of 255 once both are normalised: torch's
    antialiased bicubic (float) and PIL's (fixed point) differ by rounding, ~0.06 levels on average."""
    boxes = []
    get_params = T.RandomResizedCrop.get_params

    def recorded(*args, **kwargs):
        boxes.append(get_params(*args, **kwargs))
        return boxes[-1]

    monkeypatch.setattr(T.RandomResizedCrop, "get_params", staticmethod(recorded))
    collator = PixelCollator(image_mean=MEAN, image_std=STD)
    pil_transform, uint8_transform = build_pil_pretraining_transform(64, MEAN, STD), build_pretraining_transform(64)
    level = 1 / 255 / min(STD)  # one 8-bit level after normalisation
    mean_differences = []
    for seed in range(24):
        value = {"bytes": _jpeg(Image.fromarray(_photo_like(150, 100, seed))), "path": f"{seed}.jpg"}
        torch.manual_seed(seed)
        reference = pil_transform(decode_image(value))
        after_reference = torch.rand(1)
        torch.manual_seed(seed)
        pixels = uint8_transform(decode_image_tensor(value))
        after = torch.rand(1)
        assert boxes[-1] == boxes[-2] and torch.equal(after, after_reference), seed
        assert pixels.dtype == torch.uint8 and pixels.shape == (3, 64, 64)
        got = collator.on_device({"pixel_values": pixels[None]})["pixel_values"][0]
        assert got.dtype == reference.dtype and got.shape == reference.shape
        assert (got - reference).abs().max() <= 2.01 * level, seed
        mean_differences.append((got - reference).abs().mean() / level)
    assert sum(mean_differences) / len(mean_differences) < 0.2
    assert len(set(boxes)) > 12  # the draws differ from seed to seed: the comparison is not of one fixed box


def test_collator_normalises_uint8_views_as_to_tensor_and_normalize_do():
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, size=(8, 6, 3), dtype=np.uint8)) for _ in range(3)]
    reference = torch.stack([T.Normalize(MEAN, STD)(T.ToTensor()(image)) for image in images])
    collator = PixelCollator(image_mean=MEAN, image_std=STD)
    batch = collator([{"pixel_values": pil_to_tensor(image)} for image in images])
    assert batch["pixel_values"].dtype == torch.uint8  # stays 8-bit until the device
    normalised = collator.on_device(batch)
    torch.testing.assert_close(normalised["pixel_values"], reference, atol=0, rtol=0)  # the same operations
    torch.testing.assert_close(collator.on_device(normalised)["pixel_values"], reference, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"views \['pixel_values'\] are 8-bit images.*image_mean and image_std"):
        PixelCollator()([{"pixel_values": pil_to_tensor(images[0])}])
    with pytest.raises(ValueError, match="both image_mean and image_std"):
        PixelCollator(image_mean=MEAN)


def test_eval_transform_is_deterministic_and_checks_crop_pct():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, size=(28, 28), dtype=np.uint8))
    transform = build_eval_transform(16, MEAN, STD, crop_pct=1.0)
    torch.testing.assert_close(transform(image), transform(image))
    with pytest.raises(ValueError, match="crop_pct must be in \\(0, 1\\], got 0"):
        build_eval_transform(16, MEAN, STD, crop_pct=0)


def test_apply_transform_keeps_label(tmp_path):
    write_fake_fashion_mnist(tmp_path)
    dsd = load_datasets(DataArguments(fashion_mnist_dir=str(tmp_path)))
    apply_transform(dsd, build_pretraining_transform(16))
    example = dsd["validation"][1]
    assert set(example) == {"pixel_values", "label"}
    assert example["pixel_values"].shape == (3, 16, 16) and example["label"] == 1

    # Picklable, so DataLoader workers started with "spawn" can receive it.
    restored = pickle.loads(pickle.dumps(dsd["validation"]))
    assert restored[1]["pixel_values"].shape == (3, 16, 16)

    unlabelled = apply_transform(
        _tiny_image_dataset(3).rename_column("img", "image"), build_eval_transform(8, MEAN, STD)
    )
    assert set(unlabelled[0]) == {"pixel_values"}


def test_apply_transform_needs_image_column():
    with pytest.raises(ValueError, match=r"'image' column.*\['img'\]"):
        apply_transform(_tiny_image_dataset(1), build_eval_transform(8, MEAN, STD))


def test_collators():
    examples = [{"pixel_values": torch.randn(3, 16, 16), "label": i} for i in range(5)]
    batch = collate_pixel_values(examples)
    assert set(batch) == {"pixel_values"} and batch["pixel_values"].shape == (5, 3, 16, 16)

    batch = PixelCollator(include_labels=True)(examples)
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="without a 'label'"):
        PixelCollator(include_labels=True)([{"pixel_values": torch.zeros(3, 4, 4)}])
    # a label stored as a tensor (a dataset in torch format) is a label, not a view for the model
    tensor_labels = [{"pixel_values": torch.randn(3, 16, 16), "label": torch.tensor(i)} for i in range(5)]
    assert set(collate_pixel_values(tensor_labels)) == {"pixel_values"}
    assert set(PixelCollator(include_labels=True)(tensor_labels)) == {"pixel_values", "labels"}


def test_collator_with_dataloader(tmp_path):
    write_fake_fashion_mnist(tmp_path)
    train = apply_transform(load_fashion_mnist("train", tmp_path), build_pretraining_transform(16))
    collator = PixelCollator(include_labels=True, image_mean=MEAN, image_std=STD)
    loader = torch.utils.data.DataLoader(train, batch_size=4, collate_fn=collator)
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (4, 3, 16, 16) and batch["labels"].shape == (4,)
    assert collator.on_device(batch)["pixel_values"].dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------------
# DataArguments
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"train_val_split": 1.0}, "train_val_split must be in \\[0, 1\\), got 1.0"),
        ({"train_val_split": -0.1}, "got -0.1"),
        ({"max_train_samples": 0}, "max_train_samples must be a positive integer, got 0"),
        ({"max_eval_samples": -3}, "max_eval_samples must be a positive integer, got -3"),
        ({"dataset_name": "a/b", "train_dir": "imgs"}, "not both"),
        ({"validation_dir": "val"}, "needs train_dir"),
    ],
)
def test_data_arguments_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DataArguments(**kwargs)


def test_data_arguments_parse_from_command_line():
    (args,) = HfArgumentParser(DataArguments).parse_args_into_dataclasses(
        ["--dataset_name", "org/ds", "--max_train_samples", "5", "--train_val_split", "0.1"]
    )
    assert (args.dataset_name, args.max_train_samples, args.train_val_split) == ("org/ds", 5, 0.1)
    assert args.image_column_name is None and args.fashion_mnist_dir == data_mod.DEFAULT_FASHION_MNIST_DIR


@pytest.mark.parametrize("num_examples", [0, 1, 5, 8, 9])
@pytest.mark.parametrize("num_processes", [1, 2, 3])
def test_shards_cover_the_data_once_in_order(num_examples, num_processes):
    shards = [
        list(process_share(num_examples, SimpleNamespace(num_processes=num_processes, process_index=rank)))
        for rank in range(num_processes)
    ]
    assert [index for shard in shards for index in shard] == list(range(num_examples))
