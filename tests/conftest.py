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
