"""Runs every capability-matrix case on 8 fake CPU devices and on one (run
by ``tests/test_capabilities.py`` in a subprocess, since XLA_FLAGS must
precede JAX's start): ``jirm.fit`` with ``mesh=`` (8-way data parallel)
against the same fit without; prints one JSON line ``{"exp/name": the
largest difference of the state's floating leaves and the history
(absolute, relative where a value exceeds 1), or "error: ..."}``.

Usage: python tests/capability_devices_worker.py MODEL [MODEL ...]
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

import jirm  # pylint: disable=g-import-not-at-top,wrong-import-position
from jirm import sharding  # pylint: disable=g-import-not-at-top,wrong-import-position
import test_capabilities as cap  # pylint: disable=g-import-not-at-top,wrong-import-position


def _diff(a, b) -> float:
  la, lb = cap._leaves(a.state), cap._leaves(b.state)  # pylint: disable=protected-access
  assert len(la) == len(lb)
  hist = [(np.asarray(a.history[k], np.float64),
           np.asarray(b.history[k], np.float64)) for k in a.history
          if np.issubdtype(np.asarray(a.history[k]).dtype, np.floating)]
  pairs = [(np.asarray(x, np.float64), np.asarray(y, np.float64))
           for x, y in zip(la, lb)] + hist
  # Relative to the value where it exceeds 1 (OOD-TV's weight is c * lambda).
  return max(float(np.max(np.abs(x - y) / np.maximum(1.0, np.abs(y)),
                          initial=0.0)) for x, y in pairs)


def main(models):
  assert jax.device_count() == 8, jax.devices()
  mesh = sharding.make_mesh()
  out = {}
  for exp, name in cap.CASES:
    if cap.MODEL[exp] not in models:
      continue
    built = cap._built(exp, name, cap.WEIGHT,  # pylint: disable=protected-access
                       adam_eps=(cap.goldens.ADAM_EPS_RESNET
                                 if cap.MODEL[exp] == "resnet" else None))
    kw = dict(built.fit_kw, steps=cap.STEPS, eval_every=cap.STEPS,
              runner="host")
    try:
      one = jirm.fit(built.splits, built.method, **kw)
      eight = jirm.fit(built.splits, built.method, mesh=mesh, **kw)
      out[f"{exp}/{name}"] = _diff(one, eight)
    except Exception as e:  # pylint: disable=broad-except
      out[f"{exp}/{name}"] = f"error: {type(e).__name__}: {e}"[:400]
  print(json.dumps(out))


if __name__ == "__main__":
  main(sys.argv[1:])
