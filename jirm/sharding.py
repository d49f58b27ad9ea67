"""Device meshes for jirm: data parallelism and sweep parallelism via
``jax.jit`` + ``NamedSharding`` (no ``pmap``).

Layout: environment arrays ``[E, B, ...]`` keep the environment axis whole
and split the batch axis over the mesh's ``data`` axis; parameters and
optimizer state are replicated; :func:`jirm.sweep.fit_sweep` splits its
trial axis over ``sweep``. The step function is unchanged: XLA inserts the
cross-device reductions, so every penalty is computed from the *global*
per-environment risk (averaging per-shard penalties would be wrong: a
squared gradient of a mean is not the mean of squared per-shard gradients).

Multi-host (TPU pods, multi-node GPU): call :func:`initialize_distributed`
on every process before any other JAX call (``--distributed`` in the
experiments), then build the mesh over ``jax.devices()`` (all hosts' devices)
as usual; each host feeds the full arrays here, which is right for the
dataset sizes of IRM benchmarks.

Example:
  >>> mesh = make_mesh()                      # every device on 'data'
  >>> result = jirm.fit(splits, model=..., objective=..., optimizer=...,
  ...                   steps=501, mesh=mesh)
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("sweep", "data")


def make_mesh(data: Optional[int] = None, sweep: int = 1,
              devices=None) -> Mesh:
  """A ``(sweep, data)`` device mesh.

  Args:
    data: devices along the batch axis; default: all devices / ``sweep``.
    sweep: devices along the trial axis of a sweep.
    devices: the devices to use (default ``jax.devices()``).

  Returns:
    A ``jax.sharding.Mesh`` with axis names ``('sweep', 'data')``.

  Raises:
    ValueError: if ``sweep * data`` does not match the device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  if sweep < 1 or len(devices) % sweep:
    raise ValueError(f"sweep={sweep} must divide the {len(devices)} devices.")
  data = len(devices) // sweep if data is None else int(data)
  if sweep * data != len(devices):
    raise ValueError(f"sweep={sweep} x data={data} != {len(devices)} devices; "
                     f"pass devices=jax.devices()[:{sweep * data}] to use a "
                     f"subset.")
  return Mesh(np.asarray(devices).reshape(sweep, data), AXES)


def pad_batch(arrays, multiple: int, axis: int = 1):
  """Pads the batch axis of an :class:`jirm.train.EnvArrays` to a multiple of
  ``multiple`` with ``valid = 0`` rows (ignored by every risk and penalty)."""
  extra = -arrays.x.shape[axis] % multiple
  if not extra:
    return arrays

  def pad(a):
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, extra)
    return jnp.pad(a, widths)

  return type(arrays)(*(pad(a) for a in arrays))


def shard_env_arrays(arrays, mesh: Mesh, stacked: bool = False):
  """Places ``[E, B, ...]`` arrays with B split over ``data`` (padded to a
  multiple of the axis size) and replicated over ``sweep``; with
  ``stacked=True`` the arrays are ``[T, E, B, ...]`` (one per sweep trial)
  and T is split over ``sweep``."""
  lead = ("sweep", None, "data") if stacked else (None, "data")
  arrays = pad_batch(arrays, mesh.shape["data"], axis=len(lead) - 1)
  return jax.tree.map(
      lambda a: jax.device_put(a, NamedSharding(
          mesh, P(*(lead + (None,) * (a.ndim - len(lead)))))), arrays)


def replicate(tree, mesh: Mesh):
  """Places every leaf fully replicated on ``mesh``."""
  return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_sweep(tree, mesh: Mesh):
  """Splits the leading (trial) axis of every leaf over ``sweep``."""
  return jax.tree.map(lambda a: jax.device_put(
      a, NamedSharding(mesh, P(*(("sweep",) + (None,) * (a.ndim - 1))))),
                      tree)


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> None:
  """``jax.distributed.initialize`` for multi-host runs (TPU pods detect all
  arguments themselves; on GPU clusters pass them or set the usual
  environment). Must run before any other JAX computation."""
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes,
                             process_id=process_id)
