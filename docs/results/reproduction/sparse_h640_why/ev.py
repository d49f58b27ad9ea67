import sys, time
sys.path.insert(0, '/work/main')
import numpy as np, jax
import jirm
jirm.runtime.configure_cpu()
from experiments import sparse_irm
from experiments.configs import sparse_irm as cfgs
H = int(sys.argv[1]); steps = int(sys.argv[2]); method = sys.argv[3]
c = cfgs.get_config(method, "paper", hidden_dim=H)
b = sparse_irm.build_method(c, 0)
out = {}
for ev in (1, 10):
  t = time.time()
  res = jirm.fit(b.splits, b.method, steps=steps, eval_every=ev, seed=0)
  leaves = [np.asarray(l) for l in jax.tree.leaves(res.state) if hasattr(l, 'dtype') and not jirm.train.is_key(l)]
  out[ev] = leaves
  print(ev, time.time() - t, flush=True)
d = max(float(np.abs(a.astype(np.float64) - b_.astype(np.float64)).max()) for a, b_ in zip(out[1], out[10]))
print("max abs state diff eval_every 1 vs 10:", d, "bitwise equal:", all(np.array_equal(a, b_) for a, b_ in zip(out[1], out[10])))
