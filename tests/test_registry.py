"""The one method registry (jirm.methods.registry): every experiment's
method list, the search spaces and the all-methods tests read it; old names
are accepted and mapped, and records written under them stay readable and
are not rerun."""

import json

import pytest

from experiments import common
from experiments import hparams_registry
from jirm import results
from jirm.methods import registry


def test_every_experiment_lists_the_registry_methods_in_table_order():
  from experiments import colored_mnist, irm_tv  # pylint: disable=g-import-not-at-top
  from experiments.configs import cifar_mnist, shift, sparse_irm  # pylint: disable=g-import-not-at-top
  assert colored_mnist.METHODS_ALL == (
      "erm", "oracle", "irmv1", "vrex", "mm_rex", "rvp", "irm_tv_l1",
      "bayesian_irm")
  assert colored_mnist.OTHER_METHODS == ("coral", "mmd", "ib_irm", "eqrm",
                                         "fishr", "irm_game_f", "irm_game_v",
                                         "ipg")
  assert cifar_mnist.METHODS == (
      "oracle", "erm", "irmv1", "vrex", "rvp", "irmv1_h", "irm_game_h",
      "invrat_eb", "invrat_ec_o", "invrat_ec_h")
  assert cifar_mnist.EXTRA_METHODS == ("ipg",)
  assert sparse_irm.METHODS == ("erm", "oracle", "irmv1", "mrm", "sparse_irm",
                                "sparse_erm")
  assert set(shift.METHODS) == {"erm", "group_dro", "ipg", "ipg_group_dro",
                                "irmv1", "vrex"}
  assert irm_tv.METHODS_ALL == registry.names("irm_tv")


def test_one_name_per_method_and_old_names_map_to_it():
  all_names = [s.name for s in registry.REGISTRY.values()]
  assert len(all_names) == len(set(all_names))
  assert not set(registry.ALIASES) & set(all_names)  # An alias is no name.
  assert registry.ALIASES == {"rex": "vrex", "irm": "irmv1",
                              "irm_game": "irm_game_h",
                              "irmv1_head": "irmv1_h"}
  assert registry.get("rex").name == "vrex"
  with pytest.raises(ValueError, match=r"unknown method 'vrexx'; choose"):
    registry.get("vrexx")
  with pytest.raises(ValueError, match="unknown experiment 'cmnist'"):
    registry.names("cmnist")
  for spec in registry.REGISTRY.values():
    assert spec.family in registry.FAMILIES, spec.name
    assert set(spec.models) <= set(registry.MODELS) and spec.models
    assert set(spec.experiments) <= set(registry.EXPERIMENTS)
    assert spec.reference and spec.title
  assert "| `rex` | `vrex` | V-REx(o) |" in registry.migration_table()


def test_every_entry_carries_its_factory_and_term():
  import inspect  # pylint: disable=g-import-not-at-top
  from jirm import objectives  # pylint: disable=g-import-not-at-top
  from jirm.methods import deep, irm_games  # pylint: disable=g-import-not-at-top
  from jirm.methods import irm_tv as irm_tv_lib  # pylint: disable=g-import-not-at-top
  from experiments.configs import irm_tv  # pylint: disable=g-import-not-at-top
  for spec in registry.REGISTRY.values():
    build = registry.factory(spec.name)
    # The options are keywords the factory takes (a renamed keyword fails).
    assert set(spec.kwargs) <= set(inspect.signature(build).parameters), \
        spec.name
    term = registry.penalty_term(spec.name)
    assert (term is None) == (spec.term is None), spec.name
    if term is not None:
      assert isinstance(term, objectives.Term) and term.name == spec.term
  # Every penalized stateless method has its term; the game factories make
  # the game they are named for.
  assert all(registry.get(n).term for n in registry.names(family="penalty"))
  for name in registry.names(family="invrat") + ("irm_game_h",):
    assert registry.factory(name)(**registry.get(name).kwargs).name == name
  assert registry.factory("irm_game_v") is irm_games.irm_game
  assert registry.factory("zin") is irm_tv_lib.tv_method
  # The deep study's table and IRM-TV's recipes are views of the registry.
  for name, m in deep.DEEP_METHODS.items():
    spec = registry.get(name)
    assert m.reference == spec.reference and m.oracle == spec.oracle
    assert (m.penalty and m.penalty.name) == spec.term, name
  assert deep.DEEP_METHODS["irmv1"].penalty.options == (
      ("variant", "split_perm"),)  # IRMBed's split-batch IRMv1.
  assert irm_tv.METHODS["zin"] == ("l2", "inferred", False, False)
  assert irm_tv.METHODS["ood_tv_minimax_l1"] == ("l1", "inferred", True,
                                                 False)
  assert irm_tv.METHODS["irmv1"] == ("l2", "given", False, False)
  assert irm_tv.METHODS["oracle"] == (None, "given", False, True)


