"""Real-data smoke test on the prepared tfds MNIST (skipped without it)."""

import numpy as np
import optax
import pytest

import jirm

from conftest import real_tfds_dir as _data_dir


@pytest.mark.skipif(_data_dir() is None, reason="no prepared tfds mnist")
def test_short_irmv1_beats_erm_on_the_test_env():
  splits = jirm.data.colored_mnist(seed=0, data_num=10_000, val="none",
                                   data_dir=_data_dir())
  assert splits.train.x.shape == (2, 5000, 14, 14, 2)
  # Configured correlations on real data.
  assert abs(splits.train.agree[0].mean() - 0.8) < 0.03
  assert abs(splits.test.agree.mean() - 0.1) < 0.01

  def run(obj):
    return jirm.fit(splits, model=jirm.models.mlp(64), objective=obj,
                    optimizer=optax.adam(1e-3), steps=200, seed=0,
                    eval_every=200).selections["last"]

  sched = jirm.schedules.preset("irm", weight=1e4, anneal=60)
  erm = run(jirm.erm + 1e-3 * jirm.l2)
  irm = run(jirm.erm + 1e-3 * jirm.l2 + sched * jirm.irmv1)
  assert erm["test_acc"] < 0.35, erm
  assert irm["test_acc"] > erm["test_acc"] + 0.2, (irm, erm)
  assert np.isfinite(irm["train_acc"])


def _has(name):
  return _data_dir(name) is not None


@pytest.mark.skipif(not _has("cifar10"), reason="no prepared tfds cifar10")
@pytest.mark.parametrize("envs,ratios,test_num", [
    ("2env", (0.999, 0.8), 1800), ("4env", (0.999, 0.95, 0.9, 0.8), 1800),
    ("birm", (0.999, 0.7), 1000)])
def test_cifar_mnist_on_real_data(envs, ratios, test_num):
  s = jirm.data.cifar_mnist(0, envs=envs, val="none",
                            data_dir=_data_dir("cifar10"))
  per_env = 10_000 // len(ratios)
  assert s.train.x.shape == (len(ratios), per_env, 64, 32, 3)
  assert s.test.sizes == (test_num,)
  assert 0.0 <= s.train.x.min() and s.train.x.max() <= 1.0
  for e, r in enumerate(ratios):
    y, agree = s.train.y[e], s.train.agree[e]
    assert y.sum() == per_env // 2
    assert agree[y == 1].sum() == int(per_env // 2 * r)
    assert agree[y == 0].sum() == int((per_env - per_env // 2) * r)
  assert s.test.agree[0].sum() == 2 * int(test_num // 2 * 0.1)
  # The MNIST half is a 0/1 digit padded by 2 pixels; the bottom is CIFAR.
  assert np.all(s.train.x[:, :, :2] == 0)
  assert s.train.x[:, :, 40:].std() > 0.1


@pytest.mark.skipif(_data_dir() is None, reason="no prepared tfds mnist")
def test_config_file_argument_and_overrides_reach_the_record(tmp_path):
  """``--config=FILE:METHOD,PRESET --config.KEY=VALUE`` end to end: the
  record holds the chosen method and preset and the typed overrides."""
  import json
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = tmp_path / "o"
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.colored_mnist",
       "--config=experiments/configs/colored_mnist.py:vrex,quick",
       "--config.steps=4", "--config.eval_every=2",
       "--config.data.data_num=1000", "--restarts=1", "--progress=false",
       f"--output_dir={out}"],
      capture_output=True, text=True, timeout=300, cwd=root,
      env=dict(os.environ, PYTHONPATH=root, TFDS_DATA_DIR=_data_dir()))
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = [json.loads(l) for l in open(out / "results.jsonl")]
  assert {r["method"] for r in records} == {"vrex"}
  assert {r["preset"] for r in records} == {"quick"}
  config = records[0]["config"]
  assert config["steps"] == 4 and config["eval_every"] == 2
  assert config["data"]["data_num"] == 1000
  assert isinstance(config["data"]["data_num"], int)
