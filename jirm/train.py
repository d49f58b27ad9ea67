"""The trainer: one host loop and one scan runner for every method.

:func:`fit` runs any :class:`jirm.methods.Method` (``init``, ``update``,
``predict`` over an explicit state pytree): it jits the update, evaluates
every environment every ``eval_every`` updates, applies the model-selection
rules, and adds what every method gets for free: orbax checkpoints and
resume, TensorBoard scalars, a device mesh, a progress bar and a divergence
check on the metrics and on every floating leaf of the state. The notebook
form ``fit(splits, model=..., objective=..., optimizer=...)`` builds
:func:`jirm.methods.from_objective` underneath.

Model selection (SPEC §6, :mod:`jirm.selection`) is computed from periodic
evaluations of every environment: ``last``, ``train_domain_val`` (best mean
accuracy on held-out samples of the training domains) and ``oracle`` (best
test accuracy; labelled as such).

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
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jirm import data as data_lib
from jirm import objectives
from jirm import methods as methods_lib
# The array helpers and the objective's update live with the methods (below
# the trainer); these names are kept for existing callers.
from jirm.methods.base import (EnvArrays, TrainState, epoch_batch, forward,  # pylint: disable=unused-import
                               reset_at, tree_where)
from jirm.methods.objective import (make_eval_fn, make_loss_fn,  # pylint: disable=unused-import
                                    make_train_step)

# The model-selection rules live below the trainer (methods extend them).
from jirm.selection import SELECTION_RULES, select  # pylint: disable=unused-import
RUNNERS = ("host", "scan")


@dataclasses.dataclass
class FitResult:
  """What :func:`fit` returns.

  Attributes:
    params: ``method.export(state)``: the final parameters (for deep models
      ``(params, batch_stats)``, for SparseIRM ``{'params', 'scores'}``).
    history: dict of numpy arrays over evaluation points: ``step``,
      ``train_acc_E``, ``test_acc_E``, ``val_acc_E`` (if any) and the
      method's metrics at that step (``term/...``, ``weight/...``).
    selections: rule -> dict(step, train_acc, test_acc, val_acc, env_acc).
    env_names: names of train / test / val envs.
    wall_s: wall time of the training loop including compilation.
    state: the method's final state (parameters, optimizer states and the
      method's extras).
    diverged: None, or (a :func:`jirm.sweep.fit_sweep` trial whose metrics
      or state became NaN/Inf) the divergence message; the history then
      stops before the bad update and ``selections`` is empty.
  """

  params: Any
  history: dict
  selections: dict
  env_names: dict
  wall_s: float
  state: Any = None
  diverged: Optional[str] = None


def make_accuracy_fn(predict, task: str = "binary",
                     chunk: Optional[int] = None):
  """``acc(state, data) -> acc_E`` from a method's ``predict``.

  Args:
    predict: ``(state, x_NX) -> logits_NC``.
    task: accuracy type.
    chunk: None evaluates all ``E * N`` samples in one call; else the
      samples are padded to a multiple of ``chunk`` per environment and
      evaluated ``E * chunk`` at a time (``lax.map``; bounds the memory of
      deep models).

  Returns:
    The accuracy function (jit it).
  """

  def acc_fn(state, data: EnvArrays):
    e, n = data.y.shape
    if chunk is None:
      logits = predict(state, data.x.reshape((e * n,) + data.x.shape[2:]))
      return objectives.accuracy(logits.reshape(e, n, -1), data.y,
                                 data.valid, task)
    pad = (-n) % chunk
    padded = jax.tree.map(
        lambda a: jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)),
        data)
    x_KEC = padded.x.reshape((e, -1, chunk) + data.x.shape[2:]).swapaxes(0,
                                                                         1)

    def one(x_ECX):
      return predict(state, x_ECX.reshape((-1,) + x_ECX.shape[2:])).reshape(
          x_ECX.shape[:2] + (-1,))

    logits = jax.lax.map(one, x_KEC).swapaxes(0, 1).reshape(e, n + pad, -1)
    return objectives.accuracy(logits, padded.y, padded.valid, task)

  return acc_fn


def subset(envs: data_lib.Envs, max_per_env: Optional[int]):
  """The first ``max_per_env`` samples of every environment (None: all), as
  ``eval_train_max`` evaluates the training environments.

  Example:
    >>> subset(splits.train, 1000).x.shape[1] <= 1000
  """
  if max_per_env is None or envs.x.shape[1] <= max_per_env:
    return envs
  return data_lib.Envs(envs.x[:, :max_per_env], envs.y[:, :max_per_env],
                       envs.agree[:, :max_per_env],
                       envs.valid[:, :max_per_env], envs.names,
                       envs.spurious)


def check_logits(shape, task: str) -> None:
  """Raises ValueError unless a model's logits ``[N, C]`` fit ``task``: one
  logit for ``'binary'`` / ``'regression'``, at least two for
  ``'multiclass'``."""
  c = shape[-1] if len(shape) > 1 else 1
  if task == "multiclass" and c < 2:
    raise ValueError(f"the model outputs {c} logit per sample for a "
                     f"multiclass task; build it with one output per class "
                     f"(e.g. jirm.models.mlp(..., out=10)).")
  if task != "multiclass" and c != 1:
    raise ValueError(f"the model outputs {c} logits per sample for a "
                     f"{task} task, which reads one; build it with out=1 or "
                     f"use multiclass data.")


def check_splits(splits: data_lib.EnvSplits) -> None:
  """Raises ValueError unless every split has one label and one valid flag
  per input and the test / validation inputs have the training inputs'
  shape."""
  shape = splits.train.x.shape[2:]
  for name in ("train", "test", "val"):
    envs = getattr(splits, name)
    if envs is None:
      continue
    x, y, valid = envs.x, envs.y, envs.valid
    if y.shape != x.shape[:2] or valid.shape != x.shape[:2]:
      raise ValueError(
          f"splits.{name}: labels {tuple(y.shape)} and valid "
          f"{tuple(valid.shape)} for inputs {tuple(x.shape)}; give one label "
          f"and one valid flag per input ([E, N]).")
    if x.shape[2:] != shape:
      raise ValueError(
          f"splits.{name}: inputs of shape {tuple(x.shape[2:])} per sample, "
          f"the training inputs {tuple(shape)}; build every split with the "
          f"same input shape.")


def check_steps(steps: int, eval_every: int) -> None:
  """Raises ValueError unless ``steps`` and ``eval_every`` are whole numbers
  >= 1."""
  for arg, value in (("steps", steps), ("eval_every", eval_every)):
    if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
        or value < 1):
      raise ValueError(f"{arg}={value!r}: use a whole number >= 1.")


def check_eval_from(steps: int, method) -> int:
  """``method.eval_from`` (0 for a method without one); raises ValueError
  unless ``steps`` exceeds it (the updates before its first evaluation,
  e.g. MRM's dense and mask phases)."""
  eval_from = getattr(method, "eval_from", 0)
  if steps <= eval_from:
    raise ValueError(
        f"steps={steps} must exceed the method's eval_from={eval_from} (the "
        f"updates before its first evaluation); pass steps > {eval_from}.")
  return eval_from


def check_predict(method, state, x_EN, task: str) -> None:
  """Raises ValueError unless ``method.predict``'s logits on ``state`` fit
  ``task`` (:func:`check_logits`); traced only, nothing runs."""
  check_logits(jax.eval_shape(method.predict, state, x_EN[0, :1]).shape, task)


def is_eval_point(n: int, steps: int, eval_every: int,
                  eval_from: int = 0) -> bool:
  """Whether the trainer evaluates after update ``n`` (1-based): at
  ``eval_from + k * eval_every`` (k >= 1) and after the last update."""
  return n > eval_from and ((n - eval_from) % eval_every == 0 or n == steps)


def check_batch_size(batch_size: Optional[int], envs: data_lib.Envs) -> None:
  """Raises ValueError unless ``batch_size`` is None or fits every env."""
  if batch_size is None:
    return
  if (isinstance(batch_size, bool) or
      not isinstance(batch_size, (int, np.integer)) or batch_size < 1):
    raise ValueError(f"batch_size={batch_size!r}: use a positive integer or "
                     f"None (full batch).")
  if batch_size > min(envs.sizes):
    raise ValueError(f"batch_size={batch_size} exceeds the smallest training "
                     f"env ({min(envs.sizes)} samples); lower it or use "
                     f"batch_size=None (full batch).")


def fit(splits: data_lib.EnvSplits, method=None, *, steps: int,
        seed: int = 0, eval_every: int = 10, model=None,
        objective: Optional[objectives.Objective] = None,
        optimizer: Optional[optax.GradientTransformation] = None,
        batch_size: Optional[int] = None, init_params=None,
        eval_chunk: Optional[int] = None,
        eval_train_max: Optional[int] = None, runner: str = "host",
        progress: bool = False, desc: str = "",
        checkpoint_dir: Optional[str] = None, checkpoint_every: int = 100,
        mesh=None, metrics_dir: Optional[str] = None) -> FitResult:
  """Trains ``method`` on ``splits.train`` and evaluates every environment.

  Args:
    splits: environments (see :mod:`jirm.data`).
    method: a :class:`jirm.methods.Method`; or None with ``model``,
      ``objective`` and ``optimizer`` (and optionally ``batch_size``,
      ``init_params``), which builds :func:`jirm.methods.from_objective`.
    steps: number of updates.
    seed: ``method.init`` gets ``jax.random.key(seed)``.
    eval_every: evaluate every this many steps and after the last one.
    model, objective, optimizer, batch_size, init_params: the notebook form
      (see :func:`jirm.methods.from_objective`).
    eval_chunk: evaluate this many samples per environment at a time (None:
      all at once).
    eval_train_max: evaluate the training environments on their first this
      many samples (None: all).
    runner: ``'host'`` (a Python loop over jitted updates: checkpoints,
      TensorBoard, progress) or ``'scan'`` (the whole run, updates and
      evaluations, as one jitted ``lax.scan``, :func:`scan_run`; a second
      run of the same method and shapes reuses the compiled program).
    progress: show a tqdm progress bar.
    desc: progress-bar label.
    checkpoint_dir: if set, the state and evaluation history are saved there
      with orbax every ``checkpoint_every`` steps (at evaluation points) and a
      later call with the same directory resumes from the latest checkpoint;
      the resumed run equals an uninterrupted one.
    checkpoint_every: steps between checkpoints (rounded up to the next
      evaluation point; before a method's ``eval_from``, to the next multiple
      of ``eval_every`` or ``eval_from``).
    mesh: a ``jax.sharding.Mesh`` from :func:`jirm.sharding.make_mesh`: the
      sample axis of every environment is split over its ``data`` axis, the
      state replicated; the result equals the single-device run up to float
      rounding.
    metrics_dir: write the evaluation rows (accuracies, every metric) as
      TensorBoard scalars there.

  Returns:
    A :class:`FitResult`.

  Raises:
    ValueError: on non-positive ``steps`` / ``eval_every``, a batch size
      larger than an environment, or options that do not go together.
    DivergenceError: a metric or a floating leaf of the state became NaN or
      Inf; the message names the step and the term or leaf.
  """
  check_steps(steps, eval_every)
  check_splits(splits)
  if runner not in RUNNERS:
    raise ValueError(f"runner={runner!r}: use one of {RUNNERS}.")
  check_batch_size(batch_size, splits.train)
  notebook = dict(model=model, objective=objective, optimizer=optimizer)
  if method is None:
    missing = [k for k, v in notebook.items() if v is None]
    if missing:
      raise ValueError(f"pass method= or all of model, objective and "
                       f"optimizer (missing: {', '.join(missing)}).")
    method = methods_lib.from_objective(model, objective, optimizer,
                                        task=splits.task,
                                        batch_size=batch_size,
                                        init_params=init_params)
  else:
    given = [k for k, v in dict(notebook, batch_size=batch_size,
                                init_params=init_params).items()
             if v is not None]
    if given:
      raise ValueError(f"{', '.join(given)}: these build a method; pass "
                       f"them to the method's factory, not with method=.")
  eval_from = check_eval_from(steps, method)
  if mesh is not None and batch_size is not None:
    raise ValueError("mesh= shards the full batch; minibatch sampling "
                     "(batch_size) is single-device only.")
  if runner == "scan":
    unsupported = dict(checkpoint_dir=checkpoint_dir, mesh=mesh,
                       metrics_dir=metrics_dir)
    bad = [k for k, v in unsupported.items() if v is not None]
    if bad:
      raise ValueError(
          f"runner='scan' supports no {', '.join(bad)}; use runner='host' "
          f"for checkpoints, a mesh or TensorBoard.")
  t0 = time.time()
  train = method.prepare(splits.train)
  evals = {"train": EnvArrays.from_envs(subset(splits.train,
                                                eval_train_max)),
           "test": EnvArrays.from_envs(splits.test)}
  if splits.val is not None:
    evals["val"] = EnvArrays.from_envs(splits.val)
  env_names = env_names_of(splits)
  if runner == "scan":
    state, history = _scan_fit(method, jax.random.key(seed), train, evals,
                               steps=steps, eval_every=eval_every,
                               task=splits.task, chunk=eval_chunk)
  else:
    state = _unaliased(method.init(jax.random.key(seed), train))
    check_predict(method, state, evals["test"].x, splits.task)
    if mesh is not None:
      from jirm import sharding  # pylint: disable=g-import-not-at-top
      if isinstance(train, EnvArrays):
        train = sharding.shard_env_arrays(train, mesh)
      elif hasattr(train, "shard"):  # A method's own data (IRM-TV pools).
        train = train.shard(mesh)
      else:
        raise ValueError(f"mesh= shards EnvArrays or data with a "
                         f"shard(mesh) method; this method prepares "
                         f"{type(train).__name__}.")
      evals = {k: sharding.shard_env_arrays(v, mesh)
               for k, v in evals.items()}
      state = sharding.replicate(state, mesh)
    step_fn = jax.jit(_checked(method.update), donate_argnums=0)
    acc_fn = jax.jit(make_accuracy_fn(method.predict, splits.task,
                                      eval_chunk))

    def evaluate(st, aux):
      row = {"step": int(st.step)}
      for name, arrays in evals.items():
        row[f"{name}_acc_E"] = acc_fn(st, arrays)
      row.update(aux)
      return row

    state, history = run_loop(state, lambda s: step_fn(s, train), evaluate,
                              steps=steps, eval_every=eval_every,
                              progress=progress, desc=desc,
                              checkpoint_dir=checkpoint_dir,
                              checkpoint_every=checkpoint_every,
                              metrics_dir=metrics_dir,
                              eval_from=eval_from)
  return FitResult(method.export(state), history, select(history, env_names),
                   env_names, time.time() - t0, state)


def _unaliased(state):
  """A state whose leaves are distinct buffers (an init that returns the
  same array twice, e.g. an EMA started at the parameters, cannot be
  donated to the jitted update otherwise)."""
  seen = set()

  def one(a):
    if isinstance(a, jax.Array) and id(a) in seen:
      return jnp.copy(a)
    seen.add(id(a))
    return a

  return jax.tree.map(one, state)


def _is_float(leaf) -> bool:
  return hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating)


