"""Helpers shared by the experiment modules: config overrides, the restart
loop that skips finished restarts, and report writing."""

from __future__ import annotations

import os
import re
import shutil
import sys
from typing import Any, Callable, NamedTuple, Optional

from absl import logging

from jirm import results as results_lib


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def cast_like(old, raw, what: str):
  """``raw`` (a string or number) as the type of ``old``; ValueError naming
  ``what`` (e.g. ``"--config.lr=x"``) otherwise. Booleans take
  true/false/yes/no/on/off/1/0; integers refuse fractions."""
  kind = type(old).__name__
  if isinstance(old, bool):
    text = str(raw).strip().lower()
    if text in _TRUE or text in _FALSE:
      return text in _TRUE
    raise ValueError(f"{what}: a boolean; use true or false, not {raw!r}.")
  try:
    if isinstance(old, int):
      value = float(raw)
      if value != int(value):
        raise ValueError
      return int(value)
    return type(old)(raw)
  except (TypeError, ValueError, OverflowError):
    raise ValueError(f"{what}: takes a{'n' if kind[0] in 'aeiou' else ''} "
                     f"{kind} value, not {raw!r}.") from None


def apply_overrides(config, overrides, flag: str = "--config."):
  """Applies ``key=value`` strings (dotted keys; what ``--config.KEY=VALUE``
  flags, ``--grid`` points and sweep trials hold) to a ConfigDict, casting
  each value to the type of the entry it replaces (a bad key or value raises
  ValueError naming it, as ``flag`` + ``key=value``)."""
  for item in overrides:
    if "=" not in item:
      raise ValueError(f"{flag}{item}: expected {flag}KEY=VALUE.")
    key, raw = item.split("=", 1)
    what = f"{flag}{key}={raw}"
    node, *path = key.split(".")[::-1]
    target = config
    for depth, part in enumerate(reversed(path)):
      if part not in target or not hasattr(target[part], "keys"):
        where = ".".join(list(reversed(path))[:depth]) or "the config"
        raise ValueError(f"{what}: no config section {part!r} in "
                         f"{where}; sections are "
                         f"{sorted(k for k in target.keys() if hasattr(target[k], 'keys'))}.")
      target = target[part]
    if node not in target:
      raise ValueError(f"{what}: no config key {key!r} in the "
                       f"{config.get('method', '')} config; keys are "
                       f"{sorted(target.keys())}.")
    target[node] = cast_like(target[node], raw, what)
  return config


def config_file(experiment: str) -> str:
  """Path of ``experiments/configs/<experiment>.py`` (the default
  ``--config`` of ``experiments.<experiment>``)."""
  from experiments import configs  # pylint: disable=g-import-not-at-top
  return os.path.join(os.path.dirname(os.path.abspath(configs.__file__)),
                      f"{experiment}.py")


def define_config_flag(experiment: Optional[str], flag_values=None) -> None:
  """Defines ``--config`` (``ml_collections.config_flags``): the config file
  ``FILE[:METHOD,PRESET]`` and its ``--config.KEY=VALUE`` overrides.

  Args:
    experiment: the config file's name under ``experiments/configs`` (the
      flag's default), or None (no default: ``experiments.sweep``, whose
      ``--config`` file names the experiment).
    flag_values: where to define it (absl's ``FLAGS`` if None).
  """
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  default = config_file(experiment) if experiment else None
  try:  # config_flags reads the --config.KEY arguments of sys.argv here.
    config_flags.DEFINE_config_file(
        "config", default,
        "Config file FILE[:METHOD,PRESET] (default: this experiment's file "
        "in experiments/configs); override entries with --config.KEY=VALUE, "
        "e.g. --config.lr=1e-3 --config.data.data_num=20000.",
        lock_config=True,
        **({} if flag_values is None else dict(flag_values=flag_values)))
  except (AttributeError, KeyError) as e:  # An entry the config lacks.
    missing = str(e).strip("\"'")
    print(f"error: {_no_such_entry(sys.argv, missing, default)}",
          file=sys.stderr)
    sys.exit(2)


