"""DFR: Deep Feature Reweighting (Kirichenko, Izmailov & Wilson, ICLR 2023).

"Last Layer Re-Training is Sufficient for Robustness to Spurious Correlations": keep
the ERM model's feature extractor and refit only the last layer, as an L1-regularised
logistic regression, on a *group-balanced* set. This follows the official
implementation (``PolinaKirichenko/deep_feature_reweighting``,
``dfr_evaluate_spurious.py``) step by step:

Embeddings. The reference ERM model's penultimate features of train and validation,
computed once in eval mode with the eval transform (no augmentation), cached
(:mod:`unspur.train.features`). The backbone is never run again.

``dfr_val`` (DFR^Tr_Val, the paper's main method; uses validation group labels to
*train*, so it is ✓ even when selecting by average accuracy):

1. Tuning (``dfr_on_validation_tune``): split validation in two halves; subsample
   every group of one half to the smallest group; standardise with a StandardScaler fit
   on that balanced part; for each C in {1, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01} fit
   ``LogisticRegression(L1, C, solver=liblinear)`` and score worst-group accuracy on
   the other half. With ``tune_retrains > 1`` the split and draw are repeated and the
   scores summed, as the official function does; its script calls it with the default
   of one draw, so ``tune_retrains`` defaults to 1. Class weights are not tuned: the
   official script tunes them only when training data is added or validation is not
   balanced, and its defaults (balance, no train data) fix them to 1:1.
2. Final fit (``dfr_on_validation_eval``): 20 random group-balanced subsets of the
   *whole* validation set, one L1 logistic regression each with the chosen C; the
   coefficients and intercepts are averaged. The StandardScaler is fit on the
   *training-set* embeddings, exactly as the official code does.

``dfr_train`` (DFR^Tr_Tr: training group labels, ✓✓): the scaler is fit on all
training embeddings; C is tuned on one group-balanced subset of the training
embeddings (``max_iter=20``, as in ``dfr_train_subset_tune``) by worst-group accuracy
on the whole validation set; the final layer averages 10 balanced training subsets
(``dfr_train_subset_eval``).

Base model (``base_model``). The DFR paper retrains the last layer of the ERM model
as it stands at the end of training, with no early stopping, and the official code
loads the ``final_checkpoint.pt`` that ``train_classifier.py`` writes after its last
epoch. ``base_model: final`` (the default) does the same: the reference ERM run's
last-epoch weights (``erm/checkpoints/last``, beside ``method.reference`` when one is
given); ``base_model: selected`` uses the epoch the reference run selected (by
validation worst-group accuracy by default), as earlier versions of unspur did. The
choice and the weights' folder are recorded in ``dfr.json``.

Class weights of ``dfr_train`` (``tune_class_weights``). The official README's
DFR^Tr_Tr command passes ``--tune_class_weights_dfr_train``: C and the class weights
``{0: 1, 1: w}`` / ``{0: w, 1: 1}`` for ``w`` in {1, 2, 3, 10, 100, 300, 1000}
(``CLASS_WEIGHT_OPTIONS`` of ``dfr_evaluate_spurious.py``) are tuned together by
validation worst-group accuracy (C outer, weights inner, the first best kept), and the
10 final fits use the chosen weights. Default on, as in that command (without the flag
the README calls the variant DFR^Tr_{Tr-NM}: ``tune_class_weights: false``). The
official grid is for two classes; with more, the weights stay 1:1 and ``dfr.json``
says so. ``dfr_val`` keeps 1:1 (see step 1 above).

The result is installed into the classifier's ``nn.Linear`` head with the scaler
folded in: ``W' = W / sigma``, ``b' = b - W (mu / sigma)``, so the classifier computes
exactly scikit-learn's decision function. Binary problems: liblinear gives one weight
vector ``w``; the head gets ``[-w/2, w/2]`` (and biases likewise), so
``softmax(logits)[1] == predict_proba[:, 1]`` exactly. Multi-class problems: liblinear
is one-vs-rest (scikit-learn >= 1.8 requires the explicit ``OneVsRestClassifier``,
older versions did the same internally), one row per class; the head's argmax equals
``predict`` (its softmax is not OvR's normalised sigmoids).

Deviations, with reasons: the random halves in step 1 are drawn per group (each group
split in two) instead of over the whole set, so every group appears in both halves
even on small validation sets (the official random split can leave a small group out
of the fitting half and crash); the expected composition is the same. Randomness comes
from ``np.random.default_rng(seed)`` instead of the global NumPy state.
``train.selection=average`` tunes C by average instead of worst-group accuracy.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from unspur.errors import ConfigError
from unspur.evaluate.predict import evaluate_split
from unspur.io import atomic_write_json
from unspur.methods.base import Method, RunContext, Supervision, register_method
from unspur.methods.last_layer import cached_features
from unspur.models.base import Classifier
from unspur.models.linear_head import LinearHead
from unspur.train.loop import FitResult, candidate_rule
from unspur.train.sampling import balanced_subsample_indices

logger = logging.getLogger(__name__)

#: The official script's C grid (Waterbirds; also used for CelebA with l1).
C_OPTIONS = (1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01)
#: The official script's class-weight grid (``CLASS_WEIGHT_OPTIONS``, Waterbirds; a
#: commented-out CelebA variant ends in 500): each weight on class 1, then on class 0.
CLASS_WEIGHTS = (1.0, 2.0, 3.0, 10.0, 100.0, 300.0, 1000.0)
BASE_MODELS = ("final", "selected")


def class_weight_pairs(weights=CLASS_WEIGHTS) -> list[tuple[float, float]]:
    """``(w0, w1)`` in the official order, ``{0: 1, 1: w}`` first, duplicates dropped."""
    pairs = [(1.0, float(w)) for w in weights] + [(float(w), 1.0) for w in weights]
    return list(dict.fromkeys(pairs))


# --------------------------------------------------------------- the linear layer
@dataclass
class LinearSolution:
    """A logistic-regression layer on standardised features: ``((x - mean) / scale) W^T + b``.

    ``coef`` is ``(1, D)`` for two classes (liblinear's single vector) or ``(K, D)``
    (one-vs-rest) for ``K > 2``.
    """

    coef: np.ndarray
    intercept: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    n_classes: int

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        """scikit-learn's ``decision_function``: ``(N,)`` for binary, ``(N, K)`` else."""
        z = (np.asarray(x, dtype=np.float64) - self.mean) / self.scale
        scores = z @ self.coef.T + self.intercept
        return scores[:, 0] if self.n_classes == 2 else scores

    def logits(self, x: np.ndarray) -> np.ndarray:
        """``(N, n_classes)`` logits the installed head computes."""
        weight, bias = self.head_weights()
        return np.asarray(x, dtype=np.float64) @ weight.T + bias

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.logits(x).argmax(axis=1)

    def head_weights(self) -> tuple[np.ndarray, np.ndarray]:
        """``(W, b)`` for an ``nn.Linear(D, n_classes)`` with the scaler folded in."""
        weight = self.coef / self.scale
        bias = self.intercept - self.coef @ (self.mean / self.scale)
        if self.n_classes == 2:
            weight = np.concatenate([-weight / 2, weight / 2])
            bias = np.concatenate([-bias / 2, bias / 2])
        return weight, bias

    def install(self, head: nn.Linear) -> nn.Linear:
        """Write the solution into ``head`` in place (its dtype and device kept)."""
        weight, bias = self.head_weights()
        if tuple(head.weight.shape) != weight.shape:
            raise ConfigError(
                f"DFR solution has shape {weight.shape} but the head is {tuple(head.weight.shape)}"
            )
        with torch.no_grad():
            head.weight.copy_(torch.as_tensor(weight, dtype=head.weight.dtype))
            if head.bias is not None:
                head.bias.copy_(torch.as_tensor(bias, dtype=head.bias.dtype))
            elif np.any(bias != 0):
                raise ConfigError("the head has no bias; DFR needs one for the intercept")
        return head


# ---------------------------------------------------------------- the regression
def _l1_logistic(C: float, max_iter: int, random_state: int, class_weight=None):
    from sklearn.linear_model import LogisticRegression

    kwargs: dict[str, Any] = {
        "C": C,
        "solver": "liblinear",
        "max_iter": max_iter,
        "random_state": random_state,
        "class_weight": class_weight,
    }
    if LogisticRegression().get_params().get("penalty") == "deprecated":  # sklearn >= 1.8
        kwargs["l1_ratio"] = 1.0
    else:
        kwargs["penalty"] = "l1"
    return LogisticRegression(**kwargs)


def fit_l1_logistic(
    x: np.ndarray,
    y: np.ndarray,
    C: float,
    n_classes: int,
    max_iter: int = 100,
    random_state: int = 0,
    class_weight: tuple[float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(coef, intercept)`` of an L1 logistic regression (liblinear; OvR if K > 2).

    ``class_weight`` ``(w0, w1)``: scikit-learn's ``class_weight={0: w0, 1: w1}`` (two
    classes only, as the official code).
    """
    present = np.unique(y)
    if len(present) != n_classes or not np.array_equal(present, np.arange(n_classes)):
        raise ConfigError(
            f"DFR's logistic regression needs every class 0..{n_classes - 1} in its data; "
            f"got classes {present.tolist()}"
        )
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if class_weight is not None:
            if n_classes != 2:
                raise ConfigError("DFR's class weights are defined for two classes only")
            weights = {0: float(class_weight[0]), 1: float(class_weight[1])}
            model = _l1_logistic(C, max_iter, random_state, weights).fit(x, y)
            return model.coef_.copy(), model.intercept_.copy()
        if n_classes == 2:
            model = _l1_logistic(C, max_iter, random_state).fit(x, y)
            return model.coef_.copy(), model.intercept_.copy()
        from sklearn.multiclass import OneVsRestClassifier

        model = OneVsRestClassifier(_l1_logistic(C, max_iter, random_state)).fit(x, y)
        coef = np.concatenate([e.coef_ for e in model.estimators_])
        intercept = np.concatenate([e.intercept_ for e in model.estimators_])
        return coef, intercept


def fit_scaler(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """StandardScaler's ``(mean_, scale_)`` (zero-variance features get scale 1)."""
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(np.asarray(x, dtype=np.float64))
    return scaler.mean_.copy(), scaler.scale_.copy()


def group_accuracies(pred: np.ndarray, y: np.ndarray, g: np.ndarray, n_groups: int) -> np.ndarray:
    """Accuracy per group; NaN for groups absent from ``g``."""
    correct = np.asarray(pred) == np.asarray(y)
    return np.array([correct[g == k].mean() if np.any(g == k) else np.nan for k in range(n_groups)])


def _score(pred, y, g, n_groups, metric: str) -> float:
    if metric == "average":
        return float(np.mean(np.asarray(pred) == np.asarray(y)))
    return float(np.nanmin(group_accuracies(pred, y, g, n_groups)))


def balanced_subset(
    g: torch.Tensor | np.ndarray, n_groups: int, rng: np.random.Generator, what: str = "training"
) -> np.ndarray:
    """Positions of a group-balanced subset of the ``what`` data, every group present."""
    return balanced_subsample_indices(g, n_groups, rng, f"{what} group", require_all=True)


def check_groups(g: np.ndarray, n_groups: int, what: str, minimum: int = 1) -> None:
    """Raise a :class:`ConfigError` when a group has fewer than ``minimum`` samples."""
    counts = np.bincount(np.asarray(g, dtype=np.int64), minlength=n_groups)
    short = [k for k in range(n_groups) if counts[k] < minimum]
    if short:
        raise ConfigError(
            f"DFR needs at least {minimum} {what} sample(s) in every group, but group(s) "
            f"{short} have {[int(counts[k]) for k in short]}; DFR fits on group-balanced "
            "subsets. Use a split where every group occurs (or dfr_train / llr_all)"
        )


def split_halves(
    g: np.ndarray, n_groups: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``(fit, holdout)`` positions: each group's samples shuffled and halved.

    The holdout gets ``floor(n / 2)`` of each group, the fitting part the rest (the
    official code's ``idx[:n_val]`` / ``idx[n_val:]``, drawn per group).
    """
    fit, hold = [], []
    for k in range(n_groups):
        members = rng.permutation(np.flatnonzero(g == k))
        half = len(members) // 2
        hold.append(members[:half])
        fit.append(members[half:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(hold))


def fit_balanced_average(
    x: np.ndarray,
    y: np.ndarray,
    g: np.ndarray,
    C: float,
    n_groups: int,
    n_classes: int,
    rng: np.random.Generator,
    scaler: tuple[np.ndarray, np.ndarray],
    num_retrains: int,
    random_state: int = 0,
    what: str = "validation",
    class_weight: tuple[float, float] | None = None,
) -> LinearSolution:
    """Average of ``num_retrains`` L1 logistic regressions on balanced subsets."""
    mean, scale = scaler
    coefs, intercepts = [], []
    for i in range(num_retrains):
        keep = balanced_subset(g, n_groups, rng, what)
        z = (x[keep] - mean) / scale
        coef, intercept = fit_l1_logistic(
            z, y[keep], C, n_classes, random_state=random_state + i, class_weight=class_weight
        )
        coefs.append(coef)
        intercepts.append(intercept)
    return LinearSolution(
        np.mean(coefs, axis=0), np.mean(intercepts, axis=0), mean, scale, n_classes
    )


def dfr_val_tune(
    x: np.ndarray,
    y: np.ndarray,
    g: np.ndarray,
    n_groups: int,
    n_classes: int,
    rng: np.random.Generator,
    c_options=C_OPTIONS,
    tune_retrains: int = 1,
    metric: str = "worst_group",
    random_state: int = 0,
) -> tuple[float, dict[float, float]]:
    """Choose C on validation halves (``dfr_on_validation_tune``); scores summed over draws."""
    check_groups(g, n_groups, "validation", minimum=2)
    scores = {float(c): 0.0 for c in c_options}
    for _ in range(tune_retrains):
        fit_idx, hold_idx = split_halves(g, n_groups, rng)
        keep = fit_idx[balanced_subset(g[fit_idx], n_groups, rng, "validation")]
        mean, scale = fit_scaler(x[keep])
        z_fit = (x[keep] - mean) / scale
        z_hold = (x[hold_idx] - mean) / scale
        for c in scores:
            coef, intercept = fit_l1_logistic(
                z_fit, y[keep], c, n_classes, random_state=random_state
            )
            solution = LinearSolution(
                coef, intercept, np.zeros_like(mean), np.ones_like(scale), n_classes
            )
            pred = solution.predict(z_hold)
            scores[c] += _score(pred, y[hold_idx], g[hold_idx], n_groups, metric)
    best = max(scores, key=lambda c: (scores[c], -list(scores).index(c)))
    return best, scores


def dfr_val_fit(
    train_x: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    val_g: np.ndarray,
    n_groups: int,
    n_classes: int,
    seed: int = 0,
    c_options=C_OPTIONS,
    tune_retrains: int = 1,
    num_retrains: int = 20,
    metric: str = "worst_group",
) -> tuple[LinearSolution, dict[str, Any]]:
    """DFR^Tr_Val on embeddings: tune C on validation halves, refit on all validation.

    ``train_x`` only fits the StandardScaler (as the official code does).
    """
    rng = np.random.default_rng(seed)
    check_groups(val_g, n_groups, "validation", minimum=2)
    best, scores = dfr_val_tune(
        val_x, val_y, val_g, n_groups, n_classes, rng, c_options, tune_retrains, metric, seed
    )
    scaler = fit_scaler(train_x)
    solution = fit_balanced_average(
        val_x, val_y, val_g, best, n_groups, n_classes, rng, scaler, num_retrains, seed
    )
    info = {"C": best, "tuning_scores": {str(c): s for c, s in scores.items()}, "metric": metric}
    return solution, info


def dfr_train_fit(
    train_x: np.ndarray,
    train_y: np.ndarray,
    train_g: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    val_g: np.ndarray,
    n_groups: int,
    n_classes: int,
    seed: int = 0,
    c_options=C_OPTIONS,
    num_retrains: int = 10,
    tune_max_iter: int = 20,
    metric: str = "worst_group",
    class_weights=None,
) -> tuple[LinearSolution, dict[str, Any]]:
    """DFR^Tr_Tr on embeddings: balanced training subsets, C tuned on validation.

    ``class_weights``: ``(w0, w1)`` pairs tuned together with C (the official
    ``--tune_class_weights_dfr_train``, :func:`class_weight_pairs`); None keeps 1:1.
    """
    rng = np.random.default_rng(seed)
    check_groups(train_g, n_groups, "training")
    if class_weights is not None and n_classes != 2:
        raise ConfigError("DFR's class-weight tuning is defined for two classes only")
    scaler = fit_scaler(train_x)
    mean, scale = scaler
    keep = balanced_subset(train_g, n_groups, rng, "training")
    z_fit = (train_x[keep] - mean) / scale
    z_val = (val_x - mean) / scale
    weight_options = [None] if class_weights is None else [tuple(w) for w in class_weights]
    scores: dict[tuple[float, Any], float] = {}
    for c in c_options:
        for weight in weight_options:
            coef, intercept = fit_l1_logistic(
                z_fit,
                train_y[keep],
                float(c),
                n_classes,
                max_iter=tune_max_iter,
                random_state=seed,
                class_weight=weight,
            )
            solution = LinearSolution(
                coef, intercept, np.zeros_like(mean), np.ones_like(scale), n_classes
            )
            score = _score(solution.predict(z_val), val_y, val_g, n_groups, metric)
            scores[(float(c), weight)] = score
    order = list(scores)
    best_c, best_weight = max(order, key=lambda k: (scores[k], -order.index(k)))
    solution = fit_balanced_average(
        train_x,
        train_y,
        train_g,
        best_c,
        n_groups,
        n_classes,
        rng,
        scaler,
        num_retrains,
        seed,
        "training",
        best_weight,
    )
    info: dict[str, Any] = {"C": best_c, "metric": metric}
    if class_weights is None:
        info["tuning_scores"] = {str(c): s for (c, _), s in scores.items()}
    else:
        info["class_weight"] = list(best_weight)
        info["tuning_scores"] = [
            {"C": c, "class_weight": list(w), "score": s} for (c, w), s in scores.items()
        ]
    return solution, info


# ------------------------------------------------------------------------ methods
def _tuning_metric(context: RunContext) -> str:
    return candidate_rule(context.config.train.selection)


def _c_options(options: dict[str, Any]) -> tuple[float, ...]:
    values = options.get("c_options", C_OPTIONS)
    try:
        values = tuple(float(c) for c in values)
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"dfr option c_options must be a list of numbers, got {values!r}"
        ) from err
    if not values or any(c <= 0 for c in values):
        raise ConfigError(f"dfr option c_options must be positive numbers, got {list(values)}")
    return values


def _class_weights(options: dict[str, Any]) -> tuple[float, ...]:
    values = options["class_weights"]
    try:
        values = tuple(float(w) for w in values)
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"dfr_train option class_weights must be a list of numbers, got {values!r}"
        ) from err
    if not values or any(w <= 0 for w in values):
        raise ConfigError(
            f"dfr_train option class_weights must be positive numbers, got {list(values)}"
        )
    return values


def _positive_int(options: dict[str, Any], key: str) -> int:
    value = options[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"dfr option {key} must be a positive integer, got {value!r}")
    return value


def _finish(
    context: RunContext, model: Classifier, stage: str, solution: LinearSolution, info, val
) -> FitResult:
    solution.install(model.head)
    model.eval()
    metrics, _ = evaluate_split(
        LinearHead.around(model.head),
        val,
        context.train_group_counts,
        context.config.train.eval_batch_size,
    )
    info = {**info, "val": metrics.headline(), "seed": context.config.seed}
    atomic_write_json(context.out_dir / stage / "dfr.json", info)
    rule = "average" if info["metric"] == "average" else "worst_group"
    return FitResult(best_epoch=0, selection=rule, history=[info], best_val=metrics.headline())


def _base_model_option(options: dict[str, Any]) -> str:
    value = options["base_model"]
    if value not in BASE_MODELS:
        raise ConfigError(f"dfr option base_model={value!r} is not one of {', '.join(BASE_MODELS)}")
    return value


def final_checkpoint_dir(context: RunContext) -> Path:
    """Where the reference ERM run keeps its last-epoch weights.

    Without ``method.reference`` ERM trains in ``out_dir/erm``; with it, the reference
    is a run's ``model`` folder and its ERM stage sits beside it (``../erm``), as a
    comparison lays it out.
    """
    if context.config.method.reference:
        return Path(context.config.method.reference).parent / "erm" / "checkpoints" / "last"
    return context.out_dir / "erm" / "checkpoints" / "last"


def dfr_base_model(context: RunContext, which: str) -> tuple[nn.Module, dict[str, Any]]:
    """The ERM model DFR retrains, and how it was chosen (for ``dfr.json``).

    ``final``: the reference run's weights after its last epoch (the DFR paper's base
    model, no early stopping); ``selected``: the epoch the reference run selected.
    Where no last-epoch checkpoint exists (a ``method.reference`` saved elsewhere, a
    0-epoch run) the reference model is used as it is, and the record says so.
    """
    model = context.reference_model()
    if which == "selected":
        source = context.config.method.reference or str(context.out_dir / "erm" / "best")
        return model, {"base_model": "selected", "base_model_dir": source}
    final = final_checkpoint_dir(context)
    if not (final / "model.json").is_file():
        logger.warning(
            "DFR base_model=final: no last-epoch checkpoint at %s; using the reference model "
            "as it is",
            final,
        )
        source = context.config.method.reference or str(context.out_dir / "erm" / "best")
        return model, {
            "base_model": "reference as given (no final checkpoint)",
            "base_model_dir": source,
        }
    from unspur.models.restore import load_checkpoint

    return load_checkpoint(final), {"base_model": "final", "base_model_dir": str(final)}


def _embeddings(context: RunContext, model: nn.Module):
    if context.val is None:
        raise ConfigError("DFR needs a validation split (it tunes C on it, and dfr_val fits on it)")
    if not isinstance(model, Classifier):
        raise ConfigError("DFR needs an unspur Classifier (backbone + linear head)")
    train = cached_features(context, model, context.train)
    val = cached_features(context, model, context.val)
    return train, val


@register_method
class DFRVal(Method):
    """DFR^Tr_Val (Kirichenko et al. 2023): last layer refit on balanced validation.

    Defaults from the official code: C grid {1, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01},
    ``tune_retrains`` 1, ``num_retrains`` 20 balanced subsets averaged, L1 liblinear;
    ``base_model: final``, the ERM model after its last epoch (the DFR paper's base
    model; ``selected`` is the option). Validation group labels train the layer: ✓
    under any selection rule.
    """

    name = "dfr_val"
    supervision = Supervision(
        train_group_labels=False, val_group_labels=True, val_labels_only_for_selection=False
    )
    uses_reference = True
    summary = "deep feature reweighting: L1 logistic head on group-balanced validation"
    defaults = {
        "c_options": list(C_OPTIONS),
        "tune_retrains": 1,
        "num_retrains": 20,
        "base_model": "final",
    }
    debug_options = {"num_retrains": 2}

    def run(self, context: RunContext) -> tuple[nn.Module, FitResult]:
        options = context.options
        c_options = _c_options(options)
        tune_retrains = _positive_int(options, "tune_retrains")
        num_retrains = _positive_int(options, "num_retrains")
        model, base = dfr_base_model(context, _base_model_option(options))
        train, val = _embeddings(context, model)
        train_x = train.features.numpy()
        val_x, val_y, val_g = val.set.numpy()
        solution, info = dfr_val_fit(
            train_x,
            val_x,
            val_y,
            val_g,
            val.n_groups,
            val.n_classes,
            context.config.seed,
            c_options,
            tune_retrains,
            num_retrains,
            _tuning_metric(context),
        )
        info.update(
            variant="dfr_val", tune_retrains=tune_retrains, num_retrains=num_retrains, **base
        )
        return model, _finish(context, model, "dfr_val", solution, info, val)


@register_method
class DFRTrain(Method):
    """DFR^Tr_Tr (Kirichenko et al. 2023): last layer refit on balanced training data.

    Defaults from the official code: the same C grid, tuning with ``max_iter`` 20 on one
    balanced training subset scored on validation, ``num_retrains`` 10 subsets averaged;
    C tuned together with the class weights (``tune_class_weights``, the official
    README's DFR^Tr_Tr command; two classes); ``base_model: final`` as ``dfr_val``.
    Uses training group labels (✓✓); validation labels only tune C and the weights.
    """

    name = "dfr_train"
    supervision = Supervision(train_group_labels=True, val_group_labels=True)
    uses_reference = True
    summary = "deep feature reweighting on group-balanced training data (DFR^Tr_Tr)"
    defaults = {
        "c_options": list(C_OPTIONS),
        "num_retrains": 10,
        "tune_max_iter": 20,
        "base_model": "final",
        "tune_class_weights": True,
        "class_weights": list(CLASS_WEIGHTS),
    }
    debug_options = {"num_retrains": 2}

    def run(self, context: RunContext) -> tuple[nn.Module, FitResult]:
        options = context.options
        c_options = _c_options(options)
        num_retrains = _positive_int(options, "num_retrains")
        tune_max_iter = _positive_int(options, "tune_max_iter")
        tune_weights = options["tune_class_weights"]
        if not isinstance(tune_weights, bool):
            raise ConfigError("dfr_train option tune_class_weights must be true or false")
        weights = _class_weights(options)
        model, base = dfr_base_model(context, _base_model_option(options))
        train, val = _embeddings(context, model)
        train_x, train_y, train_g = train.set.numpy()
        val_x, val_y, val_g = val.set.numpy()
        pairs = None
        weights_note = "not tuned (tune_class_weights: false)"
        if tune_weights and train.n_classes == 2:
            pairs = class_weight_pairs(weights)
            weights_note = "tuned"
        elif tune_weights:
            weights_note = "not tuned: the official grid is for two classes"
            logger.warning("dfr_train: %d classes, class weights stay 1:1", train.n_classes)
        solution, info = dfr_train_fit(
            train_x,
            train_y,
            train_g,
            val_x,
            val_y,
            val_g,
            train.n_groups,
            train.n_classes,
            context.config.seed,
            c_options,
            num_retrains,
            tune_max_iter,
            _tuning_metric(context),
            pairs,
        )
        info.update(
            variant="dfr_train",
            num_retrains=num_retrains,
            tune_max_iter=tune_max_iter,
            class_weights=weights_note,
            **base,
        )
        return model, _finish(context, model, "dfr_train", solution, info, val)
