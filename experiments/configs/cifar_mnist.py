r"""CIFAR-MNIST configs (IRMBed, "An Empirical Study of IRM on Deep Models").

Presets:
  * ``cpu``: runs on a 2-core CPU in about 10-20 minutes per restart: native
    64x32 inputs, ImageNet stem, ResNet trained from scratch (no pretrained
    weights here), Adam lr 1e-3 with cosine decay, 4 epochs of 9,000 images (batch 64 per
    env), penalty on from epoch 1.

      python -m experiments.cifar_mnist --method=all --preset=cpu \
          --model=resnet18 --envs=2 --restarts=2 --output_dir=/tmp/cifar

  * ``irmbed``: the paper's protocol for GPU machines: ImageNet-pretrained
    torchvision weights (``--config.pretrained=/path/resnet18.pth``), 224x224
    random-resized crops + flips + ImageNet normalisation, SGD lr 0.01
    momentum 0.9, 100 epochs, batch 128 (ResNet-18) / 32 (ResNet-50), penalty
    weight searched in 1..1e5 (``--config.penalty_weight=...``).
  * ``quick``: tiny ResNet on 400 images for smoke tests.

Expected (IRMBed Table 1, R18 2Env, pretrained): oracle 83.7, ERM 39.5,
IRMv1(o) 70.8, REx(o) 52.5, RVP(o) 49.4, IRMv1(h) 48.6, IRMGame(h) 43.0,
InvRat-EB(h) 77.6, InvRat-EC(o) 67.5, InvRat-EC(h) 75.8.
"""

import ml_collections

from experiments.configs import config_string

from jirm.methods import registry

METHODS = registry.names("cifar_mnist")  # IRMBed Table 1's rows.

# Not in IRMBed's Table 1; run with --method=ipg.
EXTRA_METHODS = registry.names("cifar_mnist", extra=True)[len(METHODS):]

# Penalty weights of the cpu preset (one value each; IRMBed searched 1..1e5).

CPU_WEIGHTS = dict(irmv1=1e3, vrex=1e3, rvp=1e2, irmv1_h=1e3, irm_game_h=0.0,
                   invrat_eb=1e2, invrat_ec_o=1e2, invrat_ec_h=1e2)


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = "erm"
  c.preset = "cpu"
  c.model = "resnet18"
  c.stem = "imagenet"
  c.lowering = "auto"
  c.width = 0               # 0 = the architecture's default (64).
  c.pretrained = ""         # path to a torchvision .pth state dict.
  c.data = ml_collections.ConfigDict(dict(
      envs="2env", label_noise=0.1, val="holdout", val_fraction=0.1,
      train_num=10_000, test_num=0, transform="none"))
  c.optimizer = "adam"
  c.lr = 1e-3
  # 'cosine' (decay to 0 over the run), 'step' (x step_gamma every third of
  # the epochs, IRMBed's StepLR) or 'constant'.
  c.lr_schedule = "cosine"
  c.step_gamma = 0.1
  c.momentum = 0.9
  c.l2 = 0.0
  c.batch_size = 64         # per environment (IRMBed: 128 in total).
  c.epochs = 4
  c.anneal_epochs = 1
  c.penalty_weight = 0.0
  c.ramp = False
  # Games (InvRat, IRMGame).
  c.inner_lr = 0.01
  c.inner_momentum = 0.9
  c.num_inners = 1
  c.gap_scale = 1.0
  c.env_grad = True         # InvRat: L_env sends gradient into the encoder.
  c.embed_dim = 128
  c.eb_hidden = 512
  # IPG (Surner et al. 2025): t, alpha, pairs per step, pair pool size.
  c.ipg = ml_collections.ConfigDict(dict(threshold=2e-6, alpha=0.2,
                                         pair_batch=300, num_pairs=0))
  c.eval_every = 35
  c.eval_train_max = 1000
  c.checkpoint_every = 140
  c.note = ""
  return c


@config_string
def get_config(method: str = "erm", preset: str = "cpu", model: str =
               "resnet18", envs: int = 2) -> ml_collections.ConfigDict:
  """Config of ``method`` under ``preset`` ('cpu', 'irmbed' or 'quick')."""
  method = registry.canonical(method)
  if method not in METHODS + EXTRA_METHODS:
    raise ValueError(f"unknown CIFAR-MNIST method {method!r}; choose one of "
                     f"{METHODS + EXTRA_METHODS}.")
  if preset not in ("cpu", "irmbed", "quick"):
    raise ValueError(f"preset={preset!r}: use 'cpu', 'irmbed' or 'quick'.")
  if envs not in (2, 4):
    raise ValueError(f"envs={envs!r}: use 2 or 4.")
  c = base()
  c.method, c.preset, c.model = method, preset, model
  c.data.envs = f"{envs}env"
  c.batch_size = 128 // envs
  c.penalty_weight = CPU_WEIGHTS.get(method, 0.0)
  c.eb_hidden = 2048 if model == "resnet50" else 512
  if preset == "irmbed":
    c.update(dict(optimizer="sgd", lr=0.01, epochs=100, anneal_epochs=10,
                  lr_schedule="step", eval_every=200, checkpoint_every=1000))
    c.data.transform = "irmbed"
    c.data.val = "none"
    c.batch_size = (128 if model == "resnet18" else 32) // envs
  elif preset == "quick":
    c.update(dict(model="tiny", epochs=3, anneal_epochs=1, eval_every=5,
                  eval_train_max=100, embed_dim=8, eb_hidden=16,
                  batch_size=16, checkpoint_every=10))
    c.data.train_num = 400
    c.data.test_num = 100
    c.ipg.pair_batch = 8
  return c