class Choice(NamedTuple):
  """What the command line chose: the ``--method`` value (a name, a comma
  list or ``all``), the preset, and the ``--config.KEY=VALUE`` overrides as
  ``key=value`` strings (for :func:`apply_overrides`)."""

  method: str
  preset: str
  overrides: tuple


def config_choice(flag_values, method_flag: str = "method") -> Choice:
  """Reads ``--config=FILE[:METHOD,PRESET]``, ``--config.KEY=VALUE``,
  ``--<method_flag>`` and ``--preset`` into one :class:`Choice`.

  ``FILE:METHOD,PRESET`` is the same as ``--method=METHOD --preset=PRESET``;
  both given with different values is an error, as are
  ``--config.method`` / ``--config.preset`` (a method or preset is a whole
  config, not one entry).

  Args:
    flag_values: absl's ``FLAGS`` (with :func:`define_config_flag`'s flag).
    method_flag: the experiment's method flag (``methods`` in
      ``experiments.sparse_irm``).

  Returns:
    The :class:`Choice`.

  Raises:
    ValueError: naming the conflicting flags.

  Example:
    >>> choice = config_choice(FLAGS)
    >>> configs_ = [apply_overrides(get_config(m, choice.preset),
    ...                             choice.overrides)
    ...             for m in method_list(choice.method, METHODS_ALL)]
  """
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  method = flag_values[method_flag].value
  preset = flag_values["preset"].value
  if flag_values["config"].value is None:
    return Choice(method, preset, ())
  value = flag_values["config"].serialize().split("=", 1)[1]
  arg = value.split(":", 1)[1] if ":" in value else ""
  if arg:
    parts = arg.split(",")
    for flag, mine in zip((method_flag, "preset"), parts):
      given = flag_values[flag]
      if given.present and given.value != mine:
        raise ValueError(
            f"--{flag}={given.value} and --config={value} choose different "
            f"{flag}s; give one of them.")
    method = parts[0]
    preset = parts[1] if len(parts) > 1 else preset
  overrides = config_flags.get_override_values(flag_values["config"])
  for key, flag in (("method", method_flag), ("preset", "preset")):
    if key in overrides:
      raise ValueError(
          f"--config.{key}={overrides[key]}: a {key} is a whole config, not "
          f"one entry; use --{flag}={overrides[key]} (or "
          f"--config=FILE:METHOD,PRESET).")
  return Choice(method, preset,
                tuple(f"{k}={v}" for k, v in overrides.items()))


def parse_flags(argv):
  """``app.run``'s flag parser for the experiments: a bad flag, including a
  ``--config.KEY`` that the config lacks or a value of the wrong type, is one
  line on stderr and exit status 2 (what every jirm check does) instead of
  absl's usage text or a traceback.

  Example:
    >>> app.run(main, flags_parser=common.parse_flags)
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    # A config file's own error comes with its traceback: keep its last line.
    message = lines[0] if len(lines) == 1 else \
        f"{lines[0].rstrip(':')}: {lines[-1]}"
    if "Non-boolean argument" in message:
      message += "; use true or false."
    if "flag 'config." in message:
      message += (" --config.KEY=VALUE needs a config file: "
                  "--config=experiments/configs/<experiment>.py first.")
  except (AttributeError, KeyError) as e:  # config_flags: an unknown entry.
    files = [a.split("=", 1)[1].split(":", 1)[0] for a in argv[1:]
             if a.startswith("--config=")]
    message = _no_such_entry(
        argv, _unknown_entry(argv) or str(e).strip("\"'"),
        files[-1] if files else None)
  except ValueError as e:  # A config file's get_config refused its argument.
    message = str(e)
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _unknown_entry(argv):
  """The first part of a ``--config.KEY=...`` argument of ``argv`` that the
  loaded config lacks (``'bogus'`` for ``--config.data.bogus=1``; None if
  every KEY is there)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  config = flags.FLAGS["config"].value
  if config is None:  # Not loaded yet: the caller falls back on the error.
    return None
  for arg in argv[1:]:
    if not arg.startswith("--config."):
      continue
    node = config
    for part in arg[len("--config."):].split("=", 1)[0].split("."):
      if not hasattr(node, "keys") or part not in node:
        return part
      node = node[part]
  return None


