"""Old-flow code ports by changing imports: torchao's own quantizer runs through qcore's verbs,
and qcore's result matches torchao's (same q/dq counts, outputs within one quantization step)."""

from __future__ import annotations

import warnings

import pytest
import torch

import qcore
from qcore.testing.conformance import sqnr_db

pytestmark = pytest.mark.torchao
torchao = pytest.importorskip("torchao")

from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e as ao_convert_pt2e  # noqa: E402
from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e as ao_prepare_pt2e  # noqa: E402
from torchao.testing.pt2e._xnnpack_quantizer import (  # noqa: E402
    XNNPACKQuantizer as AoXNNPACKQuantizer,
    get_symmetric_quantization_config as ao_config,
)

QDQ_PREFIXES = ("quantize_per", "dequantize_per", "choose_qparams")


class CNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.pool = torch.nn.MaxPool2d(2)
        self.avg = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        y = torch.relu(self.conv1(x))
        y = torch.relu(self.conv2(y)) + y
        y = self.avg(self.pool(y))
        return self.fc(torch.flatten(y, 1))


def mlp():
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


def qdq_counts(gm):
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        name = getattr(node.target, "__name__", "")
        if node.op == "call_function" and name.startswith(QDQ_PREFIXES):
            counts[name] = counts.get(name, 0) + 1
    return counts


def output_scale(gm) -> float:
    output = next(n for n in gm.graph.nodes if n.op == "output")
    producer = output.args[0][0] if isinstance(output.args[0], (tuple, list)) else output.args[0]
    return float(producer.args[1])


def both_flows(model, example, quantizer):
    torch.manual_seed(1)
    calibration = [tuple(torch.randn_like(t) for t in example) for _ in range(4)] + [example]
    results = []
    for prepare, convert in ((qcore.prepare_pt2e, qcore.convert_pt2e), (ao_prepare_pt2e, ao_convert_pt2e)):
        exported = torch.export.export(model, example).module()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepared = prepare(exported, quantizer)
            structure = [(n.op, str(n.target)) for n in prepared.graph.nodes]
            for batch in calibration:
                prepared(*batch)
            results.append((structure, convert(prepared)))  # torchao converts in place
    return results


GEN = torch.Generator().manual_seed(2)
EXAMPLES = {"cnn": (torch.randn(2, 3, 16, 16, generator=GEN),), "mlp": (torch.randn(8, 16, generator=GEN),)}


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("make_model,example", [(CNN, EXAMPLES["cnn"]), (mlp, EXAMPLES["mlp"])], ids=["cnn", "mlp"])
def test_torchao_quantizer_through_qcore_matches_torchao(make_model, example, per_channel):
    torch.manual_seed(0)
    model = make_model().eval()
    quantizer = AoXNNPACKQuantizer().set_global(ao_config(is_per_channel=per_channel))
    (q_prepared, q_converted), (a_prepared, a_converted) = both_flows(model, example, quantizer)
    assert q_prepared == a_prepared  # the same observers in the same places
    assert qdq_counts(q_converted) == qdq_counts(a_converted)
    with torch.no_grad():
        ours, theirs, reference = q_converted(*example), a_converted(*example), model(*example)
    step = output_scale(a_converted)
    assert (ours - theirs).abs().max().item() <= step * 1.001
    assert sqnr_db(reference, ours) >= 30
