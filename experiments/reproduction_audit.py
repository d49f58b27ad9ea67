r"""The reproduction audit: committed seed-0 records against today's reruns.

  python -m experiments.reproduction_audit \
      --study=colored_mnist:docs/results/colored_mnist:/tmp/audit/colored_mnist \
      --study=irm_tv:docs/results/irm_tv:/tmp/audit/irm_tv \
      --out=docs/reproduction_table.md

Each ``--study=NAME:COMMITTED_DIR:RERUN_DIR`` pairs the ``results.jsonl`` that
is committed with one written by today's code (the same command with
``--restarts=1``). Records are matched on the run's identity (method,
preset, model, environments, hidden width, penalty weight, grid note) and
seed; only the ``last`` rule is compared. Verdicts:

* ``same``: test and train accuracy within 0.05 points (a handful of
  predictions on the 2k-20k test sets);
* ``within noise``: the test accuracy moved by at most twice the standard
  deviation of the committed seeds of that row (needs n >= 2 seeds);
* ``moved``: neither.

Rows of a committed study without a rerun are listed as ``not rerun``. A
sweep directory (``experiments.sweep``: one ``trials/<id>/result.jsonl`` per
trial, no ``results.jsonl``) is read trial by trial.
"""

from __future__ import annotations

import os
import subprocess
import sys

from absl import app
from absl import flags
import numpy as np

from jirm import launch
from jirm import results as results_lib

SAME_POINTS = 0.05
NOISE_SIGMAS = 2.0

FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags (defined only when run as a program, so that the
  module can be imported beside other experiment modules)."""
  flags.DEFINE_multi_string("study", [], "NAME:COMMITTED_DIR:RERUN_DIR.")
  flags.DEFINE_string("out", None, "Markdown table to write (else stdout).")
  flags.DEFINE_integer("seed", 0, "Seed to compare.")


def run_key(record: dict) -> tuple:
  """What identifies a run apart from its seed."""
  config = record.get("config", {})
  data = config.get("data", {}) if isinstance(config.get("data"), dict) else {}
  pw = record.get("penalty_weight", config.get("penalty_weight"))
  return (record.get("method"), record.get("preset"), record.get("model"),
          str(record.get("envs", data.get("envs", ""))),
          record.get("hidden_dim", config.get("hidden_dim")),
          None if pw is None else float(pw), record.get("note") or "")


def _last(records):
  return [r for r in records if r.get("selection") == "last"]


def verdict(committed: dict, rerun: dict, committed_tests) -> tuple:
  """``(verdict, noise_points)`` for one row; accuracies as fractions."""
  d_test = 100 * abs(rerun["test_acc"] - committed["test_acc"])
  d_train = 100 * abs(rerun["train_acc"] - committed["train_acc"])
  n = len(committed_tests)
  sigma = float(np.std(100 * np.asarray(committed_tests), ddof=1)) if (
      n >= 2) else None
  if d_test <= SAME_POINTS and d_train <= SAME_POINTS:
    return "same", sigma
  if sigma is not None and d_test <= NOISE_SIGMAS * sigma:
    return "within noise", sigma
  return "moved", sigma


def _commit_of(path: str) -> str:
  try:
    path = os.path.abspath(path)
    out = subprocess.run(["git", "log", "-1", "--format=%h", "--", path],
                         capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(path))
    return out.stdout.strip() or "uncommitted"
  except (OSError, subprocess.CalledProcessError):
    return "?"


def _records(directory: str) -> tuple:
  """``(records, path)`` of an output directory or of a sweep directory."""
  path = os.path.join(directory, "results.jsonl")
  if not os.path.exists(path) and os.path.isdir(os.path.join(directory,
                                                              "trials")):
    return launch.read_results(directory), os.path.join(directory, "trials")
  return results_lib.read_jsonl(path), path


def audit_study(name: str, committed_dir: str, rerun_dir: str,
                seed: int = 0) -> list:
  """Rows ``dict(study, key, committed, rerun, verdict, sigma, n)``."""
  records, path = _records(committed_dir)
  committed = _last(records)
  if not committed:
    raise ValueError(f"--study={name}: no records in {path}; give the "
                     f"directory of a committed results.jsonl or sweep.")
  rerun = {run_key(r): r for r in _last(_records(rerun_dir)[0])
           if r["seed"] == seed}
  commit = _commit_of(path)
  by_key = {}
  for r in committed:
    by_key.setdefault(run_key(r), []).append(r)
  rows = []
  for key, recs in by_key.items():
    base = [r for r in recs if r["seed"] == seed]
    if not base:
      continue
    new = rerun.get(key)
    tests = [r["test_acc"] for r in recs]
    row = dict(study=name, key=key, committed=base[0], commit=commit,
               rerun=new, n=len(tests))
    if new is None:
      row.update(verdict="not rerun", sigma=None)
    else:
      row["verdict"], row["sigma"] = verdict(base[0], new, tests)
    rows.append(row)
  return rows


def _label(key) -> str:
  method, preset, model, envs, hidden, pw, note = key
  envs = envs if "env" in envs else f"{envs} envs" if envs else ""
  extra = [str(x) for x in (model, envs,
                            f"H={hidden}" if hidden else "",
                            "" if pw is None else f"λ={pw:g}") if x]
  if note:
    extra.append(note)
  return f"{method} ({preset}{', ' if extra else ''}{', '.join(extra)})"


def table(rows) -> str:
  pct = lambda r: f"{100 * r['train_acc']:.1f} / {100 * r['test_acc']:.1f}"
  lines = ["| study | run | committed seed 0 (train / test %, commit) | "
           "today's seed 0 | Δ test (points) | σ committed seeds (n) | "
           "verdict |", "|---|---|---|---|---|---|---|"]
  for r in rows:
    new = r["rerun"]
    delta = ("" if new is None else
             f"{100 * (new['test_acc'] - r['committed']['test_acc']):+.2f}")
    sigma = "" if r["sigma"] is None else f"{r['sigma']:.2f} ({r['n']})"
    lines.append(f"| {r['study']} | {_label(r['key'])} | "
                 f"{pct(r['committed'])} ({r['commit']}) | "
                 f"{'' if new is None else pct(new)} | {delta} | {sigma} | "
                 f"{r['verdict']} |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  rows = []
  for spec in FLAGS.study:
    parts = spec.split(":")
    try:
      if len(parts) != 3:
        raise ValueError(f"--study={spec!r}: use NAME:COMMITTED_DIR:"
                         f"RERUN_DIR.")
      rows += audit_study(*parts, seed=FLAGS.seed)
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
  text = table(rows)
  if FLAGS.out:
    results_lib.atomic_write(FLAGS.out, text)
  else:
    print(text, end="")


if __name__ == "__main__":
  define_flags()
  app.run(main)
