r"""Sweep throughput (vmapped trials vs sequential runs) and per-device
scaling of the data-parallel step on fake CPU devices.

  python -m benchmarks.sweep_throughput                     # both parts
  python -m benchmarks.sweep_throughput --part=sweep --trials=8 --hidden=64

Part ``sweep``: ``--trials`` IRMv1 trials (restarts x penalty weights) on a
synthetic ColoredMNIST-shaped problem (2 envs x ``--n_per_env``, 14x14x2),
once as one :func:`jirm.sweep.fit_sweep` program and once as separate
:func:`jirm.fit` runs; prints wall times (compilation included, as a user
sees them) and trials per minute. Part ``devices``: the jitted full-batch
step with the batch split over 1, 2, 4, 8 fake CPU devices (each a
subprocess with ``--xla_force_host_platform_device_count``); prints the
median step time and the speed-up over 1 device. Fake devices share this
machine's cores, so the scaling part measures overhead, not parallel
speed-up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app
from absl import flags
import numpy as np

flags.DEFINE_enum("part", "both", ["both", "sweep", "devices"], "What to run.")
flags.DEFINE_integer("trials", 8, "Sweep trials (2 weights x trials/2 seeds).")
flags.DEFINE_integer("n_per_env", 25_000, "Samples per env (2 envs).")
flags.DEFINE_integer("hidden", 64, "MLP width.")
flags.DEFINE_integer("steps", 101, "Steps per trial.")
flags.DEFINE_integer("device_steps", 10, "Timed steps per device count.")
flags.DEFINE_integer("worker_devices", 0, "Internal: time the sharded step.")
FLAGS = flags.FLAGS


def _splits(n, seed=0):
  import jirm  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  x = (rng.random((2, n, 14, 14, 2)) < 0.2).astype(np.float32)
  y = rng.integers(0, 2, (2, n)).astype(np.int32)
  env = jirm.data.Envs(x=x, y=y, agree=np.ones((2, n), bool),
                       valid=np.ones((2, n), bool), names=("e0", "e1"),
                       spurious=(0.1, 0.2))
  return jirm.data.EnvSplits(train=env, test=env, val=None, task="binary",
                             info={"synthetic": True})


def sweep_part():
  import optax  # pylint: disable=g-import-not-at-top
  import jirm  # pylint: disable=g-import-not-at-top
  from jirm import sweep  # pylint: disable=g-import-not-at-top
  splits = _splits(FLAGS.n_per_env)
  model = jirm.models.mlp(FLAGS.hidden)

  def objective_fn(hp):
    s = jirm.schedules.preset("irm", weight=hp["penalty_weight"], anneal=50)
    return jirm.erm + 0.0011 * jirm.l2 + s * jirm.irmv1

  opt_fn = lambda hp: optax.adam(4.9e-4)
  hps = sweep.grid(penalty_weight=[1e2, 1e4])
  seeds = range(max(1, FLAGS.trials // 2))
  t0 = time.time()
  res = sweep.fit_sweep(splits, model=model, objective_fn=objective_fn,
                        optimizer_fn=opt_fn, hparams=hps, seeds=seeds,
                        steps=FLAGS.steps, eval_every=10)
  t_sweep = time.time() - t0
  t0 = time.time()
  for t in sweep.trials(hps, seeds):
    jirm.fit(splits, model=model,
             objective=objective_fn({"penalty_weight": t["penalty_weight"]}),
             optimizer=opt_fn(t), steps=FLAGS.steps, eval_every=10,
             seed=t["seed"])
  t_seq = time.time() - t0
  n = len(res)
  print(f"sweep: {n} IRMv1 trials, H={FLAGS.hidden}, {FLAGS.steps} steps, "
        f"2 x {FLAGS.n_per_env} samples, {os.cpu_count()} CPUs")
  print(f"  one vmapped program : {t_sweep:7.1f} s  "
        f"({60 * n / t_sweep:.2f} trials/min)")
  print(f"  {n} separate fits    : {t_seq:7.1f} s  "
        f"({60 * n / t_seq:.2f} trials/min)")
  print(f"  throughput ratio (sweep / sequential): {t_seq / t_sweep:.2f}x")


def device_worker(n_dev):
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import jirm  # pylint: disable=g-import-not-at-top
  from jirm import sharding  # pylint: disable=g-import-not-at-top
  from jirm import train as train_lib  # pylint: disable=g-import-not-at-top
  splits = _splits(FLAGS.n_per_env)
  model = jirm.models.mlp(FLAGS.hidden)
  mesh = sharding.make_mesh(devices=jax.devices()[:n_dev])
  sched = jirm.schedules.preset("irm", weight=1e4, anneal=0)
  obj = jirm.erm + 0.0011 * jirm.l2 + sched * jirm.irmv1
  opt = optax.adam(4.9e-4)
  data = sharding.shard_env_arrays(
      train_lib.EnvArrays.from_envs(splits.train), mesh)
  params = model.init(jax.random.key(0), data.x[0, :1])
  state = sharding.replicate(train_lib.TrainState(
      jax.numpy.zeros((), jax.numpy.int32), params, opt.init(params),
      jax.random.key(1)), mesh)
  step = jax.jit(train_lib.make_train_step(model.apply, obj, opt))
  state, aux = step(state, data)
  jax.block_until_ready(aux)
  times = []
  for _ in range(FLAGS.device_steps):
    t0 = time.perf_counter()
    state, aux = step(state, data)
    jax.block_until_ready(aux)
    times.append(time.perf_counter() - t0)
  print(json.dumps({"devices": n_dev, "median_s": float(np.median(times))}))


def devices_part():
  rows = []
  for n in (1, 2, 4, 8):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.sweep_throughput",
         f"--worker_devices={n}", f"--hidden={FLAGS.hidden}",
         f"--n_per_env={FLAGS.n_per_env}",
         f"--device_steps={FLAGS.device_steps}"],
        env=env, capture_output=True, text=True, check=True)
    rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
  base = rows[0]["median_s"]
  print(f"data-parallel IRMv1 step, 2 x {FLAGS.n_per_env} samples, "
        f"H={FLAGS.hidden}, fake CPU devices on {os.cpu_count()} cores:")
  for r in rows:
    print(f"  {r['devices']} device(s): {1000 * r['median_s']:7.1f} ms/step  "
          f"speed-up {base / r['median_s']:.2f}x")


def main(argv):
  del argv
  if FLAGS.worker_devices:
    device_worker(FLAGS.worker_devices)
    return
  if FLAGS.part in ("both", "sweep"):
    sweep_part()
  if FLAGS.part in ("both", "devices"):
    devices_part()


if __name__ == "__main__":
  app.run(main)
