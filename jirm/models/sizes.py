"""The one check of a layer size that every model factory applies."""

from __future__ import annotations

import numbers


def check_size(name: str, value, what: str = "a layer size") -> int:
  """``value`` as an int if it is a whole number >= 1, else a ValueError
  naming it (no silent truncation of 16.9 to 16).

  Example:
    >>> check_size("hidden_dim", 390)
    390
  """
  if (isinstance(value, bool) or not isinstance(value, numbers.Real)
      or not float(value).is_integer() or value < 1):
    raise ValueError(f"{name}={value!r}: {what} is a whole number >= 1.")
  return int(value)
