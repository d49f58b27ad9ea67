r"""Hyperparameter sweeps and random searches for any experiment.

  # 8 restarts x 4 penalty weights of IRMv1, one compiled program:
  python -m experiments.sweep --experiment=colored_mnist --method=irmv1 \
      --grid=penalty_weight=100,1000,10000,91257.19 --restarts=8 \
      --backend=vmap --output_dir=/tmp/sweep
  # DomainBed-style random search (20 points x 3 restarts) on a Ray cluster:
  python -m experiments.sweep --experiment=colored_mnist --method=vrex \
      --search=random --n_hparams=20 --restarts=3 --backend=ray \
      --ray_address=auto --output_dir=/shared/sweep
  # Slurm array job (writes slurm/sweep.sbatch, submits with --submit):
  python -m experiments.sweep ... --backend=slurm --submit
  # Tables only:
  python -m experiments.sweep --collect_only --output_dir=/tmp/sweep

Each trial (method, hyperparameter point, seed) lives in
``output_dir/trials/<id>/`` with its ``trial.json``, ``result.jsonl`` (one
record per selection rule, with config, seed, hparams and wall time; written
atomically, the completion marker) and, while running, its orbax
checkpoints. Re-running the command skips finished trials and resumes
unfinished ones. ``summary.md`` / ``summary.csv`` tabulate test accuracy per
hyperparameter point and selection rule (``last``, ``train_domain_val``,
``oracle``), and the point each rule selects.

Backends: ``vmap`` (:func:`jirm.sweep.fit_sweep`: ColoredMNIST's
stateless methods with all trials of one structure in one program, the
traceable hyperparameters traced; every other method of every experiment
with the restarts of each hyperparameter point in one program), ``local`` (one
trial after another), ``ray`` (local instance with ``--workers`` CPUs, or
``--ray_address``), ``slurm``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import json
import os
import shlex
import sys
import time

import numpy as np

from absl import app
from absl import flags
from ml_collections import config_flags

from experiments import common
from experiments import hparams_registry
from jirm import launch
from jirm import results as results_lib
from jirm import train as train_lib

EXPERIMENTS = ("colored_mnist", "irm_tv", "sparse_irm", "cifar_mnist")
RULES = ("last", "train_domain_val", "oracle")
FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_enum("experiment", "colored_mnist", EXPERIMENTS, "Experiment "
                    "(or the one whose experiments/configs file --config "
                    "names).")
  flags.DEFINE_string("method", "irmv1", "Method (comma list allowed).")
  flags.DEFINE_string("preset", "paper", "The experiment's config preset.")
  flags.DEFINE_enum("search", "grid", ["grid", "random"], "grid: --grid "
                    "values (default: the preset's flags); random: "
                    "--n_hparams seeded points of the registry's space.")
  flags.DEFINE_multi_string("grid", [], "key=v1,v2,... (product over keys).")
  flags.DEFINE_integer("n_hparams", 10, "Random points (hparams seed 0 is "
                       "the defaults).")
  flags.DEFINE_integer("hparams_seed", 0, "First hyperparameter seed.")
  flags.DEFINE_integer("restarts", 3, "Restarts per point (seeds seed..).")
  flags.DEFINE_integer("seed", 0, "First seed.")
  common.define_config_flag(None)
  flags.DEFINE_enum("backend", "vmap", ["vmap", "local", "ray", "slurm"],
                    "Execution backend.")
  flags.DEFINE_integer("trials_per_call", 0, "vmap: trials per program "
                       "(0 = all; lower it to bound memory).")
  flags.DEFINE_string("ray_address", None, "Ray cluster address (else a "
                      "local instance).")
  flags.DEFINE_integer("workers", 2, "Ray: CPUs of the local instance.")
  flags.DEFINE_multi_string("sbatch", [], "Slurm: extra #SBATCH options.")
  flags.DEFINE_bool("submit", False, "Slurm: run sbatch on the script.")
  flags.DEFINE_integer("run_trial", -1, "Internal (Slurm array element): run "
                       "trial i of output_dir/trials.json.")
  flags.DEFINE_bool("collect_only", False, "Only rebuild the tables.")
  flags.DEFINE_string("output_dir", None, "Sweep directory.", required=True)
  flags.DEFINE_string("data_dir", None, "tfds data dir.")
  flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize "
                    "first (multi-host TPU/GPU).")


def experiment_of(flag_values) -> str:
  """The experiment a sweep runs: ``--experiment``, or the one whose
  ``experiments/configs`` file ``--config`` names (both given must agree).

  Example:
    ``--config=experiments/configs/cifar_mnist.py --config.epochs=2`` sweeps
    ``cifar_mnist``.
  """
  given = flag_values["experiment"]
  if flag_values["config"].value is None:
    return given.value
  path = config_flags.get_config_filename(flag_values["config"])
  name = os.path.splitext(os.path.basename(path))[0]
  if name not in EXPERIMENTS or \
      os.path.realpath(path) != os.path.realpath(common.config_file(name)):
    raise ValueError(f"--config={path}: a sweep takes one of the experiments' "
                     f"config files, experiments/configs/"
                     f"{{{','.join(EXPERIMENTS)}}}.py.")
  if given.present and given.value != name:
    raise ValueError(f"--experiment={given.value} and --config={path} name "
                     f"different experiments; give one of them.")
  return name


def _module(experiment):
  return importlib.import_module(f"experiments.{experiment}")


def base_config(experiment, method, preset, overrides=()):
  cfg = importlib.import_module(f"experiments.configs.{experiment}")
  return common.apply_overrides(cfg.get_config(method, preset), overrides)


def make_trials(experiment, methods, preset, search, grid=(), n_hparams=10,
                hparams_seed=0, restarts=3, seed=0, overrides=(),
                data_dir=None):
  """The sweep's trials (JSON-able dicts with a stable ``id``)."""
  import itertools  # pylint: disable=g-import-not-at-top
  out = []
  for method in methods:
    config = base_config(experiment, method, preset, overrides)
    if search == "grid":
      axes = {k: [float(v) for v in vals]
              for k, vals in common.parse_grid(grid).items()}
      for k in axes:
        if k not in config:
          raise ValueError(f"--grid key {k!r} is not in the {experiment} "
                           f"config; keys are {sorted(config.keys())}.")
      points = [dict(zip(axes, p)) for p in itertools.product(*axes.values())]
      points = [{k: common.cast_like(config[k], v, f"--grid={k}={v:g}")
                 for k, v in p.items()} for p in points]
    else:
      points = [hparams_registry.random_hparams(config, hs) for hs in
                range(hparams_seed, hparams_seed + n_hparams)]
    for hp in points:
      key = json.dumps(hp, sort_keys=True)
      hid = hashlib.sha256(f"{key}|{sorted(overrides)}".encode()).hexdigest()[:8]
      for s in range(seed, seed + restarts):
        out.append(dict(id=f"{method}-{preset}-{hid}-seed{s}",
                        experiment=experiment, method=method, preset=preset,
                        hparams=hp, hparams_id=hid, seed=s,
                        overrides=list(overrides), data_dir=data_dir))
  return out


