"""Faults and hostile input (issue 19): bad values are one line and exit 2,
nothing is silently cast, torn or diverged records never reach a table, and
the Slurm script passes every value to the trial byte for byte."""

import json
import os
import re
import shlex
import subprocess
import sys

import ml_collections
import pytest

from experiments import common
from experiments import sweep as sweep_exp
from experiments.configs import colored_mnist as cm_configs
from jirm import results
from jirm import train as train_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("raw", ["on", "y", "ture", "2"])
def test_override_booleans_are_strict(raw):
  c = ml_collections.ConfigDict(dict(flag=False, n=3, lr=0.1,
                                     data=dict(k=1)))
  if raw == "on":
    assert common.apply_overrides(c, [f"flag={raw}"]).flag is True
    return
  with pytest.raises(ValueError, match=rf"--config.flag={raw}: a boolean; "
                     r"use true or false"):
    common.apply_overrides(c, [f"flag={raw}"])


def test_overrides_and_grid_refuse_what_they_would_truncate():
  c = ml_collections.ConfigDict(dict(n=3, data=dict(k=1)))
  with pytest.raises(ValueError, match=r"--config.n=16.9: takes an int value, "
                     r"not '16.9'"):
    common.apply_overrides(c, ["n=16.9"])
  assert common.apply_overrides(c, ["n=16.0"]).n == 16
  with pytest.raises(ValueError, match=r"no config section 'bogus' in data"):
    common.apply_overrides(c, ["data.bogus.x=1"])
  with pytest.raises(ValueError, match=r"--grid=hidden_dim=16.9: takes an "
                     r"int value"):
    sweep_exp.make_trials("colored_mnist", ["irmv1"], "quick", "grid",
                          ["hidden_dim=16,16.9"])


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "experiments.colored_mnist",
                         *args], env=dict(os.environ, PYTHONPATH=ROOT),
                        capture_output=True, text=True, timeout=120,
                        cwd=ROOT)


