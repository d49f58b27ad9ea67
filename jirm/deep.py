"""Deep models (encoder h_u + head g_v, BatchNorm) and game methods.

The IRMBed study (Lin et al. 2022, "An Empirical Study of IRM on Deep
Models") puts penalties on the output "(o)" or on the hidden feature "(h)" of
a ResNet. Here a :class:`DeepModel` is an encoder (:mod:`jirm.resnet`) plus a
head; one forward pass over ``[E*B, ...]`` gives the features ``[E, B, D]``
and logits ``[E, B, C]``, which :class:`jirm.objectives.Outputs` carries to
every term (``features``, ``head``, ``head_params``), so stateless penalties
(IRMv1(o), IRMv1(h), REx, RVP) compose exactly as on the MLP.

Stateful methods are :class:`Game` s, built by optax-style factories
(:func:`invrat_ec`, :func:`invrat_eb`, :func:`irm_game`): ``init`` makes the
method's state (environment heads and their optimizer state), ``inner`` runs
the inner loop (``lax.fori_loop`` / ``lax.scan`` over optax updates, encoder
frozen) inside the jitted step, and ``term`` is the outer penalty, a
:class:`jirm.objectives.Term` that reads the updated state from
``Outputs.state``.

Example:
  >>> model = deep_model('resnet18')
  >>> game = invrat_ec(level='h', lr=0.01)
  >>> sched = jirm.schedules.preset('irmbed', weight=10.0, anneal=2,
  ...                               steps_per_epoch=70)
  >>> obj = jirm.erm(reduction='pooled') + sched * game.term
  >>> method = deep_method(model, obj, optax.adam(1e-3), batch_size=64,
  ...                      game=game, anneal_step=140, head_update='frozen')
  >>> res = jirm.fit(splits, method, steps=700, eval_chunk=500)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jirm import data as data_lib
from jirm import models
from jirm import objectives
from jirm import resnet
from jirm.methods import base

HEAD_UPDATES = ("total", "erm", "frozen", "inner")


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
    h = resnet.LinearHead(out)
  elif head == "mlp":
    h = resnet.MLPHead(int(head_hidden or enc.num_features), out)
  elif head == "ensemble":
    h = EnsembleHead(int(num_envs), out)
  else:
    raise ValueError(f"head={head!r}: use 'linear', 'mlp' or 'ensemble'.")
  return DeepModel(enc, h)


@dataclasses.dataclass(frozen=True)
class MLPModel(DeepModel):
  """IRM's MLP as an encoder (its hidden layers) and a head: the deep
  methods (InvRat, IRMGame, IPG, the (h)-level terms) on the ColoredMNIST
  network. With the ``linear`` head its initialisation is the MLP's: the
  same key gives the same parameters as ``jirm.models.mlp(...).init``
  (split into ``encoder`` = ``hidden_*`` and ``head``), and the logits are
  the same function of them."""

  def init(self, rng, x_1X):
    if not isinstance(self.head, models.MLPHead):
      return super().init(rng, x_1X)
    full = models.MLP(tuple(self.encoder.hidden), self.head.out).init(
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
  interface, for :func:`deep_method` and the (h)-level terms.

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
  enc = models.mlp(hidden_dim, depth, out)  # Validates the sizes.
  if head == "linear":
    h = models.MLPHead(int(out))
  elif head == "ensemble":
    h = EnsembleHead(int(num_envs), int(out))
  elif head == "mlp":
    h = resnet.MLPHead(int(head_hidden or hidden_dim), int(out))
  else:
    raise ValueError(f"head={head!r}: use 'linear', 'ensemble' or 'mlp'.")
  return MLPModel(models.MLPEncoder(tuple(enc.hidden)), h)


# ----------------------------------------------------------------------------
# Games: stateful methods with inner loops.


class Game(NamedTuple):
  """A stateful method.

  Attributes:
    name: method name.
    init: ``(rng, head_params, feat_dim, num_envs) -> state``.
    inner: ``(state, head_params, out, reset) -> (state, head_params)``; runs
      the inner loop on ``out`` (features/logits already stop-gradient'ed,
      i.e. the encoder is frozen); ``reset`` (bool array) re-initialises the
      environment predictors (at the anneal point).
    term: the outer penalty reading ``Outputs.state`` (None: no penalty).
  """

  name: str
  init: Callable
  inner: Callable
  term: Optional[objectives.Term]


def _stack(tree, n):
  return jax.tree.map(lambda a: jnp.broadcast_to(a, (n,) + a.shape), tree)


def _fit_inner(opt, params, opt_state, loss_fn, num_inners):
  """``num_inners`` optax steps on ``loss_fn`` as a ``fori_loop``."""

  def body(_, carry):
    p, s = carry
    g = jax.grad(loss_fn)(p)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  return jax.lax.fori_loop(0, num_inners, body, (params, opt_state))


def _pooled_bce(out: objectives.Outputs, logits_EBC):
  return objectives._pooled_mean(out._replace(logits=logits_EBC))  # pylint: disable=protected-access


def _invrat_term(env_logits_fn, gap_scale):
  """InvRat's outer penalty: gap_scale * max(0, L_shared - L_env)."""

  def impl(out: objectives.Outputs, env_grad: bool = True):
    feats = out.features if env_grad else jax.lax.stop_gradient(out.features)
    logits = out.logits if env_grad else jax.lax.stop_gradient(out.logits)
    env_params = jax.lax.stop_gradient(out.state.env_params)
    l_env = _pooled_bce(out, env_logits_fn(env_params, out, feats, logits))
    return gap_scale * jnp.maximum(_pooled_bce(out, out.logits) - l_env, 0.0)

  return objectives.Term("invrat", impl)


