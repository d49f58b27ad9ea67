"""The one method registry: every method jirm trains, under one name each.

Each :class:`Spec` says what a method is (family, reference, table label),
where it applies (models, experiments) and how it is searched (whether it
has a penalty weight). Everything that enumerates methods reads it:
``--method=all`` of every experiment (:func:`names`), the golden
trajectories and the all-methods tests, the sweep search spaces
(``experiments.hparams_registry``), and the migration table of old names
(:data:`ALIASES`, :func:`migration_table`).

Old names (``rex``, ``irm``, ``irm_game`` for IRMBed's game, the term name
``irmv1_head``) are accepted everywhere a name is read, mapped by
:func:`canonical`, so the records under ``docs/results`` written before the
rename stay readable.

Example:
  >>> from jirm.methods import registry
  >>> registry.names("cifar_mnist")[:3]
  ('oracle', 'erm', 'irmv1')
  >>> registry.canonical("rex")
  'vrex'
  >>> registry.get("invrat_ec_h").models
  ('resnet',)
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Optional

MODELS = ("mlp", "resnet", "linear")
FAMILIES = ("erm", "penalty", "game", "invrat", "group_dro", "ipg", "sparse",
            "irm_tv", "fishr")
EXPERIMENTS = ("colored_mnist", "cifar_mnist", "irm_tv", "sparse_irm",
               "shift")


_OBJECTIVE = "jirm.methods.objective:from_objective"
_GAMES = "jirm.methods.games:"
_TV_METHOD = "jirm.methods.irm_tv:tv_method"
_SPARSE = "jirm.methods.sparse:"


@dataclasses.dataclass(frozen=True)
class Spec:
  """One registered method.

  Attributes:
    name: the one name (flags, records, tables, goldens).
    title: its label in tables, e.g. ``'IRMv1(o)'``.
    family: how it trains (one of :data:`FAMILIES`): ``erm`` and
      ``penalty`` are stateless objectives (:func:`jirm.methods.
      from_objective`); the others carry state (environment heads, GroupDRO
      weights, pair samplers, mask scores, a lambda net).
    reference: paper / anchor it reproduces.
    models: model kinds it runs on (:data:`MODELS`); the capability matrix
      and the docs' table read it.
    tables: experiments whose ``--method=all`` (their table) runs it.
    extra: experiments that run it only when named (``--method=ipg``).
    penalized: has a penalty weight (``penalty_weight`` and ``anneal`` are
      searched).
    oracle: trains on data with the spurious feature removed.
    aliases: older names of the same method (accepted on input, read in
      committed records).
    term: its penalty term in :mod:`jirm.objectives` (``'irmv1'``, ...;
      None for ERM and for methods whose penalty their factory builds).
    factory: ``'module:function'`` of the jirm factory that builds the
      method's own part (:func:`factory` imports it): ``from_objective`` for
      the stateless objectives, the :class:`~jirm.methods.games.Game`, pair
      step, mask or TV method factory for the others.
    options: ``((keyword, value), ...)`` that make the factory this method
      (``level='o'`` for InvRat-EC(o), ``envs='inferred'`` for ZIN);
      ``kwargs`` gives them as a dict.
  """

  name: str
  title: str
  family: str
  reference: str
  models: tuple = ("mlp", "resnet")
  tables: tuple = ()
  extra: tuple = ()
  penalized: bool = True
  oracle: bool = False
  aliases: tuple = ()
  term: Optional[str] = None
  factory: str = _OBJECTIVE
  options: tuple = ()

  @property
  def kwargs(self) -> dict:
    """:attr:`options` as keyword arguments of :attr:`factory`."""
    return dict(self.options)

  @property
  def experiments(self) -> tuple:
    """Every experiment that runs it (its table first)."""
    return self.tables + self.extra


_CM, _CI, _TV, _SP, _SH = EXPERIMENTS

# Registry order is each experiment's table order (its rows).
_SPECS = (
    Spec("oracle", "Oracle", "erm",
         "ERM without the spurious feature (grayscale ColoredMNIST, blank "
         "MNIST half in CIFAR-MNIST); Arjovsky et al. 2019",
         models=("mlp", "resnet", "linear"), tables=(_CM, _CI, _TV, _SP),
         penalized=False, oracle=True),
    Spec("erm", "ERM", "erm", "Vapnik 1992; the baseline of every study",
         models=("mlp", "resnet", "linear"), tables=(_CM, _CI, _TV, _SP, _SH),
         penalized=False),
    Spec("irmv1", "IRMv1(o)", "penalty",
         "Arjovsky et al. 2019 (variants: full IRM, split DomainBed, "
         "split_perm IRMBed, env_scale SparseIRM/BIRM)",
         models=("mlp", "resnet", "linear"), tables=(_CM, _CI, _TV, _SP, _SH),
         aliases=("irm",),
         term="irmv1"),
    Spec("vrex", "V-REx(o)", "penalty",
         "Krueger et al. 2021 (V-REx): variance of the env risks",
         tables=(_CM, _CI, _SH), aliases=("rex",),
         term="vrex"),
    Spec("mm_rex", "MM-REx", "penalty",
         "Krueger et al. 2021 (MM-REx): |R_1 - R_2|", tables=(_CM,),
         term="mm_rex"),
    Spec("rvp", "RVP(o)", "penalty",
         "IRMBed (Lin et al. 2022): sqrt of the variance of the env risks",
         tables=(_CM, _CI),
         term="rvp"),
    Spec("irmv1_h", "IRMv1(h)", "penalty",
         "IRMBed irmv1fc (Lin et al. 2022): split-batch product of the env "
         "risks' gradients at the real linear head",
         models=("resnet",), tables=(_CI,), aliases=("irmv1_head",),
         term="irmv1_h"),
    Spec("irm_game_h", "IRMGame(h)", "game",
         "Ahuja et al. 2020 in IRMBed's form: per-env linear heads on a "
         "shared ResNet, the encoder trained on their ensemble",
         models=("resnet",), tables=(_CI,), penalized=False,
         aliases=("irm_game",),
         factory=_GAMES + "irm_game_h"),
    Spec("invrat_eb", "InvRat-EB(h)", "invrat",
         "Chang et al. 2020 (IRMBed): env-embedding predictor on the "
         "feature", models=("resnet",), tables=(_CI,),
         factory=_GAMES + "invrat_eb"),
    Spec("invrat_ec_o", "InvRat-EC(o)", "invrat",
         "Chang et al. 2020 (IRMBed): per-env heads, game on the logit",
         models=("resnet",), tables=(_CI,),
         factory=_GAMES + "invrat_ec", options=(("level", "o"),)),
    Spec("invrat_ec_h", "InvRat-EC(h)", "invrat",
         "Chang et al. 2020 (IRMBed): per-env heads, game on the feature",
         models=("resnet",), tables=(_CI,),
         factory=_GAMES + "invrat_ec", options=(("level", "h"),)),
    Spec("irm_tv_l1", "IRM-TV-l1", "penalty",
         "Lai & Wang, ICML 2024: (sum_e |dR_e/ds|)^2",
         models=("mlp", "resnet", "linear"), tables=(_CM, _TV),
         term="irm_tv_l1"),
    Spec("bayesian_irm", "BayesianIRM", "penalty",
         "Lin et al., CVPR 2022 (BIRM as released)", models=("mlp",),
         tables=(_CM,),
         term="bayesian_irm"),
    Spec("coral", "CORAL", "penalty",
         "Sun & Saenko 2016 (DomainBed's mean + covariance form): feature "
         "moments matched between environment pairs", models=("mlp",),
         extra=(_CM,), term="coral"),
    Spec("mmd", "MMD", "penalty",
         "Li et al. 2018 (DomainBed's Gaussian-kernel form): feature MMD "
         "between environment pairs", models=("mlp",), extra=(_CM,),
         term="mmd"),
    Spec("ib_irm", "IB-IRM", "penalty",
         "Ahuja et al. 2021 (DomainBed IB_IRM): IRMv1 (split) + feature "
         "variance bottleneck", models=("mlp",), extra=(_CM,),
         term="ib_irm"),
    Spec("eqrm", "EQRM", "penalty",
         "Eastwood et al. 2022 (DomainBed EQRM): the alpha-quantile of the "
         "env risks (KDE), as erm + 1 * (Q_alpha - mean) after a burn-in",
         models=("mlp",), extra=(_CM,), term="eqrm"),
    Spec("fishr", "Fishr", "fishr",
         "Rame et al., ICML 2022 (DomainBed Fishr): match the env variances "
         "of the head's per-sample gradients (moving average)",
         models=("mlp",), extra=(_CM,), factory=_GAMES + "fishr"),
    Spec("irm_game_f", "F-IRM game", "game",
         "Ahuja et al. 2020: one classifier per env, fixed representation, "
         "round-robin best responses", models=("mlp",), extra=(_CM,),
         penalized=False,
         factory="jirm.methods.irm_games:irm_game",
         options=(("variant", "f"),)),
    Spec("irm_game_v", "V-IRM game", "game",
         "Ahuja et al. 2020: F-IRM plus the representation as a player",
         models=("mlp",), extra=(_CM,), penalized=False,
         factory="jirm.methods.irm_games:irm_game",
         options=(("variant", "v"),)),
    Spec("ipg", "IPG", "ipg",
         "Invariance Pair-Guided learning, arXiv 2502.18975",
         tables=(_SH,), extra=(_CM, _CI), penalized=False,
         factory="jirm.methods.ipg:ipg"),
    Spec("group_dro", "GroupDRO", "group_dro",
         "Sagawa et al. 2020 (DomainBed form; envs = groups)",
         models=("resnet",), tables=(_SH,), penalized=False,
         factory=_GAMES + "group_dro"),
    Spec("ipg_group_dro", "IPG + GroupDRO", "ipg",
         "IPG's pair step around GroupDRO's objective",
         models=("resnet",), tables=(_SH,), penalized=False,
         factory="jirm.methods.ipg:ipg"),
    Spec("zin", "ZIN", "irm_tv",
         "Lin et al. 2022 (ZIN): IRMv1 over environments inferred from an "
         "auxiliary variable", models=("linear",), tables=(_TV,),
         factory=_TV_METHOD,
         options=(("penalty", "l2"), ("envs", "inferred"),
                  ("learned_lambda", False))),
    Spec("minimax_tv_l1", "Minimax-TV-l1", "irm_tv",
         "Lai & Wang, ICML 2024: IRM-TV-l1 over inferred environments",
         models=("linear",), tables=(_TV,),
         factory=_TV_METHOD,
         options=(("penalty", "l1"), ("envs", "inferred"),
                  ("learned_lambda", False))),
    Spec("ood_tv_irm_l1", "OOD-TV-IRM-l1", "irm_tv",
         "Lai & Wang 2025 (OOD-TV): learned penalty weight, given envs",
         models=("linear",), tables=(_TV,),
         factory=_TV_METHOD,
         options=(("penalty", "l1"), ("envs", "given"),
                  ("learned_lambda", True))),
    Spec("ood_tv_irm_l2", "OOD-TV-IRM-l2", "irm_tv",
         "Lai & Wang 2025 (OOD-TV): learned penalty weight, given envs, "
         "TV-l2", models=("linear",), tables=(_TV,),
         factory=_TV_METHOD,
         options=(("penalty", "l2"), ("envs", "given"),
                  ("learned_lambda", True))),
    Spec("ood_tv_minimax_l1", "OOD-TV-Minimax-l1", "irm_tv",
         "Lai & Wang 2025 (OOD-TV): learned penalty weight, inferred envs",
         models=("linear",), tables=(_TV,),
         factory=_TV_METHOD,
         options=(("penalty", "l1"), ("envs", "inferred"),
                  ("learned_lambda", True))),
    Spec("ood_tv_minimax_l2", "OOD-TV-Minimax-l2", "irm_tv",
         "Lai & Wang 2025 (OOD-TV): learned penalty weight, inferred envs, "
         "TV-l2", models=("linear",), tables=(_TV,),
         factory=_TV_METHOD,
         options=(("penalty", "l2"), ("envs", "inferred"),
                  ("learned_lambda", True))),
    Spec("mrm", "MRM", "sparse",
         "Zhang et al. ICML 2021: dense, mask, retrain the subnetwork",
         models=("mlp",), tables=(_SP,),
         factory=_SPARSE + "mrm_method"),
    Spec("sparse_irm", "SparseIRM", "sparse",
         "Zhou et al. ICML 2022: IRMv1 with learned weight masks under a "
         "budget (masks on any model)", tables=(_SP,),
         term="irmv1", factory=_SPARSE + "sparse_method"),
    Spec("sparse_erm", "SparseERM", "sparse",
         "Zhou et al. ICML 2022: the SparseIRM masks without a penalty",
         tables=(_SP,), penalized=False,
         factory=_SPARSE + "sparse_method"),
)

REGISTRY = {s.name: s for s in _SPECS}

# Old name -> the one name (docs/adding_a_method.md has the table).
ALIASES = {a: s.name for s in _SPECS for a in s.aliases}

# Experiments whose table has the oracle in another position, or none.
_ORACLE_LAST = (_CM, _TV, _SP)


def canonical(name: str) -> str:
  """The one name of ``name`` (itself, or the method an old name meant)."""
  return ALIASES.get(name, name)


def get(name: str) -> Spec:
  """The :class:`Spec` of ``name`` (an old name is accepted).

  Raises:
    ValueError: an unknown name, with the list to choose from.
  """
  spec = REGISTRY.get(canonical(name))
  if spec is None:
    raise ValueError(f"unknown method {name!r}; choose one of "
                     f"{sorted(REGISTRY)}.")
  return spec


def names(experiment: Optional[str] = None, *, model: Optional[str] = None,
          family: Optional[str] = None, extra: bool = False) -> tuple:
  """Registered names, in table order, filtered.

  Args:
    experiment: only the methods of this experiment's table (``None``:
      every method).
    model: only those that run on this model kind.
    family: only this family.
    extra: with ``experiment``, also the methods it runs only by name.

  Returns:
    A tuple of names.
  """
  if experiment is not None and experiment not in EXPERIMENTS:
    raise ValueError(f"unknown experiment {experiment!r}; choose one of "
                     f"{EXPERIMENTS}.")
  if model is not None and model not in MODELS:
    raise ValueError(f"unknown model kind {model!r}; choose one of {MODELS}.")
  out = []
  for s in _SPECS:
    if experiment is not None and experiment not in (
        s.experiments if extra else s.tables):
      continue
    if model is not None and model not in s.models:
      continue
    if family is not None and s.family != family:
      continue
    out.append(s.name)
  if experiment in _ORACLE_LAST and "oracle" in out:
    out.remove("oracle")
    out.insert(1, "oracle")
  return tuple(out)


def factory(name: str):
  """The factory of ``name`` (:attr:`Spec.factory`, imported).

  Example:
    >>> spec = registry.get("invrat_ec_o")
    >>> game = registry.factory("invrat_ec_o")(**spec.kwargs, lr=0.01)
  """
  module, attr = get(name).factory.split(":")
  return getattr(importlib.import_module(module), attr)


def penalty_term(name: str):
  """The :class:`jirm.objectives.Term` of ``name``'s :attr:`Spec.term`
  (None when it has none)."""
  term = get(name).term
  if term is None:
    return None
  return getattr(importlib.import_module("jirm.objectives"), term)


def markdown_table() -> str:
  """Every method as a Markdown table (``docs/adding_a_method.md`` holds it;
  a test keeps the two equal)."""
  lines = ["| name | label | family | models | built by | experiments "
           "(table; *by name*) | reference |", "|---|---|---|---|---|---|---|"]
  for s in _SPECS:
    module, attr = s.factory.split(":")
    args = [f"{k}={v!r}" for k, v in s.options]
    built = f"`{module.rsplit('.', 1)[1]}.{attr}({', '.join(args)})`"
    if s.term:
      built += f" + `{s.term}`"
    where = ", ".join(list(s.tables) + [f"*{e}*" for e in s.extra])
    reference = s.reference.replace("|", "\\|")  # A cell, not a column.
    lines.append(f"| `{s.name}` | {s.title} | {s.family} | "
                 f"{', '.join(s.models)} | {built} | {where} | "
                 f"{reference} |")
  return "\n".join(lines)


def migration_table() -> str:
  """The old -> new names as a Markdown table."""
  lines = ["| old name | name now | method |", "|---|---|---|"]
  for old, new in sorted(ALIASES.items()):
    lines.append(f"| `{old}` | `{new}` | {REGISTRY[new].title} |")
  return "\n".join(lines)
