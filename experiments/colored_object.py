r"""The ColoredObject (BIRM) experiment (see :mod:`experiments.shift` for flags and outputs).

  python -m experiments.colored_object --data_dir=DIR --method=erm,group_dro,ipg \
      --preset=cpu --restarts=3 --output_dir=/tmp/colored_object
"""

from absl import app

from experiments import common
from experiments import shift

if __name__ == "__main__":
  shift.define_flags("colored_object")
  app.run(shift.main_for("colored_object"), flags_parser=common.parse_flags)