def _config_of(trial):
  return base_config(trial["experiment"], trial["method"], trial["preset"],
                     list(trial["overrides"]) +
                     [f"{k}={v}" for k, v in trial["hparams"].items()])


def _tag(records, trial):
  for r in records:
    r.update(hparams=trial["hparams"], hparams_id=trial["hparams_id"],
             trial=trial["id"])
  return records


def _data_kwargs(fn, trial, mnist=None) -> dict:
  """The data arguments that an experiment's ``fn`` (``run_restart`` or
  ``build_method``) takes: the trial's ``data_dir``, and ``mnist``
  (in-memory digits for tests) when given."""
  params = inspect.signature(fn).parameters
  kw = {}
  if "data_dir" in params:
    kw["data_dir"] = trial.get("data_dir")
  if mnist is not None and "mnist" in params:
    kw["mnist"] = mnist
  return kw


def run_trial(work_dir, trial, mnist=None):
  """Runs one trial with its experiment's ``run_restart`` (resuming from
  the trial's checkpoints) and writes its records. The trial function of
  the local, Ray and Slurm backends (``mnist``: in-memory digits for
  tests)."""
  if launch.is_done(work_dir, trial):
    return trial["id"]
  holder = launch.claim(work_dir, trial)
  if holder is not None:  # Another process runs it; it writes its result.
    print(f"skip trial {trial['id']}: process {holder} is running it.",
          flush=True)
    return None
  try:
    if launch.is_done(work_dir, trial):  # Finished while we waited.
      return trial["id"]
    launch.log_attempt(work_dir, trial)
    d = launch.trial_dir(work_dir, trial)
    results_lib.atomic_write(os.path.join(d, "trial.json"),
                             json.dumps(trial, indent=1))
    mod = _module(trial["experiment"])
    kw = dict(checkpoint_dir=os.path.join(d, "checkpoints"),
              **_data_kwargs(mod.run_restart, trial, mnist))
    config = _config_of(trial)
    try:
      records = mod.run_restart(config, trial["seed"], **kw)
    except train_lib.DivergenceError as e:  # Recorded; the sweep goes on.
      records = [common.diverged_record(config, trial["seed"], str(e))]
    launch.write_result(work_dir, trial, _tag(records, trial))
  finally:
    launch.release(work_dir, trial)
  return trial["id"]


