"""Pretrained weights: checkpoint files read without PyTorch, mapped onto the Flax variable trees.

Readers (`load_state_dict`, `read_checkpoint`), all returning numpy arrays:
  .npz          numpy archive, read with `allow_pickle=False` (the public JAX ViT files).
  .pth / .bin   `torch.save` files, zip format (PyTorch >= 1.6) or the older sequential-pickle
                format. A restricted unpickler: its `find_class` admits only the globals a tensor
                state dict (or a training checkpoint of plain containers) needs - tensor/parameter
                rebuild functions, storage and dtype names, OrderedDict, torch.Size, set - and
                anything else is an error naming the file and the global. Storages are read as
                raw bytes into numpy arrays; PyTorch is never imported.
  .safetensors  parsed directly (8-byte little-endian header length, JSON header, raw bytes); no
                dependency on the `safetensors` package.

Converters map a flat {name: array} onto the backbone scope of `EERCLModel`'s variables, chosen
by the names found in the file:
  'jax_vit'            public JAX ViT .npz (`Transformer/encoderblock_N/...`, `embedding/kernel`,
                       `cls`, `Transformer/posembed_input/pos_embedding`); identical names to
                       `vit.VisionTransformer`; `head/*` and `pre_logits/*` are ignored.
  'timm_vit'           timm state dict (`patch_embed.proj.weight`, `cls_token`, `pos_embed`,
                       `blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm`); the
                       fused qkv projection is split into query/key/value (width, heads, head_dim).
  'torchvision_resnet' torchvision ResNet state dict: conv OIHW -> HWIO, BN weight/bias -> params
                       scale/bias, running_mean/var -> batch_stats mean/var; `fc.*` ignored.
Missing or misshapen arrays raise a ValueError naming every such key with the expected and found
shapes; the position embedding alone is resized (CLS token kept, token grid interpolated) when
the image or patch grid differs.
"""
from __future__ import annotations

import collections
import io
import json
import math
import os
import pickle
import re
import struct
import types
import zipfile
import zlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

Path = tuple  # a variable's path, e.g. ('params', 'backbone', 'embedding', 'kernel')

BFLOAT16 = np.dtype(jnp.bfloat16)   # ml_dtypes' bfloat16, which numpy understands

# ----------------------------------------------------------------------------------------------
# torch.save files (.pth / .bin) without torch

_STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32), "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16), "BFloat16Storage": BFLOAT16,
    "LongStorage": np.dtype(np.int64), "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16), "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8), "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
    "UntypedStorage": np.dtype(np.uint8),
}
_TORCH_DTYPES = {
    "float32": np.float32, "float": np.float32, "float64": np.float64, "double": np.float64,
    "float16": np.float16, "half": np.float16, "bfloat16": BFLOAT16, "int64": np.int64,
    "long": np.int64, "int32": np.int32, "int": np.int32, "int16": np.int16, "short": np.int16,
    "int8": np.int8, "uint8": np.uint8, "bool": np.bool_, "complex64": np.complex64,
    "complex128": np.complex128,
}
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001


class _StorageType:
  """What `torch.FloatStorage` etc. unpickle to: only their element dtype is kept."""

  def __init__(self, name: str, dtype: np.dtype):
    self.name, self.dtype = name, np.dtype(dtype)


class _TorchDtype:
  def __init__(self, name: str, dtype):
    self.name, self.dtype = name, np.dtype(dtype)


class _Storage:
  """A storage of the file; `array` (1-D, native byte order) is filled when its bytes are read."""

  def __init__(self, key: str, dtype: np.dtype, numel: int):
    self.key, self.dtype, self.numel = key, dtype, int(numel)
    self.array: np.ndarray | None = None


