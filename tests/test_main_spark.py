"""main_spark.py: SparK schedules, param groups, LAMB clipping and --clip, flags, run, resume."""
import json
import math
import shlex
import shutil

import pytest
import timm
import torch

import main_spark
from helpers import straight_and_resumed, write_images
from models.spark import build_spark
from util.checkpoint import CheckpointError
from util.runtime import per_process_batch
from util.spark.schedule import SparkSchedule, spark_lr, spark_param_groups, spark_wd
from util.train_step import TrainStep


def test_lr_schedule_matches_official():
    iters, peak = 313, 3.2e-3
    wp_it, max_it = 40 * iters, 1600 * iters
    assert (wp_it, max_it) == (12520, 500800)
    assert spark_lr(0, wp_it, max_it, peak) == pytest.approx(1.6e-5)  # 0.5% of the peak at it 0
    assert spark_lr(wp_it // 2, wp_it, max_it, peak) == pytest.approx(peak * (0.005 + 0.995 * 0.5))
    assert spark_lr(wp_it, wp_it, max_it, peak) == pytest.approx(peak)
    mid = wp_it + (max_it - 1 - wp_it) / 2
    assert spark_lr(mid, wp_it, max_it, peak) == pytest.approx(peak * (0.001 + 0.999 * 0.5))
    assert spark_lr(max_it - 1, wp_it, max_it, peak) == pytest.approx(peak * 0.001)


def test_wd_schedule_rises_from_wd_to_wde():
    max_it = 1600 * 313
    assert spark_wd(0, max_it, 0.04, 0.2) == pytest.approx(0.04)
    assert spark_wd((max_it - 1) / 2, max_it, 0.04, 0.2) == pytest.approx(0.12)
    assert spark_wd(max_it - 1, max_it, 0.04, 0.2) == pytest.approx(0.2)
    values = [spark_wd(it, max_it, 0.04, 0.2) for it in range(0, max_it, 10000)]
    assert values == sorted(values)
    ratio = 1234 / (max_it - 1)
    assert spark_wd(1234, max_it, 0.04, 0.2) == pytest.approx(0.2 + (0.04 - 0.2) * (0.5 + 0.5 * math.cos(math.pi * ratio)))


def test_schedule_object_sets_groups():
    model = build_spark('resnet18', 64)
    groups = spark_param_groups(model)
    decay = {id(p) for p in groups[0]['params']}
    names = {n for n, p in model.named_parameters() if id(p) not in decay}
    assert any(n.startswith('mask_token') for n in names) and all(
        p.ndim == 1 or n.endswith('.bias') or 'mask_token' in n for n, p in model.named_parameters() if n in names)
    assert all(p.ndim > 1 for p in groups[0]['params'])
    groups[1]['lr_scale'] = 0.5
    opt = torch.optim.SGD(groups, lr=1.0)
    sched = SparkSchedule(peak_lr=1e-3, wd=0.04, wde=0.2, ep=10, wp_ep=2, iters_per_epoch=5)
    lr = sched.adjust(opt, 1.4)  # it 7 < warmup 10
    assert lr == pytest.approx(1e-3 * (0.005 + 0.995 * 7 / 10))
    assert opt.param_groups[0]['lr'] == lr and opt.param_groups[1]['lr'] == pytest.approx(lr * 0.5)
    assert opt.param_groups[0]['weight_decay'] == pytest.approx(spark_wd(7, 50, 0.04, 0.2))
    assert opt.param_groups[1]['weight_decay'] == 0.0
    assert sched.metrics() == {'wd': pytest.approx(spark_wd(7, 50, 0.04, 0.2))}
    assert SparkSchedule(1e-3, 0.04, 0.0, 10, 2, 5).wde == 0.04  # `wde or wd`


def two_lamb_steps(opt, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach().clone() for p in params]


def test_lamb_clips_the_global_norm_at_5():
    """main_spark's LAMB scales every gradient by 5 / global norm when that norm is above 5. A step of Adam-style
    moments hides a uniform scale, so two steps are taken: a huge gradient (norm 2000, clipped to 5), then one of norm
    1 (left alone). Clipped, the second gradient weighs as much as the first in the moments; unclipped, it is noise."""
    args = main_spark.get_args_parser().parse_args(['--model=resnet18'])
    args.lr, args.ada = 1e-3, 0.95
    torch.manual_seed(1)
    model = torch.nn.Linear(3, 2)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    opt = main_spark.build_optimizer(args, model)
    params = list(model.parameters())
    first = [torch.randn_like(p) for p in params]
    second = [-torch.randn_like(p) for p in params]
    norm = lambda gs: torch.linalg.vector_norm(torch.cat([g.flatten() for g in gs]))  # noqa: E731
    first = [g * 2000 / norm(first) for g in first]
    second = [g / norm(second) for g in second]
    got = two_lamb_steps(opt, params, [first, second])

    def reference(step_grads):  # the same optimizer without clipping, fed the gradients clipped by hand
        ref = torch.nn.Linear(3, 2)
        ref.load_state_dict(start)
        ref_opt = timm.optim.Lamb(spark_param_groups(ref), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0,
                                  max_grad_norm=None)
        return two_lamb_steps(ref_opt, list(ref.parameters()), step_grads)

    clipped = reference([[g * 5 / 2000 for g in first], second])
    unclipped = reference([first, second])
    assert max((a - b).abs().max() for a, b in zip(clipped, unclipped)) > 1e-4  # clipping matters here
    for a, b in zip(got, clipped):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert isinstance(opt, timm.optim.Lamb) and opt.defaults['max_grad_norm'] == 5.0


@pytest.mark.parametrize('opt', ['sgd', 'adamw'])
def test_clip_0_means_no_clipping(opt):
    """--clip=0 (official: clip only when clip > 0) must leave the gradients alone; a step with SGD (the update scales
    with the gradient) equals the unclipped reference step p - lr * g."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x = torch.randn(8, 4) * 10
    grads = torch.autograd.grad(model(x).pow(2).mean(), list(model.parameters()))
    expected = [p.detach() - 0.1 * g for p, g in zip(model.parameters(), grads)]
    assert sum(g.norm() ** 2 for g in grads) ** 0.5 > 1  # so a clip at 1 (or 0) would change the step
    for clip in (0.0, None):
        m = torch.nn.Linear(4, 3)
        m.load_state_dict(model.state_dict())
        trainer = TrainStep(m, torch.optim.SGD(m.parameters(), lr=0.1), 'cpu', clip_grad=clip)
        trainer.backward(m(x).pow(2).mean())
        trainer.step()
        assert all(torch.allclose(p, e, atol=1e-6) for p, e in zip(m.parameters(), expected)), clip
    # main_spark: --clip=0 with sgd/adamw gives no clipping, --clip=5 clips at 5, LAMB clips inside its step
    parse = main_spark.get_args_parser().parse_args
    for argv, clip in (([f'--opt={opt}', '--clip=0'], None), ([f'--opt={opt}'], 5.0), (['--clip=3'], None)):
        args = parse(argv)
        args.lr, args.ada = 0.1, 0.95
        assert main_spark.build_trainer(args, model, main_spark.build_optimizer(args, model), 'cpu').clip_grad == clip


@pytest.mark.parametrize('launcher_flag', ['--local-rank=3', '--local_rank=3', None])
def test_readme_command_parses(launcher_flag):
    """The ResNet-50 command of https://github.com/keyu-tian/SparK/blob/main/pretrain/README.md, --exp_dir left out."""
    line = '--exp_name=my_exp --data_path=/path/to/imagenet --model=resnet50 --bs=512'
    args = main_spark.get_args_parser().parse_args(shlex.split(line) + ([launcher_flag] if launcher_flag else []))
    assert (args.exp_name, args.data_path, args.model, args.bs) == ('my_exp', '/path/to/imagenet', 'resnet50', 512)
    assert args.local_rank == (3 if launcher_flag else -1)
    assert main_spark.exp_dir_of(args) == 'output_my_exp'
    assert (args.mask, args.input_size, args.sbn, args.num_workers, args.dp, args.base_lr, args.wd, args.wde,
            args.ep, args.wp_ep, args.clip, args.opt, args.ada, args.amp, args.resume_from, args.init_weight) == \
        (0.6, 224, True, 8, 0.0, 2e-4, 0.04, 0.2, 1600, 40, 5, 'lamb', 0.0, 'none', '', '')


@pytest.mark.parametrize('model, rate', [('resnet50', 0.05), ('convnext_small', 0.2), ('resnet18', 0.0)])
def test_dp_0_means_the_official_rate_of_the_model(model, rate):
    """As the official build_sparse_encoder: an explicit --dp 0 (its default) keeps the model's own rate."""
    args = main_spark.get_args_parser().parse_args(['--dp=0', f'--model={model}', '--bs=8'])
    args.distributed = False
    main_spark.resolve_args(args, torch.device('cpu'))
    assert args.dp == rate
    if model == 'resnet50':  # and the encoder is built with it
        spark = build_spark(model, 64, dp=args.dp, decoder_width=64)
        rates = [m.drop_prob for m in spark.modules() if type(m).__name__ == 'DropPath']
        assert max(rates) == pytest.approx(0.05) and min(rates) > 0  # timm's rule: rising to the rate per block
    args = main_spark.get_args_parser().parse_args(['--dp=0.3', f'--model={model}', '--bs=8'])
    args.distributed = False
    main_spark.resolve_args(args, torch.device('cpu'))
    assert args.dp == 0.3


@pytest.mark.parametrize('model, beta2', [('resnet50', 0.95), ('convnext_small', 0.999), ('your_convnet', 0.95)])
def test_ada_0_gives_every_model_a_second_moment(model, beta2):
    args = main_spark.get_args_parser().parse_args([f'--model={model}', '--bs=8'])
    args.distributed = False
    main_spark.resolve_args(args, torch.device('cpu'))
    assert args.ada == beta2
    assert main_spark.build_optimizer(args, build_spark('resnet18', 64, decoder_width=64)).defaults['betas'] == \
        (0.9, beta2)


def test_tap_style_booleans_and_384_recipe():
    parse = main_spark.get_args_parser().parse_args
    assert parse(['--sbn=False']).sbn is False and parse(['--sbn=True']).sbn is True and parse(['--sbn']).sbn
    args = parse(shlex.split('--model=convnext_large --input_size=384 --mask=0.75 --bs=2048 --base_lr=4e-4'))
    assert (args.input_size, args.mask, args.bs, args.base_lr) == (384, 0.75, 2048, 4e-4)
    with pytest.raises(SystemExit):
        parse(['--sbn=maybe'])


def test_per_process_batch():
    assert per_process_batch(512, 8) == 64
    assert per_process_batch(512, 8, accum_iter=4) == 16
    with pytest.raises(ValueError, match='multiple of the number of processes'):
        per_process_batch(500, 8)
    with pytest.raises(ValueError, match='accum_iter'):
        per_process_batch(512, 8, accum_iter=3)


def run_args(data, out, *extra):
    argv = ['--exp_name=t', f'--exp_dir={out}', f'--data_path={data}', '--model=resnet18', '--input_size=64',
            '--bs=4', '--ep=2', '--wp_ep=1', '--num_workers=0', '--device=cpu', '--print_freq=1', *extra]
    return main_spark.get_args_parser().parse_args(argv)


@pytest.fixture(scope='module')
def runs(module_tmp):
    """One straight 2-epoch run, and one interrupted after epoch 0 then auto-resumed (1 step per epoch)."""
    tmp = module_tmp
    data = write_images(tmp / 'imgs' / 'train', 4, size=40)  # trailing 'train' is stripped, then <path>/train used
    straight_and_resumed(main_spark, lambda out: run_args(data, out), 1, tmp)
    return tmp


def test_run_writes_outputs_and_encoder_loads_into_timm(runs):
    out = runs / 'straight'
    ckpt = torch.load(out / 'resnet18_still_pretraining.pth', weights_only=True)
    assert ckpt['epoch'] == 1 and ckpt['step'] == 2 and ckpt['optimizer']['state']
    encoder = torch.load(out / 'resnet18_1kpretrained.pth', weights_only=True)
    result = timm.create_model('resnet18').load_state_dict(encoder, strict=False)
    assert sorted(result.missing_keys) == ['fc.bias', 'fc.weight'] and not result.unexpected_keys
    lines = (out / 'pretrain_log.txt').read_text().splitlines()
    head = json.loads(lines[0])
    assert head['model'] == 'resnet18' and head['git_commit_id'] and 'cmd' in head and lines[1] == ''
    epochs = [json.loads(line) for line in lines[2:]]
    assert [e['cur_ep'] for e in epochs] == ['1/2', '2/2'] and all('rema' in e and 'last_L' in e for e in epochs)
    assert any((out / 'tensorboard_log').iterdir())
    assert '[*] [ep 2/2]' in (out / 'stdout_backup.txt').read_text() and (out / 'stderr_backup.txt').exists()


def test_resume_equals_uninterrupted_run(runs):
    a = torch.load(runs / 'straight' / 'resnet18_still_pretraining.pth', weights_only=True)
    b = torch.load(runs / 'resumed' / 'resnet18_still_pretraining.pth', weights_only=True)
    assert a['epoch'] == b['epoch'] == 1 and a['step'] == b['step'] == 2
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    for pid, state in a['optimizer']['state'].items():
        assert all(torch.equal(state[k], b['optimizer']['state'][pid][k]) for k in state if torch.is_tensor(state[k]))
    log = (runs / 'resumed' / 'pretrain_log.txt').read_text().splitlines()
    assert [json.loads(x)['cur_ep'] for x in log[2:]] == ['1/2', '2/2']


def test_damaged_resumable_file_stops_the_run_instead_of_starting_over(runs, tmp_path, capsys):
    """A rerun in a folder whose resumable checkpoint is damaged (its official-name link points to the same file)
    must not silently train from scratch over it: one line names the file and the flags that resume another file
    or start over on purpose; --auto_resume false then starts over."""
    out = shutil.copytree(runs / 'straight', tmp_path / 'out', symlinks=True)
    resumable = out / 'resnet18_still_pretraining.pth'
    resumable.write_bytes(resumable.read_bytes()[:5000])  # a copy cut short
    args = run_args(runs / 'imgs' / 'train', out, '--ep=3')
    with pytest.raises(CheckpointError) as error:
        main_spark.main(args)
    assert str(error.value) == (f'no checkpoint in {out} can be resumed ({resumable.name}: see above); resume another '
                                f'file with --resume_from FILE, or start over on purpose with --auto_resume false (the '
                                f'files there will be overwritten)')
    assert f'{resumable} cannot be read: truncated at 5000 bytes' in capsys.readouterr().out
    main_spark.main(run_args(runs / 'imgs' / 'train', out, '--ep=1', '--auto_resume=false'))
    assert torch.load(resumable, weights_only=True)['epoch'] == 0


def test_bad_model_and_input_size(tmp_path):
    with pytest.raises(ValueError, match='unknown SparK model'):
        build_spark('resnet7', 64)
    with pytest.raises(ValueError, match='not divisible'):
        build_spark('resnet18', 70)
