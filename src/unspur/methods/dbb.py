"""DBB: diffusion-driven balancing ("Leveraging Text-to-Image Generation for Handling
Spurious Correlation", Yazdan Parast, Azam and Akhtar, 2025; Algorithms 1 and 2).

The recipe, stage by stage (files under ``out_dir/dbb``):

1. **Reference model.** ERM (``context.reference_model()``, shared with every method).
   Its per-sample cross-entropy (``reduction="none"``) and softmax on every training
   image (eval transform) are computed once (``selection.json``). ``class_balanced``
   (CelebA, section 7: "We also used the class-balanced dataset for our approach")
   restricts DBB to a random class-balanced subset of the training set (every class cut
   to the smallest; the official loader does the same): selection, ``Psi_i``, high-loss
   token samples and the real part of the retraining set all come from it.
2. **Causal tokens** (Eq. 1; ``tokens/class<i>/``). One textual-inversion token
   ``<dbb-i>`` per class, learned with the Hugging Face recipe (section 8.1) on the
   *text-to-image* model of the generator's family (``inversion_model``: ``null`` = SD-2
   base for SD-2 inpainting, as the official README command, or a domain model's own
   text-to-image pipeline; both share the inpainting model's text encoder), with the
   class name in the templates ("a photo of a {token} bird", section 4.1: "A photo of a
   [C_landbird] bird"; ``{name}`` = ``object_word`` or the class name), then loaded into
   the inpainting pipeline (:func:`~unspur.generate.textual_inversion.load_embedding`
   checks the dimension). ``inversion_model: generator`` learns on the inpainting
   pipeline itself (object masks as the region). Token samples (``token_samples``,
   section 5.1: 20-40; Table 5: 30 best on Waterbirds): the token of class ``i'`` is
   drawn into images of class ``i``, so it is learned from samples of ``i'`` carrying
   the attribute ``i`` is spuriously correlated with (:func:`token_attributes`;
   Waterbirds: waterbirds on land and landbirds on water; CelebA, section 8.2: non-blond
   *women* and blond men): ``token_source: val_minority`` takes them from the
   *validation* set (group labels on validation: supervision ✓; the correlated attribute
   comes from the training group *sizes*); ``token_attributes`` overrides the rule per
   class; ``high_loss`` (and the fallback when validation has none) takes the class's
   highest-loss *training* samples (section 5.1's other source). ``textual_inversion:
   false`` (ablation, Table 5's first column) uses the plain prompt.
3. **Majority selection** (Algorithm 2, lines 5-6). The ``k`` lowest per-sample-loss
   training samples of each class ``i`` (Table 4 gives K per class and dataset).
4. **Masks.** The object mask of each selected image from the masker
   (:func:`unspur.generate.maskers.build_masker`): ``text_prompt`` (LangSAM:
   GroundingDINO Swin-B + SAM ViT-H, the highest-scoring box's mask) prompted with
   ``object_word`` or the class name, ``saliency`` (xGradCAM of ERM) or ``ground_truth``;
   ``mask_region: box`` repaints the mask's bounding box instead (our option, for
   classes that differ by shape); grown by ``mask_dilation`` pixels only when asked (the
   paper grows none). An image without a mask is recorded (reason ``no mask``) and not
   inpainted.
5. **Generation** (Eq. 2, Algorithm 1; ``store/``, a
   :class:`~unspur.generate.store.SyntheticStore`). Each selected image of class ``i`` is
   inpainted inside its mask with the prompt of the other class ``i'``,
   ``prompt_template`` = "a photo of a {token} {name}" (Algorithm 1, line 2). Eq. 2
   keeps the unmasked region in latent space: after every denoising step the latents
   outside the mask are the original's ``z_0`` (``latent_blend: clean``,
   :mod:`unspur.generate.latent_blend`). The official ``generate.py`` calls diffusers'
   inpainting pipeline with SD-2-inpainting, a 9-channel UNet that diffusers does not
   blend, leaving the background to the model (``latent_blend: none``, the code's
   variant); ``latent_blend: noised`` blends ``z_0`` noised to each step's level
   (diffusers' own rule for 4-channel UNets). There is no pixel paste-back
   (``paste_back: true`` pastes the original pixels outside the mask, an option). It is labelled ``i'`` and keeps the
   parent's background (its attribute ``a`` is the parent's, recorded for evaluation
   only: no DBB step reads it). With more than two classes ``i'`` cycles over the other
   classes (``i + 1 + j mod (n - 1)`` for copy ``j``). Interrupted generation resumes;
   changed inputs are refused by the store.
6. **Pruning** (Eq. 3-5, Algorithm 1 line 11). For every candidate: ``psi`` = ERM softmax
   of the *original* class ``i`` on the new image, kept when ``psi < Psi_i``; ``Psi_i``
   is Eq. 3, the mean softmax of class ``i`` over the class's training samples
   (``psi_reference: class``); Algorithm 2 (lines 7-8) and the official code compute it
   on the low-loss subset ``D_i`` instead (``psi_reference: low_loss``). ``rho`` =
   Integrated Gradients of the *new* class ``i'`` (Eq. 4; ``ig_target: source`` explains
   the original class, as the official ``generate.py`` does) from the original image
   (baseline) to the candidate, summed inside the mask (Eq. 5;
   :func:`rho_scores`), kept when ``rho > P_i'`` with one threshold per *new* class
   (``rho_threshold: [P_1, .., P_n]``, Table 10's P1/P2 for labels 0/1). Without a
   paper preset, ``rho_threshold: calibrate`` (the default) sets ``P_c`` from the IG
   scores of a subset of the generated samples (section 5.1: "The threshold P was
   determined using Integrated Gradients (IG) scores from a subset of generated
   samples"); the paper does not give the rule, ours is the
   ``rho_calibration_quantile`` (0.25) of ``rho`` over a random subset of
   ``rho_calibration_samples`` (100) candidates per new class. ``pruning`` chooses what
   retraining uses: ``both`` (the paper), ``psi`` or ``rho`` (one condition,
   ablation), ``none`` (no pruning, Table 2's ablation). ``candidates.csv`` lists every
   candidate with both scores, both thresholds, each condition's verdict, the paper
   rule's verdict under this run's thresholds, whether it was used and why not (the
   store's ``kept`` column is the generation-time verdict, before calibration).
7. **Retraining** (Eq. 6-8, Algorithm 2 lines 12-20; stage ``dbb/retrain``). The
   reference model (``init: reference_new_head`` re-draws its head first; ``scratch`` a
   fresh model) is trained on the real
   training set plus the used candidates with ``L_train + sum_c gamma_c L_gen_c``: per
   batch, the mean CE of the real samples, plus for each class ``c`` the mean CE of the
   batch's generated samples of class ``c`` (for two classes ``gamma1 L_gen1 + gamma2
   L_gen2``, Table 10); a term with no sample in the batch is 0, never NaN
   (:func:`unspur.train.losses.weighted_cross_entropy`). ``retrain_batch_size`` and
   ``retrain_lr`` are Table 10's (the paper presets set them); the paper does not give
   the optimiser or the number of epochs, so the defaults follow the official
   ``train.py``: Adam (``retrain_optimizer: adam``) without weight decay
   (``retrain_weight_decay: 0``), keeping the best validation worst-group accuracy;
   ``retrain_epochs`` (official: 200) defaults to the run's epochs. Without a preset the
   learning rate is chosen on validation (``retrain_lr: search``, *our choice*: Table 10's
   rates, 5e-6 to 5e-5, are for a ResNet-50 over up to 200 epochs and do not carry over to
   another model or schedule): one retraining per rate of ``retrain_lr_grid`` (1e-5,
   1e-4, 1e-3: Table 10's decade and the two above it), each from the same start, the
   best by the run's selection rule on validation kept (``retrain_search.json``). A
   number fixes the rate; ``null`` for ``retrain_optimizer``, ``retrain_lr`` or
   ``retrain_weight_decay`` takes the run's train settings (what this library did before:
   with the miniature's SGD lr 0.05 DBB fell below ERM, ``bench/results/miniature``).
   Model selection by validation worst-group accuracy (✓).
8. **Statistics** like the paper's Table 2 (``statistics.json`` / ``.md``: per source
   class, selected, masked, generated, passing each condition, kept by the paper's rule,
   used; the thresholds), a sample grid (``figures/samples.png``) and a run-report
   section.
9. **Sharing between runs** (``shared_cache``, our option, a speed-up only). Given a
   folder (:class:`~unspur.shared_cache.SharedCache`), the finished ``tokens/`` and
   ``store/`` of a run are copied there under a digest of every input they depend on
   (the run's config without :data:`AFTER_GENERATION` options, and for the tokens
   without :data:`AFTER_TOKENS` either; the ERM model's hash; the generator's weights),
   and a later run with the same inputs starts from that copy instead of learning and
   generating again: the pruning ablations (``pruning``) and retraining variants of one
   seed reuse one set of candidates, ``mask_region`` variants one set of tokens. The
   images are the ones the run would have made (generation is seeded per request); the
   store's per-request check and textual inversion's own fingerprint still refuse
   anything made from other inputs, and each run keeps complete copies (``dbb.json``
   names the entries it restored).

Defaults. The paper's presets (Table 4's K, Table 10's batch size, learning rate,
gamma1, gamma2, P1, P2, section 7's class balancing) are in ``configs/waterbirds_dbb.yaml``,
``celeba_dbb.yaml`` and ``metashift_dbb.yaml``, each value commented with its source.
The method's own defaults are for a dataset the paper has no preset for: the paper's
procedure where it has one (``rho_threshold: calibrate``, no paste-back, Eq. 3's
``Psi``, IG of the new class, ``ig_steps = 50`` = Captum's default that the official
code uses, LangSAM, no dilation, 30 token samples, textual inversion as the official
README command: 3000 steps, lr 5e-4 scaled by the batch of 4, no flips as the official
``textual_inversion.py``) and our choices where it has none: ``k = 500`` per class
(Table 4's counts are per dataset; section 5.3 picks "the number of samples necessary to
achieve the balance"), ``gamma = 1`` per class (each generated class's mean loss weighs
as much as the real batch's), retraining from the ERM weights with the run's train
config, the calibration subset and quantile above. Inpainting: ``steps`` /
``guidance_scale`` ``null`` = the domain model's own sampling settings (DDIM 25, 4.0) or
Stable Diffusion's (50, 7.5, what the official ``generate.py`` uses by not setting
them); strength 1.0.

Where the official code differs from the paper (the paper is followed, the code's
variant is an option): IG of the original class (``ig_target: source``), ``Psi`` over
the low-loss subset (``psi_reference: low_loss``, which is also Algorithm 2's), the first
detected box's mask (``masker_options: {box_selection: first}``), a re-drawn classifier
head before retraining (``init: reference_new_head``; PyTorch's default initialisation,
the code's is Xavier), diffusers' inpainting call without Eq. 2's latent blend
(``latent_blend: none``, step 5). The code also ranks by a batch-mean loss (every sample of a batch
gets the same loss); we rank by per-sample loss, with no option for the code's way.

Supervision: validation group labels for the token samples (``val_minority``) and for
model selection; no training group label: ✓. Declared with
``val_labels_only_for_selection=False`` since the tokens use them too (with
``token_source: high_loss`` and average-accuracy selection no group label is read at
all, but the class-level declaration stays ✓, the conservative side).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from copy import deepcopy
from dataclasses import dataclass, replace
from html import escape
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from unspur.data.dataset import GroupDataset
from unspur.errors import ConfigError, UnspurError
from unspur.generate.latent_blend import LATENT_BLENDS
from unspur.io import atomic_write_json, atomic_write_text
from unspur.methods.base import Method, RunContext, Supervision, register_method
from unspur.methods.mac import model_hash
from unspur.shared_cache import StageSharing
from unspur.train.features import with_transform
from unspur.train.loop import FitResult, candidate_rule, candidate_score
from unspur.train.losses import weighted_cross_entropy
from unspur.train.objectives import Objective
from unspur.train.seeding import seed_everything

logger = logging.getLogger(__name__)

PRUNING_MODES = ("both", "psi", "rho", "none")
TOKEN_SOURCES = ("val_minority", "high_loss")
#: ``Psi_i`` over the class's training samples (Eq. 3) or its low-loss subset (Alg. 2).
PSI_REFERENCES = ("class", "low_loss")
#: IG explains the new class ``i'`` (Eq. 4) or the source class (official generate.py).
IG_TARGETS = ("new", "source")
#: Retraining starts from the ERM model (section 4.3), the ERM model with a new head
#: (official train.py), or a fresh model.
INITS = ("reference", "reference_new_head", "scratch")
STAGE = "dbb"
#: ``retrain_lr: search``: choose the retraining rate on validation (our choice, docstring 7).
RETRAIN_LR_SEARCH = "search"
#: The rates tried: Table 10's decade (5e-6 to 5e-5) and the two above it (our choice).
RETRAIN_LR_GRID = (1e-5, 1e-4, 1e-3)
#: Reasons recorded for pruned candidates.
REASON_PSI = "psi >= Psi_i (the new image still looks like its original class)"
REASON_RHO = "rho <= P_i' (the edited region does not support the new class)"
REASON_NO_MASK = "no mask"
#: Options read only after the candidates are generated and scored (pruning's decision,
#: rho's calibration, retraining, figures): runs that differ in nothing else share their
#: tokens and candidates through ``shared_cache``.
AFTER_GENERATION = (
    "pruning", "rho_calibration_samples", "rho_calibration_quantile", "gamma", "init",
    "retrain_epochs", "retrain_lr", "retrain_lr_grid", "retrain_batch_size",
    "retrain_optimizer", "retrain_weight_decay", "figures", "shared_cache",
)  # fmt: skip
#: Options read by selection, masks, generation and scoring but not by textual inversion:
#: runs that differ in these (and ``AFTER_GENERATION``) share their tokens only.
AFTER_TOKENS = (
    "k", "copies", "mask_region", "mask_dilation", "prompt_template", "plain_template",
    "steps", "guidance_scale", "strength", "paste_back", "latent_blend",
    "generation_batch_size", "psi_reference", "rho_threshold", "ig_target", "ig_steps", "ig_internal_batch_size",
    "ig_batch_size", "ig_output",
)  # fmt: skip
TOKENS_STAGE = "dbb-tokens"
CANDIDATES_STAGE = "dbb-candidates"


# ------------------------------------------------------------------- selection
def resolve_k(k: Any, class_sizes: list[int] | np.ndarray) -> list[int]:
    """Samples to select per class: an int (capped at the class size), a list with one
    int per class, or a fraction in (0, 1] of each class."""
    sizes = [int(s) for s in class_sizes]
    if isinstance(k, bool):
        raise ConfigError(f"dbb option k must be a count, a list or a fraction, got {k!r}")
    if isinstance(k, int):
        if k < 0:
            raise ConfigError(f"dbb option k must be >= 0, got {k}")
        return [min(k, s) for s in sizes]
    if isinstance(k, float):
        if not 0.0 < k <= 1.0:
            raise ConfigError(f"dbb option k as a fraction must be in (0, 1], got {k}")
        return [min(s, round(k * s)) for s in sizes]
    if isinstance(k, list | tuple):
        if len(k) != len(sizes) or any(
            isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in k
        ):
            raise ConfigError(
                f"dbb option k as a list needs {len(sizes)} non-negative integers (one per "
                f"class), got {k!r}"
            )
        return [min(int(v), s) for v, s in zip(k, sizes, strict=True)]
    raise ConfigError(f"dbb option k must be a count, a list or a fraction, got {k!r}")


def rank_per_class(
    losses: np.ndarray,
    y: np.ndarray,
    counts: list[int],
    lowest: bool = True,
    pool: np.ndarray | None = None,
) -> dict[int, np.ndarray]:
    """Positions of the ``counts[c]`` lowest (or highest) per-sample losses of each class
    ``c``, best first; ties keep dataset order (stable sort). ``pool`` (positions)
    restricts the ranking to those samples (DBB's class-balanced training set).

    ``losses`` must be per sample (``reduction="none"``), never a batch mean.
    """
    losses = np.asarray(losses, dtype=np.float64)
    y = np.asarray(y)
    if losses.shape != y.shape:
        raise ConfigError(f"{losses.shape[0]} losses for {y.shape[0]} labels: need one per sample")
    allowed = np.ones(len(y), dtype=bool)
    if pool is not None:
        allowed = np.zeros(len(y), dtype=bool)
        allowed[np.asarray(pool, dtype=np.int64)] = True
    out = {}
    for c, count in enumerate(counts):
        members = np.flatnonzero((y == c) & allowed)
        key = losses[members] if lowest else -losses[members]
        order = np.argsort(key, kind="stable")
        out[c] = members[order[:count]]
    return out


def training_pool(y: np.ndarray, n_classes: int, class_balanced: bool, seed: int) -> np.ndarray:
    """Positions of the training samples DBB works on: all of them, or with
    ``class_balanced`` a random class-balanced subset (every class cut to the smallest
    class's size, drawn by ``seed``), as the paper does for CelebA (section 7: "We also
    used the class-balanced dataset for our approach, similar to [19]"; the official
    loader draws ``min`` class size samples of each class at random). Selection,
    ``Psi_i``, high-loss token samples and the real part of the retraining set all come
    from the pool."""
    y = np.asarray(y)
    if not class_balanced:
        return np.arange(len(y))
    from unspur.train.sampling import balanced_subsample_indices

    return balanced_subsample_indices(y, n_classes, seed, what="class")


def class_mean_softmax(probabilities: np.ndarray, y: np.ndarray, n_classes: int) -> np.ndarray:
    """``Psi_i``: the mean softmax of class ``i`` over the samples of class ``i``
    (NaN for a class without samples)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(y)
    out = np.full(n_classes, np.nan)
    for c in range(n_classes):
        members = y == c
        if members.any():
            out[c] = float(probabilities[members, c].mean())
    return out


def low_loss_mean_softmax(
    probabilities: np.ndarray, selected: dict[int, np.ndarray], n_classes: int
) -> np.ndarray:
    """``Psi_i`` as Algorithm 2 (lines 5-8) and the official code compute it: the mean
    softmax of class ``i`` over the low-loss subset ``D_i`` selected for editing (NaN for
    a class with no selected sample)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    out = np.full(n_classes, np.nan)
    for c in range(n_classes):
        members = np.asarray(selected.get(c, []), dtype=np.int64)
        if len(members):
            out[c] = float(probabilities[members, c].mean())
    return out


def associated_attributes(
    train_group_counts: np.ndarray, n_classes: int, n_attrs: int
) -> list[int]:
    """Per class ``c``, the attribute it is spuriously correlated with: the ``a`` where
    class ``c``'s share of the training samples, ``P(y = c | a) = n(c, a) / n(a)``, is
    highest (from the training group *sizes*; ties: the first such ``a``).

    Not the largest group of the class: in CelebA the non-blond class is correlated with
    *men* although non-blond women are slightly more numerous (Table 7: 12,426 vs 11,841),
    because nearly all men are non-blond. For Waterbirds both readings agree.
    """
    counts = np.asarray(train_group_counts, dtype=np.float64).reshape(n_classes, n_attrs)
    per_attr = counts.sum(0)
    share = np.where(per_attr > 0, counts / np.where(per_attr > 0, per_attr, 1.0), -1.0)
    return [int(np.argmax(share[c])) for c in range(n_classes)]


def token_attributes(
    train_group_counts: np.ndarray,
    n_classes: int,
    n_attrs: int,
    override: dict[int, list[int]] | None = None,
) -> dict[int, list[int]]:
    """Per class ``i'``, the attributes of the samples its token is learned from.

    The token of ``i'`` is drawn into images of the other classes ``i``; DBB learns it
    from minority-group samples (section 5.1, 20-40 samples; section 8.2: the non-blond
    token from non-blond *women*): samples of ``i'`` carrying the attribute ``i`` is
    correlated with (:func:`associated_attributes`), i.e. ``i'`` on ``i``'s usual
    background. Waterbirds: waterbirds on land, landbirds on water; CelebA: blond men,
    non-blond women. With more than two classes, the attributes of every other class
    (except ``i'``'s own). ``override`` (class -> attributes) replaces the rule for the
    classes it names.
    """
    assoc = associated_attributes(train_group_counts, n_classes, n_attrs)
    out = {}
    for c in range(n_classes):
        attrs = sorted({assoc[o] for o in range(n_classes) if o != c} - {assoc[c]})
        out[c] = attrs
    for c, attrs in (override or {}).items():
        out[int(c)] = sorted({int(a) for a in attrs})
    return out


def resolve_token_override(
    value: Any, class_names: list[str], attr_names: list[str]
) -> dict[int, list[int]]:
    """``token_attributes`` option: a mapping class (name or index) -> attribute (name or
    index, or a list of them); ``None`` -> empty."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(
            "dbb option token_attributes must map a class (name or index) to an attribute "
            f"(name or index, or a list), e.g. {{{class_names[0]!r}: {attr_names[-1]!r}}}; "
            f"got {value!r}"
        )

    def index(item: Any, names: list[str], what: str) -> int:
        if isinstance(item, int) and not isinstance(item, bool) and 0 <= item < len(names):
            return int(item)
        if isinstance(item, str) and item in names:
            return names.index(item)
        raise ConfigError(
            f"dbb option token_attributes: {item!r} is not a {what} of this dataset "
            f"(names {names} or indices 0..{len(names) - 1})"
        )

    out = {}
    for key, attrs in value.items():
        c = index(int(key) if isinstance(key, str) and key.isdigit() else key, class_names, "class")
        items = attrs if isinstance(attrs, list | tuple) else [attrs]
        out[c] = [index(a, attr_names, "attribute") for a in items]
    return out


