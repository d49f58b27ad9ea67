r"""IRM-TV study: IRM-TV-l1, Minimax-TV (inferred environments), ZIN and
OOD-TV (learned penalty weight) on ZIN's synthetic data.

  python -m experiments.irm_tv --method=all --preset=paper --restarts=10 \
      --output_dir=/tmp/irm_tv
  python -m experiments.irm_tv --method=irmv1,irm_tv_l1 --preset=paper \
      --weights=10,100,1000,10000,100000 --restarts=10 --output_dir=/tmp/irm_tv

Writes to ``--output_dir``: ``results.jsonl`` (one line per restart and
selection rule with the config, seed, mean and worst test-env accuracy and
wall time), ``summary.md`` / ``summary.csv`` (mean ± std per method; `last`,
`train_domain_val`, and the test-selected `oracle` / `oracle_worst` rules of
the published numbers, side by side), ``curves.png`` (mean and worst test
accuracy over training), ``lambda.png`` (OOD-TV's learned lambda and the
effective penalty weight over training; the inferred environments' gap) and,
with ``--weights``, ``weights.png`` (mean and worst accuracy against the
penalty weight). Finished restarts are skipped on a re-run. Presets and
flags: ``experiments/configs/irm_tv.py``.
"""

from __future__ import annotations

import collections
import os
import time

from absl import app
from absl import flags
import numpy as np

from experiments import common
from experiments.configs import irm_tv as configs
import jirm
from jirm.methods import irm_tv
from jirm import results as results_lib

METHODS_ALL = tuple(configs.METHODS)
PUBLISHED = {  # OOD-TV-IRM paper, mean / worst (best test value over training)
    "irmv1": (0.8670, 0.8559),
    "irm_tv_l1": (0.8713, 0.8618),
    "ood_tv_irm_l1": (0.8944, 0.8877),
    "zin": (0.7916, 0.7338),
    "minimax_tv_l1": (0.7555, 0.6931),
    "ood_tv_minimax_l2": (0.8916, 0.8858),
}
RULES = ("last", "train_domain_val", "oracle", "oracle_worst")
KEY_FIELDS = ("method", "preset", "penalty_weight", "data.train_cons")

FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags (defined only when run as a program)."""
  flags.DEFINE_string("method", "all", "Method, comma list, or 'all' "
                      f"({', '.join(METHODS_ALL)}).")
  flags.DEFINE_string("preset", "paper", f"One of {configs.PRESETS}.")
  flags.DEFINE_integer("restarts", 10, "Restarts (seeds seed..).")
  flags.DEFINE_integer("seed", 0, "First seed.")
  flags.DEFINE_string("output_dir", None, "Where results go.", required=True)
  common.define_config_flag("irm_tv")
  flags.DEFINE_list("weights", [], "Penalty weights for the weight sweep "
                    "(fixed-lambda penalty methods only); empty = the "
                    "config's weight.")
  flags.DEFINE_bool("report_only", False, "Only rewrite the reports.")


def _tv_method(config) -> irm_tv.TVMethod:
  """Config -> :func:`jirm.methods.irm_tv.tv_method` (keyword arguments only)."""
  return irm_tv.tv_method(
      penalty=None if config.penalty == "none" else config.penalty,
      envs=config.envs, weight=config.penalty_weight, anneal=config.anneal,
      l2=config.l2, lr=config.lr, learned_lambda=config.learned_lambda,
      ood_c=config.ood_c, ood_hidden=config.ood_hidden, ood_lr=config.ood_lr,
      ood_power=config.ood_power, infer_hidden=config.infer_hidden,
      infer_lr=config.infer_lr, infer_update=config.infer_update)


def build_splits(config, seed):
  d = config.data
  return jirm.data.zin_synthetic(
      seed, train_cons=d.train_cons, test_cons=d.test_cons, noise=d.noise,
      dim_inv=d.dim_inv, dim_spu=d.dim_spu, num_train=d.num_train,
      num_test=d.num_test, num_val=d.num_val, oracle=d.oracle)


_METHOD_CACHE = {}


def build_method(config, seed=0) -> common.Built:
  """Config -> :class:`experiments.common.Built`: restart ``seed``'s
  synthetic environments and the :func:`jirm.methods.irm_tv.tv_method` (cached per
  config, so restarts reuse the compiled scan run), trained by
  :func:`jirm.fit`'s scan runner and selected by :func:`jirm.methods.irm_tv.select`
  (adds the worst test environment and the ``oracle_worst`` rule). The
  capability-matrix test builds every method through it.

  Example:
    >>> built = build_method(configs.get_config("zin", "quick"))
    >>> res = jirm.fit(built.splits, built.method, seed=0, **built.fit_kw)
  """
  key = config.to_json()
  if key not in _METHOD_CACHE:
    _METHOD_CACHE[key] = _tv_method(config)
  method = _METHOD_CACHE[key]
  return common.Built(
      build_splits(config, seed), method, method.describe,
      dict(steps=config.steps, eval_every=config.eval_every, runner="scan"),
      dict(penalty_weight=config.penalty_weight,
           train_cons=config.data.train_cons), irm_tv.select)


def run_restart(config, seed, checkpoint_dir=None):
  """One restart (a few seconds: no checkpoint needed); one record per rule.

  Methods are cached per config so that restarts reuse the compiled run.
  """
  del checkpoint_dir
  t0 = time.time()
  b = build_method(config, seed)
  res = common.fit_restart(b, config, seed)
  return records_of(res, config, seed, b, b.splits.info, time.time() - t0)


def records_of(res, config, seed, built, info, wall, **extra):
  """A trained restart's records, one per selection rule, with its curve
  (penalty, weight, lambda) on ``last`` (``run_restart`` and the sweep's
  vmap backend)."""
  h = res.history
  short = lambda v: [float(f"{x:.5g}") for x in np.asarray(v, float)]
  curve = dict(step=h["step"].tolist(),
               train_acc=short(h["train_acc_E"].mean(1)),
               test_acc=short(h["test_acc_E"].mean(1)),
               test_worst=short(h["test_acc_E"].min(1)))
  for name in ("penalty", "weight", "lam", "rho_gap"):
    if name in h:
      curve[name] = short(h[name])
  records = []
  for rule, sel in res.selections.items():
    rec = dict(method=config.method, preset=config.preset, seed=seed,
               selection=rule, **built.record, objective=built.describe,
               data=info, config=config.to_dict(), wall_s=wall,
               train_wall_s=res.wall_s, **extra, **sel)
    if rule == "last" and not config.sweep:  # Sweeps: final numbers only.
      rec["curve"] = curve
    records.append(rec)
  return records


def configs_for(methods, preset, overrides=(), weights=()):
  """One config per method (per weight for fixed-lambda penalty methods
  when ``weights`` is given)."""
  out = []
  for m in methods:
    c = common.apply_overrides(configs.get_config(m, preset), overrides)
    if weights and c.penalty != "none" and not c.learned_lambda:
      for w in weights:
        cw = c.copy_and_resolve_references()
        cw.penalty_weight = float(w)
        cw.sweep = True
        out.append(cw)
    elif not weights:
      out.append(c)
  return out


def run(methods, preset, restarts, seed, output_dir, overrides=(),
        weights=()):
  """Runs every (config, seed) not yet in ``output_dir/results.jsonl``."""
  cs = configs_for(methods, preset, overrides, weights)
  if not cs:
    raise ValueError(f"--weights applies to fixed-lambda penalty methods; "
                     f"none among {list(methods)}.")
  common.run_restarts(cs, restarts, seed, output_dir, run_restart,
                      write_reports, key_fields=KEY_FIELDS)


def _ms(values):
  v = 100 * np.asarray(values, float)
  return f"{v.mean():.1f} ± {v.std():.1f}"


def _groups(records):
  groups = collections.OrderedDict()
  for r in records:
    key = (r["method"], r["preset"], r["train_cons"], r["penalty_weight"])
    groups.setdefault(key, {}).setdefault(r["selection"], []).append(r)
  return groups


def summary(records) -> tuple[str, str]:
  """(markdown, csv) of mean ± std per method and selection rule."""
  head = ["method", "preset", "train p", "lambda", "restarts"]
  for rule in RULES:
    head += [f"{rule} mean", f"{rule} worst"]
  head += ["published mean / worst (test-selected)", "wall s / restart"]
  lines = ["# IRM-TV study: ZIN synthetic data (mean / worst test-env "
           "accuracy %)", "", "| " + " | ".join(head) + " |",
           "|" + "---|" * len(head)]
  csv = [",".join(h.replace(",", ";") for h in head)]
  for (method, preset, cons, weight), by_rule in _groups(records).items():
    rs = by_rule["last"]
    learned = rs[0]["config"].get("learned_lambda", False)
    lam = ("learned" if learned else "–" if rs[0]["config"]["penalty"] ==
           "none" else f"{weight:g}")
    row = [method, preset, cons, lam, str(len(rs))]
    for rule in RULES:
      sel = by_rule.get(rule, [])
      row += ([_ms([r["test_acc"] for r in sel]),
               _ms([r["test_worst"] for r in sel])] if sel else ["–", "–"])
    pub = PUBLISHED.get(method)
    row.append(f"{100 * pub[0]:.1f} / {100 * pub[1]:.1f}" if pub else "")
    row.append(f"{np.mean([r['wall_s'] for r in rs]):.1f}")
    lines.append("| " + " | ".join(row) + " |")
    csv.append(",".join(x.replace(",", ";") for x in row))
  lines += ["", "`last`: final step. `train_domain_val`: best accuracy on "
            "fresh samples of the training envs. `oracle`: best mean test "
            "accuracy over training (worst env at that step); "
            "`oracle_worst`: best worst-env accuracy over training (the "
            "OOD-TV release records both test-selected values "
            "independently; optimistic). Mean ± std (population) over "
            "restarts; every record in results.jsonl holds its config."]
  return "\n".join(lines) + "\n", "\n".join(csv) + "\n"


def plots(records, output_dir):
  """curves.png, lambda.png and (with a weight sweep) weights.png."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  groups = _groups(records)
  main = [(k, v) for k, v in groups.items()
          if not v["last"][0]["config"].get("sweep", False) and
          "curve" in v["last"][0]]
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
  for i, ((method, preset, cons, _), by_rule) in enumerate(main):
    curves = [r["curve"] for r in by_rule["last"]]
    n = min(len(c["step"]) for c in curves)
    step = np.asarray(curves[0]["step"][:n])
    for ax, key in zip(axes, ("test_acc", "test_worst")):
      ax.plot(step, 100 * np.mean([c[key][:n] for c in curves], 0),
              color=f"C{i % 10}", label=f"{method} ({preset}, p={cons})")
  for ax, title in zip(axes, ("mean test accuracy", "worst test env")):
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("accuracy (%)")
  axes[1].legend(fontsize=6)
  fig.tight_layout()
  results_lib.save_figure(fig, os.path.join(output_dir, "curves.png"))

  learned = [(k, v) for k, v in main if "lam" in v["last"][0]["curve"]]
  inferred = [(k, v) for k, v in main if "rho_gap" in v["last"][0]["curve"]]
  if learned or inferred:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, ((method, preset, cons, _), by_rule) in enumerate(learned):
      curves = [r["curve"] for r in by_rule["last"]]
      step = np.asarray(curves[0]["step"])
      for c in curves:
        axes[0].plot(step, c["lam"], color=f"C{i % 10}", alpha=0.25, lw=0.8)
        axes[1].plot(step, c["weight"], color=f"C{i % 10}", alpha=0.25,
                     lw=0.8)
      axes[0].plot(step, np.mean([c["lam"] for c in curves], 0),
                   color=f"C{i % 10}", label=f"{method} ({preset})")
      axes[1].plot(step, np.mean([c["weight"] for c in curves], 0),
                   color=f"C{i % 10}")
    for i, ((method, preset, cons, _), by_rule) in enumerate(inferred):
      curves = [r["curve"] for r in by_rule["last"]]
      step = np.asarray(curves[0]["step"])
      axes[2].plot(step, np.mean([c["rho_gap"] for c in curves], 0),
                   color=f"C{i % 10}", label=f"{method} ({preset})")
    axes[0].set_title("OOD-TV learned lambda (thin: restarts)")
    axes[1].set_title("effective penalty weight c * lambda")
    axes[2].set_title("inferred envs: |mean rho(env0) - mean rho(env1)|")
    for ax in axes:
      ax.set_xlabel("step")
      ax.grid(alpha=0.3)
      if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    results_lib.save_figure(fig, os.path.join(output_dir, "lambda.png"))

  sweeps = collections.defaultdict(list)
  for (method, preset, cons, weight), by_rule in groups.items():
    cfg = by_rule["last"][0]["config"]
    if cfg["penalty"] != "none" and not cfg["learned_lambda"]:
      sweeps[(method, preset, cons)].append((weight, by_rule["last"]))
  sweeps = {k: sorted(v) for k, v in sweeps.items() if len(v) > 1}
  if sweeps:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for i, ((method, preset, cons), pts) in enumerate(sweeps.items()):
      w = [p[0] for p in pts]
      for ax, key in zip(axes, ("test_acc", "test_worst")):
        m = [100 * np.mean([r[key] for r in p[1]]) for p in pts]
        s = [100 * np.std([r[key] for r in p[1]]) for p in pts]
        ax.errorbar(w, m, yerr=s, marker="o", capsize=3, color=f"C{i % 10}",
                    label=f"{method} ({preset}, p={cons})")
    for ax, title in zip(axes, ("mean test accuracy (last)",
                                "worst test env (last)")):
      ax.set_xscale("log")
      ax.set_xlabel("penalty weight lambda")
      ax.set_title(title)
      ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    results_lib.save_figure(fig, os.path.join(output_dir, "weights.png"))


def write_reports(output_dir):
  records = results_lib.read_jsonl(os.path.join(output_dir, "results.jsonl"))
  if not records:
    return
  md, csv = summary(records)
  results_lib.atomic_write(os.path.join(output_dir, "summary.md"), md)
  results_lib.atomic_write(os.path.join(output_dir, "summary.csv"), csv)
  plots(records, output_dir)


def main(argv):
  del argv
  if common.start(FLAGS, write_reports):
    return
  choice = common.exit_on_bad_input(common.config_choice, FLAGS)
  methods = common.method_list(choice.method, METHODS_ALL)
  common.exit_on_bad_input(run, methods, choice.preset, FLAGS.restarts,
                           FLAGS.seed, FLAGS.output_dir, choice.overrides,
                           tuple(float(w) for w in FLAGS.weights))


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=common.parse_flags)
