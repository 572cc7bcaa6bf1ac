"""SparK module (models/spark.py): loss against a hand computation, masks, key layout, builders."""
import pytest
import timm
import torch

from models.spark import LightDecoder, SparK, build_spark, encoder_state_dict

P = 32


@pytest.fixture(scope='module')
def r18():
    torch.manual_seed(0)
    return build_spark('resnet18', input_size=64)


def _given_mask():
    # 2 samples on the 2x2 grid of a 64 px input (patch 32); True = visible
    return torch.tensor([[[[True, False], [False, True]]],
                         [[[False, False], [True, False]]]])


def _input(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 64, 64, generator=g)


def _hand_loss(x, rec, mask):
    """Per-patch normalised targets (unbiased var + 1e-6 inside sqrt, flattening row, col, channel)
    and mean squared error averaged over all masked patches, written with explicit loops."""
    B, _, H, W = x.shape
    num, cnt = torch.zeros((), dtype=torch.float64), 0
    for b in range(B):
        for i in range(H // P):
            for j in range(W // P):
                if mask[b, 0, i, j]:
                    continue
                t = x[b, :, i * P:(i + 1) * P, j * P:(j + 1) * P].double().permute(1, 2, 0).reshape(-1)
                r = rec[b, :, i * P:(i + 1) * P, j * P:(j + 1) * P].double().permute(1, 2, 0).reshape(-1)
                mu = t.sum() / t.numel()
                var = ((t - mu) ** 2).sum() / (t.numel() - 1)
                tn = (t - mu) / torch.sqrt(var + 1e-6)
                num = num + ((r - tn) ** 2).mean()
                cnt += 1
    return num / cnt


def test_loss_matches_hand_computation(r18):
    x, mask = _input(), _given_mask()
    captured = {}
    h = r18.dense_decoder.register_forward_hook(lambda m, i, o: captured.__setitem__('rec', o.detach().clone()))
    try:
        r18.train()
        loss = r18(x, active_b1ff=mask)
    finally:
        h.remove()
    rec = captured['rec']
    assert rec.shape == x.shape
    ref = _hand_loss(x, rec, mask)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)

    # vis: visible patches are the input, masked ones the prediction mapped back with the true
    # per-patch mean/std of the input
    r18.eval()                                           # eval: deterministic BN, vis with same rec
    with torch.no_grad():
        h = r18.dense_decoder.register_forward_hook(lambda m, i, o: captured.__setitem__('rec', o.clone()))
        try:
            inp, masked, rec_or_inp = r18(x, active_b1ff=mask, vis=True)
        finally:
            h.remove()
    rec = captured['rec']
    up = mask.repeat_interleave(P, 2).repeat_interleave(P, 3)
    assert torch.equal(inp, x)
    assert torch.equal(masked, x * up)
    assert torch.equal(rec_or_inp[up.expand_as(x)], x[up.expand_as(x)])
    b, i, j = 0, 0, 1                                    # a masked patch
    t = x[b, :, i * P:(i + 1) * P, j * P:(j + 1) * P]
    mu, sd = t.mean(), (t.var() + 1e-6) ** .5
    torch.testing.assert_close(rec_or_inp[b, :, i * P:(i + 1) * P, j * P:(j + 1) * P],
                               rec[b, :, i * P:(i + 1) * P, j * P:(j + 1) * P] * sd + mu)
    r18.train()


def test_given_mask_is_used_and_reproducible(r18):
    x, mask = _input(1), _given_mask()
    r18.eval()                                           # running stats do not change in eval
    state = torch.get_rng_state()
    with torch.no_grad():
        l1 = r18(x, active_b1ff=mask)
        l2 = r18(x, active_b1ff=mask)
        l3 = r18(x, active_b1ff=~mask)
    assert torch.equal(torch.get_rng_state(), state)     # a given mask draws no random numbers
    assert torch.equal(l1, l2)
    assert not torch.equal(l1, l3)
    # train mode, same BN state -> same loss
    r18.train()
    snap = {k: v.clone() for k, v in r18.state_dict().items()}
    la = r18(x, active_b1ff=mask)
    r18.load_state_dict(snap)
    lb = r18(x, active_b1ff=mask)
    r18.load_state_dict(snap)
    assert torch.equal(la, lb)


def test_mask_generation_count_and_generator():
    torch.manual_seed(0)
    m = build_spark('resnet18', input_size=224, mask_ratio=0.6)
    assert m.len_keep == 20                              # round(49 * 0.4) = round(19.6)
    a = m.mask(16, 'cpu', generator=torch.Generator().manual_seed(3))
    b = m.mask(16, 'cpu', generator=torch.Generator().manual_seed(3))
    c = m.mask(16, 'cpu', generator=torch.Generator().manual_seed(4))
    assert a.dtype == torch.bool and a.shape == (16, 1, 7, 7)
    assert (a.flatten(1).sum(1) == 20).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(r.tolist()) for r in a.flatten(1)}) > 1     # independent per sample
    assert m.mask(4, torch.device('cpu')).flatten(1).sum(1).eq(20).all()
    m75 = SparK(m.sparse_encoder, LightDecoder(32, sbn=False), mask_ratio=0.75)
    assert m75.len_keep == 12                            # round(49 * 0.25) = round(12.25)


