"""A model is an encoder ``h_u`` plus a head ``g_v``.

The IRMBed study (Lin et al. 2022, "An Empirical Study of IRM on Deep
Models") puts penalties on the output "(o)" or on the hidden feature "(h)" of
a ResNet. A :class:`DeepModel` is an encoder (:mod:`jirm.models.resnet`, with
BatchNorm) plus a head (:mod:`jirm.models.heads`); :class:`MLPModel` is IRM's
MLP with the same interface (its hidden layers are the encoder, its last layer
the head, the same initialisation as :func:`jirm.models.mlp`). One forward
pass over ``[E*B, ...]`` gives the features ``[E, B, D]`` and logits
``[E, B, C]`` that :class:`jirm.objectives.Outputs` carries to every term.

Example:
  >>> model = deep_model('resnet18', head='linear')
  >>> params, batch_stats = model.init(jax.random.key(0),
  ...                                  jnp.zeros((1, 64, 32, 3)))
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import jax

from jirm.models import heads
from jirm.models import irm_mlp
from jirm.models import resnet


@dataclasses.dataclass(frozen=True)
class DeepModel:
  """Feature extractor ``encoder`` (with BatchNorm) and head ``head``.

  Parameters are ``{'encoder': ..., 'head': ...}``; BatchNorm statistics are
  a separate ``batch_stats`` pytree.
  """

  encoder: nn.Module
  head: nn.Module

  def init(self, rng, x_1X):
    k_enc, k_head = jax.random.split(rng)
    variables = self.encoder.init(k_enc, x_1X, train=False)
    feats = self.encoder.apply(variables, x_1X, train=False)
    params = {"encoder": variables["params"],
              "head": self.head.init(k_head, feats)}
    return params, variables.get("batch_stats", {})

  def features(self, params, batch_stats, x_NX, train: bool):
    """``(feats_ND, new_batch_stats)``."""
    variables = {"params": params["encoder"], "batch_stats": batch_stats}
    if not train:
      return self.encoder.apply(variables, x_NX, train=False), batch_stats
    feats, upd = self.encoder.apply(variables, x_NX, train=True,
                                    mutable=["batch_stats"])
    return feats, upd["batch_stats"]

  def head_fn(self, head_params, feats_ND):
    return self.head.apply(head_params, feats_ND)


def deep_model(encoder: str = "resnet18", *, head: str = "linear",
               head_hidden: Optional[int] = None, num_envs: int = 2,
               stem: str = "imagenet", lowering: str = "auto",
               width: Optional[int] = None, out: int = 1) -> DeepModel:
  """A ResNet encoder with a ``'linear'``, ``'mlp'`` (2-layer, hidden =
  ``head_hidden`` or the feature width, IRMBed's InvRat-EB head) or
  ``'ensemble'`` (mean of ``num_envs`` linear heads, IRMGame) head."""
  enc = resnet.encoder(encoder, stem=stem, lowering=lowering, width=width)
  if head == "linear":
    h = heads.LinearHead(out)
  elif head == "mlp":
    h = heads.MLPHead(int(head_hidden or enc.num_features), out)
  elif head == "ensemble":
    h = heads.EnsembleHead(int(num_envs), out)
  else:
    raise ValueError(f"head={head!r}: use 'linear', 'mlp' or 'ensemble'.")
  return DeepModel(enc, h)


@dataclasses.dataclass(frozen=True)
class MLPModel(DeepModel):
  """IRM's MLP as an encoder (its hidden layers) and a head: the deep
  methods (InvRat, IRMGame, IPG, the (h)-level terms) on the ColoredMNIST
  network. With the ``linear`` head its initialisation is the MLP's: the
  same key gives the same parameters as ``jirm.irm_mlp.mlp(...).init``
  (split into ``encoder`` = ``hidden_*`` and ``head``), and the logits are
  the same function of them."""

  def init(self, rng, x_1X):
    if not isinstance(self.head, heads.XavierLinearHead):
      return super().init(rng, x_1X)
    full = irm_mlp.MLP(tuple(self.encoder.hidden), self.head.out).init(
        rng, x_1X)["params"]
    encoder = {k: v for k, v in full.items() if k != "head"}
    return {"encoder": encoder, "head": {"params": {"head": full["head"]}}}, {}

  def features(self, params, batch_stats, x_NX, train: bool):
    del train
    return self.encoder.apply({"params": params["encoder"]}, x_NX), (
        batch_stats)


def mlp_model(hidden_dim: int = 390, depth: int = 2, *, out: int = 1,
              head: str = "linear", num_envs: int = 2,
              head_hidden: Optional[int] = None) -> MLPModel:
  """IRM's MLP (Arjovsky et al. 2019) with the ResNets' feature / head
  interface, for :func:`jirm.methods.deep_method` and the (h)-level terms.

  Args:
    hidden_dim, depth: the hidden layers (as :func:`jirm.models.mlp`).
    out: logits per sample.
    head: ``'linear'`` (the MLP's own last layer and initialisation),
      ``'ensemble'`` (mean of ``num_envs`` linear heads, IRMGame) or
      ``'mlp'`` (two layers, ``head_hidden`` wide, InvRat-EB).
    num_envs: heads of the ``ensemble`` head.
    head_hidden: hidden width of the ``mlp`` head (default ``hidden_dim``).

  Returns:
    An :class:`MLPModel`.

  Example:
    >>> model = mlp_model(390)
    >>> method = deep_method(model, jirm.erm + 1e3 * jirm.irmv1_head,
    ...                      optax.adam(1e-3), batch_size=500)
  """
  enc = irm_mlp.mlp(hidden_dim, depth, out)  # Validates the sizes.
  if head == "linear":
    h = heads.XavierLinearHead(int(out))
  elif head == "ensemble":
    h = heads.EnsembleHead(int(num_envs), int(out))
  elif head == "mlp":
    h = heads.MLPHead(int(head_hidden or hidden_dim), int(out))
  else:
    raise ValueError(f"head={head!r}: use 'linear', 'ensemble' or 'mlp'.")
  return MLPModel(irm_mlp.MLPEncoder(tuple(enc.hidden)), h)