def test_bad_values_are_one_line_and_exit_2(tmp_path):
  for args, says in [
      (["--restarts=0"], "--restarts=0: use 1 or more."),
      (["--preset=../../x"], "unknown preset '../../x'"),
      (["--config.preset=quick"], "--config.preset=quick: a preset is a "
       "whole config, not one entry; use --preset=quick"),
      (["--method=nope"], "unknown method 'nope'"),
      (["--config.steps=16.9"], "--config.steps=16.9: invalid literal for "
       "int()"),
      (["--config.data.bogus=1"], "--config.data.bogus: no such config "
       "entry ('bogus') in "),
      # The same line when --config=FILE is given (absl's parse, not the
      # flag's definition, meets the entry), and for a key below a leaf.
      (["--config=experiments/configs/colored_mnist.py",
        "--config.data.bogus=1"], "--config.data.bogus: no such config "
       "entry ('bogus') in experiments/configs/colored_mnist.py; "),
      (["--config=experiments/configs/colored_mnist.py", "--config.lr=0.1",
        "--config.data.data_num.x=3"], "--config.data.data_num.x: no such "
       "config entry ('data.data_num.x') in "),
      (["--config=experiments/configs/colored_mnist.py:vrex,quick,x"],
       "give METHOD,PRESET after the colon"),
      (["--config=experiments/configs/colored_mnist.py:vrex",
        "--method=erm"], "--method=erm and --config=experiments/configs/"
       "colored_mnist.py:vrex choose different methods"),
      (["--bogus_flag=1"], "Unknown command line flag 'bogus_flag'"),
  ]:
    p = _cli("--preset=quick", f"--output_dir={tmp_path / 'o'}", *args)
    assert p.returncode == 2, (args, p.stderr[-2000:])
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and \
        says in lines[0], (args, p.stderr)
  assert not (tmp_path / "o" / "results.jsonl").exists()
  (tmp_path / "file").write_text("x")
  p = _cli("--preset=quick", f"--output_dir={tmp_path / 'file'}")
  assert p.returncode == 2 and "is a file" in p.stderr
  p = _cli("--report_only", f"--output_dir={tmp_path / 'missing'}")
  assert p.returncode == 2 and p.stderr.startswith(
      "error: --report_only: no ") and len(p.stderr.splitlines()) == 1
  assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize("module,args,says", [
    ("cifar_mnist", ["--model=resnet50"], "--model=resnet50: --preset=quick "
     "sets model to 'tiny'"),
    ("sparse_irm", ["--data_num=20000"], "--data_num=20000: --preset=quick "
     "sets data_num to 2000"),
    ("cifar_mnist", ["--config.ramp=ture"], "--config.ramp=ture: "
     "('Non-boolean argument to boolean flag', 'ture'); use true or false."),
    ("irm_tv", ["--config.bogus=1"], "--config.bogus: no such config entry"),
    ("cifar_mnist", ["--config.width=-1"], "width=-1: the first stage's "
     "channel count is a whole number >= 1."),
    ("sparse_irm", ["--config.hidden_dim=0"], "hidden_dim=0: a layer size is "
     "a whole number >= 1."),
])
def test_flag_a_preset_would_override_is_refused(tmp_path, module, args,
                                                 says):
  p = subprocess.run([sys.executable, "-m", f"experiments.{module}",
                      "--preset=quick", f"--output_dir={tmp_path / 'o'}",
                      *args], env=dict(os.environ, PYTHONPATH=ROOT),
                     capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert p.returncode == 2, p.stderr[-2000:]
  lines = p.stderr.strip().splitlines()
  assert len(lines) == 1 and says in lines[0], p.stderr
  assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("build,kw,match", [
    ("linear_synthetic", dict(n_per_env=2.5), r"n_per_env=2.5: a whole "
     r"number of samples, at least 2 per environment \(2 here\)"),
    ("linear_synthetic", dict(n_per_env=1), r"n_per_env=1: "),
    ("linear_synthetic", dict(dim_inv=0), r"dim_inv=0: a whole number of "
     r"features, at least 1"),
    ("linear_synthetic", dict(n_val=3.5), r"n_val=3.5: "),
    ("linear_synthetic", dict(noise_std=float("nan")), r"noise_std=nan: use "
     r"a finite number >= 0"),
    ("linear_synthetic", dict(train_alphas=(0.1, -1.0)),
     r"train_alphas\[1\]=-1.0: "),
    ("zin_synthetic", dict(num_train=3), r"num_train=3: a whole number of "
     r"samples, at least 2 per environment \(4 here\)"),
    ("zin_synthetic", dict(num_test=100.5), r"num_test=100.5: "),
    ("zin_synthetic", dict(num_val=1), r"num_val=1: .*\(4 here\)"),
    ("zin_synthetic", dict(dim_spu=-1), r"dim_spu=-1: "),
    ("full_colored_mnist", dict(data_num=2.5), r"data_num=2.5: a whole "
     r"number of images, at least 2 per training environment \(4 here\)"),
    ("full_colored_mnist", dict(data_num=3), r"data_num=3: "),
    ("full_colored_mnist", dict(data_num=400), r"data_num=400 leaves no "
     r"test images: use at most 399"),
    ("waterbirds", dict(root="/nonexistent", image_size=0), r"image_size=0: "
     r"a whole number of pixels per side, at least 1"),
    ("waterbirds", dict(root="/nonexistent", max_per_split=2.5),
     r"max_per_split=2.5: "),
    ("celeb_a", dict(root="/nonexistent", image_size=32.5),
     r"image_size=32.5: "),
    ("colored_object", dict(coco_root="/nonexistent", cons=(0.9, 0.7)),
     r"cons=\(0.9, 0.7\): give 3 agreements"),
    ("colored_object", dict(coco_root="/nonexistent", label_noise=1.5),
     r"label_noise=1.5 is not a probability"),
    ("colored_object", dict(coco_root="/nonexistent",
                            classes=((("car", 1, 2),),)),
     r"classes\['car'\] n_train=1: .*at least 2"),
])
def test_every_builder_refuses_bad_sizes_before_reading(build, kw, match):
  from jirm import data  # pylint: disable=g-import-not-at-top
  from jirm.data import shift  # pylint: disable=g-import-not-at-top
  if build == "full_colored_mnist":  # A fake MNIST (400 train images).
    kw = dict(kw, mnist=data.synthetic_mnist(400, 100))
  fn = getattr(shift if hasattr(shift, build) else data, build)
  with pytest.raises(data.DataError, match=match):
    fn(**kw)


def test_mismatched_lengths_and_layer_sizes_are_refused():
  from jirm import data, models  # pylint: disable=g-import-not-at-top
  from jirm.models import resnet  # pylint: disable=g-import-not-at-top
  (tr_img, tr_dig), te = data.synthetic_mnist(400, 100)
  with pytest.raises(data.DataError, match=r"images and labels differ in "
                     r"length: train 400 / 399"):
    data.full_colored_mnist(0, data_num=200, mnist=((tr_img, tr_dig[:-1]), te))
  for kw, bad in ((dict(hidden_dim=0), "hidden_dim=0"),
                  (dict(hidden_dim=16.9), "hidden_dim=16.9"),
                  (dict(depth=0), "depth=0")):
    with pytest.raises(ValueError, match=bad + ": a layer size is a whole "
                       "number >= 1"):
      models.mlp(**kw)
    with pytest.raises(ValueError, match=bad):
      models.mlp_model(**kw)
  with pytest.raises(ValueError, match="width=0: the first stage's channel"):
    resnet.encoder("tiny", width=0)
  assert models.mlp(16.0, 2).hidden == (16, 16)  # A whole float is fine.


_DISK_FILLS = """
import errno, os, runpy, sys
real, calls = os.replace, []
def replace(src, dst):  # The second results.jsonl write finds the disk full.
  if str(dst).endswith("results.jsonl"):
    calls.append(dst)
    if len(calls) == 2:
      raise OSError(errno.ENOSPC, "No space left on device")
  return real(src, dst)
os.replace = replace
sys.argv = ["colored_mnist"] + sys.argv[1:]
runpy.run_module("experiments.colored_mnist", run_name="__main__")
"""


def test_a_full_disk_keeps_earlier_records_and_says_so(tmp_path):
  out = tmp_path / "o"
  proc = subprocess.run(
      [sys.executable, "-c", _DISK_FILLS, "--preset=quick", "--method=erm",
       "--restarts=2", f"--output_dir={out}", "--progress=false"],
      capture_output=True, text=True, timeout=600, cwd=ROOT,
      env=dict(os.environ, PYTHONPATH=ROOT), check=False)
  assert proc.returncode == 3, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      f"error: no space left on the device writing {out / 'results.jsonl'}: "
      f"it is unchanged (every earlier record intact)"), proc.stderr
  records = results.read_jsonl(str(out / "results.jsonl"))
  assert {r["seed"] for r in records} == {0}  # Seed 0's records, whole.
  rules = {r["selection"] for r in records}  # One record per rule.
  assert len(records) == len(rules) >= 3 and all(r["test_acc"] > 0
                                                 for r in records)
  assert not list(out.glob(".tmp-*"))  # No temporary file left behind.
  # Space again: the same command runs only the restart that was lost.
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.colored_mnist", "--preset=quick",
       "--method=erm", "--restarts=2", f"--output_dir={out}",
       "--progress=false"], capture_output=True, text=True, timeout=600,
      cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  records = results.read_jsonl(str(out / "results.jsonl"))
  assert sorted(r["seed"] for r in records) == [0] * len(rules) + [1] * len(
      rules)


