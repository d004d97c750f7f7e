"""The restricted reader of `torch.save` files (.pth / .pt / .bin / .ckpt), without PyTorch.

Both formats: zip (PyTorch >= 1.6: `data.pkl` plus one file per storage) and the older sequential
one (magic, protocol, sys info, object pickle, storage keys, then the storages' bytes). The pickle
goes through `_RestrictedUnpickler`, whose `find_class` admits only the globals a tensor state
dict (or a training checkpoint of plain containers) needs - tensor/parameter rebuild functions,
storage and dtype names, OrderedDict, torch.Size, set - and anything else is a
`DisallowedGlobalError` naming the file and the global, raised before any object is built.
Storages are read as raw bytes into numpy arrays.

Why not `torch.load(weights_only=True)`: it is equally restrictive, but would make PyTorch a
runtime dependency; torch is only needed by the tests (requirements-dev.txt), so this reader stays.
"""
from __future__ import annotations

import collections
import io
import math
import pickle
import struct
import types
import zipfile
import zlib
from typing import Any, Callable

import ml_dtypes
import numpy as np

from eercl_jax.errors import WeightsError

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)   # what jnp.bfloat16 is; numpy understands it

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
    if count > flat.size:
      # Only an overlapping (e.g. stride-0) view has more elements than its storage; a state dict
      # never holds one, and materialising it could blow a tiny file up to gigabytes.
      raise ValueError(f"{where}: tensor of size {self.size} has {count} elements but its "
                       f"storage {self.storage.key!r} holds {flat.size}: an overlapping view, "
                       "not a state-dict tensor (corrupt or crafted file)")
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


class DisallowedGlobalError(WeightsError):
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


def is_torch_zip(names: list[str]) -> bool:
  """Whether a zip archive's member names are those of a torch zip checkpoint."""
  return any(n == "data.pkl" or n.endswith("/data.pkl") for n in names)


def read_torch(path: str) -> Any:
  """The object `torch.save`d in `path` (zip or legacy format), every tensor a numpy array."""
  with open(path, "rb") as f:
    magic = f.read(2)
  if magic == b"PK":
    return _read_torch_zip(path)
  if magic[:1] == b"\x80":   # a pickle protocol opcode: the legacy format
    return _read_torch_legacy(path)
  raise ValueError(f"{path}: not a torch checkpoint (neither zip nor pickle)")
