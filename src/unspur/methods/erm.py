"""ERM: empirical risk minimisation, the reference every paper starts from."""

from __future__ import annotations

from torch import nn

from unspur.methods.base import Method, RunContext, Supervision, register_method
from unspur.train.loop import FitResult


@register_method
class ERM(Method):
    """Mean cross-entropy over the training set; no group labels used in training.

    Validation group labels are used only for model selection (worst-group accuracy),
    as in the group_DRO and DFR papers' ERM baselines; with ``train.selection=average``
    no group label is used at all.
    """

    name = "erm"
    supervision = Supervision(train_group_labels=False, val_group_labels=True)
    summary = "empirical risk minimisation (cross-entropy)"

    def run(self, context: RunContext) -> tuple[nn.Module, FitResult]:
        model = context.build_model()
        return model, context.fit(model, "erm")
