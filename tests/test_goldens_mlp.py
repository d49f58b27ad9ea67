"""Golden trajectories of the MLP and synthetic-data experiments
(ColoredMNIST, SparseIRM, IRM-TV, the vmapped sweep): every method, 8
steps, against the numbers recorded in tests/goldens/ (see goldens.py)."""

import pytest

import goldens

EXPERIMENTS = ("colored_mnist", "sparse_irm", "irm_tv", "sweep")
CASES = [(e, m) for e in EXPERIMENTS for m in goldens.EXPERIMENTS[e]]


@pytest.mark.parametrize("experiment,method", CASES)
def test_golden(experiment, method):
  goldens.assert_matches(experiment, method)


def test_every_method_of_every_experiment_has_a_golden():
  from experiments import colored_mnist  # pylint: disable=g-import-not-at-top
  from experiments.configs import cifar_mnist as cifar_cfg  # pylint: disable=g-import-not-at-top
  from experiments.configs import irm_tv, shift, sparse_irm  # pylint: disable=g-import-not-at-top
  expected = {
      "colored_mnist": colored_mnist.METHODS_ALL + colored_mnist.OTHER_METHODS,
      "cifar_mnist": cifar_cfg.METHODS + cifar_cfg.EXTRA_METHODS,
      "irm_tv": tuple(irm_tv.METHODS), "sparse_irm": sparse_irm.METHODS,
      "shift": shift.METHODS}
  for name, methods in expected.items():
    assert set(goldens.EXPERIMENTS[name]) == set(methods), name
    doc = goldens.load(name)
    assert set(doc["cases"]) == set(methods), name
    assert doc["steps"] <= 10 and len(doc["provenance"]["commit"]) == 40


def test_compare_catches_a_moved_number():
  golden = goldens.load("colored_mnist")["cases"]["irmv1"]
  assert not goldens.compare("colored_mnist", golden, golden)
  import copy  # pylint: disable=g-import-not-at-top
  moved = copy.deepcopy(golden)
  leaf = sorted(moved["runs"][0]["params"])[0]
  moved["runs"][0]["params"][leaf][0] *= 1 + 1e-4
  assert goldens.compare("colored_mnist", golden, moved)
  moved = copy.deepcopy(golden)
  moved["runs"][0]["history"]["term/erm"][-1] *= 1 + 1e-4
  assert goldens.compare("colored_mnist", golden, moved)
  moved = copy.deepcopy(golden)
  del moved["runs"][0]["history"]["term/irmv1"]
  assert goldens.compare("colored_mnist", golden, moved)
