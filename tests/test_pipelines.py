"""grain pipelines: shapes, determinism, epochs and drop_last, resume, process sharding, eval."""
import json
import os

import numpy as np
from PIL import Image
import pytest

from eercl_jax.data import images, lists, pipelines as P, transforms as T
from eercl_jax.errors import DataError

N, G = 13, 4                 # 13 images, global batch 4: 3 steps per epoch, 1 image dropped
CFG = P.ViewConfig(resize=20, crop=16)
CLASSES = ("a", "b", "c")


@pytest.fixture(scope="module")
def fer_list(tmp_path_factory):
  root = tmp_path_factory.mktemp("fer")
  lines = []
  for i in range(N):
    rel = f"d/{i:02d}.png"
    colour = np.random.default_rng(i).integers(0, 256, (18 + i % 3, 24, 3), dtype=np.uint8)
    os.makedirs(root / "d", exist_ok=True)
    Image.fromarray(colour).save(root / rel)
    lines.append(f"{rel} {i % 3}\n")
  (root / "list.txt").write_text("".join(lines))
  return lists.read_list(str(root / "list.txt"), str(root), CLASSES)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _train(fer_list, **kw):
  args = dict(views=("weak",), view_cfg=CFG, global_batch=G, seed=7)
  return iter(P.train_dataset(fer_list, **{**args, **kw}))


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_source_stage_batch(fer_list):
  b = next(_train(fer_list))
  assert set(b) == {"image", "label", "index"}
  assert b["image"].shape == (G, 16, 16, 3) and b["image"].dtype == np.uint8
  assert b["label"].dtype == np.int32 and b["index"].dtype == np.int32
  np.testing.assert_array_equal(b["label"], fer_list.labels[b["index"]])


def test_adaptation_stage_batch_has_three_independent_views(fer_list):
  b = next(_train(fer_list, views=("weak", "strong", "strong")))
  assert set(b) == {"weak", "strong1", "strong2", "label", "index"}
  for k in ("weak", "strong1", "strong2"):
    assert b[k].shape == (G, 16, 16, 3) and b[k].dtype == np.uint8
  assert not np.array_equal(b["strong1"], b["strong2"])


def test_views_are_a_pure_function_of_seed_epoch_index(fer_list):
  b = next(_train(fer_list))  # step 0 is epoch 0
  for row, index in enumerate(b["index"]):
    rng, = P.view_rngs(7, 0, int(index), 1)
    expected = T.weak_view(images.load_image(fer_list.paths[index]), rng, CFG.resize, CFG.crop)
    np.testing.assert_array_equal(b["image"][row], expected)


def test_deterministic(fer_list):
  _assert_batches_equal(_take(_train(fer_list), 4), _take(_train(fer_list), 4))
  other = next(_train(fer_list, seed=8))
  assert not np.array_equal(other["index"], next(_train(fer_list))["index"])


def test_epochs_reshuffle_and_drop_last(fer_list):
  steps = P.steps_per_epoch(N, G)
  assert steps == 3
  batches = _take(_train(fer_list), 2 * steps)
  epochs = [np.concatenate([b["index"] for b in batches[e * steps:(e + 1) * steps]])
            for e in range(2)]
  for e, seen in enumerate(epochs):
    assert len(set(seen.tolist())) == steps * G          # no repeats within an epoch
    np.testing.assert_array_equal(seen, P.epoch_permutation(7, e, N)[:steps * G])
    assert sorted(P.epoch_permutation(7, e, N)) == list(range(N))
  assert not np.array_equal(epochs[0], epochs[1])
  assert [P.epoch_of_step(s, num_examples=N, global_batch=G) for s in range(7)] == \
      [0, 0, 0, 1, 1, 1, 2]


def test_start_epoch(fer_list):
  later = _take(_train(fer_list), 6)[3:]
  _assert_batches_equal(_take(_train(fer_list, start_epoch=1), 3), later)


