"""Command-line mistakes are one line with a suggestion and a non-zero exit, not a traceback."""
import subprocess
import sys

import ml_collections
import pytest

from eercl_jax import constants
from eercl_jax.tools import cli as cli_errors
from tests.conftest import REPO


def _main(*args):
  """`python -m eercl_jax.main ARGS` from the repository root (the config flags are parsed
  before JAX or TensorFlow is imported, so these take about a second)."""
  return subprocess.run([sys.executable, "-m", "eercl_jax.main", "--workdir=unused", *args],
                        cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, line", [
    (["--config=configs/demo_source.py", "--config.optim.lrr=0.1"],
     "error: unknown config key 'optim.lrr': did you mean 'optim.lr'?"),
    (["--config=configs/demo_sourc.py"],
     "error: config file 'configs/demo_sourc.py' not found: did you mean "
     "'configs/demo_source.py'?"),
])
def test_one_line_with_a_suggestion(args, line):
  proc = _main(*args)
  assert proc.returncode == constants.EXIT_USAGE
  assert proc.stderr.strip().splitlines() == [line]
  assert proc.stdout == ""


def test_unknown_keys_and_files_are_diagnosed_by_name(tmp_path):
  config = ml_collections.ConfigDict({"optim": {"lr": 0.1, "lr_mult": {"backbone": 0.1}},
                                      "data": {"crop": 224}})
  assert cli_errors.flat_keys(config) == ["data", "data.crop", "optim", "optim.lr",
                                          "optim.lr_mult", "optim.lr_mult.backbone"]
  msg = cli_errors.unknown_key_message
  assert msg(config, ["optim.lr", "data.crop"]) is None
  assert msg(config, ["optim.lr_mult.backbon"]) == \
      "unknown config key 'optim.lr_mult.backbon': did you mean 'optim.lr_mult.backbone'?"
  assert msg(config, ["dataa.crop"]) == "unknown config key 'dataa.crop': did you mean 'data.crop'?"
  assert "no similar key" in msg(config, ["zzzzzz"])
  assert cli_errors.config_arguments(
      ["prog", "--config", "a.py:x", "--config.b.c=1", "--config.d", "--workdir=w"]) == \
      ("a.py:x", ["b.c", "d"])
  (tmp_path / "adapt_expw.py").write_text("")
  assert cli_errors.missing_file_message(f"{tmp_path}/adapt_expw.py") is None
  assert "did you mean" in cli_errors.missing_file_message(f"{tmp_path}/adapt_exp.py")
  assert "no folder" in cli_errors.missing_file_message(f"{tmp_path}/nope/x.py")
