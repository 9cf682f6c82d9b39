"""DiffInject: Ko, Jo, Lee, Park & Kim, "DiffInject: Revisiting Debias via Synthetic Data
Generation using Diffusion-based Style Injection" (arXiv 2406.06134, 2024).

Official code: GitHub seanko29/DiffInject (its generation is ``diff_style`` of
curryjung/InjectFusion_official, copied unchanged into ``diffusion_latent.py``,
``utils/diffusion_utils.py`` and ``models/guided_diffusion/unet.py``; the classifier
side is ``train_classifier/{train_classifier,top_k_loss,aug_diffstyle}.py``). Paths
below are in that repository.

The recipe, stage by stage (everything under ``out_dir``):

1. **Biased classifier** (``diffinject_biased/``). A fresh model of the run's
   architecture trained from scratch with generalised cross-entropy (GCE, ``q`` = 0.7,
   paper Eq. 1; LfF's form, as ``train_classifier/utils.py`` ``GeneralizedCELoss``:
   :func:`~unspur.train.losses.generalized_cross_entropy`) for ``biased_epochs``
   epochs (default: the run's ``train.epochs``; the official ``--epoch`` is 50). Its
   checkpoint is the epoch of best validation accuracy (``biased_selection`` =
   ``"average"``: ``train_classifier.py`` saves ``best.path.tar`` on
   ``valid_accuracy`` and ``top_k_loss.py`` loads it); no group label is read.
   ``"last"`` keeps the last epoch instead. Caveat: when the validation split is
   unbiased (ours for Colored MNIST), the best validation accuracy is the epoch at
   which the biased model is *least* biased.
2. **Bias-conflicting content samples** (``diffinject_content.json``). Per-sample
   cross-entropy of the biased model on every training image (eval mode, eval
   transform); the ``top_k`` highest losses *per class* (paper Eq. 3-4, K = 10;
   ``top_k_loss.py --K 10``, class-wise) are the content samples
   (:func:`select_content`). No bias label is read; the JSON also scores the choice
   against the true bias-conflicting samples, for the record only.
3. **Domain DDPM** (``diffinject_ddpm/``). An unconditional ``UNet2DModel``
   (:func:`~unspur.generate.ddpm.build_ddpm_unet`: res blocks, self-attention at the
   lowest level and in the middle block) trained with P2 weighting (``p2_gamma`` = 1,
   ``p2_k`` = 1, paper Eq. 6) on the training images resized to ``ddpm_image_size``
   (:func:`~unspur.generate.ddpm.train_ddpm`; resumable); or loaded with
   ``ddpm: DIR_OR_HUB_ID``. The paper pretrains ADM on the *general* dataset of the
   domain (MNIST, CIFAR-10, ...; Sec. 3 "Implementation Details"), not on the biased
   split: prefer ``ddpm:`` with such a model.
4. **Content injection** (``diffinject_synthetic/``, a
   :class:`~unspur.generate.store.SyntheticStore`: resumable, one manifest row per
   image with ``parent`` = the content image, seed and style image in ``extra``), as
   ``diff_style`` runs it (:func:`~unspur.generate.hspace.diffstyle_sample`):

   * content and style images are DDIM-inverted on ``inv_steps`` = 1000 points
     (``n_inv_step``); the content's h is recorded during its inversion (``h_dic``
     of ``precompute_pairs_with_h``), not on a regenerated trajectory;
   * generation starts from the style's inverted ``x_T`` and walks ``gen_steps`` =
     1000 points (``n_gen_step``); only the steps on the ``replace_steps`` = 50-point
     grid (``content_replace_step``, ``main.py`` default) are edited: at ``t >=
     t_edit`` h becomes ``slerp(h, h_c * |h| / |h_c|, gamma)`` (paper Eq. 8) with
     ``h_c`` the content's h at the nearest inversion timestep; x_0 is predicted from
     the injected call, the direction term from the plain one (Asyrp's asymmetric
     step, paper Eq. 7); eta = 1 at ``t <= t_boost`` (the paper's stochastic
     ``[t_boost, 0]``); at ``t >= 950`` (``--dt_end`` default) the direction term is
     multiplied by ``dt_lambda`` = 0.9985 (3 steps: 999, 978, 958). The other 950
     steps are plain deterministic DDIM;
   * ``local_mask``: ``None`` = global (the official scripts leave ``--use_mask``
     off), ``"official"`` = the paper's local injection as the official ``use_mask``
     branch does it (h rows 4:-1, columns 3:5, raw Slerp of the masked vectors without
     the norm rescaling; needs h of at least 6x4), or ``[top, left, bottom, right]``
     fractions: our configurable box (normalised Slerp inside the box).

   Defaults of the injection are those ``aug_diffstyle.py`` (the script that makes the
   classifier's synthetic data) passes: ``gamma`` = 0.7 (``--h_gamma``; its CIFAR-10-C
   output folder is named ``gamma03_nomask`` and ``run_pipeline.sh`` trains on 0.5),
   ``t_boost`` = 200, ``dt_lambda`` = 0.9985, 1000 / 1000 steps, and ``t_edit`` = 400
   (it passes no ``--user_defined_t_edit``, so ``diff_style`` falls back to 400; the
   demo scripts ``script_diffstyle.sh`` / ``run_pipeline.sh`` use 500).
5. **Final classifier** (``diffinject_final/``): a fresh model trained on real +
   synthetic images (paper Sec. 2.4) with the official loss, GCE q = 0.7
   (``train_classifier.py`` trains every classifier with ``criterion_GCE``;
   ``final_loss: ce`` is plain cross-entropy), selected by best validation accuracy
   (``final_selection`` = ``"average"``, the official ``best.path.tar``), so the whole
   method reads no group label (supervision x, the paper's "fully unsupervised"
   claim). ``final_selection: worst_group`` is an option; the run records the rule
   and the supervision symbol (✓) it implies. ``train.selection`` is not used.

Synthetic budget and allocation (:func:`synthetic_budget`, :func:`plan_injections`).
``n_synthetic = int(synthetic_ratio * n_train)``: the paper's "bias-conflict ratio"
(Sec. 2.3: synthetic samples "represent a certain proportion of the overall
dataset"); the default 0.1 is ``aug_diffstyle.py``'s ``bias_conflict_ratio`` (also
``run_pipeline.sh``). The official base is ``len(train_align)``, the bias-*aligned*
count, which needs bias labels; ``n_train`` is the label-free stand-in (they differ by
the conflicting fraction, 1-5 %). Contents are drawn uniformly with replacement from
the content set and styles uniformly with replacement from the style pool
(``np.random.choice`` in ``aug_diffstyle.py``), seeded by the run's seed;
``allocation: stratified`` gives every class with a content sample ``n_synthetic //
n_classes`` images (the official ``--stratified_sampling``, there applied when the
classifier samples from the generated folder). The official classifier then draws its
``0.1 * n_aligned`` synthetic files *again* with replacement from the generated folder
(about 37 % duplicates); here every generated image is used once (our choice: the
folder holds exactly the budget).

Choices where the paper is silent (all options):

* *Style images* ("randomly chosen bias-aligned samples", Sec. 2.3). The official code
  lists the dataset's ``align`` folder, i.e. reads bias labels. Without them, the style
  pool is the training images outside the content set that the biased classifier
  classifies correctly (its easy samples). ``style_class: any`` (default) draws from
  the whole pool as the official code does; ``other`` only from classes other than the
  content's.
* *The synthetic label*. The paper (Sec. 2.4) labels a synthetic image with its
  bias-conflicting (content) sample's class: ``synthetic_label: content`` (default).
  The official ``BaseDataset`` of ``train_classifier.py`` does so for BFFHQ / BAR but,
  for ``new-cmnist`` and ``cifar10c``, reads the *style* image's class from the file
  name (``split('_')[-2]``, commented ``# style``): ``synthetic_label: style``.
  The manifest's ``a`` is the attribute the other image brings (style's ``a`` for
  ``content``, content's ``a`` for ``style``), bookkeeping only.
* *DDPM*. A CPU-sized U-Net (channels (32, 64, 64), 32 px) with P2's learning rate
  2e-5, batch 8 and EMA 0.9999 (the P2 README); ``ddpm_steps`` = 10000 is our choice.
  These values assume a U-Net whose decoder reads h, as the large pretrained ADMs do;
  the small DDPM (one res block per level, attention only at the lowest level and in
  the middle block) trained on the biased split routes the content around h through
  the skip connections (``h_share`` 0.08 at t = 500 after 8000 steps, the DiffInject
  suite's ``cmnist_ddpm_allskips`` in ``bench/results/diffinject/``; 0.03-0.25 in the
  deleted legacy CPU tables). ``ddpm_no_skip_below`` = n cuts the skip
  connections of the n lowest decoder levels (:func:`~unspur.generate.ddpm.remove_skips`;
  our choice): with only the full-resolution skips left (n = 2 for the default 3-level
  channels, 3 for 4 levels) the suite's Colored MNIST DDPM reaches h_share 0.53 at
  t = 500 after 8000 steps, against 0.08 for the same recipe with every skip
  (``bench/results/diffinject/``, whose ``allskips`` setting measures what the cut does
  to DiffInject itself); t = 700 stays near 0.1 and the cut model draws few clean digits
  at these budgets, so 0 stays the default (the DiffInject suite's Colored MNIST DDPM
  uses the cut). The generated image is resized back to the
  content image's size before it is stored.
* *Classifier recipe* (architecture, optimiser, epochs): the run's train config.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from unspur.config import SELECTION_RULES
from unspur.data.dataset import GroupDataset
from unspur.errors import ConfigError
from unspur.generate.store import GenerationRequest, SyntheticStore, generate_into_store
from unspur.io import atomic_write_json
from unspur.methods.base import Method, RunContext, Supervision, register_method
from unspur.train.features import with_transform
from unspur.train.group_inference import minority_from_losses, per_sample_losses
from unspur.train.loop import FitResult
from unspur.train.losses import generalized_cross_entropy
from unspur.train.objectives import Objective

logger = logging.getLogger(__name__)

STAGE_BIASED = "diffinject_biased"
STAGE_FINAL = "diffinject_final"
DDPM_DIR = "diffinject_ddpm"
STORE_DIR = "diffinject_synthetic"
ALLOCATIONS = ("uniform", "stratified")
STYLE_CLASSES = ("any", "other")
SYNTHETIC_LABELS = ("content", "style")


class GCEObjective(Objective):
    """Mean generalised cross-entropy (LfF's form, ``q`` = 0.7): the official loss of
    both DiffInject classifiers (``train_classifier.py``, ``criterion_GCE``)."""

    name = "gce"

    def __init__(self, q: float = 0.7) -> None:
        if not 0.0 < q <= 1.0:
            raise ConfigError(f"GCE q must be in (0, 1], got {q}")
        self.q = float(q)

    def __call__(self, logits, y, g, index):
        return generalized_cross_entropy(logits, y, self.q, reduction="mean", form="lff")


# ----------------------------------------------------------------- selection / planning
def select_content(losses: np.ndarray, y: np.ndarray, n_classes: int, top_k: int) -> np.ndarray:
    """Indices of the ``top_k`` highest per-sample losses of every class.

    Ordered class by class (0, 1, ...), highest loss first within a class; a class with
    fewer than ``top_k`` samples gives all of them.
    """
    losses = np.asarray(losses, dtype=np.float64)
    y = np.asarray(y)
    chosen = minority_from_losses(losses, y, n_classes, top_k=int(top_k), per_class=True)
    order = []
    for c in range(n_classes):
        members = np.flatnonzero(chosen & (y == c))
        order.extend(members[np.argsort(-losses[members], kind="stable")].tolist())
    return np.asarray(order, dtype=np.int64)


def synthetic_budget(n_train: int, ratio: float) -> int:
    """``int(ratio * n_train)``: the number of synthetic images (the paper's
    "bias-conflict ratio", a fraction of the dataset; ``int`` as ``aug_diffstyle.py``)."""
    if not 0.0 <= float(ratio) <= 1.0:
        raise ConfigError(f"diffinject synthetic_ratio must be in [0, 1], got {ratio}")
    return int(float(ratio) * n_train + 1e-9)


def plan_injections(
    content: Sequence[int],
    y: np.ndarray,
    style_pool: Sequence[int],
    n_synthetic: int,
    seed: int = 0,
    *,
    allocation: str = "uniform",
    style_class: str = "any",
    n_classes: int | None = None,
) -> list[tuple[int, int]]:
    """``n_synthetic`` (content, style) pairs drawn with replacement.

    ``allocation="uniform"``: contents uniformly from ``content`` (``np.random.choice``
    of ``aug_diffstyle.py``); ``"stratified"``: ``n_synthetic // n_classes`` for every
    class that has a content sample (the official ``--stratified_sampling``). Styles
    uniformly from ``style_pool`` (``style_class="any"``, official) or from its members
    of another class than the content (``"other"``; any class when none is left).
    """
    if allocation not in ALLOCATIONS:
        raise ConfigError(f"diffinject allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    if style_class not in STYLE_CLASSES:
        raise ConfigError(
            f"diffinject style_class must be one of {STYLE_CLASSES}, got {style_class!r}"
        )
    content = np.asarray([int(i) for i in content], dtype=np.int64)
    if n_synthetic <= 0:
        return []
    if len(content) == 0:
        raise ConfigError("diffinject: no content sample to inject (top_k selected nothing)")
    pool = np.asarray(style_pool, dtype=np.int64)
    if len(pool) == 0:
        raise ConfigError("diffinject: no bias-aligned style image (the style pool is empty)")
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    if allocation == "uniform":
        chosen = rng.choice(content, size=n_synthetic, replace=True)
    else:
        classes = np.unique(y[content])
        per_class = n_synthetic // int(n_classes or int(y.max()) + 1)
        chosen = np.concatenate(
            [rng.choice(content[y[content] == c], size=per_class, replace=True) for c in classes]
        ).astype(np.int64)
    if style_class == "any":
        styles = rng.choice(pool, size=len(chosen), replace=True)
        return [(int(c), int(s)) for c, s in zip(chosen, styles)]
    pairs = []
    for c in chosen:
        candidates = pool[y[pool] != y[c]]
        if len(candidates) == 0:
            candidates = pool
        pairs.append((int(c), int(candidates[rng.integers(len(candidates))])))
    return pairs


def injection_requests(
    train: GroupDataset,
    pairs: Sequence[tuple[int, int]],
    seed: int,
    settings: dict[str, Any],
    label: str = "content",
) -> list[GenerationRequest]:
    """One store request per pair, labelled with the content's ``y`` (paper Sec. 2.4) or
    the style's (``label="style"``, the official Colored MNIST / CIFAR-10-C labels)."""
    if label not in SYNTHETIC_LABELS:
        raise ConfigError(
            f"diffinject synthetic_label must be one of {SYNTHETIC_LABELS}, got {label!r}"
        )
    requests = []
    for i, (c, s) in enumerate(pairs):
        labelled, other = (c, s) if label == "content" else (s, c)
        requests.append(
            GenerationRequest(
                key=f"inject-{i:06d}",
                prompt=None,
                seed=seed * 1_000_003 + i,
                y=int(train.y[labelled]),
                a=int(train.a[other]),
                parent=train.filenames[c],
                extra={
                    "content_index": int(c),
                    "style_index": int(s),
                    "style": train.filenames[s],
                    # what the bench's judges compare with (diffinject_judged)
                    "content_y": int(train.y[c]),
                    "style_y": int(train.y[s]),
                    "style_a": int(train.a[s]),
                    **settings,
                },
            )
        )
    return requests


# -------------------------------------------------------------------- DDPM + injection
def box_mask(box: Sequence[float] | None, size: int) -> torch.Tensor | None:
    """A ``(1, 1, size, size)`` 0/1 mask of ``[top, left, bottom, right]`` (fractions)."""
    if box is None:
        return None
    if len(box) != 4:
        raise ConfigError(f"diffinject local_mask must be [top, left, bottom, right], got {box}")
    top, left, bottom, right = (float(v) for v in box)
    if not (0 <= top < bottom <= 1 and 0 <= left < right <= 1):
        raise ConfigError(f"diffinject local_mask fractions must satisfy 0<=a<b<=1, got {box}")
    mask = torch.zeros(1, 1, size, size)
    mask[
        ..., round(top * size) : round(bottom * size), round(left * size) : round(right * size)
    ] = 1
    return mask


def local_setting(local_mask: Any, size: int) -> str | torch.Tensor | None:
    """``None`` (global), ``"official"`` (the fixed h slice) or a box mask tensor."""
    if local_mask is None or local_mask == "official":
        return local_mask
    if isinstance(local_mask, str):
        raise ConfigError(
            f"diffinject local_mask must be null, 'official' or [top, left, bottom, right], "
            f"got {local_mask!r}"
        )
    return box_mask(local_mask, size)


def to_pil(image: torch.Tensor, size: tuple[int, int] | None = None) -> Image.Image:
    """A ``(C, H, W)`` tensor in ``[-1, 1]`` as an RGB PIL image (resized to ``size``)."""
    array = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte()
    array = array.permute(1, 2, 0).cpu().numpy()
    pil = Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)
    pil = pil.convert("RGB")
    if size is not None and pil.size != tuple(size):
        pil = pil.resize(tuple(size), Image.BICUBIC)
    return pil


