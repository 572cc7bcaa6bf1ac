"""Fashion-MNIST (Zalando's 70,000 28x28 grey product photos, 10 classes) as `train/` and `val/` class folders.

`--data_path fashion-mnist` reads the four original idx files from `$FASHION_MNIST_DIR`, or from where Debian's
package puts them (`apt-get install dataset-fashion-mnist`); `--data_path FOLDER` does the same for a folder that
holds them. They are decoded with torchvision's own idx reader and written once as PNG class folders (60,000 train
and the official 10,000 test images as `val/`), because every script here reads image files: the fast JPEG/PNG
path, unreadable-file accounting and user data all work on paths. Folders are named `<label>_<name>`, so their
sorted order is the official label order; images stay grey and are read as 3 equal channels.
"""
import gzip
import hashlib
import os
import random
import shutil
import tempfile
from pathlib import Path

from PIL import Image
from torchvision.datasets.mnist import read_image_file, read_label_file

from util.data.demo_data import REPOSITORY_ROOT, build_once

DEBIAN_FOLDER = Path('/usr/share/datasets/fashion-mnist')
SPLIT_FILES = {'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
               'val': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')}
SPLIT_SIZES = {'train': 60000, 'val': 10000}
CLASSES = ('T-shirt-top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
           'Ankle-boot')
CLASS_FOLDERS = tuple(f'{label}_{name}' for label, name in enumerate(CLASSES))
NAME = 'fashion-mnist'
INSTALL_HINT = ('install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or set '
                'FASHION_MNIST_DIR to a folder holding the four idx files (train-images-idx3-ubyte.gz, ...)')


def idx_file(folder, stem):
    """`folder/stem` or `folder/stem.gz`, whichever exists, else None."""
    for name in (stem, stem + '.gz'):
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def holds_idx_files(folder):
    return all(idx_file(folder, stem) for files in SPLIT_FILES.values() for stem in files)


def source_folder():
    """The folder with the idx files: `$FASHION_MNIST_DIR`, else Debian's."""
    folder = Path(os.environ.get('FASHION_MNIST_DIR') or DEBIAN_FOLDER)
    if not holds_idx_files(folder):
        raise FileNotFoundError(f'--data_path {NAME}: the Fashion-MNIST idx files are not in {folder}; '
                                f'{INSTALL_HINT}')
    return folder


def read_split(folder, split):
    """(images uint8 [N, 28, 28], labels int64 [N]) of 'train' or 'val' (the official test set)."""
    arrays = []
    with tempfile.TemporaryDirectory() as scratch:
        for stem, read in zip(SPLIT_FILES[split], (read_image_file, read_label_file)):
            path = idx_file(folder, stem)
            if path.suffix == '.gz':  # torchvision's reader wants the raw bytes on disk
                raw = Path(scratch) / stem
                with gzip.open(path, 'rb') as packed, open(raw, 'wb') as out:
                    shutil.copyfileobj(packed, out)
                path = raw
            arrays.append(read(str(path)))
    return tuple(arrays)


def default_root():
    """`$FASHION_MNIST_ROOT` if set, else `<repository>/.cache/fashion_mnist`."""
    return Path(os.environ.get('FASHION_MNIST_ROOT') or REPOSITORY_ROOT / '.cache' / 'fashion_mnist')


def _write_class_folders(source, out):
    for split in SPLIT_FILES:
        images, labels = read_split(source, split)
        for name in CLASS_FOLDERS:
            (out / split / name).mkdir(parents=True)
        for index, (image, label) in enumerate(zip(images.numpy(), labels.tolist())):
            Image.fromarray(image, mode='L').save(out / split / CLASS_FOLDERS[label] / f'{index:05d}.png')


def fashion_mnist_imagefolder(source=None, root=None):
    """The class-folder root (with `train/` and `val/`) of the idx files in `source` (default: source_folder()),
    written once under `root` (default: default_root(); one sub-folder per source folder)."""
    source, base = source_and_cache(source, root)
    return build_once(base, lambda out: _write_class_folders(source, out), 'Fashion-MNIST class folders')


def source_and_cache(source, root):
    """(the idx folder, the cache folder of what is built from it: one per source folder)."""
    source = Path(source) if source is not None else source_folder()
    root = Path(root) if root is not None else default_root()
    tag = 'debian' if source.resolve() == DEBIAN_FOLDER.resolve() else \
        hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:12]
    return source, root / tag


def train_subset(per_class, seed=0, source=None, root=None):
    """Class folders with `per_class` training images of each class, drawn with `seed` (symbolic links to the full
    set's files), and the whole official `val/`: for runs sized to a small machine."""
    full = fashion_mnist_imagefolder(source, root)
    out = full.parent / f'{full.name}_train{per_class}_seed{seed}'

    def link(folder):
        rng = random.Random(seed)
        for name in CLASS_FOLDERS:
            (folder / 'train' / name).mkdir(parents=True)
            files = sorted((full / 'train' / name).iterdir())
            for path in sorted(rng.sample(files, min(per_class, len(files)))):
                (folder / 'train' / name / path.name).symlink_to(path)
        (folder / 'val').symlink_to(full / 'val', target_is_directory=True)
    return build_once(out, link, f'Fashion-MNIST, {per_class} training images per class')
