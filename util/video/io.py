"""Video I/O of every video script: the CSV of a split, frame folders and video files (torchcodec), clip sampling.

Layout (as eztorch's): `<data_path>/train.csv` lists one video per line, `<class>/<video_stem> <label>
<num_frames>` (split from the right, so paths may contain spaces; `util.video.demo.write_frame_csv`
writes one), with the frames in `<data_path>/train/<class>/<video_stem>/00000001.jpg ...`. With
`decoder='video'` the lines are `<class>/<file>.mp4 <label>` and torchcodec decodes the files.
`val.csv` and `val/` hold the validation split the same way.

The data sets built on this: SCE's two-clip training and centre-clip validation clips (util/sce/data.py) and the
downstream protocols' clips (util/video/views.py). Nothing here imports another module of the repository.
"""
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg, read_file

# torchvision 0.29 deprecates its JPEG codec in favour of torchcodec's; it still works and the
# warning would otherwise be printed for every clip.
warnings.filterwarnings('ignore', message='The image decoding and encoding capabilities of TorchVision',
                        category=DeprecationWarning)

FRAME_LAYOUT = '<data_path>/{split}.csv and <data_path>/{split}/<class>/<video>/00000001.jpg'
MAX_SKIPS_PER_SAMPLE = 100


# ---------------------------------------------------------------- CSV files