def run_vmap(work_dir, trials, trials_per_call=None, mnist=None,
             progress=True):
  """Runs the pending trials as vmapped programs (:func:`jirm.sweep.
  fit_sweep`), writing each trial's records as soon as its chunk is done.

  ColoredMNIST's stateless registry methods: every group of trials sharing
  the structural settings (method, anneal, width, steps) in one program,
  the traceable hyperparameters (:data:`hparams_registry.TRACEABLE`)
  traced. Every other method of every experiment (ColoredMNIST's games,
  IPG, BayesianIRM; CIFAR-MNIST, SparseIRM / MRM, IRM-TV): the restarts of
  each hyperparameter point in one program (:func:`_vmap_seeds`).
  """
  import jirm  # pylint: disable=g-import-not-at-top
  mine = []  # The pending trials this process claimed (the rest: another's).
  for t in launch.pending(work_dir, trials):
    holder = launch.claim(work_dir, t)
    if holder is None:
      mine.append(t)
    else:
      print(f"skip trial {t['id']}: process {holder} is running it.",
            flush=True)
  try:
    _run_vmap_claimed(work_dir, mine, trials_per_call, mnist, progress, jirm)
  finally:
    for t in mine:
      launch.release(work_dir, t)


def _run_vmap_claimed(work_dir, mine, trials_per_call, mnist, progress, jirm):
  """:func:`run_vmap` over the trials this process holds the locks of."""
  traced, per_point = {}, {}
  for t in launch.pending(work_dir, mine):
    if t["experiment"] == "colored_mnist" and (
        t["method"] in jirm.methods.METHODS):
      structural = {k: v for k, v in t["hparams"].items()
                    if k not in hparams_registry.TRACEABLE}
      key = json.dumps([t["method"], t["preset"], t["overrides"],
                        structural], sort_keys=True)
      traced.setdefault(key, []).append(t)
    else:
      key = json.dumps([t["experiment"], t["method"], t["preset"],
                        t["overrides"], t["hparams"], t.get("data_dir")],
                       sort_keys=True)
      per_point.setdefault(key, []).append(t)
  for group in traced.values():
    _vmap_traced(work_dir, group, trials_per_call, mnist, progress)
  for group in per_point.values():
    _vmap_seeds(work_dir, group, trials_per_call, mnist, progress)


