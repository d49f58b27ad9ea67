"""IRM's MLP with the ResNets' feature / head interface (jirm.methods.deep.
mlp_model): the same initialisation and logits as jirm.models.mlp, and the
deep methods (the (h)-level terms, InvRat, IRMGame, GroupDRO, IPG) train
on it through jirm.fit."""

import jax
import numpy as np
import optax
import pytest

import jirm
from jirm.methods import deep
from jirm.methods import ipg
from jirm.methods import registry
from jirm import models


@pytest.fixture(scope="module")
def splits(synthetic_mnist):
  return jirm.data.colored_mnist(0, data_num=400, mnist=synthetic_mnist)


def test_same_initialisation_and_logits_as_the_mlp(splits):
  x = np.asarray(splits.train.x[0, :8])
  key = jax.random.key(3)
  plain = jirm.models.mlp(16).init(key, x[:1])["params"]
  model = models.mlp_model(16)
  params, stats = model.init(key, x[:1])
  assert stats == {}
  assert sorted(params["encoder"]) == ["hidden_0", "hidden_1"]
  for name in ("hidden_0", "hidden_1"):
    jax.tree.map(np.testing.assert_array_equal, params["encoder"][name],
                 plain[name])
  jax.tree.map(np.testing.assert_array_equal,
               params["head"]["params"]["head"], plain["head"])
  feats, _ = model.features(params, stats, x, train=True)
  assert feats.shape == (8, 16) and model.encoder.num_features == 16
  np.testing.assert_array_equal(
      model.head_fn(params["head"], feats),
      jirm.models.mlp(16).apply({"params": plain}, x))


def _method(name, weight, splits):
  m = deep.DEEP_METHODS[name]
  sched = jirm.schedules.preset("lin", weight=weight, anneal=0)
  objective, game = deep.build_method(name, schedule=sched, embed_dim=8,
                                      eb_hidden=16)
  model = models.mlp_model(16, head=m.head, head_hidden=16)
  return deep.deep_method(model, objective, optax.adam(1e-2), batch_size=50,
                          task=splits.task, game=game,
                          head_update=m.head_update)


def _encoder(state):
  return jax.tree.leaves(state.params["encoder"])


@pytest.mark.parametrize("name", ["irmv1_h", "irm_game_h", "invrat_eb",
                                  "invrat_ec_h", "group_dro"])
def test_deep_methods_train_on_the_mlp(splits, name):
  res = jirm.fit(splits, _method(name, 100.0, splits), steps=3,
                 eval_every=3, runner="scan")
  assert all(np.isfinite(np.asarray(l)).all()
             for l in jax.tree.leaves(res.state)
             if hasattr(l, "dtype") and not jirm.train.is_key(l))
  assert np.isfinite(res.history["test_acc_E"]).all()
  if registry.get(name).penalized:  # The penalty reaches the encoder.
    off = jirm.fit(splits, _method(name, 0.0, splits), steps=3,
                   eval_every=3, runner="scan")
    assert max(np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in zip(
        _encoder(res.state), _encoder(off.state))) > 1e-7, name


def test_ipg_trains_on_the_mlp(splits):
  pairs = ipg.colored_mnist_pairs(splits.train, num_pairs=100, seed=0)
  objective = jirm.erm(reduction="pooled") * 1.0
  method = deep.deep_method(
      models.mlp_model(16), objective, optax.adam(1e-2), batch_size=50,
      task=splits.task,
      step_factory=ipg.deep_step_factory(pairs, pair_batch=20))
  res = jirm.fit(splits, method, steps=3, eval_every=3, runner="scan")
  assert np.isfinite(res.history["test_acc_E"]).all()
  assert {"ipg_c", "ipg_d"} <= set(res.history)
