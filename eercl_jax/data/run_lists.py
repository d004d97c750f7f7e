"""The lists of a run, from its `config.data`: the built-in synthetic set generated when the config
asks for it (`prepare`), then the training list and the evaluation lists read and checked, each
attached to its packed set when the run reads packed data (`read_run_lists`).

This module sits above lists, images and packed sets in the data package: it only orchestrates
them for the stages, the evaluation mode and the tools.
"""
from __future__ import annotations

from absl import logging

from eercl_jax.data import lists, packed
from eercl_jax.data.datasets import synthetic


def prepare(data_config) -> None:
  """Generates the built-in synthetic set under `data.synthetic.root` if the config enables it
  and no complete copy with the same parameters is there (process 0 writes; the others wait)."""
  # pylint: disable=import-outside-toplevel
  import jax
  from jax.experimental import multihost_utils
  s = data_config.synthetic
  if not s.enabled:
    return
  if jax.process_index() == 0:
    synthetic.ensure_generated(s.root, **{k: v for k, v in s.items()
                                          if k not in ("enabled", "root")})
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("synthetic data generated")


def read_list(path: str, data_config,
              names_from: str = "config.data.class_names") -> lists.FerList:
  """One list of the run with the run's checks (its class-order file against
  `data.class_names`, named `names_from` in the messages); attached to its packed set when
  `data.format='packed'` (the packed set holds the pixels, checked against the list, so the
  image files are not looked at)."""
  d = data_config
  packed_format = d.format == "packed"
  fl = lists.read_list(path, d.image_root, tuple(d.class_names),
                       check_images="none" if packed_format else d.check_images,
                       skip_bad_images=d.skip_bad_images,
                       allow_outside_root=d.allow_outside_root, names_from=names_from)
  if packed_format:
    fl = packed.attach(fl, d.packed_root, d.resize)
  return fl


def read_run_lists(data_config) -> tuple[lists.FerList, dict[str, lists.FerList]]:
  """The training list and the evaluation lists ({name: list}) of a run's `config.data`, each
  validated (with its images) before any training starts."""
  d = data_config
  train = read_list(d.train_list, d)
  evals = {name: read_list(path, d) for name, path in d.eval_lists.items()}
  for name, fl in [("train", train), *evals.items()]:
    logging.info("list %s: %s (%d images, %d skipped)%s", name, fl.list_path, len(fl),
                 fl.num_skipped, f", packed in {fl.packed_dir}" if fl.packed_dir else "")
  return train, evals
