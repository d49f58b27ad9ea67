"""Many restarts and scalar hyperparameters of one method in one program.

:func:`fit_sweep` vmaps a whole training run (init, ``steps`` updates as a
``lax.scan``, periodic evaluation of every environment) over a *sweep axis*
of trials, so ``T`` restarts x penalty weights x learning rates compile once
and run as one XLA program. Each trial's result equals a separate
:func:`jirm.train.fit` with the same seed and hyperparameters (same
initialisation key split, same per-step ``fold_in`` randomness, same
evaluation points; differences are float rounding, ~1e-7 per step).

Scalar hyperparameters reach the objective and optimizer as traced values,
so the builders must only do arithmetic with them (``jirm.schedules.preset``,
``jirm.methods.build_objective`` and optax accept traced values). Structural
settings (hidden width, step counts, the anneal step) are fixed per call.

With a ``mesh`` (:func:`jirm.sharding.make_mesh`) the trials are split over
its ``sweep`` axis and every trial's batch over its ``data`` axis; the
penalties still see the global per-environment risks.

Example:
  >>> def objective_fn(hp):
  ...   sched = jirm.schedules.preset('irm', weight=hp['penalty_weight'],
  ...                                 anneal=190)
  ...   return jirm.erm + 0.0011 * jirm.l2 + sched * jirm.irmv1
  >>> results = fit_sweep(
  ...     splits, model=jirm.models.mlp(390), objective_fn=objective_fn,
  ...     optimizer_fn=lambda hp: optax.adam(hp['lr']),
  ...     hparams=grid(penalty_weight=[1e2, 1e4], lr=[4.9e-4]),
  ...     seeds=range(8), steps=501)   # 16 trials, one compilation
  >>> results[0].selections['last']['test_acc']
"""

from __future__ import annotations

import itertools
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jirm import objectives
from jirm import selection
from jirm import train as train_lib

HParams = Mapping[str, Any]


def grid(**axes: Sequence[float]) -> dict:
  """Cartesian product of hyperparameter values, as equal-length lists.

  Example:
    >>> grid(penalty_weight=[1e2, 1e4], lr=[1e-3])
    {'penalty_weight': [100.0, 10000.0], 'lr': [0.001, 0.001]}
  """
  if not axes:
    return {}
  for k, v in axes.items():
    if len(v) == 0:
      raise ValueError(f"grid axis {k!r} is empty; give at least one value.")
  names = list(axes)
  rows = list(itertools.product(*(axes[n] for n in names)))
  return {n: [float(r[i]) for r in rows] for i, n in enumerate(names)}


def trials(hparams: Mapping[str, Sequence[float]], seeds,
           pair: bool = False) -> list:
  """Every (hyperparameter point, seed) pair, seed varying fastest:
  ``[{'seed': s, **hp}, ...]``; with ``pair=True`` point ``i`` runs with
  ``seeds[i]`` only (an explicit trial list)."""
  hparams = dict(hparams)
  n = _num_points(hparams)
  if pair:
    if len(seeds) != n:
      raise ValueError(f"pair=True needs one seed per point: {len(seeds)} "
                       f"seeds for {n} points.")
    return [dict(seed=int(s), **{k: float(v[i]) for k, v in hparams.items()})
            for i, s in enumerate(seeds)]
  out = []
  for i in range(n):
    for s in seeds:
      out.append(dict(seed=int(s), **{k: float(v[i])
                                      for k, v in hparams.items()}))
  return out


def _num_points(hparams) -> int:
  lengths = {k: len(v) for k, v in hparams.items()}
  if len(set(lengths.values())) > 1:
    raise ValueError(f"hyperparameter lists differ in length: {lengths}; use "
                     f"jirm.sweep.grid(...) for a product.")
  return next(iter(lengths.values()), 1)


