"""The fast pretraining input pipeline (util/data/fast_image.py, `run_pretrain.py --fast_data`) against the official
transform: the same random boxes and flips, the same normalised pixels, and training runs that match."""
import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import RandomResizedCrop

import run_pretrain
from helpers import log_entries, pretrain_args
from util.data.datasets import ImageFolderOrFlat, build_pretrain_dataset, build_pretrain_transform
from util.data.fast_image import (DeviceInput, EncodedCropReader, EncodedCrops, RandomResizedCropReader, crop_and_flip,
                                  decode_crops, draft_for_crop)

pytestmark = pytest.mark.usefixtures('one_thread')  # conftest.py

SIZE = 32
LEVEL = 1 / 255 / 0.225  # one grey level after normalisation (the smallest ImageNet std)


def write_jpegs(folder, sizes, block=8, seed=0):
    """JPEGs (quality 90) of the given (width, height) sizes, one grey: random colours every `block` pixels,
    bicubic in between."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (w, h) in enumerate(sizes):
        coarse = rng.integers(0, 256, (max(h // block, 2), max(w // block, 2), 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)
        (image.convert('L') if i == 1 else image).save(folder / f'img{i}.jpg', quality=90)
    return folder


SIZES = [(60, 45), (45, 60), (80, 50), (50, 50), (37, 70), (120, 90), (64, 48), (90, 64)]


@pytest.fixture(scope='module')
def jpegs(tmp_path_factory):
    return write_jpegs(tmp_path_factory.mktemp('jpegs'), SIZES)


def official_and_fast(root, seed, reader):
    """Each image through the official transform and through `reader` + DeviceInput, from the same RNG state."""
    official = ImageFolderOrFlat(root, transform=build_pretrain_transform(SIZE))
    fast = ImageFolderOrFlat(root, loader=reader)
    to_input = DeviceInput(SIZE, 'cpu')
    pairs = []
    for i in range(len(official)):
        torch.manual_seed(seed + i)
        a = official[i][0]
        torch.manual_seed(seed + i)
        crop = fast[i][0]
        assert crop.dtype == torch.uint8 and crop.shape == (3, SIZE, SIZE)
        pairs.append((a, to_input(crop[None])[0]))
    return pairs


def test_boxes_and_flips_are_torchvisions_from_the_header_alone(jpegs):
    """Against RandomResizedCrop.get_params on a decoded image of the same size (width and height not swapped),
    then RandomHorizontalFlip's draw; the JPEG is not decoded to draw them."""
    for path in sorted(jpegs.iterdir()):
        for seed in range(20):
            torch.manual_seed(seed)
            with Image.open(path) as image:
                box, flip = crop_and_flip(image)
                assert image.tile  # still to be decoded: only the header was read
                width, height = image.size
            torch.manual_seed(seed)
            top, left, h, w = RandomResizedCrop.get_params(torch.zeros(3, height, width), (0.2, 1.0), (3 / 4, 4 / 3))
            assert box == (left, top, left + w, top + h)
            assert flip == bool(torch.rand(1) < 0.5)


def test_crop_rule_statistics():
    """An independent check of the rule, against a numpy simulation of it: area fraction uniform in [0.2, 1] and log
    aspect ratio uniform in [log 3/4, log 4/3], redrawn when the box does not fit the image."""
    image = Image.new('RGB', (1000, 1000))
    torch.manual_seed(0)
    boxes = np.array([crop_and_flip(image)[0] for _ in range(4000)], dtype=float)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    area, log_ratio = w * h / 1e6, np.log(w / h)
    rng = np.random.default_rng(0)
    ref_area = rng.uniform(0.2, 1.0, 10 ** 6)
    ref_log_ratio = rng.uniform(np.log(3 / 4), np.log(4 / 3), 10 ** 6)
    fits = (ref_area * np.exp(abs(ref_log_ratio)) <= 1)  # the longer side sqrt(area * ratio) <= 1
    quantiles = [0.1, 0.25, 0.5, 0.75, 0.9]
    assert abs(np.quantile(area, quantiles) - np.quantile(ref_area[fits], quantiles)).max() < 0.02
    assert abs(np.quantile(log_ratio, quantiles) - np.quantile(ref_log_ratio[fits], quantiles)).max() < 0.02
    assert area.min() > 0.19 and abs(log_ratio).max() < np.log(4 / 3) + 0.01


