"""Demo videos: small Kinetics-style frame folders made by panning and zooming over scikit-image photographs.

`make_demo_videos()` lets the SCE script run without downloading Kinetics (`--data_path demo`). It
builds, once and deterministically, the Kinetics frame-folder layout main_sce.py reads:
`<root>/{train,val}/<photograph>/<photograph>_NNN/00000001.jpg ...` plus `<root>/{train,val}.csv`.
Each video is a virtual camera moving in a straight line from one box of a photograph to another
(pan + zoom), 48-96 frames at 64x80 px, i.e. 1.6-3.2 s at 30 fps: some shorter and some longer
than the 2.56 s clips. The six photographs of util/demo_data.py are the six classes.

Like the demo ImageFolder, the build goes to a temporary sibling folder renamed into place at the
end, so concurrent callers (DDP ranks) and interrupted builds are safe.
"""
import os
from pathlib import Path

import numpy as np
from PIL import Image

from util.demo_data import DEMO_PHOTOGRAPHS, DEMO_SEED, REPOSITORY_ROOT, _load_photograph, build_once

DEMO_VIDEOS_PER_CLASS = {'train': 8, 'val': 2}
DEMO_FRAME_RANGE = (48, 96)       # frames per video, inclusive
DEMO_FRAME_SIZE = (64, 80)        # (height, width)


def default_demo_video_root() -> Path:
    """`<$DEMO_DATA_ROOT>_videos` next to the demo images if that is set, else `<repository>/.cache/demo_videos`."""
    images = os.environ.get('DEMO_DATA_ROOT')
    if images:
        return Path(images).with_name(Path(images).name + '_videos')
    return REPOSITORY_ROOT / '.cache' / 'demo_videos'


def write_frame_csv(split_dir, csv_path):
    """Write the CSV of a frame-folder split: labels index the sorted class folders."""
    split_dir = Path(split_dir)
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    lines = []
    for label, name in enumerate(classes):
        for video in sorted(p for p in (split_dir / name).iterdir() if p.is_dir()):
            lines.append(f'{name}/{video.name} {label} {len(list(video.glob("*.jpg")))}\n')
    Path(csv_path).write_text(''.join(lines))


def _camera_path(photo_size, num_frames, frame_size, rng):
    """Per-frame (left, top, right, bottom) boxes of a linear pan + zoom with the frame's aspect ratio."""
    width, height = photo_size
    aspect = frame_size[1] / frame_size[0]
    largest = min(width, height * aspect)  # widest box that fits the photograph
    ends = []
    for _ in range(2):
        box_w = rng.uniform(0.35, 0.9) * largest
        box_h = box_w / aspect
        ends.append((rng.uniform(0, width - box_w), rng.uniform(0, height - box_h), box_w, box_h))
    (x0, y0, w0, h0), (x1, y1, w1, h1) = ends
    for t in np.linspace(0.0, 1.0, num_frames):
        x, y, w, h = x0 + t * (x1 - x0), y0 + t * (y1 - y0), w0 + t * (w1 - w0), h0 + t * (h1 - h0)
        yield x, y, x + w, y + h


def _write_demo_videos(folder, videos_per_class, frame_range, frame_size):
    for class_index, name in enumerate(DEMO_PHOTOGRAPHS):
        photo = _load_photograph(name)
        rng = np.random.default_rng([DEMO_SEED, class_index, 1])  # 1: not the demo images' stream
        for split, count in videos_per_class.items():
            for i in range(count):
                video_dir = folder / split / name / f'{name}_{i:03d}'
                video_dir.mkdir(parents=True)
                num_frames = int(rng.integers(frame_range[0], frame_range[1] + 1))
                flip = rng.random() < 0.5
                for k, box in enumerate(_camera_path(photo.size, num_frames, frame_size, rng)):
                    frame = photo.resize(frame_size[::-1], Image.Resampling.BILINEAR, box=box)
                    if flip:
                        frame = frame.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                    frame.save(video_dir / f'{k + 1:08d}.jpg', quality=90)
    for split in videos_per_class:
        write_frame_csv(folder / split, folder / f'{split}.csv')


def make_demo_videos(root=None, videos_per_class=None, frame_range=DEMO_FRAME_RANGE,
                     frame_size=DEMO_FRAME_SIZE) -> Path:
    """Return the demo video root (train.csv, train/, val.csv, val/), building it if missing.
    The other arguments only matter when it is built."""
    root = Path(root) if root is not None else default_demo_video_root()
    return build_once(root, lambda tmp: _write_demo_videos(tmp, videos_per_class or DEMO_VIDEOS_PER_CLASS,
                                                           frame_range, frame_size),
                      f'demo videos ({len(DEMO_PHOTOGRAPHS)} classes)')
