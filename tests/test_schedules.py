"""Every preset's lambda, loss rescaling and optimizer reset."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jirm
from jirm import train as train_lib


@pytest.mark.parametrize("name,before,after,div_before,div_after", [
    ("irm", 1.0, 50.0, 1.0, 50.0),
    ("domainbed", 1.0, 50.0, 1.0, 1.0),
    ("irmbed", 0.0, 50.0, 1.0, 51.0),
    ("lin", 0.0, 50.0, 1.0, 51.0),
])
def test_preset_values(name, before, after, div_before, div_after):
  s = jirm.schedules.preset(name, weight=50.0, anneal=10)
  for step, lam, div in ((0, before, div_before), (9, before, div_before),
                         (10, after, div_after), (500, after, div_after)):
    assert float(s(step)) == lam
    assert float(s.divisor(s(step))) == div
  assert s.reset_step == (10 if name == "domainbed" else None)


def test_irmbed_ramp_and_epochs():
  s = jirm.schedules.preset("irmbed", weight=100.0, anneal=4, ramp=True,
                            steps_per_epoch=10)
  assert [float(s(t)) for t in (0, 9, 10, 25, 39, 40)] == [
      0.0, 0.0, 25.0, 50.0, 75.0, 100.0]
  # IRMBed always divides by 1 + lambda, also for lambda <= 1.
  assert float(s.divisor(jnp.float32(0.5))) == 1.5


def test_lin_divides_only_above_one():
  s = jirm.schedules.preset("lin", weight=0.5, anneal=0)
  assert float(s.divisor(s(3))) == 1.0


def test_bad_presets():
  with pytest.raises(ValueError, match="unknown schedule preset 'ddd'"):
    jirm.schedules.preset("ddd", weight=1.0, anneal=0)
  with pytest.raises(ValueError, match="ramp=True"):
    jirm.schedules.preset("irm", weight=1.0, anneal=3, ramp=True)
  with pytest.raises(ValueError, match="anneal=-1"):
    jirm.schedules.preset("lin", weight=1.0, anneal=-1)


def _tiny_problem():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 8, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 2, (2, 8)), jnp.float32)
  data = train_lib.EnvArrays(x, y, jnp.ones((2, 8)))
  model = jirm.models.MLP(hidden=(4,))
  params = model.init(jax.random.key(0), x[0, :1])
  return model, params, data


def _fresh_state(params, opt):
  return train_lib.TrainState(jnp.int32(0), params, opt.init(params),
                              jax.random.key(1))


def _adam_counts(preset_name, steps=5):
  """Adam's step count after each of ``steps`` updates under a preset."""
  model, params, data = _tiny_problem()
  opt = optax.adam(1e-2)
  sched = jirm.schedules.preset(preset_name, weight=10.0, anneal=3)
  obj = jirm.erm + sched * jirm.irmv1
  step_fn = jax.jit(train_lib.make_train_step(model.apply, obj, opt))
  state = _fresh_state(params, opt)
  counts = []
  for _ in range(steps):
    state, _ = step_fn(state, data)
    counts.append(int(state.opt_state[0].count))
  return counts


def test_domainbed_resets_adam_exactly_at_the_anneal_step():
  # Adam's count restarts at the anneal step: 1, 2, 3, then reset -> 1, 2.
  assert _adam_counts("domainbed") == [1, 2, 3, 1, 2]
  # Without the DomainBed preset nothing is reset.
  assert _adam_counts("irm")[-1] == 5


def test_reset_step_equals_fresh_optimizer_then_one_update():
  model, params, data = _tiny_problem()
  opt = optax.adam(1e-2)
  sched = jirm.schedules.preset("domainbed", weight=10.0, anneal=2)
  obj = jirm.erm + sched * jirm.irmv1
  step_fn = jax.jit(train_lib.make_train_step(model.apply, obj, opt))
  state = _fresh_state(params, opt)
  state, _ = step_fn(state, data)
  state, _ = step_fn(state, data)
  manual = state._replace(opt_state=opt.init(state.params))
  no_reset = jax.jit(train_lib.make_train_step(model.apply, obj, opt,
                                               reset_step=-1))
  after_reset, _ = step_fn(state, data)
  after_manual, _ = no_reset(manual, data)
  jax.tree.map(np.testing.assert_allclose, after_reset.params,
               after_manual.params)
