"""Probabilistic weight masks (SparseIRM, SparseERM, MRM) for any Flax model.

Masks live in a separate pytree of keep probabilities ``scores`` keyed by
parameter path, so any model is sparsified without touching its code:
:func:`select` picks the gated parameters with a regular expression over
``'/'``-joined paths (default: every weight matrix / conv kernel, never
biases or BatchNorm parameters), :func:`apply` multiplies them in.

Training (ProbMask, Zhou et al. CVPR 2021; SparseIRM, Zhou et al. ICML 2022):
a relaxed Bernoulli mask ``m = sigmoid((logit(s) + L) * T)`` with logistic
noise ``L`` (fresh per step) and inverse temperature ``T`` rising from 1 to
about 33 (:func:`inverse_temperature`); after every score update the scores
are projected onto ``{s in [0, 1]^n : sum s <= k}`` over all masked layers
together (:func:`project`), with the budget ``k = keep_ratio * n`` decaying
cubically (:func:`keep_ratio`). Evaluation samples one Bernoulli mask.

Example:
  >>> params = jirm.models.mlp(390).init(key, x[:1])
  >>> scores = masks.init_scores(params)          # every kernel, s = 1
  >>> m = masks.relaxed(scores, key, inverse_temp=1.0)
  >>> logits = model.apply(masks.apply(params, m), x)
"""

from __future__ import annotations

import re
from typing import Mapping

from flax import traverse_util
import jax
import jax.numpy as jnp

DEFAULT_PATTERN = r"(^|/)kernel$"
_CLIP = 1e-6


def _flat(params) -> dict:
  return traverse_util.flatten_dict(params, sep="/")


def select(params, pattern: str = DEFAULT_PATTERN) -> list[str]:
  """Paths of the parameters that get masks.

  Args:
    params: a parameter pytree (nested dicts, e.g. Flax ``variables``).
    pattern: regular expression searched in each ``'/'``-joined path; only
      arrays with at least 2 dimensions (weights, kernels) qualify, so biases
      and BatchNorm scales are never masked.

  Returns:
    Sorted list of paths.

  Raises:
    ValueError: if nothing matches (names the pattern and the available
      paths).
  """
  flat = _flat(params)
  regex = re.compile(pattern)
  paths = sorted(p for p, v in flat.items()
                 if regex.search(p) and getattr(v, "ndim", 0) >= 2)
  if not paths:
    raise ValueError(f"mask pattern {pattern!r} matches no weight with >= 2 "
                     f"dims; parameter paths are {sorted(flat)}.")
  return paths


def init_scores(params, pattern: str = DEFAULT_PATTERN,
                value: float = 1.0) -> dict:
  """Keep-probability scores ``{path: s}`` for :func:`select`'s parameters.

  SparseIRM initialises every score to 1 (``--score-init-constant 1``).
  """
  if not 0.0 <= value <= 1.0:
    raise ValueError(f"score init value={value!r} must be in [0, 1].")
  flat = _flat(params)
  return {p: jnp.full(flat[p].shape, value, jnp.float32)
          for p in select(params, pattern)}


def apply(params, masks: Mapping[str, jax.Array]):
  """``params`` with every masked weight multiplied by its mask."""
  flat = _flat(params)
  missing = sorted(set(masks) - set(flat))
  if missing:
    raise ValueError(f"masks for unknown parameters {missing}.")
  flat = {p: v * masks[p] if p in masks else v for p, v in flat.items()}
  return traverse_util.unflatten_dict(flat, sep="/")


def relaxed(scores: Mapping[str, jax.Array], rng, inverse_temp):
  """Relaxed Bernoulli masks ``sigmoid((logit(s) + L) * T)`` (training).

  Args:
    scores: keep probabilities.
    rng: PRNG key (use a fresh one per step).
    inverse_temp: ``T`` (see :func:`inverse_temperature`).

  Returns:
    ``{path: m}`` with ``m`` in (0, 1), differentiable in the scores.
  """
  keys = jax.random.split(rng, len(scores))
  out = {}
  for k, (p, s) in zip(keys, sorted(scores.items())):
    noise = jax.random.logistic(k, s.shape, s.dtype)
    # SparseIRM writes log(s + 1e-20) - log(1 - s + 1e-20); under jit XLA
    # folds 1 + 1e-20 = 1, giving log(0) and NaN gradients at s = 1. Clipping
    # to [1e-6, 1 - 1e-6] keeps the logit finite (|logit| <= 13.8; the mask
    # at s = 1 is still 1 unless L < -13.8, probability 1e-6) and, like the
    # reference in float32, gives no gradient at exactly 0 or 1.
    s_c = jnp.clip(s, _CLIP, 1.0 - _CLIP)
    logit = jnp.log(s_c) - jnp.log1p(-s_c)
    out[p] = jax.nn.sigmoid((logit + noise) * inverse_temp)
  return out