def test_pil_resize_gives_the_official_output_exactly(jpegs):
    for a, b in official_and_fast(jpegs, 0, RandomResizedCropReader(SIZE, resize='pil')):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_torch_resize_is_within_two_grey_levels(jpegs):
    diffs = torch.stack([(b - a).abs() for a, b in official_and_fast(jpegs, 100, RandomResizedCropReader(SIZE))])
    assert diffs.max() <= 2.01 * LEVEL and diffs.mean() < 0.05 * LEVEL


def test_non_square_pngs_and_cmyk_jpegs_match_the_official_output(tmp_path):
    """The files PIL decodes (PNG in RGB, grey, RGBA and palette modes; CMYK JPEG), none of them square."""
    write_jpegs(tmp_path / 'src', [size for size in SIZES if size[0] != size[1]][:5])
    root = tmp_path / 'others'
    root.mkdir()
    for i, (path, mode) in enumerate(zip(sorted((tmp_path / 'src').iterdir()), ['RGB', 'L', 'RGBA', 'P', 'CMYK'])):
        image = Image.open(path).convert(mode)
        image.save(root / f'img{i}.{"jpg" if mode == "CMYK" else "png"}')
    assert {Image.open(p).size[0] == Image.open(p).size[1] for p in root.iterdir()} == {False}
    diffs = torch.stack([(b - a).abs() for a, b in official_and_fast(root, 7, RandomResizedCropReader(SIZE))])
    assert diffs.max() <= 2.01 * LEVEL and diffs.mean() < 0.05 * LEVEL


def test_device_path_passes_jpegs_through_and_re_encodes_other_files_at_quality_95(tmp_path):
    write_jpegs(tmp_path, [(60, 45)])
    original = (tmp_path / 'img0.jpg').read_bytes()
    assert EncodedCropReader()(tmp_path / 'img0.jpg')['jpeg'] == original  # a baseline RGB JPEG: its own bytes
    reference = io.BytesIO()
    Image.new('RGB', (8, 8)).save(reference, 'JPEG', quality=95)
    quality_95 = Image.open(reference).quantization  # the tables depend on the quality alone
    for mode, suffix in (('RGBA', 'png'), ('CMYK', 'jpg')):
        Image.open(tmp_path / 'img0.jpg').convert(mode).save(tmp_path / f'other.{suffix}')
        data = EncodedCropReader()(tmp_path / f'other.{suffix}')['jpeg']
        with Image.open(io.BytesIO(data)) as image:
            assert (image.format, image.mode, image.size) == ('JPEG', 'RGB', (60, 45))
            assert image.quantization == quality_95


def test_draft_decodes_at_reduced_scale(tmp_path):
    path = write_jpegs(tmp_path, [(400, 300)]) / 'img0.jpg'
    with Image.open(path) as image:
        box = draft_for_crop(image, (0, 0, 400, 300), SIZE)  # 300 / 32 = 9.4: the 1/8 scale still fits
        image.load()
        assert image.size == (50, 38) and box == ((0, 0, 50, 37.5), 8)
    with Image.open(path) as image:
        assert draft_for_crop(image, (10, 10, 70, 80), SIZE) == ((10, 10, 70, 80), 1)  # 60 / 32 < 2: full scale
    with Image.open(path) as image:
        assert draft_for_crop(image, (10, 10, 80, 80), SIZE) == ((5, 5, 40, 40), 2)  # 70 / 32 = 2.2: half scale


