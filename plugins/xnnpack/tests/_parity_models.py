"""The models the XNNPACK issue names: a CNN (conv-bn-relu blocks, residual add, max_pool2d,
adaptive_avg_pool2d, linear), an MLP, a GRU model and a model using cat and mul."""

from __future__ import annotations

import torch


class ConvBnRelu(torch.nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(cin, cout, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(cout)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class CNN(torch.nn.Module):
    """conv-bn-relu blocks, a residual add + relu, max_pool2d, adaptive_avg_pool2d, flatten, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBnRelu(3, 8)
        self.block1 = ConvBnRelu(8, 8)
        self.block2 = ConvBnRelu(8, 8)
        self.pool = torch.nn.MaxPool2d(2)
        self.avg = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.block2(self.block1(x)))
        return self.fc(torch.flatten(self.avg(self.pool(x)), 1))

    @staticmethod
    def folded() -> torch.nn.Module:
        """An eval-mode CNN whose batch norms are folded into the convs (what PTQ expects)."""
        torch.manual_seed(0)
        model = CNN().eval()
        for block in (model.stem, model.block1, model.block2):
            block.bn.running_mean.uniform_(-0.2, 0.2)
            block.bn.running_var.uniform_(0.5, 1.5)
            block.conv = torch.nn.utils.fusion.fuse_conv_bn_eval(block.conv, block.bn)
            block.bn = torch.nn.Identity()
        return model


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)
        )

    def forward(self, x):
        return self.layers(x)


class GRUModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = torch.nn.GRU(4, 8)
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, x, h):
        y, h_n = self.gru(x, h)
        return self.fc(y), h_n


class CatMul(torch.nn.Module):
    """Two cats of conv outputs multiplied, relu, a scalar mul, mean, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = (torch.nn.Conv2d(3, 4, 1) for _ in range(4))
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)
        z = torch.cat([self.c(x), self.d(x)], 1)
        y = torch.relu(y * z) * 0.5
        return self.fc(y.mean((2, 3)))


def _model(name: str) -> tuple:
    torch.manual_seed(0)
    if name == "cnn":
        return CNN.folded(), (torch.randn(2, 3, 16, 16),)
    if name == "cnn_bn":  # batch norms kept: QAT fuses them for training and folds them at convert
        return CNN(), (torch.randn(2, 3, 16, 16),)
    if name == "mlp":
        return MLP().eval(), (torch.randn(4, 16),)
    if name == "gru":
        return GRUModel().eval(), (torch.randn(5, 2, 4), torch.randn(1, 2, 8))
    return CatMul().eval(), (torch.randn(2, 3, 8, 8),)
