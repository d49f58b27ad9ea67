r"""Step-by-step trace of one CIFAR-MNIST run, to compare two checkouts.

Runs the experiment's own ``build_run`` and ``deep.make_step`` (the code of
whichever checkout ``--repo`` names) for ``--steps`` steps from the seed's
initial state and writes, to ``--out`` (an ``.npz``):

* ``data/*``: checksums of the training / test arrays and the first batch;
* ``init/*``: the initial parameters and BatchNorm statistics (flattened);
* ``grad0/*``: the first step's gradient of every parameter, as the step
  hands it to the optimizer (a transformation that stores the gradient as
  its state and returns zero updates), and the BatchNorm statistics after
  that step;
* ``loss`` / ``train_acc`` per step of the real optimizer;
* ``params@K`` / ``stats@K`` (flattened) at the steps in ``--save_at``;
* ``test_acc@K``: eval-mode accuracy on the test environment at those steps.

Then ``--compare=a.npz,b.npz`` prints where two traces part: per quantity
the largest relative difference, and per saved step the relative parameter
distance ||p_a - p_b|| / ||p_a||. Used for docs/reproduction.md:

  python scripts/cifar_mnist_trace.py --repo=/path/old --method=invrat_ec_h \
      --steps=100 --out=/tmp/old.npz
  python scripts/cifar_mnist_trace.py --repo=. --method=invrat_ec_h \
      --steps=100 --out=/tmp/new.npz
  python scripts/cifar_mnist_trace.py --compare=/tmp/old.npz,/tmp/new.npz

``--perturb=EPS`` multiplies every initial parameter by ``1 + EPS * u``
(``u`` uniform in [-1, 1], fixed key): the same run with an initial state
changed at the level of float32 rounding, to measure sensitivity.
"""

from __future__ import annotations

import argparse
import os
import sys


def _flat(tree):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(k): np.asarray(v, np.float32)
          for k, v in leaves}


def trace(args):
  sys.path.insert(0, os.path.abspath(args.repo))
  import jirm  # pylint: disable=g-import-not-at-top
  if args.configure_cpu and hasattr(jirm, "runtime"):
    jirm.runtime.configure_cpu()
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from experiments import cifar_mnist  # pylint: disable=g-import-not-at-top
  from experiments.configs import cifar_mnist as configs  # pylint: disable=g-import-not-at-top
  from jirm.methods import deep  # pylint: disable=g-import-not-at-top
  from jirm import train as train_lib  # pylint: disable=g-import-not-at-top
  print("jirm from", os.path.dirname(jirm.__file__), "jax", jax.__version__)

  config = configs.get_config(args.method, args.preset, "resnet18", 2)
  splits, model, objective, optimizer, kw = cifar_mnist.build_run(
      config, args.seed)
  train = train_lib.EnvArrays.from_envs(splits.train)
  test = train_lib.EnvArrays.from_envs(splits.test)
  out = {"data/train_x_sum": np.float64(np.asarray(splits.train.x,
                                                   np.float64).sum()),
         "data/train_y": np.asarray(splits.train.y),
         "data/test_x_sum": np.float64(np.asarray(splits.test.x,
                                                  np.float64).sum())}
  k_init, k_game, k_train = jax.random.split(jax.random.key(args.seed), 3)
  params, batch_stats = model.init(k_init, train.x[0, :1])
  if args.perturb:
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(12345), len(leaves))
    leaves = [p * (1 + args.perturb * jax.random.uniform(k, p.shape,
                                                          minval=-1.0))
              for p, k in zip(leaves, keys)]
    params = jax.tree.unflatten(treedef, leaves)
  game = kw["game"]
  game_state = () if game is None else game.init(
      k_game, params["head"], model.encoder.num_features,
      splits.train.num_envs)
  first = train_lib.epoch_batch(train, k_train, jnp.zeros((), jnp.int32),
                                kw["batch_size"])
  out["data/first_batch_x_sum"] = np.float64(np.asarray(first.x,
                                                        np.float64).sum())
  out["data/first_batch_y"] = np.asarray(first.y)
  for k, v in _flat(params).items():
    out["init/params" + k] = v
  for k, v in _flat(batch_stats).items():
    out["init/stats" + k] = v

  def make(opt):
    return jax.jit(deep.make_step(
        model, objective, opt, batch_size=kw["batch_size"], task=splits.task,
        game=game, anneal_step=kw["anneal_step"],
        head_update=kw["head_update"], transform=kw["transform"]))

  def state0(opt):
    return deep.DeepState(jnp.zeros((), jnp.int32), params, batch_stats,
                          opt.init(params), game_state, k_train)

  # The gradient itself, not p0 - p1 of an SGD step (which loses the low
  # bits of every gradient smaller than its parameter).
  capture = optax.GradientTransformation(
      lambda p: jax.tree.map(jnp.zeros_like, p),
      lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))
  s1, aux = make(capture)(state0(capture), train)
  for k, v in _flat(s1.opt_state).items():
    out["grad0/params" + k] = v
  for k, v in _flat(s1.batch_stats).items():
    out["grad0/stats" + k] = v
  out["grad0/loss"] = np.float32(aux["total"])

  method = deep.deep_method(
      model, objective, optimizer, batch_size=kw["batch_size"],
      task=splits.task, game=game, anneal_step=kw["anneal_step"],
      head_update=kw["head_update"], transform=kw["transform"])
  acc_fn = jax.jit(train_lib.make_accuracy_fn(method.predict, splits.task,
                                              chunk=500))
  step_fn = make(optimizer)
  state = state0(optimizer)
  save_at = {int(s) for s in args.save_at.split(",") if s}
  losses, accs = [], []
  for step in range(1, args.steps + 1):
    state, aux = step_fn(state, train)
    losses.append(float(aux["total"]))
    accs.append(float(aux["train_acc"]))
    if step in save_at or step == args.steps:
      out[f"params@{step}"] = np.concatenate(
          [v.ravel() for v in _flat(state.params).values()])
      out[f"stats@{step}"] = np.concatenate(
          [v.ravel() for v in _flat(state.batch_stats).values()])
      out[f"test_acc@{step}"] = np.asarray(
          acc_fn(state, test))
      print(f"step {step}: loss {losses[-1]:.6f} train_acc {accs[-1]:.4f} "
            f"test_acc {out[f'test_acc@{step}']}", flush=True)
  out["loss"] = np.asarray(losses)
  out["train_acc"] = np.asarray(accs)
  np.savez(args.out, **out)
  print("wrote", args.out)


