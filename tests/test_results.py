"""jirm.results: records are strict JSON; figures are saved atomically."""

import json
import os

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


# jirm/results.py loaded on its own (stdlib + numpy; the package's import
# would load JAX for nothing here).
_SAVER = """
import importlib.util, os, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
spec = importlib.util.spec_from_file_location(
    "results", os.path.join(sys.argv[2], "jirm", "results.py"))
results = importlib.util.module_from_spec(spec)
spec.loader.exec_module(results)
for i in range(15):
  fig, ax = plt.subplots()
  ax.plot([0, i])
  results.save_figure(fig, sys.argv[1])
"""


def test_two_processes_save_the_same_figure_at_once(tmp_path):
  # Two copies of one experiment share an output directory (the restart
  # locks); both rewrite curves.png after each restart. A shared temporary
  # name made one rename fail (FileNotFoundError) once the other had
  # renamed it.
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "curves.png")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  procs = [subprocess.Popen([sys.executable, "-c", _SAVER, path, root],
                            stderr=subprocess.PIPE, text=True)
           for _ in range(2)]
  errs = [p.communicate(timeout=120)[1] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], errs
  assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  assert sorted(os.listdir(tmp_path)) == ["curves.png"]  # No leftovers.
