"""DBB: Integrated Gradients, the pruning rule, low-loss selection, the retraining loss,
and the whole method on the debug dataset with a tiny inpainting pipeline."""

from __future__ import annotations

import json
import math

import helpers
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from unspur.config import load_config
from unspur.errors import ConfigError
from unspur.explain.integrated_gradients import (
    integrated_gradients,
    integrated_gradients_loop,
    masked_attribution_sum,
    target_scores,
)
from unspur.methods import available_methods
from unspur.methods.dbb import (
    REASON_PSI,
    REASON_RHO,
    DBBObjective,
    box_mask,
    class_mean_softmax,
    prune_decision,
    rank_per_class,
    reference_scores,
    resolve_gammas,
    resolve_k,
)
from unspur.models.factory import build_model
from unspur.pipeline import run

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------ Integrated Gradients
class _Smooth(nn.Module):
    """A small conv net with smooth activations (softplus, tanh) and no pooling kinks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        h = torch.tanh(nn.functional.softplus(self.conv(x)))
        return self.head(h.flatten(1))


def _pair(n: int = 5, seed: int = 0):
    """Original images and edited ones that differ only inside a square mask (as after
    inpainting with paste-back)."""
    g = torch.Generator().manual_seed(seed)
    original = torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64)
    mask = torch.zeros(n, 8, 8, dtype=torch.bool)
    mask[:, 2:6, 3:7] = True
    edited = torch.where(
        mask[:, None], torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64), original
    )
    return original, edited, mask


def test_integrated_gradients_completeness():
    """sum IG = f_t(new) - f_t(original) for the target class.

    Tolerance: the model is smooth (softplus, tanh), so the integrand along the straight
    path is analytic and Gauss-Legendre quadrature with 64 nodes is exact to round-off;
    in float64 the remaining error is ~1e-12 of the score change, so 1e-6 relative (plus
    1e-9 absolute) leaves six orders of margin and would still catch a wrong baseline, a
    wrong target or a missing ``(x - x')`` factor (each an O(1) error).
    """
    torch.manual_seed(0)
    model = _Smooth().double()
    original, edited, mask = _pair()
    target = [0, 1, 2, 1, 0]
    attributions = integrated_gradients(
        model, edited, original, target, n_steps=64, internal_batch_size=64, batch_size=2
    )
    assert attributions.shape == edited.shape
    change = target_scores(model, edited.float().double(), target) - target_scores(
        model, original, target
    )
    total = attributions.double().sum((1, 2, 3))
    assert torch.allclose(total, change.double(), rtol=1e-6, atol=1e-9)
    # Pixels equal to the baseline get exactly zero, so rho over the edited region is the
    # whole sum (what DBB's pruning relies on).
    assert float(attributions.sum(1).masked_select(~mask).abs().max()) == 0.0
    rho = masked_attribution_sum(attributions, mask)
    assert torch.allclose(rho.double(), total, rtol=1e-6, atol=1e-9)
    # Probabilities as the explained output: completeness holds for them too.
    probs = integrated_gradients(model, edited, original, target, n_steps=64, output="probability")
    change_p = target_scores(model, edited, target, "probability") - target_scores(
        model, original, target, "probability"
    )
    assert torch.allclose(probs.double().sum((1, 2, 3)), change_p.double(), rtol=1e-5, atol=1e-8)


def test_batched_integrated_gradients_match_the_per_image_loop():
    torch.manual_seed(0)
    model = build_model("small_cnn", 2, widths=[4, 8])
    model.train()  # the call must switch to eval mode (BatchNorm) and back
    original, edited, _ = _pair(4, seed=1)
    original, edited = original.float(), edited.float()
    target = [1, 0, 1, 1]
    batched = integrated_gradients(
        model, edited, original, target, n_steps=8, internal_batch_size=12, batch_size=3
    )
    looped = integrated_gradients_loop(model, edited, original, target, n_steps=8)
    assert model.training
    assert torch.allclose(batched, looped, atol=1e-5, rtol=1e-4)


def test_integrated_gradients_checks_arguments():
    model = _Smooth()
    x = torch.zeros(2, 3, 8, 8)
    with pytest.raises(ConfigError, match="n_steps"):
        integrated_gradients(model, x, x, 0, n_steps=0)
    with pytest.raises(ConfigError, match="same shape"):
        integrated_gradients(model, x, x[:1], 0)
    with pytest.raises(ConfigError, match="targets"):
        integrated_gradients(model, x, x, [0, 1, 0])
    with pytest.raises(ConfigError, match="match"):
        masked_attribution_sum(torch.zeros(2, 3, 8, 8), torch.zeros(2, 4, 4))


# --------------------------------------------------------------------- pruning
@pytest.mark.parametrize(
    ("psi", "rho", "mode", "keep", "reasons"),
    [
        (0.40, 0.30, "both", True, []),
        (0.95, 0.30, "both", False, [REASON_PSI]),  # still looks like class i
        (0.40, -0.10, "both", False, [REASON_RHO]),  # the edit does not support i'
        (0.95, -0.10, "both", False, [REASON_PSI, REASON_RHO]),
        (0.90, 0.30, "both", False, [REASON_PSI]),  # psi == Psi_i is not below it
        (0.40, 0.00, "both", False, [REASON_RHO]),  # rho == P is not above it
        (0.95, 0.30, "rho", True, []),
        (0.40, -0.10, "rho", False, [REASON_RHO]),
        (0.40, -0.10, "psi", True, []),
        (0.95, -0.10, "psi", False, [REASON_PSI]),
        (0.95, -0.10, "none", True, []),
        (math.nan, 0.30, "both", False, [REASON_PSI]),
        (0.40, None, "both", False, [REASON_RHO]),
    ],
)
def test_pruning_rule(psi, rho, mode, keep, reasons):
    decision = prune_decision(psi, 0.90, rho, 0.0, mode)
    assert decision.keep is keep
    assert decision.reason == "; ".join(reasons)
    assert decision.pass_psi is (psi is not None and not math.isnan(psi) and psi < 0.90)


def test_pruning_never_keeps_a_candidate_without_a_mask():
    decision = prune_decision(0.1, 0.9, 5.0, 0.0, "none", mask_ok=False)
    assert not decision.keep and decision.reason.startswith("no mask")
    with pytest.raises(ConfigError, match="pruning mode"):
        prune_decision(0.1, 0.9, 5.0, 0.0, "either")


def test_psi_threshold_is_the_class_mean_softmax():
    probabilities = np.array([[0.9, 0.1], [0.7, 0.3], [0.2, 0.8], [0.6, 0.4]])
    y = np.array([0, 0, 1, 1])
    assert np.allclose(class_mean_softmax(probabilities, y, 2), [0.8, 0.6])


# ------------------------------------------------------------------- selection
def test_low_loss_selection_ranks_by_per_sample_loss():
    losses = np.array([0.9, 0.1, 0.5, 0.05, 0.3, 0.3, 2.0, 0.01])
    y = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    lowest = rank_per_class(losses, y, [2, 3])
    assert lowest[0].tolist() == [7, 1]  # 0.01, 0.1
    assert lowest[1].tolist() == [3, 4, 5]  # 0.05, then the 0.3 tie in dataset order
    highest = rank_per_class(losses, y, [1, 1], lowest=False)
    assert highest[0].tolist() == [0] and highest[1].tolist() == [6]
    with pytest.raises(ConfigError, match="one per sample"):
        rank_per_class(np.array([0.3]), y, [1, 1])  # a batch mean is not a ranking


def test_reference_scores_are_per_sample_cross_entropy(tmp_path):
    from unspur.data.dataset import GroupDataset
    from unspur.data.registry import load_dataset
    from unspur.data.transforms import eval_transform

    table = load_dataset("synthetic", n_train=12, n_val=4, n_test=4, size=16).split("train")
    view = GroupDataset(table, eval_transform(16, 1.0))
    torch.manual_seed(0)
    model = build_model("small_cnn", 2, widths=[4, 4])
    losses, probabilities = reference_scores(model, view, batch_size=5)
    model.eval()
    with torch.no_grad():
        x = torch.stack([view[i][0] for i in range(len(view))])
        logits = model(x)
    expected = nn.functional.cross_entropy(logits, view.y, reduction="none").numpy()
    assert losses.shape == (12,) and np.allclose(losses, expected, atol=1e-5)
    assert np.allclose(probabilities.sum(1), 1.0, atol=1e-5)


def test_latent_blend_defaults_to_eq2_and_bad_values_name_the_choices():
    from unspur.methods.dbb import _check_options

    options = available_methods()["dbb"].resolve_options({})
    assert options["latent_blend"] == "clean"  # Eq. 2: z_0 outside the mask
    with pytest.raises(ConfigError, match=r"latent_blend='paste' is not none\|clean\|noised"):
        _check_options({**options, "latent_blend": "paste"}, 2)


def test_option_helpers():
    assert resolve_k(5, [3, 10]) == [3, 5]
    assert resolve_k(0.5, [4, 10]) == [2, 5]
    assert resolve_k([1, 2], [4, 10]) == [1, 2]
    with pytest.raises(ConfigError):
        resolve_k([1], [4, 10])
    assert resolve_gammas(2, 2) == [2.0, 2.0]
    assert resolve_gammas([1, 3], 2) == [1.0, 3.0]
    with pytest.raises(ConfigError):
        resolve_gammas([1, 2, 3], 2)
    from PIL import Image

    ring = np.zeros((8, 10), dtype=np.uint8)
    ring[2, 3:6] = ring[5, 3:6] = ring[2:6, 3] = 255
    box = np.asarray(box_mask(Image.fromarray(ring)))
    assert (box[2:6, 3:6] == 255).all() and box.sum() == 12 * 255
    assert not np.asarray(box_mask(Image.fromarray(np.zeros((4, 4), np.uint8)))).any()


# ------------------------------------------------------------------ objective
def test_retraining_loss_separates_sources_and_never_returns_nan():
    torch.manual_seed(0)
    logits = torch.randn(6, 2, requires_grad=True)
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    index = torch.arange(6)
    is_generated = torch.tensor([False, False, False, True, True, False])
    objective = DBBObjective(is_generated, [2.0, 3.0])
    ce = nn.functional.cross_entropy(logits, y, reduction="none")
    real = ce[[0, 1, 2, 5]].mean()
    gen1 = ce[[3, 4]].mean()  # generated items are both of class 1; class 0 has none
    loss = objective(logits, y, y, index)
    assert torch.isfinite(loss)
    assert torch.allclose(loss, real + 3.0 * gen1)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    # A batch of real items only: the generated terms are 0, not NaN.
    only_real = objective(logits[:3], y[:3], y[:3], index[:3])
    assert torch.allclose(only_real, ce[:3].mean())
    # A batch of generated items only: L_train is 0, not NaN.
    only_generated = objective(logits[3:5], y[3:5], y[3:5], index[3:5])
    assert torch.allclose(only_generated, 3.0 * ce[3:5].mean())


# ------------------------------------------------------------------ end to end
WORDS = ["a", "photo", "of", "circle", "cross", "shape"]


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """A tiny inpainting pipeline and the text-to-image pipeline of its family: the same
    text encoder, tokenizer and VAE, its own text-to-image UNet (as SD-2 base and SD-2
    inpainting)."""
    from diffusers import StableDiffusionPipeline

    from unspur.generate.components import TINY, build_pipeline, build_unet

    torch.manual_seed(0)
    inpaint = tmp_path_factory.mktemp("tiny_inpaint")
    t2i = tmp_path_factory.mktemp("tiny_t2i")
    pipe = build_pipeline("inpaint", words=WORDS)
    pipe.save_pretrained(inpaint)
    StableDiffusionPipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
        unet=build_unet(TINY, "text2image"), scheduler=pipe.scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(t2i)  # fmt: skip
    return inpaint, t2i


@pytest.fixture(scope="module")
def tiny_inpainter(tiny_pair):
    return tiny_pair[0]


def _config(generator, **options):
    base = dict(
        generator=str(generator), masker="ground_truth", k=3, token_samples=2,
        inversion_steps=2, inversion_batch_size=2, steps=2, guidance_scale=2.0, ig_steps=4,
        retrain_epochs=1, figures=2, mask_dilation=1, inversion_model="generator",
    )  # fmt: skip
    base.update(options)
    overrides = [f"method.options.{k}={json.dumps(v)}" for k, v in base.items()]
    return load_config(None, helpers.DEBUG + ["method.name=dbb"] + overrides)


def test_dbb_end_to_end_with_a_tiny_engine(tiny_pair, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny_inpainter, tiny_t2i = tiny_pair
    method = available_methods()["dbb"]
    assert method.supervision.val_group_labels and not method.supervision.train_group_labels
    config = _config(tiny_inpainter, inversion_model=str(tiny_t2i), retrain_lr_grid=[1e-4, 1e-3])
    results = run(config, tmp_path)
    assert results["method"] == "dbb" and results["supervision"]["symbol"] == "✓"
    folder = tmp_path / "dbb"
    # Tokens trained on the inpainting pipeline's own text encoder (32-d here).
    from safetensors.torch import load_file

    for c in (0, 1):
        (vector,) = load_file(
            folder / "tokens" / f"class{c}" / "learned_embeds.safetensors"
        ).values()
        assert vector.shape == (32,)
    # Tokens learned on the text-to-image model of the family, with the class name in
    # the template (section 4.1), then loaded into the inpainting pipeline.
    selection = json.loads((folder / "selection.json").read_text())
    for info in selection["tokens"].values():
        assert info["inversion_model"] == str(tiny_t2i) and info["with_masks"] == 0
        assert info["templates"][0].startswith("a photo of a {} ")
    candidates = pd.read_csv(folder / "candidates.csv")
    assert len(candidates) == 6  # k = 3 per class, one copy each
    assert set(candidates["y"]) == {0, 1}
    assert (candidates["y"] != candidates["source_y"]).all()
    assert candidates[["psi", "rho", "Psi", "P"]].notna().all().all()
    expected = candidates["pass_psi"] & candidates["pass_rho"]
    assert (candidates["used"] == expected).all()  # pruning=both
    assert (candidates["kept_paper_rule"] == expected).all()
    assert (candidates.loc[~candidates["used"], "reason"].str.len() > 0).all()
    # The store keeps both scores and the reason of every candidate.
    manifest = pd.read_csv(folder / "store" / "manifest.csv")
    assert {"score_psi", "score_rho", "score_mask_area", "kept", "reason"} <= set(manifest.columns)
    assert manifest["prompt"].str.contains("<dbb-").all()
    assert all(p.startswith("a photo of a <dbb-") for p in manifest["prompt"])
    # P calibrated per new class (the default) and applied per new class.
    statistics = json.loads((folder / "statistics.json").read_text())
    assert statistics["rho_calibrated"] and len(statistics["rho_thresholds"]) == 2
    for c, threshold in enumerate(statistics["rho_thresholds"]):
        assert np.allclose(candidates.loc[candidates["y"] == c, "P"], threshold)
    # No paste-back (Eq. 2): the images are the inpainting model's output, whose VAE
    # round trip changes pixels outside the mask too.
    from PIL import Image

    outside_changed = False
    for _, row in manifest.iterrows():
        image = np.asarray(Image.open(folder / "store" / row["filename"]).convert("RGB"))
        mask = np.asarray(Image.open(folder / "store" / row["mask"])) >= 128
        parent = results_parent(tmp_path, row["parent"], image.shape[:2])
        outside_changed |= bool((image[~mask] != parent[~mask]).any())
    assert outside_changed
    rows = statistics["classes"]
    assert [r["generated"] for r in rows] == [3, 3]
    assert sum(r["used"] for r in rows) == int(expected.sum())
    assert (folder / "figures" / "samples.png").is_file()
    # Retraining (defaults: Adam without weight decay, the rate chosen on validation):
    # one stage per rate from the same start, the best validation score kept.
    search = json.loads((folder / "retrain_search.json").read_text())
    assert [c["lr"] for c in search["candidates"]] == [1e-4, 1e-3]
    best = max(search["candidates"], key=lambda c: c["score"])
    assert search["chosen_lr"] == best["lr"] and search["metric"] == "worst_group"
    for rate in ("0.0001", "0.001"):
        assert (folder / f"retrain_lr{rate}" / "best" / "model.json").is_file()

    # A rerun resumes every stage: no image is generated again.
    before = manifest[["key", "created"]].sort_values("key").to_numpy().tolist()
    run(config, tmp_path, force=True)
    after = pd.read_csv(folder / "store" / "manifest.csv")[["key", "created"]]
    assert after.sort_values("key").to_numpy().tolist() == before

    # The run report carries the statistics table.
    from unspur.report import render_run_report

    assert "DBB: generated and pruned samples" in render_run_report(tmp_path)


def results_parent(run_dir, parent: str, shape) -> np.ndarray:
    """The parent image of a candidate, as RGB at the candidate's size."""

    from unspur.config import load_config as _load
    from unspur.data.registry import load_dataset

    del run_dir
    config = _load(None, helpers.DEBUG)
    table = load_dataset(config.data.name, **config.data.options)
    image = table.store.open(parent).convert("RGB")
    return np.asarray(image.resize((shape[1], shape[0])))


def test_dbb_ablations_no_inversion_no_pruning(tiny_inpainter, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = _config(
        tiny_inpainter, textual_inversion=False, pruning="none", k=2,
        token_source="high_loss", object_word="shape", mask_region="box",
        init="reference_new_head", paste_back=True, rho_threshold=[0.0, 0.0],
    )  # fmt: skip
    run(config, tmp_path)
    folder = tmp_path / "dbb"
    assert not (folder / "tokens").exists()
    manifest = pd.read_csv(folder / "store" / "manifest.csv")
    assert set(manifest["prompt"]) == {"a photo of a shape"}
    from PIL import Image

    for name in manifest["mask"]:  # boxes around the objects (grown by 1 px)
        mask = np.asarray(Image.open(folder / "store" / name)) >= 128
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        assert mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all()
    for _, row in manifest.iterrows():  # paste_back: every pixel outside the mask is the parent's
        image = np.asarray(Image.open(folder / "store" / row["filename"]).convert("RGB"))
        mask = np.asarray(Image.open(folder / "store" / row["mask"])) >= 128
        parent = results_parent(tmp_path, row["parent"], image.shape[:2])
        assert (image[~mask] == parent[~mask]).all()
    candidates = pd.read_csv(folder / "candidates.csv")
    assert candidates["used"].all()  # no pruning: every generated candidate is used
    assert (candidates["P"] == 0.0).all()
    assert json.loads((folder / "statistics.json").read_text())["pruning"] == "none"


def test_dbb_variants_share_tokens_and_candidates_through_the_cache(
    tiny_inpainter, tmp_path, monkeypatch
):
    """``shared_cache``: a pruning variant restores the tokens and candidates of the run
    before it (same images, bytes and scores, as a run without the cache makes them); a
    variant that changes the masks restores the tokens only."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from unspur.config import load_config as load

    erm = load(None, helpers.DEBUG + ["method.name=erm"])
    run(erm, tmp_path / "erm")
    shared = tmp_path / "shared"

    def variant(name, **options):
        config = _config(tiny_inpainter, **options)
        config.method.reference = str(tmp_path / "erm" / "model")
        run(config, tmp_path / name)
        folder = tmp_path / name / "dbb"
        summary = json.loads((folder / "dbb.json").read_text())
        return folder, summary["restored_from_shared_cache"]

    first, restored = variant("both", shared_cache=str(shared))
    assert restored == {}
    assert sorted(p.name.rsplit("-", 1)[0] for p in shared.iterdir()) == [
        "dbb-candidates", "dbb-tokens"
    ]  # fmt: skip
    none, restored = variant("none", shared_cache=str(shared), pruning="none")
    assert set(restored) == {"tokens", "store"}
    alone, restored = variant("alone", pruning="none")  # no cache: made from scratch
    assert restored == {}

    def manifest(folder):
        return pd.read_csv(folder / "store" / "manifest.csv").sort_values("key")

    assert manifest(none)["created"].tolist() == manifest(first)["created"].tolist()
    assert manifest(alone)["created"].tolist() != manifest(first)["created"].tolist()
    alone_created = manifest(alone)["created"].tolist()
    for name in manifest(alone)["filename"]:  # the images a run makes itself
        assert (none / "store" / name).read_bytes() == (alone / "store" / name).read_bytes()
    columns = ["key", "psi", "rho", "P", "used"]
    shared_rows = pd.read_csv(none / "candidates.csv")[columns]
    alone_rows = pd.read_csv(alone / "candidates.csv")[columns]
    pd.testing.assert_frame_equal(shared_rows, alone_rows)
    assert shared_rows["used"].all()  # its own pruning mode, not the first run's
    # Setting the cache on a finished run changes none of its stages' inputs: it resumes.
    config = _config(tiny_inpainter, pruning="none", shared_cache=str(shared))
    config.method.reference = str(tmp_path / "erm" / "model")
    run(config, tmp_path / "alone", force=True)
    assert manifest(alone)["created"].tolist() == alone_created
    # Other masks: the tokens are shared, the candidates are not.
    box, restored = variant("box", shared_cache=str(shared), mask_region="box")
    assert set(restored) == {"tokens"}
    assert len(list(shared.iterdir())) == 3


def test_shared_cache_keys_restores_and_publishes(tmp_path):
    from unspur.shared_cache import SharedCache, restored_from

    cache = SharedCache(tmp_path / "cache")
    source = tmp_path / "made"
    (source / "images").mkdir(parents=True)
    (source / "images" / "a.png").write_bytes(b"first")
    assert cache.restore("stage", {"k": 1}, tmp_path / "run1") is None  # nothing yet
    entry = cache.publish("stage", {"k": 1}, source)
    (source / "images" / "a.png").write_bytes(b"second")
    assert cache.publish("stage", {"k": 1}, source) == entry  # the first copy is kept
    assert cache.restore("stage", {"k": 2}, tmp_path / "run1") is None  # other inputs
    assert cache.restore("stage", {"k": 1}, tmp_path / "run1") == entry
    assert (tmp_path / "run1" / "images" / "a.png").read_bytes() == b"first"
    assert restored_from(tmp_path / "run1") == entry.name and restored_from(source) is None
    started = tmp_path / "run2"
    started.mkdir()
    (started / "part").write_text("mine")
    assert cache.restore("stage", {"k": 1}, started) is None  # a started run resumes its own
    assert sorted(p.name for p in started.iterdir()) == ["part"]


def test_dbb_shared_inputs_leave_out_only_later_options(tmp_path):
    """Pruning and retraining options do not split the candidates' cache; everything
    generation reads does, and the mask options split the candidates, not the tokens."""
    from types import SimpleNamespace

    from unspur.methods.dbb import CANDIDATES_STAGE, TOKENS_STAGE, shared_inputs
    from unspur.shared_cache import SharedCache

    cache = SharedCache(tmp_path)
    config = _config("domain")
    options = available_methods()["dbb"].resolve_options(config.method.options)

    def key(stage, **changed):
        context = SimpleNamespace(config=config)
        return cache.entry(stage, shared_inputs(context, {**options, **changed}, "r", "w", stage))

    for stage in (TOKENS_STAGE, CANDIDATES_STAGE):
        assert key(stage) == key(stage, pruning="none", retrain_lr=1e-3, gamma=2.0, figures=0)
        assert key(stage) != key(stage, token_samples=5)
        assert key(stage) != key(stage, masker="saliency")
    assert key(TOKENS_STAGE) == key(TOKENS_STAGE, mask_region="box", k=7, steps=9)
    assert key(CANDIDATES_STAGE) != key(CANDIDATES_STAGE, mask_region="box")
    assert key(CANDIDATES_STAGE) != key(CANDIDATES_STAGE, k=7)
    assert key(CANDIDATES_STAGE) != key(CANDIDATES_STAGE, latent_blend="none")
    assert key(TOKENS_STAGE) == key(TOKENS_STAGE, latent_blend="none")
    assert key(CANDIDATES_STAGE) != key(CANDIDATES_STAGE, rho_threshold=[0.1, 0.1])
    context = SimpleNamespace(config=config)
    assert cache.entry(
        CANDIDATES_STAGE, shared_inputs(context, options, "r", "w", CANDIDATES_STAGE)
    ) != (
        cache.entry(
            CANDIDATES_STAGE, shared_inputs(context, options, "other", "w", CANDIDATES_STAGE)
        )
    )


def test_dbb_refuses_bad_options(tmp_path):
    config = _config("domain", pruning="sometimes")
    with pytest.raises(ConfigError, match="pruning"):
        run(config, tmp_path)


# ------------------------------------------------ the IG condition (Eq. 4-5, Table 10)
class _Leaky(nn.Module):
    """Linear logits on channel 0: f_0 = -(sum outside the mask), f_1 = (sum outside) +
    0.1 (sum inside). An edit that leaks outside the mask moves the prediction a lot while
    the masked region itself barely supports the new class."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.linear = nn.Linear(3 * 8 * 8, 2, bias=False)
        inside = torch.zeros(3, 8, 8)
        inside[0] = mask.float()
        outside = torch.zeros(3, 8, 8)
        outside[0] = 1.0 - mask.float()
        with torch.no_grad():
            self.linear.weight.copy_(torch.stack([-outside, outside + 0.1 * inside]).flatten(1))

    def forward(self, x):
        return self.linear(x.flatten(1))


def test_psi_keeps_but_rho_prunes_an_edit_that_does_not_support_the_new_class():
    from unspur.methods.dbb import resolve_rho_thresholds, rho_scores

    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[2:6, 2:6] = True  # 16 pixels
    model = _Leaky(mask)
    original = torch.zeros(1, 3, 8, 8)
    generated = torch.full((1, 3, 8, 8), 0.1)  # no paste-back: the outside changed too
    generated[0, :, mask] = 0.5
    options = {"ig_steps": 16, "ig_internal_batch_size": 16, "ig_batch_size": 4}
    options["ig_output"] = "logit"
    rho = float(rho_scores(model, generated, original, mask[None], [1], options)[0])
    # IG of a linear model is exact: inside the mask 0.1 * 16 * 0.5 = 0.8; the 4.8 that
    # the outside contributes to f_1 is not part of rho.
    assert rho == pytest.approx(0.8, abs=1e-5)
    with torch.no_grad():
        psi = float(torch.softmax(model(generated), 1)[0, 0])
    Psi = 0.9  # the class's mean softmax (Eq. 3)
    thresholds = resolve_rho_thresholds([1.0, 1.0], 2)  # Table 10, Waterbirds P1, P2
    assert prune_decision(psi, Psi, rho, thresholds[1], "psi").keep  # psi alone keeps it
    decision = prune_decision(psi, Psi, rho, thresholds[1], "both")
    assert not decision.keep and decision.reason == REASON_RHO  # rho prunes it
    # The old scalar P = 0 ("the new class's score went up") would have kept it.
    assert prune_decision(psi, Psi, rho, 0.0, "both").keep


def test_rho_thresholds_per_new_class_and_calibration():
    from unspur.methods.dbb import calibrate_rho_thresholds, resolve_rho_thresholds

    assert resolve_rho_thresholds([2, 0.3], 2) == [2.0, 0.3]  # Table 10, CelebA
    assert resolve_rho_thresholds(1, 3) == [1.0, 1.0, 1.0]
    assert resolve_rho_thresholds("calibrate", 2) is None
    with pytest.raises(ConfigError, match="rho_threshold"):
        resolve_rho_thresholds([1.0], 2)
    rho = np.array([0.0, 1.0, 2.0, 3.0, 4.0, 10.0, 20.0, np.nan, 30.0])
    new_class = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1])
    # Every candidate in the subset: P_c = the quantile of its class's finite scores.
    p = calibrate_rho_thresholds(rho, new_class, 3, samples=100, quantile=0.5, seed=0)
    assert p[0] == pytest.approx(2.0) and p[1] == pytest.approx(20.0) and math.isnan(p[2])
    # A subset of 2 per class draws 2 of the class's scores.
    small = calibrate_rho_thresholds(rho, new_class, 2, samples=2, quantile=0.0, seed=1)
    assert small[0] in {0.0, 1.0, 2.0, 3.0} and small[1] in {10.0, 20.0}


