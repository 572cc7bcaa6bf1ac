"""Fashion-MNIST as a data path: the idx reader against the raw bytes, the class folders, the path resolution and
its errors."""
import gzip
import struct

import numpy as np
import pytest
from PIL import Image

from util.data import fashion_mnist
from util.data.datasets import resolve_image_root
from util.data.fashion_mnist import CLASS_FOLDERS, DEBIAN_FOLDER, fashion_mnist_imagefolder, holds_idx_files, read_split
from util.video.fashion_mnist import fashion_mnist_clips

needs_package = pytest.mark.skipif(not holds_idx_files(DEBIAN_FOLDER),
                                   reason='Debian package dataset-fashion-mnist not installed (.ci/run installs it)')


def raw_idx(path, header_ints):
    """The payload bytes of a gzipped idx file, read by hand: big-endian int32 header, then uint8 data."""
    with gzip.open(path, 'rb') as f:
        data = f.read()
    header = struct.unpack('>' + 'i' * header_ints, data[:4 * header_ints])
    return header, np.frombuffer(data[4 * header_ints:], dtype=np.uint8)


def write_idx(folder, stem, array):
    """A gzipped idx file of uint8 `array` (magic 0x08 type, then the dimensions)."""
    header = struct.pack('>i', 0x800 + array.ndim) + struct.pack('>' + 'i' * array.ndim, *array.shape)
    with gzip.open(folder / f'{stem}.gz', 'wb') as f:
        f.write(header + array.astype(np.uint8).tobytes())


@needs_package
def test_debian_files_read_as_the_raw_bytes_say():
    (magic, n, rows, cols), pixels = raw_idx(DEBIAN_FOLDER / 'train-images-idx3-ubyte.gz', 4)
    (label_magic, n_labels), labels = raw_idx(DEBIAN_FOLDER / 'train-labels-idx1-ubyte.gz', 2)
    assert (magic, label_magic, n, n_labels, rows, cols) == (2051, 2049, 60000, 60000, 28, 28)
    images, read_labels = read_split(DEBIAN_FOLDER, 'train')
    assert images.shape == (60000, 28, 28) and read_labels.shape == (60000,)
    np.testing.assert_array_equal(images[0].numpy(), pixels[:784].reshape(28, 28))
    np.testing.assert_array_equal(images[-1].numpy(), pixels[-784:].reshape(28, 28))
    np.testing.assert_array_equal(read_labels.numpy(), labels)
    val_images, val_labels = read_split(DEBIAN_FOLDER, 'val')
    assert val_images.shape == (10000, 28, 28) and np.bincount(val_labels.numpy()).tolist() == [1000] * 10


@needs_package
def test_data_path_fashion_mnist_is_the_official_split_as_class_folders():
    train, val = resolve_image_root('fashion-mnist', 'train'), resolve_image_root('fashion-mnist', 'val')
    assert sorted(p.name for p in train.iterdir()) == list(CLASS_FOLDERS)
    assert CLASS_FOLDERS[0] == '0_T-shirt-top' and CLASS_FOLDERS[9] == '9_Ankle-boot'
    assert [sum(1 for _ in (root / c).iterdir()) for root in (train, val) for c in CLASS_FOLDERS] == \
        [6000] * 10 + [1000] * 10
    (_, _, _, _), pixels = raw_idx(DEBIAN_FOLDER / 't10k-images-idx3-ubyte.gz', 4)
    (_, _), labels = raw_idx(DEBIAN_FOLDER / 't10k-labels-idx1-ubyte.gz', 2)
    first = val / CLASS_FOLDERS[labels[0]] / '00000.png'  # test image 0, in its label's folder
    np.testing.assert_array_equal(np.asarray(Image.open(first)), pixels[:784].reshape(28, 28))


