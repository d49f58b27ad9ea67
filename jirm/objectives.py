"""Composable IRM objectives: ERM plus weighted invariance penalties.

A :class:`Term` is a pure function of the per-environment model outputs
(:class:`Outputs`). Terms compose with ``+`` and scale with floats, optax
schedules or :class:`jirm.schedules.PenaltySchedule` presets::

    objective = jirm.erm + 1e-3 * jirm.l2 + sched * jirm.irmv1(variant='split')
    total, aux = objective(outputs, step)    # aux: every term and weight

Penalties follow the anchors of SPEC §2; each docstring gives its formula.
One forward pass covers all environments; risks are reduced per environment
with masks (padding rows carry ``valid = 0``), so every term works on the
global per-environment risk, also when the batch is sharded over devices.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax


class Outputs(NamedTuple):
  """Everything a term may read.

  Attributes:
    logits: ``[E, B, C]`` model outputs (C = 1 for binary / regression).
    labels: ``[E, B]`` targets.
    valid: ``[E, B]`` float, 1 for real samples, 0 for padding.
    params: model parameters (for weight penalties).
    rng: PRNG key for stochastic terms.
    task: ``'binary'``, ``'multiclass'`` or ``'regression'`` (static).
    features: ``[E, B, D]`` output of the feature extractor h_u (deep models;
      terms on the hidden head "(h)" read it).
    head: ``head(head_params, feats_ND) -> logits_NC``, the real head g_v.
    head_params: parameters of ``head`` at which ``logits`` were computed.
    state: a stateful method's state (e.g. InvRat's environment heads).
  """

  logits: jax.Array
  labels: jax.Array
  valid: jax.Array
  params: Any = None
  rng: Optional[jax.Array] = None
  task: str = "binary"
  features: Optional[jax.Array] = None
  head: Optional[Callable] = None
  head_params: Any = None
  state: Any = None


def sample_losses(logits_EBC, labels_EB, task: str = "binary"):
  """Per-sample loss ``[E, B]``: sigmoid BCE, softmax CE or squared error."""
  if task == "binary":
    return optax.sigmoid_binary_cross_entropy(
        logits_EBC[..., 0], labels_EB.astype(logits_EBC.dtype))
  if task == "multiclass":
    return optax.softmax_cross_entropy_with_integer_labels(
        logits_EBC, labels_EB.astype(jnp.int32))
  if task == "regression":
    return (logits_EBC[..., 0] - labels_EB) ** 2
  raise ValueError(f"task={task!r}: use 'binary', 'multiclass' or "
                   f"'regression'.")


def _masked_mean(v_EB, w_EB, axis=-1):
  return (v_EB * w_EB).sum(axis) / jnp.maximum(w_EB.sum(axis), 1.0)


def env_risks(out: Outputs, scale_E=None):
  """Per-environment mean loss ``R_e`` ``[E]``, logits scaled by ``scale_E``.

  vmapped over the env axis; padding rows (``valid = 0``) are ignored.
  """
  if scale_E is None:
    scale_E = jnp.ones((out.logits.shape[0],), out.logits.dtype)

  def risk(logits_BC, labels_B, valid_B, scale):
    losses_B = sample_losses(scale * logits_BC, labels_B, out.task)
    return _masked_mean(losses_B, valid_B)

  return jax.vmap(risk)(out.logits, out.labels, out.valid, scale_E)


def accuracy(logits_EBC, labels_EB, valid_EB, task: str = "binary"):
  """Per-environment accuracy ``[E]`` (negative MSE for regression)."""
  if task == "binary":
    correct = (logits_EBC[..., 0] > 0) == (labels_EB > 0.5)
  elif task == "multiclass":
    correct = logits_EBC.argmax(-1) == labels_EB
  else:
    return -_masked_mean((logits_EBC[..., 0] - labels_EB) ** 2, valid_EB)
  return _masked_mean(correct.astype(jnp.float32), valid_EB)


def _halves(out: Outputs, rng=None):
  """Splits each env's batch into even/odd halves (after a permutation)."""
  logits, labels, valid = out.logits, out.labels, out.valid
  if rng is not None:
    keys = jax.random.split(rng, logits.shape[0])
    perm = jax.vmap(lambda k: jax.random.permutation(k, logits.shape[1]))(keys)
    take = lambda a: jnp.take_along_axis(
        a, perm.reshape(perm.shape + (1,) * (a.ndim - 2)), axis=1)
    logits, labels, valid = take(logits), take(labels), take(valid)
  half = lambda a, i: a[:, i::2]
  return tuple(out._replace(logits=half(logits, i), labels=half(labels, i),
                            valid=half(valid, i)) for i in (0, 1))