def _vmap_traced(work_dir, group, trials_per_call, mnist, progress):
  """One ColoredMNIST group: traceable hyperparameters and seeds vmapped."""
  from experiments import colored_mnist  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  config = _config_of(group[0])
  data_dir = group[0].get("data_dir")
  splits_fn = lambda s: colored_mnist.build_run(config, data_dir, s,
                                                mnist)[0]
  objective_fn = functools.partial(colored_mnist.build_objective, config)

  configs_ = [_config_of(t) for t in group]
  hps = {k: [float(c[k]) for c in configs_]
         for k in hparams_registry.TRACEABLE}
  info = splits_fn(group[0]["seed"]).info  # Same recipe; only the seed
  # differs per trial.

  def persist(i, res):
    t, c = group[i], configs_[i]
    if res.diverged is not None:
      records = [common.diverged_record(c, t["seed"], res.diverged,
                                        backend="vmap")]
    else:
      obj = objective_fn({k: c[k] for k in hparams_registry.TRACEABLE})
      records = common.records_from_fit(
          res, c, t["seed"], obj.describe(), dict(info, seed=t["seed"]),
          (time.time() - t0) / (i + 1), backend="vmap")
    launch.write_result(work_dir, t, _tag(records, t))

  _fit_trials(splits_fn, config, objective_fn, hps,
              [t["seed"] for t in group], trials_per_call, progress,
              persist)


def _fingerprint(method, envs):
  """``method``'s init and update as traced programs with their closed-over
  constants: equal fingerprints mean the same computation on any data."""
  import jax  # pylint: disable=g-import-not-at-top
  data = method.prepare(envs)
  key = jax.random.key(0)
  state = jax.eval_shape(method.init, key, data)
  out = []
  for closed in (jax.make_jaxpr(method.init)(key, data),
                 jax.make_jaxpr(method.update)(state, data)):
    consts = [np.asarray(jax.random.key_data(c) if train_lib.is_key(c) else c)
              for c in closed.consts]
    out.append((str(closed.jaxpr), consts))
  return out


def _same(a, b):
  return all(ja == jb and len(ca) == len(cb) and all(
      x.shape == y.shape and np.array_equal(x, y) for x, y in zip(ca, cb))
             for (ja, ca), (jb, cb) in zip(a, b))


# The trainer arguments of an experiment's Built.fit_kw that fit_sweep
# takes (the runner is always the scan runner under the vmap).
_SWEEP_FIT_KW = ("steps", "eval_every", "eval_chunk", "eval_train_max")


def _vmap_seeds(work_dir, group, trials_per_call, mnist, progress):
  """The restarts of one hyperparameter point of any experiment in one
  vmapped program: each restart's data and method from the experiment's
  ``build_method(config, seed)`` (the method must not depend on the seed,
  which reaches it through ``init``'s key and the data: checked on the
  traced programs and their constants, :func:`_fingerprint`), records from
  its ``records_of``."""
  from jirm import sweep as sweep_lib  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  mod = _module(group[0]["experiment"])
  config = _config_of(group[0])
  kw = _data_kwargs(mod.build_method, group[0], mnist)
  built = {}

  def built_of(seed):
    if seed not in built:
      built[seed] = mod.build_method(config, seed, **kw)
    return built[seed]

  seeds = [t["seed"] for t in group]
  first = built_of(seeds[0])
  bad = sorted(set(first.fit_kw) - set(_SWEEP_FIT_KW) - {"runner"})
  if bad:
    raise ValueError(f"--backend=vmap: {group[0]['experiment']} trains "
                     f"with {bad}, which jirm.sweep.fit_sweep does not take;"
                     f" use --backend=local.")
  sweep_kw = {k: v for k, v in first.fit_kw.items() if k in _SWEEP_FIT_KW}
  reference = _fingerprint(first.method, first.splits.train)
  checked = {seeds[0]}

  def splits_of(seed):
    b = built_of(seed)
    if seed not in checked:
      if not _same(_fingerprint(b.method, b.splits.train), reference):
        raise ValueError(
            f"--backend=vmap: {group[0]['method']}'s method depends on the "
            f"seed (restart {seed}'s program or its constants, e.g. IPG's "
            f"pairs, differ from restart {seeds[0]}'s), so its restarts "
            f"cannot share one program; use --backend=local.")
      checked.add(seed)
    return b.splits

  if len(seeds) > 1:  # Before any training: the second restart's program.
    splits_of(seeds[1])

  def persist(i, res):
    t = group[i]
    b = built[t["seed"]]
    if res.diverged is not None:
      records = [common.diverged_record(config, t["seed"], res.diverged,
                                        backend="vmap")]
    else:
      if b.select is not None:
        res.selections = b.select(res.history, res.env_names)
      records = mod.records_of(res, config, t["seed"], b, b.splits.info,
                               (time.time() - t0) / (i + 1), backend="vmap")
    built[t["seed"]] = b._replace(splits=None)  # Its data is done with.
    launch.write_result(work_dir, t, _tag(records, t))

  sweep_lib.fit_sweep(splits_of, lambda hp: first.method, seeds=seeds,
                      trials_per_call=trials_per_call or None,
                      progress=progress, on_result=persist, **sweep_kw)


