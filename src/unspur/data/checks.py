"""Is a dataset usable as it stands? The checks behind ``unspur data inspect``.

A run fails late on problems that can be seen in the table: an image that does not
decode (at the batch that loads it), a validation or test split without some group
(worst-group metrics need every group), no training split. Each check here gives a
:class:`Finding` with counts and the fix; ``error`` findings make the data unusable for
``unspur run`` (``inspect`` exits 2), ``warning`` findings are worth knowing but a run
goes ahead (a training split without some group, no validation or no test split, images
left out by ``on_bad_image=skip``). The split rules match the run's
(``pipeline.split_warnings``): only train rows is an error, one missing evaluation
split a warning.

Label typos are caught earlier, where the labels are read (the ``csv`` reader refuses
a class id no training image has); :func:`check_table` repeats the class check for
every reader.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from unspur.data.table import SPLITS, GroupTable, group_ids, rare_label_hint
from unspur.errors import DataError

#: At most this many names are listed in a finding; the count is always given.
SHOWN = 5


@dataclass(frozen=True)
class Finding:
    level: str  # "error": a run cannot use the data as it stands; "warning": it can
    message: str


@dataclass
class Inspection:
    """The findings of :func:`check_table`, errors first."""

    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "warning"]

    @property
    def usable(self) -> bool:
        return not self.errors


def _shown(names: list[str]) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def find_bad_images(
    table: GroupTable, progress: Callable[[Iterable[str]], Iterable[str]] | None = None
) -> list[str]:
    """Filenames of the rows whose image is missing or does not decode.

    ``progress`` wraps the iteration (e.g. a tqdm bar); every image is decoded once.
    """
    names = table.frame["filename"].tolist()
    bad: list[str] = []
    for name in progress(names) if progress is not None else names:
        try:
            table.store.open(name)
        except DataError:
            bad.append(name)
    return bad


def _missing_groups(table: GroupTable, split: str) -> list[int]:
    part = table.frame[table.frame["split"] == split]
    present = set(group_ids(part["y"], part["a"], table.n_attrs).tolist())
    return [g for g in range(table.n_groups) if g not in present]


def check_table(table: GroupTable, bad_images: list[str] | None = None) -> Inspection:
    """Every problem a run would meet in ``table``, with counts and fixes.

    ``bad_images`` are the filenames :func:`find_bad_images` found (``None``: not
    checked).
    """
    findings: list[Finding] = []
    splits = set(table.frame["split"])
    if bad_images:
        findings.append(
            Finding(
                "error",
                f"{len(bad_images)} of {len(table.frame)} image(s) are missing or do not "
                f"decode ({_shown(bad_images)}); replace them, or leave them out with "
                "--on-bad-image skip (here and in run/compare; data.on_bad_image=skip in a "
                "config)",
            )
        )
    skipped = int(table.info.get("skipped_bad_images", 0) or 0)
    if skipped:
        names = list(table.info.get("skipped_bad_image_files", []))
        findings.append(
            Finding(
                "warning",
                f"{skipped} unreadable image(s) are left out (on_bad_image=skip): {_shown(names)}",
            )
        )
    if "train" not in splits:
        findings.append(
            Finding(
                "error",
                f"no training split: every row is in {sorted(splits)}; mark training rows "
                "with split=train (or 0)",
            )
        )
    else:
        train = table.frame[table.frame["split"] == "train"]
        counts = np.bincount(train["y"], minlength=table.n_classes)
        empty = [table.class_names[c] for c in range(table.n_classes) if counts[c] == 0]
        if empty:
            findings.append(
                Finding(
                    "error",
                    f"{len(empty)} class(es) have no training images: {_shown(empty)}. A "
                    "model cannot learn them; check the labels for a typo, or drop the class",
                )
            )
    if "train" in splits and not splits & {"val", "test"}:
        findings.append(
            Finding(
                "error",
                f"only train rows ({len(table.frame)} images): there is nothing to evaluate "
                "a model on (a run refuses this). Mark some rows as val (model selection) "
                "and some as test (the reported metrics)",
            )
        )
    for split in SPLITS:
        if split not in splits:
            if split != "train" and splits & {"val", "test"}:
                effect = (
                    "model selection falls back to the last epoch and no val metrics"
                    if split == "val"
                    else "no test metrics are reported"
                )
                findings.append(
                    Finding("warning", f"no {split} split: {effect}; add rows with split={split}")
                )
            continue
        missing = _missing_groups(table, split)
        if not missing:
            continue
        named = [f"g{g} ({table.group_name(g)})" for g in missing]
        n_rows = int((table.frame["split"] == split).sum())
        if split == "train":
            findings.append(
                Finding(
                    "warning",
                    f"split train ({n_rows} images) has no images of {len(missing)} of "
                    f"{table.n_groups} group(s): {_shown(named)}; methods that balance or "
                    "weight training groups (groupdro, resample_group, ...) see none of them",
                )
            )
        else:
            findings.append(
                Finding(
                    "error",
                    f"split {split} ({n_rows} images) has no images of {len(missing)} of "
                    f"{table.n_groups} group(s): {_shown(named)}; worst-group metrics need "
                    f"every group in {split}. Add {split} images of those groups, check "
                    "their labels for a typo, or choose another split or attribute"
                    f"{rare_label_hint(table, missing)}",
                )
            )
    findings.sort(key=lambda f: f.level != "error")
    return Inspection(findings)