def test_psi_over_the_class_or_the_low_loss_subset():
    from unspur.methods.dbb import low_loss_mean_softmax

    probabilities = np.array([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8], [0.4, 0.6]])
    y = np.array([0, 0, 1, 1])
    assert np.allclose(class_mean_softmax(probabilities, y, 2), [0.7, 0.7])  # Eq. 3
    selected = {0: np.array([0]), 1: np.array([2])}  # the lowest-loss sample of each
    assert np.allclose(low_loss_mean_softmax(probabilities, selected, 2), [0.9, 0.8])


# ------------------------------------------------------- token samples (section 8.2)
#: CelebA's class-balanced training groups (Table 7): (not blond, female) 12,426,
#: (not blond, male) 11,841, (blond, female) 22,880, (blond, male) 1,387.
CELEBA_TABLE7 = np.array([12426, 11841, 22880, 1387])
#: Waterbirds (Table 6): landbird land/water 3,498 / 184, waterbird land/water 56 / 1,018.
WATERBIRDS_TABLE6 = np.array([3498, 184, 56, 1018])


def test_token_attributes_follow_the_other_class():
    from unspur.methods.dbb import associated_attributes, token_attributes

    # CelebA: non-blond goes with men although non-blond women are more numerous.
    assert associated_attributes(CELEBA_TABLE7, 2, 2) == [1, 0]
    # Non-blond token from non-blond women (a = 0), blond token from blond men (a = 1).
    assert token_attributes(CELEBA_TABLE7, 2, 2) == {0: [0], 1: [1]}
    # Waterbirds: landbirds on water (a = 1), waterbirds on land (a = 0).
    assert token_attributes(WATERBIRDS_TABLE6, 2, 2) == {0: [1], 1: [0]}
    # An explicit override wins for the classes it names.
    assert token_attributes(CELEBA_TABLE7, 2, 2, {1: [0]}) == {0: [0], 1: [0]}


