"""Tests for util/data/datasets.py and util/data/demo_data.py: layouts, corrupt files, demo data."""
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from util.data import demo_data
from util.data.datasets import ImageFolderOrFlat, build_pretrain_dataset, resolve_image_root
from util.data.demo_data import demo_imagefolder


def write_image(path, seed=0, size=(12, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def test_generated_data_goes_to_the_repositorys_cache_folder(monkeypatch):
    from helpers import REPO
    from util.data.fashion_mnist import default_root
    from util.video.demo import default_demo_video_root
    for name in ('DEMO_DATA_ROOT', 'FASHION_MNIST_ROOT'):
        monkeypatch.delenv(name, raising=False)
    assert (REPO / 'README.md').is_file() and demo_data.REPOSITORY_ROOT == REPO
    assert (demo_data.default_demo_root(), default_root(), default_demo_video_root()) == \
        (REPO / '.cache' / 'demo_images', REPO / '.cache' / 'fashion_mnist', REPO / '.cache' / 'demo_videos')


def test_class_folders_give_one_label_per_class(tmp_path):
    for seed, name in enumerate(['cat/1.png', 'cat/2.jpg', 'dog/1.png']):
        write_image(tmp_path / name, seed)
    assert resolve_image_root(tmp_path) == tmp_path
    dataset = build_pretrain_dataset(tmp_path, input_size=16)
    assert dataset.classes == ['cat', 'dog']
    assert sorted(dataset.targets) == [0, 0, 1]
    image, target = dataset[2]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and target == 1


def test_imagenet_layout_uses_train_split(tmp_path):
    write_image(tmp_path / 'train' / 'n01' / 'a.png')
    write_image(tmp_path / 'val' / 'n01' / 'b.png')
    write_image(tmp_path / 'val' / 'n02' / 'c.png')
    assert resolve_image_root(tmp_path) == tmp_path / 'train'
    assert resolve_image_root(tmp_path, 'val') == tmp_path / 'val'
    dataset = build_pretrain_dataset(tmp_path, input_size=8)
    assert len(dataset) == 1 and dataset.samples[0][0].endswith('a.png')


def test_flat_folder_labels_everything_zero(tmp_path):
    for i in range(3):
        write_image(tmp_path / f'{i}.png', i)
    (tmp_path / 'notes.txt').write_text('not an image')
    dataset = ImageFolderOrFlat(resolve_image_root(tmp_path))
    assert len(dataset) == 3 and dataset.targets == [0, 0, 0] and len(dataset.classes) == 1
    image, target = dataset[1]
    assert image.mode == 'RGB' and target == 0


def test_loose_files_beside_class_folders_are_ignored_with_warning(tmp_path):
    write_image(tmp_path / 'cls' / 'a.png')
    write_image(tmp_path / 'loose.png')
    with pytest.warns(UserWarning, match='loose.png'):
        dataset = ImageFolderOrFlat(tmp_path)
    assert len(dataset) == 1 and dataset.classes == ['cls']


def test_missing_folder_names_path_and_flag(tmp_path):
    missing = tmp_path / 'nowhere'
    with pytest.raises(FileNotFoundError, match='--data_path') as error:
        resolve_image_root(missing)
    assert str(missing) in str(error.value)


def test_empty_folder_names_path(tmp_path):
    (tmp_path / 'empty_class').mkdir()
    with pytest.raises(FileNotFoundError, match='no images found') as error:
        build_pretrain_dataset(tmp_path, input_size=8)
    assert str(tmp_path) in str(error.value)


def test_corrupt_image_is_skipped_counted_and_warned_once(tmp_path):
    write_image(tmp_path / 'a.png', 1)
    (tmp_path / 'x.jpg').write_bytes(np.random.default_rng(0).bytes(300))
    write_image(tmp_path / 'z.png', 2)
    dataset = ImageFolderOrFlat(tmp_path)
    assert [os.path.basename(p) for p, _ in dataset.samples] == ['a.png', 'x.jpg', 'z.png']
    with pytest.warns(UserWarning, match='x.jpg'):
        substitute, _ = dataset[1]
    assert np.array_equal(np.asarray(substitute), np.asarray(dataset[2][0]))  # next sample
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # a second visit neither warns nor counts again
        images = [dataset[i][0] for i in range(len(dataset))]
    assert dataset.bad_files.count() == 1 and all(image.size == (12, 10) for image in images)


def test_truncated_image_is_skipped(tmp_path):
    write_image(tmp_path / 'a.jpg', size=(64, 64))
    data = (tmp_path / 'a.jpg').read_bytes()
    (tmp_path / 'b.jpg').write_bytes(data[:len(data) // 2])
    dataset = ImageFolderOrFlat(tmp_path)
    with pytest.warns(UserWarning, match='b.jpg'):
        assert dataset[1][0].size == (64, 64)
    assert dataset.bad_files.count() == 1


def test_all_images_corrupt_raises(tmp_path):
    (tmp_path / 'x.png').write_bytes(b'garbage')
    dataset = ImageFolderOrFlat(tmp_path)
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match='decoded'):
        dataset[0]


@pytest.fixture(scope='module')
def demo_root(module_tmp):
    return demo_imagefolder(module_tmp / 'images')


def test_demo_data_layout(demo_root):
    classes = sorted(demo_data.DEMO_PHOTOGRAPHS)
    for split, per_class in [('train', 24), ('val', 6)]:
        dataset = ImageFolderOrFlat(demo_root / split)
        assert dataset.classes == classes
        assert np.bincount(dataset.targets).tolist() == [per_class] * 6
    image, _ = ImageFolderOrFlat(demo_root / 'val')[0]
    assert image.size == (160, 160) and image.mode == 'RGB'
    assert [p.name for p in demo_root.parent.iterdir()] == ['images']  # no temp folder left


def test_demo_data_is_deterministic(demo_root, tmp_path):
    other = demo_imagefolder(tmp_path / 'again')
    for name in ['train/rocket/rocket_005.png', 'val/coffee/coffee_003.png']:
        assert (demo_root / name).read_bytes() == (other / name).read_bytes()


def test_demo_data_is_not_rebuilt(demo_root, monkeypatch, capsys):
    chosen = demo_root / 'train' / 'chelsea' / 'chelsea_000.png'
    before = (demo_root.stat().st_mtime_ns, chosen.stat().st_mtime_ns)
    assert demo_imagefolder(demo_root) == demo_root
    monkeypatch.setenv('DEMO_DATA_ROOT', str(demo_root))
    assert resolve_image_root('demo', 'val') == demo_root / 'val'
    assert (demo_root.stat().st_mtime_ns, chosen.stat().st_mtime_ns) == before
    assert capsys.readouterr().out == ''


def test_demo_build_losing_the_race_returns_the_winner(tmp_path, monkeypatch):
    root = tmp_path / 'images'

    def build_while_another_process_finishes_first(folder):
        write_image(folder / 'train' / 'mine' / 'a.png')
        write_image(root / 'train' / 'winner' / 'a.png')

    monkeypatch.setattr(demo_data, '_write_demo_images', build_while_another_process_finishes_first)
    assert demo_imagefolder(root) == root
    assert [p.name for p in tmp_path.iterdir()] == ['images']  # loser's temp folder removed
    assert [p.name for p in (root / 'train').iterdir()] == ['winner']


def test_randaugment_posterize_at_top_magnitude_does_not_crash():
    import util.data.datasets  # noqa: F401  (patches timm's posterize)
    from timm.data import auto_augment
    img = Image.new('RGB', (8, 8), (200, 100, 50))
    out = auto_augment.NAME_TO_OP['PosterizeIncreasing'](img, 0)
    assert out.size == img.size and out.getextrema() == ((0, 0), (0, 0), (0, 0))
    assert auto_augment.NAME_TO_OP['Posterize'](img, 4).getpixel((0, 0)) == (192, 96, 48)


def test_eval_transform_rejects_bad_crop_pct_and_rule():
    from util.data import datasets
    with pytest.raises(ValueError, match='--crop_pct'):
        datasets.build_eval_transform(224, crop_pct=1.5)
    with pytest.raises(ValueError, match='rule'):
        datasets.build_eval_transform(224, rule='deit')
    image = Image.new('RGB', (30, 20))
    assert datasets.build_eval_transform(16, crop_pct=0.5)(image).shape == (3, 16, 16)
