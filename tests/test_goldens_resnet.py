"""Golden trajectories of the ResNet experiments (CIFAR-MNIST and the
subpopulation-shift experiment on fabricated Waterbirds): every method, at
most 10 steps, against tests/goldens/ (see goldens.py)."""

import pytest

import goldens

CASES = [(e, m) for e in ("cifar_mnist", "shift")
         for m in goldens.EXPERIMENTS[e]]


@pytest.mark.parametrize("experiment,method", CASES)
def test_golden(experiment, method):
  goldens.assert_matches(experiment, method)
