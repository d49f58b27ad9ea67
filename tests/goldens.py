r"""Golden trajectories: every method of every experiment, a few steps each.

Each case runs an experiment's own restart function (``run_restart``: data
recipe, config, objective, optimizer, trainer, selection) on small synthetic
or fabricated data for at most 10 steps, and reduces what it trained to
numbers that a refactor must not move:

* every entry of the fit's ``history`` (accuracies, loss terms, weights,
  method extras such as density or IPG gates) at every evaluation point;
* the selected step of every selection rule;
* per parameter (and BatchNorm statistics) leaf: its L2 norm and its
  projection on a fixed random direction (a sum with random signs has no
  systematic cancellation, so it is as stable as the elements themselves).

The stored values live in ``tests/goldens/<experiment>.json`` together with
the commit, CPU and XLA optimisation level they were recorded at;
``tests/test_goldens_mlp.py`` and ``tests/test_goldens_resnet.py`` recompute
every case and compare (:func:`assert_matches`).

Record (only when an intended change is made; say why in the commit):

  python tests/goldens.py --record                 # every experiment
  python tests/goldens.py --record --only=cifar_mnist
  python tests/goldens.py --record --only=colored_mnist --methods=coral
      # a new method's case, the recorded ones untouched

Check without pytest (prints the largest relative difference per case):

  python tests/goldens.py --check
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
GOLDEN_DIR = os.path.join(HERE, "goldens")
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
if HERE not in sys.path:
  sys.path.insert(0, HERE)

STEPS = 8          # every case trains at most 10 steps
EVAL_EVERY = 4

# One entry per experiment: its methods. Every method the experiment runs is
# here (tests/test_goldens_mlp.py checks the lists against the experiments).
def _registry_experiments():
  from jirm.methods import registry  # pylint: disable=g-import-not-at-top
  out = {e: registry.names(e, extra=True) for e in registry.EXPERIMENTS}
  out["sweep"] = ("irmv1",)
  return out


EXPERIMENTS = _registry_experiments()

# Absolute tolerance of accuracies: about one example of the smallest
# evaluated environment flipping (a logit that sits within rounding of the
# decision boundary is a kink, and CPUs round differently). Every smooth
# quantity (loss terms, parameters) is held to RTOL.
ACC_ATOL = {"colored_mnist": 0.003, "cifar_mnist": 0.011, "irm_tv": 0.011,
            "sparse_irm": 0.003, "shift": 0.34, "sweep": 0.003}
RTOL = 1e-5
ATOL = 1e-7


# Cases whose Adam runs with eps 1e-3 instead of 1e-8. Adam's first steps
# map a gradient element g to lr * g / (|g| + eps), so an element that
# cancels to rounding noise (|g| ~ 1e-9) moves by a random +-lr/2 at eps
# 1e-8: the noise is amplified by lr / eps = 1e5.
# * IPG: its corrective gradient g_d has such elements (pair members share
#   most features; measured: 2e-3 relative parameter differences between
#   XLA -O0 and -O3 after 8 steps at eps 1e-8, 2.6e-6 at eps 1e-4, 8e-7 at
#   eps 1e-3 on ColoredMNIST; the shift cases keep 4-6e-6 from IPG's c, a
#   symmetric KL between near-equal predictions).
# * Every CIFAR-MNIST case (ResNet, BatchNorm): the gradients of some
#   BatchNorm biases cancel to that level (measured on an AVX-512 Xeon,
#   -O0 against -O3 after 8 steps: IRMv1(h) 1.6e-4 and IRMGame(h) 1.7e-4
#   relative at eps 1e-8, both 7e-7 at 1e-3; CI failed on them there).
# The code path is the same; only the optimizer constant differs.
ADAM_EPS_RESNET = 1e-3
ADAM_EPS = {("colored_mnist", "ipg"): 1e-3, ("shift", "ipg"): ADAM_EPS_RESNET,
            ("shift", "ipg_group_dro"): ADAM_EPS_RESNET,
            **{("cifar_mnist", m): ADAM_EPS_RESNET
               for m in EXPERIMENTS["cifar_mnist"]}}


@contextlib.contextmanager
def _adam_eps(eps):
  import optax  # pylint: disable=g-import-not-at-top
  orig = optax.adam
  if eps is not None:
    optax.adam = lambda lr, **kw: orig(lr, **{**kw, "eps": eps})
  try:
    yield
  finally:
    optax.adam = orig


# ----------------------------------------------------------------- capture
@contextlib.contextmanager
def _spy(owner, name, result_of):
  """Replaces ``owner.name`` by a wrapper that appends
  ``result_of(args, return value)`` to the yielded list."""
  seen = []
  orig = getattr(owner, name)

  def spy(*args, **kwargs):
    out = orig(*args, **kwargs)
    seen.append(result_of(args, out))
    return out

  setattr(owner, name, spy)
  try:
    yield seen
  finally:
    setattr(owner, name, orig)


def summarize(res, whole_state: bool = False) -> dict:
  """A FitResult -> the golden numbers (plain JSON): of its exported
  parameters, or with ``whole_state`` of its whole state."""
  import jax  # pylint: disable=g-import-not-at-top
  history = {}
  for k, v in res.history.items():
    a = np.asarray(v)
    if a.dtype.kind in "fiub":
      history[k] = a.astype(np.float64).tolist()
  leaves = {}
  # The exported params (and BatchNorm statistics); IRM-TV's golden holds
  # its whole state (classifier, lambda net, inference net, moments).
  state = res.state if whole_state else res.params
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  for path, leaf in flat:
    a = np.asarray(leaf, np.float64)
    if a.dtype.kind != "f" or a.size == 0:
      continue
    direction = np.random.default_rng(a.size).standard_normal(a.shape)
    leaves[jax.tree_util.keystr(path)] = [float(np.sqrt((a * a).sum())),
                                          float((a * direction).sum())]
  sel = {rule: int(s["step"]) for rule, s in sorted(res.selections.items())}
  return dict(history=history, params=leaves, selections=sel)


# ------------------------------------------------------------------- data
_DATA = {}


def _mnist():
  if "mnist" not in _DATA:
    import jirm  # pylint: disable=g-import-not-at-top
    _DATA["mnist"] = jirm.data.synthetic_mnist(num_train=3000, num_test=1000,
                                               seed=0)
  return _DATA["mnist"]


def _shift_root():
  if "shift" not in _DATA:
    import shift_fixtures as fx  # pylint: disable=g-import-not-at-top
    root = tempfile.mkdtemp(prefix="jirm-goldens-")
    fx.write_waterbirds(root, texture_seed=0)
    _DATA["shift"] = root
  return _DATA["shift"]


# ------------------------------------------------------------------ cases
def run_case(experiment: str, method: str) -> dict:
  """Runs one golden case through the experiment's restart function."""
  from experiments import common  # pylint: disable=g-import-not-at-top
  from experiments import irm_tv  # pylint: disable=g-import-not-at-top
  eps = ADAM_EPS.get((experiment, method))
  shrink = [f"steps={STEPS}", f"eval_every={EVAL_EVERY}"]
  # Every FitResult an experiment turns into records; irm_tv.run_restart
  # builds its records itself, so the result of its fit_restart.
  with _spy(common, "records_from_fit", lambda args, _: args[0]) as seen, \
      _spy(common, "fit_restart", lambda _, res: res) as fit_seen, \
      tempfile.TemporaryDirectory() as tmp, _adam_eps(eps):
    ckpt = os.path.join(tmp, "ckpt")
    if experiment == "colored_mnist":
      from experiments import colored_mnist  # pylint: disable=g-import-not-at-top
      from experiments.configs import colored_mnist as cfgs  # pylint: disable=g-import-not-at-top
      c = cfgs.get_config(method, "quick")
      common.apply_overrides(c, shrink + [f"anneal={min(c.anneal, 4)}"])
      if "game" in c:
        c.game.warm_start = 4
      colored_mnist.run_restart(c, 0, mnist=_mnist(), checkpoint_dir=ckpt)
    elif experiment == "cifar_mnist":
      import jirm  # pylint: disable=g-import-not-at-top
      from experiments import cifar_mnist  # pylint: disable=g-import-not-at-top
      from experiments.configs import cifar_mnist as cfgs  # pylint: disable=g-import-not-at-top
      if "cifar" not in _DATA:
        _DATA["cifar"] = jirm.data.synthetic_cifar_mnist_sources(300)
      c = cfgs.get_config(method, "quick", "tiny", 2)
      # 90 images per env, batch 16: 5 steps per epoch; penalty from step 5.
      common.apply_overrides(c, ["epochs=2", f"eval_every={EVAL_EVERY}",
                                 "data.train_num=200", "data.test_num=200"])
      cifar_mnist.run_restart(c, 0, ckpt, sources=_DATA["cifar"])
    elif experiment == "irm_tv":
      from experiments.configs import irm_tv as cfgs  # pylint: disable=g-import-not-at-top
      c = cfgs.get_config(method, "quick")
      irm_tv.run_restart(common.apply_overrides(c, shrink + ["anneal=4"]), 0)
    elif experiment == "sparse_irm":
      from experiments import sparse_irm  # pylint: disable=g-import-not-at-top
      from experiments.configs import sparse_irm as cfgs  # pylint: disable=g-import-not-at-top
      c = cfgs.get_config(method, "quick", hidden_dim=32)
      common.apply_overrides(c, shrink + ["anneal=4"])
      c.mrm.update(dict(dense_steps=3, mask_steps=3, retrain_steps=4))
      sparse_irm.run_restart(c, 0, mnist=_mnist(), checkpoint_dir=ckpt)
    elif experiment == "shift":
      from experiments import shift  # pylint: disable=g-import-not-at-top
      from experiments.configs import shift as cfgs  # pylint: disable=g-import-not-at-top
      c = cfgs.get_config(method, "quick", "waterbirds")
      common.apply_overrides(c, shrink + ["anneal=4", "batch_size=8"])
      shift.run_restart(c, 0, ckpt, data_dir=_shift_root())
    elif experiment == "sweep":
      from experiments import sweep  # pylint: disable=g-import-not-at-top
      work = os.path.join(tmp, "sweep")
      trials = sweep.make_trials(
          "colored_mnist", [method], "quick", "grid",
          grid=["penalty_weight=10,1000"], restarts=1,
          overrides=shrink + ["anneal=4"])
      sweep.run_vmap(work, trials, mnist=_mnist(), progress=False)
    else:
      raise ValueError(f"unknown experiment {experiment!r}")
  if experiment == "irm_tv":
    seen = fit_seen
  if not seen:
    raise RuntimeError(f"{experiment}/{method}: no fit was recorded")
  out = {"runs": [summarize(r, whole_state=experiment == "irm_tv")
                  for r in seen]}
  if eps is not None:
    out["adam_eps"] = eps
  return out


