"""Training and evaluation: a jitted pure step, full-batch or minibatch.

The step does one forward pass over all environments (``[E, B, ...]`` is
reshaped to ``[E*B, ...]``), evaluates the objective on the per-environment
outputs, and applies an optax update. A schedule's optimizer reset (DomainBed
re-initialises Adam at the anneal step) is done inside the jitted step with
``jnp.where``. Per-step randomness is ``fold_in(rng, step)``.

Model selection (SPEC §6) is computed from periodic evaluations of every
environment: ``last``, ``train_domain_val`` (best mean accuracy on held-out
samples of the training domains) and ``oracle`` (best test accuracy; labelled
as such).

Example:
  >>> splits = jirm.data.colored_mnist(seed=0)
  >>> sched = jirm.schedules.preset('irm', weight=91257.19, anneal=190)
  >>> obj = jirm.erm + 0.0011 * jirm.l2 + sched * jirm.irmv1
  >>> result = fit(splits, model=jirm.models.mlp(390), objective=obj,
  ...              optimizer=optax.adam(4.9e-4), steps=501, seed=0)
  >>> result.selections['last']['test_acc']
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jirm import data as data_lib
from jirm import objectives

SELECTION_RULES = ("last", "train_domain_val", "val_worst_group", "oracle",
                   "oracle_train_gt60")


class TrainState(NamedTuple):
  """Explicit training state pytree."""

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


class EnvArrays(NamedTuple):
  """Device arrays of one :class:`jirm.data.Envs` (x, y, valid)."""

  x: jax.Array
  y: jax.Array
  valid: jax.Array

  @classmethod
  def from_envs(cls, envs: data_lib.Envs) -> "EnvArrays":
    return cls(jnp.asarray(envs.x), jnp.asarray(envs.y),
               jnp.asarray(envs.valid, jnp.float32))


def forward(apply_fn, params, x_EB):
  """One forward pass over all environments: ``[E, B, ...] -> [E, B, C]``."""
  e, b = x_EB.shape[:2]
  logits = apply_fn(params, x_EB.reshape((e * b,) + x_EB.shape[2:]))
  return logits.reshape(e, b, -1)


def _sample_batch(data: EnvArrays, rng, batch_size: int) -> EnvArrays:
  """Draws ``batch_size`` samples (with replacement) from every env."""
  n_valid_E = data.valid.sum(1).astype(jnp.int32)
  keys = jax.random.split(rng, data.y.shape[0])
  idx_EB = jax.vmap(lambda k, n: jax.random.randint(k, (batch_size,), 0, n))(
      keys, n_valid_E)
  take = lambda a: jnp.take_along_axis(
      a, idx_EB.reshape(idx_EB.shape + (1,) * (a.ndim - 2)), axis=1)
  return EnvArrays(take(data.x), take(data.y), take(data.valid))


def epoch_batch(data: EnvArrays, rng, step, batch_size: int) -> EnvArrays:
  """A balanced minibatch of ``batch_size`` samples from every env, drawn
  without replacement within an epoch (a fresh permutation per epoch).

  The epoch length is ``min_e n_e // batch_size`` steps; ``rng`` must be the
  run's fixed key (the epoch index is folded in).
  """
  n_valid_E = data.valid.sum(1).astype(jnp.int32)
  steps_per_epoch = jnp.maximum(n_valid_E.min() // batch_size, 1)
  epoch, pos = step // steps_per_epoch, step % steps_per_epoch
  keys = jax.random.split(jax.random.fold_in(rng, epoch), data.y.shape[0])
  # Valid rows first, in random order.
  order_EN = jax.vmap(lambda k, v: jnp.argsort(
      jnp.where(v > 0, jax.random.uniform(k, v.shape), 2.0)))(keys, data.valid)
  idx_EB = jax.lax.dynamic_slice_in_dim(order_EN, pos * batch_size,
                                        batch_size, axis=1)
  take = lambda a: jnp.take_along_axis(
      a, idx_EB.reshape(idx_EB.shape + (1,) * (a.ndim - 2)), axis=1)
  return EnvArrays(take(data.x), take(data.y), take(data.valid))


def tree_where(cond, new, old):
  """``new`` where the traced boolean ``cond`` holds, else ``old`` (leafwise;
  selects state inside jit without Python branching)."""
  return jax.tree.map(lambda a, b: jnp.where(cond, a, b), new, old)


def reset_at(optimizer: optax.GradientTransformation, opt_state, params,
             step, reset_step: Optional[int]):
  """``optimizer.init(params)`` when ``step == reset_step``, else
  ``opt_state`` (traced: no retrace at the reset). None never resets."""
  if reset_step is None:
    return opt_state
  return tree_where(step == reset_step, optimizer.init(params), opt_state)


def make_loss_fn(apply_fn, objective: objectives.Objective,
                 task: str = "binary"):
  """``loss(params, batch, rng, step) -> (total, aux)``: one forward pass
  over all environments, the objective, and the batch accuracy in
  ``aux['train_acc']``."""

  def loss_fn(params, batch: EnvArrays, rng, step):
    logits = forward(apply_fn, params, batch.x)
    out = objectives.Outputs(logits, batch.y, batch.valid, params, rng, task)
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

  def step_fn(state: TrainState, data: EnvArrays):
    k_batch, k_obj = jax.random.split(jax.random.fold_in(state.rng,
                                                         state.step))
    batch = data if batch_size is None else _sample_batch(data, k_batch,
                                                          batch_size)
    grads, aux = jax.grad(loss_fn, has_aux=True)(state.params, batch, k_obj,
                                                 state.step)
    opt_state = reset_at(optimizer, state.opt_state, state.params,
                         state.step, reset_step)
    updates, opt_state = optimizer.update(grads, opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(state.step + 1, params, opt_state, state.rng), aux

  return step_fn


def make_eval_fn(apply_fn, task: str = "binary"):
  """``eval(params, data) -> (acc_E, loss_E)`` for every environment."""

  def eval_fn(params, data: EnvArrays):
    logits = forward(apply_fn, params, data.x)
    out = objectives.Outputs(logits, data.y, data.valid, task=task)
    return objectives.accuracy(logits, data.y, data.valid, task), (
        objectives.env_risks(out))

  return eval_fn


@dataclasses.dataclass
class FitResult:
  """What :func:`fit` returns.

  Attributes:
    params: final parameters.
    history: dict of numpy arrays over evaluation points: ``step``,
      ``train_acc_E``, ``test_acc_E``, ``val_acc_E`` (if any) and the
      objective's aux values at that step (``term/...``, ``weight/...``).
    selections: rule -> dict(step, train_acc, test_acc, val_acc, env_acc).
    env_names: names of train / test / val envs.
    wall_s: wall time of the training loop including compilation.
  """

  params: Any
  history: dict
  selections: dict
  env_names: dict
  wall_s: float


def _group_metrics(acc_TE, sizes):
  """(average accuracy weighted by group size, worst non-empty group)."""
  sizes = np.asarray(sizes, np.float64)
  avg = (acc_TE * sizes).sum(1) / sizes.sum()
  worst = np.where(sizes > 0, acc_TE, np.inf).min(1)
  return avg, worst


def select(history: dict, env_names: dict) -> dict:
  """Applies the model-selection rules to a history of evaluations.

  On group datasets (``env_names`` holds ``test_sizes``: one env per group,
  :mod:`jirm.data.shift`) every selection also carries ``avg_acc``
  (sample-weighted), ``worst_group_acc`` and ``group_acc``, ``test_acc`` is
  the average accuracy, and ``val_worst_group`` picks the evaluation with
  the best worst-group validation accuracy (Sagawa et al. 2020).
  """
  train = history["train_acc_E"].mean(1)
  test = history["test_acc_E"].mean(1)
  val = history["val_acc_E"].mean(1) if "val_acc_E" in history else None
  groups = "test_sizes" in env_names
  if groups:
    test, test_worst = _group_metrics(history["test_acc_E"],
                                      env_names["test_sizes"])
    if val is not None and "val_sizes" in env_names:
      val, val_worst = _group_metrics(history["val_acc_E"],
                                      env_names["val_sizes"])
  picks = {"last": len(train) - 1, "oracle": int(np.argmax(test))}
  if groups and val is not None and "val_sizes" in env_names:
    picks["val_worst_group"] = int(np.argmax(val_worst))
  # SparseIRM's rule: best test accuracy among points with train acc > 0.6.
  ok = train > 0.6
  if ok.any():
    picks["oracle_train_gt60"] = int(np.argmax(np.where(ok, test, -np.inf)))
  if val is not None:
    picks["train_domain_val"] = int(np.argmax(val))
  out = {}
  for rule in SELECTION_RULES:
    if rule not in picks:
      continue
    i = picks[rule]
    env_acc = {n: float(a) for n, a in zip(env_names["train"],
                                           history["train_acc_E"][i])}
    env_acc.update({n: float(a) for n, a in zip(env_names["test"],
                                                history["test_acc_E"][i])})
    sel = dict(step=int(history["step"][i]), train_acc=float(train[i]),
               test_acc=float(test[i]), env_acc=env_acc)
    if val is not None:
      sel["val_acc"] = float(val[i])
    if groups:
      sel.update(avg_acc=float(test[i]), worst_group_acc=float(test_worst[i]),
                 group_acc={n: float(a) for n, a in zip(
                     env_names["test"], history["test_acc_E"][i])})
      if "val_sizes" in env_names and val is not None:
        sel["val_worst_group_acc"] = float(val_worst[i])
    out[rule] = sel
  return out


def fit(splits: data_lib.EnvSplits, *, model, objective: objectives.Objective,
        optimizer: optax.GradientTransformation, steps: int, seed: int = 0,
        batch_size: Optional[int] = None, eval_every: int = 10,
        progress: bool = False, desc: str = "",
        checkpoint_dir: Optional[str] = None,
        checkpoint_every: int = 100, init_params=None, mesh=None,
        metrics_dir: Optional[str] = None) -> FitResult:
  """Trains ``model`` on ``splits.train`` and evaluates every environment.

  Args:
    splits: environments (see :mod:`jirm.data`).
    model: a Flax module.
    objective: the objective (``erm + w * penalty + ...``).
    optimizer: optax transformation.
    steps: number of updates.
    seed: seeds initialisation and per-step randomness.
    batch_size: per-env minibatch size; None = full batch.
    eval_every: evaluate every this many steps and after the last one.
    progress: show a tqdm progress bar.
    desc: progress-bar label.
    checkpoint_dir: if set, the state and evaluation history are saved there
      with orbax every ``checkpoint_every`` steps (at evaluation points) and a
      later call with the same directory resumes from the latest checkpoint;
      the resumed run equals an uninterrupted one.
    checkpoint_every: steps between checkpoints (rounded up to an evaluation
      point).
    init_params: start from these parameters instead of a fresh init.
    mesh: a ``jax.sharding.Mesh`` from :func:`jirm.sharding.make_mesh`: the
      batch axis is split over its ``data`` axis, the state replicated; the
      result equals the single-device run up to float rounding.
    metrics_dir: write the evaluation rows (accuracies, every objective term
      and weight) as TensorBoard scalars there.

  Returns:
    A :class:`FitResult`.

  Raises:
    ValueError: on non-positive ``steps`` / ``eval_every`` or a batch size
      larger than an environment.
  """
  if steps < 1 or eval_every < 1:
    raise ValueError(f"steps={steps!r} and eval_every={eval_every!r} must be "
                     f">= 1.")
  if batch_size is not None and batch_size > min(splits.train.sizes):
    raise ValueError(f"batch_size={batch_size} exceeds the smallest training "
                     f"env ({min(splits.train.sizes)} samples); lower it or "
                     f"use batch_size=None (full batch).")
  t0 = time.time()
  task = splits.task
  train = EnvArrays.from_envs(splits.train)
  k_init, k_train = jax.random.split(jax.random.key(seed))
  params = (model.init(k_init, train.x[0, :1]) if init_params is None else
            init_params)
  state = TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params),
                     k_train)
  step_fn = jax.jit(make_train_step(model.apply, objective, optimizer,
                                    task=task, batch_size=batch_size),
                    donate_argnums=0)
  eval_fn = jax.jit(make_eval_fn(model.apply, task))
  evals = None
  if mesh is not None:
    from jirm import sharding  # pylint: disable=g-import-not-at-top
    if batch_size is not None:
      raise ValueError("mesh= shards the full batch; minibatch sampling "
                       "(batch_size) is single-device only.")
    train = sharding.shard_env_arrays(train, mesh)
    evals = {"train": train,
             "test": sharding.shard_env_arrays(
                 EnvArrays.from_envs(splits.test), mesh)}
    if splits.val is not None:
      evals["val"] = sharding.shard_env_arrays(
          EnvArrays.from_envs(splits.val), mesh)
    state = sharding.replicate(state, mesh)

  state, history, env_names = train_and_evaluate(
      state, step_fn, splits, lambda st, d: eval_fn(st.params, d)[0],
      evals=evals, train=train, steps=steps, eval_every=eval_every,
      progress=progress, desc=desc, checkpoint_dir=checkpoint_dir,
      checkpoint_every=checkpoint_every, metrics_dir=metrics_dir)
  return FitResult(state.params, history, select(history, env_names),
                   env_names, time.time() - t0)


def env_names_of(splits: data_lib.EnvSplits) -> dict:
  """``{'train': [...], 'test': [...], 'val': [...]}`` env names."""
  names = dict(train=list(splits.train.names), test=list(splits.test.names))
  if splits.val is not None:
    names["val"] = list(splits.val.names)
  if splits.info.get("group_envs"):  # One env per group (jirm.data.shift).
    names["test_sizes"] = splits.test.sizes
    if splits.val is not None:
      names["val_sizes"] = splits.val.sizes
  return names


def train_and_evaluate(state, step_fn, splits: data_lib.EnvSplits, acc_fn,
                       evals: Optional[dict] = None,
                       train: Optional[EnvArrays] = None, **loop_kwargs):
  """:func:`run_loop` with the standard evaluation rows.

  Args:
    state: initial state.
    step_fn: ``(state, train_arrays) -> (state, aux)`` (jitted).
    splits: the environments; training uses all of ``splits.train``.
    acc_fn: ``(state, EnvArrays) -> acc_E``.
    evals: name -> EnvArrays to evaluate (default train / test / val).
    train: ``splits.train`` as device arrays, if already made.
    **loop_kwargs: steps, eval_every, progress, desc, checkpoint_dir,
      checkpoint_every, metrics_dir.

  Returns:
    ``(state, history, env_names)``.
  """
  if train is None:
    train = EnvArrays.from_envs(splits.train)
  if evals is None:
    evals = {"train": train, "test": EnvArrays.from_envs(splits.test)}
    if splits.val is not None:
      evals["val"] = EnvArrays.from_envs(splits.val)

  def evaluate(state, aux):
    row = {"step": int(state.step)}
    for name, arrays in evals.items():
      row[f"{name}_acc_E"] = acc_fn(state, arrays)
    row.update(aux)
    return row

  state, history = run_loop(state, lambda s: step_fn(s, train), evaluate,
                            **loop_kwargs)
  return state, history, env_names_of(splits)


class DivergenceError(FloatingPointError):
  """Training produced a NaN/Inf; the message names the step and the term."""


def run_loop(state, step_fn, evaluate, *, steps: int, eval_every: int,
             progress: bool = False, desc: str = "",
             checkpoint_dir: Optional[str] = None,
             checkpoint_every: int = 100, metrics_dir: Optional[str] = None):
  """The host loop shared by every trainer: step, evaluate, checkpoint.

  Every step's aux values (objective terms, weights, total) are fetched at
  the next evaluation point (no per-step host sync) and checked: the first
  non-finite value stops the run with a :class:`DivergenceError` naming the
  step and the term; the checkpoint directory then holds the last good
  state (checkpoints are only written after a finite evaluation).

  Args:
    state: initial state (a NamedTuple with ``step`` and ``rng`` fields).
    step_fn: ``state -> (state, aux)`` (jitted).
    evaluate: ``(state, aux) -> dict`` of arrays for one history row.
    steps, eval_every, progress, desc, checkpoint_dir, checkpoint_every: see
      :func:`fit`.
    metrics_dir: if set, every step's aux scalars and every evaluation row
      are written there as TensorBoard event files.

  Returns:
    ``(state, history)``, history = dict of arrays stacked over rows.

  Raises:
    DivergenceError: on a NaN/Inf aux value.
  """
  rows = []
  ckpt = None if checkpoint_dir is None else _Checkpointer(checkpoint_dir)
  if ckpt is not None:
    state, rows = ckpt.restore(state, rows)
  writer = None if metrics_dir is None else _MetricWriter(metrics_dir)
  it = range(int(state.step), steps)
  if progress:
    import tqdm  # pylint: disable=g-import-not-at-top
    it = tqdm.tqdm(it, desc=desc, leave=False, mininterval=2.0,
                   initial=int(state.step), total=steps)
  last_saved = int(state.step)
  pending = []
  try:
    for i in it:
      state, aux = step_fn(state)
      pending.append(aux)
      if (i + 1) % eval_every == 0 or i + 1 == steps:
        fetched = jax.device_get(pending)
        _check_finite(fetched, i + 1 - len(fetched), last_saved,
                      checkpoint_dir)
        row = evaluate(state, aux)
        rows.append(jax.tree.map(lambda v: np.asarray(jax.device_get(v)), row))
        if writer is not None:
          writer.write(i + 1 - len(fetched), fetched, rows[-1])
        pending = []
        if ckpt is not None and (i + 1 - last_saved >= checkpoint_every or
                                 i + 1 == steps):
          ckpt.save(state, rows)
          last_saved = i + 1
  finally:
    if ckpt is not None:
      ckpt.close()
    if writer is not None:
      writer.close()
  history = {key: np.stack([np.asarray(r[key]) for r in rows])
             for key in rows[0]}
  return state, history


def _check_finite(auxes, first_step, last_saved, checkpoint_dir):
  for k, aux in enumerate(auxes):
    for name, v in aux.items():
      v = np.asarray(v)
      if np.issubdtype(v.dtype, np.floating) and not np.all(np.isfinite(v)):
        where = (f"; the last good checkpoint is step {last_saved} in "
                 f"{checkpoint_dir}" if checkpoint_dir else "")
        raise DivergenceError(
            f"training diverged: {name} = {v.tolist()} at step "
            f"{first_step + k}{where}. Lower the learning rate or the "
            f"penalty weight.")


class _MetricWriter:
  """TensorBoard scalars: per-step aux values and evaluation rows."""

  def __init__(self, directory: str):
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._w = SummaryWriter(os.path.abspath(directory))

  def write(self, first_step: int, auxes: list, row: dict) -> None:
    for k, aux in enumerate(auxes):
      for name, v in aux.items():
        if np.size(v) == 1:
          self._w.add_scalar(name, float(np.asarray(v)), first_step + k)
    step = int(row["step"])
    for name, v in row.items():
      if name.endswith("_acc_E"):
        v = np.asarray(v)
        self._w.add_scalar(name[:-2], float(v.mean()), step)
        for e, a in enumerate(v):
          self._w.add_scalar(f"{name[:-2]}/env{e}", float(a), step)

  def close(self) -> None:
    self._w.close()


class _Checkpointer:
  """One orbax CheckpointManager for a run: state + evaluation history."""

  def __init__(self, directory: str):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    self._ocp = ocp
    self._mngr = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))

  @staticmethod
  def _to_saveable(state):
    return state._replace(rng=jax.random.key_data(state.rng))

  def save(self, state, rows: list) -> None:
    ocp = self._ocp
    history = [{k: np.asarray(v).tolist() for k, v in r.items()}
               for r in rows]
    self._mngr.save(int(state.step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(self._to_saveable(state)),
        history=ocp.args.JsonSave(history)))

  def restore(self, state, rows: list):
    step = self._mngr.latest_step()
    if step is None:
      return state, rows
    ocp = self._ocp
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                            self._to_saveable(state))
    restored = self._mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract),
        history=ocp.args.JsonRestore()))
    st = restored["state"]
    st = st._replace(rng=jax.random.wrap_key_data(st.rng))
    history = [{k: np.asarray(v, np.float32 if k != "step" else np.int64)
                for k, v in r.items()} for r in restored["history"]]
    return st, history

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()
