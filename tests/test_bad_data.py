"""Bad and unusual images through the whole data pipeline: load_datasets → apply_transform → PixelCollator.

An image folder holding a corrupt file, truncated files, grayscale, RGBA, 16-bit and tiny images must give correct
tensors for everything convertible and skip (with a warning naming the file) everything unreadable; the pre-training
recipe must run on such a folder without hanging.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from hf_mto import data as data_mod
from hf_mto.data import (
    DataArguments,
    PixelCollator,
    apply_transform,
    build_eval_transform,
    build_pil_pretraining_transform,
    build_pretraining_transform,
    decode_image,
    decode_image_tensor,
    load_datasets,
    skipped_images,
    to_rgb,
)

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
SIZE = 32

# Expected 8-bit RGB value of every constant-colour image in the folder.
GRAY_VALUE = 100
RGBA_VALUE = (10, 200, 30, 128)
SMALL_VALUE = (30, 60, 90)


def _composite_on_white(rgba):
    *rgb, alpha = rgba
    return tuple(c * alpha / 255 + 255 * (1 - alpha / 255) for c in rgb)


CONSTANT_IMAGES = {
    "gray.png": (GRAY_VALUE,) * 3,
    "rgba.png": _composite_on_white(RGBA_VALUE),
    "white16.png": (255,) * 3,  # 16-bit 65535
    "mid16.png": (128,) * 3,  # 16-bit 32768 → 32768 * 255 / 65535 = 127.5 → 128
    "black16.png": (0,) * 3,
    "small.png": SMALL_VALUE,  # 8x8, smaller than the 32 px crop
}
UNREADABLE = ["corrupt.png", "corrupt.jpg", "truncated.jpg", "truncated.png", "empty.jpg"]


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def write_bad_folder(root: Path, n_good_rgb: int = 2) -> Path:
    """One folder (no class subfolders) with every kind of awkward image; returns it."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(n_good_rgb):
        Image.fromarray(rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)).save(root / f"rgb{i}.jpg")
    Image.new("L", (40, 40), GRAY_VALUE).save(root / "gray.png")
    Image.new("RGBA", (40, 40), RGBA_VALUE).save(root / "rgba.png")
    for name, value in (("white16.png", 65535), ("mid16.png", 32768), ("black16.png", 0)):
        Image.fromarray(np.full((40, 40), value, dtype=np.uint16)).save(root / name)
    Image.new("RGB", (8, 8), SMALL_VALUE).save(root / "small.png")
    (root / "corrupt.png").write_bytes(rng.bytes(600))
    (root / "corrupt.jpg").write_bytes(rng.bytes(600))
    (root / "empty.jpg").write_bytes(b"")
    noise = Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8))
    for fmt, name in (("JPEG", "truncated.jpg"), ("PNG", "truncated.png")):
        payload = _encoded(noise, fmt)
        (root / name).write_bytes(payload[: len(payload) // 2])
    return root


def _normalised(rgb) -> torch.Tensor:
    """[3] tensor of what ToTensor + Normalize make of an 8-bit colour."""
    return (torch.tensor(rgb, dtype=torch.float32) / 255 - torch.tensor(MEAN)) / torch.tensor(STD)


def _names(dataset: datasets.Dataset) -> list[str]:
    return [Path(v["path"]).name for v in dataset.cast_column("image", datasets.Image(decode=False))["image"]]


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory) -> Path:
    return write_bad_folder(tmp_path_factory.mktemp("bad") / "images")


def _load(folder: Path, tmp_path: Path, **kwargs) -> datasets.Dataset:
    args = DataArguments(train_dir=str(folder), train_val_split=0.0, **kwargs)
    return load_datasets(args, cache_dir=str(tmp_path / "cache"))["train"]


def _uint8_pretraining_transform(size, mean, std):
    return build_pretraining_transform(size)  # its 8-bit views are normalised by the collator (below)


@pytest.mark.parametrize(
    "build", [_uint8_pretraining_transform, build_pil_pretraining_transform, build_eval_transform]
)
def test_pipeline_converts_the_convertible_and_skips_the_unreadable(bad_folder, tmp_path, caplog, build):
    raw = _load(bad_folder, tmp_path)
    names = _names(raw)
    assert sorted(names) == sorted(["rgb0.jpg", "rgb1.jpg", *CONSTANT_IMAGES, *UNREADABLE])

    caplog.set_level(logging.WARNING, logger="hf_mto.data")
    dataset = apply_transform(raw, build(SIZE, MEAN, STD))
    collator = PixelCollator(image_mean=MEAN, image_std=STD)
    # the uint8 pipeline's views, normalised as the trainer has the collator do per batch (floats pass unchanged)
    examples = [
        {"pixel_values": None if x is None else collator.on_device({"pixel_values": x[None]})["pixel_values"][0]}
        for x in (dataset[i]["pixel_values"] for i in range(len(dataset)))
    ]
    by_name = dict(zip(names, examples, strict=True))

    for name in UNREADABLE:
        assert by_name[name]["pixel_values"] is None, name
        # Named in a warning (once per process: the first parametrisation logs it) and in the process's record.
        assert str(bad_folder / name) in skipped_images()
    for name, rgb in CONSTANT_IMAGES.items():
        pixels = by_name[name]["pixel_values"]
        assert pixels.shape == (3, SIZE, SIZE) and pixels.dtype == torch.float32, name
        # A constant image stays constant through crops and (bicubic) resizing; allow one 8-bit step.
        expected = _normalised(rgb)[:, None, None].expand(3, SIZE, SIZE)
        torch.testing.assert_close(pixels, expected, atol=1.01 / 255 / min(STD), rtol=0, msg=name)
    # Grayscale and 16-bit give three equal channels (before normalisation).
    for name in ("gray.png", "mid16.png", "white16.png"):
        unnormalised = (
            by_name[name]["pixel_values"] * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]
        )
        torch.testing.assert_close(unnormalised[0], unnormalised[1], atol=1e-5, rtol=0)
        torch.testing.assert_close(unnormalised[0], unnormalised[2], atol=1e-5, rtol=0)
    assert by_name["mid16.png"]["pixel_values"][0].mean() < _normalised((200, 200, 200))[0]  # grey, not white

    # The collator over the whole dataset: exactly the readable images, in order, nothing else.
    batch = collator(examples)
    good = [example["pixel_values"] for example in examples if example["pixel_values"] is not None]
    assert batch["pixel_values"].shape == (len(names) - len(UNREADABLE), 3, SIZE, SIZE)
    assert torch.isfinite(batch["pixel_values"]).all()
    if build is build_eval_transform:  # deterministic, so the batch can be compared with the single reads
        torch.testing.assert_close(batch["pixel_values"], torch.stack(good))


