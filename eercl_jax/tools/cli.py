"""What every command shares: user mistakes said in one line, with exit code 2.

A missing config file or a misspelt `--config.x.y` key is reported with the nearest existing
names (difflib) instead of absl's or ml_collections' traceback,

    app.run(main, flags_parser=lambda argv: cli.parse_flags(argv, _CONFIG))

and a `UserError` raised by the library (a bad list, a missing checkpoint, ...) inside
`with cli.user_errors():` becomes `error: <message>` on stderr and exit code 2.
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import importlib.util
import os
import sys
from typing import Callable, Iterator, Sequence

from absl import flags

from eercl_jax import constants
from eercl_jax.errors import UserError


class UsageProblem(Exception):
  """A command-line mistake, said in one line."""


def parse_flags(argv: Sequence[str], config_flag=None, flag_name: str = "config") -> list[str]:
  """absl's flag parsing (`flags.FLAGS(argv)`), then the config file is loaded (config_flags
  defers a missing file's error until the value is read); any failure is printed as one line
  on stderr and exits with `constants.EXIT_USAGE`. Returns the positional arguments."""
  path, _ = config_arguments(argv, flag_name)
  if path is not None:
    import_configs_beside(path)
  try:
    try:
      rest = flags.FLAGS(list(argv))
      if config_flag is not None:
        # A config file that failed to load stands in as an object raising on any access.
        config_flag.value.keys()
    except flags.Error as e:
      raise UsageProblem(_problem(argv, flag_name) or f"{e}") from None
    except (AttributeError, KeyError, OSError, ValueError, TypeError, SyntaxError,
            ImportError) as e:   # ImportError: the config file's own imports
      raise UsageProblem(_problem(argv, flag_name) or _one_line(e)) from None
  except UsageProblem as e:
    fail(str(e))
  return rest


def one_line(message: str) -> str:
  """A multi-line message joined with ' | ' (a log or terminal line per error)."""
  return " | ".join(line.strip() for line in str(message).splitlines() if line.strip())


def fail(message: str, code: int = constants.EXIT_USAGE) -> None:
  """Prints `error: <message>` as one line on stderr and exits with `code`."""
  print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
  sys.exit(code)



# What a user can fix: their config, arguments and files (the message names the culprit).
USER_ERRORS = (UserError, FileNotFoundError, FileExistsError)


def report(error: BaseException) -> int:
  """Prints `error: <message>` as one line on stderr; returns `constants.EXIT_USAGE`."""
  print(f"error: {one_line(str(error))}", file=sys.stderr, flush=True)
  return constants.EXIT_USAGE


def command(main: Callable[..., int]) -> Callable[..., int]:
  """Decorates a command's `main(argv) -> exit code`: a user mistake raised inside becomes one
  line and exit code 2; anything else propagates (a bug: traceback, exit code 1)."""
  @functools.wraps(main)
  def wrapped(*args, **kwargs) -> int:
    try:
      return main(*args, **kwargs)
    except USER_ERRORS as e:
      return report(e)
  return wrapped


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
  """A user mistake inside the block ends the process with one line and exit code 2."""
  try:
    yield
  except USER_ERRORS as e:
    sys.exit(report(e))


def grain_workers_ready() -> None:
  """grain 0.2 reads its absl flags in its data-worker start-up without a fallback; a command
  that does not run under absl's `app.run` (argparse) marks absl's flags parsed before it
  starts workers."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _one_line(e: BaseException) -> str:
  return one_line(f"{type(e).__name__}: {e}")


# ------------------------------------------------------------------------- the diagnosis

def config_arguments(argv: Sequence[str], flag_name: str = "config") -> tuple[str | None, list]:
  """(config file argument, [dotted override keys]) as given on the command line."""
  path, keys = None, []
  args = list(argv[1:])
  for i, arg in enumerate(args):
    if arg == "--":
      break
    for prefix in (f"--{flag_name}", f"-{flag_name}"):
      if arg == prefix and i + 1 < len(args):
        path = args[i + 1]
      elif arg.startswith(prefix + "="):
        path = arg[len(prefix) + 1:]
      elif arg.startswith(prefix + "."):
        keys.append(arg[len(prefix) + 1:].split("=", 1)[0])
  return path, keys


