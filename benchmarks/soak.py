r"""Soak: concurrent sweeps, SIGKILLs and a full disk must lose nothing.

  python -m benchmarks.soak                      # needs $TFDS_DATA_DIR (MNIST)
  python -m benchmarks.soak --kill_seed=3 --grid=penalty_weight=10,100,1000

1. Reference: one undisturbed local sweep (ColoredMNIST, quick preset,
   ``--grid`` x ``--restarts`` trials) into ``ref/``.
2. Three copies of the same sweep at once, two into one directory
   (``shared/``) and one into another (``other/``); each is SIGKILLed at a
   random point (``--kill_seed``; uniform over 15-85% of the reference's wall
   time), then all three are rerun at once to the end.
3. Checks: in ``shared/`` and ``other/`` every trial of the reference
   finished exactly once (one record per selection rule, no duplicate, no
   extra trial) and the tables (``summary.csv``) equal the reference's to
   1e-5 (a resumed trial continues from its orbax checkpoint).
4. A full disk, for real when this process may mount a tmpfs (root), else
   skipped and said so (``tests/test_faults.py`` injects ENOSPC on every
   machine): a ColoredMNIST run into a tmpfs too small for all its restarts
   must stop with one ``error:`` line and exit status 3, leaving
   ``results.jsonl`` strict JSON with every restart it holds complete.

Prints the timings and one PASS/FAIL line per check; exit status 1 if any
check fails.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

flags.DEFINE_multi_string("grid", ["penalty_weight=10,1000"],
                          "The sweep's --grid.")
flags.DEFINE_integer("restarts", 2, "Restarts per grid point.")
flags.DEFINE_integer("kill_seed", 0, "Seed of the kill times.")
flags.DEFINE_string("work_dir", None, "Where the sweeps go (default: a new "
                    "temporary directory, kept).")
flags.DEFINE_bool("disk_full", True, "Also fill a small tmpfs (needs root).")
flags.DEFINE_bool("sweeps", True, "Run the concurrent sweeps (steps 1-3).")
FLAGS = flags.FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sweep(out: str) -> list:
  return ([sys.executable, "-m", "experiments.sweep",
           "--experiment=colored_mnist", "--method=irmv1", "--preset=quick",
           f"--restarts={FLAGS.restarts}", "--backend=local",
           f"--output_dir={out}"] + [f"--grid={g}" for g in FLAGS.grid])


def _start(cmd, log):
  return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                          env=dict(os.environ, PYTHONPATH=ROOT),
                          start_new_session=True)


def _trials(out: str) -> dict:
  """trial id -> its records (every ``trials/<id>/result.jsonl``)."""
  found = {}
  root = os.path.join(out, "trials")
  for tid in sorted(os.listdir(root)) if os.path.isdir(root) else ():
    path = os.path.join(root, tid, "result.jsonl")
    if os.path.exists(path):
      with open(path) as f:
        found[tid] = [json.loads(line) for line in f if line.strip()]
  return found


def _table(out: str) -> list:
  with open(os.path.join(out, "summary.csv")) as f:
    return list(csv.reader(f))


def _same_table(a, b, tol=1e-5) -> bool:
  if len(a) != len(b):
    return False
  for ra, rb in zip(a, b):
    for x, y in zip(ra, rb):
      try:
        if abs(float(x) - float(y)) > tol:
          return False
      except ValueError:
        if x != y:
          return False
  return True


def _disk_full(work: str) -> tuple:
  """Fills a tmpfs; -> (check name, passed or None if skipped, detail)."""
  name = "full disk: one line, exit 3, records intact"
  if os.geteuid() != 0:
    return name, None, "not root: no tmpfs (the unit test injects ENOSPC)"
  mnt = os.path.join(work, "tmpfs")
  os.makedirs(mnt, exist_ok=True)
  probe = os.path.join(work, "probe")  # One restart's footprint.
  cmd = [sys.executable, "-m", "experiments.colored_mnist", "--method=erm",
         "--preset=quick", "--progress=false"]
  subprocess.run(cmd + ["--restarts=1", f"--output_dir={probe}"], cwd=ROOT,
                 env=dict(os.environ, PYTHONPATH=ROOT), check=True,
                 capture_output=True)
  size = sum(os.path.getsize(os.path.join(r, f))
             for r, _, fs in os.walk(probe) for f in fs)
  kib = max(256, int(12 * size / 1024))  # Room for a few restarts.
  mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k",
                          "tmpfs", mnt], capture_output=True, text=True,
                         check=False)
  if mount.returncode:
    return name, None, f"mount failed: {mount.stderr.strip()}"
  try:
    out = os.path.join(mnt, "o")
    p = subprocess.run(cmd + ["--restarts=60", f"--output_dir={out}"],
                       cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                       capture_output=True, text=True, check=False)
    lines = p.stderr.strip().splitlines()
    rows, strict = [], True
    path = os.path.join(out, "results.jsonl")
    if os.path.exists(path):
      with open(path) as f:
        for line in f:
          try:
            rows.append(json.loads(line, parse_constant=_refuse))
          except ValueError:
            strict = False
    per_seed = {}
    for r in rows:
      per_seed.setdefault(r["seed"], set()).add(r["selection"])
    complete = len({frozenset(v) for v in per_seed.values()}) <= 1
    ok = (p.returncode == 3 and len(lines) == 1
          and lines[0].startswith("error: ") and strict and complete)
    return name, ok, (f"tmpfs {kib} KiB, one restart {size / 1024:.0f} KiB; "
                      f"exit {p.returncode}, {len(per_seed)} restart(s) "
                      f"kept whole, stderr: {lines[-1] if lines else ''!r}")
  finally:
    subprocess.run(["umount", mnt], check=False)


def _refuse(token):
  raise ValueError(f"non-JSON token {token}")


def main(argv):
  del argv
  work = FLAGS.work_dir or tempfile.mkdtemp(prefix="jirm_soak_")
  os.makedirs(work, exist_ok=True)
  for d in ("ref", "shared", "other"):
    shutil.rmtree(os.path.join(work, d), ignore_errors=True)
  logs = os.path.join(work, "logs")
  os.makedirs(logs, exist_ok=True)
  checks = []
  if FLAGS.sweeps:
    checks += _soak(work, logs)
  if FLAGS.disk_full:
    checks.append(_disk_full(work))
  failed = False
  for name, ok, detail in checks:
    word = {True: "PASS", False: "FAIL", None: "SKIP"}[ok]
    failed |= ok is False
    print(f"{word}  {name}  ({detail})")
  sys.exit(1 if failed else 0)


def _soak(work: str, logs: str) -> list:
  """Steps 1-3; -> the checks."""
  rng = random.Random(FLAGS.kill_seed)
  t0 = time.time()
  with open(os.path.join(logs, "ref.log"), "w") as log:
    ref = _start(_sweep(os.path.join(work, "ref")), log)
    if ref.wait():
      sys.exit(f"the reference sweep failed: {logs}/ref.log")
  t_ref = time.time() - t0
  print(f"reference: {len(_trials(os.path.join(work, 'ref')))} trials in "
        f"{t_ref:.0f} s ({work})", flush=True)
  dirs = ("shared", "shared", "other")
  kills = [rng.uniform(0.15, 0.85) * t_ref for _ in dirs]
  t1 = time.time()
  procs = []
  for i, d in enumerate(dirs):
    log = open(os.path.join(logs, f"run{i}.log"), "w")  # pylint: disable=consider-using-with
    procs.append((_start(_sweep(os.path.join(work, d)), log), log))
  for (p, _), at in sorted(zip(procs, kills), key=lambda x: x[1]):
    time.sleep(max(0.0, t1 + at - time.time()))
    if p.poll() is None:
      os.killpg(p.pid, signal.SIGKILL)
  for p, log in procs:
    p.wait()
    log.close()
  print("killed at " + ", ".join(f"{k:.0f} s" for k in kills) +
        "; rerunning all three at once", flush=True)
  t2 = time.time()
  procs = []
  for i, d in enumerate(dirs):
    log = open(os.path.join(logs, f"rerun{i}.log"), "w")  # pylint: disable=consider-using-with
    procs.append((_start(_sweep(os.path.join(work, d)), log), log))
  codes = []
  for p, log in procs:
    codes.append(p.wait())
    log.close()
  t_soak = time.time() - t1
  print(f"soak (kills + reruns): {t_soak:.0f} s, reruns {time.time() - t2:.0f}"
        f" s, exit codes {codes}", flush=True)
  want = _trials(os.path.join(work, "ref"))
  rules = {tid: sorted(r["selection"] for r in recs)
           for tid, recs in want.items()}
  checks = [("reruns exit 0", all(c == 0 for c in codes), str(codes))]
  for d in ("shared", "other"):
    got = _trials(os.path.join(work, d))
    once = {tid: sorted(r["selection"] for r in recs)
            for tid, recs in got.items()}
    checks.append((f"{d}: every trial exactly once", once == rules,
                   f"{len(got)} of {len(want)} trials"))
    checks.append((f"{d}: table equals the reference",
                   _same_table(_table(os.path.join(work, d)),
                               _table(os.path.join(work, "ref"))),
                   os.path.join(work, d, "summary.csv")))
  return checks


if __name__ == "__main__":
  app.run(main)
