r"""Regenerates SparseIRM's MLP tables (Zhou et al., ICML 2022, Table 1/2,
Figure 3).

  python -m experiments.sparse_irm --dataset=cmnist --data_num=50000 \
      --penalty=irmv1 --methods=erm,oracle,irmv1,mrm,sparse_irm,sparse_erm \
      --hidden=64,160,256,390,512,640 --restarts=5 --output_dir=/tmp/sirm

Writes ``results.jsonl`` (one line per restart and selection rule, with the
config, seed and wall time), ``summary.md`` / ``summary.csv`` (test accuracy
mean ± std per method and hidden width, for the ``last`` step and the
paper's rule ``oracle_train_gt60`` = best test point with train accuracy >
0.6, side by side) and ``overparam.png`` (test accuracy against hidden
width, the paper's Figure 3). Finished restarts are skipped on re-runs.
"""

from __future__ import annotations

import collections
import os
import re
import time

from absl import app
from absl import flags
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import common
from experiments.configs import sparse_irm as configs
import jirm
from jirm.methods import masks as masks_lib
from jirm import results as results_lib
from jirm.methods import sparse
from jirm.methods import registry

# SPEC §7, ColoredMNIST 50000, hidden 64/160/256/390/512/640.
PUBLISHED = {
    ("cmnist", "irmv1"): {
        "irmv1": (59.80, 68.50, 66.09, 63.24, 61.86, 60.21),
        "mrm": (62.02, 68.33, 68.93, 69.22, 69.65, 69.32),
        "sparse_irm": (63.49, 69.95, 71.06, 72.48, 73.10, 73.61),
        "erm": (14.87, 20.16, 21.27, 22.44, 22.85, 22.57),
        "oracle": (72.62, 72.94, 73.00, 73.01, 74.17, 74.52)},
    ("cmnist", "vrex"): {
        "irmv1": (58.38, 68.75, 69.46, 68.84, 62.38, 59.11),
        "sparse_irm": (63.60, 69.78, 70.87, 71.09, 71.40, 71.84)},
    ("fullcmnist", "irmv1"): {
        "irmv1": (56.36, 63.36, 64.97, 60.62, 59.75, 57.51),
        "sparse_irm": (65.06, 67.30, 68.24, 68.88, 69.20, 69.47)},
}
PAPER_HIDDEN = (64, 160, 256, 390, 512, 640)
RULES = ("last", "oracle_train_gt60")
FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("methods", "irmv1,sparse_irm", "Comma list of "
                      f"{configs.METHODS}.")
  flags.DEFINE_string("dataset", "cmnist", "'cmnist' (Lin et al. "
                      "ColoredMNIST) or 'fullcmnist' (10 classes).")
  flags.DEFINE_integer("data_num", 50_000, "Training images (50000, 20000).")
  flags.DEFINE_string("penalty", "irmv1", "'irmv1' (env_scale) or 'vrex'.")
  flags.DEFINE_list("hidden", ["390"], "Hidden widths.")
  flags.DEFINE_string("preset", "paper", "'paper' or 'quick'.")
  flags.DEFINE_integer("restarts", 1, "Restarts (seeds seed..).")
  flags.DEFINE_integer("seed", 0, "First seed.")
  flags.DEFINE_string("output_dir", None, "Where results go.", required=True)
  flags.DEFINE_string("data_dir", None, "tfds data dir.")
  common.define_config_flag("sparse_irm")
  flags.DEFINE_bool("progress", True, "Show a progress bar.")
  flags.DEFINE_bool("report_only", False, "Only rewrite the reports.")
  flags.DEFINE_enum("ablation", "none", ["none", "probe", "flip"],
                    "Instead of training: 'probe' (colour probe on the "
                    "learned representation, Table 4) or 'flip' "
                    "(representation change under a colour flip, Figure 4), "
                    "on the weights saved by an earlier table run.")
  flags.DEFINE_enum("probe_layer", "hidden", ["hidden", "logit"], "What the "
                    "colour probe reads: the last hidden layer or the logit.")
  flags.DEFINE_list("params_dirs", [], "Output dirs of earlier table runs "
                    "holding params/ (default: --output_dir).")


