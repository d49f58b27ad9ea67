"""End-to-end: the ColoredMNIST experiment with a shrunk config."""

import glob
import json
import os

import pytest

from experiments import colored_mnist
from experiments import common
from experiments.configs import colored_mnist as configs
from jirm import results as results_lib


def _without_sirm_rule(records):
  # 'oracle_train_gt60' exists only if some point had train accuracy > 0.6.
  return [r for r in records if r["selection"] != "oracle_train_gt60"]


def test_quick_run_writes_results_summary_and_curves(tmp_path,
                                                     synthetic_mnist):
  out = str(tmp_path / "run")
  colored_mnist.run(("erm", "irmv1"), "quick", restarts=2, seed=0,
                    output_dir=out, overrides=["steps=6", "eval_every=3"],
                    progress=False, mnist=synthetic_mnist)
  records = _without_sirm_rule(
      results_lib.read_jsonl(os.path.join(out, "results.jsonl")))
  assert len(records) == 2 * 2 * 3  # methods x restarts x selection rules
  for r in records:
    for key in ("method", "preset", "seed", "selection", "train_acc",
                "test_acc", "env_acc", "config", "wall_s", "objective",
                "data"):
      assert key in r, key
    assert 0.0 <= r["test_acc"] <= 1.0
    assert r["config"]["steps"] == 6
  assert {r["selection"] for r in records} == {"last", "train_domain_val",
                                               "oracle"}
  irm = [r for r in records if r["method"] == "irmv1"][0]
  assert "irmv1(variant=full)" in irm["objective"]
  summary = open(os.path.join(out, "summary.md")).read()
  assert "| irmv1 | quick | last | 2 |" in summary
  assert os.path.getsize(os.path.join(out, "curves.png")) > 1000

  # Re-running skips finished restarts (resume) and adds the missing one.
  colored_mnist.run(("erm",), "quick", restarts=3, seed=0, output_dir=out,
                    overrides=["steps=6", "eval_every=3"], progress=False,
                    mnist=synthetic_mnist)
  records = _without_sirm_rule(
      results_lib.read_jsonl(os.path.join(out, "results.jsonl")))
  assert len(records) == 2 * 2 * 3 + 3


def test_every_method_has_a_paper_config():
  for method in colored_mnist.METHODS_ALL:
    c = configs.get_config(method, "paper")
    assert c.steps > 0 and c.lr > 0
  irm = configs.get_config("irmv1", "paper")
  assert irm.hidden_dim == 390 and irm.anneal == 190
  assert irm.penalty_weight == pytest.approx(91257.18613115903)


def test_overrides_and_bad_values():
  c = common.apply_overrides(
      configs.get_config("erm", "quick"),
      ["lr=0.5", "data.data_num=123"])
  assert c.lr == 0.5 and c.data.data_num == 123
  with pytest.raises(ValueError, match="expected --config.KEY=VALUE"):
    common.apply_overrides(configs.get_config("erm", "quick"),
                                   ["lr"])
  with pytest.raises(ValueError, match="unknown preset"):
    configs.get_config("erm", "huge")


def test_results_are_written_atomically(tmp_path):
  path = str(tmp_path / "r.jsonl")
  results_lib.append_jsonl(path, [{"a": 1}])
  results_lib.append_jsonl(path, [{"a": 2}])
  assert [json.loads(l)["a"] for l in open(path)] == [1, 2]
  assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


