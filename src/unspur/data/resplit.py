"""Bias-ratio resplitting and group balancing of a :class:`GroupTable`.

:func:`resplit_bias` follows the FFR protocol for building 95 / 97 / 99 / 99.9 % biased
versions of a benchmark: bias-conflicting training samples are *dropped* (never added,
never duplicated) until the majority group of every class makes ``ratio`` of that class.
:func:`balance_groups` subsamples one split to equal group sizes (a group-balanced
validation or test set). :func:`lff_bias_attributes` assigns bias attributes the way
LfF's ``make_attr_labels`` does for Colored MNIST and Corrupted CIFAR-10.

All three are deterministic functions of their ``seed``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from unspur.data.table import GroupTable, require_nonempty_groups
from unspur.errors import ConfigError, DataError

#: Our choice: the relative-share rule decides only a clear association. The product over
#: classes of (best relative share / runner-up) must reach this; for two classes and two
#: attributes that product is the odds ratio of the 2x2 table (CelebA Blond_Hair/Male:
#: 15.4, UTKFace gender/age: 1.27, i.e. no real direction).
MIN_ASSOCIATION = 2.0
MAJORITY_RULES = ("auto", "largest")


def resolve_attribute(table: GroupTable, value: object, where: str) -> int:
    """An attribute id from an id or a name (exact, case-insensitive, or the name before
    a parenthesis: ``child`` for ``child (age<=10)``)."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: {value!r} is not an attribute id or name")
    if isinstance(value, int | np.integer):
        if not 0 <= int(value) < table.n_attrs:
            raise ConfigError(
                f"{where}: attribute id {value} is outside 0..{table.n_attrs - 1} "
                f"({', '.join(table.attr_names)})"
            )
        return int(value)
    text = " ".join(str(value).replace("_", " ").lower().split())
    for index, name in enumerate(table.attr_names):
        plain = " ".join(str(name).replace("_", " ").lower().split())
        if text in (plain, plain.split(" (")[0]):
            return index
    raise ConfigError(
        f"{where}: {value!r} is not an attribute of {table.name}; use one of "
        f"{', '.join(map(repr, table.attr_names))} (or its id)"
    )


def _declared(table: GroupTable, declared: object, where: str) -> dict[int, int]:
    """One attribute per class from a list (by class index) or a mapping by class name."""
    if isinstance(declared, dict):
        by_name = {str(k).lower(): v for k, v in declared.items()}
        missing = [c for c in table.class_names if str(c).lower() not in by_name]
        if missing:
            raise ConfigError(f"{where}: no majority attribute for class(es) {missing}")
        declared = [by_name[str(c).lower()] for c in table.class_names]
    if not isinstance(declared, list | tuple) or len(declared) != table.n_classes:
        raise ConfigError(
            f"{where} needs one attribute per class ({table.n_classes}: "
            f"{', '.join(table.class_names)}), got {declared!r}"
        )
    return {
        label: resolve_attribute(table, attr, f"{where} of class {table.class_names[label]!r}")
        for label, attr in enumerate(declared)
    }


