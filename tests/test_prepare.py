"""Offline tfds preparation: raw files are checked against tfds' registered
official checksums before the (TensorFlow) builder runs."""

import hashlib
import subprocess
import sys

import pytest

from jirm.data import prepare


def test_registry_names_the_official_files(tmp_path):
  exp = prepare.expected_files("mnist", str(tmp_path))
  assert sorted(exp) == ["t10k-images-idx3-ubyte.gz",
                         "t10k-labels-idx1-ubyte.gz",
                         "train-images-idx3-ubyte.gz",
                         "train-labels-idx1-ubyte.gz"]
  assert exp["train-labels-idx1-ubyte.gz"][2].startswith("3552534a")
  assert list(prepare.expected_files("cifar10", str(tmp_path))) == [
      "cifar-10-binary.tar.gz"]
  with pytest.raises(prepare.PrepareError, match="'svhn'"):
    prepare.expected_files("svhn", str(tmp_path))


def test_missing_and_corrupt_files_are_named(tmp_path):
  good, bad = b"official bytes", b"corrupted!!!!!"
  (tmp_path / "a.gz").write_bytes(good)
  (tmp_path / "b.gz").write_bytes(bad)
  sha = hashlib.sha256(good).hexdigest()
  expected = {"a.gz": ("https://x/a.gz", len(good), sha),
              "b.gz": ("https://x/b.gz", len(good), sha),
              "c.gz": ("https://x/c.gz", 3, sha)}
  with pytest.raises(prepare.PrepareError) as e:
    prepare.check_raw_files(str(tmp_path), expected)
  msg = str(e.value)
  assert "a.gz" not in msg.replace("https://x/a.gz", "")  # a.gz is fine.
  assert "b.gz has sha256" in msg and "missing" in msg and "c.gz" in msg
  prepare.check_raw_files(str(tmp_path), {"a.gz": expected["a.gz"]})


def test_cli_reports_missing_raw_files(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "jirm.data.prepare", "--dataset=mnist",
       f"--manual_dir={tmp_path}", f"--data_dir={tmp_path / 'out'}"],
      capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 2
  assert "missing" in proc.stderr and "train-images-idx3-ubyte.gz" in \
      proc.stderr and "storage.googleapis.com" in proc.stderr


def test_tensorflow_requirement_is_explained():
  try:
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
    pytest.skip("TensorFlow is installed here")
  except ImportError:
    pass
  with pytest.raises(prepare.PrepareError, match=r"jirm\[prepare\]"):
    prepare.require_tensorflow()