def _celeba_context():
    """A stand-in run context with CelebA-shaped training counts and a validation set
    holding every (class, gender) group."""
    from types import SimpleNamespace

    y_val = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    a_val = np.array([0, 0, 1, 1, 0, 0, 1, 1])  # a = 1: Male
    val = SimpleNamespace(y=torch.from_numpy(y_val), a=torch.from_numpy(a_val))
    table = SimpleNamespace(
        class_names=["not Blond_Hair", "Blond_Hair"], attr_names=["not Male", "Male"],
        n_classes=2, n_attrs=2,
    )  # fmt: skip
    return SimpleNamespace(
        train=SimpleNamespace(table=table), val=val, train_group_counts=CELEBA_TABLE7,
        config=SimpleNamespace(seed=0),
    )  # fmt: skip


def test_celeba_token_samples_are_non_blond_women_and_blond_men():
    from unspur.methods.dbb import DBB

    context = _celeba_context()
    options = {**DBB.defaults, "token_samples": 10}
    losses, y = np.zeros(4), np.array([0, 0, 1, 1])
    samples = DBB()._token_samples(context, options, losses, y, np.arange(4))
    dataset, positions, source = samples[0]
    assert source == "val_minority" and positions.tolist() == [0, 1]  # non-blond women
    assert samples[1][1].tolist() == [6, 7]  # blond men
    # The per-dataset override, by names.
    options["token_attributes"] = {"Blond_Hair": "not Male"}
    samples = DBB()._token_samples(context, options, losses, y, np.arange(4))
    assert samples[1][1].tolist() == [4, 5]
    options["token_attributes"] = {"Blond_Hair": "bald"}
    with pytest.raises(ConfigError, match="token_attributes"):
        DBB()._token_samples(context, options, losses, y, np.arange(4))


