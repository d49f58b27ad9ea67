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


# Features of 2 environments x 4 samples x 3 dimensions (the last row of
# env 0 is padding in the masked cases).
F = np.array([[[0.5, -1.0, 2.0], [1.5, 0.0, -0.5], [-0.2, 0.3, 1.0],
               [9.0, 9.0, 9.0]],
              [[1.0, 1.0, 0.0], [0.0, -2.0, 1.0], [2.0, 0.5, -1.0],
               [0.3, 0.3, 0.3]]], np.float32)
PAD = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], np.float32)


def _feat_out(feats=F, valid=PAD):
  return _out(valid=valid)._replace(features=jnp.asarray(feats))


def _np_moments(f):
  return f.mean(0), np.cov(f, rowvar=False, ddof=1)


def test_coral_is_the_mean_and_covariance_gap_and_zero_for_equal_envs():
  (m0, c0), (m1, c1) = _np_moments(F[0, :3]), _np_moments(F[1])
  want = np.mean((m0 - m1) ** 2) + np.mean((c0 - c1) ** 2)
  np.testing.assert_allclose(jirm.coral.value(_feat_out()), want, rtol=1e-5)
  same = np.stack([F[1], F[1]])
  assert float(jirm.coral.value(_feat_out(same, np.ones((2, 4))))) == 0.0
  # Three environments: the mean over the three pairs.
  f3 = np.stack([F[1], F[1], F[1] + 1.0])
  out3 = objectives.Outputs(jnp.zeros((3, 4, 1)), jnp.zeros((3, 4)),
                            jnp.ones((3, 4)), features=jnp.asarray(f3))
  np.testing.assert_allclose(jirm.coral.value(out3), 2 / 3 * 1.0, rtol=1e-6)


def test_mmd_is_the_gaussian_kernel_form_and_zero_for_equal_envs():
  def k(a, b):
    d = np.maximum(((a[:, None] - b[None]) ** 2).sum(-1), 1e-30)
    return sum(np.exp(-g * d) for g in objectives.MMD_GAMMAS).mean()
  x, y = F[0, :3].astype(np.float64), F[1].astype(np.float64)
  want = k(x, x) + k(y, y) - 2 * k(x, y)
  np.testing.assert_allclose(jirm.mmd.value(_feat_out()), want, rtol=1e-4)
  same = np.stack([F[1], F[1]])
  np.testing.assert_allclose(
      jirm.mmd.value(_feat_out(same, np.ones((2, 4)))), 0.0, atol=1e-6)
  big = objectives.Outputs(jnp.zeros((2, 8193, 1)), jnp.zeros((2, 8193)),
                           jnp.ones((2, 8193)),
                           features=jnp.zeros((2, 8193, 1)))
  with pytest.raises(ValueError, match=r"mmd over 8193 samples per "
                     r"environment .* --config.batch_size=512"):
    jirm.mmd.value(big)


def test_feature_var_and_ib_irm_reduce_to_irmv1():
  want = np.mean([F[0, :3].var(0, ddof=1).mean(), F[1].var(0, ddof=1).mean()])
  out = _feat_out()
  np.testing.assert_allclose(jirm.feature_var.value(out), want, rtol=1e-5)
  irm = float(jirm.irmv1(variant="split").value(out))
  assert float(jirm.ib_irm(ib_weight=0.0).value(out)) == irm
  np.testing.assert_allclose(jirm.ib_irm(ib_weight=2.0).value(out),
                             irm + 2 * want, rtol=1e-5)
  with pytest.raises(ValueError, match="coral needs Outputs.features"):
    jirm.coral.value(_out())


def _risks_out(risks):
  # Regression outputs whose env risks are exactly `risks` (logit 0,
  # label sqrt(r)).
  y = jnp.sqrt(jnp.asarray(risks, jnp.float32))[:, None]
  return objectives.Outputs(jnp.zeros((len(risks), 1, 1)), y,
                            jnp.ones((len(risks), 1)), task="regression")


def test_eqrm_quantiles():
  risks = np.array([0.2, 0.5, 0.9, 1.4], np.float32)
  out = _risks_out(risks)
  eq = lambda **kw: float(jirm.eqrm(**kw).value(out))
  # Empirical: alpha = 1 is the worst environment's risk; 0.5 the median.
  np.testing.assert_allclose(eq(estimator="empirical", alpha=1.0),
                             1.4 - risks.mean(), rtol=1e-6)
  np.testing.assert_allclose(eq(estimator="empirical", alpha=0.5),
                             0.7 - risks.mean(), rtol=1e-5)
  # KDE (Gauss-optimal bandwidth): the root of mean_e Phi((q - R_e)/h) =
  # alpha, found here by numpy bisection in float64.
  from scipy import stats  # pylint: disable=g-import-not-at-top
  h = 1.06 * risks.astype(np.float64).std(ddof=1) * 4 ** -0.2
  for alpha in (0.25, 0.75, 0.99):
    lo, hi = -10.0, 10.0
    for _ in range(200):
      mid = (lo + hi) / 2
      lo, hi = ((lo, mid) if stats.norm.cdf((mid - risks) / h).mean() > alpha
                else (mid, hi))
    np.testing.assert_allclose(eq(alpha=alpha) + risks.mean(), lo,
                               rtol=1e-5, atol=1e-6)
  assert eq(alpha=0.99) + risks.mean() > 1.4  # The KDE's tail.
  # Symmetric risks: the KDE median is their mean (penalty 0).
  assert abs(float(jirm.eqrm(alpha=0.5).value(_risks_out([0.3, 0.7])))) < 1e-6
  with pytest.raises(ValueError, match=r"alpha=1.0\): a KDE has no largest"):
    eq(alpha=1.0)
  with pytest.raises(ValueError, match="eqrm alpha=0"):
    eq(alpha=0)


