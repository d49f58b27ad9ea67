"""Run by test_resume.py as a subprocess: the ColoredMNIST experiment's
restart loop (2 IRMv1 restarts, orbax checkpoints every 20 steps) on
synthetic MNIST, writing to argv[1]. The same command is killed and rerun."""

import sys

import jax

import jirm
from experiments import colored_mnist


def main(output_dir):
  jirm.runtime.configure_cpu()
  mnist = jirm.data.synthetic_mnist(num_train=3000, num_test=500, seed=0)
  colored_mnist.run(["irmv1"], "quick", restarts=2, seed=0,
                    output_dir=output_dir, progress=False, mnist=mnist,
                    overrides=["steps=200", "checkpoint_every=20",
                               "eval_every=10", "anneal=100"])
  print("done", jax.device_count(), flush=True)


if __name__ == "__main__":
  main(sys.argv[1])
