"""Flax ResNets (torchvision layout) with CPU-friendly small convolutions.

The encoder ``h_u`` (:class:`ResNet`) maps ``[N, H, W, C]`` images to pooled
features ``[N, D]``; heads ``g_v`` (:mod:`jirm.models.heads`) map
features to logits. Parameter names mirror torchvision's state-dict keys
(``conv1``, ``bn1``, ``layer1_0/conv1``, ``layer1_0/downsample_conv``, ...) so
:func:`jirm.models.convert.load_torchvision_resnet` can load a ``.pth`` file.

XLA's CPU convolution is 20-40x slower than a matmul on the tiny feature maps
of a ResNet on 64x32 inputs (stages at 4x2 and 2x1). :class:`Conv2d` therefore
lowers a convolution to "patches + one matmul" when its output map is small
(``lowering='auto'``), with exactly the parameters of the standard
convolution. ``lowering='xla'`` always calls ``lax.conv_general_dilated``
(use it on GPU/TPU), ``'patches'`` always lowers. BatchNorm uses a
closed-form backward (:func:`batch_norm_train`) and the stem's max-pool is
separable (:func:`max_pool_3x3_s2`); call :func:`jirm.runtime.configure_cpu`
before JAX starts for the CPU runtime settings the ``'auto'`` rule assumes.

Sizes follow the Flax ImageNet example: ``ResNet18 = partial(ResNet, ...)``.

Example:
  >>> enc = ResNet18(stem='imagenet')
  >>> variables = enc.init(jax.random.key(0), jnp.zeros((2, 64, 32, 3)))
  >>> feats_ND, updates = enc.apply(variables, x, train=True,
  ...                               mutable=['batch_stats'])

Reference: He et al., "Deep Residual Learning for Image Recognition", 2016;
torchvision's ResNet v1.5 (stride on the 3x3 conv of the bottleneck).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jirm import runtime
from jirm.models import sizes

# torchvision: kaiming_normal_(mode='fan_out', nonlinearity='relu').
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

LOWERINGS = ("auto", "xla", "patches")


def _patches(x_NHWC, kh, kw, stride, pad):
  """Image patches ``[N, OH, OW, kh*kw*C]`` ordered (i, j, c) like a
  flattened ``[kh, kw, C, O]`` kernel."""
  if pad:
    x_NHWC = jnp.pad(x_NHWC, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  h, w = x_NHWC.shape[1:3]
  oh, ow = (h - kh) // stride + 1, (w - kw) // stride + 1
  if kh == kw == 1:
    return x_NHWC[:, ::stride, ::stride][:, :oh, :ow]
  cols = [x_NHWC[:, i:i + stride * (oh - 1) + 1:stride,
                 j:j + stride * (ow - 1) + 1:stride] for i in range(kh)
          for j in range(kw)]
  return jnp.concatenate(cols, axis=-1)


def conv2d(x_NHWC, kernel_HWIO, stride: int = 1, pad: int = 0,
           lowering: str = "auto", max_patch_hw: int = 16):
  """Convolution (no bias, symmetric zero padding like ``torch.nn.Conv2d``).

  Args:
    x_NHWC: input.
    kernel_HWIO: ``[kh, kw, C_in, C_out]`` kernel.
    stride: spatial stride.
    pad: zero padding on each side.
    lowering: ``'xla'`` (``lax.conv_general_dilated``), ``'patches'`` (patches
      + one matmul) or ``'auto'``: patches for 1x1 kernels, strided
      convolutions (but the 7x7 stem) and output maps of at most
      ``max_patch_hw`` pixels; XLA's convolution otherwise. The stem (at most
      4 input channels) uses XLA's convolution when
      :func:`jirm.runtime.configure_cpu` routed it to Eigen, patches
      otherwise. This is the rule measured fastest on CPU (see
      ``benchmarks/resnet_step_time.py``); use ``'xla'`` on GPU/TPU.
    max_patch_hw: threshold of ``'auto'``.

  Returns:
    ``[N, OH, OW, C_out]``; both lowerings agree to float precision.
  """
  if lowering not in LOWERINGS:
    raise ValueError(f"lowering={lowering!r}: use one of {LOWERINGS}.")
  kh, kw, cin, cout = kernel_HWIO.shape
  h, w = x_NHWC.shape[1] + 2 * pad, x_NHWC.shape[2] + 2 * pad
  out_hw = ((h - kh) // stride + 1) * ((w - kw) // stride + 1)
  stem = cin <= 4 and not runtime.eigen_convolutions()
  use_patches = lowering == "patches" or (
      lowering == "auto" and (kh == kw == 1 or stride > 1 and kh < 7 or stem
                              or out_hw <= max_patch_hw))
  if not use_patches:
    return jax.lax.conv_general_dilated(
        x_NHWC, kernel_HWIO, (stride, stride), ((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
  cols = _patches(x_NHWC, kh, kw, stride, pad)
  # A 2-D matmul: XLA's CPU dot is ~3x slower on the 4-D form's transpose.
  out = cols.reshape(-1, kh * kw * cin) @ kernel_HWIO.reshape(-1, cout)
  return out.reshape(*cols.shape[:3], cout)


class Conv2d(nn.Module):
  """Bias-free convolution with torchvision's init and selectable lowering."""

  features: int
  kernel_size: int
  stride: int = 1
  pad: int = 0
  lowering: str = "auto"

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", _conv_init,
                        (self.kernel_size, self.kernel_size, x.shape[-1],
                         self.features))
    return conv2d(x, kernel, self.stride, self.pad, self.lowering)