def majority_attributes(
    table: GroupTable,
    split: str = "train",
    majority: Sequence[object] | dict | None = None,
    rule: str | None = None,
) -> dict[int, int]:
    """The bias-aligned (majority) attribute of each class, and never a silent guess.

    In order:

    1. ``majority`` when given: one attribute (id or name) per class, or a mapping from
       class name to attribute;
    2. the reader's declaration ``table.info["majority_attr"]`` (same forms; the
       ``celeba``, ``celeba_hq`` and ``utkface`` readers set it from their ``majority``
       option and their per-dataset presets);
    3. the data of ``split``. ``rule="largest"`` (``table.info["majority_rule"]``) is the
       official FFR code's ``make_harder``: each class's largest group, even when two
       classes share it (on UTKFace it would keep adults for both genders; the splits the
       FFR release ships do not: see the utkface reader's ``majority: ffr``).
       ``rule="auto"`` (default) takes each class's largest group when those differ
       between classes (Waterbirds, SpuCo Animals); when classes share their largest
       attribute it takes, per class, the group largest *relative to its attribute's
       share*, ``argmax_a n(c, a) / n(a)``: CelebA Blond_Hair/Male, where women are the
       largest group of both classes, gets blond -> women and non-blond -> men. That
       rule must give every class its own attribute with a clear association
       (:data:`MIN_ASSOCIATION`); otherwise :class:`DataError` says how to declare it.
    """
    if majority is not None:
        return _declared(table, majority, "majority")
    declared = table.info.get("majority_attr")
    if declared is not None:
        return _declared(table, declared, f"{table.name}: info['majority_attr']")
    rule = rule or table.info.get("majority_rule") or "auto"
    if rule not in MAJORITY_RULES:
        raise ConfigError(f"majority rule {rule!r} is not one of {', '.join(MAJORITY_RULES)}")
    part = table.frame[table.frame["split"] == split]
    counts = np.zeros((table.n_classes, table.n_attrs), dtype=np.float64)
    np.add.at(counts, (part["y"].to_numpy(), part["a"].to_numpy()), 1)
    present = [label for label in range(table.n_classes) if counts[label].sum() > 0]
    largest = {label: int(np.argmax(counts[label])) for label in present}
    distinct = len(set(largest.values())) == len(largest)
    if rule == "largest" or distinct or table.n_attrs < len(present):
        return largest
    shares = counts.sum(axis=0)
    relative = np.divide(counts, shares, out=np.zeros_like(counts), where=shares > 0)
    chosen: dict[int, int] = {}
    association = 1.0
    for label in present:
        order = np.argsort(-relative[label], kind="stable")
        best, runner = relative[label, order[0]], relative[label, order[1]]
        chosen[label] = int(order[0])
        association *= best / runner if runner > 0 else np.inf
    if len(set(chosen.values())) == len(chosen) and association >= MIN_ASSOCIATION:
        return chosen
    counted = "; ".join(
        f"{table.class_names[c]}: "
        + ", ".join(f"{table.attr_names[a]} {int(counts[c, a])}" for a in range(table.n_attrs))
        for c in present
    )
    raise DataError(
        f"{table.name}: cannot tell the majority (bias-aligned) attribute of each class "
        f"from split {split!r} ({counted}): the classes share their largest attribute "
        f"and their association with the attributes is weak (strength {association:.2f} "
        f"< {MIN_ASSOCIATION}). Declare it: data.options.majority (readers csv, utkface, "
        "celeba, celeba_hq: one attribute name per class, or a preset such as "
        "majority: ffr / cdb for utkface), or resplit_bias(..., majority=[...])"
    )


