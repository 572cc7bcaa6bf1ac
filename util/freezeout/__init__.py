"""FreezeOut (run_pretrain.py --how_scale): the freezing schedule, the frozen-prefix cache, feature masking."""
