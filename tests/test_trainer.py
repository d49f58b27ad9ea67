"""The method protocol and the one trainer: a method written outside jirm
runs through jirm.fit with checkpoints, both runners and the divergence
checks; nothing below the trainer imports it."""

import ast
import pathlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jirm
from jirm import train as train_lib
from jirm.methods import base


@pytest.fixture(scope="module")
def splits(synthetic_mnist):
  return jirm.data.colored_mnist(0, data_num=600, mnist=synthetic_mnist)


class EMAState(NamedTuple):
  step: jax.Array
  params: Any
  ema: Any          # Method extra: an exponential moving average.
  opt_state: Any
  rng: jax.Array    # Nested key leaf: checkpointed as key data.


def ema_method(model, optimizer, decay=0.5):
  """A stateful method in about twenty lines: ERM whose prediction is the
  EMA of the parameters (Polyak averaging)."""
  loss_fn = jirm.methods.make_loss_fn(model.apply, jirm.erm * 1.0)

  def init(rng, data):
    k_init, k_run = jax.random.split(rng)
    params = model.init(k_init, data.x[0, :1])
    return EMAState(jnp.zeros((), jnp.int32), params, params,
                    optimizer.init(params), {"run": k_run})

  def update(state, data):
    batch = base.sample_batch(
        data, jax.random.fold_in(state.rng["run"], state.step), 16)
    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, batch,
                                                     None, state.step)
    upd, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, upd)
    ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state.ema,
                       params)
    return state._replace(step=state.step + 1, params=params, ema=ema,
                          opt_state=opt_state), metrics

  def predict(state, x_NX):
    return model.apply(state.ema, x_NX)

  return jirm.Method(init, update, predict)


def _assert_same(a, b, rtol=1e-6):
  assert a.selections == b.selections
  assert sorted(a.history) == sorted(b.history)
  for key in a.history:
    np.testing.assert_allclose(a.history[key], b.history[key], rtol=rtol,
                               atol=1e-7, err_msg=key)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol,
                                                       atol=1e-7),
               a.params, b.params)


def test_own_method_resumes_from_checkpoint_exactly(splits, tmp_path):
  method = ema_method(jirm.models.mlp(8), optax.adam(1e-2))
  full = jirm.fit(splits, method, steps=6, eval_every=2)
  ckpt = str(tmp_path / "ckpt")
  jirm.fit(splits, method, steps=4, eval_every=2, checkpoint_dir=ckpt,
           checkpoint_every=2)
  resumed = jirm.fit(splits, method, steps=6, eval_every=2,
                     checkpoint_dir=ckpt, checkpoint_every=2)
  _assert_same(full, resumed, rtol=0)
  # The extras are in the state, and predict used them: EMA != params.
  ema, params = full.state.ema, full.state.params
  assert not all(np.allclose(e, p) for e, p in zip(jax.tree.leaves(ema),
                                                  jax.tree.leaves(params)))


def test_scan_runner_equals_host_loop(splits):
  sched = jirm.schedules.preset("irm", weight=100.0, anneal=3)
  method = jirm.from_objective(jirm.models.mlp(8),
                               jirm.erm + sched * jirm.irmv1,
                               optax.adam(1e-2))
  host = jirm.fit(splits, method, steps=7, eval_every=2)
  scan = jirm.fit(splits, method, steps=7, eval_every=2, runner="scan")
  _assert_same(host, scan, rtol=1e-5)
  assert list(host.history["step"]) == [2, 4, 6, 7]


def test_notebook_form_is_from_objective(splits):
  kw = dict(steps=4, eval_every=2, seed=3)
  obj = jirm.erm + 10.0 * jirm.vrex
  a = jirm.fit(splits, model=jirm.models.mlp(8), objective=obj,
               optimizer=optax.sgd(0.1), batch_size=32, **kw)
  b = jirm.fit(splits, jirm.from_objective(jirm.models.mlp(8), obj,
                                           optax.sgd(0.1), batch_size=32),
               **kw)
  _assert_same(a, b, rtol=0)


@pytest.mark.parametrize("runner", ["host", "scan"])
def test_overflowed_adam_moment_is_divergence_not_a_frozen_run(splits, runner):
  # 1e30 * ||theta||^2 is finite in float32, its gradient squared (Adam's
  # second moment) is not: the update is then 0 and training would freeze
  # with finite metrics.
  method = jirm.from_objective(jirm.models.mlp(8),
                               jirm.erm + 1e30 * jirm.l2, optax.adam(1e-3))
  with pytest.raises(train_lib.DivergenceError,
                     match=r"state leaf .*nu.* after the update at step 0 "):
    jirm.fit(splits, method, steps=4, eval_every=2, runner=runner)


@pytest.mark.parametrize("runner", ["host", "scan"])
def test_nan_metric_names_step_and_term(splits, runner):
  sched = jirm.schedules.PenaltySchedule(weight=float("nan"), anneal=2,
                                           before=0.0, name="nan")
  method = jirm.from_objective(jirm.models.mlp(8),
                               jirm.erm + sched * jirm.irmv1,
                               optax.sgd(0.1))
  with pytest.raises(train_lib.DivergenceError, match=(
      r"weight/irmv1 = nan at step 2 \(also non-finite: total\)")):
    jirm.fit(splits, method, steps=4, eval_every=4, runner=runner)


