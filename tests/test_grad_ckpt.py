"""--grad_ckpt (activation checkpointing): for every model family one float64 training step gives the same loss,
gradients and BatchNorm buffers with and without it, drop path draws the same masks in the recomputation, fewer
activations are stored, and the flag reaches the model from each entry script."""
import copy

import pytest
import timm
import torch
from torch.autograd.graph import saved_tensors_hooks

import models  # noqa: F401  (registers the models with timm)
import models.grad_ckpt
from models.localmim import MaskedAutoencoderViT
from models.r3d import GlobalPoolHead, VideoHeadModel, resnet3d_basic
from models.sce import SCE
from models.slak import SLaK
from tests.helpers import finetune_args, slak_args


def bn_buffers(model):
    return {n: b for n, b in model.named_buffers() if 'running' in n or 'num_batches_tracked' in n}


def train_step(model, step, seed=0):
    """(loss, {name: grad}, {name: BN buffer}, bytes of activations kept for the backward pass) of one step."""
    kept = []

    def pack(t):
        kept.append(t.numel() * t.element_size())
        return t

    torch.manual_seed(seed)  # the same drop-path masks in both runs
    with saved_tensors_hooks(pack, lambda t: t):
        loss = step(model)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, {n: b.clone() for n, b in bn_buffers(model).items()}, sum(kept)


def assert_same_step(model, step, enable=lambda m: m.set_grad_checkpointing(True)):
    """Runs `step` on two copies of `model`, the second with checkpointing, and compares everything."""
    plain, ckpt = copy.deepcopy(model), copy.deepcopy(model)
    enable(ckpt)
    loss, grads, buffers, kept = train_step(plain, step)
    loss_c, grads_c, buffers_c, kept_c = train_step(ckpt, step)
    torch.testing.assert_close(loss_c, loss, rtol=1e-12, atol=0)
    assert grads_c.keys() == grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], rtol=1e-10, atol=1e-14, msg=name)
    for name in buffers:  # bit for bit: BN updated its statistics exactly once per forward
        assert torch.equal(buffers_c[name], buffers[name]), name
    assert kept_c < 0.7 * kept, f'checkpointing kept {kept_c} of {kept} bytes of activations'
    return ckpt


def localmim(**kw):
    model = MaskedAutoencoderViT(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, decoder_embed_dim=32,
                                decoder_num_heads=2, **kw).double()
    model.hog_enc.float()  # HOG targets (and so the loss) are float32 by design, as under AMP
    return model


def mim_step(imgs, noise):
    return lambda model: model(imgs, 0.75, noise)[0]


def test_localmim_multiscale_hog_loss():
    torch.manual_seed(0)
    imgs, noise = torch.rand(2, 3, 32, 32, dtype=torch.float64), torch.rand(2, 16)
    assert_same_step(localmim(), mim_step(imgs, noise))


def test_localmim_freezeout_checkpoints_only_trained_blocks(monkeypatch):
    """Two frozen units (the embedding and block 0): blocks 1-3 and the active stages' decoders are checkpointed,
    the frozen block runs without autograd."""
    torch.manual_seed(0)
    model = localmim()
    model.frozen_units = 2
    for p in [*model.patch_embed.parameters(), model.cls_token, *model.blocks[0].parameters()]:
        p.requires_grad_(False)
    imgs, noise = torch.rand(2, 3, 32, 32, dtype=torch.float64), torch.rand(2, 16)
    ckpt = assert_same_step(model, mim_step(imgs, noise))
    calls = []
    real = models.localmim.checkpointed
    monkeypatch.setattr(models.localmim, 'checkpointed', lambda block, x: calls.append(block) or real(block, x))
    ckpt(imgs, 0.75, noise)
    blocks = {id(b): name for name, b in ckpt.named_modules()}
    assert [blocks[id(b)] for b in calls] == ['blocks.1', 'blocks.2', 'blocks.3', 'decoder.0.blocks.0',
                                              'decoder.1.blocks.0', 'decoder.2.blocks.0', 'decoder.3.blocks.0']


def test_finetune_vit_with_drop_path():
    torch.manual_seed(0)
    model = timm.create_model('vit_tiny_patch16', img_size=32, num_classes=5, drop_path_rate=0.5).double()
    imgs, labels = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.tensor([1, 3])
    assert_same_step(model, lambda m: torch.nn.functional.cross_entropy(m(imgs), labels))