def _rel(a, b):
  import numpy as np  # pylint: disable=g-import-not-at-top
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))


def compare(paths):
  import numpy as np  # pylint: disable=g-import-not-at-top
  a, b = (np.load(p) for p in paths)
  keys = [k for k in a.files if k in b.files]
  only = sorted(set(a.files) ^ set(b.files))
  if only:
    print("only in one trace:", only[:10])
  groups = {}
  for k in keys:
    group = k.split("/")[0].split("@")[0]
    if "@" in k or k in ("loss", "train_acc"):
      continue
    groups.setdefault(group, []).append((_rel(a[k], b[k]), k))
  for group, vals in groups.items():
    worst = max(vals)
    print(f"{group:8s} {len(vals):3d} arrays, largest relative difference "
          f"{worst[0]:.2e} ({worst[1]})")
  la, lb = a["loss"], b["loss"]
  n = min(len(la), len(lb))
  rel = np.abs(la[:n] - lb[:n]) / np.maximum(np.abs(la[:n]), 1e-30)
  print("step  loss_a      loss_b      rel.diff  train_acc a/b")
  for i in sorted({0, 1, 2, 4, 9, 19, 34, 49, 69, 70, 71, 79, 99, 139, 209,
                   279} & set(range(n))):
    print(f"{i + 1:4d}  {la[i]:.6f}  {lb[i]:.6f}  {rel[i]:.1e}   "
          f"{a['train_acc'][i]:.3f} / {b['train_acc'][i]:.3f}")
  saved = sorted({int(k.split("@")[1]) for k in keys if k.startswith("params@")})
  print("step  ||p_a - p_b|| / ||p_a||  stats rel.diff  test_acc a / b")
  for s in saved:
    print(f"{s:4d}  {_rel(a[f'params@{s}'], b[f'params@{s}']):.2e}"
          f"                 {_rel(a[f'stats@{s}'], b[f'stats@{s}']):.2e}"
          f"        {a[f'test_acc@{s}']} / {b[f'test_acc@{s}']}")


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--repo", default=".")
  p.add_argument("--method", default="invrat_ec_h")
  p.add_argument("--preset", default="cpu")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--steps", type=int, default=100)
  p.add_argument("--save_at", default="1,10,35,70,100,140,210,280")
  p.add_argument("--perturb", type=float, default=0.0)
  p.add_argument("--configure_cpu", type=int, default=1)
  p.add_argument("--out")
  p.add_argument("--compare")
  args = p.parse_args()
  if args.compare:
    compare(args.compare.split(","))
  elif not args.out:
    p.error("--out (or --compare) is required")
  else:
    trace(args)


if __name__ == "__main__":
  main()
