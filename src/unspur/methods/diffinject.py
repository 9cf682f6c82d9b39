"""DiffInject: Ko, Jo, Lee, Park & Kim, "DiffInject: Revisiting Debias via Synthetic Data
Generation using Diffusion-based Style Injection" (arXiv 2406.06134, 2024).

The recipe, stage by stage (everything under ``out_dir``):

1. **Biased classifier** (``diffinject_biased/``). A fresh model of the run's
   architecture, trained from scratch with generalised cross-entropy (GCE, ``q`` = 0.7,
   LfF's form :func:`~unspur.train.losses.generalized_cross_entropy`) for
   ``biased_epochs`` epochs (default: the run's ``train.epochs``), keeping the *last*
   epoch (no validation, no group label: the model is meant to overfit the bias).
2. **Bias-conflicting content samples** (``diffinject_content.json``). Per-sample
   cross-entropy of the biased model on every training image (``reduction="none"``,
   eval mode, eval transform); the ``top_k`` highest losses *per class* (default 10)
   are the content samples (:func:`select_content`, built on
   :func:`~unspur.train.group_inference.minority_from_losses`). No bias label is read;
   the JSON also scores the choice against the true bias-conflicting samples, for the
   record only.
3. **Domain DDPM** (``diffinject_ddpm/``). An unconditional ``UNet2DModel``
   (:func:`~unspur.generate.ddpm.build_ddpm_unet`) trained with P2 weighting
   (``p2_gamma`` = 1, ``p2_k`` = 1) on the training images, resized to
   ``ddpm_image_size`` (:func:`~unspur.generate.ddpm.train_ddpm`; resumable); or loaded
   with ``ddpm: DIR_OR_HUB_ID`` (:func:`~unspur.generate.ddpm.load_ddpm`).
4. **Content injection** (``diffinject_synthetic/``, a
   :class:`~unspur.generate.store.SyntheticStore`: resumable, one manifest row per
   image with ``parent`` = the content image, seed and the style image in ``extra``).
   Content and style images are DDIM-inverted (``ddim_steps``); generation starts from
   the style image's ``x_T`` and replaces its bottleneck h at every ``t >= t_edit`` by
   ``slerp(h_style, h_content * |h_style| / |h_content|, gamma)`` (per-sample norms),
   with Asyrp's asymmetric reverse process (``asymmetric``: ``x_0`` predicted from the
   injected output, the direction term from the plain one) and stochastic steps
   (``eta = 1``) below ``t_boost``; ``local_mask`` restricts the injection to a box of
   h (the local variant). :func:`~unspur.generate.hspace.ddim_sample_with_h` does it.
5. **Final classifier** (``diffinject_final/``): a fresh model trained with plain
   cross-entropy on real + synthetic images through the one loop, selected by the run's
   rule.

Synthetic budget: ``n_synthetic = round(synthetic_ratio * n_train)`` images
(:func:`synthetic_budget`), ``synthetic_ratio`` = the paper's bias-conflict ratio
(0.01 and 0.05 in its Colored MNIST / Corrupted CIFAR-10 tables; set it to the
dataset's ratio). Each synthetic image has the *content* sample's label.

Supervision: no group label in training (x); validation group labels only select the
final model's epoch (✓ with worst-group selection, x with ``train.selection=average``
or ``last``).

Choices where the paper is ambiguous or silent (all options):

* *Which images give the style.* "Bias-aligned" images without bias labels: training
  images outside the content set that the biased classifier classifies correctly
  (its easy samples), drawn uniformly at random (seeded by the run's seed) from
  classes other than the content sample's class, so the result carries another
  class's bias attribute. Contents are used round-robin (class by class, highest loss
  first) until the budget is spent; each pair gets a fresh style image.
* *The synthetic rows' attribute* ``a`` in the merged table is the style image's ``a``
  (the attribute the injection is meant to produce). It is bookkeeping for the report
  only: the final objective is plain cross-entropy and never reads groups.
* *Injection settings.* DiffInject takes its injection from InjectFusion (Jeong, Kwon &
  Uh, "Training-free Content Injection using h-space in Diffusion Models") and does not
  restate the values, so the defaults are InjectFusion's official script
  (``script_diffstyle.sh`` of curryjung/InjectFusion_official): ``gamma`` = 0.3
  (``h_gamma``, the content's share in the normalised Slerp), ``t_edit`` = 500
  (``user_defined_t_edit``), ``t_boost`` = 200 (``t_boost``, eta = 1 below it).
  ``ddim_steps`` = 40 is Asyrp's ``n_inv_step`` / ``n_test_step`` (InjectFusion runs
  50 or 1000). Not implemented: its ``dt_lambda`` = 0.9985 (a 0.15 % shrink of the
  direction term at the first step only) and style calibration (``omega`` = 0 in that
  script). The h blended in is the content's own h on its DDIM reverse trajectory
  from its inverted ``x_T`` (run in the same U-Net calls), and the style side is the
  h of the process being generated, so the injected h feeds the next step
  (InjectFusion's recursive injection); the norm is the style side's, per sample
  (``norm="first"`` of :func:`~unspur.generate.hspace.slerp`). These values assume a
  U-Net whose decoder reads h, as the large pretrained ADMs do; a small DDPM (one res
  block per level, no attention) routes the content around h through the skip
  connections, even after 10000 CPU steps, and then no value carries it
  (``bench/results/diffinject.md`` and ``diffinject_10k.md`` measure this).
* *DDPM.* The paper uses an ADM-like U-Net trained with P2; its size and schedule are
  not restated. Defaults here are a CPU-sized U-Net (channels (32, 64, 64), 32 px)
  with P2's learning rate 2e-5, batch 8 and EMA 0.9999 (the P2 README); ``ddpm_steps``
  = 10000 is our choice (P2 trains far longer). The generated image is resized back to
  the content image's size before it is stored, so the classifier sees the same
  geometry as for real images.
* *The final classifier* trains with the run's train config (architecture, optimiser,
  epochs) on the union, without reweighting.
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


class GCEObjective(Objective):
    """Mean generalised cross-entropy (LfF's form, ``q`` = 0.7): the biased classifier."""

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
    """``round(ratio * n_train)``: the number of synthetic images (ratio in [0, 1])."""
    if not 0.0 <= float(ratio) <= 1.0:
        raise ConfigError(f"diffinject synthetic_ratio must be in [0, 1], got {ratio}")
    return int(round(float(ratio) * n_train))


def plan_injections(
    content: Sequence[int],
    y: np.ndarray,
    style_pool: Sequence[int],
    n_synthetic: int,
    seed: int = 0,
) -> list[tuple[int, int]]:
    """``n_synthetic`` (content, style) pairs: contents round-robin, styles drawn at random
    from ``style_pool`` members of another class than the content (any class when no
    other class is available)."""
    content = [int(i) for i in content]
    if n_synthetic <= 0:
        return []
    if not content:
        raise ConfigError("diffinject: no content sample to inject (top_k selected nothing)")
    pool = np.asarray(style_pool, dtype=np.int64)
    if len(pool) == 0:
        raise ConfigError("diffinject: no bias-aligned style image (the style pool is empty)")
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(n_synthetic):
        c = content[i % len(content)]
        candidates = pool[y[pool] != y[c]]
        if len(candidates) == 0:
            candidates = pool
        pairs.append((c, int(candidates[rng.integers(len(candidates))])))
    return pairs


def injection_requests(
    train: GroupDataset, pairs: Sequence[tuple[int, int]], seed: int, settings: dict[str, Any]
) -> list[GenerationRequest]:
    """One store request per pair, labelled with the content sample's ``y``."""
    requests = []
    for i, (c, s) in enumerate(pairs):
        requests.append(
            GenerationRequest(
                key=f"inject-{i:06d}",
                prompt=None,
                seed=seed * 1_000_003 + i,
                y=int(train.y[c]),
                a=int(train.a[s]),
                parent=train.filenames[c],
                extra={
                    "content_index": int(c),
                    "style_index": int(s),
                    "style": train.filenames[s],
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


def to_pil(image: torch.Tensor, size: tuple[int, int] | None = None) -> Image.Image:
    """A ``(C, H, W)`` tensor in ``[-1, 1]`` as an RGB PIL image (resized to ``size``)."""
    array = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte()
    array = array.permute(1, 2, 0).cpu().numpy()
    pil = Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)
    pil = pil.convert("RGB")
    if size is not None and pil.size != tuple(size):
        pil = pil.resize(tuple(size), Image.BICUBIC)
    return pil


def inject_content(
    unet: Any,
    scheduler: Any,
    content: torch.Tensor,
    style: torch.Tensor,
    seeds: Sequence[int],
    *,
    steps: int = 40,
    gamma: float = 0.3,
    t_edit: int = 500,
    t_boost: int | None = 200,
    mask: torch.Tensor | None = None,
    asymmetric: bool = True,
) -> torch.Tensor:
    """DiffInject's generation for a batch: invert both, inject content h into the style.

    ``content`` and ``style`` are ``(B, C, H, W)`` in ``[-1, 1]``; returns the
    generated ``(B, C, H, W)``. ``t_edit`` above every timestep means no injection.
    """
    from unspur.generate.ddpm import ddim_invert
    from unspur.generate.hspace import ddim_sample_with_h

    both = ddim_invert(unet, scheduler, torch.cat([content, style]), steps=steps)
    x_content, x_style = both[: len(content)], both[len(content) :]
    return ddim_sample_with_h(
        unet,
        scheduler,
        x_style,
        x_content,
        steps=steps,
        gamma=gamma,
        t_edit=t_edit,
        t_boost=t_boost,
        mask=mask,
        seeds=list(seeds),
        asymmetric=asymmetric,
        norm="first",
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


@register_method
class DiffInject(Method):
    """DiffInject: inject the content of top-loss (bias-conflicting) samples into
    bias-aligned images through a P2-trained DDPM's h-space; train on real + synthetic.

    Options (defaults; source):

    * ``q`` = 0.7 (GCE, LfF / paper), ``biased_epochs`` = None (the run's epochs),
      ``top_k`` = 10 (paper's K, per class);
    * ``synthetic_ratio`` = 0.01 (paper's 1% setting; n_synthetic = ratio * n_train);
    * ``ddpm`` = None (train one) or a local directory / hub id to load;
      ``ddpm_image_size`` = 32, ``ddpm_channels`` = [32, 64, 64],
      ``ddpm_layers_per_block`` = 1 (CPU-sized, ours), ``ddpm_steps`` = 10000 (ours),
      ``ddpm_batch_size`` = 8, ``ddpm_lr`` = 2e-5, ``ddpm_ema`` = 0.9999 (P2 README),
      ``p2_gamma`` = 1.0, ``p2_k`` = 1.0 (P2 / paper);
    * ``ddim_steps`` = 40 (Asyrp), ``gamma`` = 0.3, ``t_edit`` = 500,
      ``t_boost`` = 200 (InjectFusion's script), ``asymmetric`` = True (Asyrp's
      asymmetric reverse process), ``local_mask`` = None or ``[top, left, bottom,
      right]`` fractions (local injection);
    * ``generation_batch_size`` = 8.

    See the module docstring for the stages and every choice the paper leaves open.
    """

    name = "diffinject"
    supervision = Supervision(train_group_labels=False, val_group_labels=True)
    summary = "diffusion h-space content injection of top-loss samples into bias-aligned ones"
    defaults = {
        "q": 0.7,
        "biased_epochs": None,
        "top_k": 10,
        "synthetic_ratio": 0.01,
        "ddpm": None,
        "ddpm_image_size": 32,
        "ddpm_channels": [32, 64, 64],
        "ddpm_layers_per_block": 1,
        "ddpm_steps": 10000,
        "ddpm_batch_size": 8,
        "ddpm_lr": 2e-5,
        "ddpm_ema": 0.9999,
        "p2_gamma": 1.0,
        "p2_k": 1.0,
        "ddim_steps": 40,
        "gamma": 0.3,
        "t_edit": 500,
        "t_boost": 200,
        "asymmetric": True,
        "local_mask": None,
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
        "ddim_steps": 4,
    }

    def run(self, context: RunContext) -> tuple[nn.Module, FitResult]:
        options = context.options
        _check(options)
        train_config = context.config.train
        train = context.train

        # 1. biased classifier (GCE, last epoch, no group labels)
        biased = context.build_model()
        epochs = options["biased_epochs"] or train_config.epochs
        context.fit(
            biased,
            STAGE_BIASED,
            train_config=replace(train_config, epochs=int(epochs), selection="last"),
            objective=GCEObjective(float(options["q"])),
            val=None,
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
        pairs = plan_injections(content, y, style_pool, n_synthetic, context.config.seed)
        self._record(context, losses, content, style_pool, pairs)

        # 3-4. DDPM and content injection into the synthetic store
        store = SyntheticStore(context.out_dir / STORE_DIR)
        if pairs:
            self._generate(context, options, store, pairs)

        # 5. final classifier on real + synthetic
        merged = store.to_table(train.table, prefix="diffinject/") if pairs else train.table
        union = GroupDataset(merged, train.transform)
        model = context.build_model()
        return model, context.fit(model, STAGE_FINAL, train=union)

    @staticmethod
    def _generate(context, options, store, pairs) -> None:
        from unspur.generate.ddpm import DiffusionImages

        train = context.train
        unet, scheduler, weights_id = _ddpm(context, options)
        size = int(unet.config.sample_size)
        images = DiffusionImages(train, image_size=size)
        mask = box_mask(options["local_mask"], size)
        settings = {
            k: options[k]
            for k in ("ddim_steps", "gamma", "t_edit", "t_boost", "asymmetric", "local_mask")
        }
        requests = injection_requests(train, pairs, context.config.seed, settings)

        def generate(batch: list[GenerationRequest]) -> list[Image.Image]:
            c_idx = [r.extra["content_index"] for r in batch]
            s_idx = [r.extra["style_index"] for r in batch]
            out = inject_content(
                unet,
                scheduler,
                torch.stack([images[i]["x"] for i in c_idx]),
                torch.stack([images[i]["x"] for i in s_idx]),
                [r.seed for r in batch],
                steps=int(options["ddim_steps"]),
                gamma=float(options["gamma"]),
                t_edit=int(options["t_edit"]),
                t_boost=None if options["t_boost"] is None else int(options["t_boost"]),
                mask=mask,
                asymmetric=bool(options["asymmetric"]),
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
    def _record(context, losses, content, style_pool, pairs) -> None:
        from unspur.train.group_inference import precision_recall, true_minority

        train = context.train
        table = train.table
        is_content = np.zeros(len(train), dtype=bool)
        is_content[content] = True
        y, g = train.y.numpy(), train.g.numpy()
        report = {
            "n_train": len(train),
            "n_content": int(len(content)),
            "n_style_pool": int(len(style_pool)),
            "n_synthetic": len(pairs),
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
