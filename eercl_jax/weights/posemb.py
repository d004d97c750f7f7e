"""Resizing a ViT position embedding to another patch grid (another image or patch size)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


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
