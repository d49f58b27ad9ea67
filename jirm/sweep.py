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

from jirm import data as data_lib
from jirm import objectives
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


def make_run_fn(splits: data_lib.EnvSplits, *, model,
                objective_fn: Callable[[HParams], objectives.Objective],
                optimizer_fn: Callable[[HParams], optax.GradientTransformation],
                steps: int, eval_every: int = 10,
                batch_size: Optional[int] = None):
  """``run(hp, seed, train, evals) -> (params, history)`` for one trial: the
  pure function :func:`fit_sweep` vmaps (exposed for custom drivers).

  ``history`` holds, per evaluation point, ``step``, ``<name>_acc_E`` for each
  array in ``evals`` and the objective's aux values of the step just taken,
  exactly as :func:`jirm.train.fit` records them.
  """
  if steps < 1 or eval_every < 1:
    raise ValueError(f"steps={steps!r} and eval_every={eval_every!r} must be "
                     f">= 1.")
  task = splits.task
  eval_fn = train_lib.make_eval_fn(model.apply, task)
  n_full, rem = divmod(steps, eval_every)

  def run(hp, seed, train, evals):
    k_init, k_train = jax.random.split(jax.random.key(seed))
    params = model.init(k_init, train.x[0, :1])
    optimizer = optimizer_fn(hp)
    step_fn = train_lib.make_train_step(model.apply, objective_fn(hp),
                                        optimizer, task=task,
                                        batch_size=batch_size)
    state = train_lib.TrainState(jnp.zeros((), jnp.int32), params,
                                 optimizer.init(params), k_train)

    def advance(state, length):
      state, aux = jax.lax.scan(lambda s, _: step_fn(s, train), state, None,
                                length=length)
      row = {"step": state.step}
      for name, arrays in evals.items():
        row[f"{name}_acc_E"] = eval_fn(state.params, arrays)[0]
      row.update(jax.tree.map(lambda v: v[-1], aux))
      return state, row

    rows = []
    if n_full:
      state, full = jax.lax.scan(lambda s, _: advance(s, eval_every), state,
                                 None, length=n_full)
      rows.append(full)
    if rem:
      state, last = advance(state, rem)
      rows.append(jax.tree.map(lambda v: v[None], last))
    history = jax.tree.map(lambda *r: jnp.concatenate(r), *rows)
    return state.params, history

  return run