# -------------------------------------------------------------- comparing
def _scale(history: dict, key: str, a: np.ndarray) -> np.ndarray:
  """What RTOL is relative to: ``|a|``, and for a loss term or the total
  at least the ERM risk at the same evaluation. Terms are differences of
  risks (InvRat's gap between environment-head and shared-head losses,
  REx's variance, the total after a negative penalty): their rounding error
  is a few ulps of the risks they are computed from (measured: InvRat's gap
  of 2e-5 next to a risk of 0.6 differs by 6e-8 = 1 ulp of 0.6 between
  -O0 and -O3), not of themselves.
  """
  scale = np.abs(a)
  risk = history.get("term/erm")
  if (key.startswith("term/") or key == "total") and risk is not None:
    risk = np.abs(np.asarray(risk))
    if risk.shape == a.shape:
      scale = np.maximum(scale, risk)
  return scale


def compare(experiment: str, golden: dict, got: dict) -> list[str]:
  """Mismatches between two cases' numbers, one line each (empty: equal)."""
  bad = []
  acc_atol = ACC_ATOL[experiment]
  if len(golden["runs"]) != len(got["runs"]):
    return [f"{len(got['runs'])} fits, golden has {len(golden['runs'])}"]
  for i, (g, n) in enumerate(zip(golden["runs"], got["runs"])):
    for part in ("history", "params"):
      if set(g[part]) != set(n[part]):
        bad.append(f"run {i} {part} keys: missing "
                   f"{sorted(set(g[part]) - set(n[part]))}, extra "
                   f"{sorted(set(n[part]) - set(g[part]))}")
    for k in sorted(set(g["history"]) & set(n["history"])):
      a, b = np.asarray(g["history"][k]), np.asarray(n["history"][k])
      if a.shape != b.shape:
        bad.append(f"run {i} history[{k}] shape {b.shape} != {a.shape}")
        continue
      if "acc" in k:
        ok = np.abs(a - b) <= acc_atol
      elif k == "step":
        ok = a == b
      else:
        ok = np.abs(a - b) <= ATOL + RTOL * _scale(g["history"], k, a)
      ok = ok | (np.isnan(a) & np.isnan(b))
      if not ok.all():
        j = np.flatnonzero(~ok.ravel())[0]
        bad.append(f"run {i} history[{k}] flat index {j}: "
                   f"{b.ravel()[j]!r} != golden {a.ravel()[j]!r}")
    for k in sorted(set(g["params"]) & set(n["params"])):
      (na, pa), (nb, pb) = g["params"][k], n["params"][k]
      # The projection's scale is the leaf's norm (random unit-variance
      # direction), so both are held to RTOL of the norm.
      scale = RTOL * na + ATOL
      if abs(na - nb) > scale or abs(pa - pb) > scale * 10:
        bad.append(f"run {i} params{k}: norm {nb!r} / projection {pb!r} != "
                   f"golden {na!r} / {pa!r}")
    if set(g["selections"]) != set(n["selections"]):
      bad.append(f"run {i} selection rules {sorted(n['selections'])} != "
                 f"golden {sorted(g['selections'])}")
    elif g["selections"] != n["selections"] and acc_atol < 0.3:
      bad.append(f"run {i} selections {n['selections']} != golden "
                 f"{g['selections']}")
  return bad