def _scale_grad(out: Outputs, scale0_E=None):
  """``dR_e/dw_e`` at ``w = scale0`` (default 1) for every env, ``[E]``."""
  num_envs = out.logits.shape[0]
  w = jnp.ones((num_envs,), out.logits.dtype) if scale0_E is None else scale0_E
  return jax.grad(lambda s: env_risks(out, s).sum())(w)


def _pooled_mean(out: Outputs, scale_E=None):
  """Mean loss over every valid sample, env e's logits scaled by scale_E[e]."""
  logits = out.logits if scale_E is None else (
      out.logits * scale_E[:, None, None])
  losses = sample_losses(logits, out.labels, out.task)
  return (losses * out.valid).sum() / jnp.maximum(out.valid.sum(), 1.0)


def _pooled_scale_grad(out: Outputs, scale_E=None):
  """``d pooled_mean / d w_e`` = sum_{i in e} dloss_i/dw / N, ``[E]``.

  Times E this is the SparseIRM/BIRM env-scale gradient; as is it is
  IRM-TV's g_e (env risk summed over env e, divided by the whole batch N).
  """
  if scale_E is None:
    scale_E = jnp.ones((out.logits.shape[0],), out.logits.dtype)
  return jax.grad(lambda s: _pooled_mean(out, s))(scale_E)


# ----------------------------------------------------------------------------
# Penalty implementations: f(out, **options) -> scalar.


def _erm(out: Outputs, reduction: str = "mean"):
  """ERM. ``mean``: mean_e R_e (IRM, SIRM); ``pooled``: mean over all samples
  (DomainBed, IRMBed); ``sum``: sum_e R_e (REx's release)."""
  if reduction == "mean":
    return env_risks(out).mean()
  if reduction == "sum":
    return env_risks(out).sum()
  if reduction == "pooled":
    return _pooled_mean(out)
  raise ValueError(f"erm reduction={reduction!r}: use 'mean', 'pooled' or "
                   f"'sum'.")


def _l2(out: Outputs):
  """Sum of squares of all parameters (biases included), as IRM/REx/BIRM."""
  if out.params is None:
    raise ValueError("the l2 term needs Outputs.params; pass params=... .")
  return sum(jnp.sum(jnp.square(p)) for p in jax.tree.leaves(out.params))


def _irmv1(out: Outputs, variant: str = "full"):
  """IRMv1 on the output (Arjovsky et al. 2019): dummy scale w = 1 on logits.

  * ``full`` (IRM): mean_e (dR_e/dw)^2.
  * ``split`` (DomainBed): mean_e g_e^even * g_e^odd from the two halves of
    each env's batch (unbiased for minibatches).
  * ``split_perm`` (IRMBed): the same after a random permutation of each env,
    summed over envs.
  * ``env_scale`` (SparseIRM, BIRM): one scale per env on pooled logits;
    mean_e (d E*pooled_nll / dw_e)^2, equal to ``full`` for balanced envs.
  """
  if variant == "full":
    return jnp.mean(_scale_grad(out) ** 2)
  if variant in ("split", "split_perm"):
    if variant == "split_perm" and out.rng is None:
      raise ValueError("irmv1(variant='split_perm') needs Outputs.rng.")
    first, second = _halves(out, out.rng if variant == "split_perm" else None)
    prod = _scale_grad(first) * _scale_grad(second)
    return prod.mean() if variant == "split" else prod.sum()
  if variant == "env_scale":
    return jnp.mean((out.logits.shape[0] * _pooled_scale_grad(out)) ** 2)
  raise ValueError(f"irmv1 variant={variant!r}: use 'full', 'split', "
                   f"'split_perm' or 'env_scale'.")


