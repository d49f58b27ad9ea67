"""IRM-TV family: ZIN synthetic data, TV penalties on given and inferred
environments, the inference net's ascent, OOD-TV's learned lambda, and the
experiment end to end."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jirm
from jirm.methods import irm_tv
from jirm import objectives


# ---------------------------------------------------------------------------
# Data.


def test_zin_synthetic_generative_process():
  s = jirm.data.zin_synthetic(seed=1, train_cons="0.999,0.7",
                              test_cons=(0.9, 0.2), noise=0.2, dim_inv=4,
                              dim_spu=3, num_train=40_000, num_test=20_000,
                              num_val=400)
  assert s.task == "binary"
  assert s.train.x.shape == (2, 20_000, 7) and s.test.x.shape == (2, 10_000, 7)
  assert s.val.x.shape == (2, 200, 7)
  for envs, cons in ((s.train, (0.999, 0.7)), (s.test, (0.9, 0.2))):
    for e, p in enumerate(cons):
      x, y, agree = envs.x[e], envs.y[e], envs.agree[e]
      n = len(y)
      tol = 4 * np.sqrt(p * (1 - p) / n) + 1e-3
      assert abs(agree.mean() - p) < tol, (e, agree.mean(), p)
      assert abs(y.mean() - 0.5) < 4 * np.sqrt(0.25 / n)
      sign = 2.0 * y - 1.0
      # Invariant block: mean shift a with P(a != y) = noise, so
      # E[x_inv * (2y-1)] = 1 - 2 * noise in every env.
      assert abs((x[:, :4] * sign[:, None]).mean() - (1 - 2 * 0.2)) < 0.03
      # Spurious block: shift b = +-1 agreeing with y iff `agree`; unit noise.
      b = np.where(agree, sign, -sign)
      resid = x[:, 4:] - b[:, None]
      assert abs(resid.mean()) < 0.03 and abs(resid.std() - 1.0) < 0.03
      assert abs((x[:, 4:] * sign[:, None]).mean() - (2 * p - 1)) < 0.03
  # Auxiliary time index: 0..N-1 over the concatenated train envs.
  np.testing.assert_array_equal(s.train.aux[..., 0].reshape(-1),
                                np.arange(40_000))
  np.testing.assert_array_equal(s.test.aux[..., 0].reshape(-1),
                                np.arange(20_000))
  # Same seed, same data; oracle zeroes exactly the spurious block.
  o = jirm.data.zin_synthetic(seed=1, train_cons="0.999,0.7",
                              test_cons=(0.9, 0.2), noise=0.2, dim_inv=4,
                              dim_spu=3, num_train=40_000, num_test=20_000,
                              num_val=400, oracle=True)
  np.testing.assert_array_equal(o.train.x[..., :4], s.train.x[..., :4])
  assert not o.train.x[..., 4:].any()


def test_zin_synthetic_bad_input():
  with pytest.raises(jirm.data.DataError, match="train_cons"):
    jirm.data.zin_synthetic(train_cons="0.9,abc")
  with pytest.raises(jirm.data.DataError, match="not a probability"):
    jirm.data.zin_synthetic(train_cons=(0.9, 1.5))
  with pytest.raises(jirm.data.DataError, match="num_test"):
    jirm.data.zin_synthetic(num_test=3)


# ---------------------------------------------------------------------------
# Penalties against hand computation.


def _hand_g(f, y, w):
  """g_k = d/ds sum_i w_ki BCE(s f_i, y_i) / N at s = 1."""
  sig = 1 / (1 + np.exp(-f))
  return (w * ((sig - y) * f)[None]).sum(1) / len(y)


@pytest.mark.parametrize("soft", [False, True])
def test_tv_penalties_match_hand_computation(soft):
  rng = np.random.default_rng(0)
  m = 12
  f = rng.normal(size=m).astype(np.float32)
  y = (rng.random(m) < 0.5).astype(np.float32)
  if soft:
    rho = rng.random(m).astype(np.float32)
    w = np.stack([rho, 1 - rho])
  else:
    w = np.repeat(np.eye(3, dtype=np.float32), 4, axis=1)
  k = w.shape[0]
  out = objectives.Outputs(jnp.broadcast_to(jnp.asarray(f)[None, :, None],
                                            (k, m, 1)),
                           jnp.broadcast_to(jnp.asarray(y)[None], (k, m)),
                           jnp.asarray(w))
  g = _hand_g(f, y, w)
  np.testing.assert_allclose(jirm.irm_tv_l1.value(out),
                             np.abs(g).sum() ** 2, rtol=1e-5)
  np.testing.assert_allclose(jirm.irm_tv_l2.value(out), (g ** 2).sum(),
                             rtol=1e-5)
  # The pooled ERM term is the plain mean over samples for any weights.
  bce = np.maximum(f, 0) - f * y + np.log1p(np.exp(-np.abs(f)))
  np.testing.assert_allclose(jirm.erm(reduction="pooled").value(out),
                             bce.mean(), rtol=1e-5)


def test_abs0_has_zero_subgradient_at_zero():
  assert float(jax.grad(objectives.abs0)(0.0)) == 0.0
  assert float(jax.grad(objectives.abs0)(2.0)) == 1.0
  assert float(jax.grad(objectives.abs0)(-2.0)) == -1.0
  assert float(jax.grad(jnp.abs)(0.0)) == 1.0  # Why abs0 exists.
  # Env 1 has g_1 = 0 exactly (zero logits): its logits get no gradient from
  # |g_1| (PyTorch's convention); with jnp.abs they would.
  f = jnp.array([[0.5, -1.0, 2.0, 0.3], [0.0, 0.0, 0.0, 0.0]])[..., None]
  y = jnp.array([[1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 1.0, 1.0]])
  grad = jax.grad(lambda lg: jirm.irm_tv_l1.value(
      objectives.Outputs(lg, y, jnp.ones_like(y))))(f)
  np.testing.assert_array_equal(np.asarray(grad[1]), 0.0)
  assert np.abs(np.asarray(grad[0])).max() > 0


# ---------------------------------------------------------------------------
# Inferred environments and the learned lambda.


@pytest.fixture(scope="module")
def small():
  return jirm.data.zin_synthetic(seed=0, train_cons="0.999,0.7",
                                 num_train=2000, num_test=2000)


def test_rho_ascent_raises_the_penalty_and_freezes_after_anneal(small):
  batch = irm_tv.pool(small.train)

  def penalties(ascent, steps=30, anneal=1000):
    # lr tiny: the classifier stays put, only rho moves.
    method = irm_tv.tv_method(penalty="l2", envs="inferred", lr=1e-12,
                              anneal=anneal, infer_lr=1e-2,
                              infer_ascent=ascent)
    state = method.init(jax.random.key(3), batch)
    update = jax.jit(method.update)
    pens = []
    for _ in range(steps):
      state, aux = update(state, batch)
      pens.append(float(aux["penalty"]))
    return pens, state, update

  up, _, _ = penalties(True)
  down, _, _ = penalties(False)
  assert up[-1] > 1.5 * up[0] and np.all(np.diff(up) > -1e-12)
  assert down[-1] < up[0] and down[-1] < up[-1]

  # From the anneal step on, rho's network is frozen.
  _, state, update = penalties(True, steps=5, anneal=3)
  frozen = state.infer_params
  state, _ = update(state, batch)
  jax.tree.map(np.testing.assert_array_equal, frozen, state.infer_params)


def test_lambda_net_gets_gradient_through_the_classifier(small):
  batch = irm_tv.pool(small.train)
  method = irm_tv.tv_method(penalty="l1", learned_lambda=True, anneal=0,
                            ood_hidden=3, ood_c=200.0)
  state = method.init(jax.random.key(0), batch)
  # Make the hidden units active so lambda depends on theta.
  lam_params = jax.tree.map(jnp.abs, state.lam_params)
  flat = lambda p: jax.flatten_util.ravel_pytree(p)[0]
  theta = flat(state.params)
  lam_params["params"]["Dense_0"]["kernel"] = jnp.abs(
      lam_params["params"]["Dense_0"]["kernel"]) * jnp.sign(theta)[:, None]
  step = jnp.int32(5)
  grad = lambda fn: jax.jit(jax.grad(fn, argnums=(0, 1), has_aux=True))
  (g_theta, g_lam), aux = grad(method.loss)(state.params, lam_params,
                                            batch.envs, batch, step)
  lam = irm_tv.LambdaNet(3).apply
  # Total minus the lambda path: lambda held constant at its value.
  lam_const = float(lam(lam_params, theta))

  def no_path(params):
    out = objectives.Outputs(
        jnp.broadcast_to(method.predict(state._replace(params=params),
                                        batch.x)[None], (2,) + batch.y.shape
                         + (1,)),
        jnp.broadcast_to(batch.y[None], (2,) + batch.y.shape), batch.envs,
        params=params)
    total, _ = (jirm.erm(reduction="pooled") + 1e-3 * jirm.l2)(out)
    return total + 200.0 * lam_const * jirm.irm_tv_l1.value(out)

  g_no_path = jax.jit(jax.grad(no_path))(state.params)
  g_lam_path = jax.jit(jax.grad(lambda p: lam(lam_params, flat(p))))(
      state.params)
  pen = float(aux["penalty"])
  for a, b, c in zip(jax.tree.leaves(g_theta), jax.tree.leaves(g_no_path),
                     jax.tree.leaves(g_lam_path)):
    np.testing.assert_allclose(a, b + 200.0 * pen * c, rtol=1e-4, atol=1e-9)
  assert max(np.abs(np.asarray(c)).max()
             for c in jax.tree.leaves(g_lam_path)) > 0
  assert max(np.abs(np.asarray(g)).max() for g in jax.tree.leaves(g_lam)) > 0
  np.testing.assert_allclose(float(aux["lam"]), lam_const, rtol=1e-6)


def test_lambda_net_ascent_step_is_normalised_and_decays(small):
  batch = irm_tv.pool(small.train)
  method = irm_tv.tv_method(penalty="l2", learned_lambda=True, anneal=2,
                            ood_lr=0.5, ood_power=0.5)
  state = method.init(jax.random.key(1), batch)
  update = jax.jit(method.update)
  for _ in range(2):  # Before anneal: lambda net untouched.
    new, _ = update(state, batch)
    jax.tree.map(np.testing.assert_array_equal, state.lam_params,
                 new.lam_params)
    state = new
  for k in (1, 2, 3):  # k-th ascent step: lr / (k^p ||g||) * g.
    w = method.weights(state, batch)
    (_, g), _ = jax.jit(jax.grad(method.loss, argnums=(0, 1),
                                 has_aux=True))(
                                     state.params, state.lam_params, w, batch,
                                     state.step)
    norm = float(jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(g))))
    new, _ = update(state, batch)
    moved = jax.tree.map(lambda a, b: a - b, new.lam_params, state.lam_params)
    for d, gi in zip(jax.tree.leaves(moved), jax.tree.leaves(g)):
      np.testing.assert_allclose(d, 0.5 / (k ** 0.5 * norm) * gi, rtol=1e-4,
                                 atol=1e-8)
    state = new


def test_methods_recover_the_invariant_regime(small):
  """IRM-TV-l1 and Minimax-TV-l1 beat ERM on the worst test env."""
  worst = {}
  for name, kw in (("erm", dict(penalty=None)),
                   ("tv_l1", dict(penalty="l1")),
                   ("minimax", dict(penalty="l1", envs="inferred"))):
    res = jirm.fit(small, irm_tv.tv_method(anneal=1000, **kw), steps=3000,
                   eval_every=500, seed=0, runner="scan")
    sel = irm_tv.select(res.history, res.env_names)
    worst[name] = sel["last"]["test_worst"]
    assert set(sel) >= {"last", "oracle", "oracle_worst"}
    assert worst[name] == pytest.approx(res.history["test_acc_E"][-1].min())
  assert worst["erm"] < 0.75
  assert worst["tv_l1"] > worst["erm"] + 0.1
  assert worst["minimax"] > worst["erm"] + 0.1


def test_bad_arguments():
  with pytest.raises(ValueError, match="penalty"):
    irm_tv.tv_method(penalty="l3")
  with pytest.raises(ValueError, match="envs"):
    irm_tv.tv_method(envs="learned")
  with pytest.raises(ValueError, match="need a penalty"):
    irm_tv.tv_method(penalty=None, envs="inferred")
  splits = jirm.data.linear_synthetic(seed=0, n_per_env=20)
  with pytest.raises(ValueError, match="aux=None"):
    jirm.fit(splits, irm_tv.tv_method(envs="inferred"), steps=10,
             eval_every=5, runner="scan")
  s = jirm.data.zin_synthetic(num_train=40, num_test=40)
  with pytest.raises(ValueError, match="eval_every=0"):
    jirm.fit(s, irm_tv.tv_method(), steps=10, eval_every=0, runner="scan")
  # Labels other than 0/1 (a regression or a 10-class task) are refused.
  for y in (s.train.y.astype(np.float32) + 0.5, s.train.y * 3):
    bad = dataclasses.replace(s, train=dataclasses.replace(s.train, y=y))
    with pytest.raises(ValueError, match="binary"):
      jirm.fit(bad, irm_tv.tv_method(), steps=10, eval_every=5,
               runner="scan")


# ---------------------------------------------------------------------------
# Experiment.


def test_experiment_quick_run_and_resume(tmp_path):
  from experiments import irm_tv as exp  # pylint: disable=g-import-not-at-top
  from jirm import results as results_lib  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / "tv")
  methods = ("erm", "irm_tv_l1", "ood_tv_minimax_l2")
  exp.run(methods, "quick", restarts=2, seed=0, output_dir=out)
  recs = results_lib.read_jsonl(os.path.join(out, "results.jsonl"))
  rules = {"last", "oracle", "oracle_worst", "train_domain_val"}
  assert {r["selection"] for r in recs} >= rules
  assert len([r for r in recs if r["selection"] == "last"]) == 6
  for r in recs:
    for key in ("method", "seed", "test_acc", "test_worst", "config",
                "wall_s", "objective", "train_cons", "penalty_weight"):
      assert key in r, key
    assert r["test_worst"] <= r["test_acc"] + 1e-6
  ood = [r for r in recs if r["method"] == "ood_tv_minimax_l2" and
         r["selection"] == "last"][0]
  assert "lam" in ood["curve"] and "rho_gap" in ood["curve"]
  for name in ("summary.md", "summary.csv", "curves.png", "lambda.png"):
    assert os.path.getsize(os.path.join(out, name)) > 100, name
  md = open(os.path.join(out, "summary.md")).read()
  assert "| irm_tv_l1 | quick | 0.999,0.9 | 10000 | 2 |" in md
  # Weight sweep: new configs run, the existing 1e4 restarts are reused.
  exp.run(("irm_tv_l1",), "quick", restarts=2, seed=0, output_dir=out,
          weights=(10.0, 1e4))
  recs2 = results_lib.read_jsonl(os.path.join(out, "results.jsonl"))
  per_restart = len(recs) // 6
  assert len(recs2) == len(recs) + 2 * per_restart
  assert os.path.getsize(os.path.join(out, "weights.png")) > 100
  with pytest.raises(ValueError, match="choose from"):
    exp.run(("nope",), "quick", restarts=1, seed=0, output_dir=out)