class _LazyTensor:
  """A tensor view of a storage; materialised once every storage is read (the legacy format
  stores the bytes after the pickle)."""

  def __init__(self, storage, offset, size, stride, dtype=None):
    if not isinstance(storage, _Storage):
      raise ValueError(f"tensor rebuilt from {type(storage).__name__}, expected a storage")
    self.storage, self.offset = storage, int(offset)
    self.size, self.stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    self.dtype = None if dtype is None else dtype.dtype

  def materialize(self, where: str) -> np.ndarray:
    flat = self.storage.array
    if flat is None:
      raise ValueError(f"{where}: storage {self.storage.key!r} has no data (truncated file?)")
    if self.dtype is not None and self.dtype != flat.dtype:   # _rebuild_tensor_v3 on raw bytes
      flat = flat.view(np.uint8).view(self.dtype)
    count = math.prod(self.size)
    if count == 0:
      return np.zeros(self.size, flat.dtype)
    last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
    if self.offset < 0 or min(self.stride, default=0) < 0 or last >= flat.size:
      raise ValueError(f"{where}: tensor of size {self.size} reaches element {last} of storage "
                       f"{self.storage.key!r} which holds {flat.size} (truncated or corrupt file)")
    item = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(flat[self.offset:], shape=self.size,
                                           strides=[s * item for s in self.stride])
    return np.array(view)   # contiguous copy, independent of the storage


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata
  return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None):
  del requires_grad, backward_hooks, metadata
  if not isinstance(dtype, _TorchDtype):
    raise ValueError("_rebuild_tensor_v3 without a dtype")
  return _LazyTensor(storage, storage_offset, size, stride, dtype)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  del requires_grad, backward_hooks
  return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
  del requires_grad, backward_hooks, state
  return data


def _codecs_encode(text, encoding="utf-8"):
  """Protocol-2 pickles write `bytes` as `_codecs.encode(str, 'latin1')`: nothing else allowed."""
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise ValueError("_codecs.encode is only allowed for latin1 byte strings")
  return text.encode("latin1")


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("torch", "Size"): tuple,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("_codecs", "encode"): _codecs_encode,
}
for _name, _dt in _STORAGE_DTYPES.items():
  _ALLOWED_GLOBALS[("torch", _name)] = _StorageType(_name, _dt)
_ALLOWED_GLOBALS[("torch.storage", "UntypedStorage")] = _StorageType("UntypedStorage", np.uint8)
for _name, _dt in _TORCH_DTYPES.items():
  _ALLOWED_GLOBALS[("torch", _name)] = _TorchDtype(_name, _dt)


def _fresh_function(fn):
  def call(*args, **kwargs):
    return fn(*args, **kwargs)
  return call


class DisallowedGlobalError(ValueError):
  """A pickle in a checkpoint file references a global outside the allowed set."""


class _RestrictedUnpickler(pickle.Unpickler):
  def __init__(self, file, where: str, persistent_load: Callable | None = None):
    super().__init__(file, encoding="utf-8")
    self._where = where
    self._persistent = persistent_load

  def find_class(self, module, name):
    obj = _ALLOWED_GLOBALS.get((module, name))
    if isinstance(obj, (_StorageType, _TorchDtype)):
      return type(obj)(obj.name, obj.dtype)      # fresh: a BUILD opcode cannot alter shared state
    if isinstance(obj, types.FunctionType):
      return _fresh_function(obj)
    if obj is None:
      raise DisallowedGlobalError(
          f"{self._where}: the pickle references the global '{module}.{name}', which is not "
          "allowed: only PyTorch tensors, storages and plain containers are read (is this a "
          "state dict? a pickled nn.Module or arbitrary object cannot be loaded safely)")
    return obj

  def persistent_load(self, pid):
    if self._persistent is None:
      raise pickle.UnpicklingError(f"{self._where}: unexpected persistent id {pid!r}")
    return self._persistent(pid)


def _storage_from_pid(pid, where: str) -> tuple[_StorageType, str, int, Any]:
  if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
    raise ValueError(f"{where}: unsupported persistent id {pid!r} (not a tensor storage)")
  stype, key, numel = pid[1], str(pid[2]), pid[4]
  if not isinstance(stype, _StorageType):
    raise ValueError(f"{where}: storage {key!r} has type {stype!r}, expected a torch storage")
  return stype, key, int(numel), (pid[5] if len(pid) > 5 else None)


def _frombuffer(data: bytes, dtype: np.dtype, little_endian: bool) -> np.ndarray:
  if little_endian == (np.little_endian) or dtype.itemsize == 1:
    return np.frombuffer(data, dtype)
  if dtype.kind == "c":
    raise ValueError("big-endian complex tensors are not supported")
  swapped = np.frombuffer(data, np.dtype(f"u{dtype.itemsize}")).byteswap()
  return swapped.view(dtype)


