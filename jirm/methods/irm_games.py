"""The original IRM games (Ahuja et al. 2020, "Invariant Risk Minimization
Games"): F-IRM and V-IRM on an MLP, as a round-robin best-response game.

Each training environment e has a player w_e; the prediction is the ensemble
``mean_e w_e(Phi(x))``. At step t only one player moves (round robin,
``t mod num_players``), with its own Adam, on the gradient of the ensemble's
cross-entropy on *its own* environment's batch with respect to *its own*
parameters. F-IRM fixes Phi = identity (players are MLPs on the inputs);
V-IRM adds Phi (an MLP) as an extra player with learning rate ``rep_lr_scale``
x lr, updated on the pooled batch of all environments (players are then
linear heads). Termination (the paper's rule): after ``warm_start`` steps,
stop at the first evaluation where the ensemble's training accuracy drops
below ``threshold``; :func:`add_game_stop` reports that point as the ``game_stop``
selection next to ``last`` / ``train_domain_val`` / ``oracle``.

All players' parameters are stacked on a leading player axis and updated by
one jitted step (the moving player is selected with ``jnp.where``, no Python
branching), so the whole game compiles once.

Example:
  >>> res = jirm.fit(jirm.data.colored_mnist(0), irm_game(variant='v'),
  ...                steps=3000, eval_every=50)
  >>> add_game_stop(res, warm_start=1000, threshold=0.6)
  >>> res.selections['game_stop']['test_acc']
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jirm import models
from jirm import objectives
from jirm import selection
from jirm.methods import base

VARIANTS = ("f", "v")


class GameState(NamedTuple):
  """Players ``[P, ...]``, representation (V-IRM) and their Adam states."""

  step: jax.Array
  players: Any
  rep: Any
  opt_players: Any
  opt_rep: Any
  rng: jax.Array


def irm_game(*, variant: str = "f", hidden_dim: int = 390, depth: int = 2,
             lr: float = 2.5e-4, rep_lr_scale: float = 0.1,
             batch_size: Optional[int] = 256, task: str = "binary",
             out: int = 1) -> base.Method:
  """Builds the game (see the module docstring).

  Args:
    variant: ``'f'`` (F-IRM, fixed identity representation, MLP players) or
      ``'v'`` (V-IRM, MLP representation as an extra player, linear players).
    hidden_dim: MLP width.
    depth: hidden layers of the player MLP (F) or representation (V).
    lr: players' Adam learning rate.
    rep_lr_scale: representation lr = lr x this (V-IRM).
    batch_size: samples per step from the moving player's env (None = all).
    task: loss type.
    out: output width.

  Returns:
    A :class:`jirm.methods.Method` over a :class:`GameState`; ``predict``
    is the ensemble (mean of the players' logits), ``export`` gives
    ``(players, rep)``.

  Example:
    >>> game = irm_game(variant='v')
    >>> result = jirm.fit(jirm.data.colored_mnist(0), game, steps=3000,
    ...                   eval_every=50)
  """
  if variant not in VARIANTS:
    raise ValueError(f"variant={variant!r}: use 'f' (F-IRM) or 'v' (V-IRM).")
  player = (models.mlp(hidden_dim, depth, out) if variant == "f" else
            models.MLP(hidden=(), out=out))
  rep = None if variant == "f" else models.MLP(hidden=(hidden_dim,) * depth,
                                               out=hidden_dim)
  opt_p = optax.adam(lr)
  opt_r = optax.adam(lr * rep_lr_scale)

  def features(rep_params, x):
    if rep is None:
      return x.reshape((x.shape[0], -1)).astype(jnp.float32)
    return jax.nn.relu(rep.apply(rep_params, x))

  def ensemble(players, rep_params, x_NX):
    h = features(rep_params, x_NX)
    return jax.vmap(lambda p: player.apply(p, h))(players).mean(0)

  def init(rng, data: base.EnvArrays):
    x_1X, num_envs = data.x[0, :1], data.y.shape[0]
    k_p, k_r, k_s = jax.random.split(rng, 3)
    rep_params = None if rep is None else rep.init(k_r, x_1X)
    h = features(rep_params, x_1X)
    players = jax.vmap(lambda k: player.init(k, h))(
        jax.random.split(k_p, num_envs))
    return GameState(jnp.zeros((), jnp.int32), players, rep_params,
                     jax.vmap(opt_p.init)(players),
                     None if rep is None else opt_r.init(rep_params), k_s)

  def update(state: GameState, data: base.EnvArrays):
    num_envs = data.y.shape[0]
    num_players = num_envs + (rep is not None)
    mover = state.step % num_players
    key = jax.random.fold_in(state.rng, state.step)
    batch = data if batch_size is None else base.sample_batch(
        data, key, batch_size)
    env = jnp.minimum(mover, num_envs - 1)
    pick = lambda a: jax.lax.dynamic_index_in_dim(a, env, 0, keepdims=True)
    own = jax.tree.map(pick, batch)  # The mover's own environment.

    def loss(players, rep_params, b):
      e, n = b.y.shape
      logits = ensemble(players, rep_params, b.x.reshape((e * n,) +
                                                         b.x.shape[2:]))
      out_ = objectives.Outputs(logits.reshape(e, n, -1), b.y, b.valid,
                                task=task)
      return objectives._pooled_mean(out_)  # pylint: disable=protected-access

    g_players = jax.grad(loss)(state.players, state.rep, own)
    upd, opt_new = jax.vmap(opt_p.update)(g_players, state.opt_players,
                                          state.players)
    moved = optax.apply_updates(state.players, upd)
    is_mover = jnp.arange(num_envs) == mover

    def sel(new, old):
      return jnp.where(is_mover.reshape((-1,) + (1,) * (new.ndim - 1)), new,
                       old)

    players = jax.tree.map(sel, moved, state.players)
    opt_players = jax.tree.map(sel, opt_new, state.opt_players)
    rep_params, opt_rep = state.rep, state.opt_rep
    if rep is not None:  # The representation moves on the pooled batch.
      g_rep = jax.grad(loss, argnums=1)(state.players, state.rep, batch)
      u, o = opt_r.update(g_rep, state.opt_rep, state.rep)
      rep_turn = mover == num_envs
      rep_params = jax.tree.map(lambda a, b: jnp.where(rep_turn, a, b),
                                optax.apply_updates(state.rep, u), state.rep)
      opt_rep = jax.tree.map(lambda a, b: jnp.where(rep_turn, a, b), o,
                             state.opt_rep)
    aux = {"mover": mover, "loss/own_env": loss(state.players, state.rep,
                                                own)}
    return GameState(state.step + 1, players, rep_params, opt_players,
                     opt_rep, state.rng), aux

  def predict(state: GameState, x_NX):
    return ensemble(state.players, state.rep, x_NX)

  return base.Method(init, update, predict,
                     export=lambda state: (state.players, state.rep))


def add_game_stop(res, *, warm_start: int, threshold: float):
  """Adds the game's termination rule to a fit of :func:`irm_game`: the
  selection ``game_stop`` is the first evaluation after ``warm_start`` steps
  whose ensemble train accuracy is below ``threshold`` (or the last one if
  the rule never fired; ``fired`` says which).

  Args:
    res: the :class:`jirm.train.FitResult` (changed in place).
    warm_start: steps before the rule applies.
    threshold: train accuracy below which the game stops.

  Returns:
    ``res``.

  Example:
    >>> res = add_game_stop(jirm.fit(splits, irm_game(), steps=3000),
    ...                     warm_start=1000, threshold=0.6)
    >>> res.selections["game_stop"]["test_acc"]
  """
  history, env_names = res.history, res.env_names
  train_acc = history["train_acc_E"].mean(1)
  fired = np.flatnonzero((history["step"] >= warm_start) &
                         (train_acc < threshold))
  stop = int(fired[0]) if len(fired) else len(train_acc) - 1
  only = {k: v[stop:stop + 1] for k, v in history.items()}
  res.selections["game_stop"] = dict(
      selection.select(only, env_names)["last"], fired=bool(len(fired)))
  return res
