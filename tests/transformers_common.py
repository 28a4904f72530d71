"""transformers' own generic model tests (`ModelTesterMixin`, `ConfigTester`), from the sdist of the installed version.

The wheel ships no tests, so `load_common_tests` downloads the pinned sdist once (`pip download`, PyPI only),
extracts `tests/test_modeling_common.py` and `tests/test_configuration_common.py` into a cache folder and imports them
as the package `transformers_common_tests`. A second run finds the cache and downloads nothing.

The sdist holds only the top-level files of upstream's `tests/`, not the three modules those two import from
sub-folders; stand-ins are put in `sys.modules` instead (see `_STAND_INS`).
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import transformers

PACKAGE = "transformers_common_tests"
FILES = ("test_modeling_common.py", "test_configuration_common.py")
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hf_mto"


class CommonTestsUnavailable(RuntimeError):
    """The sdist could not be downloaded or lacks the expected files (e.g. no network)."""


def _package_root(version: str) -> Path:
    return CACHE_DIR / f"transformers-{version}-tests"


def _download(version: str, root: Path) -> None:
    """Download the sdist of transformers `version` and extract `FILES` into ``root / PACKAGE``."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--quiet"]
        command += [f"transformers=={version}", "-d", tmp]
        try:
            subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
            output = getattr(error, "stderr", None) or ""
            raise CommonTestsUnavailable(f"`pip download transformers=={version}` failed: {output[-500:]}") from error
        archives = list(Path(tmp).glob("transformers-*.tar.gz"))
        if not archives:
            raise CommonTestsUnavailable(f"pip download left no sdist of transformers=={version}")
        staging = Path(tmp) / PACKAGE
        staging.mkdir()
        with tarfile.open(archives[0]) as archive:
            for name in FILES:
                try:
                    member = archive.extractfile(f"transformers-{version}/tests/{name}")
                except KeyError as error:
                    raise CommonTestsUnavailable(f"the transformers {version} sdist has no tests/{name}") from error
                (staging / name).write_bytes(member.read())
        # A package, so their relative imports resolve; `direct_transformers_import` also reads this file.
        (staging / "__init__.py").write_text("")
        root.mkdir(parents=True, exist_ok=True)
        # Moved in whole only once complete: an interrupted download leaves no half-filled cache. Another test
        # process may have filled it meanwhile; its copy is the same.
        if not (root / PACKAGE).exists():
            shutil.move(str(staging), str(root / PACKAGE))


class _ExportTesterMixin:
    """Stand-in for upstream's `tests/exporters/test_export.py` mixin (not in the sdist); export is tested by our
    own tests (tests/test_compile.py)."""


class _GenerationTesterMixin:
    """Stand-in for `tests/generation/test_utils.py` (not in the sdist); only used in an `issubclass` check, and
    neither our models nor upstream's ViTs generate."""


# Stand-in for `tests/utils/test_configuration_utils.config_common_kwargs` (not in the sdist): fields every
# `PreTrainedConfig` takes, each at a non-default value, for `ConfigTester.check_config_arguments_init`.
_CONFIG_COMMON_KWARGS = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["ViTModel"],
    "problem_type": "regression",
}

_STAND_INS = {
    "exporters.test_export": {"ExportTesterMixin": _ExportTesterMixin},
    "generation.test_utils": {"GenerationTesterMixin": _GenerationTesterMixin},
    "utils.test_configuration_utils": {"config_common_kwargs": _CONFIG_COMMON_KWARGS},
}


def _install_stand_ins() -> None:
    for dotted, attributes in _STAND_INS.items():
        parent = PACKAGE
        for part in dotted.split("."):
            name = f"{parent}.{part}"
            module = sys.modules.setdefault(name, types.ModuleType(name))
            parent = name
        module.__dict__.update(attributes)


def load_common_tests() -> tuple[types.ModuleType, types.ModuleType]:
    """``(test_modeling_common, test_configuration_common)`` of the installed transformers version.

    Raises:
        CommonTestsUnavailable: when the sdist cannot be had (e.g. no network on the first run).
    """
    version = transformers.__version__
    root = _package_root(version)
    if not all((root / PACKAGE / name).is_file() for name in FILES):
        _download(version, root)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    _install_stand_ins()
    return (
        importlib.import_module(f"{PACKAGE}.test_modeling_common"),
        importlib.import_module(f"{PACKAGE}.test_configuration_common"),
    )
