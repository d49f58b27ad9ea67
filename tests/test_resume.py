"""A run killed with SIGKILL and started again with the same command resumes
from its orbax checkpoint and ends with the metrics of an uninterrupted run;
a diverging run stops naming the step and term and keeps its last good
checkpoint."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import optax
import pytest

import jirm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "resume_worker.py")


def _cmd(out):
  return [sys.executable, WORKER, str(out)]


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)


def _records(out):
  with open(os.path.join(out, "results.jsonl")) as f:
    recs = [json.loads(line) for line in f]
  for r in recs:
    for k in ("wall_s", "train_wall_s"):
      r.pop(k)
  return sorted(recs, key=lambda r: (r["seed"], r["selection"]))


def _checkpoint_steps(out):
  return sorted(int(os.path.basename(p)) for p in
                glob.glob(os.path.join(out, "checkpoints", "*", "[0-9]*"))
                if os.path.basename(p).isdigit())


def test_sigkill_then_same_command_equals_uninterrupted_run(tmp_path):
  ref, killed = tmp_path / "ref", tmp_path / "killed"
  subprocess.run(_cmd(ref), env=_env(), check=True, capture_output=True,
                 timeout=600)
  proc = subprocess.Popen(_cmd(killed), env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    steps = _checkpoint_steps(killed)
    if steps and steps[-1] >= 60:  # Mid-restart, checkpoints on disk.
      break
    time.sleep(0.02)
  assert proc.poll() is None, "the run finished before it could be killed"
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  assert not os.path.exists(killed / "results.jsonl")  # Nothing half-done.
  resumed_from = _checkpoint_steps(killed)[-1]
  assert 60 <= resumed_from < 200
  done = subprocess.run(_cmd(killed), env=_env(), check=True,
                        capture_output=True, text=True, timeout=600)
  assert "done" in done.stdout
  a, b = _records(ref), _records(killed)
  assert len(a) == len(b) == 8  # 2 restarts x 4 selection rules.
  for ra, rb in zip(a, b):
    assert ra["test_acc"] == pytest.approx(rb["test_acc"], abs=1e-6)
    assert ra["train_acc"] == pytest.approx(rb["train_acc"], abs=1e-6)
    assert ra["step"] == rb["step"]
    if "curve" in ra:
      np.testing.assert_allclose(ra["curve"]["test_acc"],
                                 rb["curve"]["test_acc"], atol=1e-6)
  # The same restart (same run key) resumed, under its key, and its
  # checkpoints went once its records were written.
  assert {r["run_key"] for r in a} == {r["run_key"] for r in b}
  assert not glob.glob(str(killed / "checkpoints" / "irmv1-quick-*-seed0"))
  # Per-step scalars of each restart, outside the (deleted) checkpoints.
  (tb_dir,) = glob.glob(str(ref / "tensorboard" / "irmv1-quick-*-seed1"))
  tb = _read_scalars(tb_dir)
  assert len(tb["term/irmv1"]) == 200 and len(tb["test_acc"]) == 20


def test_divergence_names_step_and_term_and_keeps_good_checkpoint(
    tmp_path, synthetic_mnist):
  splits = jirm.data.colored_mnist(seed=0, data_num=1000,
                                   mnist=synthetic_mnist)
  # lambda = 1e30 from step 25 without loss rescaling: SGD overflows.
  sched = jirm.schedules.preset("domainbed", weight=1e30, anneal=25)
  obj = jirm.erm + sched * jirm.vrex
  ckpt = tmp_path / "ckpt"
  with pytest.raises(jirm.train.DivergenceError,
                     match=r"term/\w+ = (nan|inf).* at step 2[5-9]; the last "
                     r"good checkpoint is step 20"):
    jirm.fit(splits, model=jirm.models.mlp(8), objective=obj,
             optimizer=optax.sgd(1.0), steps=60, eval_every=10, seed=0,
             checkpoint_dir=str(ckpt), checkpoint_every=10)
  assert sorted(int(p) for p in os.listdir(ckpt) if p.isdigit()) == [10, 20]


def _read_scalars(directory):
  """tag -> [(step, value)] from TensorBoard event files (TFRecord framing:
  u64 length, u32 crc, Event proto, u32 crc)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  out = {}
  for path in glob.glob(os.path.join(directory, "events.out.tfevents.*")):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      n = int.from_bytes(data[pos:pos + 8], "little")
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
      pos += 16 + n
      for v in event.summary.value:
        out.setdefault(v.tag, []).append((event.step, v.simple_value))
  return out


def test_metrics_are_written_for_tensorboard(tmp_path, synthetic_mnist):
  splits = jirm.data.colored_mnist(seed=0, data_num=500,
                                   mnist=synthetic_mnist)
  obj = jirm.erm + jirm.schedules.preset("lin", weight=10.0,
                                         anneal=2) * jirm.irmv1
  jirm.fit(splits, model=jirm.models.mlp(8), objective=obj,
           optimizer=optax.adam(1e-3), steps=6, eval_every=3, seed=0,
           metrics_dir=str(tmp_path / "tb"))
  scalars = _read_scalars(str(tmp_path / "tb"))
  assert {"term/irmv1", "weight/irmv1", "total", "train_acc", "test_acc",
          "test_acc/env0"} <= set(scalars)
  assert [s for s, _ in scalars["term/irmv1"]] == list(range(6))
  assert [v for _, v in scalars["weight/irmv1"]] == [0, 0, 10, 10, 10, 10]
  assert [s for s, _ in scalars["test_acc"]] == [3, 6]
