"""Convolutional model families built in code (no torchvision).

Every class takes width / depth knobs so tests can build tiny versions (a handful of channels,
16x16..64x64 inputs, export + onnxruntime in well under a second) and benchmarks can build the
full-size networks. The full-size constructors mirror torchvision's layer structure (parameter
names differ), e.g. ``resnet50()`` has 25,557,032 parameters and ~4.1 GMACs at 224x224, and
``mobilenet_v2()`` has 3,504,872 parameters.

Deliberate differences from torchvision: no Dropout layers (a train-mode export would make the
output random) and no stochastic depth; everything else that matters for channel coupling
(residual adds, concats, depthwise / grouped convs, squeeze-excite, channel split / shuffle,
channels-last LayerNorm, ConvTranspose, Resize, multi-output heads) is kept.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "make_divisible",
    "ConvBNAct",
    "VGG",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "resnet18",
    "resnet50",
    "resnext50_32x4d",
    "InvertedResidual",
    "MobileNetV2",
    "mobilenet_v2",
    "SqueezeExcite",
    "MBConv",
    "EfficientNet",
    "efficientnet_b0",
    "DenseNet",
    "InceptionNet",
    "ShuffleNetV2",
    "shufflenet_v2_x1_0",
    "RegNet",
    "UNet",
    "ConvNeXt",
    "convnext_tiny",
    "YOLO",
    "Conv1dNet",
]


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """torchvision's ``_make_divisible``: round to a multiple of ``divisor``, never below 90%."""
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvBNAct(nn.Sequential):
    """Conv2d(bias=False) + BatchNorm2d + activation (``act=None`` for a linear projection)."""

    def __init__(self, cin: int, cout: int, k: int | tuple = 3, stride: int = 1, groups: int = 1,
                 act: type[nn.Module] | None = nn.ReLU, padding=None, bn_eps: float = 1e-5):
        if padding is None:
            padding = (k // 2) if isinstance(k, int) else tuple(x // 2 for x in k)
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(cout, eps=bn_eps),
        ]
        if act is not None:
            layers.append(act(inplace=True) if act in (nn.ReLU, nn.ReLU6, nn.SiLU) else act())
        super().__init__(*layers)


# --------------------------------------------------------------------------------------------
# VGG
# --------------------------------------------------------------------------------------------
VGG_CFGS = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"),
}


class VGG(nn.Module):
    """Plain VGG: conv-BN-ReLU stacks with max-pools, then Flatten of the *spatial* map and an
    MLP head (so the Flatten index map channel c <-> features c*H*W.. is exercised).

    ``cfg`` lists conv widths and "M" for a max-pool; ``width_mult`` scales every width.
    ``pool_to``: if given, an AdaptiveAvgPool2d to that size precedes the Flatten (torchvision
    uses 7). Full size: ``VGG(VGG_CFGS["vgg16"], pool_to=7, hidden=4096)`` at 224x224.
    """

    def __init__(self, cfg: Sequence = (8, "M", 16, "M", 32), in_ch: int = 3,
                 num_classes: int = 10, width_mult: float = 1.0, hidden: int = 32,
                 spatial: int = 4, pool_to: int | None = None, bn: bool = True):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_ch
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                w = max(1, int(round(v * width_mult)))
                if bn:
                    layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w),
                               nn.ReLU(inplace=True)]
                else:
                    layers += [nn.Conv2d(c, w, 3, padding=1), nn.ReLU(inplace=True)]
                c = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(pool_to) if pool_to else nn.Identity()
        s = pool_to if pool_to else spatial
        self.classifier = nn.Sequential(
            nn.Linear(c * s * s, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes))

    def forward(self, x):
        x = self.pool(self.features(x))
        x = torch.flatten(x, 1)
        return self.classifier(x)