def _resolve(obj, where: str):
  """Replaces lazy tensors by numpy arrays throughout a tree of plain containers."""
  if isinstance(obj, _LazyTensor):
    return obj.materialize(where)
  if isinstance(obj, dict):
    out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
    for k, v in obj.items():
      out[k] = _resolve(v, where)
    return out
  if isinstance(obj, list):
    return [_resolve(v, where) for v in obj]
  if isinstance(obj, tuple):
    return tuple(_resolve(v, where) for v in obj)
  return obj


def _read_torch_zip(path: str) -> Any:
  try:
    zf = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError, EOFError) as e:
    raise ValueError(f"{path}: not a readable torch zip checkpoint ({e}); truncated or corrupt "
                     "file?") from e
  with zf:
    names = zf.namelist()
    pkls = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
    if len(pkls) != 1:
      raise ValueError(f"{path}: a torch zip checkpoint holds one data.pkl; found {pkls}")
    prefix = pkls[0][:-len("data.pkl")]
    little = True
    if prefix + "byteorder" in names:
      little = zf.read(prefix + "byteorder").decode().strip() == "little"
    storages: dict[tuple[str, str], _Storage] = {}

    def load_storage(pid):
      stype, key, numel, _ = _storage_from_pid(pid, path)
      cache_key = (key, stype.name)
      if cache_key not in storages:
        name = f"{prefix}data/{key}"
        if name not in names:
          raise ValueError(f"{path}: storage file {name!r} is missing (truncated file?)")
        try:
          data = zf.read(name)
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
          raise ValueError(f"{path}: cannot read storage {name!r}: {e}") from e
        need = numel * stype.dtype.itemsize
        if len(data) < need:
          raise ValueError(f"{path}: storage {name!r} has {len(data)} bytes, expected {need} "
                           "(truncated file?)")
        st = _Storage(key, stype.dtype, numel)
        st.array = _frombuffer(data[:need], stype.dtype, little)
        storages[cache_key] = st
      return storages[cache_key]

    try:
      data_pkl = zf.read(pkls[0])
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
      raise ValueError(f"{path}: cannot read {pkls[0]!r}: {e} (truncated file?)") from e
    try:
      obj = _RestrictedUnpickler(io.BytesIO(data_pkl), path, load_storage).load()
    except DisallowedGlobalError:
      raise
    except ValueError:
      raise
    except Exception as e:  # UnpicklingError, EOFError, ... from a damaged pickle
      raise ValueError(f"{path}: cannot unpickle {pkls[0]!r}: {type(e).__name__}: {e}") from e
  return _resolve(obj, path)


def _read_torch_legacy(path: str) -> Any:
  """The sequential format of `torch.save(..., _use_new_zipfile_serialization=False)`: magic,
  protocol, sys info, the object pickle, the list of storage keys, then each storage's bytes
  (an int64 element count followed by the data)."""
  with open(path, "rb") as f:
    try:
      magic = _RestrictedUnpickler(f, path).load()
      if magic != _LEGACY_MAGIC:
        raise ValueError(f"{path}: not a torch checkpoint (bad magic number)")
      protocol = _RestrictedUnpickler(f, path).load()
      if protocol != _LEGACY_PROTOCOL:
        raise ValueError(f"{path}: unsupported legacy torch protocol {protocol}")
      sys_info = _RestrictedUnpickler(f, path).load()
      little = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True
      storages: dict[str, _Storage] = {}

      def load_storage(pid):
        stype, key, numel, view = _storage_from_pid(pid, path)
        if view is not None:
          raise ValueError(f"{path}: storage views of the legacy format are not supported; "
                           "re-save the file with a recent PyTorch")
        if key not in storages:
          storages[key] = _Storage(key, stype.dtype, numel)
        return storages[key]

      obj = _RestrictedUnpickler(f, path, load_storage).load()
      keys = _RestrictedUnpickler(f, path).load()
    except (DisallowedGlobalError, ValueError):
      raise
    except Exception as e:
      raise ValueError(f"{path}: cannot unpickle the legacy torch file: {type(e).__name__}: {e} "
                       "(truncated or corrupt?)") from e
    for key in keys:
      st = storages.get(str(key))
      head = f.read(8)
      if len(head) < 8:
        raise ValueError(f"{path}: storage {key!r} is missing (truncated file?)")
      numel = struct.unpack("<q" if little else ">q", head)[0]
      need = numel * (st.dtype.itemsize if st else 1)
      data = f.read(need)
      if len(data) < need:
        raise ValueError(f"{path}: storage {key!r} has {len(data)} of {need} bytes "
                         "(truncated file?)")
      if st is not None:
        st.array = _frombuffer(data, st.dtype, little)
  return _resolve(obj, path)


