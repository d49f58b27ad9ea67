"""Methods: the protocol, penalty objectives as methods, and the registry.

* :class:`Method` (:mod:`jirm.methods.base`): a NamedTuple of pure functions
  ``init``, ``update``, ``predict`` over an explicit state pytree, the one
  shape every method has and :func:`jirm.train.fit` runs.
* :func:`from_objective` (:mod:`jirm.methods.objective`): any composed
  objective (``erm + sched * irmv1``) with an optax optimizer as a method.
* :data:`METHODS`: the registry of stateless IRM methods, name -> penalty
  term and reference. Adding a method here adds it to ``--method=all`` and
  to the all-methods test.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from jirm import objectives
from jirm import schedules
from jirm.methods.base import (EnvArrays, Method, TrainState, epoch_batch,
                               forward, reset_at, sample_batch, tree_where)
from jirm.methods.objective import (from_objective, make_eval_fn,
                                    make_loss_fn, make_train_step)


@dataclasses.dataclass(frozen=True)
class Entry:
  """A registered stateless method.

  Attributes:
    name: registry key.
    penalty: the penalty term (None for ERM).
    reference: paper / anchor.
    oracle: trains on data with the spurious feature removed.
  """

  name: str
  penalty: Optional[objectives.Term]
  reference: str
  oracle: bool = False


METHODS = {
    m.name: m for m in (
        Entry("erm", None, "Vapnik 1992; IRM's ERM baseline"),
        Entry("oracle", None, "ERM on grayscale inputs (IRM oracle)",
               oracle=True),
        Entry("irmv1", objectives.irmv1, "Arjovsky et al. 2019"),
        Entry("vrex", objectives.vrex, "Krueger et al. 2021 (V-REx)"),
        Entry("mm_rex", objectives.mm_rex, "Krueger et al. 2021 (MM-REx)"),
        Entry("rvp", objectives.rvp, "IRMBed (Lin et al. 2022)"),
        Entry("irm_tv_l1", objectives.irm_tv_l1, "Lai & Wang, ICML 2024"),
        Entry("bayesian_irm", objectives.bayesian_irm,
               "Lin et al., CVPR 2022"),
    )
}


def get(name: str) -> Entry:
  """Looks up a method, with a helpful error."""
  if name not in METHODS:
    raise ValueError(f"unknown method {name!r}; choose one of "
                     f"{sorted(METHODS)}.")
  return METHODS[name]


def build_objective(method: str, *, l2: float = 0.0,
                    erm_reduction: str = "mean",
                    schedule: Optional[schedules.PenaltySchedule] = None,
                    penalty_options: Optional[dict] = None
                    ) -> objectives.Objective:
  """``erm + l2 * ||theta||^2 + schedule * penalty`` for a registered method.

  Args:
    method: registry name.
    l2: weight of the sum of squared parameters (0 disables it).
    erm_reduction: ``'mean'``, ``'pooled'`` or ``'sum'``.
    schedule: penalty weight (required when the method has a penalty).
    penalty_options: keyword options of the penalty term.

  Returns:
    The composed :class:`jirm.objectives.Objective`.
  """
  m = get(method)
  obj = objectives.erm(reduction=erm_reduction) * 1.0
  if not (isinstance(l2, (int, float)) and l2 == 0):  # l2 may be traced.
    obj = obj + l2 * objectives.l2
  if m.penalty is not None:
    if schedule is None:
      raise ValueError(f"method {method!r} needs a penalty schedule.")
    obj = obj + schedule * m.penalty(**(penalty_options or {}))
  return obj
