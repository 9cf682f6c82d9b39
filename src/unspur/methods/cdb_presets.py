"""Clustered DreamBooth's paper values: classification, generation and per-dataset presets.

"Harnessing Diffusion-Generated Synthetic Images for Fair Image Classification" (Basu et
al.), ``clustered_dreambooth.md``. Every value names its section; where the paper is
silent the choice is ours and says why.

* :data:`CLASSIFIER` (A.2, A.8): both stages SGD, learning rate 1e-3, weight decay
  1e-3, batch 128, 20 epochs ("Hyperparameters are uniformly set across datasets").
* :data:`GENERATION` (A.2, A.8, 3.3): M = 5000 images per group, the top 75 % kept by
  the CLIP score with alpha 0.5, 50 sampling steps, guidance 7.5, SD v1.4; LoRA
  fine-tuning with r = alpha = 16, 200 steps, no scheduler.
* :data:`DATASET_PRESETS` (A.4, A.6, A.8): k_D, the prompts and negative prompts of
  every generation mode, and how bias-conflicting groups are generated at bias ratio
  0.999 (A.5, A.6), for Waterbirds, CelebA (Blond_Hair / Male) and UTKFace (gender / age).
"""

from __future__ import annotations

from typing import Any

#: A.2 / A.8: the classifier's optimiser in both stages. Momentum is not given ("SGD"):
#: the run's ``train.momentum`` applies (our choice). Scheduler and augmentation are not
#: mentioned: none (our choice, the plainest reading).
CLASSIFIER: dict[str, Any] = {
    "optimizer": "sgd",
    "lr": 1e-3,
    "weight_decay": 1e-3,
    "batch_size": 128,
    "epochs": 20,
    "scheduler": "none",
    "augment": False,
}
#: A.2 ("M = 5000 images per group", "the top 75% are selected", "SD v1.4"), 3.3 / Table 3
#: (alpha = 0.5), A.8 ("guidance-scale = 7.5 and the number of timesteps to be 50").
GENERATION: dict[str, Any] = {
    "n_per_group": 5000,
    "keep_fraction": 0.75,
    "alpha": 0.5,
    "steps": 50,
    "guidance_scale": 7.5,
    "generator": "CompVis/stable-diffusion-v1-4",
}
#: A.8: "For LoRA-finetuning, we use the r and alpha parameters of LoRA as 16, and use no
#: learning rate scheduler. The model is finetuned for 200 training steps." (DreamBooth
#: and Clustered DreamBooth: "the default set of hyperparameters", i.e. diffusers'
#: example, :mod:`unspur.generate.dreambooth`.)
LORA_FINETUNE: dict[str, Any] = {"rank": 16, "alpha": 16, "steps": 200, "warmup_steps": 0}
#: A.1: beta = 0.5 ("for all experiments"), tau = 1.
BETA = 0.5
TEMPERATURE = 1.0
#: A.4: k_D = min(M_gs / 20, 20), M_gs the smallest group of the dataset.
IMAGES_PER_CLUSTER = 20
MAX_CLUSTERS = 20
#: Our choice: the face datasets' grayscale negative prompt (A.8: "we include a negative
#: prompt that discourages the model to generate grayscale images"; its words are not given).
GRAYSCALE = "grayscale"

#: Per-dataset presets. Templates are one string or one per class (class order);
#: ``{class}`` / ``{bias}`` are filled with ``class_words`` / ``bias_words``.
#: ``borrow`` and ``emphasis`` are A.6's bias-ratio-0.999 rule: ``same_class`` (CelebA,
#: Waterbirds: "blond males from blond female models", "landbird on water images from
#: landbird on land models") with the *bias* label emphasised, the opposite bias label
#: negated; ``same_bias`` (UTKFace: "female children faces from model(s) trained on the
#: male children faces") with the *class* label emphasised, the opposite class negated.
DATASET_PRESETS: dict[str, dict[str, Any]] = {
    "waterbirds": {
        "k_D": 3,  # A.4: M_gs = 56
        "vanilla_template": "photo of a {class} on {bias}.",  # A.6, vanilla SD
        "prompt_template": "Photo of a {class} on {bias}",  # A.6, LoRA
        "identifier_template": "photo of a {identifier} bird",  # A.6, (Clustered) DreamBooth
        "negative_prompt": "",
        "label_template": "Photo of a {class}",  # 3.3, CLIP-Label
        "class_words": {"landbird": "landbird", "waterbird": "waterbird"},
        "bias_words": {"land": "land", "water": "water"},
        "borrow": "same_class",
        "emphasis": "bias",
    },
    "celeba": {
        "k_D": 20,  # A.4: M_gs = 1387, capped at 20
        # A.6, vanilla SD: "photo of a {bias-label} person" (+ "blond hair" negative) for
        # non-blond, "photo of a {bias-label} person with blond hair" for blond.
        "vanilla_template": [
            "photo of a {bias} person",
            "photo of a {bias} person with blond hair",
        ],
        # A.6, LoRA: "Photo of a non-blond {bias-label} person" / "... with blond hair".
        "prompt_template": [
            "Photo of a non-blond {bias} person",
            "Photo of a {bias} person with blond hair",
        ],
        # A.6, (Clustered) DreamBooth: "photo of a [V] person" with "blond hair" negative,
        # "photo of a [V] person with blond hair".
        "identifier_template": [
            "photo of a {identifier} person",
            "photo of a {identifier} person with blond hair",
        ],
        # A.6: "blond hair" negative for the non-blond class; A.8: grayscale for faces.
        "negative_prompt": [f"{GRAYSCALE}, blond hair", GRAYSCALE],
        "label_template": "Photo of a {class}",
        "class_words": {"not Blond_Hair": "non-blond person", "Blond_Hair": "blond person"},
        "bias_words": {"not Male": "female", "Male": "male"},
        "borrow": "same_class",
        "emphasis": "bias",
    },
    "utkface": {
        "k_D": 5,  # A.4: M_gs = 103
        "steps": {"clustered_dreambooth": 25},  # A.8: 25 steps for CDB on UTKFace
        "vanilla_template": "photo of a {class} {bias}.",  # A.6, vanilla SD
        "prompt_template": "Photo of a {class} person who is a {bias}",  # A.6, LoRA
        "identifier_template": "photo of a {identifier} {class} person",  # A.6, DreamBooth
        "negative_prompt": GRAYSCALE,  # A.8
        "label_template": "Photo of a {class}",
        "class_words": {"male": "male", "female": "female"},
        "bias_words": {"child": "child", "adult": "adult"},
        "borrow": "same_bias",
        "emphasis": "class",
    },
}
PRESET_NAMES = tuple(DATASET_PRESETS)
BORROW_RULES = ("same_class", "same_bias")
EMPHASIS = ("bias", "class")
#: A.6's emphasis: "placing it inside double parenthesis" (prompt-weighting syntax; plain
#: diffusers passes the parentheses to the tokenizer as text).
EMPHASIS_FORMAT = "(({word}))"
