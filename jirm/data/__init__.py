"""Environments for IRM research: tfds-backed sources and seeded builders.

Every builder returns an :class:`EnvSplits` whose arrays carry an explicit
environment axis (``x_ExN...``, ``y_ExN``) plus two per-sample flags:
``agree`` (the spurious feature agrees with the label) and ``valid`` (the
sample is real, not padding; environments of unequal size are padded).

Sources are read with ``tfds.data_source(..., download=False)`` from prepared
array_record files (no TensorFlow needed) and cached as ``.npz`` so later loads
take well under a second.

Example:
  >>> splits = jirm.data.colored_mnist(seed=0)           # IRM's recipe
  >>> splits.train.x.shape, splits.test.x.shape
  ((2, 25000, 14, 14, 2), (1, 10000, 14, 14, 2))
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import os
import tempfile
import warnings
from typing import Optional, Sequence

import numpy as np


class DataError(ValueError):
  """A dataset is missing or a builder got invalid parameters."""


# ----------------------------------------------------------------------------
# Containers.


@dataclasses.dataclass(frozen=True)
class Envs:
  """A stack of environments with an explicit env axis.

  Attributes:
    x: inputs ``[E, N, ...]`` (float32).
    y: labels ``[E, N]`` (int32 for classification, float32 for regression).
    agree: ``[E, N]`` bool, the spurious attribute agrees with the label.
    valid: ``[E, N]`` bool, False on padding rows.
    names: one name per environment.
    spurious: per-environment spurious parameter (e.g. colour-flip prob.).
    aux: optional auxiliary variables ``[E, N, Z]`` (float32) that a method
      may use to infer environments (ZIN / Minimax-TV), e.g. a time index.
  """

  x: np.ndarray
  y: np.ndarray
  agree: np.ndarray
  valid: np.ndarray
  names: tuple[str, ...]
  spurious: tuple[float, ...]
  aux: Optional[np.ndarray] = None

  @property
  def num_envs(self) -> int:
    return self.x.shape[0]

  @property
  def sizes(self) -> tuple[int, ...]:
    return tuple(int(v) for v in self.valid.sum(1))

  def select(self, idx: Sequence[int]) -> "Envs":
    idx = list(idx)
    return Envs(self.x[idx], self.y[idx], self.agree[idx], self.valid[idx],
                tuple(self.names[i] for i in idx),
                tuple(self.spurious[i] for i in idx),
                None if self.aux is None else self.aux[idx])


@dataclasses.dataclass(frozen=True)
class EnvSplits:
  """Train, test and (optional) training-domain validation environments.

  Attributes:
    train: training environments.
    test: test environment(s).
    val: held-out samples from the *training* domains (one per train env),
      used by the ``train_domain_val`` model-selection rule; may be None.
    task: ``'binary'``, ``'multiclass'`` or ``'regression'``.
    info: dataset parameters, recorded in results files.
  """

  train: Envs
  test: Envs
  val: Optional[Envs]
  task: str
  info: dict


def stack_envs(xs, ys, agrees, names, spurious) -> Envs:
  """Pads a list of per-env arrays to a common length and stacks them."""
  n = max(len(y) for y in ys)
  e = len(xs)
  x = np.zeros((e, n) + xs[0].shape[1:], np.float32)
  y = np.zeros((e, n), ys[0].dtype)
  agree = np.zeros((e, n), bool)
  valid = np.zeros((e, n), bool)
  for i, (xi, yi, ai) in enumerate(zip(xs, ys, agrees)):
    x[i, :len(yi)], y[i, :len(yi)], agree[i, :len(yi)] = xi, yi, ai
    valid[i, :len(yi)] = True
  return Envs(x, y, agree, valid, tuple(names),
              tuple(float(s) for s in spurious))


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


def _count(name: str, value, minimum: int, what: str) -> int:
  """``value`` as an int if it is a whole number >= ``minimum``, else a
  DataError naming it (no silent truncation of 2.5 to 2)."""
  ok = (not isinstance(value, bool) and
        isinstance(value, (int, np.integer, float, np.floating)) and
        float(value).is_integer() and value >= minimum)
  if not ok:
    raise DataError(f"{name}={value!r}: a whole number of images, {what} "
                    f"({minimum} here).")
  return int(value)


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


# ----------------------------------------------------------------------------
# Validation helpers.


def _check_prob(name: str, value: float) -> None:
  if not 0.0 <= float(value) <= 1.0:
    raise DataError(f"{name}={value!r} is not a probability; use a value in "
                    f"[0, 1].")


def _check_num_envs(num_envs: int) -> None:
  if int(num_envs) < 2:
    raise DataError(f"num_envs={num_envs!r}: IRM needs at least 2 training "
                    f"environments; use num_envs >= 2.")


# ----------------------------------------------------------------------------
# ColoredMNIST.


def color_digits(images_NHW: np.ndarray, digits_N: np.ndarray, e: float,
                 rng: np.random.Generator, label_noise: float = 0.25,
                 grayscale: bool = False):
  """IRM's colouring of one environment.

  y = (digit < 5) flipped with prob ``label_noise``; colour = y flipped with
  prob ``e``; image copied into 2 channels and channel ``1 - colour`` zeroed;
  x / 255. With ``grayscale`` the colour is dropped (one channel).

  Returns:
    ``(x [N, H, W, C] float32, y [N] int32, agree [N] bool)``.
  """
  n = len(digits_N)
  y = (digits_N < 5).astype(np.int32)
  y ^= (rng.random(n) < label_noise).astype(np.int32)
  flip = rng.random(n) < e
  color = y ^ flip.astype(np.int32)
  img = images_NHW.astype(np.float32) / 255.0
  if grayscale:
    x = img[..., None]
  else:
    x = np.stack([img, img], axis=-1)
    x[np.arange(n), :, :, 1 - color] = 0.0
  return x, y, ~flip


def _split_train_val(train_idx_list, val_fraction, rng):
  """Splits each env's indices into (train, val) by a held-out fraction."""
  train, val = [], []
  for idx in train_idx_list:
    idx = rng.permutation(idx)
    n_val = int(round(len(idx) * val_fraction))
    val.append(idx[:n_val])
    train.append(idx[n_val:])
  return train, val


