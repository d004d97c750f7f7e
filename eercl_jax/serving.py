"""The exported model's serving form: a TensorFlow SavedModel of the eval forward, written by
`jax2tf` (the StableHLO of the JAX function inside one XlaCallModule op, lowered for CPU and
CUDA), so TF Serving or any TensorFlow program runs it without JAX or this code (docs/export.md).

Signature 'serving_default':
  input   images: uint8 (N, crop, crop, 3), RGB, already resized and centre-cropped as the
          manifest's input says (the normalisation is inside the model)
  outputs logits (N, C) float32, probabilities (N, C) float32 (softmax of the logits),
          features (N, feat_dim) float32 (the L2-normalised feature f)
N is free. The variables are TF variables of the SavedModel (not constants in the program), and
the manifest is one of its assets (assets/manifest.json: the class names, the input sizes).
"""
from __future__ import annotations

import os
import shutil
from typing import Callable, Sequence

import jax

from eercl_jax import losses
from eercl_jax.data import pipelines

SIGNATURE = "serving_default"
INPUT = "images"
OUTPUTS = ("logits", "probabilities", "features")
PLATFORMS = ("cpu", "cuda")


def forward(model, norm: pipelines.Normalization) -> Callable[[dict, jax.Array], dict]:
  """(variables, uint8 NHWC crops) -> {'logits', 'probabilities', 'features'}: the eval-mode
  forward of `evaluation.Evaluator` with the normalisation in front."""
  def serve(variables, images):
    feat, logits = model.apply(variables, norm(images), train=False)
    return {"logits": logits, "probabilities": jax.nn.softmax(logits, -1),
            "features": losses.l2_normalize(feat)}
  return serve


def describe(crop: int, path: str = "saved_model") -> dict:
  """The manifest's serving entry of a SavedModel written by `write_saved_model`."""
  return {"path": path, "signature": SIGNATURE, "input": INPUT,
          "input_shape": [None, int(crop), int(crop), 3], "input_dtype": "uint8",
          "outputs": list(OUTPUTS), "platforms": list(PLATFORMS)}


def write_saved_model(path: str, model, variables: dict, norm: pipelines.Normalization,
                      crop: int, manifest_file: str | None = None,
                      platforms: Sequence[str] = PLATFORMS) -> str:
  """Writes the SavedModel of `model` with `variables` (host arrays) to `path`; returns it."""
  # pylint: disable=import-outside-toplevel
  import numpy as np
  import tensorflow as tf
  from jax.experimental import jax2tf
  tf_variables = jax.tree_util.tree_map(
      lambda x: tf.Variable(np.asarray(x), trainable=False), variables)
  converted = jax2tf.convert(forward(model, norm), polymorphic_shapes=[None, "(b, ...)"],
                             with_gradient=False,
                             native_serialization_platforms=tuple(platforms))
  module = tf.Module()
  # Tracked, so they are saved as the SavedModel's variables.
  module.variables_list = jax.tree_util.tree_leaves(tf_variables)

  @tf.function(autograph=False, input_signature=[
      tf.TensorSpec([None, crop, crop, 3], tf.uint8, name=INPUT)])
  def serve(images):
    return converted(tf_variables, images)

  module.serve = serve
  if manifest_file is not None:
    module.manifest = tf.saved_model.Asset(manifest_file)
  if os.path.exists(path):
    shutil.rmtree(path)
  tf.saved_model.save(module, path, signatures={SIGNATURE: serve})
  return path