def test_cifar_mnist_quick_run_grid_and_resume(tmp_path):
  from experiments import cifar_mnist  # pylint: disable=g-import-not-at-top
  import jirm  # pylint: disable=g-import-not-at-top
  sources = jirm.data.synthetic_cifar_mnist_sources(300)
  out = str(tmp_path / "cifar")
  kw = dict(preset="quick", model="tiny", envs=2, restarts=1, seed=0,
            output_dir=out, overrides=["epochs=1", "data.train_num=200",
                                       "data.test_num=50"],
            progress=False, sources=sources)
  cifar_mnist.run(("invrat_ec_h",), **kw)
  cifar_mnist.run(("invrat_eb",), grid=["embed_dim=4,8"], **kw)
  records = _without_sirm_rule(
      results_lib.read_jsonl(os.path.join(out, "results.jsonl")))
  assert len(records) == 3 * 3
  last = [r for r in records if r["selection"] == "last"]
  assert {(r["method"], r["note"]) for r in last} == {
      ("invrat_ec_h", ""), ("invrat_eb", "embed_dim=4"),
      ("invrat_eb", "embed_dim=8")}
  for r in last:
    assert r["pretrained"] == "none (trained from scratch)"
    assert r["envs"] == "2env" and r["model"] == "tiny"
    assert r["data"]["train_sizes"] == [90, 90]
  inv = [r for r in last if r["method"] == "invrat_ec_h"][0]
  assert inv["head_update"] == "frozen" and "invrat" in inv["objective"]
  # The deep methods write TensorBoard through the one trainer too.
  (tb,) = glob.glob(os.path.join(out, "tensorboard",
                                 "invrat_ec_h-quick-tiny-2env-*-seed0"))
  events = os.listdir(tb)
  assert any(e.startswith("events.out.tfevents") for e in events), events
  summary = open(os.path.join(out, "summary.md")).read()
  assert "| invrat_eb[embed_dim=8] | quick | last | 1 |" in summary
  # Resume: nothing new to run.
  n = len(results_lib.read_jsonl(os.path.join(out, "results.jsonl")))
  cifar_mnist.run(("invrat_ec_h",), **kw)
  assert len(results_lib.read_jsonl(os.path.join(out, "results.jsonl"))) == n


def test_cifar_mnist_cli_reports_missing_data(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.cifar_mnist", "--method=erm",
       "--preset=quick", f"--data_dir={tmp_path}/nothing",
       f"--output_dir={tmp_path}/out"], capture_output=True, text=True,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode == 2
  assert proc.stderr.startswith("error: prepared tfds dataset 'mnist'")
  assert not os.path.exists(f"{tmp_path}/out/results.jsonl")


def _choice(argv, method_flag="method"):
  # config_flags registers the --config.KEY flags it finds in sys.argv when
  # --config is defined, as it does for a real command line.
  import sys
  from absl import flags
  sys_argv, sys.argv = sys.argv, ["prog"] + argv
  try:
    fv = flags.FlagValues()
    flags.DEFINE_string(method_flag, "erm", "", flag_values=fv)
    flags.DEFINE_string("preset", "quick", "", flag_values=fv)
    common.define_config_flag("colored_mnist", flag_values=fv)
    fv(["prog"] + argv)
    return common.config_choice(fv, method_flag=method_flag), fv
  finally:
    sys.argv = sys_argv


def test_config_flag_file_argument_and_typed_overrides():
  path = common.config_file("colored_mnist")
  choice, fv = _choice([f"--config={path}:vrex,paper", "--config.lr=0.002",
                        "--config.data.data_num=1234",
                        "--config.note=hand"])
  assert choice.method == "vrex" and choice.preset == "paper"
  assert sorted(choice.overrides) == ["data.data_num=1234", "lr=0.002",
                                      "note=hand"]
  # The loaded config already holds the overrides, typed as the entries.
  assert fv["config"].value.lr == 0.002
  assert fv["config"].value.data.data_num == 1234
  assert fv["config"].value.penalty_weight == pytest.approx(10000.0)
  # The same overrides through apply_overrides give the same config.
  c = common.apply_overrides(configs.get_config("vrex", "paper"),
                             choice.overrides)
  assert c.to_dict() == fv["config"].value.to_dict()
  # No file argument: --method / --preset decide; default file, no overrides.
  choice, _ = _choice(["--method=irmv1", "--preset=paper"])
  assert choice == common.Choice("irmv1", "paper", ())


def test_config_flag_conflicts_are_errors():
  path = common.config_file("colored_mnist")
  with pytest.raises(ValueError, match="choose different methods"):
    _choice([f"--config={path}:vrex,quick", "--methods=erm"],
            method_flag="methods")
  # The same choice twice is not a conflict.
  choice, _ = _choice([f"--config={path}:vrex,quick", "--method=vrex"])
  assert choice.method == "vrex"
  with pytest.raises(ValueError, match="a preset is a whole config"):
    _choice(["--config.preset=paper"])