# ----------------------------------------------------- class-balanced pool (section 7)
def test_class_balanced_pool_and_selection_inside_it():
    from unspur.methods.dbb import training_pool

    y = np.array([0] * 8 + [1] * 3)
    assert training_pool(y, 2, False, 0).tolist() == list(range(11))
    pool = training_pool(y, 2, True, 0)
    assert np.bincount(y[pool]).tolist() == [3, 3]
    assert np.array_equal(pool, training_pool(y, 2, True, 0))  # seeded
    losses = np.arange(11, dtype=float)
    lowest = rank_per_class(losses, y, [2, 2], pool=pool)
    assert set(lowest[0]) <= set(pool) and set(lowest[1]) <= set(pool)


# -------------------------------------------- textual inversion on the text-to-image model
def test_inversion_model_is_the_generators_text_to_image_family(tmp_path):
    from types import SimpleNamespace

    from unspur.methods.dbb import DBB, inversion_templates, inversion_weights

    options = {**DBB.defaults, "generator": "stabilityai/stable-diffusion-2-inpainting"}
    context = SimpleNamespace(out_dir=tmp_path)
    assert inversion_weights(options, context) == "stabilityai/stable-diffusion-2-base"
    assert inversion_weights({**options, "inversion_model": "generator"}, context) == "generator"
    with pytest.raises(ConfigError, match="inversion_model"):
        inversion_weights({**options, "generator": str(tmp_path)}, context)
    templates = inversion_templates(options, "bird")
    assert templates[0] == "a photo of a {} bird"  # section 4.1: "A photo of a [C] bird"
    assert all(t.endswith("{} bird") for t in templates)