# --------------------------------------------------------------------- pruning
@dataclass(frozen=True)
class PruneDecision:
    """One candidate's verdict under a pruning mode."""

    keep: bool
    pass_psi: bool
    pass_rho: bool
    reason: str


def prune_decision(
    psi: float | None,
    psi_threshold: float,
    rho: float | None,
    rho_threshold: float,
    mode: str = "both",
    mask_ok: bool = True,
) -> PruneDecision:
    """DBB's pruning rule (Eq. 3-5): keep when ``psi < Psi_i`` and ``rho > P``.

    ``mode``: ``both`` (the paper), ``psi`` or ``rho`` (one condition), ``none`` (keep
    every generated candidate). A missing or NaN score fails its condition; a candidate
    whose image had no mask (nothing generated) is never kept. ``reason`` lists the
    failed conditions the mode applies (empty when kept).
    """
    if mode not in PRUNING_MODES:
        raise ConfigError(f"pruning mode must be one of {PRUNING_MODES}, got {mode!r}")
    pass_psi = psi is not None and not math.isnan(psi) and psi < psi_threshold
    pass_rho = rho is not None and not math.isnan(rho) and rho > rho_threshold
    if not mask_ok:
        return PruneDecision(False, pass_psi, pass_rho, REASON_NO_MASK)
    failed = []
    if mode in ("both", "psi") and not pass_psi:
        failed.append(REASON_PSI)
    if mode in ("both", "rho") and not pass_rho:
        failed.append(REASON_RHO)
    return PruneDecision(not failed, pass_psi, pass_rho, "; ".join(failed))


