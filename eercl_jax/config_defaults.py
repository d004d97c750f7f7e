"""Defaults shared by the files in `configs/`: every knob of both stages with a comment.

The numbers follow ../shared/docs/algorithm.md: the ViT-B recipe of its section 0/1.4 for the
optimiser and the FER method settings of section 2.2 for adaptation. Config files in `configs/`
call these builders and change a few fields, so a `--config.x.y=...` override of a misspelt key
fails (the dicts are locked by `config_flags`).
"""
from __future__ import annotations

import ml_collections

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
      "select_by": select_by,            # eval set whose accuracy selects the best checkpoint
      "resize": 256,                     # square resize before the crop (aspect not kept)
      "crop": 224,
      "mean": IMAGENET_MEAN,
      "std": IMAGENET_STD,
      "check_images": "decode",          # 'decode' | 'exists' | 'none': validated before training
      "skip_bad_images": False,          # True: skip (count, log) missing/unreadable images
      "num_workers": 8,                  # grain decoding worker processes (0 = in-process)
      # The built-in synthetic set, generated under `root` if absent (demo configs enable it).
      "synthetic": {"enabled": False, "root": "data", "image_size": 64, "train_per_class": 150,
                    "test_per_class": 40, "target_per_class": 60, "seed": 0},
  })


def _model(backbone: str = "vit") -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "backbone": backbone,              # 'vit' | 'resnet50'
      "vit_size": "B/16",                # named ViT size, e.g. Ti/16, S/16, B/16
      "num_classes": len(FER_CLASSES),
      "bottleneck_dim": 1024,            # ViT head (algorithm.md 1.4)
      "width": 1024,
      "feat_dim": 256,                   # the feature used by classifier, banks and clustering
      "dropout": 0.5,
      "dtype": "float32",                # compute dtype: 'bfloat16' on GPUs
      # Local pretrained backbone for the source stage: a public JAX ViT .npz (AugReg), a timm
      # ViT or torchvision ResNet-50 state dict (.pth/.bin/.safetensors). '' = random init.
      "init_from": "",
  })


def _optim(lr: float, weight_decay: float, schedule: str, lr_mult: dict) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "lr": lr,
      "momentum": 0.9,
      "nesterov": True,
      "weight_decay": weight_decay,      # coupled L2, on every parameter, as torch SGD
      "schedule": schedule,              # 'inv': lr*(1+gamma*t)^-power | 'constant'
      "gamma": 0.001,
      "power": 0.75,
      "lr_mult": lr_mult,                # per parameter group, relative to lr
  })


VIT_LR_MULT = {"backbone": 0.1, "mlp": 1.0, "bottleneck": 1.0, "sfda": 10.0, "classifier": 10.0}
RESNET_LR_MULT = {"backbone": 1.0, "mlp": 1.0, "bottleneck": 1.0, "sfda": 10.0, "classifier": 10.0}


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
  c.optim = _optim(lr=0.004, weight_decay=5e-4, schedule="inv", lr_mult=dict(VIT_LR_MULT))
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
  return c


def adapt_config(target: str, source: str = "raf") -> ml_collections.ConfigDict:
  """Stage 2: source-free adaptation to the unlabelled target list (algorithm.md section 2).

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
  c.optim = _optim(lr=4e-4, weight_decay=5e-4, schedule="constant", lr_mult=dict(VIT_LR_MULT))
  c.batch_size = 64                      # images per step; each comes in three views
  c.per_device_batch_size = 0            # > 0: batch_size = this x number of devices
  c.bn_group_size = 32                   # original per-GPU group: 32 images x 3 views
  c.virtual_devices = 2                  # W of the original: AaD scaled by 1/W (algorithm.md Q3)
  c.eval_batch_size = 128
  c.num_steps = 15000
  c.log_every = 100
  c.eval_every = 300
  c.eval_at_start = True                 # evaluate the source model first (side-by-side summary)
  c.checkpoint_every = 500
  c.keep_checkpoints = 1
  c.adapt = ml_collections.ConfigDict({
      "ema_decay": 0.99,
      "fix_classifier": True,
      "num_k": 4,                        # AaD neighbours
      "lambda_aad": 1.0,
      "beta": 0.0,                       # AaD dispersion decay exponent
      "pseudo_update_interval": 50,      # full bank refresh + clustering every this many steps
      "cluster_threshold": 0,
      "prob_threshold": 0.95,
      "lambda_fixmatch": 1.0,            # class-relation contrast weight
      "fixmatch_temp": 0.07,
      "use_cluster_label": True,
      "bank_size": 512,                  # negative ring buffers
      "lambda_nce": 1.0,
      "nce_temp": 0.07,
      "non_diag_alpha": 1.0,
      "faithful_bank_init": False,       # True: randn banks + the original's dropped refresh rows
      "zero_negative_banks": False,      # True: zeros instead of the original's randn negatives
      "refresh_view": "weak",            # 'weak' (original, random view) | 'test'
      "refresh_batch_size": 128,
      "shard_banks": False,              # shard the N-row banks by rows over all devices
  })
  return c
