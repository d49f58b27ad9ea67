r"""Cross-check of jirm's SparseIRM trainer with an independent PyTorch loop.

The loop follows SPEC §4 in eager PyTorch float32, the setting of SparseIRM's
released code (whose main.py needs CUDA and cannot run here): relaxed masks
``sigmoid((log(s + 1e-20) - log(1 - s + 1e-20) + L) * T)`` without clipping,
the IRMv1 ``env_scale`` penalty by autograd with ``create_graph``, weights
Adam 6e-4 and scores Adam 6e-3 (score steps from 28% of training), the
projection after every step by the bisection SparseIRM uses (at most 21
halvings of ``[0, max s]``, tolerance 1e-3, no projection when
``sum s < k``) with its per-epoch cubic budget, and one Bernoulli mask per
evaluation. Data and initial weights are jirm's (``experiments.sparse_irm``
for the given seed), so the runs differ only in the training code and the
random draws.

    TFDS_DATA_DIR=... .venv/bin/python scripts/sparse_irm_torch_check.py \
        --hidden=390 --seed=0 --out=curve.json

Writes ``{"step", "train_acc", "test_acc", "density", "wall_s", ...}`` as
JSON (atomically) and prints the last step and the paper's selection rule.
``--plot=OUT.png --jax_results=results.jsonl A.json B.json`` draws these
curves beside jirm's (same method, width and seed) from a results file.
"""

import argparse
import json
import time

import numpy as np
import torch

from jirm import results as results_lib

_EPS = 1e-20


def _bisect_shift(scores, keep):
  """SparseIRM's projection shift: bisection on v, at most 21 halvings."""
  k = sum(s.numel() for s in scores) * keep
  f = lambda v: sum((s - v).clamp(0, 1).sum() for s in scores) - k
  if f(0.0) < 0:
    return 0.0
  lo, hi = 0.0, max(float(s.max()) for s in scores)
  for it in range(1, 100):
    v = (lo + hi) / 2
    obj = float(f(v))
    if abs(obj) < 1e-3 or it > 20:
      break
    lo, hi = (lo, v) if obj < 0 else (v, hi)
  return max(0.0, v)


