r"""SparseIRM step time vs the dense IRMv1 step on the same MLP.

  python -m benchmarks.sparse_step_time [--n=50000] [--hidden=390]

One run, interleaved rounds, median per variant: the jitted full-batch step
of dense IRMv1 (``jirm.train.make_train_step``) and of SparseIRM with the
same objective (``jirm.methods.sparse.make_step``: relaxed masks on all three
weight matrices, two Adam optimizers, projection onto the budget).
Target (issue 4): SparseIRM <= 1.5x dense.
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
from jirm.methods import masks
from jirm import runtime
from jirm.methods import sparse
from jirm import train as train_lib

flags.DEFINE_integer("n", 50_000, "Training samples (two envs).")
flags.DEFINE_integer("hidden", 390, "MLP width.")
flags.DEFINE_integer("rounds", 3, "Interleaved rounds.")
flags.DEFINE_integer("steps_per_round", 3, "Steps per variant per round.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  runtime.configure_cpu()
  rng = np.random.default_rng(0)
  e, b = 2, FLAGS.n // 2
  data = train_lib.EnvArrays(
      jnp.asarray(rng.random((e, b, 14, 14, 2), np.float32)),
      jnp.asarray(rng.integers(0, 2, (e, b)), jnp.int32), jnp.ones((e, b)))
  sched = jirm.schedules.preset("lin", weight=1e4, anneal=0)
  objective = (jirm.erm * 1.0 + 1e-3 * jirm.l2 +
               sched * jirm.irmv1(variant="env_scale"))
  model = jirm.models.mlp(FLAGS.hidden)
  params = model.init(jax.random.key(0), data.x[0, :1])
  wopt, sopt = optax.adam(6e-4), optax.adam(6e-3)
  dense_step = jax.jit(train_lib.make_train_step(model.apply, objective,
                                                 wopt))
  scores = masks.init_scores(params)
  sparse_step = jax.jit(sparse.make_step(
      model.apply, objective, weight_opt=wopt, score_opt=sopt,
      total_steps=100, keep_target=0.5, num_scores=masks.num_scores(scores)))
  states = {
      "dense_irmv1": train_lib.TrainState(
          jnp.zeros((), jnp.int32), params, wopt.init(params),
          jax.random.key(1)),
      # Step 50: scores active and the budget binding.
      "sparse_irm": sparse.SparseState(
          jnp.asarray(50, jnp.int32), params, scores, wopt.init(params),
          sopt.init(scores), jax.random.key(1))}
  steps = {"dense_irmv1": dense_step, "sparse_irm": sparse_step}

  def run(k):
    states[k] = steps[k](states[k], data)[0]
    jax.block_until_ready(states[k])

  for k in steps:
    run(k)
    run(k)
  times = {k: [] for k in steps}
  for _ in range(FLAGS.rounds):
    for k in steps:
      t = time.perf_counter()
      for _ in range(FLAGS.steps_per_round):
        run(k)
      times[k].append((time.perf_counter() - t) / FLAGS.steps_per_round)
  med = {k: float(np.median(v)) for k, v in times.items()}
  print(f"MLP {FLAGS.hidden}, {FLAGS.n} samples full batch, jax "
        f"{jax.__version__}")
  for k, v in med.items():
    print(f"  {k:12s} {v:.3f} s  {v / med['dense_irmv1']:.2f}x dense "
          f"IRMv1" + (" (target <= 1.5)" if k == "sparse_irm" else ""))


if __name__ == "__main__":
  app.run(main)
