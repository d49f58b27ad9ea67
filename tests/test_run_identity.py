"""Run identity, locks and deduplicated records of the experiments' restart
loop (experiments.common.run_restarts), with a restart function that
trains nothing: a changed config starts new restarts under a new key and
says so; two copies of one command share the restarts; a stale lock is
taken over."""

import os
import subprocess
import sys
import textwrap
import time

import ml_collections

from experiments import common
from jirm import results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(lr=0.1):
  return ml_collections.ConfigDict(dict(method="irmv1", preset="quick",
                                        lr=lr, checkpoint_every=100))


def _fake_restart(log):
  def run(config, seed, ckpt):
    log.append((config.lr, seed, ckpt))
    os.makedirs(ckpt, exist_ok=True)
    return [dict(method=config.method, preset=config.preset, seed=seed,
                 selection=rule, train_acc=0.5, test_acc=config.lr,
                 wall_s=1.0, config=config.to_dict())
            for rule in ("last", "oracle")]
  return run


def test_changed_config_runs_under_a_new_key_and_says_so(tmp_path, capsys):
  out, log = str(tmp_path), []
  common.run_restarts([_config(0.1)], 2, 0, out, _fake_restart(log),
                      lambda _: None)
  before = (tmp_path / "results.jsonl").read_text()
  common.run_restarts([_config(0.1)], 2, 0, out, _fake_restart(log),
                      lambda _: None)  # Same config: both seeds skipped.
  assert len(log) == 2
  common.run_restarts([_config(0.01)], 2, 0, out, _fake_restart(log),
                      lambda _: None)
  k1, k2 = common.run_key(_config(0.1).to_dict()), common.run_key(
      _config(0.01).to_dict())
  assert k1 != k2
  assert [l[:2] for l in log] == [(0.1, 0), (0.1, 1), (0.01, 0), (0.01, 1)]
  assert os.path.basename(log[2][2]) == f"irmv1-quick-{k2}-seed0"
  said = capsys.readouterr().out
  assert f"config {k2} differs from the 1 other config(s)" in said
  recs = results.read_jsonl(str(tmp_path / "results.jsonl"))
  assert (tmp_path / "results.jsonl").read_text().startswith(before)
  assert {r["run_key"] for r in recs} == {k1, k2} and len(recs) == 8
  # Every record says where it ran (chaotic runs differ between CPUs).
  assert {r["machine"]["simd"] for r in recs} <= {"AVX-512", "AVX2",
                                                  "no AVX2"}
  assert all(r["machine"]["versions"]["jax"] for r in recs)
  # The summary keeps the two configs apart.
  table = results.summary_table(recs)
  assert f"| irmv1 (config {k1}) | quick | last | 2 |" in table
  assert f"| irmv1 (config {k2}) | quick | last | 2 |" in table
  # checkpoint_every does not change what a restart computes: same key.
  c = _config(0.1)
  c.checkpoint_every = 7
  assert common.run_key(c.to_dict()) == k1


def test_records_without_run_key_are_keyed_by_their_config(tmp_path):
  out, log = str(tmp_path), []
  old = _fake_restart([])(_config(0.1), 0, str(tmp_path / "c"))
  results.append_jsonl(str(tmp_path / "results.jsonl"), old)  # No run_key.
  common.run_restarts([_config(0.1)], 2, 0, out, _fake_restart(log),
                      lambda _: None)
  assert [l[1] for l in log] == [1]  # Seed 0 was recorded already.


def test_appends_are_deduplicated_by_key_seed_and_rule(tmp_path):
  path = str(tmp_path / "results.jsonl")
  rec = dict(run_key="a", seed=0, selection="last", test_acc=0.5)
  results.append_jsonl(path, [rec], unique=common._unique)
  results.append_jsonl(path, [dict(rec, test_acc=0.9),
                              dict(rec, seed=1)], unique=common._unique)
  assert [(r["seed"], r["test_acc"]) for r in results.read_jsonl(path)] == [
      (0, 0.5), (1, 0.5)]


def test_stale_lock_is_taken_over_and_a_live_one_is_respected(tmp_path):
  lock = str(tmp_path / "locks" / "x.lock")
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  os.makedirs(os.path.dirname(lock))
  host = os.uname().nodename
  with open(lock, "w") as f:
    f.write(f"{int(dead.stdout)} {host}\n")
  assert results.try_lock(lock) is None  # Its process is gone: taken over.
  assert open(lock).read().split()[0] == str(os.getpid())
  results.release_lock(lock)
  assert not os.path.exists(lock)
  alive = subprocess.Popen([sys.executable, "-c",
                            "import time; time.sleep(30)"])
  try:
    with open(lock, "w") as f:
      f.write(f"{alive.pid} {host}\n")
    assert results.try_lock(lock) == f"{alive.pid} on {host}"
    results.release_lock(lock)  # Not ours: left alone.
    assert os.path.exists(lock)
  finally:
    alive.kill()


_COPY = textwrap.dedent("""
    import sys, time
    import ml_collections
    from experiments import common
    def run(config, seed, ckpt):
      time.sleep(1.5)
      return [dict(method="irmv1", preset="quick", seed=seed, selection=r,
                   train_acc=0.5, test_acc=0.5, wall_s=0.5,
                   config=config.to_dict()) for r in ("last", "oracle")]
    c = ml_collections.ConfigDict(dict(method="irmv1", preset="quick", lr=0.1))
    common.run_restarts([c], 6, 0, sys.argv[1], run, lambda _: None)
""")


def test_two_copies_of_one_command_share_the_restarts(tmp_path):
  # The second copy starts once the first holds its first lock; each
  # restart takes 1.5 s, so the first cannot finish all six before the
  # second has started.
  env = dict(os.environ, PYTHONPATH=ROOT)
  start = lambda: subprocess.Popen([sys.executable, "-c", _COPY,
                                    str(tmp_path)], env=env,
                                   stdout=subprocess.PIPE, text=True)
  procs = [start()]
  deadline = time.time() + 60
  while not (tmp_path / "locks").exists() and time.time() < deadline:
    time.sleep(0.05)
  procs.append(start())
  outs = [p.communicate(timeout=120)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0]
  recs = results.read_jsonl(str(tmp_path / "results.jsonl"))
  assert sorted((r["seed"], r["selection"]) for r in recs) == sorted(
      (s, r) for s in range(6) for r in ("last", "oracle"))
  ran = [[l for l in o.splitlines() if l.startswith("irmv1-quick seed")]
         for o in outs]
  assert sum(map(len, ran)) == 6  # Every restart ran exactly once...
  assert all(ran)  # ...and both copies did some of them.
  assert os.listdir(tmp_path / "locks") == [".guard"]  # All released.
