"""SCE's video data: two random clips per video for training (`VideoClipDataset`), one centre clip per video for
validation (`CenterClipDataset`), read from Kinetics frame folders or video files as util/video/io.py describes.

A training sample: `num_clips` random windows of `clip_duration` seconds, 8 frames kept uniformly in each,
a temporal difference with probability `time_difference_prob` (128 = no change), one RandomResizedCrop box
per clip. Random numbers come from torch's RNG only (seeded per DataLoader worker). Samples are uint8
(0..255) when no temporal difference is used, else float32; the GPU augmentation divides by 255.
An unreadable video is flagged and warned about once (util/data/bad_files.py); training returns another random video,
validation drops it.
"""
import math
from fractions import Fraction
from pathlib import Path

import torch
from torchvision.transforms.v2.functional import rgb_to_grayscale

from util.data.bad_files import BadFiles
from util.video.demo import video_data_root
from util.video.io import (FRAME_LAYOUT, MAX_SKIPS_PER_SAMPLE, DecodeThreadPool, EncodedVideo, FrameFolderVideo,
                           clip_frame_indices, random_resized_crop_box, read_video_csv, require_torchcodec, resize_clip,
                           sample_clip_windows, uniform_offsets)


# ---------------------------------------------------------------- temporal difference (pure functions)

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


# ---------------------------------------------------------------- data sets

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