def _build(images, digits, groups, es, names, rng, label_noise, grayscale,
           downsample):
  xs, ys, ags = [], [], []
  for idx, e in zip(groups, es):
    img = images[idx]
    if downsample:
      img = img[:, ::2, ::2]
    x, y, a = color_digits(img, digits[idx], e, rng, label_noise, grayscale)
    xs.append(x)
    ys.append(y)
    ags.append(a)
  return stack_envs(xs, ys, ags, names, es)


def colored_mnist(seed: int = 0, *, variant: str = "irm",
                  train_es: Optional[Sequence[float]] = None,
                  test_e: float = 0.9, data_num: int = 50_000,
                  num_envs: Optional[int] = None, label_noise: float = 0.25,
                  grayscale: bool = False, val: str = "mnist_test",
                  val_fraction: float = 0.2,
                  test_envs: Sequence[int] = (2,),
                  data_dir: Optional[str] = None,
                  mnist=None) -> EnvSplits:
  """ColoredMNIST environments (Arjovsky et al. 2019 and variants).

  Variants (SPEC §5):
    * ``'irm'``: MNIST train, first ``data_num`` (50k) shuffled by ``seed``;
      train envs ``[::2]``, ``[1::2]`` with e = ``train_es`` (0.2, 0.1); test =
      the remaining images with e = ``test_e`` (0.9). 14x14x2.
    * ``'lin'`` (Lin et al.: SparseIRM, BayesianIRM): as ``'irm'`` but
      ``num_envs`` envs ``[i::E]`` with e_i = 0.1 + 0.1 i / (E - 1).
    * ``'domainbed'``: all 70k MNIST images pooled and shuffled, 3 envs
      ``[i::3]`` with e in (0.1, 0.2, 0.9), 28x28x2; ``test_envs`` picks the
      held-out env(s).

  Training-domain validation (``val``): ``'mnist_test'`` colours the MNIST test
  split with the training e's (fresh samples of the training domains, training
  set unchanged; not available for ``'domainbed'``), ``'holdout'`` holds out
  ``val_fraction`` of each training env (DomainBed), ``'none'``.

  MNIST is read in tfds' stored order, so the 50k subset differs from
  torchvision's first 50k; the recipe is otherwise IRM's.

  Args:
    seed: seeds the shuffle, label noise and colours.
    variant: ``'irm'``, ``'lin'`` or ``'domainbed'``.
    train_es: colour-flip probabilities of the training envs (variant default
      when None).
    test_e: colour-flip probability of the test env.
    data_num: number of training images (``'irm'``/``'lin'``).
    num_envs: number of training envs: ``'lin'`` makes this many (None:
      2); ``'irm'`` and ``'domainbed'`` have theirs from ``train_es`` (and
      ``test_envs``), and a ``num_envs`` that differs is refused rather
      than recorded and ignored.
    label_noise: label flip probability (0.25).
    grayscale: drop colour (the oracle's input).
    val: ``'mnist_test'``, ``'holdout'`` or ``'none'``.
    val_fraction: held-out fraction for ``val='holdout'``.
    test_envs: held-out env indices for ``'domainbed'``.
    data_dir: tfds data dir (see :func:`resolve_data_dir`).
    mnist: optional ``(train, test)`` pairs of ``(images, digits)`` to use
      instead of tfds (tests).

  Returns:
    An :class:`EnvSplits` with task ``'binary'``.

  Raises:
    DataError: on invalid parameters or missing data.

  Example:
    >>> splits = colored_mnist(seed=1, variant='lin', data_num=20_000)
  """
  if variant not in ("irm", "lin", "domainbed"):
    raise DataError(f"variant={variant!r}: choose 'irm', 'lin' or "
                    f"'domainbed'.")
  if val not in ("mnist_test", "holdout", "none"):
    raise DataError(f"val={val!r}: choose 'mnist_test', 'holdout' or 'none'.")
  if variant == "irm":
    train_es = tuple(train_es) if train_es is not None else (0.2, 0.1)
  elif variant == "lin":
    num_envs = 2 if num_envs is None else num_envs
    _check_num_envs(num_envs)
    train_es = tuple(train_es) if train_es is not None else tuple(
        0.1 + 0.1 * i / (num_envs - 1) for i in range(num_envs))
  else:
    train_es = tuple(train_es) if train_es is not None else (0.1, 0.2, 0.9)
  made = (len(train_es) if variant != "domainbed" else
          len(train_es) - len(test_envs))
  _check_num_envs(made)
  if num_envs is not None and num_envs != made:
    raise DataError(f"num_envs={num_envs!r}: variant={variant!r} makes "
                    f"{made} training envs (from train_es"
                    f"{' and test_envs' if variant == 'domainbed' else ''});"
                    f" use variant='lin' for {num_envs} envs, or pass "
                    f"train_es with {num_envs} values.")
  for i, e in enumerate(train_es):
    _check_prob(f"train_es[{i}]", e)
  _check_prob("test_e", test_e)
  _check_prob("label_noise", label_noise)
  _check_prob("val_fraction", val_fraction)
  if variant != "domainbed":
    n_env = len(train_es) + (1 if val == "holdout" else 0)
    if (isinstance(data_num, bool) or
        not isinstance(data_num, (int, np.integer)) or
        data_num < 2 * n_env):
      raise DataError(f"data_num={data_num!r}: a whole number of training "
                      f"images, at least 2 per environment "
                      f"({2 * n_env} here).")
  if mnist is None:
    mnist = (load_mnist("train", data_dir), load_mnist("test", data_dir))
  (tr_img, tr_dig), (te_img, te_dig) = mnist
  if len(tr_img) != len(tr_dig) or len(te_img) != len(te_dig):
    raise DataError(f"mnist images and labels differ in length: train "
                    f"{len(tr_img)} / {len(tr_dig)}, test {len(te_img)} / "
                    f"{len(te_dig)}.")
  rng = np.random.default_rng(seed)
  info = dict(dataset="colored_mnist", variant=variant, seed=seed,
              train_es=list(train_es), label_noise=label_noise,
              grayscale=grayscale, val=val)
  build = lambda img, dig, groups, es, names, down: _build(
      img, dig, groups, es, names, rng, label_noise, grayscale, down)

  if variant == "domainbed":
    if val == "mnist_test":
      raise DataError("val='mnist_test' is not available for the DomainBed "
                      "variant (it pools all 70k images); use val='holdout'.")
    images = np.concatenate([tr_img, te_img])
    digits = np.concatenate([tr_dig, te_dig])
    perm = rng.permutation(len(digits))
    n_env = len(train_es)
    bad = [t for t in test_envs if not 0 <= t < n_env]
    if bad:
      raise DataError(f"test_envs={list(test_envs)} has indices outside "
                      f"[0, {n_env}); pick env indices of {list(train_es)}.")
    groups = [perm[i::n_env] for i in range(n_env)]
    tr_ids = [i for i in range(n_env) if i not in test_envs]
    tr_groups = [groups[i] for i in tr_ids]
    val_groups = None
    if val == "holdout":
      tr_groups, val_groups = _split_train_val(tr_groups, val_fraction, rng)
    names = [f"env{i}(e={train_es[i]:g})" for i in range(n_env)]
    train = build(images, digits, tr_groups, [train_es[i] for i in tr_ids],
                  [names[i] for i in tr_ids], False)
    test = build(images, digits, [groups[i] for i in test_envs],
                 [train_es[i] for i in test_envs],
                 [names[i] for i in test_envs], False)
    valid = None if val_groups is None else build(
        images, digits, val_groups, [train_es[i] for i in tr_ids],
        [names[i] + "/val" for i in tr_ids], False)
    info.update(test_envs=list(test_envs))
    return EnvSplits(train, test, valid, "binary", info)

  if not 0 < data_num < len(tr_dig):
    raise DataError(f"data_num={data_num} must be in [1, {len(tr_dig) - 1}] "
                    f"(the MNIST train split has {len(tr_dig)} images and the "
                    f"rest forms the test env).")
  perm = np.concatenate([rng.permutation(data_num),
                         np.arange(data_num, len(tr_dig))])
  n_env = len(train_es)
  tr_groups = [perm[:data_num][i::n_env] for i in range(n_env)]
  val_groups = None
  if val == "holdout":
    tr_groups, val_groups = _split_train_val(tr_groups, val_fraction, rng)
  names = [f"train{i}(e={e:g})" for i, e in enumerate(train_es)]
  train = build(tr_img, tr_dig, tr_groups, train_es, names, True)
  test = build(tr_img, tr_dig, [perm[data_num:]], [test_e],
               [f"test(e={test_e:g})"], True)
  valid = None
  if val == "holdout":
    valid = build(tr_img, tr_dig, val_groups, train_es,
                  [n + "/val" for n in names], True)
  elif val == "mnist_test":
    te_perm = rng.permutation(len(te_dig))
    valid = build(te_img, te_dig, [te_perm[i::n_env] for i in range(n_env)],
                  train_es, [n + "/val" for n in names], True)
  info.update(data_num=data_num, test_e=test_e)
  return EnvSplits(train, test, valid, "binary", info)