# --------------------------------------------------------------------------------------------
# ResNet / ResNeXt
# --------------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision Bottleneck (ResNet v1.5: stride on the 3x3). Inner width is
    ``int(planes * base_width / 64) * groups`` so ResNeXt is the same block with groups > 1."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision-equivalent ResNet.

    ``width``: planes of the first stage (64 in torchvision; stages use width*1,2,4,8).
    ``layers``: blocks per stage. ``stem``: "imagenet" (7x7/2 conv + 3x3/2 max-pool) or "cifar"
    (3x3/1 conv, no pool). ``groups`` / ``width_per_group`` give ResNeXt (width_per_group is
    relative to 64, as in torchvision: inner width = int(planes*wpg/64)*groups).
    """

    def __init__(self, block: type[nn.Module] = BasicBlock, layers: Sequence[int] = (2, 2, 2, 2),
                 width: int = 64, num_classes: int = 1000, in_ch: int = 3, stem: str = "imagenet",
                 groups: int = 1, width_per_group: int = 64):
        super().__init__()
        self.groups = groups
        self.base_width = width_per_group
        self.inplanes = width
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_ch, width, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        elif stem == "cifar":
            self.conv1 = nn.Conv2d(in_ch, width, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            raise ValueError(f"unknown stem {stem!r}")
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        stages = []
        for i, n in enumerate(layers):
            stages.append(self._make_layer(block, width * 2 ** i, n, stride=1 if i == 0 else 2))
        self.layer1, self.layer2, self.layer3, self.layer4 = (stages + [nn.Identity()] * 4)[:4]
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.inplanes, num_classes)

    def _make_layer(self, block, planes, blocks, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, 1, None, self.groups, self.base_width))
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet18(width: int = 64, layers: Sequence[int] = (2, 2, 2, 2), **kw) -> ResNet:
    return ResNet(BasicBlock, layers, width=width, **kw)


def resnet50(width: int = 64, layers: Sequence[int] = (3, 4, 6, 3), **kw) -> ResNet:
    return ResNet(Bottleneck, layers, width=width, **kw)


def resnext50_32x4d(width: int = 64, layers: Sequence[int] = (3, 4, 6, 3), groups: int = 32,
                    width_per_group: int = 4, **kw) -> ResNet:
    return ResNet(Bottleneck, layers, width=width, groups=groups,
                  width_per_group=width_per_group, **kw)


# --------------------------------------------------------------------------------------------
# MobileNetV2
# --------------------------------------------------------------------------------------------
class InvertedResidual(nn.Module):
    def __init__(self, inp, oup, stride, expand_ratio):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNAct(inp, hidden, 1, act=nn.ReLU6))
        layers += [ConvBNAct(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
                   nn.Conv2d(hidden, oup, 1, bias=False), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


MBV2_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1))


class MobileNetV2(nn.Module):
    """torchvision MobileNetV2 (t, c, n, s settings; ReLU6; depthwise 3x3; linear bottleneck).

    Full size: ``MobileNetV2()`` (3.50M params, ~300 MMACs at 224). ``first_channel`` /
    ``last_channel`` default to torchvision's 32 / 1280 (scaled by width_mult as torchvision).
    """

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0,
                 setting: Sequence[Sequence[int]] = MBV2_SETTING, round_nearest: int = 8,
                 first_channel: int = 32, last_channel: int = 1280, in_ch: int = 3):
        super().__init__()
        inp = make_divisible(first_channel * width_mult, round_nearest)
        self.last_channel = make_divisible(last_channel * max(1.0, width_mult), round_nearest)
        feats: list[nn.Module] = [ConvBNAct(in_ch, inp, 3, 2, act=nn.ReLU6)]
        for t, c, n, s in setting:
            oup = make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                feats.append(InvertedResidual(inp, oup, s if i == 0 else 1, t))
                inp = oup
        feats.append(ConvBNAct(inp, self.last_channel, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Linear(self.last_channel, num_classes)

    def forward(self, x):
        x = self.features(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.classifier(x)


def mobilenet_v2(**kw) -> MobileNetV2:
    return MobileNetV2(**kw)


# --------------------------------------------------------------------------------------------
# EfficientNet-B0
# --------------------------------------------------------------------------------------------
class SqueezeExcite(nn.Module):
    """x * sigmoid(fc2(act(fc1(avgpool(x))))) -- the scale is a broadcast ``Mul``."""

    def __init__(self, channels: int, squeeze: int, act: type[nn.Module] = nn.SiLU):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.act = act()
        self.gate = nn.Sigmoid()

    def forward(self, x):
        s = self.gate(self.fc2(self.act(self.fc1(self.avgpool(x)))))
        return x * s


class MBConv(nn.Module):
    def __init__(self, inp, oup, k, stride, expand_ratio, se_ratio=0.25, bn_eps=1e-3):
        super().__init__()
        self.use_res = stride == 1 and inp == oup
        hidden = make_divisible(inp * expand_ratio, 8) if expand_ratio != 1 else inp
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNAct(inp, hidden, 1, act=nn.SiLU, bn_eps=bn_eps))
        layers.append(ConvBNAct(hidden, hidden, k, stride, groups=hidden, act=nn.SiLU,
                                bn_eps=bn_eps))
        layers.append(SqueezeExcite(hidden, max(1, int(inp * se_ratio))))
        layers.append(ConvBNAct(hidden, oup, 1, act=None, bn_eps=bn_eps))
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.block(x) if self.use_res else self.block(x)


# (expand_ratio, kernel, stride, out_channels, repeats) -- torchvision efficientnet_b0
EFFNET_B0_SETTING = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
                     (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))


class EfficientNet(nn.Module):
    """EfficientNet-B0 layout (MBConv + SE, SiLU, BN eps 1e-3). Full size: ``EfficientNet()``
    (5.29M params at width/depth 1.0). ``depth_mult`` scales repeats (ceil)."""

    def __init__(self, setting: Sequence[Sequence[int]] = EFFNET_B0_SETTING,
                 width_mult: float = 1.0, depth_mult: float = 1.0, stem: int = 32,
                 head: int = 1280, num_classes: int = 1000, in_ch: int = 3):
        super().__init__()
        c = make_divisible(stem * width_mult, 8)
        feats: list[nn.Module] = [ConvBNAct(in_ch, c, 3, 2, act=nn.SiLU, bn_eps=1e-3)]
        for t, k, s, co, n in setting:
            oup = make_divisible(co * width_mult, 8)
            for i in range(int(math.ceil(n * depth_mult))):
                feats.append(MBConv(c, oup, k, s if i == 0 else 1, t))
                c = oup
        head_c = make_divisible(head * width_mult, 8) if head else 4 * c
        feats.append(ConvBNAct(c, head_c, 1, act=nn.SiLU, bn_eps=1e-3))
        self.features = nn.Sequential(*feats)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(head_c, num_classes)

    def forward(self, x):
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


def efficientnet_b0(**kw) -> EfficientNet:
    return EfficientNet(**kw)


# --------------------------------------------------------------------------------------------
# DenseNet
# --------------------------------------------------------------------------------------------
class _DenseLayer(nn.Module):
    def __init__(self, cin, growth, bn_size):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, 1, 1, bias=False)

    def forward(self, feats: list[torch.Tensor]):
        x = torch.cat(feats, 1)  # pre-activation BN right after a Concat
        x = self.conv1(F.relu(self.norm1(x)))
        return self.conv2(F.relu(self.norm2(x)))


class _DenseBlock(nn.Module):
    def __init__(self, n, cin, growth, bn_size):
        super().__init__()
        self.layers = nn.ModuleList(_DenseLayer(cin + i * growth, growth, bn_size)
                                    for i in range(n))

    def forward(self, x):
        feats = [x]
        for layer in self.layers:
            feats.append(layer(feats))
        return torch.cat(feats, 1)


class DenseNet(nn.Module):
    """torchvision DenseNet layout (BN-ReLU-Conv pre-activation, concat chains, transitions with
    avg-pool). Full DenseNet-121: ``DenseNet(32, (6, 12, 24, 16), 64, 4, stem="imagenet")``."""

    def __init__(self, growth: int = 32, block_config: Sequence[int] = (6, 12, 24, 16),
                 init_features: int = 64, bn_size: int = 4, num_classes: int = 1000,
                 in_ch: int = 3, stem: str = "imagenet"):
        super().__init__()
        if stem == "imagenet":
            self.stem = nn.Sequential(nn.Conv2d(in_ch, init_features, 7, 2, 3, bias=False),
                                      nn.BatchNorm2d(init_features), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(3, 2, 1))
        else:
            self.stem = nn.Sequential(nn.Conv2d(in_ch, init_features, 3, 1, 1, bias=False),
                                      nn.BatchNorm2d(init_features), nn.ReLU(inplace=True))
        blocks: list[nn.Module] = []
        c = init_features
        for i, n in enumerate(block_config):
            blocks.append(_DenseBlock(n, c, growth, bn_size))
            c += n * growth
            if i != len(block_config) - 1:
                blocks.append(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                                            nn.Conv2d(c, c // 2, 1, bias=False),
                                            nn.AvgPool2d(2, 2)))
                c //= 2
        self.blocks = nn.Sequential(*blocks)
        self.norm5 = nn.BatchNorm2d(c)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        x = F.relu(self.norm5(self.blocks(self.stem(x))))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.classifier(x)


# --------------------------------------------------------------------------------------------
# Inception
# --------------------------------------------------------------------------------------------
class InceptionBlock(nn.Module):
    """Four parallel branches concatenated: 1x1 | 1x1->3x3 | 1x1->1x3->3x1 | maxpool->1x1."""

    def __init__(self, cin, c1, c3r, c3, c5r, c5, pool_proj):
        super().__init__()
        self.b1 = ConvBNAct(cin, c1, 1)
        self.b2 = nn.Sequential(ConvBNAct(cin, c3r, 1), ConvBNAct(c3r, c3, 3))
        self.b3 = nn.Sequential(ConvBNAct(cin, c5r, 1), ConvBNAct(c5r, c5, (1, 3)),
                                ConvBNAct(c5, c5, (3, 1)))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), ConvBNAct(cin, pool_proj, 1))
        self.out_channels = c1 + c3 + c5 + pool_proj

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


class ReductionBlock(nn.Module):
    """Inception reduction: strided conv branches concatenated with a max-pooled pass-through
    of the input (so the input's own channels reappear in the concat)."""

    def __init__(self, cin, c3, c5r, c5):
        super().__init__()
        self.b1 = ConvBNAct(cin, c3, 3, 2)
        self.b2 = nn.Sequential(ConvBNAct(cin, c5r, 1), ConvBNAct(c5r, c5, 3),
                                ConvBNAct(c5, c5, 3, 2))
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.out_channels = c3 + c5 + cin

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.pool(x)], 1)


