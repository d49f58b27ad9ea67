"""Hand trials to an execution engine: in-process, Ray, or a Slurm array.

A *trial* is a JSON-able dict with an ``id``; a *trial function*
``fn(work_dir, trial)`` runs it and leaves its result in
``work_dir/trials/<id>/`` (see :func:`trial_dir`). Backends never schedule
anything themselves: Ray places tasks on a local instance or a cluster and
retries a task whose worker died; Slurm runs one array element per trial.
Every backend skips trials whose result exists, and a trial function
resumes from the checkpoints in its own directory, so a lost worker re-runs
(the rest of) its own trial only.

Example:
  >>> todo = [dict(id=f"seed{s}", seed=s) for s in range(8)]
  >>> run_ray(my_module.run_trial, "/abs/sweep", todo, num_workers=2)
  >>> write_slurm_array("/abs/sweep", len(todo),
  ...                   "python -m experiments.sweep --run_trial=$SLURM_ARRAY_TASK_ID ...")
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from typing import Callable, Optional, Sequence

from jirm import results as results_lib

RESULT = "result.jsonl"


def trial_dir(work_dir: str, trial: dict) -> str:
  """``work_dir/trials/<id>``: the trial's results, checkpoints and log."""
  return os.path.join(os.path.abspath(work_dir), "trials", trial["id"])


def is_done(work_dir: str, trial: dict) -> bool:
  return os.path.exists(os.path.join(trial_dir(work_dir, trial), RESULT))


def pending(work_dir: str, trials: Sequence[dict]) -> list:
  """Trials without a result yet (a finished sweep has none)."""
  ids = [t["id"] for t in trials]
  if len(set(ids)) != len(ids):
    raise ValueError("trial ids must be unique.")
  return [t for t in trials if not is_done(work_dir, t)]


LOCK = "running.lock"


def claim(work_dir: str, trial: dict) -> Optional[str]:
  """Takes the trial's lock (``trials/<id>/running.lock``: pid and host) for
  this process; returns None when taken, else who holds it. Two processes
  sharing a work directory (two copies of one command, Ray tasks, Slurm
  array elements) never run one trial at once; a lock left by a killed
  process on this host is taken over (:func:`jirm.results.try_lock`)."""
  return results_lib.try_lock(os.path.join(trial_dir(work_dir, trial), LOCK))


def release(work_dir: str, trial: dict) -> None:
  """Drops the lock :func:`claim` took."""
  results_lib.release_lock(os.path.join(trial_dir(work_dir, trial), LOCK))


def write_result(work_dir: str, trial: dict, records: Sequence[dict]) -> None:
  """Atomically writes a trial's records (its completion marker) and drops
  its checkpoints."""
  d = trial_dir(work_dir, trial)
  results_lib.atomic_write(os.path.join(d, RESULT), "".join(
      results_lib.dumps(r) + "\n" for r in records))
  shutil.rmtree(os.path.join(d, "checkpoints"), ignore_errors=True)


def log_attempt(work_dir: str, trial: dict) -> None:
  """Appends ``pid time`` to the trial's ``attempts.log`` (one line per
  start; a retried trial has several)."""
  d = trial_dir(work_dir, trial)
  os.makedirs(d, exist_ok=True)
  with open(os.path.join(d, "attempts.log"), "a") as f:
    f.write(f"{os.getpid()} {time.time():.3f}\n")


def read_results(work_dir: str) -> list:
  """Every finished trial's records."""
  root = os.path.join(os.path.abspath(work_dir), "trials")
  out = []
  for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
    out += results_lib.read_jsonl(os.path.join(root, name, RESULT))
  return out


def run_local(fn: Callable, work_dir: str, trials: Sequence[dict]) -> None:
  """Runs the pending trials one after another in this process."""
  for t in pending(work_dir, trials):
    fn(work_dir, t)


def run_ray(fn: Callable, work_dir: str, trials: Sequence[dict], *,
            address: Optional[str] = None, num_workers: int = 2,
            max_retries: int = 3, progress: bool = True) -> None:
  """Runs the pending trials as Ray tasks (one CPU each).

  Args:
    fn: the trial function (importable, module level).
    work_dir: the sweep directory (absolute paths are shared with workers;
      on a cluster it must be on a shared file system).
    trials: all trials; finished ones are skipped.
    address: a Ray cluster address (``'auto'`` or ``'ray://host:10001'``);
      None starts a local instance with ``num_workers`` CPUs.
    num_workers: CPUs of the local instance.
    max_retries: re-runs of a task whose worker process died (it resumes
      from the trial's checkpoints).
    progress: print a line per finished trial.
  """
  import ray  # pylint: disable=g-import-not-at-top
  todo = pending(work_dir, trials)
  if not todo:
    return
  started = not ray.is_initialized()
  if started:
    kw = dict(address=address) if address else dict(num_cpus=num_workers)
    env = {k: os.environ[k] for k in ("JAX_PLATFORMS", "PYTHONPATH",
                                      "TFDS_DATA_DIR", "JIRM_CACHE_DIR")
           if k in os.environ}
    ray.init(include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env}, **kw)
  try:
    task = ray.remote(num_cpus=1, max_retries=max_retries)(fn)
    refs = {task.remote(os.path.abspath(work_dir), t): t for t in todo}
    waiting = list(refs)
    while waiting:
      done, waiting = ray.wait(waiting, num_returns=1)
      ray.get(done[0])  # Re-raises a trial's error.
      if progress:
        print(f"ray: trial {refs[done[0]]['id']} done "
              f"({len(refs) - len(waiting)}/{len(refs)})", flush=True)
  finally:
    if started:
      ray.shutdown()


def write_slurm_array(work_dir: str, num_trials: int, command: str, *,
                      sbatch_args: Sequence[str] = (),
                      submit: bool = False) -> str:
  """Writes ``work_dir/slurm/sweep.sbatch``: an array job with one element
  per trial running ``command`` (which reads ``$SLURM_ARRAY_TASK_ID``).

  Args:
    work_dir: the sweep directory.
    num_trials: array size.
    command: shell command of one element.
    sbatch_args: extra ``#SBATCH`` options, e.g. ``('--partition=cpu',
      '--time=02:00:00')``.
    submit: run ``sbatch`` on the script (must be on PATH).

  Returns:
    The script path.
  """
  if num_trials < 1:
    raise ValueError(f"num_trials={num_trials}: nothing to submit.")
  for a in sbatch_args:
    if "\n" in a or "\r" in a:
      raise ValueError(f"--sbatch={a!r}: one #SBATCH option per value, "
                       f"without line breaks.")
  d = os.path.join(os.path.abspath(work_dir), "slurm")
  os.makedirs(d, exist_ok=True)
  lines = ["#!/bin/bash", "#SBATCH --job-name=jirm-sweep",
           f"#SBATCH --array=0-{num_trials - 1}",
           "#SBATCH --cpus-per-task=1",
           f"#SBATCH --output={d}/%A_%a.out"]
  lines += [f"#SBATCH {a}" for a in sbatch_args]
  lines += ["set -euo pipefail", f"cd {shlex.quote(os.getcwd())}", command, ""]
  path = os.path.join(d, "sweep.sbatch")
  results_lib.atomic_write(path, "\n".join(lines))
  if submit:
    if shutil.which("sbatch") is None:
      raise RuntimeError(f"sbatch is not on PATH; submit {path} on the "
                         f"cluster's login node.")
    subprocess.run(["sbatch", path], check=True)
  return path
