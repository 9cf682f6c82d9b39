"""What a recipe's card records about the code and the cost that made its weights."""

from __future__ import annotations

import resource
import subprocess
from collections.abc import Sequence
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def git_commit(code: Sequence[str]) -> str:
    """HEAD's commit, with ``+local-changes`` when a tracked file under ``code`` (paths from
    the repository's top) differs from it; ``unknown`` outside a git checkout.

    Only the code the weights depend on counts: other people's untracked or unrelated files
    do not make the record dirty. Pathspecs are ``:(top)`` so they do not depend on the
    directory git runs in.
    """
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=_PACKAGE, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--"]
            + [f":(top){path}" for path in code],
            cwd=_PACKAGE,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("+local-changes" if dirty.stdout.strip() else "")


def cpu_seconds() -> float:
    """User + system CPU time of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
