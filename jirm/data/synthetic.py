"""Synthetic linear environments: SparseIRM Section 3.2's invariant +
spurious Gaussian features, and ZIN's auxiliary-variable environments.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from jirm.data.envs import DataError, EnvSplits, stack_envs
from jirm.data.envs import _check_num_envs, _check_prob, _check_scale, _count

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
  for i, a in enumerate(train_alphas):
    _check_scale(f"train_alphas[{i}]", a)
  _check_scale("test_alpha", test_alpha)
  _check_scale("noise_std", noise_std)
  dim_inv = _count("dim_inv", dim_inv, 1, "at least 1", unit="features")
  dim_spu = _count("dim_spu", dim_spu, 0, "at least 0", unit="features")
  dim_noise = _count("dim_noise", dim_noise, 0, "at least 0",
                     unit="features")
  n_per_env = _count("n_per_env", n_per_env, 2, "at least 2 per environment",
                     unit="samples")
  n_val = _count("n_val", n_val, 0, "0 (no validation split) or more",
                 unit="samples")
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
  dim_inv = _count("dim_inv", dim_inv, 1, "at least 1", unit="features")
  dim_spu = _count("dim_spu", dim_spu, 0, "at least 0", unit="features")
  num_train = _count("num_train", num_train, 2 * len(train_cons),
                     "at least 2 per environment", unit="samples")
  num_test = _count("num_test", num_test, 2 * len(test_cons),
                    "at least 2 per environment", unit="samples")
  if num_val:
    num_val = _count("num_val", num_val, 2 * len(train_cons),
                     "0 (none) or at least 2 per environment",
                     unit="samples")
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
