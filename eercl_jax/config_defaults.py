"""Defaults shared by the files in `configs/`: every knob of both stages with a comment, the
arguments of the config families (`parse_arg`), the one switch that shrinks any config to a
CPU-sized dry run (`runlocal`), and the one check of a whole config (`validate`) that both
stages run at start-up.

The numbers are the original's (docs/method.md; docs/config-keys.md maps its keys to ours): the
ViT-B recipe for the optimiser and the FER method settings for adaptation. Config files in
`configs/` call these builders and change only what their experiment changes; a
`--config.x.y=...` override of a misspelt key fails (the dicts are locked by `config_flags`).
"""
from __future__ import annotations

import ml_collections

from eercl_jax.errors import ConfigError

# The class order the lists use (alphabetical, as the original's folder names); RAF-DB's native
# order can be chosen by overriding this tuple - every list is checked against it.
FER_CLASSES = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")
IMAGENET_MEAN = (123.675, 116.28, 103.53)   # on the 0..255 scale, as the original's Normalize
IMAGENET_STD = (58.395, 57.12, 57.375)


def fer_list(split: str, domain: str, root: str = "data") -> str:
  """Path of an original-layout list: data/txt/fer/<split>_images_<domain>.txt."""
  return f"{root}/txt/fer/{split}_images_{domain}.txt"


def _data(train_list: str, eval_lists: dict, select_by: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "image_root": "data/fer",          # list paths are relative to this folder
      "class_names": FER_CLASSES,
      "train_list": train_list,
      "eval_lists": eval_lists,          # name -> list; evaluated with the test view
      # What selects best/: an eval list whose accuracy does (adaptation: 'target' is the
      # oracle, it uses target labels), or a label-free score of the target predictions
      # ('im', 'snd': eercl_jax/selection.py); an adaptation keeps the others' in best_<rule>/.
      "select_by": select_by,
      "resize": 256,                     # square resize before the crop (aspect not kept)
      "crop": 224,
      "mean": IMAGENET_MEAN,
      "std": IMAGENET_STD,
      "check_images": "decode",          # 'decode' | 'exists' | 'none': validated before training
      "skip_bad_images": False,          # True: skip (count, log) missing/unreadable images
      "allow_outside_root": False,       # True: list paths may be absolute or climb out of root
      # grain decoding worker processes (0 = in-process) and batches in flight per worker;
      # None = follow the host's cores: min(cores - 1, 16) workers, prefetch 2 (data/host.py).
      "num_workers": ml_collections.FieldReference(None, field_type=int),
      "prefetch": ml_collections.FieldReference(None, field_type=int),
      # 'folder': decode the list's image files; 'packed': read every list of the run from its
      # packed set <packed_root>/<list file stem> (python -m eercl_jax.data.pack; docs/data.md).
      "format": "folder",
      "packed_root": "data/packed",
      # The built-in synthetic set, generated under `root` if absent (demo configs enable it).
      "synthetic": {"enabled": False, "root": "data", "image_size": 64, "train_per_class": 150,
                    "test_per_class": 40, "target_per_class": 60, "seed": 0},
  })


def _model(backbone: str = "vit") -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "backbone": backbone,              # a backbone of models/registry.py: 'vit' | 'resnet'
      # Named size: ViT 'B/16', 'S/16', 'Ti/16', ... ('mu/8' for tests); ResNet '50', '101',
      # '152', '26' ('mu' for tests). None = the backbone's default (ViT B/16, ResNet 50).
      "size": ml_collections.FieldReference(None, field_type=str),
      "num_classes": len(FER_CLASSES),
      "bottleneck_dim": 1024,            # ViT head (docs/method.md)
      "width": 1024,
      "feat_dim": 256,                   # the feature used by classifier, banks and clustering
      "dropout": 0.5,
      # Compute dtype. The paper configs use 'bfloat16': parameters, optimiser state, BN
      # statistics, the head, banks and losses stay float32, GPU tensor cores run bfloat16 at
      # ~16x their float32 rate, and the two agree within the tolerances of
      # docs/toolchain.md#mixed-precision. CPUs have no fast bfloat16: 'float32' there.
      "dtype": "float32",
      "remat": False,                    # rematerialise backbone blocks: memory for compute
      # Local pretrained backbone for the source stage: a public JAX ViT .npz (AugReg), a timm
      # ViT or torchvision ResNet state dict (.pth/.bin/.safetensors). '' = random init.
      "init_from": "",
  })


