"""jirm: Invariant Risk Minimization in JAX.

Compose objectives from pure terms, make them (or any stateful method) a
:class:`jirm.Method` and train every method with the one trainer::

    import jirm
    sched = jirm.schedules.preset('irm', weight=91257.19, anneal=190)
    objective = jirm.erm + 0.0011 * jirm.l2 + sched * jirm.irmv1
    method = jirm.from_objective(jirm.models.mlp(390), objective,
                                 optax.adam(4.9e-4))
    result = jirm.fit(jirm.data.colored_mnist(seed=0), method, steps=501)
"""

from jirm import data
from jirm import methods
from jirm import models
from jirm import objectives
from jirm import results
from jirm import runtime
from jirm import schedules
from jirm import selection
from jirm import sharding
from jirm import sweep
from jirm import train
from jirm.objectives import (Objective, Outputs, Term, bayesian_irm, coral,
                             env_risks, eqrm, erm, feature_var, ib_irm,
                             irm_tv_l1, irm_tv_l2, irmv1, irmv1_h, l2, mm_rex,
                             mmd, rvp, vrex)
from jirm.methods import Method, from_objective
from jirm.schedules import PenaltySchedule
from jirm.train import fit

__version__ = "0.1.0"