def build_data(config, seed, data_dir=None, mnist=None):
  d = config.data
  oracle = config.method == "oracle"
  if d.dataset == "cmnist":
    return jirm.data.colored_mnist(
        seed, variant="lin", data_num=d.data_num, num_envs=d.num_envs,
        label_noise=d.label_noise, test_e=d.test_e, grayscale=oracle,
        val=d.val, data_dir=data_dir, mnist=mnist)
  cons = tuple(float(c) for c in d.cons.split(","))
  return jirm.data.full_colored_mnist(
      seed, data_num=d.data_num, train_cons=cons[:-1], test_cons=cons[-1],
      label_noise=d.fc_noise, grayscale=oracle, data_dir=data_dir,
      mnist=mnist)


def build_objective(config):
  """ERM / oracle / SparseERM: erm + l2; others add the penalty."""
  obj = jirm.erm * 1.0 + config.l2 * jirm.l2
  if config.method in ("erm", "oracle", "sparse_erm"):
    return obj
  name, options = config.penalty, configs.PENALTIES[config.penalty]
  sched = jirm.schedules.preset("lin", weight=config.penalty_weight,
                                anneal=config.anneal)
  return obj + sched * getattr(jirm.objectives, name)(**options)


def score_optimizer(config):
  """Adam on the scores; ``score_warmup > 0`` adds a linear learning-rate
  warm-up, which starts when the scores unfreeze (:func:`jirm.methods.sparse.make_step`
  keeps the optimizer state, and so the schedule's count, frozen before)."""
  lr = (optax.linear_schedule(0.0, config.score_lr, config.score_warmup)
        if config.score_warmup else config.score_lr)
  return optax.adam(lr)