class InceptionNet(nn.Module):
    """Small GoogLeNet / Inception-v3 style network; ``width`` scales every branch."""

    def __init__(self, width: int = 8, num_classes: int = 10, in_ch: int = 3,
                 n_blocks: int = 2):
        super().__init__()
        w = width
        self.stem = nn.Sequential(ConvBNAct(in_ch, w, 3, 1), ConvBNAct(w, 2 * w, 3, 1),
                                  nn.MaxPool2d(3, 2, 1))
        blocks: list[nn.Module] = []
        c = 2 * w
        for i in range(n_blocks):
            blk = InceptionBlock(c, w, w, 2 * w, w // 2 or 1, w, w // 2 or 1)
            blocks.append(blk)
            c = blk.out_channels
            if i == 0:
                red = ReductionBlock(c, 2 * w, w, w)
                blocks.append(red)
                c = red.out_channels
        self.blocks = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# --------------------------------------------------------------------------------------------
# ShuffleNetV2
# --------------------------------------------------------------------------------------------
def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(b, -1, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, inp, oup, stride):
        super().__init__()
        self.stride = stride
        bf = oup // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False), nn.BatchNorm2d(inp),
                nn.Conv2d(inp, bf, 1, bias=False), nn.BatchNorm2d(bf), nn.ReLU(inplace=True))
        else:
            self.branch1 = nn.Sequential()
        cin2 = inp if stride > 1 else bf
        self.branch2 = nn.Sequential(
            nn.Conv2d(cin2, bf, 1, bias=False), nn.BatchNorm2d(bf), nn.ReLU(inplace=True),
            nn.Conv2d(bf, bf, 3, stride, 1, groups=bf, bias=False), nn.BatchNorm2d(bf),
            nn.Conv2d(bf, bf, 1, bias=False), nn.BatchNorm2d(bf), nn.ReLU(inplace=True))

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    """torchvision ShuffleNetV2. Full x1.0: ``ShuffleNetV2((4, 8, 4), (24, 116, 232, 464, 1024))``.
    ``maxpool=False`` drops the stem max-pool (for tiny inputs)."""

    def __init__(self, stages_repeats: Sequence[int] = (4, 8, 4),
                 stages_out_channels: Sequence[int] = (24, 116, 232, 464, 1024),
                 num_classes: int = 1000, in_ch: int = 3, maxpool: bool = True):
        super().__init__()
        c = stages_out_channels[0]
        self.conv1 = ConvBNAct(in_ch, c, 3, 2)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if maxpool else nn.Identity()
        stages = []
        for n, oc in zip(stages_repeats, stages_out_channels[1:]):
            units = [ShuffleUnit(c, oc, 2)] + [ShuffleUnit(oc, oc, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*units))
            c = oc
        self.stages = nn.Sequential(*stages)
        self.conv5 = ConvBNAct(c, stages_out_channels[-1], 1)
        self.fc = nn.Linear(stages_out_channels[-1], num_classes)

    def forward(self, x):
        x = self.conv5(self.stages(self.maxpool(self.conv1(x))))
        x = x.mean([2, 3])
        return self.fc(x)


