"""Packed lists (tfds ArrayRecord sets): the same batches as the folder path, bit for bit (views,
resume, process shares, grain workers), the start-up checks, the pack CLI with --resize, the
resident refresh and its on-device view."""
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from eercl_jax import config_defaults, parallel
from eercl_jax.data import images, lists, packed, pipelines as P, resident, run_lists
from eercl_jax.data import transforms as T
from eercl_jax.errors import DataError
from eercl_jax.tools import pack as pack_command
from tests.conftest import REPO

N, G = 13, 4
RESIZE, CROP = 20, 16
CFG = P.ViewConfig(resize=RESIZE, crop=CROP)
CLASSES = ("a", "b", "c")
VIEWS = ("weak", "strong", "test")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  """13 JPEGs of three sizes (lossy files: the packed pixels must be the decoder's output) and
  their list; the lossless packed set under <root>/packed/list."""
  root = tmp_path_factory.mktemp("pack")
  lines = []
  for i in range(N):
    rel = f"d/{i:02d}.jpg"
    img = np.random.default_rng(i).integers(0, 256, (18 + i % 3, 24, 3), dtype=np.uint8)
    os.makedirs(root / "d", exist_ok=True)
    Image.fromarray(img).save(root / rel, quality=90)
    lines.append(f"{rel} {i % 3}\n")
  (root / "list.txt").write_text("".join(lines))
  out = packed.pack_list(str(root / "list.txt"), str(root), str(root / "packed" / "list"), CLASSES)
  assert out == str(root / "packed" / "list")
  return root


def _lists(root):
  folder = lists.read_list(str(root / "list.txt"), str(root), CLASSES)
  return folder, packed.attach(folder, str(root / "packed"), RESIZE)


def _assert_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _train(fl, **kw):
  return iter(P.train_dataset(fl, **{**dict(views=VIEWS, view_cfg=CFG, global_batch=G, seed=5),
                                     **kw}))


def test_packed_records_are_the_decoded_pixels_with_metadata(root):
  folder, pk = _lists(root)
  assert pk.packed_dir == str(root / "packed" / "list")
  source = packed.open_source(pk.packed_dir)
  assert len(source) == N
  for i in (0, 7, N - 1):
    rec = source[i]
    np.testing.assert_array_equal(rec["image"], images.load_image(folder.paths[i]))
    assert int(rec["index"]) == i and int(rec["label"]) == folder.labels[i]
    assert rec["path"].decode() == f"d/{i:02d}.jpg"
  assert packed.class_names_of(pk.packed_dir) == CLASSES
  meta = packed.read_meta(pk.packed_dir)
  assert (meta["count"], meta["stored_size"], tuple(meta["class_names"])) == (N, None, CLASSES)
  assert meta["fingerprint"] == packed.list_fingerprint(folder)


def test_train_batches_equal_across_epochs_resume_and_processes(root):
  folder, pk = _lists(root)
  # 8 batches: three epochs of 3 steps (13 images, batch 4) less one.
  want = [next(it) for it in [_train(folder)] for _ in range(8)]
  got = _train(pk)
  for b, w in zip([next(got) for _ in range(8)], want):
    _assert_equal(b, w)
  # Resume: the packed stream's state after 3 batches restores the folder stream's rest.
  it = _train(pk)
  for _ in range(3):
    next(it)
  state = it.get_state()
  resumed = _train(pk)
  resumed.set_state(state)
  for w in want[3:6]:
    _assert_equal(next(resumed), w)
  # Two processes: each packed share equals the folder path's share of the same process.
  for proc in (0, 1):
    f = _train(folder, process_index=proc, process_count=2)
    p = _train(pk, process_index=proc, process_count=2)
    for _ in range(4):
      _assert_equal(next(p), next(f))


def test_eval_batches_equal(root):
  folder, pk = _lists(root)
  for view in ("test", "weak"):
    for proc in (0, 1):
      kw = dict(view=view, view_cfg=CFG, batch_size=6, seed=3, epoch=2, process_index=proc,
                process_count=2)
      f, p = list(P.eval_batches(folder, **kw)), list(P.eval_batches(pk, **kw))
      assert len(f) == len(p) == 3
      for a, b in zip(p, f):
        _assert_equal(a, b)


def test_grain_worker_reads_the_packed_set(root):
  """A worker process receives the directory only and opens the set itself."""
  folder, pk = _lists(root)
  want = [next(it) for it in [_train(folder)] for _ in range(2)]
  with_worker = _train(pk, num_workers=1)
  for w in want:
    _assert_equal(next(with_worker), w)
  with_worker.close()


