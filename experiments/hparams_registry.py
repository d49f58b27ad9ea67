"""DomainBed-style hyperparameter registry: each method's defaults (its
experiment config) and a seeded random search space over config keys.

Only these keys are searched; every other setting stays at the preset's
value. ``lr``, ``l2`` and ``penalty_weight`` are scalars that
:func:`jirm.sweep.fit_sweep` varies inside one compiled program; ``anneal``
is structural (one compilation per distinct value).
"""

from __future__ import annotations

import hashlib

import numpy as np

from jirm.methods import registry

# key -> (kind, low, high): log10-uniform, or a choice among values.
SPACE = {
    "lr": ("log10", -4.5, -2.5),
    "l2": ("log10", -6.0, -2.0),
    "penalty_weight": ("log10", 0.0, 5.0),
    "anneal": ("choice", (0, 50, 100, 190, 300)),
}
PENALTY_KEYS = ("penalty_weight", "anneal")
TRACEABLE = ("lr", "l2", "penalty_weight")


def _has_penalty(config) -> bool:
  """Whether the method has a penalty weight (the registry says), and for
  IRM-TV's configs whether this config switches it on."""
  if not registry.get(config.method).penalized:
    return False
  return config.get("penalty", "") not in ("none",)


def search_space(config) -> dict:
  """The searched keys of a method's config (penalty keys only when the
  method has a penalty)."""
  keys = [k for k in SPACE if k in config]
  if not _has_penalty(config):
    keys = [k for k in keys if k not in PENALTY_KEYS]
  return {k: SPACE[k] for k in keys}


def default_hparams(config) -> dict:
  """The config's values of the searched keys (the published flags)."""
  return {k: config[k] for k in search_space(config)}


def random_hparams(config, hparams_seed: int) -> dict:
  """A seeded random point of :func:`search_space` (deterministic in the
  method name and ``hparams_seed``; seed 0 returns the defaults, as in
  DomainBed)."""
  if hparams_seed == 0:
    return default_hparams(config)
  digest = hashlib.sha256(f"{config.method}/{hparams_seed}".encode()).digest()
  rng = np.random.RandomState(int.from_bytes(digest[:4], "little"))
  out = {}
  for k, spec in search_space(config).items():
    if spec[0] == "log10":
      out[k] = float(10 ** rng.uniform(spec[1], spec[2]))
    else:
      out[k] = type(config[k])(spec[1][rng.randint(len(spec[1]))])
  return out
