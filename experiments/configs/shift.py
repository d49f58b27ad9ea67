r"""Configs of the real-world shift experiments (Waterbirds, CelebA,
ColoredObject).

Presets:
  * ``paper``: the literature's protocol. Waterbirds / CelebA: ResNet-50 at
    224x224, ImageNet-pretrained torchvision weights
    (``--config.pretrained=/path/resnet50.pth``, converted by
    :mod:`jirm.models.convert`), SGD momentum 0.9, batch 128, GroupDRO eta 0.01
    (Sagawa et al. 2020: Waterbirds lr 1e-3, weight decay 1e-4, 300 epochs;
    CelebA lr 1e-4, weight decay 1e-4, 50 epochs). ColoredObject (BIRM):
    32x32 images, ResNet-18 with the 3x3 CIFAR stem from scratch; Adam 1e-3,
    batch 128, 100 epochs are our choice (BIRM's flags for it are not
    released).
  * ``cpu``: ResNet-18 at 64x64 from scratch, Adam 1e-3, 600 steps of batch
    32: a run a 2-core CPU finishes in well under an hour.
  * ``quick``: tiny ResNet at 16x16, a few steps (smoke tests).
"""

import ml_collections

from experiments.configs import config_string

from jirm.methods import registry

DATASETS = ("waterbirds", "celeba", "colored_object")
METHODS = registry.names("shift")
# Training images per epoch (for the paper presets' step counts).
TRAIN_SIZES = dict(waterbirds=4795, celeba=162_770, colored_object=12_000)


@config_string
def get_config(method: str = "erm", preset: str = "cpu",
               dataset: str = "waterbirds") -> ml_collections.ConfigDict:
  """Config of ``method`` on ``dataset`` under ``preset``."""
  if dataset not in DATASETS:
    raise ValueError(f"dataset={dataset!r}: choose one of {DATASETS}.")
  method = registry.canonical(method)
  if method not in METHODS:
    raise ValueError(f"method={method!r}: choose one of {METHODS}.")
  c = ml_collections.ConfigDict()
  c.method, c.preset, c.dataset = method, preset, dataset
  c.data = ml_collections.ConfigDict(dict(
      image_size=64, variant="standard", target="Blond_Hair",
      spurious="Male", layout="auto", cons="0.999,0.7,0.1", label_noise=0.05,
      max_per_split=0))
  c.model = "resnet18"
  c.stem = "imagenet"
  c.pretrained = ""
  c.optimizer = "adam"
  c.lr = 1e-3
  c.momentum = 0.9
  c.weight_decay = 0.0
  c.batch_size = 32          # per training env.
  c.steps = 600
  c.penalty_weight = 1e3     # irmv1 / rex (groups as environments).
  c.anneal = 100
  c.group_dro_eta = 0.01
  c.ipg = ml_collections.ConfigDict(dict(threshold=2e-6, alpha=0.2,
                                         pair_batch=64, num_pairs=1000,
                                         source="train"))
  c.eval_every = 100
  c.eval_train_max = 1000
  c.checkpoint_every = 200
  if dataset == "colored_object":
    c.data.image_size, c.stem = 32, "cifar"
  if preset == "paper":
    c.optimizer, c.batch_size = "sgd", 128
    if dataset == "colored_object":
      c.optimizer, c.lr, epochs = "adam", 1e-3, 100
    else:
      c.model, c.data.image_size = "resnet50", 224
      c.lr = 1e-3 if dataset == "waterbirds" else 1e-4
      c.weight_decay = 1e-4
      epochs = 300 if dataset == "waterbirds" else 50
    c.steps = TRAIN_SIZES[dataset] * epochs // c.batch_size
    c.eval_every, c.checkpoint_every = 500, 1000
  elif preset == "quick":
    c.model, c.data.image_size, c.batch_size = "tiny", 16, 2
    c.steps, c.eval_every, c.anneal = 4, 2, 2
    c.ipg.num_pairs, c.ipg.pair_batch = 6, 4
  elif preset != "cpu":
    raise ValueError(f"preset={preset!r}: choose 'paper', 'cpu' or 'quick'.")
  if dataset == "waterbirds" and c.data.variant == "waterbird100":
    c.ipg.source = "val"
  return c
