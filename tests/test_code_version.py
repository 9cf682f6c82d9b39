"""The code version: docstrings and comments do not count, any code or shipped file does."""

from __future__ import annotations

from pathlib import Path

from unspur.code_version import SHORT, code_version, package_digest


def _package(root: Path, module: str, data: bytes = b"weights") -> Path:
    (root / "sub").mkdir(parents=True, exist_ok=True)
    (root / "sub" / "m.py").write_text(module)
    (root / "sub" / "w.bin").write_bytes(data)
    return root


def test_docstrings_and_comments_change_no_version_code_and_files_do(tmp_path):
    plain = 'def f(x):\n    """Twice."""\n    return 2 * x\n'
    base = package_digest(_package(tmp_path / "a", plain))
    assert len(base) == SHORT
    reworded = (
        '"""A module."""\n\ndef f(x):  # a comment\n    """Double it."""\n\n    return 2 * x\n'
    )
    assert package_digest(_package(tmp_path / "b", reworded)) == base
    changed = 'def f(x):\n    """Twice."""\n    return 3 * x\n'
    assert package_digest(_package(tmp_path / "c", changed)) != base
    assert package_digest(_package(tmp_path / "d", plain, b"other weights")) != base
    moved = _package(tmp_path / "e", plain)
    (moved / "sub" / "m.py").rename(moved / "sub" / "n.py")
    assert package_digest(moved) != base
    # compiled files are not the code
    cache = _package(tmp_path / "f", plain) / "sub" / "__pycache__"
    cache.mkdir()
    (cache / "m.cpython.pyc").write_bytes(b"x")
    assert package_digest(tmp_path / "f") == base


def test_the_installed_package_has_one_version():
    assert code_version() == code_version() and len(code_version()) == SHORT