def _irmv1_head(out: Outputs):
  """IRMv1 on the real linear head, "(h)" (IRMBed's ``irmv1fc``).

  For every env, the gradients of the even- and odd-half risks with respect
  to the head's parameters (weight and bias) are multiplied elementwise,
  averaged within each parameter tensor, and summed over tensors and
  environments. Gradient flows into the encoder through the features.
  """
  if out.features is None or out.head is None or out.head_params is None:
    raise ValueError("irmv1_h needs Outputs.features, .head and "
                     ".head_params (a deep model from jirm.methods.deep).")

  def env_grads(feats_BD, labels_B, valid_B):
    def risk(hp):
      logits = out.head(hp, feats_BD)[None]
      return env_risks(Outputs(logits, labels_B[None], valid_B[None],
                               task=out.task))[0]
    return jax.grad(risk)(out.head_params)

  def one_env(feats_BD, labels_B, valid_B):
    g1 = env_grads(feats_BD[0::2], labels_B[0::2], valid_B[0::2])
    g2 = env_grads(feats_BD[1::2], labels_B[1::2], valid_B[1::2])
    return sum(jnp.mean(a * b) for a, b in zip(jax.tree.leaves(g1),
                                               jax.tree.leaves(g2)))

  return jnp.sum(jax.vmap(one_env)(out.features, out.labels, out.valid))


def _vrex(out: Outputs, variant: str = "var"):
  """V-REx (Krueger et al. 2021). ``var``: population variance of (R_e)
  (DomainBed, IRMBed, SIRM); ``diff_sq``: (R_1 - R_2)^2 = 4 Var (REx's
  two-env release)."""
  risks = env_risks(out)
  if variant == "var":
    return jnp.var(risks)
  if variant == "diff_sq":
    if risks.shape[0] != 2:
      raise ValueError(f"vrex(variant='diff_sq') needs exactly 2 envs, got "
                       f"{risks.shape[0]}; use variant='var'.")
    return (risks[0] - risks[1]) ** 2
  raise ValueError(f"vrex variant={variant!r}: use 'var' or 'diff_sq'.")


def _mm_rex(out: Outputs):
  """MM-REx penalty (Krueger et al. 2021): |R_1 - R_2|; max_e R_e - min_e R_e
  for more than two envs."""
  risks = env_risks(out)
  return risks.max() - risks.min()


def safe_sqrt(x):
  """sqrt with a finite (zero) gradient at 0."""
  pos = x > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, x, 1.0)), 0.0)


def _rvp(out: Outputs):
  """RVP (IRMBed): sqrt of the population variance of the env risks."""
  return safe_sqrt(jnp.var(env_risks(out)))


@jax.custom_jvp
def abs0(x):
  """|x| with the zero subgradient at 0 (PyTorch's convention; ``jnp.abs``
  has gradient 1 at 0)."""
  return jnp.abs(x)


@abs0.defjvp
def _abs0_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  return jnp.abs(x), jnp.sign(x) * t


def _irm_tv_l1(out: Outputs, form: str = "multi_env"):
  """IRM-TV-l1 (Lai & Wang, ICML 2024): (sum_e |g_e|)^2 with
  g_e = d/ds [sum_{i in e} loss_i / N]; IRMv1 is its TV-l2 analogue.

  ``two_env`` is the two-environment release (same formula, checks E = 2),
  ``multi_env`` any E, ``minibatch`` (sum_e sqrt|g_e^even g_e^odd|)^2 from the
  halves of each env's batch. |.| has the zero subgradient at 0 (:func:`abs0`).
  Soft environments (ZIN / Minimax-TV) are fractional ``valid`` weights: with
  ``valid_KN = [rho, 1 - rho]`` over K copies of the pooled batch, g_k =
  d/ds sum_i rho_ki loss_i / N, exactly the inferred-environment penalty.
  """
  if form in ("two_env", "multi_env"):
    if form == "two_env" and out.logits.shape[0] != 2:
      raise ValueError(f"irm_tv_l1(form='two_env') needs 2 envs, got "
                       f"{out.logits.shape[0]}; use form='multi_env'.")
    return jnp.sum(abs0(_pooled_scale_grad(out))) ** 2
  if form == "minibatch":
    first, second = _halves(out)
    # Normalise each half by its share of the whole batch, as in the release.
    g1, g2 = _pooled_scale_grad(first), _pooled_scale_grad(second)
    return jnp.sum(safe_sqrt(abs0(g1 * g2))) ** 2
  raise ValueError(f"irm_tv_l1 form={form!r}: use 'two_env', 'multi_env' or "
                   f"'minibatch'.")


