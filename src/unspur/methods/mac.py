"""MaC: Mask and Combine ("Mitigating Spurious Correlation in Images by Intervention").

Sources below: "Sec." a section of the paper, "Eq." its equations, "Table 1" its mask
table, "App. B" its Appendix B (implementation details). A value the paper does not
give is marked *our choice*, with the reason. Per-dataset presets (Waterbirds, CelebA)
are in ``configs/waterbirds_mac.yaml`` and ``configs/celeba_mac.yaml``.

The recipe, stage by stage (files under ``out_dir/mac``):

1. **Reference model.** ERM (``context.reference_model()``, reused by every method;
   Sec. 3.2 "we first train a classifier M = f o g ... with standard ERM"). Its settings
   are the run's train config (Sec. 4.2's are in the dataset configs).
2. **Core masks, once** (``masks.safetensors``, uint8 0/1 of shape ``(N, H, W)`` in
   training-set order, written atomically; ``masks.json`` says how they were made).
   Saliency of every training image under the eval transform: ``saliency: xgradcam``
   (default, Sec. 3.2: "we use xGradCAM"; of the reference model on its ``cam_layer``,
   the last conv block: *our choice*, the paper does not name the layer and the last
   block is xGradCAM's usual target; for the image's *true* class: *our choice*, the
   paper does not say which class and the label is known for every training image),
   ``saliency: integrated_gradients`` (Integrated Gradients of the true class's logit
   from an all-zero input, ``ig_steps`` = 32 points (*our choice*), channel sum,
   positive part: a pixel-sharp map where the CAM of a small network's last block is a
   few cells wide; not in the paper, an option) or ``saliency: ground_truth`` (the
   dataset's core masks, e.g. the synthetic shapes or Colored MNIST's strokes, used as
   they are: a binary map has no ranking inside the object or the background, so a
   top-K of it would add randomly tie-broken background speckles that still show the
   background's colour; give ``top_k`` explicitly to force a top-K of the ground
   truth). For xGradCAM and IG the ``top_k`` highest-scoring pixels form the mask
   (Sec. 3.2, :func:`unspur.explain.masks.top_k_mask`): default the 15000 pixels of
   Table 1's caption, as a fraction of 224x224 (29.9%) at any image size; an ``int`` is
   a count, a ``float`` a fraction. ``mask_size: adaptive`` (not in the paper, an
   option) instead picks the fraction at the elbow of the reference model's
   masked-loss curve (DaC's adaptive mask size, see :mod:`unspur.explain.masks`), on
   ``adaptive_samples`` random training images. The masks are keyed by the reference
   weights, the data and these options: a rerun reuses them, a change recomputes them.
3. **Last-layer retraining** with the backbone frozen (eval mode, no gradient) and a
   fresh head, minimising Eq. 6, ``L_CE + alpha * L_rmv + beta * L_comb``, where
   ``L_rmv`` (Eq. 4) is the cross-entropy on the "remove" intervention (Eq. 1) and
   ``L_comb`` (Eq. 5) on the "combine" intervention (Eq. 2)
   (:mod:`unspur.train.interventions`; both keep the label ``y_i``). Head settings from
   Sec. 4.2, the same for both datasets: Adam, lr 0.5e-2, StepLR(step 5, gamma 0.5),
   batch 32; weight decay 0 (*our choice*: the paper names none, Adam's default).
   Head epochs from App. B: 10 on Waterbirds, 6 on CelebA; the generic default is 10
   (the Waterbirds value: the synthetic benchmark is Waterbirds-like, shapes on
   backgrounds), the CelebA config sets 6. The epoch is selected by validation
   worst-group accuracy (Sec. 4.2, App. B: "the model with the highest worst group
   accuracy on the validation set"). ``alpha`` / ``beta`` with ``search: false``:
   default (2, 3), the Waterbirds values of Sec. 4.2; CelebA's are (3, 0). ``search:
   true`` (default) trains every ``(alpha, beta)`` of ``alpha_grid`` x ``beta_grid``
   (App. B: {0, 1, 2} x {0, ..., 5}) and keeps the one with the best validation
   worst-group accuracy (``search.json``; ties, e.g. every candidate at 0% on a
   100-group Colored MNIST, are broken by balanced accuracy as in epoch selection):
   App. B's protocol for a dataset without presets (18 head trainings). Note that
   Sec. 4.2's CelebA alpha = 3 lies outside App. B's alpha grid; the CelebA config
   keeps the reported 3 with ``search: false``. ``balance: class`` draws class-balanced
   batches (Sec. 4.2: "class-balanced data to retrain the last layer on CelebA";
   class-uniform sampling with replacement over all the data is *our* reading of
   "class-balanced data", which keeps every image); default ``none`` (Waterbirds).
   Group labels serve only model selection (epoch, and alpha/beta with ``search``):
   supervision ✓ (the paper's, Table 2), or x with ``train.selection=average``.
4. **Mask quality** (``mask_quality.csv``, the paper's Table 1) when the training table
   has ground-truth masks; **figures** (``figures/misclassified.png``, as App. C's
   Figures 3-4): xGradCAM of the reference model and of the retrained model (the new
   head changes the channel weights) for up to ``figures`` validation images the
   reference model gets wrong (16: *our choice*, one readable grid).

Where interventions are computed (``views``). The paper intervenes per batch (Sec. 3.2:
``b`` is the mean of the batch ``B`` and the partner ``j`` is an image of ``B`` of
another class), so every epoch sees new partners. ``views: 0`` (the default, the paper)
does exactly that: an :class:`MaCObjective` builds both interventions for every batch
of every epoch and runs the frozen backbone once on ``[x; x_rmv; x_comb]`` (one forward
pass, no gradient; only the head's gradient is computed), so a head epoch costs about 3
backbone forward passes over the training set, i.e. roughly one ERM epoch. Under
``search: true`` every candidate meets the same batches, partners and batch colours
(the loop reseeds both every epoch), so the backbone's features of a batch are computed
once and shared by the candidates (:class:`SearchFeatureCache`, within
``train.cache_mb``): a speed cache that changes no number, 3 backbone passes per epoch
for the whole grid instead of about 45.
``views: N`` (N >= 1) is **a speed option, not the paper**: it precomputes ``N``
intervened views of every image once (each drawn from a random batch of
``batch_size`` as in training) and trains the head on cached features, cycling through
the views by epoch: ``1 + 2N`` backbone passes in total instead of 3 per epoch, which
makes ``search: true`` (18 head trainings) cheap on a CPU; the price is a finite set
of partners and batch colours per image. Results record ``views``
(``mac.json`` / ``search.json``). In both modes the training images are read through
the *eval* transform (masks must line up with the pixels; the frozen backbone makes
augmentation moot for the features of clean images; *our choice*, the paper does not
say). ``mask_batch_size`` (64) only sets how many images a saliency pass holds in
memory.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from unspur.config import TrainConfig
from unspur.data.dataset import GroupDataset
from unspur.errors import ConfigError
from unspur.explain.integrated_gradients import integrated_gradients
from unspur.explain.masks import (
    ADAPTIVE_GRID,
    elbow_index,
    has_ground_truth,
    image_mask_stats,
    load_ground_truth,
    masked_loss_curve,
    resolve_top_k,
    summarize_mask_stats,
    top_k_mask,
)
from unspur.explain.xgradcam import resolve_layer, xgradcam
from unspur.io import atomic_write_json, atomic_write_text
from unspur.methods.base import Method, RunContext, Supervision, register_method
from unspur.methods.last_layer import backbone_device, cached_features, train_head
from unspur.models.base import Classifier
from unspur.train.features import dataset_fingerprint, describe, with_transform
from unspur.train.interventions import batch_mean_colour, combine, draw_partners, remove
from unspur.train.loop import FitResult, candidate_rule, candidate_score
from unspur.train.objectives import Objective
from unspur.train.sampling import class_balanced_weights
from unspur.train.seeding import seed_everything

logger = logging.getLogger(__name__)

#: Bump when the way masks are computed changes, so old mask files are not reused.
MASK_VERSION = 2
SALIENCY_SOURCES = ("xgradcam", "integrated_gradients", "ground_truth")
#: App. B: alpha and beta were selected from {0, 1, 2} and {0, ..., 5}.
PAPER_ALPHA_GRID = (0.0, 1.0, 2.0)
PAPER_BETA_GRID = (0.0, 1.0, 2.0, 3.0, 4.0, 5.0)
#: Sec. 4.2: the head's optimiser, the same on both datasets.
PAPER_HEAD = {"optimizer": "adam", "lr": 5e-3, "step_size": 5, "gamma": 0.5, "batch_size": 32}
#: Per dataset: (alpha, beta) and class-balanced head data from Sec. 4.2, head epochs
#: from App. B. The configs ``waterbirds_mac.yaml`` / ``celeba_mac.yaml`` carry them.
PAPER_PRESETS: dict[str, dict[str, Any]] = {
    "waterbirds": {"alpha": 2.0, "beta": 3.0, "epochs": 10, "balance": "none"},
    "celeba": {"alpha": 3.0, "beta": 0.0, "epochs": 6, "balance": "class"},
}


# --------------------------------------------------------------------- helpers
def require_cam_model(model: nn.Module, layer: str | None, what: str = "MaC") -> nn.Module:
    """The xGradCAM layer of ``model``, or a :class:`ConfigError` saying what to use."""
    if not isinstance(model, Classifier):
        raise ConfigError(f"{what} needs an unspur Classifier (backbone + linear head)")
    try:
        return resolve_layer(model, layer)
    except ConfigError as err:
        raise ConfigError(
            f"{what} computes xGradCAM masks and needs a convolutional model: {err}. "
            "Set model.arch=small_cnn (or resnet18 / resnet50)"
        ) from err


def model_hash(model: nn.Module) -> str:
    """SHA-256 of a model's whole state (head included: CAMs depend on it)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        if t.dtype == torch.bool:
            t = t.to(torch.uint8)
        digest.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def mask_key(model: nn.Module, view: GroupDataset, settings: dict[str, Any]) -> str:
    """Cache key of a mask file: model weights, data, transform and mask settings."""
    parts = {
        "version": MASK_VERSION,
        "model": model_hash(model),
        "data": dataset_fingerprint(view),
        "transform": describe(view.transform),
        "settings": settings,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def save_masks(path, masks: torch.Tensor, key: str, info: dict[str, Any]) -> None:
    """Write ``(N, H, W)`` 0/1 masks as uint8 safetensors, atomically, with their key."""
    from unspur.models.checkpoint import save_state

    save_state(
        path, {"masks": masks.to(torch.uint8)}, {"key": key, "info": json.dumps(info, default=str)}
    )


def load_masks(path, key: str, n: int) -> tuple[torch.Tensor, dict[str, Any]] | None:
    """Masks saved under ``key`` with ``n`` rows, or None (missing, stale or unreadable)."""
    from safetensors import safe_open

    from unspur.models.checkpoint import load_state

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        if meta.get("key") != key:
            return None
        masks = load_state(path)["masks"]
        info = json.loads(meta.get("info", "{}"))
    except Exception as err:  # noqa: BLE001 - any unreadable file is recomputed
        logger.warning("ignoring unreadable mask file %s (%s)", path, err)
        return None
    if masks.ndim != 3 or masks.shape[0] != n:
        return None
    return masks, info


def _loader(dataset, batch_size: int, positions=None, num_workers: int = 0) -> DataLoader:
    data = dataset if positions is None else Subset(dataset, [int(p) for p in positions])
    return DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers)