class ContentH:
    """The content images' h from their DDIM inversion, kept per content index.

    Only the inversion timesteps some injection step reads (the nearest to each
    ``schedule.inject`` timestep) are kept, on the CPU; a content image is inverted once
    however many pairs use it (the official code caches ``precomputed/*.pt`` likewise).
    """

    def __init__(self, unet: Any, scheduler: Any, schedule: Any, inv_steps: int) -> None:
        from unspur.generate.hspace import nearest_timestep, official_timesteps

        self.unet, self.scheduler, self.inv_steps = unet, scheduler, int(inv_steps)
        keys = official_timesteps(self.inv_steps)[:-1]  # the U-Net calls of the inversion
        self.keys = sorted({nearest_timestep(keys, t) for t in schedule.inject})
        self.cache: dict[int, dict[int, torch.Tensor]] = {}

    def __call__(self, indices: Sequence[int], images: Any) -> dict[int, torch.Tensor]:
        from unspur.generate.hspace import invert_with_h

        missing = sorted({int(i) for i in indices} - set(self.cache))
        if missing and self.keys:
            x = torch.stack([images[i]["x"] for i in missing])
            _, h = invert_with_h(
                self.unet, self.scheduler, x, steps=self.inv_steps, record_at=self.keys
            )
            for row, i in enumerate(missing):
                self.cache[i] = {t: h[t][row : row + 1] for t in self.keys}
        if not self.keys:
            return {}
        return {t: torch.cat([self.cache[int(i)][t] for i in indices]) for t in self.keys}


