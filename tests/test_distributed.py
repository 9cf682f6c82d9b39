"""Two CPU processes with the gloo backend train one model through accelerate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def launch(tmp_path: Path, *extra: str) -> list[dict]:
    """Run the worker in two gloo processes; return each rank's report."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent / "src")}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", "0", "--rdzv_backend", "c10d",
        "--rdzv_endpoint", "127.0.0.1:0",
        str(HERE / "distributed_worker.py"), str(tmp_path), *extra,
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_two_process_gloo_training_agrees(tmp_path):
    ranks = launch(tmp_path)
    assert all(r["world"] == 2 and r["backend"] == "gloo" for r in ranks)
    # DDP keeps the replicas identical, and both load the same selected checkpoint.
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], rel=1e-6)
    assert ranks[0]["best_epoch"] == ranks[1]["best_epoch"]
    assert (tmp_path / "best" / "model.safetensors").is_file()
    assert len(json.loads((tmp_path / "history.json").read_text())) == 2


@pytest.mark.slow
def test_groupdro_weights_stay_identical_across_processes(tmp_path):
    ranks = launch(tmp_path, "groupdro")
    q0, q1 = ranks[0]["q"], ranks[1]["q"]
    assert q0 == pytest.approx(q1, abs=1e-7)
    assert sum(q0) == pytest.approx(1.0) and max(q0) - min(q0) > 1e-4  # it moved
