"""Real-world shift datasets read from the user's copy: Waterbirds (and the
fully correlated Waterbird-100), CelebA (tfds ``celeb_a`` or the official
txt layout) and ColoredObject built from COCO 2017 annotations as BIRM does.

Every loader returns :class:`jirm.data.EnvSplits` whose *evaluation* splits
(val, test) have one environment per group (label x spurious attribute), so
per-env accuracy is per-group accuracy: :func:`jirm.selection.select` adds
``worst_group_acc``, ``avg_acc`` (sample-weighted) and ``group_acc`` to
every selection and the ``val_worst_group`` rule. Training envs are the
groups (``train_envs='groups'``: GroupDRO, IRM penalties) or one pooled env
(``'pooled'``: ERM's natural distribution, IPG). Group id = 2 * y + a for a
binary label y and binary spurious attribute a; ``info['groups']`` names
them.

Images are resized to ``image_size`` (PIL, bilinear with antialiasing) and
held in memory as float32 in [0, 1]; pick the size for the machine (224 is
the literature's ResNet-50 protocol).

Example:
  >>> splits = waterbirds('/data/waterbird_complete95_forest2water2',
  ...                     image_size=64, train_envs='pooled')
  >>> splits.info['groups']
  ('landbird_on_land', 'landbird_on_water', 'waterbird_on_land',
   'waterbird_on_water')
"""

from __future__ import annotations

import csv
import json
import os
from typing import Optional, Sequence

import numpy as np

from jirm.data.envs import DataError, EnvSplits, Envs, stack_envs
from jirm.data.envs import _check_prob, _check_scale, _count


def _check_sizes(image_size, max_per_split) -> None:
  """The size arguments every loader takes, checked before any file is
  read."""
  _count("image_size", image_size, 1, "at least 1", unit="pixels per side")
  if max_per_split is not None:
    _count("max_per_split", max_per_split, 1, "at least 1 (None: all)")


TRAIN_ENVS = ("groups", "pooled")


def _load_images(paths: Sequence[str], size: int) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  out = np.zeros((len(paths), size, size, 3), np.float32)
  for i, p in enumerate(paths):
    try:
      with Image.open(p) as im:
        im = im.convert("RGB").resize((size, size), Image.BILINEAR,
                                      reducing_gap=None)
        out[i] = np.asarray(im, np.float32) / 255.0
    except (OSError, ValueError) as e:
      raise DataError(f"cannot read image {p}: {e}") from e
  return out


def _group_envs(x, y, a, group_names, prefix=""):
  """One env per group (empty groups kept, all padding)."""
  g = 2 * y + a
  xs, ys, agrees = [], [], []
  for k in range(len(group_names)):
    idx = np.flatnonzero(g == k)
    xs.append(x[idx] if len(idx) else np.zeros((0,) + x.shape[1:], x.dtype))
    ys.append(y[idx].astype(np.int32))
    agrees.append(a[idx] == y[idx])
  env = stack_envs(xs, ys, agrees, [prefix + n for n in group_names],
                   [float(k % 2) for k in range(len(group_names))])
  return env


def _pooled_env(x, y, a, name="train"):
  return Envs(x[None], y[None].astype(np.int32), (a == y)[None],
              np.ones((1, len(y)), bool), (name,), (float(np.mean(a != y)),))


def _splits(parts: dict, group_names, train_envs: str, info: dict,
            train=None):
  """``parts[split] = (x, y, a)`` -> EnvSplits with one env per group in the
  evaluation splits; ``train`` (given envs) replaces ``parts['train']``."""
  if train is None and train_envs not in TRAIN_ENVS:
    raise DataError(f"train_envs={train_envs!r}: choose one of {TRAIN_ENVS}.")
  for name in ("test",) if train is not None else ("train", "test"):
    if len(parts[name][1]) == 0:
      raise DataError(f"the {name} split is empty ({info.get('root')}).")
  if train is None and train_envs == "groups":
    x, y, a = parts["train"]  # Non-empty groups only (Waterbird-100 has 2).
    g = 2 * y + a
    keep = [k for k in range(len(group_names)) if np.any(g == k)]
    sel = np.isin(g, keep)
    train = _group_envs(x[sel], y[sel], a[sel], group_names)
    train = train.select(keep) if len(keep) < len(group_names) else train
  elif train is None:
    train = _pooled_env(*parts["train"])
  test = _group_envs(*parts["test"], group_names, "test:")
  val = (_group_envs(*parts["val"], group_names, "val:")
         if len(parts.get("val", ((), ()))[1]) else None)
  counts = {s: [int(np.sum(2 * p[1] + p[2] == k))
                for k in range(len(group_names))]
            for s, p in parts.items()}
  info = dict(info, groups=tuple(group_names), group_counts=counts,
              train_envs=train_envs, group_envs=True)
  return EnvSplits(train=train, test=test, val=val, task="binary", info=info)


