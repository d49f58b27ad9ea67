"""Every registered method x every debug dataset: real steps, real gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jirm
from jirm import objectives
from jirm import train as train_lib

PENALTIES = {
    "irmv1/full": jirm.irmv1,
    "irmv1/split": jirm.irmv1(variant="split"),
    "irmv1/split_perm": jirm.irmv1(variant="split_perm"),
    "irmv1/env_scale": jirm.irmv1(variant="env_scale"),
    "vrex": jirm.vrex,
    "vrex/diff_sq": jirm.vrex(variant="diff_sq"),
    "mm_rex": jirm.mm_rex,
    "rvp": jirm.rvp,
    "irm_tv_l1": jirm.irm_tv_l1,
    "irm_tv_l1/minibatch": jirm.irm_tv_l1(form="minibatch"),
    "irm_tv_l2": jirm.irm_tv_l2,
    "bayesian_irm": jirm.bayesian_irm,
    "coral": jirm.coral,
    "mmd": jirm.mmd,
    "ib_irm": jirm.ib_irm,
    "eqrm": jirm.eqrm,
}


@pytest.fixture(scope="module")
def datasets(synthetic_mnist):
  return {
      "colored_mnist": jirm.data.colored_mnist(seed=0, data_num=1000,
                                               mnist=synthetic_mnist),
      "linear_synthetic": jirm.data.linear_synthetic(seed=0, n_per_env=256,
                                                     n_val=64),
  }


def test_registry_covers_all_penalties():
  registered = {m.penalty.name for m in jirm.methods.METHODS.values()
                if m.penalty is not None}
  assert registered <= {t.name for t in PENALTIES.values()}


@pytest.mark.parametrize("dataset", ["colored_mnist", "linear_synthetic"])
@pytest.mark.parametrize("name", sorted(PENALTIES))
def test_three_steps_and_penalty_reaches_encoder(datasets, dataset, name):
  """Three real steps on ColoredMNIST (binary); on the linear-synthetic
  regression task the penalty is evaluated and differentiated at the initial
  parameters (the regression trainer path: test_irm_beats_erm_on_linear_...;
  every experiment's methods: tests/test_goldens_*.py)."""
  splits = datasets[dataset]
  penalty = PENALTIES[name]
  model = jirm.models.mlp(16)
  train = train_lib.EnvArrays.from_envs(splits.train)
  if dataset == "colored_mnist":
    sched = jirm.schedules.preset("lin", weight=10.0, anneal=1)
    obj = jirm.erm + 1e-3 * jirm.l2 + sched * penalty
    res = jirm.fit(splits, model=model, objective=obj,
                   optimizer=optax.adam(1e-2), steps=3, seed=0, eval_every=1,
                   batch_size=64)
    h = res.history
    assert h["step"].tolist() == [1, 2, 3]
    assert np.all(np.isfinite(h["total"])), h["total"]
    assert np.all(np.isfinite(h[f"term/{penalty.name}"]))
    np.testing.assert_allclose(h[f"weight/{penalty.name}"], [0.0, 10.0, 10.0])
    params = res.params
  else:
    params = model.init(jax.random.key(0), train.x[0, :1])

  # The penalty alone has a non-zero gradient on the first (encoder) layer:
  # second-order terms are not dropped (DomainBed's IGA bug, SPEC §8).
  def penalty_only(params):
    feats, logits = train_lib.forward(model.apply, params, train.x,
                                      return_features=True)
    return penalty.value(objectives.Outputs(
        logits, train.y, train.valid, params, jax.random.key(0),
        splits.task, features=feats if penalty.reads_features else None))

  value, grads = jax.jit(jax.value_and_grad(penalty_only))(params)
  assert np.isfinite(float(value))
  enc = grads["params"]["hidden_0"]["kernel"]
  assert float(jnp.abs(enc).max()) > 0.0


def test_same_seed_same_metrics(datasets):
  splits = datasets["colored_mnist"]
  obj = jirm.erm + jirm.schedules.preset("irm", weight=100.0,
                                         anneal=2) * jirm.irmv1
  run = lambda seed: jirm.fit(splits, model=jirm.models.mlp(8),
                              objective=obj, optimizer=optax.adam(1e-2),
                              steps=4, seed=seed, eval_every=2)
  a, b, c = run(0), run(0), run(1)
  for key in a.history:
    np.testing.assert_array_equal(a.history[key], b.history[key])
  assert not np.array_equal(a.history["total"], c.history["total"])


def test_selection_rules(datasets):
  res = jirm.fit(datasets["colored_mnist"], model=jirm.models.mlp(8),
                 objective=jirm.erm * 1.0, optimizer=optax.adam(1e-2),
                 steps=6, seed=0, eval_every=2)
  sel = res.selections
  train = res.history["train_acc_E"].mean(1)
  # SparseIRM's rule exists when some point has train accuracy > 0.6.
  assert set(sel) == {"last", "train_domain_val", "oracle"} | (
      {"oracle_train_gt60"} if (train > 0.6).any() else set())
  assert sel["last"]["step"] == 6
  test = res.history["test_acc_E"].mean(1)
  val = res.history["val_acc_E"].mean(1)
  assert sel["oracle"]["test_acc"] == pytest.approx(test.max())
  assert sel["train_domain_val"]["val_acc"] == pytest.approx(val.max())


def test_sparse_irm_selection_rule():
  # Best test point among those with train accuracy > 0.6.
  history = {"step": np.array([10, 20, 30, 40]),
             "train_acc_E": np.array([[0.9], [0.55], [0.65], [0.7]]),
             "test_acc_E": np.array([[0.1], [0.9], [0.6], [0.5]])}
  sel = jirm.selection.select(history, {"train": ["a"], "test": ["t"]})
  assert sel["oracle_train_gt60"]["step"] == 30
  assert sel["oracle"]["step"] == 20
  history["train_acc_E"] = np.full((4, 1), 0.5)
  assert "oracle_train_gt60" not in jirm.selection.select(
      history, {"train": ["a"], "test": ["t"]})


def test_fit_rejects_bad_arguments(datasets):
  with pytest.raises(ValueError, match="batch_size=100000 exceeds"):
    jirm.fit(datasets["colored_mnist"], model=jirm.models.mlp(8),
             objective=jirm.erm * 1.0, optimizer=optax.adam(1e-2), steps=1,
             batch_size=100_000)
  with pytest.raises(ValueError, match="steps=0"):
    jirm.fit(datasets["colored_mnist"], model=jirm.models.mlp(8),
             objective=jirm.erm * 1.0, optimizer=optax.adam(1e-2), steps=0)
  with pytest.raises(ValueError, match="unknown method 'irmv2'"):
    jirm.methods.get("irmv2")


def test_train_step_traces_once(datasets):
  import chex  # pylint: disable=g-import-not-at-top
  splits = datasets["colored_mnist"]
  model = jirm.models.mlp(8)
  opt = optax.adam(1e-2)
  obj = jirm.erm + jirm.schedules.preset("domainbed", weight=10.0,
                                         anneal=2) * jirm.irmv1
  step = chex.assert_max_traces(
      train_lib.make_train_step(model.apply, obj, opt), n=1)
  step = jax.jit(step)
  data = train_lib.EnvArrays.from_envs(splits.train)
  params = model.init(jax.random.key(0), data.x[0, :1])
  state = train_lib.TrainState(jnp.int32(0), params, opt.init(params),
                               jax.random.key(0))
  for _ in range(4):
    state, _ = step(state, data)


def test_irm_beats_erm_on_linear_synthetic_spurious_weight():
  # Known regime: ERM leans on the spurious block, IRMv1 much less so.
  splits = jirm.data.linear_synthetic(seed=0, n_per_env=2000,
                                      train_alphas=(0.1, 2.0),
                                      test_alpha=10.0)
  model = jirm.models.MLP(hidden=())  # A linear model.
  sched = jirm.schedules.preset("irm", weight=1e3, anneal=200)

  def spurious_weight(obj):
    res = jirm.fit(splits, model=model, objective=obj,
                   optimizer=optax.adam(1e-2), steps=800, seed=0,
                   eval_every=800)
    w = np.asarray(res.params["params"]["head"]["kernel"])[:, 0]
    return np.abs(w[5:10]).sum(), res.selections["last"]["test_acc"]

  erm_w, erm_test = spurious_weight(jirm.erm * 1.0)
  irm_w, irm_test = spurious_weight(jirm.erm + sched * jirm.irmv1)
  assert irm_w < 0.5 * erm_w
  assert irm_test > erm_test  # test_acc is -MSE for regression.


def test_checkpoint_resume_equals_uninterrupted_run(datasets, tmp_path):
  splits = datasets["colored_mnist"]
  obj = jirm.erm + jirm.schedules.preset("domainbed", weight=10.0,
                                         anneal=4) * jirm.irmv1(
                                             variant="split_perm")
  kw = dict(model=jirm.models.mlp(8), objective=obj,
            optimizer=optax.adam(1e-2), seed=0, eval_every=2, batch_size=32)
  full = jirm.fit(splits, steps=8, **kw)
  ckpt = str(tmp_path / "ckpt")
  jirm.fit(splits, steps=4, checkpoint_dir=ckpt, checkpoint_every=2, **kw)
  resumed = jirm.fit(splits, steps=8, checkpoint_dir=ckpt,
                     checkpoint_every=2, **kw)
  jax.tree.map(np.testing.assert_array_equal, full.params, resumed.params)
  for key in full.history:
    np.testing.assert_allclose(full.history[key], resumed.history[key],
                               rtol=1e-6)
  assert resumed.selections == full.selections