def read_video_csv(csv_path, with_num_frames=True):
    """Rows (relative path, label, num_frames or None) of a video CSV; paths may contain spaces."""
    csv_path = Path(csv_path)
    fields = 3 if with_num_frames else 2
    expected = '<path> <label> <num_frames>' if with_num_frames else '<path> <label>'
    rows = []
    for line_number, line in enumerate(csv_path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().rsplit(None, fields - 1)
        try:
            if len(parts) != fields:
                raise ValueError
            rows.append((parts[0], int(parts[1]), int(parts[2]) if with_num_frames else None))
        except ValueError:
            raise ValueError(f'{csv_path}:{line_number}: expected "{expected}", got {line.strip()!r}') from None
    if not rows:
        raise ValueError(f'{csv_path} lists no videos')
    return rows


# ---------------------------------------------------------------- sampling (pure functions)

def _uniform(low, high, generator):
    return low + (high - low) * torch.rand((), generator=generator, dtype=torch.float64).item()


def sample_clip_windows(duration, num_clips=2, clip_duration=2.56, speeds=(1,), jitter_factor=0.0,
                        generator=None):
    """`num_clips` independent (start, end) windows in seconds, as Fractions."""
    windows = []
    for _ in range(num_clips):
        length = Fraction(clip_duration)
        if speeds and tuple(speeds) != (1,):  # speeds=[1] means "no speed", no draw (as eztorch)
            length *= Fraction(speeds[torch.randint(len(speeds), (), generator=generator).item()])
        if jitter_factor:
            length *= Fraction(_uniform(1 - jitter_factor, 1 + jitter_factor, generator))
        start = Fraction(_uniform(0.0, float(max(duration - length, 0)), generator))
        windows.append((start, start + length))
    return windows


def clip_frame_indices(start, end, num_frames, fps=30):
    """Frame indices of the clip [start, end) of a video with `num_frames` frames at `fps`."""
    end = min(Fraction(end), Fraction(num_frames, fps))
    first = min(math.ceil(fps * Fraction(start)), num_frames - 1)
    return range(first, max(math.ceil(fps * end), first + 1))


def uniform_offsets(length, num_samples=8):
    """floor(linspace(0, length - 1, num_samples)) in exact integer arithmetic; repeats if length < num_samples."""
    if num_samples == 1:
        return [0]
    return [i * (length - 1) // (num_samples - 1) for i in range(num_samples)]


def random_resized_crop_box(height, width, scale=(0.2, 0.766), ratio=(0.75, 1.3333), num_tries=10,
                            generator=None):
    """(top, left, h, w) of an Inception-style crop (pytorchvideo's rule)."""
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(num_tries):
        area = height * width * _uniform(scale[0], scale[1], generator)
        aspect = math.exp(_uniform(log_ratio[0], log_ratio[1], generator))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = torch.randint(height - h + 1, (), generator=generator).item()
            left = torch.randint(width - w + 1, (), generator=generator).item()
            return top, left, h, w
    in_ratio = width / height  # fallback: central crop with the ratio clamped to the range
    w = width if in_ratio <= max(ratio) else round(height * max(ratio))
    h = height if in_ratio >= min(ratio) else round(width / min(ratio))
    return (height - h) // 2, (width - w) // 2, h, w


def resize_clip(clip, size):
    """Bilinear resize of a [C, T, h, w] clip to `size` (no antialias, as F.interpolate in eztorch), float32."""
    return F.interpolate(clip.float(), size=size, mode='bilinear', align_corners=False, antialias=False)


# ---------------------------------------------------------------- decoders

class FrameFolderVideo:
    """A video stored as `<dir>/00000001.jpg ...`; frames are read and decoded on a thread pool."""

    def __init__(self, path, num_frames, pool=None, decode_threads=1):
        if num_frames < 1:
            raise ValueError(f'{path}: the CSV gives {num_frames} frames')
        self.path, self.num_frames, self.pool, self.decode_threads = Path(path), num_frames, pool, decode_threads

    def load(self, indices):
        """uint8 RGB frames [len(indices), 3, H, W]."""
        paths = [str(self.path / f'{i + 1:08d}.jpg') for i in indices]
        if self.pool is None:
            return torch.stack(decode_jpeg([read_file(p) for p in paths], mode=ImageReadMode.RGB))
        data = list(self.pool.map(read_file, paths))
        chunks = [data[k::self.decode_threads] for k in range(self.decode_threads)]
        decoded = list(self.pool.map(lambda chunk: decode_jpeg(chunk, mode=ImageReadMode.RGB) if chunk else [],
                                     chunks))
        frames = [None] * len(paths)
        for k, chunk in enumerate(decoded):
            frames[k::self.decode_threads] = chunk
        return torch.stack(frames)


class VideoDecoderUnavailable(ValueError):
    """`decoder='video'` was asked for but torchcodec cannot load FFmpeg (a ValueError, so entry
    scripts report it as one line like a bad flag)."""


def require_torchcodec():
    """torchcodec's VideoDecoder class, or VideoDecoderUnavailable naming what to install."""
    hint = ('--decoder video needs torchcodec with the FFmpeg shared libraries (major version 4 to 9): '
            'install FFmpeg (e.g. `apt-get install ffmpeg` or `conda install -c conda-forge ffmpeg`) '
            'and `pip install torchcodec`, or extract frames and use --decoder frame')
    try:
        from torchcodec._core import ops
        from torchcodec.decoders import VideoDecoder
    except Exception as error:  # ImportError, or OSError from a broken install
        raise VideoDecoderUnavailable(f'{hint} ({type(error).__name__})') from None
    if not getattr(ops, '_FFMPEG_AVAILABLE', True):  # torchcodec imports fine without FFmpeg
        raise VideoDecoderUnavailable(hint)
    return VideoDecoder


class EncodedVideo:
    """A video file decoded with torchcodec. Frame i is the frame shown at time i / fps, so the
    sampling is the same as for frame folders extracted at `fps` (eztorch extracts frames with ffmpeg -r 30)."""

    def __init__(self, path, fps=30, num_threads=1):
        self.decoder = require_torchcodec()(str(path), num_ffmpeg_threads=num_threads, seek_mode='approximate')
        meta = self.decoder.metadata
        self.begin = meta.begin_stream_seconds or 0.0
        end = meta.end_stream_seconds or meta.duration_seconds
        self.fps, self.num_frames = fps, int((end - self.begin) * fps)
        if self.num_frames < 1:
            raise ValueError(f'{path}: no frames')

    def load(self, indices):
        return self.decoder.get_frames_played_at(seconds=[self.begin + i / self.fps for i in indices]).data


# ---------------------------------------------------------------- the data sets' thread pool

class DecodeThreadPool:
    """Mixin of the video data sets: a thread pool for frame reading and decoding (`num_threads_io`,
    `num_threads_decode`), made once per process: a pool's threads do not survive fork or pickle."""
    _pool = _pool_pid = None

    def __getstate__(self):
        return {**self.__dict__, '_pool': None, '_pool_pid': None}

    def _thread_pool(self):
        threads = max(self.num_threads_io, self.num_threads_decode)
        if threads > 0 and self._pool_pid != os.getpid():
            self._pool, self._pool_pid = ThreadPoolExecutor(threads, thread_name_prefix='jpeg'), os.getpid()
        return self._pool