def plot(jsons, jax_results, out):
  """Test accuracy of the PyTorch loop and of jirm per seed, one panel each."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  runs = [json.load(open(p)) for p in jsons]
  jax_curves = {}
  for line in open(jax_results):
    r = json.loads(line)
    if (r["method"] == "sparse_irm" and r["selection"] == "last"
        and r.get("penalty") == "irmv1"):
      jax_curves[(r["hidden_dim"], r["seed"])] = r["curve"]
  fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4),
                           squeeze=False)
  for ax, run in zip(axes[0], runs):
    ax.plot(run["step"], 100 * np.asarray(run["test_acc"]), lw=0.7,
            label="PyTorch loop (SPEC §4, eager float32)")
    c = jax_curves.get((run["hidden"], run["seed"]))
    if c:
      ax.plot(c["step"], 100 * np.asarray(c["test_acc"]), lw=0.7,
              label="jirm.methods.sparse.fit")
    ax.axvline(200, color="k", ls=":", lw=0.8)
    ax.axvline(0.28 * run["epochs"], color="k", ls="--", lw=0.8)
    ax.set(xlabel="step (dotted: penalty on; dashed: scores unfreeze)",
           ylabel="test accuracy %",
           title=f"SparseIRM H={run['hidden']} seed {run['seed']}")
    ax.legend(fontsize=7)
  fig.tight_layout()
  results_lib.save_figure(fig, out, dpi=100)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--hidden", type=int, default=390)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--epochs", type=int, default=1500)
  ap.add_argument("--keep", type=float, default=0.95)
  ap.add_argument("--out", help="JSON output of a run.")
  ap.add_argument("--data_dir", default=None)
  ap.add_argument("--plot", help="PNG: plot the given run JSONs instead.")
  ap.add_argument("--jax_results", help="jirm results.jsonl for --plot.")
  ap.add_argument("runs", nargs="*", help="run JSONs for --plot.")
  args = ap.parse_args()
  if args.plot:
    if not args.runs or not args.jax_results:
      ap.error("--plot needs --jax_results and run JSON files.")
    return plot(args.runs, args.jax_results, args.plot)
  if not args.out:
    ap.error("--out is required (or use --plot).")
  torch.set_num_threads(1)
  torch.manual_seed(args.seed)

  import jax  # pylint: disable=g-import-not-at-top
  import jirm  # pylint: disable=g-import-not-at-top
  from experiments import sparse_irm as exp  # pylint: disable=g-import-not-at-top
  from experiments.configs import sparse_irm as cfg  # pylint: disable=g-import-not-at-top
  config = cfg.get_config("sparse_irm", "paper", hidden_dim=args.hidden)
  splits = exp.build_data(config, args.seed, args.data_dir)
  train = jirm.train.EnvArrays.from_envs(splits.train)
  test = jirm.train.EnvArrays.from_envs(splits.test)
  if not (bool(np.all(train.valid)) and bool(np.all(test.valid))):
    raise ValueError("expected equal-size environments (no padding).")
  x_tr = torch.tensor(np.asarray(train.x).reshape(-1, 392))
  y_tr = torch.tensor(np.asarray(train.y).reshape(-1, 1), dtype=torch.float32)
  g_tr = torch.tensor(np.repeat(np.arange(train.x.shape[0]),
                                train.x.shape[1]))
  x_te = torch.tensor(np.asarray(test.x).reshape(-1, 392))
  y_te = torch.tensor(np.asarray(test.y).reshape(-1, 1), dtype=torch.float32)
  num_envs = int(train.x.shape[0])

  # jirm's initial weights for this seed (sparse.fit's init key).
  model = jirm.models.mlp(args.hidden, 2)
  k_init = jax.random.split(jax.random.key(args.seed))[0]
  init = jax.tree.map(np.asarray, model.init(k_init, train.x[0, :1]))
  dense = [init["params"][k] for k in ("hidden_0", "hidden_1", "head")]
  weights = [torch.tensor(d["kernel"].T.copy(), requires_grad=True)
             for d in dense]
  biases = [torch.tensor(d["bias"].copy(), requires_grad=True)
            for d in dense]
  scores = [torch.ones_like(w, requires_grad=True) for w in weights]
  env_scale = torch.ones(num_envs, 1, requires_grad=True)
  w_opt = torch.optim.Adam(weights + biases, lr=config.lr)
  s_opt = torch.optim.Adam(scores, lr=config.score_lr)
  ts, te = int(0.28 * args.epochs), int(0.6 * args.epochs)

  def forward(x, masks):
    h = x
    for i, (w, b, m) in enumerate(zip(weights, biases, masks)):
      h = torch.nn.functional.linear(h, w * m, b)
      if i < len(weights) - 1:
        h = torch.relu(h)
    return h

  def accuracy(logits, y):
    return float(((logits > 0).float() == y).float().mean())

  hist = {k: [] for k in ("step", "train_acc", "test_acc", "density")}
  t0 = time.time()
  for epoch in range(args.epochs):
    keep = (1.0 if epoch < ts else args.keep if epoch >= te else
            args.keep + (1 - args.keep) * (1 - (epoch - ts) / (te - ts)) ** 3)
    temp = 1 / ((1 - 0.03) * (1 - epoch / args.epochs) + 0.03)
    masks = []
    for s in scores:
      u0, u1 = torch.rand_like(s), torch.rand_like(s)
      noise = -torch.log(torch.log(u0 + _EPS) / torch.log(u1 + _EPS) + _EPS)
      masks.append(torch.sigmoid(
          (torch.log(s + _EPS) - torch.log(1.0 - s + _EPS) + noise) * temp))
    logits = env_scale[g_tr] * forward(x_tr, masks)
    nll = torch.nn.functional.binary_cross_entropy_with_logits(logits, y_tr)
    grad = torch.autograd.grad(nll * num_envs, env_scale, create_graph=True)[0]
    penalty = torch.mean(grad ** 2)
    l2 = sum(w.pow(2).sum() for w in weights) + sum(
        b.pow(2).sum() for b in biases)
    pw = config.penalty_weight if epoch >= config.anneal else 0.0
    loss = nll + config.l2 * l2 + pw * penalty
    if pw > 1.0:
      loss = loss / (1.0 + pw)
    w_opt.zero_grad()
    s_opt.zero_grad()
    loss.backward()
    if epoch >= ts:
      s_opt.step()
    w_opt.step()
    with torch.no_grad():
      v = _bisect_shift(scores, keep)
      for s in scores:
        s.sub_(v).clamp_(0, 1)
      hard = [(torch.rand_like(s) < s).float() for s in scores]
      hist["step"].append(epoch + 1)
      hist["train_acc"].append(accuracy(forward(x_tr, hard), y_tr))
      hist["test_acc"].append(accuracy(forward(x_te, hard), y_te))
      hist["density"].append(float(sum(s.sum() for s in scores) /
                                   sum(s.numel() for s in scores)))
    if epoch % 100 == 0:
      print(f"epoch {epoch}: train {hist['train_acc'][-1]:.3f} test "
            f"{hist['test_acc'][-1]:.3f} density {hist['density'][-1]:.4f} "
            f"({time.time() - t0:.0f}s)", flush=True)
  tr, te_ = np.asarray(hist["train_acc"]), np.asarray(hist["test_acc"])
  ok = tr > 0.6
  result = dict(hist, hidden=args.hidden, seed=args.seed, epochs=args.epochs,
                keep=args.keep, wall_s=time.time() - t0,
                last_test=float(te_[-1]),
                paper_rule_test=float(te_[ok].max()) if ok.any() else None,
                paper_rule_step=(int(np.asarray(hist["step"])[ok][
                    te_[ok].argmax()]) if ok.any() else None))
  results_lib.atomic_write(args.out, json.dumps(result))
  print(f"last test {result['last_test']:.4f}; paper rule "
        f"{result['paper_rule_test']} (step {result['paper_rule_step']}); "
        f"{result['wall_s']:.0f}s")


if __name__ == "__main__":
  main()