class InvRatState(NamedTuple):
  env_params: Any
  opt_state: Any


def invrat_ec(level: str = "h", *, lr: float = 0.01, momentum: float = 0.9,
              num_inners: int = 1, gap_scale: float = 1.0) -> Game:
  """InvRat with environment-specific copies of the head, "EC".

  Chang et al. 2020, IRMBed parameterisation. ``level='h'``: one linear head
  per environment on the features (same shape as g_v), initialised from the
  shared head at the anneal point (``reset``); ``level='o'``: a per-env
  affine map ``a_e * logit + b_e`` of the shared output, reset to identity.
  Inner loop: ``num_inners`` SGD(momentum) steps of the env predictors on
  their env's risk with the encoder frozen. Outer penalty (``term``):
  ``gap_scale * max(0, L_shared - L_env)``, L_env with the updated env
  predictors; with ``env_grad=True`` (default) L_env sends gradient into the
  encoder as in IRMBed. IRMBed's ``gap_scale`` is ``4 / (512 lr welr)``.

  Args:
    level: ``'h'`` or ``'o'``.
    lr: inner SGD learning rate (IRMBed: lr * penalty_welr).
    momentum: inner SGD momentum.
    num_inners: inner steps per outer step (on the current batch).
    gap_scale: multiplier of the gap.

  Returns:
    A :class:`Game`.
  """
  if level not in ("h", "o"):
    raise ValueError(f"level={level!r}: use 'h' (hidden head) or 'o' "
                     f"(output).")
  opt = optax.sgd(lr, momentum)

  def env_logits(env_params, out, feats_EBD, logits_EBC):
    if level == "h":
      return jax.vmap(out.head)(env_params, feats_EBD)
    return (env_params["a"][:, None, None] * logits_EBC +
            env_params["b"][:, None, None])

  def fresh(head_params, num_envs):
    if level == "h":
      return _stack(head_params, num_envs)
    return {"a": jnp.ones((num_envs,)), "b": jnp.zeros((num_envs,))}

  def init(rng, head_params, feat_dim, num_envs):
    del rng, feat_dim
    p = fresh(head_params, num_envs)
    return InvRatState(p, opt.init(p))

  def inner(state, head_params, out, reset):
    p0 = fresh(head_params, out.logits.shape[0])
    p = base.tree_where(reset, p0, state.env_params)
    s = base.tree_where(reset, opt.init(p0), state.opt_state)
    loss = lambda ep: _pooled_bce(out, env_logits(ep, out, out.features,
                                                   out.logits))
    p, s = _fit_inner(opt, p, s, loss, num_inners)
    return InvRatState(p, s), head_params

  return Game(f"invrat_ec_{level}", init, inner,
              _invrat_term(env_logits, gap_scale))


class _EBHead(nn.Module):
  hidden: int
  out: int = 1

  @nn.compact
  def __call__(self, feats_ND, emb_NM):
    return resnet.MLPHead(self.hidden, self.out)(
        jnp.concatenate([feats_ND, emb_NM], axis=-1))