# ----------------------------------------------------------------------------
# FullColoredMNIST (SparseIRM): 10 classes, 10 colours.

FULL_COLORS = np.array([(1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 0, 0), (0, 1, 0),
                        (1, 0.5, 0), (0, 0, 1), (1, 1, 1), (0, 0.4, 0.8),
                        (0.8, 0, 0.4)], np.float32)


def color_digits_full(images_NHW: np.ndarray, digits_N: np.ndarray,
                      cons: float, rng: np.random.Generator,
                      label_noise: float = 0.2, grayscale: bool = False):
  """SparseIRM's FullColoredMNIST colouring of one environment.

  With prob ``label_noise`` the label becomes a uniformly random other
  class; with prob ``1 - cons`` the colour is that of a uniformly random
  other class, else the label's colour (:data:`FULL_COLORS`); x = image *
  colour / 255 (3 channels), or the grey image with ``grayscale``.

  Returns:
    ``(x [N, H, W, C] float32, y [N] int32, agree [N] bool)``.
  """
  n = len(digits_N)
  other = lambda c: (c + rng.integers(1, 10, n)) % 10
  y = digits_N.astype(np.int32)
  y = np.where(rng.random(n) < label_noise, other(y), y).astype(np.int32)
  agree = rng.random(n) < cons
  color = np.where(agree, y, other(y))
  img = images_NHW.astype(np.float32)[..., None] / 255.0
  x = img if grayscale else img * FULL_COLORS[color][:, None, None, :]
  return x.astype(np.float32), y, agree


