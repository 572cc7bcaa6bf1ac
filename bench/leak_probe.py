"""How much of LocalMIM's pretext task does feature masking give away? A ridge-regression probe per frozen depth.

For each frozen depth k of a pretrained LocalMIM checkpoint and each image (under `--masks` random masks), the
visible tokens come either from `--feature_masking`'s stored features (the frozen prefix ran on the UNMASKED
image, then the features were masked: `leak`) or from the exact path (the prefix ran on the visible patches
only: `exact`). For every masked patch the probe reads [the nearest visible token's features, the mean of
the visible tokens] and predicts that patch's HOG histogram (the 1x-scale target, patch-sized cells). A ridge
regression (penalty chosen by 2-fold cross-validation on the fit half) is fitted on half of the images and
scored by R^2 on the other half. At depth 1 both paths are the same token-wise embedding; where `leak` rises
above `exact`, visible features carry the masked patches' content.

    python bench/leak_probe.py --checkpoint output_demo/checkpoint-last.pth --data_path demo
    python bench/leak_probe.py --model MIM_vit_tiny_patch16 --input_size 96   # untrained weights
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import timm  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import models  # noqa: E402,F401  (registers MIM_vit_*)
from util.checkpoint import read_checkpoint  # noqa: E402
from util.data.datasets import ImageFolderOrFlat, resolve_image_root  # noqa: E402
from util.data.vis_batch import vis_transform  # noqa: E402

PENALTIES = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)


def get_args():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--checkpoint', default=None, help='a run_pretrain.py checkpoint (default: untrained weights)')
    p.add_argument('--model', default=None, help='default: the checkpoint\'s --model')
    p.add_argument('--input_size', type=int, default=None, help='default: the checkpoint\'s --input_size')
    p.add_argument('--data_path', default='demo')
    p.add_argument('--max_images', type=int, default=400)
    p.add_argument('--mask_ratio', type=float, default=0.75)
    p.add_argument('--masks', type=int, default=4, help='random masks per image (more probe rows)')
    p.add_argument('--depths', type=int, nargs='*', default=None, help='frozen depths (default: 1 .. last)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--batch_size', type=int, default=32)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--json', default=None, help='append the result to this file as one JSON line')
    return p.parse_args()


def load_model(args):
    saved = read_checkpoint(args.checkpoint) if args.checkpoint else {}
    run = saved.get('args') or {}
    run = vars(run) if isinstance(run, argparse.Namespace) else run
    args.model = args.model or run.get('model', 'MIM_vit_tiny_patch16')
    args.input_size = args.input_size or run.get('input_size', 224)
    model = timm.create_model(args.model, img_size=args.input_size, hog_nbins=run.get('hog_nbins', 9),
                              hog_bias=run.get('hog_bias', False))
    if saved:  # decoders may be absent (--decoder_prune); the encoder must be complete
        missing, _ = model.load_state_dict(saved['model'], strict=False)
        encoder = [k for k in missing if not k.startswith(('decoder.', 'hog_enc.'))]
        if encoder:
            raise ValueError(f'{args.checkpoint} lacks encoder weights ({", ".join(encoder[:3])}, ...): '
                             f'give a LocalMIM pretraining checkpoint')
    return model.eval()


def grid_of(tokens, positions, num_patches):
    """Visible tokens [B, V, D] at their patch positions [B, V] -> [B, L, D] (zeros at masked patches)."""
    grid = tokens.new_zeros(tokens.shape[0], num_patches, tokens.shape[2])
    return grid.scatter(1, positions[..., None].expand_as(tokens), tokens)


def probe_inputs(grid, mask, side):
    """Per masked patch: [nearest visible token, mean of the visible tokens]; rows in (image, patch) order."""
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing='ij')
    coords = torch.stack([ys.flatten(), xs.flatten()], 1).float()
    dist = torch.cdist(coords, coords)
    rows = []
    for g, m in zip(grid, mask.bool()):
        visible = (~m).nonzero().flatten()
        nearest = visible[dist[m][:, visible].argmin(1)]
        rows.append(torch.cat([g[nearest], g[visible].mean(0).expand(len(nearest), -1)], 1))
    return torch.cat(rows)


@torch.no_grad()
def probe_data(model, loader, mask_ratio, masks, seed, device):
    """{depth: (leak inputs, exact inputs)}, the HOG targets of the masked patches and each row's image number."""
    side, L = model.grid_size, model.grid_size ** 2
    feats, targets, images = {}, [], []
    g = torch.Generator().manual_seed(seed)
    first = 0
    for batch, _ in loader:
        imgs = batch.to(device)
        hog = model.HOG(imgs, model.scale.index(1.0)).cpu()
        for _ in range(masks):
            noise = torch.rand(len(imgs), L, generator=g).to(device)
            keep = torch.argsort(noise, 1)[:, :int(L * (1 - mask_ratio))]
            for depth in range(1, len(model.blocks) + 1):
                model.frozen_units = depth
                leak, mask, _ = model.mask_features(model.frozen_features(imgs), mask_ratio, noise)
                exact, exact_mask, _ = model.forward_prefix(imgs, mask_ratio, noise)
                assert torch.equal(mask, exact_mask)
                pair = [probe_inputs(grid_of(x[:, 1:], pos, L).cpu(), mask.cpu(), side)
                        for x, pos in ((leak, keep.sort(1).values), (exact, keep))]
                feats.setdefault(depth, []).append(pair)
            masked = mask.cpu().bool()
            targets.append(hog[masked])
            images.append((first + torch.arange(len(imgs)))[:, None].expand_as(masked)[masked])
        first += len(imgs)
    return ({d: [torch.cat([p[i] for p in v]) for i in range(2)] for d, v in feats.items()},
            torch.cat(targets).double(), torch.cat(images))


