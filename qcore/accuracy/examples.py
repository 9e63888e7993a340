"""Small models where plain calibration loses accuracy, for the tests, the bench and the README.

:class:`OutlierMLP` is a transformer MLP block (LayerNorm -> linear -> GELU -> linear, with
the residual) between an input projection and a classifier head. Its LayerNorm output has
:data:`OUTLIER_CHANNELS` (4 of 256) channels scaled 50x, as large transformers have: the
LayerNorm's gain is 50 there and the next linear's weight columns are 1/50 there, so the
float function is that of a model without outliers, but one per-tensor int8 scale for the
LayerNorm output must cover values 50x larger than most of its channels carry.

:class:`OutlierTransformer` stacks such blocks (smaller: 128 channels, 4 of them outliers)
with a different outlier scale in each (default 50x, none, 20x): 8 linears, two of them
(``blocks.0.fc1`` and ``blocks.2.fc1``) sensitive, the second only once the first is float,
because the first one's error hides it. Greedy search must re-measure to find it.

>>> import torch
>>> OutlierMLP()(torch.randn(2, 64)).shape
torch.Size([2, 10])
>>> OutlierTransformer()(torch.randn(2, 64)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

import torch

__all__ = ["OutlierMLP", "OutlierTransformer", "OUTLIER_CHANNELS", "OUTLIER_SCALE", "outlier_mlp_data"]

OUTLIER_CHANNELS = (3, 70, 150, 201)
OUTLIER_SCALE = 50.0


class OutlierMLP(torch.nn.Module):
    """proj -> [LayerNorm (4 outlier channels) -> fc1 -> GELU -> fc2] + residual -> head; 4 linears."""

    def __init__(self, d_in: int = 64, d_model: int = 256, d_hidden: int = 1024, d_out: int = 10, seed: int = 0) -> None:
        super().__init__()
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.proj = torch.nn.Linear(d_in, d_model)
        self.norm = torch.nn.LayerNorm(d_model)
        self.fc1 = torch.nn.Linear(d_model, d_hidden)
        self.act = torch.nn.GELU()
        self.fc2 = torch.nn.Linear(d_hidden, d_model)
        self.head = torch.nn.Linear(d_model, d_out)
        with torch.no_grad():
            self.norm.bias.normal_(0.0, 0.1)
        torch.random.set_rng_state(generator_state)  # the same weights in every process, the caller's RNG untouched
        channels = list(OUTLIER_CHANNELS)
        with torch.no_grad():
            self.norm.weight[channels] *= OUTLIER_SCALE
            self.norm.bias[channels] *= OUTLIER_SCALE
            self.fc1.weight[:, channels] /= OUTLIER_SCALE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        h = h + self.fc2(self.act(self.fc1(self.norm(h))))
        return self.head(h)


class OutlierBlock(torch.nn.Module):
    """``h + fc2(gelu(fc1(norm(h))))`` with ``channels`` of the LayerNorm output scaled ``scale``x
    (the gain and bias there times ``scale``, fc1's columns there divided by it)."""

    def __init__(self, d_model: int, d_hidden: int, scale: float, channels: tuple) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(d_model)
        self.fc1 = torch.nn.Linear(d_model, d_hidden)
        self.act = torch.nn.GELU()
        self.fc2 = torch.nn.Linear(d_hidden, d_model)
        self.scale = float(scale)
        self.channels = tuple(channels)
        with torch.no_grad():
            self.norm.bias.normal_(0.0, 0.1)

    def add_outliers(self) -> None:
        channels = list(self.channels)
        with torch.no_grad():
            self.norm.weight[channels] *= self.scale
            self.norm.bias[channels] *= self.scale
            self.fc1.weight[:, channels] /= self.scale

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(self.act(self.fc1(self.norm(h))))


class OutlierTransformer(torch.nn.Module):
    """proj -> one :class:`OutlierBlock` per entry of ``scales`` (1.0: no outliers) -> head; 2 + 2 * len(scales) linears."""

    def __init__(self, scales: tuple = (50.0, 1.0, 20.0), d_in: int = 64, d_model: int = 128, d_hidden: int = 256,
                 d_out: int = 10, channels: tuple = (3, 40, 77, 101), seed: int = 0) -> None:
        super().__init__()
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.proj = torch.nn.Linear(d_in, d_model)
        blocks = [OutlierBlock(d_model, d_hidden, scale, channels) for scale in scales]
        self.blocks = torch.nn.ModuleList(blocks)
        self.head = torch.nn.Linear(d_model, d_out)
        torch.random.set_rng_state(generator_state)
        for block in blocks:
            block.add_outliers()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def outlier_mlp_data(batches: int = 8, batch_size: int = 16, seed: int = 1) -> list:
    """``batches`` calibration batches ``(x,)`` of shape (batch_size, 64)."""
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch_size, 64, generator=generator),) for _ in range(batches)]
