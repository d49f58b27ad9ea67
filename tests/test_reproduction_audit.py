"""experiments.reproduction_audit: matching and verdicts on fabricated records."""

import json
import os
import subprocess
import sys

import pytest

from experiments import reproduction_audit as audit


def _rec(method, seed, test, train=0.7, selection="last", **kw):
  return dict(method=method, preset="paper", seed=seed, selection=selection,
              test_acc=test, train_acc=train,
              config={"hidden_dim": 390, "penalty_weight": 10.0}, **kw)


def _write(d, records, name="results.jsonl"):
  os.makedirs(d, exist_ok=True)
  with open(os.path.join(d, name), "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")


def test_verdicts_from_committed_seed_spread(tmp_path):
  committed = [_rec("a", s, t) for s, t in enumerate([0.60, 0.62, 0.64])]
  committed += [_rec("b", s, t) for s, t in enumerate([0.50, 0.51])]
  committed += [_rec("c", 0, 0.3), _rec("d", 0, 0.4)]
  committed += [_rec("a", 0, 0.99, selection="oracle")]   # Not compared.
  rerun = [_rec("a", 0, 0.6004),        # 0.04 points: same.
           _rec("b", 0, 0.509),         # 0.9 <= 2 sigma (0.71) * 2 = 1.41.
           _rec("c", 0, 0.31),          # 1 point, one seed: no sigma.
           _rec("a", 1, 0.10)]          # Another seed: ignored.
  _write(tmp_path / "old", committed)
  _write(tmp_path / "new", rerun)
  rows = {r["key"][0]: r for r in audit.audit_study(
      "s", str(tmp_path / "old"), str(tmp_path / "new"))}
  assert rows["a"]["verdict"] == "same"
  assert rows["a"]["sigma"] == pytest.approx(2.0)
  assert rows["b"]["verdict"] == "within noise"
  assert rows["c"]["verdict"] == "moved" and rows["c"]["sigma"] is None
  assert rows["d"]["verdict"] == "not rerun"
  # 2.1 sigma is out of the noise band.
  assert audit.verdict(_rec("a", 0, 0.60), _rec("a", 0, 0.642),
                       [0.60, 0.62, 0.64])[0] == "moved"
  # Train accuracy counts for "same".
  assert audit.verdict(_rec("a", 0, 0.6, 0.7), _rec("a", 0, 0.6, 0.71),
                       [0.60, 0.62, 0.64])[0] == "within noise"
  text = audit.table(list(rows.values()))
  assert "| s | a (paper, H=390, λ=10) | 70.0 / 60.0" in text
  assert "| +0.04 | 2.00 (3) | same |" in text


def test_runs_differing_in_penalty_weight_are_separate_rows(tmp_path):
  recs = [_rec("a", 0, 0.6, penalty_weight=w) for w in (10.0, 100.0)]
  _write(tmp_path / "old", recs)
  _write(tmp_path / "new", [_rec("a", 0, 0.6, penalty_weight=100.0)])
  rows = audit.audit_study("s", str(tmp_path / "old"), str(tmp_path / "new"))
  assert sorted(r["verdict"] for r in rows) == ["not rerun", "same"]


def test_sweep_directories_are_read_trial_by_trial(tmp_path):
  # experiments.sweep's layout: trials/<id>/result.jsonl, no results.jsonl.
  for d, tests in (("old", (0.60, 0.64)), ("new", (0.6002,))):
    for seed, t in enumerate(tests):
      _write(tmp_path / d / "trials" / f"irmv1-{seed}", [
          _rec("irmv1", seed, t), _rec("irmv1", seed, 0.9, selection="oracle")
      ], name="result.jsonl")
  (row,) = audit.audit_study("sweep", str(tmp_path / "old"),
                             str(tmp_path / "new"))
  assert row["verdict"] == "same" and row["n"] == 2
  assert row["rerun"]["test_acc"] == 0.6002


def test_bad_study_flag_is_one_line_and_exit_2(tmp_path):
  for spec in ("only_two:parts", f"s:{tmp_path}/missing:{tmp_path}"):
    p = subprocess.run([sys.executable, "-m", "experiments.reproduction_audit",
                        f"--study={spec}"], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "--study=" in p.stderr


def test_spread_table_hand_computed():
  from jirm import results  # pylint: disable=g-import-not-at-top
  curve = lambda *t: {"step": list(range(len(t))), "test_acc": list(t)}
  recs = [dict(method="m", seed=0, selection="last", test_acc=0.2,
               curve=curve(0.1, 0.3, 0.1, 0.3, 0.2)),
          dict(method="m", seed=1, selection="last", test_acc=0.6,
               curve=curve(0.6, 0.6, 0.6, 0.6)),
          dict(method="m", seed=2, selection="oracle", test_acc=0.9),
          dict(method="k", seed=0, selection="last", test_acc=0.7)]
  text = results.spread_table(recs, tail=4)
  # m: mean 40, sd sqrt(((20-40)^2 + (60-40)^2) / 1) = 28.3, one seed < 50;
  # swing: sd(30, 10, 30, 20) = 8.29 and 0 -> 4.1.
  assert "| m | 2 (0, 1) | 40.0 ± 28.3 | 20.0 – 60.0 | 1 / 2 | 4.1 |" in text
  assert "| k | 1 (0) | 70.0 ± – | 70.0 – 70.0 | 0 / 1 | – |" in text