def full_colored_mnist(seed: int = 0, *, data_num: int = 50_000,
                       train_cons: Sequence[float] = (0.999, 0.7),
                       test_cons: float = 0.1, label_noise: float = 0.2,
                       grayscale: bool = False, val: str = "mnist_test",
                       data_dir: Optional[str] = None,
                       mnist=None) -> EnvSplits:
  """FullColoredMNIST (SparseIRM, SPEC §5): 10 classes, 14x14x3.

  MNIST train: the first ``data_num`` images (shuffled by ``seed``) split
  ``[i::E]`` over the training envs with colour consistency ``train_cons``
  (SparseIRM: 0.999, 0.7 or 0.9, 0.7); the remaining images form the test
  env (consistency ``test_cons``). ``val='mnist_test'`` colours the MNIST
  test split with the training consistencies; ``'none'`` skips it.

  Returns:
    An :class:`EnvSplits` with task ``'multiclass'``.

  Example:
    >>> splits = full_colored_mnist(seed=0, train_cons=(0.9, 0.7))
  """
  _check_num_envs(len(train_cons))
  for i, c in enumerate(train_cons):
    _check_prob(f"train_cons[{i}]", c)
  _check_prob("test_cons", test_cons)
  _check_prob("label_noise", label_noise)
  if val not in ("mnist_test", "none"):
    raise DataError(f"val={val!r}: choose 'mnist_test' or 'none'.")
  if mnist is None:
    mnist = (load_mnist("train", data_dir), load_mnist("test", data_dir))
  (tr_img, tr_dig), (te_img, te_dig) = mnist
  if not 0 < data_num < len(tr_dig):
    raise DataError(f"data_num={data_num} must be in [1, {len(tr_dig) - 1}].")
  rng = np.random.default_rng(seed)
  perm = rng.permutation(data_num)
  n_env = len(train_cons)

  def build(img, dig, groups, conss, names):
    xs, ys, ags = [], [], []
    for idx, c in zip(groups, conss):
      x, y, a = color_digits_full(img[idx][:, ::2, ::2], dig[idx], c, rng,
                                  label_noise, grayscale)
      xs.append(x)
      ys.append(y)
      ags.append(a)
    return stack_envs(xs, ys, ags, names, conss)

  names = [f"train{i}(cons={c:g})" for i, c in enumerate(train_cons)]
  train = build(tr_img, tr_dig, [perm[i::n_env] for i in range(n_env)],
                train_cons, names)
  test = build(tr_img, tr_dig, [np.arange(data_num, len(tr_dig))],
               [test_cons], [f"test(cons={test_cons:g})"])
  valid = None
  if val == "mnist_test":
    te_perm = rng.permutation(len(te_dig))
    valid = build(te_img, te_dig, [te_perm[i::n_env] for i in range(n_env)],
                  train_cons, [n + "/val" for n in names])
  info = dict(dataset="full_colored_mnist", seed=seed, data_num=data_num,
              train_cons=list(train_cons), test_cons=test_cons,
              label_noise=label_noise, grayscale=grayscale, val=val)
  return EnvSplits(train, test, valid, "multiclass", info)


