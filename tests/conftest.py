"""Strict JAX settings for the tests (set before any computation)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

jax.config.update("jax_numpy_rank_promotion", "raise")

from jirm import runtime  # pylint: disable=g-import-not-at-top

runtime.configure_cpu()  # The tests run with the experiments' CPU settings.


SHARED_TFDS = os.path.abspath(os.path.join(os.path.dirname(__file__), "..",
                                           "..", "shared",
                                           "tensorflow_datasets"))


@pytest.fixture(scope="session")
def synthetic_mnist():
  import jirm  # pylint: disable=g-import-not-at-top
  return jirm.data.synthetic_mnist(num_train=3000, num_test=1000, seed=0)


_REPORTED = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex",
             "numpy", "tensorflow-datasets", "ml_collections", "torch", "ray")


def pytest_report_header(config):
  """The versions and the CPU the suite ran on (first lines of the run)."""
  del config
  import platform  # pylint: disable=g-import-not-at-top
  from importlib import metadata  # pylint: disable=g-import-not-at-top

  def version(name):
    try:
      return metadata.version(name)
    except metadata.PackageNotFoundError:
      return "-"

  cpu, flags = platform.processor() or platform.machine(), set()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name") and ":" in line:
          cpu = line.split(":", 1)[1].strip()
        elif line.startswith("flags") and ":" in line:
          flags = set(line.split(":", 1)[1].split())
          break
  except OSError:
    pass
  simd = "AVX-512" if "avx512f" in flags else (
      "AVX2" if "avx2" in flags else "no AVX2")
  return [f"versions: python {platform.python_version()}, " + ", ".join(
      f"{n} {version(n)}" for n in _REPORTED),
          f"cpu: {cpu} ({simd}, {os.cpu_count()} cores)"]