def _float_leaves(tree):
  return [leaf for leaf in jax.tree.leaves(tree) if _is_float(leaf)]


def finite_leaves(tree):
  """``[L]`` booleans: is every value of each floating leaf finite."""
  leaves = _float_leaves(tree)
  if not leaves:
    return jnp.ones((0,), bool)
  return jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves])


def _checked(update):
  """``update`` that also returns :func:`finite_leaves` of the new state."""

  def step(state, data):
    state, metrics = update(state, data)
    return state, metrics, finite_leaves(state)

  return step


def leaf_names(tree):
  """The paths (``jax.tree_util.keystr``) of a tree's floating leaves, in
  :func:`finite_leaves` order."""
  paths = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [jax.tree_util.keystr(path) for path, leaf in paths
          if _is_float(leaf)]


def scan_run(method, key, train, evals: dict, *, steps: int,
             eval_every: int = 10, task: str = "binary",
             chunk: Optional[int] = None):
  """A whole run of ``method`` as nested ``lax.scan`` s: a pure function.

  ``method.eval_from`` updates without evaluation, then
  ``(steps - eval_from) // eval_every`` chunks of ``eval_every`` updates,
  each followed by an evaluation of every array in ``evals``, then the
  remaining updates and a last evaluation: the evaluation points of
  :func:`fit` (:func:`is_eval_point`). :func:`fit` with ``runner='scan'``
  jits it; :func:`jirm.sweep.fit_sweep` vmaps it over trials.

  Args:
    method: a :class:`jirm.methods.Method`.
    key: the PRNG key ``method.init`` gets.
    train: the prepared training data (``method.prepare(splits.train)``).
    evals: name -> :class:`EnvArrays` to evaluate (``train``, ``test``...).
    steps, eval_every: as in :func:`fit`.
    task: the data's accuracy type.
    chunk: see :func:`make_accuracy_fn`.

  Returns:
    ``(state, rows, metrics_S, finite_SL)``: the final state; the history
    rows stacked over evaluation points (``step``, ``<name>_acc_E`` and the
    metrics of the update just taken); every update's metrics stacked over
    the ``S = steps`` updates; and :func:`finite_leaves` of the state after
    each update (see :func:`first_divergence`).

  Example:
    >>> run = jax.jit(lambda key: scan_run(method, key, train,
    ...                                    {'test': test}, steps=100))
    >>> state, rows, metrics_S, finite_SL = run(jax.random.key(0))
  """
  check_steps(steps, eval_every)
  eval_from = check_eval_from(steps, method)
  acc_fn = make_accuracy_fn(method.predict, task, chunk)
  update = _checked(method.update)

  def one(state, _):
    state, metrics, ok = update(state, train)
    return state, (metrics, ok)

  def advance(state, length):
    state, (metrics, ok) = jax.lax.scan(one, state, None, length=length)
    row = {k: v[-1] for k, v in metrics.items()}
    row["step"] = state.step
    for name, arrays in evals.items():
      row[f"{name}_acc_E"] = acc_fn(state, arrays)
    return state, (row, metrics, ok)

  n_full, rem = divmod(steps - eval_from, eval_every)
  state = method.init(key, train)
  check_predict(method, state, evals["test"].x, task)
  parts = []
  warm = None
  if eval_from:
    state, warm = jax.lax.scan(one, state, None, length=eval_from)
  if n_full:
    state, (rows, metrics, ok) = jax.lax.scan(
        lambda s, _: advance(s, eval_every), state, None, length=n_full)
    flat = lambda v: v.reshape((n_full * eval_every,) + v.shape[2:])
    parts.append((rows, jax.tree.map(flat, metrics), flat(ok)))
  if rem:
    state, (row, metrics, ok) = advance(state, rem)
    parts.append((jax.tree.map(lambda v: v[None], row), metrics, ok))
  rows, metrics, ok = jax.tree.map(lambda *a: jnp.concatenate(a), *parts)
  if warm is not None:
    metrics, ok = jax.tree.map(lambda *a: jnp.concatenate(a), warm,
                               (metrics, ok))
  return state, rows, metrics, ok