def test_resume_from_state(fer_list):
  it = _train(fer_list, views=("weak", "strong", "strong"))
  _take(it, 2)
  state = json.loads(json.dumps(it.get_state()))  # as a checkpoint would store it
  expected = _take(it, 3)
  resumed = _train(fer_list, views=("weak", "strong", "strong"))
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, 3), expected)


def test_process_sharding_concatenates_to_the_global_batch(fer_list):
  whole = _take(_train(fer_list, global_batch=G), 5)
  parts = [_take(_train(fer_list, process_index=p, process_count=2), 5) for p in range(2)]
  for step, b in enumerate(whole):
    for k in b:
      np.testing.assert_array_equal(
          np.concatenate([parts[0][step][k], parts[1][step][k]]), b[k], err_msg=k)
    assert parts[0][step]["image"].shape[0] == G // 2


def test_train_errors(fer_list):
  with pytest.raises(ValueError, match="divisible"):
    P.train_dataset(fer_list, views=("weak",), view_cfg=CFG, global_batch=6, seed=0,
                    process_count=4)
  with pytest.raises(ValueError, match="fewer than one global batch"):
    P.train_dataset(fer_list, views=("weak",), view_cfg=CFG, global_batch=16, seed=0)
  with pytest.raises(ValueError, match="unknown view"):
    P.train_dataset(fer_list, views=("weird",), view_cfg=CFG, global_batch=4, seed=0)


def _eval(fer_list, **kw):
  return list(P.eval_batches(fer_list, **{**dict(view="test", view_cfg=CFG, batch_size=G), **kw}))


def test_eval_covers_each_image_once_in_order(fer_list):
  batches = _eval(fer_list)
  assert len(batches) == 4                          # ceil(13 / 4)
  for b in batches:
    assert set(b) == {"image", "label", "index", "valid"}
    assert b["image"].shape == (G, 16, 16, 3) and b["valid"].dtype == np.bool_
  index = np.concatenate([b["index"] for b in batches])
  valid = np.concatenate([b["valid"] for b in batches])
  np.testing.assert_array_equal(index[valid], np.arange(N))
  assert valid.sum() == N and not valid[N:].any()
  b = batches[0]
  expected = T.test_view(images.load_image(fer_list.paths[0]), CFG.resize, CFG.crop)
  np.testing.assert_array_equal(b["image"][0], expected)
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[valid],
                                fer_list.labels)


def test_eval_process_sharding(fer_list):
  whole = _eval(fer_list, batch_size=G)
  parts = [_eval(fer_list, batch_size=G, process_index=p, process_count=2) for p in range(2)]
  assert len(parts[0]) == len(parts[1]) == len(whole)
  for step, b in enumerate(whole):
    for k in b:
      np.testing.assert_array_equal(
          np.concatenate([parts[0][step][k], parts[1][step][k]]), b[k], err_msg=k)


def test_eval_weak_view_depends_on_seed_and_epoch_only(fer_list):
  a = _eval(fer_list, view="weak", seed=3, epoch=1)
  _assert_batches_equal(a, _eval(fer_list, view="weak", seed=3, epoch=1))
  b = _eval(fer_list, view="weak", seed=3, epoch=2)
  assert not all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, b))


@pytest.mark.slow
def test_two_workers_match_in_process_and_resume_across_worker_counts(fer_list):
  kw = dict(views=("weak", "strong", "strong"))
  in_process = _take(_train(fer_list, **kw), 4)
  it = _train(fer_list, num_workers=2, **kw)
  try:
    first = _take(it, 2)
    state = it.get_state()
    _assert_batches_equal(first + _take(it, 2), in_process)
  finally:
    it.close()
  # The state counts batches, so a run may resume with another number of workers.
  resumed = _train(fer_list, **kw)
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, 2), in_process[2:])
  _assert_batches_equal(_eval(fer_list, num_workers=2), _eval(fer_list))


# ------------------------------------------------- epoch edges for other list lengths / batches


