"""Networks: the backbone registry (`registry`), ViT and ResNet backbones (`vit`, `resnet`), the
EERCL head (`eercl`), PyTorch-semantics layers (`layers`). Nothing is imported here: import the
module that holds a name (`from eercl_jax.models import eercl`)."""