def build_method(config, seed=0, data_dir=None, mnist=None):
  """Config -> :class:`experiments.common.Built`: the dense baselines (ERM,
  oracle, IRMv1: :func:`jirm.methods.from_objective`), the masked methods
  (SparseIRM, SparseERM: :func:`jirm.methods.sparse.sparse_method`) and MRM
  (:func:`jirm.methods.sparse.mrm_method`: dense, mask and retrain phases, trained
  for their summed steps), which :func:`run_restart` trains with
  :func:`jirm.fit`. The capability-matrix test builds them through it.

  Example:
    >>> built = build_method(configs.get_config("sparse_irm", "quick"))
    >>> res = jirm.fit(built.splits, built.method, seed=0, **built.fit_kw)
  """
  jirm.models.mlp(config.hidden_dim, config.depth)  # Sizes, before data.
  configs.weight_lr(config)  # The baseline choice, before data.
  splits = build_data(config, seed, data_dir, mnist)
  out = 10 if splits.task == "multiclass" else 1
  model = jirm.models.mlp(config.hidden_dim, config.depth, out=out)
  objective = build_objective(config)
  batch = config.batch_size or None
  steps = config.steps
  if config.method == "mrm":
    if batch is not None:
      raise ValueError(f"batch_size={config.batch_size}: MRM trains on the "
                       f"full batch; use --config.batch_size=0 (or the cmnist "
                       f"dataset).")
    m = config.mrm
    method = sparse.mrm_method(
        model, objective, dense_steps=m.dense_steps, mask_steps=m.mask_steps,
        sparsity=m.sparsity, lr=config.lr, mask_lr=config.score_lr,
        task=splits.task)
    steps = m.dense_steps + m.mask_steps + m.retrain_steps
  elif config.method in ("sparse_irm", "sparse_erm"):
    jirm.train.check_batch_size(batch, splits.train)
    steps_per_epoch = (1 if batch is None else
                       max(min(splits.train.sizes) // batch, 1))
    method = sparse.sparse_method(
        model, objective, steps=config.steps, keep_target=config.keep,
        task=splits.task, weight_opt=optax.adam(config.lr),
        score_opt=score_optimizer(config), score_start=config.score_start,
        budget_end=config.budget_end, batch_size=batch,
        steps_per_epoch=steps_per_epoch)
  else:
    jirm.train.check_batch_size(batch, splits.train)
    method = jirm.methods.from_objective(
        model, objective, optax.adam(configs.weight_lr(config)),
        task=splits.task, batch_size=batch)
  return common.Built(splits, method, objective.describe(),
                      dict(steps=steps, eval_every=config.eval_every),
                      _record_fields(config))


def _record_fields(config):
  return dict(hidden_dim=config.hidden_dim, penalty=config.penalty,
              dataset=config.data.dataset, data_num=config.data.data_num,
              weight_lr=configs.weight_lr(config))


def run_restart(config, seed, data_dir=None, progress=False, mnist=None,
                checkpoint_dir=None):
  t0 = time.time()
  desc = f"{config.method} h{config.hidden_dim} seed {seed}"
  common_kw = dict(progress=progress, desc=desc)
  b = build_method(config, seed, data_dir, mnist)
  res = common.fit_restart(b, config, seed, checkpoint_dir=checkpoint_dir,
                           **common_kw)
  if checkpoint_dir is not None:  # Final weights (and mask) for ablations.
    _save_params(checkpoint_dir, res.params)
  return records_of(res, config, seed, b, b.splits.info, time.time() - t0)


def records_of(res, config, seed, built, info, wall, **extra):
  """A trained restart's records, one per selection rule, with the final
  density (``run_restart`` and the sweep's vmap backend)."""
  density = (float(res.history["density"][-1])
             if config.method in ("sparse_irm", "sparse_erm", "mrm") else 1.0)
  return common.records_from_fit(res, config, seed, built.describe, info,
                                 wall, **built.record, density=density,
                                 **extra)


def _params_path(checkpoint_dir):
  out = os.path.dirname(os.path.dirname(os.path.abspath(checkpoint_dir)))
  return os.path.join(out, "params",
                      os.path.basename(checkpoint_dir) + ".msgpack")


def _save_params(checkpoint_dir, params):
  path = _params_path(checkpoint_dir)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(flax.serialization.msgpack_serialize(
        jax.tree.map(np.asarray, params)))
  os.replace(tmp, path)


def _names_then(name):
  """``name`` and the names the same restart was saved under before the
  method / penalty renames (``irm-paper-rex-...`` for
  ``irmv1-paper-vrex-...``)."""
  method, preset, penalty, rest = name.split("-", 3)
  olds = lambda n: (n,) + tuple(a for a, new in registry.ALIASES.items()
                                if new == n)
  return [f"{m}-{preset}-{p}-{rest}" for m in olds(method)
          for p in olds(penalty)]


def load_params(dirs, name):
  """Final parameters of restart ``name`` (e.g. ``'sparse_irm-paper-irmv1-
  640-cmnist-50000-seed0'``) saved by :func:`run` in one of ``dirs`` (as
  ``<name without seed>-<run key>-seed<s>``; one config per directory;
  files saved under a method's old name are found too)."""
  paths = [os.path.join(d, "params", name + ".msgpack") for d in dirs]
  keyed = []
  for n in _names_then(name):
    prefix, seed_part = n.rsplit("-", 1)
    keyed.append(re.compile(re.escape(prefix) + r"-[0-9a-f]{10}-" +
                            re.escape(seed_part) + r"\.msgpack$"))
  for d, path in zip(dirs, paths):
    pdir = os.path.dirname(path)
    found = [p for p in (os.path.join(pdir, n + ".msgpack")
                         for n in _names_then(name))
             if os.path.exists(p)]  # Saved before run keys.
    found += sorted(os.path.join(pdir, f) for f in (
        os.listdir(pdir) if os.path.isdir(pdir) else [])
                    if any(k.match(f) for k in keyed))
    if len(found) > 1:
      raise ValueError(f"{len(found)} configs of restart {name} in {pdir} "
                       f"({', '.join(map(os.path.basename, found))}); pass "
                       f"--params_dirs with one config's output directory.")
    if found:
      with open(found[0], "rb") as f:
        return flax.serialization.msgpack_restore(f.read())
  raise ValueError(f"no saved parameters {name}.msgpack in {paths}; run the "
                   f"table first (python -m experiments.sparse_irm "
                   f"--methods=... --hidden=... --output_dir=DIR) and pass "
                   f"--params_dirs=DIR.")


def representation(method, params, x, rng, layer="hidden"):
  """Penultimate (last hidden, post-ReLU) features of a trained MLP
  (``layer='hidden'``) or its output logits (``'logit'``); masked methods use
  one Bernoulli mask (SparseIRM) or their fixed mask (MRM)."""
  if "scores" in params:
    p = masks_lib.apply(params["params"],
                        masks_lib.bernoulli(params["scores"], rng))
  elif "mask" in params:
    p = masks_lib.apply(params["params"], params["mask"])
  else:
    p = params
  hidden = [k for k in p["params"] if k.startswith("hidden_")]
  model = jirm.models.MLP(
      hidden=tuple(p["params"][k]["kernel"].shape[1] for k in sorted(hidden)),
      out=p["params"]["head"]["kernel"].shape[1])
  logits, state = model.apply(p, x, capture_intermediates=True)
  del method
  if layer == "logit":
    return logits
  if layer != "hidden":
    raise ValueError(f"probe layer={layer!r}: use 'hidden' or 'logit'.")
  return jax.nn.relu(
      state["intermediates"][sorted(hidden)[-1]]["__call__"][0])


def _restart_name(method, preset, penalty, hidden, data_num, seed):
  return f"{method}-{preset}-{penalty}-{hidden}-cmnist-{data_num}-seed{seed}"


def _colour_split(seed, data_num, data_dir, mnist=None):
  """ColoredMNIST with the colour independent of the label (e = 0.5)."""
  splits = jirm.data.colored_mnist(
      seed, variant="lin", train_es=(0.5, 0.5), test_e=0.5,
      data_num=data_num, val="none", data_dir=data_dir, mnist=mnist)
  def pooled(envs):
    n = envs.sizes
    x = np.concatenate([envs.x[i, :k] for i, k in enumerate(n)])
    y = np.concatenate([envs.y[i, :k] for i, k in enumerate(n)])
    agree = np.concatenate([envs.agree[i, :k] for i, k in enumerate(n)])
    return x, np.where(agree, y, 1 - y)  # Colour channel index.
  return pooled(splits.train), pooled(splits.test)


def colour_probe(methods, hidden, output_dir, params_dirs, *, seed=0,
                 preset="paper", penalty="irmv1", data_num=50_000,
                 data_dir=None, probe_hidden=64, steps=500, mnist=None,
                 layer="hidden"):
  """SparseIRM Table 4: a 2-layer probe predicting the colour from each
  method's learned representation on a ColoredMNIST where colour and label
  are independent. Writes ``probe.md`` / ``probe.csv``."""
  (x_tr, c_tr), (x_te, c_te) = _colour_split(seed, data_num, data_dir,
                                             mnist)
  rows = []
  for m in methods:
    name = _restart_name(m, preset, penalty, hidden, data_num, seed)
    params = load_params(params_dirs, name)
    key = jax.random.key(seed)
    feats = lambda x: np.asarray(representation(m, params, jnp.asarray(x),
                                                key, layer))
    f_tr, f_te = feats(x_tr), feats(x_te)
    probe = jirm.models.mlp(probe_hidden, 1, 1)
    pp = probe.init(jax.random.key(1), jnp.asarray(f_tr[:1]))
    opt = optax.adam(1e-3)

    @jax.jit
    def step(pp, st, f, c):
      loss = lambda pp: optax.sigmoid_binary_cross_entropy(
          probe.apply(pp, f)[:, 0], c.astype(jnp.float32)).mean()
      g = jax.grad(loss)(pp)
      u, st = opt.update(g, st, pp)
      return optax.apply_updates(pp, u), st

    st = opt.init(pp)
    f_trj, c_trj = jnp.asarray(f_tr), jnp.asarray(c_tr)
    for _ in range(steps):
      pp, st = step(pp, st, f_trj, c_trj)
    acc = lambda f, c: float(((probe.apply(pp, jnp.asarray(f))[:, 0] > 0) ==
                              (c > 0)).mean())
    rows.append((m, acc(f_tr, c_tr), acc(f_te, c_te),
                 float((f_tr > 0).any(0).mean())))
  md = ["# Colour probe (SparseIRM Table 4)", "",
        f"2-layer probe (hidden {probe_hidden}, Adam 1e-3, {steps} full-batch "
        f"steps) predicting the colour channel from the {layer} layer of "
        f"each method's MLP (H={hidden}, {penalty}, seed {seed}) on "
        f"ColoredMNIST with e = 0.5 (colour independent of the label). "
        f"Chance = 50%. Paper (H=640): IRM 89.1 / 89.2, MRM 82.8 / 83.4, "
        f"SparseIRM 50.3 / 50.0.", "",
        "| method | probe train % | probe test % | active units |",
        "|---|---|---|---|"]
  md += [f"| {m} | {100 * a:.1f} | {100 * b:.1f} | {100 * u:.0f}% |"
         for m, a, b, u in rows]
  suffix = "" if layer == "hidden" else f"_{layer}"
  results_lib.atomic_write(os.path.join(output_dir, f"probe{suffix}.md"),
                           "\n".join(md) + "\n")
  results_lib.atomic_write(
      os.path.join(output_dir, f"probe{suffix}.csv"),
      "method,probe_train_acc,probe_test_acc,active_units\n" + "".join(
          f"{m},{a:.4f},{b:.4f},{u:.4f}\n" for m, a, b, u in rows))
  print("\n".join(md))
  return rows


def flip_heatmap(methods, hidden, output_dir, params_dirs, *, seed=0,
                 preset="paper", penalty="irmv1", data_num=50_000,
                 data_dir=None, num_images=40, mnist=None):
  """SparseIRM Figure 4: |h(x) - h(flip(x))| per hidden unit for test
  images, where flip swaps the two colour channels. Writes ``flip.png``."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  _, (x_te, _) = _colour_split(seed, data_num, data_dir, mnist)
  x = jnp.asarray(x_te[:num_images])
  diffs = []
  for m in methods:
    params = load_params(params_dirs, _restart_name(
        m, preset, penalty, hidden, data_num, seed))
    key = jax.random.key(seed)
    d = jnp.abs(representation(m, params, x, key) -
                representation(m, params, x[..., ::-1], key))
    diffs.append(np.asarray(d))
  vmax = max(float(d.max()) for d in diffs) or 1.0
  fig, axes = plt.subplots(len(methods), 1, figsize=(10, 2.6 * len(methods)),
                           squeeze=False, constrained_layout=True)
  for ax, m, d in zip(axes[:, 0], methods, diffs):
    im = ax.imshow(d, aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
    ax.set(title=f"{m}: mean |h(x) - h(flip x)| = {d.mean():.3f}",
           ylabel="image", xlabel="hidden unit")
  fig.colorbar(im, ax=axes[:, 0].tolist())
  results_lib.save_figure(fig, os.path.join(output_dir, "flip.png"), dpi=100)
  return {m: float(d.mean()) for m, d in zip(methods, diffs)}


def run(methods, hidden, restarts, seed, output_dir, *, preset="paper",
        penalty="irmv1", dataset="cmnist", data_num=50_000, data_dir=None,
        overrides=(), progress=True, mnist=None):
  configs_ = [common.apply_overrides(
      configs.get_config(m, preset, penalty, dataset, int(h), data_num),
      overrides) for h in hidden for m in methods]
  common.run_restarts(
      configs_, restarts, seed, output_dir,
      lambda c, s, ckpt: run_restart(c, s, data_dir, progress, mnist, ckpt),
      write_reports,
      key_fields=("method", "preset", "penalty", "hidden_dim",
                  "data.dataset", "data.data_num"))


def _cells(records):
  """(dataset, data_num, penalty) -> rule -> row -> hidden -> [test]; a row
  is the method and for the dense baselines their weight rate
  (:func:`_row_name`), so the two baselines never pool."""
  out = collections.defaultdict(lambda: collections.defaultdict(
      lambda: collections.defaultdict(lambda: collections.defaultdict(list))))
  for r in records:
    if r["selection"] in RULES:
      out[(r["dataset"], r["data_num"], r["penalty"])][r["selection"]][
          _row_name(r)][r["hidden_dim"]].append(100 * r["test_acc"])
  return out


def _weight_lr(record):
  """The rate a record's weights trained at (records from before
  ``baseline`` existed: their config's ``lr``)."""
  if "weight_lr" in record:
    return record["weight_lr"]
  c = record["config"]
  return c["score_lr"] if c.get("baseline") == "released" else c["lr"]


def _row_name(record):
  """The finding table's row: the method, and for the dense baselines the
  rate their weights trained at."""
  m = record["method"]
  if m not in configs.DENSE:
    return m
  lr = _weight_lr(record)
  route = {record["config"]["lr"]: "matched",
           record["config"]["score_lr"]: "released"}.get(lr, "")
  rate = f"{lr:.0e}".replace("e-0", "e-")  # 6e-4
  return f"{m} lr {rate}" + (f" ({route})" if route else "")


def bootstrap_ci(diffs, *, resamples: int = 10_000, seed: int = 0,
                 level: float = 0.95):
  """Percentile bootstrap interval of the mean of paired differences.

  Args:
    diffs: per-seed differences (e.g. SparseIRM - dense, same seed).
    resamples: bootstrap resamples (seeded, so the interval is a pure
      function of ``diffs``).
    seed: the resampling seed.
    level: the interval's coverage.

  Returns:
    (low, high); (nan, nan) for fewer than two differences.

  Example:
    >>> bootstrap_ci([1.0, 1.0, 1.0])
    (1.0, 1.0)
  """
  d = np.asarray(diffs, np.float64)
  if d.size < 2:
    return float("nan"), float("nan")
  idx = np.random.default_rng(seed).integers(0, d.size, (resamples, d.size))
  means = d[idx].mean(1)
  a = (1 - level) / 2
  return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def _mean_sd(v):
  v = np.asarray(v, np.float64)
  sd = v.std(ddof=1) if v.size > 1 else 0.0
  return f"{v.mean():.1f} ± {sd:.1f}"


def finding_table(records) -> str:
  """The SparseIRM-vs-baselines table of ``docs/sparse_irm.md``: restarts
  evaluated every epoch only (the paper's rule depends on the evaluation
  interval), one block per (dataset, data_num, penalty, width), rows =
  method and the dense baselines' weight rate; both selection rules with
  the selected steps; collapses (last-step test accuracy < 50%); paired
  per-seed differences SparseIRM - each dense IRMv1 baseline with a
  bootstrap 95% interval.

  Args:
    records: ``results.jsonl`` records (:func:`jirm.results.read_jsonl`).

  Returns:
    Markdown (empty when no record was evaluated every epoch).
  """
  runs = collections.defaultdict(dict)  # block -> (row, seed) -> rule -> r
  for r in records:
    spe = 1 if r["dataset"] == "cmnist" else None
    if r["selection"] not in RULES or r["config"]["eval_every"] != spe:
      continue
    block = (r["dataset"], r["data_num"], r["penalty"], r["hidden_dim"])
    runs[block].setdefault((_row_name(r), r["seed"]), {})[
        r["selection"]] = r
  md = []
  for block, by_run in sorted(runs.items()):
    ds, num, pen, h = block
    pub = PUBLISHED.get((ds, pen), {}) if num == 50_000 else {}
    rows = sorted({row for row, _ in by_run},
                  key=lambda n: (configs.METHODS.index(n.split()[0]), n))
    md += [f"### {ds} {num}, penalty {pen}, H={h}", "",
           "| row | n | paper's rule % | selected steps | last % | "
           "collapses | published |", "|---|---|---|---|---|---|---|"]
    test = {}
    for row in rows:
      rs = {s: v for (n, s), v in by_run.items() if n == row
            and all(rule in v for rule in RULES)}
      seeds = sorted(rs)
      test[row] = {rule: {s: 100 * rs[s][rule]["test_acc"] for s in seeds}
                   for rule in RULES}
      steps = [rs[s]["oracle_train_gt60"]["step"] for s in seeds]
      last = list(test[row]["last"].values())
      p = pub.get(row.split()[0])
      p = (f"{p[PAPER_HIDDEN.index(h)]:.2f}" if p and h in PAPER_HIDDEN
           else "–")
      md.append(
          f"| {row} | {len(seeds)} | "
          f"{_mean_sd(list(test[row]['oracle_train_gt60'].values()))} | "
          f"{', '.join(map(str, steps))} | {_mean_sd(last)} | "
          f"{sum(a < 50 for a in last)}/{len(last)} | {p} |")
    md.append("")
    dense = [row for row in rows if row.startswith("irmv1 ")]
    if "sparse_irm" in test and dense:
      md += ["| SparseIRM - baseline (paired by seed) | pairs | paper's "
             "rule: mean [95% CI] | last: mean [95% CI] |",
             "|---|---|---|---|"]
      for row in dense:
        cells = []
        for rule in ("oracle_train_gt60", "last"):
          a, b = test["sparse_irm"][rule], test[row][rule]
          d = [a[s] - b[s] for s in sorted(set(a) & set(b))]
          lo, hi = bootstrap_ci(d)
          cells.append(f"{np.mean(d):+.1f} [{lo:+.1f}, {hi:+.1f}]"
                       if len(d) > 1 else
                       (f"{d[0]:+.1f}" if d else "–"))
        n = len(set(test["sparse_irm"]["last"]) & set(test[row]["last"]))
        md.append(f"| {row} | {n} | {cells[0]} | {cells[1]} |")
      md.append("")
  if not md:
    return ""
  return "\n".join(
      ["## SparseIRM against its dense baselines (evaluated every epoch)", "",
       "Test accuracy %, mean ± sample sd over seeds; paper's rule = "
       "`oracle_train_gt60` (best test point with train accuracy > 0.6; uses "
       "test data), its selected steps per seed; last = the final "
       "step; a collapse is a last-step test "
       "accuracy below 50%; CI = percentile bootstrap of the mean paired "
       "difference (10,000 resamples, seed 0). `matched`: weights at the "
       "sparse run's weight rate; `released`: all weights at 6e-3, the "
       "released code's dense route.", ""] + md)


def write_reports(output_dir):
  records = results_lib.read_jsonl(os.path.join(output_dir, "results.jsonl"))
  if not records:
    return
  md, csv = ["# SparseIRM study (MLP)", ""], [
      "dataset,data_num,penalty,selection,method,hidden,n,mean,std,published"]
  cells = _cells(records)
  for (ds, num, pen), by_rule in sorted(cells.items()):
    pub = PUBLISHED.get((ds, pen), {}) if num == 50_000 else {}
    hidden = sorted({h for rule in by_rule.values() for m in rule.values()
                     for h in m})
    md += [f"## {ds} {num}, penalty {pen} — test accuracy %, mean ± std "
           f"(n restarts); `last` | `oracle_train_gt60` (paper's rule, "
           f"optimistic) | published", "",
           "| method | " + " | ".join(f"H={h}" for h in hidden) + " |",
           "|---|" + "---|" * len(hidden)]
    methods = sorted({m for rule in by_rule.values() for m in rule
                      if any(rule[m].values())},
                     key=lambda n: (configs.METHODS.index(n.split()[0]), n))
    for m in methods:
      row = []
      for h in hidden:
        parts = []
        for rule in RULES:
          v = by_rule[rule].get(m, {}).get(h, [])
          parts.append(f"{np.mean(v):.1f} ± {np.std(v):.1f} ({len(v)})"
                       if v else "–")
          if v:
            p = pub.get(m.split()[0], ())
            p = p[PAPER_HIDDEN.index(h)] if h in PAPER_HIDDEN and p else ""
            csv.append(f"{ds},{num},{pen},{rule},{m},{h},{len(v)},"
                       f"{np.mean(v):.2f},{np.std(v):.2f},{p}")
        p = pub.get(m.split()[0])
        parts.append(f"{p[PAPER_HIDDEN.index(h)]:.1f}"
                     if p and h in PAPER_HIDDEN else "–")
        row.append(" \\| ".join(parts))
      md.append(f"| {m} | " + " | ".join(row) + " |")
    md.append("")
  every = collections.defaultdict(set)
  for r in records:
    every[r["config"]["eval_every"]].add(f"{r['method']} H={r['hidden_dim']}")
  where = "; ".join(f"every {k} step(s): {', '.join(sorted(v))}"
                    for k, v in sorted(every.items()))
  md += ["Selection rules: `last` = final step; `oracle_train_gt60` = best "
         "test accuracy among evaluation points with mean train accuracy > "
         "0.6 (SparseIRM's reported rule; uses test data). Evaluation "
         f"points: {where}.",
         "Each line of results.jsonl holds the full config, seed, density "
         "and wall time.", ""]
  results_lib.atomic_write(os.path.join(output_dir, "summary.md"),
                           "\n".join(md))
  finding = finding_table(records)
  if finding:
    results_lib.atomic_write(os.path.join(output_dir, "finding.md"),
                             finding + "\n")
  results_lib.atomic_write(os.path.join(output_dir, "summary.csv"),
                           "\n".join(csv) + "\n")
  _plot_overparam(cells, os.path.join(output_dir, "overparam.png"))
  _plot_curves(records, os.path.join(output_dir, "curves.png"))


def _plot_overparam(cells, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  keys = sorted(cells)
  fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4),
                           squeeze=False)
  for ax, key in zip(axes[0], keys):
    pub = PUBLISHED.get((key[0], key[2]), {}) if key[1] == 50_000 else {}
    drawn = set()
    for m, by_h in sorted(cells[key]["last"].items()):
      hs = sorted(by_h)
      mean = [np.mean(by_h[h]) for h in hs]
      std = [np.std(by_h[h]) for h in hs]
      line = ax.errorbar(hs, mean, yerr=std, marker="o", capsize=3,
                         label=f"{m} (ours, last)")
      paper = m.split()[0]
      if paper in pub and paper not in drawn:
        drawn.add(paper)
        ax.plot(PAPER_HIDDEN, pub[paper], ls="--", color=line[0].get_color(),
                alpha=0.6, label=f"{paper} (paper)")
    ax.set(xlabel="hidden width", ylabel="test accuracy % (last step)",
           title=f"{key[0]} {key[1]}, {key[2]}")
    ax.legend(fontsize=7)
  fig.tight_layout()
  results_lib.save_figure(fig, path, dpi=100)


def _plot_curves(records, path):
  """Test accuracy over training, one panel per (dataset, penalty, width),
  one line per restart; markers at the penalty onset and score unfreezing."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  runs = collections.defaultdict(list)
  for r in records:
    if r["selection"] == "last" and "curve" in r:
      runs[(r["dataset"], r["penalty"], r["hidden_dim"])].append(r)
  if not runs:
    return
  fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4),
                           squeeze=False)
  colours = {}
  for ax, (key, rs) in zip(axes[0], sorted(runs.items())):
    for r in sorted(rs, key=lambda r: (r["method"], r["seed"])):
      c = colours.setdefault(r["method"], f"C{len(colours)}")
      ax.plot(r["curve"]["step"], 100 * np.asarray(r["curve"]["test_acc"]),
              color=c, lw=0.8, alpha=0.8, label=f"{r['method']} s{r['seed']}")
    cfg = rs[0]["config"]
    ax.axvline(cfg["anneal"], color="k", ls=":", lw=0.8)
    ax.axvline(cfg["score_start"] * cfg["steps"], color="k", ls="--", lw=0.8)
    ax.set(xlabel="step (dotted: penalty on; dashed: scores unfreeze)",
           ylabel="test accuracy %", title=f"{key[0]} {key[1]} H={key[2]}")
    ax.legend(fontsize=6, ncol=2)
  fig.tight_layout()
  results_lib.save_figure(fig, path, dpi=100)


def main(argv):
  del argv
  choice = common.exit_on_bad_input(common.config_choice, FLAGS,
                                    method_flag="methods")
  c = common.exit_on_bad_input(configs.get_config, "erm", choice.preset,
                               FLAGS.penalty, FLAGS.dataset,
                               data_num=FLAGS.data_num)
  common.exit_on_bad_input(common.check_preset_flags, FLAGS, choice.preset,
                           {"data_num": c.data.data_num})
  if common.start(FLAGS, write_reports):
    return
  methods = common.method_list(choice.method, configs.METHODS)
  penalty = registry.canonical(FLAGS.penalty)
  if FLAGS.ablation != "none":
    fn = colour_probe if FLAGS.ablation == "probe" else flip_heatmap
    extra = dict(layer=FLAGS.probe_layer) if FLAGS.ablation == "probe" else {}
    common.exit_on_bad_input(
        fn, methods, int(FLAGS.hidden[0]), FLAGS.output_dir,
        FLAGS.params_dirs or [FLAGS.output_dir], seed=FLAGS.seed,
        preset=choice.preset, penalty=penalty, data_num=FLAGS.data_num,
        data_dir=FLAGS.data_dir, **extra)
    return
  common.exit_on_bad_input(
      run, methods, FLAGS.hidden, FLAGS.restarts, FLAGS.seed,
      FLAGS.output_dir, preset=choice.preset, penalty=penalty,
      dataset=FLAGS.dataset, data_num=FLAGS.data_num,
      data_dir=FLAGS.data_dir, overrides=choice.overrides,
      progress=FLAGS.progress)

if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=common.parse_flags)
