"""jirm.sweep: restarts x hyperparameters in one compiled program equal
separate jirm.fit runs."""

import logging

import jax
import numpy as np
import optax
import pytest

import jirm
from jirm import sweep


@pytest.fixture(scope="module")
def splits(synthetic_mnist):
  return jirm.data.colored_mnist(seed=0, data_num=1500, mnist=synthetic_mnist)


def objective_fn(hp):
  sched = jirm.schedules.preset("irm", weight=hp["penalty_weight"], anneal=6)
  return jirm.methods.build_objective("irmv1", l2=hp["l2"], schedule=sched)


def optimizer_fn(hp):
  return optax.adam(hp["lr"])


HPARAMS = sweep.grid(penalty_weight=[10.0, 1000.0], l2=[1e-3], lr=[1e-3, 3e-3])


def _max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x, np.float64) -
                                 np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_grid_and_trial_order():
  assert HPARAMS == {"penalty_weight": [10.0, 10.0, 1000.0, 1000.0],
                     "l2": [1e-3] * 4, "lr": [1e-3, 3e-3, 1e-3, 3e-3]}
  t = sweep.trials(HPARAMS, seeds=[0, 1])
  assert len(t) == 8
  assert [x["seed"] for x in t[:3]] == [0, 1, 0]
  assert t[2] == {"seed": 0, "penalty_weight": 10.0, "l2": 1e-3, "lr": 3e-3}
  with pytest.raises(ValueError, match="differ in length"):
    sweep.trials({"a": [1.0], "b": [1.0, 2.0]}, seeds=[0])
  with pytest.raises(ValueError, match="axis 'lr' is empty"):
    sweep.grid(lr=[])


def test_sweep_equals_separate_runs_with_one_compilation(splits, caplog):
  model = jirm.models.mlp(16)
  with jax.log_compiles(True), caplog.at_level(logging.WARNING):
    results = sweep.fit_sweep(splits, model=model, objective_fn=objective_fn,
                              optimizer_fn=optimizer_fn, hparams=HPARAMS,
                              seeds=[0, 1], steps=17, eval_every=5)
  compiled = [r.getMessage() for r in caplog.records
              if "Finished XLA compilation" in r.getMessage()]
  # One program for all 8 trials (plus tiny host->device casts, no step fn).
  runs = [m for m in compiled if "jit(sweep_run)" in m]
  assert len(runs) == 1, compiled
  assert len(results) == 8
  for trial, res in zip(sweep.trials(HPARAMS, [0, 1]), results):
    hp = {k: v for k, v in trial.items() if k != "seed"}
    ref = jirm.fit(splits, model=model, objective=objective_fn(hp),
                   optimizer=optimizer_fn(hp), steps=17, eval_every=5,
                   seed=trial["seed"])
    assert res.history["step"].tolist() == [5, 10, 15, 17]
    assert sorted(res.history) == sorted(ref.history)
    assert _max_diff(res.params, ref.params) < 1e-5, trial
    assert _max_diff(res.history, {k: ref.history[k] for k in res.history}
                     ) < 1e-5, trial
    assert res.selections["last"]["test_acc"] == pytest.approx(
        ref.selections["last"]["test_acc"], abs=1e-5)
  # The penalty weight really differs between trials (not one run copied).
  w = [r.history["weight/irmv1"][-1] for r in results]
  assert w[0] == 10.0 and w[4] == 1000.0
  assert _max_diff(results[0].params, results[4].params) > 1e-3


def test_chunked_sweep_equals_one_call(splits):
  model = jirm.models.mlp(8)
  kw = dict(model=model, objective_fn=objective_fn, optimizer_fn=optimizer_fn,
            hparams=sweep.grid(penalty_weight=[10.0, 100.0], l2=[0.0],
                               lr=[1e-3]), seeds=[0, 1, 2], steps=8,
            eval_every=4)
  whole = sweep.fit_sweep(splits, **kw)
  chunked = sweep.fit_sweep(splits, trials_per_call=4, **kw)  # 4 + 2 (+2 pad)
  assert len(chunked) == 6
  for a, b in zip(whole, chunked):
    assert _max_diff(a.params, b.params) < 1e-6


def test_bad_input(splits):
  with pytest.raises(ValueError, match="seeds is empty"):
    sweep.fit_sweep(splits, model=jirm.models.mlp(4),
                    objective_fn=objective_fn, optimizer_fn=optimizer_fn,
                    hparams=HPARAMS, seeds=[], steps=2)
  with pytest.raises(ValueError, match="steps=0"):
    sweep.fit_sweep(splits, model=jirm.models.mlp(4),
                    objective_fn=objective_fn, optimizer_fn=optimizer_fn,
                    hparams=HPARAMS, seeds=[0], steps=0)


def test_per_seed_data_equals_separate_runs(synthetic_mnist):
  make = lambda s: jirm.data.colored_mnist(seed=s, data_num=1000,
                                           mnist=synthetic_mnist)
  model = jirm.models.mlp(8)
  hps = sweep.grid(penalty_weight=[100.0], l2=[1e-3], lr=[1e-3])
  results = sweep.fit_sweep(make, model=model, objective_fn=objective_fn,
                            optimizer_fn=optimizer_fn, hparams=hps,
                            seeds=[0, 1, 2], steps=9, eval_every=3,
                            trials_per_call=2)
  for s, res in zip([0, 1, 2], results):
    hp = {k: v[0] for k, v in hps.items()}
    ref = jirm.fit(make(s), model=model, objective=objective_fn(hp),
                   optimizer=optimizer_fn(hp), steps=9, eval_every=3, seed=s)
    assert _max_diff(res.params, ref.params) < 1e-5
    np.testing.assert_allclose(res.history["test_acc_E"],
                               ref.history["test_acc_E"], atol=1e-6)
  # Different seeds saw different data (label noise / colours).
  assert not np.allclose(results[0].history["train_acc_E"],
                         results[1].history["train_acc_E"])
