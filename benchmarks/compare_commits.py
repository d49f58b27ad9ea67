r"""Speed of two commits, measured in one run on this machine: the penalty
step times, the ResNet step times and a ColoredMNIST IRMv1 restart.

  python -m benchmarks.compare_commits --before=35e42e1 --after=HEAD
  python -m benchmarks.compare_commits --before=35e42e1 --benches=penalty \
      --runs=3 --output=/tmp/speed.json

Each commit is checked out in a temporary git worktree and its own
benchmark modules run there (so each commit is timed by the code it had).
The runs alternate (before, after, after, before, ...) so that a change in
machine load affects both alike; each benchmark's median over ``--runs``
runs per commit is compared, and ``after / before`` printed per timed
quantity (target of issue 18: every median within 5%, ratio <= 1.05).

Benchmarks:
  * ``penalty``: ``benchmarks.penalty_step_time`` (s/step of every penalty
    variant on the 50k-sample ColoredMNIST MLP).
  * ``resnet``: ``benchmarks.resnet_step_time --torch=false`` (ResNet-18/50
    step, and every CIFAR-MNIST method's step on ResNet-18).
  * ``restart``: ``experiments.colored_mnist --method=irmv1 --preset=paper
    --restarts=1`` (one full restart: data, compile, 501 steps, evaluation);
    its record's ``wall_s``. Needs ``$TFDS_DATA_DIR`` with prepared MNIST.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

from jirm.methods import registry

flags.DEFINE_string("before", None, "Git revision timed first.",
                    required=True)
flags.DEFINE_string("after", "HEAD", "Git revision compared with it.")
flags.DEFINE_integer("runs", 3, "Runs of each benchmark per commit.")
flags.DEFINE_list("benches", ["penalty", "resnet", "restart"],
                  "Benchmarks to run: penalty, resnet, restart.")
flags.DEFINE_string("output", None, "Also write the measurements as JSON.")
flags.DEFINE_string("taskset", None, "Pin every run to these CPUs "
                    "(taskset -c), e.g. 0 while another job holds CPU 1.")
FLAGS = flags.FLAGS

BENCHES = ("penalty", "resnet", "restart")


def _parse_penalty(out: str) -> dict:
  """``variant  s/step  xERM ...`` rows -> {variant: s/step}."""
  rows = re.findall(r"^(\w+)\s+([0-9.]+)\s+[0-9.]+\s", out, re.M)
  return {name: float(t) for name, t in rows}


def _parse_resnet(out: str) -> dict:
  """The architecture lines and the per-method lines -> {name: s}."""
  times = {}
  for arch, auto, xla in re.findall(
      r"^(resnet\d+) batch \d+: jirm auto ([0-9.]+) s, jirm xla ([0-9.]+) s",
      out, re.M):
    times[f"{arch}/auto"], times[f"{arch}/xla"] = float(auto), float(xla)
  for name, t in re.findall(r"^  (\w+)\s+([0-9.]+) s\s+[0-9.]+x ERM", out,
                            re.M):
    # The older commit prints the old names (rex, irm_game, ...).
    times[f"method/{registry.canonical(name)}"] = float(t)
  return times


def _command(bench: str, out_dir: str) -> list:
  if bench == "penalty":
    return ["-m", "benchmarks.penalty_step_time"]
  if bench == "resnet":
    return ["-m", "benchmarks.resnet_step_time", "--torch=false"]
  return ["-m", "experiments.colored_mnist", "--method=irmv1",
          "--preset=paper", "--restarts=1", "--progress=false",
          f"--output_dir={out_dir}"]


def _run(bench: str, tree: str, scratch: str) -> dict:
  """One run of ``bench`` in the worktree ``tree`` -> {quantity: seconds}."""
  out_dir = tempfile.mkdtemp(dir=scratch)
  cmd = [sys.executable] + _command(bench, out_dir)
  if FLAGS.taskset:
    cmd = ["taskset", "-c", FLAGS.taskset] + cmd
  env = dict(os.environ, PYTHONPATH=tree)
  p = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True,
                     check=False)
  if p.returncode:
    raise RuntimeError(f"{' '.join(cmd)} in {tree} failed "
                       f"({p.returncode}): {p.stderr[-1500:]}")
  if bench == "penalty":
    times = _parse_penalty(p.stdout)
  elif bench == "resnet":
    times = _parse_resnet(p.stdout)
  else:
    with open(os.path.join(out_dir, "results.jsonl")) as f:
      times = {"restart/wall_s": float(json.loads(f.readline())["wall_s"])}
  if not times:
    raise RuntimeError(f"{bench}: nothing parsed from:\n{p.stdout[-1500:]}")
  return times


def _cpu() -> str:
  """The CPU's model name (the speed depends on it)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _rev(rev: str) -> str:
  return subprocess.run(["git", "rev-parse", "--short", rev], check=True,
                        capture_output=True, text=True).stdout.strip()


def main(argv):
  del argv
  unknown = sorted(set(FLAGS.benches) - set(BENCHES))
  if unknown or FLAGS.runs < 1:
    print(f"error: --benches={','.join(FLAGS.benches)} --runs={FLAGS.runs}: "
          f"use benches from {BENCHES} and 1 or more runs.", file=sys.stderr)
    sys.exit(2)
  revs = {"before": _rev(FLAGS.before), "after": _rev(FLAGS.after)}
  scratch = tempfile.mkdtemp(prefix="jirm_compare_")
  trees = {}
  for side, rev in revs.items():
    trees[side] = os.path.join(scratch, side)
    subprocess.run(["git", "worktree", "add", "--detach", trees[side], rev],
                   check=True, capture_output=True)
  samples = {b: {"before": [], "after": []} for b in FLAGS.benches}
  start = time.time()
  try:
    for i in range(FLAGS.runs):
      order = ("before", "after") if i % 2 == 0 else ("after", "before")
      for bench in FLAGS.benches:
        for side in order:
          samples[bench][side].append(_run(bench, trees[side], scratch))
          print(f"run {i + 1}/{FLAGS.runs} {bench} {side} done "
                f"({time.time() - start:.0f} s)", flush=True)
  finally:
    for tree in trees.values():
      subprocess.run(["git", "worktree", "remove", "--force", tree],
                     check=False, capture_output=True)
  print(f"\n{_cpu()}, "
        f"{os.cpu_count()} CPUs, taskset {FLAGS.taskset or 'none'}; "
        f"before {revs['before']}, after {revs['after']}, "
        f"{FLAGS.runs} runs each, medians")
  print(f"{'quantity':<26} {'before s':>10} {'after s':>10} {'after/before':>13}")
  table = {}
  for bench, sides in samples.items():
    keys = [k for k in sides["before"][0] if k in sides["after"][0]]
    for k in keys:
      b = statistics.median(s[k] for s in sides["before"])
      a = statistics.median(s[k] for s in sides["after"])
      table[k] = dict(before=b, after=a, ratio=a / b)
      flag = "" if a / b <= 1.05 else "  > 1.05"
      print(f"{k:<26} {b:>10.4f} {a:>10.4f} {a / b:>13.3f}{flag}")
  if FLAGS.output:
    with open(FLAGS.output, "w") as f:
      json.dump(dict(revs=revs, runs=FLAGS.runs, taskset=FLAGS.taskset,
                     cpu=_cpu(), medians=table,
                     samples=samples, wall_s=time.time() - start), f,
                indent=1)


if __name__ == "__main__":
  app.run(main)
