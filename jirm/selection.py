"""Model-selection rules over a history of evaluations (SPEC §6).

A history is what :func:`jirm.fit` records at every evaluation point:
``step``, ``train_acc_E``, ``test_acc_E``, ``val_acc_E`` (when the splits
have training-domain validation data) and the method's metrics. A rule picks
one evaluation point; :func:`select` returns, per rule, that point's step
and accuracies. The rules (Gulrajani & Lopez-Paz 2021, "In Search of Lost
Domain Generalization", for the first and the test-selected ones):

* ``last``: the final evaluation;
* ``train_domain_val``: best mean accuracy on held-out samples of the
  training domains;
* ``val_worst_group``: best worst-group validation accuracy (group
  datasets, Sagawa et al. 2020);
* ``oracle``: best test accuracy (reads the test set; labelled as such);
* ``oracle_train_gt60``: SparseIRM's rule, best test accuracy among points
  with train accuracy > 0.6 (reads the test set).

Studies add their own rules on top (:func:`jirm.methods.irm_tv.select`,
:func:`jirm.methods.irm_games.add_game_stop`). This module sits below the trainer:
methods may import it.

Example:
  >>> res = jirm.fit(splits, method, steps=501)
  >>> select(res.history, res.env_names)['train_domain_val']['test_acc']
"""

from __future__ import annotations

import numpy as np

SELECTION_RULES = ("last", "train_domain_val", "val_worst_group", "oracle",
                   "oracle_train_gt60")


def _group_metrics(acc_TE, sizes):
  """(average accuracy weighted by group size, worst non-empty group)."""
  sizes = np.asarray(sizes, np.float64)
  avg = (acc_TE * sizes).sum(1) / sizes.sum()
  worst = np.where(sizes > 0, acc_TE, np.inf).min(1)
  return avg, worst


def select(history: dict, env_names: dict) -> dict:
  """Applies the model-selection rules to a history of evaluations.

  On group datasets (``env_names`` holds ``test_sizes``: one env per group,
  :mod:`jirm.data.shift`) every selection also carries ``avg_acc``
  (sample-weighted), ``worst_group_acc`` and ``group_acc``, ``test_acc`` is
  the average accuracy, and ``val_worst_group`` picks the evaluation with
  the best worst-group validation accuracy (Sagawa et al. 2020).

  Args:
    history: evaluation rows as numpy arrays (``step [T]``,
      ``train_acc_E [T, E]``, ``test_acc_E [T, E']``, optional
      ``val_acc_E``).
    env_names: ``train`` / ``test`` (/ ``val``) environment names, and on
      group datasets ``test_sizes`` / ``val_sizes``.

  Returns:
    rule -> dict(step, train_acc, test_acc, env_acc, val_acc if any).
  """
  train = history["train_acc_E"].mean(1)
  test = history["test_acc_E"].mean(1)
  val = history["val_acc_E"].mean(1) if "val_acc_E" in history else None
  groups = "test_sizes" in env_names
  if groups:
    test, test_worst = _group_metrics(history["test_acc_E"],
                                      env_names["test_sizes"])
    if val is not None and "val_sizes" in env_names:
      val, val_worst = _group_metrics(history["val_acc_E"],
                                      env_names["val_sizes"])
  picks = {"last": len(train) - 1, "oracle": int(np.argmax(test))}
  if groups and val is not None and "val_sizes" in env_names:
    picks["val_worst_group"] = int(np.argmax(val_worst))
  # SparseIRM's rule: best test accuracy among points with train acc > 0.6.
  ok = train > 0.6
  if ok.any():
    picks["oracle_train_gt60"] = int(np.argmax(np.where(ok, test, -np.inf)))
  if val is not None:
    picks["train_domain_val"] = int(np.argmax(val))
  out = {}
  for rule in SELECTION_RULES:
    if rule not in picks:
      continue
    i = picks[rule]
    env_acc = {n: float(a) for n, a in zip(env_names["train"],
                                           history["train_acc_E"][i])}
    env_acc.update({n: float(a) for n, a in zip(env_names["test"],
                                                history["test_acc_E"][i])})
    sel = dict(step=int(history["step"][i]), train_acc=float(train[i]),
               test_acc=float(test[i]), env_acc=env_acc)
    if val is not None:
      sel["val_acc"] = float(val[i])
    if groups:
      sel.update(avg_acc=float(test[i]), worst_group_acc=float(test_worst[i]),
                 group_acc={n: float(a) for n, a in zip(
                     env_names["test"], history["test_acc_E"][i])})
      if "val_sizes" in env_names and val is not None:
        sel["val_worst_group_acc"] = float(val_worst[i])
    out[rule] = sel
  return out