def test_inversion_model_of_a_domain_model_is_its_text_to_image_pipeline(tmp_path):
    """A domain model's text-to-image and inpainting pipelines share one text encoder
    (the same object is saved in both), so its tokens are learned on the former."""
    from types import SimpleNamespace

    from unspur.generate.domain import DOMAIN_FILE
    from unspur.methods.dbb import DBB, inversion_templates, inversion_weights

    folder = tmp_path / "domain_model"
    for task in ("text2image", "inpaint"):
        (folder / task).mkdir(parents=True)
        (folder / task / "model_index.json").write_text("{}")
    (folder / DOMAIN_FILE).write_text(json.dumps({"class_names": ["circle", "cross"]}))
    options = {**DBB.defaults, "generator": str(folder)}
    context = SimpleNamespace(out_dir=tmp_path)
    assert inversion_weights(options, context) == str(folder / "text2image")
    # A domain model knows only its captions' words: one template, the class name after.
    assert inversion_templates(options, "circle") == ["a photo of a {} circle"]


def test_dbb_refuses_bad_token_settings_before_training(tmp_path):
    with pytest.raises(ConfigError, match="token_attributes"):
        run(_config("domain", token_attributes={"circle": "purple"}), tmp_path)
    assert not (tmp_path / "erm").exists()
    with pytest.raises(ConfigError, match="inversion_model"):
        run(_config(tmp_path, inversion_model=None), tmp_path / "run2")


