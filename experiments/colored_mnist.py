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
# Run only when named (--method=irm_game_f, --method=ipg, --method=coral).
OTHER_METHODS = tuple(n for n in registry.names("colored_mnist", extra=True)
                      if n not in METHODS_ALL)
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
  common.define_config_flag("colored_mnist")
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
  """Config -> (splits, model, objective, optimizer) of a stateless method
  (the notebook form of :func:`build_method`; ``experiments.sweep``'s vmap
  backend)."""
  import optax  # pylint: disable=g-import-not-at-top
  splits = _splits(config, seed, data_dir, mnist)
  model = jirm.models.mlp(config.hidden_dim, config.depth)
  return splits, model, build_objective(config), optax.adam(config.lr)


def _splits(config, seed, data_dir=None, mnist=None):
  d = config.data
  return jirm.data.colored_mnist(
      seed, variant=d.variant, data_num=d.data_num, num_envs=d.num_envs,
      label_noise=d.label_noise, test_e=d.test_e,
      grayscale=registry.get(config.method).oracle, val=d.val,
      data_dir=data_dir, mnist=mnist)


def build_method(config, seed=0, data_dir=None, mnist=None):
  """Config -> :class:`experiments.common.Built`: the data of restart
  ``seed`` and the :class:`jirm.methods.Method` that :func:`run_restart`
  trains with :func:`jirm.fit` (every family of this experiment: the
  registry's stateless penalties, the IRM games, IPG). The capability-
  matrix test builds every method through it.

  Example:
    >>> built = build_method(configs.get_config("irmv1"))
    >>> res = jirm.fit(built.splits, built.method, seed=0, **built.fit_kw)
  """
  import optax  # pylint: disable=g-import-not-at-top
  splits = _splits(config, seed, data_dir, mnist)
  batch_size = config.batch_size or None
  jirm.train.check_batch_size(batch_size, splits.train)
  fit_kw = dict(steps=config.steps, eval_every=config.eval_every)
  if config.method in GAME_METHODS:
    from jirm.methods import irm_games  # pylint: disable=g-import-not-at-top
    g = config.game
    method = irm_games.irm_game(
        variant=g.variant, task=splits.task, hidden_dim=config.hidden_dim,
        depth=config.depth, lr=config.lr, rep_lr_scale=g.rep_lr_scale,
        batch_size=batch_size)
    return common.Built(splits, method, f"irm_game(variant={g.variant})",
                        fit_kw, {})
  if config.method == "fishr":  # A game on the MLP's encoder + head.
    from jirm.methods import games  # pylint: disable=g-import-not-at-top
    game = games.fishr(ema=config.fishr.ema)
    sched = jirm.schedules.preset(config.schedule,
                                  weight=config.penalty_weight,
                                  anneal=config.anneal)
    objective = (jirm.erm(reduction=config.erm_reduction) +
                 config.l2 * jirm.l2 + sched * game.term)
    method = jirm.methods.deep_method(
        jirm.models.mlp_model(config.hidden_dim, config.depth,
                              out=1 if splits.task == "binary" else 10),
        objective, optax.adam(config.lr),
        batch_size=batch_size or min(splits.train.sizes), task=splits.task,
        game=game)
    return common.Built(splits, method, objective.describe(), fit_kw, {})
  model = jirm.models.mlp(config.hidden_dim, config.depth)
  if config.method == "ipg":
    from jirm.methods import ipg  # pylint: disable=g-import-not-at-top
    p = config.ipg
    objective = jirm.erm(reduction=config.erm_reduction) + config.l2 * jirm.l2
    if p.penalty != "none":  # IPG around a registered penalty.
      sched = jirm.schedules.preset(config.schedule,
                                    weight=config.penalty_weight,
                                    anneal=config.anneal)
      objective = objective + sched * jirm.methods.get(p.penalty).penalty
    pairs = ipg.colored_mnist_pairs(splits.train,
                                    num_pairs=p.num_pairs or None,
                                    seed=p.pair_seed + seed)
    method = ipg.ipg(model=model, objective=objective,
                     optimizer=optax.adam(config.lr), pairs=pairs,
                     threshold=p.threshold, alpha=p.alpha,
                     pair_batch=p.pair_batch, task=splits.task,
                     batch_size=batch_size)
    return common.Built(splits, method, ipg.describe(
        objective, threshold=p.threshold, alpha=p.alpha,
        pair_batch=p.pair_batch, num_pairs=p.num_pairs), fit_kw, {})
  objective = build_objective(config)
  method = jirm.methods.from_objective(model, objective,
                                       optax.adam(config.lr),
                                       task=splits.task,
                                       batch_size=batch_size)
  return common.Built(splits, method, objective.describe(), fit_kw, {})


def run_restart(config, seed, data_dir=None, progress=False, mnist=None,
                checkpoint_dir=None, mesh=None):
  """Trains one restart; returns one record per selection rule. Per-step
  scalars go to TensorBoard files next to the checkpoints
  (``output_dir/tensorboard/<restart>``)."""
  t0 = time.time()
  if mesh is not None and config.batch_size:
    raise ValueError("--data_parallel shards the full batch; minibatch "
                     f"sampling (batch_size={config.batch_size}) is "
                     f"single-device only: --config.batch_size=0.")
  b = build_method(config, seed, data_dir, mnist)
  res = common.fit_restart(b, config, seed, progress=progress,
                           checkpoint_dir=checkpoint_dir, mesh=mesh)
  extra = {} if mesh is None else {"devices": int(mesh.size)}
  return records_of(res, config, seed, b, b.splits.info, time.time() - t0,
                    **extra)


def records_of(res, config, seed, built, info, wall, **extra):
  """A trained restart's records (one per selection rule; the game methods
  add their stop rule first). ``run_restart`` and the sweep's vmap backend
  both write these."""
  if config.method in GAME_METHODS:
    from jirm.methods import irm_games  # pylint: disable=g-import-not-at-top
    irm_games.add_game_stop(res, warm_start=config.game.warm_start,
                            threshold=config.game.threshold)
  records = common.records_from_fit(res, config, seed, built.describe, info,
                                    wall, **built.record, **extra)
  if config.method == "ipg":
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

  def go():
    choice = common.config_choice(FLAGS)
    methods = common.method_list(choice.method, METHODS_ALL)
    for m in methods:
      if m not in OTHER_METHODS:
        jirm.methods.get(m)
    mesh = jirm.sharding.make_mesh() if FLAGS.data_parallel else None
    run(methods, choice.preset, FLAGS.restarts, FLAGS.seed, FLAGS.output_dir,
        FLAGS.data_dir, choice.overrides, FLAGS.progress, mesh=mesh)

  common.exit_on_bad_input(go)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=common.parse_flags)
