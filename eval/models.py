"""Models for small images, each with or without batch norm, sized from the input shape:
an MLP, a small CNN, LeNet-5, a small VGG and the CIFAR ResNets (depth 6n + 2: ResNet-20,
-32, -44, -56; He et al. 2016, with 1x1 convolution shortcuts where the shape changes)."""
from __future__ import annotations

import torch
from torch import nn

MODELS = ("mlp", "cnn", "lenet5", "vgg", "resnet20", "resnet32", "resnet44", "resnet56")


def _norm(kind: str, channels: int, batchnorm: bool) -> nn.Module:
    if not batchnorm:
        return nn.Identity()
    return nn.BatchNorm1d(channels) if kind == "1d" else nn.BatchNorm2d(channels)


def _flat_size(features: nn.Module, input_shape: tuple) -> int:
    with torch.no_grad():
        return features.eval()(torch.zeros(1, *input_shape)).numel()


def mlp(input_shape, num_classes, batchnorm) -> nn.Module:
    n_in = int(torch.tensor(input_shape).prod())
    return nn.Sequential(
        nn.Flatten(), nn.Linear(n_in, 256), _norm("1d", 256, batchnorm), nn.ReLU(),
        nn.Linear(256, 128), _norm("1d", 128, batchnorm), nn.ReLU(), nn.Linear(128, num_classes))


def cnn(input_shape, num_classes, batchnorm) -> nn.Module:
    """The default: two 3x3 convolutions and one linear layer; trains in seconds on digits."""
    c = input_shape[0]
    features = nn.Sequential(
        nn.Conv2d(c, 16, 3, padding=1), _norm("2d", 16, batchnorm), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), _norm("2d", 32, batchnorm), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
    return nn.Sequential(features, nn.Linear(_flat_size(features, input_shape), num_classes))


def lenet5(input_shape, num_classes, batchnorm) -> nn.Module:
    """LeNet-5 (6 and 16 5x5 feature maps, 120-84 classifier), padded so that small inputs fit."""
    c = input_shape[0]
    features = nn.Sequential(
        nn.Conv2d(c, 6, 5, padding=2), _norm("2d", 6, batchnorm), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5, padding=2 if min(input_shape[1:]) < 16 else 0), _norm("2d", 16, batchnorm),
        nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
    return nn.Sequential(
        features, nn.Linear(_flat_size(features, input_shape), 120), _norm("1d", 120, batchnorm), nn.ReLU(),
        nn.Linear(120, 84), _norm("1d", 84, batchnorm), nn.ReLU(), nn.Linear(84, num_classes))


def vgg(input_shape, num_classes, batchnorm) -> nn.Module:
    """A small VGG: three blocks of two 3x3 convolutions (32, 64, 128), each block pooled
    while the image is at least 2 pixels wide, then a 256-unit classifier."""
    layers, c, size = [], input_shape[0], min(input_shape[1:])
    for width in (32, 64, 128):
        for _ in range(2):
            layers += [nn.Conv2d(c, width, 3, padding=1), _norm("2d", width, batchnorm), nn.ReLU()]
            c = width
        if size >= 2:
            layers.append(nn.MaxPool2d(2))
            size //= 2
    features = nn.Sequential(*layers, nn.Flatten())
    return nn.Sequential(features, nn.Linear(_flat_size(features, input_shape), 256),
                         _norm("1d", 256, batchnorm), nn.ReLU(), nn.Linear(256, num_classes))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, batchnorm: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=not batchnorm)
        self.bn1 = _norm("2d", c_out, batchnorm)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=not batchnorm)
        self.bn2 = _norm("2d", c_out, batchnorm)
        self.relu = nn.ReLU()
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=not batchnorm),
                                          _norm("2d", c_out, batchnorm))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, depth: int, input_shape, num_classes, batchnorm) -> None:
        super().__init__()
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(input_shape[0], 16, 3, 1, 1, bias=not batchnorm),
                                  _norm("2d", 16, batchnorm), nn.ReLU())
        blocks, c = [], 16
        for stage, width in enumerate((16, 32, 64)):
            for i in range(n):
                blocks.append(BasicBlock(c, width, 2 if stage > 0 and i == 0 else 1, batchnorm))
                c = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


def build_model(name: str, input_shape: tuple, num_classes: int, batchnorm: bool = False) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"model = {name!r} is invalid: expected one of {', '.join(MODELS)}")
    if name.startswith("resnet"):
        return ResNet(int(name[6:]), input_shape, num_classes, batchnorm)
    return {"mlp": mlp, "cnn": cnn, "lenet5": lenet5, "vgg": vgg}[name](input_shape, num_classes, batchnorm)
