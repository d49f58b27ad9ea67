"""torchvision ResNet checkpoints -> jirm Flax parameters.

ImageNet weights cannot be downloaded on our machines; users who have a
torchvision ``.pth`` file (e.g. ``resnet18-f37072fd.pth``) load it with
:func:`load_torchvision_resnet` and pass the result to
``jirm.methods.deep.deep_method(init_params=...)``. Conversion is pure numpy
(:func:`from_torchvision`); reading the ``.pth`` file needs ``torch``.

Key mapping (torchvision -> jirm):
  ``conv1.weight [O, I, kh, kw]`` -> ``encoder/conv1/kernel [kh, kw, I, O]``;
  ``bn1.{weight, bias}`` -> ``encoder/bn1/{scale, bias}``;
  ``bn1.{running_mean, running_var}`` -> ``batch_stats/bn1/{mean, var}``;
  ``layer2.0.conv1`` -> ``layer2_0/conv1``; ``layer2.0.downsample.0`` ->
  ``layer2_0/downsample_conv``; ``downsample.1`` -> ``downsample_bn``;
  ``fc.{weight [O, I], bias}`` -> ``head/params/fc/{kernel [I, O], bias}``.

Example:
  >>> params, batch_stats = load_torchvision_resnet('resnet18.pth',
  ...                                               'resnet18')
  >>> method = jirm.methods.deep_method(
  ...     ..., init_params=(params, batch_stats))
"""

from __future__ import annotations

import re
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jirm.models import encoder_head


def _target(key: str):
  """torchvision key -> (collection, path tuple) or None for buffers we drop."""
  if key.endswith("num_batches_tracked"):
    return None
  m = re.fullmatch(r"fc\.(weight|bias)", key)
  if m:
    return "head", ("fc", "kernel" if m.group(1) == "weight" else "bias")
  m = re.fullmatch(r"(?:layer(\d)\.(\d+)\.)?(conv\d|bn\d|downsample\.[01])\."
                   r"(weight|bias|running_mean|running_var)", key)
  if m is None:
    raise ValueError(f"unexpected key {key!r} in the state dict: not a "
                     f"torchvision ResNet (keys like 'layer1.0.conv1.weight')."
                     )
  layer, block, mod, leaf = m.groups()
  mod = {"downsample.0": "downsample_conv",
         "downsample.1": "downsample_bn"}.get(mod, mod)
  path = (mod,) if layer is None else (f"layer{layer}_{block}", mod)
  if mod.startswith("conv") or mod == "downsample_conv":
    return "params", path + ("kernel",)
  name = {"weight": "scale", "bias": "bias", "running_mean": "mean",
          "running_var": "var"}[leaf]
  coll = "batch_stats" if leaf.startswith("running") else "params"
  return coll, path + (name,)


def _set(tree: dict, path, value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def from_torchvision(state_dict: Mapping[str, np.ndarray],
                     model: encoder_head.DeepModel
                     ) -> tuple[dict, dict]:
  """Converts a torchvision ResNet state dict (numpy arrays) for ``model``.

  Args:
    state_dict: torchvision keys -> numpy arrays.
    model: the target :class:`jirm.models.DeepModel` (its encoder must have the
      same architecture; its head is filled from ``fc`` only when the shapes
      match, e.g. a 1000-way linear head, else left at its initialisation).

  Returns:
    ``(params, batch_stats)`` with ``params = {'encoder', 'head'}``.

  Raises:
    ValueError: unexpected key, missing key or shape mismatch (named).
  """
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  want_params, want_stats = abstract
  enc = {"params": {}, "batch_stats": {}}
  head = {}
  for key, value in state_dict.items():
    tgt = _target(key)
    if tgt is None:
      continue
    coll, path = tgt
    value = np.asarray(value, np.float32)
    if value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)
    elif coll == "head" and path[-1] == "kernel":
      value = value.T
    if coll == "head":
      _set(head, path, value)
    else:
      _set(enc[coll], path, value)

  def check(got, want, where):
    flat_want = {jax.tree_util.keystr(k): v.shape for k, v in
                 jax.tree_util.tree_flatten_with_path(want)[0]}
    flat_got = {jax.tree_util.keystr(k): v.shape for k, v in
                jax.tree_util.tree_flatten_with_path(got)[0]}
    missing = sorted(set(flat_want) - set(flat_got))
    extra = sorted(set(flat_got) - set(flat_want))
    if missing or extra:
      raise ValueError(f"{where}: checkpoint does not match the model "
                       f"(missing {missing[:4]}, unexpected {extra[:4]}); "
                       f"is the architecture right (resnet18 vs resnet50)?")
    for k, shape in flat_want.items():
      if flat_got[k] != shape:
        raise ValueError(f"{where}{k}: checkpoint shape {flat_got[k]} != "
                         f"model shape {shape}.")

  check(enc["params"], want_params["encoder"], "encoder")
  check(enc["batch_stats"], want_stats, "batch_stats")
  params = {"encoder": jax.tree.map(jnp.asarray, enc["params"])}
  head_params = {"params": head}
  try:
    check(head_params, want_params["head"], "head")
    params["head"] = jax.tree.map(jnp.asarray, head_params)
  except ValueError:
    params["head"] = None  # Caller keeps its own head.
  return params, jax.tree.map(jnp.asarray, enc["batch_stats"])


def load_torchvision_resnet(path: str, arch: str = "resnet18",
                            model: encoder_head.DeepModel | None = None):
  """Reads a torchvision ``.pth`` state dict and converts it.

  Args:
    path: the ``.pth`` file (a state dict, or a dict with ``'state_dict'``).
    arch: ``'resnet18'`` or ``'resnet50'`` (used when ``model`` is None).
    model: target model; default ``deep_model(arch)``.

  Returns:
    ``(params, batch_stats)`` as :func:`from_torchvision`.
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("reading a .pth file needs torch: pip install "
                      "torch==2.13.0 (CPU build), or convert the state dict "
                      "to numpy yourself and call from_torchvision.") from e
  sd = torch.load(path, map_location="cpu", weights_only=True)
  if "state_dict" in sd:
    sd = sd["state_dict"]
  sd = {k.removeprefix("module."): v.numpy() for k, v in sd.items()}
  return from_torchvision(sd, model or encoder_head.deep_model(arch))