def assert_matches(experiment: str, method: str) -> None:
  """Reruns one case and asserts it matches its golden (the tests)."""
  golden = load(experiment)["cases"][method]
  for run in golden["runs"]:  # A golden of a diverged run would hold nothing.
    for k, v in run["history"].items():
      assert np.all(np.isfinite(v)), (experiment, method, k)
  bad = compare(experiment, golden, run_case(experiment, method))
  assert not bad, f"{experiment}/{method}: " + "; ".join(bad[:5])


def max_rel_diff(golden: dict, got: dict) -> float:
  """Largest relative difference over the smooth quantities (diagnostics)."""
  worst = 0.0
  for g, n in zip(golden["runs"], got["runs"]):
    for k in g["history"]:
      if "acc" in k or k == "step" or k not in n["history"]:
        continue
      a, b = np.asarray(g["history"][k]), np.asarray(n["history"][k])
      if a.shape == b.shape and a.size:
        with np.errstate(invalid="ignore", divide="ignore"):
          r = np.abs(a - b) / np.maximum(_scale(g["history"], k, a), 1e-30)
        worst = max(worst, float(np.nanmax(np.where(np.abs(a - b) <= ATOL,
                                                    0.0, r))))
    for k, (na, pa) in g["params"].items():
      if k in n["params"]:
        nb, pb = n["params"][k]
        worst = max(worst, abs(na - nb) / max(na, 1e-30),
                    abs(pa - pb) / max(na, 1e-30))
  return worst