def test_fit_rejects_mixed_forms(splits):
  method = ema_method(jirm.models.mlp(8), optax.sgd(0.1))
  with pytest.raises(ValueError, match="optimizer: these build a method"):
    jirm.fit(splits, method, steps=2, optimizer=optax.sgd(0.1))
  with pytest.raises(ValueError, match=r"missing: optimizer"):
    jirm.fit(splits, steps=2, model=jirm.models.mlp(8), objective=jirm.erm)
  with pytest.raises(ValueError, match="runner='scan' supports no "
                     "checkpoint_dir"):
    jirm.fit(splits, method, steps=5, eval_every=2, runner="scan",
             checkpoint_dir="/nonexistent")
  with pytest.raises(ValueError, match="runner='loop'"):
    jirm.fit(splits, method, steps=2, runner="loop")


class CountState(NamedTuple):
  step: jax.Array
  x: jax.Array


def _count_loop(steps, ckpt, calls, stop_at=None):
  """The host loop over a counter state (x += step), stopping with an
  interrupt before update ``stop_at``."""
  update = jax.jit(lambda s: (CountState(s.step + 1, s.x + s.step),
                              {"x": s.x}, train_lib.finite_leaves(s)))

  def step_fn(state):
    if stop_at is not None and len(calls) == stop_at:
      raise KeyboardInterrupt
    calls.append(int(state.step))
    return update(state)

  return train_lib.run_loop(
      CountState(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32)),
      step_fn, lambda st, aux: {"step": st.step, "x": st.x}, steps=steps,
      eval_every=4, eval_from=6, checkpoint_dir=ckpt, checkpoint_every=1)


def test_eval_from_evaluates_after_the_warm_up_and_checkpoints_within(
    tmp_path):
  # Evaluations at eval_from + k * eval_every and the last step; before
  # eval_from the loop checks and checkpoints every eval_every steps and
  # at eval_from (here 4 and 6), without a row.
  assert [n for n in range(1, 17) if train_lib.is_eval_point(
      n, 16, 4, 6)] == [10, 14, 16]
  _, full = _count_loop(16, None, [])
  np.testing.assert_array_equal(full["step"], [10, 14, 16])
  np.testing.assert_array_equal(full["x"], [45, 91, 120])  # sum(range(n))
  ckpt = str(tmp_path / "ckpt")
  with pytest.raises(KeyboardInterrupt):
    _count_loop(16, ckpt, [], stop_at=5)   # killed in the warm-up
  calls = []
  _, resumed = _count_loop(16, ckpt, calls)
  assert calls[0] == 4                     # resumed at the warm-up's check
  for k in full:
    np.testing.assert_array_equal(resumed[k], full[k])


def test_eval_from_needs_more_steps(splits):
  method = ema_method(jirm.models.mlp(8), optax.sgd(0.1))._replace(
      eval_from=5)
  for runner in ("host", "scan"):
    with pytest.raises(ValueError, match=r"steps=5 must exceed the "
                       r"method's eval_from=5"):
      jirm.fit(splits, method, steps=5, runner=runner)
  host = jirm.fit(splits, method, steps=9, eval_every=2)
  scan = jirm.fit(splits, method, steps=9, eval_every=2, runner="scan")
  assert list(host.history["step"]) == [7, 9]
  _assert_same(host, scan, rtol=1e-5)


# Every module of the library except the trainer, the sweep and experiment
# plumbing above them (launch, results) and the package's re-exports.
_ABOVE = ("train.py", "sweep.py", "launch.py", "results.py", "__init__.py")
# (only the package's own __init__.py: the subpackages' re-exports are below)
_BELOW_THE_TRAINER = sorted(
    str(p.relative_to(pathlib.Path(jirm.__file__).parent))
    for p in pathlib.Path(jirm.__file__).parent.rglob("*.py")
    if str(p.relative_to(pathlib.Path(jirm.__file__).parent)) not in _ABOVE)


def test_the_import_rule_covers_the_method_modules():
  assert {"methods/base.py", "methods/objective.py", "methods/registry.py",
          "methods/deep.py", "methods/games.py", "methods/ipg.py",
          "methods/irm_games.py", "methods/irm_tv.py", "methods/sparse.py",
          "methods/masks.py", "methods/__init__.py", "models/irm_mlp.py",
          "models/resnet.py", "models/heads.py", "models/encoder_head.py",
          "models/convert.py", "models/sizes.py", "models/__init__.py",
          "objectives.py",
          "data/__init__.py", "data/envs.py", "data/sources.py",
          "data/mnist.py", "data/cifar.py", "data/synthetic.py",
          "data/shift.py"} <= set(_BELOW_THE_TRAINER)


@pytest.mark.parametrize("name", _BELOW_THE_TRAINER)
def test_methods_never_import_the_trainer(name):
  path = pathlib.Path(jirm.__file__).parent / name
  tree = ast.parse(path.read_text())
  imported = []
  for node in ast.walk(tree):  # Module level and inside functions.
    if isinstance(node, ast.ImportFrom) and node.module:
      imported += [f"{node.module}.{a.name}" for a in node.names]
    elif isinstance(node, ast.Import):
      imported += [a.name for a in node.names]
  assert not [m for m in imported if m in ("jirm", "jirm.train",
                                            "jirm.sweep", "jirm.fit")
              or m.startswith(("jirm.train.", "jirm.sweep."))], imported