def test_retraining_defaults_follow_the_official_train_py_and_search_the_rate():
    """The paper gives no optimiser (section 5.1, Table 10 gives batch and rate only):
    the official train.py's Adam without weight decay; the rate is chosen on validation
    over Table 10's decade and the two above it (our choice) unless a preset fixes it."""
    from unspur.methods.dbb import DBB, RETRAIN_LR_GRID, retrain_learning_rates

    defaults = DBB.defaults
    assert defaults["retrain_optimizer"] == "adam"
    assert defaults["retrain_weight_decay"] == 0.0
    assert defaults["retrain_lr"] == "search"
    assert tuple(defaults["retrain_lr_grid"]) == RETRAIN_LR_GRID == (1e-5, 1e-4, 1e-3)
    assert retrain_learning_rates(dict(defaults)) == [1e-5, 1e-4, 1e-3]
    assert retrain_learning_rates({**defaults, "retrain_lr": 5e-6}) == [5e-6]
    assert retrain_learning_rates({**defaults, "retrain_lr": None}) is None


@pytest.mark.parametrize(
    "options",
    [{"retrain_lr": "fast"}, {"retrain_lr": -1.0}, {"retrain_lr_grid": []},
     {"retrain_lr_grid": [1e-4, "x"]}],
)  # fmt: skip
def test_bad_retraining_rates_are_refused_naming_the_option(options):
    from unspur.methods.dbb import DBB, retrain_learning_rates

    with pytest.raises(ConfigError, match="retrain_lr"):
        retrain_learning_rates({**DBB.defaults, **options})