def _irm_tv_l2(out: Outputs):
  """IRMv1 in the TV framework: sum_e g_e^2 (g_e as in irm_tv_l1)."""
  return jnp.sum(_pooled_scale_grad(out) ** 2)


def _bayesian_irm(out: Outputs, prior_sd_coef: float = 1200.0,
                  data_num: Optional[int] = None, num_draws: int = 10,
                  split: bool = False):
  """BayesianIRM (Lin et al. CVPR 2022), as released.

  Draw per-env scales w_e ~ N(1, sigma), sigma = prior_sd_coef / data_num
  (data_num defaults to the number of valid samples in the batch); penalty =
  mean over ``num_draws`` draws of mean_e (d E*pooled_nll / dw_e)^2; with
  ``split`` the product of the two half-batch gradients (minibatch form).
  """
  if out.rng is None:
    raise ValueError("bayesian_irm needs Outputs.rng.")
  num_envs = out.logits.shape[0]
  n = out.valid.sum() if data_num is None else float(data_num)
  sigma = prior_sd_coef / n
  keys = jax.random.split(out.rng, num_draws)

  def one(key):
    w = 1.0 + sigma * jax.random.normal(key, (num_envs,), out.logits.dtype)
    if split:
      first, second = _halves(out)
      return jnp.mean(num_envs ** 2 * _pooled_scale_grad(first, w) *
                      _pooled_scale_grad(second, w))
    return jnp.mean((num_envs * _pooled_scale_grad(out, w)) ** 2)

  return jnp.mean(jax.vmap(one)(keys))


# ----------------------------------------------------------------------------
# Feature penalties and risk quantiles (DomainBed's CORAL, MMD, IB-IRM; EQRM).


def _features(out: Outputs, name: str):
  if out.features is None:
    raise ValueError(
        f"{name} needs Outputs.features (the model's penultimate features): "
        f"jirm.methods.from_objective passes them for models whose apply "
        f"takes return_features=True (jirm.models.mlp, the deep models).")
  return out.features


def _feature_moments(feats_BD, valid_B):
  """Masked mean ``[D]`` and covariance ``[D, D]`` (divisor n - 1, as
  ``torch`` and DomainBed) of one environment's features."""
  n = valid_B.sum()
  mean_D = (feats_BD * valid_B[:, None]).sum(0) / jnp.maximum(n, 1.0)
  cent_BD = (feats_BD - mean_D[None, :]) * valid_B[:, None]
  cov_DD = cent_BD.T @ cent_BD / jnp.maximum(n - 1.0, 1.0)
  return mean_D, cov_DD


def _env_pairs(num_envs: int):
  return [(i, j) for i in range(num_envs) for j in range(i + 1, num_envs)]


def _coral(out: Outputs):
  """CORAL (Sun & Saenko 2016), DomainBed's ``mean_cov`` form: for every
  pair of environments, mean_d (mu_i - mu_j)^2 + mean_{d,d'} (C_i - C_j)^2 of
  the features' means and covariances (divisor n - 1), averaged over the
  E (E - 1) / 2 pairs. Zero when the environments' feature moments agree."""
  feats = _features(out, "coral")
  means, covs = jax.vmap(_feature_moments)(feats, out.valid)
  pairs = _env_pairs(feats.shape[0])
  return sum(jnp.mean((means[i] - means[j]) ** 2) +
             jnp.mean((covs[i] - covs[j]) ** 2) for i, j in pairs) / len(pairs)


# DomainBed's Gaussian-kernel bandwidths (AbstractMMD.gaussian_kernel).
MMD_GAMMAS = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)
# Samples per environment above which MMD's B x B kernels are refused.
MMD_MAX_BATCH = 8192


def _gaussian_kernel_mean(x_BD, y_BD, wx_B, wy_B, gammas, same=False):
  """Masked mean over pairs of sum_g exp(-g ||x - y||^2), distances clamped
  at 1e-30 as DomainBed's ``my_cdist``; with ``same`` (x is y) the diagonal
  is exactly 0 (``|x|^2 + |x|^2 - 2 x.x`` leaves rounding noise there, which
  exp(-1000 d) would amplify)."""
  d = ((x_BD ** 2).sum(-1)[:, None] + (y_BD ** 2).sum(-1)[None, :] -
       2.0 * x_BD @ y_BD.T)
  d = jnp.maximum(d, 1e-30)
  if same:
    d = jnp.where(jnp.eye(d.shape[0], dtype=bool), 1e-30, d)
  k = sum(jnp.exp(-g * d) for g in gammas)
  w = wx_B[:, None] * wy_B[None, :]
  return (k * w).sum() / jnp.maximum(w.sum(), 1.0)