def max_pool_3x3_s2(x_NHWC):
  """``nn.MaxPool2d(3, 2, padding=1)``, separably: rows, then columns.

  Same values as ``flax.linen.max_pool``. Each axis pass reshapes the axis
  into pairs (free) and takes the maximum of the pair and the previous
  pair's second element, so forward and backward are a few elementwise
  passes instead of XLA's select-and-scatter (the stem's pool went from
  70 ms to 10 ms per ResNet-18 step here).
  """
  return _pool_axis(_pool_axis(x_NHWC, 1), 2)


def _pool_axis(x, axis):
  # out[i] = max(x[2i - 1], x[2i], x[2i + 1]) with -inf outside.
  if x.shape[axis] % 2:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, 1)
    x = jnp.pad(x, pad, constant_values=-jnp.inf)
  shape = list(x.shape)
  shape[axis:axis + 1] = [shape[axis] // 2, 2]
  pairs = x.reshape(shape)
  even = jax.lax.index_in_dim(pairs, 0, axis + 1, keepdims=False)
  odd = jax.lax.index_in_dim(pairs, 1, axis + 1, keepdims=False)
  pad = [(0, 0)] * odd.ndim
  pad[axis] = (1, -1)
  prev = jax.lax.pad(odd, jnp.array(-jnp.inf, odd.dtype),
                     [(lo, hi, 0) for lo, hi in pad])
  return jnp.maximum(jnp.maximum(even, odd), prev)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x, scale, bias, eps: float = 1e-5):
  """Training-mode batch normalisation over all axes but the last.

  Same values as ``flax.linen.BatchNorm`` in training mode, with the
  closed-form backward pass (two passes over ``x`` instead of autodiff's
  eight on CPU, where each pass is a separate memory-bound kernel).

  Args:
    x: ``[..., C]`` activations.
    scale, bias: ``[C]``.
    eps: variance epsilon.

  Returns:
    ``(y, mean, var)``: normalised ``x`` and the (biased) batch moments,
    which carry no gradient (use them for running statistics only).
  """
  return _bn_fwd(x, scale, bias, eps)[0]


def _bcast(v_C, x):
  return v_C.reshape((1,) * (x.ndim - 1) + (-1,))


def _moments(x):
  axes = tuple(range(x.ndim - 1))
  mean = x.mean(axes, keepdims=True)
  var = jnp.maximum((x * x).mean(axes, keepdims=True) - mean * mean, 0.0)
  return mean, var


def _bn_fwd(x, scale, bias, eps):
  mean, var = _moments(x)
  rstd = jax.lax.rsqrt(var + eps)
  y = (x - mean) * (rstd * _bcast(scale, x)) + _bcast(bias, x)
  c = x.shape[-1]
  return (y, mean.reshape(c), var.reshape(c)), (x, mean, rstd, scale)


def _bn_bwd(eps, res, cts):
  del eps
  x, mean, rstd, scale = res
  g = cts[0]  # Cotangents of the moments are ignored (running stats only).
  axes = tuple(range(x.ndim - 1))
  n = x.size // x.shape[-1]
  xhat = (x - mean) * rstd
  dbias = g.sum(axes, keepdims=True)
  dscale = (g * xhat).sum(axes, keepdims=True)
  dx = (_bcast(scale, x) * rstd) * (g - dbias / n - xhat * (dscale / n))
  c = x.shape[-1]
  return dx, dscale.reshape(c), dbias.reshape(c)


batch_norm_train.defvjp(_bn_fwd, _bn_bwd)


class BatchNorm(nn.Module):
  """``torch.nn.BatchNorm2d`` (momentum 0.1, eps 1e-5) as a Flax module.

  Variables are named like ``flax.linen.BatchNorm`` (params ``scale``,
  ``bias``; batch_stats ``mean``, ``var``). Training mode normalises with the
  batch moments (:func:`batch_norm_train`) and updates the running statistics
  as torch does (the running variance uses the unbiased batch variance).
  """

  use_running_average: bool = False
  momentum: float = 0.1
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,))
    ra_var = self.variable("batch_stats", "var", jnp.ones, (c,))
    if self.use_running_average:
      rstd = jax.lax.rsqrt(ra_var.value + self.epsilon)
      return ((x - _bcast(ra_mean.value, x)) * _bcast(rstd * scale, x) +
              _bcast(bias, x))
    y, mean, var = batch_norm_train(x, scale, bias, self.epsilon)
    if not self.is_initializing():
      n = x.size // c
      m = self.momentum
      ra_mean.value = (1 - m) * ra_mean.value + m * mean
      ra_var.value = (1 - m) * ra_var.value + m * var * (n / max(n - 1, 1))
    return y


