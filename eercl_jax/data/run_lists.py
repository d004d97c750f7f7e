"""The lists of a run, from its `config.data`: the built-in synthetic set generated when the config
asks for it (`prepare`), then the training list and the evaluation lists read and checked, each
attached to its packed set when the run reads packed data (`read_run_lists`).

This module sits above lists, images and packed sets in the data package: it only orchestrates
them for the stages, the evaluation mode and the tools (`pack_run_lists`: every list of a run
packed where `data.format='packed'` looks for it).
"""
from __future__ import annotations

import os
from typing import Callable, Iterator, Optional

from absl import logging

from eercl_jax.data import lists, packed
from eercl_jax.data.datasets import synthetic
from eercl_jax.errors import ConfigError, DataError


def prepare(data_config) -> None:
  """Generates the built-in synthetic set under `data.synthetic.root` if the config enables it
  and no complete copy with the same parameters is there (process 0 writes; the others wait)."""
  # pylint: disable=import-outside-toplevel
  import jax
  from jax.experimental import multihost_utils
  s = data_config.synthetic
  if not s.enabled:
    return
  if jax.process_index() == 0:
    synthetic.ensure_generated(s.root, **{k: v for k, v in s.items()
                                          if k not in ("enabled", "root")})
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("synthetic data generated")


def read_list(path: str, data_config,
              names_from: str = "config.data.class_names") -> lists.FerList:
  """One list of the run with the run's checks (its class-order file against
  `data.class_names`, named `names_from` in the messages); attached to its packed set when
  `data.format='packed'` (the packed set holds the pixels, checked against the list, so the
  image files are not looked at)."""
  d = data_config
  packed_format = d.format == "packed"
  fl = lists.read_list(path, d.image_root, tuple(d.class_names),
                       check_images="none" if packed_format else d.check_images,
                       skip_bad_images=d.skip_bad_images,
                       allow_outside_root=d.allow_outside_root, names_from=names_from)
  if packed_format:
    fl = packed.attach(fl, d.packed_root, d.resize, verify=d.get("verify_packed", True))
  return fl


def read_run_lists(data_config) -> tuple[lists.FerList, dict[str, lists.FerList]]:
  """The training list and the evaluation lists ({name: list}) of a run's `config.data`, each
  validated (with its images) before any training starts."""
  d = data_config
  train = read_list(d.train_list, d)
  evals = {name: read_list(path, d) for name, path in d.eval_lists.items()}
  for name, fl in [("train", train), *evals.items()]:
    logging.info("list %s: %s (%d images, %d skipped)%s", name, fl.list_path, len(fl),
                 fl.num_skipped, f", packed in {fl.packed_dir}" if fl.packed_dir else "")
  return train, evals


# ---------------------------------------------------------------------------------- packing

def run_list_files(data_config) -> list[str]:
  """The list files a run reads, each once: the training list, then the evaluation lists."""
  d = data_config
  seen, out = set(), []
  for path in [d.train_list, *d.eval_lists.values()]:
    if os.path.abspath(path) not in seen:
      seen.add(os.path.abspath(path))
      out.append(path)
  return out


def repack_reason(fer_list: lists.FerList, packed_dir: str, resize: Optional[int]) -> str | None:
  """Why the set at `packed_dir` must be (re)built for `fer_list` stored at `resize` (None:
  original size), or None when it is complete, intact (checksums included) and stored so. A
  non-empty folder that is not a packed set is an error (it is not ours to replace)."""
  if not os.path.isdir(packed_dir) or not os.listdir(packed_dir):
    return "not packed yet"
  if not os.path.isfile(os.path.join(packed_dir, packed.META_FILE)):
    raise FileExistsError(f"{packed_dir} is not empty and holds no packed set (no "
                          f"{packed.META_FILE}): move it away, or pass --overwrite")
  try:
    meta = packed.check(fer_list, packed_dir, None, verify=True)
  except DataError as e:
    return str(e)
  if meta["stored_size"] != resize:
    show = lambda size: "original size" if size is None else f"{size}x{size}"
    return f"stored at {show(meta['stored_size'])}, asked for {show(resize)}"
  return None


def pack_run_lists(data_config, resize: Optional[int], *, overwrite: bool = False,
                   progress: Callable[[str], Callable[[int, int], None] | None] | None = None,
                   ) -> Iterator[dict]:
  """Packs every list a run of `data_config` reads into `<data.packed_root>/<list file stem>`,
  stored at `resize` (None: original size), skipping the sets already complete, intact and
  stored so, rebuilding the others (each set is written aside and renamed when complete, so an
  interrupted call leaves the finished sets and no partial one: a rerun goes on with the rest).
  `progress(stem)` gives the `(done, total)` callback of one set (packed.pack_list). Yields one
  {'list', 'packed_dir', 'outcome': 'packed'|'already packed'|'repacked', 'reason', 'count'}
  per list as it is done."""
  d = data_config
  files = run_list_files(d)
  targets = {}
  for path in files:
    out = packed.packed_dir_for(path, d.packed_root)
    if out in targets:
      raise ConfigError(f"the lists {targets[out]} and {path} would both be packed into {out} "
                        "(a set is named by its list's file name): rename one")
    targets[out] = path
  for out, path in targets.items():
    # As a run with data.format='packed' reads it (the images are checked by the pack itself).
    fl = lists.read_list(path, d.image_root, tuple(d.class_names), check_images="none",
                         allow_outside_root=d.allow_outside_root,
                         names_from="config.data.class_names")
    existed = os.path.isdir(out) and bool(os.listdir(out))
    reason = "--overwrite" if overwrite and existed else repack_reason(fl, out, resize)
    entry = {"list": path, "packed_dir": out, "count": len(fl), "reason": reason}
    if reason is None:
      yield {**entry, "outcome": "already packed"}
      continue
    packed.pack_list(path, d.image_root, out, tuple(d.class_names), resize,
                     allow_outside_root=d.allow_outside_root, overwrite=True,
                     names_from="config.data.class_names",
                     progress=None if progress is None else progress(os.path.basename(out)))
    yield {**entry, "outcome": "repacked" if existed else "packed"}
