r"""What the one trainer costs over a bare loop of the same jitted update.

  python -m benchmarks.trainer_overhead             # IRM's ColoredMNIST MLP

Times ``jirm.fit`` (host loop: evaluation every ``eval_every`` steps, the
per-step check of every floating state leaf, selection) against a bare
Python loop of the same update and evaluations jitted alone, on the IRMv1
paper recipe (25k synthetic samples per env, H = 390, full batch), in
interleaved rounds (machine load affects them alike); the printed ratio is
median(fit) / median(bare loop) from one run. Target (issue 18): within 5%.
The script uses only names that older versions have too, so
``cd <old checkout> && python <this file>`` times an older trainer the same
way (the script's directory, not the checkout, is then first on the path).
"""

from __future__ import annotations

import time

from absl import app
from absl import flags
import jax
import numpy as np
import optax

import jirm

flags.DEFINE_integer("steps", 100, "Updates per timed run.")
flags.DEFINE_integer("eval_every", 10, "Evaluation period (both loops).")
flags.DEFINE_integer("rounds", 3, "Interleaved timing rounds.")
flags.DEFINE_integer("n_per_env", 25_000, "Samples per env (2 envs).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from jirm import runtime  # pylint: disable=g-import-not-at-top
  from jirm import train as train_lib  # pylint: disable=g-import-not-at-top
  runtime.configure_cpu()
  mnist = jirm.data.synthetic_mnist(  # The rest of the train split: test.
      num_train=2 * FLAGS.n_per_env + FLAGS.n_per_env // 2,
      num_test=FLAGS.n_per_env // 2, seed=0)
  splits = jirm.data.colored_mnist(seed=0, mnist=mnist,
                                   data_num=2 * FLAGS.n_per_env)
  sched = jirm.schedules.preset("irm", weight=91257.19, anneal=190)
  objective = jirm.erm + 0.0011 * jirm.l2 + sched * jirm.irmv1
  model = jirm.models.mlp(390)

  def bare():  # The same update and evaluations, no trainer.
    train = train_lib.EnvArrays.from_envs(splits.train)
    evals = [train, train_lib.EnvArrays.from_envs(splits.test)]
    opt = optax.adam(4.9e-4)
    k_init, k_train = jax.random.split(jax.random.key(0))
    params = model.init(k_init, train.x[0, :1])
    state = train_lib.TrainState(jax.numpy.zeros((), jax.numpy.int32),
                                 params, opt.init(params), k_train)
    update = jax.jit(train_lib.make_train_step(model.apply, objective, opt),
                     donate_argnums=0)
    evaluate = jax.jit(train_lib.make_eval_fn(model.apply, splits.task))
    for i in range(FLAGS.steps):
      state, aux = update(state, train)
      if (i + 1) % FLAGS.eval_every == 0:
        jax.device_get([evaluate(state.params, e)[0] for e in evals] + [aux])
    jax.block_until_ready(state)

  def fit():
    res = jirm.fit(splits, model=model, objective=objective,
                   optimizer=optax.adam(4.9e-4), steps=FLAGS.steps,
                   eval_every=FLAGS.eval_every)
    jax.block_until_ready(res.params)

  runs = {"bare": bare, "fit": fit}
  times = {k: [] for k in runs}
  for _ in range(FLAGS.rounds):
    for k, f in runs.items():
      t0 = time.perf_counter()
      f()
      times[k].append(time.perf_counter() - t0)
  med = {k: float(np.median(v)) for k, v in times.items()}
  print(f"jirm from {jirm.__file__}; {FLAGS.steps} steps, eval every "
        f"{FLAGS.eval_every}, {FLAGS.rounds} rounds (compilation included "
        f"in both: each call jits afresh)")
  for k, v in times.items():
    print(f"{k:5s} median {med[k]:.3f} s  runs {[round(t, 3) for t in v]}")
  print(f"fit / bare loop: {med['fit'] / med['bare']:.3f} (target <= 1.05)")


if __name__ == "__main__":
  app.run(main)