# ----------------------------------------------------------------------------------------------
# .safetensors and .npz

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": BFLOAT16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise ValueError(f"{path}: too short for a .safetensors file (truncated?)")
    n = struct.unpack("<Q", head)[0]
    if n > size - 8:
      raise ValueError(f"{path}: header of {n} bytes exceeds the file size {size} (truncated?)")
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"{path}: unreadable .safetensors header: {e}") from e
    start = 8 + n
    out = {}
    for name, info in header.items():
      if name == "__metadata__":
        continue
      if info.get("dtype") not in _SAFETENSORS_DTYPES:
        raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
      dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
      shape = tuple(info["shape"])
      begin, end = info["data_offsets"]
      if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
        raise ValueError(f"{path}: tensor {name!r}: {end - begin} bytes for shape {shape} "
                         f"{info['dtype']}")
      if start + end > size:
        raise ValueError(f"{path}: tensor {name!r} ends at byte {start + end} but the file has "
                         f"{size} bytes (truncated?)")
      f.seek(start + begin)
      out[name] = np.frombuffer(f.read(end - begin), dtype).reshape(shape)
  return out


def _read_npz(path: str) -> dict[str, np.ndarray]:
  try:
    with np.load(path, allow_pickle=False) as z:
      if not hasattr(z, "files"):
        raise ValueError("a single .npy array, not an .npz archive")
      return {k: z[k] for k in z.files}
  except (zipfile.BadZipFile, ValueError, EOFError, OSError, zlib.error) as e:
    raise ValueError(f"{path}: not a readable .npz archive ({e}); truncated or corrupt "
                     "file?") from e