def _allocate(sizes: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` kept samples over groups of ``sizes``: one per non-empty group
    first (always, even beyond ``total``), the rest proportional to the remaining sizes
    (largest remainder). Never exceeds a group's size."""
    sizes = np.asarray(sizes, dtype=np.int64)
    keep = (sizes > 0).astype(np.int64)
    spare = sizes - keep
    remaining = total - int(keep.sum())
    if remaining <= 0 or spare.sum() == 0:
        return keep
    share = remaining * spare / spare.sum()
    extra = np.floor(share).astype(np.int64)
    leftover = remaining - int(extra.sum())
    order = np.argsort(-(share - extra), kind="stable")
    extra[order[:leftover]] += 1
    return keep + np.minimum(extra, spare)


def resplit_bias(
    table: GroupTable,
    ratio: float,
    seed: int = 0,
    split: str = "train",
    majority: Sequence[object] | dict | None = None,
    rule: str | None = None,
) -> GroupTable:
    """Drop conflicting samples of ``split`` until each class's majority group makes
    ``ratio`` of the class (FFR protocol: 0.95, 0.97, 0.99, 0.999).

    The majority (bias-aligned) attribute of each class is chosen by
    :func:`majority_attributes` (``majority`` overrides it, ``rule`` picks the data
    rule; the choice and where it came from are in ``info["resplit_bias"]``). For
    each class the number of conflicting samples kept is ``round(n_major * (1 - ratio) /
    ratio)``, shared over the conflicting groups in proportion to their sizes. At least
    one sample of every non-empty group is kept, so no group vanishes; when the ratio
    allows fewer (tiny classes at 99.9%) the achieved ratio is lower than asked and
    ``info["resplit_bias"]["notes"]`` says so. Which samples go is drawn by ``seed``. Other splits are untouched. Raises :class:`DataError` when a class is
    already more biased than ``ratio`` (reaching it would need new conflicting samples).
    """
    if not 0.0 < ratio < 1.0:
        raise ConfigError(
            f"bias ratio {ratio} must lie strictly between 0 and 1 (e.g. 0.95 for 95%)"
        )
    frame = table.frame
    in_split = (frame["split"] == split).to_numpy()
    if not in_split.any():
        raise DataError(f"{table.name}: split {split!r} is empty; cannot resplit its bias")
    rng = np.random.default_rng(seed)
    y = frame["y"].to_numpy()
    a = frame["a"].to_numpy()
    if majority is not None:
        source = "argument"
    elif table.info.get("majority_attr") is not None:
        source = table.info.get("majority_source", "declared by the reader")
    else:
        source = f"data rule {rule or table.info.get('majority_rule') or 'auto'}"
    majority = majority_attributes(table, split, majority, rule)
    drop = np.zeros(len(frame), dtype=bool)
    dropped: dict[str, int] = {}
    achieved: dict[str, float] = {}
    notes: list[str] = []
    for label, major in majority.items():
        class_name = table.class_names[label]
        rows = in_split & (y == label)
        n_major = int((rows & (a == major)).sum())
        conflict_attrs = [k for k in range(table.n_attrs) if k != major]
        sizes = np.array([int((rows & (a == k)).sum()) for k in conflict_attrs])
        exact = n_major * (1.0 - ratio) / ratio
        if sizes.sum() < np.floor(exact + 1e-9):
            current = n_major / max(1, n_major + int(sizes.sum()))
            raise DataError(
                f"{table.name}: class {class_name!r} in split {split!r} is already "
                f"{current:.4f} majority ({n_major} of {n_major + int(sizes.sum())}); "
                f"ratio {ratio} would need {exact:.1f} conflicting samples but only "
                f"{int(sizes.sum())} exist. Samples are only ever dropped: choose a ratio "
                f"of at least {current:.4f}"
            )
        target = min(int(round(exact)), int(sizes.sum()))
        keep = _allocate(sizes, target)
        if int(keep.sum()) > target:
            notes.append(
                f"{class_name}: kept one sample in each of {int((sizes > 0).sum())} "
                f"conflicting groups although ratio {ratio} allows {target}"
            )
        for attr, size, n_keep in zip(conflict_attrs, sizes, keep):
            if n_keep >= size:
                continue
            members = np.flatnonzero(rows & (a == attr))
            chosen = rng.permutation(members)[: size - n_keep]
            drop[chosen] = True
            group = label * table.n_attrs + attr
            dropped[table.group_name(group)] = int(size - n_keep)
        kept_conflict = int(keep.sum())
        achieved[class_name] = n_major / (n_major + kept_conflict) if n_major else 0.0

    result = table.subset(~drop)
    result.info["resplit_bias"] = {
        "ratio": ratio,
        "split": split,
        "seed": seed,
        "majority_attr": {table.class_names[c]: table.attr_names[m] for c, m in majority.items()},
        "majority_source": source,
        "dropped": dropped,
        "n_dropped": int(drop.sum()),
        "achieved_ratio": achieved,
        "notes": notes,
    }
    return result


def balance_groups(table: GroupTable, split: str, seed: int = 0) -> GroupTable:
    """Subsample ``split`` so every group ``(y, a)`` has the size of its smallest group.

    Every group must be present in the split (a group-balanced set of an absent group is
    empty). Other splits are untouched; which samples are kept is drawn by ``seed``.
    """
    frame = table.frame
    in_split = (frame["split"] == split).to_numpy()
    if not in_split.any():
        raise DataError(
            f"{table.name}: split {split!r} is empty (splits present: "
            f"{sorted(set(frame['split']))}); cannot balance its groups"
        )
    require_nonempty_groups(table, split)
    groups = table.groups
    sizes = np.bincount(groups[in_split], minlength=table.n_groups)
    n_keep = int(sizes.min())
    rng = np.random.default_rng(seed)
    drop = np.zeros(len(frame), dtype=bool)
    for g in range(table.n_groups):
        members = np.flatnonzero(in_split & (groups == g))
        drop[rng.permutation(members)[n_keep:]] = True
    result = table.subset(~drop)
    result.info["balance_groups"] = {
        **table.info.get("balance_groups", {}),
        split: {"per_group": n_keep, "n_dropped": int(drop.sum()), "seed": seed},
    }
    return result


def lff_split_frames(
    parts: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    render: Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray],
    n_attrs: int,
    conflict_ratio: float,
    seed: int,
    prefix: str,
) -> tuple[np.ndarray, pd.DataFrame]:
    """Bias every split the LfF way and render it: the shared body of the built readers.

    ``parts`` maps a split to ``(pixels, labels, origin)``; train gets
    ``1 - conflict_ratio`` aligned samples, val and test are unbiased (every attribute
    equally often per class). ``render(pixels, attrs, rng)`` draws the attribute onto
    the images (a colour, a corruption). Returns the images and their canonical rows,
    named ``prefix + index`` for an :class:`ArrayStore`.
    """
    images, frames, offset = [], [], 0
    for index, (split, (pixels, labels, origin)) in enumerate(parts.items()):
        if len(labels) == 0:
            continue
        rng = np.random.default_rng([seed, index])
        aligned_ratio = 1.0 - conflict_ratio if split == "train" else 1.0 / n_attrs
        attrs = lff_bias_attributes(labels, n_attrs, aligned_ratio, rng)
        images.append(render(pixels, attrs, rng))
        frames.append(
            pd.DataFrame(
                {
                    "filename": [f"{prefix}{i}" for i in range(offset, offset + len(labels))],
                    "y": labels,
                    "a": attrs,
                    "split": split,
                    "source": "real",
                    "aligned": attrs == labels,
                    "origin": origin,
                }
            )
        )
        offset += len(labels)
    return np.concatenate(images), pd.concat(frames, ignore_index=True)


def lff_bias_attributes(
    y: np.ndarray, n_attrs: int, aligned_ratio: float, rng: np.random.Generator
) -> np.ndarray:
    """Attribute labels as LfF's ``make_attr_labels``: in class ``c`` a fraction
    ``aligned_ratio`` gets attribute ``c`` and the rest is shared *equally* (rounded
    cumulative milestones, so exact counts) among the other attributes.

    ``aligned_ratio = 1 / n_attrs`` gives the unbiased (uniform) test protocol. LfF
    assigns the attributes in dataset order; here they go to a ``rng`` permutation of
    the class's samples, which is the same in distribution and independent of file order.
    """
    y = np.asarray(y, dtype=np.int64)
    if not 0.0 <= aligned_ratio <= 1.0:
        raise ConfigError(f"aligned ratio {aligned_ratio} must lie in [0, 1]")
    attrs = np.empty(len(y), dtype=np.int64)
    eye = np.eye(n_attrs)
    for label in range(int(y.max()) + 1 if len(y) else 0):
        members = np.flatnonzero(y == label)
        if len(members) == 0:
            continue
        ratios = aligned_ratio * eye[label % n_attrs] + (1 - aligned_ratio) / (n_attrs - 1) * (
            1 - eye[label % n_attrs]
        )
        milestones = np.round(len(members) * np.cumsum(ratios)).astype(np.int64)
        milestones[-1] = len(members)
        counts = np.diff(np.concatenate([[0], milestones]))
        order = rng.permutation(members)
        attrs[order] = np.repeat(np.arange(n_attrs), counts)
    return attrs


def stratified_holdout(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask choosing ``round(fraction * n_c)`` samples of every class ``c``: a
    held-out slice with the same class proportions as the whole."""
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"held-out fraction {fraction} must lie in [0, 1)")
    labels = np.asarray(labels)
    chosen = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        n = int(round(fraction * len(members)))
        chosen[rng.permutation(members)[:n]] = True
    return chosen