def bernoulli(scores: Mapping[str, jax.Array], rng):
  """One hard mask ``u < s`` per weight (evaluation)."""
  keys = jax.random.split(rng, len(scores))
  return {p: (jax.random.uniform(k, s.shape) < s).astype(s.dtype)
          for k, (p, s) in zip(keys, sorted(scores.items()))}


def inverse_temperature(epoch, epochs: int, final_temp: float = 0.03):
  """ProbMask's ``T = 1 / ((1 - t_f) (1 - epoch / epochs) + t_f)``: 1 -> 33."""
  frac = jnp.asarray(epoch, jnp.float32) / epochs
  return 1.0 / ((1.0 - final_temp) * (1.0 - frac) + final_temp)


def keep_ratio(step, total_steps: int, target: float, start: float = 0.28,
               end: float = 0.6):
  """Budget schedule: 1 before ``start``, cubic decay to ``target`` at ``end``.

  ``keep(t) = target + (1 - target) (1 - (t - t0) / (t1 - t0))^3`` for
  ``t0 <= t < t1`` with ``t0 = start * total_steps``, ``t1 = end *
  total_steps`` (the iterative schedule of SparseIRM's ``--iterative``).
  """
  if not 0.0 < target <= 1.0:
    raise ValueError(f"keep ratio target={target!r} must be in (0, 1].")
  if not 0.0 <= start < end <= 1.0:
    raise ValueError(f"budget schedule start={start!r}, end={end!r}: need "
                     f"0 <= start < end <= 1.")
  t0, t1 = start * total_steps, end * total_steps
  frac = jnp.clip((jnp.asarray(step, jnp.float32) - t0) / (t1 - t0), 0., 1.)
  return target + (1.0 - target) * (1.0 - frac) ** 3


def num_scores(scores: Mapping[str, jax.Array]) -> int:
  return sum(int(s.size) for s in scores.values())


def project(scores: Mapping[str, jax.Array], budget, iters: int = 40):
  """Euclidean projection onto ``{s in [0, 1]^n : sum s <= budget}``.

  The solution is ``clip(s - v, 0, 1)`` with the smallest ``v >= 0`` meeting
  the budget; ``v`` is found by bisection over all masked layers together
  (SparseIRM bisects 20 times to a 1e-3 tolerance; 40 halvings of
  ``[0, max s]`` are exact to float precision).

  Args:
    scores: ``{path: s}``.
    budget: ``k`` (scalar, may be traced).
    iters: bisection steps.

  Returns:
    Projected scores (same structure).
  """
  leaves = list(scores.values())
  total = lambda v: sum(jnp.clip(s - v, 0.0, 1.0).sum() for s in leaves)
  hi = jnp.maximum(jnp.max(jnp.stack([jnp.max(s) for s in leaves])), 0.0)

  def body(_, lo_hi):
    lo, hi = lo_hi
    mid = 0.5 * (lo + hi)
    over = total(mid) > budget
    return jnp.where(over, mid, lo), jnp.where(over, hi, mid)

  _, v = jax.lax.fori_loop(0, iters, body, (jnp.zeros_like(hi), hi))
  v = jnp.where(total(0.0) <= budget, 0.0, v)
  return {p: jnp.clip(s - v, 0.0, 1.0) for p, s in scores.items()}


def density(scores: Mapping[str, jax.Array]):
  """Expected fraction of kept weights, ``sum s / n``."""
  return sum(s.sum() for s in scores.values()) / num_scores(scores)


def hard(scores: Mapping[str, jax.Array], threshold: float = 0.5):
  """``{path: 1[s > threshold]}`` (MRM's selected subnetwork)."""
  return {p: (s > threshold).astype(jnp.float32) for p, s in scores.items()}
