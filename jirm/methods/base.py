"""The method protocol and the array helpers every method shares.

A method is optax-shaped: a factory returns a :class:`Method`, a NamedTuple of
pure functions over an explicit state pytree, and one trainer
(:func:`jirm.train.fit`) runs every method the same way (evaluation,
selection, orbax resume, TensorBoard, divergence checks, device mesh)::

    state = method.init(rng, data)            # data = method.prepare(envs)
    state, metrics = method.update(state, data)   # jit it; one update
    logits_NC = method.predict(state, x_NX)       # eval mode

The state is any pytree with a ``step`` field (an int32 scalar counting
updates). Everything a method carries (parameters, optimizer states,
BatchNorm statistics, environment heads, mask scores, GroupDRO weights, a
lambda network) lives in it, so it can be checkpointed, replicated over a
mesh or vmapped over a sweep without the trainer knowing what it holds.

This module sits below the trainer: methods import it, never
:mod:`jirm.train`.

Example:
  >>> method = jirm.methods.from_objective(
  ...     jirm.models.mlp(390), jirm.erm + 91257.19 * jirm.irmv1,
  ...     optax.adam(4.9e-4))
  >>> result = jirm.fit(splits, method, steps=501)
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from jirm import data as data_lib


class EnvArrays(NamedTuple):
  """Device arrays of one :class:`jirm.data.Envs`: ``x [E, N, ...]``,
  ``y [E, N]`` and ``valid [E, N]`` (0 on padding rows)."""

  x: jax.Array
  y: jax.Array
  valid: jax.Array

  @classmethod
  def from_envs(cls, envs: data_lib.Envs) -> "EnvArrays":
    return cls(jnp.asarray(envs.x), jnp.asarray(envs.y),
               jnp.asarray(envs.valid, jnp.float32))


def _state_params(state):
  return state.params


class Method(NamedTuple):
  """A training method: pure functions over an explicit state pytree.

  Attributes:
    init: ``(rng, data) -> state``; ``rng`` is the run's seed key
      (``jax.random.key(seed)``), ``data`` the output of ``prepare``.
    update: ``(state, data) -> (state, metrics)``: one update, pure and
      jittable; ``metrics`` is a dict of arrays (loss terms, weights,
      ``train_acc``) that the trainer records at every evaluation.
    predict: ``(state, x_NX) -> logits_NC`` in evaluation mode (BatchNorm
      running statistics, SparseIRM's sampled mask).
    prepare: host-side ``jirm.data.Envs -> data`` for the training
      environments (default :meth:`EnvArrays.from_envs`).
    export: ``state -> what FitResult.params holds`` (default
      ``state.params``).
    eval_from: the trainer evaluates only after this many updates, at
      ``eval_from + k * eval_every`` and after the last update (a method
      whose first phases produce no result, e.g. MRM's dense and mask
      phases: :func:`jirm.methods.sparse.mrm_method`); default 0.

  Example:
    >>> method = Method(init, update, predict)
    >>> jirm.fit(splits, method, steps=100)
  """

  init: Callable
  update: Callable
  predict: Callable
  prepare: Callable = EnvArrays.from_envs
  export: Callable = _state_params
  eval_from: int = 0


class TrainState(NamedTuple):
  """The state of :func:`jirm.methods.from_objective` on a Flax module."""

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def forward(apply_fn, params, x_EBX, return_features: bool = False):
  """One forward pass over all environments: ``[E, B, ...] -> [E, B, C]``.

  With ``return_features`` the model's ``apply(..., return_features=True)``
  gives ``(features, logits)`` and so does this, ``([E, B, D], [E, B, C])``
  (the penultimate features that :mod:`jirm.objectives`' feature terms
  read)."""
  e, b = x_EBX.shape[:2]
  x_NX = x_EBX.reshape((e * b,) + x_EBX.shape[2:])
  if not return_features:
    return apply_fn(params, x_NX).reshape(e, b, -1)
  try:
    feats, logits = apply_fn(params, x_NX, return_features=True)
  except TypeError as err:
    raise ValueError(
        "the objective reads features (coral, mmd, feature_var) but the "
        "model's apply takes no return_features=True; use jirm.models.mlp or "
        "a model whose __call__ returns (features, logits) with it.") from err
  return feats.reshape(e, b, -1), logits.reshape(e, b, -1)


def sample_batch(data: EnvArrays, rng, batch_size: int) -> EnvArrays:
  """Draws ``batch_size`` samples (with replacement) from every env."""
  n_valid_E = data.valid.sum(1).astype(jnp.int32)
  keys = jax.random.split(rng, data.y.shape[0])
  idx_EB = jax.vmap(lambda k, n: jax.random.randint(k, (batch_size,), 0, n))(
      keys, n_valid_E)
  take = lambda a: jnp.take_along_axis(
      a, idx_EB.reshape(idx_EB.shape + (1,) * (a.ndim - 2)), axis=1)
  return EnvArrays(take(data.x), take(data.y), take(data.valid))


def epoch_batch(data: EnvArrays, rng, step, batch_size: int) -> EnvArrays:
  """A balanced minibatch of ``batch_size`` samples from every env, drawn
  without replacement within an epoch (a fresh permutation per epoch).

  The epoch length is ``min_e n_e // batch_size`` steps; ``rng`` must be the
  run's fixed key (the epoch index is folded in).
  """
  n_valid_E = data.valid.sum(1).astype(jnp.int32)
  steps_per_epoch = jnp.maximum(n_valid_E.min() // batch_size, 1)
  epoch, pos = step // steps_per_epoch, step % steps_per_epoch
  keys = jax.random.split(jax.random.fold_in(rng, epoch), data.y.shape[0])
  # Valid rows first, in random order.
  order_EN = jax.vmap(lambda k, v: jnp.argsort(
      jnp.where(v > 0, jax.random.uniform(k, v.shape), 2.0)))(keys, data.valid)
  idx_EB = jax.lax.dynamic_slice_in_dim(order_EN, pos * batch_size,
                                        batch_size, axis=1)
  take = lambda a: jnp.take_along_axis(
      a, idx_EB.reshape(idx_EB.shape + (1,) * (a.ndim - 2)), axis=1)
  return EnvArrays(take(data.x), take(data.y), take(data.valid))


def tree_where(cond, new, old):
  """``new`` where the traced boolean ``cond`` holds, else ``old`` (leafwise;
  selects state inside jit without Python branching)."""
  return jax.tree.map(lambda a, b: jnp.where(cond, a, b), new, old)


def reset_at(optimizer: optax.GradientTransformation, opt_state, params,
             step, reset_step: Optional[int]):
  """``optimizer.init(params)`` when ``step == reset_step``, else
  ``opt_state`` (traced: no retrace at the reset). None never resets."""
  if reset_step is None:
    return opt_state
  return tree_where(step == reset_step, optimizer.init(params), opt_state)
