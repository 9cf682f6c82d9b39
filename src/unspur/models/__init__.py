"""Classifiers for unspur: ResNets (torchvision-compatible), small CNN / MLP, transformers
backbones, all split into ``features`` + linear ``head``; safe checkpoint IO."""

from unspur.models.base import Classifier
from unspur.models.checkpoint import (
    META_FILE,
    WEIGHTS_FILE,
    WeightsReport,
    check_state_dict,
    load_backbone_weights,
    load_state,
    read_checkpoint_meta,
    read_state_dict,
    save_checkpoint,
    save_state,
)
from unspur.models.factory import (
    ARCHITECTURES,
    available_architectures,
    build_model,
    register_architecture,
)
from unspur.models.hf_backbone import HFBackbone
from unspur.models.resnet import (
    BasicBlock,
    Bottleneck,
    ResNet,
    load_imagenet_weights,
    resnet18,
    resnet50,
)
from unspur.models.restore import load_checkpoint
from unspur.models.small_cnn import MLP, SmallCNN

__all__ = [
    "ARCHITECTURES",
    "META_FILE",
    "WEIGHTS_FILE",
    "BasicBlock",
    "Bottleneck",
    "Classifier",
    "HFBackbone",
    "MLP",
    "ResNet",
    "SmallCNN",
    "WeightsReport",
    "available_architectures",
    "build_model",
    "check_state_dict",
    "load_backbone_weights",
    "load_checkpoint",
    "load_imagenet_weights",
    "load_state",
    "read_checkpoint_meta",
    "read_state_dict",
    "register_architecture",
    "resnet18",
    "resnet50",
    "save_checkpoint",
    "save_state",
]