def invrat_eb(*, embed_dim: int = 128, hidden: int = 512, lr: float = 0.01,
              momentum: float = 0.9, num_inners: int = 1,
              gap_scale: float = 1.0) -> Game:
  """InvRat with an environment embedding, "EB" (IRMBed).

  The environment-aware predictor is ``g'(h(x), m(e))``: a learned embedding
  ``m(e)`` (``embed_dim``) concatenated to the feature, then a 2-layer MLP
  (``hidden``: 512 for ResNet-18, 2048 for ResNet-50); use it with the 2-layer
  shared head (``deep_model(head='mlp')``). The embedding and g' are trained
  by the inner loop (IRMBed trains the embedding with the encoder's
  optimizer; here it belongs to the environment predictor). Penalty as in
  :func:`invrat_ec`.
  """
  opt = optax.sgd(lr, momentum)
  module = _EBHead(int(hidden))

  def env_logits(env_params, out, feats_EBD, logits_EBC):
    del out, logits_EBC
    e, b = feats_EBD.shape[:2]
    emb = jnp.broadcast_to(env_params["embedding"][:, None],
                           (e, b, env_params["embedding"].shape[-1]))
    flat = lambda a: a.reshape((e * b,) + a.shape[2:])
    return module.apply(env_params["mlp"], flat(feats_EBD),
                        flat(emb)).reshape(e, b, -1)

  def init(rng, head_params, feat_dim, num_envs):
    del head_params
    k_emb, k_mlp = jax.random.split(rng)
    p = {"embedding": jax.random.normal(k_emb, (num_envs, int(embed_dim))),
         "mlp": module.init(k_mlp, jnp.zeros((1, feat_dim)),
                            jnp.zeros((1, int(embed_dim))))}
    return InvRatState(p, opt.init(p))

  def inner(state, head_params, out, reset):
    del reset
    loss = lambda ep: _pooled_bce(out, env_logits(ep, out, out.features,
                                                   out.logits))
    p, s = _fit_inner(opt, state.env_params, state.opt_state, loss,
                      num_inners)
    return InvRatState(p, s), head_params

  return Game("invrat_eb", init, inner, _invrat_term(env_logits, gap_scale))


class IRMGameState(NamedTuple):
  opt_state: Any


def irm_game(*, lr: float = 0.01, momentum: float = 0.9,
             num_inners: int = 1) -> Game:
  """IRMGame "(h)" (Ahuja et al. 2020, IRMBed variant) on an ensemble head.

  Use with ``deep_model(head='ensemble')``: the prediction is the mean of one
  linear head per environment. Inner loop (``lax.scan`` over environments,
  repeated ``num_inners`` times): player e takes one SGD(momentum) step on the
  ensemble's risk on env e's batch with respect to its own head only, the
  encoder frozen. The encoder is then updated on the ensemble's ERM loss (no
  extra penalty term: the game is the method); train with
  ``head_update='inner'``.
  """
  opt = optax.sgd(lr, momentum)

  def init(rng, head_params, feat_dim, num_envs):
    del rng, feat_dim, num_envs
    return IRMGameState(jax.vmap(opt.init)(_per_env(head_params)))

  def _per_env(head_params):
    # kernel [E, D, C], bias [E, C] -> per-player pytree with leading E.
    return {"kernel": head_params["params"]["kernel"],
            "bias": head_params["params"]["bias"]}

  def _join(p):
    return {"params": {"kernel": p["kernel"], "bias": p["bias"]}}

  def inner(state, head_params, out, reset):
    del reset
    num_envs = out.logits.shape[0]

    def player_step(carry, e):
      p, s = carry
      feats, labels, valid = out.features[e], out.labels[e], out.valid[e]

      def loss(pe):
        q = jax.tree.map(lambda a, b: a.at[e].set(b), p, pe)
        logits = out.head(_join(q), feats)[None]
        return objectives.env_risks(objectives.Outputs(
            logits, labels[None], valid[None], task=out.task))[0]

      pe = jax.tree.map(lambda a: a[e], p)
      se = jax.tree.map(lambda a: a[e], s)
      u, se = opt.update(jax.grad(loss)(pe), se, pe)
      pe = optax.apply_updates(pe, u)
      p = jax.tree.map(lambda a, b: a.at[e].set(b), p, pe)
      s = jax.tree.map(lambda a, b: a.at[e].set(b), s, se)
      return (p, s), None

    def round_(_, carry):
      return jax.lax.scan(player_step, carry, jnp.arange(num_envs))[0]

    p, s = jax.lax.fori_loop(0, num_inners, round_,
                             (_per_env(head_params), state.opt_state))
    return IRMGameState(s), _join(p)

  return Game("irm_game", init, inner, None)