def test_each_unreadable_file_is_named_in_a_warning(tmp_path, caplog):
    folder = write_bad_folder(tmp_path / "fresh")  # new paths: not yet in this process's record
    caplog.set_level(logging.WARNING, logger="hf_mto.data")
    before = len(skipped_images())  # a process-wide record: earlier tests may have added to it
    dataset = apply_transform(_load(folder, tmp_path), build_eval_transform(SIZE, MEAN, STD))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=PixelCollator())
    total = sum(len(batch["pixel_values"]) for batch in loader)
    assert total == len(dataset) - len(UNREADABLE)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for name in UNREADABLE:
        assert sum(str(folder / name) in message for message in warnings) == 1, name  # once, not once per read
    assert f"; {before + 5} unreadable image(s) skipped so far by this process" in warnings[-1]
    # A second epoch reports nothing new and gives the same batches.
    caplog.clear()
    assert sum(len(batch["pixel_values"]) for batch in loader) == total
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


@pytest.mark.parametrize("decode", [decode_image, decode_image_tensor])
def test_truncated_file_is_not_silently_grey_filled(decode):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # nothing we import switches it on globally
    payload = _encoded(Image.new("RGB", (64, 64), (200, 10, 10)), "JPEG")
    assert decode({"bytes": payload[: len(payload) // 2], "path": f"half-{decode.__name__}.jpg"}) is None
    assert f"half-{decode.__name__}.jpg" in skipped_images()
    whole = decode({"bytes": payload, "path": "whole.jpg"})
    assert (whole.size if decode is decode_image else tuple(whole.shape)) in ((64, 64), (3, 64, 64))


def test_load_truncated_images_switched_on_is_warned_about(bad_folder, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    caplog.set_level(logging.WARNING, logger="hf_mto.data")
    apply_transform(_load(bad_folder, tmp_path), build_eval_transform(SIZE, MEAN, STD))
    assert any("LOAD_TRUNCATED_IMAGES is True" in r.getMessage() for r in caplog.records)


def test_all_unreadable_batch_is_an_error_not_an_empty_batch(bad_folder, tmp_path):
    raw = _load(bad_folder, tmp_path)
    names = _names(raw)
    dataset = apply_transform(raw, build_eval_transform(SIZE, MEAN, STD))
    bad = [dataset[names.index(name)] for name in UNREADABLE]
    with pytest.raises(ValueError, match="All 5 images of this batch are unreadable.*--verify_images"):
        PixelCollator()(bad)
    labelled = [{"pixel_values": None, "label": 0}, {"pixel_values": torch.zeros(3, 4, 4), "label": 3}]
    batch = PixelCollator(include_labels=True)(labelled)
    assert batch["labels"].tolist() == [3] and batch["pixel_values"].shape == (1, 3, 4, 4)


def test_verify_images_drops_and_lists_unreadable_files_at_load_time(tmp_path, caplog):
    folder = write_bad_folder(tmp_path / "images")
    caplog.set_level(logging.WARNING, logger="hf_mto.data")
    dataset = _load(folder, tmp_path, verify_images=True)
    assert sorted(_names(dataset)) == sorted(["rgb0.jpg", "rgb1.jpg", *CONSTANT_IMAGES])
    assert isinstance(dataset[0]["image"], Image.Image)  # reads decoded again, like an unverified split
    summary = [r.getMessage() for r in caplog.records if "verify_images: dropped" in r.getMessage()]
    assert len(summary) == 1 and "dropped 5 unreadable image(s) of 13 from the train split" in summary[0]
    assert all(str(folder / name) in summary[0] for name in UNREADABLE)
    # Every remaining image now reads without a warning.
    caplog.clear()
    transformed = apply_transform(dataset, build_eval_transform(SIZE, MEAN, STD))
    assert PixelCollator()([transformed[i] for i in range(len(transformed))])["pixel_values"].shape[0] == 8
    assert not caplog.records


def test_in_memory_unreadable_images_are_described():
    """Hub datasets store bytes (usually with the original file name); a corrupt one is named by what is known."""
    garbage = b"\x00not an image at all"
    dataset = datasets.Dataset.from_dict(
        {"image": [{"bytes": garbage, "path": "train/0042.jpg"}, {"bytes": garbage, "path": None}]},
        features=datasets.Features({"image": datasets.Image()}),
    )
    transformed = apply_transform(dataset, build_eval_transform(8, MEAN, STD))
    assert transformed[0]["pixel_values"] is None and transformed[1]["pixel_values"] is None
    assert "train/0042.jpg" in skipped_images()
    assert f"<in-memory image of {len(garbage)} bytes>" in skipped_images()


# ---------------------------------------------------------------------------------------------------------------
# to_rgb
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (Image.new("L", (2, 2), 77), (77, 77, 77)),
        (Image.new("1", (2, 2), 1), (255, 255, 255)),
        (Image.new("I;16", (2, 2), 65535), (255, 255, 255)),
        (Image.new("I;16", (2, 2), 257), (1, 1, 1)),
        (Image.new("I;16B", (2, 2), 32768), (128, 128, 128)),
        (Image.new("I", (2, 2), 32768), (128, 128, 128)),  # how some Pillow versions open 16-bit PNGs
        (Image.new("I", (2, 2), -5), (0, 0, 0)),
        (Image.new("RGBA", (2, 2), (10, 20, 30, 255)), (10, 20, 30)),  # opaque: unchanged
        (Image.new("RGBA", (2, 2), (10, 20, 30, 0)), (255, 255, 255)),  # transparent: the white background
        (Image.new("LA", (2, 2), (0, 0)), (255, 255, 255)),
        (Image.new("CMYK", (2, 2), (0, 0, 0, 0)), (255, 255, 255)),
    ],
    ids=lambda v: v.mode if isinstance(v, Image.Image) else None,
)
def test_to_rgb(image, expected):
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == image.size
    assert rgb.getpixel((0, 0)) == expected


def test_to_rgb_palette_with_transparent_colour():
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 0  # palette index 0 (black) is transparent
    rgb = to_rgb(image)
    assert rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((1, 0)) == (255, 0, 0)


def test_16_bit_png_round_trip_keeps_its_greys():
    gradient = np.linspace(0, 65535, 256).astype(np.uint16).reshape(16, 16)
    buffer = io.BytesIO()
    Image.fromarray(gradient).save(buffer, "PNG")
    decoded = decode_image({"bytes": buffer.getvalue(), "path": "gradient.png"})
    values = np.asarray(decoded)[..., 0].ravel()
    np.testing.assert_array_equal(values, np.rint(gradient.ravel() / 257.0).astype(np.uint8))
    assert len(np.unique(values)) > 200  # not clipped to a handful of near-white values


# ---------------------------------------------------------------------------------------------------------------
# Datasets without images, unknown datasets offline
# ---------------------------------------------------------------------------------------------------------------


def test_dataset_without_image_column_is_one_actionable_line(monkeypatch):
    no_images = datasets.Dataset.from_dict({"path": ["a.png", "b.png"], "caption": ["x", "y"]})
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.DatasetDict({"train": no_images}))
    with pytest.raises(ValueError) as excinfo:
        load_datasets(DataArguments(dataset_name="org/captions", train_val_split=0.5))
    message = str(excinfo.value)
    assert "\n" not in message
    assert "--image_column_name" in message and "['path', 'caption']" in message


def test_offline_unknown_dataset_prints_a_short_error(tmp_path):
    """In a real process with HF_HUB_OFFLINE=1: the error names the dataset, and datasets' own traceback is not
    chained onto ours."""
    script = (
        "from hf_mto.data import DataArguments, load_datasets\n"
        f"load_datasets(DataArguments(dataset_name='foo/bar'), cache_dir={str(tmp_path / 'cache')!r})\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ConnectionError: Cannot load dataset 'foo/bar'") and "HF_HUB_OFFLINE=1" in last
    assert "direct cause" not in result.stderr and "datasets/load.py" not in result.stderr


# ---------------------------------------------------------------------------------------------------------------
# The recipe end to end
# ---------------------------------------------------------------------------------------------------------------


def test_pretrain_recipe_on_a_folder_with_bad_images(tmp_path):
    folder = write_bad_folder(tmp_path / "images", n_good_rgb=24)
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        str(ROOT / "recipes" / "pretrain.py"),
        "--config",
        str(ROOT / "recipes" / "configs" / "tiny_cpu_mae_mto.yaml"),
        "--train_dir",
        str(folder),
        "--config_overrides",
        "image_size=32,patch_size=4,hidden_size=32,num_hidden_layers=2,num_attention_heads=4,intermediate_size=64,"
        "decoder_hidden_size=32,decoder_num_hidden_layers=2,decoder_num_attention_heads=4,decoder_intermediate_size=64",
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "8",
        "--per_device_eval_batch_size",
        "8",
        "--eval_strategy",
        "no",
        "--save_strategy",
        "no",
        "--logging_steps",
        "1",
        "--dataloader_num_workers",
        "0",
        "--report_to",
        "none",
        "--output_dir",
        str(out),
    ]
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert (out / "model.safetensors").is_file() and (out / "eval_results.json").is_file()
    # Every unreadable file that was read got a warning naming it; none was fed to the model.
    named = [name for name in UNREADABLE if str(folder / name) in log]
    assert named, log[-4000:]
    assert "Skipping unreadable image" in log


