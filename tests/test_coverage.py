"""The annotation coverage report: counts by op type, and the warning when nothing is annotated."""

from __future__ import annotations

import pytest
import torch

import qcore
from qcore.coverage import NothingAnnotatedWarning, annotation_coverage
from qcore.testing.toy import ToyLinearQuantizer


class LinearAndConv(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3)
        self.fc1 = torch.nn.Linear(8, 8)
        self.fc2 = torch.nn.Linear(8, 8)

    def forward(self, image, x):
        return self.conv(image).sum() + self.fc2(self.fc1(x))


class AnnotatesNothing:
    def annotate(self, model):
        return model

    def validate(self, model):
        return None


def exported():
    return torch.export.export(LinearAndConv(), (torch.randn(1, 1, 5, 5), torch.randn(2, 8))).module()


def test_coverage_counts_annotated_ops_by_type():
    prepared = qcore.prepare_pt2e(exported(), ToyLinearQuantizer())
    coverage = prepared.meta["qcore_coverage"]
    assert coverage.by_op["linear"] == (2, 2)
    assert coverage.by_op["conv"] == (0, 1)
    assert coverage.by_op["add"] == (0, 1)
    assert (coverage.annotated, coverage.total) == (2, 4)
    assert coverage.summary() == "annotated 2/4 quantizable ops (add 0/1, conv 0/1, linear 2/2)"


def test_a_quantizer_that_annotates_nothing_warns(caplog):
    with pytest.warns(NothingAnnotatedWarning, match=r"AnnotatesNothing annotated none of the 4 quantizable ops"):
        qcore.prepare_pt2e(exported(), AnnotatesNothing())


def test_coverage_of_an_unannotated_graph():
    assert annotation_coverage(exported()).annotated == 0