def missing_file_message(path: str) -> str | None:
  """'config file X not found: did you mean Y?' when `path` (without a `:argument` suffix) is
  not a file; None when it is."""
  file = path.split(":", 1)[0]
  if os.path.isfile(file):
    return None
  folder = os.path.dirname(file) or "."
  try:
    names = sorted(n for n in os.listdir(folder) if n.endswith(".py") and not n.startswith("_"))
  except OSError:
    return f"config file {file!r} not found (no folder {folder!r})"
  close = _closest(os.path.basename(file), names, cutoff=0.5)
  hint = (f": did you mean {' or '.join(repr(os.path.join(os.path.dirname(file), c)) for c in close)}?"
          if close else f" (config files in {folder!r}: {', '.join(names) or 'none'})")
  return f"config file {file!r} not found{hint}"


def flat_keys(config, prefix: str = "") -> list[str]:
  """Every dotted key of a ConfigDict, nested dicts included (e.g. 'optim.lr_mult.backbone')."""
  out = []
  for k, v in config.items():
    key = f"{prefix}{k}"
    out.append(key)
    if hasattr(v, "items") and not isinstance(v, (str, bytes)):
      out += flat_keys(v, key + ".")
  return out


def unknown_key_message(config, keys: Sequence[str], flag_name: str = "config") -> str | None:
  """'unknown config key 'optim.lrr': did you mean 'optim.lr'?' for the first override key
  that is not in `config`; None when all are."""
  known = flat_keys(config)
  for key in keys:
    base = key.split("[", 1)[0]   # an indexed override (--config.x[0]) names the field x
    if base in known:
      continue
    parent = base.rsplit(".", 1)[0] if "." in base else ""
    siblings = [k for k in known if (k.rsplit(".", 1)[0] if "." in k else "") == parent]
    close = _closest(base, siblings) or _closest(base, known)
    hint = (f": did you mean {' or '.join(repr(c) for c in close)}?" if close
            else f" (no similar key; `--helpfull` or eercl_jax/config_defaults.py lists them)")
    return f"unknown {flag_name} key {base!r}{hint}"
  return None


def _closest(word: str, candidates: Sequence[str], cutoff: float = 0.6) -> list[str]:
  """The candidates most similar to `word` (difflib's ratio, ties kept), if similar enough."""
  scored = [(difflib.SequenceMatcher(None, word, c).ratio(), c) for c in candidates]
  best = max((r for r, _ in scored), default=0.0)
  return [c for r, c in scored if r >= cutoff and r == best]


def import_configs_beside(path: str) -> None:
  """Makes `from configs import X` in the config file `path` (`file.py[:argument]`) import the X
  beside that file: when the file lies in a package (configs/ of a clone, which has an
  __init__.py), the folder above the package goes first on sys.path.

  `python -m eercl_jax.main` run from a clone's root has that folder first already (python puts
  the working directory there); a console script (`eercl-train`) has its bin/ folder there
  instead, so without this `from configs import ...` would find the copy `pip install .`
  installed (the clone's edits unseen) or, from another folder, nothing. A config file outside a
  package changes nothing: its `from configs import ...` gets the installed configs.
  docs/install.md has the cases."""
  file = os.path.abspath(path.partition(":")[0])
  folder = os.path.dirname(file)
  if not (os.path.isfile(file) and os.path.isfile(os.path.join(folder, "__init__.py"))):
    return
  while os.path.isfile(os.path.join(folder, "__init__.py")):
    folder = os.path.dirname(folder)
  if not sys.path or os.path.abspath(sys.path[0] or ".") != folder:
    sys.path.insert(0, folder)


def load_config_file(path: str):
  """The ConfigDict a config file's `get_config()` (or `get_config(arg)` for `file.py:arg`)
  returns, loaded as config_flags loads it."""
  file, _, arg = path.partition(":")
  import_configs_beside(file)
  spec = importlib.util.spec_from_file_location("_eercl_config_check", file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _problem(argv: Sequence[str], flag_name: str) -> str | None:
  """The one-line explanation of a failed parse, when it is a missing file or a misspelt key."""
  path, keys = config_arguments(argv, flag_name)
  if path is None:
    return None
  missing = missing_file_message(path)
  if missing:
    return missing
  if not keys:
    return None
  try:
    config = load_config_file(path)
  except Exception:  # pylint: disable=broad-except
    return None
  return unknown_key_message(config, keys, flag_name)
