import sys
import numpy as np
import orbax.checkpoint as ocp
import jax
def load(d, step):
  m = ocp.CheckpointManager(d)
  r = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return r["state"]
for step in (100, 200):
  a = load('/tmp/evx/old_ckpt', step); b = load('/tmp/evx/new_ckpt', step)
  fa = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(a)[0]}
  fb = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(b)[0]}
  print(step, len(fa), len(fb), sorted(set(fa) ^ set(fb))[:6])
  worst = []
  for k in sorted(set(fa) & set(fb)):
    x, y = fa[k].astype(np.float64), fb[k].astype(np.float64)
    if x.shape != y.shape: print('shape', k, x.shape, y.shape); continue
    d = np.abs(x - y).max() if x.size else 0.0
    rel = d / max(np.abs(x).max(), 1e-30) if x.size else 0.0
    worst.append((rel, d, k, np.array_equal(fa[k], fb[k])))
  worst.sort(reverse=True)
  print(' bitwise equal leaves:', sum(w[3] for w in worst), 'of', len(worst))
  for w in worst[:6]: print('  ', w)
