"""The method end to end: the demo pair of configs, shortened, adapts (its own file so the
suite's workers can run it beside the other adaptation tests)."""
import os

import pytest

from configs import demo_adapt, demo_source
from eercl_jax import train_adapt, train_source

pytestmark = pytest.mark.slow   # an end-to-end run: not in the fast tier


def test_adaptation_beats_source_only_on_a_reduced_demo(tmp_path_factory):
  """The demo pair of configs, shortened: adapted target accuracy > source-only, same evaluation."""
  root = tmp_path_factory.mktemp("demo")
  old = os.getcwd()
  os.chdir(root)
  try:
    src = demo_source.get_config()
    src.num_steps, src.log_every, src.eval_every, src.checkpoint_every = 1000, 250, 1000, 1000
    source = train_source.train_and_evaluate(src, str(root / "source"))
    assert source["final"]["source"] > 0.6
    ada = demo_adapt.get_config()
    ada.source_checkpoint = str(root / "source")
    ada.num_steps, ada.log_every, ada.eval_every, ada.checkpoint_every = 150, 50, 150, 150
    adapted = train_adapt.train_and_evaluate(ada, str(root / "adapt"))
  finally:
    os.chdir(old)
  before, after = adapted["source_only"]["target"], adapted["final"]["target"]
  assert before == pytest.approx(source["final"]["target"])   # the same evaluation
  assert after > before + 0.03, (before, after)