def saliency_of(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    index: torch.Tensor,
    saliency: str,
    layer: str | None,
    view: GroupDataset,
    ig_steps: int = 32,
) -> torch.Tensor:
    """Saliency maps ``(B, H, W)`` of a batch from the chosen source, on the CPU."""
    if saliency == "xgradcam":
        device = backbone_device(model)
        return xgradcam(model, x.to(device), y.to(device), layer).cpu()
    if saliency == "integrated_gradients":
        return integrated_gradients_map(model, x, y, ig_steps)
    size = tuple(x.shape[-2:])
    return load_ground_truth(view.table, index.tolist(), view.transform, size)


def integrated_gradients_map(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, n_steps: int = 32
) -> torch.Tensor:
    """Pixel saliency ``(B, H, W)``: Integrated Gradients of the true class's logit from
    an all-zero model input, summed over channels, positive part (like xGradCAM's ReLU:
    the evidence *for* the class). Pixel-sharp where a CAM is as coarse as its layer."""
    attributions = integrated_gradients(model, x, torch.zeros_like(x), y, n_steps=n_steps)
    return attributions.sum(1).clamp(min=0)


# ----------------------------------------------------------------------- masks
def compute_masks(
    context: RunContext, model: nn.Module, options: dict[str, Any], directory
) -> tuple[torch.Tensor, dict[str, Any]]:
    """MaC's core masks of the training set (stage 2), cached in ``directory``.

    Returns uint8 0/1 masks ``(N, H, W)`` in training order and an info dict (pixel
    count, fraction, the adaptive curve). Writes ``mask_quality.csv`` when the table
    has ground-truth masks.
    """
    view = with_transform(context.train, context.eval_transform)
    saliency = options["saliency"]
    layer = options["layer"]
    ig_steps = int(options["ig_steps"])
    batch_size = int(options["mask_batch_size"])
    settings = {
        k: options[k]
        for k in ("saliency", "layer", "top_k", "mask_size", "adaptive_grid", "adaptive_samples")
    }
    if saliency == "integrated_gradients":
        settings["ig_steps"] = ig_steps
    settings["seed"] = context.config.seed
    key = mask_key(model, view, settings)
    path = directory / "masks.safetensors"
    cached = load_masks(path, key, len(view))
    if cached is not None:
        logger.info("MaC masks reused from %s", path)
        return cached

    n = len(view)
    top_k = options["top_k"]
    info: dict[str, Any] = {"saliency": saliency, "layer": layer, "mask_size": options["mask_size"]}
    if options["mask_size"] == "adaptive":
        grid = [float(q) for q in options["adaptive_grid"]]
        rng = np.random.default_rng(context.config.seed)
        count = min(n, int(options["adaptive_samples"]))
        chosen = np.sort(rng.choice(n, size=count, replace=False))
        batches = [
            (x, y, saliency_of(model, x, y, index, saliency, layer, view, ig_steps))
            for x, y, _g, index in _loader(view, batch_size, chosen)
        ]
        curve = masked_loss_curve(model, batches, grid)
        top_k = grid[elbow_index(grid, curve)]
        info["adaptive_curve"] = {"q": grid, "loss": curve, "chosen": top_k}
        logger.info("MaC adaptive mask size: keep %.2f of the pixels", top_k)

    gt = has_ground_truth(view.table)
    masks: torch.Tensor | None = None
    stats = []
    exact = saliency == "ground_truth" and top_k is None and options["mask_size"] == "fixed"
    for x, y, _g, index in _loader(view, batch_size):
        maps = saliency_of(model, x, y, index, saliency, layer, view, ig_steps)
        mask = maps >= 0.5 if exact else top_k_mask(maps, top_k)
        if masks is None:
            masks = torch.zeros((n, *mask.shape[1:]), dtype=torch.uint8)
        masks[index] = mask.to(torch.uint8)
        if gt:
            truth = load_ground_truth(view.table, index.tolist(), view.transform, maps.shape[-2:])
            stats.append(image_mask_stats(maps, mask, truth).assign(_row=index.numpy()))
    assert masks is not None
    h, w = masks.shape[1:]
    if exact:
        info.update(top_k="exact", fraction=float(masks.float().mean()))
    else:
        info.update(top_k=resolve_top_k(top_k, h, w), fraction=resolve_top_k(top_k, h, w) / (h * w))
    if gt:
        import pandas as pd

        frame = pd.concat(stats).sort_values("_row").drop(columns="_row")
        table = view.table
        names = [table.group_name(g) for g in range(table.n_groups)]
        quality = summarize_mask_stats(frame.reset_index(drop=True), view.g.numpy(), names)
        atomic_write_text(directory / "mask_quality.csv", quality.to_csv(index=False))
        info["mask_quality"] = "mask_quality.csv"
    save_masks(path, masks, key, info)
    atomic_write_json(directory / "masks.json", info)
    return masks, info