def _no_such_entry(argv, missing: str, source) -> str:
  """The one line for a ``--config.KEY`` whose entry ``missing`` the config
  file ``source`` lacks, naming the argument that holds it (both paths that
  meet one: config_flags at flag definition, absl at parse time)."""
  given = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
  named = [a for a in given if missing in a[len("--config."):].split(".")]
  if not named:  # config_flags' own text ("... Attempting to lookup: KEY").
    named = [a for a in given if missing.endswith(a[len("--config."):])]
    missing = named[0][len("--config."):] if named else missing
  return (f"{(named or given or ['--config'])[0]}: no such config entry "
          f"({missing!r}) in {source or 'the --config file'}; `--helpfull` "
          f"lists them (as --config.KEY).")


def parse_grid(items) -> dict:
  """``['key=v1,v2', ...]`` (``--grid`` flags) -> ``{key: ['v1', 'v2']}``."""
  axes = {}
  for item in items:
    if "=" not in item:
      raise ValueError(f"--grid={item!r}: expected key=v1,v2,...")
    key, values = item.split("=", 1)
    axes[key] = [v for v in values.split(",") if v]
  return axes


# Restarts that diverged: one record each, outside results.jsonl (so no
# table reads them); a rerun skips them and says so.
FAILED = "failed.jsonl"
_SAFE = re.compile(r"^(?!.*\.\.)[A-Za-z0-9_.,=+-]+$")

run_key = results_lib.run_key


def record_key(record: dict) -> Optional[str]:
  """The run key of a record: its ``run_key`` field, or for records written
  before keys existed the key of the config the record holds (records read
  through :func:`jirm.results.read_jsonl`, whose old method names are
  mapped to today's)."""
  if "run_key" in record:
    return record["run_key"]
  return run_key(record["config"]) if "config" in record else None


def _recorded(path):
  """(run key, seed) of every record in the JSONL file ``path``."""
  return {(record_key(r), r["seed"]) for r in results_lib.read_jsonl(path)}


def _unique(record):
  return (record_key(record), record["seed"], record["selection"])


def run_restarts(configs, restarts, seed, output_dir, run_restart, report,
                 key_fields=("method", "preset")):
  """Runs every (config, seed) not yet recorded in ``results.jsonl``.

  A restart is identified by :func:`run_key` of its resolved config and its
  seed: its checkpoints live in ``checkpoints/<name>-<key>-seed<s>``, its
  records carry ``run_key``, and a changed config (any setting) starts new
  restarts under a new key and says so, leaving the other config's records
  as they are. While a process runs a restart it holds
  ``locks/<name>-<key>-seed<s>.lock`` (pid and host): a second copy of the
  same command skips that restart and takes the next one, so two copies
  share the work instead of repeating it; a lock left by a killed process on
  this host is taken over. Records are appended atomically and deduplicated
  by (run key, seed, selection rule).

  Args:
    configs: ConfigDicts, one per method/setting.
    restarts: seeds ``seed .. seed + restarts - 1``.
    seed: first seed.
    output_dir: holds ``results.jsonl``, ``checkpoints/`` and ``locks/``.
    run_restart: ``(config, seed, checkpoint_dir) -> records``.
    report: ``output_dir -> None``, rewrites summaries after each restart.
    key_fields: config fields (dotted paths) that name a restart in paths
      and messages (records hold them under the last path component).
  """
  if not isinstance(restarts, int) or restarts < 1:
    raise ValueError(f"--restarts={restarts!r}: use 1 or more.")
  out = os.path.abspath(output_dir)
  if os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f"--output_dir={output_dir!r} is a file; give a "
                     f"directory.")
  for config in configs:
    for f in key_fields:
      value = str(_get(config, f))
      if value and not _SAFE.match(value):
        raise ValueError(f"{f}={_get(config, f)!r}: names a path; use "
                         f"letters, digits and _ . , = + - only.")
  created = not os.path.exists(out)
  os.makedirs(out, exist_ok=True)
  if not os.access(out, os.W_OK):
    raise ValueError(f"--output_dir={output_dir!r} is not writable.")
  try:
    _run_configs(configs, restarts, seed, out, output_dir, run_restart,
                 report, key_fields)
  except ValueError:  # A bad setting met while building: leave nothing.
    if created and _only_locks(out):
      shutil.rmtree(out, ignore_errors=True)
    raise


