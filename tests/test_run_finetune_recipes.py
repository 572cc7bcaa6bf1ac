"""run_finetune.py recipes: MAE's linear probe (LARS, its defaults, a frozen encoder) and SparK's ImageNet
fine-tuning pieces (Lamb, binary cross-entropy, eval crop, repeated augmentation, layer decay), checked against
hand computations."""
import json
import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

import run_finetune
from engine import train_one_epoch
from engine_finetune import classification_loss
from util.classification import build_criterion, build_mixup
from util.data import samplers
from util.data.datasets import build_finetune_transform
from util.lr_sched import WarmupCosine
from util.train_step import TrainStep

pytestmark = pytest.mark.usefixtures('one_thread')  # conftest.py
parse = run_finetune.get_args_parser().parse_args


def probe_model(*flags):
    args = parse(['--linprobe', '--model', 'resnet18', '--nb_classes', '5', '--device', 'cpu', *flags])
    torch.manual_seed(0)
    return args, run_finetune.build_model(args)


# ----------------------------------------------------------------------------------------------- linear probing

def test_linprobe_defaults_are_mae_main_linprobe_and_explicit_flags_win():
    args = parse(['--linprobe'])
    assert (args.drop_path, args.smoothing, args.blr, args.weight_decay, args.epochs, args.warmup_epochs,
            args.min_lr, args.batch_size) == (0.0, 0.0, 0.1, 0.0, 90, 10, 0.0, 512)
    assert args.global_pool is False and args.opt == 'lars'  # cls token
    assert args.aa == 'none' and args.reprob == 0 and args.mixup == 0 and args.cutmix == 0
    criterion = build_criterion(args, build_mixup(args))
    assert type(criterion) is nn.CrossEntropyLoss and criterion.label_smoothing == 0
    # no RandAugment, colour jitter or erasing: random resized crop + flip only
    steps = [type(t).__name__ for t in build_finetune_transform(True, args).transforms]
    assert steps == ['RandomResizedCropAndInterpolation', 'RandomHorizontalFlip', 'MaybeToTensor', 'Normalize']

    explicit = parse(['--linprobe', '--drop_path', '0.2', '--smoothing', '0.1', '--global_pool', '--blr', '0.5',
                      '--weight_decay', '0.01', '--epochs', '3'])
    assert (explicit.drop_path, explicit.smoothing, explicit.global_pool, explicit.blr, explicit.weight_decay,
            explicit.epochs) == (0.2, 0.1, True, 0.5, 0.01, 3)
    assert parse(['--linprobe', '--drop_path', '0.1']).drop_path == 0.1  # even when it equals the fine-tune default
    assert parse(['--drop_path', '0']).drop_path == 0.0 and parse(['--cls_token']).global_pool is False
    finetune = parse([])  # MAE's main_finetune.py defaults are unchanged
    assert (finetune.drop_path, finetune.smoothing, finetune.blr, finetune.weight_decay, finetune.global_pool,
            finetune.opt, finetune.reprob) == (0.1, 0.1, 1e-3, 0.05, True, 'adamw', 0.25)


def mae_lars_reference(param, grads, lr, wd, momentum=0.9, eta=1e-3):
    """MAE's LARS by hand: decay and trust ratio for ndim > 1 only; heavy-ball momentum without dampening."""
    p, mu = param.detach().clone(), torch.zeros_like(param)
    for g in grads:
        d = g.clone()
        if p.ndim > 1:
            d = d + wd * p
            d = d * (eta * p.norm() / d.norm())
        mu = momentum * mu + d
        p = p - lr * mu
    return p


def test_linprobe_optimizer_steps_are_mae_lars():
    args, model = probe_model('--weight_decay', '0.1')
    args.lr = 0.5
    optimizer = run_finetune.build_optimizer(args, model)
    linear = model.fc[1]
    trained = [p for group in optimizer.param_groups for p in group['params']]
    assert {id(p) for p in trained} == {id(linear.weight), id(linear.bias)}
    start = {'weight': linear.weight.detach().clone(), 'bias': linear.bias.detach().clone()}
    torch.manual_seed(1)
    grads = {name: [torch.randn_like(start[name]) for _ in range(3)] for name in start}
    for step in range(3):
        for name in start:
            getattr(linear, name).grad = grads[name][step].clone()
        optimizer.step()
    for name in start:
        expected = mae_lars_reference(start[name], grads[name], lr=0.5, wd=0.1)
        torch.testing.assert_close(getattr(linear, name).detach(), expected, rtol=1e-5, atol=1e-7, msg=name)
    # the bias moved by plain momentum SGD (no decay, no trust ratio): a big step, unlike the weight's
    assert (linear.bias - start['bias']).abs().max() > 0.5