def _mmd(out: Outputs, gammas: tuple = MMD_GAMMAS):
  """MMD (Li et al. 2018), DomainBed's Gaussian form: for every pair of
  environments, mean K(x, x') + mean K(y, y') - 2 mean K(x, y) of the
  features with K = sum over ``gammas`` of exp(-gamma ||a - b||^2), averaged
  over the pairs. Zero for identical environments. Memory is B x B per
  pair: minibatches (DomainBed: 64 per environment)."""
  feats = _features(out, "mmd")
  if feats.shape[1] > MMD_MAX_BATCH:
    raise ValueError(
        f"mmd over {feats.shape[1]} samples per environment builds "
        f"{feats.shape[1]} x {feats.shape[1]} kernels; train on minibatches "
        f"of at most {MMD_MAX_BATCH} per environment (e.g. "
        f"--config.batch_size=512).")
  kmean = lambda i, j: _gaussian_kernel_mean(
      feats[i], feats[j], out.valid[i], out.valid[j], tuple(gammas),
      same=i == j)
  pairs = _env_pairs(feats.shape[0])
  return sum(kmean(i, i) + kmean(j, j) - 2.0 * kmean(i, j)
             for i, j in pairs) / len(pairs)


def _feature_var(out: Outputs):
  """IB-IRM's information bottleneck (Ahuja et al. 2021, DomainBed
  ``IB_IRM``): mean over environments of mean_d Var_e(features_d) (divisor
  n - 1). IB-IRM is ``erm + w_irm * irmv1(variant='split') + w_ib *
  feature_var``."""
  feats = _features(out, "feature_var")
  _, covs = jax.vmap(_feature_moments)(feats, out.valid)
  return jnp.mean(jnp.diagonal(covs, axis1=1, axis2=2))


def _ib_irm(out: Outputs, ib_weight: float = 1.0, variant: str = "split"):
  """IB-IRM's penalty (Ahuja et al. 2021; DomainBed ``IB_IRM``):
  ``irmv1(variant) + ib_weight * feature_var``, ``ib_weight`` =
  lambda_ib / lambda_irm (DomainBed's defaults 1e2 / 1e2 = 1). With one
  schedule on the sum both weights start together; DomainBed keeps the
  bottleneck at 0 and IRM at 1 before the anneal step. ``ib_weight = 0`` is
  IRMv1."""
  return _irmv1(out, variant) + ib_weight * _feature_var(out)


def _normal_cdf(z):
  return 0.5 * (1.0 + jax.scipy.special.erf(z / jnp.sqrt(2.0)))


def _kde_quantile(risks_E, alpha: float, steps: int = 64):
  """The alpha-quantile of the Gaussian KDE of ``risks_E`` (bandwidth
  1.06 * sd * E^-0.2, DomainBed's ``Gauss-optimal``), found by bisection and
  differentiated implicitly: dq/dR = -(dF/dR) / (dF/dq) at the solution."""
  num = risks_E.shape[0]
  bw = 1.06 * jnp.std(risks_E, ddof=1) * num ** -0.2
  bw = jnp.maximum(bw, 1e-12)
  cdf = lambda q, r: jnp.mean(_normal_cdf((q - r) / bw))
  z = jax.scipy.special.ndtri(alpha)
  r0 = jax.lax.stop_gradient(risks_E)
  lo, hi = r0.min() + bw * z, r0.max() + bw * z
  bw0 = jax.lax.stop_gradient(bw)

  def body(_, bounds):
    lo, hi = bounds
    mid = 0.5 * (lo + hi)
    above = jnp.mean(_normal_cdf((mid - r0) / bw0)) > alpha
    return jnp.where(above, lo, mid), jnp.where(above, mid, hi)

  lo, hi = jax.lax.fori_loop(0, steps, body, (jax.lax.stop_gradient(lo),
                                              jax.lax.stop_gradient(hi)))
  q0 = 0.5 * (lo + hi)
  slope = jax.lax.stop_gradient(jax.grad(cdf)(q0, r0))
  # Value q0; gradient the implicit one (F(q0, R) = alpha).
  return q0 - (cdf(q0, risks_E) - jax.lax.stop_gradient(cdf(q0, r0))) / (
      jnp.maximum(slope, 1e-30))


