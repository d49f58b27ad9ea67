"""SparseIRM / SparseERM and MRM trainers over :mod:`jirm.masks`.

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

import time
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from jirm import data as data_lib
from jirm import masks
from jirm import objectives
from jirm.methods import base


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
    pattern: which parameters get masks (:func:`jirm.masks.select`).
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


def fit_mrm(splits: data_lib.EnvSplits, *, model,
            objective: objectives.Objective, dense_steps: int,
            mask_steps: int, retrain_steps: int, sparsity: float = 1.0,
            seed: int = 0, lr: float = 6e-4, mask_lr: float = 6e-3,
            pattern: str = masks.DEFAULT_PATTERN, eval_every: int = 10,
            progress: bool = False, desc: str = ""):
  """MRM: dense training, mask learning, retraining the subnetwork.

  Phase 1 trains the dense network with ``objective`` (ERM for MRM, or
  with a penalty for MRM+IRMv1 / MRM+REx). Phase 2 freezes those weights
  and learns keep probabilities with the relaxed-Bernoulli mask and a
  sparsity term ``sparsity * mean(s)`` (no budget). Phase 3 keeps the
  weights with ``s > 0.5`` and retrains them with ``objective`` from the
  original initialisation; its history is the result.

  Returns:
    A :class:`jirm.train.FitResult` of phase 3 with ``params =
    {'params', 'mask'}``; ``history['mrm_density']`` is the kept fraction.
  """
  from jirm import train as train_lib  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  init = model.init(jax.random.split(jax.random.key(seed))[0],
                    jnp.asarray(splits.train.x[0, :1]))
  dense = train_lib.fit(splits, model=model, objective=objective,
                        optimizer=optax.adam(lr), steps=dense_steps,
                        seed=seed, eval_every=dense_steps, progress=progress,
                        desc=desc + " dense")
  masked = train_lib.fit(splits, sparse_method(
      model, objective, steps=mask_steps, keep_target=1.0, task=splits.task,
      weight_opt=optax.set_to_zero(), score_opt=optax.adam(mask_lr),
      pattern=pattern, score_start=0.0, sparsity=sparsity,
      init_params=dense.params), steps=mask_steps, seed=seed,
                          eval_every=mask_steps, progress=progress,
                          desc=desc + " mask")
  hard = masks.hard(masked.params["scores"])
  sub = _Masked(model, hard)
  res = train_lib.fit(splits, model=sub, objective=objective,
                      optimizer=optax.adam(lr), steps=retrain_steps,
                      seed=seed, eval_every=eval_every, progress=progress,
                      desc=desc + " retrain", init_params=init)
  res.history["mrm_density"] = jnp.full(len(res.history["step"]),
                                        float(masks.density(hard)))
  res.params = {"params": res.params, "mask": hard}
  res.wall_s = time.time() - t0
  return res


class _Masked:
  """A model whose masked weights are multiplied by a fixed mask."""

  def __init__(self, model, mask):
    self.model, self.mask = model, mask

  def init(self, rng, x):
    return self.model.init(rng, x)

  def apply(self, params, x):
    return self.model.apply(masks.apply(params, self.mask), x)