# ----------------------------------------------------------------------------
# Registry of deep methods (IRMBed Table 1).


@dataclasses.dataclass(frozen=True)
class DeepMethod:
  """A method of the deep-model study.

  Attributes:
    name: registry key.
    reference: paper / anchor.
    penalty: stateless penalty term (IRMv1, REx, RVP, IRMv1(h)) or None.
    game: ``name -> Game`` factory key (``'invrat_ec_h'``, ...) or None.
    head: head kind for :func:`deep_model`.
    head_update: IRMBed's head training rule (see :func:`make_step`).
    oracle: trains on data with the spurious half blanked.
  """

  name: str
  reference: str
  penalty: Optional[objectives.Term] = None
  game: Optional[str] = None
  head: str = "linear"
  head_update: str = "total"
  oracle: bool = False


class GroupDROState(NamedTuple):
  q: jax.Array  # [E] group weights (a distribution).


def _group_dro(out: objectives.Outputs):
  q = jax.lax.stop_gradient(out.state.q)
  return (q * objectives.env_risks(out)).sum()


group_dro_term = objectives.Term("group_dro", _group_dro)


def group_dro(*, eta: float = 0.01) -> Game:
  """GroupDRO (Sagawa et al. 2020) in DomainBed's form: the environments
  are the groups; each step q_e <- q_e exp(eta R_e) / Z on the batch's
  detached group risks, and the loss is sum_e q_e R_e (the term
  ``group_dro``, replacing ERM). Combine with IPG through
  :func:`jirm.ipg.deep_step_factory` (its loss is this objective).

  Example:
    >>> objective, game = build_method('group_dro', eta=0.01)
  """

  def init(rng, head_params, feat_dim, num_envs):
    del rng, head_params, feat_dim
    return GroupDROState(jnp.full((num_envs,), 1.0 / num_envs, jnp.float32))

  def inner(state, head_params, out, reset):
    del reset
    q = state.q * jnp.exp(eta * objectives.env_risks(out))
    return GroupDROState(q / q.sum()), head_params

  return Game("group_dro", init, inner, None)


DEEP_METHODS = {m.name: m for m in (
    DeepMethod("oracle", "ERM on CIFAR-MNIST with a blank MNIST half",
               oracle=True),
    DeepMethod("erm", "ERM"),
    DeepMethod("irmv1", "IRMv1(o), Arjovsky et al. 2019 (IRMBed split_perm)",
               objectives.irmv1(variant="split_perm"), head_update="erm"),
    DeepMethod("vrex", "V-REx(o), Krueger et al. 2021", objectives.vrex,
               head_update="erm"),
    DeepMethod("rvp", "RVP(o), IRMBed", objectives.rvp, head_update="erm"),
    DeepMethod("irmv1_h", "IRMv1(h) on the real head (IRMBed irmv1fc)",
               objectives.irmv1_h, head_update="erm"),
    DeepMethod("irm_game_h", "IRMGame(h), Ahuja et al. 2020 (IRMBed)",
               game="irm_game", head="ensemble", head_update="inner"),
    DeepMethod("invrat_eb", "InvRat-EB(h), Chang et al. 2020 (IRMBed)",
               game="invrat_eb", head="mlp", head_update="frozen"),
    DeepMethod("invrat_ec_o", "InvRat-EC(o), Chang et al. 2020 (IRMBed)",
               game="invrat_ec_o", head_update="frozen"),
    DeepMethod("invrat_ec_h", "InvRat-EC(h), Chang et al. 2020 (IRMBed)",
               game="invrat_ec_h", head_update="frozen"),
    DeepMethod("group_dro", "GroupDRO, Sagawa et al. 2020 (DomainBed form; "
               "envs = groups)", game="group_dro"),
)}


