"""Results files: atomic JSONL records, mean ± std summaries and curves."""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import platform
import socket
import tempfile
from typing import Callable, Hashable, Iterable, Optional, Sequence

import numpy as np


_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
  """A write that found no space (ENOSPC, or a full quota): the file it was
  rewriting is unchanged."""


def disk_full(e: BaseException) -> Optional[BaseException]:
  """The error in ``e``'s chain of causes that says the disk is full: an
  ``OSError`` with ENOSPC / EDQUOT, or tensorstore's ``RESOURCE_EXHAUSTED``
  (a ValueError naming ``No space left on device``) from an orbax
  checkpoint; None if there is none."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in _FULL:
      return e
    if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
      return e
    e = e.__cause__ or e.__context__
  return None


def atomic_write(path: str, text: str) -> None:
  """Writes ``text`` to ``path`` via a temporary file and ``os.replace``.

  Raises:
    DiskFullError: no space for the temporary file; ``path`` is as it was.
  """
  path = os.path.abspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = None, None
  try:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
      fd = None  # The file object closes it.
      f.write(text)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600 files.
    os.replace(tmp, path)
  except OSError as e:
    if e.errno not in _FULL:
      raise
    raise DiskFullError(
        e.errno, f"no space left on the device writing {path}: it is "
        f"unchanged (every earlier record intact); free space and rerun the "
        f"same command (finished runs are skipped)") from e
  finally:
    if fd is not None:
      os.close(fd)
    if tmp is not None and os.path.exists(tmp):
      os.remove(tmp)


# Config fields that do not change what a restart computes (how often it
# checkpoints, its description, whether IRM-TV's weight sweep keeps curves).
_NOT_IDENTITY = ("checkpoint_every", "note", "sweep")


def run_key(config: dict) -> str:
  """A restart's identity without its seed: 10 hex digits of SHA-256 over
  the resolved config (sorted JSON, without ``checkpoint_every``, ``note``
  and ``sweep``). Two configs that differ in any setting get different keys,
  so a rerun with a changed config never resumes, skips or pools with the
  other config's restarts.

  Example:
    >>> run_key(dict(method="irmv1", lr=1e-3)) == run_key(dict(lr=1e-3,
    ...                                                   method="irmv1"))
    True
  """
  d = {k: v for k, v in config.items() if k not in _NOT_IDENTITY}
  text = json.dumps(d, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:10]


def _today(record: dict) -> dict:
  """A record written under an old method (or penalty) name, read under
  today's name (:func:`jirm.methods.registry.canonical`), keyed as today's
  code keys the same settings (so a rerun skips it instead of repeating
  it)."""
  from jirm.methods import registry  # pylint: disable=g-import-not-at-top
  old = {f: record.get(f) for f in ("method", "penalty")
         if isinstance(record.get(f), str)
         and registry.canonical(record[f]) != record[f]}
  if not old:
    return record
  record = dict(record, **{f: registry.canonical(v) for f, v in old.items()})
  config = record.get("config")
  if isinstance(config, dict):
    record["config"] = dict(config, **{
        f: record[f] for f, v in old.items() if config.get(f) == v})
    if "run_key" in record:
      record["run_key"] = run_key(record["config"])
  return record


def read_jsonl(path: str) -> list:
  """The records of a JSONL file ([] if it does not exist).

  A torn last line (a crash mid-write where renames are not atomic) is
  dropped with a warning naming the file and line; the intact records are
  kept (the next append rewrites the file without it). A bad line before
  the last one raises ValueError naming the file and line. Records written
  under a method's old name (``rex``, ``irm``, ``irm_game``: see
  :data:`jirm.methods.registry.ALIASES`) are returned under today's name.
  """
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
  out = []
  for k, (i, line) in enumerate(lines):
    try:
      out.append(_today(json.loads(line)))
    except json.JSONDecodeError as e:
      if k < len(lines) - 1:
        raise ValueError(f"{path}:{i} is not a JSON record ({e.msg}); fix "
                         f"or remove that line.") from None
      logging.warning("%s:%d: dropped a torn last line (%d characters); "
                      "the %d records before it are kept.", path, i,
                      len(line.rstrip("\n")), len(out))
  return out


def _strict(value):
  """JSON-safe copy: NaN/Inf become None, numpy values Python values."""
  if isinstance(value, dict):
    return {str(k): _strict(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_strict(v) for v in value]
  if isinstance(value, np.ndarray):
    return _strict(value.tolist())
  if isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, float) and not np.isfinite(value):
    return None
  return value


def dumps(record: dict) -> str:
  """One record as strict JSON (sorted keys; a non-finite number is written
  as ``null``, never as the ``NaN``/``Infinity`` tokens most JSON readers
  reject)."""
  return json.dumps(_strict(record), sort_keys=True, allow_nan=False)


_VERSIONS = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex",
             "numpy")


def machine() -> dict:
  """Where a run ran: CPU model, its widest SIMD, cores, library versions.

  Records carry it (``machine``), because float rounding, XLA's kernel
  choices and hence chaotic training runs differ between CPUs (an AVX-512
  and an AVX2 machine give different last bits for the same program).

  Returns:
    ``dict(cpu=..., simd='AVX-512'|'AVX2'|'no AVX2', cores=int,
    python=..., versions={package: version})``.

  Example:
    >>> sorted(machine())
    ['cores', 'cpu', 'python', 'simd', 'versions']
  """
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  cpu, flags = platform.processor() or platform.machine(), set()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name") and ":" in line:
          cpu = line.split(":", 1)[1].strip()
        elif line.startswith("flags") and ":" in line:
          flags = set(line.split(":", 1)[1].split())
          break
  except OSError:
    pass
  simd = "AVX-512" if "avx512f" in flags else (
      "AVX2" if "avx2" in flags else "no AVX2")
  versions = {}
  for name in _VERSIONS:
    try:
      versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      versions[name] = None
  return dict(cpu=cpu, simd=simd, cores=os.cpu_count(),
              python=platform.python_version(), versions=versions)


@contextlib.contextmanager
def _flock(path: str):
  """An exclusive ``fcntl.flock`` on ``path`` (created if missing)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def append_jsonl(path: str, records: Iterable[dict],
                 unique: Optional[Callable[[dict], Hashable]] = None) -> None:
  """Appends records by atomically rewriting the file (never half-written).

  The read-and-rewrite holds an exclusive lock on ``path + '.lock'``, so
  concurrent appends from several processes lose nothing. With ``unique``
  (``record -> key``) a record whose key is already in the file (or earlier
  in ``records``) is dropped: the first one written stays.
  """
  path = os.path.abspath(path)
  with _flock(path + ".lock"):
    rows = read_jsonl(path)
    seen = {unique(r) for r in rows} if unique is not None else set()
    for r in records:
      if unique is not None:
        k = unique(r)
        if k in seen:
          continue
        seen.add(k)
      rows.append(r)
    atomic_write(path, "".join(dumps(r) + "\n" for r in rows))


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def try_lock(path: str) -> Optional[str]:
  """Takes the lock file ``path`` for this process.

  The file holds ``<pid> <host>``. A lock whose process is gone (same host,
  pid not alive) is stale and taken over. Lock files are checked and
  created under an ``fcntl.flock`` of ``<dir>/.guard``, so two processes
  never both take one.

  Args:
    path: the lock file.

  Returns:
    None if this process now holds the lock, else ``'<pid> on <host>'`` of
    the process holding it.
  """
  path = os.path.abspath(path)
  me = f"{os.getpid()} {socket.gethostname()}"
  with _flock(os.path.join(os.path.dirname(path), ".guard")):
    if os.path.exists(path):
      with open(path) as f:
        parts = f.read().split()
      pid, host = (int(parts[0]), parts[1]) if len(parts) == 2 else (0, "")
      if f"{pid} {host}" == me:
        return None
      if host != socket.gethostname() or _alive(pid):
        return f"{pid} on {host}"
    atomic_write(path, me + "\n")  # New, or taking over a stale lock.
  return None


