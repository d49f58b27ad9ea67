"""IRM as a total-variation model, with inferred environments and a learned
penalty weight.

* IRM-TV (Lai & Wang, "Invariant Risk Minimization Is A Total Variation
  Model", ICML 2024): with a dummy scale s on the logits and
  g_e = d/ds [sum_{i in e} loss_i / N], IRMv1 is the TV-l2 penalty
  sum_e g_e^2 and IRM-TV-l1 is (sum_e |g_e|)^2 (:data:`jirm.irm_tv_l1`).
* Minimax-TV / ZIN (Lin et al., NeurIPS 2022): without environment labels,
  an inference network rho(z) = sigmoid(MLP(z)) of an auxiliary variable z
  assigns soft environments rho and 1 - rho; the penalty uses those weights,
  and rho's network ascends the penalty while ``step < anneal`` (then it is
  frozen). ZIN is the TV-l2 (IRMv1) form, Minimax-TV-l1 the TV-l1 form.
* OOD-TV (Lai et al., ICLR 2025): the penalty weight is learned,
  lambda = mean(softplus(MLP(theta))) of the flattened classifier parameters
  theta (not detached, so the classifier also descends through lambda); loss
  = nll + l2 ||theta||^2 + c * lambda * penalty with c switched on at
  ``anneal``; the lambda network ascends with the normalised step
  ``lr / (k^p ||grad||)`` (k = ascent step, 1-based).

Soft environments are fractional ``valid`` weights of
:class:`jirm.objectives.Outputs` (K copies of the pooled batch with
``valid_KN = [rho, 1 - rho]``), so the library's own ``irm_tv_l1`` and
``irm_tv_l2`` terms compute both the labelled and the inferred penalties.

With ``jirm.fit(..., runner='scan')`` a whole run (``steps`` updates, an
evaluation every ``eval_every``) is one jitted ``lax.scan``; restarts of one
method share the compiled program.

Example:
  >>> splits = jirm.data.zin_synthetic(seed=0)
  >>> method = irm_tv.tv_method(penalty='l1', envs='inferred')  # Minimax-TV
  >>> res = jirm.fit(splits, method, steps=10_000, seed=0, runner='scan')
  >>> sel = irm_tv.select(res.history, res.env_names)  # + worst-env rules
  >>> sel['last']['test_acc'], sel['last']['test_worst']
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from jirm import data as data_lib
from jirm import objectives
from jirm import schedules
from jirm import selection
from jirm.methods import base as method_base

_xavier = dict(kernel_init=nn.initializers.xavier_uniform(),
               bias_init=nn.initializers.zeros)
PENALTIES = {"l1": objectives.irm_tv_l1(form="multi_env"),
             "l2": objectives.irm_tv_l2}


class TorchLinear(nn.Module):
  """``torch.nn.Linear`` with PyTorch's default initialisation (weights and
  bias uniform in +-1/sqrt(fan_in)), the classifier of ZIN's synthetic
  study."""

  features: int = 1

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1)).astype(jnp.float32)
    bound = 1.0 / np.sqrt(x.shape[-1])
    init = lambda k, s, d=jnp.float32: jax.random.uniform(k, s, d, -bound,
                                                          bound)
    return nn.Dense(self.features, kernel_init=init, bias_init=init)(x)


class InferEnv(nn.Module):
  """ZIN's environment-inference net: z -> Dense(hidden) -> ReLU -> Dense(1)
  -> sigmoid (Xavier-uniform weights, zero biases); returns rho ``[N]``."""

  hidden: int = 16

  @nn.compact
  def __call__(self, z_NZ):
    h = nn.relu(nn.Dense(self.hidden, **_xavier)(z_NZ))
    return jax.nn.sigmoid(nn.Dense(1, **_xavier)(h))[:, 0]


class LambdaNet(nn.Module):
  """OOD-TV's penalty-weight net: theta -> Dense(hidden) -> ReLU -> Dense(1)
  -> softplus, averaged (Xavier-uniform weights, zero biases)."""

  hidden: int = 1

  @nn.compact
  def __call__(self, theta_P):
    h = nn.relu(nn.Dense(self.hidden, **_xavier)(theta_P[None]))
    return jnp.mean(jax.nn.softplus(nn.Dense(1, **_xavier)(h)))


class Pooled(NamedTuple):
  """Pooled training samples: ``x [M, ...]``, ``y [M]``, ``envs [E, M]``
  (one-hot true environments) and standardised auxiliary ``z [M, Z]``."""

  x: jax.Array
  y: jax.Array
  envs: jax.Array
  z: jax.Array

  def shard(self, mesh):
    """The samples split over the mesh's ``data`` axis (what
    ``jirm.fit(..., mesh=)`` calls): ``x``, ``y``, ``z`` on axis 0, ``envs``
    on axis 1. No padding (a padded sample would enter every pooled sum):
    the sample count must be a multiple of the axis size."""
    from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
    n, size = self.x.shape[0], mesh.shape["data"]
    if n % size:
      raise ValueError(f"mesh=: the {n} pooled training samples do not "
                       f"split over {size} devices; use a multiple of "
                       f"{size} (e.g. num_train={n - n % size}).")
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
    rest = lambda a: (None,) * (a.ndim - 1)
    return Pooled(put(self.x, P("data", *rest(self.x))),
                  put(self.y, P("data")),
                  put(self.envs, P(None, "data")),
                  put(self.z, P("data", *rest(self.z))))


def standardize(z_NZ):
  """(z - mean) / std with the unbiased std, as ZIN (constant columns are
  left centred instead of divided by 0)."""
  z_NZ = jnp.asarray(z_NZ, jnp.float32)
  std_1Z = jnp.std(z_NZ, axis=0, ddof=1, keepdims=True)
  return (z_NZ - z_NZ.mean(0, keepdims=True)) / jnp.where(std_1Z > 0, std_1Z,
                                                          1.0)


def pool(envs: data_lib.Envs) -> Pooled:
  """Concatenates the valid samples of every environment (in env order)."""
  keep = envs.valid.reshape(-1)
  e, n = envs.valid.shape
  x = envs.x.reshape((e * n,) + envs.x.shape[2:])[keep]
  y = envs.y.reshape(-1)[keep]
  onehot = np.repeat(np.eye(e, dtype=np.float32), n, axis=1)[:, keep]
  if envs.aux is None:
    z = np.zeros((len(y), 1), np.float32)
  else:
    z = envs.aux.reshape((e * n, -1))[keep]
  return Pooled(jnp.asarray(x), jnp.asarray(y), jnp.asarray(onehot),
                standardize(z))


class TVState(NamedTuple):
  """Explicit state: classifier, env-inference net and lambda net."""

  step: jax.Array
  params: Any
  opt_state: Any
  infer_params: Any
  infer_opt_state: Any
  lam_params: Any


class TVMethod(NamedTuple):
  """A :class:`jirm.methods.Method` with IRM-TV's extras.

  ``init(key, batch) -> TVState``; ``update(state, batch) -> (state,
  aux)``; ``loss(params, lam_params, w_KM, batch, step) -> (total, aux)``
  (the classifier's objective on environment weights ``w_KM``);
  ``weights(state, batch) -> [K, M]`` (soft) environments;
  ``predict(state, x) -> logits``; ``lam(state) -> lambda`` (the learned
  weight, or the fixed one); ``prepare``: :func:`pool` (the training
  environments pooled, with the standardised auxiliary variable) after
  checking the labels are binary and, for inferred environments, that the
  data carry ``aux``;
  ``export(state)`` = the classifier's parameters; ``eval_from`` = 0 (every
  evaluation point is a result)."""

  init: Callable
  update: Callable
  loss: Callable
  weights: Callable
  predict: Callable
  lam: Callable
  describe: str
  prepare: Callable
  export: Callable
  eval_from: int = 0


def _normalised_ascent(params, grads, lr, k):
  """params + lr * g / (k * ||g||) style step (no move when ||g|| = 0)."""
  norm = optax.global_norm(grads)
  scale = jnp.where(norm > 0, lr / (k * jnp.where(norm > 0, norm, 1.0)), 0.0)
  return jax.tree.map(lambda p, g: p + scale * g, params, grads)


def tv_method(*, penalty: Optional[str] = "l1", envs: str = "given",
              weight: float = 1e4, anneal: int = 5000, l2: float = 1e-3,
              lr: float = 5e-3, model: Optional[nn.Module] = None,
              learned_lambda: bool = False, ood_c: float = 200.0,
              ood_hidden: int = 1, ood_lr: float = 1e-3,
              ood_power: float = 1.0, infer_hidden: int = 16,
              infer_lr: float = 1e-3, infer_update: str = "adam",
              infer_ascent: bool = True) -> TVMethod:
  """Builds an IRM-TV-family method as a pure ``(init, update)`` pair.

  Args:
    penalty: ``'l1'`` (IRM-TV-l1, (sum_e |g_e|)^2), ``'l2'`` (IRMv1 / ZIN,
      sum_e g_e^2) or None (ERM).
    envs: ``'given'`` (true environment labels) or ``'inferred'`` (soft
      environments rho(z), rho and 1 - rho, from the auxiliary variable).
    weight: fixed penalty weight lambda, switched on at ``anneal`` with the
      total divided by 1 + lambda when lambda > 1 (the ``lin`` schedule of
      ZIN / IRM-TV). Ignored with ``learned_lambda``.
    anneal: warm-up steps: the penalty is off before it, and the inference
      network ascends only before it.
    l2: weight of the sum of squared classifier parameters.
    lr: Adam learning rate of the classifier.
    model: the classifier (default :class:`TorchLinear`).
    learned_lambda: OOD-TV: lambda = mean(softplus(MLP(theta))).
    ood_c: OOD-TV's constant c multiplying lambda after ``anneal``.
    ood_hidden: hidden width of the lambda net (1 for the synthetic data).
    ood_lr, ood_power: lambda-net ascent step ``ood_lr / (k^p ||g||)``.
    infer_hidden: hidden width of the inference net.
    infer_lr: step size of the inference net's ascent.
    infer_update: ``'adam'`` (ZIN, Minimax-TV: one Adam step on -penalty)
      or ``'normalised'`` (OOD-TV's release: ``lr * g / (||g|| (step+1))``).
    infer_ascent: ascend (True, the method) or descend (False: a released
      copy's bug, kept only to show the difference).

  Returns:
    A :class:`TVMethod`.

  Example:
    >>> zin = tv_method(penalty='l2', envs='inferred', weight=1e4)
    >>> ood = tv_method(penalty='l1', envs='given', learned_lambda=True)
  """
  if penalty is not None and penalty not in PENALTIES:
    raise ValueError(f"penalty={penalty!r}: use 'l1', 'l2' or None (ERM).")
  if envs not in ("given", "inferred"):
    raise ValueError(f"envs={envs!r}: use 'given' or 'inferred'.")
  if infer_update not in ("adam", "normalised"):
    raise ValueError(f"infer_update={infer_update!r}: use 'adam' or "
                     f"'normalised'.")
  if penalty is None and (envs == "inferred" or learned_lambda):
    raise ValueError("inferred environments and a learned lambda need a "
                     "penalty; pass penalty='l1' or 'l2'.")
  if anneal < 0 or lr <= 0:
    raise ValueError(f"anneal={anneal!r} must be >= 0 and lr={lr!r} > 0.")
  model = TorchLinear() if model is None else model
  infer_net, lam_net = InferEnv(infer_hidden), LambdaNet(ood_hidden)
  optimizer = optax.adam(lr)
  infer_opt = optax.adam(infer_lr)
  pen_term = None if penalty is None else PENALTIES[penalty]
  base = objectives.erm(reduction="pooled") * 1.0
  if l2:
    base = base + l2 * objectives.l2
  if pen_term is not None and not learned_lambda:
    sched = schedules.preset("lin", weight=weight, anneal=anneal)
    objective = base + sched * pen_term
  else:
    objective = base

  def weights(state, batch: Pooled):
    if envs == "given":
      return batch.envs
    rho_M = infer_net.apply(state.infer_params, batch.z)
    return jnp.stack([rho_M, 1.0 - rho_M])

  def outputs(params, w_KM, batch):
    logits_M1 = model.apply(params, batch.x)
    k, m = w_KM.shape
    return objectives.Outputs(
        jnp.broadcast_to(logits_M1[None], (k, m, 1)),
        jnp.broadcast_to(batch.y[None], (k, m)), w_KM, params=params,
        task="binary")

  def lam_value(lam_params, params):
    return lam_net.apply(lam_params, ravel_pytree(params)[0])

  def loss_fn(params, lam_params, w_KM, batch, step):
    out = outputs(params, w_KM, batch)
    total, aux = objective(out, step)
    if pen_term is not None:
      pen = pen_term.value(out)
      aux["penalty"] = pen
      if learned_lambda:
        lam = lam_value(lam_params, params)
        c = jnp.where(step >= anneal, jnp.float32(ood_c), 0.0)
        total = total + c * lam * pen
        aux.update(lam=lam, weight=c * lam)
      else:
        aux["weight"] = aux[f"weight/{pen_term.name}"]
    aux["total"] = total
    return total, aux

  def init(key, batch: Pooled) -> TVState:
    k_model, k_infer, k_lam = jax.random.split(key, 3)
    params = model.init(k_model, batch.x[:1])
    infer_params = infer_net.init(k_infer, batch.z[:1])
    lam_params = lam_net.init(k_lam, ravel_pytree(params)[0])
    return TVState(jnp.zeros((), jnp.int32), params, optimizer.init(params),
                   infer_params, infer_opt.init(infer_params), lam_params)

  def update(state: TVState, batch: Pooled):
    step = state.step
    w_KM = weights(state, batch)
    (_, aux), (g_params, g_lam) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(
            state.params, state.lam_params, w_KM, batch, step)
    updates, opt_state = optimizer.update(g_params, state.opt_state,
                                          state.params)
    params = optax.apply_updates(state.params, updates)

    infer_params, infer_opt_state = state.infer_params, state.infer_opt_state
    if envs == "inferred":
      # The inference net ascends the penalty at the current classifier.
      def pen_of(ip):
        w = weights(state._replace(infer_params=ip), batch)
        return pen_term.value(outputs(state.params, w, batch))
      g_inf = jax.grad(pen_of)(state.infer_params)
      if not infer_ascent:  # The buggy release copy descends.
        g_inf = jax.tree.map(jnp.negative, g_inf)
      active = step < anneal
      if infer_update == "adam":  # Adam minimises: feed it -g to ascend.
        upd, new_opt = infer_opt.update(jax.tree.map(jnp.negative, g_inf),
                                        state.infer_opt_state)
        new_inf = optax.apply_updates(state.infer_params, upd)
        infer_opt_state = method_base.tree_where(active, new_opt,
                                               state.infer_opt_state)
      else:
        new_inf = _normalised_ascent(state.infer_params, g_inf, infer_lr,
                                     (step + 1).astype(jnp.float32))
      infer_params = method_base.tree_where(active, new_inf, state.infer_params)
      rho = w_KM[0]
      env0 = batch.envs[0]
      aux["rho_gap"] = jnp.abs((rho * env0).sum() / env0.sum() -
                               (rho * (1 - env0)).sum() /
                               jnp.maximum((1 - env0).sum(), 1.0))

    lam_params = state.lam_params
    if learned_lambda:
      k = jnp.maximum(step - anneal + 1, 1).astype(jnp.float32) ** ood_power
      new_lam = _normalised_ascent(state.lam_params, g_lam, ood_lr, k)
      lam_params = method_base.tree_where(step >= anneal, new_lam,
                                        state.lam_params)
    return TVState(step + 1, params, opt_state, infer_params,
                   infer_opt_state, lam_params), aux

  parts = [objective.describe()]
  if learned_lambda:
    parts.append(f"OOD-TV learned lambda (c={ood_c:g}, hidden={ood_hidden}, "
                 f"lr={ood_lr:g}/k^{ood_power:g})")
  if envs == "inferred":
    parts.append(f"inferred envs rho(z) (hidden={infer_hidden}, "
                 f"{infer_update} {'ascent' if infer_ascent else 'descent'}"
                 f" lr={infer_lr:g} until step {anneal})")
  if pen_term is not None and learned_lambda:
    parts.insert(1, f"c*lambda*{pen_term.describe()}")

  def predict(state, x):
    return model.apply(state.params, x)

  def lam(state):
    if learned_lambda:
      return lam_value(state.lam_params, state.params)
    return jnp.float32(0.0 if pen_term is None else weight)

  def prepare(train: data_lib.Envs) -> Pooled:
    if envs == "inferred" and train.aux is None:
      raise ValueError("this method infers environments from Envs.aux, but "
                       "the training environments have aux=None; use a "
                       "dataset with an auxiliary variable "
                       "(jirm.data.zin_synthetic).")
    y = np.asarray(train.y)[np.asarray(train.valid, bool)]
    if y.dtype.kind == "f" or (y.size and (y.min() < 0 or y.max() > 1)):
      raise ValueError(f"IRM-TV methods are binary (one logit); the labels "
                       f"are {y.dtype} in [{y.min()}, {y.max()}]; use a "
                       f"binary dataset (labels 0/1).")
    return pool(train)

  return TVMethod(init, update, loss_fn, weights, predict, lam,
                  "; ".join(parts), prepare,
                  lambda state: state.params)


def select(history: dict, env_names: dict) -> dict:
  """IRM-TV's selections: :func:`jirm.selection.select` plus the worst test
  environment's accuracy (``test_worst``) at each selected point and the
  ``oracle_worst`` rule (best worst-env test accuracy over training, as
  OOD-TV's release records it; optimistic, uses test data).

  Args:
    history: the ``history`` of a :class:`jirm.train.FitResult`.
    env_names: its ``env_names``.

  Returns:
    rule -> dict(step, train_acc, test_acc, test_worst, env_acc, ...) for
    ``last``, ``oracle``, ``oracle_worst`` (and ``train_domain_val`` when
    the splits have validation data).

  Example:
    >>> res = jirm.fit(splits, tv_method(), steps=10_000, runner='scan')
    >>> select(res.history, res.env_names)['last']['test_worst']
  """
  worst = history["test_acc_E"].min(1)
  out = selection.select(history, env_names)
  i = int(np.argmax(worst))
  out["oracle_worst"] = dict(
      step=int(history["step"][i]),
      train_acc=float(history["train_acc_E"][i].mean()),
      test_acc=float(history["test_acc_E"][i].mean()),
      env_acc={n: float(a) for n, a in zip(env_names["test"],
                                           history["test_acc_E"][i])})
  steps = list(history["step"])
  for sel in out.values():
    sel["test_worst"] = float(worst[steps.index(sel["step"])])
  return out
