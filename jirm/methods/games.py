"""Games: stateful methods with inner loops on an encoder + head model.

Each is an optax-style factory returning a :class:`Game`: ``init`` makes the
method's state (environment heads and their optimizer state, GroupDRO's group
weights), ``inner`` runs the inner loop (``lax.fori_loop`` / ``lax.scan`` over
optax updates, encoder frozen) inside the jitted step, and ``term`` is the
outer penalty, a :class:`jirm.objectives.Term` that reads the updated state
from ``Outputs.state``. :func:`jirm.methods.deep.deep_method` makes a game
(with its objective) a :class:`jirm.Method`.

Example:
  >>> game = invrat_ec(level='h', lr=0.01)
  >>> sched = jirm.schedules.preset('irmbed', weight=10.0, anneal=2,
  ...                               steps_per_epoch=70)
  >>> obj = jirm.erm(reduction='pooled') + sched * game.term
  >>> method = jirm.methods.deep_method(model, obj, optax.adam(1e-3),
  ...                                   batch_size=64, game=game,
  ...                                   anneal_step=140, head_update='frozen')
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp
import optax

from jirm import objectives
from jirm.methods import base
from jirm.models import heads


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
    return heads.MLPHead(self.hidden, self.out)(
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


def irm_game_h(*, lr: float = 0.01, momentum: float = 0.9,
               num_inners: int = 1) -> Game:
  """IRMGame "(h)" (Ahuja et al. 2020, IRMBed variant) on an ensemble head.

  Use with ``jirm.models.deep_model(head='ensemble')``: the prediction is the mean of one
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

  return Game("irm_game_h", init, inner, None)


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
  :func:`jirm.methods.ipg.deep_step_factory` (its loss is this objective).

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



class FishrState(NamedTuple):
  """Fishr's moving averages of the per-environment gradient variances.

  Attributes:
    ema: ``[E, K]`` after this step's update (detached).
    prev: ``[E, K]`` before it: the penalty's live average starts from it.
    count: updates so far.
  """

  ema: jax.Array
  prev: jax.Array
  count: jax.Array


def head_grad_variances(head_fn, head_params, feats_EBD, labels_EB, valid_EB,
                        task: str = "binary"):
  """Per-environment variance ``[E, K]`` of the per-sample gradients of the
  loss with respect to the head's ``K`` parameters (flattened): Fishr's
  statistic (DomainBed: BackPACK's ``BatchGrad`` on the classifier; the
  mean over samples of the squared centred gradients; padding rows
  excluded).

  Args:
    head_fn: ``head(head_params, feats_ND) -> logits_NC``.
    head_params: the head's parameters.
    feats_EBD, labels_EB, valid_EB: features, labels and mask per env.
    task: loss type (:func:`jirm.objectives.sample_losses`).

  Returns:
    ``[E, K]`` variances.

  Example:
    >>> v = head_grad_variances(model.head_fn, params["head"], f, y, valid)
  """
  flat, unravel = jax.flatten_util.ravel_pytree(head_params)

  def loss_i(theta_K, f_D, y):
    logits = head_fn(unravel(theta_K), f_D[None])[None]  # [1, 1, C]
    return objectives.sample_losses(logits, y[None, None], task)[0, 0]

  per_sample = jax.vmap(jax.vmap(jax.grad(loss_i), in_axes=(None, 0, 0)),
                        in_axes=(None, 0, 0))
  g_EBK = per_sample(flat, feats_EBD, labels_EB)
  w_EB1 = valid_EB[..., None]
  n_E11 = jnp.maximum(valid_EB.sum(1), 1.0)[:, None, None]
  mean_E1K = (g_EBK * w_EB1).sum(1, keepdims=True) / n_E11
  return (((g_EBK - mean_E1K) ** 2) * w_EB1).sum(1) / n_E11[:, 0]


def fishr(*, ema: float = 0.95) -> Game:
  """Fishr (Rame et al., ICML 2022; DomainBed ``Fishr``): match the
  per-environment variances of the head's per-sample gradients.

  Each step, ``v_e`` = :func:`head_grad_variances` of env ``e`` on the
  batch; its moving average ``m_e <- ema m_e + (1 - ema) v_e`` is divided by
  ``1 - ema`` (DomainBed's ``oneminusema_correction``, so that the gradient
  through ``v_e`` does not depend on ``ema``); the penalty (``term``) is
  ``mean_e mean_k (m_e - mean_e' m_e')^2``. The average's previous value is
  detached, this step's ``v_e`` is not: the gradient reaches the head and,
  through the features, the encoder. ``inner`` only advances the detached
  average. Use with ``erm(reduction='pooled')`` (DomainBed's NLL over the
  whole batch).

  Args:
    ema: the moving average's decay (DomainBed 0.95).

  Returns:
    A :class:`Game` for :func:`jirm.methods.deep.deep_method`.

  Example:
    >>> game = fishr(ema=0.95)
    >>> sched = jirm.schedules.preset('domainbed', weight=1000.0, anneal=1500)
    >>> obj = jirm.erm(reduction='pooled') + sched * game.term
    >>> method = jirm.methods.deep_method(model, obj, optax.adam(1e-3),
    ...                                   batch_size=64, game=game)
  """
  if not 0.0 <= ema < 1.0:
    raise ValueError(f"fishr ema={ema!r}: use 0 <= ema < 1.")

  def init(rng, head_params, feat_dim, num_envs):
    del rng, feat_dim
    k = jax.flatten_util.ravel_pytree(head_params)[0].shape[0]
    zeros = jnp.zeros((num_envs, k), jnp.float32)
    return FishrState(zeros, zeros, jnp.zeros((), jnp.int32))

  def inner(state, head_params, out, reset):
    del reset
    v = head_grad_variances(out.head, head_params, out.features, out.labels,
                            out.valid, out.task)
    return FishrState(ema * state.ema + (1.0 - ema) * v, state.ema,
                      state.count + 1), head_params

  def impl(out: objectives.Outputs):
    if out.state is None or out.head is None:
      raise ValueError("fishr's term reads Outputs.state and .head: train it "
                       "with jirm.methods.deep_method(..., game=fishr()).")
    v = head_grad_variances(out.head, out.head_params, out.features,
                            out.labels, out.valid, out.task)
    m = (ema * jax.lax.stop_gradient(out.state.prev) + (1.0 - ema) * v) / (
        1.0 - ema)
    return jnp.mean((m - m.mean(0, keepdims=True)) ** 2)

  return Game("fishr", init, inner, objectives.Term("fishr", impl))