def _eqrm(out: Outputs, alpha: float = 0.75, estimator: str = "kde"):
  """EQRM (Eastwood et al. 2022) as a penalty: Q_alpha(R) - mean_e R_e, the
  alpha-quantile of the environment risks' distribution above their mean,
  so that ``erm + 1.0 * eqrm`` (weight 1 after the burn-in, 0 before) is
  EQRM's objective Q_alpha(R) and weight 0 is ERM (DomainBed: the mean risk
  during the burn-in).

  ``estimator``: ``'kde'`` (DomainBed's default: Gaussian KDE, Gauss-optimal
  bandwidth, quantile by bisection; jirm differentiates it implicitly where
  DomainBed's bisection passes gradients through its bracket) or
  ``'empirical'`` (linear interpolation between the sorted risks; alpha = 1
  is the worst environment's risk).
  """
  if not 0.0 < alpha <= 1.0:
    raise ValueError(f"eqrm alpha={alpha!r}: use 0 < alpha <= 1.")
  risks = env_risks(out)
  if estimator == "empirical":
    return jnp.quantile(risks, alpha) - risks.mean()
  if estimator == "kde":
    if alpha >= 1.0:
      raise ValueError("eqrm(estimator='kde', alpha=1.0): a KDE has no "
                       "largest value; use alpha < 1 or "
                       "estimator='empirical'.")
    return _kde_quantile(risks, alpha) - risks.mean()
  raise ValueError(f"eqrm estimator={estimator!r}: use 'kde' or "
                   f"'empirical'.")


# ----------------------------------------------------------------------------
# Terms and composition.

Weight = Union[float, Callable[[jax.Array], jax.Array]]


@dataclasses.dataclass(frozen=True)
class Term:
  """A named pure function of :class:`Outputs`; compose with ``+`` and ``*``.

  Calling a term with keyword options returns a configured copy
  (``jirm.irmv1(variant='split')``); :meth:`Term.value` evaluates it.
  """

  name: str
  impl: Callable[..., jax.Array]
  options: tuple = ()
  choices: tuple = ()  # (option, allowed values) pairs, checked on call.
  # Reads Outputs.features (the trainer then computes them).
  reads_features: bool = False

  def __call__(self, **options) -> "Term":
    allowed = [p for p in inspect.signature(self.impl).parameters
               if p != "out"]
    bad = sorted(set(options) - set(allowed))
    if bad:
      raise TypeError(f"{self.name} has no option(s) {bad}; options are "
                      f"{allowed}.")
    for option, values in self.choices:
      if option in options and options[option] not in values:
        raise ValueError(f"{self.name}({option}={options[option]!r}): use "
                         f"one of {list(values)}.")
    merged = dict(self.options)
    merged.update(options)
    return dataclasses.replace(self, options=tuple(sorted(merged.items())))

  def value(self, out: Outputs) -> jax.Array:
    return self.impl(out, **dict(self.options))

  def describe(self) -> str:
    opts = ",".join(f"{k}={v}" for k, v in self.options)
    return f"{self.name}({opts})" if opts else self.name

  def __add__(self, other):
    return Objective(((1.0, self),)) + other

  def __radd__(self, other):
    return Objective(((1.0, self),)).__radd__(other)

  def __mul__(self, weight):
    return Objective(((weight, self),))

  __rmul__ = __mul__


def _weight_value(weight: Weight, step):
  return jnp.asarray(weight(step) if callable(weight) else weight, jnp.float32)


def _product(a: Weight, b: Weight) -> Weight:
  if not callable(a) and not callable(b):
    return a * b
  if callable(a) and callable(b):
    raise ValueError("cannot multiply two scheduled weights; fold them into "
                     "one schedule.")
  sched, scalar = (a, b) if callable(a) else (b, a)
  if scalar == 1.0:
    return sched
  if getattr(sched, "rescale", "none") != "none":
    raise ValueError("scaling a PenaltySchedule by a constant would change "
                     "its loss rescaling; pass weight=... to the preset.")
  return lambda step: scalar * sched(step)


