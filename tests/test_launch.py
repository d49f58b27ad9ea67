"""Sweep launcher: vmap backend == separate runs (local backend), Ray with
2 workers survives a killed worker without losing finished trials, Slurm
array script runs a trial, registry search space, collector tables."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import jirm
from experiments import hparams_registry
from experiments import sweep as sweep_exp
from experiments.configs import colored_mnist as cm_configs
from jirm import launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _by_trial(records, rule="last"):
  return {r["trial"]: r for r in records if r["selection"] == rule}


def test_vmap_sweep_table_equals_separate_runs(tmp_path, synthetic_mnist):
  # penalty_weight=1e30 overflows Adam's second moment (a finite loss, a
  # frozen run): those trials are recorded as diverged on both backends, the
  # others run and are tabulated as usual.
  trials = sweep_exp.make_trials(
      "colored_mnist", ["irmv1"], "quick", "grid",
      ["penalty_weight=10,1000,1e30"], restarts=2,
      overrides=["steps=25", "anneal=10", "schedule=domainbed"])
  assert len(trials) == 6 and len({t["id"] for t in trials}) == 6
  a, b = tmp_path / "vmap", tmp_path / "local"
  sweep_exp.launch_sweep(trials, str(a), "vmap", mnist=synthetic_mnist,
                         progress=False)
  text = sweep_exp.launch_sweep(trials, str(b), "local",
                                mnist=synthetic_mnist, progress=False)
  ra, rb = launch.read_results(str(a)), launch.read_results(str(b))
  assert len(ra) == len(rb) == 18  # 4 trials x 4 rules + 2 diverged.
  for rule in ("last", "train_domain_val", "oracle"):
    va, vb = _by_trial(ra, rule), _by_trial(rb, rule)
    assert sorted(va) == sorted(vb) and len(va) == 4
    for k in va:
      assert va[k]["test_acc"] == pytest.approx(vb[k]["test_acc"], abs=1e-5)
      assert va[k]["step"] == vb[k]["step"]
  bad = {t["id"] for t in trials if t["hparams"]["penalty_weight"] == 1e30}
  for recs in (ra, rb):
    failed = {r["trial"]: r for r in recs if r.get("status") == "diverged"}
    assert set(failed) == bad
    for r in failed.values():  # The anneal step: the weight jumps to 1e30.
      assert "state leaf" in r["reason"] and "at step 10 " in r["reason"]
      assert r["selection"] is None and "test_acc" not in r
  # The same message from the scan runner and the host loop (which also
  # names the trial's last checkpoint).
  cut = lambda m: m.split("; the last good")[0].split(". Lower")[0]
  da = {r["trial"]: cut(r["reason"]) for r in ra if r.get("status")}
  db = {r["trial"]: cut(r["reason"]) for r in rb if r.get("status")}
  assert da == db
  assert "penalty_weight=1000" in text and "| irmv1 | last |" in text
  assert "## Failed trials (2; never selected)" in text
  assert "penalty_weight=1e+30" not in text.split("## Failed")[0]
  # Relaunching a finished sweep runs nothing (diverged trials included).
  before = {t["id"]: os.path.getmtime(a / "trials" / t["id"] /
                                      "result.jsonl") for t in trials}
  sweep_exp.launch_sweep(trials, str(a), "vmap", mnist=synthetic_mnist)
  assert before == {t["id"]: os.path.getmtime(a / "trials" / t["id"] /
                                              "result.jsonl")
                    for t in trials}


# Small configs of the other sweep experiments (the quick presets, fewer
# steps and samples); the local backend trains each restart with its
# run_restart, the vmap backend both restarts of a point in one program.
_OTHER = {
    "sparse_irm": ("mrm", ["hidden_dim=16", "mrm.dense_steps=4",
                           "mrm.mask_steps=4", "mrm.retrain_steps=6",
                           "eval_every=2"]),
    "irm_tv": ("zin", ["steps=12", "eval_every=4"]),
    "cifar_mnist": ("vrex", ["epochs=1", "data.train_num=200",
                             "data.test_num=200", "anneal_epochs=0"]),
}


@pytest.mark.parametrize("experiment", sorted(_OTHER))
def test_vmap_backend_runs_every_experiment_and_equals_local(
    experiment, tmp_path, synthetic_mnist, monkeypatch):
  method, overrides = _OTHER[experiment]
  if experiment == "cifar_mnist":  # Synthetic CIFAR-MNIST sources.
    from experiments import cifar_mnist  # pylint: disable=g-import-not-at-top
    sources = jirm.data.synthetic_cifar_mnist_sources(300)
    orig = cifar_mnist.build_method
    monkeypatch.setattr(
        cifar_mnist, "build_method",
        lambda c, s=0, data_dir=None, _=None: orig(c, s, sources=sources))
  trials = sweep_exp.make_trials(experiment, [method], "quick", "grid",
                                 ["penalty_weight=10"], restarts=2,
                                 overrides=overrides)
  a, b = tmp_path / "vmap", tmp_path / "local"
  sweep_exp.launch_sweep(trials, str(a), "vmap", mnist=synthetic_mnist,
                         progress=False)
  sweep_exp.launch_sweep(trials, str(b), "local", mnist=synthetic_mnist,
                         progress=False)
  ra, rb = launch.read_results(str(a)), launch.read_results(str(b))
  assert {r.get("backend") for r in ra} == {"vmap"}
  rules = {r["selection"] for r in rb}
  assert {r["selection"] for r in ra} == rules and len(rules) >= 3
  for rule in rules:  # (oracle_train_gt60 exists where train acc > 60%.)
    va, vb = _by_trial(ra, rule), _by_trial(rb, rule)
    assert sorted(va) == sorted(vb) and va
    for k in va:  # Within one example of rounding between the programs.
      assert va[k]["test_acc"] == pytest.approx(vb[k]["test_acc"], abs=0.011)
  assert sorted(_by_trial(ra)) == sorted(t["id"] for t in trials)
  assert {r["seed"] for r in ra} == {0, 1}


def test_vmap_backend_refuses_a_method_that_depends_on_the_seed(
    tmp_path, synthetic_mnist):
  # IPG's pairs are drawn per restart inside the method: two restarts
  # cannot share one program.
  trials = sweep_exp.make_trials("colored_mnist", ["ipg"], "quick", "grid",
                                 ["penalty_weight=10"], restarts=2,
                                 overrides=["steps=4", "eval_every=2"])
  with pytest.raises(ValueError, match=r"ipg's method depends on the seed "
                     r".* use --backend=local"):
    sweep_exp.launch_sweep(trials, str(tmp_path), "vmap",
                           mnist=synthetic_mnist, progress=False)
  assert not launch.read_results(str(tmp_path))


def test_registry_defaults_and_seeded_random_points():
  c = cm_configs.get_config("irmv1", "paper")
  assert hparams_registry.random_hparams(c, 0) == dict(
      lr=c.lr, l2=c.l2, penalty_weight=c.penalty_weight, anneal=c.anneal)
  p1 = hparams_registry.random_hparams(c, 1)
  assert p1 == hparams_registry.random_hparams(c, 1)  # Seeded.
  assert p1 != hparams_registry.random_hparams(c, 2)
  assert 10 ** -4.5 <= p1["lr"] <= 10 ** -2.5
  assert 1.0 <= p1["penalty_weight"] <= 1e5
  assert p1["anneal"] in (0, 50, 100, 190, 300)
  erm = cm_configs.get_config("erm", "paper")
  assert set(hparams_registry.random_hparams(erm, 3)) == {"lr", "l2"}
  with pytest.raises(ValueError, match="--grid key 'bogus'"):
    sweep_exp.make_trials("colored_mnist", ["irmv1"], "quick", "grid",
                          ["bogus=1,2"])


def _sweep_cmd(out, backend, *extra):
  return [sys.executable, "-m", "experiments.sweep",
          "--config=experiments/configs/irm_tv.py",
          "--method=irmv1", "--preset=quick", "--grid=penalty_weight=10,100",
          "--restarts=3", f"--backend={backend}", f"--output_dir={out}",
          "--config.steps=1200", "--config.eval_every=100",
          "--config.anneal=600",
          *extra]


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)


def test_ray_two_workers_lose_no_finished_trial_when_one_is_killed(tmp_path):
  pytest.importorskip("ray")
  out = tmp_path / "ray"
  proc = subprocess.Popen(_sweep_cmd(out, "ray", "--workers=2"), env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  trials_dir = out / "trials"
  killed = None
  deadline = time.time() + 400
  while time.time() < deadline and proc.poll() is None and killed is None:
    time.sleep(0.1)
    done = {d for d in os.listdir(trials_dir)} if trials_dir.exists() else set()
    finished = [d for d in done if (trials_dir / d / "result.jsonl").exists()]
    running = [d for d in done if d not in finished and
               (trials_dir / d / "attempts.log").exists()]
    if finished and running:  # Kill a worker mid-trial after one finished.
      victim = running[0]
      pid = int((trials_dir / victim / "attempts.log").read_text().split()[0])
      finished_before = {d: (trials_dir / d / "result.jsonl").read_text()
                         for d in finished}
      os.kill(pid, signal.SIGKILL)
      killed = victim
  stdout, stderr = proc.communicate(timeout=600)
  assert proc.returncode == 0, stderr[-3000:]
  assert killed is not None, "no worker was killed (sweep too fast?)"
  # The killed trial was retried; finished trials were not re-run.
  assert len((trials_dir / killed / "attempts.log").read_text().split("\n")
             ) >= 3  # Two attempt lines + trailing newline.
  for d, text in finished_before.items():
    assert (trials_dir / d / "result.jsonl").read_text() == text
    assert len((trials_dir / d / "attempts.log").read_text().strip()
               .split("\n")) == 1
  # Same table as running the trials one by one in one process.
  local = tmp_path / "local"
  subprocess.run(_sweep_cmd(local, "local"), env=_env(), check=True,
                 capture_output=True, timeout=600)
  ra = _by_trial(launch.read_results(str(out)))
  rb = _by_trial(launch.read_results(str(local)))
  assert len(ra) == len(rb) == 6
  for k in ra:
    assert ra[k]["test_acc"] == pytest.approx(rb[k]["test_acc"], abs=1e-6)
  assert (out / "summary.md").exists()


def test_slurm_array_script_and_one_element(tmp_path):
  out = tmp_path / "slurm"
  fake_bin = tmp_path / "bin"
  fake_bin.mkdir()
  (fake_bin / "sbatch").write_text(
      f"#!/bin/sh\necho \"$@\" > {tmp_path}/submitted\n")
  os.chmod(fake_bin / "sbatch", 0o755)
  env = _env()
  env["PATH"] = f"{fake_bin}:{env['PATH']}"
  subprocess.run(_sweep_cmd(out, "slurm", "--submit",
                            "--sbatch=--partition=cpu"), env=env, check=True,
                 capture_output=True, timeout=300)
  script = (out / "slurm" / "sweep.sbatch").read_text()
  assert "#SBATCH --array=0-5" in script
  assert "#SBATCH --partition=cpu" in script
  assert "--run_trial=$SLURM_ARRAY_TASK_ID" in script
  assert (tmp_path / "submitted").read_text().strip().endswith("sweep.sbatch")
  # Run array element 4 the way Slurm would.
  line = [l for l in script.splitlines() if "--run_trial" in l][0]
  subprocess.run(["bash", "-c", line], env=dict(env, SLURM_ARRAY_TASK_ID="4"),
                 check=True, capture_output=True, timeout=300, cwd=ROOT)
  trials = json.loads((out / "trials.json").read_text())
  assert launch.is_done(str(out), trials[4])
  assert not launch.is_done(str(out), trials[3])


def test_random_search_any_experiment_local_backend(tmp_path):
  trials = sweep_exp.make_trials("irm_tv", ["irmv1"], "quick", "random",
                                 n_hparams=3, hparams_seed=0, restarts=1)
  assert len(trials) == 3 and len({t["hparams_id"] for t in trials}) == 3
  defaults = trials[0]["hparams"]  # hparams seed 0 = the preset's flags.
  assert defaults["penalty_weight"] == 1e4 and defaults["lr"] == 0.005
  assert trials[1]["hparams"] != defaults
  text = sweep_exp.launch_sweep(trials, str(tmp_path), "local",
                                progress=False)
  recs = launch.read_results(str(tmp_path))
  assert len({r["trial"] for r in recs}) == 3
  for t in trials:  # Each trial ran with its own hyperparameters.
    r = [x for x in recs if x["trial"] == t["id"]][0]
    assert r["config"]["penalty_weight"] == pytest.approx(
        t["hparams"]["penalty_weight"])
    assert r["config"]["anneal"] == t["hparams"]["anneal"]
  assert "## Selected point per rule" in text
  assert "| irmv1 | train_domain_val |" in text


def test_a_trial_another_process_runs_is_skipped_then_taken_over(
    tmp_path, synthetic_mnist, capsys):
  import socket  # pylint: disable=g-import-not-at-top
  trials = sweep_exp.make_trials("colored_mnist", ["erm"], "quick", "grid",
                                 [], restarts=2, overrides=["steps=4"])
  holder = subprocess.Popen(["sleep", "60"])  # A live process "runs" trial 0.
  lock = os.path.join(launch.trial_dir(str(tmp_path), trials[0]), launch.LOCK)
  os.makedirs(os.path.dirname(lock))
  with open(lock, "w") as f:
    f.write(f"{holder.pid} {socket.gethostname()}\n")
  try:
    for backend in ("local", "vmap"):
      sweep_exp.launch_sweep(trials, str(tmp_path), backend,
                             mnist=synthetic_mnist, progress=False)
      assert not launch.is_done(str(tmp_path), trials[0]), backend
      assert launch.is_done(str(tmp_path), trials[1])
      assert (f"skip trial {trials[0]['id']}: process {holder.pid} on "
              in capsys.readouterr().out)
  finally:
    holder.kill()
    holder.wait()
  # Its holder gone, the lock is stale: the next run takes the trial over,
  # and runs the other one no second time.
  sweep_exp.launch_sweep(trials, str(tmp_path), "local",
                         mnist=synthetic_mnist, progress=False)
  assert launch.is_done(str(tmp_path), trials[0])
  assert not os.path.exists(lock)  # Released when it finished.
  records = launch.read_results(str(tmp_path))
  assert sorted({r["trial"] for r in records}) == sorted(
      t["id"] for t in trials)
  rules = [(r["trial"], r["selection"]) for r in records]
  assert len(rules) == len(set(rules))  # Every trial's records once.
