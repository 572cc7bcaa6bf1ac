"""Demo data: a small ImageFolder cut from the photographs that ship with scikit-image.

`demo_imagefolder()` lets every script run end to end without downloading a data set
(`--data_path demo`). It builds `<root>/{train,val}/<photograph>/*.png` once, deterministically:
each image is a random square-ish crop of one photograph, flipped at random and resized to
160x160, so the six photographs act as six classes.

The build goes into a temporary sibling folder that is renamed into place at the end, so an
interrupted build is never mistaken for a finished one and several processes (e.g. DDP ranks)
may call this at the same time: whoever renames first wins, the others discard their copy.
"""
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as skimage_data

# Photographs bundled with scikit-image (no network needed); each becomes one class.
DEMO_PHOTOGRAPHS = ('astronaut', 'coffee', 'chelsea', 'rocket', 'immunohistochemistry',
                    'hubble_deep_field')
DEMO_SPLIT_SIZES = {'train': 24, 'val': 6}   # images per class
DEMO_IMAGE_SIZE = 160
DEMO_SEED = 0
REPOSITORY_ROOT = Path(__file__).resolve().parents[2]  # util/data/demo_data.py -> the repository


def default_demo_root() -> Path:
    """`$DEMO_DATA_ROOT` if set, else `<repository>/.cache/demo_images`."""
    return Path(os.environ.get('DEMO_DATA_ROOT') or REPOSITORY_ROOT / '.cache' / 'demo_images')


def _load_photograph(name: str) -> Image.Image:
    array = getattr(skimage_data, name)()
    if array.ndim == 2:  # grayscale photograph -> RGB
        array = np.stack([array] * 3, axis=-1)
    return Image.fromarray(np.ascontiguousarray(array[..., :3]).astype(np.uint8))


def _random_crop(photo: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Crop 0.3-1.0 of the shorter side, aspect ratio in [0.8, 1.25], random flip, resize."""
    width, height = photo.size
    side = rng.uniform(0.3, 1.0) * min(width, height)
    aspect = np.exp(rng.uniform(np.log(0.8), np.log(1.25)))
    crop_w = int(round(min(width, side * np.sqrt(aspect))))
    crop_h = int(round(min(height, side / np.sqrt(aspect))))
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    crop = photo.crop((left, top, left + crop_w, top + crop_h))
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return crop.resize((DEMO_IMAGE_SIZE, DEMO_IMAGE_SIZE), Image.Resampling.BICUBIC)


def _write_demo_images(folder: Path) -> None:
    for class_index, name in enumerate(DEMO_PHOTOGRAPHS):
        photo = _load_photograph(name)
        # One generator per class: the images of a class do not depend on the list order.
        rng = np.random.default_rng([DEMO_SEED, class_index])
        for split, count in DEMO_SPLIT_SIZES.items():
            class_dir = folder / split / name
            class_dir.mkdir(parents=True)
            for i in range(count):
                _random_crop(photo, rng).save(class_dir / f'{name}_{i:03d}.png')


def build_once(root, write, what):
    """`root`, after `write(folder)` filled it, unless it exists already. The build goes to a temporary sibling
    renamed into place, so an interrupted build never passes for a finished one and concurrent builders (DDP
    ranks) are safe: whoever renames first wins, the others discard their copy."""
    root = Path(root)
    if root.is_dir():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{root.name}.building-', dir=root.parent))
    try:
        write(tmp)
        try:
            os.replace(tmp, root)
        except OSError:
            if not root.is_dir():
                raise
            return root  # another process finished first; ours is removed below
        print(f'Built {what} at {root}')
        return root
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def demo_imagefolder(root=None) -> Path:
    """Return the demo ImageFolder root (with `train/` and `val/`), building it if missing."""
    root = Path(root) if root is not None else default_demo_root()
    return build_once(root, _write_demo_images, f'demo ImageFolder ({len(DEMO_PHOTOGRAPHS)} classes)')