def release_lock(path: str) -> None:
  """Removes the lock file ``path`` if this process holds it."""
  path = os.path.abspath(path)
  me = f"{os.getpid()} {socket.gethostname()}"
  with _flock(os.path.join(os.path.dirname(path), ".guard")):
    try:
      with open(path) as f:
        if f.read().strip() == me:
          os.remove(path)
    except FileNotFoundError:
      pass


def _pct(values: Sequence[float]) -> str:
  v = 100 * np.asarray(values, float)
  return f"{v.mean():.1f} ± {v.std():.1f}"


def summary_table(records: Sequence[dict], published: dict | None = None,
                  title: str = "") -> str:
  """Markdown table: mean ± std (percent) of train/test acc per method and
  selection rule; ``published`` maps method -> text shown beside it."""
  groups = collections.OrderedDict()
  keys = collections.defaultdict(set)
  for r in records:
    keys[(r["method"], r["preset"])].add(r.get("run_key"))
  for r in records:
    groups.setdefault((r["method"], r["preset"], r.get("run_key"),
                       r["selection"]), []).append(r)
  lines = [f"# {title}" if title else "", "",
           "| method | preset | selection | restarts | train acc | test acc |"
           " published (train / test) | wall s / restart |",
           "|---|---|---|---|---|---|---|---|"]
  for (method, preset, key, sel), rs in groups.items():
    pub = (published or {}).get(method, "") if sel == "last" else ""
    # Two configs of one method in one directory: one row each, by key.
    shown = (f"{method} (config {key or 'without run key'})"
             if len(keys[(method, preset)]) > 1 else method)
    lines.append(
        f"| {shown} | {preset} | {sel} | {len(rs)} | "
        f"{_pct([r['train_acc'] for r in rs])} | "
        f"{_pct([r['test_acc'] for r in rs])} | {pub} | "
        f"{np.mean([r['wall_s'] for r in rs]):.0f} |")
  lines += ["", "Accuracies in percent, mean ± std (population) over restarts. "
            "`last`: final step; `train_domain_val`: step with the best "
            "accuracy on held-out samples of the training domains; `oracle`: "
            "best test-env accuracy (optimistic, for reference only)."]
  return "\n".join(lines).lstrip("\n") + "\n"


