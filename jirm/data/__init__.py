"""Environments for IRM research: tfds-backed sources and seeded builders.

One module per family: :mod:`jirm.data.envs` (the containers),
:mod:`jirm.data.sources` (tfds and synthetic sources), :mod:`jirm.data.mnist`
(ColoredMNIST variants), :mod:`jirm.data.cifar` (CIFAR-MNIST),
:mod:`jirm.data.synthetic` (linear and ZIN environments) and
:mod:`jirm.data.shift` (Waterbirds / CelebA / MetaShift files); every
builder is re-exported here (``jirm.data.colored_mnist``).

Every builder returns an :class:`EnvSplits` whose arrays carry an explicit
environment axis (``x_ExN...``, ``y_ExN``) plus two per-sample flags:
``agree`` (the spurious feature agrees with the label) and ``valid`` (the
sample is real, not padding; environments of unequal size are padded).

Sources are read with ``tfds.data_source(..., download=False)`` from prepared
array_record files (no TensorFlow needed) and cached as ``.npz`` so later loads
take well under a second.

Example:
  >>> splits = jirm.data.colored_mnist(seed=0)           # IRM's recipe
  >>> splits.train.x.shape, splits.test.x.shape
  ((2, 25000, 14, 14, 2), (1, 10000, 14, 14, 2))
"""

from __future__ import annotations

from jirm.data.envs import (
    DataError,
    Envs,
    EnvSplits,
    stack_envs,
)
from jirm.data.sources import (
    resolve_data_dir,
    load_tfds,
    load_mnist,
    synthetic_mnist,
    synthetic_cifar_mnist_sources,
)
from jirm.data.mnist import (
    color_digits,
    colored_mnist,
    FULL_COLORS,
    color_digits_full,
    full_colored_mnist,
)
from jirm.data.synthetic import (
    linear_synthetic,
    zin_synthetic,
)
from jirm.data.cifar import (
    CIFAR_MNIST_ENVS,
    cifar_mnist,
)

