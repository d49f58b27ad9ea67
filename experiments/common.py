"""Helpers shared by the experiment modules: config overrides, the restart
loop that skips finished restarts, and report writing."""

from __future__ import annotations

import os
import shutil
import sys

from absl import logging

from jirm import results as results_lib


def apply_overrides(config, overrides):
  """Applies ``key=value`` strings (dotted keys) to a ConfigDict, casting each
  value to the type of the entry it replaces."""
  for item in overrides:
    if "=" not in item:
      raise ValueError(f"--set={item!r}: expected key=value.")
    key, raw = item.split("=", 1)
    node, *path = key.split(".")[::-1]
    target = config
    for part in reversed(path):
      target = target[part]
    if node not in target:
      raise ValueError(f"--set={item!r}: no config key {key!r}; keys are "
                       f"{sorted(target.keys())}.")
    old = target[node]
    value = type(old)(raw) if not isinstance(old, bool) else (
        raw.lower() in ("1", "true", "yes"))
    target[node] = value
  return config


def parse_grid(items) -> dict:
  """``['key=v1,v2', ...]`` (``--grid`` flags) -> ``{key: ['v1', 'v2']}``."""
  axes = {}
  for item in items:
    if "=" not in item:
      raise ValueError(f"--grid={item!r}: expected key=v1,v2,...")
    key, values = item.split("=", 1)
    axes[key] = [v for v in values.split(",") if v]
  return axes


def run_restarts(configs, restarts, seed, output_dir, run_restart, report,
                 key_fields=("method", "preset")):
  """Runs every (config, seed) not yet recorded in ``results.jsonl``.

  Args:
    configs: ConfigDicts, one per method/setting.
    restarts: seeds ``seed .. seed + restarts - 1``.
    seed: first seed.
    output_dir: holds ``results.jsonl`` and ``checkpoints/``.
    run_restart: ``(config, seed, checkpoint_dir) -> records``.
    report: ``output_dir -> None``, rewrites summaries after each restart.
    key_fields: config fields (dotted paths) that, with the seed, identify a
      restart; records hold them under the last path component.
  """
  path = os.path.join(os.path.abspath(output_dir), "results.jsonl")
  for config in configs:
    key = tuple(str(_get(config, f)) for f in key_fields)
    name = "-".join(k for k in key if k)
    for s in range(seed, seed + restarts):
      done = {tuple(str(r.get(f.split(".")[-1])) for f in key_fields) +
              (r["seed"],)
              for r in results_lib.read_jsonl(path)}
      if key + (s,) in done:
        logging.info("skip %s seed %d (already in %s)", name, s, path)
        continue
      ckpt = os.path.join(os.path.dirname(path), "checkpoints",
                          f"{name}-seed{s}")
      records = run_restart(config, s, ckpt)
      results_lib.append_jsonl(path, records)
      shutil.rmtree(ckpt, ignore_errors=True)  # The record is the result.
      last = [r for r in records if r["selection"] == "last"][0]
      print(f"{name} seed {s}: train {last['train_acc']:.4f} test "
            f"{last['test_acc']:.4f} ({last['wall_s']:.0f}s)", flush=True)
      report(output_dir)


def start(flags_, write_reports) -> bool:
  """Common start of an experiment's ``main``: CPU runtime settings (before
  any JAX computation), quiet logging unless ``--verbosity`` is given, and
  ``--report_only``. Returns True when ``main`` should stop here."""
  import jirm  # pylint: disable=g-import-not-at-top
  jirm.runtime.configure_cpu()
  if not flags_["verbosity"].present:  # Keep tfds/orbax INFO chatter out.
    logging.set_verbosity(logging.WARNING)
  if flags_.report_only:
    write_reports(flags_.output_dir)
    return True
  return False


def method_list(value: str, all_methods) -> tuple:
  """``--method`` value -> methods: ``'all'`` or a comma list."""
  if value == "all":
    return tuple(all_methods)
  return tuple(m.strip() for m in value.split(",") if m.strip())


def exit_on_bad_input(fn, *args, **kwargs):
  """Runs ``fn``; a bad flag or missing data (``ValueError``, including
  :class:`jirm.data.DataError`) prints its message and exits with status 2
  instead of a traceback."""
  try:
    return fn(*args, **kwargs)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
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