def _optim(lr: float, weight_decay: float, schedule: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "name": "sgd",                     # 'sgd' | 'adam' (Tent's)
      "lr": lr,
      "momentum": 0.9,                   # sgd
      "nesterov": True,                  # sgd
      "b1": 0.9, "b2": 0.999, "eps": 1e-8,   # adam (PyTorch's defaults)
      "weight_decay": weight_decay,      # coupled L2, on every trained parameter, as torch
      # 'inv': lr*(1+gamma*t)^-power | 'constant' | 'shot': lr*(1+gamma*(t+1)/num_steps)^-power
      "schedule": schedule,
      "gamma": 0.001,
      "power": 0.75,
      # Multiplier of lr per parameter group; None = the backbone's own (models/registry.py:
      # ViT 0.1 / 1 / 1 / 10 / 10, ResNet 1 / - / - / 10 / 10).
      "lr_mult": {g: ml_collections.FieldReference(None, field_type=float)
                  for g in ("backbone", "bottleneck", "mlp", "sfda", "classifier")},
  })


def _mode(c: ml_collections.ConfigDict) -> None:
  """What `python -m eercl_jax.main` does with the config (both stages)."""
  c.mode = "train"                       # 'train' | 'eval': score a checkpoint of the workdir
  c.eval = ml_collections.ConfigDict({   # mode='eval' only (eercl_jax/inference.py)
      # Of --workdir: 'auto' (best/ of a source run; of an adaptation the checkpoint selected by
      # SND, which uses no target label) | 'best' | 'latest' | 'oracle' | 'im' | 'snd'
      # (checkpoints.resolve_run_dir); or a run's or a checkpoint step's folder.
      "checkpoint": "auto",
      "lists": "",                       # comma-separated list files ([name=]path); '' = eval_lists
      "output": "",                      # JSON file; '' = WORKDIR/eval/<checkpoint>_step<N>.json
  })


# What an adaptation takes from its source checkpoint's config unless its own config (or the
# command line) sets it: the architecture and the input size the source model was trained at
# (train_adapt.take_from_source; a ViT's position embedding fixes the crop).
FROM_SOURCE = {"model.size": str, "model.bottleneck_dim": int, "model.width": int,
               "model.feat_dim": int, "data.resize": int, "data.crop": int}


def unset_from_source(c: ml_collections.ConfigDict) -> list[str]:
  """The FROM_SOURCE fields `c` leaves to the source checkpoint (None)."""
  return [k for k in FROM_SOURCE if c[k.split(".")[0]][k.split(".")[1]] is None]


def source_config(source: str = "raf", target: str = "expw") -> ml_collections.ConfigDict:
  """Stage 1: supervised training on the labelled source list."""
  c = ml_collections.ConfigDict()
  c.stage = "source"
  c.seed = 2
  c.data = _data(
      train_list=fer_list("labeled_source", source),
      eval_lists={"target": fer_list("unlabeled_target", f"{target}_0"),
                  "source": fer_list("unlabeled_target", f"{source}_0")},
      select_by="source")                # the original's ClsBestAccuracyByVal: source test set
  c.model = _model("vit")
  c.optim = _optim(lr=0.004, weight_decay=5e-4, schedule="inv")
  c.label_smoothing = 0.1
  c.batch_size = 64                      # global images per step (original: 2 GPUs x 32)
  c.per_device_batch_size = 0            # > 0: batch_size = this x number of devices
  c.bn_group_size = 32                   # BN statistics over fixed groups of this many images
  c.eval_batch_size = 128
  c.num_steps = 2000
  c.log_every = 100
  c.eval_every = 500
  c.checkpoint_every = 1000
  c.keep_checkpoints = 4
  _mode(c)
  return c


