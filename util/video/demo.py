"""Demo videos: small Kinetics-style frame folders made by panning and zooming over scikit-image photographs.

`make_demo_videos()` lets the SCE script run without downloading Kinetics (`--data_path demo`). It
builds, once and deterministically, the Kinetics frame-folder layout main_sce.py reads:
`<root>/{train,val}/<photograph>/<photograph>_NNN/00000001.jpg ...` plus `<root>/{train,val}.csv`.
Each video is a virtual camera moving in a straight line from one box of a photograph to another
(pan + zoom), 48-96 frames at 64x80 px, i.e. 1.6-3.2 s at 30 fps: some shorter and some longer
than the 2.56 s clips. The six photographs of util/data/demo_data.py are the six classes.
`video_data_root(data_path)` is the folder a video script's `--data_path` names: these videos for 'demo'.

`make_demo_video_files()` encodes those frame folders as video files (`<root>/{train,val}/<class>/<video>.mp4`
or `.avi`, 30 fps, and the CSVs of `--decoder video`) to try `prepare_video.py` and `--decoder video` on, with
torchcodec's encoder (FFmpeg libraries) or else the `ffmpeg` command.

Like the demo ImageFolder, the build goes to a temporary sibling folder renamed into place at the
end, so concurrent callers (DDP ranks) and interrupted builds are safe.
"""
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

from util.data.demo_data import DEMO_PHOTOGRAPHS, DEMO_SEED, REPOSITORY_ROOT, _load_photograph, build_once
from util.video.io import FRAME_LAYOUT, VideoDecoderUnavailable, read_video_csv, require_torchcodec

DEMO_VIDEOS_PER_CLASS = {'train': 8, 'val': 2}
DEMO_FRAME_RANGE = (48, 96)       # frames per video, inclusive
DEMO_FRAME_SIZE = (64, 80)        # (height, width)
DEMO_VIDEO_SUFFIXES = ('.mp4', '.avi')  # alternating over the videos of a class
DEMO_FPS = 30


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


def video_data_root(data_path, decoder='frame'):
    """The folder holding `{split}.csv` and `{split}/`: `data_path`, or for 'demo' the demo videos (built once)."""
    if str(data_path) == 'demo':
        if decoder != 'frame':
            raise ValueError('--data_path demo holds frame folders only; use --decoder frame')
        return make_demo_videos()
    root = Path(data_path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f'--data_path {root}: no such folder (expected {FRAME_LAYOUT.format(split="train")})')
    return root


# ---------------------------------------------------------------- video files

def video_encoder():
    """'torchcodec' when its encoder can load FFmpeg, else 'ffmpeg' when that command exists, else None."""
    try:
        require_torchcodec()
        return 'torchcodec'
    except VideoDecoderUnavailable:
        return 'ffmpeg' if shutil.which('ffmpeg') else None


def require_video_encoder():
    encoder = video_encoder()
    if encoder is None:
        raise RuntimeError('encoding videos needs FFmpeg: install it (e.g. `apt-get install ffmpeg`) so that '
                           'torchcodec can load its libraries')
    return encoder


def encode_video(frames, path, fps=DEMO_FPS):
    """Write uint8 RGB frames [T, 3, H, W] (H, W even) to `path`, the container chosen by its suffix."""
    if require_video_encoder() == 'torchcodec':
        from torchcodec.encoders import VideoEncoder
        VideoEncoder(frames, frame_rate=fps).to_file(str(path))
        return
    height, width = frames.shape[-2:]
    command = ['ffmpeg', '-y', '-loglevel', 'error', '-f', 'rawvideo', '-pix_fmt', 'rgb24', '-s', f'{width}x{height}',
               '-r', str(fps), '-i', '-', '-pix_fmt', 'yuv420p', str(path)]
    subprocess.run(command, input=frames.permute(0, 2, 3, 1).contiguous().numpy().tobytes(), check=True)


def default_demo_video_file_root() -> Path:
    """The demo frame root's name + `_files` (`<repository>/.cache/demo_videos_files` by default)."""
    frames = default_demo_video_root()
    return frames.with_name(frames.name + '_files')


def _write_demo_video_files(folder, frames_root, suffixes, fps):
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg, read_file
    for csv in sorted(frames_root.glob('*.csv')):
        lines = []
        for k, (video, label, num_frames) in enumerate(read_video_csv(csv)):
            paths = [str(frames_root / csv.stem / video / f'{i + 1:08d}.jpg') for i in range(num_frames)]
            frames = torch.stack(decode_jpeg([read_file(p) for p in paths], mode=ImageReadMode.RGB))
            name = f'{video}{suffixes[k % len(suffixes)]}'
            (folder / csv.stem / name).parent.mkdir(parents=True, exist_ok=True)
            encode_video(frames, folder / csv.stem / name, fps)
            lines.append(f'{name} {label}\n')
        (folder / csv.name).write_text(''.join(lines))  # the CSV of --decoder video


def make_demo_video_files(root=None, frames_root=None, suffixes=DEMO_VIDEO_SUFFIXES, fps=DEMO_FPS) -> Path:
    """Return a folder of demo video files, `<root>/{train,val}/<class>/<video><suffix>` with `<root>/{train,val}.csv`
    (`<class>/<video><suffix> <label>`, as `--decoder video` reads), building it if missing by encoding the frame
    folders of `frames_root` (default: `make_demo_videos()`) at `fps`, one frame per frame; the suffixes alternate
    over the videos of a split."""
    frames_root = Path(frames_root) if frames_root is not None else make_demo_videos()
    root = Path(root) if root is not None else default_demo_video_file_root()
    if not root.is_dir():
        require_video_encoder()  # before any output
    return build_once(root, lambda tmp: _write_demo_video_files(tmp, frames_root, tuple(suffixes), fps),
                      f'demo video files ({", ".join(suffixes)})')