def _copy_list(root, name, edit=lambda lines: lines):
  lines = (root / "list.txt").read_text().splitlines(keepends=True)
  (root / name).write_text("".join(edit(lines)))
  return lists.read_list(str(root / name), str(root), CLASSES)


def test_mismatches_are_named(root):
  packed_dir = str(root / "packed" / "list")
  short = _copy_list(root, "short.txt", lambda l: l[:-1])
  with pytest.raises(DataError, match=r"count 13 != 12 .*short\.txt"):
    packed.check(short, packed_dir, RESIZE)
  relabelled = _copy_list(root, "relabel.txt",
                          lambda l: [l[0].replace(" 0", " 1")] + l[1:])
  with pytest.raises(DataError, match=r"fingerprint .*relabel\.txt"):
    packed.check(relabelled, packed_dir, RESIZE)
  folder = lists.read_list(str(root / "list.txt"), str(root), ("a", "b", "z"))
  with pytest.raises(DataError, match=r"class names \('a', 'b', 'c'\) != \('a', 'b', 'z'\)"):
    packed.check(folder, packed_dir, RESIZE)
  with pytest.raises(DataError, match=r"not a packed list .*eercl_pack\.json"):
    packed.check(folder, str(root / "nowhere"), RESIZE)
  with pytest.raises(FileExistsError, match="overwrite"):
    packed.pack_list(str(root / "list.txt"), str(root), packed_dir, CLASSES)


def test_pack_checks_and_follows_the_class_order_file(root, capsys):
  """A list of another class order is refused by name (library and command); the command
  without --class_names packs in the list's own order, recorded in the set."""
  ordered = root / "ordered.txt"
  ordered.write_text((root / "list.txt").read_text())
  lists.write_classes(str(ordered), ("b", "a", "c"))
  with pytest.raises(DataError, match=re.escape(
      f"{ordered}: labels index (b, a, c) (its class-order file {ordered}.classes.json) but "
      "class_names is (a, b, c): the same names in another order")):
    packed.pack_list(str(ordered), str(root), str(root / "packed_o" / "x"), CLASSES)
  assert not (root / "packed_o").exists()
  argv = [f"--list={ordered}", f"--image_root={root}", f"--out={root / 'packed_o' / 'ordered'}"]
  assert pack_command.main(argv + ["--class_names=a,b,c"]) == 2
  err = capsys.readouterr().err
  assert "labels index (b, a, c)" in err and "but --class_names is (a, b, c)" in err
  assert pack_command.main(argv) == 0
  meta = json.loads((root / "packed_o" / "ordered" / packed.META_FILE).read_text())
  assert meta["class_names"] == ["b", "a", "c"]
  assert packed.class_names_of(str(root / "packed_o" / "ordered")) == ("b", "a", "c")
  # A run whose config has the list's order reads the set; another order is refused at the
  # list, by name, before the packed set is looked at.
  d = config_defaults.source_config().data
  d.image_root, d.class_names, d.resize, d.crop = str(root), ("b", "a", "c"), RESIZE, CROP
  d.format, d.packed_root = "packed", str(root / "packed_o")
  assert run_lists.read_list(str(ordered), d).packed_dir == str(root / "packed_o" / "ordered")
  d.class_names = CLASSES
  with pytest.raises(DataError, match=r"labels index \(b, a, c\) .* but config\.data\."
                                      r"class_names is \(a, b, c\)"):
    run_lists.read_list(str(ordered), d)


def test_run_lists_read_packed_sets_and_name_the_missing_one(root):
  d = config_defaults.source_config().data
  d.image_root, d.class_names = str(root), CLASSES
  d.train_list = str(root / "list.txt")
  d.eval_lists = {"target": str(root / "list.txt")}
  d.resize, d.crop = RESIZE, CROP
  d.format, d.packed_root = "packed", str(root / "packed")
  train, evals = run_lists.read_run_lists(d)
  assert train.packed_dir == evals["target"].packed_dir == str(root / "packed" / "list")
  d.eval_lists = {"target": str(root / "short.txt")}
  _copy_list(root, "short.txt", lambda l: l[:-1])
  with pytest.raises(DataError, match=r"packed[/\\]short"):
    run_lists.read_run_lists(d)
  c = config_defaults.source_config()
  c.data.format = "zip"
  with pytest.raises(ValueError, match=r"config\.data\.format: 'zip'"):
    config_defaults.validate(c, 1)
  a = config_defaults.adapt_config("expw")
  a.adapt.refresh_device_view = True
  with pytest.raises(ValueError, match=r"config\.adapt\.refresh_device_view: needs .*'packed'"):
    config_defaults.validate(a, 1)
  a.data.format, a.adapt.refresh_memory = "packed", "gpu"
  with pytest.raises(ValueError, match=r"config\.adapt\.refresh_memory: 'gpu'"):
    config_defaults.validate(a, 1)
  a.adapt.refresh_memory = "device"
  config_defaults.validate(a, 1)


