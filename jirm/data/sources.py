"""Sources: tfds-prepared datasets read without TensorFlow, cached as .npz,
and synthetic MNIST / CIFAR-shaped stand-ins for tests.

``tfds.data_source(..., download=False)`` reads the prepared array_record
files; the ``.npz`` cache makes later loads take well under a second.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import tempfile
import warnings
from typing import Optional

import numpy as np

from jirm.data.envs import DataError

# ----------------------------------------------------------------------------
# tfds sources.


def resolve_data_dir(data_dir: Optional[str] = None) -> str:
  """``data_dir`` if given, else ``$TFDS_DATA_DIR``, else tfds' default."""
  if data_dir:
    return os.path.abspath(os.path.expanduser(data_dir))
  if os.environ.get("TFDS_DATA_DIR"):
    return os.path.abspath(os.path.expanduser(os.environ["TFDS_DATA_DIR"]))
  return os.path.expanduser(os.path.join("~", "tensorflow_datasets"))


def _cache_dir() -> str:
  return os.environ.get("JIRM_CACHE_DIR") or os.path.expanduser(
      os.path.join("~", ".cache", "jirm"))


def _atomic_savez(path: str, **arrays) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".npz.tmp")
  try:
    with os.fdopen(fd, "wb") as f:  # A file object: numpy adds no suffix.
      np.savez(f, **arrays)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def load_tfds(name: str, split: str, data_dir: Optional[str] = None,
              cache: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Decodes a prepared tfds image dataset into ``(images_NHWC, labels_N)``.

  Reads array_record files with ``tfds.data_source(download=False)`` (no
  TensorFlow) in batched reads, and caches the decoded arrays under
  ``$JIRM_CACHE_DIR`` (default ``~/.cache/jirm``), keyed by every record
  file's path, size and mtime and verified on read (SHA-256 of the arrays:
  a truncated or garbled cache is rebuilt with a warning).

  Args:
    name: tfds name, e.g. ``'mnist'`` or ``'cifar10'``.
    split: ``'train'`` or ``'test'``.
    data_dir: folder holding ``name/VERSION/``; see :func:`resolve_data_dir`.
    cache: read/write the decoded ``.npz`` cache.

  Returns:
    ``(images uint8 [N, H, W, C], labels int32 [N])`` in tfds' stored order.

  Raises:
    DataError: the prepared dataset is not under ``data_dir``, or its
      record files cannot be read (the message names them and the fix).
  """
  root = resolve_data_dir(data_dir)
  pattern = os.path.join(root, name, "*", f"{name}-{split}.array_record*")
  files = sorted(glob.glob(pattern))
  if not files:
    raise DataError(
        f"prepared tfds dataset '{name}' (split '{split}', array_record) not "
        f"found under {root}. Fix: pass --data_dir or set TFDS_DATA_DIR to a "
        f"folder holding {name}/<version>/ (e.g. ../shared/tensorflow_datasets)"
        f", or prepare it with `pip install jirm[prepare]` and "
        f"tfds.builder('{name}', file_format='array_record')"
        f".download_and_prepare().")
  stats = [(f, os.stat(f)) for f in files]
  key = hashlib.sha1("|".join(
      f"{f}|{st.st_size}|{st.st_mtime_ns}"
      for f, st in stats).encode()).hexdigest()[:16]
  cache_path = os.path.join(_cache_dir(), f"{name}-{split}-{key}.npz")
  if cache and os.path.exists(cache_path):
    arrays = _read_cache(cache_path)
    if arrays is not None:
      return arrays
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  verbosity = absl_logging.get_verbosity()
  # tfds warns on every first decode that OpenCV is missing (PIL decodes):
  # noise on stderr, where jirm's errors are one line.
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    source = tfds.data_source(name, split=split, data_dir=root,
                              download=False)
    images, labels = [], []
    for start in range(0, len(source), 10_000):
      rows = source.__getitems__(
          list(range(start, min(start + 10_000, len(source)))))
      images.append(np.stack([r["image"] for r in rows]))
      labels.append(np.asarray([r["label"] for r in rows], np.int32))
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(
        f"prepared tfds dataset '{name}' (split '{split}') under {root} "
        f"cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]}"
        f" in {', '.join(files)}). Fix: prepare it again, e.g. python -m "
        f"jirm.data.prepare --dataset={name} --manual_dir=RAW "
        f"--data_dir={root}.") from e
  finally:
    absl_logging.set_verbosity(verbosity)
  images, labels = np.concatenate(images), np.concatenate(labels)
  if cache:
    _atomic_savez(cache_path, images=images, labels=labels,
                  sha256=np.asarray(_digest(images, labels)))
  return images, labels


def _digest(images, labels) -> str:
  h = hashlib.sha256()
  for a in (images, labels):
    h.update(f"{a.dtype}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).data)
  return h.hexdigest()


def _read_cache(path: str):
  """The cached ``(images, labels)``, or None (with a warning, the file
  removed) if it is truncated, garbled or fails its checksum."""
  try:
    with np.load(path) as z:
      if "sha256" not in z.files:
        digest = None
      else:
        images, labels, digest = z["images"], z["labels"], str(z["sha256"])
    if digest is None:
      problem = "no checksum: written by an older jirm"
    elif digest == _digest(images, labels):
      return images, labels
    else:
      problem = "its checksum does not match"
  except Exception as e:  # pylint: disable=broad-except
    problem = f"{type(e).__name__}: {e}"
  warnings.warn(f"decoded-data cache {path} is corrupt ({problem}); "
                f"rebuilding it from the prepared dataset.")
  with contextlib.suppress(OSError):
    os.remove(path)
  return None


def load_mnist(split: str = "train", data_dir: Optional[str] = None):
  """MNIST as ``(images uint8 [N, 28, 28], labels int32 [N])``."""
  images, labels = load_tfds("mnist", split, data_dir)
  return images[..., 0], labels


def synthetic_mnist(num_train: int = 2000, num_test: int = 500,
                    seed: int = 0):
  """Random MNIST-shaped ``(train, test)`` pairs for tests (no download).

  Digit classes are made linearly recognisable (class-dependent bright
  blocks) so models can learn the shape signal.
  """
  rng = np.random.default_rng(seed)

  def make(n):
    digits = rng.integers(0, 10, n).astype(np.int32)
    img = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
    for d in range(10):
      sel = digits == d
      r, c = divmod(d, 5)
      img[sel, 4 + r * 10:12 + r * 10, 2 + c * 5:6 + c * 5] = 255
    return img, digits

  return make(num_train), make(num_test)


def synthetic_cifar_mnist_sources(num_per_class: int = 300, seed: int = 0):
  """Random stand-ins for pooled MNIST and CIFAR-10 (tests): digits 0/1 and
  classes 1/9 with distinguishable mean intensities."""
  rng = np.random.default_rng(seed)
  n = 2 * num_per_class
  m_lab = np.repeat(np.array([0, 1], np.int32), num_per_class)
  m_img = (rng.random((n, 28, 28, 1)) * 100 + 100 * m_lab[:, None, None,
                                                           None]).astype(np.uint8)
  c_lab = np.repeat(np.array([1, 9], np.int32), num_per_class)
  c_img = (rng.random((n, 32, 32, 3)) * 100 + 10 * c_lab[:, None, None,
                                                          None]).astype(np.uint8)
  return m_img, m_lab, c_img, c_lab