def _fit_trials(splits_fn, config, objective_fn, hps, seeds, trials_per_call,
                progress, on_result):
  """fit_sweep over explicit (hparams, seed) pairs (not a product)."""
  import optax  # pylint: disable=g-import-not-at-top
  import jirm  # pylint: disable=g-import-not-at-top
  from jirm import sweep  # pylint: disable=g-import-not-at-top
  model = jirm.models.mlp(config.hidden_dim, config.depth)
  method_fn = lambda hp: jirm.from_objective(
      model, objective_fn(hp), optax.adam(hp["lr"]), task="binary",
      batch_size=config.batch_size or None)
  return sweep.fit_sweep(
      splits_fn, method_fn, hparams=hps, seeds=seeds, pair=True,
      steps=config.steps, eval_every=config.eval_every,
      trials_per_call=trials_per_call or None, progress=progress,
      on_result=on_result)


def collect(work_dir):
  """Writes summary.md / summary.csv from every finished trial."""
  records = launch.read_results(work_dir)
  if not records:
    return None
  failed = [r for r in records if r.get("status") == "diverged"]
  records = [r for r in records if r.get("status") != "diverged"]
  rows = {}
  for r in records:
    key = (r["method"], r["hparams_id"])
    rows.setdefault(key, {"hparams": r["hparams"], "seeds": set()})
    rows[key]["seeds"].add(r["seed"])
    rows[key].setdefault(r["selection"], []).append(r)
  ms = lambda v: f"{100 * np.mean(v):.1f} ± {100 * np.std(v):.1f}"
  lines = [f"# Sweep: {work_dir}", "",
           "Test accuracy % (mean ± std over restarts) per hyperparameter "
           "point and selection rule; `oracle` reads the test set.", "",
           "| method | hparams | n | " + " | ".join(RULES) + " |",
           "|---|---|---|" + "---|" * len(RULES)]
  csv = ["method,hparams_id,hparams,n," + ",".join(
      f"{r}_test_mean,{r}_test_std" for r in RULES)]
  order = lambda kv: (kv[0][0], sorted(kv[1]["hparams"].items()))
  for (m, hid), row in sorted(rows.items(), key=order):
    hp = ", ".join(f"{k}={v:g}" for k, v in sorted(row["hparams"].items()))
    cells, cvals = [], []
    for rule in RULES:
      v = [x["test_acc"] for x in row.get(rule, [])]
      cells.append(ms(v) if v else "–")
      cvals += [f"{np.mean(v):.6f}", f"{np.std(v):.6f}"] if v else ["", ""]
    lines.append(f"| {m} | {hp} | {len(row['seeds'])} | " +
                 " | ".join(cells) + " |")
    csv.append(f"{m},{hid},\"{hp}\",{len(row['seeds'])}," + ",".join(cvals))
  lines += ["", "## Selected point per rule (DomainBed protocol: the point "
            "with the best mean train-domain validation accuracy; `oracle`: "
            "best mean test accuracy)", "",
            "| method | rule | hparams | test % |", "|---|---|---|---|"]
  for m in sorted({k[0] for k in rows}):
    for rule in RULES:
      cands = [(k, v) for k, v in rows.items() if k[0] == m and v.get(rule)]
      score = lambda kv, rule=rule: np.mean(
          [x["test_acc"] if rule == "oracle" else x.get("val_acc", np.nan)
           for x in kv[1][rule]])
      cands = [kv for kv in cands if np.isfinite(score(kv))]
      if not cands:
        continue
      k, v = max(cands, key=score)
      hp = ", ".join(f"{a}={b:g}" for a, b in sorted(v["hparams"].items()))
      lines.append(f"| {m} | {rule} | {hp} | "
                   f"{ms([x['test_acc'] for x in v[rule]])} |")
  if failed:
    lines += ["", f"## Failed trials ({len(failed)}; never selected)", "",
              "| trial | method | hparams | seed | reason |",
              "|---|---|---|---|---|"]
    for r in sorted(failed, key=lambda r: r["trial"]):
      hp = ", ".join(f"{a}={b:g}" for a, b in sorted(r["hparams"].items()))
      reason = r["reason"].replace("|", "/").replace("\n", " ")
      lines.append(f"| {r['trial']} | {r['method']} | {hp} | {r['seed']} | "
                   f"{reason} |")
  walls = [r["wall_s"] for r in records if r["selection"] == "last"]
  lines += ["", f"{len(walls)} trials, {sum(walls):.0f} s of trial wall time "
            f"(backends: {sorted({r.get('backend', 'run_restart') for r in records})})."]
  text = "\n".join(lines) + "\n"
  results_lib.atomic_write(os.path.join(work_dir, "summary.md"), text)
  results_lib.atomic_write(os.path.join(work_dir, "summary.csv"),
                           "\n".join(csv) + "\n")
  return text