@pytest.mark.parametrize('decom', [False, True])
def test_slak_with_batchnorm_and_drop_path(decom):
    torch.manual_seed(0)
    model = SLaK(num_classes=5, depths=(1, 1, 2, 1), dims=(8, 16, 32, 64), kernel_size=(7, 7, 5, 3, 3),
                 drop_path_rate=0.5, layer_scale_init_value=1.0, Decom=decom, conv_impl='dense').double()
    imgs, labels = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 4])
    assert_same_step(model, lambda m: torch.nn.functional.cross_entropy(m(imgs), labels))


def tiny_sce():
    net, dim = resnet3d_basic(18, stem_dim=8)
    model = SCE(trunk=VideoHeadModel(net, GlobalPoolHead(), dim), queue_size=16, queue_feature_dim=8,
               projector_hidden_dims=(16,), projector_output_dim=8, predictor_hidden_dims=(16,),
               predictor_output_dim=8).double()
    return model  # the loss, queue included, runs in float64 too


def test_sce_r3d_trunk_batchnorm_buffers():
    """Both views through the online trunk (two BN updates per step, each kept once) and the momentum trunk."""
    torch.manual_seed(0)
    model = tiny_sce()
    for p in model.parameters():  # the zero-initialised last BN of each block would hide the branch's gradients
        if p.ndim == 1 and p.requires_grad:
            torch.nn.init.uniform_(p, 0.5, 1.5)
    views = [torch.randn(2, 3, 2, 32, 32, dtype=torch.float64) for _ in range(2)]
    ckpt = assert_same_step(model, lambda m: m(views)[0])
    assert ckpt.trunk.model.grad_checkpointing and not ckpt.momentum_trunk.model.grad_checkpointing


def test_checkpointed_is_a_plain_call_without_autograd(monkeypatch):
    monkeypatch.setattr(models.grad_ckpt, 'checkpoint', None)  # would raise if called
    net, _ = resnet3d_basic(18, stem_dim=8)
    net.grad_checkpointing = True
    with torch.no_grad():
        net(torch.randn(2, 3, 2, 32, 32))


# ---- the flag, from each entry script's parser to the model

def test_under_torch_compile_a_plain_non_reentrant_checkpoint_gives_the_same_gradients(monkeypatch):
    calls, real = [], models.grad_ckpt.checkpoint
    monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: True)
    monkeypatch.setattr(models.grad_ckpt, 'checkpoint', lambda fn, *a, **kw: calls.append(kw) or real(fn, *a, **kw))
    torch.manual_seed(0)
    layer, x = torch.nn.Linear(3, 3).double(), torch.randn(2, 3, dtype=torch.float64)
    models.grad_ckpt.checkpointed(layer, x).square().sum().backward()
    recomputed = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    layer(x).square().sum().backward()
    assert calls == [{'use_reentrant': False}]
    assert all(torch.equal(a, p.grad) for a, p in zip(recomputed, layer.parameters()))


def test_run_finetune_flag(tmp_path):
    import run_finetune
    assert run_finetune.build_model(finetune_args(tmp_path, '--grad_ckpt')).grad_checkpointing
    assert not run_finetune.build_model(finetune_args(tmp_path)).grad_checkpointing
    with pytest.raises(ValueError, match='--grad_ckpt.*BatchNorm'):
        run_finetune.build_model(finetune_args(tmp_path, '--grad_ckpt', '--model', 'resnet18'))


def test_main_slak_flag(tmp_path):
    import main_slak
    assert main_slak.build_model(slak_args(tmp_path, '--grad_ckpt')).grad_checkpointing
    assert not main_slak.build_model(slak_args(tmp_path)).grad_checkpointing


def test_main_sce_flag():
    import main_sce
    args = main_sce.get_args_parser().parse_args(['--data_path', 'demo', '--grad_ckpt', '--queue_size', '16'])
    model = main_sce.build_sce(args)
    assert model.trunk.model.grad_checkpointing and not model.momentum_trunk.model.grad_checkpointing
    args.grad_ckpt = False
    assert not main_sce.build_sce(args).trunk.model.grad_checkpointing


def test_run_pretrain_flag(tmp_path):
    import run_pretrain
    from tests.helpers import pretrain_args
    assert run_pretrain.build_model(pretrain_args(tmp_path, tmp_path, '--grad_ckpt')).grad_checkpointing
    assert not run_pretrain.build_model(pretrain_args(tmp_path, tmp_path)).grad_checkpointing
