"""Run by test_sharding.py in a subprocess with 8 fake CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8 must be set before JAX
starts, which a pytest process has already done). Prints one JSON dict of
max absolute differences between sharded and single-device results."""

import json
import os
import sys

import jax
import jax.numpy as jnp

jax.config.update("jax_numpy_rank_promotion", "raise")

import numpy as np  # pylint: disable=g-import-not-at-top
import optax  # pylint: disable=g-import-not-at-top

sys.path.insert(0, os.path.dirname(__file__))
import jirm  # pylint: disable=g-import-not-at-top
from jirm import sharding  # pylint: disable=g-import-not-at-top
from jirm import sweep  # pylint: disable=g-import-not-at-top
from jirm import train as train_lib  # pylint: disable=g-import-not-at-top
from jirm import models
from jirm.methods import games
from test_methods import PENALTIES  # pylint: disable=g-import-not-at-top


FIT_METHODS = ("erm", "irmv1", "bayesian_irm")


def maxdiff(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  return max(float(np.max(np.abs(np.asarray(x, np.float64) -
                                 np.asarray(y, np.float64))))
             for x, y in zip(la, lb))


def main():
  assert jax.device_count() == 8, jax.devices()
  mnist = jirm.data.synthetic_mnist(num_train=1200, num_test=400, seed=0)
  splits = jirm.data.colored_mnist(seed=0, data_num=1000, mnist=mnist,
                                   val="holdout")
  mesh = sharding.make_mesh()  # 8-way data parallel.
  model = jirm.models.mlp(16)
  train = train_lib.EnvArrays.from_envs(splits.train)
  train_sh = sharding.shard_env_arrays(train, mesh)
  params = model.init(jax.random.key(0), train.x[0, :1])
  rng = jax.random.key(3)
  out = {"devices": jax.device_count(),
         "batch_sharding": str(train_sh.x.sharding.spec)}
  sched = jirm.schedules.preset("lin", weight=100.0, anneal=0)

  # Loss and gradients of every penalty (and ERM), global vs 8 shards: one
  # program holding them all (one compilation per placement, not 2 x 17).
  losses = {}
  for name, penalty in sorted(PENALTIES.items()) + [("erm", None)]:
    obj = jirm.erm + 1e-3 * jirm.l2
    if penalty is not None:
      obj = obj + sched * penalty
    losses[name] = jax.value_and_grad(
        train_lib.make_loss_fn(model.apply, obj), has_aux=True)
  vg = jax.jit(lambda p, a, r: {n: f(p, a, r, 5) for n, f in losses.items()})
  one = vg(params, train, rng)
  eight = vg(sharding.replicate(params, mesh), train_sh, rng)
  for name in losses:
    (l1, _), g1 = one[name]
    (l8, _), g8 = eight[name]
    out[f"loss/{name}"] = maxdiff(l1, l8)
    out[f"grad/{name}"] = maxdiff(g1, g8)
    out[f"loss_value/{name}"] = float(l1)

  # What a naive per-shard port computes: the mean of 8 shard penalties.
  pen = jax.jit(lambda p, a: jirm.irmv1.value(jirm.Outputs(
      train_lib.forward(model.apply, p, a.x), a.y, a.valid, p)))
  shards = [jax.tree.map(lambda v, k=k: v[:, k::8], train) for k in range(8)]
  out["irmv1_global"] = float(pen(params, train))
  out["irmv1_mean_of_shards"] = float(np.mean([pen(params, s)
                                               for s in shards]))

  # 20-step trajectories through jirm.fit: ERM, a penalty and the one that
  # draws random numbers (every penalty's loss and gradient: above).
  for name in FIT_METHODS:
    m = jirm.methods.get(name)
    obj = jirm.methods.build_objective(
        name, l2=1e-3, schedule=sched if m.penalty is not None else None)
    kw = dict(model=model, objective=obj, optimizer=optax.adam(1e-3),
              steps=20, seed=0, eval_every=5)
    r1 = jirm.fit(splits, **kw)
    r8 = jirm.fit(splits, mesh=mesh, **kw)
    out[f"fit_params/{name}"] = maxdiff(r1.params, r8.params)
    out[f"fit_history/{name}"] = maxdiff(
        {k: r1.history[k] for k in r1.history},
        {k: r8.history[k] for k in r1.history})

  # A deep method (tiny ResNet, BatchNorm, InvRat-EC(h)'s env heads) through
  # the same trainer: 8 devices equal one, batch statistics included. 128
  # samples per env: no padding rows, so the epoch permutations are the same.
  from jirm.methods import deep  # pylint: disable=g-import-not-at-top
  cm = jirm.data.cifar_mnist(
      seed=0, train_num=256, test_num=40, val="none",
      sources=jirm.data.synthetic_cifar_mnist_sources(num_per_class=300,
                                                      seed=0))
  game = games.invrat_ec(level="h")
  obj = jirm.erm(reduction="pooled") + jirm.schedules.preset(
      "lin", weight=10.0, anneal=1) * game.term
  method = deep.deep_method(models.deep_model("tiny"), obj, optax.adam(1e-3),
                            batch_size=16, game=game, anneal_step=1,
                            head_update="frozen")
  kw = dict(steps=3, eval_every=3, eval_chunk=40)
  d1 = jirm.fit(cm, method, **kw)
  d8 = jirm.fit(cm, method, mesh=mesh, **kw)
  keep = lambda st: (st.params, st.batch_stats, st.opt_state, st.game)
  out["deep_state"] = maxdiff(keep(d1.state), keep(d8.state))
  out["deep_history"] = maxdiff(d1.history, d8.history)

  # experiments.cifar_mnist --data_parallel: the experiment's restart on
  # the 8-device mesh (IRMv1(o), tiny ResNet) against one device.
  sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
  from experiments import cifar_mnist as cm_exp  # pylint: disable=g-import-not-at-top
  from experiments import common  # pylint: disable=g-import-not-at-top
  from experiments.configs import cifar_mnist as cm_cfgs  # pylint: disable=g-import-not-at-top
  c = common.apply_overrides(cm_cfgs.get_config("irmv1", "quick", "tiny", 2),
                             ["epochs=1", "data.train_num=200",
                              "data.test_num=40", "anneal_epochs=0"])
  src = jirm.data.synthetic_cifar_mnist_sources(num_per_class=300, seed=0)
  r1 = cm_exp.run_restart(c, 0, sources=src)
  r8 = cm_exp.run_restart(c, 0, sources=src, mesh=mesh)
  out["cifar_devices"] = sorted({r.get("devices", 1) for r in r8})
  last = lambda rs: next(r for r in rs if r["selection"] == "last")
  out["cifar_record"] = max(
      abs(last(r1)[k] - last(r8)[k]) for k in ("train_acc", "test_acc"))
  out["cifar_step"] = [last(r1)["step"], last(r8)["step"]]

  # IRM-TV's pooled data (ZIN: inferred environments) on the mesh: its
  # shard(mesh) splits the samples; a count the devices do not divide is
  # refused in one line.
  from jirm.methods import irm_tv  # pylint: disable=g-import-not-at-top
  zs = jirm.data.zin_synthetic(0, num_train=800, num_test=400)
  zin = irm_tv.tv_method(penalty="l2", envs="inferred", anneal=2)
  z1 = jirm.fit(zs, zin, steps=6, eval_every=3)
  z8 = jirm.fit(zs, zin, steps=6, eval_every=3, mesh=mesh)
  floats = lambda st: [l for l in jax.tree.leaves(st) if hasattr(l, "dtype")
                       and jnp.issubdtype(l.dtype, jnp.floating)]
  out["zin_state"] = maxdiff(floats(z1.state), floats(z8.state))
  out["zin_history"] = maxdiff(z1.history, z8.history)
  try:
    jirm.fit(jirm.data.zin_synthetic(0, num_train=804, num_test=400), zin,
             steps=2, eval_every=2, mesh=mesh)
    out["zin_uneven"] = "no error"
  except ValueError as e:
    out["zin_uneven"] = str(e)

  # A sweep split 2 ways over trials and 4 ways over the batch.
  def objective_fn(hp):
    s = jirm.schedules.preset("irm", weight=hp["penalty_weight"], anneal=5)
    return jirm.erm + 1e-3 * jirm.l2 + s * jirm.irmv1

  kw = dict(model=model, objective_fn=objective_fn,
            optimizer_fn=lambda hp: optax.adam(1e-3),
            hparams=sweep.grid(penalty_weight=[10.0, 1000.0]), seeds=[0, 1],
            steps=20, eval_every=5)
  s1 = sweep.fit_sweep(splits, **kw)
  s8 = sweep.fit_sweep(splits, mesh=sharding.make_mesh(sweep=2), **kw)
  out["sweep_params"] = max(maxdiff(a.params, b.params)
                            for a, b in zip(s1, s8))
  out["sweep_history"] = max(maxdiff(a.history, b.history)
                             for a, b in zip(s1, s8))
  print(json.dumps(out))


if __name__ == "__main__":
  main()
