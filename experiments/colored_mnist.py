r"""Regenerates the ColoredMNIST table of Arjovsky et al. (2019) and REx/BIRM.

  python -m experiments.colored_mnist --method=all --preset=paper \
      --restarts=10 --output_dir=/tmp/cmnist

Writes to ``--output_dir``: ``results.jsonl`` (one line per restart and
selection rule, with the full config, seed and wall time), ``summary.md``
(mean ± std per method and rule, published numbers beside) and
``curves.png``. Restarts already present in ``results.jsonl`` (same method,
preset and seed) are skipped, and an interrupted restart resumes from its
orbax checkpoint in ``--output_dir/checkpoints`` (deleted once the restart's
record is written).
"""

from __future__ import annotations

import os
import time

import numpy as np

from absl import app
from absl import flags

from experiments import common
from experiments.configs import colored_mnist as configs
import jirm
from jirm import results as results_lib
from jirm.methods import registry

METHODS_ALL = registry.names("colored_mnist")  # The table's rows.
# The original IRM games (Ahuja et al. 2020); run with --method=irm_game_f.
GAME_METHODS = registry.names("colored_mnist", family="game", extra=True)
# Run only when named (--method=irm_game_f, --method=ipg).
OTHER_METHODS = registry.names("colored_mnist", extra=True)[len(METHODS_ALL):]
PUBLISHED = {
    "erm": "87.4 ± 0.2 / 17.1 ± 0.6",
    "oracle": "73.5 ± 0.2 / 73.0 ± 0.4",
    "irmv1": "70.8 ± 0.9 / 66.9 ± 2.5",
    "vrex": "71.5 ± 1.0 / 68.7 ± 0.9",
    "mm_rex": "72.4 ± 1.8 / 66.1 ± 1.5",
    "bayesian_irm": "– / 67.0 ± 1.8 (20k)",
    "ipg": "– / 72.7",
}

FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags (defined only when run as a program, so that several
  experiment modules can be imported together)."""
  flags.DEFINE_string("method", "irmv1", "Method name, comma list, or 'all' "
                      f"({', '.join(METHODS_ALL)}).")
  flags.DEFINE_string("preset", "paper", "Config preset: 'paper' or 'quick'.")
  flags.DEFINE_integer("restarts", 10, "Number of restarts (seeds seed..).")
  flags.DEFINE_integer("seed", 0, "First seed.")
  flags.DEFINE_string("output_dir", None, "Where results go.", required=True)
  flags.DEFINE_string("data_dir", None, "tfds data dir (else $TFDS_DATA_DIR, "
                      "else ~/tensorflow_datasets).")
  flags.DEFINE_multi_string("set", [], "Config override key=value, e.g. "
                            "--set=lr=1e-3 --set=data.data_num=20000.")
  flags.DEFINE_bool("progress", True, "Show a progress bar.")
  flags.DEFINE_bool("report_only", False, "Only regenerate summary.md and "
                    "curves.png from --output_dir/results.jsonl.")
  flags.DEFINE_bool("data_parallel", False, "Split the batch over every "
                    "device (jax.sharding mesh; registry methods).")
  flags.DEFINE_bool("distributed", False, "jax.distributed.initialize() "
                    "first (multi-host TPU pods / GPU clusters).")



def build_objective(config, hp=None):
  """The config's objective; ``hp`` may give ``penalty_weight`` and ``l2`` as
  (traced) values instead of the config's (``experiments.sweep``'s vmap
  backend)."""
  hp = dict(hp or {})
  method = jirm.methods.get(config.method)
  sched = None
  if method.penalty is not None:
    sched = jirm.schedules.preset(
        config.schedule, weight=hp.get("penalty_weight",
                                       config.penalty_weight),
        anneal=config.anneal)
  return jirm.methods.build_objective(
      config.method, l2=hp.get("l2", config.l2),
      erm_reduction=config.erm_reduction, schedule=sched,
      penalty_options=config.penalty_options.to_dict())


def build_run(config, data_dir=None, seed=0, mnist=None):
  """Config -> (splits, model, objective, optimizer); the library call."""
  method = jirm.methods.get(config.method)
  splits = jirm.data.colored_mnist(
      seed, variant=config.data.variant, data_num=config.data.data_num,
      num_envs=config.data.num_envs, label_noise=config.data.label_noise,
      test_e=config.data.test_e, grayscale=method.oracle,
      val=config.data.val, data_dir=data_dir, mnist=mnist)
  objective = build_objective(config)
  model = jirm.models.mlp(config.hidden_dim, config.depth)
  import optax  # pylint: disable=g-import-not-at-top
  return splits, model, objective, optax.adam(config.lr)


def run_restart(config, seed, data_dir=None, progress=False, mnist=None,
                checkpoint_dir=None, mesh=None):
  """Trains one restart; returns one record per selection rule. Per-step
  scalars go to TensorBoard files next to the checkpoints
  (``output_dir/tensorboard/<restart>``)."""
  t0 = time.time()
  if config.method in GAME_METHODS:
    from jirm import irm_games  # pylint: disable=g-import-not-at-top
    splits = jirm.data.colored_mnist(
        seed, variant=config.data.variant, data_num=config.data.data_num,
        num_envs=config.data.num_envs, label_noise=config.data.label_noise,
        test_e=config.data.test_e, val=config.data.val, data_dir=data_dir,
        mnist=mnist)
    g = config.game
    res = irm_games.fit(
        splits, variant=g.variant, steps=config.steps, seed=seed,
        warm_start=g.warm_start, threshold=g.threshold,
        eval_every=config.eval_every, progress=progress,
        desc=f"{config.method} seed {seed}", checkpoint_dir=checkpoint_dir,
        checkpoint_every=config.checkpoint_every,
        metrics_dir=common.metrics_dir_for(checkpoint_dir),
        hidden_dim=config.hidden_dim, depth=config.depth, lr=config.lr,
        rep_lr_scale=g.rep_lr_scale, batch_size=config.batch_size or None)
    return common.records_from_fit(res, config, seed,
                                   f"irm_game(variant={g.variant})",
                                   splits.info, time.time() - t0)
  if config.method == "ipg":
    return _run_ipg(config, seed, data_dir, progress, mnist, checkpoint_dir,
                    t0)
  splits, model, objective, optimizer = build_run(config, data_dir, seed,
                                                  mnist)
  res = jirm.fit(splits, model=model, objective=objective,
                 optimizer=optimizer, steps=config.steps, seed=seed,
                 batch_size=config.batch_size or None,
                 eval_every=config.eval_every, progress=progress,
                 desc=f"{config.method} seed {seed}",
                 checkpoint_dir=checkpoint_dir,
                 checkpoint_every=config.checkpoint_every, mesh=mesh,
                 metrics_dir=common.metrics_dir_for(checkpoint_dir))
  extra = {} if mesh is None else {"devices": int(mesh.size)}
  return common.records_from_fit(res, config, seed, objective.describe(),
                                 splits.info, time.time() - t0, **extra)


def _run_ipg(config, seed, data_dir, progress, mnist, checkpoint_dir, t0):
  """IPG: the loss is ERM + l2 (+ an optional registered penalty)."""
  import optax  # pylint: disable=g-import-not-at-top
  from jirm import ipg  # pylint: disable=g-import-not-at-top
  d, p = config.data, config.ipg
  splits = jirm.data.colored_mnist(
      seed, variant=d.variant, data_num=d.data_num, num_envs=d.num_envs,
      label_noise=d.label_noise, test_e=d.test_e, val=d.val,
      data_dir=data_dir, mnist=mnist)
  objective = jirm.erm(reduction=config.erm_reduction) + config.l2 * jirm.l2
  if p.penalty != "none":
    sched = jirm.schedules.preset(config.schedule, weight=config.penalty_weight,
                                  anneal=config.anneal)
    objective = objective + sched * jirm.methods.get(p.penalty).penalty
  pairs = ipg.colored_mnist_pairs(splits.train, num_pairs=p.num_pairs or None,
                                  seed=p.pair_seed + seed)
  res = ipg.fit(splits, model=jirm.models.mlp(config.hidden_dim, config.depth),
                pairs=pairs, objective=objective,
                optimizer=optax.adam(config.lr), steps=config.steps, seed=seed,
                threshold=p.threshold, alpha=p.alpha, pair_batch=p.pair_batch,
                batch_size=config.batch_size or None,
                eval_every=config.eval_every, progress=progress,
                desc=f"ipg seed {seed}", checkpoint_dir=checkpoint_dir,
                checkpoint_every=config.checkpoint_every,
                metrics_dir=common.metrics_dir_for(checkpoint_dir))
  records = common.records_from_fit(
      res, config, seed,
      ipg.describe(objective, threshold=p.threshold, alpha=p.alpha,
                   pair_batch=p.pair_batch, num_pairs=p.num_pairs),
      splits.info, time.time() - t0)
  h = res.history
  for r in records:
    if r["selection"] == "last":
      r["curve"].update(ipg_d=h["ipg_d"].astype(float).tolist(),
                        ipg_c=h["ipg_c"].astype(float).tolist(),
                        ipg_gated=h["ipg_gated"].astype(float).tolist())
  return records


def plot_ipg_curves(records, path):
  """ipg_curves.png: c(I) and d(I) over training (IPG restarts)."""
  runs = [r for r in records if r["method"] == "ipg" and
          r["selection"] == "last" and "ipg_c" in r.get("curve", {})]
  if not runs:
    return
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  for i, r in enumerate(runs):
    c = r["curve"]
    lab = f"seed {r['seed']}"
    axes[0].semilogy(c["step"], c["ipg_c"], color=f"C{i % 10}", label=lab)
    axes[1].semilogy(c["step"], c["ipg_d"], color=f"C{i % 10}")
    axes[2].plot(c["step"], 100 * np.asarray(c["test_acc"]),
                 color=f"C{i % 10}")
    axes[2].plot(c["step"], 100 * np.asarray(c["train_acc"]), ":",
                 color=f"C{i % 10}")
  t = runs[0]["config"]["ipg"]["threshold"]
  axes[0].axhline(t, color="k", ls="--", lw=0.8, label=f"t = {t:g}")
  axes[0].set_title("invariance condition c(I) (symmetric KL)")
  axes[1].set_title("rationale distance d(I)")
  axes[2].set_title("train (dotted) / test (solid) accuracy %")
  for ax in axes:
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  results_lib.save_figure(fig, path)


def run(methods, preset, restarts, seed, output_dir, data_dir=None,
        overrides=(), progress=True, mnist=None, mesh=None):
  """Runs every (method, seed) not yet in ``output_dir/results.jsonl``."""
  configs_ = [common.apply_overrides(configs.get_config(m, preset), overrides)
              for m in methods]
  common.run_restarts(
      configs_, restarts, seed, output_dir,
      lambda c, s, ckpt: run_restart(c, s, data_dir, progress, mnist, ckpt,
                                     mesh),
      write_reports)


def write_reports(output_dir):
  records = results_lib.read_jsonl(os.path.join(output_dir, "results.jsonl"))
  if not records:
    return
  results_lib.atomic_write(
      os.path.join(output_dir, "summary.md"),
      results_lib.summary_table(records, PUBLISHED,
                                "ColoredMNIST (Arjovsky et al. 2019)"))
  results_lib.plot_curves(records, os.path.join(output_dir, "curves.png"),
                          "ColoredMNIST: train (dotted) / test (solid)")
  plot_ipg_curves(records, os.path.join(output_dir, "ipg_curves.png"))


def main(argv):
  del argv
  if FLAGS.distributed:
    jirm.sharding.initialize_distributed()
  if common.start(FLAGS, write_reports):
    return
  methods = common.method_list(FLAGS.method, METHODS_ALL)

  def go():
    for m in methods:
      if m not in OTHER_METHODS:
        jirm.methods.get(m)
    mesh = jirm.sharding.make_mesh() if FLAGS.data_parallel else None
    run(methods, FLAGS.preset, FLAGS.restarts, FLAGS.seed, FLAGS.output_dir,
        FLAGS.data_dir, FLAGS.set, FLAGS.progress, mesh=mesh)

  common.exit_on_bad_input(go)


if __name__ == "__main__":
  define_flags()
  app.run(main)