def _only_locks(out: str) -> bool:
  """Whether ``out`` holds nothing but lock bookkeeping (no record, no
  checkpoint, no report)."""
  for root, _, files in os.walk(out):
    rel = os.path.relpath(root, out)
    if files and rel.split(os.sep)[0] != "locks":
      return False
  return True


def _run_configs(configs, restarts, seed, out, output_dir, run_restart,
                 report, key_fields):
  """:func:`run_all`'s loop over (config, seed) in the checked ``out``."""
  from jirm import train as train_lib  # pylint: disable=g-import-not-at-top
  path = os.path.join(out, "results.jsonl")
  failed_path = os.path.join(out, FAILED)
  for config in configs:
    key = run_key(config.to_dict())
    label = tuple(str(_get(config, f)) for f in key_fields)
    name = "-".join(k for k in label if k)
    same = lambda r, label=label: tuple(
        str(r.get(f.split(".")[-1])) for f in key_fields) == label
    others = {record_key(r) for r in results_lib.read_jsonl(path)
              if same(r)} - {key}
    if others:
      print(f"{name}: config {key} differs from the {len(others)} other "
            f"config(s) recorded for {name} in {path} "
            f"({', '.join(sorted(map(str, others)))}); its restarts run under "
            f"key {key} and the other records stay as they are.", flush=True)
    for s in range(seed, seed + restarts):
      if (key, s) in _recorded(path):
        logging.info("skip %s seed %d (already in %s)", name, s, path)
        continue
      if (key, s) in _recorded(failed_path):
        print(f"skip {name} seed {s}: it diverged before (see "
              f"{failed_path}; delete its line to run it again).", flush=True)
        continue
      tag = f"{name}-{key}-seed{s}"
      lock = os.path.join(out, "locks", tag + ".lock")
      holder = results_lib.try_lock(lock)
      if holder is not None:
        print(f"skip {name} seed {s}: process {holder} is running it "
              f"({lock}).", flush=True)
        continue
      try:
        if (key, s) in _recorded(path):  # Finished by another process.
          continue
        ckpt = os.path.join(out, "checkpoints", tag)
        try:
          records = run_restart(config, s, ckpt)
        except train_lib.DivergenceError as e:
          results_lib.append_jsonl(failed_path, [dict(
              diverged_record(config, s, str(e)), run_key=key)],
                                   unique=_unique)
          print(f"{name} seed {s}: diverged, recorded in {failed_path} and "
                f"in no table: {e}", flush=True)
          write_failures(output_dir)
          continue
        where = results_lib.machine()
        for r in records:
          r["run_key"] = key
          r["machine"] = where
        results_lib.append_jsonl(path, records, unique=_unique)
        shutil.rmtree(ckpt, ignore_errors=True)  # The record is the result.
      finally:
        results_lib.release_lock(lock)
      last = [r for r in records if r["selection"] == "last"][0]
      print(f"{name} seed {s}: train {last['train_acc']:.4f} test "
            f"{last['test_acc']:.4f} ({last['wall_s']:.0f}s)", flush=True)
      report(output_dir)
      write_failures(output_dir)


_FAILED_HEADER = "## Failed restarts"


def write_failures(output_dir) -> None:
  """Adds the restarts recorded in ``failed.jsonl`` (diverged: in no
  table) to ``summary.md`` as a section of their own, after the study's
  ``write_reports`` has rewritten it (replacing an earlier such section)."""
  failed = results_lib.read_jsonl(os.path.join(output_dir, FAILED))
  if not failed:
    return
  path = os.path.join(output_dir, "summary.md")
  text = (open(path, encoding="utf-8").read() if os.path.exists(path) else
          f"# {output_dir}\n")
  text = text.split(_FAILED_HEADER)[0].rstrip() + "\n"
  lines = ["", f"{_FAILED_HEADER} ({len(failed)}; diverged, in no table; "
           f"`{FAILED}` holds them, delete a line to run it again)", "",
           "| method | preset | seed | run key | reason |",
           "|---|---|---|---|---|"]
  for r in sorted(failed, key=lambda r: (str(r.get("method", "")),
                                         r.get("seed", 0))):
    reason = str(r.get("reason", "")).replace("|", "/").replace("\n", " ")
    lines.append(f"| {r.get('method')} | {r.get('preset')} | {r.get('seed')} "
                 f"| {r.get('run_key', '')} | {reason} |")
  results_lib.atomic_write(path, text + "\n".join(lines) + "\n")