def build_method(name: str, *, schedule=None, l2: float = 0.0,
                 inner_lr: float = 0.01, inner_momentum: float = 0.9,
                 num_inners: int = 1, gap_scale: float = 1.0,
                 env_grad: bool = True, embed_dim: int = 128,
                 eb_hidden: int = 512, eta: float = 0.01):
  """``(objective, game)`` of a registered deep method.

  The objective is ``erm(pooled) [+ l2 * l2] [+ schedule * penalty]``; for
  InvRat the penalty is the game's term. Keyword arguments configure the
  games (see :func:`invrat_ec`, :func:`invrat_eb`, :func:`irm_game`,
  :func:`group_dro` with ``eta``).
  """
  if name not in DEEP_METHODS:
    raise ValueError(f"unknown deep method {name!r}; choose one of "
                     f"{sorted(DEEP_METHODS)}.")
  m = DEEP_METHODS[name]
  if m.game == "group_dro":  # The group-weighted risk replaces ERM.
    objective = group_dro_term * 1.0
    if l2:
      objective = objective + l2 * objectives.l2
    return objective, group_dro(eta=eta)
  objective = objectives.erm(reduction="pooled") * 1.0
  if l2:
    objective = objective + l2 * objectives.l2
  game = None
  inner = dict(lr=inner_lr, momentum=inner_momentum, num_inners=num_inners)
  if m.game == "irm_game":
    game = irm_game(**inner)
  elif m.game == "invrat_eb":
    game = invrat_eb(embed_dim=embed_dim, hidden=eb_hidden,
                     gap_scale=gap_scale, **inner)
  elif m.game is not None:
    game = invrat_ec(m.game[-1], gap_scale=gap_scale, **inner)
  penalty = m.penalty
  if game is not None and game.term is not None:
    penalty = game.term(env_grad=env_grad)
  if penalty is not None:
    if schedule is None:
      raise ValueError(f"method {name!r} needs a penalty schedule.")
    objective = objective + schedule * penalty
  return objective, game


# ----------------------------------------------------------------------------
# Training.


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TRANSFORMS = ("none", "irmbed")


def irmbed_transform(x_NHWC, rng=None, size: int = 224):
  """IRMBed's input pipeline in jit: train (``rng`` given) = torchvision's
  ``RandomResizedCrop(size)`` (scale 0.08-1, ratio 3/4-4/3, bilinear) +
  horizontal flip; eval (``rng=None``) = resize to ``size`` x ``size``; both
  then ImageNet normalisation."""
  n, h, w, c = x_NHWC.shape
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32).reshape(1, 1, 1, 3)
  std = jnp.asarray(IMAGENET_STD, jnp.float32).reshape(1, 1, 1, 3)
  if rng is None:
    out = jax.image.resize(x_NHWC, (n, size, size, c), "linear")
    return (out - mean) / std
  k_s, k_r, k_y, k_x, k_f = jax.random.split(rng, 5)
  area = jax.random.uniform(k_s, (n,), minval=0.08, maxval=1.0) * h * w
  log_r = jax.random.uniform(k_r, (n,), minval=jnp.log(3 / 4),
                             maxval=jnp.log(4 / 3))
  ratio = jnp.exp(log_r)
  ch = jnp.clip(jnp.sqrt(area / ratio), 1.0, h)
  cw = jnp.clip(jnp.sqrt(area * ratio), 1.0, w)
  y0 = jax.random.uniform(k_y, (n,)) * (h - ch)
  x0 = jax.random.uniform(k_x, (n,)) * (w - cw)
  flip = jax.random.bernoulli(k_f, 0.5, (n,))

  def one(img, ch, cw, y0, x0, flip):
    scale = jnp.stack([size / ch, size / cw])
    out = jax.image.scale_and_translate(
        img, (size, size, c), (0, 1), scale, -jnp.stack([y0, x0]) * scale,
        "linear", antialias=False)
    return jnp.where(flip, out[:, ::-1], out)

  out = jax.vmap(one)(x_NHWC, ch, cw, y0, x0, flip)
  return (out - mean) / std


