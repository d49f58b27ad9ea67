"""Every experiment's configs, one file per experiment, read by
``ml_collections.config_flags``:

  python -m experiments.colored_mnist \
      --config=experiments/configs/colored_mnist.py:irmv1,paper \
      --config.lr=1e-3 --config.data.data_num=20000 --output_dir=/tmp/c

``FILE:METHOD,PRESET`` builds ``get_config(METHOD, PRESET)`` (the same as
``--method=METHOD --preset=PRESET``); each ``--config.KEY=VALUE`` replaces one
entry, parsed as that entry's type. Each file's ``get_config`` is wrapped by
:func:`config_string`, so that it takes config_flags' one string as well as
its Python arguments.
"""

from __future__ import annotations

import functools


def config_string(get_config):
  """Lets ``get_config(method, preset, ...)`` take config_flags' argument
  string ``'METHOD,PRESET'`` (the part after ``FILE:`` in ``--config``).

  Args:
    get_config: a config file's ``get_config`` (method first, preset
      second).

  Returns:
    The same function; called with one string holding a comma it splits it
    into method and preset. More parts raise ValueError: the other choices
    (model, environments, widths, dataset) have their own flags.

  Example:
    >>> from experiments.configs import colored_mnist
    >>> colored_mnist.get_config("vrex,quick").preset
    'quick'
  """

  @functools.wraps(get_config)
  def wrapped(*args, **kwargs):
    if len(args) == 1 and not kwargs and isinstance(args[0], str) and \
        "," in args[0]:
      parts = [p.strip() for p in args[0].split(",")]
      if len(parts) != 2 or not all(parts):
        raise ValueError(
            f"--config=FILE:{args[0]}: give METHOD,PRESET after the colon "
            f"(e.g. irmv1,paper); choose the rest with the experiment's own "
            f"flags (--model, --envs, --hidden, --dataset, ...).")
      args = tuple(parts)
    return get_config(*args, **kwargs)

  return wrapped
