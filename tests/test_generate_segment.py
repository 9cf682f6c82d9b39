"""Segmenters, maskers and CLIP scoring of the generative engine, on tiny offline models.

GroundingDINO, SAM and CLIP are built from tiny configs, saved with ``save_pretrained``
and loaded back through the same ``from_pretrained`` code a user runs with hub ids.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from unspur.data.readers.synthetic import read_synthetic
from unspur.errors import ConfigError, UnspurError
from unspur.generate import clip_score, segment
from unspur.generate.clip_score import (
    ClipScorer,
    build_tiny_clip,
    features,
    filter_score,
    group_centroid,
    keep_top_fraction,
)
from unspur.generate.hub import placement
from unspur.generate.maskers import (
    EMPTY_MASK,
    FLAT_SALIENCY,
    NO_BOX,
    NO_GROUND_TRUTH,
    GroundTruthMasker,
    Masker,
    MaskResult,
    SaliencyMasker,
    build_masker,
    dilate,
)
from unspur.generate.segment import TextPromptMasker, normalize_prompt
from unspur.models.small_cnn import SmallCNN

WORDS = ["a", "photo", "of", "the", "bird", "circle", "cross", "on", "water", "land"]


# ------------------------------------------------------------- tiny models
@pytest.fixture(scope="module")
def offline():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory, offline):
    """A GroundingDINO (Swin + BERT) small enough to run in milliseconds, saved."""
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoProcessor,
        SwinConfig,
    )
    from transformers.models.grounding_dino.image_processing_pil_grounding_dino import (
        GroundingDinoImageProcessorPil,
    )

    root = tmp_path_factory.mktemp("grounding_dino")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *WORDS]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(str(root / "vocab.txt"), do_lower_case=True)
    (root / "vocab.txt").unlink()
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(
            window_size=7,
            embed_dim=8,
            depths=[1, 1, 1, 1],
            num_heads=[1, 1, 1, 1],
            image_size=128,
            out_indices=[2, 3, 4],
        ),
        text_config=BertConfig(
            vocab_size=len(vocab),
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=8,
            max_position_embeddings=32,
        ),
        d_model=32,  # GroupNorm(32, d_model) inside
        encoder_layers=1,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=16,
        decoder_ffn_dim=16,
        num_queries=3,
        encoder_n_points=2,
        decoder_n_points=2,
        max_text_len=16,
        disable_custom_kernels=True,
    )
    torch.manual_seed(0)
    GroundingDinoForObjectDetection(config).save_pretrained(root)
    image_processor = GroundingDinoImageProcessorPil(
        size={"shortest_edge": 128, "longest_edge": 128}
    )
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(
        root
    )
    return root


@pytest.fixture(scope="module")
def sam_dir(tmp_path_factory, offline):
    """A SAM with a 64 px, 2-layer ViT and a 16-wide mask decoder, saved."""
    from transformers import (
        SamConfig,
        SamMaskDecoderConfig,
        SamModel,
        SamProcessor,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    root = tmp_path_factory.mktemp("sam")
    config = SamConfig(
        vision_config=SamVisionConfig(
            hidden_size=16,
            output_channels=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=64,
            patch_size=8,
            window_size=4,
            global_attn_indexes=[1],
            num_pos_feats=8,
            mlp_dim=32,
        ),
        prompt_encoder_config=SamPromptEncoderConfig(
            hidden_size=16, image_size=64, patch_size=8, mask_input_channels=4
        ),
        mask_decoder_config=SamMaskDecoderConfig(
            hidden_size=16,
            mlp_dim=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            iou_head_hidden_dim=16,
        ),
    )
    torch.manual_seed(0)
    SamModel(config).save_pretrained(root)
    SamProcessor(
        SamImageProcessorPil(
            size={"longest_edge": 64},
            pad_size={"height": 64, "width": 64},
            mask_size={"longest_edge": 16},
            mask_pad_size={"height": 16, "width": 16},
        )
    ).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, offline):
    """A CLIP with 32-wide towers on 32 px images and the offline word tokenizer, saved."""
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "clip", WORDS)


@pytest.fixture
def fresh_cache():
    segment.clear_model_cache()
    yield
    segment.clear_model_cache()


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, (50, 50, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).convert("L"),
    ]


def _binary(result: MaskResult) -> bool:
    return result.mask.mode == "L" and set(np.unique(np.asarray(result.mask))) <= {0, 255}


# -------------------------------------------------------------- segmenter
def test_text_prompt_masker_end_to_end_and_loaded_once(
    detector_dir, sam_dir, fresh_cache, monkeypatch
):
    loads = []
    real = segment.load_pretrained
    monkeypatch.setattr(
        segment, "load_pretrained", lambda *a, **k: loads.append(a[1]) or real(*a, **k)
    )

    # box_threshold=0: every query of the random detector is kept (its score is > 0).
    masker = TextPromptMasker(detector_dir, sam_dir, box_threshold=0.0, batch_size=2, device="cpu")
    assert isinstance(masker, Masker)
    assert masker.dtype == torch.float32
    assert len(loads) == 4  # detector + processor, SAM + processor
    images = _images()
    results = masker.masks(images, ["bird", "a circle.", "Cross"])
    assert len(results) == 3
    for image, result in zip(images, results):
        assert result.mask.size == image.size
        assert _binary(result)
        assert len(result.boxes) == 3 and len(result.scores) == 3
        assert all(s > 0.0 for s in result.scores)
        assert result.ok == (result.area > 0)
        assert result.ok or result.reason == EMPTY_MASK
    assert any(r.ok for r in results)

    # A second masker (other thresholds) reuses the models: nothing is loaded again.
    again = build_masker(
        "langsam", detector=str(detector_dir), segmenter=str(sam_dir), device="cpu"
    )
    assert len(loads) == 4
    assert again.detector_model is masker.detector_model
    assert again.sam_model is masker.sam_model
    assert again.box_threshold == segment.BOX_THRESHOLD == 0.3
    assert again.text_threshold == segment.TEXT_THRESHOLD == 0.25


def test_union_of_box_masks_matches_per_box_masks(detector_dir, sam_dir):
    masker = TextPromptMasker(detector_dir, sam_dir, box_threshold=0.0, device="cpu")
    image = _images()[1]
    boxes = np.array([[0, 0, 20, 20], [25, 25, 49, 49]], dtype=np.float32)
    (union,) = masker.segment([image], [boxes])
    singles = [masker.segment([image], [b[None]])[0] for b in boxes]
    assert union.shape == (50, 50)
    assert np.array_equal(union, singles[0] | singles[1])
    # Padding a batch with repeated boxes does not change an image's union.
    padded = masker.segment([image, image], [boxes[:1], boxes])
    assert np.array_equal(padded[0], singles[0]) and np.array_equal(padded[1], union)


def test_no_box_gives_empty_mask_not_ok(detector_dir, sam_dir):
    masker = TextPromptMasker(detector_dir, sam_dir, box_threshold=1.0, device="cpu")
    images = _images()
    results = masker.masks(images, "bird")  # one prompt for every image
    for image, result in zip(images, results):
        assert not result.ok
        assert result.reason == NO_BOX
        assert "box_threshold=1.0" in result.detail and "'bird.'" in result.detail
        assert result.mask.size == image.size and result.area == 0.0
        assert result.boxes == ()


def test_segmenter_inputs_and_sources_are_checked(detector_dir, sam_dir, tmp_path):
    masker = TextPromptMasker(detector_dir, sam_dir, device="cpu")
    with pytest.raises(ConfigError, match="prompts"):
        masker.masks(_images())
    with pytest.raises(ConfigError, match="3 images but 2 prompts"):
        masker.masks(_images(), ["bird", "bird"])
    with pytest.raises(ConfigError, match="name the object"):
        normalize_prompt(" . ")
    assert normalize_prompt(" A Bird ") == "a bird."
    with pytest.raises(ConfigError, match="box_threshold"):
        TextPromptMasker(detector_dir, sam_dir, box_threshold=1.5)

    empty = tmp_path / "weights"
    empty.mkdir()
    with pytest.raises(ConfigError, match=rf"{empty}.*config\.json"):
        TextPromptMasker(empty, sam_dir, device="cpu")
    with pytest.raises(ConfigError, match="does not exist"):
        TextPromptMasker(tmp_path / "missing", sam_dir, device="cpu")
    with pytest.raises(UnspurError, match="HF_HUB_OFFLINE=1, which is set"):
        TextPromptMasker("unspur-tests/no-such-detector", sam_dir, device="cpu")


def test_placement():
    assert placement("cpu") == (torch.device("cpu"), torch.float32)
    assert placement("cuda", None)[1] == torch.float16
    assert placement("cpu", "bf16")[1] == torch.bfloat16
    with pytest.raises(ConfigError, match="unknown dtype"):
        placement("cpu", "float8")


# ---------------------------------------------------------- ground truth
def test_ground_truth_masker_returns_the_benchmark_masks():
    table = read_synthetic(n_train=6, n_val=0, n_test=0, size=16)
    masker = build_masker("ground_truth", table=table)
    rows = [0, 3, 5]
    images = [table.store.open(table.frame["filename"].iloc[r]) for r in rows]
    results = masker.masks(images, rows=rows)
    for row, result in zip(rows, results):
        truth = table.mask_store.images[row]
        assert result.ok and _binary(result)
        assert np.array_equal(np.asarray(result.mask), truth)
    # At another image size the mask is resized (nearest) to it.
    big = masker.masks([images[0].resize((32, 32))], rows=[0])[0]
    assert big.mask.size == (32, 32)
    assert np.array_equal(
        big.array, np.kron(table.mask_store.images[0] > 0, np.ones((2, 2))).astype(bool)
    )
    # Without images, the mask's own size.
    assert masker.masks(rows=[1])[0].mask.size == (16, 16)

    frame = table.frame.copy()
    frame.loc[1, "mask"] = None
    missing = GroundTruthMasker(table.with_frame(frame)).masks(rows=[1])[0]
    assert not missing.ok and missing.reason == NO_GROUND_TRUTH and missing.mask.size == (16, 16)
    with pytest.raises(ConfigError, match="rows="):
        masker.masks(images)


# ---------------------------------------------------------------- saliency
def test_saliency_masker_gives_top_k_masks():
    torch.manual_seed(0)
    model = SmallCNN(2, widths=[4, 4])
    table = read_synthetic(n_train=4, n_val=0, n_test=0, size=16)
    images = [table.store.open(name) for name in table.frame["filename"]]
    images.append(images[0].resize((20, 12)))  # another size: masked at its own size
    masker = build_masker("xgradcam", model=model, image_size=16, top_k=0.25)
    results = masker.masks(images, targets=[0, 1, 0, 1, 0])
    for image, result in zip(images, results):
        assert result.ok and _binary(result)
        assert result.mask.size == image.size
        assert result.array.sum() == round(0.25 * image.size[0] * image.size[1])
    counted = SaliencyMasker(model, image_size=16, top_k=10).masks(images[:2])
    assert [int(r.array.sum()) for r in counted] == [10, 10]

    with torch.no_grad():  # a head with no weights explains nothing: a flat CAM
        model.head.weight.zero_()
    flat = masker.masks(images[:1])[0]
    assert not flat.ok and flat.reason == FLAT_SALIENCY and flat.area == 0.0


# -------------------------------------------------------- factory, helpers
def test_build_masker_rejects_unknown_kinds_and_options():
    with pytest.raises(ConfigError, match="text_prompt, saliency, ground_truth"):
        build_masker("segformer")
    table = read_synthetic(n_train=4, n_val=0, n_test=0, size=16)
    with pytest.raises(ConfigError, match=r"\['dilation'\]"):
        build_masker("ground_truth", table=table, dilation=2)
    with pytest.raises(ConfigError, match=r"needs option\(s\) \['model', 'image_size'\]"):
        build_masker("saliency")


def test_dilate_grows_by_a_square():
    mask = np.zeros((7, 7), dtype=bool)
    mask[3, 3] = True
    grown = dilate(mask, 1)
    assert grown.sum() == 9 and grown[2:5, 2:5].all()
    image = dilate(Image.fromarray(mask.astype(np.uint8) * 255), 2)
    assert image.mode == "L" and (np.asarray(image) == 255).sum() == 25
    assert np.array_equal(dilate(mask, 0), mask)
    with pytest.raises(ConfigError, match="pixels"):
        dilate(mask, -1)


def test_mask_result_from_array():
    ok = MaskResult.from_array(np.eye(4, dtype=bool))
    assert ok.ok and ok.area == 0.25
    empty = MaskResult.from_array(torch.zeros(4, 4))
    assert not empty.ok and empty.reason == EMPTY_MASK


# -------------------------------------------------------------------- CLIP
def test_clip_scores(clip_dir, fresh_cache):
    scorer = ClipScorer(clip_dir, device="cpu", batch_size=2)
    assert ClipScorer(str(clip_dir), device="cpu").model is scorer.model  # loaded once
    images = _images()
    embeddings = scorer.image_embeddings(images)
    assert embeddings.shape == (3, 16) and embeddings.dtype == torch.float32
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(3), atol=1e-5)

    same = [images[0], images[0]]
    sims = scorer.text_similarity(same, ["a photo of a bird", "a photo of a bird"])
    assert torch.isfinite(sims).all() and torch.allclose(sims[0], sims[1], atol=1e-6)
    texts = ["a bird", "a circle on land", "a bird"]
    pairwise = torch.diagonal(embeddings @ scorer.text_embeddings(texts).T)
    assert torch.allclose(scorer.text_similarity(images, texts), pairwise, atol=1e-6)
    broadcast = scorer.text_similarity(images, "a bird on water")
    assert broadcast.shape == (3,) and broadcast.abs().max() <= 1 + 1e-5

    # An image is perfectly similar to the centroid of itself.
    itself = scorer.centroid([images[1]])
    assert scorer.centroid_similarity([images[1]], itself).item() == pytest.approx(1.0, abs=1e-5)
    centroid = scorer.centroid(images)
    assert centroid.norm().item() == pytest.approx(1.0, abs=1e-5)

    alpha = 0.3
    scores = scorer.filter_scores(images, texts, centroid, alpha=alpha)
    expected = alpha * scorer.text_similarity(images, texts) + (
        1 - alpha
    ) * scorer.centroid_similarity(images, centroid)
    assert torch.allclose(scores, expected, atol=1e-6)
    with pytest.raises(ConfigError, match="same CLIP model"):
        scorer.centroid_similarity(images, torch.ones(5))


def test_filter_score_and_centroid_formulas():
    label = torch.tensor([0.2, 0.8, -0.1])
    center = torch.tensor([0.5, 0.1, 0.9])
    assert torch.allclose(filter_score(label, center, 0.25), 0.25 * label + 0.75 * center)
    assert torch.equal(filter_score(label, center, 1.0), label)
    with pytest.raises(ConfigError, match="alpha"):
        filter_score(label, center, 1.5)
    x = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    assert torch.allclose(group_centroid(x), torch.tensor([1.0, 1.0]) / math.sqrt(2))

    class Output:
        pooler_output = torch.ones(2, 3)

    assert torch.equal(features(Output()), torch.ones(2, 3))
    assert torch.equal(features(torch.zeros(1, 3)), torch.zeros(1, 3))


def test_keep_top_fraction_keeps_the_ceiling_of_the_share():
    scores = [0.9, 0.1, 0.5, 0.7, 0.3, 0.2, 0.8, 0.6]
    keep = keep_top_fraction(scores, 0.75)
    assert keep.sum() == 6  # 0.75 * 8
    assert not keep[1] and not keep[5]  # the two lowest go
    ten = keep_top_fraction(np.arange(10.0), 0.75)
    assert ten.sum() == math.ceil(7.5) == 8 and ten[2:].all()
    assert keep_top_fraction(np.arange(10.0), 0.7).sum() == 7  # no float round-up to 8
    assert keep_top_fraction([0.5], 0.75).tolist() == [True]
    assert keep_top_fraction([], 0.75).tolist() == []
    # NaN ranks last; ties keep the earlier position.
    assert keep_top_fraction([float("nan"), 1.0, 1.0, 0.0], 0.5).tolist() == [
        False,
        True,
        True,
        False,
    ]
    assert keep_top_fraction([1.0, 1.0, 1.0, 1.0], 0.5).tolist() == [True, True, False, False]
    # Per group: each group keeps its own top share.
    grouped = keep_top_fraction([5, 4, 3, 2, 0.1, 0.2, 0.3, 0.4], 0.75, groups=[0] * 4 + [1] * 4)
    assert grouped.tolist() == [True, True, True, False, False, True, True, True]
    with pytest.raises(ConfigError, match="fraction"):
        keep_top_fraction(scores, 0.0)
    assert clip_score.KEEP_FRACTION == 0.75


# ------------------------------------------------------- box selection, imports
def test_select_boxes_best_first_union():
    boxes = np.array([[0, 0, 5, 5], [1, 1, 9, 9], [2, 2, 4, 4]], dtype=np.float32)
    scores = np.array([0.4, 0.9, 0.6])
    assert segment.select_boxes(boxes, scores, "best").tolist() == [[1, 1, 9, 9]]
    assert segment.select_boxes(boxes, scores, "first").tolist() == [[0, 0, 5, 5]]
    assert segment.select_boxes(boxes, scores, "union").shape == (3, 4)
    with pytest.raises(ConfigError, match="box_selection"):
        segment.select_boxes(boxes, scores, "largest")


def test_langsam_defaults_are_the_papers_checkpoints():
    # DBB section 4.1 (footnote 1): LangSAM = GroundingDINO Swin-B + SAM ViT-H.
    assert segment.DEFAULT_DETECTOR == "IDEA-Research/grounding-dino-base"
    assert segment.DEFAULT_SEGMENTER == "facebook/sam-vit-huge"
    import inspect

    parameters = inspect.signature(TextPromptMasker.__init__).parameters
    assert parameters["box_selection"].default == "best"


def test_masker_uses_the_highest_scoring_box_by_default(detector_dir, sam_dir):
    images = _images()[:2]
    best = TextPromptMasker(detector_dir, sam_dir, box_threshold=0.0, device="cpu")
    first = TextPromptMasker(
        detector_dir, sam_dir, box_threshold=0.0, device="cpu", box_selection="first"
    )
    union = TextPromptMasker(
        detector_dir, sam_dir, box_threshold=0.0, device="cpu", box_selection="union"
    )
    for image, b, f, u in zip(
        images, best.masks(images, "bird"), first.masks(images, "bird"), union.masks(images, "bird")
    ):
        boxes, scores = np.array(b.boxes), np.array(b.scores)
        top = boxes[int(np.argmax(scores))][None]
        (expected_best,) = best.segment([image], [top])
        (expected_first,) = best.segment([image], [boxes[:1]])
        (expected_union,) = best.segment([image], [boxes])
        assert np.array_equal(b.array, expected_best)
        assert np.array_equal(f.array, expected_first)
        assert np.array_equal(u.array, expected_union)
    with pytest.raises(ConfigError, match="box_selection"):
        TextPromptMasker(detector_dir, sam_dir, device="cpu", box_selection="largest")


def test_segment_does_not_import_maskers():
    """maskers -> segment -> mask_result: no import circle (segment used to import
    maskers, which imported segment back)."""
    import subprocess
    import sys

    code = (
        "import sys; import unspur.generate.segment; "
        "print('unspur.generate.maskers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
