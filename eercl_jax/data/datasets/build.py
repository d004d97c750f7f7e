"""Building the original-layout FER lists from a downloaded data set (the command:
`python -m eercl_jax.data.make_lists`; docs/datasets.md).

Each data set's own label files are read by its reader (this package's modules) in its native
label order and mapped by name to the run's class names. `build_lists` writes, under the lists
folder:

* `labeled_source_images_<domain>.txt`: the source stage's training list (the data set's
  training split by default);
* `unlabeled_target_images_<domain>_0.txt`: the list the configs evaluate on and adapt to (its
  test split by default);
* `<split>_images_<domain>.txt` for each of the data set's own splits;
* `counts_<domain>.md`: images per class per split;

and beside each list its class-order file `<list>.classes.json` (`lists.write_list`), which the
runs check against `config.data.class_names`.

Images stay where they are, except FER2013's pixel rows and face crops, which are written under
`<image_root>/<domain>/`. Every problem (unknown folder, unmapped label, duplicate, missing file,
malformed line, empty face box) is a `DataError` naming the file and line; the written lists are
read back with `lists.read_list` before the build succeeds.
"""
from __future__ import annotations

import collections
import concurrent.futures
import importlib
import os
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from eercl_jax.data import lists
from eercl_jax.data.datasets import common
from eercl_jax.errors import DataError

DATASETS = ("raf", "fer2013", "expw", "ck", "jaffe", "sfew", "affectnet", "folder")
DEFAULT_IMAGE_ROOT = "data/fer"
DEFAULT_LISTS_DIR = "data/txt/fer"
SOURCE_ROLE, TARGET_ROLE = "labeled_source", "unlabeled_target"
_MAX_NAMED = 5


def reader(name: str):
  return importlib.import_module(f"eercl_jax.data.datasets.{name}")


def list_path(lists_dir: str, split: str, domain: str) -> str:
  """The file name the configs use: <split>_images_<domain>.txt (config_defaults.fer_list)."""
  return os.path.join(lists_dir, f"{split}_images_{domain}.txt")


def role_lists(lists_dir: str, domain: str) -> dict[str, str]:
  """The two lists the configs read for a domain: the source stage's training list and the
  evaluation/adaptation list (`unlabeled_target_images_<domain>_0.txt`)."""
  return {SOURCE_ROLE: list_path(lists_dir, SOURCE_ROLE, domain),
          TARGET_ROLE: list_path(lists_dir, TARGET_ROLE, f"{domain}_0")}


def _split_arg(value: str | None, default: Sequence[str], splits: Sequence[str],
               flag: str) -> tuple[str, ...]:
  chosen = tuple(s.strip().lower() for s in value.split(",") if s.strip()) if value else \
      tuple(default)
  if "all" in chosen and "all" not in splits:
    return tuple(splits)
  unknown = [s for s in chosen if s not in splits]
  if unknown or not chosen:
    raise DataError(f"{flag}: {unknown or value!r} not among this data set's splits "
                    f"{list(splits)} (or 'all')")
  return chosen


