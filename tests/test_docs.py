"""The API reference builds and every docstring cross-reference resolves;
docs/results.md is regenerated from the committed output directories."""

import importlib.util
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(path, name):
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_no_broken_cross_references():
  mod = _load(os.path.join(ROOT, "scripts", "build_api_docs.py"), "api_docs")
  bad, total = mod.broken_references()
  assert total > 150
  assert not bad, bad


def test_checker_catches_a_broken_reference():
  mod = _load(os.path.join(ROOT, "scripts", "build_api_docs.py"), "api_docs")
  import jirm.train  # pylint: disable=g-import-not-at-top
  assert mod._resolve("jirm.train.fit", jirm.train)  # pylint: disable=protected-access
  assert mod._resolve("fit", jirm.train)  # pylint: disable=protected-access
  assert not mod._resolve("jirm.train.no_such_fn", jirm.train)  # pylint: disable=protected-access


def test_api_reference_builds(tmp_path):
  proc = subprocess.run([sys.executable,
                         os.path.join(ROOT, "scripts", "build_api_docs.py"),
                         "--out", str(tmp_path)], capture_output=True,
                        text=True, timeout=600, cwd=ROOT, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for page in ("jirm.html", "jirm/objectives.html", "jirm/sweep.html",
               "jirm/data/shift.html"):
    assert (tmp_path / page).exists(), page
  assert "fit_sweep" in (tmp_path / "jirm" / "sweep.html").read_text()


def test_results_page_from_output_directories(tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  from experiments import results_page  # pylint: disable=g-import-not-at-top
  src = os.path.join(ROOT, "docs", "results", "colored_mnist")
  dst = tmp_path / "results" / "colored_mnist"
  shutil.copytree(src, dst)
  (dst / "summary.md").unlink()  # Rebuilt from results.jsonl.
  page = results_page.build_page(str(tmp_path / "results"), "test machine",
                                 str(tmp_path / "results.md"))
  assert "## ColoredMNIST" in page and "Machine: test machine" in page
  assert "70.8 ± 0.9 / 66.9 ± 2.5" in page  # The published IRMv1 row.
  assert "| irmv1 | paper | last | 10 |" in page
  assert "![colored_mnist/curves.png](results/colored_mnist/curves.png)" in page
  assert "python -m experiments.colored_mnist" in page
  assert (dst / "summary.md").exists()