def start(flags_, write_reports) -> bool:
  """Common start of an experiment's ``main``: CPU runtime settings (before
  any JAX computation), quiet logging unless ``--verbosity`` is given, and
  ``--report_only``. Returns True when ``main`` should stop here."""
  import jirm  # pylint: disable=g-import-not-at-top
  jirm.runtime.configure_cpu()
  if not flags_["verbosity"].present:  # Keep tfds/orbax INFO chatter out.
    logging.set_verbosity(logging.WARNING)
  if flags_.report_only:
    out = flags_.output_dir
    if not os.path.isfile(os.path.join(out, "results.jsonl")):
      print(f"error: --report_only: no {os.path.join(out, 'results.jsonl')}; "
            f"point --output_dir at a directory with results.", file=sys.stderr)
      sys.exit(2)
    write_reports(out)
    write_failures(out)
    return True
  return False


class Built(NamedTuple):
  """What an experiment's ``build_method(config, seed, ...)`` returns: the
  restart's data, its :class:`jirm.methods.Method`, the objective's
  description, the trainer arguments for :func:`jirm.fit` (steps,
  evaluation), extra record fields and, where the study has its own rules,
  ``select(history, env_names) -> selections`` (e.g.
  :func:`jirm.methods.irm_tv.select`; None: :func:`jirm.selection.select`)."""

  splits: Any
  method: Any
  describe: str
  fit_kw: dict
  record: dict
  select: Optional[Callable] = None


def fit_restart(built: Built, config, seed: int, *, progress: bool = False,
                checkpoint_dir: Optional[str] = None, mesh=None,
                desc: Optional[str] = None):
  """Trains one restart of an experiment: :func:`jirm.fit` of
  ``built.method`` on ``built.splits`` with the study's trainer arguments,
  orbax checkpoints (and TensorBoard scalars beside them) when
  ``checkpoint_dir`` is given, and the study's selection rules.

  Every experiment's ``run_restart`` is ``build_method`` + this + its
  records; the golden trajectories (``tests/goldens.py``) read the result.

  Args:
    built: from the experiment's ``build_method(config, seed, ...)``.
    config: the restart's config (``method``, ``checkpoint_every``).
    seed: initialisation seed.
    progress: show a progress bar.
    checkpoint_dir: resume from / save to this directory.
    mesh: a device mesh (data parallel), or None.
    desc: progress-bar label (default ``'<method> seed <seed>'``).

  Returns:
    The :class:`jirm.train.FitResult`, its selections from ``built.select``
    when the study has its own rules.

  Example:
    >>> b = colored_mnist.build_method(config, seed=0)
    >>> res = common.fit_restart(b, config, 0, checkpoint_dir=ckpt)
  """
  import jirm  # pylint: disable=g-import-not-at-top
  kw = dict(built.fit_kw)
  if checkpoint_dir is not None:
    kw.update(checkpoint_dir=checkpoint_dir,
              checkpoint_every=config.checkpoint_every,
              metrics_dir=metrics_dir_for(checkpoint_dir))
  if mesh is not None:
    kw["mesh"] = mesh
  res = jirm.fit(built.splits, built.method, seed=seed, progress=progress,
                 desc=desc or f"{config.method} seed {seed}", **kw)
  if built.select is not None:
    res.selections = built.select(res.history, res.env_names)
  return res


def method_list(value: str, all_methods) -> tuple:
  """``--method`` value -> methods: ``'all'`` or a comma list. An old name
  (``rex``, ``irm``, ``irm_game``) runs the method under its one name
  (:data:`jirm.methods.registry.ALIASES`) and says so."""
  from jirm.methods import registry  # pylint: disable=g-import-not-at-top
  if value == "all":
    return tuple(all_methods)
  out = []
  for m in (m.strip() for m in value.split(",")):
    if m and registry.canonical(m) != m:
      print(f"--method={m}: {m!r} is now called {registry.canonical(m)!r}; "
            f"running {registry.canonical(m)!r}.", flush=True)
    if m:
      out.append(registry.canonical(m))
  return tuple(out)