def ridge_fit(x, y, penalty):
    mx, sx, my = x.mean(0), x.std(0) + 1e-8, y.mean(0)
    z = (x - mx) / sx
    w = torch.linalg.solve(z.T @ z + penalty * len(z) * torch.eye(z.shape[1], dtype=z.dtype), z.T @ (y - my))
    return lambda q: ((q - mx) / sx) @ w + my


def r2(pred, y, mean):
    return 1 - ((pred - y) ** 2).sum().item() / ((y - mean) ** 2).sum().item()


def probe(x, y, image):
    """R^2 on the odd-numbered images of a ridge fitted on the even ones, the penalty picked by a 2-fold
    cross-validation over the even images (all rows of an image stay on one side of every split)."""
    x, fit_rows = x.double(), image % 2 == 0
    xf, yf, xt, yt = x[fit_rows], y[fit_rows], x[~fit_rows], y[~fit_rows]
    half = image[fit_rows] % 4 == 0

    def cv(p):
        return sum(r2(ridge_fit(xf[a], yf[a], p)(xf[~a]), yf[~a], yf[a].mean(0)) for a in (half, ~half))
    best = max(PENALTIES, key=cv)
    return r2(ridge_fit(xf, yf, best)(xt), yt, yf.mean(0)), best


def main():
    args = get_args()
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = load_model(args).to(device)
    data = ImageFolderOrFlat(resolve_image_root(args.data_path, 'train'), vis_transform(args.input_size))
    if len(data) > args.max_images:
        data = torch.utils.data.Subset(data, range(0, len(data), len(data) // args.max_images)[:args.max_images])
    loader = DataLoader(data, batch_size=args.batch_size)
    feats, y, image = probe_data(model, loader, args.mask_ratio, args.masks, args.seed, device)
    masked = len(y) // (len(data) * args.masks)
    print(f'{args.checkpoint or "untrained " + args.model}: {len(data)} images ({(len(data) + 1) // 2} fit, '
          f'{len(data) // 2} held out) x {args.masks} masks, {masked} masked patches each, HOG at 1x scale')
    print(' depth  R^2 leak (stored, unmasked)  R^2 exact (masked input)  penalties')
    rows = []
    for depth in args.depths or sorted(feats):
        (leak, lp), (exact, ep) = probe(feats[depth][0], y, image), probe(feats[depth][1], y, image)
        rows.append({'depth': depth, 'r2_leak': leak, 'r2_exact': exact, 'penalty_leak': lp, 'penalty_exact': ep})
        print(f'{depth:6d} {leak:28.3f} {exact:25.3f}  {lp:g} / {ep:g}', flush=True)
    if args.json:
        with open(args.json, 'a') as f:
            f.write(json.dumps({**vars(args), 'images': len(data), 'depths': rows}) + '\n')


if __name__ == '__main__':
    main()