# ----------------------------------------------------------------------------
# Linear synthetic environments (SparseIRM Section 3.2).


def linear_synthetic(seed: int = 0, *, dim_inv: int = 5, dim_spu: int = 5,
                     dim_noise: int = 5,
                     train_alphas: Sequence[float] = (0.1, 1.0),
                     test_alpha: float = 10.0, n_per_env: int = 1000,
                     noise_std: float = 1.0, n_val: int = 0) -> EnvSplits:
  """Linear regression environments with known invariant coordinates.

  y = gamma^T x_inv + eps; x_s = y * 1 + alpha_e * eps_s; x_r = eps_r;
  features ``[x_inv, x_s, x_r]``. Only ``x_inv`` (the first ``dim_inv``
  coordinates) predicts y the same way in every environment; ``alpha_e``
  controls how reliable the spurious copy is in env e.

  Args:
    seed: RNG seed (gamma, samples).
    dim_inv, dim_spu, dim_noise: feature block sizes.
    train_alphas: spurious noise scale per training env (>= 2 envs).
    test_alpha: spurious noise scale of the test env.
    n_per_env: samples per env.
    noise_std: std of the label noise eps.
    n_val: samples per training env in the validation split (0 = none).

  Returns:
    :class:`EnvSplits` with task ``'regression'``; ``agree`` marks samples
    whose spurious block is within one ``noise_std`` of y.
  """
  _check_num_envs(len(train_alphas))
  for i, a in enumerate(list(train_alphas) + [test_alpha]):
    if a < 0:
      raise DataError(f"alpha {a!r} (env {i}) is negative; spurious noise "
                      f"scales must be >= 0.")
  if n_per_env < 2:
    raise DataError(f"n_per_env={n_per_env!r}: need at least 2 samples.")
  rng = np.random.default_rng(seed)
  gamma = rng.normal(size=dim_inv) / np.sqrt(dim_inv)

  def env(alpha, n):
    x_inv = rng.normal(size=(n, dim_inv))
    y = x_inv @ gamma + noise_std * rng.normal(size=n)
    x_s = y[:, None] + alpha * rng.normal(size=(n, dim_spu))
    x_r = rng.normal(size=(n, dim_noise))
    agree = np.abs(x_s.mean(1) - y) < noise_std
    return (np.concatenate([x_inv, x_s, x_r], 1).astype(np.float32),
            y.astype(np.float32), agree)

  names = [f"train{i}(alpha={a:g})" for i, a in enumerate(train_alphas)]
  tr = [env(a, n_per_env) for a in train_alphas]
  te = [env(test_alpha, n_per_env)]
  train = stack_envs(*zip(*tr), names, train_alphas)
  test = stack_envs(*zip(*te), [f"test(alpha={test_alpha:g})"], [test_alpha])
  val = None
  if n_val:
    va = [env(a, n_val) for a in train_alphas]
    val = stack_envs(*zip(*va), [n + "/val" for n in names], train_alphas)
  info = dict(dataset="linear_synthetic", seed=seed, dim_inv=dim_inv,
              dim_spu=dim_spu, dim_noise=dim_noise,
              train_alphas=list(train_alphas), test_alpha=test_alpha,
              gamma=gamma.tolist())
  return EnvSplits(train, test, val, "regression", info)


