"""Waterbirds / CelebA / ColoredObject loaders on tiny fake copies of the
real on-disk formats; group metrics; GroupDRO; ERM, GroupDRO and IPG steps."""

import os

import jax
import numpy as np
import optax
import pytest

import jirm
from jirm.methods import deep
from jirm.methods import ipg
from jirm.data import shift
from jirm import models
from jirm.methods import games
import shift_fixtures as fx


@pytest.fixture(scope="module")
def wb_root(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("waterbirds"))
  fx.write_waterbirds(root)
  return root


def _group_counts(envs):
  return [int(v) for v in envs.valid.sum(1)]


def test_waterbirds_counts_groups_and_correlation(wb_root):
  s = shift.waterbirds(wb_root, image_size=16, train_envs="pooled")
  assert s.train.x.shape == (1, 28, 16, 16, 3)
  assert 0.0 <= s.train.x.min() and s.train.x.max() <= 1.0
  assert np.mean(s.train.agree[s.train.valid]) == pytest.approx(24 / 28)
  assert _group_counts(s.test) == [4, 4, 4, 4]
  assert _group_counts(s.val) == [3, 3, 3, 3]
  assert s.info["groups"] == shift.WATERBIRDS_GROUPS
  assert s.info["group_counts"]["train"] == [12, 2, 2, 12]
  # Background pixels carry the place: water images are blue.
  water = s.test.x[1, 0]  # landbird_on_water
  assert water[0, 0, 2] > water[0, 0, 1]
  g = shift.waterbirds(wb_root, image_size=8, train_envs="groups")
  assert _group_counts(g.train) == [12, 2, 2, 12]
  # Waterbird-100: training keeps only birds on their habitat.
  w100 = shift.waterbirds(wb_root, image_size=8, variant="waterbird100",
                          train_envs="groups")
  assert _group_counts(w100.train) == [12, 12]
  assert w100.train.names == ("landbird_on_land", "waterbird_on_water")
  assert bool(np.all(w100.train.agree[w100.train.valid]))
  assert _group_counts(w100.test) == [4, 4, 4, 4]


def test_waterbirds_errors_name_the_file_and_column(tmp_path, wb_root):
  with pytest.raises(jirm.data.DataError, match="metadata.csv"):
    shift.waterbirds(str(tmp_path))
  (tmp_path / "metadata.csv").write_text("img_filename,y,split\na.jpg,0,0\n")
  with pytest.raises(jirm.data.DataError, match=r"missing column.*place"):
    shift.waterbirds(str(tmp_path))
  with pytest.raises(jirm.data.DataError, match="variant"):
    shift.waterbirds(wb_root, variant="waterbird95")


def test_celeba_official_layout_and_attributes(tmp_path):
  fx.write_celeba(str(tmp_path))
  s = shift.celeb_a(str(tmp_path), image_size=8, train_envs="groups")
  assert s.info["layout"] == "official"
  assert _group_counts(s.train) == list(fx.CELEBA_COUNTS[0])
  assert _group_counts(s.test) == list(fx.CELEBA_COUNTS[2])
  assert s.info["groups"][3] == "blond_hair_male"
  smile = shift.celeb_a(str(tmp_path), image_size=8, target="Smiling",
                        spurious="Male")
  assert smile.info["target"] == "Smiling"
  y = smile.train.y[smile.train.valid]
  assert 0 < y.mean() < 1  # Smiling on every 3rd image.
  os.remove(tmp_path / "list_eval_partition.txt")
  with pytest.raises(jirm.data.DataError, match="list_eval_partition.txt"):
    shift.celeb_a(str(tmp_path), layout="official")


