r"""The Waterbirds experiment (see :mod:`experiments.shift` for flags and outputs).

  python -m experiments.waterbirds --data_dir=DIR --method=erm,group_dro,ipg \
      --preset=cpu --restarts=3 --output_dir=/tmp/waterbirds
"""

from absl import app

from experiments import common
from experiments import shift

if __name__ == "__main__":
  shift.define_flags("waterbirds")
  app.run(shift.main_for("waterbirds"), flags_parser=common.parse_flags)
