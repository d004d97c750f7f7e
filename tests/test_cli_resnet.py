"""The ResNet path end to end through the CLI: a tiny ResNet (size 'mu', rematerialised blocks)
trained on the synthetic source domain and adapted to the target, as the ViT path is tested."""
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

  common = [f"--config={REPO}/configs/demo_adapt.py:runlocal", *RESNET_FLAGS,
            f"--config.source_checkpoint={src}", "--config.num_steps=3", "--config.eval_every=3",
            "--config.adapt.refresh_every=2", "--config.adapt.refresh_batch_size=64"]
  proc = _cli([*common, f"--workdir={ada}"], cwd=data_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "[adapt] final: " in proc.stdout and "target: source-only" in proc.stdout
  assert os.listdir(ada / "checkpoints") == ["3"]

  # A source checkpoint of another architecture is refused, naming the field that differs.
  proc = _cli([*common, "--config.model.size=50", f"--workdir={tmp_path / 'wrong'}"],
              cwd=data_dir)
  assert proc.returncode != 0
  assert "model.size: checkpoint 'mu' vs config '50'" in proc.stderr
