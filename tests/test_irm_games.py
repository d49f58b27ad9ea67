"""The original IRM games (F-IRM / V-IRM) on the ColoredMNIST MLP."""

import jax
import numpy as np
import pytest

import jirm
from jirm.methods import irm_games
from jirm import train as train_lib


@pytest.fixture(scope="module")
def splits(synthetic_mnist):
  return jirm.data.colored_mnist(0, data_num=2000, mnist=synthetic_mnist)


@pytest.mark.parametrize("variant,num_players", [("f", 2), ("v", 3)])
def test_only_the_mover_changes(splits, variant, num_players):
  game = irm_games.irm_game(variant=variant, hidden_dim=16, batch_size=32)
  data = train_lib.EnvArrays.from_envs(splits.train)
  state = game.init(jax.random.key(0), data)
  step = jax.jit(game.update)
  for t in range(num_players + 1):
    new, aux = step(state, data)
    mover = t % num_players
    assert int(aux["mover"]) == mover
    for e in range(2):
      changed = not all(np.allclose(a[e], b[e]) for a, b in zip(
          jax.tree.leaves(new.players), jax.tree.leaves(state.players)))
      assert changed == (e == mover), (t, e)
    if variant == "v":
      rep_changed = not all(np.allclose(a, b) for a, b in zip(
          jax.tree.leaves(new.rep), jax.tree.leaves(state.rep)))
      assert rep_changed == (mover == 2)
    state = new


def test_players_gradient_is_ensemble_loss_on_own_env(splits):
  game = irm_games.irm_game(variant="f", hidden_dim=8, batch_size=None,
                            lr=1e-3)
  data = train_lib.EnvArrays.from_envs(splits.train)
  state = game.init(jax.random.key(0), data)
  new, _ = jax.jit(game.update)(state, data)  # Player 0 moves on env 0.

  def own_loss(players):
    x = data.x[0]
    logits = game.predict(state._replace(players=players), x)[None]
    return jirm.objectives.env_risks(jirm.Outputs(
        logits, data.y[:1], data.valid[:1]))[0]

  g = jax.jit(jax.grad(own_loss))(state.players)  # Eager: many compiles.
  # Adam's first step moves every coordinate by lr * sign(g) (up to eps).
  for a, b, gg in zip(jax.tree.leaves(new.players),
                      jax.tree.leaves(state.players), jax.tree.leaves(g)):
    big = np.abs(gg[0]) > 1e-6
    np.testing.assert_allclose((a[0] - b[0])[big], -1e-3 * np.sign(gg[0])[big],
                               rtol=1e-2)


def test_fit_reports_termination_point(splits):
  game = lambda v: irm_games.irm_game(variant=v, hidden_dim=16,
                                     batch_size=32, task=splits.task)
  res = irm_games.add_game_stop(
      jirm.fit(splits, game("v"), steps=40, eval_every=10), warm_start=10,
      threshold=1.01)
  stop = res.selections["game_stop"]
  assert stop["fired"] and stop["step"] == 10  # First eval after warm start.
  never = irm_games.add_game_stop(
      jirm.fit(splits, game("f"), steps=20, eval_every=10), warm_start=0,
      threshold=-1.0)
  assert not never.selections["game_stop"]["fired"]
  assert never.selections["game_stop"]["step"] == 20


def test_colored_mnist_experiment_runs_games(tmp_path, synthetic_mnist):
  from experiments import colored_mnist  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / "games")
  colored_mnist.run(("irm_game_f", "irm_game_v"), "quick", restarts=1, seed=0,
                    output_dir=out, overrides=["steps=20"], progress=False,
                    mnist=synthetic_mnist)
  records = jirm.results.read_jsonl(f"{out}/results.jsonl")
  assert {r["selection"] for r in records} >= {"last", "game_stop"}
  assert {r["method"] for r in records} == {"irm_game_f", "irm_game_v"}
