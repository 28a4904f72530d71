"""Loading by repo id ("user/repo") from the Hugging Face cache, offline, as after a download of a pushed checkpoint.

Each tiny model is saved, laid out in a temporary cache exactly as huggingface_hub stores a download
(`models--user--repo/blobs/<sha>`, `snapshots/<commit>/<file>` symlinks to the blobs, `refs/main` holding the commit),
then loaded in a fresh Python with `HF_HUB_OFFLINE=1` and `HF_HUB_CACHE` pointing there: (a) after `import hf_mto`,
(b) with `trust_remote_code=True` where hf_mto cannot be imported.
"""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import TINY_MAE, TINY_SIMMIM, run_without_hf_mto
from huggingface_hub import ModelCard

from hf_mto import SimMIMMTOConfig, SimMIMMTOForMaskedImageModeling, ViTMAEMTOConfig, ViTMAEMTOForPreTraining
from hf_mto.model_card import write_model_card

# repo id -> (Auto class, model class, config)
REPOS = {
    "user/tiny-mae-mto": ("AutoModelForPreTraining", ViTMAEMTOForPreTraining, ViTMAEMTOConfig(**TINY_MAE)),
    "user/tiny-simmim-mto": (
        "AutoModelForMaskedImageModeling",
        SimMIMMTOForMaskedImageModeling,
        SimMIMMTOConfig(**TINY_SIMMIM),
    ),
}


def put_in_hub_cache(folder: Path, cache: Path, repo_id: str) -> str:
    """Lay `folder` out in `cache` as huggingface_hub stores a downloaded model repo; returns the commit hash.

    Blobs are named by their etag, as the Hub reports it: the sha256 of LFS files (weights), the git blob sha1 of the
    others; snapshot files are relative symlinks to them.
    """
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(f"{repo_id} test commit".encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.suffix in (".safetensors", ".bin", ".pt"):
            etag = hashlib.sha256(data).hexdigest()
        else:
            etag = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        blob = repo / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return commit


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A Hub cache holding both tiny models (with their model cards); the saved weights are in `reference.pt`."""
    root = tmp_path_factory.mktemp("hub")
    cache = root / "hub-cache"
    reference = {}
    for repo_id, (_, model_class, config) in REPOS.items():
        torch.manual_seed(0)
        model = model_class(config)
        folder = root / "saved" / repo_id.split("/")[1]
        model.save_pretrained(folder)
        write_model_card(folder, model.config, repo_id=repo_id)
        put_in_hub_cache(folder, cache, repo_id)
        reference[repo_id] = {key: value.clone() for key, value in model.state_dict().items()}
    torch.save(reference, root / "reference.pt")
    return root, cache


def loading_script(root: Path, import_hf_mto: bool) -> str:
    """Load every repo by id and save its weights and class; a repo id missing from the cache must fail."""
    calls = {repo_id: auto for repo_id, (auto, _, _) in REPOS.items()}
    return textwrap.dedent(
        f"""
        import json, torch, transformers
        {"import hf_mto" if import_hf_mto else ""}
        calls = {calls!r}
        report, weights = {{}}, {{}}
        for repo_id, auto in calls.items():
            kwargs = {{}} if {import_hf_mto!r} else {{"trust_remote_code": True}}
            model = getattr(transformers, auto).from_pretrained(repo_id, **kwargs)
            report[repo_id] = type(model).__module__ + "." + type(model).__name__
            weights[repo_id] = model.state_dict()
        torch.save(weights, {str(root / ("loaded-a.pt" if import_hf_mto else "loaded-b.pt"))!r})
        try:
            transformers.AutoConfig.from_pretrained("user/not-in-cache")
            report["missing"] = "loaded"
        except OSError:
            report["missing"] = "OSError"
        print(json.dumps(report))
        """
    )


def offline_env(root: Path, cache: Path) -> dict:
    return {
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(cache),
        "HF_HOME": str(root / "hf-home"),  # no token, no other cache of the machine's
        "HF_MODULES_CACHE": str(root / "modules"),
    }


def check_weights(root: Path, loaded_file: str):
    reference = torch.load(root / "reference.pt")
    loaded = torch.load(root / loaded_file)
    for repo_id, expected in reference.items():
        assert sorted(loaded[repo_id]) == sorted(expected), repo_id
        differing = [key for key, value in expected.items() if not torch.equal(loaded[repo_id][key], value)]
        assert differing == [], (repo_id, differing)


def test_cache_layout_is_what_huggingface_hub_reads(hub_cache, monkeypatch):
    root, cache = hub_cache
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache

    info = scan_cache_dir(cache)
    assert {repo.repo_id for repo in info.repos} == set(REPOS)
    for repo_id in REPOS:
        path = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache)
        assert isinstance(path, str) and json.loads(Path(path).read_text())["auto_map"]
        card = ModelCard.load(try_to_load_from_cache(repo_id, "README.md", cache_dir=cache))
        assert "masked-image-modeling" in card.data.tags
        assert f'from_pretrained("{repo_id}")' in card.text


def test_load_by_repo_id_offline_after_import_hf_mto(hub_cache):
    root, cache = hub_cache
    result = subprocess.run(
        [sys.executable, "-c", loading_script(root, import_hf_mto=True)],
        capture_output=True,
        text=True,
        cwd=root,
        env={**os.environ, **offline_env(root, cache)},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for repo_id, (_, model_class, _) in REPOS.items():
        assert report[repo_id] == f"{model_class.__module__}.{model_class.__name__}"
    assert report["missing"] == "OSError"  # offline for real: only what the cache holds loads
    check_weights(root, "loaded-a.pt")


def test_load_by_repo_id_offline_with_remote_code_and_no_hf_mto(hub_cache, monkeypatch):
    root, cache = hub_cache
    for name, value in offline_env(root, cache).items():
        monkeypatch.setenv(name, value)
    report = json.loads(run_without_hf_mto(loading_script(root, import_hf_mto=False), root).strip().splitlines()[-1])
    for repo_id, (_, model_class, _) in REPOS.items():
        module, _, name = report[repo_id].rpartition(".")
        assert module.startswith("transformers_modules") and name == model_class.__name__
    assert report["missing"] == "OSError"
    check_weights(root, "loaded-b.pt")
