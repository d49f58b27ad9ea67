"""Penalty objectives as methods: from_objective(model, objective, optimizer).

Every stateless method of the IRM family (ERM, IRMv1, REx, RVP, IRM-TV-l1,
BayesianIRM, any composition ``erm + sched * irmv1 + ...``) is one objective
and one optimizer; :func:`from_objective` makes it a :class:`jirm.methods.Method`. The
update does one forward pass over all environments (``[E, B, ...]`` is
reshaped to ``[E*B, ...]``), evaluates the objective on the per-environment
outputs, and applies an optax update. A schedule's optimizer reset
(DomainBed re-initialises Adam at the anneal step) is done inside the jitted
update with ``jnp.where``. Per-step randomness is ``fold_in(rng, step)``.

Reference: Arjovsky et al. 2019, "Invariant Risk Minimization" (the IRMv1
objective); Gulrajani & Lopez-Paz 2021 (DomainBed's Adam reset).

Example:
  >>> sched = jirm.schedules.preset('irm', weight=91257.19, anneal=190)
  >>> method = from_objective(jirm.models.mlp(390),
  ...                         jirm.erm + 0.0011 * jirm.l2 + sched * jirm.irmv1,
  ...                         optax.adam(4.9e-4))
  >>> result = jirm.fit(splits, method, steps=501, seed=0)
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import optax

from jirm import objectives
from jirm.methods import base
from jirm.models import encoder_head


def make_loss_fn(apply_fn, objective: objectives.Objective,
                 task: str = "binary"):
  """``loss(params, batch, rng, step) -> (total, aux)``: one forward pass
  over all environments, the objective, and the batch accuracy in
  ``aux['train_acc']``."""

  reads_features = objective.reads_features

  def loss_fn(params, batch: base.EnvArrays, rng, step):
    if reads_features:
      feats, logits = base.forward(apply_fn, params, batch.x,
                                   return_features=True)
    else:
      feats, logits = None, base.forward(apply_fn, params, batch.x)
    out = objectives.Outputs(logits, batch.y, batch.valid, params, rng, task,
                             features=feats)
    total, aux = objective(out, step)
    aux["train_acc"] = objectives.accuracy(logits, batch.y, batch.valid,
                                           task).mean()
    return total, aux

  return loss_fn


def make_train_step(apply_fn, objective: objectives.Objective,
                    optimizer: optax.GradientTransformation, *,
                    task: str = "binary", batch_size: Optional[int] = None,
                    reset_step: Optional[int] = None):
  """Builds ``step(state, data) -> (state, metrics)``, a pure function.

  Args:
    apply_fn: ``(params, x_NX) -> logits_NC``.
    objective: the :class:`jirm.objectives.Objective` to minimise.
    optimizer: an optax transformation.
    task: loss/accuracy type of the data.
    batch_size: samples per env per step; None = full batch.
    reset_step: re-initialise the optimizer state at this step (defaults to
      the objective's schedule's ``reset_step``).

  Returns:
    The step function (jit it; it is traced once).
  """
  sched = objective.schedule()
  if reset_step is None and sched is not None:
    reset_step = sched.reset_step

  loss_fn = make_loss_fn(apply_fn, objective, task)

  def step_fn(state: base.TrainState, data: base.EnvArrays):
    k_batch, k_obj = jax.random.split(jax.random.fold_in(state.rng,
                                                         state.step))
    batch = data if batch_size is None else base.sample_batch(
        data, k_batch, batch_size)
    grads, aux = jax.grad(loss_fn, has_aux=True)(state.params, batch, k_obj,
                                                 state.step)
    opt_state = base.reset_at(optimizer, state.opt_state, state.params,
                              state.step, reset_step)
    updates, opt_state = optimizer.update(grads, opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return base.TrainState(state.step + 1, params, opt_state, state.rng), aux

  return step_fn


def make_eval_fn(apply_fn, task: str = "binary"):
  """``eval(params, data) -> (acc_E, loss_E)`` for every environment."""

  def eval_fn(params, data: base.EnvArrays):
    logits = base.forward(apply_fn, params, data.x)
    out = objectives.Outputs(logits, data.y, data.valid, task=task)
    return objectives.accuracy(logits, data.y, data.valid, task), (
        objectives.env_risks(out))

  return eval_fn


def _as_objective(objective):
  if isinstance(objective, objectives.Term):
    return objective * 1.0
  if not isinstance(objective, objectives.Objective):
    raise ValueError(f"objective={objective!r}: compose one from jirm's "
                     f"terms, e.g. jirm.erm + 1e4 * jirm.irmv1.")
  return objective


def from_objective(model, objective: objectives.Objective,
                   optimizer: optax.GradientTransformation, *,
                   task: str = "binary", batch_size: Optional[int] = None,
                   reset_step: Optional[int] = None, init_params=None,
                   **deep_kwargs) -> base.Method:
  """A penalty objective and an optimizer as a :class:`jirm.methods.Method`.

  Args:
    model: a Flax module (``init(rng, x)``, ``apply(params, x)``, e.g.
      :func:`jirm.models.mlp`) or a :class:`jirm.models.DeepModel` (encoder,
      head and BatchNorm statistics; see :func:`jirm.methods.deep.deep_method` for
      its extra options, passed through ``deep_kwargs``).
    objective: a :class:`jirm.objectives.Objective` (or a single term).
    optimizer: an optax transformation.
    task: ``'binary'`` or ``'multiclass'`` (the data's ``splits.task``).
    batch_size: samples per environment per update, drawn with
      replacement; None = the full batch. (Deep models draw an epoch
      permutation instead and need it.)
    reset_step: re-initialise the optimizer here (default: the schedule's).
    init_params: start from these parameters instead of a fresh init.
    **deep_kwargs: game, anneal_step, head_update, transform, step_factory
      (deep models only).

  Returns:
    A :class:`jirm.methods.Method` whose state is a
    :class:`jirm.methods.TrainState` (a :class:`jirm.methods.deep.DeepState` for
    deep models).

  Example:
    >>> method = from_objective(jirm.models.mlp(390),
    ...                         jirm.erm + 1e4 * jirm.irmv1, optax.adam(1e-3))
    >>> state = method.init(jax.random.key(0), data)
    >>> state, metrics = jax.jit(method.update)(state, data)
  """
  objective = _as_objective(objective)
  if not isinstance(optimizer, optax.GradientTransformation):
    raise ValueError(f"optimizer={optimizer!r}: an optax transformation, "
                     f"e.g. optax.adam(1e-3).")
  from jirm.methods import deep  # pylint: disable=g-import-not-at-top
  if isinstance(model, encoder_head.DeepModel):
    return deep.deep_method(model, objective, optimizer, task=task,
                            batch_size=batch_size, init_params=init_params,
                            reset_step=reset_step, **deep_kwargs)
  if deep_kwargs:
    raise ValueError(f"{sorted(deep_kwargs)}: options of deep models "
                     f"(jirm.models.DeepModel); {type(model).__name__} takes "
                     f"none of them.")
  update = make_train_step(model.apply, objective, optimizer, task=task,
                           batch_size=batch_size, reset_step=reset_step)

  def init(rng, data: base.EnvArrays):
    k_init, k_train = jax.random.split(rng)
    params = (model.init(k_init, data.x[0, :1]) if init_params is None else
              init_params)
    return base.TrainState(jnp.zeros((), jnp.int32), params,
                           optimizer.init(params), k_train)

  def predict(state, x_NX):
    return model.apply(state.params, x_NX)

  return base.Method(init, update, predict)