CALIBRATE = "calibrate"


def resolve_rho_thresholds(value: Any, n_classes: int) -> list[float] | None:
    """``rho_threshold``: one number for every class, a list ``[P_1, .., P_n]`` where
    ``P_c`` applies to candidates whose *new* class is ``c`` (Algorithm 1 compares rho with
    ``P_{i'}``; Table 10's ``P1``/``P2`` are labels 0/1), or ``"calibrate"`` (returns None:
    the thresholds are set from the candidates' scores, :func:`calibrate_rho_thresholds`)."""
    if isinstance(value, str) and value.strip().lower() == CALIBRATE:
        return None
    if isinstance(value, bool):
        raise ConfigError(
            f"dbb option rho_threshold must be a number, a list or 'calibrate', got {value!r}"
        )
    if isinstance(value, int | float):
        return [float(value)] * n_classes
    if isinstance(value, list | tuple) and len(value) == n_classes:
        try:
            return [float(v) for v in value]
        except (TypeError, ValueError):
            pass
    raise ConfigError(
        f"dbb option rho_threshold must be a number, a list of {n_classes} numbers (P_1 .. "
        f"P_{n_classes}, by new class) or 'calibrate', got {value!r}"
    )


def calibrate_rho_thresholds(
    rho: np.ndarray,
    new_class: np.ndarray,
    n_classes: int,
    samples: int,
    quantile: float,
    seed: int,
) -> list[float]:
    """``P_c`` from the IG scores of a subset of generated samples (section 5.1: "The
    threshold P was determined using IG scores from a subset of generated samples").

    The paper does not give the rule; ours: per new class ``c``, a random subset (``seed``)
    of at most ``samples`` candidates with a finite ``rho``, and ``P_c`` = the ``quantile``
    of their ``rho``. NaN for a class without any scored candidate (nothing to keep).
    """
    rho = np.asarray(rho, dtype=np.float64)
    new_class = np.asarray(new_class)
    rng = np.random.default_rng(seed)
    out = []
    for c in range(n_classes):
        members = np.flatnonzero((new_class == c) & np.isfinite(rho))
        if not len(members):
            out.append(math.nan)
            continue
        subset = rng.permutation(members)[:samples]
        out.append(float(np.quantile(rho[subset], quantile)))
    return out


# ------------------------------------------------------------------- objective
class DBBObjective(Objective):
    """``L_train + sum_c gamma_c * L_gen_c`` on batches of real and generated samples.

    ``is_generated[index]`` marks the generated items of the training dataset (indexed
    by the dataset index the loop passes). ``L_train`` is the mean CE of the batch's real
    items, ``L_gen_c`` the mean CE of its generated items of class ``c``; each is a
    weighted mean through :func:`weighted_cross_entropy`, so a batch with no such item
    adds 0 (with a graph), never NaN.
    """

    name = "dbb"

    def __init__(self, is_generated: torch.Tensor | np.ndarray, gammas: list[float]) -> None:
        if isinstance(is_generated, torch.Tensor):
            self.is_generated = is_generated.detach().cpu().to(torch.bool).clone()
        else:
            self.is_generated = torch.from_numpy(np.array(is_generated, dtype=bool))
        self.gammas = [float(g) for g in gammas]
        if any(g < 0 or not math.isfinite(g) for g in self.gammas):
            raise ConfigError(f"dbb gamma values must be finite and >= 0, got {self.gammas}")

    def __call__(self, logits, y, g, index):
        generated = self.is_generated[index.cpu()].to(logits.device)
        loss = weighted_cross_entropy(logits, y, (~generated).float())
        for c, gamma in enumerate(self.gammas):
            if gamma:
                selected = (generated & (y == c)).float()
                loss = loss + gamma * weighted_cross_entropy(logits, y, selected)
        return loss


def resolve_gammas(gamma: Any, n_classes: int) -> list[float]:
    if isinstance(gamma, bool):
        raise ConfigError(f"dbb option gamma must be a number or a list, got {gamma!r}")
    if isinstance(gamma, int | float):
        return [float(gamma)] * n_classes
    if isinstance(gamma, list | tuple) and len(gamma) == n_classes:
        try:
            return [float(v) for v in gamma]
        except (TypeError, ValueError) as err:
            raise ConfigError(f"dbb option gamma must hold numbers, got {gamma!r}") from err
    raise ConfigError(
        f"dbb option gamma must be a number or a list of {n_classes} numbers (gamma_1 .. "
        f"gamma_{n_classes}), got {gamma!r}"
    )


