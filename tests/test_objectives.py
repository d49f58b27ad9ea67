"""Penalties against hand-computed values (numpy closed forms)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jirm
from jirm import objectives

# A 1-D logistic model: logits z = a * x. For sigmoid BCE,
# dR/dw (w scales the logits) = mean((sigmoid(z) - y) * z).
X = np.array([[-1.0, 0.5, 2.0, -0.3], [1.5, -2.0, 0.2, 0.7]], np.float32)
Y = np.array([[0, 1, 1, 0], [1, 0, 1, 1]], np.float32)


def _out(a=0.8, x=X, y=Y, valid=None, rng=None, task="binary"):
  logits = jnp.asarray(a * x)[..., None]
  valid = np.ones_like(y) if valid is None else valid
  return objectives.Outputs(logits, jnp.asarray(y), jnp.asarray(valid, float),
                            params={"a": jnp.asarray(a)}, rng=rng, task=task)


def _np_losses(z, y):
  return np.log1p(np.exp(-np.abs(z))) + np.maximum(z, 0) - z * y


def _np_sig(z):
  return 1 / (1 + np.exp(-z))


def _np_grad(z, y):  # dR/dw at w = 1 for one env.
  return np.mean((_np_sig(z) - y) * z)


def test_erm_reductions():
  z = 0.8 * X
  risks = _np_losses(z, Y).mean(1)
  np.testing.assert_allclose(objectives.erm.value(_out()), risks.mean(),
                             rtol=1e-6)
  np.testing.assert_allclose(objectives.erm(reduction="sum").value(_out()),
                             risks.sum(), rtol=1e-6)
  valid = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], np.float32)
  pooled = (_np_losses(z, Y) * valid).sum() / valid.sum()
  np.testing.assert_allclose(
      objectives.erm(reduction="pooled").value(_out(valid=valid)), pooled,
      rtol=1e-6)


def test_irmv1_full_matches_closed_form():
  z = 0.8 * X
  want = np.mean([_np_grad(z[e], Y[e]) ** 2 for e in range(2)])
  np.testing.assert_allclose(jirm.irmv1.value(_out()), want, rtol=1e-5)


def test_irmv1_split_matches_closed_form():
  z = 0.8 * X
  prods = [_np_grad(z[e, 0::2], Y[e, 0::2]) * _np_grad(z[e, 1::2], Y[e, 1::2])
           for e in range(2)]
  np.testing.assert_allclose(jirm.irmv1(variant="split").value(_out()),
                             np.mean(prods), rtol=1e-5)


def test_irmv1_split_perm_on_constant_envs_is_sum_of_squares():
  # Identical samples within an env: every permutation gives equal halves.
  x = np.array([[0.5] * 4, [-1.2] * 4], np.float32)
  y = np.array([[1] * 4, [0] * 4], np.float32)
  out = _out(x=x, y=y, rng=jax.random.key(3))
  want = sum(_np_grad(0.8 * x[e], y[e]) ** 2 for e in range(2))
  np.testing.assert_allclose(jirm.irmv1(variant="split_perm").value(out),
                             want, rtol=1e-5)


def test_irmv1_env_scale_equals_full_when_balanced_and_differs_otherwise():
  out = _out()
  np.testing.assert_allclose(jirm.irmv1(variant="env_scale").value(out),
                             jirm.irmv1.value(out), rtol=1e-5)
  valid = np.array([[1, 1, 0, 0], [1, 1, 1, 1]], np.float32)
  out = _out(valid=valid)
  z = 0.8 * X
  n = valid.sum()
  # g_e = E * (1/N) * sum_{i in e} (sigmoid(z) - y) z
  g = [2 * ((_np_sig(z[e]) - Y[e]) * z[e] * valid[e]).sum() / n
       for e in range(2)]
  np.testing.assert_allclose(jirm.irmv1(variant="env_scale").value(out),
                             np.mean(np.square(g)), rtol=1e-5)


def test_rex_family():
  risks = _np_losses(0.8 * X, Y).mean(1)
  out = _out()
  np.testing.assert_allclose(jirm.vrex.value(out), np.var(risks), rtol=1e-5)
  np.testing.assert_allclose(jirm.vrex(variant="diff_sq").value(out),
                             (risks[0] - risks[1]) ** 2, rtol=1e-5)
  np.testing.assert_allclose(jirm.mm_rex.value(out),
                             abs(risks[0] - risks[1]), rtol=1e-5)
  np.testing.assert_allclose(jirm.rvp.value(out), np.sqrt(np.var(risks)),
                             rtol=1e-5)


def test_rvp_gradient_is_finite_at_zero_variance():
  x = np.stack([X[0], X[0]])
  y = np.stack([Y[0], Y[0]])
  grad = jax.grad(lambda a: jirm.rvp.value(_out(a=a, x=x, y=y)))(0.8)
  assert np.isfinite(grad) and grad == 0.0


def test_irm_tv():
  z = 0.8 * X
  n = X.size
  g = [((_np_sig(z[e]) - Y[e]) * z[e]).sum() / n for e in range(2)]
  out = _out()
  np.testing.assert_allclose(jirm.irm_tv_l1.value(out),
                             (abs(g[0]) + abs(g[1])) ** 2, rtol=1e-5)
  np.testing.assert_allclose(jirm.irm_tv_l1(form="two_env").value(out),
                             (abs(g[0]) + abs(g[1])) ** 2, rtol=1e-5)
  np.testing.assert_allclose(jirm.irm_tv_l2.value(out),
                             g[0] ** 2 + g[1] ** 2, rtol=1e-5)
  # Minibatch form: halves normalised by the half-batch size.
  half = []
  for e in range(2):
    g1 = ((_np_sig(z[e, 0::2]) - Y[e, 0::2]) * z[e, 0::2]).sum() / (n / 2)
    g2 = ((_np_sig(z[e, 1::2]) - Y[e, 1::2]) * z[e, 1::2]).sum() / (n / 2)
    half.append(np.sqrt(abs(g1 * g2)))
  np.testing.assert_allclose(jirm.irm_tv_l1(form="minibatch").value(out),
                             sum(half) ** 2, rtol=1e-5)


def test_bayesian_irm_matches_manual_draws():
  key = jax.random.key(7)
  out = _out(rng=key)
  z = 0.8 * X
  sigma = 1200.0 / 20_000
  draws = []
  for k in jax.random.split(key, 4):
    w = 1.0 + sigma * np.asarray(jax.random.normal(k, (2,)))
    # d/dw_e of E * pooled mean nll(w_e z): E/N * sum (sigmoid(w z) - y) z.
    g = [2 * ((_np_sig(w[e] * z[e]) - Y[e]) * z[e]).sum() / X.size
         for e in range(2)]
    draws.append(np.mean(np.square(g)))
  got = jirm.bayesian_irm(data_num=20_000, num_draws=4).value(out)
  np.testing.assert_allclose(got, np.mean(draws), rtol=1e-5)
  # Zero prior width: the env_scale IRMv1 penalty.
  np.testing.assert_allclose(
      jirm.bayesian_irm(prior_sd_coef=0.0).value(out),
      jirm.irmv1(variant="env_scale").value(out), rtol=1e-5)


def test_l2_counts_biases():
  out = _out()._replace(params={"w": jnp.array([1.0, 2.0]),
                                "b": jnp.array([3.0])})
  assert float(jirm.l2.value(out)) == 14.0


def test_composed_objective_equals_manual_weighted_sum():
  sched = jirm.schedules.preset("irm", weight=100.0, anneal=5)
  obj = jirm.erm + 0.01 * jirm.l2 + sched * jirm.irmv1 + 2.0 * jirm.vrex
  out = _out()
  for step, lam in ((0, 1.0), (5, 100.0)):
    manual = (jirm.erm.value(out) + 0.01 * jirm.l2.value(out) +
              lam * jirm.irmv1.value(out) + 2.0 * jirm.vrex.value(out))
    manual = manual / max(lam, 1.0)
    total, aux = obj(out, step)
    np.testing.assert_allclose(total, manual, rtol=1e-6)
    np.testing.assert_allclose(aux["weight/irmv1"], lam)
    np.testing.assert_allclose(aux["term/vrex"], jirm.vrex.value(out))
    np.testing.assert_allclose(aux["rescale"], max(lam, 1.0))


def test_sum_of_terms():
  out = _out()
  obj = sum([jirm.erm, jirm.vrex, 2.0 * jirm.mm_rex])
  np.testing.assert_allclose(
      obj(out)[0], jirm.erm.value(out) + jirm.vrex.value(out) +
      2.0 * jirm.mm_rex.value(out), rtol=1e-6)


def test_optax_schedule_and_float_weights():
  import optax  # pylint: disable=g-import-not-at-top
  sched = optax.linear_schedule(0.0, 10.0, 10)
  obj = jirm.erm + sched * jirm.irmv1
  out = _out()
  total, _ = obj(out, 5)
  np.testing.assert_allclose(
      total, jirm.erm.value(out) + 5.0 * jirm.irmv1.value(out), rtol=1e-6)
  obj2 = 3.0 * (jirm.erm + jirm.vrex)
  np.testing.assert_allclose(
      obj2(out)[0], 3 * (jirm.erm.value(out) + jirm.vrex.value(out)),
      rtol=1e-6)


def test_schedule_times_a_sum_keeps_its_rescaling():
  sched = jirm.schedules.preset("irm", weight=100.0, anneal=0)
  obj = jirm.erm + sched * (jirm.irmv1 + jirm.vrex)
  out = _out()
  total, aux = obj(out, 3)
  want = (jirm.erm.value(out) + 100.0 * (jirm.irmv1.value(out) +
                                         jirm.vrex.value(out))) / 100.0
  np.testing.assert_allclose(total, want, rtol=1e-6)
  assert float(aux["rescale"]) == 100.0
  with pytest.raises(ValueError, match="rescaling"):
    _ = 2.0 * obj


def test_bad_options_raise_clear_errors():
  with pytest.raises(TypeError, match="no option"):
    jirm.irmv1(varaint="full")
  with pytest.raises(ValueError, match="variant='banana'"):
    jirm.irmv1(variant="banana").value(_out())
  with pytest.raises(ValueError, match="needs Outputs.rng"):
    jirm.irmv1(variant="split_perm").value(_out())
  with pytest.raises(ValueError, match="2 envs"):
    three = _out(x=np.concatenate([X, X[:1]]), y=np.concatenate([Y, Y[:1]]))
    jirm.irm_tv_l1(form="two_env").value(three)


def test_penalties_are_jittable_and_differentiable():
  terms = [jirm.irmv1, jirm.irmv1(variant="split"),
           jirm.irmv1(variant="split_perm"), jirm.irmv1(variant="env_scale"),
           jirm.vrex, jirm.mm_rex, jirm.rvp, jirm.irm_tv_l1,
           jirm.irm_tv_l1(form="minibatch"), jirm.bayesian_irm]
  for term in terms:
    f = jax.jit(jax.grad(lambda a, t=term: t.value(
        _out(a=a, rng=jax.random.key(0)))))
    g = f(0.8)
    assert np.isfinite(g) and g != 0.0, term.describe()