def shufflenet_v2_x1_0(**kw) -> ShuffleNetV2:
    return ShuffleNetV2(**kw)


# --------------------------------------------------------------------------------------------
# RegNet (Y flavour: grouped 3x3 + SE)
# --------------------------------------------------------------------------------------------
class RegNetBlock(nn.Module):
    def __init__(self, cin, cout, stride, group_width, se_ratio=0.25):
        super().__init__()
        groups = max(1, cout // group_width)
        self.a = ConvBNAct(cin, cout, 1)
        self.b = ConvBNAct(cout, cout, 3, stride, groups=groups)
        self.se = SqueezeExcite(cout, max(1, int(round(cin * se_ratio))), act=nn.ReLU) \
            if se_ratio else nn.Identity()
        self.c = ConvBNAct(cout, cout, 1, act=None)
        self.proj = ConvBNAct(cin, cout, 1, stride, act=None) \
            if (stride != 1 or cin != cout) else None
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        sc = x if self.proj is None else self.proj(x)
        return self.relu(sc + self.c(self.se(self.b(self.a(x)))))


class RegNet(nn.Module):
    """RegNetY-style: stem 3x3/2, stages of blocks with grouped 3x3 convs (``group_width``
    channels per group) and squeeze-excite. RegNetY-400MF-ish full size:
    ``RegNet(widths=(48, 104, 208, 440), depths=(1, 3, 6, 6), group_width=8)``."""

    def __init__(self, widths: Sequence[int] = (48, 104, 208, 440),
                 depths: Sequence[int] = (1, 3, 6, 6), group_width: int = 8, stem: int = 32,
                 se_ratio: float = 0.25, num_classes: int = 1000, in_ch: int = 3):
        super().__init__()
        self.stem = ConvBNAct(in_ch, stem, 3, 2)
        c = stem
        stages = []
        for w, d in zip(widths, depths):
            blocks = [RegNetBlock(c if i == 0 else w, w, 2 if i == 0 else 1, group_width,
                                  se_ratio) for i in range(d)]
            stages.append(nn.Sequential(*blocks))
            c = w
        self.trunk = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.trunk(self.stem(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# --------------------------------------------------------------------------------------------
# UNet
# --------------------------------------------------------------------------------------------
class DoubleConv(nn.Sequential):
    def __init__(self, cin, cout):
        super().__init__(ConvBNAct(cin, cout, 3), ConvBNAct(cout, cout, 3))


class UNet(nn.Module):
    """UNet with skip concats. Decoder level i (deepest first) upsamples with
    ``up_modes[i % len(up_modes)]``: "transpose" (ConvTranspose2d 2x2/2), "bilinear"
    (nn.Upsample -> Resize linear, then a 1x1 conv halving channels) or "nearest"
    (F.interpolate -> Resize nearest, then a 1x1 conv). Output: per-pixel class logits."""

    def __init__(self, in_ch: int = 3, num_classes: int = 2, base: int = 64, depth: int = 4,
                 up_modes: Sequence[str] = ("transpose", "bilinear", "nearest")):
        super().__init__()
        chs = [base * 2 ** i for i in range(depth + 1)]
        self.inc = DoubleConv(in_ch, chs[0])
        self.downs = nn.ModuleList(DoubleConv(chs[i], chs[i + 1]) for i in range(depth))
        self.pool = nn.MaxPool2d(2)
        self.up_modes = [up_modes[i % len(up_modes)] for i in range(depth)]
        self.ups = nn.ModuleList()
        self.decs = nn.ModuleList()
        for i, mode in enumerate(self.up_modes):
            cin, cout = chs[depth - i], chs[depth - i - 1]
            if mode == "transpose":
                up = nn.ConvTranspose2d(cin, cout, 2, stride=2)
            elif mode == "bilinear":
                up = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear",
                                               align_corners=False),
                                   nn.Conv2d(cin, cout, 1))
            elif mode == "nearest":
                up = nn.Conv2d(cin, cout, 1)  # interpolation done in forward (F.interpolate)
            else:
                raise ValueError(mode)
            self.ups.append(up)
            self.decs.append(DoubleConv(2 * cout, cout))
        self.outc = nn.Conv2d(chs[0], num_classes, 1)

    def forward(self, x):
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(self.pool(skips[-1])))
        x = skips.pop()
        for mode, up, dec in zip(self.up_modes, self.ups, self.decs):
            if mode == "nearest":
                x = up(F.interpolate(x, scale_factor=2.0, mode="nearest"))
            else:
                x = up(x)
            x = dec(torch.cat([skips.pop(), x], 1))
        return self.outc(x)


