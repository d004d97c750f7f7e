"""The input pipeline's defaults follow the host (data/host.py) and a run logs how long its step
loop waited for input (`train/input_wait`, also on the progress line)."""
import os
import time

import flax
import jax.numpy as jnp
import pytest

from configs import demo_source
from eercl_jax import config_defaults, run as run_lib
from eercl_jax.data import host



@pytest.mark.parametrize("cores, want", [(1, (0, 2)), (2, (1, 2)), (8, (7, 2)), (64, (16, 2))])
def test_unset_workers_and_prefetch_follow_the_cores(cores, want):
  assert host.resolve(None, None, cores=cores) == want


def test_explicit_values_win_and_bad_ones_are_refused():
  assert host.resolve(0, None, cores=16) == (0, 8)     # in-process: threads follow the cores
  assert host.resolve(0, None, cores=2) == (0, 2)
  assert host.resolve(3, 5, cores=64) == (3, 5)
  with pytest.raises(ValueError, match="num_workers=-1"):
    host.resolve(-1, None)
  with pytest.raises(ValueError, match="prefetch=0"):
    host.resolve(None, 0)


def test_config_defaults_are_unset_and_validated():
  c = config_defaults.source_config()
  assert c.data.num_workers is None and c.data.prefetch is None
  assert host.from_config(c.data) == host.resolve(None, None, cores=host.available_cores())
  c.data.num_workers = 4                        # a typed field: a command-line override works
  assert host.from_config(c.data)[0] == 4
  c.data.prefetch = 0
  with pytest.raises(ValueError, match="config.data.prefetch"):
    config_defaults.validate(c, 1)


@flax.struct.dataclass
class _State:
  step: object
  params: object
  batch_stats: object


class _SlowIterator:
  """Yields after `delay` seconds: the host is the limit."""

  def __init__(self, delay):
    self.delay = delay

  def __next__(self):
    time.sleep(self.delay)
    return {"x": 0}

  def get_state(self):
    return {}


def test_the_run_logs_its_input_wait_fraction(tmp_path):
  c = demo_source.get_config("runlocal")
  c.num_steps, c.log_every, c.eval_every, c.checkpoint_every = 100, 4, 100, 100
  workdir = str(tmp_path / "run")
  r = run_lib.Run(c, workdir, "source")
  written = []
  write = r.writer.write_scalars
  r.writer.write_scalars = lambda step, s: (written.append((step, dict(s))), write(step, s))
  state = _State(step=jnp.zeros((), jnp.int32), params={"w": jnp.zeros(2)}, batch_stats={})
  state, _, _ = r.resume(state)
  for step in range(1, 9):                      # the last step (eval, save) is never reached
    slow = step <= 4                            # first window: waits for data; second: does not
    r.next_batch(_SlowIterator(0.05 if slow else 0.0))
    if not slow:
      time.sleep(0.05)                          # "device" time instead
    r.end_of_step(step, state, {"train/loss": jnp.asarray(1.0)}, _SlowIterator(0))
  r.ckpt.close()
  r.lock.release()
  waits = {step: s["train/input_wait"] for step, s in written if "train/input_wait" in s}
  assert sorted(waits) == [4, 8]
  assert 0.6 < waits[4] <= 1.0, waits
  assert waits[8] < 0.3, waits
  with open(os.path.join(workdir, "logs", "train.log")) as f:
    log = f.read()
  assert "input_wait=" in log and "grain worker(s)" in log
