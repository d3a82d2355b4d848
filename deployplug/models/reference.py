"""Small plain conv+BN+ReLU networks that exercise what real deployments meet.

They are not multi-branch models: each one exists to put a family of ops in front of the
exporters (residual adds and max pooling; depthwise convs and ReLU6; transposed convs,
concatenation and an asymmetric pad; dilated convs, global pooling and bilinear resizing).
Widths are small so tests run in milliseconds, and every net accepts any input channel count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deployplug.models.registry import register, with_input_shape


def conv_bn_act(in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1,
                dilation: int = 1, groups: int = 1,
                act: type[nn.Module] | None = nn.ReLU) -> nn.Sequential:
    """Conv (no bias, 'same' padding for odd kernels) -> BatchNorm -> optional activation."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding=dilation * (kernel_size // 2),
                  dilation=dilation, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
    ]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------- ResNet-18 like

class BasicBlock(nn.Module):
    """Two 3x3 conv+BN with a residual add; a 1x1 conv+BN projects the skip when shapes change."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNetLike(nn.Module):
    """ResNet-18 topology (stem 7x7/2 + maxpool 3/2, four stages of basic blocks) at small width."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, width: int = 16,
                 layers: tuple[int, ...] = (2, 2, 2, 2)):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        stages = []
        in_ch = width
        for i, depth in enumerate(layers):
            out_ch = width * 2**i
            blocks = [BasicBlock(in_ch, out_ch, stride=1 if i == 0 else 2)]
            blocks += [BasicBlock(out_ch, out_ch) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            in_ch = out_ch
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# --------------------------------------------------------------------- MobileNetV2 like

class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 linear projection, residual when shapes allow."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int):
        super().__init__()
        hidden = in_ch * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_bn_act(in_ch, hidden, 1, act=nn.ReLU6))
        layers.append(conv_bn_act(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6))
        layers.append(conv_bn_act(hidden, out_ch, 1, act=None))
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2Like(nn.Module):
    """MobileNetV2 layout (t, c, n, s rows) at a fraction of the width."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, width: int = 8,
                 setting: tuple[tuple[int, int, int, int], ...] = (
                     (1, 1, 1, 1), (6, 2, 2, 2), (6, 3, 2, 2), (6, 4, 2, 2), (6, 6, 1, 1))):
        super().__init__()
        layers: list[nn.Module] = [conv_bn_act(in_channels, width * 2, 3, 2, act=nn.ReLU6)]
        in_ch = width * 2
        for t, c, n, s in setting:
            out_ch = width * c
            for i in range(n):
                layers.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t))
                in_ch = out_ch
        last = width * 16
        layers.append(conv_bn_act(in_ch, last, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


# ---------------------------------------------------------------------------- U-Net like

def double_conv(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(conv_bn_act(in_ch, out_ch), conv_bn_act(out_ch, out_ch))


def pad_to(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Zero-pad x (bottom/right get the odd pixel) to the spatial size of ``like``."""
    dy = like.shape[-2] - x.shape[-2]
    dx = like.shape[-1] - x.shape[-1]
    if dy == 0 and dx == 0:
        return x
    return F.pad(x, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])


