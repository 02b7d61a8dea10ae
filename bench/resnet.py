"""A self-built ResNet (torchvision's BasicBlock/Bottleneck structure, downsample branches
included) for tests and CPU benchmarks where torchvision is not installed."""
from torch import nn


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch, width, stride=1, bn=nn.BatchNorm2d):
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = bn(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = bn(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = bn(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False),
                                            bn(out_ch))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
    def __init__(self, layers=(3, 4, 6, 3), widths=(64, 128, 256, 512), num_classes=1000,
                 stem=64, bn=nn.BatchNorm2d):
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem, 7, 2, 3, bias=False)
        self.bn1 = bn(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        blocks, in_ch = [], stem
        for i, (n, w) in enumerate(zip(layers, widths)):
            stage = []
            for j in range(n):
                stage.append(Bottleneck(in_ch, w, 2 if (j == 0 and i > 0) else 1, bn))
                in_ch = w * Bottleneck.expansion
            blocks.append(nn.Sequential(*stage))
        self.stages = len(blocks)
        for i, stage in enumerate(blocks, 1):
            setattr(self, f"layer{i}", stage)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(1, self.stages + 1):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(self.avgpool(x).flatten(1))


def resnet50(**kwargs):
    return ResNet((3, 4, 6, 3), **kwargs)


def tiny_resnet(**kwargs):
    return ResNet((1, 2), widths=(4, 8), stem=8, num_classes=10, **kwargs)