def _require(path: str, what: str) -> str:
  if not os.path.exists(path):
    raise DataError(f"{what} not found: {path}. Fix: point the loader at the "
                    f"dataset's root folder (see jirm.data.shift).")
  return path


def _read_csv(path: str, columns: Sequence[str]) -> list:
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  missing = [c for c in columns if rows and c not in rows[0]]
  if not rows or missing:
    raise DataError(f"{path}: missing column(s) {missing or list(columns)}; "
                    f"expected {list(columns)}.")
  return rows


# ----------------------------------------------------------------------------
# Waterbirds (Sagawa et al. 2020; group_DRO / WILDS layout).

WATERBIRDS_GROUPS = ("landbird_on_land", "landbird_on_water",
                     "waterbird_on_land", "waterbird_on_water")
WATERBIRDS_VARIANTS = ("standard", "waterbird100")


def waterbirds(root: str, *, variant: str = "standard", image_size: int = 224,
               train_envs: str = "pooled",
               max_per_split: Optional[int] = None) -> EnvSplits:
  """Waterbirds from ``root/metadata.csv`` + image folders.

  Args:
    root: folder with ``metadata.csv`` (columns ``img_filename``, ``y``
      (1 = waterbird), ``place`` (1 = water), ``split`` (0 train, 1 val,
      2 test)) and the images at ``root/<img_filename>``.
    variant: ``'standard'`` (95% of training birds on their habitat), or
      ``'waterbird100'``: the training split keeps only the majority groups
      (landbirds on land, waterbirds on water), i.e. background and label
      agree on 100% of training images, as in IPG's Waterbird-100; val and
      test are unchanged.
    image_size: side of the square images.
    train_envs: ``'pooled'`` or ``'groups'``.
    max_per_split: keep at most this many images per split (first rows).

  Returns:
    EnvSplits; spurious attribute a = place; groups ``WATERBIRDS_GROUPS``.

  Raises:
    DataError: missing folder / file / column, unknown variant.
  """
  if variant not in WATERBIRDS_VARIANTS:
    raise DataError(f"variant={variant!r}: choose one of "
                    f"{WATERBIRDS_VARIANTS}.")
  _check_sizes(image_size, max_per_split)
  meta = _require(os.path.join(root, "metadata.csv"), "Waterbirds metadata")
  rows = _read_csv(meta, ("img_filename", "y", "place", "split"))
  parts = {}
  for sid, name in enumerate(("train", "val", "test")):
    sel = [r for r in rows if int(r["split"]) == sid]
    if name == "train" and variant == "waterbird100":
      sel = [r for r in sel if int(r["y"]) == int(r["place"])]
    sel = sel[:max_per_split]
    paths = [_require(os.path.join(root, r["img_filename"]), "image")
             for r in sel]
    parts[name] = (_load_images(paths, image_size),
                   np.asarray([int(r["y"]) for r in sel], np.int64),
                   np.asarray([int(r["place"]) for r in sel], np.int64))
  return _splits(parts, WATERBIRDS_GROUPS, train_envs,
                 dict(dataset="waterbirds", variant=variant, root=root,
                      image_size=image_size))


# ----------------------------------------------------------------------------
# CelebA (Liu et al. 2015): tfds ``celeb_a`` or the official txt layout.

CELEBA_LAYOUTS = ("auto", "official", "tfds")