# ------------------------------------------------------------------ objectives
def _ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if len(y) == 0:
        return logits.sum() * 0.0  # an empty term: zero, never NaN
    return F.cross_entropy(logits, y)


class SearchFeatureCache:
    """The frozen backbone's features of each batch's clean, removed and combined images,
    shared by the candidates of one (alpha, beta) search (``train.cache_mb``).

    A speed cache, never a number: the loop reseeds the batch order and torch's global
    RNG at every epoch, and every candidate draws its partners from that RNG in the same
    way, so candidate ``k`` meets exactly the batches, partners and batch colours that
    candidate 1 met. An entry is keyed by the batch's dataset indices and partners, so a
    batch that differs (another seed, a resumed run) is computed, never mismatched.
    Without the cache each candidate runs the backbone on its own (the 18 candidates of
    App. B's grid cost about 45 backbone passes over the training set per epoch; with
    it, 3). Entries stop being added when ``budget_mb`` is spent (logged once).
    """

    def __init__(self, budget_mb: int) -> None:
        self.budget = int(budget_mb) * 1024 * 1024
        self.used = 0
        self.entries: dict[bytes, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0
        self._full_logged = False

    @staticmethod
    def key(index: torch.Tensor, partner: torch.Tensor) -> bytes:
        """The batch's identity: its dataset indices and drawn partners."""
        return index.cpu().numpy().tobytes() + b"|" + partner.cpu().numpy().tobytes()

    def get(self, key: bytes) -> torch.Tensor | None:
        features = self.entries.get(key)
        if features is None:
            self.misses += 1
        else:
            self.hits += 1
        return features

    def put(self, key: bytes, features: torch.Tensor) -> None:
        size = features.numel() * features.element_size()
        if self.used + size > self.budget:
            if not self._full_logged:
                logger.info(
                    "MaC search feature cache full at %.0f MB (train.cache_mb): later "
                    "batches run the backbone for every candidate",
                    self.used / 2**20,
                )
                self._full_logged = True
            return
        self.entries[key] = features.detach().cpu()
        self.used += size


class MaCObjective(Objective):
    """Eq. 6, ``L_CE + alpha L_rmv + beta L_comb``, with interventions built per batch.

    The paper's setting (Sec. 3.2) and the default (``views: 0``): every batch gets its
    own mean colour ``b`` and new partners ``j``.

    ``masks`` are the training set's uint8 0/1 core masks, indexed by the dataset index
    the loop passes. The model must be a :class:`Classifier` with a frozen backbone: the
    backbone runs once on the stacked clean, removed and combined images without
    gradient; only the head gets one. Partners come from torch's global RNG, which the
    loop reseeds every epoch (resumable, reproducible). With a :class:`SearchFeatureCache`
    (the search) the partners are drawn for every candidate, ``beta = 0`` included, and
    the backbone's features of all three image sets are computed once per batch and
    reused by the other candidates.
    """

    name = "mac"

    def __init__(
        self,
        masks: torch.Tensor,
        alpha: float,
        beta: float,
        cache: SearchFeatureCache | None = None,
    ) -> None:
        self.masks = masks
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.cache = cache

    def _features(self, net, x, y, index):
        """Features of the clean, removed and combined images (the last two ``None``
        when their weight is 0 and there is no cache), and the combined samples kept."""
        m = self.masks[index.cpu()].to(device=x.device, dtype=x.dtype)[:, None]
        b = batch_mean_colour(x)
        partner = draw_partners(y) if (self.beta or self.cache is not None) else None
        key = None
        if self.cache is not None:
            key = self.cache.key(index, partner)
            cached = self.cache.get(key)
            if cached is not None:
                n = len(y)
                keep = torch.nonzero(partner >= 0).reshape(-1).to(x.device)
                cached = cached.to(x.device)
                return cached[:n], cached[n : 2 * n], cached[2 * n :], keep
        parts = [x]
        if self.alpha or key is not None:
            parts.append(remove(x, m, b))
        keep = torch.zeros(0, dtype=torch.long, device=x.device)
        if self.beta or key is not None:
            mixed, keep = combine(x, m, partner.to(x.device), b)
            parts.append(mixed)
        with torch.no_grad():
            features = net.features(torch.cat(parts))
        n = len(y)
        if key is not None:
            self.cache.put(key, features)
            return features[:n], features[n : 2 * n], features[2 * n :], keep
        offset, removed, combined = n, None, None
        if self.alpha:
            removed, offset = features[offset : offset + n], offset + n
        if self.beta:
            combined = features[offset:]
        return features[:n], removed, combined, keep

    def step(self, model, x, y, g, index):
        net = getattr(model, "module", model)
        clean, removed, combined, keep = self._features(net, x, y, index)
        parts = [clean]
        if self.alpha:
            parts.append(removed)
        if self.beta:
            parts.append(combined)
        logits_all = net.head(torch.cat(parts))
        n = len(y)
        logits = logits_all[:n]
        loss = F.cross_entropy(logits, y)
        offset = n
        if self.alpha:
            loss = loss + self.alpha * _ce(logits_all[offset : offset + n], y)
            offset += n
        if self.beta:
            loss = loss + self.beta * _ce(logits_all[offset:], y[keep])
        return loss, logits


class CachedViewsObjective(Objective):
    """The same loss on precomputed features of ``N`` intervened views (``views: N``).

    A speed option, not the paper: the paper draws the interventions afresh for every
    batch (:class:`MaCObjective`); here each image has only ``N`` of them.

    The loop feeds clean cached features; epoch ``e`` uses view ``e mod N`` of the
    removed and combined features (``comb_valid`` marks samples that had a partner).
    """

    name = "mac_cached"

    def __init__(self, rmv, comb, comb_valid, alpha: float, beta: float) -> None:
        self.rmv, self.comb, self.comb_valid = rmv, comb, comb_valid
        self.alpha, self.beta = float(alpha), float(beta)
        self.epoch = 0

    def step(self, model, x, y, g, index):
        v = self.epoch % self.rmv.shape[0]
        idx = index.cpu()
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        if self.alpha:
            loss = loss + self.alpha * _ce(model(self.rmv[v, idx].to(x.device)), y)
        if self.beta:
            valid = self.comb_valid[v, idx]
            feats = self.comb[v, idx[valid]].to(x.device)
            loss = loss + self.beta * _ce(model(feats), y[valid.to(y.device)])
        return loss, logits

    def on_epoch_end(self, epoch: int) -> None:
        self.epoch = epoch + 1

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state.get("epoch", 0))