def _expected_keys_resnet(chs, cnn_keys):
    """Official SparK state-dict layout (pretrain/spark.py, decoder.py) for a ResNet: {key: shape or None}."""
    exp = {'sparse_encoder.sp_cnn.' + k: tuple(v.shape) for k, v in cnn_keys.items()}
    widths = [768, 384, 192, 96, 48, 24]
    for i in range(5):
        cin, cout = widths[i], widths[i + 1]
        pre = f'dense_decoder.dec.{i}.'
        exp[pre + 'up_sample.weight'] = (cin, cin, 4, 4)
        exp[pre + 'up_sample.bias'] = (cin,)
        exp[pre + 'conv.0.weight'] = (cin, cin, 3, 3)
        exp[pre + 'conv.3.weight'] = (cout, cin, 3, 3)
        for j, c in ((1, cin), (4, cout)):
            for n in ('weight', 'bias', 'running_mean', 'running_var'):
                exp[pre + f'conv.{j}.{n}'] = (c,)
            exp[pre + f'conv.{j}.num_batches_tracked'] = ()
    exp['dense_decoder.proj.weight'] = (3, 24, 1, 1)
    exp['dense_decoder.proj.bias'] = (3,)
    for i, (e, d) in enumerate(zip(reversed(chs), [768, 384, 192, 96])):
        for n in ('weight', 'bias', 'running_mean', 'running_var'):
            exp[f'densify_norms.{i}.{n}'] = (e,)
        exp[f'densify_norms.{i}.num_batches_tracked'] = ()
        k = 1 if i == 0 else 3
        exp[f'densify_projs.{i}.weight'] = (d, e, k, k)
        exp[f'densify_projs.{i}.bias'] = (d,)
        exp[f'mask_tokens.{i}'] = (1, e, 1, 1)
    exp['imn_m'] = (1, 3, 1, 1)
    exp['imn_s'] = (1, 3, 1, 1)
    return exp


@pytest.mark.parametrize('name,chs,n_cnn', [('resnet18', [64, 128, 256, 512], None),
                                            ('resnet50', [256, 512, 1024, 2048], 318)])
def test_state_dict_key_layout(name, chs, n_cnn):
    size = 224
    m = build_spark(name, input_size=size)
    cnn = timm.create_model(name, pretrained=False, num_classes=0, global_pool='')
    exp = _expected_keys_resnet(chs, cnn.state_dict())
    exp['norm_black'] = (1, 3, size, size)
    sd = m.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == exp
    assert sum(k.startswith('dense_decoder.') for k in sd) == 72
    assert not any(k.startswith('sparse_encoder.sp_cnn.fc') for k in sd)
    if n_cnn is not None:
        # official R50: 318 encoder + 72 decoder + 20 norms + 8 projs + 4 tokens + 3 deprecated buffers
        assert sum(k.startswith('sparse_encoder.sp_cnn.') for k in sd) == n_cnn
        assert len(sd) == 318 + 72 + 20 + 8 + 4 + 3
        dec = sum(p.numel() for p in m.dense_decoder.parameters())
        assert abs(dec / 1e6 - 23.18) < 0.01                  # official: 23.18M for every backbone
        dens = sum(p.numel() for n, p in m.named_parameters() if n.startswith('densify'))
        assert abs(dens / 1e6 - 6.23) < 0.01                  # official: 6.23M for ResNets
    # a spark_style checkpoint round-trips strictly, with its config
    ck = m.state_dict(with_config=True)
    assert ck['config']['mask_ratio'] == 0.6 and ck['config']['dense_decoder.width'] == 768
    m2 = build_spark(name, input_size=size)
    m2.load_state_dict(ck, strict=True)
    for k, v in m2.state_dict().items():
        assert torch.equal(v, sd[k]), k
    ck['config']['mask_ratio'] = 0.75
    with pytest.raises(AttributeError):
        m2.load_state_dict(ck, strict=True)


def test_mask_token_init_and_convnext_identity_proj():
    m = build_spark('resnet18', input_size=64)
    for t in m.mask_tokens:
        assert t.abs().max() <= 0.02 and t.std() > 0
    # ConvNeXt-S-like widths: level-0 projection is Identity (no densify_projs.0 keys)
    cnx = build_spark('convnext_tiny', input_size=64)      # dims 96..768, last = decoder width
    keys = cnx.state_dict().keys()
    assert not any(k.startswith('densify_projs.0.') for k in keys)
    assert cnx.densify_projs[1].weight.shape == (384, 384, 3, 3)
    assert 'densify_norms.0.weight' in keys and 'densify_norms.0.running_mean' not in keys   # 'ln'


def test_encoder_state_dict_loads_into_timm(r18):
    sd = encoder_state_dict(r18)
    model = timm.create_model('resnet18', pretrained=False)
    res = model.load_state_dict(sd, strict=False)
    assert sorted(res.missing_keys) == ['fc.bias', 'fc.weight']
    assert res.unexpected_keys == []
    msd = model.state_dict()
    for k, v in sd.items():
        assert torch.equal(msd[k], v), k
    torch.save(sd, '/dev/null')                        # plain tensors, serialisable


