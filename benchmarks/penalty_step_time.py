r"""Step time of every penalty relative to ERM on the ColoredMNIST MLP.

  python -m benchmarks.penalty_step_time            # 50k full batch, H = 390

All variants are compiled first, then timed in interleaved rounds (so machine
load affects them alike); the median per variant is divided by ERM's median
from the same run. Targets (issue 2): IRMv1 <= 1.15x ERM, V-REx / RVP <= 1.05x.
"""

from __future__ import annotations

import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jirm
from jirm import train as train_lib

flags.DEFINE_integer("n_per_env", 25_000, "Samples per env (2 envs).")
flags.DEFINE_integer("hidden", 390, "MLP width.")
flags.DEFINE_integer("rounds", 5, "Interleaved timing rounds.")
flags.DEFINE_integer("steps_per_round", 3, "Steps per variant per round.")
FLAGS = flags.FLAGS

TARGETS = {"irmv1": 1.15, "vrex": 1.05, "rvp": 1.05}


def variants():
  sched = jirm.schedules.preset("irm", weight=91257.19, anneal=0)
  base = jirm.erm + 0.0011 * jirm.l2
  return {
      "erm": base,
      "irmv1": base + sched * jirm.irmv1,
      "irmv1_split": base + sched * jirm.irmv1(variant="split"),
      "irmv1_split_perm": base + sched * jirm.irmv1(variant="split_perm"),
      "irmv1_env_scale": base + sched * jirm.irmv1(variant="env_scale"),
      "vrex": base + sched * jirm.vrex,
      "mm_rex": base + sched * jirm.mm_rex,
      "rvp": base + sched * jirm.rvp,
      "irm_tv_l1": base + sched * jirm.irm_tv_l1,
      "bayesian_irm": base + sched * jirm.bayesian_irm,
  }


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  n = FLAGS.n_per_env
  x = (rng.random((2, n, 14, 14, 2)) < 0.2).astype(np.float32)
  y = rng.integers(0, 2, (2, n)).astype(np.int32)
  data = train_lib.EnvArrays(jnp.asarray(x), jnp.asarray(y),
                             jnp.ones((2, n), jnp.float32))
  model = jirm.models.mlp(FLAGS.hidden)
  opt = optax.adam(4.9e-4)
  params = model.init(jax.random.key(0), data.x[0, :1])
  steps, states = {}, {}
  for name, obj in variants().items():
    steps[name] = jax.jit(train_lib.make_train_step(model.apply, obj, opt))
    states[name] = train_lib.TrainState(jnp.int32(0), params,
                                        opt.init(params), jax.random.key(0))
    states[name], aux = steps[name](states[name], data)  # compile
    jax.block_until_ready(aux)
  times = {name: [] for name in steps}
  for _ in range(FLAGS.rounds):
    for name, step in steps.items():
      t0 = time.perf_counter()
      for _ in range(FLAGS.steps_per_round):
        states[name], aux = step(states[name], data)
      jax.block_until_ready((states[name], aux))
      times[name].append((time.perf_counter() - t0) / FLAGS.steps_per_round)
  erm = float(np.median(times["erm"]))
  print(f"ColoredMNIST MLP {2 * 14 * 14}->{FLAGS.hidden}->{FLAGS.hidden}->1, "
        f"full batch {2 * n}, {jax.devices()[0].platform}, "
        f"{FLAGS.rounds} rounds x {FLAGS.steps_per_round} steps")
  print(f"{'variant':<18} {'median s/step':>14} {'x ERM':>7}  target")
  for name, ts in times.items():
    med = float(np.median(ts))
    key = name if name in TARGETS else None
    target = f"<= {TARGETS[key]:.2f}" if key else ""
    ok = "" if not key else ("ok" if med / erm <= TARGETS[key] else "MISS")
    print(f"{name:<18} {med:>14.4f} {med / erm:>7.3f}  {target} {ok}")


if __name__ == "__main__":
  app.run(main)
