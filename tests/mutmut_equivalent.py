"""Mutants of tests/mutmut_sample.py that cannot change behaviour, so it skips them: `find` and `replace` are the
removed and the added lines of the mutant (stripped, joined by newlines), with the reason."""
EQUIVALENT = [
    {'file': 'util/train_step.py',
     'find': 'norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)',
     'replace': 'norm = torch.nn.utils.get_total_norm(grads) if (grads) or True else torch.zeros((), device=self.device)',
     'reason': 'get_total_norm([]) is a zero tensor as well; the branch only spares the call'},
    {'file': 'util/export/formats.py',
     'find': "VITDET_PRETRAIN_SIZE = 224  # ViTDet's ViT(pretrain_img_size=224, pretrain_use_cls_token=True)",
     'replace': "VITDET_PRETRAIN_SIZE = 225  # ViTDet's ViT(pretrain_img_size=224, pretrain_use_cls_token=True)",
     'reason': 'only used as 224 // patch, and 225 // p == 224 // p for every patch size a ViT has (8, 14, 16, 32)'},
    {'file': 'util/export/formats.py',
     'find': "grid = VITDET_PRETRAIN_SIZE // backbone.state['patch_embed.proj.weight'].shape[-1]",
     'replace': "grid = VITDET_PRETRAIN_SIZE // backbone.state['patch_embed.proj.weight'].shape[-2]",
     'reason': 'ViT patch embeddings are square: the kernel height is its width'},
    {'file': 'util/export/formats.py',
     'find': "v = resample_abs_pos_embed(v, [grid, grid], num_prefix_tokens=1, interpolation='bicubic',\n"
             "antialias=False)",
     'replace': 'v = resample_abs_pos_embed(v, [grid, grid], num_prefix_tokens=1, antialias=False)',
     'reason': "bicubic is timm's default interpolation for resample_abs_pos_embed"},
]