def _celeba_official(root, target, spurious, max_per_split):
  attr = _require(os.path.join(root, "list_attr_celeba.txt"),
                  "CelebA attributes file")
  part = _require(os.path.join(root, "list_eval_partition.txt"),
                  "CelebA partition file")
  img_dir = _require(os.path.join(root, "img_align_celeba"),
                     "CelebA image folder")
  with open(attr) as f:
    lines = f.read().splitlines()
  try:
    names = lines[1].split()
    ti, si = names.index(target), names.index(spurious)
  except (IndexError, ValueError) as e:
    raise DataError(f"{attr}: line 2 must list the 40 attribute names "
                    f"including {target!r} and {spurious!r}.") from e
  labels = {}
  for ln in lines[2:]:
    fields = ln.split()
    if len(fields) != len(names) + 1:
      raise DataError(f"{attr}: row {fields[:1]} has {len(fields) - 1} "
                      f"values, expected {len(names)}.")
    labels[fields[0]] = (int(fields[1 + ti]) > 0, int(fields[1 + si]) > 0)
  with open(part) as f:
    split_of = {}
    for ln in f.read().splitlines():
      if ln.strip():
        fname, s = ln.split()
        split_of[fname] = int(s)
  out = {}
  for sid, name in enumerate(("train", "val", "test")):
    files = [k for k in sorted(split_of) if split_of[k] == sid][:max_per_split]
    missing = [k for k in files if k not in labels]
    if missing:
      raise DataError(f"{part}: {missing[:3]} have no row in {attr}.")
    out[name] = ([os.path.join(img_dir, k) for k in files],
                 np.asarray([labels[k][0] for k in files], np.int64),
                 np.asarray([labels[k][1] for k in files], np.int64))
  return out


def _celeba_tfds(root, target, spurious, max_per_split, image_size):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  out = {}
  for name, split in (("train", "train"), ("val", "validation"),
                      ("test", "test")):
    try:
      src = tfds.data_source("celeb_a", split=split, data_dir=root,
                             download=False)
    except Exception as e:  # pylint: disable=broad-except
      raise DataError(f"prepared tfds celeb_a (split {split}) not found under "
                      f"{root}: {e}") from e
    n = len(src) if max_per_split is None else min(len(src), max_per_split)
    rows = src.__getitems__(list(range(n))) if n else []
    from PIL import Image  # pylint: disable=g-import-not-at-top
    x = np.zeros((n, image_size, image_size, 3), np.float32)
    for i, r in enumerate(rows):
      im = Image.fromarray(np.asarray(r["image"], np.uint8))
      x[i] = np.asarray(im.resize((image_size, image_size), Image.BILINEAR),
                        np.float32) / 255.0
    try:
      y = np.asarray([bool(r["attributes"][target]) for r in rows], np.int64)
      a = np.asarray([bool(r["attributes"][spurious]) for r in rows],
                     np.int64)
    except KeyError as e:
      raise DataError(f"celeb_a has no attribute {e}; names are CelebA's 40 "
                      f"attributes, e.g. 'Blond_Hair', 'Male'.") from e
    out[name] = (x, y, a)
  return out


def celeb_a(root: str, *, target: str = "Blond_Hair", spurious: str = "Male",
            layout: str = "auto", image_size: int = 224,
            train_envs: str = "pooled",
            max_per_split: Optional[int] = None) -> EnvSplits:
  """CelebA with a binary target and a binary spurious attribute.

  Args:
    root: the official layout (``list_attr_celeba.txt``,
      ``list_eval_partition.txt``, ``img_align_celeba/``) or a tfds data dir
      holding a prepared ``celeb_a``.
    target: attribute predicted (default ``Blond_Hair``).
    spurious: attribute defining the groups (default ``Male``).
    layout: ``'official'``, ``'tfds'`` or ``'auto'`` (official if the txt
      files exist).
    image_size, train_envs, max_per_split: as :func:`waterbirds`.

  Returns:
    EnvSplits; groups ``not_<target>_not_<spurious>, ...``.
  """
  if layout not in CELEBA_LAYOUTS:
    raise DataError(f"layout={layout!r}: choose one of {CELEBA_LAYOUTS}.")
  _check_sizes(image_size, max_per_split)
  _require(root, "CelebA root")
  official = os.path.exists(os.path.join(root, "list_attr_celeba.txt"))
  if layout == "official" or (layout == "auto" and official):
    files = _celeba_official(root, target, spurious, max_per_split)
    parts = {k: (_load_images(p, image_size), y, a)
             for k, (p, y, a) in files.items()}
    layout = "official"
  else:
    parts = _celeba_tfds(root, target, spurious, max_per_split, image_size)
    layout = "tfds"
  t, s = target.lower(), spurious.lower()
  groups = (f"not_{t}_not_{s}", f"not_{t}_{s}", f"{t}_not_{s}", f"{t}_{s}")
  return _splits(parts, groups, train_envs,
                 dict(dataset="celeb_a", layout=layout, target=target,
                      spurious=spurious, root=root, image_size=image_size))


