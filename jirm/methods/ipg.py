"""IPG: invariance pair-guided learning with corrective gradients.

Surner, Khelil & Bothmann, "Invariance Pair-Guided Learning" (arXiv
2502.18975), SPEC §3. An *invariance pair* (x1, x2) is the same sample with
only the spurious attribute changed (ColoredMNIST: the digit in colour 0 and
in colour 1). The
*rationale* of an input is R = W ⊙ z (final-layer weights times penultimate
features, one column per class). Over a pair batch I:

* d(I) = || mean_I R(x1) - mean_I R(x2) ||_2 (spectral norm of a D x C
  matrix) and the corrective gradient g_d = grad d(I);
* c(I) = mean_I symmetric KL between the pair members' predictions (the
  invariance condition).

Each iteration takes two optimizer steps with the same optimizer and
learning rate: first with g_d, then with the loss gradient g_L (computed at
the corrected parameters), rescaled to length ``alpha * ||g_d||`` when
c(I) > t. The loss may be any jirm objective (ERM alone, or ERM plus an IRM
penalty: "IPG combined with any jirm penalty").

Example:
  >>> splits = jirm.data.colored_mnist(seed=0)
  >>> pairs = ipg.colored_mnist_pairs(splits.train, num_pairs=2000, seed=0)
  >>> method = ipg.ipg(model=jirm.models.mlp(390), pairs=pairs,
  ...                  objective=jirm.erm + 0.0011 * jirm.l2,
  ...                  optimizer=optax.adam(4.9e-4))
  >>> res = jirm.fit(splits, method, steps=501)
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jirm import data as data_lib
from jirm import objectives
from jirm.methods import base
from jirm.methods import objective as objective_lib


# ----------------------------------------------------------------------------
# Rationales, distance and invariance condition.


def rationale(feats_ND, kernel_DC):
  """R = W ⊙ z per sample: ``[N, D, C]`` (feature d's contribution to the
  logit of class c)."""
  return feats_ND[:, :, None] * kernel_DC[None]


def spectral_norm(m_DC):
  """Largest singular value of a D x C matrix, with a finite gradient at 0
  (via the largest eigenvalue of the C x C Gram matrix)."""
  gram_CC = m_DC.T @ m_DC
  if gram_CC.shape == (1, 1):
    return objectives.safe_sqrt(gram_CC[0, 0])
  return objectives.safe_sqrt(jnp.linalg.eigvalsh(gram_CC)[-1])


def rationale_distance(feats1_PD, feats2_PD, kernel_DC):
  """d(I) = spectral norm of (mean rationale of x1 - mean rationale of x2)."""
  diff_DC = (rationale(feats1_PD, kernel_DC).mean(0) -
             rationale(feats2_PD, kernel_DC).mean(0))
  return spectral_norm(diff_DC)


def symmetric_kl(logits1_PC, logits2_PC, task: str = "binary"):
  """Mean over pairs of KL(p1 || p2) + KL(p2 || p1) of the predictions
  (Bernoulli for one binary logit, categorical otherwise)."""
  if task == "binary":
    lp1 = jnp.concatenate([jax.nn.log_sigmoid(logits1_PC),
                           jax.nn.log_sigmoid(-logits1_PC)], -1)
    lp2 = jnp.concatenate([jax.nn.log_sigmoid(logits2_PC),
                           jax.nn.log_sigmoid(-logits2_PC)], -1)
  elif task == "multiclass":
    lp1 = jax.nn.log_softmax(logits1_PC, -1)
    lp2 = jax.nn.log_softmax(logits2_PC, -1)
  else:
    raise ValueError(f"task={task!r}: IPG needs 'binary' or 'multiclass'.")
  return jnp.mean(jnp.sum((jnp.exp(lp1) - jnp.exp(lp2)) * (lp1 - lp2), -1))


# ----------------------------------------------------------------------------
# Invariance pairs.


class Pairs(NamedTuple):
  """A pool of invariance pairs ``x [M, 2, ...]`` (member 0: the original,
  member 1: the spurious attribute changed) and their labels ``y [M]``."""

  x: np.ndarray
  y: np.ndarray

  def check(self):
    if self.x.ndim < 3 or self.x.shape[1] != 2:
      raise ValueError(f"pairs.x has shape {self.x.shape}; expected "
                       f"[M, 2, ...] (M pairs of two inputs).")
    return self


def _pick(envs: data_lib.Envs, num_pairs: Optional[int], seed: int):
  valid = np.flatnonzero(envs.valid.reshape(-1))
  rng = np.random.default_rng(seed)
  if num_pairs is not None:
    if not 1 <= num_pairs <= len(valid):
      raise ValueError(f"num_pairs={num_pairs!r}: choose 1..{len(valid)} "
                       f"(the training samples).")
    valid = rng.choice(valid, num_pairs, replace=False)
  x = envs.x.reshape((-1,) + envs.x.shape[2:])[valid]
  y = envs.y.reshape(-1)[valid]
  return x, y, valid, rng


def colored_mnist_pairs(envs: data_lib.Envs, *, num_pairs: Optional[int] = None,
                        seed: int = 0) -> Pairs:
  """ColoredMNIST pairs: the same digit image in colour 0 (member 0) and in
  colour 1 (member 1), drawn from the training environments.

  The members are ordered by the spurious attribute's value, so the mean
  rationale difference over a pair batch measures the effect of the colour
  (with members ordered as "original / flipped" the effects of the two
  colours would cancel in the mean).

  Args:
    envs: 2-channel ColoredMNIST environments (``x [E, N, H, W, 2]``).
    num_pairs: pool size (random training samples); None = every one.
    seed: selects the samples.
  """
  if envs.x.shape[-1] != 2:
    raise ValueError(f"colored_mnist_pairs needs 2 colour channels, got x of "
                     f"shape {envs.x.shape}; use full_colored_mnist_pairs "
                     f"for FullColoredMNIST.")
  x, y, _, _ = _pick(envs, num_pairs, seed)
  grey = x.sum(-1)  # One channel is zero.
  zero = np.zeros_like(grey)
  return Pairs(np.stack([np.stack([grey, zero], -1),
                         np.stack([zero, grey], -1)], 1), y)


def full_colored_mnist_pairs(envs: data_lib.Envs, *,
                             num_pairs: Optional[int] = None,
                             seed: int = 0) -> Pairs:
  """FullColoredMNIST pairs: the same digit recoloured with a uniformly
  random *other* colour of :data:`jirm.data.FULL_COLORS`.

  The grey image and its colour are recovered exactly from x = grey *
  colour (the colour whose reconstruction error is smallest).
  """
  colors = data_lib.FULL_COLORS.astype(np.float32)
  if envs.x.shape[-1] != 3:
    raise ValueError(f"full_colored_mnist_pairs needs 3 channels, got x of "
                     f"shape {envs.x.shape}.")
  x, y, _, rng = _pick(envs, num_pairs, seed)
  main = colors.argmax(1)
  grey_KN = np.stack([x[..., c].reshape(len(x), -1) / colors[k, c]
                      for k, c in enumerate(main)])         # [K, N, HW]
  flat = x.reshape(len(x), -1, 3)
  err = np.stack([np.abs(flat - grey_KN[k][..., None] * colors[k]).sum((1, 2))
                  for k in range(len(colors))])
  color = err.argmin(0)
  grey = grey_KN[color, np.arange(len(x))].reshape(x.shape[:-1])
  new = (color + rng.integers(1, len(colors), len(x))) % len(colors)
  x2 = grey[..., None] * colors[new][:, None, None, :]
  return Pairs(np.stack([x, x2.astype(np.float32)], 1), y)


def cifar_mnist_pairs(envs: data_lib.Envs, *, num_pairs: Optional[int] = None,
                      seed: int = 0) -> Pairs:
  """CIFAR-MNIST pairs: the same CIFAR image (bottom half) under an MNIST
  half (top 32 rows) showing digit 0 (member 0) and digit 1 (member 1); the
  sample's own MNIST half is kept for its digit and the other digit's half
  is taken from another training sample. The digit is ``label`` where
  ``agree`` else ``1 - label``."""
  if envs.x.shape[-3] != 64:
    raise ValueError(f"cifar_mnist_pairs needs 64-row CIFAR-MNIST images, got "
                     f"x of shape {envs.x.shape}.")
  x, y, idx, rng = _pick(envs, num_pairs, seed)
  all_x = envs.x.reshape((-1,) + envs.x.shape[2:])
  keep = np.flatnonzero(envs.valid.reshape(-1))
  agree = envs.agree.reshape(-1)
  ys = envs.y.reshape(-1)
  digit_all = np.where(agree, ys, 1 - ys)[keep]
  digit = np.where(agree[idx], ys[idx], 1 - ys[idx])
  members = [x.copy(), x.copy()]
  for d in (0, 1):
    sel = np.flatnonzero(digit != d)     # These need digit d's half.
    donors = keep[digit_all == d]
    if len(sel) and not len(donors):
      raise ValueError(f"no training sample shows digit {d}; cannot build "
                       f"CIFAR-MNIST pairs.")
    members[d][sel, :32] = all_x[rng.choice(donors, len(sel)), :32]
  return Pairs(np.stack(members, 1), y)


def group_pairs(envs: data_lib.Envs, *, num_pairs: int = 300,
                seed: int = 0) -> Pairs:
  """Pairs for group datasets without counterfactual images (Waterbirds,
  CelebA, ColoredObject; :mod:`jirm.data.shift`): member 0 has spurious
  attribute a = 0, member 1 a = 1, both with the same label (different
  images, e.g. two birds on land / water); half the pairs per label. The
  attribute is ``label`` where ``agree`` else ``1 - label``.

  Raises:
    ValueError: a label has no image with one of the attribute values (e.g.
      Waterbird-100's training split: pass its validation envs instead).
  """
  ok = envs.valid.reshape(-1)
  x = envs.x.reshape((-1,) + envs.x.shape[2:])[ok]
  y = envs.y.reshape(-1)[ok]
  a = np.where(envs.agree.reshape(-1)[ok], y, 1 - y)
  rng = np.random.default_rng(seed)
  first, second, labels = [], [], []
  for label in (0, 1):
    i0 = np.flatnonzero((y == label) & (a == 0))
    i1 = np.flatnonzero((y == label) & (a == 1))
    if not len(i0) or not len(i1):
      raise ValueError(f"no pair for label {label}: these envs have no image "
                       f"with spurious attribute {0 if not len(i0) else 1} "
                       f"(Waterbird-100 training data has none; use the "
                       f"validation envs).")
    m = num_pairs // 2 + (num_pairs % 2 if label == 0 else 0)
    first.append(rng.choice(i0, m))
    second.append(rng.choice(i1, m))
    labels.append(np.full(m, label, y.dtype))
  i, j = np.concatenate(first), np.concatenate(second)
  return Pairs(np.stack([x[i], x[j]], 1), np.concatenate(labels))


PAIR_SOURCES = {"colored_mnist": colored_mnist_pairs,
                "full_colored_mnist": full_colored_mnist_pairs,
                "cifar_mnist": cifar_mnist_pairs, "groups": group_pairs}


# ----------------------------------------------------------------------------
# The method.


_as_objective = objective_lib._as_objective  # pylint: disable=protected-access


def _pair_sampler(pairs: Pairs, pair_batch: int):
  """``rng -> (x1 [P, ...], x2 [P, ...])``: P pairs without replacement."""
  pool_x = jnp.asarray(pairs.x)
  num = pool_x.shape[0]
  p = min(int(pair_batch), num)

  def sample(rng):
    x = pool_x[jax.random.permutation(rng, num)[:p]]
    return x[:, 0], x[:, 1]

  return sample


def two_step(optimizer: optax.GradientTransformation, params, opt_state, *,
             distance: Callable, loss_grad: Callable, pair_logits: Callable,
             threshold: float, alpha: float, task: str = "binary"):
  """IPG's update from ``params``: an optimizer step on g_d = grad d(I),
  then one on g_L at the corrected parameters, rescaled to
  ``alpha * ||g_d||`` when c(I) > ``threshold``.

  Args:
    optimizer, params, opt_state: the optax optimizer and its state.
    distance: ``params -> d(I)``.
    loss_grad: ``params -> (g_L, aux)``.
    pair_logits: ``params -> (logits1, logits2)`` of the pair members.
    threshold, alpha, task: see :func:`ipg`.

  Returns:
    ``(params, opt_state, aux, ipg_aux)``: ``aux`` from ``loss_grad``;
    ``ipg_aux`` holds ``ipg_d``, ``ipg_c``, ``ipg_gated`` and both gradient
    norms.
  """
  d, g_d = jax.value_and_grad(distance)(params)
  upd, opt_state = optimizer.update(g_d, opt_state, params)
  params = optax.apply_updates(params, upd)
  g_l, aux = loss_grad(params)
  c = symmetric_kl(*pair_logits(params), task)
  gd_norm, gl_norm = optax.global_norm(g_d), optax.global_norm(g_l)
  gated = c > threshold
  scale = jnp.where(gated, alpha * gd_norm / jnp.maximum(gl_norm, 1e-30), 1.0)
  upd, opt_state = optimizer.update(jax.tree.map(lambda g: g * scale, g_l),
                                    opt_state, params)
  params = optax.apply_updates(params, upd)
  return params, opt_state, aux, dict(
      ipg_d=d, ipg_c=c, ipg_gated=gated.astype(jnp.float32),
      ipg_gd_norm=gd_norm, ipg_gl_norm=gl_norm)


def describe(objective, *, threshold: float, alpha: float, pair_batch: int,
             num_pairs: Optional[int]) -> str:
  """Records' label of an IPG run, e.g. ``IPG(t=2e-06, alpha=0.2,
  pairs=300/all) on erm + 0.0011*l2``."""
  return (f"IPG(t={threshold:g}, alpha={alpha:g}, pairs={pair_batch}/"
          f"{num_pairs or 'all'}) on {_as_objective(objective).describe()}")


def mlp_head_kernel(params):
  """The final-layer weights ``[D, C]`` of :class:`jirm.models.MLP`."""
  return params["params"]["head"]["kernel"]


def ipg(*, model, objective: objectives.Objective,
        optimizer: optax.GradientTransformation, pairs: Pairs,
        head_kernel: Callable = mlp_head_kernel, threshold: float = 2e-6,
        alpha: float = 1.0, pair_batch: int = 300, task: str = "binary",
        batch_size: Optional[int] = None) -> base.Method:
  """IPG's two-step update as a :class:`jirm.methods.Method`.

  Args:
    model: a Flax module whose ``apply(params, x, return_features=True)``
      returns ``(feats_ND, logits_NC)`` (e.g. :class:`jirm.models.MLP`).
    objective: the loss L (ERM, or ERM plus any jirm penalty).
    optimizer: one optax optimizer for both steps (same learning rate).
    pairs: the pool of invariance pairs.
    head_kernel: ``params -> W [D, C]``, the final linear layer's weights.
    threshold: t; the loss gradient is rescaled when c(I) > t (2e-6 on
      ColoredMNIST in the paper; up to 1e-1 elsewhere).
    alpha: the rescaled loss gradient's length relative to ||g_d||.
    pair_batch: pairs per iteration (300 in the paper), drawn without
      replacement from the pool (the whole pool if smaller).
    task: ``'binary'`` or ``'multiclass'``.
    batch_size: samples per env for L; None = full batch.

  Returns:
    A method whose state is a :class:`jirm.methods.TrainState`; run it with
    :func:`jirm.fit` (the history then also holds ``ipg_d`` (d(I)),
    ``ipg_c`` (c(I)) and ``ipg_gated`` at every evaluation).

  Example:
    >>> method = ipg(model=jirm.models.mlp(390), objective=jirm.erm,
    ...              optimizer=optax.adam(1e-3), pairs=pairs, alpha=0.2)
    >>> result = jirm.fit(splits, method, steps=501)
  """
  pairs.check()
  objective = _as_objective(objective)
  apply_fn = model.apply
  if alpha <= 0 or threshold < 0:
    raise ValueError(f"alpha={alpha!r} must be > 0 and threshold="
                     f"{threshold!r} >= 0.")
  if objective.schedule() is not None and objective.schedule().reset_step:
    raise ValueError("IPG does not support schedules that reset the "
                     "optimizer (domainbed); use the 'irm' or 'lin' preset.")
  sample_pairs = _pair_sampler(pairs, pair_batch)

  def features_logits(params, x1, x2):
    # One pass over both members.
    f, logits = apply_fn(params, jnp.concatenate([x1, x2]),
                         return_features=True)
    return jnp.split(f, 2), jnp.split(logits, 2)

  loss_fn = objective_lib.make_loss_fn(apply_fn, objective, task)

  def init(key, data: base.EnvArrays):
    k_init, k_run = jax.random.split(key)
    params = model.init(k_init, data.x[0, :1])
    return base.TrainState(jnp.zeros((), jnp.int32), params,
                                optimizer.init(params), k_run)

  def update(state: base.TrainState, data: base.EnvArrays):
    k_pair, k_batch, k_obj = jax.random.split(
        jax.random.fold_in(state.rng, state.step), 3)
    x1, x2 = sample_pairs(k_pair)
    batch = data if batch_size is None else base.sample_batch(
        data, k_batch, batch_size)
    params, opt_state, aux, ipg_aux = two_step(
        optimizer, state.params, state.opt_state,
        distance=lambda p: rationale_distance(
            *features_logits(p, x1, x2)[0], head_kernel(p)),
        loss_grad=lambda p: jax.grad(loss_fn, has_aux=True)(
            p, batch, k_obj, state.step),
        pair_logits=lambda p: features_logits(p, x1, x2)[1],
        threshold=threshold, alpha=alpha, task=task)
    return base.TrainState(state.step + 1, params, opt_state,
                           state.rng), dict(aux, **ipg_aux)

  def predict(state: base.TrainState, x_NX):
    return apply_fn(state.params, x_NX)

  return base.Method(init, update, predict)


def deep_head_kernel(params):
  """The linear head's weights ``[D, C]`` of a :class:`jirm.models.DeepModel`
  (``models.LinearHead``'s ``fc``, or the MLP's ``head`` layer of
  :func:`jirm.models.mlp_model`)."""
  head = params["head"]["params"]
  return head["fc" if "fc" in head else "head"]["kernel"]


def deep_step_factory(pairs: Pairs, *, threshold: float = 2e-6,
                      alpha: float = 1.0, pair_batch: int = 300,
                      head_kernel: Callable = deep_head_kernel) -> Callable:
  """IPG for deep models: a ``step_factory`` for
  :func:`jirm.methods.deep.deep_method`.

  The returned factory has :func:`jirm.methods.deep.make_step`'s signature and
  builds IPG's two-step update on a balanced epoch batch. Both pair members
  go through one train-mode forward pass (shared BatchNorm statistics, which
  are not kept); the loss pass updates the BatchNorm statistics as usual.

  Example:
    >>> pairs = ipg.cifar_mnist_pairs(splits.train, num_pairs=1000)
    >>> method = deep.deep_method(
    ...     model, jirm.erm(reduction='pooled'), optax.adam(1e-3),
    ...     batch_size=64, step_factory=ipg.deep_step_factory(pairs, alpha=0.2))
    >>> res = jirm.fit(splits, method, steps=280)
  """
  pairs.check()
  from jirm.methods import deep  # pylint: disable=g-import-not-at-top
  sample_pairs = _pair_sampler(pairs, pair_batch)

  def factory(model, objective, optimizer, *, batch_size, task="binary",
              game=None, anneal_step=0, head_update="total",
              transform="none", reset_step=None):
    del anneal_step
    objective = _as_objective(objective)
    sched = objective.schedule()
    if reset_step is not None or (sched is not None and sched.reset_step):
      raise ValueError("IPG does not support schedules that reset the "
                       "optimizer (domainbed); use the 'irm' or 'lin' "
                       "preset.")
    if head_update != "total" or transform != "none":
      raise ValueError("IPG's deep step takes head_update='total' and "
                       "transform='none'.")

    def pair_pass(params, batch_stats, x1, x2):
      feats, _ = model.features(params, batch_stats,
                                jnp.concatenate([x1, x2]), train=True)
      logits = model.head_fn(params["head"], feats)
      return jnp.split(feats, 2), jnp.split(logits, 2)

    def loss_fn(params, batch_stats, game_state, batch, rng, step):
      feats, logits, new_bs = deep._forward(  # pylint: disable=protected-access
          model, params, batch_stats, batch.x, train=True)
      out = objectives.Outputs(logits, batch.y, batch.valid, params, rng,
                               task, feats, model.head_fn, params["head"])
      if game is not None:  # E.g. GroupDRO's weights (IPG + GroupDRO).
        sg = jax.lax.stop_gradient
        game_state, _ = game.inner(
            game_state, sg(params["head"]),
            out._replace(logits=sg(logits), features=sg(feats), params=None),
            False)
        out = out._replace(state=game_state)
      total, aux = objective(out, step)
      aux["train_acc"] = objectives.accuracy(logits, batch.y, batch.valid,
                                             task).mean()
      return total, (aux, new_bs, game_state)

    def step_fn(state, data: base.EnvArrays):
      k = jax.random.fold_in(state.rng, state.step)
      k_pair, k_obj = jax.random.split(jax.random.fold_in(k, 3))
      x1, x2 = sample_pairs(k_pair)
      batch = base.epoch_batch(data, state.rng, state.step, batch_size)
      bs = state.batch_stats
      params, opt_state, (aux, new_bs, game_state), ipg_aux = two_step(
          optimizer, state.params, state.opt_state,
          distance=lambda p: rationale_distance(
              *pair_pass(p, bs, x1, x2)[0], head_kernel(p)),
          loss_grad=lambda p: jax.grad(loss_fn, has_aux=True)(
              p, bs, state.game, batch, k_obj, state.step),
          pair_logits=lambda p: pair_pass(p, bs, x1, x2)[1],
          threshold=threshold, alpha=alpha, task=task)
      return deep.DeepState(state.step + 1, params, new_bs, opt_state,
                            game_state, state.rng), dict(aux, **ipg_aux)

    return step_fn

  return factory