def _parse_probs(name: str, probs) -> tuple[float, ...]:
  if isinstance(probs, str):
    try:
      probs = [float(p) for p in probs.replace("_", ",").split(",") if p]
    except ValueError as e:
      raise DataError(f"{name}={probs!r}: expected numbers separated by "
                      f"commas, e.g. '0.999,0.7'.") from e
  probs = tuple(float(p) for p in probs)
  if not probs:
    raise DataError(f"{name} is empty; give at least one probability.")
  for p in probs:
    _check_prob(name, p)
  return probs


def zin_synthetic(seed: int = 0, *, train_cons="0.999,0.7",
                  test_cons="0.999,0.8,0.2,0.001", noise: float = 0.1,
                  dim_inv: int = 5, dim_spu: int = 5, num_train: int = 5000,
                  num_test: int = 5000, num_val: int = 0,
                  oracle: bool = False) -> EnvSplits:
  """ZIN's synthetic "logit_z" environments (Lin et al., NeurIPS 2022).

  Per environment with spurious agreement p: y ~ Bernoulli(0.5);
  a = 2|y - Bern(noise)| - 1 and b = 2|y - Bern(1 - p)| - 1 (both +-1);
  x = [N(0, I_dim_inv) + a, N(0, I_dim_spu) + b]. The invariant block
  predicts y with accuracy 1 - noise in every env (about 0.89 for a linear
  classifier at noise 0.1, 5 dims); the spurious block agrees with y with
  probability p, which differs between envs. ``num_train`` samples are split
  evenly over the training envs and ``num_test`` over the test envs
  (generated independently). The auxiliary variable is ZIN's time index:
  ``aux`` holds the position 0..N-1 of each sample in the concatenation of
  the envs (separately for train, test and val).

  Args:
    seed: RNG seed.
    train_cons: spurious agreement p of each training env (a sequence or a
      string such as ``'0.999,0.7'``; ZIN also uses ``'0.999,0.9'``).
    test_cons: p of each test env.
    noise: probability that the invariant feature disagrees with y.
    dim_inv, dim_spu: feature block sizes.
    num_train, num_test: total samples (split evenly over the envs).
    num_val: total samples of fresh training-domain data for the
      ``train_domain_val`` rule (0 = none).
    oracle: zero the spurious block (the invariant-only upper bound).

  Returns:
    :class:`EnvSplits`, task ``'binary'``; ``agree`` marks samples whose
    spurious block agrees with y.

  Example:
    >>> s = zin_synthetic(seed=0)
    >>> s.train.x.shape, s.test.x.shape, s.train.aux.shape
    ((2, 2500, 10), (4, 1250, 10), (2, 2500, 1))
  """
  train_cons = _parse_probs("train_cons", train_cons)
  test_cons = _parse_probs("test_cons", test_cons)
  _check_prob("noise", noise)
  if dim_inv < 1 or dim_spu < 0:
    raise DataError(f"dim_inv={dim_inv!r} must be >= 1 and dim_spu="
                    f"{dim_spu!r} >= 0.")
  for name, n, e in (("num_train", num_train, len(train_cons)),
                     ("num_test", num_test, len(test_cons))):
    if n < 2 * e:
      raise DataError(f"{name}={n!r} gives fewer than 2 samples to each of "
                      f"its {e} envs; raise it.")
  rng = np.random.default_rng(seed)

  def env(p, n):
    y = (rng.random(n) < 0.5).astype(np.int32)
    inv_flip = (rng.random(n) < noise).astype(np.int32)
    spu_flip = (rng.random(n) < 1.0 - p).astype(np.int32)
    a = 2.0 * np.abs(y - inv_flip) - 1.0
    b = 2.0 * np.abs(y - spu_flip) - 1.0
    x = np.concatenate([rng.normal(size=(n, dim_inv)) + a[:, None],
                        rng.normal(size=(n, dim_spu)) + b[:, None]], 1)
    if oracle:
      x[:, dim_inv:] = 0.0
    return x.astype(np.float32), y, spu_flip == 0

  def envs(cons, total, prefix):
    n = total // len(cons)
    parts = [env(p, n) for p in cons]
    out = stack_envs(*zip(*parts), [f"{prefix}{i}(p={p:g})"
                                    for i, p in enumerate(cons)], cons)
    time_EN1 = np.arange(len(cons) * n, dtype=np.float32).reshape(
        len(cons), n, 1)
    return dataclasses.replace(out, aux=time_EN1)

  train = envs(train_cons, num_train, "train")
  test = envs(test_cons, num_test, "test")
  val = envs(train_cons, num_val, "val") if num_val else None
  info = dict(dataset="zin_synthetic", seed=seed, train_cons=list(train_cons),
              test_cons=list(test_cons), noise=noise, dim_inv=dim_inv,
              dim_spu=dim_spu, num_train=num_train, num_test=num_test,
              num_val=num_val, oracle=oracle)
  return EnvSplits(train, test, val, "binary", info)


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