_scan_run = jax.jit(scan_run, static_argnums=0,
                    static_argnames=("steps", "eval_every", "task", "chunk"))


def finite_steps(metrics_S: dict, finite_SL) -> np.ndarray:
  """``[S]`` booleans: after update ``s`` every floating metric and every
  state leaf (``finite_SL``, :func:`finite_leaves`) is finite."""
  finite_SL = np.asarray(finite_SL)
  ok_S = finite_SL.reshape(len(finite_SL), -1).all(1)
  for v in metrics_S.values():
    v = np.asarray(v)
    if np.issubdtype(v.dtype, np.floating):
      ok_S &= np.isfinite(v).reshape(len(v), -1).all(1)
  return ok_S


def first_divergence(metrics_S: dict, finite_SL,
                     leaf_names) -> Optional[tuple[int, str]]:
  """The first bad update of a scanned run and its divergence message.

  Args:
    metrics_S: every update's metrics (host arrays, leading axis = update).
    finite_SL: :func:`finite_leaves` after every update.
    leaf_names: the state's floating leaf paths (:func:`leaf_names`).

  Returns:
    None if every metric and state leaf stayed finite, else ``(step,
    message)``: the index of the first bad update and the message
    :class:`DivergenceError` carries in the host loop (same step and term).
  """
  ok_S = finite_steps(metrics_S, finite_SL)
  if ok_S.all():
    return None
  b = int(np.argmax(~ok_S))
  finite_SL = np.asarray(finite_SL)
  try:
    _check_finite({k: v[b] for k, v in metrics_S.items()}, b, None, None)
    _check_state(finite_SL[b], leaf_names, b, None, None)
  except DivergenceError as e:
    return b, str(e)
  raise AssertionError("unreachable: a bad step with nothing non-finite")