def read_checkpoint(path: str) -> Any:
  """The object stored in `path` with every tensor as a numpy array (a dict for .npz and
  .safetensors; whatever was `torch.save`d - typically nested dicts - for .pth/.bin)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint file {path!r} does not exist")
  ext = os.path.splitext(path)[1].lower()
  with open(path, "rb") as f:
    magic = f.read(4)
  if ext == ".safetensors":
    return _read_safetensors(path)
  if ext == ".npz":
    return _read_npz(path)
  if magic[:2] == b"PK":   # zip: a torch zip checkpoint or an .npz under another name
    try:
      with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
      raise ValueError(f"{path}: not a readable zip archive ({e}); truncated or corrupt "
                       "file?") from e
    if any(n.endswith("data.pkl") for n in names):
      return _read_torch_zip(path)
    if names and all(n.endswith(".npy") for n in names):
      return _read_npz(path)
    raise ValueError(f"{path}: zip archive is neither a torch checkpoint nor an .npz")
  if magic[:1] == b"\x80":   # a pickle: the legacy torch format
    return _read_torch_legacy(path)
  if ext in (".pth", ".pt", ".bin", ".ckpt"):
    raise ValueError(f"{path}: not a torch checkpoint (neither zip nor pickle)")
  return _read_safetensors(path)


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
    raise ValueError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
  if key is not None:
    if key not in obj:
      raise ValueError(f"{path}: has no entry {key!r} (entries: {sorted(map(str, obj))})")
    obj = obj[key]
  elif not all(_is_array(v) for v in obj.values()):
    for cand in _STATE_DICT_KEYS:
      if isinstance(obj.get(cand), dict) and any(_is_array(v) for v in obj[cand].values()):
        logging.info("%s: using its %r entry as the state dict", path, cand)
        obj = obj[cand]
        break
  sd = _flatten_arrays(obj)
  if not sd:
    raise ValueError(f"{path}: holds no arrays")
  return {str(k): v for k, v in sd.items()}


# ----------------------------------------------------------------------------------------------
# Format detection

_ANCHORS = {
    "jax_vit": "Transformer/encoder_norm/scale",
    "timm_vit": "blocks.0.attn.qkv.weight",
    "torchvision_resnet": "layer1.0.conv1.weight",
}
BACKBONE_FORMATS = {"vit": ("jax_vit", "timm_vit"), "resnet50": ("torchvision_resnet",)}


def detect_format(sd: dict[str, np.ndarray], where: str = "state dict") -> tuple[str, str]:
  """(format, key prefix) from the names: 'jax_vit', 'timm_vit' or 'torchvision_resnet'. With a
  prefix (e.g. 'module.' or 'opt/target/') the shortest one holding a full backbone wins."""
  found = []
  for fmt, anchor in _ANCHORS.items():
    for k in sd:
      if k.endswith(anchor):
        prefix = k[:-len(anchor)]
        if prefix == "" or prefix.endswith((".", "/")):
          found.append((len(prefix), prefix, fmt))
  if not found:
    sample = ", ".join(sorted(sd)[:8])
    raise ValueError(f"{where}: unknown weight layout: no name ends with any of "
                     f"{sorted(_ANCHORS.values())} (first names: {sample})")
  found.sort()
  best = [f for f in found if f[0] == found[0][0]]
  if len({f[2] for f in best}) > 1:
    raise ValueError(f"{where}: ambiguous layout, matches {sorted({f[2] for f in best})}")
  _, prefix, fmt = found[0]
  return fmt, prefix


# ----------------------------------------------------------------------------------------------
# Per-array rules: a model path -> (file key, forward transform, inverse transform)

Rule = Callable[[Path, tuple], tuple]  # (path, expected shape) -> (key, fwd(a, shape), inv(a))


def identity(a, shape=None):
  del shape
  return a


def _transpose(*axes):
  inverse = tuple(np.argsort(axes))
  return (lambda a, shape=None: np.transpose(a, axes)), (lambda a: np.transpose(a, inverse))


_CONV_OIHW_TO_HWIO = _transpose(2, 3, 1, 0)
_DENSE_OI_TO_IO = _transpose(1, 0)


def jax_vit_rule(path: Path, shape: tuple) -> tuple:
  """Public JAX names are the module's own names joined by '/'."""
  del shape
  if path[0] != "params":
    raise KeyError(path)
  return "/".join(path[1:]), identity, identity


_TIMM_BLOCK = {"LayerNorm_0": "norm1", "LayerNorm_2": "norm2", "Dense_0": "mlp.fc1",
               "Dense_1": "mlp.fc2"}
_QKV = {"query": 0, "key": 1, "value": 2}


def _qkv_split(j: int, leaf: str):
  def fwd(a, shape):
    width = a.shape[-1] if leaf == "kernel" else a.shape[0] // 3
    if a.shape[0] != 3 * width:
      raise ValueError(f"fused qkv of shape {a.shape} is not 3 x width")
    part = a[j * width:(j + 1) * width]
    return (part.T if leaf == "kernel" else part).reshape(shape)
  return fwd


def timm_vit_rule(path: Path, shape: tuple) -> tuple:
  """timm / DeiT / the original's SSRT `VT` names (identical layout)."""
  if path[0] != "params":
    raise KeyError(path)
  p = path[1:]
  leaf = p[-1]
  tw = {"kernel": "weight", "scale": "weight", "bias": "bias"}.get(leaf)
  if p == ("embedding", "kernel"):
    return ("patch_embed.proj.weight",) + _CONV_OIHW_TO_HWIO
  if p == ("embedding", "bias"):
    return "patch_embed.proj.bias", identity, identity
  if p == ("cls",):
    return "cls_token", identity, identity
  if p == ("Transformer", "posembed_input", "pos_embedding"):
    return "pos_embed", identity, identity
  if p[:2] == ("Transformer", "encoder_norm"):
    return f"norm.{tw}", identity, identity
  m = re.fullmatch(r"encoderblock_(\d+)", p[1]) if len(p) > 2 and p[0] == "Transformer" else None
  if m is None:
    raise KeyError(path)
  blk = f"blocks.{m.group(1)}"
  sub = p[2:]
  if sub[0] in ("LayerNorm_0", "LayerNorm_2"):
    return f"{blk}.{_TIMM_BLOCK[sub[0]]}.{tw}", identity, identity
  if sub[0] == "MlpBlock_3":
    key = f"{blk}.{_TIMM_BLOCK[sub[1]]}.{tw}"
    return ((key,) + _DENSE_OI_TO_IO) if leaf == "kernel" else (key, identity, identity)
  if sub[0] == "MultiHeadDotProductAttention_1":
    if sub[1] in _QKV:
      return f"{blk}.attn.qkv.{tw}", _qkv_split(_QKV[sub[1]], leaf), None
    if sub[1] == "out" and leaf == "kernel":
      return (f"{blk}.attn.proj.weight", lambda a, s: a.T.reshape(s),
              lambda a: a.reshape(-1, a.shape[-1]).T)
    if sub[1] == "out":
      return f"{blk}.attn.proj.bias", identity, identity
  raise KeyError(path)


