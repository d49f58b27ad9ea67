"""Host-runtime tuning for CPU training (call :func:`configure_cpu` first).

Two process-wide settings make jirm's ResNets 1.3x faster on CPU; both were
found by profiling a ResNet-18 step on a 2-core AVX-512 machine
(``benchmarks/resnet_step_time.py``):

* **Keep freed host memory** (:func:`retain_host_memory`). XLA allocates
  every intermediate buffer afresh on each step; glibc serves blocks above
  its mmap threshold with a new ``mmap`` and unmaps them on free, so each
  step page-faults tens of megabytes again (a 37 MB copy took 11.6 ms instead
  of 1.4 ms). This applies to PyTorch in the same process too.
* **Eigen convolutions** (:data:`XLA_CPU_FLAGS`). jaxlib 0.10 routes
  ``lax.conv`` to YNNPACK by default, 2x slower than XLA's Eigen convolution
  on ResNet-18's 16x8 stage-1 maps (fwd+bwd 45 ms vs 24 ms per conv at batch
  128) and 3x slower on the 7x7 stem. Restricting YNNPACK fusions to dots and
  reductions keeps its fast matmuls and sends convolutions to Eigen. The flag
  must be in ``XLA_FLAGS`` before JAX initialises its CPU backend.

Neither setting changes results; both only matter on CPU.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1
_YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
XLA_CPU_FLAGS = (f"{_YNN_FLAG}=dot,reduce",)


def retain_host_memory() -> bool:
  """Keep freed host memory in the process instead of unmapping it (glibc).

  Affects allocations made afterwards by every library in the process (XLA,
  PyTorch, numpy); the process keeps its peak heap. Equivalent to starting
  Python with ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647``. A
  no-op without glibc.

  Returns:
    ``True`` if glibc accepted both settings.
  """
  try:
    mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
  except (OSError, AttributeError):
    return False
  return bool(mallopt(_M_MMAP_MAX, 0)) and bool(
      mallopt(_M_TRIM_THRESHOLD, _INT_MAX))


def _backends_initialized() -> bool:
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  return xla_bridge.backends_are_initialized()


def configure_cpu(xla_flags: bool = True, host_memory: bool = True) -> bool:
  """Apply jirm's CPU settings; call before the first JAX computation.

  Args:
    xla_flags: append :data:`XLA_CPU_FLAGS` to ``XLA_FLAGS`` (unless the user
      already set ``--xla_cpu_experimental_ynn_fusion_type``).
    host_memory: call :func:`retain_host_memory`.

  Returns:
    ``True`` if the XLA flags are in effect for this process (set now or
    already set by the user); ``False`` (with a warning) if JAX had already
    initialised its backend, in which case call it earlier, e.g. first thing
    in ``main``.

  Example:
    >>> from jirm import runtime
    >>> runtime.configure_cpu()  # before any jnp / jax.jit call
    True
  """
  if host_memory:
    retain_host_memory()
  if not xla_flags:
    return eigen_convolutions()
  current = os.environ.get("XLA_FLAGS", "")
  if _YNN_FLAG in current:
    return eigen_convolutions()
  if _backends_initialized():
    logging.warning(
        "jirm.runtime.configure_cpu(): JAX is already initialised, so the "
        "XLA flags %s cannot take effect; call configure_cpu() before the "
        "first JAX computation or export XLA_FLAGS='%s'.", XLA_CPU_FLAGS,
        " ".join(XLA_CPU_FLAGS))
    return False
  os.environ["XLA_FLAGS"] = " ".join((current, *XLA_CPU_FLAGS)).strip()
  return True


def eigen_convolutions() -> bool:
  """Whether ``XLA_FLAGS`` sends convolutions to Eigen (see module doc).

  :func:`jirm.models.resnet.conv2d` uses it to pick the stem's lowering.
  """
  for flag in os.environ.get("XLA_FLAGS", "").split():
    if flag.startswith(_YNN_FLAG + "="):
      return "eltwise" not in flag.split("=", 1)[1].split(",")
  return False
