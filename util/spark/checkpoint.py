"""SparK's output files, readable by our tools and by the official SparK code alike.

In `output_<exp_name>/`, rewritten atomically every epoch:
  <model>_still_pretraining.pth   our resumable checkpoint (`model` in timm key names, optimizer, ...) that also
                                  holds the official keys (`module` under the official names, `arch`, ...); the
                                  optimizer follows the official parameter order, so it is the official state
                                  too. Also linked as <model>_withdecoder_1kpretrained_spark_style.pth.
  <model>_1kpretrained.pth        the encoder in timm key layout: for timm.create_model / --finetune.
  <model>_1kpretrained_timm_style.pth
                                  the encoder in the official model's key layout (FB ConvNeXt names for
                                  ConvNeXts; else a link to <model>_1kpretrained.pth).
`--resume_from` also takes an official spark_style file: its ConvNeXt names are mapped to timm's, and its
optimizer state loads as it is (same parameter order), after a check of every tensor's shape.
"""
import os

from models.spark import encoder_state_dict
from util.checkpoint import (load_checkpoint, no_readable_checkpoint, on_main_process, read_checkpoint,
                              readable_checkpoint, save_checkpoint, write_file)
from util.optimizer_state import load_optimizer_state


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
    """The resumable checkpoint and the two encoder files (and the newer official names). Call on every rank.
    Nothing is written for a model holding NaN or inf; a failed write stops every rank (util/checkpoint.py)."""
    names = output_names(args.model)
    official = {'module': model.official_state_dict(with_config=True), 'arch': args.model,
                'input_size': args.input_size, 'is_pretrain': True,
                'performance_desc': f'{stats["min_loss"]:.4f} {stats["last_loss"]:.4f}'}
    save_checkpoint(args.exp_dir, epoch, trainer.num_updates, args, model, optimizer, trainer.scaler, extra=stats,
                    name=names['resume'], top_level=official)
    resume_file = os.path.join(args.exp_dir, names['resume'])

    def write_encoders():
        write_file(encoder_state_dict(model), os.path.join(args.exp_dir, names['encoder']), resume_file)
        if model.official_convnext:
            write_file(encoder_state_dict(model, official=True), os.path.join(args.exp_dir, names['encoder_new']),
                       resume_file)
        else:
            _link(names['encoder'], os.path.join(args.exp_dir, names['encoder_new']))
        _link(names['resume'], os.path.join(args.exp_dir, names['resume_new']))
    on_main_process(write_encoders, model)


def latest_spark_checkpoint(exp_dir, model_name):
    """The experiment folder's resumable checkpoint (ours, else the official spark_style file), or None when it
    holds neither. A file that cannot be read is reported in one line and skipped; when none is left, a one-line
    CheckpointError (the run never starts over by itself)."""
    names = output_names(model_name)
    unreadable = []
    for key in ('resume', 'resume_new'):
        path = os.path.join(exp_dir, names[key])
        if not os.path.isfile(path) or any(os.path.samefile(path, seen) for seen in unreadable):
            continue  # the official name is usually a link to ours
        if readable_checkpoint(path) is not None:
            return path
        unreadable.append(path)
    if unreadable:
        raise no_readable_checkpoint(exp_dir, unreadable, '--resume_from')
    return None


def resume_spark(path, model, trainer):
    """Loads weights + optimizer (+ our extras) from path; returns (last finished epoch, step, extra dict)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'--resume_from {path}: no such file')
    ckpt = read_checkpoint(path)
    if 'model' in ckpt:  # ours
        ckpt = load_checkpoint(path, model, trainer.optimizer, trainer.scaler)
        return ckpt['epoch'], ckpt.get('step', 0), ckpt.get('extra', {})
    if 'module' not in ckpt:
        raise ValueError(f'--resume_from {path}: neither our checkpoint nor an official SparK spark_style file '
                         f'(for weights only use --init_weight)')
    result = model.load_state_dict(ckpt['module'], strict=False)  # official ConvNeXt names are mapped to timm's
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f'--resume_from {path} does not fit this model (missing {result.missing_keys[:3]}, '
                         f'unexpected {result.unexpected_keys[:3]}): was it saved for another --model?')
    print(f'official checkpoint {path}: all {len(ckpt["module"]) - ("config" in ckpt["module"])} tensors loaded')
    if ckpt.get('optimizer'):
        load_optimizer_state(trainer.optimizer, ckpt['optimizer'], path)
    return ckpt.get('epoch', -1), None, {}
