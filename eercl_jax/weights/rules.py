"""Name rules: how one array of a weight file maps onto one variable of a Flax tree.

A rule takes a variable's path (('params' | 'batch_stats', scope, ..., leaf)) and its shape and
returns (file key, forward transform, inverse transform): `forward(array, shape)` turns the file's
array into the variable, `inverse(value)` turns the variable back into the file's array (None if
the layout cannot be written back, e.g. a fused qkv). A rule raises KeyError for a path it has no
name for. Each backbone owns the rules of the file layouts it reads (see `models/registry.py`);
this module holds the shared pieces.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

Path = tuple  # a variable's path, e.g. ('params', 'embedding', 'kernel')
Rule = Callable[[Path, tuple], tuple]


@dataclasses.dataclass(frozen=True)
class WeightFormat:
  """One file layout a backbone can load.

  anchor:   a name only this layout has (found with any key prefix, e.g. 'module.'), used to
            recognise the layout of a file.
  rule:     variable path (inside the backbone scope) -> file key and transforms.
  ignored:  key prefixes of arrays the model has no place for and may drop (classification
            heads); anything else unused is an error.
  """
  anchor: str
  rule: Rule
  ignored: tuple[str, ...] = ()

  def ignorable(self, key: str) -> bool:
    return key.startswith(self.ignored) or key.endswith("num_batches_tracked")


def identity(a, shape=None):
  del shape
  return a


def transpose(*axes):
  """(forward, inverse) transforms permuting the axes of an array."""
  inverse = tuple(np.argsort(axes))
  return (lambda a, shape=None: np.transpose(a, axes)), (lambda a: np.transpose(a, inverse))


CONV_OIHW_TO_HWIO = transpose(2, 3, 1, 0)   # torch conv weight -> flax kernel
DENSE_OI_TO_IO = transpose(1, 0)            # torch Linear weight -> flax Dense kernel


def torch_bn_rule(col: str, module: str, leaf: str) -> tuple:
  """BatchNorm: params scale/bias <- weight/bias; batch_stats mean/var <- running_mean/var."""
  name = {("params", "scale"): "weight", ("params", "bias"): "bias",
          ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}[
              (col, leaf)]
  return f"{module}.{name}", identity, identity


def torch_dense_rule(leaf: str, module: str) -> tuple:
  """torch Linear: weight (out, in) <-> kernel (in, out); bias as is."""
  if leaf == "kernel":
    return (f"{module}.weight",) + DENSE_OI_TO_IO
  if leaf == "bias":
    return f"{module}.bias", identity, identity
  raise KeyError(leaf)
