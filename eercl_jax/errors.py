"""The error types of eercl_jax, at the bottom of its imports so that every module can raise them.

A `UserError` is a mistake in what the user gave - a config key, a command-line argument, a
list, an image, a packed set, a checkpoint folder - and its message names the key, file or line
at fault. Commands print it as one line and exit with code 2 (constants.EXIT_USAGE); any other
exception is a failure of the program (exit code 1, with the traceback in the run's log).
"""


class UserError(ValueError):
  """Something the user gave is wrong; the message says what and where."""


class DataError(UserError):
  """A list, image or packed-set problem; the message names the file and, where it applies,
  the 1-based line."""


class ConfigError(UserError):
  """A config value that cannot work; the message names the key (config.x.y)."""


class CheckpointError(UserError):
  """A checkpoint folder that is missing, of another run or model, or unreadable; the message
  names the folder (and the step)."""


class WeightsError(UserError):
  """A weights file (`config.model.init_from`, an original checkpoint, a file to convert) that
  cannot be read - missing entries, truncated or corrupt - or does not fit the model; the
  message names the file."""
