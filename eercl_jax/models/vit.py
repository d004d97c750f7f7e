"""Vision Transformer (pre-LN, CLS token) with the parameter names of the public JAX checkpoints.

Submodule names follow the `.npz` files of google-research/vision_transformer and big_vision
(`embedding`, `cls`, `Transformer/posembed_input/pos_embedding`, `Transformer/encoderblock_{i}/...`,
`Transformer/encoder_norm`), so a checkpoint maps onto the tree by name. Names are given
explicitly: Flax's automatic names count per class today, while the checkpoints were written when
the counter was shared (hence `LayerNorm_0`, `MultiHeadDotProductAttention_1`, `LayerNorm_2`,
`MlpBlock_3`). The classification head of the checkpoints is not part of this module.
"""
from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from eercl_jax.weights import rules
from eercl_jax.weights.rules import identity

# variant -> (width, depth, mlp_dim, num_heads). Ti..H as in the ViT / AugReg papers; 'mu' is a
# tiny size for tests.
VIT_VARIANTS = {
    "mu": (64, 2, 128, 2),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
}


def parse_vit_size(name: str) -> dict[str, int]:
  """'B/16' -> dict(patch_size=16, width=768, depth=12, mlp_dim=3072, num_heads=12)."""
  m = re.fullmatch(r"(\w+)/(\d+)", name)
  if not m or m.group(1) not in VIT_VARIANTS:
    raise ValueError(f"unknown ViT size {name!r}: expected '<variant>/<patch>' with variant in "
                     f"{sorted(VIT_VARIANTS)}, e.g. 'B/16'")
  width, depth, mlp_dim, num_heads = VIT_VARIANTS[m.group(1)]
  return dict(patch_size=int(m.group(2)), width=width, depth=depth, mlp_dim=mlp_dim,
              num_heads=num_heads)


VIT_SIZES = {f"{v}/{p}": parse_vit_size(f"{v}/{p}")
             for v in VIT_VARIANTS for p in (8, 14, 16, 32)}

# Random-init choices of the original ViT code (used only when no checkpoint is loaded).
_dense_init = nn.initializers.xavier_uniform()
_mlp_bias_init = nn.initializers.normal(stddev=1e-6)


class MlpBlock(nn.Module):
  mlp_dim: int
  dropout: float = 0.0
  deterministic: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=_dense_init,
                 bias_init=_mlp_bias_init, name="Dense_0")(x)
    x = nn.gelu(x, approximate=False)   # exact erf GELU, as the original ViT
    x = nn.Dropout(self.dropout)(x, deterministic=self.deterministic)
    x = nn.Dense(width, dtype=self.dtype, kernel_init=_dense_init,
                 bias_init=_mlp_bias_init, name="Dense_1")(x)
    return nn.Dropout(self.dropout)(x, deterministic=self.deterministic)


class EncoderBlock(nn.Module):
  """Pre-LN block: x + MHA(LN(x)); x + MLP(LN(x))."""
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  attention_dropout: float = 0.0
  deterministic: bool = True    # a field, not a call argument, so nn.remat needs no static args
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="LayerNorm_0")(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, kernel_init=_dense_init,
        dropout_rate=self.attention_dropout, deterministic=self.deterministic,
        force_fp32_for_softmax=True,   # bf16 softmax over 197 tokens loses accuracy
        name="MultiHeadDotProductAttention_1")(y)
    y = nn.Dropout(self.dropout)(y, deterministic=self.deterministic)
    x = x + y
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="LayerNorm_2")(x)
    y = MlpBlock(self.mlp_dim, self.dropout, self.deterministic, self.dtype, name="MlpBlock_3")(y)
    return x + y


class AddPositionEmbedding(nn.Module):
  """Learned position embedding, param `pos_embedding` of shape (1, tokens, width)."""

  @nn.compact
  def __call__(self, x):
    pos = self.param("pos_embedding", nn.initializers.normal(stddev=0.02),
                     (1,) + x.shape[1:], jnp.float32)
    return x + pos.astype(x.dtype)


class Encoder(nn.Module):
  """The checkpoints' `Transformer` scope: position embedding, blocks, final LayerNorm."""
  depth: int
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  attention_dropout: float = 0.0
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = AddPositionEmbedding(name="posembed_input")(x)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    # Rematerialising blocks trades ~1/3 more compute for activation memory at large batches.
    block_cls = nn.remat(EncoderBlock) if self.remat else EncoderBlock
    for i in range(self.depth):
      x = block_cls(mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout=self.dropout,
                    attention_dropout=self.attention_dropout, deterministic=not train,
                    dtype=self.dtype, name=f"encoderblock_{i}")(x)
    return nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="encoder_norm")(x)


class VisionTransformer(nn.Module):
  """ViT backbone: NHWC images -> (N, width) CLS token after the final LayerNorm.

  `dtype` is the compute dtype (e.g. bfloat16 on GPU); parameters stay float32.
  """
  patch_size: int
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  attention_dropout: float = 0.0
  dtype: Any = jnp.float32
  remat: bool = False

  @classmethod
  def from_size(cls, size: str, **kwargs) -> "VisionTransformer":
    return cls(**parse_vit_size(size), **kwargs)

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, groups: int = 1) -> jax.Array:
    del groups  # no batch norm in a ViT: the BN groups only concern the head
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                name="embedding")(x)
    n, gh, gw, c = x.shape
    x = x.reshape(n, gh * gw, c)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, c), jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (n, 1, c)), x], axis=1)
    x = Encoder(depth=self.depth, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
                dropout=self.dropout, attention_dropout=self.attention_dropout,
                dtype=self.dtype, remat=self.remat, name="Transformer")(x, train=train)
    return x[:, 0]


def build(size: str, dtype: Any = jnp.float32, remat: bool = False, **kwargs) -> VisionTransformer:
  return VisionTransformer.from_size(size, dtype=dtype, remat=remat, **kwargs)


# ----------------------------------------------------------------------------------------------
# Weight-file layouts: variable path (inside the backbone scope) -> file key and transforms

def jax_vit_rule(path, shape):
  """The public JAX .npz names are the module's own names joined by '/'."""
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


def timm_vit_rule(path, shape):
  """timm / DeiT names (the original's ViT body uses the same layout)."""
  del shape
  if path[0] != "params":
    raise KeyError(path)
  p = path[1:]
  leaf = p[-1]
  tw = {"kernel": "weight", "scale": "weight", "bias": "bias"}.get(leaf)
  if p == ("embedding", "kernel"):
    return ("patch_embed.proj.weight",) + rules.CONV_OIHW_TO_HWIO
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
    return rules.torch_dense_rule(leaf, f"{blk}.{_TIMM_BLOCK[sub[1]]}")
  if sub[0] == "MultiHeadDotProductAttention_1":
    if sub[1] in _QKV:
      return f"{blk}.attn.qkv.{tw}", _qkv_split(_QKV[sub[1]], leaf), None
    if sub[1] == "out" and leaf == "kernel":
      return (f"{blk}.attn.proj.weight", lambda a, s: a.T.reshape(s),
              lambda a: a.reshape(-1, a.shape[-1]).T)
    if sub[1] == "out":
      return f"{blk}.attn.proj.bias", identity, identity
  raise KeyError(path)


WEIGHT_FORMATS = {
    "jax_vit": rules.WeightFormat("Transformer/encoder_norm/scale", jax_vit_rule,
                                  ignored=("head/", "pre_logits/")),
    "timm_vit": rules.WeightFormat("blocks.0.attn.qkv.weight", timm_vit_rule,
                                   ignored=("head.", "head_dist.", "pre_logits.")),
}