def test_disk_full_is_found_in_the_causes_orbax_wraps():
  import errno  # pylint: disable=g-import-not-at-top
  ts = ValueError('RESOURCE_EXHAUSTED: Error writing "x" in OCDBT database: '
                  'Failed to write 79314 bytes: No space left on device '
                  "[os_error_code='28']")  # tensorstore, through orbax.
  assert results.disk_full(ts) is ts
  try:
    try:
      raise OSError(errno.ENOSPC, "No space")
    except OSError as inner:
      raise RuntimeError("save failed") from inner
  except RuntimeError as outer:
    assert results.disk_full(outer).errno == errno.ENOSPC
  assert results.disk_full(ValueError("lr=-1: use lr > 0")) is None
  assert results.disk_full(OSError(errno.EACCES, "denied")) is None


def test_torn_last_line_is_dropped_and_records_kept(tmp_path, caplog):
  path = str(tmp_path / "results.jsonl")
  results.append_jsonl(path, [{"seed": 0}, {"seed": 1}])
  with open(path, "a") as f:
    f.write('{"seed": 2, "test_a')  # A crash mid-write.
  assert results.read_jsonl(path) == [{"seed": 0}, {"seed": 1}]
  assert f"{path}:3: dropped a torn last line" in caplog.text
  results.append_jsonl(path, [{"seed": 2}])
  assert [r["seed"] for r in results.read_jsonl(path)] == [0, 1, 2]
  with open(path, "w") as f:
    f.write('{"seed": 0}\ngarbage\n{"seed": 1}\n')
  with pytest.raises(ValueError, match=r"results.jsonl:2 is not a JSON "
                     r"record"):
    results.read_jsonl(path)