def test_eqrm_kde_gradient_is_the_implicit_one():
  # d q / d R_e = phi_e / sum phi (KDE weights at the quantile), plus the
  # bandwidth's dependence on R: checked against central differences.
  risks = np.array([0.2, 0.5, 0.9, 1.4], np.float32)

  def q_of(r):
    r = jnp.asarray(r, jnp.float32)
    return jirm.eqrm(alpha=0.75).value(_risks_out(r)) + jnp.mean(r)

  g = np.asarray(jax.grad(q_of)(risks))
  eps = 1e-2
  fd = np.array([(float(q_of(risks + eps * np.eye(4)[e])) -
                  float(q_of(risks - eps * np.eye(4)[e]))) / (2 * eps)
                 for e in range(4)])
  np.testing.assert_allclose(g, fd, rtol=2e-2, atol=2e-3)
  assert abs(g.sum() - 1.0) < 1e-3  # Shifting every risk shifts q alike.


def test_feature_terms_train_through_from_objective():
  import optax  # pylint: disable=g-import-not-at-top
  mnist = jirm.data.synthetic_mnist(num_train=400, num_test=100, seed=0)
  splits = jirm.data.colored_mnist(seed=0, data_num=300, mnist=mnist)
  obj = jirm.erm + 1.0 * jirm.coral + 0.5 * jirm.feature_var
  res = jirm.fit(splits, model=jirm.models.mlp(8), objective=obj,
                 optimizer=optax.adam(1e-3), steps=3, eval_every=3, seed=0)
  assert np.isfinite(res.history["term/coral"]).all()
  assert float(res.history["term/coral"][-1]) > 0

  class NoFeatures(jirm.models.mlp(8).__class__):
    def __call__(self, x):  # pylint: disable=arguments-differ
      return super().__call__(x)

  with pytest.raises(ValueError, match="takes no return_features=True"):
    jirm.fit(splits, model=NoFeatures(hidden=(8, 8)), objective=obj,
             optimizer=optax.adam(1e-3), steps=1, eval_every=1)


def test_fishr_statistic_penalty_and_moving_average():
  from jirm.methods import games  # pylint: disable=g-import-not-at-top
  feats = jnp.asarray(F)
  hp = {"params": {"head": {"kernel": jnp.asarray([[0.3], [-0.2], [0.5]]),
                            "bias": jnp.asarray([0.1])}}}
  head_fn = lambda p, f: f @ p["params"]["head"]["kernel"] + \
      p["params"]["head"]["bias"][None, :]
  y = jnp.asarray(Y)
  # BCE on a linear head: per-sample gradients (sigmoid(z) - y) * [f, 1].
  z = F @ np.array([0.3, -0.2, 0.5]) + 0.1
  r = _np_sig(z) - Y
  g = np.concatenate([r[..., None] * F, r[..., None]], -1)  # [E, B, K=4]
  want = np.stack([g[0, :3].var(0), g[1].var(0)])  # Padding row excluded.
  # ravel_pytree orders the leaves bias, kernel: compare as sets of columns.
  v = np.asarray(games.head_grad_variances(head_fn, hp, feats, y,
                                           jnp.asarray(PAD)))
  np.testing.assert_allclose(np.sort(v, 1), np.sort(want, 1), rtol=1e-5)
  # Penalty: mean_e mean_k (m_e - mean_e m)^2; the first step's average is
  # this step's statistic (DomainBed: zeros before, divided by 1 - ema).
  game = games.fishr(ema=0.9)
  state = game.init(None, hp, 3, 2)
  out = objectives.Outputs(jnp.zeros((2, 4, 1)), y, jnp.asarray(PAD),
                           features=feats, head=head_fn, head_params=hp,
                           state=state)
  m = want
  np.testing.assert_allclose(game.term.value(out),
                             np.mean((m - m.mean(0)) ** 2), rtol=1e-5)
  new, _ = game.inner(state, hp, out, False)
  np.testing.assert_allclose(np.sort(new.ema, 1), np.sort(0.1 * want, 1),
                             rtol=1e-5)
  # Second step: m = (0.9 * 0.1 v + 0.1 v) / 0.1 = 1.9 v.
  out2 = out._replace(state=game.inner(new, hp, out, False)[0])
  np.testing.assert_allclose(game.term.value(out2),
                             np.mean((1.9 * (m - m.mean(0))) ** 2), rtol=1e-5)
  # Identical environments: 0.
  same = out._replace(features=jnp.stack([feats[1], feats[1]]),
                      labels=jnp.stack([y[1], y[1]]),
                      valid=jnp.ones((2, 4)))
  assert float(game.term.value(same)) == 0.0
