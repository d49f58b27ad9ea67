r"""ResNet train-step time: jirm (JAX) vs PyTorch, and each deep method vs ERM.

  python -m benchmarks.resnet_step_time          # needs torch==2.13.0 (CPU)

Measures, in one run with interleaved rounds (machine load affects all
variants alike; the median per variant is reported):
  * ResNet-18, batch 128, 64x32 inputs and ResNet-50, batch 32: one SGD
    (momentum) step of sigmoid BCE on a linear head, BatchNorm in train mode,
    for jirm with ``lowering='auto'`` (small convolutions as patches + one
    matmul), jirm with ``lowering='xla'`` (stock ``lax.conv``) and the same
    network in plain PyTorch (:mod:`jirm.models.torch_resnet`). Targets (issue 3):
    jirm / torch <= 1.0 (ResNet-18) and <= 0.9 (ResNet-50).
  * Every CIFAR-MNIST method's jitted step on ResNet-18 (2 envs x 64) divided
    by ERM's (target: InvRat-EC <= 1.3x).
"""

from __future__ import annotations

import os
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jirm.methods import deep
from jirm import runtime
from jirm import train as train_lib
from jirm import models

flags.DEFINE_integer("rounds", 3, "Interleaved timing rounds.")
flags.DEFINE_integer("steps_per_round", 3, "Steps per variant per round.")
flags.DEFINE_bool("methods", True, "Also time every method against ERM.")
flags.DEFINE_bool("torch", True, "Time PyTorch (skipped if not installed).")
flags.DEFINE_bool("configure_cpu", True,
                  "Call jirm.runtime.configure_cpu() first (its host-memory "
                  "setting applies to jirm and torch alike).")
flags.DEFINE_list("archs", ["resnet18", "resnet50"], "Architectures to time.")
FLAGS = flags.FLAGS


def _jax_step(arch, batch, lowering):
  model = models.deep_model(arch, lowering=lowering)
  x = jnp.asarray(np.random.default_rng(0).random((batch, 64, 32, 3),
                                                  np.float32))
  y = jnp.asarray(np.arange(batch) % 2, jnp.float32)
  params, stats = model.init(jax.random.key(0), x[:1])
  opt = optax.sgd(0.01, 0.9)

  @jax.jit
  def step(params, stats, opt_state):
    def loss(p):
      feats, new_stats = model.features(p, stats, x, train=True)
      logits = model.head_fn(p["head"], feats)[:, 0]
      return optax.sigmoid_binary_cross_entropy(logits, y).mean(), new_stats
    g, new_stats = jax.grad(loss, has_aux=True)(params)
    u, opt_state = opt.update(g, opt_state, params)
    return optax.apply_updates(params, u), new_stats, opt_state

  carry = [params, stats, opt.init(params)]

  def run():
    carry[:] = step(*carry)
    jax.block_until_ready(carry)
  return run


def _torch_step(arch, batch):
  import torch  # pylint: disable=g-import-not-at-top
  from jirm.models import torch_resnet  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = getattr(torch_resnet, arch)(num_classes=1)
  model.train()
  x = torch.rand(batch, 3, 64, 32)
  y = (torch.arange(batch) % 2).float()
  opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

  def run():
    opt.zero_grad()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(
        model(x)[:, 0], y)
    loss.backward()
    opt.step()
  return run


def _method_steps():
  from experiments import cifar_mnist  # pylint: disable=g-import-not-at-top
  from experiments.configs import cifar_mnist as configs  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  n = 256
  splits_x = jnp.asarray(rng.random((2, n, 64, 32, 3), np.float32))
  data = train_lib.EnvArrays(splits_x, jnp.asarray(
      rng.integers(0, 2, (2, n)), jnp.int32), jnp.ones((2, n)))
  sources = __import__("jirm").data.synthetic_cifar_mnist_sources(400)
  out = {}
  for method in configs.METHODS:
    if method == "oracle":
      continue
    config = configs.get_config(method, "cpu")
    config.data.train_num, config.data.test_num = 400, 100
    _, model, objective, optimizer, kw = cifar_mnist.build_run(
        config, 0, sources=sources)
    params, stats = model.init(jax.random.key(0), data.x[0, :1])
    game = kw["game"]
    state = deep.DeepState(
        jnp.zeros((), jnp.int32), params, stats, optimizer.init(params),
        () if game is None else game.init(jax.random.key(1), params["head"],
                                          model.encoder.num_features, 2),
        jax.random.key(0))
    step = jax.jit(deep.make_step(
        model, objective, optimizer, batch_size=64, game=game, anneal_step=0,
        head_update=kw["head_update"]))
    carry = [state]

    def run(step=step, carry=carry):
      carry[0] = step(carry[0], data)[0]
      jax.block_until_ready(carry[0])
    out[method] = run
  return out


def _time(fns, rounds, steps):
  for f in fns.values():  # Compile / warm up.
    f()
    f()
  times = {k: [] for k in fns}
  for _ in range(rounds):
    for k, f in fns.items():
      t = time.perf_counter()
      for _ in range(steps):
        f()
      times[k].append((time.perf_counter() - t) / steps)
  return {k: float(np.median(v)) for k, v in times.items()}


def main(argv):
  del argv
  if FLAGS.configure_cpu:
    print("jirm.runtime.configure_cpu():", runtime.configure_cpu(),
          "XLA_FLAGS:", os.environ.get("XLA_FLAGS"))
  fns = {}
  for arch, batch in (("resnet18", 128), ("resnet50", 32)):
    if arch not in FLAGS.archs:
      continue
    fns[f"{arch}/jirm_auto"] = _jax_step(arch, batch, "auto")
    fns[f"{arch}/jirm_xla"] = _jax_step(arch, batch, "xla")
    if FLAGS.torch:
      try:
        fns[f"{arch}/torch"] = _torch_step(arch, batch)
      except ImportError:
        print("torch not installed: pip install torch==2.13.0")
  t = _time(fns, FLAGS.rounds, FLAGS.steps_per_round)
  print(f"jax {jax.__version__}, {jax.device_count()} CPU device(s)")
  for arch, batch, target in (("resnet18", 128, 1.0), ("resnet50", 32, 0.9)):
    if arch not in FLAGS.archs:
      continue
    line = (f"{arch} batch {batch}: jirm auto {t[arch + '/jirm_auto']:.3f} s,"
            f" jirm xla {t[arch + '/jirm_xla']:.3f} s")
    if arch + "/torch" in t:
      r = t[arch + "/jirm_auto"] / t[arch + "/torch"]
      line += (f", torch {t[arch + '/torch']:.3f} s -> jirm/torch {r:.2f}x "
               f"(target <= {target}), stock-lax/torch "
               f"{t[arch + '/jirm_xla'] / t[arch + '/torch']:.2f}x")
    print(line)
  if FLAGS.methods:
    tm = _time(_method_steps(), FLAGS.rounds, FLAGS.steps_per_round)
    for k, v in tm.items():
      note = " (target <= 1.3)" if k.startswith("invrat_ec") else ""
      print(f"  {k:12s} {v:.3f} s  {v / tm['erm']:.2f}x ERM{note}")


if __name__ == "__main__":
  app.run(main)
