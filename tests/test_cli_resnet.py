"""The ResNet path end to end through the CLI: a tiny ResNet (size 'mu', rematerialised blocks)
trained on the synthetic source domain, then adapted to the target by the paper config family
with no model override on the command line (the architecture comes from the source)."""
import pytest
import json
import os

from tests.conftest import REPO
from tests.test_train_source import _cli

pytestmark = pytest.mark.slow   # an end-to-end run: not in the fast tier

RESNET_FLAGS = ["--config.model.backbone=resnet", "--config.model.size=mu",
                "--config.model.remat=True"]


def test_cli_trains_and_adapts_a_tiny_resnet(data_dir, tmp_path):
  src, ada = tmp_path / "source", tmp_path / "adapt"
  proc = _cli([f"--config={REPO}/configs/demo_source.py:runlocal", f"--workdir={src}",
               *RESNET_FLAGS, "--config.num_steps=4", "--config.log_every=2",
               "--config.eval_every=4", "--config.checkpoint_every=4"], cwd=data_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "[source] final: target accuracy" in proc.stdout
  step = os.listdir(src / "best")[0]
  meta = json.load(open(src / "best" / step / "meta" / "metadata"))
  assert meta["arch"]["backbone"] == "resnet" and meta["arch"]["size"] == "mu"
  assert meta["config"]["model"]["remat"] is True

  # The adaptation: the paper family's config with no model field on the command line: the
  # architecture and the input size come from the source checkpoint, and the log says so.
  common = [f"--config={REPO}/configs/adapt.py:target=synth_wild,source=synth_studio,"
            "backbone=resnet", f"--config.source_checkpoint={src}", "--config.num_steps=3",
            "--config.eval_every=3", "--config.log_every=1", "--config.batch_size=32",
            "--config.bn_group_size=16", "--config.eval_batch_size=64",
            "--config.adapt.refresh_every=2", "--config.adapt.refresh_batch_size=64"]
  proc = _cli([*common, f"--workdir={ada}"], cwd=data_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "[adapt] final: " in proc.stdout and "target: source-only" in proc.stdout
  assert os.listdir(ada / "checkpoints") == ["3"]
  used = json.load(open(ada / "config.json"))
  source = json.load(open(src / "config.json"))
  for group, field in (("model", "size"), ("model", "bottleneck_dim"), ("model", "width"),
                       ("model", "feat_dim"), ("data", "resize"), ("data", "crop")):
    assert used[group][field] == source[group][field] and used[group][field] is not None
  log = open(ada / "logs" / "train.log").read()
  assert "taken from the source checkpoint" in log and "model.size='mu'" in log

  # A field the command line sets is checked against the source instead: another architecture
  # is refused, naming the field that differs.
  proc = _cli([*common, "--config.model.size=50", f"--workdir={tmp_path / 'wrong'}"],
              cwd=data_dir)
  assert proc.returncode == 2
  assert "model.size: checkpoint 'mu' vs config '50'" in proc.stderr
