"""FFR ("From Fake to Real") and its synthetic-data baselines USB and ASB.

Qraitem, Saenko & Plummer, "From Fake to Real: Pretraining on Balanced Synthetic Images
to Prevent Spurious Correlations in Image Recognition" (ECCV 2024; official code
``mqraitem/From-Fake-to-Real``). Three registered methods share one implementation:

======  =====================================================================  ====
name    recipe                                                                 sup.
======  =====================================================================  ====
``ffr`` stage 1: train on a group-balanced synthetic set only; stage 2: fine-   ✓✓
        tune the stage-1 model on the real training data with ``train_method``
``usb`` real data + synthetic images topping every group up to the largest      ✓✓
        group (upsample to balance), trained with ``train_method``
``asb`` real data + USB's synthetic budget split equally over the groups        ✓✓
        (add a synthetic balanced set), trained with ``train_method``
======  =====================================================================  ====

"None" (no synthetic data) is the registry's plain methods: ``erm``, ``resample_group``,
``groupdro``, ``dfr_val``; ``ffr_none`` runs them with FFR's training settings (Adam,
no scheduler or augmentation, Table 2's None rows with ``preset``). ``train_method``
names one of those (the paper's four; any registered method but these works) and runs *that method's own code*
(:meth:`Method.run`) on a :class:`RunContext` whose training set and model factory are
swapped: for FFR the factory returns the stage-1 model (its selected weights, loaded
strictly), for USB/ASB a fresh model and the merged real + synthetic set.
``train_options`` are that method's options (``groupdro``'s ``eta``, ...); ``dfr_val``
defaults to FFR's own C grid ``{3, 1, 0.3, 0.1, 0.03, 0.01, 0.003}``
(``train_dfr_*.py``). As in the official scripts, DFR runs on top of the ERM model of
the same recipe (``dfr_val`` trains its reference ERM from the context's factory): FFR +
DFR is DFR on the ERM fine-tuned stage-1 model, USB + DFR is DFR on ERM trained on real
+ USB's images.

**Budget** (:mod:`unspur.generate.budget`): USB needs ``sum_g (max n - n_g)`` synthetic
images; ASB and FFR use ``floor(that / G)`` per group, as the official
``num_per_group = num_gen // len(GROUPS)``. ``budget`` may give another total for
ASB and FFR. Everything is recorded in ``<run>/<name>/budget.json``.

**Generation** goes through the synthetic store (:mod:`unspur.generate.store`):
resumable, one manifest row of provenance per image (prompt, seed, generator, weights,
grayscale score, kept). Image ``i`` of group ``g`` has key ``g{g}/{i:06d}``, a seed
derived from ``(generation_seed, g, i)`` (``generation_seed`` defaults to the run seed)
and, when the prompt draws words at random (the paper's templates), words drawn from the
same triple, so one pool serves every method: USB, ASB and FFR of a seed use the first
images of each group of the same pool (as the official loaders take the first files of
each group's folder). Pass ``store`` (a directory) to share a pool between runs; it must
then be made by the same generator. ``shared_cache`` (a directory, our option; a
speed-up only) shares it more safely: a run's finished pool is copied there under a
digest of every input generation reads (:func:`pool_inputs`: the data section, the
generation seed, the per-group targets, the options but the training ones of
:data:`AFTER_GENERATION`, the generator's weights), and a run with the same inputs (the
same mode with another ``train_method``, ASB and FFR, which have the same targets, and
with a fixed ``generation_seed`` every run seed) starts from that copy, so it generates
nothing and keeps a complete pool of its own (``budget.json`` names the entry it
restored). Images removed by a filter are recorded with
``kept: false``; more are generated (up to ``max_tries`` times the group's target)
until the group has its target of kept images; a shortfall is recorded, not hidden.

``generator`` (see :mod:`unspur.generate.engine`): ``"domain"`` trains a small
text-to-image model on the run's training images (CPU, no weights; ``domain`` are its
:class:`~unspur.generate.domain.DomainModelConfig` options), a directory with a
``domain.json`` reuses one, anything else is a diffusers pipeline (hub id such as
``CompVis/stable-diffusion-v1-4``, the paper's, or a local directory).

**Prompts.** ``prompt_template`` fills ``{class}`` and ``{bias}``; ``"auto"`` (default)
uses a domain model's own training captions ("a photo of a {class} on {bias}": the
only vocabulary such a model knows) and the paper's ``"A photo of {bias} {class}"``
(section 4) for any other generator, with human-readable words per dataset
(``prompt_words``: ``"auto"`` picks the dataset's entry of :data:`PROMPT_WORDS`, e.g.
UTKFace "A photo of a child who is female"; our words, the paper gives only the
template). A reader's internal name ("not Male", "child (age<=10)") never reaches a
prompt: a template needing one is refused with a pointer to ``class_words`` /
``bias_words``. ``class_words`` / ``bias_words`` replace a name by a word drawn per image
from a list (a mapping from the class / attribute name, or its index, to a list).
``prompt_preset`` loads the official code's richer templates and word lists
(``generation_code/generate_images_*.py``):

* ``utkface``: "a headshot of a human {Male|Female} {age}", age drawn from
  "baby / aged three|four|five years old" (child) or "in their twenties ... fifties"
  (adult); indexes follow the ``utkface`` reader (gender 0 male; age 0 child, 1 adult).
* ``celeba`` (target Smiling, bias Male): "a headshot of {Female|Male} celebrity
  {Smiling | with serious face | with straight face}", by the ``celeba`` reader's order
  (0 = not, 1 = the attribute).
* ``spuco_animals``: "a photo of {breed} in {location}" with the paper's breed lists
  (``animal_breeds.txt``, from Sun et al. 2023) and location lists, keyed by name
  (landbird, waterbird, small dog, big dog; land, water, indoors, outdoors).

``grayscale_filter`` removes images the official code's ``is_grayscale`` calls gray:
``|mean_c S_c - S_R| < threshold`` with ``S_c`` a channel's pixel sum; the official
thresholds (1.5e6 for faces, 2e5 for animals, on 512x512 Stable Diffusion images) are
expressed per pixel here (``grayscale_threshold`` 5.72 and 0.76) so they hold at any
size. The face presets switch it on.

**Training settings** (:mod:`unspur.methods.ffr_presets`). Every stage of every
method here (FFR stage 1 and 2, USB, ASB, and ``ffr_none``: FFR's "None" rows, the
training method on real data only) trains with Adam (default betas), no scheduler and no
augmentation (``ffr.md`` section 4). ``preset`` (``celeba_hq``, ``utkface``,
``spuco_animals``) adds the dataset's Appendix A weight decay (1e-5, 1e-5, 1e-3), the
Table 2 learning rate of (mode, training method, stage, bias level) and the official
scripts' batch 128 / 50 epochs (our choice: the paper gives neither); the level is
``level`` or ``data.bias_ratio`` (0.95, 0.97, 0.99, 0.999; anything else is refused).
``lr_search: true`` runs the paper's protocol instead: each stage is trained once per
learning rate of ``lr_grid`` (``"paper"``: Table 2's powers of ten, 1e-2 ... 1e-7) and
keeps the best validation worst-group accuracy; FFR searches stage 1, then stage 2 from
the chosen stage-1 model. Table 2's rates were chosen for a ResNet-50 from ImageNet; on
another model, search: ``bench/results/ffr_utkface/`` (small CNN from scratch) measures
FFR at a fixed 1e-3 24-31 worst-group points below FFR with the search, where validation
picks stage-2 rates of 1e-6 / 1e-7. ``pretrain`` / ``finetune`` (FFR) and ``train`` (USB, ASB,
``ffr_none``) override single settings last. The values used, their sources and every
search trial are recorded in ``<run>/<name>/budget.json`` (``training.json`` for
``ffr_none``) and in the returned history.

**Stage 1** (FFR): synthetic images only; model selection by worst-group accuracy on the
*real* validation set (the official ``evaluate`` on the real val split). **Stage 2**: the
training method from the stage-1 weights; ``freeze_bn`` keeps every batch-norm layer in
eval mode while fine-tuning (running statistics of stage 1 used and kept; affine
parameters still train), as the official ``--freeze_bn`` which calls ``model.eval()``
during training.

**Groups for USB/ASB** (``source_groups``, default true, as the official
``train_{resample,groupdro}_{usb,asb}.py``): group-aware training methods see the groups
``(y, a, source)``: the training table's attribute becomes ``a * 2 + synthetic`` (names
"water", "water (synthetic)"; the real attribute stays in ``true_a``). ERM and DFR are
unaffected (DFR fits on the real validation set). Groups with no image (real majority
groups get no USB images) are simply empty: resampling ignores them and GroupDRO's
weight of an empty group only decays.

**The (B, G) diagnostic** (``probe``, default on; :mod:`unspur.train.probe`): a linear
probe on the final model's features telling real from synthetic images within each
group, on the real training images plus the method's synthetic images, written to
``<run>/<name>/probe.json``.

**Supervision ✓✓**: all three read the *training* group labels: the budget needs the
training group counts (``max_g n_g - n_g``), generation is per group, and USB/ASB train
with the group structure. Validation group labels select the stage-1 and stage-2
models (and train DFR's last layer with ``train_method: dfr_val``).

Deviations: the official code draws seeds and words from Python's global ``random``
and keeps the first images in ``os.listdir`` order (arbitrary); here both are
deterministic per image. Group inference (``method.group_inference``) is refused: the
prompts need the true bias attribute.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image, ImageStat
from torch import nn

from unspur.config import TrainConfig, train_config_with
from unspur.data.dataset import GroupDataset
from unspur.data.store import free_prefix
from unspur.data.table import GroupTable
from unspur.data.transforms import train_transform_for
from unspur.errors import ConfigError, DataError
from unspur.generate.budget import SyntheticBudget, synthetic_budget
from unspur.generate.store import image_seed
from unspur.io import atomic_write_json
from unspur.methods import ffr_presets as presets
from unspur.methods.base import Method, RunContext, Supervision, get_method, register_method
from unspur.shared_cache import StageSharing
from unspur.train.loop import FitResult

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "A photo of {bias} {class}"
#: The official ``is_grayscale`` thresholds (pixel-sum differences on 512x512 images),
#: per pixel: faces (UTKFace, CelebA) and SpuCo Animals.
GRAYSCALE_FACES = 1_500_000 / (512 * 512)
GRAYSCALE_ANIMALS = 200_000 / (512 * 512)
#: FFR's DFR grid (``training_code/train_dfr_*.py``), wider than DFR's own.
FFR_DFR_C_OPTIONS = [3.0, 1.0, 0.3, 0.1, 0.03, 0.01, 0.003]
PAPER_TRAIN_METHODS = ("erm", "resample_group", "groupdro", "dfr_val")
SYNTHETIC_METHODS = ("ffr", "usb", "asb")
#: Options read only after the synthetic pool is generated (how the classifier is
#: trained, the probe): runs that differ in nothing else share their pool through
#: ``shared_cache``.
AFTER_GENERATION = (
    "train_method", "train_options", "train", "pretrain", "finetune", "freeze_bn",
    "source_groups", "preset", "level", "lr_search", "lr_grid", "probe", "shared_cache",
)  # fmt: skip
POOL_STAGE = "synthetic-pool"

_BIG_DOGS = (
    "Rhodesian Ridgeback, Afghan Hound, Basset Hound, Beagle, Bloodhound, Bluetick Coonhound, "
    "Black and Tan Coonhound, Treeing Walker Coonhound, English foxhound, Redbone Coonhound, "
    "borzoi, Irish Wolfhound, Otterhound, Saluki, Scottish Deerhound, Weimaraner, "
    "Staffordshire BullTerrier, American Staffordshire Terrier, Bedlington Terrier, "
    "Border Terrier, Kerry Blue Terrier, Irish Terrier, Flat-Coated Retriever, "
    "Curly-coated Retriever, Golden Retriever, Labrador Retriever, Chesapeake Bay Retriever, "
    "German Shorthaired Pointer, Vizsla, English Setter, Irish Setter, GordonSetter, "
    "Brittany dog, Clumber Spaniel, English Springer Spaniel, WelshSpringer Spaniel, "
    "Cocker Spaniel, Sussex Spaniel, Irish Water Spaniel, Kuvasz, Schipperke, "
    "Groenendael dog, Malinois, Briard, Komondor, OldEnglish Sheepdog, collie, "
    "Border Collie, Bouvier des Flandres dog, Rottweiler, German Shepherd Dog, Dobermann, "
    "Greater Swiss Mountain Dog, Bernese Mountain Dog, Appenzeller Sennenhund, "
    "Entlebucher Sennenhund, Boxer, Bullmastiff, Tibetan Mastiff, French Bulldog, "
    "Great Dane, St. Bernard, Alaskan Malamute, Siberian Husky, Leonberger, "
    "Newfoundland dog, GreatPyrenees dog, Samoyed, Chow Chow, Keeshond, Dalmatian, "
    "Affenpinscher, Basenji, pug"
)
_SMALL_DOGS = (
    "Chihuahua, Japanese Chin, Maltese, Pekingese, Shih Tzu, King Charles Spaniel, Papillon, "
    "toy terrier, Italian Greyhound, Whippet, Ibizan Hound, Norwegian Elkhound, "
    "Yorkshire Terrier, Norfolk Terrier, Norwich Terrier, Wire Fox Terrier, "
    "Lakeland Terrier, Sealyham Terrier, Cairn Terrier, Australian Terrier, "
    "Dandie Dinmont Terrier, Boston Terrier, Miniature Schnauzer, Scottish Terrier, "
    "Tibetan Terrier, Australian SilkyTerrier, West Highland White Terrier, Lhasa Apso, "
    "Soft-coated WheatenTerrier, Australian Kelpie, Shetland Sheepdog, "
    "Pembroke Welsh Corgi, Cardigan Welsh Corgi, Toy Poodle, Miniature Poodle, "
    "Mexican hairless dog"
)
_LANDBIRDS = (
    "rooster, hen, ostrich, brambling, goldfinch, house finch, junco, indigo bunting, "
    "American robin, bulbul, jay, magpie, chickadee, American dipper, kite (bird of prey), "
    "bald eagle, vulture, great grey owl, black grouse, ptarmigan, ruffed grouse, "
    "prairie grouse, peafowl, quail, partridge, african grey parrot, macaw, "
    "sulphur-crested cockatoo, lorikeet, coucal, bee eater, hornbill, hummingbird, "
    "jacamar, toucan"
)
_WATERBIRDS = (
    "duck, red-breasted merganser, goose, black swan, white stork, black stork, spoonbill, "
    "flamingo, little blue heron, great egret, bitternbird, crane bird, limpkin, "
    "common gallinule, American coot, bustard, ruddyturnstone, dunlin, common redshank, "
    "dowitcher, oystercatcher, pelican, kingpenguin, albatross"
)


def _words(text: str) -> list[str]:
    return [w.strip() for w in text.split(",") if w.strip()]


_INDOORS = ["indoors", "in the living room", "in the bedroom", "in the kitchen", "in the attic",
            "on the table", "under the table", "on the chair", "under the chair",
            "on the kitchen top", "in the sink"]  # fmt: skip
_OUTDOORS = ["outdoors", "in the garden", "in the park", "in the forest", "in the field",
             "in the backyard", "in the front yard", "in the driveway", "on the street",
             "on the sidewalk"]  # fmt: skip
_LAND = ["dirt", "grass", "rock", "sand", "soil", "mud", "gravel", "asphalt", "concrete",
         "pavement", "brick", "wood", "leaves", "snow", "ice", "clay", "dust", "cement",
         "metal", "tile"]  # fmt: skip
_WATER = ["water", "lake", "river", "pond", "sea", "ocean", "pool", "fountain", "stream",
          "waterfall"]  # fmt: skip

#: The paper's prompt templates and word lists (official ``generation_code``).
PROMPT_PRESETS: dict[str, dict[str, Any]] = {
    "utkface": {
        "prompt_template": "a headshot of a human {class} {bias}",
        "class_words": {0: ["Male"], 1: ["Female"]},
        "bias_words": {
            0: ["baby", "aged three years old", "aged four years old", "aged five years old"],
            1: ["in their twenties", "in their thirties", "in their forties", "in their fifties"],
        },
        "grayscale_filter": True,
        "grayscale_threshold": GRAYSCALE_FACES,
    },
    "celeba": {
        "prompt_template": "a headshot of {bias} celebrity {class}",
        "class_words": {0: ["with serious face", "with straight face"], 1: ["Smiling"]},
        "bias_words": {0: ["Female"], 1: ["Male"]},
        "grayscale_filter": True,
        "grayscale_threshold": GRAYSCALE_FACES,
    },
    "spuco_animals": {
        "prompt_template": "a photo of {class} in {bias}",
        "class_words": {
            "landbird": _words(_LANDBIRDS),
            "waterbird": _words(_WATERBIRDS),
            "small dog": _words(_SMALL_DOGS),
            "big dog": _words(_BIG_DOGS),
        },
        "bias_words": {
            "land": _LAND,
            "water": _WATER,
            "indoors": _INDOORS,
            "indoor": _INDOORS,
            "outdoors": _OUTDOORS,
            "outdoor": _OUTDOORS,
        },
        "grayscale_filter": True,
        "grayscale_threshold": GRAYSCALE_ANIMALS,
    },
}


#: Human-readable words for the paper's template "A photo of {bias} {class}" (ffr.md
#: section 4), per dataset, keyed by the readers' class / attribute names (the part
#: before a parenthesis is enough: "child" for "child (age<=10)"). The words are our
#: choice (the paper gives only the template); they exist so that a reader's internal
#: names ("not Male", "child (age<=10)") never reach a prompt.
PROMPT_WORDS: dict[str, dict[str, dict[str, str]]] = {
    "utkface": {
        "class_words": {"male": "who is male", "female": "who is female"},
        "bias_words": {"child": "a child", "adult": "an adult"},
    },
    "celeba_hq": {
        "class_words": {
            "Smiling": "smiling",
            "not Smiling": "with a serious face",
            "Blond_Hair": "with blond hair",
            "not Blond_Hair": "with non-blond hair",
        },
        "bias_words": {"Male": "a man", "not Male": "a woman"},
    },
    "spuco_animals": {
        "class_words": {
            "landbird": "landbird",
            "waterbird": "waterbird",
            "small dog": "small dog",
            "big dog": "big dog",
        },
        "bias_words": {
            "land": "a land-background",
            "water": "a water-background",
            "indoors": "an indoor",
            "indoor": "an indoor",
            "outdoors": "an outdoor",
            "outdoor": "an outdoor",
        },
    },  # fmt: skip
}
PROMPT_WORDS["celeba"] = PROMPT_WORDS["celeba_hq"]
PROMPT_WORDS["waterbirds"] = PROMPT_WORDS["spuco_animals"]


def readable(name: str) -> bool:
    """Whether a class / attribute name can go into a prompt as it is: not a reader's
    internal name such as "not Male" or "child (age<=10)"."""
    text = str(name).strip()
    return bool(text) and not (text.lower().startswith("not ") or any(ch in text for ch in "()<>="))


def prompt_words(choice: Any, dataset: str) -> dict[str, Any]:
    """The :data:`PROMPT_WORDS` entry of ``choice`` (``"auto"``: the dataset's, if any)."""
    if choice is None:
        return {}
    if choice == "auto":
        return PROMPT_WORDS.get(dataset, {})
    if choice not in PROMPT_WORDS:
        raise ConfigError(
            f"prompt_words {choice!r} is not one of auto, {', '.join(sorted(PROMPT_WORDS))} or null"
        )
    return PROMPT_WORDS[choice]


# ------------------------------------------------------------------------ filters
def grayscale_score(image: Image.Image) -> float:
    """The official ``is_grayscale`` statistic per pixel: ``|mean_c S_c - S_R| / (H W)``."""
    stat = ImageStat.Stat(image.convert("RGB"))
    width, height = image.size
    return abs(sum(stat.sum) / 3 - stat.sum[0]) / max(1, width * height)


def grayscale_filter(threshold: float = GRAYSCALE_FACES):
    """A store filter dropping images whose :func:`grayscale_score` is below ``threshold``."""
    from unspur.generate.store import FilterResult

    def check(requests, images):
        results = []
        for image in images:
            score = grayscale_score(image)
            keep = score >= threshold
            results.append(
                FilterResult("grayscale", score, keep, "" if keep else "grayscale image")
            )
        return results

    check.__name__ = "grayscale_filter"
    return check


# ------------------------------------------------------------------------ prompts
def _norm(name: Any) -> str:
    return " ".join(str(name).replace("_", " ").lower().split())


def _word_lists(spec: Any, names: list[str], what: str) -> list[list[str] | None]:
    """Per-index word lists from a mapping (name or index -> words) or a list by index."""
    if spec is None:
        return [None] * len(names)
    if isinstance(spec, list | tuple):
        spec = dict(enumerate(spec))
    if not isinstance(spec, dict):
        raise ConfigError(f"{what} must map names (or indexes) to lists of words, got {spec!r}")
    by_name = {_norm(k): v for k, v in spec.items() if not isinstance(k, int)}
    lists: list[list[str] | None] = []
    for index, name in enumerate(names):
        words = spec.get(index, by_name.get(_norm(name), by_name.get(_norm(name).split(" (")[0])))
        if words is None:
            lists.append(None)
            continue
        if isinstance(words, str):
            words = [words]
        if not words or not all(isinstance(w, str) and w.strip() for w in words):
            raise ConfigError(f"{what} of {name!r} must be a non-empty list of words")
        lists.append(list(words))
    return lists


class Prompter:
    """The prompt of image ``i`` of group ``g``: a template filled with the group's names
    (or with words drawn per image from ``(seed, g, i)``), or a domain model's caption."""

    def __init__(
        self,
        class_names: list[str],
        attr_names: list[str],
        template: str | None,
        class_words: Any = None,
        bias_words: Any = None,
        captions: Any = None,
    ) -> None:
        if template is None and captions is None:
            raise ConfigError("a prompt needs a template or a domain model's captions")
        if template is not None:
            for placeholder in ("{class}", "{bias}"):
                if placeholder not in template:
                    raise ConfigError(
                        f"prompt_template {template!r} must contain {{class}} and {{bias}}"
                    )
        self.class_names, self.attr_names = class_names, attr_names
        self.template = template
        self.captions = captions
        self.class_words = _word_lists(class_words, class_names, "class_words")
        self.bias_words = _word_lists(bias_words, attr_names, "bias_words")
        if template is not None:
            for what, names, lists in (
                ("class_words", class_names, self.class_words),
                ("bias_words", attr_names, self.bias_words),
            ):
                raw = [n for n, w in zip(names, lists) if w is None and not readable(n)]
                if raw:
                    raise ConfigError(
                        f"prompt: {raw} are internal names, not words for a prompt; give "
                        f"method.options.{what} (a word list per name) or prompt_words"
                    )

    @property
    def random(self) -> bool:
        lists = [w for w in self.class_words + self.bias_words if w is not None]
        return self.template is not None and any(len(w) > 1 for w in lists)

    def __call__(self, y: int, a: int, seed: int, g: int, i: int) -> str:
        if self.template is None:
            return self.captions.caption(y, a)
        rng = np.random.default_rng([seed, g, i, 1])
        cls = self.class_words[y]
        bias = self.bias_words[a]
        class_text = cls[int(rng.integers(len(cls)))] if cls else self.class_names[y]
        bias_text = bias[int(rng.integers(len(bias)))] if bias else self.attr_names[a]
        text = self.template.replace("{class}", " ".join(str(class_text).replace("_", " ").split()))
        text = text.replace("{bias}", " ".join(str(bias_text).replace("_", " ").split()))
        return " ".join(text.split())


def image_key(g: int, i: int) -> str:
    return f"g{g}/{i:06d}"


# ---------------------------------------------------------------------- the pool
def fill_pool(
    store,
    targets: np.ndarray,
    table: GroupTable,
    prompter: Prompter,
    generate_fn,
    *,
    seed: int,
    generator_name: str,
    weights_id: str,
    batch_size: int,
    filters=(),
    max_tries: float = 3.0,
) -> dict[int, list[str]]:
    """Generate until every group ``g`` has ``targets[g]`` kept images in ``store``.

    Requests are ``g{g}/{i:06d}`` for ``i = 0, 1, ...``; a round asks for as many new
    indices as the group still lacks (at most ``ceil(max_tries * target)`` in all).
    Returns the keys of the first ``targets[g]`` kept images of every group (fewer when
    the tries ran out).
    """
    from unspur.generate.store import GenerationRequest, generate_into_store

    n_attrs = table.n_attrs
    asked = {g: int(t) for g, t in enumerate(targets) if t > 0}
    caps = {g: max(int(math.ceil(max_tries * t)), int(t)) for g, t in asked.items()}

    def request(g: int, i: int) -> GenerationRequest:
        y, a = divmod(g, n_attrs)
        return GenerationRequest(
            key=image_key(g, i),
            prompt=prompter(y, a, seed, g, i),
            seed=image_seed(seed, g, i),
            y=y,
            a=a,
            extra={"group": g, "i": i},
        )

    while True:
        requests = [request(g, i) for g, n in asked.items() for i in range(n)]
        if requests:
            generate_into_store(
                store,
                requests,
                generate_fn,
                generator_name=generator_name,
                weights_id=weights_id,
                batch_size=batch_size,
                filters=filters,
                process_index=0,
                num_processes=1,
            )
        rows = store.rows()
        grew = False
        for g, n in asked.items():
            kept = sum(bool(rows[image_key(g, i)].get("kept")) for i in range(n))
            missing = int(targets[g]) - kept
            if missing > 0 and n < caps[g]:
                asked[g] = min(n + missing, caps[g])
                grew = True
        if not grew:
            break
    chosen: dict[int, list[str]] = {}
    for g, n in asked.items():
        keys = [image_key(g, i) for i in range(n) if rows[image_key(g, i)].get("kept")]
        chosen[g] = keys[: int(targets[g])]
    return chosen


# ------------------------------------------------------------------ data helpers
def with_source_groups(table: GroupTable) -> GroupTable:
    """The table with attribute ``a * 2 + synthetic``: groups ``(y, a, source)``."""
    from unspur.train.probe import is_synthetic

    frame = table.frame.copy()
    synthetic = is_synthetic(table)
    frame["true_a"] = frame["a"]
    frame["a"] = frame["a"].to_numpy() * 2 + synthetic.astype(np.int64)
    names = [name for attr in table.attr_names for name in (attr, f"{attr} (synthetic)")]
    return replace(table, frame=frame, attr_names=names, info=dict(table.info))


def freeze_batchnorm(model: nn.Module) -> int:
    """Keep every batch-norm layer of ``model`` in eval mode from now on (running
    statistics used, not updated; affine parameters still train). Returns the count."""

    def eval_mode(module, _inputs):
        module.training = False

    count = 0
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.register_forward_pre_hook(eval_mode)
            module.training = False
            count += 1
    return count


def _sub_context(context: RunContext, **changes) -> RunContext:
    if any(f.name == "stages" for f in fields(context)):
        changes["stages"] = []
    return replace(context, **changes)


# ------------------------------------------------------------ training settings
def check_training_options(name: str, options: dict[str, Any]) -> None:
    """Validate ``preset``, ``level``, ``lr_search`` and ``lr_grid``."""
    preset = options["preset"]
    if preset is not None and preset not in presets.DATASETS:
        raise ConfigError(
            f"{name}: preset {preset!r} is not one of {', '.join(presets.DATASETS)} "
            "(FFR Table 2's datasets) or null"
        )
    if not isinstance(options["lr_search"], bool):
        raise ConfigError(f"{name}: lr_search must be true or false")
    presets.search_grid(options["lr_grid"])


def stage_config(
    context: RunContext,
    options: dict[str, Any],
    mode: str,
    method: str,
    overrides: dict[str, Any] | None,
    what: str,
) -> tuple[TrainConfig, dict[str, Any]]:
    """One stage's train config and where its values come from.

    Layers, later wins: the run's ``train`` section; the paper's optimiser for every
    FFR / USB / ASB / None stage (Adam with default betas, no scheduler, no augmentation:
    ``ffr.md`` section 4); with ``preset`` the dataset's Appendix A weight decay, Table 2
    learning rate of ``mode`` x ``method`` at the bias level (``level``, default
    ``data.bias_ratio``) and the official batch size / epochs; the stage's own option
    (``pretrain``, ``finetune``, ``train``).
    """
    values: dict[str, Any] = dict(presets.PAPER_OPTIMIZER)
    record: dict[str, Any] = {"optimizer": "ffr.md section 4"}
    preset = options["preset"]
    if preset is not None:
        level = options["level"]
        level = presets.level_of(context.config.data.bias_ratio if level is None else level)
        values.update(presets.stage_train(preset, mode, method, level))
        record = {"preset": preset, "level": level, **presets.sources(preset, mode, method, level)}
    explicit = dict(overrides or {})
    values.update(explicit)
    for key in explicit:
        record[key] = f"method.options.{what}"
    return train_config_with(context.config.train, values, what), record


def search_learning_rate(
    grid: list[float],
    base: TrainConfig,
    train_one,
    what: str,
) -> tuple[nn.Module, FitResult, dict[str, Any]]:
    """The paper's protocol (``ffr.md`` section 4, Appendix A): train once per learning
    rate of ``grid`` (``train_one(config, tag)`` -> ``(model, result)``) and keep the one
    with the best validation worst-group accuracy (ties: balanced accuracy, our choice).
    Returns the chosen model, its result and the record of every trial."""
    best = None
    trials = []
    for lr in grid:
        model, result = train_one(replace(base, lr=lr), f"lr_{lr:g}")
        val = result.best_val
        if not val or "worst_group_accuracy" not in val:
            raise ConfigError(
                f"lr_search ({what}) selects on validation worst-group accuracy: the run "
                "needs a validation split with group labels"
            )
        score = (float(val["worst_group_accuracy"]), float(val.get("balanced_accuracy", 0.0)))
        trials.append(
            {"lr": lr, "val_worst_group_accuracy": score[0], "val_balanced_accuracy": score[1]}
        )
        if best is None or score > best[0]:
            best = (score, lr, model, result)
        else:
            del model
    assert best is not None
    record = {
        "stage": what,
        "grid": list(grid),
        "rule": "validation worst-group accuracy (ties: balanced accuracy)",
        "trials": trials,
        "chosen_lr": best[1],
    }
    return best[2], best[3], record


# ------------------------------------------------------------------------ methods
class _SyntheticMethod(Method):
    """Shared implementation of ``ffr``, ``usb`` and ``asb`` (module docstring)."""

    mode: ClassVar[str]
    supervision = Supervision(train_group_labels=True, val_group_labels=True)
    uses_reference = False
    defaults: ClassVar[dict[str, Any]] = {
        "train_method": "erm",
        "train_options": {},
        "generator": "domain",
        "domain": {},
        "prompt_template": "auto",
        "prompt_preset": None,
        "prompt_words": "auto",
        "class_words": None,
        "bias_words": None,
        "steps": 25,
        "guidance_scale": None,
        "scheduler": "default",
        "batch_size": 16,
        "grayscale_filter": False,
        "grayscale_threshold": GRAYSCALE_FACES,
        "max_tries": 3.0,
        "budget": "usb",
        "generation_seed": None,
        "store": None,
        "shared_cache": None,  # our option: a speed-up that changes no image (docstring)
        "probe": True,
        "preset": None,
        "level": None,
        "lr_search": False,
        "lr_grid": "paper",
    }
    debug_options: ClassVar[dict[str, Any]] = {
        "domain": {
            "sizes": "tiny",
            "image_size": 16,
            "vae_steps": 2,
            "unet_steps": 2,
            "inpaint_steps": 1,
            "batch_size": 4,
        },
        "steps": 2,
        "batch_size": 64,
        "probe": False,
    }

    # -- options
    def _options(self, context: RunContext) -> dict[str, Any]:
        options = dict(context.options)
        preset = options["prompt_preset"]
        if preset is not None:
            if preset not in PROMPT_PRESETS:
                raise ConfigError(
                    f"{self.name}: prompt_preset {preset!r} is not one of "
                    f"{', '.join(sorted(PROMPT_PRESETS))} (or null)"
                )
            for key, value in PROMPT_PRESETS[preset].items():
                if options[key] == self.defaults[key]:  # explicit options win
                    options[key] = value
        method = options["train_method"]
        if method in SYNTHETIC_METHODS:
            raise ConfigError(f"{self.name}: train_method cannot be {method!r}")
        target = get_method(method)
        train_options = options["train_options"] or {}
        if not isinstance(train_options, dict):
            raise ConfigError(f"{self.name}: train_options must be a mapping")
        if method == "dfr_val" and "c_options" not in train_options:
            train_options = {**train_options, "c_options": FFR_DFR_C_OPTIONS}
        options["train_options"] = target.resolve_options(train_options)
        for key in ("steps", "batch_size"):
            if (
                isinstance(options[key], bool)
                or not isinstance(options[key], int)
                or options[key] < 1
            ):
                raise ConfigError(f"{self.name}: {key} must be a positive integer")
        if not isinstance(options["max_tries"], int | float) or options["max_tries"] < 1:
            raise ConfigError(f"{self.name}: max_tries must be a number >= 1")
        budget = options["budget"]
        if budget != "usb" and (
            isinstance(budget, bool) or not isinstance(budget, int) or budget < 1
        ):
            raise ConfigError(f"{self.name}: budget must be 'usb' or a positive integer total")
        check_training_options(self.name, options)
        return options

    # -- data
    def _budget(self, context: RunContext, options: dict[str, Any]) -> SyntheticBudget:
        counts = np.asarray(context.train.group_counts())
        total = None if options["budget"] == "usb" else int(options["budget"])
        budget = synthetic_budget(self.mode, counts, total)
        if budget.total == 0:
            raise ConfigError(
                f"{self.name}: the synthetic budget is 0 images (training group counts "
                f"{counts.tolist()} are already balanced, or budget < number of groups); "
                "set method.options.budget to a total"
            )
        return budget

    def _generate(
        self, context: RunContext, options: dict[str, Any], budget: SyntheticBudget, directory: Path
    ) -> tuple[GroupTable, dict[str, Any]]:
        """The training table plus the budget's synthetic rows, and a generation record."""
        from unspur.generate.domain import load_domain_model
        from unspur.generate.engine import generator_for
        from unspur.generate.pipelines import GenerationSettings
        from unspur.generate.store import SyntheticStore

        real = context.train.table
        spec = str(options["generator"])
        generator = generator_for(
            spec, "text2image", table=real, run_dir=context.out_dir, domain=options["domain"]
        )
        from unspur.generate.engine import domain_model_dir

        domain_dir = domain_model_dir(spec, context.out_dir)
        domain = load_domain_model(domain_dir) if domain_dir is not None else None
        if domain is not None and (
            domain.class_names != list(real.class_names)
            or domain.attr_names != list(real.attr_names)
        ):
            raise ConfigError(
                f"{self.name}: the domain model in {domain_dir} was trained on classes "
                f"{domain.class_names} / attributes {domain.attr_names}, not this dataset's "
                f"{real.class_names} / {real.attr_names}"
            )
        template = options["prompt_template"]
        if template == "auto":
            template = None if domain is not None else DEFAULT_TEMPLATE
        words = prompt_words(options["prompt_words"], real.name) if template else {}
        prompter = Prompter(
            list(real.class_names),
            list(real.attr_names),
            template,
            options["class_words"] or words.get("class_words"),
            options["bias_words"] or words.get("bias_words"),
            domain.captions if domain is not None else None,
        )
        guidance = options["guidance_scale"]
        if guidance is None:
            guidance = (domain.info.get("sampling", {}).get("guidance_scale", 4.0)
                        if domain is not None else 7.5)  # fmt: skip
        settings = GenerationSettings(
            steps=int(options["steps"]),
            guidance_scale=float(guidance),
            scheduler=options["scheduler"],
            batch_size=int(options["batch_size"]),
        )
        filters = []
        if options["grayscale_filter"]:
            filters.append(grayscale_filter(float(options["grayscale_threshold"])))
        seed = options["generation_seed"]
        seed = context.config.seed if seed is None else int(seed)
        root = Path(options["store"]) if options["store"] else directory / "synthetic"
        # Without a user's pool, variants that differ only in training share the pool
        # through shared_cache (a copy per run; keyed by everything generation reads).
        shared = StageSharing(None if options["store"] else options["shared_cache"], directory)
        inputs = pool_inputs(context, options, budget, generator.weights_id)
        shared.restore(POOL_STAGE, inputs, root.name)
        store = SyntheticStore(root)

        def generate(batch):
            return generator.text_to_image(
                [r.prompt for r in batch], [r.seed for r in batch], settings
            )

        chosen = fill_pool(
            store,
            np.asarray(budget.synthetic),
            real,
            prompter,
            generate,
            seed=seed,
            generator_name=f"text2image:{spec}",
            weights_id=generator.weights_id,
            batch_size=int(options["batch_size"]),
            filters=filters,
            max_tries=float(options["max_tries"]),
        )
        shared.publish(POOL_STAGE, inputs, root.name)
        keys = [k for g in sorted(chosen) for k in chosen[g]]
        merged = store.to_table(real, split="train", prefix=free_prefix(real.frame["filename"]))
        frame = merged.frame
        keep = (frame["source"].astype(str) == "real").to_numpy() | frame["key"].isin(
            keys
        ).to_numpy()
        merged = merged.subset(keep)
        got = [len(chosen.get(g, [])) for g in range(budget.n_groups)]
        short = {
            real.group_name(g): budget.synthetic[g] - got[g]
            for g in range(budget.n_groups)
            if got[g] < budget.synthetic[g]
        }
        if short:
            logger.warning("%s: fewer synthetic images than budgeted: %s", self.name, short)
        summary = store.summary()
        record = {
            "generator": spec,
            "weights": generator.weights_id,
            "provenance": generator.provenance(settings),
            "prompt_template": template if template is not None else "domain model captions",
            "example_prompts": {
                real.group_name(g): prompter(*divmod(g, real.n_attrs), seed, g, 0)
                for g in range(budget.n_groups)
            },
            "generation_seed": seed,
            "store": str(root),
            "restored_from_shared_cache": shared.restored([root.name]),
            "filters": [f.__name__ for f in filters],
            "grayscale_threshold": options["grayscale_threshold"] if filters else None,
            "used_per_group": got,
            "shortfall": short,
            "store_summary": summary,
        }
        return merged, record

    # -- the run
    def run(self, context: RunContext) -> tuple[nn.Module, FitResult]:
        if context.config.method.group_inference is not None:
            raise ConfigError(
                f"{self.name} generates images of the true (class, bias) groups and cannot "
                "run on inferred groups; remove method.group_inference"
            )
        options = self._options(context)
        directory = context.out_dir / self.name
        directory.mkdir(parents=True, exist_ok=True)
        budget = self._budget(context, options)
        real = context.train.table
        names = [real.group_name(g) for g in range(real.n_groups)]
        merged, record = self._generate(context, options, budget, directory)
        synthetic = merged.subset((merged.frame["source"].astype(str) == "synthetic").to_numpy())
        info = {
            "method": self.name,
            "train_method": options["train_method"],
            "budget": budget.to_dict(names),
            "generation": record,
        }
        atomic_write_json(directory / "budget.json", info)
        model, result, extra = self._train(context, options, merged, synthetic, directory)
        info.update(extra)
        if options["probe"]:
            info["probe"] = self._probe(context, model, merged, directory)
        atomic_write_json(directory / "budget.json", info)
        history = [
            *result.history,
            {self.name: {k: v for k, v in info.items() if k != "generation"}},
        ]
        return model, replace(result, history=history)

    def _train(self, context, options, merged, synthetic, directory):
        raise NotImplementedError

    def _run_train_method(
        self,
        context: RunContext,
        options: dict[str, Any],
        stage: str,
        table: GroupTable,
        build_model,
        train_config: TrainConfig,
        model_spec: dict[str, Any],
        synthetic: GroupTable,
    ) -> tuple[nn.Module, FitResult]:
        """Run ``train_method``'s own code on ``table`` in ``<run>/<stage>``."""
        config = context.config
        fingerprint_data = replace(
            config.data,
            options={
                **config.data.options,
                "synthetic": {
                    "rows": len(synthetic.frame),
                    "keys": _digest(sorted(synthetic.frame["key"].astype(str))),
                    "prompts": _digest(list(synthetic.frame["prompt"].astype(str))),
                    "generator": str(synthetic.frame["weights_id"].iloc[0])
                    if len(synthetic.frame)
                    else None,
                },
            },
        )
        sub_config = replace(
            config,
            data=fingerprint_data,
            model=replace(config.model, **model_spec),
            train=train_config,
            method=replace(config.method, reference=None),
        )
        sub = _sub_context(
            context,
            config=sub_config,
            train=GroupDataset(table, train_transform_for(config.data, train_config)),
            out_dir=context.out_dir / stage,
            build_model=build_model,
            options={**options["train_options"]},
        )
        method = get_method(options["train_method"])()
        model, result = method.run(sub)
        if hasattr(context, "stages"):
            context.stages.extend(f"{stage}/{s}" for s in sub.stages)
        return model, result

    def _probe(self, context, model, merged, directory) -> dict[str, Any]:
        from unspur.train.probe import probe_model

        try:
            result = probe_model(
                model,
                merged,
                context.eval_transform,
                cache_dir=context.out_dir / "features",
                batch_size=context.config.train.eval_batch_size,
                seed=context.config.seed,
            )
        except DataError as err:
            return {"skipped": str(err)}
        record = result.to_dict()
        atomic_write_json(directory / "probe.json", record)
        return record


def pool_inputs(
    context: RunContext, options: dict[str, Any], budget: SyntheticBudget, weights_id: str
) -> dict[str, Any]:
    """Everything a synthetic pool depends on (the key of ``shared_cache``): the data
    section (class and attribute names), the generation seed, the per-group targets,
    the generation options (all but :data:`AFTER_GENERATION`) and the generator's
    weights. Not the method's name, model or train config, which generation never
    reads: ASB and FFR (the same budget) and, with a fixed ``generation_seed``, every
    run seed share one pool."""
    from unspur.stages import method_stage_inputs

    seed = options["generation_seed"]
    inputs = method_stage_inputs(context.config, options, AFTER_GENERATION)["run"]
    return {
        "stage": POOL_STAGE,
        "data": inputs["data"],
        "seed": context.config.seed if seed is None else int(seed),
        "targets": [int(n) for n in budget.synthetic],
        "options": inputs["method"]["options"],
        "generator": weights_id,
    }


def _digest(values: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(values).encode()).hexdigest()[:16]


class _Augment(_SyntheticMethod):
    """USB / ASB: train ``train_method`` from scratch on real + synthetic images."""

    defaults = {**_SyntheticMethod.defaults, "source_groups": True, "train": {}}

    def _train(self, context, options, merged, synthetic, directory):
        table = with_source_groups(merged) if options["source_groups"] else merged
        config, sources = stage_config(
            context, options, self.mode, options["train_method"], options["train"], "train"
        )
        stage = f"{self.name}/train"

        def train_one(train_config: TrainConfig, tag: str | None = None):
            return self._run_train_method(
                context,
                options,
                f"{stage}/{tag}" if tag else stage,
                table,
                context.build_model,
                train_config,
                {},
                synthetic,
            )

        extra: dict[str, Any] = {"source_groups": bool(options["source_groups"])}
        model, result, record = train_at_chosen_lr(options, config, train_one, stage, sources)
        extra.update(record)
        return model, result, extra


@register_method
class USB(_Augment):
    """USB (upsample to balance): every group topped up with synthetic images to the size
    of the largest group, then ``train_method`` on real + synthetic (see the module)."""

    name = "usb"
    mode = "usb"
    summary = "real data topped up to balanced groups with generated images (FFR's USB)"


@register_method
class ASB(_Augment):
    """ASB (add a synthetic balanced set): USB's synthetic budget split equally over the
    groups and added to the real data, then ``train_method`` (see the module)."""

    name = "asb"
    mode = "asb"
    summary = "real data plus a group-balanced generated set of USB's size (FFR's ASB)"


@register_method
class FFR(_SyntheticMethod):
    """FFR (From Fake to Real): pretrain on a balanced synthetic set (stage 1, model
    selection on real validation data), fine-tune on real data with ``train_method``
    (stage 2). See the module docstring for every option, default and source."""

    name = "ffr"
    mode = "ffr"
    summary = "pretrain on balanced generated images, fine-tune on real data (FFR)"
    defaults = {
        **_SyntheticMethod.defaults,
        "pretrain": {},
        "finetune": {},
        "freeze_bn": False,
    }

    def _train(self, context, options, merged, synthetic, directory):
        from unspur.methods.mac import model_hash

        config = context.config
        pretrain, pretrain_sources = stage_config(
            context, options, "ffr", "pretrain", options["pretrain"], "pretrain"
        )
        finetune, finetune_sources = stage_config(
            context, options, "ffr", options["train_method"], options["finetune"], "finetune"
        )
        if not isinstance(options["freeze_bn"], bool):
            raise ConfigError("ffr: freeze_bn must be true or false")
        grid = presets.search_grid(options["lr_grid"]) if options["lr_search"] else None
        searches = []

        # Stage 1: synthetic images only, selected on the real validation set.
        def pretrain_one(train_config: TrainConfig, tag: str | None = None):
            model = context.build_model()
            result = context.fit(
                model,
                f"{self.name}/pretrain" + (f"/{tag}" if tag else ""),
                train=GroupDataset(synthetic, train_transform_for(config.data, train_config)),
                train_config=train_config,
            )
            return model, result

        if grid is not None:
            model, stage1, record = search_learning_rate(
                grid, pretrain, pretrain_one, f"{self.name}/pretrain"
            )
            pretrain = replace(pretrain, lr=record["chosen_lr"])
            pretrain_sources["lr"] = "lr_search"
            searches.append(record)
        else:
            model, stage1 = pretrain_one(pretrain)
        state = copy.deepcopy(model.state_dict())
        weights = model_hash(model)
        freeze = options["freeze_bn"]

        def from_stage1() -> nn.Module:
            fresh = context.build_model()
            fresh.load_state_dict(state, strict=True)
            if freeze:
                freeze_batchnorm(fresh)
            return fresh

        # Stage 2: the training method's own code, starting from the stage-1 weights.
        pretrained = f"{context.out_dir / self.name / 'pretrain' / 'best'} (sha256 {weights[:16]})"
        stage = f"{self.name}/finetune"

        def finetune_one(train_config: TrainConfig, tag: str | None = None):
            return self._run_train_method(
                context,
                options,
                f"{stage}/{tag}" if tag else stage,
                context.train.table,
                from_stage1,
                train_config,
                {"pretrained": pretrained},
                synthetic,
            )

        if grid is not None:
            model, result, record = search_learning_rate(grid, finetune, finetune_one, stage)
            finetune = replace(finetune, lr=record["chosen_lr"])
            finetune_sources["lr"] = "lr_search"
            searches.append(record)
        else:
            model, result = finetune_one(finetune)
        extra: dict[str, Any] = {
            "stage1": {
                "best_epoch": stage1.best_epoch,
                "selection": stage1.selection,
                "val": stage1.best_val,
                "weights_sha256": weights,
                "train": {**_train_summary(pretrain), "sources": pretrain_sources},
            },
            "stage2": {
                "method": options["train_method"],
                "freeze_bn": freeze,
                "train": {**_train_summary(finetune), "sources": finetune_sources},
            },
        }
        if searches:
            extra["lr_search"] = searches
        return model, result, extra


@register_method
class FFRNone(Method):
    """FFR's "None" rows: ``train_method`` on the real data only (no synthetic image),
    trained the way FFR trains every stage: Adam, no scheduler, no augmentation (section
    4) and, with ``preset``, Table 2's None learning rate and Appendix A's weight decay;
    ``lr_search`` runs the paper's validation grid search instead. ``train`` overrides
    the stage's settings. Supervision is declared ✓✓ as for ``ffr``/``usb``/``asb`` (an
    upper bound: with ``erm`` or ``dfr_val`` the training group labels are not read)."""

    name = "ffr_none"
    supervision = Supervision(train_group_labels=True, val_group_labels=True)
    summary = "FFR's None baseline: train_method on real data with FFR's optimiser presets"
    defaults: ClassVar[dict[str, Any]] = {
        "train_method": "erm",
        "train_options": {},
        "train": {},
        "preset": None,
        "level": None,
        "lr_search": False,
        "lr_grid": "paper",
    }

    def run(self, context: RunContext) -> tuple[nn.Module, FitResult]:
        options = dict(context.options)
        method = options["train_method"]
        if method in (*SYNTHETIC_METHODS, self.name):
            raise ConfigError(f"{self.name}: train_method cannot be {method!r}")
        target = get_method(method)
        train_options = options["train_options"] or {}
        if not isinstance(train_options, dict):
            raise ConfigError(f"{self.name}: train_options must be a mapping")
        if method == "dfr_val" and "c_options" not in train_options:
            train_options = {**train_options, "c_options": FFR_DFR_C_OPTIONS}
        train_options = target.resolve_options(train_options)
        check_training_options(self.name, options)
        config, sources = stage_config(context, options, "none", method, options["train"], "train")
        stage = f"{self.name}/{method}"

        def train_one(train_config: TrainConfig, tag: str | None = None):
            sub = _sub_context(
                context,
                config=replace(context.config, train=train_config),
                train=GroupDataset(
                    context.train.table, train_transform_for(context.config.data, train_config)
                ),
                out_dir=context.out_dir / (f"{stage}/{tag}" if tag else stage),
                options=dict(train_options),
            )
            model, result = target().run(sub)
            if hasattr(context, "stages"):
                context.stages.extend(f"{sub.out_dir.relative_to(context.out_dir)}/{s}"
                                      for s in sub.stages)  # fmt: skip
            return model, result

        info: dict[str, Any] = {"method": self.name, "train_method": method}
        model, result, record = train_at_chosen_lr(options, config, train_one, stage, sources)
        info.update(record)
        directory = context.out_dir / self.name
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_json(directory / "training.json", info)
        return model, replace(result, history=[*result.history, {self.name: info}])


def train_at_chosen_lr(
    options: dict[str, Any],
    config: TrainConfig,
    train_one: Any,
    stage: str,
    sources: dict[str, str],
) -> tuple[Any, Any, dict[str, Any]]:
    """Train once at the configured learning rate, or, with ``lr_search``, at each rate of the
    grid keeping the best by validation worst-group accuracy (the paper's protocol, Sec. 4).
    Returns the model, its fit result and the record (``lr_search`` trials, ``train`` summary).
    """
    record: dict[str, Any] = {}
    if options["lr_search"]:
        grid = presets.search_grid(options["lr_grid"])
        model, result, record["lr_search"] = search_learning_rate(grid, config, train_one, stage)
        config = replace(config, lr=record["lr_search"]["chosen_lr"])
        sources["lr"] = "lr_search"
    else:
        model, result = train_one(config)
    record["train"] = {**_train_summary(config), "sources": sources}
    return model, result, record


def _train_summary(config: TrainConfig) -> dict[str, Any]:
    keys = ("optimizer", "lr", "weight_decay", "scheduler", "epochs", "batch_size", "augment")
    return {k: asdict(config)[k] for k in keys}