def test_the_docs_table_is_the_registry():
  import pathlib  # pylint: disable=g-import-not-at-top
  doc = (pathlib.Path(__file__).parents[1] / "docs" /
         "adding_a_method.md").read_text()
  assert registry.markdown_table() in doc, (
      "docs/adding_a_method.md: paste registry.markdown_table()")
  assert "`games.invrat_ec(level='o')`" in registry.markdown_table()


def test_old_method_name_on_the_command_line_runs_the_new_one(capsys):
  assert common.method_list("rex,erm", ()) == ("vrex", "erm")
  assert "'rex' is now called 'vrex'" in capsys.readouterr().out


def test_search_space_follows_the_registry():
  from experiments.configs import cifar_mnist, colored_mnist  # pylint: disable=g-import-not-at-top
  assert "penalty_weight" in hparams_registry.search_space(
      colored_mnist.get_config("irmv1", "quick"))
  for m in ("erm", "oracle", "ipg"):  # No penalty weight to search.
    space = hparams_registry.search_space(colored_mnist.get_config(m, "quick"))
    assert "penalty_weight" not in space and "lr" in space, m
  assert "penalty_weight" not in hparams_registry.search_space(
      cifar_mnist.get_config("irm_game_h", "quick", "tiny", 2))


def test_records_under_an_old_name_are_read_and_not_rerun(tmp_path):
  from experiments.configs import cifar_mnist  # pylint: disable=g-import-not-at-top
  new = cifar_mnist.get_config("vrex", "quick", "tiny", 2)
  old = new.to_dict()
  old["method"] = "rex"  # As the code before the rename wrote it.
  path = tmp_path / "results.jsonl"
  path.write_text("".join(json.dumps(dict(
      method="rex", preset="quick", seed=0, selection=rule, test_acc=0.4,
      train_acc=0.6, wall_s=1.0, config=old,
      run_key=results.run_key(old))) + "\n" for rule in ("last", "oracle")))
  recs = results.read_jsonl(str(path))
  assert {r["method"] for r in recs} == {"vrex"}
  assert {r["run_key"] for r in recs} == {results.run_key(new.to_dict())}
  ran = []
  common.run_restarts([new], 1, 0, str(tmp_path),
                      lambda c, s, ckpt: ran.append(s), lambda _: None)
  assert not ran  # The old record is this config's seed 0.
  assert "| vrex | quick | last | 1 |" in results.summary_table(recs)


def test_old_penalty_name_of_a_record_is_mapped_too():
  rec = dict(method="irm", penalty="rex", config=dict(method="irm",
                                                      penalty="rex", lr=1.0))
  (got,) = [results._today(rec)]  # pylint: disable=protected-access
  assert (got["method"], got["penalty"]) == ("irmv1", "vrex")
  assert got["config"] == dict(method="irmv1", penalty="vrex", lr=1.0)
  assert rec["method"] == "irm"  # The input record is not changed.
