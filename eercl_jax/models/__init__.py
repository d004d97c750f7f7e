"""Networks: the backbone registry, ViT and ResNet backbones, the EERCL head, PyTorch-semantics
layers."""
from eercl_jax.models.eercl import (PARAM_GROUPS, EERCLModel, class_directions, count_params,
                                    create_model, init_variables, param_groups)
from eercl_jax.models.layers import GroupedBatchNorm, WeightNormDense
from eercl_jax.models.resnet import ResNet
from eercl_jax.models.vit import VIT_SIZES, VisionTransformer, parse_vit_size