def test_celeba_tfds_layout(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)

  def make(split):
    n = {"train": 12, "validation": 4, "test": 8}[split]
    rows = []
    for i in range(n):
      attrs = {a: bool(rng.integers(2)) for a in fx.CELEBA_ATTRS}
      attrs["Blond_Hair"], attrs["Male"] = bool(i % 2), bool(i // 2 % 2)
      rows.append({"image": np.full((20, 16, 3), 100 + i, np.uint8),
                   "attributes": attrs})
    return rows

  class Source(list):  # The batched-read API of tfds data sources.
    def __getitems__(self, idx):
      return [self[i] for i in idx]

  def as_data_source_fn(builder, split, **kwargs):
    del builder, kwargs
    return Source(make(split))

  with tfds.testing.mock_data(as_data_source_fn=as_data_source_fn):
    s = shift.celeb_a(str(tmp_path), layout="tfds", image_size=8)
  assert s.info["layout"] == "tfds"
  assert s.train.x.shape == (1, 12, 8, 8, 3)
  assert _group_counts(s.test) == [2, 2, 2, 2]


def test_coco_rle_and_polygon_masks():
  m = np.zeros((7, 9), np.uint8)
  m[2:5, 3:8] = 1
  m[6, 0] = 1
  counts = fx.mask_to_rle_counts(m)
  np.testing.assert_array_equal(shift._decode_rle(counts, 7, 9), m)  # pylint: disable=protected-access
  np.testing.assert_array_equal(
      shift._decode_rle(fx.rle_string(counts), 7, 9), m)  # pylint: disable=protected-access
  big = [int(v) for v in np.random.default_rng(0).integers(1, 300, 40)]
  s = fx.rle_string(big)
  assert shift._decode_rle(s, 1, sum(big)).sum() == sum(big[1::2])  # pylint: disable=protected-access
  poly = shift.ann_to_mask({"segmentation": [[1, 1, 6, 1, 6, 4, 1, 4]]}, 7, 9)
  assert poly[2, 3] == 1 and poly[6, 8] == 0


def test_colored_object_construction(tmp_path):
  fx.write_coco(str(tmp_path))
  classes = ((("truck", 4, 2),), (("dog", 4, 2),))
  s = shift.colored_object(str(tmp_path), classes=classes, image_size=16,
                           cons=(1.0, 0.0, 1.0), label_noise=0.0)
  assert _group_counts(s.train) == [4, 4]  # 2 per category per env.
  assert bool(np.all(s.train.agree[0])) and not np.any(s.train.agree[1])
  # Background = 0.75 * colour / 255 away from the object (corner pixel).
  grey, green = 0.75 * 128 / 255, 0.75 * np.array([0, 128, 0]) / 255
  x0 = s.train.x[0][s.train.y[0] == 0][0]  # vehicle, agreeing: grey.
  np.testing.assert_allclose(x0[-1, -1], [grey] * 3, atol=1e-6)
  x1 = s.train.x[0][s.train.y[0] == 1][0]  # animal, agreeing: green.
  np.testing.assert_allclose(x1[-1, -1], green, atol=1e-6)
  # The object (red in the fake images) is pasted in the centre.
  assert x0[8, 8, 0] > 0.6 and x0[8, 8, 1] < 0.3
  assert _group_counts(s.test) == [0, 2, 0, 2]
  # Too few images with a large enough object: a clear error.
  with pytest.raises(jirm.data.DataError, match=r"bus.*only 0 of 5 .*env 2"):
    shift.colored_object(str(tmp_path), classes=((("bus", 6, 5),),
                                                 (("cat", 2, 1),)))
  noisy = shift.colored_object(str(tmp_path), classes=classes, seed=1,
                               label_noise=0.5, image_size=8)
  assert noisy.info["label_noise"] == 0.5


def test_group_dro_weights_follow_the_worst_group():
  game = games.group_dro(eta=0.5)
  st = game.init(None, None, 4, 3)
  np.testing.assert_allclose(st.q, [1 / 3] * 3)
  logits = np.zeros((3, 4, 1), np.float32)
  y = np.array([[0] * 4, [1] * 4, [0] * 4])
  logits[0] = 2.0
  out = jirm.Outputs(jax.numpy.asarray(logits), jax.numpy.asarray(y),
                     jax.numpy.ones((3, 4)), task="binary")
  risks = np.asarray(jirm.env_risks(out))
  st2, _ = game.inner(st, None, out, False)
  expect = np.exp(0.5 * risks) / np.exp(0.5 * risks).sum()
  np.testing.assert_allclose(st2.q, expect, rtol=1e-6)
  assert np.argmax(st2.q) == np.argmax(risks) == 0
  value = games.group_dro_term.value(out._replace(state=st2))
  assert float(value) == pytest.approx(float((expect * risks).sum()),
                                       rel=1e-6)


# ipg_group_dro (groups, GroupDRO term, IPG step, group pairs); every
# shift method through the experiment: tests/test_goldens_resnet.py.
@pytest.mark.parametrize("method", ["ipg_group_dro"])
def test_three_steps_on_fake_waterbirds(wb_root, method):
  splits = shift.waterbirds(
      wb_root, image_size=16,
      train_envs="groups" if "group_dro" in method else "pooled")
  model = models.deep_model("tiny", head="linear")
  name = "group_dro" if "group_dro" in method else "erm"
  objective, game = deep.build_method(name, eta=0.1)
  factory = None
  if method.startswith("ipg"):
    pairs = ipg.group_pairs(splits.train, num_pairs=6)
    assert pairs.x.shape[:2] == (6, 2)
    assert np.all(pairs.y[:3] == 0) and np.all(pairs.y[3:] == 1)
    factory = ipg.deep_step_factory(pairs, threshold=0.0, pair_batch=4)
  method = deep.deep_method(model, objective, optax.adam(1e-3),
                            batch_size=2, task=splits.task, game=game,
                            step_factory=factory)
  res = jirm.fit(splits, method, steps=3, eval_every=1, seed=0,
                 eval_chunk=500)
  sel = res.selections["last"]
  assert set(sel["group_acc"]) == {f"test:{g}" for g in
                                   shift.WATERBIRDS_GROUPS}
  assert sel["worst_group_acc"] <= sel["avg_acc"] + 1e-9
  assert sel["avg_acc"] == pytest.approx(np.mean(list(
      sel["group_acc"].values())))  # Equal group sizes in the fake test set.
  assert "val_worst_group" in res.selections
  assert np.all(np.isfinite(res.history["total"]))
  if "group_dro" in method:
    assert np.all(np.isfinite(res.history["term/group_dro"]))


def test_group_pairs_need_both_attribute_values(wb_root):
  w100 = shift.waterbirds(wb_root, image_size=8, variant="waterbird100")
  with pytest.raises(ValueError, match="validation envs"):
    ipg.group_pairs(w100.train)
  pairs = ipg.group_pairs(w100.val, num_pairs=4)
  assert pairs.x.shape == (4, 2, 8, 8, 3)


@pytest.mark.parametrize("dataset", ["waterbirds", "celeba",
                                     "colored_object"])
def test_experiment_end_to_end_on_fake_copies(tmp_path, dataset):
  from experiments import shift as shift_exp  # pylint: disable=g-import-not-at-top
  root = str(tmp_path / "data")
  {"waterbirds": fx.write_waterbirds, "celeba": fx.write_celeba,
   "colored_object": fx.write_coco}[dataset](root)
  overrides = ["data.image_size=8"]
  if dataset == "colored_object":
    overrides = []
  out = str(tmp_path / "out")
  # Two methods on Waterbirds (IPG builds group pairs), one on the others
  # (loaders differ only); every method's numbers: test_goldens_resnet.py.
  methods = ["group_dro", "ipg"] if dataset == "waterbirds" else [
      "group_dro"]
  if dataset == "colored_object":  # Its fake copy is built per call: small.
    import unittest.mock as mock  # pylint: disable=g-import-not-at-top
    small = ((("truck", 4, 2),), (("dog", 4, 2),))
    orig = shift.colored_object
    patch = mock.patch.object(
        shift_exp.shift_data, "colored_object",
        lambda root, **kw: orig(root, classes=small, **kw))
  else:
    import contextlib  # pylint: disable=g-import-not-at-top
    patch = contextlib.nullcontext()
  with patch:
    shift_exp.run(dataset, methods, "quick", 1, 0, out, root, overrides,
                  progress=False)
    shift_exp.run(dataset, methods, "quick", 1, 0, out, root, overrides,
                  progress=False)  # Finished restarts are skipped.
  recs = jirm.results.read_jsonl(os.path.join(out, "results.jsonl"))
  assert sorted({r["method"] for r in recs}) == sorted(methods)
  assert len([r for r in recs if r["selection"] == "last"]) == len(methods)
  for r in recs:
    assert 0.0 <= r["worst_group_acc"] <= r["avg_acc"] + 1e-9
  summary = open(os.path.join(out, "summary.md")).read()
  assert "| group_dro | quick | 1 |" in summary
  assert os.path.exists(os.path.join(out, "curves.png"))