def test_cli_packs_resized_and_weak_test_views_stay_bit_identical(root):
  out = root / "packed_r" / "list"
  proc = subprocess.run(
      [sys.executable, "-m", "eercl_jax.data.pack", f"--list={root / 'list.txt'}",
       f"--image_root={root}", f"--out={out}", f"--resize={RESIZE}", "--class_names=a,b,c"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip().splitlines()[-1] == str(out)
  meta = json.loads((out / packed.META_FILE).read_text())
  assert meta["stored_size"] == RESIZE and meta["count"] == N
  folder = lists.read_list(str(root / "list.txt"), str(root), CLASSES)
  pk = packed.attach(folder, str(root / "packed_r"), RESIZE)
  assert packed.read_image(pk.packed_dir, 0).shape == (RESIZE, RESIZE, 3)
  for view in ("weak", "test"):
    f = _train(folder, views=(view,))
    p = _train(pk, views=(view,))
    for _ in range(4):
      _assert_equal(next(p), next(f))
  # The strong view's random-resized crop starts from the stored 20x20 image: other pixels.
  f, p = next(_train(folder, views=("strong",))), next(_train(pk, views=("strong",)))
  assert f["image"].shape == p["image"].shape and not np.array_equal(f["image"], p["image"])
  with pytest.raises(DataError, match=r"stored at 20x20 but config\.data\.resize is 24"):
    packed.check(folder, str(out), 24)
  bad = subprocess.run([sys.executable, "-m", "eercl_jax.data.pack", f"--list={root / 'x.txt'}",
                        f"--image_root={root}", f"--out={root / 'x'}"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2 and "x.txt: list file not found" in bad.stderr   # a user mistake


# ----------------------------------------------------------------------------- the device view


def _host_draws(seed, resize, crop):
  """weak_view's own draws (flip, y, x) from a generator seeded like `seed`."""
  rng = np.random.default_rng(seed)
  flip = rng.random() < 0.5
  y, x = rng.integers(0, resize - crop + 1, size=2)
  return flip, int(y), int(x)


def test_device_crop_flip_equals_the_host_weak_view_for_its_draws():
  imgs = np.random.default_rng(0).integers(0, 256, (12, RESIZE, RESIZE, 3), dtype=np.uint8)
  draws = [_host_draws(100 + i, RESIZE, CROP) for i in range(12)]
  assert {d[0] for d in draws} == {False, True}
  host = np.stack([T.weak_view(img, np.random.default_rng(100 + i), RESIZE, CROP)
                   for i, img in enumerate(imgs)])
  flip, y, x = (jnp.asarray(v) for v in zip(*draws))
  got = resident.crop_flip(imgs, flip, y, x, CROP)
  np.testing.assert_array_equal(np.asarray(got), host)


def test_device_weak_view_distribution_matches_the_host_view():
  """Flip p=0.5 and offsets uniform over 0..R-C in each axis, independent (n=20000: the bounds
  are ~5 standard deviations; a wrong support, bias or correlation fails them)."""
  n, span = 20000, RESIZE - CROP + 1
  flip, y, x = (np.asarray(v) for v in resident.draw_weak(np.arange(n), seed=3, epoch=1,
                                                          resize=RESIZE, crop=CROP))
  host = np.array([_host_draws(s, RESIZE, CROP) for s in range(2000)], np.int64)
  for name, dev, hst in (("y", y, host[:, 1]), ("x", x, host[:, 2])):
    assert set(np.unique(dev)) == set(np.unique(hst)) == set(range(span)), name
    freq = np.bincount(dev, minlength=span) / n
    np.testing.assert_allclose(freq, 1 / span, atol=0.015, err_msg=name)
  assert abs(flip.mean() - 0.5) < 0.02 and abs(host[:, 0].mean() - 0.5) < 0.06
  joint = np.bincount(y * span + x, minlength=span * span) / n
  np.testing.assert_allclose(joint, 1 / span ** 2, atol=0.008)
  assert abs(np.corrcoef(flip, x)[0, 1]) < 0.04
  # Another refresh (epoch) draws anew; the same one again draws the same.
  again = resident.draw_weak(np.arange(50), seed=3, epoch=1, resize=RESIZE, crop=CROP)
  other = resident.draw_weak(np.arange(50), seed=3, epoch=2, resize=RESIZE, crop=CROP)
  np.testing.assert_array_equal(np.asarray(again[1]), y[:50])
  assert not np.array_equal(np.asarray(other[1]), y[:50])


def _resident(pk, mesh, memory="host", device_view=False):
  return resident.Resident(pk, mesh, P.Loader(CFG), memory=memory, device_view=device_view)


def test_resident_refresh_batches(root):
  """Host view: the refresh's batches equal the folder path's; device view (host or device
  memory): the resized pixels cropped/flipped on the device by `device_view`."""
  folder, pk = _lists(root)
  mesh = parallel.create_mesh(jax.devices()[:2])
  res = _resident(pk, mesh)
  assert res.pixels.shape == (N, RESIZE, RESIZE, 3)
  for view in ("weak", "test"):
    want = list(P.eval_batches(folder, view=view, view_cfg=CFG, batch_size=6, seed=4, epoch=2))
    got = list(res.batches(view, 6, 4, 2))
    assert len(got) == len(want)
    for a, b in zip(got, want):
      _assert_equal(a, b)
  outs = []
  for memory in ("host", "device"):
    res = _resident(pk, mesh, memory, True)
    images = []
    for b in res.batches("weak", 6, 4, 2):
      assert ("image" in b) == (memory == "host")
      images.append(np.asarray(res.images(parallel.shard_batch(b, mesh), "weak", 4, 2)))
      flip, y, x = resident.draw_weak(b["index"], seed=4, epoch=2, resize=RESIZE, crop=CROP)
      np.testing.assert_array_equal(
          images[-1], np.asarray(resident.crop_flip(res.pixels[b["index"]], flip, y, x, CROP)))
    outs.append(np.concatenate(images))
  np.testing.assert_array_equal(outs[0], outs[1])
  assert outs[0].shape == (18, CROP, CROP, 3)


@pytest.mark.slow
def test_refresh_banks_from_the_resident_list(root):
  """The adaptation's refresh with the resident list (host view) fills the banks exactly as the
  folder path does (the device view's images are checked in test_resident_refresh_batches)."""
  from configs import demo_adapt  # pylint: disable=import-outside-toplevel
  from eercl_jax import train_adapt  # pylint: disable=import-outside-toplevel
  from eercl_jax.models import eercl  # pylint: disable=import-outside-toplevel

  c = demo_adapt.get_config("runlocal")
  c.data.resize, c.data.crop, c.data.class_names = RESIZE, CROP, CLASSES
  c.model.num_classes = len(CLASSES)
  c.data.format, c.adapt.refresh_batch_size = "packed", 8
  folder, pk = _lists(root)
  mesh = parallel.create_mesh(jax.devices()[:1])
  variables = eercl.init_variables(eercl.create_model(c.model), jax.random.PRNGKey(0), CROP)
  built = train_adapt.build(c, mesh, variables, N)
  state = built.state

  def for_refresh(fl):   # as the adaptation loop asks
    return resident.for_refresh(fl, mesh, built.evaluator.loader, data_format=c.data.format,
                                memory=c.adapt.refresh_memory,
                                device_view=c.adapt.refresh_device_view)

  def refresh(fl, res):   # on a copy of the banks: the refresh donates them
    fresh = state.replace(banks=jax.tree_util.tree_map(jnp.copy, state.banks))
    return built.refresh(fresh, fl, 1, with_teacher=True, resident=res)[0].banks
  want = refresh(folder, None)
  assert for_refresh(pk) is not None
  got = refresh(pk, for_refresh(pk))
  for name in ("feat", "score", "aad_feat", "label"):
    np.testing.assert_array_equal(np.asarray(getattr(got, name)), np.asarray(getattr(want, name)))
  c.adapt.refresh_memory = "none"
  assert for_refresh(pk) is None
  c.data.format, c.adapt.refresh_memory = "folder", "host"
  assert for_refresh(folder) is None
