"""SparK's output files, readable by our tools and by the official SparK code alike.

In `output_<exp_name>/`, rewritten atomically every epoch:
  <model>_still_pretraining.pth   our checkpoint (model, optimizer, epoch, step, RNG, ...) that also carries
                                  the official keys (`module` = the SparK state dict with its config, `arch`,
                                  `input_size`, `performance_desc`, `is_pretrain`), so the official resume and
                                  visualisation code read it; `--resume_from` takes it, auto-resume finds it.
  <model>_1kpretrained.pth        the encoder in timm key layout, no wrapper: what fine-tuning takes.
  <model>_withdecoder_1kpretrained_spark_style.pth, <model>_1kpretrained_timm_style.pth
                                  the newer official names of the two files above (symbolic links).
`--resume_from` also takes an official spark_style file (weights, optimizer and epoch; ConvNeXt keys and
parameter order are translated to timm's).
"""
import os

import torch

from models.convnext_keys import convnext_official_to_timm, is_official_convnext
from models.spark import ENCODER_PREFIX, encoder_state_dict
from util.checkpoint import atomic_save, load_checkpoint, save_checkpoint
from util.dist import is_main_process


def output_names(model_name):
    """{what: file name} of the files SparK writes for model_name."""
    return {'resume': f'{model_name}_still_pretraining.pth', 'encoder': f'{model_name}_1kpretrained.pth',
            'resume_new': f'{model_name}_withdecoder_1kpretrained_spark_style.pth',
            'encoder_new': f'{model_name}_1kpretrained_timm_style.pth'}


def _link(target_name, link_path):
    if os.path.lexists(link_path):
        return
    try:
        os.symlink(target_name, link_path)
    except OSError as e:  # e.g. a file system without symlinks: the old names are the real files anyway
        print(f'could not link {link_path} -> {target_name}: {e}')


def save_spark_outputs(args, epoch, trainer, model, optimizer, stats):
    """The resumable checkpoint and the encoder file (and their newer official names). Call on every rank."""
    names = output_names(args.model)
    official = {'module': model.state_dict(with_config=True), 'arch': args.model, 'input_size': args.input_size,
                'performance_desc': f'{stats["min_loss"]:.4f} {stats["last_loss"]:.4f}', 'is_pretrain': True}
    save_checkpoint(args.exp_dir, epoch, trainer.num_updates, args, model, optimizer, trainer.scaler, extra=stats,
                    name=names['resume'], top_level=official)
    if is_main_process():
        atomic_save(encoder_state_dict(model), os.path.join(args.exp_dir, names['encoder']))
        _link(names['resume'], os.path.join(args.exp_dir, names['resume_new']))
        _link(names['encoder'], os.path.join(args.exp_dir, names['encoder_new']))


def find_resume_file(args):
    """--resume_from, else (with --auto_resume) the experiment folder's checkpoint, else None."""
    if args.resume_from:
        if not os.path.isfile(args.resume_from):
            raise FileNotFoundError(f'--resume_from {args.resume_from}: no such file')
        return args.resume_from
    if args.auto_resume:
        names = output_names(args.model)
        for key in ('resume', 'resume_new'):
            path = os.path.join(args.exp_dir, names[key])
            if os.path.isfile(path):
                return path
    return None


def official_param_order(names):
    """Our parameter names in the order the official SparK model lists them: the official ConvNeXt registers
    all downsample layers (stem first) before all stages; ResNets and everything else keep their order."""
    def rank(name):
        rest = name[len(ENCODER_PREFIX):] if name.startswith(ENCODER_PREFIX) else None
        if rest is None:
            return (2, 0)
        parts = rest.split('.')
        if parts[0] == 'stem':
            return (0, 0)
        if parts[0] == 'stages' and len(parts) > 2:
            return (0, int(parts[1])) if parts[2] == 'downsample' else (1, int(parts[1]))
        return (1, 99)
    return sorted(names, key=rank)


def official_optimizer_state(opt_state, optimizer, model, module_keys):
    """The official optimizer state dict, re-indexed to our parameters (same groups, official order)."""
    index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g['params'])}
    name_of = {id(p): n for n, p in model.named_parameters()}
    state, groups = {}, []
    for ours, theirs in zip(optimizer.param_groups, opt_state['param_groups']):
        names = [name_of[id(p)] for p in ours['params']]
        present = [n for n in official_param_order(names) if n in module_keys]
        if len(present) != len(theirs['params']):
            raise ValueError(f'official optimizer group has {len(theirs["params"])} parameters, this model '
                             f'{len(present)}: was it saved for another --model?')
        param = dict(model.named_parameters())
        for name, official_id in zip(present, theirs['params']):
            if official_id in opt_state['state']:
                state[index[id(param[name])]] = opt_state['state'][official_id]
        groups.append({**theirs, 'params': [index[id(p)] for p in ours['params']]})
    return {'state': state, 'param_groups': groups}


def resume_spark(path, model, trainer):
    """Loads weights + optimizer (+ our extras) from path; returns (last finished epoch, step, extra dict)."""
    ckpt = torch.load(path, map_location='cpu', weights_only=True)
    if 'model' in ckpt:  # ours
        ckpt = load_checkpoint(path, model, trainer.optimizer, trainer.scaler)
        return ckpt['epoch'], ckpt.get('step', 0), ckpt.get('extra', {})
    if 'module' not in ckpt:
        raise ValueError(f'--resume_from {path}: neither our checkpoint nor an official SparK spark_style file '
                         f'(for weights only use --init_weight)')
    module = ckpt['module']
    if is_official_convnext(module, ENCODER_PREFIX):
        module = convnext_official_to_timm(module, ENCODER_PREFIX)
    print(f'official checkpoint {path}: {model.load_state_dict(module, strict=False)}')
    if ckpt.get('optimizer'):
        trainer.optimizer.load_state_dict(
            official_optimizer_state(ckpt['optimizer'], trainer.optimizer, model, set(module)))
    return ckpt.get('epoch', -1), None, {}
