"""Packs FER lists into tensorflow-datasets ArrayRecord sets (the library: data/packed.py).

Every list a run reads (its training list and its evaluation lists, each file once), where a
run with `--config.data.format=packed` looks for them (<config.data.packed_root>/<list stem>):

  python -m eercl_jax.data.pack --config=configs/adapt_expw.py [--config.data.packed_root=...]

Sets already packed, intact (their checksums are read) and stored at the asked size are skipped;
missing, damaged or differently stored ones are (re)built. Each set is written aside and renamed
when complete: an interrupted command leaves no partial set, and rerunning it goes on with the
lists not yet done. One line per list on stdout (packed / already packed / repacked), a progress
bar per set on a terminal. The class names are config.data.class_names (checked against each
list's class-order file).

One list:

  python -m eercl_jax.data.pack --list=data/txt/fer/unlabeled_target_images_expw_0.txt \\
      --image_root=data/fer --out=data/packed/unlabeled_target_images_expw_0 [--resize=256]

The class names come from --class_names, else the list's class-order file
(<list>.classes.json), else the configs' default; they are recorded in the set and checked by
the runs. By default the pixels keep their original size (lossless: the packed batches equal the
folder path's bit for bit, for every view, and the set serves any config.data.resize).
`--resize=R` stores each image square-resized to R x R with the views' own resize (faster to
read; the strong views then start from the stored image); with --config, `--resize=config` takes
config.data.resize (docs/data.md#packed-lists).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from eercl_jax import config_defaults, constants
from eercl_jax.data import lists, packed, run_lists
from eercl_jax.errors import ConfigError, UserError
from eercl_jax.tools import cli


def _resize(value: str | None, config) -> int | None:
  """--resize: '' / 'original' -> None (lossless), 'config' -> config.data.resize, else R."""
  if value in (None, "", "original", "none"):
    return None
  if value == "config":
    if config is None:
      raise UserError("--resize=config needs --config")
    if config.data.resize is None:
      raise ConfigError("--resize=config: config.data.resize is not set (an adaptation config "
                        "leaves it to its source checkpoint): pass --resize=R or "
                        "--config.data.resize=R")
    return int(config.data.resize)
  try:
    size = int(value)
  except ValueError:
    size = 0
  if size <= 0:
    raise UserError(f"--resize={value!r}: expected a positive size in pixels, 'original' or "
                    "'config'")
  return size


def _load_config(path: str, overrides: Sequence[str]):
  """The config `path` (`file.py[:argument]`) with its `--config.x.y=v` overrides, loaded as
  main.py loads it (config_flags, on flags of its own: this command parses with argparse); a
  missing file or a misspelt key is a ConfigError in one line."""
  # pylint: disable=import-outside-toplevel
  from absl import flags
  from ml_collections import config_flags
  missing = cli.missing_file_message(path)
  if missing:
    raise ConfigError(missing)
  cli.import_configs_beside(path)
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "the run's config",
                                           flag_values=values, lock_config=True)
  try:
    values(["pack", f"--config={path}", *overrides])
    config = holder.value
    config.keys()   # a file that failed to load raises on any access
  except Exception as e:  # pylint: disable=broad-except
    keys = [o[len("--config."):].split("=", 1)[0] for o in overrides]
    try:
      message = cli.unknown_key_message(cli.load_config_file(path), keys)
    except Exception:  # pylint: disable=broad-except
      message = None
    raise ConfigError(message or cli.one_line(f"--config={path}: {type(e).__name__}: {e}")) \
        from None
  return config


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
  run_lists.prepare(config.data)   # a demo config's built-in synthetic set
  size = "original size" if resize is None else f"{resize}x{resize}"
  for done in run_lists.pack_run_lists(config.data, resize, overwrite=overwrite,
                                       progress=_progress):
    detail = f"{done['count']} images, {size}"
    if done["outcome"] == "repacked":
      detail += f"; it was: {cli.one_line(done['reason'])}"
    print(f"{done['outcome']}: {done['list']} -> {done['packed_dir']} ({detail})", flush=True)


def _pack_one(args, resize: int | None) -> None:
  recorded = lists.read_classes(args.list) if os.path.isfile(args.list) else None
  if args.class_names:
    class_names = tuple(n.strip() for n in args.class_names.split(",") if n.strip())
    names_from = "--class_names"
  elif recorded is not None:   # the list's own order: nothing to check, nothing to get wrong
    class_names, names_from = recorded["class_names"], "its class-order file"
  else:
    class_names, names_from = config_defaults.FER_CLASSES, "the default class names"
  out = packed.pack_list(args.list, args.image_root, args.out, class_names, resize,
                         allow_outside_root=args.allow_outside_root, overwrite=args.overwrite,
                         names_from=names_from,
                         progress=_progress(os.path.basename(os.path.normpath(args.out))))
  print(out, flush=True)


@cli.command
def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m eercl_jax.data.pack", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default=None,
                      help="pack every list of this config's run into config.data.packed_root "
                           "(with --config.x.y=v overrides, as for eercl_jax.main)")
  parser.add_argument("--list", default=None, help="one FER list file (`relative/path label` "
                                                   "lines)")
  parser.add_argument("--image_root", default=None, help="folder the list's paths are relative to")
  parser.add_argument("--out", default=None, help="output folder of the one list's packed set")
  parser.add_argument("--resize", default=None,
                      help="store each image square-resized to this size ('config': "
                           "config.data.resize); default: original size, lossless")
  parser.add_argument("--class_names", default=None,
                      help="one list: comma-separated class names in label order (default: the "
                           "list's class-order file <list>.classes.json, else the configs' "
                           "default); must match the class-order file when the list has one")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace existing output folders (with --config: repack every list, "
                           "even intact sets)")
  parser.add_argument("--allow_outside_root", action="store_true",
                      help="one list: allow paths that are absolute or climb out of the image "
                           "root (with --config: config.data.allow_outside_root)")
  args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else list(argv))
  overrides = [a for a in rest if a.startswith("--config.")]
  if len(overrides) != len(rest):
    parser.error(f"unrecognized arguments: {' '.join(a for a in rest if a not in overrides)}")
  if overrides and args.config is None:
    raise UserError(f"{overrides[0].split('=', 1)[0]} needs --config")
  single = [name for name in ("list", "image_root", "out") if getattr(args, name) is not None]
  if args.config is not None and (single or args.class_names):
    extra = single + (["class_names"] if args.class_names else [])
    raise UserError(f"--config packs the lists of the config's run: drop --{', --'.join(extra)}")
  if args.config is None and len(single) != 3:
    raise UserError("give --config=configs/X.py (every list of its run), or --list, "
                    "--image_root and --out (one list)")
  config = None if args.config is None else _load_config(args.config, overrides)
  resize = _resize(args.resize, config)
  try:
    if config is not None:
      pack_config(config, resize, args.overwrite)
    else:
      _pack_one(args, resize)
  except KeyboardInterrupt:
    # The set being written is removed (pack_list); the finished ones stay: "try again later",
    # as a preempted run (rerunning the same command goes on).
    print("error: interrupted: the set being packed was removed; rerun the same command to go "
          "on", file=sys.stderr, flush=True)
    return constants.EXIT_PREEMPTED
  return 0


def run() -> None:
  sys.exit(main())


if __name__ == "__main__":
  run()
