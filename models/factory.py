"""What every model factory registered here does with timm.create_model's extra arguments."""

TIMM_ONLY_KWARGS = ('pretrained_cfg', 'pretrained_cfg_overlay', 'cache_dir')


def model_kwargs(pretrained, kwargs, how_to_load):
    """The factory kwargs without timm's pretrained-config arguments; nothing is ever downloaded."""
    if pretrained:
        raise ValueError(f'no pretrained weights are downloaded; {how_to_load}')
    return {k: v for k, v in kwargs.items() if k not in TIMM_ONLY_KWARGS}