# --------------------------------------------------------------- small helpers
def _name(text: str) -> str:
    return " ".join(str(text).replace("_", " ").split())


def _file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _mask_tensor(mask: Image.Image, transform: Any, size: tuple[int, int]) -> torch.Tensor:
    """A PIL mask through the transform's geometric steps, resized to the model input
    ``size`` (H, W), as float in [0, 1] (``> 0`` = touched by the region)."""
    image = mask.convert("L")
    for step in list(getattr(transform, "steps", []) or []):
        image = step(image)
    if image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.BILINEAR)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)


def _check_options(options: dict[str, Any], n_classes: int) -> None:
    if options["pruning"] not in PRUNING_MODES:
        raise ConfigError(
            f"dbb option pruning={options['pruning']!r} is not one of {PRUNING_MODES}"
        )
    if options["token_source"] not in TOKEN_SOURCES:
        raise ConfigError(
            f"dbb option token_source={options['token_source']!r} is not one of {TOKEN_SOURCES}"
        )
    if options["init"] not in INITS:
        raise ConfigError(f"dbb option init={options['init']!r} is not one of {INITS}")
    if options["psi_reference"] not in PSI_REFERENCES:
        raise ConfigError(
            f"dbb option psi_reference={options['psi_reference']!r} is not one of {PSI_REFERENCES}"
        )
    if options["ig_target"] not in IG_TARGETS:
        raise ConfigError(
            f"dbb option ig_target={options['ig_target']!r} is not one of {IG_TARGETS}"
        )
    if options["retrain_optimizer"] not in (None, "sgd", "adam", "adamw"):
        raise ConfigError(
            f"dbb option retrain_optimizer={options['retrain_optimizer']!r} is not sgd, adam, "
            "adamw or null (the run's train.optimizer)"
        )
    quantile = options["rho_calibration_quantile"]
    if (
        isinstance(quantile, bool)
        or not isinstance(quantile, int | float)
        or not 0 <= quantile <= 1
    ):
        raise ConfigError(
            f"dbb option rho_calibration_quantile must be a number in [0, 1], got {quantile!r}"
        )
    flip = options["inversion_flip_probability"]
    if isinstance(flip, bool) or not isinstance(flip, int | float) or not 0 <= flip <= 1:
        raise ConfigError(f"dbb option inversion_flip_probability must be in [0, 1], got {flip!r}")
    if options["ig_output"] not in ("logit", "probability"):
        raise ConfigError(f"dbb option ig_output={options['ig_output']!r} is not logit|probability")
    for key in ("textual_inversion", "paste_back", "class_balanced"):
        if not isinstance(options[key], bool):
            raise ConfigError(f"dbb option {key} must be true or false")
    positive = (
        "token_samples", "inversion_steps", "inversion_batch_size", "ig_steps",
        "ig_batch_size", "generation_batch_size", "copies", "rho_calibration_samples",
    )  # fmt: skip
    for key in positive:
        value = options[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"dbb option {key} must be a positive integer, got {value!r}")
    for key in ("ig_internal_batch_size", "steps", "retrain_epochs", "retrain_batch_size"):
        value = options[key]
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ConfigError(f"dbb option {key} must be a positive integer or null, got {value!r}")
    if options["latent_blend"] not in LATENT_BLENDS:
        raise ConfigError(
            f"dbb option latent_blend={options['latent_blend']!r} is not {'|'.join(LATENT_BLENDS)}"
        )
    if options["mask_region"] not in ("mask", "box"):
        raise ConfigError(f"dbb option mask_region={options['mask_region']!r} is not mask|box")
    value = options["mask_dilation"]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"dbb option mask_dilation must be an integer >= 0, got {value!r}")
    if "{name}" not in options["prompt_template"] or "{token}" not in options["prompt_template"]:
        raise ConfigError("dbb option prompt_template must contain {token} and {name}")
    if "{name}" not in options["plain_template"]:
        raise ConfigError("dbb option plain_template must contain {name}")
    if not isinstance(options["masker_options"], dict) or not isinstance(options["domain"], dict):
        raise ConfigError("dbb options masker_options and domain must be mappings")
    if n_classes < 2:
        raise ConfigError("DBB turns samples of one class into another: it needs >= 2 classes")
    resolve_gammas(options["gamma"], n_classes)
    resolve_rho_thresholds(options["rho_threshold"], n_classes)
    value = options["retrain_weight_decay"]
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int | float) or value < 0
    ):
        raise ConfigError(f"dbb option retrain_weight_decay must be >= 0 or null, got {value!r}")
    retrain_learning_rates(options)


def retrain_learning_rates(options: dict[str, Any]) -> list[float] | None:
    """The retraining learning rates to try: ``retrain_lr_grid`` under ``retrain_lr:
    search``, the one given rate, or ``None`` for the run's ``train.lr``."""
    value = options["retrain_lr"]
    if value is None:
        return None
    if value == RETRAIN_LR_SEARCH:
        grid = options["retrain_lr_grid"]
        if not isinstance(grid, list | tuple) or not grid:
            raise ConfigError(
                f"dbb option retrain_lr_grid must be a non-empty list of rates, got {grid!r}"
            )
        rates = list(grid)
    else:
        rates = [value]
    for rate in rates:
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not rate > 0:
            raise ConfigError(
                f"dbb option retrain_lr / retrain_lr_grid: {rate!r} is not a positive number; "
                f"give a rate (e.g. 1.0e-4), {RETRAIN_LR_SEARCH!r} or null (the run's train.lr)"
            )
    return [float(rate) for rate in rates]


def _target_class(source: int, copy: int, n_classes: int) -> int:
    return (source + 1 + copy % (n_classes - 1)) % n_classes