# ------------------------------------------------------------------ files
def path_of(experiment: str) -> str:
  return os.path.join(GOLDEN_DIR, f"{experiment}.json")


def load(experiment: str) -> dict:
  with open(path_of(experiment)) as f:
    return json.load(f)


def _provenance() -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True,
                            check=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "jirm",
                                 "experiments"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip())
  except (OSError, subprocess.CalledProcessError):
    commit, dirty = "unknown", True
  cpu = ""
  with contextlib.suppress(OSError):
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                if l.startswith("model name")), "")
  return dict(commit=commit, jirm_tree_dirty=dirty, cpu=cpu or platform.machine(),
              jax=jax.__version__, xla_flags=os.environ.get("XLA_FLAGS", ""))


def main(argv=None):
  # The experiments' and the test suite's CPU settings (XLA kernel library,
  # and with it the stem's convolution lowering): record under the same.
  from jirm import runtime  # pylint: disable=g-import-not-at-top
  runtime.configure_cpu()
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--record", action="store_true")
  p.add_argument("--check", action="store_true")
  p.add_argument("--only", default="", help="comma list of experiments")
  p.add_argument("--methods", default="", help="with --record and one "
                 "--only experiment: record only these (new) methods' cases "
                 "into its file; the other cases and the file's provenance "
                 "stay, the added cases' provenance goes under 'added'")
  a = p.parse_args(argv)
  names = [n for n in a.only.split(",") if n] or list(EXPERIMENTS)
  for n in names:
    if n not in EXPERIMENTS:
      print(f"--only={n!r}: choose from {sorted(EXPERIMENTS)}.",
            file=sys.stderr)
      return 2
  if a.record == a.check:
    print("give exactly one of --record or --check.", file=sys.stderr)
    return 2
  methods = [m for m in a.methods.split(",") if m]
  if methods:
    bad = [m for m in methods if len(names) != 1 or
           m not in EXPERIMENTS[names[0]]]
    if not a.record or bad:
      print(f"--methods={a.methods}: give it with --record and one --only "
            f"experiment whose methods include it.", file=sys.stderr)
      return 2
    doc = load(names[0])
    for m in methods:
      doc["cases"][m] = run_case(names[0], m)
      doc.setdefault("added", {})[m] = _provenance()
    tmp = path_of(names[0]) + ".tmp"
    with open(tmp, "w") as f:
      json.dump(doc, f, indent=1, sort_keys=True)
      f.write("\n")
    os.replace(tmp, path_of(names[0]))
    print(f"added {', '.join(methods)} to {path_of(names[0])}")
    return 0
  failed = 0
  for name in names:
    cases = {m: run_case(name, m) for m in EXPERIMENTS[name]}
    if a.record:
      os.makedirs(GOLDEN_DIR, exist_ok=True)
      doc = dict(provenance=_provenance(), steps=STEPS, cases=cases)
      tmp = path_of(name) + ".tmp"
      with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.write("\n")
      os.replace(tmp, path_of(name))
      print(f"recorded {path_of(name)} ({len(cases)} cases)")
    else:
      golden = load(name)["cases"]
      for m, got in cases.items():
        bad = compare(name, golden[m], got)
        failed += bool(bad)
        print(f"{name}/{m}: max rel diff {max_rel_diff(golden[m], got):.2e}"
              + ("" if not bad else "  MISMATCH: " + bad[0]))
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