# --------------------------------------------------------------------------------------------
# ConvNeXt
# --------------------------------------------------------------------------------------------
class LayerNorm2d(nn.LayerNorm):
    """Channels-first LayerNorm as torchvision does it: permute to NHWC, LayerNorm, permute
    back."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = super().forward(x)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """Original ConvNeXt block: dw7x7 -> NHWC -> LayerNorm -> Linear(4C) -> GELU -> Linear(C)
    -> gamma * x (layer scale, broadcast on the *last* axis) -> NCHW -> residual add."""

    def __init__(self, dim, layer_scale_init=1e-6, mlp_ratio=4):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, mlp_ratio * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(mlp_ratio * dim, dim)
        self.gamma = nn.Parameter(layer_scale_init * torch.ones(dim))

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        y = self.gamma * y
        return x + y.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    """ConvNeXt. Full ConvNeXt-T: ``ConvNeXt(dims=(96, 192, 384, 768), depths=(3, 3, 9, 3))``.
    No BatchNorm anywhere (train-mode exports equal eval-mode ones)."""

    def __init__(self, dims: Sequence[int] = (96, 192, 384, 768),
                 depths: Sequence[int] = (3, 3, 9, 3), num_classes: int = 1000, in_ch: int = 3,
                 layer_scale_init: float = 1e-6):
        super().__init__()
        self.downsample = nn.ModuleList()
        self.downsample.append(nn.Sequential(nn.Conv2d(in_ch, dims[0], 4, 4),
                                             LayerNorm2d(dims[0], eps=1e-6)))
        for i in range(len(dims) - 1):
            self.downsample.append(nn.Sequential(LayerNorm2d(dims[i], eps=1e-6),
                                                 nn.Conv2d(dims[i], dims[i + 1], 2, 2)))
        self.stages = nn.ModuleList(
            nn.Sequential(*[ConvNeXtBlock(d, layer_scale_init) for _ in range(n)])
            for d, n in zip(dims, depths))
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x):
        for down, stage in zip(self.downsample, self.stages):
            x = stage(down(x))
        return self.head(self.norm(x.mean([-2, -1])))


def convnext_tiny(**kw) -> ConvNeXt:
    return ConvNeXt(**kw)


# --------------------------------------------------------------------------------------------
# YOLO (v8 style)
# --------------------------------------------------------------------------------------------
class YConv(ConvBNAct):
    def __init__(self, cin, cout, k=1, s=1):
        super().__init__(cin, cout, k, s, act=nn.SiLU, bn_eps=1e-3)


class YBottleneck(nn.Module):
    def __init__(self, c1, c2, shortcut=True):
        super().__init__()
        self.cv1 = YConv(c1, c2, 3)
        self.cv2 = YConv(c2, c2, 3)
        self.add = shortcut and c1 == c2

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """cv1 -> split in two halves -> chain of bottlenecks on the second half, every
    intermediate kept -> concat all -> cv2."""

    def __init__(self, c1, c2, n=1, shortcut=False):
        super().__init__()
        self.c = c2 // 2
        self.cv1 = YConv(c1, 2 * self.c, 1)
        self.cv2 = YConv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(YBottleneck(self.c, self.c, shortcut) for _ in range(n))

    def forward(self, x):
        y = list(self.cv1(x).split((self.c, self.c), 1))
        for m in self.m:
            y.append(m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, c1, c2, k=5):
        super().__init__()
        c_ = c1 // 2
        self.cv1 = YConv(c1, c_, 1)
        self.cv2 = YConv(4 * c_, c2, 1)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x):
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat([x, y1, y2, self.m(y2)], 1))


class PSAAttention(nn.Module):
    """YOLO11's (and YOLOv10's) attention on a feature map: one 1x1 conv packs q, k and v of every
    head ([B, heads * (2 key_dim + head_dim), H, W]), viewed as [B, heads, 2 key_dim + head_dim, H*W]
    and split; the merged heads are viewed back with the input's own channel count, read off its
    shape, and a depthwise 3x3 positional term on v is added before the output projection."""

    def __init__(self, dim: int, num_heads: int, attn_ratio: float = 0.5):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.key_dim = int(self.head_dim * attn_ratio)
        self.scale = self.key_dim ** -0.5
        self.qkv = ConvBNAct(dim, dim + 2 * self.key_dim * num_heads, 1, act=None, bn_eps=1e-3)
        self.proj = ConvBNAct(dim, dim, 1, act=None, bn_eps=1e-3)
        self.pe = ConvBNAct(dim, dim, 3, groups=dim, act=None, bn_eps=1e-3)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(x).view(B, self.num_heads, self.key_dim * 2 + self.head_dim, H * W).split(
            [self.key_dim, self.key_dim, self.head_dim], dim=2)
        attn = ((q.transpose(-2, -1) @ k) * self.scale).softmax(dim=-1)
        x = (v @ attn.transpose(-2, -1)).view(B, C, H, W) + self.pe(v.reshape(B, C, H, W))
        return self.proj(x)


class C2PSA(nn.Module):
    """YOLO11's C2PSA: cv1 -> halves; the second through n blocks of attention + 1x1 MLP, each with
    its residual -> concat -> cv2. ``num_heads`` None: YOLO11's channels // 64."""

    def __init__(self, c: int, n: int = 1, num_heads: int | None = None):
        super().__init__()
        self.c = c // 2
        heads = num_heads or max(1, self.c // 64)
        self.cv1, self.cv2 = YConv(c, 2 * self.c, 1), YConv(2 * self.c, c, 1)
        self.attn = nn.ModuleList(PSAAttention(self.c, heads) for _ in range(n))
        self.ffn = nn.ModuleList(nn.Sequential(YConv(self.c, 2 * self.c, 1),
                                               ConvBNAct(2 * self.c, self.c, 1, act=None, bn_eps=1e-3))
                                 for _ in range(n))

    def forward(self, x):
        a, b = self.cv1(x).split((self.c, self.c), dim=1)
        for attn, ffn in zip(self.attn, self.ffn):
            b = b + attn(b)
            b = b + ffn(b)
        return self.cv2(torch.cat((a, b), 1))


class YOLO(nn.Module):
    """YOLOv8-style detector: backbone of strided convs + C2f, SPPF, PAN neck (nearest upsample
    + concat, strided conv + concat), one head per scale. ``forward`` returns a tuple of
    ``n_outputs`` (2 or 3) maps at strides 8, 16(, 32), each with ``num_outputs`` channels.

    ``depth``: int d -> backbone C2f repeats (d, 2d, 2d, d) and neck repeats d (YOLOv8 layout),
    or a 4-tuple of backbone repeats (neck repeats = 1). ``head_conv``: a 3x3 Conv-BN-SiLU before
    each head's 1x1 conv. ``width=16, depth=1`` is YOLOv8n-like. ``psa_heads``: a C2PSA attention
    block with that many heads after the SPPF, as YOLO11 has (0: none).
    """

    def __init__(self, width: int = 16, depth: int | Sequence[int] = 1, num_outputs: int = 16,
                 in_ch: int = 3, n_outputs: int = 3, head_conv: bool = True, psa_heads: int = 0):
        super().__init__()
        w = width
        if isinstance(depth, int):
            db, dn = (depth, 2 * depth, 2 * depth, depth), depth
        else:
            db, dn = tuple(depth), 1
        self.n_outputs = n_outputs
        self.b0 = YConv(in_ch, w, 3, 2)                                                 # /2
        self.b1 = nn.Sequential(YConv(w, 2 * w, 3, 2), C2f(2 * w, 2 * w, db[0], True))      # /4
        self.b2 = nn.Sequential(YConv(2 * w, 4 * w, 3, 2), C2f(4 * w, 4 * w, db[1], True))  # P3
        self.b3 = nn.Sequential(YConv(4 * w, 8 * w, 3, 2), C2f(8 * w, 8 * w, db[2], True))  # P4
        self.b4 = nn.Sequential(YConv(8 * w, 16 * w, 3, 2), C2f(16 * w, 16 * w, db[3], True),
                                SPPF(16 * w, 16 * w),
                                *([C2PSA(16 * w, num_heads=psa_heads)] if psa_heads else []))  # P5
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.n4 = C2f(24 * w, 8 * w, dn)
        self.n3 = C2f(12 * w, 4 * w, dn)
        self.d3 = YConv(4 * w, 4 * w, 3, 2)
        self.n4b = C2f(12 * w, 8 * w, dn)
        heads = [(4 * w), (8 * w)]
        if n_outputs == 3:
            self.d4 = YConv(8 * w, 8 * w, 3, 2)
            self.n5b = C2f(24 * w, 16 * w, dn)
            heads.append(16 * w)
        elif n_outputs != 2:
            raise ValueError("n_outputs must be 2 or 3")
        self.heads = nn.ModuleList(
            nn.Sequential(*([YConv(c, c, 3)] if head_conv else []), nn.Conv2d(c, num_outputs, 1))
            for c in heads)

    def forward(self, x):
        p3 = self.b2(self.b1(self.b0(x)))
        p4 = self.b3(p3)
        p5 = self.b4(p4)
        n4 = self.n4(torch.cat([self.up(p5), p4], 1))
        o3 = self.n3(torch.cat([self.up(n4), p3], 1))
        o4 = self.n4b(torch.cat([self.d3(o3), n4], 1))
        feats = [o3, o4]
        if self.n_outputs == 3:
            feats.append(self.n5b(torch.cat([self.d4(o4), p5], 1)))
        return tuple(h(f) for h, f in zip(self.heads, feats))


# --------------------------------------------------------------------------------------------
# 1-D conv net
# --------------------------------------------------------------------------------------------
class Conv1dNet(nn.Module):
    """Conv1d + BatchNorm1d + ReLU + MaxPool1d stages, one residual 1-D block, AvgPool1d,
    global average pool, Flatten, MLP head. Input [N, in_ch, length]."""

    def __init__(self, in_ch: int = 1, width: int = 8, num_classes: int = 10, hidden: int = 32):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv1d(in_ch, w, 5, padding=2, bias=False),
                                  nn.BatchNorm1d(w), nn.ReLU(inplace=True), nn.MaxPool1d(2))
        self.conv2 = nn.Sequential(nn.Conv1d(w, 2 * w, 3, padding=1, bias=False),
                                   nn.BatchNorm1d(2 * w), nn.ReLU(inplace=True),
                                   nn.AvgPool1d(2))
        self.res = nn.Sequential(nn.Conv1d(2 * w, 2 * w, 3, padding=1, bias=False),
                                 nn.BatchNorm1d(2 * w), nn.ReLU(inplace=True),
                                 nn.Conv1d(2 * w, 2 * w, 3, padding=1, bias=False),
                                 nn.BatchNorm1d(2 * w))
        self.conv3 = nn.Sequential(nn.Conv1d(2 * w, 4 * w, 3, stride=2, padding=1),
                                   nn.BatchNorm1d(4 * w), nn.ReLU(inplace=True))
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Sequential(nn.Linear(4 * w, hidden), nn.ReLU(inplace=True),
                                  nn.Linear(hidden, num_classes))

    def forward(self, x):
        x = self.conv2(self.stem(x))
        x = F.relu(x + self.res(x))
        x = self.conv3(x)
        return self.head(torch.flatten(self.pool(x), 1))
