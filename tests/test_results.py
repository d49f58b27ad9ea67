"""jirm.results: records are strict JSON."""

import json

import numpy as np

from jirm import results


def _strict_loads(text):
  def reject(token):
    raise ValueError(f"non-standard JSON token {token}")
  return json.loads(text, parse_constant=reject)


def test_non_finite_numbers_are_written_as_null(tmp_path):
  rec = {"test_acc": float("nan"), "wall_s": np.float32(np.inf),
         "curve": {"test_acc": [0.5, float("-inf")]}, "seed": np.int64(3),
         "acc_E": np.asarray([0.25, np.nan], np.float32)}
  line = results.dumps(rec)
  assert _strict_loads(line) == {"test_acc": None, "wall_s": None,
                                 "curve": {"test_acc": [0.5, None]},
                                 "seed": 3, "acc_E": [0.25, None]}
  path = str(tmp_path / "results.jsonl")
  results.append_jsonl(path, [rec])
  results.append_jsonl(path, [{"seed": 4}])
  with open(path) as f:
    rows = [_strict_loads(l) for l in f]
  assert [r["seed"] for r in rows] == [3, 4]
