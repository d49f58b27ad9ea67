"""Tiny copies of the real on-disk formats of Waterbirds (group_DRO / WILDS
metadata.csv layout), CelebA (official txt layout) and COCO 2017 instances
annotations, with known groups. Used by tests/test_shift.py."""

import json
import os

import numpy as np
from PIL import Image

CELEBA_ATTRS = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs "
    "Big_Lips Big_Nose Black_Hair Blond_Hair Blurry Brown_Hair "
    "Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair "
    "Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache "
    "Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose Receding_Hairline "
    "Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings "
    "Wearing_Hat Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young"
).split()

# Images per (split, group) with group = 2 * y + a.
WATERBIRDS_COUNTS = {0: (12, 2, 2, 12), 1: (3, 3, 3, 3), 2: (4, 4, 4, 4)}
CELEBA_COUNTS = {0: (10, 6, 3, 1), 1: (2, 2, 2, 2), 2: (3, 3, 3, 3)}


def _save(path, rgb, size=(24, 20), rng=None, patch=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  img = np.zeros(size[::-1] + (3,), np.int16) + np.asarray(rgb, np.int16)
  if patch is not None:
    h, w = size[1] // 4, size[0] // 4
    img[h:3 * h, w:3 * w] = patch
  if rng is not None:
    img = img + rng.integers(-40, 41, img.shape)
  Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)


def write_waterbirds(root, texture_seed=None):
  """metadata.csv + <species>/<file>.jpg; background colour = place.

  Args:
    root: directory to write into.
    texture_seed: None = flat images (one colour per place); an int adds a
      centre patch coloured by species and per-pixel noise, so that no
      feature of a small ResNet has near-zero variance over a batch (the
      golden trajectories need that: BatchNorm divides by sqrt(var + eps)).
  """
  rng = None if texture_seed is None else np.random.default_rng(texture_seed)
  rows = ["img_id,img_filename,y,split,place,place_filename"]
  k = 0
  for split, counts in WATERBIRDS_COUNTS.items():
    for g, n in enumerate(counts):
      y, place = g // 2, g % 2
      for _ in range(n):
        k += 1
        name = f"{'water' if y else 'land'}bird/{k:04d}.jpg"
        _save(os.path.join(root, name), (0, 90, 200) if place else
              (40, 160, 40), rng=rng,
              patch=None if rng is None else ((220, 200, 60) if y else
                                              (120, 60, 30)))
        rows.append(f"{k},{name},{y},{split},{place},/x/{k}.jpg")
  with open(os.path.join(root, "metadata.csv"), "w") as f:
    f.write("\n".join(rows) + "\n")


def write_celeba(root):
  """list_attr_celeba.txt (-1/1), list_eval_partition.txt, images."""
  bi, mi = CELEBA_ATTRS.index("Blond_Hair"), CELEBA_ATTRS.index("Male")
  si = CELEBA_ATTRS.index("Smiling")
  attr_rows, part_rows = [], []
  k = 0
  rng = np.random.default_rng(0)
  for split, counts in CELEBA_COUNTS.items():
    for g, n in enumerate(counts):
      for _ in range(n):
        k += 1
        name = f"{k:06d}.jpg"
        vals = rng.choice([-1, 1], len(CELEBA_ATTRS))
        vals[bi] = 1 if g // 2 else -1
        vals[mi] = 1 if g % 2 else -1
        vals[si] = 1 if k % 3 == 0 else -1
        attr_rows.append(name + " " + " ".join(f"{v:2d}" for v in vals))
        part_rows.append(f"{name} {split}")
        _save(os.path.join(root, "img_align_celeba", name),
              (230, 200, 80) if g // 2 else (60, 40, 30), size=(18, 22))
  with open(os.path.join(root, "list_attr_celeba.txt"), "w") as f:
    f.write(f"{len(attr_rows)}\n" + " ".join(CELEBA_ATTRS) + "\n" +
            "\n".join(attr_rows) + "\n")
  with open(os.path.join(root, "list_eval_partition.txt"), "w") as f:
    f.write("\n".join(part_rows) + "\n")


def rle_string(counts):
  """COCO's compressed RLE string (pycocotools rleToString)."""
  out = []
  for i, x in enumerate(counts):
    x = int(x)
    if i > 2:
      x -= int(counts[i - 2])
    more = True
    while more:
      c = x & 0x1f
      x >>= 5
      more = (x != -1) if (c & 0x10) else (x != 0)
      if more:
        c |= 0x20
      out.append(chr(c + 48))
  return "".join(out)


def mask_to_rle_counts(mask):
  flat = mask.T.reshape(-1)  # Column major, as COCO.
  counts, cur, run = [], 0, 0
  for v in flat:
    if v != cur:
      counts.append(run)
      run, cur = 0, v
    run += 1
  counts.append(run)
  return counts


COCO_CATS = (("truck", 8), ("airplane", 5), ("bus", 6), ("zebra", 24),
             ("dog", 18), ("horse", 19), ("cat", 17))


def write_coco(root, per_cat=8, size=(160, 120)):
  """annotations/instances_train2017.json + train2017/*.jpg. Every image has
  one large object (a rectangle, area 110*90 = 9900 + ... >= 10,000 px, as a
  polygon or compressed RLE) and a small one; every 4th image's largest
  object is too small (area < 10,000) and must be skipped."""
  w, h = size
  images, anns = [], []
  k = 0
  for name, cid in COCO_CATS:
    for j in range(per_cat):
      k += 1
      fname = f"{k:012d}.jpg"
      _save(os.path.join(root, "train2017", fname), (200, 30, 30), size=size)
      images.append({"id": k, "file_name": fname, "width": w, "height": h})
      big = j % 4 != 3
      x0, y0, bw, bh = (20, 10, 120, 100) if big else (30, 30, 50, 40)
      if j % 2:
        m = np.zeros((h, w), np.uint8)
        m[y0:y0 + bh, x0:x0 + bw] = 1
        seg = {"size": [h, w], "counts": rle_string(mask_to_rle_counts(m))}
        crowd = 1
      else:
        seg = [[x0, y0, x0 + bw, y0, x0 + bw, y0 + bh, x0, y0 + bh]]
        crowd = 0
      anns.append({"id": 10 * k, "image_id": k, "category_id": cid,
                   "segmentation": seg, "area": float(bw * bh),
                   "bbox": [x0, y0, bw, bh], "iscrowd": crowd})
      anns.append({"id": 10 * k + 1, "image_id": k, "category_id": cid,
                   "segmentation": [[0, 0, 10, 0, 10, 10, 0, 10]],
                   "area": 100.0, "bbox": [0, 0, 10, 10], "iscrowd": 0})
  cats = [{"id": cid, "name": n, "supercategory": "x"} for n, cid in COCO_CATS]
  os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
  with open(os.path.join(root, "annotations", "instances_train2017.json"),
            "w") as f:
    json.dump({"images": images, "annotations": anns, "categories": cats}, f)
