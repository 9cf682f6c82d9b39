"""The environment under test is the locked one: every pin in constraints.txt is installed.

CI and the README's two commands install with ``-c constraints.txt``; a package whose installed
version differs from its pin means the lock was bypassed (or is stale) and the tests no longer
describe what a fresh machine gets. Refresh the lock with ``bash .ci/lock``.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

LOCK = Path(__file__).resolve().parents[1] / "constraints.txt"


def locked_pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", f"constraints.txt: {line!r} is not an exact pin"
        pins[req.name] = spec.version
    return pins


def test_lock_pins_every_dependency_exactly():
    pins = {re.sub(r"[-_.]+", "-", name).lower() for name in locked_pins()}
    for needed in ("torch", "transformers", "peft", "diffusers", "accelerate", "numpy"):
        assert needed in pins, f"constraints.txt does not pin {needed}"


def test_installed_versions_match_the_lock():
    mismatched = []
    for name, pinned in locked_pins().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # an extra this install did not ask for (e.g. no [dev])
        # torch's CPU wheel carries a local label (2.13.0+cpu); the pin omits it.
        if Version(installed).public != Version(pinned).public:
            mismatched.append(f"{name}: installed {installed}, locked {pinned}")
    assert not mismatched, (
        "install from the lock (pip install -c constraints.txt ...): " + "; ".join(mismatched)
    )


def test_locked_transformers_accepts_the_locked_peft():
    """transformers refuses a peft older than its MIN_PEFT_VERSION at LoRA load time (5.24 wants
    0.22, which PyPI lacked on 2026-12-06); catch an incompatible lock here, with a clear message."""
    peft_integration = __import__("transformers.integrations.peft", fromlist=["MIN_PEFT_VERSION"])
    needed = Version(peft_integration.MIN_PEFT_VERSION)
    installed = Version(metadata.version("peft"))
    assert installed >= needed, (
        f"transformers {metadata.version('transformers')} needs peft >= {needed}, the lock has "
        f"{installed}: lower the transformers bound in pyproject.toml and rerun bash .ci/lock"
    )
