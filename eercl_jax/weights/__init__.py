"""Pretrained-weight I/O: files read without PyTorch, mapped onto the Flax variable trees.

  rules         the name-rule type, `WeightFormat` and the shared transforms (the per-backbone
                rules live with each backbone in `models/`, listed by `models/registry.py`).
  torch_pickle  the restricted reader of `torch.save` files (zip and legacy formats).
  readers       `read_checkpoint` / `load_state_dict`: .npz, .pth/.bin, .safetensors -> numpy.
  posemb        resizing a ViT position embedding to another patch grid.
  convert       layout detection, `init_backbone` (config.model.init_from), backbone export.
  original      the original PyTorch trainer's checkpoints -> the whole EERCL model.

Nothing is imported here, so `models/` can import `weights.rules` without a cycle.
"""