def launch_sweep(trials, work_dir, backend="vmap", *, trials_per_call=None,
                 ray_address=None, workers=2, sbatch=(), submit=False,
                 command=None, mnist=None, progress=True):
  """Runs (or submits) the pending trials and rebuilds the tables."""
  os.makedirs(work_dir, exist_ok=True)
  results_lib.atomic_write(os.path.join(work_dir, "trials.json"),
                           json.dumps(trials, indent=1))
  if backend == "vmap":
    run_vmap(work_dir, trials, trials_per_call, mnist, progress)
  elif backend == "local":
    launch.run_local(functools.partial(run_trial, mnist=mnist), work_dir,
                     trials)
  elif backend == "ray":
    launch.run_ray(run_trial, work_dir, trials, address=ray_address,
                   num_workers=workers, progress=progress)
  elif backend == "slurm":
    path = launch.write_slurm_array(work_dir, len(trials), command,
                                    sbatch_args=sbatch, submit=submit)
    print(f"wrote {path}" + (" and submitted it" if submit else
                             f"; submit with: sbatch {path}"))
    return None
  else:
    raise ValueError(f"unknown backend {backend!r}.")
  return collect(work_dir)


def main(argv):
  del argv
  if FLAGS.distributed:
    from jirm import sharding  # pylint: disable=g-import-not-at-top
    sharding.initialize_distributed()
  import jirm  # pylint: disable=g-import-not-at-top
  jirm.runtime.configure_cpu()
  out = os.path.abspath(FLAGS.output_dir)
  if FLAGS.collect_only:
    print(collect(FLAGS.output_dir) or "no finished trials")
    return
  if FLAGS.run_trial >= 0:  # A Slurm array element.
    with open(os.path.join(out, "trials.json")) as f:
      run_trial(out, json.load(f)[FLAGS.run_trial])
    return
  experiment = common.exit_on_bad_input(experiment_of, FLAGS)
  choice = common.exit_on_bad_input(common.config_choice, FLAGS)
  methods = common.method_list(choice.method, ())
  trials = common.exit_on_bad_input(
      make_trials, experiment, methods, choice.preset, FLAGS.search,
      FLAGS.grid, FLAGS.n_hparams, FLAGS.hparams_seed, FLAGS.restarts,
      FLAGS.seed, choice.overrides, FLAGS.data_dir)
  argv_ = [a for a in sys.argv[1:] if not a.startswith("--backend")]
  # Every user value quoted for the shell; only the array index expands.
  command = (shlex.join([sys.executable, "-m", "experiments.sweep"] + argv_)
             + " --run_trial=$SLURM_ARRAY_TASK_ID")
  text = common.exit_on_bad_input(
      launch_sweep, trials, out, FLAGS.backend,
      trials_per_call=FLAGS.trials_per_call, ray_address=FLAGS.ray_address,
      workers=FLAGS.workers, sbatch=FLAGS.sbatch, submit=FLAGS.submit,
      command=command, progress=True)
  if text:
    print(text)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=common.parse_flags)
