"""Heads ``g_v``: features ``[N, D]`` -> logits ``[N, C]``.

* :class:`LinearHead`, :class:`MLPHead`: torch ``nn.Linear`` initialisation
  (the ResNets' heads; IRMBed's linear head and InvRat-EB's two-layer head).
* :class:`XavierLinearHead`: the last layer of IRM's MLP (Arjovsky et al.
  2019; Xavier-uniform weights, zero bias, parameter name ``head``).
* :class:`EnsembleHead`: the mean of one linear head per environment
  (IRMGame, Ahuja et al. 2020).

Example:
  >>> head = LinearHead(out=1)
  >>> variables = head.init(jax.random.key(0), jnp.zeros((1, 512)))
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jirm.models import irm_mlp


def _torch_linear_bias_init(fan_in):
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
      key, shape, dtype, -bound, bound)


def _dense(features, fan_in, name):
  # torch.nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
  return nn.Dense(features, name=name,
                  kernel_init=nn.initializers.variance_scaling(
                      1.0 / 3.0, "fan_in", "uniform"),
                  bias_init=_torch_linear_bias_init(fan_in))


class LinearHead(nn.Module):
  """Linear head ``g_v``: features -> logits (torch ``nn.Linear`` init)."""

  out: int = 1

  @nn.compact
  def __call__(self, feats_ND):
    return _dense(self.out, feats_ND.shape[-1], "fc")(feats_ND)


class MLPHead(nn.Module):
  """Two-layer head (Linear -> ReLU -> Linear), IRMBed's InvRat-EB head."""

  hidden: int
  out: int = 1

  @nn.compact
  def __call__(self, feats_ND):
    h = nn.relu(_dense(self.hidden, feats_ND.shape[-1], "fc1")(feats_ND))
    return _dense(self.out, self.hidden, "fc2")(h)



class XavierLinearHead(nn.Module):
  """The last layer of :class:`jirm.models.MLP` (``head``: Xavier-uniform,
  zero bias)."""

  out: int = 1

  @nn.compact
  def __call__(self, feats_ND):
    return irm_mlp.xavier_dense(self.out, name="head")(feats_ND)


class EnsembleHead(nn.Module):
  """``num_envs`` linear heads whose logits are averaged (IRMGame)."""

  num_envs: int
  out: int = 1

  @nn.compact
  def __call__(self, feats_ND):
    fan_in = feats_ND.shape[-1]
    bound = 1.0 / np.sqrt(fan_in)
    init = lambda k, s: jax.random.uniform(k, s, jnp.float32, -bound, bound)
    kernel = self.param("kernel", init, (self.num_envs, fan_in, self.out))
    bias = self.param("bias", init, (self.num_envs, self.out))
    return jnp.einsum("nd,edc->nc", feats_ND, kernel) / self.num_envs + (
        bias.mean(0)[None])