def test_diverged_restart_is_recorded_outside_every_table(tmp_path, capsys):
  def run(config, seed, ckpt):
    if seed == 1:
      raise train_lib.DivergenceError("training diverged: term/irmv1 = nan "
                                      "at step 3.")
    return [dict(method=config.method, preset=config.preset, seed=seed,
                 selection="last", train_acc=0.5, test_acc=0.5, wall_s=1.0,
                 config=config.to_dict())]
  c = ml_collections.ConfigDict(dict(method="irmv1", preset="quick"))
  common.run_restarts([c], 3, 0, str(tmp_path), run, lambda _: None)
  recs = results.read_jsonl(str(tmp_path / "results.jsonl"))
  assert [r["seed"] for r in recs] == [0, 2]
  (failed,) = results.read_jsonl(str(tmp_path / common.FAILED))
  assert failed["status"] == "diverged" and failed["seed"] == 1
  assert failed["reason"].endswith("term/irmv1 = nan at step 3.")
  assert "irmv1-quick seed 1: diverged" in capsys.readouterr().out
  # summary.md lists it in a section of its own (rewritten, not repeated).
  for _ in range(2):
    common.write_failures(str(tmp_path))
  summary = (tmp_path / "summary.md").read_text()
  assert summary.count("## Failed restarts (1; diverged, in no table") == 1
  assert "| irmv1 | quick | 1 |" in summary and "term/irmv1 = nan" in summary
  common.run_restarts([c], 3, 0, str(tmp_path), run, lambda _: None)
  assert "skip irmv1-quick seed 1: it diverged before" in (
      capsys.readouterr().out)


def test_slurm_script_passes_every_value_byte_for_byte(tmp_path):
  out = tmp_path / "sweep dir"  # A space in the path.
  marker = tmp_path / "pwned"
  note = f"$(touch {marker}) `touch {marker}` \"q\" 'q' ; echo $HOME"
  args = ["--experiment=colored_mnist", "--method=irmv1", "--preset=quick",
          "--grid=penalty_weight=10,100", "--restarts=1",
          f"--output_dir={out}",
          "--config=experiments/configs/colored_mnist.py",
          f"--config.note={note}"]
  subprocess.run([sys.executable, "-m", "experiments.sweep", *args,
                  "--backend=slurm"], env=dict(os.environ, PYTHONPATH=ROOT),
                 check=True, capture_output=True, timeout=120, cwd=ROOT)
  script = (out / "slurm" / "sweep.sbatch").read_text()
  line = [l for l in script.splitlines() if "--run_trial" in l][0]
  assert line.startswith(shlex.quote(sys.executable) + " ")
  # Run the line as the array element would, with a stand-in for Python
  # that records the arguments it receives.
  fake = tmp_path / "fake_python"
  fake.write_text(f"#!{sys.executable}\nimport json, sys\n"
                  f"json.dump(sys.argv[1:], open({str(tmp_path / 'argv')!r}, "
                  f"'w'))\n")
  os.chmod(fake, 0o755)
  line = shlex.quote(str(fake)) + line[len(shlex.quote(sys.executable)):]
  subprocess.run(["bash", "-c", line], env=dict(os.environ,
                                                SLURM_ARRAY_TASK_ID="1"),
                 check=True, timeout=60)
  got = json.loads((tmp_path / "argv").read_text())
  assert got == ["-m", "experiments.sweep", *args, "--run_trial=1"]
  assert not marker.exists()
  trials = json.loads((out / "trials.json").read_text())
  assert cm_configs.get_config("irmv1", "quick").note != note
  assert trials[0]["overrides"] == [f"note={note}"]


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_fit_refuses_a_bad_batch_size(synthetic_mnist, bad):
  import jirm  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  splits = jirm.data.colored_mnist(0, data_num=200, mnist=synthetic_mnist)
  with pytest.raises(ValueError, match=rf"batch_size={bad!r}: use a positive "
                     r"integer or None"):
    jirm.fit(splits, model=jirm.models.mlp(4), objective=jirm.erm,
             optimizer=optax.sgd(0.1), steps=1, batch_size=bad)