class UNetLike(nn.Module):
    """Two-level U-Net: max-pool encoder, ConvTranspose2d(k2, s2) decoder, concat skips.

    The first pooling is 3x3/2 without padding, so a 64x64 input gives a 31x31 skip and the
    decoder has to pad asymmetrically (0 top/left, 1 bottom/right) to align: the case that
    breaks converters assuming even sizes.
    """

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, width: int = 8):
        super().__init__()
        w = width
        self.enc1 = double_conv(in_channels, w)
        self.pool1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.enc2 = double_conv(w, 2 * w)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.bottleneck = double_conv(2 * w, 4 * w)
        self.up2 = nn.ConvTranspose2d(4 * w, 2 * w, kernel_size=2, stride=2)
        self.dec2 = double_conv(4 * w, 2 * w)
        self.up1 = nn.ConvTranspose2d(2 * w, w, kernel_size=2, stride=2)
        self.dec1 = double_conv(2 * w, w)
        self.head = nn.Conv2d(w, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s1 = self.enc1(x)
        s2 = self.enc2(self.pool1(s1))
        b = self.bottleneck(self.pool2(s2))
        d2 = self.dec2(torch.cat([pad_to(self.up2(b), s2), s2], dim=1))
        d1 = self.dec1(torch.cat([pad_to(self.up1(d2), s1), s1], dim=1))
        return self.head(d1)


# ------------------------------------------------------------------------ DeepLabV3 like

class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, dilated 3x3 branches and an image-pooling branch."""

    def __init__(self, in_ch: int, out_ch: int, rates: tuple[int, ...] = (1, 2, 3)):
        super().__init__()
        self.branches = nn.ModuleList(
            [conv_bn_act(in_ch, out_ch, 1)] + [conv_bn_act(in_ch, out_ch, 3, dilation=r)
                                                for r in rates])
        # No BatchNorm on the 1x1 pooled map: it would fail in training with batch size 1.
        self.image_pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_ch, out_ch, 1), nn.ReLU(inplace=True))
        self.project = conv_bn_act(out_ch * (len(rates) + 2), out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [branch(x) for branch in self.branches]
        pooled = self.image_pool(x)
        outs.append(F.interpolate(pooled, size=x.shape[-2:], mode="bilinear",
                                  align_corners=False))
        return self.project(torch.cat(outs, dim=1))


class DeepLabV3Like(nn.Module):
    """Output-stride-4 backbone with a dilated stage, ASPP, 1x1 classifier, bilinear upsample."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, width: int = 16,
                 rates: tuple[int, ...] = (1, 2, 3)):
        super().__init__()
        w = width
        self.backbone = nn.Sequential(
            conv_bn_act(in_channels, w, 3, 2),
            conv_bn_act(w, 2 * w, 3, 2),
            conv_bn_act(2 * w, 2 * w, 3, dilation=2),
            conv_bn_act(2 * w, 2 * w, 3, dilation=2),
        )
        self.aspp = ASPP(2 * w, w, rates)
        self.classifier = nn.Conv2d(w, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        y = self.classifier(self.aspp(self.backbone(x)))
        return F.interpolate(y, size=size, mode="bilinear", align_corners=False)


# ---------------------------------------------------------------------------- builders

def _with_shape(model: nn.Module, in_channels: int, size: int = 64) -> nn.Module:
    return with_input_shape(model, (1, in_channels, size, size))


@register("resnet18_like")
def resnet18_like(num_classes: int = 1000, in_channels: int = 3, width: int = 16,
                  layers: tuple[int, ...] = (2, 2, 2, 2)) -> nn.Module:
    """ResNet-18 topology at base width 16 (full width is 64)."""
    return _with_shape(ResNetLike(num_classes, in_channels, width, tuple(layers)), in_channels)


@register("mobilenetv2_like")
def mobilenetv2_like(num_classes: int = 1000, in_channels: int = 3, width: int = 8) -> nn.Module:
    """Inverted residuals with depthwise 3x3 convs and ReLU6."""
    return _with_shape(MobileNetV2Like(num_classes, in_channels, width), in_channels)


@register("unet_like")
def unet_like(num_classes: int = 1000, in_channels: int = 3, width: int = 8) -> nn.Module:
    """Segmentation net: ``num_classes`` output channels at input resolution."""
    return _with_shape(UNetLike(num_classes, in_channels, width), in_channels)


@register("deeplabv3_like")
def deeplabv3_like(num_classes: int = 1000, in_channels: int = 3, width: int = 16,
                   rates: tuple[int, ...] = (1, 2, 3)) -> nn.Module:
    """Segmentation net with dilated convs and ASPP; output is resized to the input size."""
    return _with_shape(DeepLabV3Like(num_classes, in_channels, width, tuple(rates)), in_channels)