def _torch_module_name(name: str) -> str:
  m = re.fullmatch(r"layer(\d+)_(\d+)", name)
  if m:
    return f"layer{m.group(1)}.{m.group(2)}"
  return {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}.get(name, name)


def torch_bn_rule(col: str, module: str, leaf: str) -> tuple:
  """BatchNorm: params scale/bias <- weight/bias; batch_stats mean/var <- running_mean/var."""
  name = {("params", "scale"): "weight", ("params", "bias"): "bias",
          ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}[
              (col, leaf)]
  return f"{module}.{name}", identity, identity


def torchvision_resnet_rule(path: Path, shape: tuple) -> tuple:
  del shape
  col, *mods, leaf = path
  module = ".".join(_torch_module_name(m) for m in mods)
  if leaf == "kernel":
    return (f"{module}.weight",) + _CONV_OIHW_TO_HWIO
  return torch_bn_rule(col, module, leaf)


_RULES = {"jax_vit": jax_vit_rule, "timm_vit": timm_vit_rule,
          "torchvision_resnet": torchvision_resnet_rule}


def _ignorable(fmt: str) -> Callable[[str], bool]:
  if fmt == "jax_vit":
    return lambda k: k.startswith(("head/", "pre_logits/"))
  if fmt == "timm_vit":
    return lambda k: k.startswith(("head.", "head_dist.", "pre_logits."))
  return lambda k: k.startswith("fc.") or k.endswith("num_batches_tracked")


# ----------------------------------------------------------------------------------------------
# Position-embedding resizing

def _square_grid(num_patches: int, what: str) -> tuple[int, int]:
  g = math.isqrt(num_patches)
  if g * g != num_patches:
    raise ValueError(f"{what}: {num_patches} patch tokens do not form a square grid")
  return g, g


def resize_pos_embedding(pos: np.ndarray, new_grid: tuple[int, int] | int,
                         num_prefix_tokens: int = 1, method: str = "bilinear",
                         old_grid: tuple[int, int] | None = None) -> np.ndarray:
  """(1, prefix + gh*gw, D) -> (1, prefix + nh*nw, D): the prefix (CLS) tokens are kept, the
  patch-token grid is interpolated ('bilinear' or 'bicubic', half-pixel centres as PyTorch's
  align_corners=False; antialiased when shrinking). `new_grid` is (nh, nw) or a token count
  (incl. prefix) of a square grid."""
  pos = np.asarray(pos)
  if pos.ndim != 3 or pos.shape[0] != 1:
    raise ValueError(f"position embedding of shape {pos.shape}: expected (1, tokens, width)")
  prefix, grid = pos[:, :num_prefix_tokens], pos[0, num_prefix_tokens:]
  if old_grid is None:
    old_grid = _square_grid(grid.shape[0], "position embedding")
  if isinstance(new_grid, int):
    new_grid = _square_grid(new_grid - num_prefix_tokens, "target position embedding")
  if method not in ("bilinear", "bicubic"):
    raise ValueError(f"resize method {method!r}: expected 'bilinear' or 'bicubic'")
  grid = grid.reshape(*old_grid, -1)
  if tuple(old_grid) == tuple(new_grid):
    resized = grid
  else:
    resized = jax.image.resize(jnp.asarray(grid, jnp.float32), (*new_grid, grid.shape[-1]),
                               method=method)
    resized = np.asarray(resized).astype(pos.dtype)
  return np.concatenate([prefix, resized.reshape(1, -1, grid.shape[-1])], axis=1)


# ----------------------------------------------------------------------------------------------
# Applying rules