@dataclasses.dataclass(frozen=True)
class Objective:
  """A weighted sum of terms, with an optional anchor-specific rescaling.

  If a weight is a :class:`jirm.schedules.PenaltySchedule`, its ``rescale``
  rule (e.g. IRM's "divide the loss by lambda when lambda > 1") applies to
  the whole total, L2 included, as in the anchors.
  """

  terms: tuple

  def __add__(self, other):
    if isinstance(other, Term):
      other = Objective(((1.0, other),))
    if not isinstance(other, Objective):
      return NotImplemented
    return Objective(self.terms + other.terms)

  def __radd__(self, other):
    if isinstance(other, (int, float)) and other == 0:  # sum([...])
      return self
    if isinstance(other, Term):
      return Objective(((1.0, other),)) + self
    return NotImplemented

  def __mul__(self, weight):
    return Objective(tuple((_product(weight, w), t) for w, t in self.terms))

  __rmul__ = __mul__

  @property
  def reads_features(self) -> bool:
    """Whether a term reads :attr:`Outputs.features`."""
    return any(t.reads_features for _, t in self.terms)

  @property
  def names(self) -> tuple:
    seen, names = {}, []
    for _, term in self.terms:
      seen[term.name] = seen.get(term.name, 0) + 1
      names.append(term.name if seen[term.name] == 1 else
                   f"{term.name}_{seen[term.name]}")
    return tuple(names)

  def schedule(self):
    """The single PenaltySchedule among the weights, or None."""
    scheds = {id(w): w for w, _ in self.terms
              if getattr(w, "rescale", None) is not None}
    if len(scheds) > 1:
      raise ValueError("an objective may hold one PenaltySchedule; share it "
                       "between penalties.")
    return next(iter(scheds.values()), None)

  def __call__(self, out: Outputs, step=0):
    """Returns ``(total, aux)``; aux maps ``term/<name>`` and ``weight/<name>``
    to values and ``rescale`` to the divisor applied to the total."""
    total, aux = 0.0, {}
    for name, (weight, term) in zip(self.names, self.terms):
      w = _weight_value(weight, step)
      v = term.value(out)
      aux[f"term/{name}"] = v
      aux[f"weight/{name}"] = w
      total = total + w * v
    sched = self.schedule()
    divisor = (jnp.float32(1.0) if sched is None else
               sched.divisor(jnp.asarray(sched(step), jnp.float32)))
    aux["rescale"] = divisor
    total = total / divisor
    aux["total"] = total
    return total, aux

  def describe(self) -> str:
    parts = []
    for weight, term in self.terms:
      w = getattr(weight, "name", None) or (
          "schedule" if callable(weight) else f"{weight:g}")
      parts.append(term.describe() if w == "1" else f"{w}*{term.describe()}")
    return " + ".join(parts)


erm = Term("erm", _erm, choices=(("reduction", ("mean", "sum", "pooled")),))
l2 = Term("l2", _l2)
irmv1 = Term("irmv1", _irmv1, choices=(
    ("variant", ("full", "split", "split_perm", "env_scale")),))
irmv1_h = Term("irmv1_h", _irmv1_head)
vrex = Term("vrex", _vrex, choices=(("variant", ("var", "diff_sq")),))
mm_rex = Term("mm_rex", _mm_rex)
rvp = Term("rvp", _rvp)
irm_tv_l1 = Term("irm_tv_l1", _irm_tv_l1, choices=(
    ("form", ("two_env", "multi_env", "minibatch")),))
irm_tv_l2 = Term("irm_tv_l2", _irm_tv_l2)
bayesian_irm = Term("bayesian_irm", _bayesian_irm)
coral = Term("coral", _coral, reads_features=True)
mmd = Term("mmd", _mmd, reads_features=True)
feature_var = Term("feature_var", _feature_var, reads_features=True)
ib_irm = Term("ib_irm", _ib_irm, choices=(
    ("variant", ("full", "split", "split_perm", "env_scale")),),
              reads_features=True)
eqrm = Term("eqrm", _eqrm, choices=(("estimator", ("kde", "empirical")),))

TERMS = {t.name: t for t in (erm, l2, irmv1, irmv1_h, vrex, mm_rex, rvp, irm_tv_l1,
                             irm_tv_l2, bayesian_irm, coral, mmd, feature_var,
                             ib_irm, eqrm)}
