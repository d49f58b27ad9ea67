"""SparseIRM / SparseERM and MRM methods over :mod:`jirm.methods.masks`.

SparseIRM (Zhou et al., "Sparse Invariant Risk Minimization", ICML 2022)
trains the weights and the keep-probability scores of a global mask
together: any jirm objective (``erm + l2 + schedule * irmv1`` ...) is
evaluated on the masked network, the scores get their own optimizer (Adam
6e-3; weights Adam 6e-4), stay frozen until 28% of training, and are
projected onto the budget after every step. SparseERM is the same without a
penalty. MRM (Zhang et al., ICML 2021) trains densely, then learns a mask
with a sparsity term, then retrains the selected subnetwork from the
original initialisation.

Example:
  >>> objective = jirm.erm + 1e-3 * jirm.l2 + sched * jirm.irmv1(
  ...     variant='env_scale')
  >>> method = sparse.sparse_method(jirm.models.mlp(390), objective,
  ...                               steps=1501, keep_target=0.95)
  >>> res = jirm.fit(splits, method, steps=1501)
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from jirm.methods import masks
from jirm import objectives
from jirm.methods import base
from jirm.methods import objective as objective_lib


class SparseState(NamedTuple):
  step: jax.Array
  params: Any
  scores: dict
  w_opt_state: Any
  s_opt_state: Any
  rng: jax.Array


def make_step(apply_fn, objective: objectives.Objective, *,
              weight_opt: optax.GradientTransformation,
              score_opt: optax.GradientTransformation, total_steps: int,
              keep_target: float, num_scores: Optional[int] = None,
              task: str = "binary",
              score_start: float = 0.28, budget_end: float = 0.6,
              steps_per_epoch: int = 1, sparsity: float = 0.0,
              batch_size: Optional[int] = None):
  """Builds ``step(state, data) -> (state, aux)`` for masked training.

  Args:
    apply_fn: ``(params, x) -> logits``.
    objective: evaluated on the masked network's outputs; its ``l2`` term
      sees the raw (unmasked) weights, as in SparseIRM.
    weight_opt, score_opt: optimizers of the weights and of the scores.
    total_steps: training length (sets the temperature and budget
      schedules).
    keep_target: final keep ratio of the masked weights.
    num_scores: number of masked weights ``n`` (budget ``k = keep * n``);
      None counts the state's scores.
    task: loss / accuracy type.
    score_start: scores are frozen before this fraction of training.
    budget_end: the budget reaches ``keep_target`` at this fraction.
    steps_per_epoch: the temperature changes per epoch.
    sparsity: weight of ``mean(s)`` added to the loss (MRM's mask phase).
    batch_size: per-env minibatch (None = full batch).

  Returns:
    The step function (jit it).
  """
  sched = objective.schedule()
  reset_step = None if sched is None else sched.reset_step
  epochs = max(total_steps // steps_per_epoch, 1)
  start_step = int(score_start * total_steps)

  def loss_fn(params, scores, batch, rng, step):
    k_mask, k_obj = jax.random.split(rng)
    temp = masks.inverse_temperature(step // steps_per_epoch, epochs)
    m = masks.relaxed(scores, k_mask, temp)
    logits = base.forward(apply_fn, masks.apply(params, m), batch.x)
    out = objectives.Outputs(logits, batch.y, batch.valid, params, k_obj,
                             task)
    total, aux = objective(out, step)
    if sparsity:
      total = total + sparsity * masks.density(scores)
    aux["train_acc"] = objectives.accuracy(logits, batch.y, batch.valid,
                                           task).mean()
    aux["inverse_temp"] = temp
    return total, aux

  def step_fn(state: SparseState, data: base.EnvArrays):
    k_loss = jax.random.fold_in(state.rng, state.step)
    # epoch_batch folds the epoch index into one fixed key of the run.
    batch = data if batch_size is None else base.epoch_batch(
        data, jax.random.split(state.rng)[1], state.step, batch_size)
    (g_w, g_s), aux = jax.grad(loss_fn, argnums=(0, 1), has_aux=True)(
        state.params, state.scores, batch, k_loss, state.step)
    w_state = base.reset_at(weight_opt, state.w_opt_state, state.params,
                                 state.step, reset_step)
    upd, w_state = weight_opt.update(g_w, w_state, state.params)
    params = optax.apply_updates(state.params, upd)
    # Scores: no optimizer step (and no moment update) before score_start.
    s_upd, s_new = score_opt.update(g_s, state.s_opt_state, state.scores)
    active = state.step >= start_step
    scores = jax.tree.map(lambda n, o: jnp.where(active, n, o),
                          optax.apply_updates(state.scores, s_upd),
                          state.scores)
    s_state = jax.tree.map(lambda n, o: jnp.where(active, n, o), s_new,
                           state.s_opt_state)
    keep = masks.keep_ratio(state.step, total_steps, keep_target,
                            score_start, budget_end)
    n = masks.num_scores(scores) if num_scores is None else num_scores
    scores = masks.project(scores, keep * n)
    aux["keep_ratio"] = keep
    aux["density"] = masks.density(scores)
    return SparseState(state.step + 1, params, scores, w_state, s_state,
                       state.rng), aux

  return step_fn


def make_eval_fn(apply_fn, task: str = "binary"):
  """``eval(params, scores, rng, data) -> acc_E`` with one Bernoulli mask."""

  def eval_fn(params, scores, rng, data: base.EnvArrays):
    p = masks.apply(params, masks.bernoulli(scores, rng))
    logits = base.forward(apply_fn, p, data.x)
    return objectives.accuracy(logits, data.y, data.valid, task)

  return eval_fn


def sparse_method(model, objective: objectives.Objective, *, steps: int,
                  keep_target: float, task: str = "binary",
                  weight_opt: Optional[optax.GradientTransformation] = None,
                  score_opt: Optional[optax.GradientTransformation] = None,
                  pattern: str = masks.DEFAULT_PATTERN,
                  score_start: float = 0.28, budget_end: float = 0.6,
                  sparsity: float = 0.0, batch_size: Optional[int] = None,
                  steps_per_epoch: int = 1,
                  init_params=None) -> base.Method:
  """SparseIRM / SparseERM (Zhou et al., ICML 2022): masks around any
  objective, as a :class:`jirm.methods.Method`.

  Args:
    model: a Flax module (``init``, ``apply``).
    objective: the objective of the masked network (ERM, or with a
      penalty).
    steps: training length (sets the temperature and budget schedules).
    keep_target: final keep ratio (SparseIRM's ``--prune-rate``, 0.95).
    task: loss / accuracy type.
    weight_opt: weights' optimizer (default Adam 6e-4).
    score_opt: scores' optimizer (default Adam 6e-3).
    pattern: which parameters get masks (:func:`jirm.methods.masks.select`).
    score_start, budget_end, sparsity, batch_size: see :func:`make_step`.
    steps_per_epoch: the temperature changes per epoch (with ``batch_size``:
      ``min_e n_e // batch_size``, the epochs of
      :func:`jirm.methods.epoch_batch`).
    init_params: start from these weights instead of a fresh init.

  Returns:
    A method over a :class:`SparseState`; ``predict`` draws one Bernoulli
    mask per evaluation point (from the state's key and step), ``export``
    gives ``{'params': weights, 'scores': scores}``, and the metrics also
    hold the keep ratio, the density and the inverse temperature.

  Example:
    >>> method = sparse_method(jirm.models.mlp(390), objective, steps=501,
    ...                        keep_target=0.95)
    >>> result = jirm.fit(splits, method, steps=501)
  """
  if steps < 1:
    raise ValueError(f"steps={steps!r} must be >= 1.")
  weight_opt = weight_opt or optax.adam(6e-4)
  score_opt = score_opt or optax.adam(6e-3)
  update = make_step(
      model.apply, objective, weight_opt=weight_opt, score_opt=score_opt,
      total_steps=steps, keep_target=keep_target, num_scores=None,
      task=task, score_start=score_start, budget_end=budget_end,
      sparsity=sparsity, steps_per_epoch=steps_per_epoch,
      batch_size=batch_size)

  def init(rng, data: base.EnvArrays) -> SparseState:
    k_init, k_train = jax.random.split(rng)
    params = (model.init(k_init, data.x[0, :1]) if init_params is None else
              init_params)
    scores = masks.init_scores(params, pattern)
    return SparseState(jnp.zeros((), jnp.int32), params, scores,
                       weight_opt.init(params), score_opt.init(scores),
                       k_train)

  def predict(state: SparseState, x_NX):
    key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 7)
    p = masks.apply(state.params, masks.bernoulli(state.scores, key))
    return model.apply(p, x_NX)

  return base.Method(init, update, predict, export=lambda state: {
      "params": state.params, "scores": state.scores})


class MRMState(NamedTuple):
  """The state of :func:`mrm_method`: one sub-state per phase.

  Attributes:
    step: updates taken in all phases.
    dense: phase 1 (dense training), a :class:`jirm.methods.TrainState`.
    masked: phase 2 (mask learning on the frozen phase-1 weights), a
      :class:`SparseState`.
    retrain: phase 3 (the subnetwork ``scores > 0.5`` retrained from the
      original initialisation), a :class:`jirm.methods.TrainState`.
  """

  step: jax.Array
  dense: base.TrainState
  masked: SparseState
  retrain: base.TrainState

  @property
  def params(self):
    """The retrained weights (phase 3)."""
    return self.retrain.params


def mrm_method(model, objective: objectives.Objective, *, dense_steps: int,
               mask_steps: int, sparsity: float = 1.0, lr: float = 6e-4,
               mask_lr: float = 6e-3, task: str = "binary",
               pattern: str = masks.DEFAULT_PATTERN) -> base.Method:
  """MRM (Zhang et al., "Can Subnetwork Structure be the Key to
  Out-of-Distribution Generalization?", ICML 2021) as one
  :class:`jirm.methods.Method` of three phases.

  Phase 1 (updates ``[0, dense_steps)``) trains the dense network with
  ``objective`` (ERM for MRM, or with a penalty for MRM+IRMv1 / MRM+REx)
  and Adam(``lr``). Phase 2 (the next ``mask_steps``) freezes those weights
  and learns keep probabilities ``s`` with the relaxed-Bernoulli mask and
  the sparsity term ``sparsity * mean(s)`` (Adam(``mask_lr``), no budget).
  Phase 3 (every update after) keeps the weights with ``s > 0.5`` and
  retrains them with ``objective`` and Adam(``lr``) from the original
  initialisation (the phase-1 init). Each phase starts its own step count
  (the objective's schedule restarts), and each phase's state starts as a
  separate fit with the same seed would start it. Train with
  ``jirm.fit(splits, method, steps=dense_steps + mask_steps +
  retrain_steps)``: the trainer evaluates phase 3 only (``eval_from =
  dense_steps + mask_steps``).

  Args:
    model: a Flax module (``init``, ``apply``), e.g. :func:`jirm.models.mlp`.
    objective: the objective of phases 1 and 3 (phase 2 adds the sparsity
      term to it).
    dense_steps, mask_steps: lengths of phases 1 and 2 (>= 1).
    sparsity: weight of ``mean(s)`` in phase 2.
    lr: Adam learning rate of phases 1 and 3.
    mask_lr: Adam learning rate of the scores in phase 2.
    task: loss / accuracy type (``splits.task``).
    pattern: which parameters get masks (:func:`jirm.methods.masks.select`).

  Returns:
    A method over an :class:`MRMState`; ``export`` gives ``{'params':
    retrained weights, 'mask': the 0/1 mask}``; the metrics are the
    objective's terms, ``train_acc``, ``mrm_phase`` (0, 1, 2) and
    ``density`` (1 in phase 1, the scores' mean in phase 2, the kept
    fraction in phase 3).

  Example:
    >>> method = mrm_method(jirm.models.mlp(390), jirm.erm + 1e-3 * jirm.l2,
    ...                     dense_steps=1501, mask_steps=500, sparsity=0.5)
    >>> res = jirm.fit(splits, method, steps=1501 + 500 + 1501)
    >>> res.history['density'][-1]   # the kept fraction
  """
  for name, value in (("dense_steps", dense_steps),
                      ("mask_steps", mask_steps)):
    if int(value) != value or value < 1:
      raise ValueError(f"{name}={value!r} must be a whole number >= 1.")
  dense_steps, mask_steps = int(dense_steps), int(mask_steps)
  dense = objective_lib.from_objective(model, objective, optax.adam(lr),
                                       task=task)
  masked = sparse_method(
      model, objective, steps=mask_steps, keep_target=1.0, task=task,
      weight_opt=optax.set_to_zero(), score_opt=optax.adam(mask_lr),
      pattern=pattern, score_start=0.0, sparsity=sparsity)
  adam = optax.adam(lr)

  def retrain_update(state: base.TrainState, mask, data):
    apply = lambda p, x: model.apply(masks.apply(p, mask), x)
    return objective_lib.make_train_step(apply, objective, adam,
                                         task=task)(state, data)

  def init(rng, data: base.EnvArrays) -> MRMState:
    d = dense.init(rng, data)
    m = masked.init(rng, data)
    # Phase 3 starts from the original initialisation with a fresh Adam.
    r = base.TrainState(d.step, d.params, adam.init(d.params), d.rng)
    return MRMState(jnp.zeros((), jnp.int32), d, m._replace(params=d.params),
                    r)

  def extras(metrics, phase, density):
    out = {k: v for k, v in metrics.items()
           if k not in ("inverse_temp", "keep_ratio", "density")}
    out["mrm_phase"] = jnp.asarray(phase, jnp.int32)
    out["density"] = jnp.asarray(density, jnp.float32)
    return out

  def phase1(state, data):
    d, metrics = dense.update(state.dense, data)
    # Phase 2 masks the current dense weights.
    return (state._replace(dense=d, masked=state.masked._replace(
        params=d.params)), extras(metrics, 0, 1.0))

  def phase2(state, data):
    m, metrics = masked.update(state.masked, data)
    return state._replace(masked=m), extras(metrics, 1,
                                            masks.density(m.scores))

  def phase3(state, data):
    mask = masks.hard(state.masked.scores)
    r, metrics = retrain_update(state.retrain, mask, data)
    return state._replace(retrain=r), extras(metrics, 2, masks.density(mask))

  def update(state: MRMState, data: base.EnvArrays):
    phase = ((state.step >= dense_steps).astype(jnp.int32) +
             (state.step >= dense_steps + mask_steps).astype(jnp.int32))
    new, metrics = jax.lax.switch(phase, (phase1, phase2, phase3), state,
                                  data)
    return new._replace(step=state.step + 1), metrics

  def predict(state: MRMState, x_NX):
    mask = masks.hard(state.masked.scores)
    return model.apply(masks.apply(state.retrain.params, mask), x_NX)

  def export(state: MRMState):
    return {"params": state.retrain.params,
            "mask": masks.hard(state.masked.scores)}

  return base.Method(init, update, predict, export=export,
                     eval_from=dense_steps + mask_steps)
