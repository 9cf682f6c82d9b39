"""A digest of the unspur code installed now, so a finished run can say whether the code
that trained it is the code that would train it today.

Runs are found again by their config's fingerprint, and a change of code does not move a
config: a benchmark table could hold runs of an older, different program while its
header named the commit that tabulated them (it happened: `smoke/` and several tables did
not regenerate). The bench therefore names each run folder after this digest too, so a
code change trains its runs again in new folders (the old ones are kept).

What counts (our choice): every Python module of the package with its docstrings and
comments left out (they change no number), and every other file shipped inside it
(weights, configs) byte for byte. Anything else in the code counts, even a change that
changes no number (an error message, a refactoring): retraining too often costs CPU,
retraining too rarely gives a table nobody can regenerate. The digest depends on the
Python version's ``ast`` too, a version that our lock pins.
"""

from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent

#: How many hex digits of the digest name a code version (folder names, tables).
SHORT = 10


def _is_string_statement(statement: ast.stmt) -> bool:
    return (
        isinstance(statement, ast.Expr)
        and isinstance(statement.value, ast.Constant)
        and isinstance(statement.value.value, str)
    )


def _without_docstrings(tree: ast.AST) -> ast.AST:
    """``tree`` without the statements that are only a string (docstrings, attribute
    notes): they cannot change what the code does (a body left empty gets ``pass``)."""
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and any(map(_is_string_statement, body)):
            kept = [s for s in body if not _is_string_statement(s)]
            node.body = kept or [ast.Pass()]  # type: ignore[attr-defined]
    return tree


def file_digest(path: Path) -> bytes:
    """What of one file counts: a module's syntax tree without docstrings (comments are
    not in it), any other file's bytes."""
    data = path.read_bytes()
    if path.suffix != ".py":
        return hashlib.sha256(data).digest()
    tree = _without_docstrings(ast.parse(data, filename=str(path)))
    return hashlib.sha256(ast.dump(tree, include_attributes=False).encode()).digest()


def package_digest(root: Path) -> str:
    """The digest of every file below ``root`` (sorted by relative path; caches and
    compiled files left out), ``SHORT`` hex digits."""
    total = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root).as_posix()
        if "__pycache__" in path.parts or path.suffix in {".pyc", ".pyo"}:
            continue
        total.update(relative.encode() + b"\0" + file_digest(path))
    return total.hexdigest()[:SHORT]


@lru_cache(maxsize=1)
def code_version() -> str:
    """The digest of the installed unspur package (computed once per process)."""
    return package_digest(PACKAGE)