def convert_arrays(sd: dict[str, np.ndarray], expected: dict[Path, tuple], rule: Rule,
                   where: str, resize_method: str = "bilinear") -> tuple[dict, set, list]:
  """Values for every path of `expected` ({path: shape}) from `sd` through `rule`.

  Returns (values {path: array}, file keys used, notes on resized arrays). Raises a ValueError
  that lists every missing key and every shape mismatch (expected vs found).
  """
  values, used, missing, bad, resized = {}, set(), [], [], []
  for path, shape in expected.items():
    shape = tuple(shape)
    name = "/".join(path)
    try:
      key, fwd, _ = rule(path, shape)
    except KeyError:
      bad.append(f"{name}: no rule maps a file array onto it")
      continue
    if key not in sd:
      missing.append(f"{key} (for {name}, shape {shape})")
      continue
    used.add(key)
    src = np.asarray(sd[key])
    try:
      value = np.asarray(fwd(src, shape))
    except (ValueError, TypeError) as e:
      bad.append(f"{key}: found {src.shape}, cannot become {name} {shape} ({e})")
      continue
    if value.shape != shape and path[-1] == "pos_embedding" and value.ndim == 3 \
        and value.shape[0] == 1 and value.shape[2] == shape[2]:
      try:
        value = resize_pos_embedding(value, shape[1], method=resize_method)
      except ValueError as e:
        bad.append(f"{key}: found {src.shape}, cannot be resized to {shape} ({e})")
        continue
      resized.append(f"{name}: file {src.shape} -> model {shape}, {resize_method} resize of "
                     "the patch grid (CLS kept)")
    if value.shape != shape:
      bad.append(f"{key}: expected {shape} (as {name}), found {src.shape}"
                 + (f" -> {value.shape}" if value.shape != src.shape else ""))
      continue
    values[path] = value
  if missing or bad:
    lines = ([f"missing: {m}" for m in missing] + [f"mismatched: {b}" for b in bad])
    raise ValueError(f"{where}: {len(missing)} missing and {len(bad)} mismatched arrays "
                     "(wrong architecture/size, or a truncated file):\n  " + "\n  ".join(lines))
  return values, used, resized


def _flat_shapes(tree) -> dict[Path, tuple]:
  return {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(tree).items()}


def _backbone_trees(variables) -> dict[str, Any]:
  return {col: variables[col]["backbone"] for col in ("params", "batch_stats")
          if col in variables and "backbone" in variables[col]}


def convert_backbone(sd: dict[str, np.ndarray], backbone: str, backbone_variables: dict,
                     where: str, resize_method: str = "bilinear",
                     fmt: str | None = None, prefix: str | None = None) -> tuple[dict, dict]:
  """Backbone arrays from a state dict. `backbone_variables` = {'params': ..., 'batch_stats': ...}
  of the backbone scope (arrays or ShapeDtypeStructs). Returns ({(col, *path): array}, report)."""
  if backbone not in BACKBONE_FORMATS:
    raise ValueError(f"unknown backbone {backbone!r}")
  if fmt is None:
    fmt, found_prefix = detect_format(sd, where)
    prefix = found_prefix if prefix is None else prefix
  prefix = prefix or ""
  if fmt not in BACKBONE_FORMATS[backbone]:
    raise ValueError(f"{where}: holds {fmt} weights, which do not fit "
                     f"config.model.backbone={backbone!r} (expected one of "
                     f"{list(BACKBONE_FORMATS[backbone])})")
  sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
  expected = _flat_shapes(backbone_variables)
  values, used, resized = convert_arrays(sub, expected, _RULES[fmt], where, resize_method)
  ignorable = _ignorable(fmt)
  unexpected = sorted(k for k in sub if k not in used and not ignorable(k))
  if unexpected:
    raise ValueError(f"{where}: {len(unexpected)} arrays of the {fmt} file have no place in the "
                     f"model (deeper or different architecture?): {', '.join(unexpected[:20])}"
                     + (" ..." if len(unexpected) > 20 else ""))
  ignored = sorted(prefix + k for k in sub if k not in used)
  ignored += sorted(k for k in sd if not k.startswith(prefix))
  report = {"format": fmt, "prefix": prefix, "loaded": sorted("/".join(p) for p in values),
            "ignored": ignored, "mismatched": resized}
  return values, report


