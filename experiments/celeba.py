r"""The CelebA experiment (see :mod:`experiments.shift` for flags and outputs).

  python -m experiments.celeba --data_dir=DIR --method=erm,group_dro,ipg \
      --preset=cpu --restarts=3 --output_dir=/tmp/celeba
"""

from absl import app

from experiments import common
from experiments import shift

if __name__ == "__main__":
  shift.define_flags("celeba")
  app.run(shift.main_for("celeba"), flags_parser=common.parse_flags)
