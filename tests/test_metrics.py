"""Group metrics against hand-computed cases."""

import numpy as np
import pytest

from unspur.evaluate.metrics import DEFINITIONS, format_metrics, group_metrics


def test_hand_computed_four_groups():
    # group: 0 0 0 0 | 1 1 | 2 2 2 | 3
    groups = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 3])
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
    preds = np.array([0, 0, 0, 1, 1, 0, 1, 1, 0, 0])
    # per-group accuracy: 3/4, 1/2, 2/3, 0/1
    train_counts = np.array([70, 10, 10, 10])
    m = group_metrics(preds, labels, groups, 4, train_counts)
    assert m.worst_group == 3
    assert m.worst_group_accuracy == 0.0
    assert m.accuracy == pytest.approx(6 / 10)
    assert m.balanced_accuracy == pytest.approx((0.75 + 0.5 + 2 / 3 + 0) / 4)
    assert m.average_accuracy == pytest.approx(0.7 * 0.75 + 0.1 * 0.5 + 0.1 * 2 / 3 + 0.1 * 0)
    assert [r.n for r in m.groups] == [4, 2, 3, 1]
    assert [r.correct for r in m.groups] == [3, 1, 2, 0]


def test_without_train_weights_average_equals_accuracy():
    groups = np.array([0, 0, 1, 1, 1])
    labels = np.array([0, 0, 1, 1, 1])
    preds = np.array([0, 1, 1, 1, 1])
    m = group_metrics(preds, labels, groups, 2)
    assert m.average_accuracy == pytest.approx(m.accuracy) == pytest.approx(0.8)


def test_absent_group_is_listed_but_excluded():
    groups = np.array([0, 0, 2, 2])
    labels = np.array([0, 0, 1, 1])
    preds = np.array([0, 0, 1, 0])
    m = group_metrics(preds, labels, groups, 4, np.array([5, 5, 5, 5]))
    assert m.groups[1].accuracy is None and m.groups[3].accuracy is None
    assert m.worst_group == 2 and m.worst_group_accuracy == 0.5
    assert m.balanced_accuracy == pytest.approx(0.75)
    assert m.average_accuracy == pytest.approx(0.75)  # weights renormalised over present groups


def test_format_prints_every_definition():
    m = group_metrics(np.array([0, 1]), np.array([0, 1]), np.array([0, 1]), 2, None, ["a", "b"])
    text = format_metrics(m, "test:")
    for key, definition in DEFINITIONS.items():
        assert key in text and definition in text


def test_empty_split_is_an_error():
    with pytest.raises(ValueError):
        group_metrics(np.array([]), np.array([]), np.array([]), 2)