def test_library_misuse_is_a_value_error_naming_the_argument(synthetic_mnist):
  import jirm  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  splits = jirm.data.colored_mnist(0, data_num=200, mnist=synthetic_mnist)
  kw = dict(model=jirm.models.mlp(4), objective=jirm.erm,
            optimizer=optax.sgd(0.1), steps=2)
  for bad, match in [(dict(steps=2.5), r"steps=2.5: use a whole number"),
                     (dict(eval_every=0), r"eval_every=0: use a whole"),
                     (dict(optimizer=0.1), r"optimizer=0.1: an optax"),
                     (dict(objective="irmv1"), r"objective='irmv1': compose")]:
    with pytest.raises(ValueError, match=match):
      jirm.fit(splits, **dict(kw, **bad))
  with pytest.raises(ValueError, match=r"irmv1\(variant='nonsense'\): use one "
                     r"of \['full'"):
    jirm.irmv1(variant="nonsense")
  with pytest.raises(ValueError, match=r"anneal=2.7: a whole number"):
    jirm.schedules.preset("irm", weight=10.0, anneal=2.7)
  assert jirm.schedules.preset("irm", weight=10.0, anneal=3.0).anneal == 3


def test_fit_refuses_mismatched_splits_and_logits(synthetic_mnist):
  import dataclasses  # pylint: disable=g-import-not-at-top
  import jirm  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  splits = jirm.data.colored_mnist(0, data_num=200, mnist=synthetic_mnist)
  kw = dict(model=jirm.models.mlp(4), objective=jirm.erm,
            optimizer=optax.sgd(0.1), steps=2, eval_every=2)
  test = splits.test
  wide = dataclasses.replace(splits, test=dataclasses.replace(
      test, x=test.x[..., :1]))
  short = dataclasses.replace(splits, train=dataclasses.replace(
      splits.train, y=splits.train.y[:, :-1]))
  for bad, match in [(wide, r"splits.test: inputs of shape \(14, 14, 1\) "
                            r"per sample, the training inputs \(14, 14, 2\)"),
                     (short, r"splits.train: labels \(2, \d+\) and valid "
                             r".* one label and one valid flag per input")]:
    with pytest.raises(ValueError, match=match):
      jirm.fit(bad, **kw)
  multi = dataclasses.replace(splits, task="multiclass")
  for runner in ("host", "scan"):
    with pytest.raises(ValueError, match=r"outputs 1 logit per sample for a "
                       r"multiclass task"):
      jirm.fit(multi, runner=runner, **kw)
  with pytest.raises(ValueError, match=r"outputs 3 logits per sample for a "
                     r"binary task"):
    jirm.fit(splits, **dict(kw, model=jirm.models.mlp(4, out=3)))


@pytest.mark.parametrize("data_num", [2.5, 1, True])
def test_colored_mnist_refuses_a_bad_data_num(synthetic_mnist, data_num):
  import jirm  # pylint: disable=g-import-not-at-top
  with pytest.raises(jirm.data.DataError, match=rf"data_num={data_num!r}: "
                     r"a whole number of training images, at least 2 per "
                     r"environment \(4 here\)"):
    jirm.data.colored_mnist(0, data_num=data_num, mnist=synthetic_mnist)


def test_colored_mnist_refuses_images_and_labels_of_different_lengths(
    synthetic_mnist):
  import jirm  # pylint: disable=g-import-not-at-top
  (tr_img, tr_dig), test = synthetic_mnist
  with pytest.raises(jirm.data.DataError, match=r"differ in length: train "
                     rf"{len(tr_img)} / {len(tr_dig) - 1}"):
    jirm.data.colored_mnist(0, data_num=100,
                            mnist=((tr_img, tr_dig[:-1]), test))