def check_preset_flags(flag_values, preset: str, resolved: dict) -> None:
  """Refuses a flag given on the command line whose value ``preset``
  replaces, instead of recording the preset's value under the user's
  command.

  Args:
    flag_values: absl's ``FLAGS``.
    preset: the ``--preset`` value.
    resolved: flag name -> the value that flag ended with in the config
      the preset built from the flags.

  Returns:
    None when no given flag conflicts.

  Raises:
    ValueError: naming the flag, its value and the two ways out.

  Example:
    >>> c = configs.get_config("erm", FLAGS.preset, FLAGS.model)
    >>> check_preset_flags(FLAGS, FLAGS.preset, {"model": c.model})
  """
  for name, value in resolved.items():
    given = flag_values[name]
    if given.present and given.value != value:
      raise ValueError(
          f"--{name}={given.value}: --preset={preset} sets {name} to "
          f"{value!r}; drop --{name}, or use another --preset with "
          f"--{name}={given.value}.")


def exit_on_bad_input(fn, *args, **kwargs):
  """Runs ``fn``; a bad flag or missing data (``ValueError``, including
  :class:`jirm.data.DataError`) prints its message in one line and exits
  with status 2 instead of a traceback (``JIRM_DEBUG=1`` re-raises); a full
  disk (ENOSPC anywhere in the error's causes) is one line and status 3."""
  try:
    return fn(*args, **kwargs)
  except Exception as e:  # pylint: disable=broad-except
    if os.environ.get("JIRM_DEBUG"):
      raise
    full = results_lib.disk_full(e)
    if full is not None:  # Not bad input: status 3.
      what = (full.strerror if isinstance(full, results_lib.DiskFullError)
              else "no space left on the device (" +
              " ".join(str(full).split())[:300] + "); every record written "
              "before it is intact; free space and rerun the same command "
              "(finished runs are skipped)")
      print(f"error: {what} (JIRM_DEBUG=1 shows the traceback)",
            file=sys.stderr)
      sys.exit(3)
    if not isinstance(e, ValueError):
      raise
    print(f"error: {e} (JIRM_DEBUG=1 shows the traceback)", file=sys.stderr)
    sys.exit(2)


def metrics_dir_for(checkpoint_dir):
  """TensorBoard directory of a restart, next to (not inside) its checkpoint
  directory, which is deleted once the restart's record is written:
  ``out/checkpoints/<name>`` -> ``out/tensorboard/<name>``;
  ``trial/checkpoints`` -> ``trial/tensorboard``."""
  if checkpoint_dir is None:
    return None
  parent, name = os.path.split(os.path.abspath(checkpoint_dir))
  if os.path.basename(parent) == "checkpoints":
    return os.path.join(os.path.dirname(parent), "tensorboard", name)
  return os.path.join(parent, "tensorboard")


def _get(config, dotted):
  for part in dotted.split("."):
    config = config[part]
  return config


def diverged_record(config, seed, reason, **extra):
  """The one record of a restart or trial whose training diverged: no
  metrics (so no table or selection rule reads it), the reason, the config.
  """
  return dict(method=config.method, preset=config.preset, seed=seed,
              selection=None, status="diverged", reason=reason,
              config=config.to_dict(), **extra)


def records_from_fit(res, config, seed, objective, info, wall, **extra):
  """One record per selection rule of a :class:`jirm.train.FitResult`."""
  h = res.history
  curve = dict(step=h["step"].tolist(),
               train_acc=h["train_acc_E"].mean(1).tolist(),
               test_acc=h["test_acc_E"].mean(1).tolist())
  records = []
  for rule, sel in res.selections.items():
    rec = dict(method=config.method, preset=config.preset, seed=seed,
               selection=rule, objective=objective, data=info,
               config=config.to_dict(), wall_s=wall, train_wall_s=res.wall_s,
               **extra, **sel)
    if rule == "last":
      rec["curve"] = curve
    records.append(rec)
  return records
