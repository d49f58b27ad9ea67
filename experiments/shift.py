r"""Shared driver of the real-world shift experiments; run it through
``experiments.waterbirds``, ``experiments.celeba`` or
``experiments.colored_object``:

  python -m experiments.waterbirds --method=erm,group_dro,ipg,ipg_group_dro \
      --data_dir=/data/waterbird_complete95_forest2water2 --preset=cpu \
      --restarts=3 --output_dir=/tmp/wb
  python -m experiments.waterbirds --config.data.variant=waterbird100 ...
  python -m experiments.celeba --data_dir=/data/celeba --method=group_dro ...
  python -m experiments.colored_object --data_dir=/data/coco ...

Writes ``results.jsonl`` (one record per restart and selection rule with the
config, seed, wall time, average / worst-group / per-group test accuracy),
``summary.md`` / ``summary.csv`` (mean ± std of average and worst-group
accuracy per method and rule) and ``curves.png``. Finished restarts are
skipped; interrupted ones resume from their checkpoints.
"""

from __future__ import annotations

import os
import time

import numpy as np

from absl import flags

from experiments import common
from experiments.configs import shift as configs
from jirm.methods import deep
from jirm import results as results_lib
from jirm.data import shift as shift_data
from jirm import models

FLAGS = flags.FLAGS
RULES = ("last", "val_worst_group", "oracle")


def define_flags(dataset):
  flags.DEFINE_string("method", "erm,group_dro", "Comma list or 'all' "
                      f"({', '.join(configs.METHODS)}).")
  flags.DEFINE_string("preset", "cpu", "'paper', 'cpu' or 'quick'.")
  flags.DEFINE_integer("restarts", 3, "Restarts (seeds seed..).")
  flags.DEFINE_integer("seed", 0, "First seed.")
  flags.DEFINE_string("data_dir", None, f"The {dataset} root folder.",
                      required=True)
  flags.DEFINE_string("output_dir", None, "Where results go.", required=True)
  common.define_config_flag("shift")
  flags.DEFINE_bool("progress", True, "Show a progress bar.")
  flags.DEFINE_bool("report_only", False, "Only rewrite the reports.")


def load(config, root, seed=0):
  """The dataset of ``config`` from ``root`` (groups as training envs for
  GroupDRO and the IRM penalties, one pooled env otherwise)."""
  d = config.data
  groups = config.method in ("group_dro", "ipg_group_dro", "irmv1", "vrex")
  kw = dict(image_size=d.image_size)
  if config.dataset == "colored_object":
    cons = tuple(float(v) for v in d.cons.split(","))
    return shift_data.colored_object(root, seed=seed, cons=cons,
                                     label_noise=d.label_noise, **kw)
  kw.update(train_envs="groups" if groups else "pooled",
            max_per_split=d.max_per_split or None)
  if config.dataset == "waterbirds":
    return shift_data.waterbirds(root, variant=d.variant, **kw)
  return shift_data.celeb_a(root, target=d.target, spurious=d.spurious,
                            layout=d.layout, **kw)


def build_run(config, root, seed):
  """Config -> (splits, model, objective, game, optimizer, step_factory)."""
  import optax  # pylint: disable=g-import-not-at-top
  import jirm  # pylint: disable=g-import-not-at-top
  splits = load(config, root, seed)
  base = {"ipg": "erm", "ipg_group_dro": "group_dro"}.get(config.method,
                                                           config.method)
  sched = None
  if base in ("irmv1", "vrex"):
    sched = jirm.schedules.preset("irmbed", weight=config.penalty_weight,
                                  anneal=config.anneal)
  objective, game = deep.build_method(base, schedule=sched,
                                      eta=config.group_dro_eta)
  model = models.deep_model(config.model, stem=config.stem)
  if config.optimizer == "sgd":
    opt = optax.sgd(config.lr, config.momentum)
  elif config.optimizer == "adam":
    opt = optax.adam(config.lr)
  else:
    raise ValueError(f"optimizer={config.optimizer!r}: 'sgd' or 'adam'.")
  if config.weight_decay:
    opt = optax.chain(optax.add_decayed_weights(config.weight_decay), opt)
  factory = None
  if config.method.startswith("ipg"):
    from jirm.methods import ipg  # pylint: disable=g-import-not-at-top
    p = config.ipg
    source = splits.val if p.source == "val" else splits.train
    if source is None:
      raise ValueError(f"ipg.source={p.source!r} but the dataset has no "
                       f"validation split.")
    pairs = ipg.group_pairs(source, num_pairs=p.num_pairs, seed=seed)
    factory = ipg.deep_step_factory(pairs, threshold=p.threshold,
                                    alpha=p.alpha, pair_batch=p.pair_batch)
  return splits, model, objective, game, opt, factory