def test_a_folder_of_idx_files_is_a_data_path(tmp_path, monkeypatch):
    monkeypatch.setenv('FASHION_MNIST_ROOT', str(tmp_path / 'cache'))
    source = tmp_path / 'idx'
    source.mkdir()
    rng = np.random.default_rng(0)
    images = {split: rng.integers(0, 256, (n, 28, 28)) for split, n in (('train', 12), ('t10k', 4))}
    labels = {'train': np.arange(12) % 10, 't10k': np.array([9, 0, 3, 3])}
    for split in images:
        write_idx(source, f'{split}-images-idx3-ubyte', images[split])
        write_idx(source, f'{split}-labels-idx1-ubyte', labels[split])
    val = resolve_image_root(source, 'val')
    assert val.parent.parent == tmp_path / 'cache'
    written = sorted(val.glob('*/*.png'))
    assert [(p.parent.name, p.name) for p in written] == [
        ('0_T-shirt-top', '00001.png'), ('3_Dress', '00002.png'), ('3_Dress', '00003.png'),
        ('9_Ankle-boot', '00000.png')]
    np.testing.assert_array_equal(np.asarray(Image.open(written[-1])), images['t10k'][0])
    assert len(list(resolve_image_root(source, 'train').glob('*/*.png'))) == 12
    assert fashion_mnist_imagefolder(source) == val.parent  # built once, found again


def test_missing_package_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv('FASHION_MNIST_DIR', str(tmp_path))
    with pytest.raises(FileNotFoundError, match='apt-get install dataset-fashion-mnist'):
        resolve_image_root('fashion-mnist')
    monkeypatch.setattr(fashion_mnist, 'DEBIAN_FOLDER', tmp_path / 'absent')
    monkeypatch.delenv('FASHION_MNIST_DIR')
    with pytest.raises(FileNotFoundError, match=r'not in .*absent'):
        resolve_image_root('fashion-mnist')


def test_a_folder_missing_one_idx_file_is_read_as_images(tmp_path):
    for stem in ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte'):
        write_idx(tmp_path, stem, np.zeros((1, 28, 28) if 'images' in stem else (1,)))
    assert not holds_idx_files(tmp_path)
    assert resolve_image_root(tmp_path) == tmp_path  # an ordinary folder, not Fashion-MNIST


def test_clips_show_one_image_moving_labelled_with_its_class(tmp_path):
    """Each source image is one flat grey level (image i: 30 + 20 i), so a frame shows which image it came from."""
    source = tmp_path / 'idx'
    source.mkdir()
    labels = {'train': np.array([3, 3, 7, 0, 7, 3]), 't10k': np.array([7, 0, 3])}
    for split, split_labels in labels.items():
        levels = 30 + 20 * np.arange(len(split_labels)) + (0 if split == 'train' else 120)
        write_idx(source, f'{split}-images-idx3-ubyte', np.ones((len(split_labels), 28, 28)) * levels[:, None, None])
        write_idx(source, f'{split}-labels-idx1-ubyte', split_labels)
    root = fashion_mnist_clips(2, source=source, root=tmp_path / 'cache', num_frames=6)
    rows = [line.split() for line in (root / 'train.csv').read_text().splitlines()]
    assert len(rows) == 5  # 2 of class 3, 2 of class 7, the only one of class 0
    for path, label, frames in rows:
        index = int(path.rsplit('_', 1)[1])
        assert int(label) == labels['train'][index] and path.startswith(CLASS_FOLDERS[int(label)])
        assert int(frames) == 6 == len(list((root / 'train' / path).glob('*.jpg')))
        boxes = []
        for k in range(1, 7):
            frame = np.asarray(Image.open(root / 'train' / path / f'{k:08d}.jpg').convert('L')).astype(int)
            garment = frame > 15
            assert garment.sum() >= 28 * 28 * 0.9  # at least the image's own size
            assert abs(np.median(frame[garment]) - (30 + 20 * index)) <= 3  # and only that image
            rows_, cols = np.flatnonzero(garment.any(1)), np.flatnonzero(garment.any(0))
            boxes.append((rows_[0], cols[0], rows_[-1], cols[-1]))
        assert boxes[0] != boxes[-1]  # it moves or zooms
    assert [line.split()[1] for line in (root / 'val.csv').read_text().splitlines()] == ['0', '3', '7']