# ----------------------------------------------------------------------------
# CIFAR-MNIST (IRMBed).

CIFAR_MNIST_ENVS = {
    "2env": ((0.999, 0.8), 0.1, 10_000, 1_800),
    "4env": ((0.999, 0.95, 0.9, 0.8), 0.1, 10_000, 1_800),
    "birm": ((0.999, 0.7), 0.1, 10_000, 1_000),
}


def _env_counts(n: int, ratio: float) -> tuple[int, int, int, int]:
  """IRMBed's deterministic split of an env of n images into
  (truck+1, car+0, truck+0, car+1): int(n_class * ratio) agree per class."""
  cp = n // 2
  cn = n - cp
  cpmp, cnmn = int(cp * ratio), int(cn * ratio)
  return cpmp, cnmn, cp - cpmp, cn - cnmn


def cifar_mnist(seed: int = 0, *, envs: str = "2env",
                train_ratios: Optional[Sequence[float]] = None,
                test_ratio: Optional[float] = None,
                train_num: Optional[int] = None,
                test_num: Optional[int] = None, label_noise: float = 0.1,
                oracle: bool = False, val: str = "holdout",
                val_fraction: float = 0.1, data_dir: Optional[str] = None,
                sources=None) -> EnvSplits:
  """CIFAR-MNIST of IRMBed (Lin et al. 2022), SPEC §5: images ``[64, 32, 3]``.

  An MNIST 0 or 1 (padded to 32x32, 3 channels) is stacked **above** a
  CIFAR-10 automobile (label 0) or truck (label 1). Train and test splits of
  both sources are pooled; the CIFAR label is flipped with probability
  ``label_noise`` first (the noisy label is the target). Within an
  environment of n images, n//2 carry label 1, and exactly
  ``int(n_class * ratio)`` images of each class get the agreeing digit (1 for
  trucks, 0 for cars): the agreement fractions are deterministic. Train
  environments split ``train_num`` evenly; the test environment has
  ``test_num`` images. Images and digits are drawn without replacement from
  pools shuffled with ``seed`` (IRMBed draws them in storage order).

  Args:
    seed: shuffles the pools and draws the label noise.
    envs: ``'2env'`` (0.999, 0.8 / 0.1), ``'4env'`` (0.999, 0.95, 0.9, 0.8 /
      0.1), both 10,000 / 1,800, or ``'birm'`` (0.999, 0.7 / 0.1, test 1,000).
    train_ratios, test_ratio, train_num, test_num: override the preset.
    label_noise: probability of flipping the CIFAR label.
    oracle: blank MNIST half (the oracle ERM input).
    val: ``'holdout'`` (``val_fraction`` of every train env's budget, with
      the same exact agreement counts, kept out of training for train-domain
      validation) or ``'none'`` (IRMBed's exact sizes).
    val_fraction: holdout fraction.
    data_dir: tfds data dir holding ``mnist`` and ``cifar10``.
    sources: optional ``(mnist_images, mnist_labels, cifar_images,
      cifar_labels)`` (pooled, uint8 NHWC) instead of reading tfds; for tests.

  Returns:
    :class:`EnvSplits`, x float32 in [0, 1], y = noisy truck label,
    ``agree`` = digit agrees with the label.

  Raises:
    DataError: unknown preset, invalid ratios, too few source images, or the
      datasets are missing under ``data_dir``.
  """
  if envs not in CIFAR_MNIST_ENVS:
    raise DataError(f"envs={envs!r}: use one of {sorted(CIFAR_MNIST_ENVS)}.")
  p_train, p_test, p_ntrain, p_ntest = CIFAR_MNIST_ENVS[envs]
  train_ratios = tuple(p_train if train_ratios is None else train_ratios)
  test_ratio = p_test if test_ratio is None else test_ratio
  _check_num_envs(len(train_ratios))
  n_env = len(train_ratios) + (1 if val == "holdout" else 0)
  train_num = p_ntrain if train_num is None else _count(
      "train_num", train_num, 2 * n_env, "at least 2 per environment")
  test_num = p_ntest if test_num is None else _count(
      "test_num", test_num, 1, "at least 1")
  for r in train_ratios + (test_ratio,):
    _check_prob("agreement ratio", r)
  _check_prob("label_noise", label_noise)
  if val not in ("holdout", "none"):
    raise DataError(f"val={val!r}: use 'holdout' or 'none'.")
  if val == "holdout" and not 0.0 < val_fraction < 1.0:
    raise DataError(f"val_fraction={val_fraction!r}: use a value in (0, 1).")
  if sources is None:
    mi, ml = zip(*(load_tfds("mnist", s, data_dir) for s in ("train", "test")))
    ci, cl = zip(*(load_tfds("cifar10", s, data_dir)
                   for s in ("train", "test")))
    sources = (np.concatenate(mi), np.concatenate(ml), np.concatenate(ci),
               np.concatenate(cl))
  m_img, m_lab, c_img, c_lab = sources
  if len(m_img) != len(m_lab) or len(c_img) != len(c_lab):
    raise DataError(f"cifar_mnist sources: images and labels differ in "
                    f"length (mnist {len(m_img)} / {len(m_lab)}, cifar "
                    f"{len(c_img)} / {len(c_lab)}).")
  rng = np.random.default_rng(seed)
  # Pools: digits 1 / 0; noisy CIFAR label 1 (truck) / 0 (automobile).
  c_keep = np.flatnonzero((c_lab == 1) | (c_lab == 9))
  c_noisy = (c_lab[c_keep] == 9).astype(np.int32) ^ (
      rng.random(len(c_keep)) < label_noise)
  pools = {
      "m1": rng.permutation(np.flatnonzero(m_lab == 1)),
      "m0": rng.permutation(np.flatnonzero(m_lab == 0)),
      "c1": rng.permutation(c_keep[c_noisy == 1]),
      "c0": rng.permutation(c_keep[c_noisy == 0]),
  }
  cursor = dict.fromkeys(pools, 0)

  def take(pool, k):
    if cursor[pool] + k > len(pools[pool]):
      raise DataError(
          f"cifar_mnist needs more than {len(pools[pool])} images of pool "
          f"{pool!r} (train_num={train_num}, test_num={test_num}); lower "
          f"train_num / test_num.")
    out = pools[pool][cursor[pool]:cursor[pool] + k]
    cursor[pool] += k
    return out

  def mnist_part(idx):
    if oracle:
      return np.zeros((len(idx), 32, 32, 3), np.uint8)
    img = np.pad(m_img[idx].reshape(len(idx), 28, 28), ((0, 0), (2, 2), (2, 2)))
    return np.repeat(img[..., None], 3, axis=-1)

  def make_env(n, ratio):
    cpmp, cnmn, cpmn, cnmp = _env_counts(n, ratio)
    parts = [("m1", "c1", cpmp, 1, True), ("m0", "c0", cnmn, 0, True),
             ("m0", "c1", cpmn, 1, False), ("m1", "c0", cnmp, 0, False)]
    xs, ys, ag = [], [], []
    for mp, cp, k, label, agree in parts:
      top = mnist_part(take(mp, k))
      xs.append(np.concatenate([top, c_img[take(cp, k)]], axis=1))
      ys.append(np.full(k, label, np.int32))
      ag.append(np.full(k, agree))
    perm = rng.permutation(n)
    x = (np.concatenate(xs).astype(np.float32) / 255.0)[perm]
    return x, np.concatenate(ys)[perm], np.concatenate(ag)[perm]

  per_env = train_num // len(train_ratios)
  n_val = int(round(per_env * val_fraction)) if val == "holdout" else 0
  # Train and held-out parts are built separately so both have exact
  # agreement counts.
  train = [make_env(per_env - n_val, r) for r in train_ratios]
  held = [make_env(n_val, r) for r in train_ratios] if n_val else None
  test = make_env(test_num, test_ratio)
  names = [f"train_r{r:g}" for r in train_ratios]
  val_envs = None
  if held is not None:
    val_envs = stack_envs([t[0] for t in held], [t[1] for t in held],
                          [t[2] for t in held],
                          [f"val_r{r:g}" for r in train_ratios], train_ratios)
  train_envs = stack_envs([t[0] for t in train], [t[1] for t in train],
                          [t[2] for t in train], names, train_ratios)
  test_envs = stack_envs([test[0]], [test[1]], [test[2]],
                         [f"test_r{test_ratio:g}"], (test_ratio,))
  info = dict(dataset="cifar_mnist", envs=envs, seed=seed,
              train_ratios=list(train_ratios), test_ratio=test_ratio,
              train_num=train_num, test_num=test_num, label_noise=label_noise,
              oracle=oracle, val=val, val_fraction=val_fraction,
              train_sizes=list(train_envs.sizes),
              test_size=test_envs.sizes[0],
              val_sizes=None if val_envs is None else list(val_envs.sizes))
  return EnvSplits(train_envs, test_envs, val_envs, "binary", info)


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
