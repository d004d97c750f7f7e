"""A 2-D map (t-SNE) of the features of the source-only and the adapted model, to a PNG (the
command: `python -m eercl_jax.tools.feature_map ADAPT_RUN OUT.png`).

ADAPT_RUN is an adaptation run's workdir (by default its checkpoint selected by SND, which uses
no target label; `which` asks for another: checkpoints.resolve_run_dir) or a
checkpoint folder. The source-only model is the source run the adaptation started from (its
recorded `source_checkpoint`, best/), or --source_run. The images are the run's own evaluation
lists (`config.data.eval_lists`: by default the target and the source test list), seen through
the test view, at most --max_per_list of each (a fixed random subset). Two panels - source-only,
adapted - each its own t-SNE of the L2-normalised features f (the BN output that feeds the
classifier, the banks and the clustering); colour = true class, marker = list (domain). Paths in
the stored config resolve against the current folder, as in the run.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import ml_collections
import numpy as np
from absl import logging

from eercl_jax import checkpoints, inference, parallel, pictures
from eercl_jax.data import lists
from eercl_jax.errors import CheckpointError, ConfigError

MARKERS = ("o", "^", "s", "D", "v", "P", "X", "*")


@dataclasses.dataclass
class Embedded:
  """Features of one model on the subsampled lists."""
  name: str             # panel title
  step: int
  features: np.ndarray  # (N, D) float32, L2-normalised
  predictions: np.ndarray   # (N,) argmax class


def subsample(fer_list: lists.FerList, max_items: int, seed: int) -> lists.FerList:
  """At most `max_items` entries of the list, a fixed random subset in list order."""
  n = len(fer_list)
  if max_items <= 0 or n <= max_items:
    return fer_list
  keep = np.sort(np.random.default_rng(seed).choice(n, max_items, replace=False))
  return dataclasses.replace(fer_list, paths=tuple(fer_list.paths[i] for i in keep),
                             labels=fer_list.labels[keep], lines=fer_list.lines[keep])


def tsne(features: np.ndarray, perplexity: float, seed: int) -> np.ndarray:
  """(N, 2) t-SNE coordinates (scikit-learn, Barnes-Hut); the perplexity is capped for small N.
  Run on one OpenMP thread: a few seconds for a thousand points, and on a busy machine the
  multithreaded gradient spins for minutes."""
  # pylint: disable=import-outside-toplevel
  from sklearn.manifold import TSNE
  from threadpoolctl import threadpool_limits
  n = len(features)
  if n < 4:
    raise ValueError(f"a t-SNE map needs at least 4 images, got {n}")
  perplexity = float(min(perplexity, (n - 1) / 3))
  with threadpool_limits(limits=1):
    return TSNE(n_components=2, perplexity=perplexity, init="pca",
                random_state=seed).fit_transform(features.astype(np.float64))


def draw(panels: Sequence[tuple[str, np.ndarray]], labels: np.ndarray, domains: np.ndarray,
         class_names: Sequence[str], domain_names: Sequence[str], out_path: str) -> str:
  """One scatter panel per (title, (N, 2) coordinates): colour = class, marker = domain
  (`domain_names`: the legend's names of the lists, e.g. 'target: expw')."""
  # pylint: disable=import-outside-toplevel
  import matplotlib
  matplotlib.use("Agg", force=False)
  from matplotlib.figure import Figure
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.lines import Line2D

  colours = matplotlib.colormaps["tab10" if len(class_names) <= 10 else "tab20"]
  fig = Figure(figsize=(6.0 * len(panels) + 1.6, 6.0), dpi=120)
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, len(panels), squeeze=False)[0]
  for ax, (title, xy) in zip(axes, panels):
    for d, _ in enumerate(domain_names):
      for c, _ in enumerate(class_names):
        sel = (domains == d) & (labels == c)
        if sel.any():
          ax.scatter(xy[sel, 0], xy[sel, 1], s=14, marker=MARKERS[d % len(MARKERS)],
                     color=colours(c), alpha=0.75, linewidths=0)
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
  handles = [Line2D([], [], linestyle="", marker="o", color=colours(c), label=name)
             for c, name in enumerate(class_names)]
  handles += [Line2D([], [], linestyle="", marker=MARKERS[d % len(MARKERS)], color="0.3",
                     label=name) for d, name in enumerate(domain_names)]
  fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
  fig.tight_layout(rect=(0, 0, 1 - 1.6 / fig.get_figwidth(), 1))
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  fig.savefig(out_path, format="png")
  return out_path


