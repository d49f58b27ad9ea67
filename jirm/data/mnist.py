"""ColoredMNIST (Arjovsky et al. 2019, and the DomainBed / IRMBed / SparseIRM
variants) and FullColoredMNIST (SparseIRM: 10 classes, 10 colours).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from jirm.data.envs import DataError, EnvSplits, stack_envs
from jirm.data.envs import _check_num_envs, _check_prob, _count
from jirm.data.sources import load_mnist

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
    data_dir: tfds data dir (see :func:`jirm.data.sources.resolve_data_dir`).
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
  n_env = len(train_cons)
  data_num = _count("data_num", data_num, 2 * n_env,
                    "at least 2 per training environment")
  if mnist is None:
    mnist = (load_mnist("train", data_dir), load_mnist("test", data_dir))
  (tr_img, tr_dig), (te_img, te_dig) = mnist
  if data_num >= len(tr_dig):  # The rest of MNIST train is the test env.
    raise DataError(f"data_num={data_num} leaves no test images: use at "
                    f"most {len(tr_dig) - 1}.")
  if len(tr_img) != len(tr_dig) or len(te_img) != len(te_dig):
    raise DataError(f"mnist images and labels differ in length: train "
                    f"{len(tr_img)} / {len(tr_dig)}, test {len(te_img)} / "
                    f"{len(te_dig)}.")
  rng = np.random.default_rng(seed)
  perm = rng.permutation(data_num)

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
