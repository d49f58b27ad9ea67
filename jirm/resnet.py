"""Flax ResNets (torchvision layout) with CPU-friendly small convolutions.

The encoder ``h_u`` (:class:`ResNet`) maps ``[N, H, W, C]`` images to pooled
features ``[N, D]``; heads ``g_v`` (:class:`LinearHead`, :class:`MLPHead`) map
features to logits. Parameter names mirror torchvision's state-dict keys
(``conv1``, ``bn1``, ``layer1_0/conv1``, ``layer1_0/downsample_conv``, ...) so
:func:`jirm.convert.torchvision_resnet` can load a ``.pth`` file.

XLA's CPU convolution is 20-40x slower than a matmul on the tiny feature maps
of a ResNet on 64x32 inputs (stages at 4x2 and 2x1). :class:`Conv2d` therefore
lowers a convolution to "patches + one matmul" when its output map is small
(``lowering='auto'``), with exactly the parameters of the standard
convolution. ``lowering='xla'`` always calls ``lax.conv_general_dilated``
(use it on GPU/TPU), ``'patches'`` always lowers.

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
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

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
      convolutions, inputs with at most 4 channels (the stem) and output maps
      of at most ``max_patch_hw`` pixels; XLA's convolution otherwise (the
      rule measured fastest on CPU, see ``benchmarks/resnet_step_time.py``).
    max_patch_hw: threshold of ``'auto'``.

  Returns:
    ``[N, OH, OW, C_out]``; both lowerings agree to float precision.
  """
  if lowering not in LOWERINGS:
    raise ValueError(f"lowering={lowering!r}: use one of {LOWERINGS}.")
  kh, kw, cin, cout = kernel_HWIO.shape
  h, w = x_NHWC.shape[1] + 2 * pad, x_NHWC.shape[2] + 2 * pad
  out_hw = ((h - kh) // stride + 1) * ((w - kw) // stride + 1)
  use_patches = lowering == "patches" or (
      lowering == "auto" and (kh == kw == 1 or stride > 1 or cin <= 4 or
                              out_hw <= max_patch_hw))
  if not use_patches:
    return jax.lax.conv_general_dilated(
        x_NHWC, kernel_HWIO, (stride, stride), ((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
  cols = _patches(x_NHWC, kh, kw, stride, pad)
  return cols @ kernel_HWIO.reshape(kh * kw * cin, cout)


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
  """``nn.MaxPool2d(3, 2, padding=1)`` as a maximum of 9 strided slices.

  Same values as ``flax.linen.max_pool``; its gradient is 5x cheaper on CPU
  than XLA's select-and-scatter.
  """
  x = jnp.pad(x_NHWC, ((0, 0), (1, 1), (1, 1), (0, 0)),
              constant_values=-jnp.inf)
  h, w = x.shape[1:3]
  oh, ow = (h - 3) // 2 + 1, (w - 3) // 2 + 1
  out = None
  for i in range(3):
    for j in range(3):
      s = x[:, i:i + 2 * (oh - 1) + 1:2, j:j + 2 * (ow - 1) + 1:2]
      out = s if out is None else jnp.maximum(out, s)
  return out


def _bn(name, train):
  # torch BatchNorm2d(momentum=0.1, eps=1e-5) == flax momentum 0.9.
  return nn.BatchNorm(use_running_average=not train, momentum=0.9,
                      epsilon=1e-5, name=name)


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


def _torch_linear_bias_init(fan_in):
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
      key, shape, dtype, -bound, bound)


def _dense(features, fan_in, name):
  # torch.nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
  return nn.Dense(features, name=name,
                  kernel_init=nn.initializers.variance_scaling(
                      1.0 / 3.0, "fan_in", "uniform"),
                  bias_init=_torch_linear_bias_init(fan_in))


class LinearHead(nn.Module):
  """Linear head ``g_v``: features -> logits (torch ``nn.Linear`` init)."""

  out: int = 1

  @nn.compact
  def __call__(self, feats_ND):
    return _dense(self.out, feats_ND.shape[-1], "fc")(feats_ND)


class MLPHead(nn.Module):
  """Two-layer head (Linear -> ReLU -> Linear), IRMBed's InvRat-EB head."""

  hidden: int
  out: int = 1

  @nn.compact
  def __call__(self, feats_ND):
    h = nn.relu(_dense(self.hidden, feats_ND.shape[-1], "fc1")(feats_ND))
    return _dense(self.out, self.hidden, "fc2")(h)


def encoder(name: str, *, stem: str = "imagenet", lowering: str = "auto",
            width: int | None = None) -> ResNet:
  """Encoder by name: ``'resnet18'``, ``'resnet50'`` or ``'tiny'`` (tests)."""
  if name not in ENCODERS:
    raise ValueError(f"unknown encoder {name!r}; choose one of "
                     f"{sorted(ENCODERS)}.")
  kw = dict(stem=stem, lowering=lowering)
  if width is not None:
    kw["width"] = int(width)
  return ENCODERS[name](**kw)