# ----------------------------------------------------------------------------
# ColoredObject (BIRM, Lin et al. 2022): COCO objects on coloured backgrounds.

# Super-class -> (COCO category, training images, test images) as in BIRM's
# dataset_scripts/coco_colours_ly2c.py.
COLORED_OBJECT_CLASSES = (
    (("truck", 2000, 300), ("airplane", 1800, 250), ("bus", 2200, 350)),
    (("zebra", 1100, 150), ("dog", 1800, 300), ("horse", 1500, 225),
     ("cat", 1600, 225)),
)
COLORED_OBJECT_COLOURS = np.asarray([[128, 128, 128], [0, 128, 0]],
                                    np.float32)  # grey: vehicles; green.
COLORED_OBJECT_GROUPS = ("vehicle_on_green", "vehicle_on_grey",
                         "animal_on_grey", "animal_on_green")


def _decode_rle(counts, h, w):
  """COCO RLE (list, or the compressed string) -> mask [h, w] (column
  major, as pycocotools)."""
  if isinstance(counts, str):
    vals, p = [], 0
    while p < len(counts):
      x, k, more = 0, 0, True
      while more:
        c = ord(counts[p]) - 48
        x |= (c & 0x1f) << (5 * k)
        more = bool(c & 0x20)
        p += 1
        k += 1
        if not more and (c & 0x10):
          x |= -1 << (5 * k)
      if len(vals) > 2:
        x += vals[-2]
      vals.append(x)
    counts = vals
  flat = np.zeros(h * w, np.uint8)
  pos, val = 0, 0
  for c in counts:
    flat[pos:pos + c] = val
    pos += c
    val ^= 1
  return flat.reshape(w, h).T


def ann_to_mask(ann: dict, h: int, w: int) -> np.ndarray:
  """A COCO annotation's segmentation (polygons or RLE) as a 0/1 mask."""
  seg = ann["segmentation"]
  if isinstance(seg, list):
    from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
    img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(img)
    for poly in seg:
      if len(poly) >= 6:
        draw.polygon([(poly[i], poly[i + 1]) for i in range(0, len(poly), 2)],
                     fill=1)
    return np.asarray(img, np.uint8)
  return _decode_rle(seg["counts"], *seg["size"])


def _resize(arr, size):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  chans = [np.asarray(Image.fromarray(arr[..., c].astype(np.float32),
                                      mode="F").resize((size, size),
                                                       Image.BILINEAR))
           for c in range(arr.shape[-1])]
  return np.stack(chans, -1)


