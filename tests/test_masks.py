"""SparseIRM masks, projection, schedules, trainers; FullColoredMNIST."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import optimize

import jirm
from jirm import data
from jirm.methods import masks
from jirm import models
from jirm.methods import sparse
from jirm import train as train_lib


def _mlp_params(hidden=8, out=1):
  model = models.mlp(hidden, 2, out)
  return model, model.init(jax.random.key(0), jnp.zeros((1, 14, 14, 2)))


def test_select_masks_weights_only_and_pattern():
  _, params = _mlp_params()
  paths = masks.select(params)
  assert paths == ["params/head/kernel", "params/hidden_0/kernel",
                   "params/hidden_1/kernel"]
  assert masks.select(params, r"hidden_1/kernel") == ["params/hidden_1/kernel"]
  # Biases (1-D) never qualify even if the pattern names them.
  with pytest.raises(ValueError, match="matches no weight"):
    masks.select(params, r"bias")


def test_apply_touches_only_masked_leaves():
  _, params = _mlp_params()
  scores = masks.init_scores(params, r"hidden_0/kernel", value=0.5)
  zero = {p: jnp.zeros_like(s) for p, s in scores.items()}
  out = masks.apply(params, zero)
  assert float(jnp.abs(out["params"]["hidden_0"]["kernel"]).max()) == 0.0
  for name in ("hidden_1", "head"):
    np.testing.assert_array_equal(out["params"][name]["kernel"],
                                  params["params"][name]["kernel"])
  np.testing.assert_array_equal(out["params"]["hidden_0"]["bias"],
                                params["params"]["hidden_0"]["bias"])
  with pytest.raises(ValueError, match="unknown parameters"):
    masks.apply(params, {"params/nope/kernel": jnp.ones(3)})


def _qp_projection(s, k):
  res = optimize.minimize(
      lambda z: 0.5 * np.sum((z - s) ** 2), np.clip(s, 0, 1),
      jac=lambda z: z - s, bounds=[(0, 1)] * len(s),
      constraints=[{"type": "ineq", "fun": lambda z: k - z.sum(),
                    "jac": lambda z: -np.ones_like(z)}],
      method="SLSQP", options=dict(ftol=1e-12, maxiter=500))
  return res.x


@pytest.mark.parametrize("seed,k", [(0, 3.0), (1, 7.5), (2, 20.0), (3, 0.5)])
def test_projection_equals_qp_solution(seed, k):
  rng = np.random.default_rng(seed)
  a = rng.uniform(-0.5, 1.5, (3, 4)).astype(np.float32)
  b = rng.uniform(-0.5, 1.5, (5,)).astype(np.float32)
  got = masks.project({"a": jnp.asarray(a), "b": jnp.asarray(b)}, k)
  flat = np.concatenate([np.asarray(got["a"]).ravel(), np.asarray(got["b"])])
  want = _qp_projection(np.concatenate([a.ravel(), b]).astype(np.float64), k)
  np.testing.assert_allclose(flat, want, atol=1e-4)
  assert flat.sum() <= k + 1e-4 and flat.min() >= 0 and flat.max() <= 1


def test_projection_is_clip_when_budget_is_loose():
  s = {"a": jnp.array([1.3, 0.2, -0.4])}
  np.testing.assert_allclose(masks.project(s, 10.0)["a"], [1.0, 0.2, 0.0])


def test_temperature_and_budget_schedules():
  np.testing.assert_allclose(masks.inverse_temperature(0, 100), 1.0)
  np.testing.assert_allclose(masks.inverse_temperature(100, 100), 1 / 0.03,
                             rtol=1e-6)
  np.testing.assert_allclose(masks.inverse_temperature(50, 100),
                             1 / (0.97 * 0.5 + 0.03), rtol=1e-6)
  keep = lambda t: float(masks.keep_ratio(t, 1000, 0.2))
  assert keep(0) == keep(280) == 1.0
  np.testing.assert_allclose(keep(440), 0.2 + 0.8 * 0.5 ** 3, rtol=1e-6)
  assert keep(600) == keep(999) == pytest.approx(0.2)
  with pytest.raises(ValueError, match="keep ratio"):
    masks.keep_ratio(0, 10, 0.0)


def test_relaxed_mask_gradient_reaches_scores_and_bernoulli_rate():
  s = {"w": jnp.full((200, 50), 0.7)}
  m = masks.relaxed(s, jax.random.key(0), 1.0)["w"]
  assert 0.6 < float(m.mean()) < 0.8  # E[sigmoid(logit(s) + L)] ~ s.
  g = jax.grad(
      lambda s: masks.relaxed(s, jax.random.key(0), 3.0)["w"].sum())(s)
  assert float((g["w"] > 0).mean()) > 0.99  # m increases with s.
  hard = masks.bernoulli(s, jax.random.key(1))["w"]
  assert set(np.unique(hard)) == {0.0, 1.0}
  assert abs(float(hard.mean()) - 0.7) < 0.01


def _step_setup(synthetic_mnist, method="sparse_irm", steps=20, keep=0.5):
  from experiments.configs import sparse_irm as cfg  # pylint: disable=g-import-not-at-top
  from experiments import sparse_irm as exp  # pylint: disable=g-import-not-at-top
  config = cfg.get_config(method, "quick")
  config.data.data_num = 1000
  splits = exp.build_data(config, 0, mnist=synthetic_mnist)
  return splits, exp.build_objective(config)


def test_scores_frozen_before_start_then_projected(synthetic_mnist):
  splits, objective = _step_setup(synthetic_mnist)
  model, params = _mlp_params(16)
  scores = masks.init_scores(params)
  n = masks.num_scores(scores)
  wopt, sopt = optax.adam(1e-2), optax.adam(5e-2)
  step = jax.jit(sparse.make_step(
      model.apply, objective, weight_opt=wopt, score_opt=sopt,
      total_steps=20, keep_target=0.5, num_scores=n))
  state = sparse.SparseState(jnp.zeros((), jnp.int32), params, scores,
                             wopt.init(params), sopt.init(scores),
                             jax.random.key(0))
  arrays = train_lib.EnvArrays.from_envs(splits.train)
  densities = []
  for t in range(20):
    new, aux = step(state, arrays)
    if t < int(0.28 * 20):  # Frozen: scores and their Adam state unchanged.
      jax.tree.map(np.testing.assert_array_equal, new.scores, state.scores)
      jax.tree.map(np.testing.assert_array_equal, new.s_opt_state,
                   state.s_opt_state)
    assert float(aux["density"]) <= float(aux["keep_ratio"]) + 1e-5
    densities.append(float(aux["density"]))
    state = new
  assert densities[-1] == pytest.approx(0.5, abs=1e-3)
  # Weights moved from the start; biases are never masked.
  assert set(state.scores) == set(masks.select(params))


@pytest.mark.parametrize("warmup", [0, 5])
def test_score_warmup_starts_when_scores_unfreeze(synthetic_mnist, warmup):
  # experiments.sparse_irm's score_warmup: the schedule's count stays at 0
  # while the scores are frozen, so the first active update has lr 0.
  from experiments import sparse_irm as exp  # pylint: disable=g-import-not-at-top
  from experiments.configs import sparse_irm as cfg  # pylint: disable=g-import-not-at-top
  splits, objective = _step_setup(synthetic_mnist)
  model, params = _mlp_params(16)
  scores = masks.init_scores(params, value=0.9)  # Inside the clip: gradients.
  wopt = optax.adam(1e-2)
  config = cfg.get_config("sparse_irm", "quick")
  config.score_lr, config.score_warmup = 5e-2, warmup
  sopt = exp.score_optimizer(config)
  step = jax.jit(sparse.make_step(
      model.apply, objective, weight_opt=wopt, score_opt=sopt,
      total_steps=20, keep_target=1.0, num_scores=masks.num_scores(scores)))
  state = sparse.SparseState(jnp.zeros((), jnp.int32), params, scores,
                             wopt.init(params), sopt.init(scores),
                             jax.random.key(0))
  arrays = train_lib.EnvArrays.from_envs(splits.train)
  start = int(0.28 * 20)
  moved = []
  for _ in range(start + 2):
    new, _ = step(state, arrays)
    moved.append(max(float(jnp.abs(new.scores[p] - state.scores[p]).max())
                     for p in scores))
    state = new
  assert moved[:start] == [0.0] * start
  assert (moved[start] == 0.0) == bool(warmup)
  assert moved[start + 1] > 0.0


def test_sparse_fit_runs_and_irm_gradient_reaches_scores(synthetic_mnist):
  splits, objective = _step_setup(synthetic_mnist)
  model, params = _mlp_params(16)
  scores = masks.init_scores(params, value=0.8)
  arrays = train_lib.EnvArrays.from_envs(splits.train)

  def penalty_only(scores):
    m = masks.relaxed(scores, jax.random.key(0), 2.0)
    logits = train_lib.forward(model.apply, masks.apply(params, m), arrays.x)
    out = jirm.Outputs(logits, arrays.y, arrays.valid, params)
    return jirm.irmv1(variant="env_scale").value(out)

  g = jax.jit(jax.grad(penalty_only))(scores)
  assert all(float(jnp.abs(v).sum()) > 0 for v in g.values())
  fit = lambda batch_size=None, **kw: jirm.fit(splits, sparse.sparse_method(
      model, objective, steps=12, keep_target=0.6, task=splits.task,
      batch_size=batch_size, steps_per_epoch=(
          1 if batch_size is None else min(splits.train.sizes) // batch_size)),
                                               steps=12, **kw)
  res = fit(eval_every=4)
  assert res.history["density"][-1] <= 0.6 + 1e-3
  # Minibatches: the temperature rises per epoch (500 // 100 = 5 steps).
  res = fit(eval_every=1, batch_size=100)
  temps = res.history["inverse_temp"]
  assert temps[0] == temps[4] < temps[5] == temps[9] < temps[10]
  assert np.isfinite(res.history["term/erm"]).all()
  assert {"last", "oracle"} <= set(res.selections)


def test_mrm_runs_and_retrains_a_subnetwork(synthetic_mnist):
  splits, objective = _step_setup(synthetic_mnist, "mrm")
  model, _ = _mlp_params(16)
  method = sparse.mrm_method(model, objective, dense_steps=10,
                             mask_steps=30, sparsity=5.0, mask_lr=5e-2,
                             task=splits.task)
  res = jirm.fit(splits, method, steps=50, eval_every=5)
  # Only phase 3 (the retraining) is evaluated.
  assert list(res.history["step"]) == [45, 50]
  assert set(res.history["mrm_phase"].tolist()) == {2}
  kept = res.history["density"][-1]
  assert 0.0 < kept < 1.0
  # The mask is the phase-2 scores > 0.5; phase 1's weights stayed frozen
  # in phase 2 (set_to_zero), and phase 3 restarted from the initialisation:
  # its weights differ from the dense ones.
  st = res.state
  flat_s = jirm.methods.masks._flat(st.masked.params)  # pylint: disable=protected-access
  flat_d = jirm.methods.masks._flat(st.dense.params)  # pylint: disable=protected-access
  for p in flat_d:
    np.testing.assert_array_equal(flat_s[p], flat_d[p])
  assert int(st.dense.step) == 10 and int(st.masked.step) == 30
  assert int(st.retrain.step) == 10
  # The retrained subnetwork's effective weights are zero where masked.
  masked = masks.apply(res.params["params"], res.params["mask"])
  flat = jirm.methods.masks._flat(masked)  # pylint: disable=protected-access
  for p, m in res.params["mask"].items():
    assert float(jnp.abs(flat[p] * (1 - m)).max()) == 0.0
  with pytest.raises(ValueError, match="mask_steps=0 must be"):
    sparse.mrm_method(model, objective, dense_steps=10, mask_steps=0)


def test_mrm_resumes_mid_mask_phase(tmp_path, synthetic_mnist):
  import os, shutil  # pylint: disable=g-import-not-at-top,multiple-imports
  splits, objective = _step_setup(synthetic_mnist, "mrm")
  method = sparse.mrm_method(models.mlp(16), objective, dense_steps=10,
                             mask_steps=30, sparsity=5.0, mask_lr=5e-2,
                             task=splits.task)
  fit = lambda **kw: jirm.fit(splits, method, steps=50, eval_every=5, **kw)
  full = fit()
  ckpt = str(tmp_path / "ckpt")
  fit(checkpoint_dir=ckpt, checkpoint_every=25)
  assert sorted(os.listdir(ckpt)) == ["25", "50"]
  shutil.rmtree(os.path.join(ckpt, "50"))  # As if killed in phase 2.
  resumed = fit(checkpoint_dir=ckpt, checkpoint_every=25)
  for k in full.history:
    np.testing.assert_array_equal(resumed.history[k], full.history[k])
  jax.tree.map(np.testing.assert_array_equal, resumed.params, full.params)


@pytest.mark.parametrize("method", ["sparse_irm", "mrm"])
def test_sparse_methods_on_tiny_resnet(method):
  model = models.deep_model("tiny", lowering="patches")
  x = jax.random.uniform(jax.random.key(0), (2, 8, 16, 8, 3))
  params, stats = jax.jit(model.init)(jax.random.key(0), x[0, :1])
  scores = masks.init_scores(params)
  assert all("kernel" in p for p in scores) and any(
      "conv" in p for p in scores)
  y = jnp.asarray(np.arange(16).reshape(2, 8) % 2)

  def loss(params, scores, rng, sparsity):
    p = masks.apply(params, masks.relaxed(scores, rng, 2.0))
    feats, _ = model.features(p, stats, x.reshape(16, 8, 16, 3), train=True)
    logits = model.head_fn(p["head"], feats)[:, 0]
    return (optax.sigmoid_binary_cross_entropy(logits, y.reshape(-1)).mean()
            + sparsity * masks.density(scores))

  sopt = optax.adam(1e-2)
  s_state = sopt.init(scores)
  sparsity = 0.0 if method == "sparse_irm" else 1.0
  n = masks.num_scores(scores)
  grad_fn = jax.jit(jax.grad(loss, argnums=1))  # One compilation, 3 steps.
  for t in range(3):
    g_s = grad_fn(params, scores, jax.random.key(t), sparsity)
    assert all(np.isfinite(v).all() for v in g_s.values())
    u, s_state = sopt.update(g_s, s_state, scores)
    scores = masks.project(optax.apply_updates(scores, u), 0.9 * n)
  assert float(masks.density(scores)) <= 0.9 + 1e-5


def test_full_colored_mnist_consistency_and_noise(synthetic_mnist):
  splits = data.full_colored_mnist(0, data_num=2000, train_cons=(0.9, 0.7),
                                   test_cons=0.1, label_noise=0.2,
                                   mnist=synthetic_mnist)
  assert splits.task == "multiclass"
  assert splits.train.x.shape[1:] == (1000, 14, 14, 3)
  for env, cons in zip(range(2), (0.9, 0.7)):
    n = splits.train.sizes[env]
    x = splits.train.x[env, :n]
    y = splits.train.y[env, :n]
    # The colour of each image: its (max-normalised) mean RGB.
    rgb = x.reshape(n, -1, 3).max(1)
    rgb = rgb / np.maximum(rgb.max(1, keepdims=True), 1e-6)
    want = data.FULL_COLORS / data.FULL_COLORS.max(1, keepdims=True)
    color = np.argmin(((rgb[:, None] - want[None]) ** 2).sum(-1), 1)
    frac = (color == y).mean()
    assert abs(frac - cons) < 4 * np.sqrt(cons * (1 - cons) / n) + 0.01, frac
  digits_te = synthetic_mnist[0][1][2000:]
  assert splits.test.sizes[0] == len(digits_te)
  noise = (splits.test.y[0, :len(digits_te)] != digits_te).mean()
  assert abs(noise - 0.2) < 0.03
  with pytest.raises(data.DataError, match="test_cons"):
    data.full_colored_mnist(0, test_cons=1.5, mnist=synthetic_mnist)


def test_experiment_writes_tables(tmp_path, synthetic_mnist):
  from experiments import sparse_irm as exp  # pylint: disable=g-import-not-at-top
  # Two widths for two methods, one for MRM (the plots and ablations read
  # them; each run is a compilation; every method through the experiment:
  # test_goldens_mlp.py).
  exp.run(["irmv1", "sparse_irm"], ["8", "16"], 1, 0, str(tmp_path),
          preset="quick", progress=False, mnist=synthetic_mnist)
  exp.run(["mrm"], ["16"], 1, 0, str(tmp_path), preset="quick",
          progress=False, mnist=synthetic_mnist)
  exp.run(["sparse_irm"], ["8"], 1, 0, str(tmp_path), preset="quick",
          dataset="fullcmnist", progress=False, mnist=synthetic_mnist,
          overrides=["data.data_num=1000"])
  md = (tmp_path / "summary.md").read_text()
  assert "| sparse_irm |" in md and "H=16" in md and "fullcmnist" in md
  csv = (tmp_path / "summary.csv").read_text().splitlines()
  assert len(csv) > 10
  assert (tmp_path / "overparam.png").stat().st_size > 1000
  assert (tmp_path / "curves.png").stat().st_size > 1000
  recs = jirm.results.read_jsonl(str(tmp_path / "results.jsonl"))
  dens = {r["method"]: r["density"] for r in recs if r["selection"] == "last"}
  assert dens["irmv1"] == 1.0 and dens["sparse_irm"] < 1.0
  # Ablations on the saved weights.
  rows = exp.colour_probe(["irmv1", "sparse_irm", "mrm"], 16, str(tmp_path),
                          [str(tmp_path)], preset="quick", data_num=2000,
                          steps=20, mnist=synthetic_mnist)
  assert [r[0] for r in rows] == ["irmv1", "sparse_irm", "mrm"]
  assert all(0.0 <= r[1] <= 1.0 for r in rows)
  assert "| sparse_irm |" in (tmp_path / "probe.md").read_text()
  diff = exp.flip_heatmap(["irmv1", "sparse_irm"], 16, str(tmp_path),
                          [str(tmp_path)], preset="quick", data_num=2000,
                          mnist=synthetic_mnist)
  assert diff["irmv1"] > 0 and (tmp_path / "flip.png").stat().st_size > 1000
  with pytest.raises(ValueError, match="no saved parameters"):
    exp.colour_probe(["erm"], 16, str(tmp_path), [str(tmp_path)],
                     preset="quick", data_num=2000, mnist=synthetic_mnist)


def test_sparse_fit_resumes_from_checkpoint(tmp_path, synthetic_mnist):
  splits, objective = _step_setup(synthetic_mnist)
  model = models.mlp(16)
  method = sparse.sparse_method(model, objective, steps=20, keep_target=0.5,
                                task=splits.task)
  fit = lambda **kw: jirm.fit(splits, method, steps=20, eval_every=5, **kw)
  full = fit()
  ckpt = str(tmp_path / "ckpt")
  fit(checkpoint_dir=ckpt, checkpoint_every=5)
  import os, shutil  # pylint: disable=g-import-not-at-top,multiple-imports
  shutil.rmtree(os.path.join(ckpt, "20"))  # As if killed after step 15.
  resumed = fit(checkpoint_dir=ckpt, checkpoint_every=5)
  np.testing.assert_array_equal(resumed.history["test_acc_E"],
                                full.history["test_acc_E"])
  jax.tree.map(np.testing.assert_array_equal, resumed.params["scores"],
               full.params["scores"])


def test_baseline_sets_the_dense_weight_rate_only():
  from experiments.configs import sparse_irm as cfg  # pylint: disable=g-import-not-at-top
  c = cfg.get_config("irmv1", "paper")
  assert c.baseline == "matched" and cfg.weight_lr(c) == 6e-4
  c.baseline = "released"
  assert cfg.weight_lr(c) == 6e-3  # score_lr: the released dense route.
  c.baseline = "fast"
  with pytest.raises(ValueError, match=r"baseline='fast': choose from "):
    cfg.weight_lr(c)
  s = cfg.get_config("sparse_irm", "paper")
  s.baseline = "released"
  with pytest.raises(ValueError, match=r"baseline='released' with "
                     r"method='sparse_irm': .*drop --config.baseline"):
    cfg.weight_lr(s)


def _record(method, seed, last, best, step=240, *, lr=6e-4, baseline=None,
            eval_every=1):
  config = dict(lr=6e-4, score_lr=6e-3, eval_every=eval_every)
  if baseline is not None:
    config["baseline"] = baseline
  base = dict(method=method, seed=seed, dataset="cmnist", data_num=50_000,
              penalty="irmv1", hidden_dim=390, config=config)
  if baseline is not None:
    base["weight_lr"] = lr
  return [dict(base, selection="last", test_acc=last, step=1501),
          dict(base, selection="oracle_train_gt60", test_acc=best, step=step)]


def test_finding_table_pairs_seeds_and_keeps_the_baselines_apart():
  from experiments import sparse_irm as exp  # pylint: disable=g-import-not-at-top
  recs = []
  for s in range(3):  # SparseIRM - matched: last -0.10, rule +0.02 each.
    recs += _record("sparse_irm", s, 0.55, 0.70, step=215 + s)
    recs += _record("irmv1", s, 0.65, 0.68)
  recs += _record("irmv1", 0, 0.47, 0.61, lr=6e-3, baseline="released")
  recs += _record("irmv1", 1, 0.60, 0.63, lr=6e-3, baseline="released")
  recs += _record("irmv1", 7, 0.10, 0.10, eval_every=10)  # Not pooled.
  md = exp.finding_table(recs)
  assert "| sparse_irm | 3 | 70.0 ± 0.0 | 215, 216, 217 | 55.0 ± 0.0 | 0/3 " \
         "| 72.48 |" in md
  assert "| irmv1 lr 6e-4 (matched) | 3 | 68.0 ± 0.0 | 240, 240, 240 | " \
         "65.0 ± 0.0 | 0/3 | 63.24 |" in md
  # Released: last 47 (a collapse) and 60: mean 53.5, sample sd 9.2.
  assert "| irmv1 lr 6e-3 (released) | 2 | 62.0 ± 1.4 | 240, 240 | " \
         "53.5 ± 9.2 | 1/2 | 63.24 |" in md
  # Identical paired differences: the bootstrap interval is the point.
  assert "| irmv1 lr 6e-4 (matched) | 3 | +2.0 [+2.0, +2.0] | " \
         "-10.0 [-10.0, -10.0] |" in md
  # Seeds 0, 1 only; rule diffs 9, 7; last diffs 8, -5.
  assert "| irmv1 lr 6e-3 (released) | 2 | +8.0 [+7.0, +9.0] | " \
         "+1.5 [-5.0, +8.0] |" in md
  lo, hi = exp.bootstrap_ci([8.0, 1.0])  # Mean 4.5: two resample means.
  assert lo == pytest.approx(1.0) and hi == pytest.approx(8.0)
  assert exp.finding_table(_record("irmv1", 0, 0.5, 0.6,
                                   eval_every=10)) == ""
