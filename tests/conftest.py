"""Strict JAX settings for the tests (set before any computation).

The suite shares one persistent XLA compilation cache between its processes
(pytest-xdist workers, experiment subprocesses, notebook kernels): most of
its time is compiling the same ResNet and scan graphs. The cache lives in a
fresh directory per run (removed at the end), unless
``JAX_COMPILATION_CACHE_DIR`` is already set, so no run reads code compiled
by another jaxlib or on another CPU.
"""

import os
import shutil
import tempfile

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:  # The xdist controller creates it; workers inherit it.
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(
      prefix="jirm-xla-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
# LLVM -O0: compiles twice as fast and runs the suite's small graphs slower
# (compilation is most of the suite's time); XLA's graph optimisations are
# unchanged, and every tolerance here must hold for any code generation
# anyway. JIRM_TEST_XLA_OPT=default keeps XLA's default level.
_OPT_FLAG = "--xla_backend_optimization_level"
_OPT = os.environ.get("JIRM_TEST_XLA_OPT", "0")
_OPT_OK = _OPT in ("0", "1", "2", "3", "default")
if _OPT_OK and _OPT != "default" and _OPT_FLAG not in os.environ.get(
    "XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = " ".join((os.environ.get("XLA_FLAGS", ""),
                                      f"{_OPT_FLAG}={_OPT}")).strip()

import jax  # pylint: disable=g-import-not-at-top

jax.config.update("jax_numpy_rank_promotion", "raise")

from jirm import runtime  # pylint: disable=g-import-not-at-top

runtime.configure_cpu()  # The tests run with the experiments' CPU settings.


SHARED_TFDS = os.path.abspath(os.path.join(os.path.dirname(__file__), "..",
                                           "..", "shared",
                                           "tensorflow_datasets"))


def real_tfds_dir(name="mnist"):
  """A folder holding the prepared tfds dataset ``name`` (TFDS_DATA_DIR or
  ../shared/tensorflow_datasets), or None: real-data tests skip without it."""
  for d in (os.environ.get("TFDS_DATA_DIR"), SHARED_TFDS):
    if d and os.path.isdir(os.path.join(d, name)):
      return d
  return None


def pytest_configure(config):
  del config
  if not _OPT_OK:
    raise pytest.UsageError(
        f"JIRM_TEST_XLA_OPT={_OPT!r}: use 0-3 (the LLVM level) or 'default'")


# The longest files first, so that pytest-xdist's workers (scripts/test.sh
# runs one per core, whole files each) finish together.
_LONG_FILES = ("test_sharding.py", "test_capabilities.py", "test_deep.py",
               "test_goldens_resnet.py",
               "test_masks.py", "test_goldens_mlp.py", "test_launch.py",
               "test_shift.py", "test_resume.py")


def pytest_collection_modifyitems(config, items):
  del config
  rank = {name: i for i, name in enumerate(_LONG_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE:
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


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

  from jirm import results  # pylint: disable=g-import-not-at-top
  m = results.machine()
  return [f"versions: python {platform.python_version()}, " + ", ".join(
      f"{n} {version(n)}" for n in _REPORTED),
          f"cpu: {m['cpu']} ({m['simd']}, {m['cores']} cores)"]