def adapt_config(target: str, source: str = "raf") -> ml_collections.ConfigDict:
  """Stage 2: source-free adaptation to the unlabelled target list (docs/method.md).

  64 images per step (BN groups of 32, three views each), EMA teacher 0.99, frozen classifier,
  AaD k=4 (scaled 1/W, W=2), bank refresh + clustering every 50 steps, class-relation contrast
  against cluster labels (confidence 0.95, temperature 0.07), relation-weighted InfoNCE
  (weight 1, temperature 0.07) against negative banks of 512; SGD lr 4e-4 constant, wd 5e-4;
  15000 steps, evaluated every 300.
  """
  c = ml_collections.ConfigDict()
  c.stage = "adapt"
  c.seed = 2023
  c.source_checkpoint = f"runs/source_{source}"   # a source run's workdir (its best/ is used)
  target_list = fer_list("unlabeled_target", f"{target}_0")
  c.data = _data(train_list=target_list,
                 eval_lists={"target": target_list,
                             "source": fer_list("unlabeled_target", f"{source}_0")},
                 select_by="target")     # oracle selection (uses target labels), as the original
  c.model = _model("vit")
  for key, kind in FROM_SOURCE.items():   # None: the source checkpoint's (see FROM_SOURCE)
    group, field = key.split(".")
    c[group][field] = ml_collections.FieldReference(None, field_type=kind)
  c.optim = _optim(lr=4e-4, weight_decay=5e-4, schedule="constant")
  c.batch_size = 64                      # images per step; each comes in three views
  c.per_device_batch_size = 0            # > 0: batch_size = this x number of devices
  c.bn_group_size = 32                   # original per-GPU group: 32 images x 3 views
  c.virtual_devices = 2                  # W of the original: AaD scaled by 1/W (docs/deviations.md)
  c.eval_batch_size = 128
  c.num_steps = 15000
  c.log_every = 100
  c.eval_every = 300
  c.eval_at_start = True                 # evaluate the source model first (side-by-side summary)
  c.checkpoint_every = 500
  c.keep_checkpoints = 1
  _mode(c)
  c.adapt = ml_collections.ConfigDict({
      "ema_decay": 0.99,                 # teacher <- decay*teacher + (1-decay)*online, each step
      "fix_classifier": True,            # the classifier is frozen (no update, no decay)
      "aad_weight": 1.0,                 # AaD neighbour consistency
      "aad_neighbours": 4,               # k nearest rows of the AaD bank (self excluded)
      "aad_decay_power": 0.0,            # dispersion weight (1 + 10*step/num_steps)^-power
      "refresh_every": 50,               # full bank refresh + clustering every this many steps
      "refresh_view": "weak",            # 'weak' (original, random view) | 'test'
      "refresh_batch_size": 128,
      # With data.format='packed': where the refresh holds the target list's pixels, resized
      # once ('host': a numpy array in RAM, 'device': replicated on every device, 'none':
      # read through the input pipeline at each refresh).
      "refresh_memory": "host",
      "refresh_device_view": False,      # True: the refresh view's crop/flip runs on the device
      "cluster_min_size": 0,             # classes with more members than this are cluster targets
      "mask_threshold": 0.95,            # teacher confidence that admits a sample to the contrast
      "class_contrast_weight": 1.0,      # relation-weighted contrast against cluster labels
      "class_contrast_temp": 0.07,
      "class_contrast_cluster_labels": True,   # False: the teacher's argmax as the label
      "negative_bank_size": 512,         # rows of each negative ring buffer
      "instance_nce_weight": 1.0,        # relation-weighted InfoNCE against the negative rings
      "instance_nce_temp": 0.07,
      "relation_off_diagonal": 1.0,      # scale of the off-diagonal class relations
      "faithful_bank_init": False,       # True: randn banks + the original's dropped refresh rows
      "zero_negative_banks": False,      # True: zeros instead of the original's randn negatives
      "shard_banks": False,              # shard the N-row banks by rows over all devices
  })
  # The method (eercl_jax/methods/; docs/method.md#baselines): 'eercl' (config.adapt above),
  # or a baseline with the settings of its authors' code below. configs/adapt.py's
  # `method=NAME` argument also sets that method's optimiser recipe.
  c.method = "eercl"
  c.adabn = ml_collections.ConfigDict({
      "view": "test",                    # the statistics' pass: the un-augmented image
      "batch_size": 64,                  # images per batch of that pass (each weighs the same)
  })
  c.shot = ml_collections.ConfigDict({
      "cls_par": 0.3,                    # weight of the cross-entropy to the pseudo-labels
      "ent_par": 1.0,                    # weight of the information maximisation
      "gent": True,                      # the diversity term (entropy of the mean prediction)
      "epsilon": 1e-5,                   # inside the diversity term's log
      "interval": 15,                    # pseudo-labels this many times a run (once an epoch)
      "threshold": 0,                    # classes with more members are clustering targets
      "view": "test",                    # the pseudo-label pass: the un-augmented image
  })
  c.nrc = ml_collections.ConfigDict({
      "k": 5,                            # neighbours
      "kk": 5,                           # expanded neighbours of each neighbour
      "affinity": 0.1,                   # weight r of a neighbour that is not reciprocal
      "expanded_weight": 0.1,            # weight of every expanded neighbour
      "epsilon": 1e-5,                   # inside the diversity term's log
      "view": "weak",                    # the bank-filling pass (the authors' training loader)
  })
  c.aad = ml_collections.ConfigDict({
      "k": 5,                            # neighbours
      "alpha": 1.0,                      # scale of the dispersion weight
      "beta": 5.0,                       # its decay (1 + 10 t / T)^-beta
      "view": "weak",                    # the bank-filling pass (the authors' training loader)
  })
  return c


