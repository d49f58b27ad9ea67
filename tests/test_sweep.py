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
  runs = [m for m in compiled if "sweep_run" in m]
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


def test_any_method_sweeps_and_equals_separate_fits(splits, caplog):
  # A stateful method written outside jirm (tests/test_trainer.py's EMA
  # method), its learning rate traced: 2 lrs x 2 seeds in one program.
  from test_trainer import ema_method  # pylint: disable=g-import-not-at-top
  model = jirm.models.mlp(8)
  method_fn = lambda hp: ema_method(model, optax.adam(hp["lr"]))
  hps = sweep.grid(lr=[1e-3, 1e-2])
  with jax.log_compiles(True), caplog.at_level(logging.WARNING):
    results = sweep.fit_sweep(splits, method_fn, hparams=hps, seeds=[0, 1],
                              steps=7, eval_every=3)
  compiled = [r.getMessage() for r in caplog.records
              if "Finished XLA compilation" in r.getMessage()
              and "sweep_run" in r.getMessage()]
  assert len(compiled) == 1, compiled
  for trial, res in zip(sweep.trials(hps, [0, 1]), results):
    ref = jirm.fit(splits, ema_method(model, optax.adam(trial["lr"])),
                   steps=7, eval_every=3, seed=trial["seed"])
    assert res.history["step"].tolist() == [3, 6, 7]
    assert res.diverged is None
    assert _max_diff(res.history, {k: ref.history[k] for k in res.history}
                     ) < 1e-5, trial
    assert _max_diff(res.state.ema, ref.state.ema) < 1e-5, trial
    assert res.selections["last"]["step"] == 7
  assert _max_diff(results[0].state.ema, results[2].state.ema) > 1e-4


def test_diverged_trial_is_recorded_never_selected_others_go_on(splits):
  # Trial 1's penalty weight is NaN from step 2: it diverges there with the
  # message jirm.fit raises; trial 0 equals its separate run.
  def method_fn(hp):
    sched = jirm.schedules.PenaltySchedule(weight=hp["w"], anneal=2,
                                           before=0.0, name="w")
    return jirm.from_objective(jirm.models.mlp(8),
                               jirm.erm + sched * jirm.irmv1, optax.sgd(0.1))
  seen = []
  results = sweep.fit_sweep(splits, method_fn, hparams={"w": [10.0, np.nan]},
                            seeds=[0], steps=6, eval_every=2,
                            trials_per_call=1,
                            on_result=lambda i, r: seen.append(i))
  assert seen == [0, 1]  # Each trial handed over when its chunk finished.
  good, bad = results
  assert good.diverged is None and good.history["step"].tolist() == [2, 4, 6]
  with pytest.raises(jirm.train.DivergenceError) as err:
    jirm.fit(splits, method_fn({"w": np.float32(np.nan)}), steps=6,
             eval_every=2)
  assert bad.diverged == str(err.value)
  assert "weight/irmv1 = nan at step 2 (also non-finite: total)" in bad.diverged
  assert bad.selections == {}
  assert bad.history["step"].tolist() == [2]  # Evaluations before step 2.
  ref = jirm.fit(splits, method_fn({"w": np.float32(10.0)}), steps=6,
                 eval_every=2)
  assert _max_diff(good.history, {k: ref.history[k] for k in good.history}
                   ) < 1e-5
