"""Weight files read into numpy arrays, without PyTorch.

  .npz          numpy archive, read with `allow_pickle=False` (the public JAX ViT files).
  .pth / .bin   `torch.save` files, zip or legacy format, through the restricted unpickler of
                `torch_pickle` (only tensors and plain containers; anything else is an error).
  .safetensors  the `safetensors` library's numpy loader. BF16 tensors come back as ml_dtypes'
                bfloat16 (the same bits): numpy resolves the name 'bfloat16' once ml_dtypes is
                imported, which this module does.

Damaged files raise a `WeightsError` (a user mistake: one line, exit code 2) naming the file
(and saying "truncated or corrupt").
"""
from __future__ import annotations

import os
import zipfile
import zlib
from typing import Any

import ml_dtypes  # noqa: F401  pylint: disable=unused-import  (registers numpy's 'bfloat16')
import numpy as np
import safetensors.numpy
from absl import logging

from eercl_jax.errors import WeightsError
from eercl_jax.weights import torch_pickle
from eercl_jax.weights.torch_pickle import BFLOAT16, DisallowedGlobalError  # noqa: F401


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  try:
    return dict(safetensors.numpy.load_file(path))
  except Exception as e:  # SafetensorError (bad header, short file), TypeError/AttributeError
    # (a dtype numpy has no name for, e.g. F8): all mean the file cannot be used as is.
    raise WeightsError(f"{path}: not a readable .safetensors file ({type(e).__name__}: {e}); "
                       "truncated or corrupt file, or an unsupported dtype?") from e


def read_npz(path: str) -> dict[str, np.ndarray]:
  try:
    with np.load(path, allow_pickle=False) as z:
      if not hasattr(z, "files"):
        raise WeightsError("a single .npy array, not an .npz archive")
      return {k: z[k] for k in z.files}
  except (zipfile.BadZipFile, ValueError, EOFError, OSError, zlib.error) as e:
    raise WeightsError(f"{path}: not a readable .npz archive ({e}); truncated or corrupt "
                       "file?") from e


def read_checkpoint(path: str) -> Any:
  """The object stored in `path` with every tensor as a numpy array (a dict for .npz and
  .safetensors; whatever was `torch.save`d - typically nested dicts - for .pth/.bin)."""
  try:
    return _read_checkpoint(path)
  except WeightsError:
    raise
  except ValueError as e:   # the unpickler's, which name the file: a damaged file
    raise WeightsError(str(e)) from e


def _read_checkpoint(path: str) -> Any:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint file {path!r} does not exist")
  ext = os.path.splitext(path)[1].lower()
  with open(path, "rb") as f:
    magic = f.read(4)
  if ext == ".safetensors":
    return read_safetensors(path)
  if ext == ".npz":
    return read_npz(path)
  if magic[:2] == b"PK":   # zip: a torch zip checkpoint or an .npz under another name
    try:
      with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
      raise WeightsError(f"{path}: not a readable zip archive ({e}); truncated or corrupt "
                         "file?") from e
    if torch_pickle.is_torch_zip(names):
      return torch_pickle.read_torch(path)
    if names and all(n.endswith(".npy") for n in names):
      return read_npz(path)
    raise WeightsError(f"{path}: zip archive is neither a torch checkpoint nor an .npz")
  if magic[:1] == b"\x80":   # a pickle: the legacy torch format
    return torch_pickle.read_torch(path)
  if ext in (".pth", ".pt", ".bin", ".ckpt"):
    raise WeightsError(f"{path}: not a torch checkpoint (neither zip nor pickle)")
  return read_safetensors(path)


def _is_array(x) -> bool:
  return isinstance(x, np.ndarray)


def _flatten_arrays(obj, prefix: str = "") -> dict[str, np.ndarray]:
  out = {}
  if isinstance(obj, dict):
    for k, v in obj.items():
      out.update(_flatten_arrays(v, f"{prefix}{k}."))
  elif isinstance(obj, (list, tuple)):
    for i, v in enumerate(obj):
      out.update(_flatten_arrays(v, f"{prefix}{i}."))
  elif _is_array(obj):
    out[prefix[:-1]] = obj
  return out


_STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict", "module", "params")


def load_state_dict(path: str, key: str | None = None) -> dict[str, np.ndarray]:
  """Flat {name: numpy array} of a .npz, .pth/.bin (torch.save) or .safetensors file.

  A torch checkpoint holding more than a state dict is reduced to `obj[key]` if `key` is given,
  else to the first of 'state_dict', 'model', 'model_state_dict', 'module', 'params' that holds
  arrays, else to every array in it with '.'-joined names. Non-array entries are dropped.
  """
  obj = read_checkpoint(path)
  if not isinstance(obj, dict):
    raise WeightsError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
  if key is not None:
    if key not in obj:
      raise WeightsError(f"{path}: has no entry {key!r} (entries: {sorted(map(str, obj))})")
    obj = obj[key]
  elif not all(_is_array(v) for v in obj.values()):
    for cand in _STATE_DICT_KEYS:
      if isinstance(obj.get(cand), dict) and any(_is_array(v) for v in obj[cand].values()):
        logging.info("%s: using its %r entry as the state dict", path, cand)
        obj = obj[cand]
        break
  sd = _flatten_arrays(obj)
  if not sd:
    raise WeightsError(f"{path}: holds no arrays")
  return {str(k): v for k, v in sd.items()}