def _bn(name, train):
  return BatchNorm(use_running_average=not train, name=name)


class BasicBlock(nn.Module):
  """ResNet-18/34 block."""

  planes: int
  stride: int = 1
  downsample: bool = False
  lowering: str = "auto"
  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(Conv2d, lowering=self.lowering)
    out = conv(self.planes, 3, self.stride, 1, name="conv1")(x)
    out = nn.relu(_bn("bn1", train)(out))
    out = conv(self.planes, 3, 1, 1, name="conv2")(out)
    out = _bn("bn2", train)(out)
    if self.downsample:
      x = conv(self.planes, 1, self.stride, name="downsample_conv")(x)
      x = _bn("downsample_bn", train)(x)
    return nn.relu(out + x)


class Bottleneck(nn.Module):
  """ResNet-50 block, v1.5 (stride on the 3x3 conv)."""

  planes: int
  stride: int = 1
  downsample: bool = False
  lowering: str = "auto"
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(Conv2d, lowering=self.lowering)
    out = nn.relu(_bn("bn1", train)(conv(self.planes, 1, name="conv1")(x)))
    out = conv(self.planes, 3, self.stride, 1, name="conv2")(out)
    out = nn.relu(_bn("bn2", train)(out))
    out = conv(self.planes * 4, 1, name="conv3")(out)
    out = _bn("bn3", train)(out)
    if self.downsample:
      x = conv(self.planes * 4, 1, self.stride, name="downsample_conv")(x)
      x = _bn("downsample_bn", train)(x)
    return nn.relu(out + x)


STEMS = ("imagenet", "cifar")


class ResNet(nn.Module):
  """ResNet feature extractor ``h_u``: images -> pooled features ``[N, D]``.

  Attributes:
    stage_sizes: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
    block: :class:`BasicBlock` or :class:`Bottleneck`.
    width: channels of the first stage (64 in torchvision).
    stem: ``'imagenet'`` (7x7 stride-2 conv + 3x3 stride-2 max-pool, as
      torchvision / IRMBed) or ``'cifar'`` (3x3 stride-1 conv, no pool, as
      BIRM's CIFAR-MNIST network).
    lowering: see :func:`conv2d`.
  """

  stage_sizes: Sequence[int]
  block: Any = BasicBlock
  width: int = 64
  stem: str = "imagenet"
  lowering: str = "auto"

  @property
  def num_features(self) -> int:
    return self.width * 2 ** (len(self.stage_sizes) - 1) * self.block.expansion

  @nn.compact
  def __call__(self, x_NHWC, train: bool = True):
    if self.stem not in STEMS:
      raise ValueError(f"stem={self.stem!r}: use one of {STEMS}.")
    x = x_NHWC.astype(jnp.float32)
    if self.stem == "imagenet":
      x = Conv2d(self.width, 7, 2, 3, self.lowering, name="conv1")(x)
      x = nn.relu(_bn("bn1", train)(x))
      x = max_pool_3x3_s2(x)
    else:
      x = Conv2d(self.width, 3, 1, 1, self.lowering, name="conv1")(x)
      x = nn.relu(_bn("bn1", train)(x))
    in_ch = self.width
    for i, blocks in enumerate(self.stage_sizes):
      planes = self.width * 2 ** i
      for j in range(blocks):
        stride = 2 if i > 0 and j == 0 else 1
        down = j == 0 and (stride != 1 or in_ch != planes * self.block.expansion)
        x = self.block(planes, stride, down, self.lowering,
                       name=f"layer{i + 1}_{j}")(x, train)
        in_ch = planes * self.block.expansion
    return x.mean(axis=(1, 2))


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block=Bottleneck)
# Test-only: two stages of one block, 8 channels.
TinyResNet = functools.partial(ResNet, stage_sizes=(1, 1), block=BasicBlock,
                               width=8)

ENCODERS = {"resnet18": ResNet18, "resnet50": ResNet50, "tiny": TinyResNet}


def encoder(name: str, *, stem: str = "imagenet", lowering: str = "auto",
            width: int | None = None) -> ResNet:
  """Encoder by name: ``'resnet18'``, ``'resnet50'`` or ``'tiny'`` (tests)."""
  if name not in ENCODERS:
    raise ValueError(f"unknown encoder {name!r}; choose one of "
                     f"{sorted(ENCODERS)}.")
  kw = dict(stem=stem, lowering=lowering)
  if width is not None:  # None: the architecture's 64.
    kw["width"] = sizes.check_size("width", width, "the first stage's "
                                   "channel count")
  return ENCODERS[name](**kw)