def test_module_docstring_documents_the_decisions():
    doc = data_mod.__doc__
    for phrase in ("16-bit", "composited onto white", "upscaled", "skipped", "LOAD_TRUNCATED_IMAGES", "verify_images"):
        assert phrase in doc, phrase


def test_verify_images_flag_parses():
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(DataArguments).parse_args_into_dataclasses(["--train_dir", "x", "--verify_images"])
    assert args.verify_images is True
    assert DataArguments().verify_images is False


@pytest.mark.slow
def test_verify_images_shares_the_decoding_between_two_processes(tmp_path):
    folder = write_bad_folder(tmp_path / "images")
    script = tmp_path / "verify.py"
    script.write_text(
        f"""
import json, torch
from accelerate import PartialState
from pathlib import Path
from hf_mto import data
from hf_mto.data import DataArguments, load_datasets

state = PartialState(cpu=True)
decoded = []
decode = data.decode_image
data.decode_image = lambda value, on_error=None: decoded.append(1) or decode(value, on_error)
args = DataArguments(train_dir={str(folder)!r}, train_val_split=0.0, verify_images=True)
dataset = load_datasets(args, cache_dir={str(tmp_path / "cache")!r})["train"]
paths = [Path(v["path"]).name for v in data._without_decoding(dataset)["image"]]
with open(f"rank{{state.process_index}}.json", "w") as f:
    json.dump({{"decoded": len(decoded), "names": paths}}, f)
state.wait_for_everyone()
torch.distributed.destroy_process_group()
"""
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300, env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    # both processes end with the same readable images, and each image was decoded by one process only
    assert ranks[0]["names"] == ranks[1]["names"]
    assert sorted(ranks[0]["names"]) == sorted(["rgb0.jpg", "rgb1.jpg", *CONSTANT_IMAGES])
    assert [rank["decoded"] for rank in ranks] == [7, 6]  # 13 images, shared 7 + 6
    assert result.stderr.count("dropped 5 unreadable image(s) of 13 from the train split") == 1