def fit_sweep(splits, method_fn: Optional[Callable[[HParams], Any]] = None,
              *, hparams: Optional[Mapping[str, Sequence[float]]] = None,
              seeds=(0,), pair: bool = False, steps: int,
              eval_every: int = 10, eval_chunk: Optional[int] = None,
              eval_train_max: Optional[int] = None,
              trials_per_call: Optional[int] = None, mesh=None,
              progress: bool = False,
              on_result: Optional[Callable[[int, Any], None]] = None,
              model=None,
              objective_fn: Optional[Callable[[HParams],
                                              objectives.Objective]] = None,
              optimizer_fn: Optional[Callable[
                  [HParams], optax.GradientTransformation]] = None,
              batch_size: Optional[int] = None) -> list:
  """Trains every (hyperparameter point, seed) trial in one compiled program.

  Any :class:`jirm.methods.Method` sweeps: ``method_fn(hp)`` builds the
  method from traced hyperparameters, and :func:`jirm.train.scan_run` (the
  scan runner under :func:`jirm.fit`) is vmapped over the trials. A trial
  whose metrics or state become NaN/Inf is recorded as diverged
  (``FitResult.diverged`` holds the message :func:`jirm.fit` would raise,
  its history stops before the bad update and it has no selections, so no
  rule can pick it); the other trials are unaffected.

  Args:
    splits: environments (see :mod:`jirm.data`) shared by all trials, or a
      function ``seed -> EnvSplits`` when each restart draws its own data
      (as the experiments do: label noise and colours depend on the seed);
      the per-trial arrays are then stacked on the trial axis too.
    method_fn: ``hp -> Method``; ``hp`` maps each name in ``hparams`` to a
      traced float32 scalar, so the factory may only do arithmetic with it
      (``jirm.schedules.preset``, optax and every jirm factory accept traced
      values). Structural settings (widths, step counts, the anneal step)
      are fixed per call. ``method_fn(hp).prepare`` must not depend on
      ``hp``.
    hparams: name -> values, equal lengths (see :func:`grid`); None = one
      point with no swept hyperparameters.
    seeds: restarts per point; trial order is :func:`trials`.
    pair: trial ``i`` = (point ``i``, ``seeds[i]``) instead of the product.
    steps, eval_every, eval_chunk, eval_train_max: as in
      :func:`jirm.train.fit`.
    trials_per_call: vmap at most this many trials at once (memory bound);
      the trials are run in equal chunks of the same compiled program (the
      last chunk padded by repeating a trial). None = all at once.
    mesh: optional ``jax.sharding.Mesh`` with axes ``sweep`` and ``data``
      (:func:`jirm.sharding.make_mesh`).
    progress: print one line per chunk.
    on_result: called as ``on_result(i, result)`` for each trial as soon as
      its chunk has finished (persist results there: a sweep killed later
      keeps them).
    model, objective_fn, optimizer_fn, batch_size: the notebook form
      instead of ``method_fn``: ``from_objective(model, objective_fn(hp),
      optimizer_fn(hp), batch_size=batch_size)``.

  Returns:
    One :class:`jirm.train.FitResult` per trial, in :func:`trials` order
    (``trials(hparams, seeds)[i]`` names result ``i``); ``wall_s`` is the
    sweep's wall time (compilation included) divided by the number of trials.

  Raises:
    ValueError: on empty seeds, unequal hyperparameter lists, bad sizes, or
      both ``method_fn`` and the notebook arguments.
  """
  from jirm import methods as methods_lib  # pylint: disable=g-import-not-at-top
  from jirm import sharding  # pylint: disable=g-import-not-at-top
  seeds = [int(s) for s in seeds]
  if not seeds:
    raise ValueError("seeds is empty; give at least one seed.")
  train_lib.check_steps(steps, eval_every)
  hparams = dict(hparams or {})
  per_seed = callable(splits)
  splits_of = {}

  def get_splits(seed):
    if seed not in splits_of:
      splits_of[seed] = splits(seed) if per_seed else splits
    return splits_of[seed]

  first = get_splits(seeds[0])
  notebook = dict(model=model, objective_fn=objective_fn,
                  optimizer_fn=optimizer_fn)
  if method_fn is None:
    missing = [k for k, v in notebook.items() if v is None]
    if missing:
      raise ValueError(f"pass method_fn= or all of model, objective_fn and "
                       f"optimizer_fn (missing: {', '.join(missing)}).")
    train_lib.check_batch_size(batch_size, first.train)
    method_fn = lambda hp: methods_lib.from_objective(
        model, objective_fn(hp), optimizer_fn(hp), task=first.task,
        batch_size=batch_size)
  else:
    given = [k for k, v in dict(notebook, batch_size=batch_size).items()
             if v is not None]
    if given:
      raise ValueError(f"{', '.join(given)}: these build a method; pass "
                       f"them to the factory method_fn calls.")
  todo = trials(hparams, seeds, pair)
  n = len(todo)
  chunk = n if trials_per_call is None else max(1, min(int(trials_per_call), n))
  if mesh is not None:
    per = mesh.shape.get("sweep", 1)
    chunk = -(-chunk // per) * per  # A multiple of the sweep axis size.
  t0 = time.time()
  names = sorted(hparams)
  hp_of = lambda part: {k: jnp.asarray([t[k] for t in part], jnp.float32)
                        for k in names}
  # A concrete instance: the host-side prepare and the state's structure.
  probe = method_fn({k: v[0] for k, v in hp_of(todo[:1]).items()})
  train_lib.check_eval_from(steps, probe)
  prepare = probe.prepare
  own_train = prepare != train_lib.EnvArrays.from_envs
  if mesh is not None and own_train:
    raise ValueError("mesh= shards EnvArrays; this method prepares its own "
                     "training data.")

  # The training data doubles as the train evaluation unless the method
  # prepares its own or only a subset is evaluated.
  separate = own_train or eval_train_max is not None

  def arrays(sp):
    ev = {"train": train_lib.EnvArrays.from_envs(
              train_lib.subset(sp.train, eval_train_max)),
          "test": train_lib.EnvArrays.from_envs(sp.test)}
    if sp.val is not None:
      ev["val"] = train_lib.EnvArrays.from_envs(sp.val)
    return (prepare(sp.train) if separate else None), ev

  def place(data, stacked):
    if mesh is None:
      return data
    shard = lambda a: sharding.shard_env_arrays(a, mesh, stacked=stacked)
    train = None if data[0] is None else shard(data[0])
    return train, {k: shard(v) for k, v in data[1].items()}

  def sweep_run(hp, seed, data):
    train, ev = data
    return train_lib.scan_run(
        method_fn(hp), jax.random.key(seed),
        ev["train"] if train is None else train, ev, steps=steps,
        eval_every=eval_every, task=first.task, chunk=eval_chunk)

  data_axis = 0 if per_seed else None
  vrun = jax.jit(jax.vmap(sweep_run, in_axes=(0, 0, data_axis)))
  first_data = arrays(first)
  shared = None if per_seed else place(first_data, False)
  leaf_names = train_lib.leaf_names(jax.eval_shape(
      probe.init, jax.random.key(0),
      first_data[1]["train"] if first_data[0] is None else first_data[0]))
  env_names = train_lib.env_names_of(first)
  results = [None] * n
  for lo in range(0, n, chunk):
    part = todo[lo:lo + chunk]
    real = len(part)
    part = part + [part[-1]] * (chunk - real)
    hp, seed_T = hp_of(part), jnp.asarray([t["seed"] for t in part],
                                          jnp.uint32)
    if mesh is not None:
      hp, seed_T = sharding.shard_sweep((hp, seed_T), mesh)
    if per_seed:
      data = jax.tree.map(lambda *a: jnp.stack(a),
                          *[arrays(get_splits(t["seed"])) for t in part])
      data = place(data, True)
      splits_of.clear()  # Hold one chunk's data at a time.
    else:
      data = shared
    state, *logs = vrun(hp, seed_T, data)
    rows, metrics, ok = jax.device_get(logs)
    wall = (time.time() - t0) / (lo + real)
    for j in range(real):
      take = lambda t, j=j: jax.tree.map(lambda v: np.asarray(v[j]), t)
      st = jax.tree.map(  # PRNG keys stay JAX arrays.
          lambda v, j=j: v[j] if train_lib.is_key(v) else np.asarray(v[j]),
          state)
      results[lo + j] = _result(probe, st, take(rows), take(metrics),
                                take(ok), leaf_names, env_names, wall)
      if on_result is not None:
        on_result(lo + j, results[lo + j])
    if progress:
      print(f"sweep: trials {lo + 1}-{lo + real} of {n} done "
            f"({time.time() - t0:.0f}s)", flush=True)
  wall = (time.time() - t0) / n
  for r in results:
    r.wall_s = wall
  return results


def _result(method, state, rows, metrics_S, finite_SL, leaf_names,
            env_names, wall):
  """One trial's FitResult; a diverged trial keeps the evaluations before
  its first bad update and has no selections."""
  bad = train_lib.first_divergence(metrics_S, finite_SL, leaf_names)
  history = {k: np.asarray(v) for k, v in rows.items()}
  msg = None
  if bad is None:
    selections = selection.select(history, env_names)
  else:
    step, msg = bad
    keep = history["step"] <= step
    history = {k: v[keep] for k, v in history.items()}
    selections = {}
  return train_lib.FitResult(method.export(state), history, selections,
                             env_names, wall, state, diverged=msg)