class DeepState(NamedTuple):
  """Training state of a deep model."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  game: Any
  rng: jax.Array


def _forward(model: DeepModel, params, batch_stats, x_EBX, train: bool):
  e, b = x_EBX.shape[:2]
  feats, new_bs = model.features(params, batch_stats,
                                 x_EBX.reshape((e * b,) + x_EBX.shape[2:]),
                                 train)
  logits = model.head_fn(params["head"], feats)
  return feats.reshape(e, b, -1), logits.reshape(e, b, -1), new_bs


def make_step(model: DeepModel, objective: objectives.Objective,
              optimizer: optax.GradientTransformation, *, batch_size: int,
              task: str = "binary", game: Optional[Game] = None,
              anneal_step: int = 0, head_update: str = "total",
              transform: str = "none", reset_step: Optional[int] = None):
  """Builds ``step(state, data) -> (state, aux)`` for a deep model.

  One forward pass over a balanced batch (``batch_size`` per env, an epoch
  permutation per env); the game's inner loop runs on the stop-gradient
  features of that batch, then the objective (whose terms see the updated
  game state) is differentiated.

  Args:
    model: a :class:`DeepModel`.
    objective: the objective (``erm + schedule * penalty``).
    optimizer: optax transformation over ``{'encoder', 'head'}``.
    batch_size: samples per environment per step.
    task: loss type.
    game: optional :class:`Game`.
    anneal_step: the step at which the penalty switches on; env predictors
      are reset there and ``head_update`` applies from there on.
    head_update: how the head g_v is trained from ``anneal_step`` on:
      ``'total'`` (by the objective, like the encoder), ``'erm'`` (by the
      plain pooled ERM loss on detached features: IRMBed for IRMv1/REx/RVP),
      ``'frozen'`` (not at all: IRMBed's InvRat) or ``'inner'`` (only by the
      game's inner loop, from step 0: IRMGame).
    transform: ``'none'`` (native inputs) or ``'irmbed'``
      (:func:`irmbed_transform`, 224x224 crops).
    reset_step: re-initialise the optimizer state at this step (defaults to
      the objective's schedule's ``reset_step``: DomainBed's Adam reset at
      the anneal step, as :func:`jirm.methods.make_train_step` does).

  Returns:
    The step function (jit it with ``donate_argnums=0``).
  """
  if transform not in TRANSFORMS:
    raise ValueError(f"transform={transform!r}: use one of {TRANSFORMS}.")
  if head_update not in HEAD_UPDATES:
    raise ValueError(f"head_update={head_update!r}: use one of "
                     f"{HEAD_UPDATES}.")
  if head_update == "inner" and game is None:
    raise ValueError("head_update='inner' needs a game that trains the head.")
  sched = objective.schedule()
  if reset_step is None and sched is not None:
    reset_step = sched.reset_step

  def loss_fn(params, state: DeepState, batch, rng):
    feats, logits, new_bs = _forward(model, params, state.batch_stats,
                                     batch.x, train=True)
    out = objectives.Outputs(logits, batch.y, batch.valid, params, rng, task,
                             feats, model.head_fn, params["head"])
    aux = {}
    game_state, head_params = state.game, params["head"]
    sg = jax.lax.stop_gradient
    frozen = out._replace(logits=sg(logits), features=sg(feats), params=None)
    if game is not None:
      game_state, head_params = game.inner(
          state.game, sg(params["head"]), frozen, state.step == anneal_step)
      if head_update == "inner":  # The outer loss sees the players' move.
        flat = feats.reshape((-1, feats.shape[-1]))
        logits = model.head_fn(sg(head_params), flat).reshape(logits.shape)
        out = out._replace(logits=logits, head_params=sg(head_params))
    total, terms = objective(out._replace(state=game_state), state.step)
    aux.update(terms)
    aux["train_acc"] = objectives.accuracy(logits, batch.y, batch.valid,
                                           task).mean()
    erm_head_grads = None
    if head_update == "erm":
      erm_head_grads = jax.grad(lambda hp: objectives._pooled_mean(  # pylint: disable=protected-access
          frozen._replace(logits=model.head_fn(hp, frozen.features.reshape(
              (-1, frozen.features.shape[-1]))).reshape(logits.shape))))(
                  params["head"])
    return total, (aux, new_bs, game_state, head_params, erm_head_grads)

  def step_fn(state: DeepState, data: base.EnvArrays):
    k_obj = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 1)
    batch = base.epoch_batch(data, state.rng, state.step, batch_size)
    if transform == "irmbed":
      e, b = batch.y.shape
      x = irmbed_transform(batch.x.reshape((e * b,) + batch.x.shape[2:]),
                           jax.random.fold_in(k_obj, 2))
      batch = batch._replace(x=x.reshape((e, b) + x.shape[1:]))
    grads, (aux, new_bs, game_state, head_params, erm_hg) = jax.grad(
        loss_fn, has_aux=True)(state.params, state, batch, k_obj)
    after = state.step >= anneal_step
    if head_update == "erm":
      grads["head"] = base.tree_where(after, erm_hg, grads["head"])
    elif head_update in ("frozen", "inner"):
      keep = jnp.logical_not(after) if head_update == "frozen" else False
      grads["head"] = jax.tree.map(lambda g: g * keep, grads["head"])
    opt_state = base.reset_at(optimizer, state.opt_state, state.params,
                              state.step, reset_step)
    updates, opt_state = optimizer.update(grads, opt_state, state.params)
    if head_update in ("frozen", "inner"):
      updates["head"] = jax.tree.map(lambda u: u * keep, updates["head"])
    params = optax.apply_updates(state.params, updates)
    if head_update == "inner":
      params["head"] = head_params
    return DeepState(state.step + 1, params, new_bs, opt_state, game_state,
                     state.rng), aux

  return step_fn


def deep_method(model: DeepModel, objective: objectives.Objective,
                optimizer: optax.GradientTransformation, *,
                batch_size: Optional[int], task: str = "binary",
                game: Optional[Game] = None, anneal_step: int = 0,
                head_update: str = "total", transform: str = "none",
                init_params=None, reset_step: Optional[int] = None,
                step_factory: Optional[Callable] = None) -> base.Method:
  """A deep model's objective (and optional :class:`Game`) as a
  :class:`jirm.methods.Method`; run it with :func:`jirm.fit`.

  Args:
    model: a :class:`DeepModel`.
    objective: the objective (``erm + schedule * penalty``).
    optimizer: optax transformation over ``{'encoder', 'head'}``.
    batch_size: samples per environment per step (an epoch permutation per
      environment).
    task: loss type.
    game, anneal_step, head_update, transform: see :func:`make_step`.
    init_params: optional ``(params, batch_stats)`` to start from (e.g. a
      converted torchvision checkpoint, :mod:`jirm.convert`); the head is
      re-initialised.
    reset_step: re-initialise the optimizer here (default: the schedule's,
      e.g. ``domainbed``'s Adam reset at the anneal step).
    step_factory: builds the update with :func:`make_step`'s signature
      (default :func:`make_step`; e.g. :func:`jirm.ipg.deep_step_factory`).

  Returns:
    A method whose state is a :class:`DeepState`; ``export`` gives
    ``(params, batch_stats)`` and ``predict`` uses the running BatchNorm
    statistics.

  Example:
    >>> game = invrat_ec(level='h')
    >>> method = deep_method(deep_model('resnet18'), erm + sched * game.term,
    ...                      optax.adam(1e-3), batch_size=64, game=game,
    ...                      anneal_step=140, head_update='frozen')
    >>> result = jirm.fit(splits, method, steps=700, eval_chunk=500)
  """
  if batch_size is None or batch_size < 1:
    raise ValueError(f"batch_size={batch_size!r}: deep models train on "
                     f"minibatches; pass a positive batch size per env.")
  kw = {} if reset_step is None else dict(reset_step=reset_step)
  update = (step_factory or make_step)(
      model, objective, optimizer, batch_size=batch_size, task=task,
      game=game, anneal_step=anneal_step, head_update=head_update,
      transform=transform, **kw)

  def init(rng, data: base.EnvArrays) -> DeepState:
    k_init, k_game, k_train = jax.random.split(rng, 3)
    params, batch_stats = model.init(k_init, data.x[0, :1])
    if init_params is not None:
      params = dict(params, encoder=init_params[0]["encoder"])
      batch_stats = init_params[1]
    game_state = () if game is None else game.init(
        k_game, params["head"], model.encoder.num_features, data.y.shape[0])
    return DeepState(jnp.zeros((), jnp.int32), params, batch_stats,
                     optimizer.init(params), game_state, k_train)

  def predict(state: DeepState, x_NX):
    if transform == "irmbed":
      x_NX = irmbed_transform(x_NX)
    feats, _ = model.features(state.params, state.batch_stats, x_NX,
                              train=False)
    return model.head_fn(state.params["head"], feats)

  return base.Method(init, update, predict,
                     export=lambda state: (state.params, state.batch_stats))
