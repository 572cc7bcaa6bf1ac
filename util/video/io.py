"""Video data for SCE pretraining: Kinetics frame folders (or video files), two random clips per video
for training (`VideoClipDataset`), one centre clip per video for validation (`CenterClipDataset`).

Layout (as eztorch's): `<data_path>/train.csv` lists one video per line, `<class>/<video_stem> <label>
<num_frames>` (split from the right, so paths may contain spaces; `util.video.demo.write_frame_csv`
writes one), with the frames in `<data_path>/train/<class>/<video_stem>/00000001.jpg ...`. With
`decoder='video'` the lines are `<class>/<file>.mp4 <label>` and torchcodec decodes the files.
`val.csv` and `val/` hold the validation split the same way.

A training sample: `num_clips` random windows of `clip_duration` seconds, 8 frames kept uniformly in each,
a temporal difference with probability `time_difference_prob` (128 = no change), one RandomResizedCrop box
per clip. Random numbers come from torch's RNG only (seeded per DataLoader worker). Samples are uint8
(0..255) when no temporal difference is used, else float32; the GPU augmentation divides by 255.
An unreadable video is flagged and warned about once (util/data/bad_files.py); training returns another random video,
validation drops it.
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
from torchvision.transforms.v2.functional import rgb_to_grayscale

from util.data.bad_files import BadFiles
from util.video.demo import make_demo_videos

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


def temporal_difference_pairs(selected, num_frames):
    """(minuend, subtrahend) frame indices per kept frame: (i, i+1), and (L-1, L) for the last one."""
    last = num_frames - 1
    pairs = [(i, min(i + 1, last)) for i in selected[:-1]]
    return pairs + [(max(selected[-1] - 1, 0), selected[-1])]


def temporal_difference(minuend, subtrahend):
    """round((gray(a) - gray(b) + 255) / 2) as uint8, for uint8 RGB frames [..., 3, H, W] (eztorch's
    `temporal_difference(use_grayscale=True, absolute=False)`: grayscale truncated to uint8 first)."""
    a = rgb_to_grayscale(minuend, num_output_channels=3).float()
    b = rgb_to_grayscale(subtrahend, num_output_channels=3).float()
    return ((a - b + 255) / 2).round().clamp(0, 255).to(torch.uint8)


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


# ---------------------------------------------------------------- dataset

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


class VideoClipDataset(DecodeThreadPool, torch.utils.data.Dataset):
    """Map-style dataset of `num_clips` augmented clips per video, listed by a CSV (see module docstring)."""

    def __init__(self, csv_path, video_root, decoder='frame', num_clips=2, clip_duration=2.56, num_frames=8,
                 fps=30, speeds=(1,), jitter_factor=0.0, time_difference_prob=0.0, crop_size=224,
                 crop_scale=(0.2, 0.766), crop_ratio=(0.75, 1.3333), num_threads_io=4, num_threads_decode=4,
                 drop_unreadable=False):
        if decoder not in ('frame', 'video'):
            raise ValueError(f"--decoder {decoder!r}: expected 'frame' or 'video'")
        if decoder == 'video':
            require_torchcodec()  # fail now, not in a worker
        self.video_root, self.decoder = Path(video_root), decoder
        if not self.video_root.is_dir():
            raise FileNotFoundError(f'video folder {self.video_root} does not exist')
        rows = read_video_csv(csv_path, with_num_frames=decoder == 'frame')
        self.csv_path = Path(csv_path)
        self.paths = [row[0] for row in rows]
        self.labels = [row[1] for row in rows]
        self.frame_counts = [row[2] for row in rows]
        self.num_classes = max(self.labels) + 1
        self.num_clips, self.clip_duration, self.num_frames, self.fps = num_clips, clip_duration, num_frames, fps
        self.speeds, self.jitter_factor = tuple(speeds), jitter_factor
        self.time_difference_prob = time_difference_prob
        self.crop_size = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
        self.crop_scale, self.crop_ratio = tuple(crop_scale), tuple(crop_ratio)
        self.num_threads_io, self.num_threads_decode = num_threads_io, num_threads_decode
        self.bad_files = BadFiles([self.video_root / p for p in self.paths], 'video')
        self.drop_unreadable = drop_unreadable

    def __len__(self):
        return len(self.paths)

    def _open(self, index):
        path = self.video_root / self.paths[index]
        if self.decoder == 'video':
            return EncodedVideo(path, self.fps, max(self.num_threads_decode, 1))
        return FrameFolderVideo(path, self.frame_counts[index], self._thread_pool(), max(self.num_threads_decode, 1))

    def _clip(self, video, start, end):
        frames = clip_frame_indices(start, end, video.num_frames, self.fps)
        selected = [frames[k] for k in uniform_offsets(len(frames), self.num_frames)]
        difference = self.time_difference_prob > 0 and torch.rand(()).item() < self.time_difference_prob
        pairs = temporal_difference_pairs(selected, video.num_frames) if difference else []
        needed = sorted(set(selected).union(*pairs))  # each frame decoded once
        decoded = video.load(needed)
        row = {frame: k for k, frame in enumerate(needed)}
        top, left, h, w = random_resized_crop_box(decoded.shape[-2], decoded.shape[-1], self.crop_scale,
                                                  self.crop_ratio)
        decoded = decoded[..., top:top + h, left:left + w]
        if difference:
            clip = temporal_difference(decoded[[row[a] for a, _ in pairs]], decoded[[row[b] for _, b in pairs]])
        else:
            clip = decoded[[row[i] for i in selected]]
        clip = resize_clip(clip.permute(1, 0, 2, 3), self.crop_size)  # [T, C, h, w] -> [C, T, H, W]
        return clip if self.time_difference_prob > 0 else clip.round_().clamp_(0, 255).to(torch.uint8)

    def _sample(self, index):
        video = self._open(index)
        duration = Fraction(video.num_frames, self.fps)
        windows = sample_clip_windows(duration, self.num_clips, self.clip_duration, self.speeds,
                                      self.jitter_factor)
        return torch.stack([self._clip(video, start, end) for start, end in windows])

    def __getitem__(self, index):
        for _ in range(MAX_SKIPS_PER_SAMPLE):
            if index not in self.bad_files:
                try:
                    return self._sample(index), self.labels[index]
                except (OSError, RuntimeError, ValueError) as error:  # missing/corrupt files: never crash a run
                    self.bad_files.add(index, error)
            if self.drop_unreadable:
                return None
            index = torch.randint(len(self), ()).item()
        raise RuntimeError(f'{MAX_SKIPS_PER_SAMPLE} unreadable videos in a row from {self.csv_path} '
                           f'({int(self.bad_files.flags.sum())} unreadable so far); check the data')


class CenterClipDataset(VideoClipDataset):
    """One deterministic clip per video, for validation: the centre `clip_duration` window (start
    max(duration - d, 0) / 2), `num_frames` of its frames kept uniformly, no temporal difference; each
    frame's short side resized bilinearly (no antialias) to `crop_size`, then the centre crop_size square,
    as the reference run's validation transform (pytorchvideo ShortSideScale, torchvision CenterCrop).
    `__getitem__` returns ([3, T, S, S] uint8, label), or None for an unreadable video (dropped from evaluation)."""

    def __init__(self, csv_path, video_root, decoder='frame', clip_duration=2.56, num_frames=8, fps=30,
                 crop_size=256, num_threads_io=4, num_threads_decode=4):
        super().__init__(csv_path, video_root, decoder, num_clips=1, clip_duration=clip_duration,
                         num_frames=num_frames, fps=fps, crop_size=crop_size, num_threads_io=num_threads_io,
                         num_threads_decode=num_threads_decode, drop_unreadable=True)
        self.size = crop_size

    def _sample(self, index):
        video = self._open(index)
        length = Fraction(self.clip_duration)
        start = max(Fraction(video.num_frames, self.fps) - length, Fraction(0)) / 2
        frames = clip_frame_indices(start, start + length, video.num_frames, self.fps)
        selected = [frames[k] for k in uniform_offsets(len(frames), self.num_frames)]
        needed = sorted(set(selected))
        decoded = video.load(needed)
        clip = decoded[[needed.index(i) for i in selected]].permute(1, 0, 2, 3)  # [C, T, h, w]
        h, w = clip.shape[-2:]
        short = self.size
        size = (short, math.floor(w / h * short)) if h <= w else (math.floor(h / w * short), short)
        clip = resize_clip(clip, size)
        top, left = round((size[0] - short) / 2), round((size[1] - short) / 2)
        clip = clip[..., top:top + short, left:left + short]
        return clip.round_().clamp_(0, 255).to(torch.uint8)


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


def build_video_dataset(data_path, split='train', decoder='frame', center_clip=False, **kwargs):
    """VideoClipDataset (CenterClipDataset with `center_clip`) over `<data_path>/{split}.csv` and
    `<data_path>/{split}/`, or the demo videos."""
    root = video_data_root(data_path, decoder)
    for needed in (root / f'{split}.csv', root / split):
        if not needed.exists():
            raise FileNotFoundError(f'--data_path {root}: missing {needed} '
                                    f'(expected {FRAME_LAYOUT.format(split=split)})')
    cls = CenterClipDataset if center_clip else VideoClipDataset
    return cls(root / f'{split}.csv', root / split, decoder=decoder, **kwargs)
