"""Flax models used by the IRM studies.

``MLP`` is the ColoredMNIST network of Arjovsky et al. (2019): flatten ->
Dense(H) -> ReLU -> Dense(H) -> ReLU -> Dense(out), Xavier-uniform weights,
zero biases. The oracle variant is the same MLP on grayscale inputs (the
data builder drops the colour), e.g. 196 -> H -> H -> 1.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from jirm.models import sizes

xavier_dense = functools.partial(
    nn.Dense, kernel_init=nn.initializers.xavier_uniform(),
    bias_init=nn.initializers.zeros)


def _hidden_layers(x, hidden: Sequence[int]):
  """Flatten -> (Dense -> ReLU) per width, the layers named ``hidden_i`` in
  the calling module (call it inside an ``nn.compact`` method)."""
  h = x.reshape((x.shape[0], -1)).astype(jnp.float32)
  for i, width in enumerate(hidden):
    h = nn.relu(xavier_dense(width, name=f"hidden_{i}")(h))
  return h


class MLP(nn.Module):
  """Multi-layer perceptron on flattened inputs.

  Attributes:
    hidden: widths of the hidden layers, e.g. ``(390, 390)``.
    out: output width (1 for binary tasks, 10 for 10 classes).

  Example:
    >>> model = MLP(hidden=(390, 390))
    >>> params = model.init(jax.random.key(0), jnp.zeros((1, 14, 14, 2)))
  """

  hidden: Sequence[int] = (390, 390)
  out: int = 1

  @nn.compact
  def __call__(self, x, return_features: bool = False):
    """Logits ``[N, out]``; with ``return_features`` also the penultimate
    features ``[N, hidden[-1]]`` (the input of the ``head`` layer)."""
    h = _hidden_layers(x, self.hidden)
    logits = xavier_dense(self.out, name="head")(h)
    return (h, logits) if return_features else logits


class MLPEncoder(nn.Module):
  """The hidden layers of :class:`MLP` (same names, same initialisation):
  the feature extractor of :func:`jirm.models.mlp_model`. ``train`` is
  accepted for the ResNet encoders' interface (no BatchNorm here).

  Example:
    >>> feats = MLPEncoder((390, 390)).apply(variables, x, train=False)
  """

  hidden: Sequence[int] = (390, 390)

  @property
  def num_features(self) -> int:
    return int(self.hidden[-1])

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    return _hidden_layers(x, self.hidden)


def mlp(hidden_dim: int = 390, depth: int = 2, out: int = 1) -> MLP:
  """IRM's MLP with ``depth`` hidden layers of width ``hidden_dim``."""
  hidden_dim, depth, out = (sizes.check_size(n, v) for n, v in (
      ("hidden_dim", hidden_dim), ("depth", depth), ("out", out)))
  return MLP(hidden=(hidden_dim,) * depth, out=out)

