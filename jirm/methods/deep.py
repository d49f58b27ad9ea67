"""Methods on encoder + head models (ResNets, IRM's MLP as encoder + head).

:func:`deep_method` makes an objective (stateless penalties at the output
"(o)" or the hidden feature "(h)", as in the IRMBed study, Lin et al. 2022)
and optionally a :class:`jirm.methods.games.Game` (InvRat, IRMGame(h),
GroupDRO) a :class:`jirm.Method` over a :class:`jirm.models.DeepModel`:
BatchNorm statistics, IRMBed's head training rules, the Adam reset at the
anneal step and IRMBed's input pipeline (:func:`irmbed_transform`) live here.
:func:`build_method` builds the ``(objective, game)`` of each IRMBed method
by name (:data:`DEEP_METHODS`).

Example:
  >>> model = jirm.models.deep_model('resnet18')
  >>> game = games.invrat_ec(level='h', lr=0.01)
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

import jax
import jax.numpy as jnp
import optax

from jirm import objectives
from jirm.methods import base
from jirm.methods import games
from jirm.methods import registry
from jirm.models.encoder_head import DeepModel

HEAD_UPDATES = ("total", "erm", "frozen", "inner")


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
    head: head kind for :func:`jirm.models.deep_model`.
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


# IRMBed's recipe of each method on the deep model: the head kind, the head's
# training rule (:func:`make_step`) and the penalty's options. What each
# method is (its term, its game factory, its reference) is the registry's.
_IRMBED = dict(
    irmv1=dict(head_update="erm", penalty_options=dict(variant="split_perm")),
    vrex=dict(head_update="erm"),
    rvp=dict(head_update="erm"),
    irmv1_h=dict(head_update="erm"),
    irm_game_h=dict(head="ensemble", head_update="inner"),
    invrat_eb=dict(head="mlp", head_update="frozen"),
    invrat_ec_o=dict(head_update="frozen"),
    invrat_ec_h=dict(head_update="frozen"),
)


def _deep_method(name: str) -> DeepMethod:
  spec = registry.get(name)
  recipe = _IRMBED.get(name, {})
  term = registry.penalty_term(name)
  if term is not None:
    term = term(**recipe.get("penalty_options", {}))
  game = name if spec.family in ("game", "invrat", "group_dro") else None
  return DeepMethod(name, spec.reference, term, game,
                    head=recipe.get("head", "linear"),
                    head_update=recipe.get("head_update", "total"),
                    oracle=spec.oracle)


# IRMBed Table 1's methods (CIFAR-MNIST) and GroupDRO, by registry name.
DEEP_METHODS = {n: _deep_method(n) for n in (
    registry.names("cifar_mnist")
    + registry.names("shift", family="group_dro"))}


def build_method(name: str, *, schedule=None, l2: float = 0.0,
                 inner_lr: float = 0.01, inner_momentum: float = 0.9,
                 num_inners: int = 1, gap_scale: float = 1.0,
                 env_grad: bool = True, embed_dim: int = 128,
                 eb_hidden: int = 512, eta: float = 0.01):
  """``(objective, game)`` of a registered deep method.

  The objective is ``erm(pooled) [+ l2 * l2] [+ schedule * penalty]``; for
  InvRat the penalty is the game's term. Keyword arguments configure the
  games (see :func:`games.invrat_ec`, :func:`games.invrat_eb`,
  :func:`games.irm_game_h`,
  :func:`games.group_dro` with ``eta``).
  """
  if name not in DEEP_METHODS:
    raise ValueError(f"unknown deep method {name!r}; choose one of "
                     f"{sorted(DEEP_METHODS)}.")
  m = DEEP_METHODS[name]
  if m.game == "group_dro":  # The group-weighted risk replaces ERM.
    objective = games.group_dro_term * 1.0
    if l2:
      objective = objective + l2 * objectives.l2
    return objective, registry.factory(name)(eta=eta)
  objective = objectives.erm(reduction="pooled") * 1.0
  if l2:
    objective = objective + l2 * objectives.l2
  game = None
  if m.game is not None:  # The registry's Game factory, configured.
    kwargs = dict(registry.get(name).kwargs, lr=inner_lr,
                  momentum=inner_momentum, num_inners=num_inners)
    if name == "invrat_eb":
      kwargs.update(embed_dim=embed_dim, hidden=eb_hidden)
    if registry.get(name).family == "invrat":
      kwargs.update(gap_scale=gap_scale)
    game = registry.factory(name)(**kwargs)
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
              task: str = "binary", game: Optional[games.Game] = None,
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
    game: optional :class:`jirm.methods.games.Game`.
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
                game: Optional[games.Game] = None, anneal_step: int = 0,
                head_update: str = "total", transform: str = "none",
                init_params=None, reset_step: Optional[int] = None,
                step_factory: Optional[Callable] = None) -> base.Method:
  """A deep model's objective (and optional :class:`games.Game`) as a
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
      converted torchvision checkpoint, :mod:`jirm.models.convert`); the head is
      re-initialised.
    reset_step: re-initialise the optimizer here (default: the schedule's,
      e.g. ``domainbed``'s Adam reset at the anneal step).
    step_factory: builds the update with :func:`make_step`'s signature
      (default :func:`make_step`; e.g. :func:`jirm.methods.ipg.deep_step_factory`).

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