def test_draft_output_is_close_to_the_exact_one(tmp_path):
    """On smooth content (a photograph at this scale): other pixels, but close."""
    root = write_jpegs(tmp_path, [(400, 300), (300, 400), (640, 480)], block=50)
    diffs = [(b - a).abs().mean() for a, b in official_and_fast(root, 0, RandomResizedCropReader(SIZE, draft=True))]
    assert 0 < min(diffs) and max(diffs) < LEVEL


def test_device_decode_matches_the_official_output(jpegs):
    """`--fast_data device` on the CPU: the batched decode_jpeg, crops and flips of decode_crops."""
    official = ImageFolderOrFlat(jpegs, transform=build_pretrain_transform(SIZE))
    encoded = ImageFolderOrFlat(jpegs, loader=EncodedCropReader())
    torch.manual_seed(3)
    expected = torch.stack([official[i][0] for i in range(len(official))])
    batches = iter(DataLoader(encoded, batch_size=len(encoded)))  # (creating the iterator draws a seed)
    torch.manual_seed(3)
    batch = next(batches)[0]
    assert isinstance(batch, EncodedCrops) and len(batch) == len(encoded) and batch.to('cpu') is batch
    got = DeviceInput(SIZE, 'cpu')(batch)
    assert got.shape == expected.shape
    # float bicubic on the device against PIL's fixed-point one: many pixels one grey level off
    assert (got - expected).abs().max() <= 2.01 * LEVEL and (got - expected).abs().mean() < 0.3 * LEVEL


def test_device_decode_keeps_black_and_white(tmp_path):
    for value in (0, 255):
        Image.new('RGB', (40, 40), (value,) * 3).save(tmp_path / f'{value}.jpg', quality=100)
    batch = next(iter(DataLoader(ImageFolderOrFlat(tmp_path, loader=EncodedCropReader()), batch_size=2)))[0]
    out = decode_crops(batch, SIZE, 'cpu')
    assert out[0].unique().tolist() == [0.0] and out[1].unique().tolist() == [255.0]


def test_device_decode_replaces_a_bad_file(jpegs):
    batch = next(iter(DataLoader(ImageFolderOrFlat(jpegs, loader=EncodedCropReader()), batch_size=3)))[0]
    batch['jpeg'][1] = batch['jpeg'][1][:200]  # truncated
    with pytest.warns(UserWarning, match='replaced'):
        out = decode_crops(batch, SIZE, 'cpu')
    assert out.shape == (3, 3, SIZE, SIZE)


@pytest.mark.parametrize('mode', ['cpu', 'device'])
def test_loader_batches_match_the_official_ones_with_two_workers(jpegs, mode):
    """The workers' seeding is untouched: with the same seed, worker count and order, the fast loader draws the
    official boxes and flips."""
    def batches(fast_data):
        torch.manual_seed(7)
        dataset = build_pretrain_dataset(jpegs, SIZE, fast_data)
        loader = DataLoader(dataset, batch_size=4, shuffle=True, num_workers=2)
        return [DeviceInput(SIZE, 'cpu')(x) if fast_data != 'none' else x for x, _ in loader]
    for a, b in zip(batches('none'), batches(mode), strict=True):
        assert (a - b).abs().max() <= 2.01 * LEVEL


def test_run_pretrain_fast_data_trains_like_the_official_pipeline(jpegs, tmp_path):
    losses = {}
    for mode in ('none', 'cpu', 'device'):
        out = tmp_path / mode
        run_pretrain.main(pretrain_args(jpegs, out, '--epochs', '1', '--fast_data', mode))
        losses[mode] = log_entries(out)[0]['train_loss']
    assert losses['cpu'] == pytest.approx(losses['none'], rel=1e-3)
    assert losses['device'] == pytest.approx(losses['none'], rel=1e-3)


def test_fast_data_flag():
    parser = run_pretrain.get_args_parser()
    assert parser.parse_args([]).fast_data == 'none'
    assert parser.parse_args(['--fast_data']).fast_data == 'cpu'
    assert parser.parse_args(['--fast_data', 'cpu_draft']).fast_data == 'cpu_draft'
    with pytest.raises(SystemExit):
        parser.parse_args(['--fast_data', 'gpu'])
