"""The conformance suite every backend plugin runs against itself.

Subclass :class:`BackendConformance` in the plugin's tests and say how to build its quantizer::

    # plugins/mybackend/tests/test_conformance.py
    from qcore.testing.conformance import BackendConformance

    class TestMyBackendConformance(BackendConformance):
        backend = "mybackend"

        def make_quantizer(self):
            return MyQuantizer().set_global(my_default_config())

pytest collects the inherited tests: the backend registers through its entry point, annotates a
small CNN and MLP, never re-annotates, and prepare/convert round-trips with SQNR above
``min_sqnr_db``; if the backend has lowering passes, the lowered model agrees with the
converted one.
"""

from __future__ import annotations

from typing import Any

import torch

from qcore.annotation import ANNOTATION_KEY


class SmallCNN(torch.nn.Module):
    """conv-relu, conv-relu, max_pool2d, adaptive_avg_pool2d, linear: the ops every int8 backend covers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, padding=1)
        self.pool = torch.nn.MaxPool2d(2)
        self.avg = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.fc(torch.flatten(self.avg(x), 1))

    @staticmethod
    def example_inputs() -> tuple:
        return (torch.randn(2, 3, 16, 16),)


class SmallMLP(torch.nn.Module):
    """Three linear layers with ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    @staticmethod
    def example_inputs() -> tuple:
        return (torch.randn(8, 32),)


def sqnr_db(reference: torch.Tensor, actual: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``actual`` against ``reference``, in dB."""
    noise = (reference.float() - actual.float()).pow(2).mean()
    signal = reference.float().pow(2).mean()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(signal / noise))


def _annotation_snapshot(gm: torch.fx.GraphModule) -> dict:
    out = {}
    for node in gm.graph.nodes:
        annotation = node.meta.get(ANNOTATION_KEY)
        if annotation is not None:
            out[node.name] = (
                tuple((k.name, id(v)) for k, v in annotation.input_qspec_map.items()),
                id(annotation.output_qspec),
                annotation._annotated,
            )
    return out


def quantize_for_test(model: torch.nn.Module, quantizer: Any, example_inputs: tuple, batches: int = 4) -> tuple:
    """Export, prepare, calibrate on random batches shaped like ``example_inputs``, convert."""
    import qcore

    torch.manual_seed(0)
    exported = torch.export.export(model, example_inputs).module()
    prepared = qcore.prepare_pt2e(exported, quantizer)
    for _ in range(batches):
        prepared(*[torch.randn_like(t) for t in example_inputs])
    prepared(*example_inputs)
    return exported, prepared, qcore.convert_pt2e(prepared)


class BackendConformance:
    """Inherit in a plugin's tests; set ``backend`` and implement ``make_quantizer``."""

    backend: str = ""
    min_sqnr_db: float = 25.0
    models: tuple = (SmallCNN, SmallMLP)

    def make_quantizer(self) -> Any:  # pragma: no cover - the subclass says
        raise TypeError(f"{type(self).__name__} must implement make_quantizer()")

    # -- tests ---------------------------------------------------------------------------
    def test_backend_registers_through_its_entry_point(self) -> None:
        from qcore.plugin_manager import get_plugin_manager

        record = get_plugin_manager().get_backend(self.backend)
        assert record.name == self.backend
        assert record.distribution, "the backend record names its distribution"
        assert isinstance(self.make_quantizer(), record.quantizer_class)

    def test_annotates_the_small_cnn_and_mlp(self) -> None:
        import qcore

        for model_cls in self.models:
            model = model_cls().eval()
            exported = torch.export.export(model, model_cls.example_inputs()).module()
            prepared = qcore.prepare_pt2e(exported, self.make_quantizer())
            coverage = prepared.meta["qcore_coverage"]
            assert coverage.by_op.get("linear", (0, 0))[0] >= 1, coverage.summary()
            if model_cls is SmallCNN:
                assert coverage.by_op.get("conv", (0, 0))[0] == 2, coverage.summary()

    def test_never_re_annotates(self) -> None:
        for model_cls in self.models:
            exported = torch.export.export(model_cls().eval(), model_cls.example_inputs()).module()
            quantizer = self.make_quantizer()
            exported = quantizer.transform_for_annotation(exported)
            quantizer.annotate(exported)
            first = _annotation_snapshot(exported)
            assert first, "the backend annotated nothing"
            quantizer.annotate(exported)  # a second run must leave every annotation as it was
            assert _annotation_snapshot(exported) == first

    def test_prepare_convert_round_trip_keeps_accuracy(self) -> None:
        for model_cls in self.models:
            torch.manual_seed(0)
            model = model_cls().eval()
            example = model_cls.example_inputs()
            _, _, converted = quantize_for_test(model, self.make_quantizer(), example)
            with torch.no_grad():
                reference, actual = model(*example), converted(*example)
            assert sqnr_db(reference, actual) >= self.min_sqnr_db, (model_cls.__name__, sqnr_db(reference, actual))

    def test_lowering_agrees_with_the_converted_model(self) -> None:
        import qcore
        from qcore.plugin_manager import get_plugin_manager

        if not get_plugin_manager().lowering_passes(self.backend):
            return
        for model_cls in self.models:
            torch.manual_seed(0)
            model = model_cls().eval()
            example = model_cls.example_inputs()
            _, _, converted = quantize_for_test(model, self.make_quantizer(), example)
            lowered = qcore.lower(converted, backend=self.backend, example_inputs=example)
            with torch.no_grad():
                reference, actual = converted(*example), lowered(*example)
            assert sqnr_db(reference, actual) >= 30.0, (model_cls.__name__, sqnr_db(reference, actual))
