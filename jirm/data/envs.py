"""Environment containers and the checks every builder shares.

An :class:`EnvSplits` holds train / test / validation :class:`Envs`, each with
an explicit environment axis (``x_ExN...``, ``y_ExN``) and two per-sample
flags: ``agree`` (the spurious feature agrees with the label) and ``valid``
(a real sample, not padding).
"""

from __future__ import annotations

import dataclasses
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
# Validation helpers.


def _check_prob(name: str, value: float) -> None:
  if not 0.0 <= float(value) <= 1.0:
    raise DataError(f"{name}={value!r} is not a probability; use a value in "
                    f"[0, 1].")


def _check_num_envs(num_envs: int) -> None:
  if int(num_envs) < 2:
    raise DataError(f"num_envs={num_envs!r}: IRM needs at least 2 training "
                    f"environments; use num_envs >= 2.")


def _count(name: str, value, minimum: int, what: str,
           unit: str = "images") -> int:
  """``value`` as an int if it is a whole number >= ``minimum``, else a
  DataError naming it (no silent truncation of 2.5 to 2)."""
  ok = (not isinstance(value, bool) and
        isinstance(value, (int, np.integer, float, np.floating)) and
        float(value).is_integer() and value >= minimum)
  if not ok:
    raise DataError(f"{name}={value!r}: a whole number of {unit}, {what} "
                    f"({minimum} here).")
  return int(value)


def _check_scale(name: str, value) -> float:
  """A finite number >= 0 (a noise scale), else a DataError naming it."""
  ok = (not isinstance(value, bool) and
        isinstance(value, (int, np.integer, float, np.floating)) and
        np.isfinite(value) and value >= 0)
  if not ok:
    raise DataError(f"{name}={value!r}: use a finite number >= 0.")
  return float(value)

