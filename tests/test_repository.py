"""Conventions of the repository itself that no other test sees."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_model_folder_holds_the_current_copy_of_mto():
    # The copy is what save_pretrained bundles as remote code: a stale one would ship old MTO math with checkpoints.
    result = subprocess.run(
        [sys.executable, "scripts/copy_mto.py", "--check"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_copy_check_names_a_stale_copy(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import copy_mto
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    folder = tmp_path / "hf_mto" / "models" / "some_method"
    folder.mkdir(parents=True)
    (tmp_path / "hf_mto" / "mto.py").write_text("VALUE = 2\n")
    (folder / "modeling_some_method.py").write_text("from .mto import VALUE\n")
    (folder / "mto.py").write_text(copy_mto.HEADER + "VALUE = 1\n")
    monkeypatch.setattr(copy_mto, "ROOT", tmp_path)
    monkeypatch.setattr(copy_mto, "SOURCE", tmp_path / "hf_mto" / "mto.py")
    assert copy_mto.main(["--check"]) == 1
    assert copy_mto.main([]) == 0
    assert (folder / "mto.py").read_text() == copy_mto.HEADER + "VALUE = 2\n"
    assert copy_mto.main(["--check"]) == 0
    # a missing copy, and a symlink (even to the right text: it is what the copies replace), are stale too
    (folder / "mto.py").unlink()
    assert copy_mto.main(["--check"]) == 1
    (folder / "mto.py").symlink_to(tmp_path / "hf_mto" / "mto.py")
    assert copy_mto.main(["--check"]) == 1
    assert copy_mto.main([]) == 0 and not (folder / "mto.py").is_symlink()
    assert (tmp_path / "hf_mto" / "mto.py").read_text() == "VALUE = 2\n"  # written as a new file, not through the link
