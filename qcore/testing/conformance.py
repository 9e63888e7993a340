"""The conformance suite every backend plugin runs against itself.

Subclass :class:`BackendConformance` in the plugin's tests and name the backend::

    # plugins/mybackend/tests/test_conformance.py
    from qcore.testing.conformance import BackendConformance

    class TestMyBackendConformance(BackendConformance):
        backend = "mybackend"

pytest collects the inherited tests: the backend registers through its entry point, its
quantizer's ``default_config()`` gives PTQ and QAT configs, it annotates a small CNN and MLP,
never re-annotates, prepare/convert round-trips with SQNR above ``min_sqnr_db`` (PTQ and QAT),
save -> load keeps the outputs, the lowered model agrees with the converted one and lowering it
again changes nothing. A feature the backend does not have (no lowering passes, no QAT config)
is a skip that says so, never a pass. Override ``make_quantizer(is_qat)`` to test another config.
"""

from __future__ import annotations

from typing import Any

import torch

from qcore.annotation import ANNOTATION_KEY
from qcore.metrics import sqnr_db


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

    def make_quantizer(self, is_qat: bool = False) -> Any:
        """The backend's quantizer with its ``default_config(is_qat=...)`` (override for another)."""
        from qcore.plugin_manager import get_plugin_manager

        if not self.backend:
            raise TypeError(f"{type(self).__name__} must set backend = '<a backend name>'")
        quantizer_class = get_plugin_manager().get_backend(self.backend).quantizer_class
        # default_config is duck-typed: Backend.quantizer_class is any class
        return quantizer_class().set_global(getattr(quantizer_class, "default_config")(is_qat=is_qat))

    def _lowering_passes_or_skip(self) -> list:
        import pytest

        from qcore.plugin_manager import get_plugin_manager

        passes = get_plugin_manager().lowering_passes(self.backend)
        if not passes:
            pytest.skip(f"backend {self.backend!r} has no lowering passes here: nothing to check")
        return passes

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

        self._lowering_passes_or_skip()
        for model_cls in self.models:
            torch.manual_seed(0)
            model = model_cls().eval()
            example = model_cls.example_inputs()
            _, _, converted = quantize_for_test(model, self.make_quantizer(), example)
            lowered = qcore.lower(converted, backend=self.backend, example_inputs=example)
            with torch.no_grad():
                reference, actual = converted(*example), lowered(*example)
            assert sqnr_db(reference, actual) >= 30.0, (model_cls.__name__, sqnr_db(reference, actual))

    def test_default_config_gives_ptq_and_qat_configs(self) -> None:
        import pytest

        from qcore.plugin_manager import get_plugin_manager
        from qcore.spec import QuantizationConfig

        quantizer_class = get_plugin_manager().get_backend(self.backend).quantizer_class
        default_config = getattr(quantizer_class, "default_config", None)
        assert callable(default_config), f"{quantizer_class.__name__} has no default_config(): qcore.quantize needs one"
        ptq = default_config(is_qat=False)
        assert isinstance(ptq, QuantizationConfig) and not ptq.is_qat
        try:
            qat = default_config(is_qat=True)
        except (NotImplementedError, ValueError) as exc:
            pytest.skip(f"backend {self.backend!r} has no QAT config: {exc}")
        assert isinstance(qat, QuantizationConfig) and qat.is_qat

    def test_qat_prepare_train_convert_round_trip(self) -> None:
        import pytest

        import qcore

        try:
            quantizer = self.make_quantizer(is_qat=True)
        except (NotImplementedError, ValueError) as exc:
            pytest.skip(f"backend {self.backend!r} has no QAT config: {exc}")
        torch.manual_seed(0)
        model = SmallCNN().train()
        example = SmallCNN.example_inputs()
        exported = torch.export.export(model, example).module()
        prepared = qcore.prepare_qat_pt2e(exported, quantizer)
        optimizer = torch.optim.SGD(prepared.parameters(), lr=1e-3)
        for _ in range(3):
            optimizer.zero_grad()
            prepared(torch.randn_like(example[0])).pow(2).mean().backward()
            optimizer.step()
        qcore.move_exported_model_to_eval(prepared)
        with torch.no_grad():
            fake_quantized = prepared(*example)
            converted = qcore.convert_pt2e(prepared)
            actual = converted(*example)
        assert any(n.target.__class__.__name__ == "OpOverload" and "quantize_per" in str(n.target) for n in converted.graph.nodes if n.op == "call_function")
        assert sqnr_db(fake_quantized, actual) >= self.min_sqnr_db, sqnr_db(fake_quantized, actual)

    def test_save_then_load_gives_the_same_outputs(self, tmp_path: Any) -> None:
        import qcore

        torch.manual_seed(0)
        model = SmallCNN().eval()
        example = SmallCNN.example_inputs()
        result = qcore.quantize(model, example, backend=self.backend, calibration=[example], measure_latency=False, lower=False)
        result.save(tmp_path / "model.pt2")
        loaded = qcore.load(tmp_path / "model.pt2")
        assert loaded.meta["qcore_backend"] == self.backend
        with torch.no_grad():
            assert torch.equal(loaded(*example), result.converted(*example))

    def test_lowering_twice_changes_nothing(self) -> None:
        import qcore

        self._lowering_passes_or_skip()
        torch.manual_seed(0)
        model = SmallCNN().eval()
        example = SmallCNN.example_inputs()
        _, _, converted = quantize_for_test(model, self.make_quantizer(), example)
        once = qcore.lower(converted, backend=self.backend, example_inputs=example)
        twice = qcore.lower(once, backend=self.backend, example_inputs=example)
        ops = lambda gm: [(n.op, str(n.target)) for n in gm.graph.nodes]  # noqa: E731
        assert ops(twice) == ops(once)
        with torch.no_grad():
            assert torch.equal(twice(*example), once(*example))