def _like(old, value: np.ndarray):
  """`value` with the dtype (and, for jax arrays, the sharding) of the leaf it replaces."""
  dtype = old.dtype
  value = np.asarray(value).astype(dtype)
  if isinstance(old, jax.Array):
    return jax.device_put(value, old.sharding)
  return value


def init_backbone(model_config, variables: dict, path: str,
                  resize_method: str = "bilinear") -> tuple[dict, dict]:
  """Loads the backbone of `variables` (EERCLModel's {'params', 'batch_stats'}) from `path`.

  `model_config.backbone` ('vit' | 'resnet50') selects the accepted layouts; the file's layout
  is detected from its names. Returns (new variables, report) where report has 'loaded' (model
  paths), 'newly_initialised' (model paths left as initialised: the EERCL head), 'ignored' (file
  keys not used, e.g. a classification head), 'mismatched' (resized position embeddings), plus
  'format' and 'path'. Leaves keep their dtype and sharding.
  """
  if not path:
    return variables, {"loaded": [], "newly_initialised": sorted(
        "/".join(p) for p in traverse_util.flatten_dict(dict(variables))), "ignored": [],
        "mismatched": [], "format": None, "path": ""}
  sd = load_state_dict(path)
  values, report = convert_backbone(sd, model_config.backbone, _backbone_trees(variables), path,
                                    resize_method)
  flat = traverse_util.flatten_dict({k: v for k, v in dict(variables).items()})
  new_flat, fresh = {}, []
  for p, leaf in flat.items():
    key = (p[0],) + p[2:] if len(p) > 2 and p[1] == "backbone" else None
    if key is not None and key in values:
      new_flat[p] = _like(leaf, values[key])
    else:
      new_flat[p] = leaf
      fresh.append("/".join(p))
  report["loaded"] = sorted(f"{p[0]}/backbone/{'/'.join(p[1:])}" for p in values)
  report["newly_initialised"] = sorted(fresh)
  report["path"] = path
  _log_report(report, sum(math.prod(np.shape(v)) for v in values.values()))
  return traverse_util.unflatten_dict(new_flat), report


def _log_report(report: dict, num_values: int) -> None:
  scopes = collections.Counter(p.split("/")[1] if "/" in p else p
                               for p in report["newly_initialised"])
  logging.info("pretrained backbone from %s (%s layout%s): loaded %d arrays (%.2fM values)",
               report["path"], report["format"],
               f", prefix {report['prefix']!r}" if report.get("prefix") else "",
               len(report["loaded"]), num_values / 1e6)
  if scopes:
    logging.info("  newly initialised: %s", ", ".join(f"{s} ({n})" for s, n in
                                                     sorted(scopes.items())))
  if report["ignored"]:
    shown = report["ignored"][:10]
    logging.info("  ignored file arrays (%d): %s%s", len(report["ignored"]), ", ".join(shown),
                 " ..." if len(report["ignored"]) > 10 else "")
  for line in report["mismatched"]:
    logging.info("  %s", line)


# ----------------------------------------------------------------------------------------------
# Export

def backbone_state_dict(variables: dict, backbone: str) -> dict[str, np.ndarray]:
  """The backbone as a flat state dict: public JAX .npz names for the ViT, torchvision names
  (OIHW convs, BN weight/bias/running_mean/running_var) for the ResNet."""
  trees = _backbone_trees(variables)
  flat = traverse_util.flatten_dict(trees)
  rule = {"vit": jax_vit_rule, "resnet50": torchvision_resnet_rule}.get(backbone)
  if rule is None:
    raise ValueError(f"unknown backbone {backbone!r}")
  out = {}
  for p, v in flat.items():
    key, _, inv = rule(p, tuple(np.shape(v)))
    out[key] = np.asarray(inv(np.asarray(jax.device_get(v))))
  return out


def export_backbone_npz(variables: dict, model_config, path: str) -> str:
  """Writes the backbone of `variables` to `path` (.npz, exactly that name) in the layout
  `backbone_state_dict` describes; `init_backbone` reads it back exactly."""
  sd = backbone_state_dict(variables, model_config.backbone)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "wb") as f:
    np.savez(f, **sd)
  logging.info("exported %d backbone arrays to %s", len(sd), path)
  return path