def _real_mnist_dir():
  from conftest import real_tfds_dir  # pylint: disable=g-import-not-at-top
  return real_tfds_dir("mnist")


@pytest.mark.skipif(_real_mnist_dir() is None, reason="no prepared mnist")
def test_corrupt_cache_is_rebuilt_and_corrupt_records_name_the_file(
    tmp_path, monkeypatch):
  import glob as glob_lib  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jirm import data  # pylint: disable=g-import-not-at-top
  # A copy of the prepared MNIST test split (10,000 images).
  src = glob_lib.glob(os.path.join(_real_mnist_dir(), "mnist", "*"))[0]
  root = tmp_path / "tfds"
  dst = root / "mnist" / os.path.basename(src)
  dst.mkdir(parents=True)
  for f in os.listdir(src):
    if "train" not in f:
      shutil.copy(os.path.join(src, f), dst / f)
  monkeypatch.setenv("JIRM_CACHE_DIR", str(tmp_path / "cache"))
  images, labels = data.load_tfds("mnist", "test", str(root))
  cached, = glob_lib.glob(str(tmp_path / "cache" / "*.npz"))
  # A garbled cache (half of it): a warning naming it, rebuilt, same arrays.
  size = os.path.getsize(cached)
  with open(cached, "r+b") as f:
    f.truncate(size // 2)
  with pytest.warns(UserWarning, match=r"decoded-data cache .*\.npz is "
                    r"corrupt .*rebuilding"):
    again = data.load_tfds("mnist", "test", str(root))
  np.testing.assert_array_equal(again[0], images)
  np.testing.assert_array_equal(again[1], labels)
  assert os.path.getsize(cached) == size
  # A cache whose arrays were changed: the checksum catches it.
  with np.load(cached) as z:
    parts = dict(z)
  parts["labels"] = (parts["labels"] + 1) % 10
  np.savez(cached.replace(".npz", ""), **parts)
  with pytest.warns(UserWarning, match="checksum does not match"):
    np.testing.assert_array_equal(data.load_tfds("mnist", "test",
                                                 str(root))[1], labels)
  # A garbled record file: one DataError naming it and the fix. (In a
  # subprocess: the C++ record reader parses the garbage, and nothing it
  # may leave behind should share a process with the rest of the suite.)
  record, = glob_lib.glob(str(dst / "mnist-test.array_record*"))
  os.chmod(record, 0o644)
  with open(record, "r+b") as f:
    f.seek(1000)
    f.write(b"\x00garbage" * 4096)
  code = ("import sys; from jirm import data\n"
          "try:\n"
          f"  data.load_tfds('mnist', 'test', {str(root)!r}, cache=False)\n"
          "except data.DataError as e:\n"
          "  print(e); sys.exit(3)\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                        text=True, timeout=300, check=False,
                        cwd=os.path.dirname(os.path.dirname(
                            os.path.abspath(__file__))))
  assert proc.returncode == 3, proc.stderr[-2000:]
  assert re.search(r"cannot be read .*mnist-test\.array_record.*python -m "
                   r"jirm\.data\.prepare --dataset=mnist", proc.stdout)


@pytest.mark.parametrize("kw,match", [
    (dict(train_num=200.5), r"train_num=200.5: a whole number of images"),
    (dict(train_num=3), r"train_num=3: .*at least 2 per environment \(6 "),
    (dict(test_num=0), r"test_num=0: a whole number of images, at least 1"),
    (dict(train_num=True), r"train_num=True"),
])
def test_cifar_mnist_refuses_bad_sizes(kw, match):
  from jirm import data  # pylint: disable=g-import-not-at-top
  src = data.synthetic_cifar_mnist_sources(50)
  with pytest.raises(data.DataError, match=match):
    data.cifar_mnist(0, sources=src, **kw)
  m_img, m_lab, c_img, c_lab = src
  with pytest.raises(data.DataError, match=r"images and labels differ in "
                     r"length \(mnist \d+ / \d+, cifar \d+ / \d+\)"):
    data.cifar_mnist(0, sources=(m_img, m_lab[:-1], c_img, c_lab),
                     train_num=40, test_num=10)
