"""Worker for tests/test_distributed.py: one process of a 2-process gloo run.

Launched with ``python -m torch.distributed.run --nproc_per_node 2``; accelerate picks up
the environment (RANK, WORLD_SIZE, MASTER_ADDR) and shards the training batches.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from test_training import datasets, model  # noqa: E402

from unspur.config import TrainConfig  # noqa: E402
from unspur.train.loop import fit  # noqa: E402

out = Path(sys.argv[1])
train, val = datasets()
net = model()
config = TrainConfig(epochs=2, batch_size=8, lr=0.05, progress=False, device="cpu")
objective = None
if len(sys.argv) > 2 and sys.argv[2] == "groupdro":
    from unspur.train.group_objectives import GroupDROObjective

    objective = GroupDROObjective(train.n_groups, train.group_counts(), eta=0.1)
result = fit(net, train, val, config, out, seed=0, objective=objective)
rank = torch.distributed.get_rank()
world = torch.distributed.get_world_size()
checksum = float(sum(p.double().sum() for p in net.parameters()))
(out / f"rank{rank}.json").write_text(
    json.dumps(
        {
            "world": world,
            "checksum": checksum,
            "best_epoch": result.best_epoch,
            "backend": torch.distributed.get_backend(),
            "q": objective.q.tolist() if objective is not None else None,
        }
    )
)