def fit_sweep(splits, *, model,
              objective_fn: Callable[[HParams], objectives.Objective],
              optimizer_fn: Callable[[HParams], optax.GradientTransformation],
              hparams: Optional[Mapping[str, Sequence[float]]] = None,
              seeds=(0,), pair: bool = False, steps: int,
              eval_every: int = 10,
              batch_size: Optional[int] = None,
              trials_per_call: Optional[int] = None, mesh=None,
              progress: bool = False) -> list:
  """Trains every (hyperparameter point, seed) trial in one compiled program.

  Args:
    splits: environments (see :mod:`jirm.data`) shared by all trials, or a
      function ``seed -> EnvSplits`` when each restart draws its own data
      (as the experiments do: label noise and colours depend on the seed);
      the per-trial arrays are then stacked on the trial axis too.
    model: a Flax module.
    objective_fn: ``hp -> Objective``; ``hp`` maps each name in ``hparams``
      to a traced float32 scalar.
    optimizer_fn: ``hp -> optax transformation`` (e.g. ``optax.adam(hp['lr'])``).
    hparams: name -> values, equal lengths (see :func:`grid`); None = one
      point with no swept hyperparameters.
    seeds: restarts per point; trial order is :func:`trials`.
    pair: trial ``i`` = (point ``i``, ``seeds[i]``) instead of the product.
    steps, eval_every, batch_size: as in :func:`jirm.train.fit`.
    trials_per_call: vmap at most this many trials at once (memory bound);
      the trials are run in equal chunks of the same compiled program (the
      last chunk padded by repeating a trial). None = all at once.
    mesh: optional ``jax.sharding.Mesh`` with axes ``sweep`` and ``data``
      (:func:`jirm.sharding.make_mesh`).
    progress: print one line per chunk.

  Returns:
    One :class:`jirm.train.FitResult` per trial, in :func:`trials` order
    (``trials(hparams, seeds)[i]`` names result ``i``); ``wall_s`` is the
    sweep's wall time (compilation included) divided by the number of trials.

  Raises:
    ValueError: on empty seeds, unequal hyperparameter lists or bad sizes.
  """
  from jirm import sharding  # pylint: disable=g-import-not-at-top
  seeds = [int(s) for s in seeds]
  if not seeds:
    raise ValueError("seeds is empty; give at least one seed.")
  hparams = dict(hparams or {})
  per_seed = callable(splits)
  splits_of = {}

  def get_splits(seed):
    if seed not in splits_of:
      splits_of[seed] = splits(seed) if per_seed else splits
    return splits_of[seed]

  first = get_splits(seeds[0])
  if batch_size is not None and batch_size > min(first.train.sizes):
    raise ValueError(f"batch_size={batch_size} exceeds the smallest training "
                     f"env ({min(first.train.sizes)} samples).")
  todo = trials(hparams, seeds, pair)
  n = len(todo)
  chunk = n if trials_per_call is None else max(1, min(int(trials_per_call), n))
  if mesh is not None:
    per = mesh.shape.get("sweep", 1)
    chunk = -(-chunk // per) * per  # A multiple of the sweep axis size.
  t0 = time.time()
  run = make_run_fn(first, model=model, objective_fn=objective_fn,
                    optimizer_fn=optimizer_fn, steps=steps,
                    eval_every=eval_every, batch_size=batch_size)

  def arrays(sp):
    ev = {"train": train_lib.EnvArrays.from_envs(sp.train),
          "test": train_lib.EnvArrays.from_envs(sp.test)}
    if sp.val is not None:
      ev["val"] = train_lib.EnvArrays.from_envs(sp.val)
    return ev

  def place(ev, stacked):
    if mesh is None:
      return ev
    shard = lambda a: sharding.shard_env_arrays(a, mesh, stacked=stacked)
    return {k: shard(v) for k, v in ev.items()}

  data_axis = 0 if per_seed else None
  def sweep_run(hp, seed, ev):
    return run(hp, seed, ev["train"], ev)

  vrun = jax.jit(jax.vmap(sweep_run, in_axes=(0, 0, data_axis)))
  shared = None if per_seed else place(arrays(first), False)
  names = sorted(hparams)
  outs = []
  for lo in range(0, n, chunk):
    part = todo[lo:lo + chunk]
    part = part + [part[-1]] * (chunk - len(part))
    hp = {k: jnp.asarray([t[k] for t in part], jnp.float32) for k in names}
    seed_T = jnp.asarray([t["seed"] for t in part], jnp.uint32)
    if mesh is not None:
      hp, seed_T = sharding.shard_sweep((hp, seed_T), mesh)
    if per_seed:
      ev = jax.tree.map(lambda *a: jnp.stack(a),
                        *[arrays(get_splits(t["seed"])) for t in part])
      ev = place(ev, True)
      splits_of.clear()  # Hold one chunk's data at a time.
    else:
      ev = shared
    params, history = vrun(hp, seed_T, ev)
    outs.append(jax.device_get((params, history)))
    if progress:
      print(f"sweep: trials {lo + 1}-{min(lo + chunk, n)} of {n} done "
            f"({time.time() - t0:.0f}s)", flush=True)
  wall = (time.time() - t0) / n
  env_names = train_lib.env_names_of(first)
  results = []
  for i in range(n):
    params, history = outs[i // chunk]
    j = i % chunk
    h = {k: np.asarray(v[j]) for k, v in history.items()}
    p = jax.tree.map(lambda v: np.asarray(v[j]), params)
    results.append(train_lib.FitResult(p, h, train_lib.select(h, env_names),
                                       env_names, wall))
  return results
