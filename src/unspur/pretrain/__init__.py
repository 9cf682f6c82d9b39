"""Recipes that regenerate the backbones shipped with unspur (``unspur pretrain NAME``).

The shipped weights stand in for the ImageNet models the founding papers start from:
they are trained here, on data disjoint from every benchmark, and loaded by name with
``model.pretrained: unspur:<name>`` (see :mod:`unspur.models.shipped`).
"""

from unspur.pretrain.cifar10 import RECIPES, CifarRecipe, train_cifar10_backbone

__all__ = ["RECIPES", "CifarRecipe", "train_cifar10_backbone"]
