"""Fashion-MNIST clips: Kinetics-style frame folders in which one Fashion-MNIST garment moves and zooms across a
black frame, labelled with its class, for SCE (main_sce.py) on real images (bench/learning.py). The images come from
the idx files util/data/fashion_mnist.py reads; the clips are built once, as its class folders are.
"""
import numpy as np
from PIL import Image

from util.data.demo_data import build_once
from util.data.fashion_mnist import CLASS_FOLDERS, SPLIT_FILES, read_split, source_and_cache
from util.video.demo import write_frame_csv

CLIP_FRAMES = 32            # frames per clip (about 1 s at 30 fps)
CLIP_FRAME_SIZE = (64, 80)  # (height, width), the demo videos' size


def _garment_clip(image, num_frames, frame_size, rng):
    """Frames (grey PIL images) of one garment moving in a straight line across a black frame while it zooms."""
    height, width = frame_size
    sides = rng.uniform(28, min(height, width) * 0.9, size=2)  # the garment's side at the first and last frame
    corners = [(rng.uniform(0, width - side), rng.uniform(0, height - side)) for side in sides]
    garment = Image.fromarray(image, mode='L')
    for t in np.linspace(0.0, 1.0, num_frames):
        side = round(sides[0] + t * (sides[1] - sides[0]))
        left, top = (round(a + t * (b - a)) for a, b in zip(*corners))
        frame = Image.new('L', (width, height))
        frame.paste(garment.resize((side, side), Image.Resampling.BILINEAR), (left, top))
        yield frame


def _write_clips(out, source, per_class, seed, num_frames, frame_size):
    for split in SPLIT_FILES:
        images, labels = read_split(source, split)
        rng = np.random.default_rng([seed, 0 if split == 'train' else 1])
        for label, name in enumerate(CLASS_FOLDERS):
            (out / split / name).mkdir(parents=True)  # every class, so that the CSV's labels are the official ones
            indices = np.flatnonzero(labels.numpy() == label)
            for index in sorted(rng.choice(indices, min(per_class, len(indices)), replace=False)):
                clip = out / split / name / f'{name}_{index:05d}'
                clip.mkdir()
                for k, frame in enumerate(_garment_clip(images[index].numpy(), num_frames, frame_size, rng)):
                    frame.convert('RGB').save(clip / f'{k + 1:08d}.jpg', quality=95)
        write_frame_csv(out / split, out / f'{split}.csv')


def fashion_mnist_clips(per_class, seed=0, source=None, root=None, num_frames=CLIP_FRAMES,
                        frame_size=CLIP_FRAME_SIZE):
    """Kinetics-style frame folders (`{train,val}.csv`, `{train,val}/<class>/<clip>/00000001.jpg ...`) of short
    clips, each one Fashion-MNIST image (named by its index in its split) moving and zooming across a black frame,
    labelled with its class: `per_class` clips per class and split, drawn with `seed`. For SCE on real images."""
    source, base = source_and_cache(source, root)
    out = base.with_name(f'{base.name}_clips{per_class}_seed{seed}_{num_frames}x{frame_size[0]}x{frame_size[1]}')
    return build_once(out, lambda folder: _write_clips(folder, source, per_class, seed, num_frames, frame_size),
                      f'Fashion-MNIST clips ({per_class} per class and split)')