# ----------------------------------------------------------------------------------------------
# Config families and the CPU-sized dry run

def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """The argument of a config family, `file.py:key=value,flag,...` (big_vision's style): each
  `key=value` overrides a default (its type kept: 'true'/'false' for booleans), a bare `flag`
  sets a boolean default to True. An unknown key is an error naming the known ones."""
  out = ml_collections.ConfigDict(defaults)
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    key, sep, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ConfigError(f"config argument {key!r}: unknown; the arguments are "
                        f"{', '.join(sorted(defaults))}")
    default = defaults[key]
    if isinstance(default, bool):
      if sep and value.lower() not in ("true", "false", "1", "0"):
        raise ConfigError(f"config argument {key}={value!r}: expected true or false")
      out[key] = (value.lower() in ("true", "1")) if sep else True
    elif not sep:
      raise ConfigError(f"config argument {key!r}: give a value ({key}=...)")
    else:
      out[key] = type(default)(value) if default is not None else value
  return out


# The built-in synthetic set's size in a dry run: 168 source training, 56 source test and 112
# target images of 32 px (seconds to generate).
RUNLOCAL_SYNTHETIC = dict(image_size=32, train_per_class=24, test_per_class=8,
                          target_per_class=16)


def synthetic_data(c: ml_collections.ConfigDict, root: str = "data") -> ml_collections.ConfigDict:
  """The built-in synthetic set (generated under `root` at start) in place of the config's
  data sets, keeping each list's role: the source stage trains on the studio domain's training
  list, the adaptation adapts to the wild domain; both evaluate on the wild target list and the
  studio test list."""
  from eercl_jax.data.datasets import synthetic  # pylint: disable=import-outside-toplevel
  paths = synthetic.list_paths(root)
  d = c.data
  d.synthetic.enabled, d.synthetic.root = True, root
  d.image_root = paths["image_root"]
  d.train_list = paths["source_train"] if c.stage == "source" else paths["target"]
  d.eval_lists = {"target": paths["target"], "source": paths["source_test"]}
  d.format = "folder"
  return c