@pytest.fixture(scope="module")
def fer_list_of_length(tmp_path_factory):
  """n -> a list of n tiny PNGs (built once per n)."""
  built = {}

  def make(n):
    if n not in built:
      root = tmp_path_factory.mktemp(f"fer{n}")
      os.makedirs(root / "d")
      lines = []
      for i in range(n):
        pixels = np.random.default_rng(100 + i).integers(0, 256, (6, 5 + i % 2, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"d/{i:02d}.png")
        lines.append(f"d/{i:02d}.png {i % 3}\n")
      (root / "list.txt").write_text("".join(lines))
      built[n] = lists.read_list(str(root / "list.txt"), str(root), CLASSES)
    return built[n]

  return make


@pytest.mark.parametrize("n, batch", [(12, 4), (12, 6), (12, 12), (13, 4), (13, 6)])
def test_epoch_boundaries_follow_drop_last(fer_list_of_length, n, batch):
  fer = fer_list_of_length(n)
  steps = n // batch  # written out here: a batch that divides the list drops nothing
  assert P.steps_per_epoch(n, batch) == steps
  assert [P.epoch_of_step(s, num_examples=n, global_batch=batch) for s in range(3 * steps + 1)] \
      == [s // steps for s in range(3 * steps + 1)]
  assert P.epoch_of_step(steps, num_examples=n, global_batch=batch, start_epoch=5) == 6
  batches = _take(_train(fer, global_batch=batch), 3 * steps)
  epochs = []
  for e in range(3):
    seen = np.concatenate([b["index"] for b in batches[e * steps:(e + 1) * steps]])
    perm = P.epoch_permutation(7, e, n)
    np.testing.assert_array_equal(seen, perm[:steps * batch])
    # Only the incomplete last batch (n % batch images) is dropped; the rest is seen once.
    assert len(set(seen.tolist())) == len(seen) == n - n % batch
    assert sorted(seen.tolist() + perm[steps * batch:].tolist()) == list(range(n))
    # The first image of each epoch is augmented with that epoch's generator.
    first = batches[e * steps]
    rng, = P.view_rngs(7, e, int(first["index"][0]), 1)
    expected = T.weak_view(images.load_image(fer.paths[first["index"][0]]), rng, CFG.resize, CFG.crop)
    np.testing.assert_array_equal(first["image"][0], expected)
    epochs.append(seen)
  for a in range(3):
    for b in range(a + 1, 3):
      assert not np.array_equal(epochs[a], epochs[b])  # each epoch is a new order


def test_list_shorter_than_one_global_batch(fer_list_of_length):
  fer = fer_list_of_length(12)
  # Training refuses a list that cannot fill one batch (it would have zero steps per epoch)...
  with pytest.raises(ValueError, match="fewer than one global batch"):
    P.train_dataset(fer, views=("weak",), view_cfg=CFG, global_batch=13, seed=0)
  # ...while evaluation pads the single batch and marks the padding invalid.
  b, = _eval(fer, batch_size=16)
  np.testing.assert_array_equal(b["index"], list(range(12)) + [11] * 4)
  np.testing.assert_array_equal(b["valid"], [True] * 12 + [False] * 4)


@pytest.mark.parametrize("batch", [4, 6, 12])
def test_eval_when_batch_divides_the_list_has_no_padding_batch(fer_list_of_length, batch):
  fer = fer_list_of_length(12)
  batches = _eval(fer, batch_size=batch)
  assert len(batches) == 12 // batch
  np.testing.assert_array_equal(np.concatenate([b["index"] for b in batches]), np.arange(12))
  assert all(b["valid"].all() for b in batches)


def test_an_image_that_fails_at_load_time_names_list_and_line(tmp_path):
  root = tmp_path / "fer"
  (root / "d").mkdir(parents=True)
  for i in range(4):
    Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(root / "d" / f"{i}.png")
  (tmp_path / "list.txt").write_text("".join(f"d/{i}.png {i % 3}\n" for i in range(4)))
  fer = lists.read_list(str(tmp_path / "list.txt"), str(root), CLASSES)
  (root / "d" / "2.png").write_bytes(b"broken after the start-up check")
  batches = P.eval_batches(fer, view="test", view_cfg=CFG, batch_size=4)
  with pytest.raises(DataError, match=r"list\.txt:3: .*2\.png: cannot decode"):
    list(batches)