def test_clear_errors():
    with pytest.raises(ValueError, match='resnet50'):
        build_spark('vit_base_patch16_224')
    with pytest.raises(ValueError, match='divisible'):
        build_spark('resnet18', input_size=100)
    m = build_spark('resnet18', input_size=64)
    with pytest.raises(ValueError, match='active_b1ff'):
        m(torch.zeros(2, 3, 64, 64), active_b1ff=torch.ones(2, 1, 3, 3, dtype=torch.bool))


def test_backward_reaches_encoder_decoder_densify(r18):
    r18.train()
    r18.zero_grad(set_to_none=True)
    loss = r18(_input(2), active_b1ff=_given_mask())
    loss.backward()
    assert torch.isfinite(loss)
    grads = {n: p.grad for n, p in r18.named_parameters()}
    # (timm zero-initialises each block's last BN gamma, so convs inside a residual branch get zero
    # gradient at init; check the stem, the shortcut path and that BN gamma instead)
    for n in ('sparse_encoder.sp_cnn.conv1.weight', 'sparse_encoder.sp_cnn.layer4.0.downsample.0.weight',
              'sparse_encoder.sp_cnn.layer4.1.bn2.weight',
              'dense_decoder.dec.0.up_sample.weight', 'dense_decoder.proj.weight',
              'densify_projs.0.weight', 'densify_norms.3.weight', 'mask_tokens.0', 'mask_tokens.3'):
        assert grads[n] is not None and grads[n].abs().sum() > 0, n
    r18.zero_grad(set_to_none=True)


def test_random_mask_forward_and_vis_shapes(r18):
    torch.manual_seed(0)
    r18.eval()
    with torch.no_grad():
        loss = r18(_input())
        inp, masked, rec = r18(_input(), vis=True)
    r18.train()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert inp.shape == masked.shape == rec.shape == (2, 3, 64, 64)


def test_densify_norm_then_mask_token_then_proj(r18):
    """Decoder inputs: sparse BN over visible positions (zeros elsewhere), mask token at masked
    positions, then the projection (official SparK.forward)."""
    x, mask = _input(3), _given_mask()
    feats, proj_in = {}, {}
    hooks = [r18.sparse_encoder.register_forward_hook(lambda m, i, o: feats.__setitem__('f', [t.detach().clone() for t in o]))]
    for i, pr in enumerate(r18.densify_projs):
        hooks.append(pr.register_forward_hook(lambda m, inp, o, i=i: proj_in.__setitem__(i, inp[0].detach().clone())))
    r18.eval()
    try:
        with torch.no_grad():
            r18(x, active_b1ff=mask)
    finally:
        for h in hooks:
            h.remove()
        r18.train()
    enc = feats['f'][::-1]                                  # smallest first
    for i, f in enumerate(enc):
        s = f.shape[-1] // 2
        act = mask.repeat_interleave(s, 2).repeat_interleave(s, 3).expand_as(f)
        bn = r18.densify_norms[i]
        normed = (f - bn.running_mean.view(1, -1, 1, 1)) / (bn.running_var.view(1, -1, 1, 1) + bn.eps).sqrt() \
            * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
        ref = torch.where(act, normed, r18.mask_tokens[i].detach().expand_as(f))
        torch.testing.assert_close(proj_in[i], ref)


def test_decoder_shapes_and_add():
    torch.manual_seed(0)
    dec = LightDecoder(32, width=64, sbn=False).eval()
    assert [b.up_sample.in_channels for b in dec.dec] == [64, 32, 16, 8, 4]
    assert dec.proj.in_channels == 2 and dec.proj.out_channels == 3
    a = torch.randn(2, 64, 2, 2)
    b = torch.randn(2, 32, 4, 4)
    out = dec([a, b])
    assert out.shape == (2, 3, 64, 64)
    ref = dec.proj(dec.dec[4](dec.dec[3](dec.dec[2](dec.dec[1](dec.dec[0](a) + b)))))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(dec([a, None]), dec.proj(dec.dec[4](dec.dec[3](dec.dec[2](dec.dec[1](dec.dec[0](a)))))))
    with pytest.raises(ValueError):
        LightDecoder(24)


@pytest.mark.parametrize('name', ['resnet18', 'resnet50', 'convnext_atto', 'convnext_tiny', 'convnext_large',
                                  'your_convnet'])
def test_every_parameter_is_used(name):
    """DDP runs without find_unused_parameters: every parameter of the SparK model must get a gradient (timm's
    ConvNeXt keeps its head norm with num_classes=0; the encoder must not). convnext_large on the meta device."""
    device = 'meta' if name == 'convnext_large' else 'cpu'
    torch.manual_seed(0)
    with torch.device(device):
        model = build_spark(name, 64)
    model(torch.randn(2, 3, 64, 64, device=device)).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    assert not [k for k in model.sparse_encoder.sp_cnn.state_dict() if k.startswith(('head.', 'fc.', 'norm_pre.'))]
