"""The target list held in memory for the bank refresh (docs/data.md#a-refresh-without-decoding).

With `config.data.format='packed'` the refresh, a full pass over the target list every
`config.adapt.refresh_every` steps, reads the packed pixels once, square-resized to
`config.data.resize` (a no-op for a set packed with that `--resize`), into one uint8
(N, R, R, 3) array: in host RAM (`config.adapt.refresh_memory='host'`) or replicated on every
device ('device'). Each refresh then computes its view with no decode and no resize:

* host view (default): the same `transforms.weak_view` / `test_view` of the same per-image
  generators as the input pipeline, on the resident resized image: the refresh's batches equal
  the folder path's bit for bit;
* device view (`config.adapt.refresh_device_view=True`): the flip and the random crop run on
  the device, jitted, with the host view's distribution (flip p=0.5, offsets uniform over
  0..R-C in each axis) but JAX's random numbers, so they are other draws than the host's.
"""
from __future__ import annotations

import functools
import time
from typing import Iterator, Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from eercl_jax import parallel
from eercl_jax.data import packed, pipelines
from eercl_jax.data.lists import FerList

_DEVICE_VIEW_TAG = 0x44455649   # keeps the device view's key apart from other uses of the seed


# ------------------------------------------------------------------------- the device view


@functools.partial(jax.jit, static_argnames=("seed", "resize", "crop"))
def draw_weak(index, *, seed: int, epoch, resize: int, crop: int):
  """(flip, y, x) of the device weak view of the images `index` in refresh `epoch`: flip with
  p=0.5, y and x uniform in 0..resize-crop; a pure function of (seed, epoch, index)."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), _DEVICE_VIEW_TAG), epoch)

  span = resize - crop + 1
  keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.asarray(index))
  # One draw per image of (y, x, flip), uniform over (0..span-1, 0..span-1, {0, 1}).
  draws = jax.vmap(lambda k: jax.random.randint(k, (3,), 0, jnp.array([span, span, 2])))(keys)
  return draws[:, 2] == 1, draws[:, 0], draws[:, 1]


@functools.partial(jax.jit, static_argnames=("crop",))
def crop_flip(images, flip, y, x, crop: int):
  """The host weak view's geometry on the device: flip the (B, R, R, 3) images horizontally
  where `flip`, then crop `crop` x `crop` at (y, x) (offsets in the flipped image)."""
  def one(img, f, yy, xx):
    img = jnp.where(f, img[:, ::-1], img)
    return jax.lax.dynamic_slice(img, (yy, xx, 0), (crop, crop, img.shape[-1]))
  return jax.vmap(one)(images, flip, y, x)


def device_view(images, index, *, view: str, seed: int, epoch: int, resize: int, crop: int):
  """The refresh view of resized (B, R, R, 3) uint8 images on the device."""
  if view == "test":
    o = (resize - crop) // 2
    return images[:, o:o + crop, o:o + crop]
  flip, y, x = draw_weak(index, seed=seed, epoch=epoch, resize=resize, crop=crop)
  return crop_flip(images, flip, y, x, crop)


@functools.partial(jax.jit, static_argnames=("view", "seed", "resize", "crop"))
def _view_of_rows(images, index, epoch, *, view, seed, resize, crop):
  return device_view(images, index, view=view, seed=seed, epoch=epoch, resize=resize, crop=crop)


@functools.partial(jax.jit, static_argnames=("view", "seed", "resize", "crop"))
def _view_of_resident(pixels, index, epoch, *, view, seed, resize, crop):
  return device_view(pixels[index], index, view=view, seed=seed, epoch=epoch, resize=resize,
                     crop=crop)


# ----------------------------------------------------------------------- the resident list


class _Rows:
  """Indexable by list index, for `pipelines.eval_batches(images=...)`."""

  def __init__(self, pixels: np.ndarray):
    self._pixels = pixels

  def __getitem__(self, index: int) -> np.ndarray:
    return self._pixels[index]


class Resident:
  """A packed list's resized pixels in host RAM or device memory, and the refresh's batches."""

  def __init__(self, fer_list: FerList, mesh, loader: pipelines.Loader, *, memory: str = "host",
               device_view: bool = False):
    if not fer_list.packed_dir:
      raise ValueError(f"{fer_list.list_path}: a resident list needs its packed set "
                       "(config.data.format='packed')")
    if memory not in ("host", "device"):
      raise ValueError(f"memory must be 'host' or 'device', got {memory!r}")
    self.fer_list, self.mesh, self.loader = fer_list, mesh, loader
    self.memory, self.device_view = memory, device_view
    self.resize, self.crop = loader.view_cfg.resize, loader.view_cfg.crop
    start = time.perf_counter()
    self.pixels = packed.load_resized(fer_list.packed_dir, self.resize)
    self.device_pixels = None
    if self.memory == "device":
      # Every process holds the whole array; each device gets a replica.
      sharding = parallel.replicated(mesh)
      host = self.pixels
      self.device_pixels = jax.make_array_from_callback(host.shape, sharding,
                                                        lambda idx: host[idx])
      if not self.device_view:
        logging.warning("config.adapt.refresh_memory='device' without refresh_device_view: "
                        "the host view reads the host copy")
    logging.info("refresh: %d target images resident in %s memory at %dx%d (%.1f GB) in %.1fs; "
                 "view on the %s", len(fer_list), self.memory, self.resize, self.resize,
                 self.pixels.nbytes / 1e9, time.perf_counter() - start,
                 "device" if self.device_view else "host")

  def batches(self, view: str, batch_size: int, seed: int, epoch: int) -> Iterator[dict]:
    """This process's rows of each global refresh batch (keys as `pipelines.eval_batches`:
    image, label, index, valid; with the device view 'image' is the resized image, or absent
    when the pixels are on the device)."""
    if not self.device_view:
      # In-process (no worker would receive an 18 GB array): no decode, no resize left.
      yield from self.loader.eval(self.fer_list, view, batch_size, seed=seed, epoch=epoch,
                                  images=_Rows(self.pixels))
      return
    n = len(self.fer_list)
    first_row, rows = pipelines.process_rows(batch_size, self.loader.process_index,
                                             self.loader.process_count)
    locate = pipelines.EvalLocator(n, batch_size, first_row, rows, epoch)
    for step in range(-(-n // batch_size)):
      located = [locate(step * rows + r) for r in range(rows)]
      index = np.array([i for _, i, _ in located], np.int32)
      batch = {"label": self.fer_list.labels[index], "index": index,
               "valid": np.array([v for _, _, v in located], np.bool_)}
      if self.device_pixels is None:
        batch["image"] = self.pixels[index]
      yield batch

  def images(self, batch: dict, view: str, seed: int, epoch: int):
    """The refresh view of a sharded batch from `batches`, on the device."""
    if not self.device_view:
      return batch["image"]
    kw = dict(view=view, seed=int(seed), resize=self.resize, crop=self.crop)
    if self.device_pixels is not None:
      return _view_of_resident(self.device_pixels, batch["index"], epoch, **kw)
    return _view_of_rows(batch["image"], batch["index"], epoch, **kw)


def for_refresh(fer_list: FerList, mesh, loader: pipelines.Loader, *, data_format: str,
                memory: str, device_view: bool) -> Optional[Resident]:
  """The refresh's resident list (`config.adapt.refresh_memory` 'host'/'device' with packed
  data), or None where the refresh reads through the input pipeline."""
  if data_format != "packed" or memory == "none":
    return None
  return Resident(fer_list, mesh, loader, memory=memory, device_view=device_view)
