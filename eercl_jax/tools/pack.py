"""Packs FER lists into tensorflow-datasets ArrayRecord sets (the library: data/packed.py).

Every list a run reads (its training list and its evaluation lists, each file once), where a
run with `--config.data.format=packed` looks for them (<config.data.packed_root>/<list stem>):

  python -m eercl_jax.data.pack --config=configs/adapt_expw.py [--config.data.packed_root=...]

Sets already packed, intact (their checksums are read) and stored at the asked size are skipped;
missing, damaged or differently stored ones are (re)built. Each set is written aside and renamed
when complete: an interrupted command leaves no partial set, and rerunning it goes on with the
lists not yet done. One line per list on stdout (packed / already packed / repacked).

One list:

  python -m eercl_jax.data.pack --list=data/txt/fer/unlabeled_target_images_expw_0.txt \
      --image_root=data/fer --out=data/packed/unlabeled_target_images_expw_0 [--resize=256]

By default the pixels keep their original size (lossless: the packed batches equal the folder
path's bit for bit, for every view, and the set serves any config.data.resize). `--resize=R`
stores each image square-resized to R x R with the views' own resize (faster to read; the strong
views then start from the stored image); with --config, `--resize=config` takes
config.data.resize (docs/data.md#packed-lists).
"""
from __future__ import annotations

import os
import sys

from absl import app, flags

from eercl_jax.tools import cli


def _resize(value: str | None, config) -> int | None:
  """--resize: '' / 'original' -> None (lossless), 'config' -> config.data.resize, else R."""
  if value in (None, "", "original", "none"):
    return None
  if value == "config":
    if config is None:
      cli.fail("--resize=config needs --config")
    if config.data.resize is None:
      cli.fail("--resize=config: config.data.resize is not set (an adaptation config leaves "
               "it to its source checkpoint): pass --resize=R or --config.data.resize=R")
    return int(config.data.resize)
  try:
    size = int(value)
  except ValueError:
    size = 0
  if size <= 0:
    cli.fail(f"--resize={value!r}: expected a positive size in pixels, 'original' or 'config'")
  return size


def _progress(stem: str):
  """A progress bar of one set on stderr, `update(done, total)` (tqdm on a terminal; silent in
  a batch log, where the line per list says what was done)."""
  try:
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  bar = None

  def update(done: int, total: int) -> None:
    nonlocal bar
    if bar is None:
      bar = tqdm(total=total, desc=stem, unit="img", file=sys.stderr, disable=None, leave=False)
    bar.update(done - bar.n)
    if done >= total:
      bar.close()
  return update


def pack_config(config, resize: int | None, overwrite: bool) -> None:
  """Every list of the config's run, where its packed format looks; a line per list."""
  # pylint: disable=import-outside-toplevel
  from eercl_jax.data import run_lists
  run_lists.prepare(config.data)   # a demo config's built-in synthetic set
  size = "original size" if resize is None else f"{resize}x{resize}"
  for done in run_lists.pack_run_lists(config.data, resize, overwrite=overwrite,
                                       progress=_progress):
    detail = f"{done['count']} images, {size}"
    if done["outcome"] == "repacked":
      detail += f"; it was: {cli.one_line(done['reason'])}"
    print(f"{done['outcome']}: {done['list']} -> {done['packed_dir']} ({detail})", flush=True)


def main(argv) -> None:
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  config = f.config
  single = [name for name in ("list", "image_root", "out") if f[name].value is not None]
  if config is not None and single:
    cli.fail(f"--config packs the lists of the config's run: drop --{', --'.join(single)}")
  if config is None and len(single) != 3:
    cli.fail("give --config=configs/X.py (every list of its run), or --list, --image_root and "
             "--out (one list)")
  resize = _resize(f.resize, config)
  # pylint: disable=import-outside-toplevel
  from eercl_jax import config_defaults
  from eercl_jax.data import packed
  try:
    with cli.user_errors():
      if config is not None:
        pack_config(config, resize, f.overwrite)
        return
      class_names = (tuple(f.class_names.split(",")) if f.class_names
                     else config_defaults.FER_CLASSES)
      out = packed.pack_list(f.list, f.image_root, f.out, class_names, resize,
                             allow_outside_root=f.allow_outside_root, overwrite=f.overwrite,
                             progress=_progress(os.path.basename(os.path.normpath(f.out))))
  except KeyboardInterrupt:
    # The set being written is removed (pack_list); the finished ones stay.
    cli.fail("interrupted: the set being packed was removed; rerun the same command to go on",
             code=130)
  print(out, flush=True)


def run() -> None:
  # Flags defined here, not at import, so tests and other entry points can import this module.
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  config = config_flags.DEFINE_config_file(
      "config", None, "Pack every list of this config's run into config.data.packed_root.",
      lock_config=True)
  flags.DEFINE_string("list", None, "One FER list file (`relative/path label` lines).")
  flags.DEFINE_string("image_root", None, "Folder the list's paths are relative to.")
  flags.DEFINE_string("out", None, "Output folder of the one list's packed set.")
  flags.DEFINE_string("resize", None, "Store each image square-resized to this size; "
                      "'config': config.data.resize; default: original size, lossless.")
  flags.DEFINE_string("class_names", None, "One list: comma-separated class names in label "
                      "order (default: the configs').")
  flags.DEFINE_bool("overwrite", False, "Replace existing output folders (with --config: "
                    "repack every list, even intact sets).")
  flags.DEFINE_bool("allow_outside_root", False, "One list: allow paths that are absolute or "
                    "climb out of the image root (with --config: config.data.allow_outside_root).")
  # A given --config is loaded as main.py's (cli.parse_flags: a missing file or a misspelt key
  # in one line); without one there is nothing to load.
  app.run(main, flags_parser=lambda argv: cli.parse_flags(
      argv, config if cli.config_arguments(argv)[0] is not None else None))


if __name__ == "__main__":
  run()