def test_linprobe_trains_only_the_head_and_keeps_encoder_batchnorm_statistics():
    args, model = probe_model('--epochs', '1', '--warmup_epochs', '0', '--print_freq', '100')
    args.lr = 0.1
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = TrainStep(model, run_finetune.build_optimizer(args, model), 'cpu')
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(16, 3, 32, 32) * 2 + 1, torch.randint(0, 5, (16,)))
    train_one_epoch(DataLoader(data, batch_size=8), trainer, 0, WarmupCosine(args.lr, args.min_lr, args.epochs, args.warmup_epochs),
                    classification_loss(nn.CrossEntropyLoss(), 'cpu'), print_freq=args.print_freq)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {'fc.0.running_mean', 'fc.0.running_var', 'fc.0.num_batches_tracked', 'fc.1.weight',
                       'fc.1.bias'}
    assert any(k.endswith('running_mean') for k in before if not k.startswith('fc.'))  # the encoder has BN stats


# ----------------------------------------------------------------------------------------- SparK's recipe pieces

def test_opt_lamb_is_timm_lamb_as_spark_sets_it():
    model = timm.create_model('resnet18', num_classes=5)
    args = parse(['--model', 'resnet18', '--opt', 'lamb', '--weight_decay', '0.02'])
    args.lr = 1e-3
    optimizer = run_finetune.build_optimizer(args, model)
    assert type(optimizer) is timm.optim.Lamb
    assert optimizer.defaults['max_grad_norm'] == 1e7 and optimizer.defaults['always_adapt'] is True
    assert optimizer.defaults['bias_correction'] is False
    decays = {names: g['weight_decay'] for g in optimizer.param_groups
              for names in [frozenset(p.ndim for p in g['params'])]}
    assert decays == {frozenset({4}): 0.02, frozenset({2}): 0.02, frozenset({1}): 0.0}


def test_bce_criterion_with_and_without_mixup():
    torch.manual_seed(0)
    logits, labels = torch.randn(4, 5), torch.tensor([0, 3, 1, 4])

    def bce(targets):  # by hand, mean over all elements
        return -(targets * F.logsigmoid(logits) + (1 - targets) * F.logsigmoid(-logits)).mean()

    args = parse(['--bce', '--nb_classes', '5'])  # label smoothing 0.1 by default
    criterion = build_criterion(args, build_mixup(args))
    assert type(criterion) is timm.loss.BinaryCrossEntropy
    smoothed = torch.full((4, 5), 0.1 / 5).scatter_(1, labels[:, None], 1 - 0.1 + 0.1 / 5)
    torch.testing.assert_close(criterion(logits, labels), bce(smoothed))

    args = parse(['--bce', '--nb_classes', '5', '--mixup', '0.1', '--cutmix', '1.0'])
    mixup = build_mixup(args)
    criterion = build_criterion(args, mixup)
    assert type(criterion) is timm.loss.BinaryCrossEntropy and criterion.smoothing == 0  # smoothed by Mixup
    soft = torch.softmax(torch.randn(4, 5), dim=1)
    torch.testing.assert_close(criterion(logits, soft), bce(soft))


def image_sizes(transform, image):
    """The size (w, h) after each PIL-level step of an evaluation transform."""
    sizes = []
    for step in transform.transforms:
        if not isinstance(image, Image.Image):
            break
        image = step(image)
        if isinstance(image, Image.Image):
            sizes.append(image.size)
    return sizes


def test_run_finetune_eval_resize_keeps_mae_rule_and_takes_crop_pct():
    image = Image.new('RGB', (200, 100), (10, 20, 30))
    for size, expected in [(224, [(512, 256), (224, 224)]), (288, [(576, 288), (288, 288)]),
                           (384, [(768, 384), (384, 384)])]:  # MAE: 224/256 up to 224 px, then 1.0; never warped
        args = parse(['--input_size', str(size)])
        assert image_sizes(build_finetune_transform(False, args), image) == expected, size
    args = parse(['--input_size', '64', '--crop_pct', '0.95'])
    assert image_sizes(build_finetune_transform(False, args), image) == [(134, 67), (64, 64)]  # int(64 / 0.95)
    assert tuple(build_finetune_transform(False, args)(image).shape) == (3, 64, 64)
    args = parse(['--input_size', '384', '--eval_resize', 'convnext'])  # SparK's ConvNeXt-L 384 px: warped, no crop
    assert image_sizes(build_finetune_transform(False, args), image) == [(384, 384)]
    args = parse(['--input_size', '288', '--eval_resize', 'convnext', '--crop_pct', '0.95'])
    assert image_sizes(build_finetune_transform(False, args), image) == [(606, 303), (288, 288)]


def test_ta_wide_puts_trivial_augment_after_crop_and_flip():
    args = parse(['--aa', 'ta_wide', '--input_size', '32'])
    steps = [type(t).__name__ for t in build_finetune_transform(True, args).transforms]
    assert steps == ['RandomResizedCropAndInterpolation', 'RandomHorizontalFlip', 'TrivialAugmentWide',
                     'MaybeToTensor', 'Normalize', 'RandomErasing']