# -------------------------------------------------------------------- the method
@register_method
class DBB(Method):
    """DBB (diffusion-driven balancing): inpaint the other class's causal token into
    low-loss samples, prune by ERM softmax and Integrated Gradients, retrain with
    upweighted losses. See the module docstring for every stage, default and choice."""

    name = "dbb"
    supervision = Supervision(
        train_group_labels=False, val_group_labels=True, val_labels_only_for_selection=False
    )
    uses_reference = True
    summary = "diffusion-driven balancing: textual inversion + inpainting + IG pruning"
    defaults: dict[str, Any] = {
        "generator": "domain",
        "domain": {},
        "masker": "text_prompt",
        "masker_options": {},
        "object_word": None,
        "mask_dilation": 0,
        "mask_region": "mask",
        "k": 500,
        "class_balanced": False,
        "copies": 1,
        "textual_inversion": True,
        "inversion_model": None,
        "token_source": "val_minority",
        "token_attributes": None,
        "token_samples": 30,
        "initializer": None,
        "inversion_steps": 3000,
        "inversion_lr": 5e-4,
        "inversion_batch_size": 4,
        "inversion_flip_probability": 0.0,
        "inversion_templates": None,
        "prompt_template": "a photo of a {token} {name}",
        "plain_template": "a photo of a {name}",
        "steps": None,
        "guidance_scale": None,
        "strength": 1.0,
        "paste_back": False,
        "latent_blend": "clean",  # Eq. 2 (docstring step 5); official generate.py: none
        "generation_batch_size": 8,
        "psi_reference": "class",
        "pruning": "both",
        "rho_threshold": CALIBRATE,
        "rho_calibration_samples": 100,
        "rho_calibration_quantile": 0.25,
        "ig_target": "new",
        "ig_steps": 50,
        "ig_internal_batch_size": 256,
        "ig_batch_size": 32,
        "ig_output": "logit",
        "gamma": 1.0,
        "init": "reference",
        "retrain_epochs": None,
        "retrain_lr": RETRAIN_LR_SEARCH,  # our choice: chosen on validation (docstring 7)
        "retrain_lr_grid": list(RETRAIN_LR_GRID),
        "retrain_batch_size": None,
        "retrain_optimizer": "adam",  # paper silent; official train.py: Adam
        "retrain_weight_decay": 0.0,  # paper silent; official train.py: no weight decay
        "figures": 8,
        "shared_cache": None,  # our option: a speed-up that changes no image (docstring 9)
    }
    # A tiny, fast run for the registry-wide test: a tiny domain model trained for one
    # step per stage, ground-truth masks (the debug data is the synthetic benchmark),
    # two textual-inversion steps, two denoising steps, one retraining epoch.
    debug_options: dict[str, Any] = {
        "domain": {
            "sizes": "tiny", "image_size": 16, "vae_steps": 1, "unet_steps": 1,
            "inpaint_steps": 1, "batch_size": 4, "save_every": 1, "log_every": 1,
        },
        "masker": "ground_truth",
        "k": 4,
        "token_samples": 2,
        "inversion_steps": 2,
        "inversion_batch_size": 2,
        "steps": 2,
        "guidance_scale": 2.0,
        "ig_steps": 4,
        "retrain_epochs": 1,
        "retrain_lr_grid": [1e-4, 1e-3],
        "figures": 2,
    }  # fmt: skip

    # ------------------------------------------------------------------ run
    def run(self, context: RunContext) -> tuple[nn.Module, FitResult]:
        options = context.options
        table = context.train.table
        n_classes = table.n_classes
        _check_options(options, n_classes)
        # Refuse bad token settings before any training (ERM, domain model).
        resolve_token_override(
            options["token_attributes"], list(table.class_names), list(table.attr_names)
        )
        if options["textual_inversion"]:
            inversion_templates(options, "x")
            if not _is_domain(str(options["generator"])):
                inversion_weights(options, context)  # a look-up only, for hub ids and dirs
        directory = context.out_dir / STAGE
        directory.mkdir(parents=True, exist_ok=True)

        reference = context.reference_model()
        view = with_transform(context.train, context.eval_transform)
        batch = context.config.train.eval_batch_size
        losses, probabilities = reference_scores(reference, view, batch)
        y = view.y.numpy()
        pool = training_pool(y, n_classes, bool(options["class_balanced"]), context.config.seed)
        class_sizes = np.bincount(y[pool], minlength=n_classes)
        counts = resolve_k(options["k"], class_sizes)
        selected = rank_per_class(losses, y, counts, lowest=True, pool=pool)
        if options["psi_reference"] == "low_loss":
            psi_thresholds = low_loss_mean_softmax(probabilities, selected, n_classes)
        else:
            psi_thresholds = class_mean_softmax(probabilities[pool], y[pool], n_classes)
        reference_id = model_hash(reference)[:16]  # the whole model: psi needs the head

        generator = self._generator(context, options)
        masker = _MaskSource(context, options, reference)
        shared = StageSharing(options["shared_cache"], directory)

        def inputs(stage: str) -> dict[str, Any]:
            return shared_inputs(context, options, reference_id, generator.weights_id, stage)

        token_info = {}
        tokens: dict[int, str] = {}
        if options["textual_inversion"]:
            shared.restore(TOKENS_STAGE, inputs(TOKENS_STAGE), "tokens")
            tokens, token_info = self._tokens(
                context, options, generator, masker, losses, y, pool, directory
            )
            shared.publish(TOKENS_STAGE, inputs(TOKENS_STAGE), "tokens")
        atomic_write_json(
            directory / "selection.json",
            {
                "k": counts,
                "class_balanced": bool(options["class_balanced"]),
                "pool_size": int(len(pool)),
                "psi_reference": options["psi_reference"],
                "psi_thresholds": psi_thresholds.tolist(),
                "selected": {str(c): p.tolist() for c, p in selected.items()},
                "selected_losses": {str(c): losses[p].tolist() for c, p in selected.items()},
                "tokens": token_info,
                "reference": reference_id,
            },
        )

        shared.restore(CANDIDATES_STAGE, inputs(CANDIDATES_STAGE), "store")
        store, requests, mask_ok = self._generate(
            context, options, generator, masker, reference, selected, tokens,
            psi_thresholds, reference_id, directory,
        )  # fmt: skip
        shared.publish(CANDIDATES_STAGE, inputs(CANDIDATES_STAGE), "store")
        candidates, rho_thresholds = self._decide(
            store, requests, mask_ok, psi_thresholds, options, n_classes, context.config.seed
        )
        atomic_write_text(directory / "candidates.csv", candidates.to_csv(index=False))
        statistics = self._statistics(candidates, counts, table.class_names, options)
        statistics["rho_thresholds"] = rho_thresholds
        statistics["rho_calibrated"] = (
            resolve_rho_thresholds(options["rho_threshold"], n_classes) is None
        )
        statistics["psi_thresholds"] = psi_thresholds.tolist()
        atomic_write_json(directory / "statistics.json", statistics)
        atomic_write_text(directory / "statistics.md", statistics_markdown(statistics) + "\n")
        if options["figures"]:
            self._figure(store, candidates, directory, table, options["figures"])

        model, result = self._retrain(context, options, reference, store, candidates, pool)
        summary = {
            "pruning": options["pruning"],
            "textual_inversion": options["textual_inversion"],
            "generated": int(len(candidates)),
            "used": int(candidates["used"].sum()) if len(candidates) else 0,
            "weights": generator.weights_id,
            "statistics": "statistics.json",
            "restored_from_shared_cache": shared.restored(["tokens", "store"]),
        }
        atomic_write_json(directory / "dbb.json", summary)
        history = [*result.history, {"dbb": summary}]
        return model, replace(result, history=history)

    # ------------------------------------------------------------ generator
    def _generator(self, context: RunContext, options: dict[str, Any]):
        from unspur.generate.engine import generator_for

        return generator_for(
            options["generator"],
            "inpaint",
            table=context.train.table,
            run_dir=context.out_dir,
            domain=options["domain"],
            device=_device(context),
            cache=False,  # tokens are loaded into it
        )

    # --------------------------------------------------------------- tokens
    def _tokens(self, context, options, generator, masker, losses, y, pool, directory):
        """One token per class, learned on the text-to-image model of the generator's
        family (:func:`inversion_weights`) with the class name in the template, then
        loaded into the inpainting pipeline (dimension check in ``load_embedding``)."""
        from unspur.generate.textual_inversion import load_embedding, train_textual_inversion

        table = context.train.table
        n_classes = table.n_classes
        samples = self._token_samples(context, options, losses, y, pool)
        inversion, weights = self._inversion_pipeline(context, options, generator)
        files: dict[int, Path] = {}
        info: dict[str, Any] = {}
        for c in range(n_classes):
            dataset, positions, source = samples[c]
            if not len(positions):
                raise ConfigError(
                    f"DBB found no sample of class {table.class_names[c]!r} for its token"
                )
            images = [dataset.raw(int(p)) for p in positions]
            masks = None
            with_masks = 0
            if _is_inpainting(inversion):  # inversion_model: generator (an inpainting UNet)
                results = masker.masks(dataset, positions, images, [c] * len(positions), c)
                good = [i for i, r in enumerate(results) if r.ok]
                if good:
                    images = [images[i] for i in good]
                    masks = [results[i].mask for i in good]
                    with_masks = len(good)
            initializer = options["initializer"] or _initializer(
                inversion.tokenizer, table.class_names[c], options["object_word"]
            )
            name = _name(options["object_word"] or table.class_names[c])
            templates = inversion_templates(options, name)
            files[c] = train_textual_inversion(
                inversion,
                images,
                directory / "tokens" / f"class{c}",
                placeholder_token=_token(c),
                initializer_token=initializer,
                templates=templates,
                steps=int(options["inversion_steps"]),
                learning_rate=float(options["inversion_lr"]),
                batch_size=int(options["inversion_batch_size"]),
                seed=context.config.seed,
                masks=masks,
                flip_probability=float(options["inversion_flip_probability"]),
                save_every=max(1, min(500, int(options["inversion_steps"]))),
                device=_device(context) or "auto",
            )
            info[str(c)] = {
                "token": _token(c),
                "source": source,
                "positions": [int(p) for p in positions],
                "attributes": [int(a) for a in np.unique(dataset.a.numpy()[positions])],
                "with_masks": with_masks,
                "initializer": initializer,
                "templates": templates[:3],
                "inversion_model": weights,
                "file": str(files[c].relative_to(directory)),
                "digest": _file_digest(files[c]),
            }
        if inversion is not generator.pipeline:
            _check_same_text_encoder(inversion, generator.pipeline, weights)
            del inversion
        for c, file in files.items():
            load_embedding(generator.pipeline, file, _token(c))
        return {c: _token(c) for c in files}, info

    def _inversion_pipeline(self, context, options, generator):
        """The pipeline tokens are trained on and its weights' name."""
        weights = inversion_weights(options, context)
        if weights == "generator":
            return generator.pipeline, "generator"
        from unspur.generate.pipelines import load_generator

        t2i = load_generator(weights, "text2image", device=_device(context), cache=False)
        return t2i.pipeline, weights

    def _token_samples(self, context, options, losses, y, pool):
        """Per class: (dataset, positions, source) of the token's training images.

        ``val_minority``: validation samples of class ``i'`` with the attributes of
        :func:`token_attributes` (the other class's usual attribute; override with
        ``token_attributes``), ``token_samples`` of them drawn by the run seed; a class
        with none falls back to ``high_loss``: its highest-loss training samples under ERM
        (the paper's other source, section 5.1).
        """
        table = context.train.table
        n = int(options["token_samples"])
        rng = np.random.default_rng(context.config.seed)
        out = {}
        source = options["token_source"]
        override = resolve_token_override(
            options["token_attributes"], list(table.class_names), list(table.attr_names)
        )
        wanted_attrs = token_attributes(
            context.train_group_counts, table.n_classes, table.n_attrs, override
        )
        for c in range(table.n_classes):
            if source == "val_minority" and context.val is not None:
                members = np.flatnonzero(
                    (context.val.y.numpy() == c) & np.isin(context.val.a.numpy(), wanted_attrs[c])
                )
                if len(members):
                    chosen = np.sort(rng.permutation(members)[:n])
                    out[c] = (context.val, chosen, "val_minority")
                    continue
                logger.warning(
                    "DBB: no validation sample of class %s with attribute(s) %s; its token "
                    "uses the highest-loss training samples instead",
                    table.class_names[c],
                    [table.attr_names[a] for a in wanted_attrs[c]],
                )
            wanted = [n if k == c else 0 for k in range(table.n_classes)]
            top = rank_per_class(losses, y, wanted, lowest=False, pool=pool)[c]
            out[c] = (context.train, np.sort(top), "high_loss")
        return out

    # ----------------------------------------------------------- generation
    def _generate(self, context, options, generator, masker, reference, selected, tokens,
                  psi_thresholds, reference_id, directory):  # fmt: skip
        from unspur.generate.pipelines import GenerationSettings
        from unspur.generate.store import GenerationRequest, SyntheticStore, generate_into_store

        table = context.train.table
        n_classes = table.n_classes
        train = context.train
        steps, guidance = _sampling(options, context)
        settings = GenerationSettings(
            steps=steps,
            guidance_scale=guidance,
            strength=float(options["strength"]),
            batch_size=int(options["generation_batch_size"]),
            mask_dilation=0,  # masks are dilated before they are stored
            paste_back=bool(options["paste_back"]),  # Eq. 2 keeps latents, pastes no pixels
            latent_blend=str(options["latent_blend"]),  # Eq. 2: z_0 outside the mask
        )
        token_digest = {
            str(c): _file_digest(directory / "tokens" / f"class{c}" / "learned_embeds.safetensors")
            for c in tokens
        }
        a_values = train.a.numpy()
        requests: list[GenerationRequest] = []
        mask_ok: dict[str, tuple[bool, str, float]] = {}
        for c in range(n_classes):
            positions = selected[c]
            if not len(positions):
                continue
            images = [train.raw(int(p)) for p in positions]
            results = masker.masks(train, positions, images, [c] * len(positions), c)
            for copy in range(int(options["copies"])):
                target = _target_class(c, copy, n_classes)
                prompt = self._prompt(options, tokens, table.class_names, target)
                for p, image, result in zip(positions, images, results, strict=True):
                    key = f"class{c}/row{int(p):06d}-{copy}"
                    mask = result.mask
                    if options["mask_region"] == "box" and result.ok:
                        mask = box_mask(mask)
                    mask = _dilated(mask, int(options["mask_dilation"]))
                    mask_ok[key] = (bool(result.ok), result.reason, float(result.area))
                    requests.append(
                        GenerationRequest(
                            key=key,
                            prompt=prompt,
                            seed=_seed(context.config.seed, int(p), copy),
                            y=target,
                            a=int(a_values[p]),
                            parent=str(train.filenames[int(p)]),
                            image=image,
                            mask=mask,
                            extra={
                                "source_y": c,
                                "row": int(p),
                                "reference": reference_id,
                                "tokens": token_digest,
                                "settings": {
                                    "steps": steps,
                                    "guidance_scale": guidance,
                                    "strength": settings.strength,
                                    "mask_dilation": int(options["mask_dilation"]),
                                    "mask_region": options["mask_region"],
                                    "paste_back": bool(options["paste_back"]),
                                    "latent_blend": options["latent_blend"],
                                },
                            },
                        )  # fmt: skip
                    )

        def generate(batch):
            out: list[Image.Image | None] = [None] * len(batch)
            todo = [i for i, r in enumerate(batch) if mask_ok[r.key][0]]
            for i, r in enumerate(batch):
                if i not in todo:
                    out[i] = r.image.convert("RGB")  # nothing to inpaint: recorded, never used
            if todo:
                made = generator.inpaint(
                    [batch[i].image for i in todo],
                    [batch[i].mask for i in todo],
                    [batch[i].prompt for i in todo],
                    [batch[i].seed for i in todo],
                    settings,
                )
                for i, image in zip(todo, made, strict=True):
                    out[i] = image
            return out

        scorer = _Scorer(
            reference, context.eval_transform, psi_thresholds, options, mask_ok, n_classes
        )
        store = SyntheticStore(directory / "store")
        generate_into_store(
            store,
            requests,
            generate,
            generator_name="dbb-inpaint",
            weights_id=generator.weights_id,
            batch_size=int(options["generation_batch_size"]),
            filters=[scorer.mask_filter, scorer.psi_filter, scorer.rho_filter],
        )
        return store, requests, mask_ok

    @staticmethod
    def _prompt(options, tokens, class_names, target) -> str:
        name = _name(options["object_word"] or class_names[target])
        if target in tokens:
            return options["prompt_template"].format(token=tokens[target], name=name)
        return options["plain_template"].format(name=name)

    # ------------------------------------------------------------- pruning
    def _decide(self, store, requests, mask_ok, psi_thresholds, options, n_classes, seed):
        """Every candidate's scores, thresholds and verdicts (``candidates.csv``) and the
        per-new-class ``P`` (given, or calibrated here from the stored rho scores).

        ``kept_paper_rule`` is the paper's rule (both conditions) under the thresholds of
        *this* run, recomputed from the stored scores; ``used`` the ``pruning`` mode's.
        """
        import pandas as pd

        frame = store.to_frame([r.key for r in requests])
        wanted = {r.key for r in requests}
        frame = frame[frame["key"].isin(wanted)].reset_index(drop=True)
        thresholds = resolve_rho_thresholds(options["rho_threshold"], n_classes)
        if thresholds is None:
            ok = frame["key"].map(lambda k: bool(mask_ok.get(k, (True, "", 0.0))[0]))
            scores = frame["score_rho"] if "score_rho" in frame.columns else None
            rho = (
                pd.to_numeric(scores, errors="coerce").to_numpy(dtype=np.float64)
                if scores is not None
                else np.full(len(frame), np.nan)
            )
            rho = np.where(ok.to_numpy(dtype=bool), rho, np.nan)
            thresholds = calibrate_rho_thresholds(
                rho,
                frame["y"].to_numpy(),
                n_classes,
                int(options["rho_calibration_samples"]),
                float(options["rho_calibration_quantile"]),
                seed,
            )
        rows = []
        for _, row in frame.iterrows():
            source = int(row["extra_source_y"])
            target = int(row["y"])
            psi = _float(row.get("score_psi"))
            rho = _float(row.get("score_rho"))
            ok = bool(mask_ok.get(row["key"], (True, "", 0.0))[0])
            threshold = float(thresholds[target])
            psi_threshold = float(psi_thresholds[source])
            decision = prune_decision(psi, psi_threshold, rho, threshold, options["pruning"], ok)
            paper = prune_decision(psi, psi_threshold, rho, threshold, "both", ok)
            reason = decision.reason
            if not ok:
                reason = f"{REASON_NO_MASK} ({mask_ok[row['key']][1] or 'empty'})"
            rows.append(
                {
                    "key": row["key"],
                    "filename": row["filename"],
                    "parent": row["parent"],
                    "source_y": source,
                    "y": target,
                    "a": int(row["a"]),
                    "mask_ok": ok,
                    "psi": psi,
                    "Psi": psi_threshold,
                    "pass_psi": decision.pass_psi,
                    "rho": rho,
                    "P": threshold,
                    "pass_rho": decision.pass_rho,
                    "kept_paper_rule": paper.keep,
                    "used": decision.keep,
                    "reason": reason,
                }
            )
        columns = [
            "key", "filename", "parent", "source_y", "y", "a", "mask_ok", "psi", "Psi",
            "pass_psi", "rho", "P", "pass_rho", "kept_paper_rule", "used", "reason",
        ]  # fmt: skip
        return pd.DataFrame(rows, columns=columns), [float(v) for v in thresholds]

    @staticmethod
    def _statistics(candidates, counts, class_names, options) -> dict[str, Any]:
        rows = []
        for c, name in enumerate(class_names):
            part = candidates[candidates["source_y"] == c] if len(candidates) else candidates
            generated = part[part["mask_ok"]] if len(part) else part
            rows.append(
                {
                    "source_class": name,
                    "new_class": ", ".join(sorted({class_names[int(t)] for t in part["y"]}))
                    if len(part)
                    else "",
                    "selected": int(counts[c]),
                    "no_mask": int((~part["mask_ok"]).sum()) if len(part) else 0,
                    "generated": int(len(generated)),
                    "pass_psi": int(generated["pass_psi"].sum()) if len(part) else 0,
                    "pass_rho": int(generated["pass_rho"].sum()) if len(part) else 0,
                    "kept_paper_rule": int(generated["kept_paper_rule"].sum()) if len(part) else 0,
                    "pruned_paper_rule": int((~generated["kept_paper_rule"]).sum())
                    if len(part)
                    else 0,
                    "used": int(part["used"].sum()) if len(part) else 0,
                }
            )
        return {"pruning": options["pruning"], "classes": rows}

    # --------------------------------------------------------------- figure
    @staticmethod
    def _figure(store, candidates, directory, table, limit) -> None:
        """Original | mask | generated for up to ``limit`` candidates, used and pruned."""
        from PIL import ImageDraw

        from unspur.explain.figures import save_png

        class_names = table.class_names

        good = candidates[candidates["mask_ok"]]
        if not len(good):
            return
        # Alternate kept and pruned examples when both exist.
        kept, pruned = good[good["used"]], good[~good["used"]]
        picks = []
        for i in range(limit):
            source = kept if i % 2 == 0 else pruned
            if i // 2 < len(source):
                picks.append(source.iloc[i // 2])
        picks = picks or [good.iloc[i] for i in range(min(limit, len(good)))]
        cell = 96
        canvas = Image.new("RGB", (3 * cell, 14 + len(picks) * (cell + 14)), "white")
        draw = ImageDraw.Draw(canvas)
        for c, title in enumerate(("original", "mask", "generated")):
            draw.text((c * cell + 3, 1), title, fill="black")
        for r, row in enumerate(picks):
            top = 14 + r * (cell + 14)
            image = store.image(row["key"]).convert("RGB")
            mask_path = store.path(store.mask_filename(row["key"]))
            mask = Image.open(mask_path).convert("RGB") if mask_path.is_file() else image
            parent = table.store.open(row["parent"]).convert("RGB")
            for c, tile in enumerate((parent, mask, image)):
                canvas.paste(tile.resize((cell, cell), Image.NEAREST), (c * cell, top))
            label = (
                f"{class_names[int(row['source_y'])]}->{class_names[int(row['y'])]} "
                f"{'used' if row['used'] else 'pruned'} psi={row['psi']:.2f} rho={row['rho']:.2f}"
                f" P={row['P']:.2f}"
            )
            draw.text((3, top + cell + 1), label[: 3 * cell // 6], fill="black")
        save_png(canvas, directory / "figures" / "samples.png")

    # ------------------------------------------------------------ retraining
    def _retrain(self, context, options, reference, store, candidates, pool):
        table = context.train.table
        used = set(candidates.loc[candidates["used"], "key"]) if len(candidates) else set()
        merged = store.to_table(table, kept_only=False, prefix="dbb-generated/")
        frame = merged.frame
        synthetic = (frame["source"] == "synthetic").to_numpy()
        in_pool = np.zeros(len(frame), dtype=bool)
        in_pool[np.asarray(pool, dtype=np.int64)] = True  # real rows come first, in order
        keep = ~synthetic & in_pool
        if "key" in frame.columns:
            keep = keep | frame["key"].isin(used).to_numpy()
        merged = merged.subset(keep)
        is_generated = (merged.frame["source"] == "synthetic").to_numpy()
        if not is_generated.any():
            logger.warning("DBB: no generated sample survived; retraining on real data only")
        dataset = GroupDataset(merged, context.train.transform)
        base = context.config.train
        config = replace(
            base,
            epochs=int(options["retrain_epochs"] or base.epochs),
            batch_size=int(options["retrain_batch_size"] or base.batch_size),
            optimizer=options["retrain_optimizer"] or base.optimizer,
            weight_decay=float(
                base.weight_decay
                if options["retrain_weight_decay"] is None
                else options["retrain_weight_decay"]
            ),
        )
        objective = DBBObjective(is_generated, resolve_gammas(options["gamma"], table.n_classes))
        rates = retrain_learning_rates(options) or [float(base.lr)]
        search = options["retrain_lr"] == RETRAIN_LR_SEARCH
        rule = candidate_rule(base.selection)
        start = deepcopy(reference.state_dict())  # every candidate starts here
        candidates, best = [], None
        for rate in rates:
            seed_everything(context.config.seed)
            if options["init"] == "scratch":
                model = context.build_model()
            else:
                model = reference
                model.load_state_dict(start)
                if options["init"] == "reference_new_head":
                    model.reset_head()  # the official train.py re-draws the head
            stage = f"{STAGE}/retrain_lr{rate:g}" if search else f"{STAGE}/retrain"
            result = context.fit(
                model,
                stage,
                train=dataset,
                train_config=replace(config, lr=rate),
                objective=objective,
            )
            score = candidate_score(result, rule)
            candidates.append({"lr": rate, "score": score, "best_epoch": result.best_epoch})
            if best is None or score > best[0]:
                best = (score, rate, result, deepcopy(model.state_dict()))
        assert best is not None
        _, rate, result, state = best
        model.load_state_dict(state)
        model.eval()
        if search:
            atomic_write_json(
                context.out_dir / STAGE / "retrain_search.json",
                {"metric": rule, "chosen_lr": rate, "candidates": candidates},
            )
        history = [*result.history, {"dbb": {"retrain_lr": rate}}]
        return model, replace(result, history=history)


# ------------------------------------------------------------------ scoring
def rho_scores(
    model: nn.Module,
    new: torch.Tensor,
    old: torch.Tensor,
    masks: torch.Tensor,
    targets: list[int],
    options: dict[str, Any],
) -> torch.Tensor:
    """Eq. 4-5: IG of class ``targets`` (the new class ``i'``) along the straight path
    from the original image ``old`` (the baseline) to the generated ``new``, summed over
    channels and over the pixels of ``masks``. ``new`` is the inpainting model's output
    as it is (no paste-back by default), so pixels outside the mask may differ from the
    baseline too; their attributions are left out of ``rho`` (the paper's sum is inside
    the mask). Model inputs through the classifier's eval transform."""
    from unspur.explain.integrated_gradients import (
        integrated_gradients,
        masked_attribution_sum,
    )

    attributions = integrated_gradients(
        model,
        new,
        old,
        targets,
        n_steps=int(options["ig_steps"]),
        internal_batch_size=options["ig_internal_batch_size"],
        batch_size=int(options["ig_batch_size"]),
        output=options["ig_output"],
    )
    return masked_attribution_sum(attributions, masks)


class _Scorer:
    """The store filters: mask, ``psi`` and ``rho`` of each generated batch."""

    def __init__(self, model, transform, psi_thresholds, options, mask_ok, n_classes) -> None:
        self.model = model
        self.transform = transform
        self.psi_thresholds = psi_thresholds
        # None: P is calibrated after generation; the store records rho and keeps.
        self.rho_thresholds = resolve_rho_thresholds(options["rho_threshold"], n_classes)
        self.options = options
        self.mask_ok = mask_ok

    def _inputs(self, requests, images) -> tuple[torch.Tensor, torch.Tensor]:
        new = torch.stack([self.transform(image.convert("RGB")) for image in images])
        old = torch.stack([self.transform(r.image.convert("RGB")) for r in requests])
        return new, old

    def mask_filter(self, requests, images):
        from unspur.generate.store import FilterResult

        out = []
        for r in requests:
            ok, reason, area = self.mask_ok[r.key]
            out.append(
                FilterResult("mask_area", area, ok, "" if ok else f"{REASON_NO_MASK} ({reason})")
            )
        return out

    def psi_filter(self, requests, images):
        from unspur.generate.store import FilterResult

        new, _ = self._inputs(requests, images)
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            probabilities = torch.softmax(self.model(new.to(device)).float(), 1).cpu()
        self.model.train(was_training)
        out = []
        for j, r in enumerate(requests):
            source = int(r.extra["source_y"])
            psi = float(probabilities[j, source])
            keep = psi < float(self.psi_thresholds[source])
            out.append(FilterResult("psi", psi, keep, "" if keep else REASON_PSI))
        return out

    def rho_filter(self, requests, images):
        from unspur.generate.store import FilterResult

        out: list[FilterResult | None] = [None] * len(requests)
        todo = [j for j, r in enumerate(requests) if self.mask_ok[r.key][0]]
        for j in range(len(requests)):
            if j not in todo:
                out[j] = FilterResult("rho", None, False, REASON_NO_MASK)
        if todo:
            new, old = self._inputs([requests[j] for j in todo], [images[j] for j in todo])
            size = tuple(new.shape[-2:])
            masks = torch.stack(
                [_mask_tensor(requests[j].mask, self.transform, size) for j in todo]
            )
            key = "y" if self.options["ig_target"] == "new" else "source_y"
            targets = [
                int(requests[j].y if key == "y" else requests[j].extra["source_y"]) for j in todo
            ]
            rho = rho_scores(self.model, new, old, masks, targets, self.options)
            for j, value in zip(todo, rho.tolist(), strict=True):
                keep = True
                if self.rho_thresholds is not None:
                    keep = value > self.rho_thresholds[int(requests[j].y)]
                out[j] = FilterResult("rho", float(value), keep, "" if keep else REASON_RHO)
        if any(o is None for o in out):
            raise UnspurError("DBB rho filter left a candidate without a verdict")
        return out


# ------------------------------------------------------------ shared cache
def shared_inputs(
    context: RunContext, options: dict[str, Any], reference_id: str, weights_id: str, stage: str
) -> dict[str, Any]:
    """Every input of DBB's ``stage`` (tokens or candidates): the run's config without
    the options read only later (:data:`AFTER_GENERATION`, and :data:`AFTER_TOKENS` for
    the tokens), the ERM model's hash and the generator's weights."""
    from unspur.stages import method_stage_inputs

    later = AFTER_GENERATION + (AFTER_TOKENS if stage == TOKENS_STAGE else ())
    return method_stage_inputs(
        context.config, options, later, stage=stage, reference=reference_id, generator=weights_id
    )


# ----------------------------------------------------------------- maskers
class _MaskSource:
    """Object masks of dataset images from the configured masker (built once)."""

    def __init__(self, context: RunContext, options: dict[str, Any], reference: nn.Module):
        from unspur.generate.maskers import MASKER_ALIASES, MASKER_KINDS

        kind = str(options["masker"]).strip().lower()
        self.kind = MASKER_ALIASES.get(kind, kind)
        if self.kind not in MASKER_KINDS:
            raise ConfigError(
                f"dbb option masker={options['masker']!r} is not one of {MASKER_KINDS}"
            )
        self.options = dict(options["masker_options"])
        self.object_word = options["object_word"]
        self.context = context
        self.reference = reference
        self._shared = None
        self._by_table: dict[int, Any] = {}

    def _masker(self, dataset):
        from unspur.generate.maskers import build_masker

        if self.kind == "ground_truth":
            key = id(dataset.table)
            if key not in self._by_table:
                self._by_table[key] = build_masker("ground_truth", table=dataset.table)
            return self._by_table[key]
        if self._shared is None:
            opts = dict(self.options)
            if self.kind == "saliency":
                data = self.context.config.data
                opts.setdefault("model", self.reference)
                opts.setdefault("image_size", data.image_size)
                opts.setdefault("normalize", data.normalize)
            self._shared = build_masker(self.kind, **opts)
        return self._shared

    def masks(self, dataset, positions, images, targets, source_class):
        if not len(positions):
            return []
        word = _name(self.object_word or dataset.table.class_names[source_class])
        return self._masker(dataset).masks(
            images,
            [word] * len(images),
            rows=[int(p) for p in positions],
            targets=[int(t) for t in targets],
        )


# ---------------------------------------------------------------- utilities
def reference_scores(model: nn.Module, view: Any, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample CE (``reduction="none"``) and softmax of ``model`` on every item."""
    from unspur.evaluate.predict import predict

    preds = predict(model, view, batch_size)
    logits = torch.from_numpy(preds.logits).float()
    y = torch.from_numpy(preds.y).long()
    losses = F.cross_entropy(logits, y, reduction="none").numpy()
    return losses, torch.softmax(logits, 1).numpy()


def _token(c: int) -> str:
    return f"<dbb-{c}>"


def _seed(run_seed: int, row: int, copy: int) -> int:
    return (int(run_seed) * 1_000_003 + row * 16 + copy) % (2**31 - 1)


def _float(value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.nan
    return value


def box_mask(mask: Image.Image) -> Image.Image:
    """The bounding box of a binary ``"L"`` mask, filled (an empty mask stays empty)."""
    array = np.asarray(mask.convert("L")) >= 128
    out = np.zeros(array.shape, dtype=np.uint8)
    if array.any():
        rows, cols = np.flatnonzero(array.any(1)), np.flatnonzero(array.any(0))
        out[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] = 255
    return Image.fromarray(out, mode="L")


def _dilated(mask: Image.Image, pixels: int) -> Image.Image:
    from unspur.generate.maskers import dilate

    return dilate(mask, pixels) if pixels else mask


def _device(context: RunContext) -> str | None:
    device = context.config.train.device
    return None if device == "auto" else device


def _is_domain(spec: str) -> bool:
    from unspur.generate.engine import DOMAIN, is_domain_model_dir

    return spec == DOMAIN or is_domain_model_dir(str(spec))


def _sampling(options: dict[str, Any], context: RunContext) -> tuple[int, float]:
    """Inpainting steps and guidance: the options, else the domain model's own sampling
    settings, else Stable Diffusion's (50 steps, guidance 7.5)."""
    from unspur.generate.engine import domain_model_dir

    steps, guidance = 50, 7.5
    spec = str(options["generator"])
    if _is_domain(spec):
        folder = domain_model_dir(spec, context.out_dir)  # also a shipped unspur:<name>
        try:
            sampling = json.loads((folder / "domain.json").read_text()).get("sampling", {})
            steps = int(sampling.get("num_inference_steps", 25))
            guidance = float(sampling.get("guidance_scale", 4.0))
        except (OSError, ValueError):
            steps, guidance = 25, 4.0
    if options["steps"] is not None:
        steps = int(options["steps"])
    if options["guidance_scale"] is not None:
        guidance = float(options["guidance_scale"])
    return steps, guidance


#: Inpainting checkpoints and the text-to-image model of their family (same text
#: encoder), on which DBB's tokens are learned: the official DBB code trains on SD-2 base
#: for SD-2 inpainting (README: ``--pretrained_model_name_or_path
#: stabilityai/stable-diffusion-2-base``).
TEXT2IMAGE_OF = {
    "stabilityai/stable-diffusion-2-inpainting": "stabilityai/stable-diffusion-2-base",
    "runwayml/stable-diffusion-inpainting": "runwayml/stable-diffusion-v1-5",
}


def inversion_weights(options: dict[str, Any], context: RunContext) -> str:
    """Where the tokens are learned (``inversion_model``): ``null`` = the text-to-image
    model of the generator's family (a domain model's own text-to-image pipeline, which
    shares the inpainting pipeline's text encoder; :data:`TEXT2IMAGE_OF` for hub
    checkpoints); ``"generator"`` = the inpainting pipeline itself (object masks as the
    inpainting region); anything else = a hub id or local directory of a text-to-image
    pipeline with the generator's text encoder."""
    from unspur.generate.engine import DOMAIN, pipeline_weights

    chosen = options["inversion_model"]
    if chosen is not None:
        return str(chosen)
    spec = str(options["generator"])
    if _is_domain(spec):
        table = context.train.table if spec == DOMAIN else None  # "domain" trains it first
        return pipeline_weights(
            spec, "text2image", table=table, run_dir=context.out_dir, domain=options["domain"]
        )
    if spec in TEXT2IMAGE_OF:
        return TEXT2IMAGE_OF[spec]
    raise ConfigError(
        f"dbb: which text-to-image model shares the text encoder of generator {spec!r}? Set "
        "method option inversion_model to its hub id or directory (DBB learns its tokens "
        "there, e.g. stabilityai/stable-diffusion-2-base for SD-2 inpainting), or to "
        "'generator' to learn them on the inpainting pipeline itself"
    )


def inversion_templates(options: dict[str, Any], name: str) -> list[str]:
    """Token templates with the class name after the token (section 4.1: "A photo of a
    [C_landbird] bird"): ``inversion_templates`` (each with ``{}`` for the token and
    optionally ``{name}``), else diffusers' object templates with `` {name}`` after the
    token (as the official DBB ``textual_inversion.py`` does with "animal")."""
    from unspur.generate.textual_inversion import IMAGENET_TEMPLATES_SMALL

    given = options["inversion_templates"]
    if given is None:
        base = list(IMAGENET_TEMPLATES_SMALL)
        if _is_domain(str(options["generator"])):
            base = ["a photo of a {}"]  # a domain model only knows its captions' words
        return [template.replace("{}", "{} " + name) for template in base]
    if isinstance(given, str) or not all(isinstance(x, str) and "{}" in x for x in given):
        raise ConfigError("dbb option inversion_templates must be a list of strings with {}")
    return [template.replace("{name}", name) for template in given]


def _is_inpainting(pipeline: Any) -> bool:
    from unspur.generate.textual_inversion import resolve_components

    return resolve_components(pipeline).is_inpainting


def _check_same_text_encoder(inversion: Any, pipeline: Any, weights: str) -> None:
    """Warn when the token-embedding matrices of the two text encoders differ (a token
    then means something else in the inpainting pipeline); the dimension check itself
    is ``load_embedding``'s."""
    a = inversion.text_encoder.get_input_embeddings().weight
    b = pipeline.text_encoder.get_input_embeddings().weight
    n = min(a.shape[0], b.shape[0])
    same = a.shape[-1] == b.shape[-1] and torch.equal(
        a[:n].detach().to("cpu", torch.float16), b[:n].detach().to("cpu", torch.float16)
    )
    if not same:
        logger.warning(
            "DBB: the text encoder of %s differs from the inpainting pipeline's; tokens "
            "learned there may not carry over (set inversion_model to the text-to-image "
            "model of the generator's family)",
            weights,
        )


def _initializer(tokenizer, class_name: str, object_word: str | None) -> str:
    """A one-token word to start a class's token from: the object word (the class name
    of the template; the official DBB command initialises with it, "animal"), else the
    class name, its last word, else "object" / "photo"."""
    name = _name(class_name)
    candidates = [_name(object_word)] if object_word else []
    candidates += [name.replace(" ", ""), name.split(" ")[-1] if name else ""]
    candidates += ["object", "photo", "a"]
    for word in candidates:
        if word and len(tokenizer.encode(word, add_special_tokens=False)) == 1:
            return word
    raise ConfigError(
        f"no one-token initializer word for class {class_name!r}; set dbb option initializer"
    )


def statistics_markdown(statistics: dict[str, Any]) -> str:
    """The statistics table (the paper's Table 2) as Markdown."""
    rows = statistics.get("classes", [])
    if not rows:
        return "(no candidates)"
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(r[h]) for h in header) + " |" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------- report hook
def _report_section(run_dir: Path, results: dict[str, Any]):
    from unspur.report import Section

    path = Path(run_dir) / STAGE / "statistics.json"
    if not path.is_file():
        return []
    try:
        statistics = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    rows = statistics.get("classes", [])
    if not rows:
        return []
    header = list(rows[0])
    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(str(r[h]))}</td>" for h in header) + "</tr>" for r in rows
    )
    note = (
        f"<p class='note'>Generated candidates per source class and how many passed each "
        f"pruning condition (psi &lt; Psi_i, rho &gt; P); kept = both (the paper's rule); "
        f"used = what retraining used under pruning={escape(str(statistics.get('pruning')))}."
        f"</p>"
    )
    return [
        Section("DBB: generated and pruned samples", f"{note}<table><tr>{head}</tr>{body}</table>")
    ]


def _register_report_section() -> None:
    try:
        from unspur.report import register_section
    except ImportError:  # pragma: no cover - the report package is part of unspur
        return
    register_section(_report_section)


_register_report_section()
