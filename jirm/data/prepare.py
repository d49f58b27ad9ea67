r"""Builds a tfds array_record dataset offline from the official raw files.

  python -m jirm.data.prepare --dataset=mnist --manual_dir=/raw/mnist \
      --data_dir=/shared/tensorflow_datasets

For clusters without internet: copy the official files (names below) into
``--manual_dir``; they are checked against the sizes and SHA-256 checksums
tfds registers for its official builder, then the builder itself prepares
the dataset (``file_format='array_record'``, readable by
``tfds.data_source`` and every jirm loader). Preparing needs TensorFlow:
``pip install 'jirm[prepare]'``. Reading does not.

| dataset | files in --manual_dir |
|---|---|
| mnist, fashion_mnist | train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz |
| cifar10 | cifar-10-binary.tar.gz |
"""

from __future__ import annotations

import hashlib
import os
import sys

from absl import app
from absl import flags

DATASETS = ("mnist", "fashion_mnist", "cifar10")


class PrepareError(ValueError):
  """A raw file is missing or is not the official one, or TF is missing."""


def expected_files(dataset: str, data_dir: str) -> dict:
  """``filename -> (url, size_bytes, sha256)`` registered by tfds' official
  builder for ``dataset``."""
  if dataset not in DATASETS:
    raise PrepareError(f"--dataset={dataset!r}: choose one of {DATASETS}.")
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(dataset, data_dir=data_dir)
  return {info.filename: (url, int(info.size), info.checksum)
          for url, info in (builder.url_infos or {}).items()}


def check_raw_files(manual_dir: str, expected: dict) -> None:
  """Raises :class:`PrepareError` naming every missing or wrong file."""
  problems = []
  for name, (url, size, sha) in sorted(expected.items()):
    path = os.path.join(manual_dir, name)
    if not os.path.exists(path):
      problems.append(f"missing {path} (official copy: {url})")
      continue
    got_size = os.path.getsize(path)
    if got_size != size:
      problems.append(f"{path} has {got_size} bytes, the official file has "
                      f"{size} ({url})")
      continue
    h = hashlib.sha256()
    with open(path, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
    if h.hexdigest() != sha:
      problems.append(f"{path} has sha256 {h.hexdigest()}, the official file "
                      f"has {sha} ({url})")
  if problems:
    raise PrepareError("raw files do not match the official release:\n  " +
                       "\n  ".join(problems))


def require_tensorflow() -> None:
  try:
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise PrepareError("preparing a tfds dataset needs TensorFlow: "
                       "pip install 'jirm[prepare]' (reading prepared data "
                       "does not).") from e


def prepare(dataset: str, manual_dir: str, data_dir: str) -> str:
  """Checks the raw files and builds ``data_dir/<dataset>/<version>``.

  Returns:
    The prepared dataset directory.
  """
  manual_dir, data_dir = os.path.abspath(manual_dir), os.path.abspath(data_dir)
  check_raw_files(manual_dir, expected_files(dataset, data_dir))
  require_tensorflow()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(dataset, data_dir=data_dir,
                         file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir, download_mode=tfds.download.GenerateMode
      .REUSE_DATASET_IF_EXISTS))
  return str(builder.data_dir)


def main(argv):
  del argv
  try:
    path = prepare(flags.FLAGS.dataset, flags.FLAGS.manual_dir,
                   flags.FLAGS.data_dir)
  except PrepareError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"prepared {path}")


if __name__ == "__main__":
  flags.DEFINE_enum("dataset", "mnist", DATASETS, "Dataset to build.")
  flags.DEFINE_string("manual_dir", None, "Folder with the official raw "
                      "files.", required=True)
  flags.DEFINE_string("data_dir", None, "tfds data dir to write.",
                      required=True)
  app.run(main)
