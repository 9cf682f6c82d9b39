"""ResNet-18/34/50/101/152 with torchvision's exact module names, without torchvision.

The state dict keys (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer2.0.downsample.0``,
``fc.weight`` ...) and the parameter counts equal torchvision's ``resnet*`` (ResNet v1.5:
the stride of a Bottleneck sits on its 3x3 conv), so a torchvision ImageNet state dict
saved as ``.pth`` or ``.safetensors`` loads with :func:`load_imagenet_weights`. The
model's own ``fc`` is the :class:`~unspur.models.base.Classifier` head.

``small_images=True`` swaps the stem for the CIFAR one (3x3 conv, stride 1, no max-pool)
used by LfF / DiffInject for 28-32 px images. ``width`` scales every stage (torchvision's
64, 128, 256, 512 for the default 64; ``width=16`` gives 16, 32, 64, 128) with the same
keys, so a narrow ResNet-18 such as the shipped ``unspur:cifar10-resnet18`` backbone keeps
torchvision's layout at a CPU-sized cost (our choice, not a torchvision option).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from unspur.errors import ConfigError
from unspur.models.base import Classifier
from unspur.models.checkpoint import WeightsReport, load_backbone_weights


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding, no bias (followed by batch norm)."""
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution, no bias."""
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 convolutions with a residual (ResNet-50/101/152)."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


#: depth -> (block type, blocks per stage), as in torchvision.
RESNET_LAYOUTS: dict[int, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


class ResNet(Classifier):
    """torchvision-compatible ResNet; ``features`` runs up to global average pooling.

    Args:
        depth: 18, 34, 50, 101 or 152.
        n_classes: size of the ``fc`` head.
        small_images: CIFAR stem (3x3 conv1, stride 1, no max-pool) for 28-64 px inputs.
        in_channels: input channels (3 for RGB; ImageNet weights need 3).
        zero_init_residual: start each residual branch's last BN at zero (init only).
        width: channels of the stem and the first stage (64 in torchvision); the stages
            have ``width * (1, 2, 4, 8)`` channels. ImageNet weights need 64.
    """

    head_name = "fc"
    cam_layer_name = "layer4"

    def __init__(
        self,
        depth: int = 18,
        n_classes: int = 1000,
        small_images: bool = False,
        in_channels: int = 3,
        zero_init_residual: bool = False,
        width: int = 64,
    ) -> None:
        super().__init__()
        if depth not in RESNET_LAYOUTS:
            raise ConfigError(
                f"unknown ResNet depth {depth}; choose one of {sorted(RESNET_LAYOUTS)}"
            )
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ConfigError(
                f"ResNet width must be a positive integer (64 = torchvision), got {width!r}"
            )
        block, layers = RESNET_LAYOUTS[depth]
        self.arch = f"resnet{depth}"
        self.options = {"small_images": bool(small_images), "in_channels": int(in_channels)}
        if width != 64:  # recorded only when not torchvision's, so old specs stay equal
            self.options["width"] = int(width)
        self.inplanes = width
        if small_images:
            self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool: nn.Module = (
            nn.Identity() if small_images else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        )
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, 2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 8 * width, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * width * block.expansion, n_classes)

        # torchvision's initialisation (fc keeps nn.Linear's default).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(
        self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int, stride: int = 1
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem, four stages, global average pool, flatten: ``(B, 8 * width * expansion)``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def resnet18(n_classes: int = 1000, **options: bool | int) -> ResNet:
    """ResNet-18 (11,689,512 parameters with 1000 classes, like torchvision)."""
    return ResNet(18, n_classes, **options)  # type: ignore[arg-type]


def resnet50(n_classes: int = 1000, **options: bool | int) -> ResNet:
    """ResNet-50 v1.5 (25,557,032 parameters with 1000 classes, like torchvision)."""
    return ResNet(50, n_classes, **options)  # type: ignore[arg-type]


def load_imagenet_weights(model: ResNet, path: str | os.PathLike[str]) -> WeightsReport:
    """Load a torchvision ResNet state dict (``.pth`` or ``.safetensors``) into ``model``.

    The backbone loads strictly: missing or unexpected keys, or shapes that differ,
    raise a :class:`~unspur.errors.CheckpointError` naming them. The file's ``fc`` is
    loaded when it has the model's class count; otherwise the model's fresh ``fc`` is
    kept and the returned report (also logged) says so. Nothing is downloaded: get the
    file once, e.g. ``torch.save(torchvision.models.resnet50(weights=...).state_dict(),
    "resnet50.pth")`` on a machine with torchvision.
    """
    hint = f"Expected a torchvision {model.arch} state dict" + (
        "; the small-image stem (small_images=True) has a 3x3 conv1 that ImageNet "
        "weights (7x7) cannot fill - build without small_images to use them"
        if model.options.get("small_images")
        else ""
    )
    return load_backbone_weights(model, path, hint=hint)