def spread_table(records: Sequence[dict], selection: str = "last",
                 threshold: float = 0.5, tail: int = 4) -> str:
  """Markdown table of how a row's test accuracy spreads over seeds.

  Per method (records of ``selection``): n seeds, mean ± sample std
  (ddof 1), min-max, how many seeds end below ``threshold`` test accuracy
  (on CIFAR-MNIST's test env, where the MNIST half agrees with the label
  10% of the time, below 50% means the model follows the MNIST half), and
  the within-run swing: the std of the test accuracy over the last ``tail``
  evaluation points, averaged over seeds (how much "the last step" depends
  on where the run stops).

  Args:
    records: result records (``method``, ``seed``, ``selection``,
      ``test_acc``, optional ``curve``).
    selection: the selection rule compared.
    threshold: regime boundary on test accuracy (a fraction).
    tail: evaluation points of the within-run swing.

  Returns:
    The table, accuracies in percent.

  Example:
    >>> spread_table(read_jsonl('results.jsonl'))
  """
  groups = collections.OrderedDict()
  for r in records:
    if r["selection"] == selection:
      groups.setdefault(r["method"], []).append(r)
  lines = [f"| method | seeds | test acc mean ± sd | min – max | seeds < "
           f"{100 * threshold:.0f}% | within-run swing (sd of last {tail} "
           f"evals) |", "|---|---|---|---|---|---|"]
  for method, rs in groups.items():
    t = 100 * np.asarray([r["test_acc"] for r in rs], float)
    sd = f"{t.std(ddof=1):.1f}" if len(t) > 1 else "–"
    swings = [np.std(100 * np.asarray(r["curve"]["test_acc"][-tail:]))
              for r in rs if len(r.get("curve", {}).get("test_acc", [])) >=
              tail]
    swing = f"{np.mean(swings):.1f}" if swings else "–"
    below = int((t < 100 * threshold).sum())
    seeds = ", ".join(str(r["seed"]) for r in rs)
    lines.append(f"| {method} | {len(t)} ({seeds}) | {t.mean():.1f} ± {sd} "
                 f"| {t.min():.1f} – {t.max():.1f} | {below} / {len(t)} | "
                 f"{swing} |")
  return "\n".join(lines) + "\n"


def save_figure(fig, path: str, dpi: int = 120) -> None:
  """Saves a matplotlib figure atomically (a temporary file of its own, then
  rename) and closes it; processes sharing an output directory may save the
  same figure at once (each rename is whole)."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  path = os.path.abspath(path)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path),
                             prefix=".tmp-" + os.path.basename(path))
  try:
    with os.fdopen(fd, "wb") as f:
      fig.savefig(f, dpi=dpi, format="png")
    plt.close(fig)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def plot_curves(records: Sequence[dict], path: str, title: str = "") -> None:
  """train/test accuracy against step, mean over restarts, one colour per
  method (records with a ``curve`` field, selection ``last``)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  by_method = collections.OrderedDict()
  for r in records:
    if r["selection"] == "last" and "curve" in r:
      by_method.setdefault(r["method"], []).append(r["curve"])
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for i, (method, curves) in enumerate(by_method.items()):
    n = min(len(c["step"]) for c in curves)
    step = np.asarray(curves[0]["step"][:n])
    color = f"C{i % 10}"
    for key, style in (("train_acc", ":"), ("test_acc", "-")):
      val = np.mean([c[key][:n] for c in curves], 0)
      ax.plot(step, 100 * val, style, color=color,
              label=f"{method} {key.split('_')[0]}")
  ax.set_xlabel("step")
  ax.set_ylabel("accuracy (%)")
  ax.set_ylim(0, 100)
  ax.set_title(title or "train (dotted) / test (solid) accuracy")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  save_figure(fig, path)
