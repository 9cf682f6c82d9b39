"""Behaviour: ERM on the synthetic benchmark at 99% bias learns the shortcut."""

from __future__ import annotations

import pytest

from unspur.config import load_config
from unspur.pipeline import run


@pytest.mark.slow
def test_erm_shows_the_shortcut_at_99_percent_bias(tmp_path):
    config = load_config(
        None,
        [
            "data.options.bias=0.99",
            "data.options.n_train=1000",
            "data.options.n_val=200",
            "data.options.n_test=400",
            "train.epochs=4",
            "train.lr=0.05",
            "train.augment=false",
            "train.progress=false",
        ],
    )
    results = run(config, tmp_path)
    test = results["metrics"]["test"]
    # The majority groups are learned...
    aligned = [g["accuracy"] for g in test["groups"] if g["group"] in (0, 3)]
    assert min(aligned) > 0.9
    # ...and the minority groups are not: worst-group far below the average.
    assert test["average_accuracy"] - test["worst_group_accuracy"] > 0.4
    assert test["worst_group"] in (1, 2)
