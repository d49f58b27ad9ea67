"""Penalty-weight schedules of the IRM anchors (SPEC §1) as named presets.

A :class:`PenaltySchedule` is a callable ``step -> lambda`` (so it works
wherever optax accepts a ``ScalarOrSchedule``) that also carries the anchor's
loss rescaling and optimizer-reset step. Multiply a term by it::

    sched = jirm.schedules.preset('irm', weight=91257.19, anneal=190)
    objective = jirm.erm + 0.0011 * jirm.l2 + sched * jirm.irmv1

| preset      | lambda before anneal | total loss divided by          | reset |
|-------------|----------------------|--------------------------------|-------|
| ``irm``     | 1                    | lambda, when lambda > 1        | never |
| ``domainbed``| 1                   | (nothing)                      | Adam re-initialised at anneal |
| ``irmbed``  | 0 (or linear ramp)   | 1 + lambda, always             | never |
| ``lin``     | 0                    | 1 + lambda, when lambda > 1    | never |

``lin`` covers SparseIRM, BayesianIRM, ZIN and IRM-TV.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

RESCALES = ("none", "lambda_if_gt1", "one_plus_lambda_if_gt1",
            "one_plus_lambda")


@dataclasses.dataclass(frozen=True)
class PenaltySchedule:
  """lambda(step) with the anchor's loss rescaling and optimizer reset.

  Attributes:
    name: preset name.
    weight: lambda after the anneal step.
    anneal: first step (or epoch) at which ``weight`` applies.
    before: lambda before ``anneal``.
    rescale: one of ``RESCALES``.
    reset_step: step at which the optimizer state is re-initialised, or None.
    ramp: linearly ramp from 0 to ``weight`` until ``anneal`` (IRMBed option).
    steps_per_epoch: the schedule counts epochs = step // steps_per_epoch.
  """

  name: str
  weight: float
  anneal: int
  before: float
  rescale: str = "none"
  reset_step: Optional[int] = None
  ramp: bool = False
  steps_per_epoch: int = 1

  def __post_init__(self):
    if self.rescale not in RESCALES:
      raise ValueError(f"rescale={self.rescale!r}: use one of {RESCALES}.")
    if self.anneal < 0:
      raise ValueError(f"anneal={self.anneal!r} must be >= 0.")
    if self.steps_per_epoch < 1:
      raise ValueError(f"steps_per_epoch={self.steps_per_epoch!r} must be "
                       f">= 1.")

  def __call__(self, step):
    t = jnp.asarray(step) // self.steps_per_epoch
    after = jnp.float32(self.weight)
    if self.ramp:
      before = after * jnp.minimum(t, self.anneal) / max(self.anneal, 1)
    else:
      before = jnp.float32(self.before)
    return jnp.where(t >= self.anneal, after, before).astype(jnp.float32)

  def divisor(self, lam):
    """The number the total loss is divided by at penalty weight ``lam``."""
    if self.rescale == "lambda_if_gt1":
      return jnp.where(lam > 1.0, lam, 1.0)
    if self.rescale == "one_plus_lambda_if_gt1":
      return jnp.where(lam > 1.0, 1.0 + lam, 1.0)
    if self.rescale == "one_plus_lambda":
      return 1.0 + lam
    return jnp.float32(1.0)


PRESETS = ("irm", "domainbed", "irmbed", "lin")


def preset(name: str, *, weight: float, anneal: int, ramp: bool = False,
           steps_per_epoch: int = 1) -> PenaltySchedule:
  """Builds the penalty schedule of an anchor (SPEC §1).

  Args:
    name: ``'irm'`` (IRM, REx), ``'domainbed'``, ``'irmbed'`` or ``'lin'``
      (SparseIRM, BayesianIRM, ZIN, IRM-TV).
    weight: lambda after annealing (a float, or a traced scalar inside
      :func:`jirm.sweep.fit_sweep`).
    anneal: anneal step (epoch for ``irmbed`` with ``steps_per_epoch``).
    ramp: ``irmbed`` only: ramp lambda * epoch / anneal before the anneal.
    steps_per_epoch: converts steps to epochs for per-epoch schedules.

  Returns:
    A :class:`PenaltySchedule`.

  Example:
    >>> s = preset('domainbed', weight=100.0, anneal=500)
    >>> float(s(499)), float(s(500)), s.reset_step
    (1.0, 100.0, 500)
  """
  for arg, value in (("anneal", anneal), ("steps_per_epoch", steps_per_epoch)):
    if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
        and not (isinstance(value, float) and value.is_integer())):
      raise ValueError(f"{arg}={value!r}: a whole number of steps (no "
                       f"silent truncation).")
  if anneal < 0 or steps_per_epoch < 1:
    raise ValueError(f"anneal={anneal!r} must be >= 0 and steps_per_epoch="
                     f"{steps_per_epoch!r} >= 1.")
  if ramp and name != "irmbed":
    raise ValueError(f"ramp=True is IRMBed's schedule; got preset {name!r}.")
  # A traced weight (jirm.sweep) stays an array; anneal must be concrete.
  weight = weight if isinstance(weight, jax.Array) else float(weight)
  common = dict(name=name, weight=weight, anneal=int(anneal),
                steps_per_epoch=int(steps_per_epoch))
  if name == "irm":
    return PenaltySchedule(before=1.0, rescale="lambda_if_gt1", **common)
  if name == "domainbed":
    return PenaltySchedule(before=1.0, rescale="none",
                           reset_step=int(anneal) * int(steps_per_epoch),
                           **common)
  if name == "irmbed":
    return PenaltySchedule(before=0.0, rescale="one_plus_lambda", ramp=ramp,
                           **common)
  if name == "lin":
    return PenaltySchedule(before=0.0, rescale="one_plus_lambda_if_gt1",
                           **common)
  raise ValueError(f"unknown schedule preset {name!r}; choose one of "
                   f"{PRESETS}.")