def _scan_fit(method, key, train, evals, *, steps, eval_every, task, chunk):
  state, rows, metrics, ok = _scan_run(method, key, train, evals,
                                       steps=steps, eval_every=eval_every,
                                       task=task, chunk=chunk)
  bad = first_divergence(jax.device_get(metrics), jax.device_get(ok),
                         leaf_names(state))
  if bad is not None:
    raise DivergenceError(bad[1])
  history = {k: np.asarray(v) for k, v in jax.device_get(rows).items()}
  return state, history


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


class DivergenceError(FloatingPointError):
  """Training produced a NaN/Inf; the message names the step and the term."""


def run_loop(state, step_fn, evaluate, *, steps: int, eval_every: int,
             progress: bool = False, desc: str = "",
             checkpoint_dir: Optional[str] = None,
             checkpoint_every: int = 100, metrics_dir: Optional[str] = None,
             eval_from: int = 0):
  """The host loop of :func:`fit`: step, evaluate, checkpoint.

  Every step's aux values (objective terms, weights, total) and the
  finiteness of every floating leaf of its new state are fetched at the
  next evaluation point (no per-step host sync) and checked: the first
  non-finite value stops the run with a :class:`DivergenceError` naming the
  step and the term or state leaf (an overflowed Adam moment freezes
  training with a finite loss; the state check catches it); the checkpoint
  directory then holds the last good state (checkpoints are only written
  after a finite evaluation).

  Args:
    state: initial state (a pytree with a ``step`` field).
    step_fn: ``state -> (state, aux, finite_leaves(state))`` (jitted).
    evaluate: ``(state, aux) -> dict`` of arrays for one history row.
    steps, eval_every, progress, desc, checkpoint_dir, checkpoint_every: see
      :func:`fit`.
    metrics_dir: if set, every step's aux scalars and every evaluation row
      are written there as TensorBoard event files.
    eval_from: evaluate at ``eval_from + k * eval_every`` and after the last
      step (:func:`is_eval_point`); before ``eval_from`` the loop still
      checks (and checkpoints) every ``eval_every`` steps and at
      ``eval_from``, without a history row.

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
  # The last checkpoint written, if any (a fresh state starts at step 0).
  good = last_saved if ckpt is not None and last_saved > 0 else None
  pending = []
  try:
    names = leaf_names(state)
    for i in it:
      state, aux, ok = step_fn(state)
      pending.append((aux, ok))
      n = i + 1
      evaluating = is_eval_point(n, steps, eval_every, eval_from)
      if evaluating or (n <= eval_from and (n % eval_every == 0 or
                                            n == eval_from)):
        fetched = jax.device_get(pending)
        first = n - len(fetched)
        for k, (aux_k, ok_k) in enumerate(fetched):
          _check_finite(aux_k, first + k, good, checkpoint_dir)
          _check_state(ok_k, names, first + k, good, checkpoint_dir)
        fetched = [a for a, _ in fetched]
        row = None
        if evaluating:
          row = jax.tree.map(lambda v: np.asarray(jax.device_get(v)),
                             evaluate(state, aux))
          rows.append(row)
        if writer is not None:
          writer.write(first, fetched, row)
        pending = []
        if ckpt is not None and (n - last_saved >= checkpoint_every or
                                 n == steps):
          ckpt.save(state, rows)
          last_saved = good = n
  finally:
    if ckpt is not None:
      ckpt.close()
    if writer is not None:
      writer.close()
  history = {key: np.stack([np.asarray(r[key]) for r in rows])
             for key in rows[0]}
  return state, history


def _where(last_saved, checkpoint_dir):
  return (f"; the last good checkpoint is step {last_saved} in "
          f"{checkpoint_dir}" if checkpoint_dir and last_saved is not None
          else "")


def _metric_rank(name: str) -> int:
  """Terms and weights name a divergence better than the total."""
  return 0 if name.startswith(("term/", "weight/")) else 1


def _check_finite(aux, step, last_saved, checkpoint_dir):
  """Raises DivergenceError if a floating value of one step's metrics is
  NaN/Inf (terms and weights named before the total)."""
  bad = []
  for name, v in aux.items():
    v = np.asarray(v)
    if np.issubdtype(v.dtype, np.floating) and not np.all(np.isfinite(v)):
      bad.append((name, v))
  if bad:
    bad.sort(key=lambda nv: _metric_rank(nv[0]))
    (name, v), rest = bad[0], [n for n, _ in bad[1:]]
    also = f" (also non-finite: {', '.join(rest)})" if rest else ""
    raise DivergenceError(
        f"training diverged: {name} = {v.tolist()} at step "
        f"{step}{_where(last_saved, checkpoint_dir)}{also}. "
        f"Lower the learning rate or the penalty weight.")


def _check_state(ok_L, names, step, last_saved, checkpoint_dir):
  ok_L = np.asarray(ok_L)
  if ok_L.all():
    return
  bad = [n for n, ok in zip(names, ok_L) if not ok]
  where = _where(last_saved, checkpoint_dir)
  raise DivergenceError(
      f"training diverged: the state leaf {bad[0]} is NaN/Inf after the "
      f"update at step {step} ({len(bad)} leaves in all) while every metric "
      f"was finite (an "
      f"overflowed optimizer moment freezes training){where}. Lower the "
      f"learning rate or the penalty weight.")


class _MetricWriter:
  """TensorBoard scalars: per-step aux values and evaluation rows."""

  def __init__(self, directory: str):
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._w = SummaryWriter(os.path.abspath(directory))

  def write(self, first_step: int, auxes: list, row: Optional[dict]) -> None:
    for k, aux in enumerate(auxes):
      for name, v in aux.items():
        if np.size(v) == 1:
          self._w.add_scalar(name, float(np.asarray(v)), first_step + k)
    if row is None:
      return
    step = int(row["step"])
    for name, v in row.items():
      if name.endswith("_acc_E"):
        v = np.asarray(v)
        self._w.add_scalar(name[:-2], float(v.mean()), step)
        for e, a in enumerate(v):
          self._w.add_scalar(f"{name[:-2]}/env{e}", float(a), step)

  def close(self) -> None:
    self._w.close()


def is_key(a) -> bool:
  """Whether ``a`` is a typed PRNG key array."""
  return hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jax.dtypes.prng_key)


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
    return jax.tree.map(
        lambda a: jax.random.key_data(a) if is_key(a) else a, state)

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
    st = jax.tree.map(
        lambda t, a: jax.random.wrap_key_data(a) if is_key(t) else a,
        state, restored["state"])
    history = [{k: np.asarray(v, np.float32 if k != "step" else np.int64)
                for k, v in r.items()} for r in restored["history"]]
    return st, history

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()
