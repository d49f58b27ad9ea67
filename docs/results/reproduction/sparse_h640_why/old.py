import sys
sys.path.insert(0, '/work/wt-old')
import jirm
jirm.runtime.configure_cpu()
from experiments import sparse_irm
from experiments.configs import sparse_irm as cfgs
c = cfgs.get_config("sparse_irm", "paper", hidden_dim=640)
print(c.eval_every, c.checkpoint_every, flush=True)
sparse_irm.run_restart(c, 0, checkpoint_dir='/tmp/evx/old_ckpt')