def test_repeated_augmentation_sends_each_image_to_every_process(monkeypatch):
    data = TensorDataset(torch.arange(12))
    per_rank = []
    for rank in range(3):
        monkeypatch.setattr(samplers, 'get_world_size', lambda: 3)
        monkeypatch.setattr(samplers, 'get_rank', lambda rank=rank: rank)
        plain = DataLoader(data, batch_size=2, drop_last=True)
        loader = samplers.with_repeated_augmentation(plain, 3)
        assert isinstance(loader.sampler, timm.data.distributed_sampler.RepeatAugSampler)
        loader.sampler.set_epoch(5)
        per_rank.append([int(i) for (batch,) in loader for i in batch])
    # 12 images / 3 processes = 4 per process per epoch: the same 4 images on every process (3 augmented copies)
    assert all(len(indices) == 4 == len(set(indices)) for indices in per_rank)
    assert per_rank[0] == per_rank[1] == per_rank[2]
    with pytest.raises(ValueError, match='--repeated_aug'):
        samplers.with_repeated_augmentation(DataLoader(data, batch_size=8, drop_last=True), 3)


def spark_resnet50_depth(name):
    """SparK's ResNet-50 depths written out: stem 0, layer1 1, layer2 2-3, layer3 4-5, layer4 6, fc 7."""
    if name.startswith('fc.'):
        return 7
    if not name.startswith('layer'):
        return 0
    stage, block = int(name[5]), int(name.split('.')[1])
    return {1: 1, 2: 2 + block // 2, 3: 4 + block // 3, 4: 6}[stage]


def spark_convnext_depth(name, n):
    """SparK's (BEiT-style) ConvNeXt depths for timm's names."""
    parts = name.split('.')
    if parts[0] == 'stem':
        return 0
    if parts[0] != 'stages':
        return n + 1
    stage = int(parts[1])
    if stage == 3:
        return n
    if parts[2] == 'downsample':
        return stage + 1
    return stage + 1 if stage < 2 else 3 + int(parts[3]) // 3


@pytest.mark.parametrize('case', ['resnet50', 'convnext_27_blocks', 'convnext_atto'])
def test_cnn_layer_decay_is_sparks(case):
    from timm.models.convnext import ConvNeXt
    if case == 'resnet50':
        model, name, depth, n = timm.create_model('resnet50', num_classes=5), 'resnet50', spark_resnet50_depth, 6
    elif case == 'convnext_27_blocks':  # ConvNeXt-S/B depths, narrow: N = 12
        model, name, n = ConvNeXt(depths=(3, 3, 27, 3), dims=(8, 16, 32, 64), num_classes=5), 'convnext_small', 12
    else:  # 6 blocks in stage 3: N = 6
        model, name, n = timm.create_model('convnext_atto', num_classes=5), 'convnext_atto', 6
    depth = depth if case == 'resnet50' else (lambda p: spark_convnext_depth(p, n))
    args = parse(['--model', name, '--layer_decay', '0.7', '--weight_decay', '0.02'])
    args.lr = 1e-3
    optimizer = run_finetune.build_optimizer(args, model)
    names = {id(p): n for n, p in model.named_parameters()}
    got = {names[id(p)]: (g['lr_scale'], g['weight_decay']) for g in optimizer.param_groups for p in g['params']}
    assert len(got) == len(names)
    for pname, param in model.named_parameters():
        expected = (0.7 ** (n + 1 - depth(pname)), 0.0 if param.ndim == 1 else 0.02)
        assert got[pname] == pytest.approx(expected, rel=1e-12), pname
    assert min(s for s, _ in got.values()) == pytest.approx(0.7 ** (n + 1))


def test_demo_run_with_spark_resnet_recipe(tmp_path, monkeypatch):
    monkeypatch.setenv('DEMO_DATA_ROOT', str(tmp_path / 'demo'))
    out = tmp_path / 'out'
    args = parse(['--data_path', 'demo', '--model', 'resnet10t', '--input_size', '32', '--batch_size', '16',
                  '--epochs', '1', '--warmup_epochs', '0', '--nb_classes', '6', '--num_workers', '0', '--device',
                  'cpu', '--output_dir', str(out), '--print_freq', '100', '--opt', 'lamb', '--bce', '--blr', '2e-3',
                  '--layer_decay', '0.7', '--weight_decay', '0.02', '--mixup', '0.1', '--cutmix', '1.0',
                  '--drop_path', '0.05', '--model_ema', '--crop_pct', '0.95', '--aa', 'ta_wide',
                  '--repeated_aug', '3'])
    run_finetune.main(args)
    log = [json.loads(line) for line in open(out / 'log.txt')]
    assert len(log) == 1 and math.isfinite(log[0]['train_loss']) and log[0]['test_count'] == 36
    assert 0 <= log[0]['test_acc1'] <= 100 and 0 <= log[0]['test_ema_acc1'] <= 100
    state = torch.load(out / 'checkpoint-last.pth', weights_only=True)['optimizer']['state']
    assert state and all('exp_avg_sq' in s for s in state.values())  # Lamb's moments