def build_method(config, seed=0, data_dir=None):
  """Config -> :class:`experiments.common.Built`: the dataset under
  ``data_dir``, the :class:`jirm.methods.Method` (a :func:`jirm.methods.deep.
  deep_method`; GroupDRO's weights and IPG's pair step in its state and
  update) and the trainer arguments that :func:`run_restart` passes to
  :func:`jirm.fit`. The capability-matrix test builds every method through
  it.

  Example:
    >>> built = build_method(configs.get_config("group_dro"), 0, root)
    >>> res = jirm.fit(built.splits, built.method, seed=0, **built.fit_kw)
  """
  import jirm  # pylint: disable=g-import-not-at-top
  splits, model, objective, game, opt, factory = build_run(config, data_dir,
                                                           seed)
  init_params = None
  if config.pretrained:
    from jirm.models import convert  # pylint: disable=g-import-not-at-top
    init_params = convert.load_torchvision_resnet(config.pretrained,
                                                  config.model)
  batch = min(config.batch_size, min(splits.train.sizes))
  jirm.train.check_batch_size(batch, splits.train)
  method = deep.deep_method(model, objective, opt, batch_size=batch,
                            task=splits.task, game=game,
                            init_params=init_params, step_factory=factory)
  fit_kw = dict(steps=config.steps, eval_every=config.eval_every,
                eval_chunk=500, eval_train_max=config.eval_train_max or None)
  return common.Built(splits, method, objective.describe(), fit_kw, dict(
      dataset=config.dataset, batch_size=batch,
      pretrained=config.pretrained or "none (trained from scratch)"))


def run_restart(config, seed, checkpoint_dir=None, data_dir=None,
                progress=False):
  """One restart; one record per selection rule."""
  t0 = time.time()
  b = build_method(config, seed, data_dir)
  res = common.fit_restart(b, config, seed, progress=progress,
                           checkpoint_dir=checkpoint_dir)
  return common.records_from_fit(res, config, seed, b.describe,
                                 b.splits.info, time.time() - t0, **b.record)


def write_reports(output_dir):
  records = results_lib.read_jsonl(os.path.join(output_dir, "results.jsonl"))
  if not records:
    return
  ms = lambda v: f"{100 * np.mean(v):.1f} ± {100 * np.std(v):.1f}"
  ds = sorted({r["dataset"] for r in records})
  lines = [f"# {', '.join(ds)}: average / worst-group test accuracy %", "",
           "Mean ± std over restarts. `val_worst_group` selects the "
           "evaluation with the best worst-group validation accuracy "
           "(Sagawa et al. 2020); `oracle` reads the test set.", "",
           "| method | preset | n | " + " | ".join(
               f"{r} avg | {r} worst" for r in RULES) + " |",
           "|---|---|---|" + "---|---|" * len(RULES)]
  csv = ["method,preset,n," + ",".join(f"{r}_avg,{r}_worst" for r in RULES)]
  keys = sorted({(r["method"], r["preset"]) for r in records})
  for m, p in keys:
    cells, cvals = [], []
    rs = [r for r in records if r["method"] == m and r["preset"] == p]
    for rule in RULES:
      sel = [r for r in rs if r["selection"] == rule]
      if sel:
        a = [r["avg_acc"] for r in sel]
        w = [r["worst_group_acc"] for r in sel]
        cells += [ms(a), ms(w)]
        cvals += [f"{np.mean(a):.6f}", f"{np.mean(w):.6f}"]
      else:
        cells += ["–", "–"]
        cvals += ["", ""]
    n = len({r["seed"] for r in rs})
    lines.append(f"| {m} | {p} | {n} | " + " | ".join(cells) + " |")
    csv.append(f"{m},{p},{n}," + ",".join(cvals))
  results_lib.atomic_write(os.path.join(output_dir, "summary.md"),
                           "\n".join(lines) + "\n")
  results_lib.atomic_write(os.path.join(output_dir, "summary.csv"),
                           "\n".join(csv) + "\n")
  results_lib.plot_curves(records, os.path.join(output_dir, "curves.png"),
                          f"{', '.join(ds)}: train (dotted) / test (solid)")


def run(dataset, methods, preset, restarts, seed, output_dir, data_dir,
        overrides=(), progress=True):
  cfgs = [common.apply_overrides(configs.get_config(m, preset, dataset),
                                 overrides) for m in methods]
  common.run_restarts(cfgs, restarts, seed, output_dir,
                      lambda c, s, ckpt: run_restart(c, s, ckpt, data_dir,
                                                     progress),
                      write_reports, key_fields=("method", "preset",
                                                 "dataset"))


def main_for(dataset):
  """The ``main`` of ``experiments.<dataset>``."""

  def main(argv):
    del argv
    if common.start(FLAGS, write_reports):
      return
    choice = common.exit_on_bad_input(common.config_choice, FLAGS)
    methods = common.method_list(choice.method, configs.METHODS)
    common.exit_on_bad_input(run, dataset, methods, choice.preset,
                             FLAGS.restarts, FLAGS.seed, FLAGS.output_dir,
                             FLAGS.data_dir, choice.overrides, FLAGS.progress)

  return main
