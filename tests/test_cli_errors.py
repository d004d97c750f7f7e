"""Command-line mistakes are one line with a suggestion and a non-zero exit, not a traceback; so
are the user mistakes a run finds once started (weights, source checkpoint, packed set, a
corrupt checkpoint), and a run that fails before its first step leaves no run folder."""
import os
import shutil
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


# ------------------------------------------------- mistakes found once the run has started

def _train(data_dir, workdir, *args, config="demo_source.py:runlocal"):
  """`python -m eercl_jax.main` of a dry run from the data folder."""
  return subprocess.run(
      [sys.executable, "-m", "eercl_jax.main", f"--config={REPO}/configs/{config}",
       f"--workdir={workdir}", *args],
      cwd=data_dir, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
      timeout=600)


def _error_line(proc) -> str:
  """The one line a user mistake ends with: exit code 2, last on stderr and said once, no
  traceback (the run's progress lines may come before it)."""
  assert proc.returncode == constants.EXIT_USAGE, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr and "FATAL" not in proc.stderr, proc.stderr[-3000:]
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  said = [line for line in lines if line.startswith("error:") or "] error:" in line]
  assert said == lines[-1:], proc.stderr[-3000:]
  return lines[-1]


def _files(folder):
  return sorted(os.path.relpath(os.path.join(d, f), folder)
                for d, _, files in os.walk(folder) for f in files)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing_weights", "corrupt_weights", "missing_source",
                                  "packed_mismatch"])
def test_a_mistake_found_at_start_is_one_line_and_leaves_no_run_folder(data_dir, tmp_path,
                                                                       case):
  workdir = tmp_path / "runs" / "new"          # neither folder exists yet
  config = "demo_source.py:runlocal"
  if case == "missing_weights":
    args, want = [f"--config.model.init_from={tmp_path / 'vit.safetensors'}"], "does not exist"
  elif case == "corrupt_weights":
    (tmp_path / "vit.safetensors").write_bytes(os.urandom(1000))
    args = [f"--config.model.init_from={tmp_path / 'vit.safetensors'}"]
    want = "not a readable .safetensors file"
  elif case == "missing_source":
    config = "demo_adapt.py:runlocal"
    args, want = [f"--config.source_checkpoint={tmp_path / 'source'}"], "does not exist"
  else:   # a packed set of another list under the training list's name
    from eercl_jax.data import packed  # pylint: disable=import-outside-toplevel
    from configs import demo_source  # pylint: disable=import-outside-toplevel
    c = demo_source.get_config("runlocal")
    lines = open(data_dir / c.data.train_list).readlines()[:8]
    (tmp_path / "short.txt").write_text("".join(lines))
    stem = os.path.splitext(os.path.basename(c.data.train_list))[0]
    packed.pack_list(str(tmp_path / "short.txt"), str(data_dir / c.data.image_root),
                     str(tmp_path / "packed" / stem), c.data.class_names)
    args = ["--config.data.format=packed", f"--config.data.packed_root={tmp_path / 'packed'}"]
    want = "count 8 !="
  line = _error_line(_train(data_dir, workdir, *args, config=config))
  assert want in line and str(tmp_path) in line, line
  assert not (tmp_path / "runs").exists(), _files(tmp_path / "runs")


@pytest.mark.slow
def test_a_corrupt_checkpoint_is_one_line_naming_its_step_and_a_failed_resume_keeps_all(
    data_dir, source_run, tmp_path):
  run = tmp_path / "run"
  shutil.copytree(source_run, run)
  before = {f: (run / f).read_bytes() for f in _files(run)}

  def kept():   # every file of the run is there, its record (config, results) unchanged
    assert set(before) <= set(_files(run)), sorted(set(before) - set(_files(run)))
    for name in ("config.json", "results.json"):
      assert (run / name).read_bytes() == before[name], name
  # A resume with a field that changes the data stream: refused, and nothing of the run goes.
  line = _error_line(_train(data_dir, run, "--config.num_steps=4", "--config.batch_size=64"))
  assert "batch_size: 32 -> 64" in line
  kept()
  # Every array file of the best checkpoint cut in half: eval mode and predict name the step.
  step = os.listdir(run / "best")[0]
  for d, _, files in os.walk(run / "best" / step / "state"):
    if os.path.basename(d) == "d":
      for f in files:
        os.truncate(os.path.join(d, f), os.path.getsize(os.path.join(d, f)) // 2)
  line = _error_line(_train(data_dir, run, "--config.mode=eval"))
  assert f"checkpoint folder {run / 'best' / step} (step {step})" in line and "truncated" in line
  image = next((data_dir / "data").rglob("*.jpg"))
  proc = subprocess.run([sys.executable, "-m", "eercl_jax.predict", f"--checkpoint={run}",
                         str(image)], cwd=data_dir, env=dict(os.environ, PYTHONPATH=REPO),
                        capture_output=True, text=True, timeout=600)
  line = _error_line(proc)
  assert line.startswith("error: ") and f"checkpoint folder {run / 'best' / step} " in line
  kept()


def test_feature_map_from_another_folder_names_only_what_was_given(tmp_path, monkeypatch,
                                                                   capsys):
  """Run from another folder than the adaptation's, the source checkpoint its config recorded
  (a relative path) is not found: the one line names that recorded setting and the run, not a
  --source_run flag nobody passed (it once did)."""
  from eercl_jax import checkpoints  # pylint: disable=import-outside-toplevel
  from eercl_jax.tools import feature_map  # pylint: disable=import-outside-toplevel
  adapt = tmp_path / "runs" / "adapt"
  adapt.mkdir(parents=True)               # a checkpoint folder itself (no best/ inside)
  config = {"source_checkpoint": "runs/source", "data": {"class_names": ["a", "b"]}}
  monkeypatch.setattr(checkpoints, "read_meta", lambda path: (
      1, {"stage": "adapt", "config": config, "class_names": ["a", "b"]}))
  monkeypatch.chdir(tmp_path / "runs")    # not the folder the run was started from
  assert feature_map.main([str(adapt), "map.png"]) == constants.EXIT_USAGE
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [f"error: the config.source_checkpoint recorded in {adapt}='runs/source' does "
                 "not exist (a relative path resolves against the current folder, as in the run: "
                 "run from the run's folder, or give --source_run)"], err
  # Given on the command line, the flag is named.
  assert feature_map.main([str(adapt), "map.png", "--source_run=elsewhere"]) == \
      constants.EXIT_USAGE
  assert capsys.readouterr().err.strip() == "error: --source_run='elsewhere' does not exist"
  assert not (tmp_path / "runs" / "map.png").exists()