def colored_object(coco_root: str, *, seed: int = 0,
                   cons: Sequence[float] = (0.999, 0.7, 0.1),
                   label_noise: float = 0.05, image_size: int = 32,
                   classes=COLORED_OBJECT_CLASSES, min_area: float = 10_000,
                   split_file: str = "instances_train2017.json") -> EnvSplits:
  """ColoredObject as BIRM builds it from COCO 2017.

  For each category of each super-class (vehicles y = 0, animals y = 1) the
  images containing it are visited in annotation order; the category's
  largest annotation must have area >= ``min_area`` px (else the image is
  skipped). The label flips with ``label_noise``; with probability
  ``cons[e]`` the background colour is the (noisy) label's colour (grey for
  vehicles, green for animals), else the other one; background =
  0.75 * colour / 255. The object (mask of that annotation) is pasted on the
  background, both resized to ``image_size``. Two training envs of
  ``train // 2`` images per category with ``cons[0]``, ``cons[1]``, then a
  test env with ``cons[2]``; as in BIRM, test labels are the clean labels
  (the background follows the noisy one).

  Args:
    coco_root: folder with ``annotations/<split_file>`` and ``train2017/``.
    seed: numpy seed of the noise and colours.
    cons: colour-label agreement of train env 1, train env 2, test.
    label_noise: label flip probability.
    image_size: output side (BIRM: 32 for the paper's tables).
    classes: ``((category, n_train, n_test), ...)`` per super-class.
    min_area: minimum area of the largest object.
    split_file: annotation file.

  Returns:
    EnvSplits: train envs ``cons[0]``, ``cons[1]``; test split per group.

  Raises:
    DataError: missing files, or too few qualifying images of a category.
  """
  _check_sizes(image_size, None)
  if len(cons) != 3:
    raise DataError(f"cons={tuple(cons)!r}: give 3 agreements (train env 1, "
                    f"train env 2, test).")
  for i, c in enumerate(cons):
    _check_prob(f"cons[{i}]", c)
  _check_prob("label_noise", label_noise)
  _check_scale("min_area", min_area)
  for members in classes:
    for name, n_train, n_test in members:
      _count(f"classes[{name!r}] n_train", n_train, 2,
             "at least 2 (one per training environment)")
      _count(f"classes[{name!r}] n_test", n_test, 0, "at least 0")
  ann_path = _require(os.path.join(coco_root, "annotations", split_file),
                      "COCO annotations")
  img_dir = _require(os.path.join(coco_root, "train2017"), "COCO image folder")
  with open(ann_path) as f:
    coco = json.load(f)
  for key in ("images", "annotations", "categories"):
    if key not in coco:
      raise DataError(f"{ann_path}: no '{key}' list (not a COCO instances "
                      f"file).")
  cat_id = {c["name"]: c["id"] for c in coco["categories"]}
  images = {im["id"]: im for im in coco["images"]}
  anns_by_img_cat = {}
  for a in coco["annotations"]:
    anns_by_img_cat.setdefault((a["image_id"], a["category_id"]), []).append(a)
  rng = np.random.RandomState(seed)
  from PIL import Image  # pylint: disable=g-import-not-at-top

  def compose(im, cid, label, agree_p):
    anns = anns_by_img_cat[(im["id"], cid)]
    ann = max(anns, key=lambda a: a["area"])
    if ann["area"] < min_area:
      return None
    path = os.path.join(img_dir, im["file_name"])
    if not os.path.exists(path):
      return None
    with Image.open(path) as pim:
      arr = np.asarray(pim.convert("RGB"), np.float32) / 255.0
    noisy = 1 - label if rng.random_sample() < label_noise else label
    colour_idx = noisy if rng.random_sample() <= agree_p else 1 - noisy
    mask = _resize(ann_to_mask(ann, arr.shape[0], arr.shape[1])[..., None]
                   .astype(np.float32), image_size)
    img = _resize(arr, image_size)
    bg = 0.75 * COLORED_OBJECT_COLOURS[colour_idx] / 255.0
    return img * mask + bg * (1 - mask), noisy, colour_idx

  env_data = [[[], [], []] for _ in range(3)]  # x, y, colour per env.
  for label, members in enumerate(classes):
    for name, n_train, n_test in members:
      if name not in cat_id:
        raise DataError(f"{ann_path}: no category {name!r}.")
      cid = cat_id[name]
      img_ids = sorted({i for (i, c) in anns_by_img_cat if c == cid})
      it = iter(img_ids)
      quotas = [(0, n_train // 2, cons[0]), (1, n_train // 2, cons[1]),
                (2, n_test, cons[2])]
      for env, quota, p in quotas:
        got = 0
        while got < quota:
          try:
            im = images[next(it)]
          except StopIteration as e:
            raise DataError(f"category {name!r}: only {got} of {quota} "
                            f"images with an object >= {min_area:g} px for "
                            f"env {env}; lower the counts in classes= or "
                            f"min_area.") from e
          made = compose(im, cid, label, p)
          if made is None:
            continue
          x, noisy, colour = made
          env_data[env][0].append(x)
          env_data[env][1].append(label if env == 2 else noisy)
          env_data[env][2].append(colour)
          got += 1

  def arrays(k):
    x, y, c = env_data[k]
    return (np.stack(x).astype(np.float32), np.asarray(y, np.int64),
            np.asarray(c, np.int64))

  # Group = 2 * y + a with a = 1 when the background is the label's colour.
  parts = {}
  for k, name in enumerate(("train0", "train1", "test")):
    x, y, c = arrays(k)
    parts[name] = (x, y, (c == y).astype(np.int64))
  tr0, tr1 = parts["train0"], parts["train1"]
  train = stack_envs([tr0[0], tr1[0]], [tr0[1].astype(np.int32),
                                        tr1[1].astype(np.int32)],
                     [tr0[2] == 1, tr1[2] == 1],
                     [f"cons={cons[0]}", f"cons={cons[1]}"], cons[:2])
  info = dict(dataset="colored_object", seed=seed, cons=list(cons),
              label_noise=label_noise, image_size=image_size, root=coco_root)
  return _splits(parts, COLORED_OBJECT_GROUPS, "given", info, train=train)
