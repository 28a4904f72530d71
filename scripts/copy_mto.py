"""Write each model folder's copy of `hf_mto/mto.py`; with `--check`, only say which copies are stale (exit 1).

`hf_mto/mto.py` is the one place the MTO math and the MTO config fields are written. A model folder whose files
import it (`from .mto import ...`) holds a generated copy because `save_pretrained` bundles a model's single-dot
imports from its own folder beside the checkpoint: that is what lets `trust_remote_code` load the checkpoint where
hf_mto is not installed. (transformers' own modular model files are generated and checked the same way.) Run it after
editing `hf_mto/mto.py`; the test suite and the pre-commit hook run `--check`.

    python scripts/copy_mto.py            # write the copies
    python scripts/copy_mto.py --check    # exit 1 naming the stale ones
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "hf_mto" / "mto.py"
HEADER = (
    "# Generated from hf_mto/mto.py by `python scripts/copy_mto.py`: edit that file, then run the script. This copy is\n"
    "# what `save_pretrained` bundles beside a checkpoint as remote code (see the script's docstring).\n"
)
_IMPORTS_MTO = re.compile(r"^\s*from\s+\.mto\s+import", flags=re.MULTILINE)


def model_folders() -> list[Path]:
    """The folders under hf_mto/models with a file that imports `.mto`."""
    return sorted(
        {path.parent for path in (ROOT / "hf_mto" / "models").glob("*/*.py") if _IMPORTS_MTO.search(path.read_text())}
    )


def expected_copy() -> str:
    return HEADER + SOURCE.read_text()


def stale_copies() -> list[Path]:
    expected = expected_copy()
    return [
        folder / "mto.py"
        for folder in model_folders()
        if (folder / "mto.py").is_symlink()
        or not (folder / "mto.py").exists()
        or (folder / "mto.py").read_text() != expected
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 naming the stale copies")
    args = parser.parse_args(argv)
    stale = stale_copies()
    if args.check:
        for path in stale:
            print(f"{path.relative_to(ROOT)} is not the current copy of hf_mto/mto.py: run python scripts/copy_mto.py")
        return 1 if stale else 0
    for path in stale:
        path.unlink(missing_ok=True)  # a symlink is replaced by a file, not written through
        path.write_text(expected_copy())
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
