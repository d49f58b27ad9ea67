r"""Score gradients of SparseIRM at the step the scores unfreeze.

Restores a checkpoint of an ``experiments.sparse_irm`` run (ColoredMNIST,
preset ``paper``) taken before 28% of training, projects the scores onto the
first tightened budget and splits the score gradient of the objective at
penalty weight 1e4 into its terms (ERM, l2, IRMv1): each term's share of
``sum |g|``, how often its sign agrees with the total, and how many scores
have ``|g|`` above Adam's ``eps`` (1e-8), i.e. get a full-size first Adam step.

    TFDS_DATA_DIR=... .venv/bin/python scripts/sparse_irm_score_grad.py \
        --checkpoint_dir=RUN/checkpoints/<restart> --seed=1 --hidden=390

(The manager keeps the last two checkpoints; copy step 400 while the run is
between steps 400 and 600.)
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jirm
from experiments import sparse_irm as exp
from experiments.configs import sparse_irm as cfg
from jirm.methods import masks
from jirm import objectives
from jirm.methods import sparse
from jirm import train as train_lib


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--checkpoint_dir", required=True)
  ap.add_argument("--seed", type=int, required=True)
  ap.add_argument("--hidden", type=int, default=390)
  ap.add_argument("--step", type=int, default=421,
                  help="step whose temperature and budget are used")
  args = ap.parse_args()
  config = cfg.get_config("sparse_irm", "paper", hidden_dim=args.hidden)
  splits = exp.build_data(config, args.seed)
  model = jirm.models.mlp(args.hidden, config.depth)
  objective = exp.build_objective(config)
  train = train_lib.EnvArrays.from_envs(splits.train)
  params = model.init(jax.random.key(0), train.x[0, :1])
  scores = masks.init_scores(params)
  state = sparse.SparseState(
      jnp.zeros((), jnp.int32), params, scores, optax.adam(0.).init(params),
      optax.adam(0.).init(scores), jax.random.key(0))
  state, _ = train_lib._Checkpointer(args.checkpoint_dir).restore(state, [])  # pylint: disable=protected-access
  temp = masks.inverse_temperature(args.step, config.steps)
  keep = masks.keep_ratio(args.step, config.steps, config.keep,
                          config.score_start, config.budget_end)
  s_proj = masks.project(state.scores, keep * masks.num_scores(scores))
  rng = jax.random.key(123)

  def aux_of(sc):
    m = masks.relaxed(sc, rng, temp)
    logits = train_lib.forward(model.apply, masks.apply(state.params, m),
                               train.x)
    out = objectives.Outputs(logits, train.y, train.valid, state.params,
                             None, "binary")
    return objective(out, args.step)[1]

  aux = aux_of(s_proj)
  names = [k[5:] for k in aux if k.startswith("term/")]
  flat = lambda t: np.asarray(jnp.concatenate(
      [g.ravel() for g in jax.tree.leaves(t)]))
  term = lambda n: lambda sc: (lambda a: a["term/" + n] * a["weight/" + n]
                               / a["rescale"])(aux_of(sc))
  grads = {n: flat(jax.grad(term(n))(s_proj)) for n in names}
  total = sum(grads.values())
  print(f"restored step {int(state.step)}; step {args.step}: T {float(temp):.3f},"
        f" keep {float(keep):.5f}; terms " + ", ".join(
            f"{n} {float(aux['term/' + n]):.3g} (w {float(aux['weight/' + n]):g})"
            for n in names) + f"; divisor {float(aux['rescale']):g}")
  nz = total != 0
  for n, g in grads.items():
    print(f"  {n}: share of sum|g| {np.abs(g).sum() / np.abs(total).sum():.3f}, "
          f"sign agrees with the total on {np.mean(np.sign(g[nz]) == np.sign(total[nz])):.3f}"
          f" of nonzero coordinates")
  a = np.abs(total)
  print(f"  total: median |g| {np.median(a):.2e}, 90th pct {np.percentile(a, 90):.2e}, "
        f"|g| > 1e-8 on {np.mean(a > 1e-8):.3f}, exactly 0 on {np.mean(a == 0):.3f}; "
        f"mean first Adam step |g|/(|g|+1e-8) = {np.mean(a / (a + 1e-8)):.3f} x lr")


if __name__ == "__main__":
  main()