def _default_roles(mod, splits: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
  source, target = mod.SOURCE_SPLITS, mod.TARGET_SPLITS
  if tuple(splits) != tuple(mod.SPLITS):   # a folder tree with --split_dirs
    source = ("train",) if "train" in splits else ("all",)
    target = next(((s,) for s in ("test", "val") if s in splits), ("all",))
  return source, target


# ------------------------------------------------------------------------------ checks, writing

def _check_items(items: list[common.Item], image_root: str, skip_missing: bool,
                 skipped: collections.Counter, say: Callable[[str], None]) -> list[common.Item]:
  """Paths inside the image root and free of spaces, no duplicates, in-place images present."""
  first = {}
  kept = []
  missing = []
  for item in items:
    path = os.path.normpath(os.path.abspath(item.path))
    rel = os.path.relpath(path, image_root)
    if rel == ".." or rel.startswith(".." + os.sep) or os.path.isabs(rel):
      raise DataError(f"{item.where}: image {path} lies outside the image root {image_root}; "
                      f"put the data set under it (e.g. `ln -s /path/to/dataset "
                      f"{image_root}/<domain>`) or pass --image_root")
    if any(c.isspace() for c in rel):
      raise DataError(f"{item.where}: image path {rel!r} contains white space, which the list "
                      "format ('<path> <label>') cannot hold; rename it")
    # A face is the same face whatever class folder a second label would put its crop in.
    key = (item.crop_from, item.box) if item.crop_from is not None else path
    if key in first:
      raise DataError(f"{item.where}: duplicate of {first[key]}: "
                      f"{path if item.crop_from is None else (item.crop_from, item.box)}")
    first[key] = item.where
    source = item.crop_from if item.crop_from is not None else (
        None if item.pixels is not None else path)
    if source is not None and not os.path.isfile(source):
      if not skip_missing:
        raise DataError(f"{item.where}: missing image {source}")
      missing.append(f"{item.where}: {source}")
      continue
    item.path = path
    kept.append(item)
  if missing:
    skipped["missing image (--skip_missing)"] += len(missing)
    say(f"skipped {len(missing)} missing image(s), e.g.\n  " +
          "\n  ".join(missing[:_MAX_NAMED]))
  return kept


def _save(array: np.ndarray, path: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  im = Image.fromarray(array)
  if path.lower().endswith((".jpg", ".jpeg")):
    im.save(path, quality=95)
  else:
    im.save(path)


def _crop_all(src: str, items: list[common.Item]) -> None:
  """Crops every face of one source image (decoded once). Boxes are (left, top, right, bottom)
  in the stored pixel grid (no EXIF rotation), clipped to the image."""
  try:
    with Image.open(src) as im:
      pixels = np.asarray(im.convert("RGB"))
  except Exception as e:  # pylint: disable=broad-except  (any decode failure names the line)
    raise DataError(f"{items[0].where}: cannot decode {src} ({type(e).__name__}: {e})") from e
  height, width = pixels.shape[:2]
  for item in items:
    left, top, right, bottom = item.box
    l, t, r, b = max(0, left), max(0, top), min(width, right), min(height, bottom)
    if r <= l or b <= t:
      raise DataError(f"{item.where}: face box left={left} top={top} right={right} "
                      f"bottom={bottom} lies outside the {width}x{height} image {src}")
    _save(np.ascontiguousarray(pixels[t:b, l:r]), item.path)


def _write_images(items: list[common.Item], workers: int, say: Callable[[str], None]) -> int:
  jobs = [(lambda it=it: _save(it.pixels, it.path)) for it in items if it.pixels is not None]
  by_source = collections.defaultdict(list)
  for it in items:
    if it.crop_from is not None:
      by_source[it.crop_from].append(it)
  jobs += [(lambda s=s, its=its: _crop_all(s, its)) for s, its in by_source.items()]
  if not jobs:
    return 0
  say(f"writing {sum(it.written for it in items)} images ...")
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    for future in [pool.submit(job) for job in jobs]:
      future.result()
  return sum(it.written for it in items)


def counts_table(class_names: Sequence[str], splits: Sequence[str],
                 counts: dict[str, np.ndarray]) -> str:
  """Markdown table: one row per class (and a total), one column per split (and a total)."""
  total = sum(counts.values())
  head = ["class", *splits, "total"]
  rows = [head, ["---"] + ["---:"] * (len(head) - 1)]
  for i, name in enumerate(class_names):
    rows.append([name, *(str(int(counts[s][i])) for s in splits), str(int(total[i]))])
  rows.append(["**total**", *(str(int(counts[s].sum())) for s in splits), str(int(total.sum()))])
  return "\n".join("| " + " | ".join(r) + " |" for r in rows)


# ------------------------------------------------------------------------------ the build

def build_lists(args, class_names: Sequence[str], image_root: str, lists_dir: str,
                say: Callable[[str], None] = print) -> dict[str, str]:
  """Reads the data set `args.dataset` (a reader's options are attributes of `args`) and writes
  its lists; returns {split or role: list path}. `say` receives the progress and the report."""
  mod = reader(args.dataset)
  domain = args.domain or mod.DOMAIN
  if not domain:
    raise DataError(f"{args.dataset}: name the domain with --domain (it names the lists)")
  if any(c.isspace() or c in "/\\" for c in domain):
    raise DataError(f"--domain {domain!r}: no spaces or slashes")
  image_root = os.path.abspath(image_root)
  src = os.path.abspath(args.src or os.path.join(image_root, domain))
  ctx = common.Context(class_names, image_root, domain, keep_contempt=args.keep_contempt)
  # A reader whose splits depend on its options has `splits(args)`; the others a fixed SPLITS.
  splits = tuple(mod.splits(args) if hasattr(mod, "splits") else mod.SPLITS)
  source_default, target_default = _default_roles(mod, splits)
  roles = {SOURCE_ROLE: _split_arg(args.source_splits, source_default, splits,
                                   "--source_splits"),
           TARGET_ROLE: _split_arg(args.target_splits, target_default, splits,
                                   "--target_splits")}

  say(f"{args.dataset}: reading {src}")
  items = mod.read(src, args, ctx)
  if not items:
    raise DataError(f"{src}: no labelled images found")
  items = _check_items(items, image_root, args.skip_missing, ctx.skipped, say)
  _write_images(items, args.workers, say)

  per_split = {s: [] for s in splits}
  for it in items:
    per_split[it.split].append((os.path.relpath(it.path, image_root).replace(os.sep, "/"),
                                ctx.index(it.cls)))
  written = {}
  for split, entries in per_split.items():
    if entries:
      written[split] = list_path(lists_dir, split, domain)
      lists.write_list(written[split], entries, class_names)
  for role, path in role_lists(lists_dir, domain).items():
    entries = [e for s in roles[role] for e in per_split[s]]
    if not entries:
      raise DataError(f"{role} list of {domain}: no images in split(s) {list(roles[role])}")
    lists.write_list(path, entries, class_names)
    written[role] = path

  counts = {}
  for name, path in written.items():   # the lists must read back as the runs will read them
    fl = lists.read_list(path, image_root, class_names, check_images=args.check_images,
                         names_from="--class_names")
    counts[name] = lists.count_per_class(fl)
  shown = [s for s in splits if s in written]
  table = counts_table(class_names, shown, {s: counts[s] for s in shown})
  notes = [f"- `{os.path.basename(written[r])}`: split(s) {', '.join(roles[r])}, "
           f"{int(counts[r].sum())} images" for r in (SOURCE_ROLE, TARGET_ROLE)]
  notes += [f"- `{os.path.basename(written[s])}`: {int(counts[s].sum())} images" for s in shown]
  notes += [f"- left out: {n} x {why}" for why, n in sorted(ctx.skipped.items())]
  report = (f"# {domain} ({args.dataset}): images per class per split\n\n"
            f"Labels index class_names {list(class_names)} (recorded beside each list in "
            f"`<list>{lists.CLASSES_SUFFIX}`); paths are relative to {image_root}.\n\n"
            f"{table}\n\n" + "\n".join(notes) + "\n")
  counts_path = os.path.join(lists_dir, f"counts_{domain}.md")
  with open(counts_path, "w", encoding="utf-8") as f:
    f.write(report)
  say(report + f"\nwrote {len(written)} lists and {counts_path}")
  return written


