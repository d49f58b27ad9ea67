import sys
sys.path.insert(0, '/work/main')
import jirm
jirm.runtime.configure_cpu()
from experiments import sparse_irm
from experiments.configs import sparse_irm as cfgs
c = cfgs.get_config("sparse_irm", "paper", hidden_dim=640)
b = sparse_irm.build_method(c, 0)
jirm.fit(b.splits, b.method, steps=200, eval_every=10, seed=0, checkpoint_dir='/tmp/evx/new_ckpt', checkpoint_every=100)
print("done")