def inject_content(
    unet: Any,
    scheduler: Any,
    content: torch.Tensor,
    style: torch.Tensor,
    seeds: Sequence[int],
    *,
    inv_steps: int = 1000,
    gen_steps: int = 1000,
    replace_steps: int = 50,
    gamma: float = 0.7,
    t_edit: int = 400,
    t_boost: int | None = 200,
    dt_lambda: float = 0.9985,
    dt_end: int = 950,
    local: str | torch.Tensor | None = None,
    asymmetric: bool = True,
    content_h: dict[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """DiffInject's generation for a batch (``diff_style``): invert both, record the
    content's h during its inversion, generate from the style's ``x_T`` with injection.

    ``content`` and ``style`` are ``(B, C, H, W)`` in ``[-1, 1]``; returns the generated
    ``(B, C, H, W)``. ``content_h`` (already recorded, see :class:`ContentH`) skips the
    content's inversion. ``t_edit`` above every timestep means no injection.
    """
    from unspur.generate.ddpm import ddim_invert
    from unspur.generate.hspace import (
        InjectionSchedule,
        diffstyle_sample,
        invert_with_h,
        nearest_timestep,
        official_timesteps,
    )

    schedule = InjectionSchedule.build(
        gen_steps=gen_steps,
        replace_steps=replace_steps,
        t_edit=t_edit,
        t_boost=t_boost,
        dt_lambda=dt_lambda,
        dt_end=dt_end,
    )
    if content_h is None:
        keys = official_timesteps(inv_steps)[:-1]
        needed = {nearest_timestep(keys, t) for t in schedule.inject}
        _, content_h = invert_with_h(unet, scheduler, content, steps=inv_steps, record_at=needed)
    x_style = ddim_invert(unet, scheduler, style, timesteps=official_timesteps(inv_steps))
    return diffstyle_sample(
        unet,
        scheduler,
        x_style,
        content_h,
        schedule,
        gamma=gamma,
        dt_lambda=dt_lambda,
        local=local,
        seeds=list(seeds),
        asymmetric=asymmetric,
    )


def _ddpm(context: RunContext, options: dict[str, Any]) -> tuple[Any, Any, str]:
    """The domain DDPM: loaded from ``options["ddpm"]`` or trained on the training set."""
    from unspur.generate.ddpm import build_ddpm_unet, load_ddpm, train_ddpm
    from unspur.generate.training import GenerativeTrainConfig

    if options["ddpm"]:
        unet, scheduler = load_ddpm(options["ddpm"])
        return unet, scheduler, str(options["ddpm"])
    size = int(options["ddpm_image_size"])
    torch.manual_seed(context.config.seed)
    unet = build_ddpm_unet(
        size,
        3,
        block_out_channels=tuple(int(c) for c in options["ddpm_channels"]),
        layers_per_block=int(options["ddpm_layers_per_block"]),
        no_skip_below=int(options["ddpm_no_skip_below"]),
    )
    config = GenerativeTrainConfig(
        steps=int(options["ddpm_steps"]),
        batch_size=int(options["ddpm_batch_size"]),
        learning_rate=float(options["ddpm_lr"]),
        ema_decay=options["ddpm_ema"],
        seed=context.config.seed,
        device=context.config.train.device,
        save_every=max(1, min(500, int(options["ddpm_steps"]))),
    )
    trained = train_ddpm(
        unet,
        context.train,
        config,
        context.out_dir / DDPM_DIR,
        p2_gamma=float(options["p2_gamma"]),
        p2_k=float(options["p2_k"]),
    )
    trained.unet.eval()
    weights_id = f"{trained.model_dir}@{options['ddpm_steps']}steps"
    return trained.unet, trained.scheduler, weights_id


def _check(options: dict[str, Any]) -> None:
    if int(options["top_k"]) < 1:
        raise ConfigError(f"diffinject top_k must be >= 1, got {options['top_k']}")
    if not 0.0 <= float(options["gamma"]) <= 1.0:
        raise ConfigError(f"diffinject gamma must be in [0, 1], got {options['gamma']}")
    if options["biased_epochs"] is not None and int(options["biased_epochs"]) < 1:
        raise ConfigError(f"diffinject biased_epochs must be >= 1, got {options['biased_epochs']}")
    for key in ("inv_steps", "gen_steps", "replace_steps"):
        if int(options[key]) < 2:
            raise ConfigError(f"diffinject {key} must be >= 2, got {options[key]}")
    if options["biased_selection"] not in ("average", "last"):
        raise ConfigError(
            f"diffinject biased_selection must be 'average' or 'last', "
            f"got {options['biased_selection']!r}"
        )
    if options["final_selection"] not in SELECTION_RULES:
        raise ConfigError(
            f"diffinject final_selection must be one of {SELECTION_RULES}, "
            f"got {options['final_selection']!r}"
        )
    if options["final_loss"] not in ("gce", "ce"):
        raise ConfigError(
            f"diffinject final_loss must be 'gce' or 'ce', got {options['final_loss']!r}"
        )
    for key, allowed in (
        ("allocation", ALLOCATIONS),
        ("style_class", STYLE_CLASSES),
        ("synthetic_label", SYNTHETIC_LABELS),
    ):
        if options[key] not in allowed:
            raise ConfigError(f"diffinject {key} must be one of {allowed}, got {options[key]!r}")
    local_setting(options["local_mask"], 8)


@register_method
class DiffInject(Method):
    """DiffInject: inject the content of top-loss (bias-conflicting) samples into
    bias-aligned images through a P2-trained DDPM's h-space; train on real + synthetic.

    Options (defaults; source — official paths in seanko29/DiffInject):

    * ``q`` = 0.7 (GCE, paper Eq. 1 / ``train_classifier/utils.py``),
      ``biased_epochs`` = None (the run's epochs), ``biased_selection`` = "average"
      (best validation accuracy: ``best.path.tar`` loaded by ``top_k_loss.py``; or
      "last"), ``top_k`` = 10 (paper's K, per class; ``top_k_loss.py --K``);
    * ``synthetic_ratio`` = 0.1 (``aug_diffstyle.py`` ``bias_conflict_ratio``;
      n_synthetic = int(ratio * n_train)), ``allocation`` = "uniform" (or
      "stratified"), ``style_class`` = "any" (or "other"), ``synthetic_label`` =
      "content" (paper Sec. 2.4; "style" = official Colored MNIST / CIFAR-10-C);
    * ``ddpm`` = None (train one) or a local directory / hub id to load;
      ``ddpm_image_size`` = 32, ``ddpm_channels`` = [32, 64, 64],
      ``ddpm_layers_per_block`` = 1 (CPU-sized, ours), ``ddpm_no_skip_below`` = 0
      (every skip kept, as ADM; n > 0 cuts the skips of the n lowest decoder levels,
      see the module docstring), ``ddpm_steps`` = 10000 (ours),
      ``ddpm_batch_size`` = 8, ``ddpm_lr`` = 2e-5, ``ddpm_ema`` = 0.9999 (P2 README),
      ``p2_gamma`` = 1.0, ``p2_k`` = 1.0 (paper Eq. 6);
    * ``inv_steps`` = 1000, ``gen_steps`` = 1000 (``--n_inv_step`` / ``--n_gen_step``
      in ``aug_diffstyle.py``), ``replace_steps`` = 50 (``--content_replace_step``,
      ``main.py``), ``gamma`` = 0.7 (``--h_gamma``, ``aug_diffstyle.py``),
      ``t_edit`` = 400 (``diff_style``'s fallback; ``aug_diffstyle.py`` sets none),
      ``t_boost`` = 200, ``dt_lambda`` = 0.9985 (``aug_diffstyle.py``), ``dt_end`` =
      950 (``main.py``), ``asymmetric`` = True (the official ``denoising_step``),
      ``local_mask`` = None (global; "official" or a box for the local variant);
    * ``final_loss`` = "gce" (``train_classifier.py``; or "ce"), ``final_selection``
      = "average" (best validation accuracy; "worst_group" is recorded as ✓);
    * ``generation_batch_size`` = 8.

    See the module docstring for the stages and every choice the paper leaves open.
    """

    name = "diffinject"
    supervision = Supervision(train_group_labels=False, val_group_labels=True)
    selection_option = "final_selection"
    summary = "diffusion h-space content injection of top-loss samples into bias-aligned ones"
    defaults = {
        "q": 0.7,
        "biased_epochs": None,
        "biased_selection": "average",
        "top_k": 10,
        "synthetic_ratio": 0.1,
        "allocation": "uniform",
        "style_class": "any",
        "synthetic_label": "content",
        "ddpm": None,
        "ddpm_image_size": 32,
        "ddpm_channels": [32, 64, 64],
        "ddpm_layers_per_block": 1,
        "ddpm_no_skip_below": 0,
        "ddpm_steps": 10000,
        "ddpm_batch_size": 8,
        "ddpm_lr": 2e-5,
        "ddpm_ema": 0.9999,
        "p2_gamma": 1.0,
        "p2_k": 1.0,
        "inv_steps": 1000,
        "gen_steps": 1000,
        "replace_steps": 50,
        "gamma": 0.7,
        "t_edit": 400,
        "t_boost": 200,
        "dt_lambda": 0.9985,
        "dt_end": 950,
        "asymmetric": True,
        "local_mask": None,
        "final_loss": "gce",
        "final_selection": "average",
        "generation_batch_size": 8,
    }
    debug_options = {
        "biased_epochs": 1,
        "top_k": 2,
        "synthetic_ratio": 0.05,
        "ddpm_image_size": 16,
        "ddpm_channels": [8, 16],
        "ddpm_steps": 2,
        "ddpm_batch_size": 4,
        "ddpm_lr": 1e-3,
        "inv_steps": 5,
        "gen_steps": 5,
        "replace_steps": 5,
    }

    def run(self, context: RunContext) -> tuple[nn.Module, FitResult]:
        options = context.options
        _check(options)
        train_config = context.config.train
        train = context.train

        # 1. biased classifier (GCE, best validation accuracy, no group labels)
        biased = context.build_model()
        epochs = options["biased_epochs"] or train_config.epochs
        context.fit(
            biased,
            STAGE_BIASED,
            train_config=replace(
                train_config, epochs=int(epochs), selection=options["biased_selection"]
            ),
            objective=GCEObjective(float(options["q"])),
            val_group_labels=False,
        )

        # 2. top-K per-class per-sample CE losses = bias-conflicting content samples
        view = with_transform(train, context.eval_transform)
        losses, predicted, y = per_sample_losses(
            biased, view, train_config.eval_batch_size, train_config.num_workers
        )
        content = select_content(losses, y, train.n_classes, int(options["top_k"]))
        is_content = np.zeros(len(train), dtype=bool)
        is_content[content] = True
        style_pool = np.flatnonzero(~is_content & (predicted == y))
        n_synthetic = synthetic_budget(len(train), options["synthetic_ratio"])
        pairs = plan_injections(
            content,
            y,
            style_pool,
            n_synthetic,
            context.config.seed,
            allocation=options["allocation"],
            style_class=options["style_class"],
            n_classes=train.n_classes,
        )
        self._record(context, losses, content, style_pool, pairs, n_synthetic)

        # 3-4. DDPM and content injection into the synthetic store
        store = SyntheticStore(context.out_dir / STORE_DIR)
        if pairs:
            self._generate(context, options, store, pairs)

        # 5. final classifier on real + synthetic (official: GCE, best val accuracy)
        merged = store.to_table(train.table, prefix="diffinject/") if pairs else train.table
        union = GroupDataset(merged, train.transform)
        model = context.build_model()
        objective = GCEObjective(float(options["q"])) if options["final_loss"] == "gce" else None
        final_config = replace(train_config, selection=options["final_selection"])
        return model, context.fit(
            model, STAGE_FINAL, train=union, train_config=final_config, objective=objective
        )

    @staticmethod
    def _generate(context, options, store, pairs) -> None:
        from unspur.generate.ddpm import DiffusionImages
        from unspur.generate.hspace import InjectionSchedule

        train = context.train
        unet, scheduler, weights_id = _ddpm(context, options)
        size = int(unet.config.sample_size)
        images = DiffusionImages(train, image_size=size)
        local = local_setting(options["local_mask"], size)
        keys = (
            "inv_steps",
            "gen_steps",
            "replace_steps",
            "gamma",
            "t_edit",
            "t_boost",
            "dt_lambda",
            "dt_end",
            "asymmetric",
            "local_mask",
            "synthetic_label",
        )
        settings = {k: options[k] for k in keys}
        requests = injection_requests(
            train, pairs, context.config.seed, settings, options["synthetic_label"]
        )
        t_boost = None if options["t_boost"] is None else int(options["t_boost"])
        steps = {
            "gen_steps": int(options["gen_steps"]),
            "replace_steps": int(options["replace_steps"]),
            "t_edit": int(options["t_edit"]),
            "t_boost": t_boost,
            "dt_lambda": float(options["dt_lambda"]),
            "dt_end": int(options["dt_end"]),
        }
        contents = ContentH(
            unet, scheduler, InjectionSchedule.build(**steps), int(options["inv_steps"])
        )

        def generate(batch: list[GenerationRequest]) -> list[Image.Image]:
            c_idx = [r.extra["content_index"] for r in batch]
            s_idx = [r.extra["style_index"] for r in batch]
            out = inject_content(
                unet,
                scheduler,
                torch.stack([images[i]["x"] for i in c_idx]),
                torch.stack([images[i]["x"] for i in s_idx]),
                [r.seed for r in batch],
                inv_steps=int(options["inv_steps"]),
                gamma=float(options["gamma"]),
                local=local,
                asymmetric=bool(options["asymmetric"]),
                content_h=contents(c_idx, images),
                **steps,
            )
            return [to_pil(x, train.raw(i).size) for x, i in zip(out, c_idx)]

        generate_into_store(
            store,
            requests,
            generate,
            generator_name="diffinject",
            weights_id=weights_id,
            batch_size=int(options["generation_batch_size"]),
            process_index=0,
            num_processes=1,
        )

    @staticmethod
    def _record(context, losses, content, style_pool, pairs, n_synthetic) -> None:
        from unspur.train.group_inference import precision_recall, true_minority

        train = context.train
        table = train.table
        is_content = np.zeros(len(train), dtype=bool)
        is_content[content] = True
        y, g = train.y.numpy(), train.g.numpy()
        per_class = np.bincount([int(y[c]) for c, _ in pairs], minlength=train.n_classes).tolist()
        report = {
            "n_train": len(train),
            "n_content": int(len(content)),
            "n_style_pool": int(len(style_pool)),
            "n_synthetic_budget": int(n_synthetic),
            "n_synthetic": len(pairs),
            "synthetic_per_content_class": per_class,
            "content_indices": np.asarray(content).tolist(),
            "content_losses": [float(losses[i]) for i in content],
            # For the record only (nothing above read a bias label):
            "content_against_true_groups": precision_recall(
                is_content, true_minority(y, g, table.n_classes, table.n_attrs)
            ),
            "pairs": [list(p) for p in pairs],
        }
        path = context.out_dir / "diffinject_content.json"
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, json.loads(json.dumps(report)))