def runlocal(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks any config of either stage to a CPU-sized dry run of its code path (about a minute
  on two cores): the backbone's test size with a tiny head, 32-px crops, float32, no
  pretrained file, batches of 32 in BN groups of 16, 10 steps, no data workers, and the
  built-in synthetic set standing in for the data sets (`synthetic_data`). The method and its
  settings are the config's. The tests, the benchmark's CPU preset and the demo start from
  it."""
  # pylint: disable=import-outside-toplevel
  from eercl_jax.models import registry
  m = c.model
  m.size = registry.get(m.backbone).test_size
  m.bottleneck_dim = m.width = 32
  m.feat_dim = 16
  m.dtype, m.remat, m.init_from = "float32", False, ""
  synthetic_data(c)
  c.data.synthetic.update(RUNLOCAL_SYNTHETIC)
  c.data.resize, c.data.crop = 36, 32
  c.data.num_workers = 0
  c.batch_size, c.bn_group_size, c.eval_batch_size = 32, 16, 64
  c.per_device_batch_size = 0
  c.num_steps, c.log_every, c.eval_every, c.checkpoint_every = 10, 5, 10, 10
  if c.stage == "adapt":
    c.adapt.refresh_every, c.adapt.refresh_batch_size = 5, 64
  return c


# ----------------------------------------------------------------------------------------------
# The one check of a config, at start-up, before any data is read

def _require(ok: bool, key: str, message: str) -> None:
  if not ok:
    raise ConfigError(f"config.{key}: {message}")


def validate(config, num_devices: int, num_processes: int = 1) -> None:
  """Checks every rule a run relies on; each error names the config key at fault."""
  # pylint: disable=import-outside-toplevel
  from eercl_jax import methods, optim
  from eercl_jax.models import eercl, registry
  _require(config.stage in ("source", "adapt"), "stage",
           f"{config.stage!r}: expected 'source' or 'adapt'")
  m = config.model
  eercl.check_model_config(m)          # backbone, size, dtype
  _require(len(config.data.class_names) == m.num_classes, "data.class_names",
           f"has {len(config.data.class_names)} names but config.model.num_classes is "
           f"{m.num_classes}")
  label_free = config.stage == "adapt" and "target" in config.data.eval_lists
  _require(config.data.select_by in config.data.eval_lists
           or (label_free and config.data.select_by in ("im", "snd")), "data.select_by",
           f"{config.data.select_by!r} is not one of config.data.eval_lists "
           f"{sorted(config.data.eval_lists)}"
           + (" or a label-free score ('im', 'snd')" if label_free else ""))
  mode = config.mode
  _require(mode in ("train", "eval"), "mode", f"{mode!r}: expected 'train' or 'eval'")
  if mode == "eval":
    _require(bool(config.eval.checkpoint), "eval.checkpoint",
             "is empty: 'best', 'latest', or a run's (or checkpoint step's) folder")
  d = config.data
  _require(d.format in ("folder", "packed"), "data.format",
           f"{d.format!r}: expected 'folder' or 'packed'")
  _require(d.format == "folder" or bool(d.packed_root), "data.packed_root",
           "must name the folder of the packed sets when config.data.format='packed'")
  registry.lr_mult(m, config.optim)    # unknown groups
  for key, low in (("num_workers", 0), ("prefetch", 1)):
    value = config.data[key]
    _require(value is None or value >= low, f"data.{key}",
             f"{value} must be >= {low} (None: follow the host's cores)")
  optim.make_schedule(config.optim)    # unknown schedule

  def batch(key: str, value: int) -> None:
    _require(value > 0, key, f"{value} must be positive")
    _require(value % num_devices == 0, key,
             f"{value} is not divisible by the {num_devices} devices of the mesh")
    _require(value % num_processes == 0, key,
             f"{value} is not divisible by the {num_processes} processes")

  batch("batch_size", config.batch_size)
  batch("eval_batch_size", config.eval_batch_size)
  _require(config.bn_group_size > 0 and config.batch_size % config.bn_group_size == 0,
           "bn_group_size", f"{config.bn_group_size} does not divide config.batch_size="
           f"{config.batch_size}")
  for key in ("num_steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
    _require(config[key] > 0, key, f"{config[key]} must be positive")
  if config.stage == "adapt":
    a = config.adapt
    batch("adapt.refresh_batch_size", a.refresh_batch_size)
    _require(config.batch_size % config.virtual_devices == 0, "virtual_devices",
             f"{config.virtual_devices} does not divide config.batch_size={config.batch_size}")
    _require(a.refresh_every > 0, "adapt.refresh_every", f"{a.refresh_every} must be positive")
    _require(a.refresh_view in ("weak", "test"), "adapt.refresh_view",
             f"{a.refresh_view!r}: expected 'weak' or 'test'")
    _require(a.refresh_memory in ("host", "device", "none"), "adapt.refresh_memory",
             f"{a.refresh_memory!r}: expected 'host', 'device' or 'none'")
    _require(not a.refresh_device_view or (d.format == "packed" and a.refresh_memory != "none"),
             "adapt.refresh_device_view", "needs config.data.format='packed' and "
             "config.adapt.refresh_memory 'host' or 'device' (resident pixels)")
    _require(a.aad_neighbours > 0, "adapt.aad_neighbours",
             f"{a.aad_neighbours} must be positive")
    _require(a.negative_bank_size > 0, "adapt.negative_bank_size",
             f"{a.negative_bank_size} must be positive")
    _require(0.0 <= a.ema_decay <= 1.0, "adapt.ema_decay", f"{a.ema_decay} outside [0, 1]")
    methods.create(config)             # an unknown method
    for key in ("shot.view", "adabn.view"):
      view = config[key.split(".")[0]].view
      _require(view in ("weak", "test"), key, f"{view!r}: expected 'weak' or 'test'")
    _require(config.shot.interval > 0, "shot.interval", f"{config.shot.interval} must be positive")
    for key in ("nrc.k", "nrc.kk", "aad.k"):
      value = config[key.split(".")[0]][key.split(".")[1]]
      _require(value > 0, key, f"{value} must be positive")
