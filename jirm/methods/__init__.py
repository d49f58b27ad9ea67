"""Methods: the protocol, penalty objectives as methods, and the registry.

* :class:`Method` (:mod:`jirm.methods.base`): a NamedTuple of pure functions
  ``init``, ``update``, ``predict`` over an explicit state pytree, the one
  shape every method has and :func:`jirm.train.fit` runs.
* :func:`from_objective` (:mod:`jirm.methods.objective`): any composed
  objective (``erm + sched * irmv1``) with an optax optimizer as a method.
* :mod:`jirm.methods.registry`: every method under one name (family,
  reference, models, experiments, search); ``--method=all``, the goldens and
  the all-methods tests read it.
* :data:`METHODS`: the registry's stateless methods on the MLP, name ->
  penalty term.
* The stateful families, each a factory of the same protocol:
  :mod:`jirm.methods.deep` (any objective and game on an encoder + head
  model, IRMBed's methods by name), :mod:`jirm.methods.games` (InvRat-EC/EB,
  IRMGame(h), GroupDRO), :mod:`jirm.methods.irm_games` (F-IRM / V-IRM),
  :mod:`jirm.methods.ipg`, :mod:`jirm.methods.sparse` with
  :mod:`jirm.methods.masks` (SparseIRM, MRM) and :mod:`jirm.methods.irm_tv`
  (Minimax-TV, ZIN, OOD-TV).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from jirm import objectives
from jirm import schedules
from jirm.methods import deep
from jirm.methods import games
from jirm.methods import ipg
from jirm.methods import irm_games
from jirm.methods import irm_tv
from jirm.methods import masks
from jirm.methods import registry
from jirm.methods import sparse
from jirm.methods.base import (EnvArrays, Method, TrainState, epoch_batch,
                               forward, reset_at, sample_batch, tree_where)
from jirm.methods.deep import deep_method
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


# The stateless methods on the MLP (names, references and order from
# :mod:`jirm.methods.registry`).
METHODS = {
    n: Entry(n, registry.penalty_term(n), registry.REGISTRY[n].reference,
             oracle=registry.REGISTRY[n].oracle)
    for n in registry.names(model="mlp")
    if registry.REGISTRY[n].family in ("erm", "penalty")
}


def get(name: str) -> Entry:
  """Looks up a method (an old name is accepted), with a helpful error."""
  name = registry.canonical(name)
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