@torch.no_grad()
def intervened_views(
    model: Classifier,
    view: GroupDataset,
    masks: torch.Tensor,
    n_views: int,
    batch_size: int,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features of ``n_views`` removed and combined versions of every training image
    (``views: N``, a speed option; the paper intervenes afresh in every batch).

    Each view shuffles the data into batches of ``batch_size`` (as training would) and
    applies the interventions per batch. Returns ``(rmv, comb, comb_valid)`` of shapes
    ``(V, N, D)``, ``(V, N, D)``, ``(V, N)``.
    """
    device = backbone_device(model)
    n, dim = len(view), model.feature_dim
    rmv = torch.zeros(n_views, n, dim)
    comb = torch.zeros(n_views, n, dim)
    valid = torch.zeros(n_views, n, dtype=torch.bool)
    was_training = model.training
    model.eval()
    try:
        for v in range(n_views):
            generator = torch.Generator().manual_seed(seed * 1_000_003 + v)
            order = torch.randperm(n, generator=generator).numpy()
            for x, y, _g, index in _loader(view, batch_size, order):
                x = x.to(device)
                m = masks[index].to(device=device, dtype=x.dtype)[:, None]
                b = batch_mean_colour(x)
                rmv[v, index] = model.features(remove(x, m, b)).float().cpu()
                partner = draw_partners(y, generator)
                mixed, keep = combine(x, m, partner.to(device), b)
                if len(keep):
                    rows = index[keep.cpu()]
                    comb[v, rows] = model.features(mixed).float().cpu()
                    valid[v, rows] = True
    finally:
        model.train(was_training)
    return rmv, comb, valid


# -------------------------------------------------------------------- figures
def misclassified_positions(model: nn.Module, dataset, limit: int, batch_size: int) -> list[int]:
    """Positions of the first ``limit`` items of ``dataset`` that ``model`` gets wrong."""
    from unspur.evaluate.predict import predict

    preds = predict(model, dataset, batch_size)
    wrong = np.flatnonzero(preds.predicted != preds.y)
    return [int(i) for i in wrong[:limit]]


def _figure_cams(model, dataset, positions, layer) -> tuple[torch.Tensor, torch.Tensor, list]:
    items = [dataset[i] for i in positions]
    x = torch.stack([it[0] for it in items])
    y = torch.tensor([it[1] for it in items])
    device = backbone_device(model)
    maps = xgradcam(model, x.to(device), y.to(device), layer).cpu()
    with torch.no_grad():
        model.eval()
        pred = model(x.to(device)).argmax(1).cpu()
    return x, maps, list(zip(y.tolist(), pred.tolist(), strict=True))


def write_figure(
    path, images, before, after, before_labels, after_pred, class_names, transform
) -> None:
    """The before/after saliency grid (reference vs retrained model) as a PNG."""
    from unspur.explain.figures import saliency_grid, save_png, to_display

    labels = [
        f"y={class_names[t]} ref={class_names[p]} new={class_names[q]}"
        for (t, p), q in zip(before_labels, after_pred, strict=True)
    ]
    grid = saliency_grid(
        to_display(images, transform), [before, after], ["image", "reference", "retrained"], labels
    )
    save_png(grid, path)


# --------------------------------------------------------------------- options
def _check_options(options: dict[str, Any]) -> None:
    if options["saliency"] not in SALIENCY_SOURCES:
        raise ConfigError(
            f"mac option saliency={options['saliency']!r} is not one of "
            f"{', '.join(SALIENCY_SOURCES)}"
        )
    if options["mask_size"] not in ("fixed", "adaptive"):
        raise ConfigError(f"mac option mask_size={options['mask_size']!r} is not fixed|adaptive")
    if options["balance"] not in ("none", "class"):
        raise ConfigError(f"mac option balance={options['balance']!r} is not none|class")
    if options["layer"] is not None and not isinstance(options["layer"], str):
        raise ConfigError("mac option layer must be a module name (e.g. body.block3) or null")
    integers = ("views", "figures", "mask_batch_size", "adaptive_samples", "step_size", "ig_steps")
    for key in integers:
        value = options[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"mac option {key} must be a non-negative integer, got {value!r}")
    for key in ("mask_batch_size", "adaptive_samples", "step_size", "ig_steps"):
        if options[key] < 1:
            raise ConfigError(f"mac option {key} must be at least 1")
    grids = {k: options[k] for k in ("alpha_grid", "beta_grid", "adaptive_grid")}
    for key, values in grids.items():
        try:
            numbers = [float(v) for v in values]
        except (TypeError, ValueError) as err:
            raise ConfigError(f"mac option {key} must be a list of numbers") from err
        if not numbers or any(v < 0 for v in numbers):
            raise ConfigError(f"mac option {key} must be a non-empty list of numbers >= 0")
    if len(options["adaptive_grid"]) < 3 or not all(
        0 < float(q) <= 1 for q in options["adaptive_grid"]
    ):
        raise ConfigError("mac option adaptive_grid needs >= 3 fractions in (0, 1]")
    for key in ("alpha", "beta"):
        value = options[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ConfigError(f"mac option {key} must be a number >= 0, got {value!r}")
    if not isinstance(options["search"], bool):
        raise ConfigError("mac option search must be true or false")
    if options["optimizer"] not in ("sgd", "adam", "adamw"):
        raise ConfigError(f"mac option optimizer={options['optimizer']!r} is not sgd|adam|adamw")
    for key in ("epochs", "batch_size"):
        value = options[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"mac option {key} must be a positive integer, got {value!r}")


def mac_train_config(base: TrainConfig, options: dict[str, Any]) -> TrainConfig:
    """The run's train config with MaC's head settings (Sec. 4.2: Adam 5e-3, StepLR 5/0.5,
    batch 32; App. B: 10 / 6 epochs)."""
    return replace(
        base,
        epochs=int(options["epochs"]),
        batch_size=int(options["batch_size"]),
        optimizer=options["optimizer"],
        lr=float(options["lr"]),
        weight_decay=float(options["weight_decay"]),
        scheduler="step",
        step_size=int(options["step_size"]),
        gamma=float(options["gamma"]),
        augment=False,
    )


# ---------------------------------------------------------------------- method
@register_method
class MaC(Method):
    """MaC (Mask and Combine): last-layer retraining on xGradCAM-masked interventions.

    See the module docstring for every stage, default and its source. ``views: 0``
    (default) draws the interventions afresh for every batch, as the paper does;
    ``views: N`` precomputes ``N`` of them per image, a speed option for CPUs.
    """

    name = "mac"
    supervision = Supervision(train_group_labels=False, val_group_labels=True)
    uses_reference = True
    summary = (
        "mask and combine: last layer retrained with remove/combine interventions, "
        "fresh every batch (the paper); views=N precomputes N views (a speed option)"
    )
    # Sources in the module docstring: Sec. = section, App. B = Appendix B.
    defaults: dict[str, Any] = {
        "saliency": "xgradcam",  # Sec. 3.2
        "layer": None,  # our choice: the last conv block (the paper names none)
        "top_k": None,  # Table 1 caption: 15000 of 224x224 pixels, as a fraction
        "mask_size": "fixed",  # Sec. 3.2: top-K pixels
        "adaptive_grid": list(ADAPTIVE_GRID),  # option (DaC), not the paper
        "adaptive_samples": 512,  # option (DaC), our choice
        "alpha": PAPER_PRESETS["waterbirds"]["alpha"],  # Sec. 4.2 (Waterbirds)
        "beta": PAPER_PRESETS["waterbirds"]["beta"],  # Sec. 4.2 (Waterbirds)
        "search": True,  # App. B: alpha, beta selected on validation worst-group accuracy
        "alpha_grid": list(PAPER_ALPHA_GRID),  # App. B
        "beta_grid": list(PAPER_BETA_GRID),  # App. B
        "views": 0,  # Sec. 3.2: fresh interventions every batch; N > 0 is a speed option
        "balance": PAPER_PRESETS["waterbirds"]["balance"],  # Sec. 4.2 (class on CelebA)
        "epochs": PAPER_PRESETS["waterbirds"]["epochs"],  # App. B (6 on CelebA)
        "optimizer": PAPER_HEAD["optimizer"],  # Sec. 4.2
        "lr": PAPER_HEAD["lr"],  # Sec. 4.2
        "weight_decay": 0.0,  # our choice: the paper names none (Adam's default)
        "batch_size": PAPER_HEAD["batch_size"],  # Sec. 4.2
        "step_size": PAPER_HEAD["step_size"],  # Sec. 4.2
        "gamma": PAPER_HEAD["gamma"],  # Sec. 4.2
        "figures": 16,  # our choice (App. C's figures); 0 turns them off
        "mask_batch_size": 64,  # memory only
        "ig_steps": 32,  # our choice, for the integrated_gradients option
    }
    debug_options = {"epochs": 1, "figures": 4}

    def run(self, context: RunContext) -> tuple[nn.Module, FitResult]:
        options = context.options
        _check_options(options)
        if options["search"] and context.val is None:
            raise ConfigError("mac search: true selects alpha/beta on validation; add a val split")
        if options["saliency"] == "xgradcam":
            # Fail before ERM is trained when the architecture has no conv layer.
            require_cam_model(context.build_model(), options["layer"])
        model = context.reference_model()
        if not isinstance(model, Classifier):
            raise ConfigError("MaC needs an unspur Classifier (backbone + linear head)")
        directory = context.out_dir / "mac"
        directory.mkdir(parents=True, exist_ok=True)
        masks, info = compute_masks(context, model, options, directory)

        figure = self._figure_before(context, model, options)

        view = with_transform(context.train, context.eval_transform)
        config = mac_train_config(context.config.train, options)
        weights = None
        if options["balance"] == "class":
            weights = class_balanced_weights(view.y, view.n_classes)
        if options["search"]:
            pairs = [
                (float(a), float(b)) for a in options["alpha_grid"] for b in options["beta_grid"]
            ]
        else:
            pairs = [(float(options["alpha"]), float(options["beta"]))]
        cached = self._cached_views(context, model, view, masks, options)
        rule = candidate_rule(context.config.train.selection)

        model.freeze_backbone()
        search_cache = None
        if len(pairs) > 1 and context.config.train.cache_mb > 0:
            search_cache = SearchFeatureCache(context.config.train.cache_mb)
        candidates, best = [], None
        for alpha, beta in pairs:
            stage = f"mac/head_a{alpha:g}_b{beta:g}" if options["search"] else "mac/head"
            seed_everything(context.config.seed)  # every candidate starts from the same head
            model.reset_head()
            if cached is None:
                objective = MaCObjective(masks, alpha, beta, search_cache)
                result = context.fit(
                    model,
                    stage,
                    train=view,
                    train_config=config,
                    objective=objective,
                    sample_weights=weights,
                    parameters=model.head.parameters(),
                )
            else:
                train_feats, val_feats, rmv, comb, valid = cached
                objective = CachedViewsObjective(rmv, comb, valid, alpha, beta)
                result = train_head(
                    context,
                    model,
                    stage,
                    train_feats,
                    val_feats,
                    config,
                    sample_weights=weights,
                    objective=objective,
                    reset=False,
                )
            score = candidate_score(result, rule)
            candidates.append(
                {"alpha": alpha, "beta": beta, "score": score, "best_epoch": result.best_epoch}
            )
            if best is None or score > best[0]:
                best = (score, alpha, beta, result, copy.deepcopy(model.head.state_dict()))
        assert best is not None
        score, alpha, beta, result, head_state = best
        model.head.load_state_dict(head_state)
        model.eval()
        summary = {
            "alpha": alpha,
            "beta": beta,
            "search": options["search"],
            "metric": rule,
            "candidates": candidates,
            "views": options["views"],
            "masks": info,
        }
        if search_cache is not None:
            summary["feature_cache"] = {
                "hits": search_cache.hits,
                "misses": search_cache.misses,
                "mb": round(search_cache.used / 2**20, 1),
            }
        atomic_write_json(directory / ("search.json" if options["search"] else "mac.json"), summary)
        if figure is not None:
            self._figure_after(context, model, options, figure, directory)
        history = [*result.history, {"mac": {"alpha": alpha, "beta": beta}}]
        return model, replace(result, history=history)

    # -- stages
    def _cached_views(self, context, model, view, masks, options):
        if options["views"] == 0:
            return None
        logger.info(
            "MaC views=%d: precomputed interventions, a speed option (the paper draws "
            "fresh ones every batch: views=0)",
            options["views"],
        )
        train_feats = cached_features(context, model, context.train)
        val_feats = cached_features(context, model, context.val)
        rmv, comb, valid = intervened_views(
            model, view, masks, options["views"], int(options["batch_size"]), context.config.seed
        )
        return train_feats, val_feats, rmv, comb, valid

    def _figure_before(self, context, model, options):
        if not options["figures"] or context.val is None or not model.cam_layer_name:
            return None
        val = with_transform(context.val, context.eval_transform)
        positions = misclassified_positions(
            model, val, options["figures"], context.config.train.eval_batch_size
        )
        if not positions:
            return None
        x, maps, labels = _figure_cams(model, val, positions, options["layer"])
        return val, positions, x, maps, labels

    def _figure_after(self, context, model, options, figure, directory) -> None:
        val, positions, x, before, labels = figure
        _, after, after_labels = _figure_cams(model, val, positions, options["layer"])
        write_figure(
            directory / "figures" / "misclassified.png",
            x,
            before,
            after,
            labels,
            [p for _, p in after_labels],
            val.table.class_names,
            context.eval_transform,
        )
