"""CIFAR-MNIST (IRMBed, Lin et al. 2022): a CIFAR image beside an MNIST
digit, the digit agreeing with the label at an environment's rate.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from jirm.data.envs import DataError, EnvSplits, stack_envs
from jirm.data.envs import _check_num_envs, _check_prob, _count
from jirm.data.sources import load_tfds

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