def feature_map(adapt_run: str, out_path: str, *, source_run: str | None = None,
                which: str = "auto", list_names: Sequence[str] | None = None,
                max_per_list: int = 500, perplexity: float = 30.0, seed: int = 0,
                batch_size: int = 128) -> dict:
  """Draws the map; returns {'path', 'counts' (per list), 'accuracy' {model: {list: acc}}}."""
  adapt_dir = checkpoints.resolve_run_dir(adapt_run, which, what="ADAPT_RUN")
  _, meta = checkpoints.read_meta(adapt_dir)
  if meta.get("stage") != "adapt":
    raise CheckpointError(f"ADAPT_RUN: {adapt_dir} holds a checkpoint of a "
                          f"{meta.get('stage')!r} run; name an adaptation run's workdir (the "
                          "source-only model is found from it, or give --source_run)")
  config = ml_collections.ConfigDict(meta["config"])
  config.data.class_names = tuple(config.data.class_names)
  class_names = tuple(meta["class_names"])
  if source_run:
    source_dir = checkpoints.resolve_run_dir(source_run, "best", what="--source_run")
  else:   # errors name where it came from, not a --source_run the user did not give
    try:
      source_dir = checkpoints.resolve_run_dir(
          config.source_checkpoint, "best",
          what=f"the config.source_checkpoint recorded in {adapt_dir}")
    except FileNotFoundError as e:
      raise FileNotFoundError(f"{e} (a relative path resolves against the current folder, as in "
                              "the run: run from the run's folder, or give --source_run)") from e
  _, source_meta = checkpoints.read_meta(source_dir)
  checkpoints.check_model_meta(source_meta, config, source_dir)

  eval_lists = dict(config.data.eval_lists)
  names = list(list_names or eval_lists)
  unknown = [n for n in names if n not in eval_lists]
  if unknown:
    raise ConfigError(f"--lists: {unknown} not among the run's evaluation lists "
                      f"{sorted(eval_lists)}")
  d = config.data
  chosen = []
  for i, name in enumerate(names):
    fl = lists.read_list(eval_lists[name], d.image_root, class_names, check_images="exists",
                         skip_bad_images=d.skip_bad_images,
                         allow_outside_root=d.allow_outside_root,
                         names_from="the run's config.data.class_names")
    chosen.append((name, subsample(fl, max_per_list, seed + i)))

  mesh = parallel.create_mesh()
  labels = np.concatenate([fl.labels for _, fl in chosen]).astype(np.int64)
  domains = np.concatenate([np.full(len(fl), i) for i, (_, fl) in enumerate(chosen)])
  panels, accuracy = [], {}
  for title, directory in (("source-only", source_dir), ("adapted", adapt_dir)):
    # The evaluator's eval forward gives the L2-normalised features f the banks and the
    # clustering see, with the test view of the checkpoint's own config.
    loaded = inference.load(directory, what=title, mesh=mesh, batch_size=batch_size)
    outs = [loaded.evaluator.outputs(loaded.variables, fl, f"features {name}")
            for name, fl in chosen]
    feats = np.concatenate([o["features"] for o in outs])
    preds = np.concatenate([np.argmax(o["probabilities"], -1) for o in outs])
    step = loaded.step
    accuracy[title] = {name: float(np.mean(preds[domains == i] == labels[domains == i]))
                       for i, (name, _) in enumerate(chosen)}
    shown = ", ".join(f"{k} {v * 100:.1f}%" for k, v in accuracy[title].items())
    logging.info("%s (step %d) accuracy on the subsample: %s", title, step, shown)
    panels.append((f"{title} (step {step}): {shown}", tsne(feats, perplexity, seed)))
  # The legend names the data sets, not only the roles: 'target: expw', 'source: raf'.
  draw(panels, labels, domains, class_names,
       [pictures.list_label(n, eval_lists[n]) for n in names], out_path)
  return {"path": out_path, "counts": {n: len(fl) for n, fl in chosen}, "accuracy": accuracy}
