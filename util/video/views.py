"""Clips of the downstream video protocols (eztorch's evaluation data pipeline), from a util.video.splits.VideoList.

- `TrainClipDataset`: one clip per video of `clip_duration` s starting uniformly in [0, max(duration - d, 0)],
  `num_frames` frames kept uniformly; the short side resized to a random integer in `short_side` (bilinear, no
  antialias), then one random `crop_size` square, the same in every frame. Returns (uint8 [3, T, c, c], label).
- `MultiViewDataset`: `num_clips` x `num_crops` views per video, clip-major ((clip 0: crops 0, 1, 2), (clip 1:
  ...), ...): clip k starts at k * max(duration - d, 0) / (num_clips - 1); the short side is resized to
  `crop_size` and the crops are the start, centre and end of the long side (one crop: the centre). Returns
  (uint8 [V, 3, T, S, S], label), with `return_index` also the video's index; None for an unreadable video.
Frames are resized once per video for all its views, and rounded to uint8 (error <= 0.5 / 255), as
util/sce/data.py does. A video at `fps` frames per second lasts num_frames / fps seconds.
"""
import math
import os
from fractions import Fraction

import torch

from util.data.bad_files import BadFiles
from util.video.io import (MAX_SKIPS_PER_SAMPLE, DecodeThreadPool, EncodedVideo, FrameFolderVideo, clip_frame_indices,
                           require_torchcodec, resize_clip, sample_clip_windows, uniform_offsets)


def short_side_size(height, width, short):
    """(H, W) with the short side `short` and the long side floor(long * short / short side)."""
    if height <= width:
        return short, math.floor(width * short / height)
    return math.floor(height * short / width), short


def eval_clip_starts(duration, clip_duration, num_clips):
    """Start times (Fractions) of the evaluation clips: evenly spaced over [0, max(duration - d, 0)]."""
    latest = max(Fraction(duration) - Fraction(clip_duration), Fraction(0))
    return [latest * k / max(num_clips - 1, 1) for k in range(num_clips)]


def crop_offsets(length, size, num_crops):
    """Offsets along a side of `length` of the evaluation crops of `size`: start, centre, end (3) or centre (1)."""
    centre = math.ceil((length - size) / 2)
    return [0, centre, length - size] if num_crops == 3 else [centre]


def _resized_uint8(frames, size):
    return resize_clip(frames, size).round_().clamp_(0, 255).to(torch.uint8)


class VideoListDataset(DecodeThreadPool, torch.utils.data.Dataset):
    """Opens the videos of a VideoList (frame folders, or files with `decoder='video'`); unreadable ones are
    flagged once (util/data/bad_files.py)."""

    def __init__(self, videos, decoder='frame', fps=30, num_frames=8, clip_duration=2.56, num_threads_io=4,
                 num_threads_decode=4):
        if decoder not in ('frame', 'video'):
            raise ValueError(f"--decoder {decoder!r}: expected 'frame' or 'video'")
        if decoder == 'video':
            require_torchcodec()  # fail now, not in a worker
        self.videos, self.decoder, self.fps = videos, decoder, fps
        self.num_frames, self.clip_duration = num_frames, clip_duration
        self.labels = [label for _, label, _ in videos.items]
        self.num_threads_io, self.num_threads_decode = num_threads_io, num_threads_decode
        self.bad_files = BadFiles([videos.root / path for path, _, _ in videos.items], 'video')

    def __len__(self):
        return len(self.videos.items)

    def open(self, index):
        path, _, count = self.videos.items[index]
        path = self.videos.root / path
        if self.decoder == 'video':
            return EncodedVideo(path, self.fps, max(self.num_threads_decode, 1))
        if count is None:  # UCF101 / HMDB51 lists give no frame counts
            with os.scandir(path) as entries:
                count = sum(entry.name.endswith('.jpg') for entry in entries)
        return FrameFolderVideo(path, count, self._thread_pool(), max(self.num_threads_decode, 1))

    def clip_frames(self, num_video_frames, start):
        """The `num_frames` frame indices kept from the clip starting at `start` s."""
        frames = clip_frame_indices(start, start + Fraction(self.clip_duration), num_video_frames, self.fps)
        return [frames[k] for k in uniform_offsets(len(frames), self.num_frames)]


class TrainClipDataset(VideoListDataset):
    def __init__(self, videos, crop_size=224, short_side=(256, 320), **kwargs):
        super().__init__(videos, **kwargs)
        self.crop_size, self.short_side = crop_size, tuple(short_side)

    def _sample(self, index):
        video = self.open(index)
        [(start, _)] = sample_clip_windows(Fraction(video.num_frames, self.fps), 1, self.clip_duration)
        selected = self.clip_frames(video.num_frames, start)
        needed = sorted(set(selected))
        decoded = video.load(needed)[[needed.index(i) for i in selected]]  # [T, 3, h, w]
        short = torch.randint(self.short_side[0], self.short_side[1] + 1, ()).item()
        h, w = short_side_size(*decoded.shape[-2:], short)
        c = self.crop_size
        top, left = torch.randint(h - c + 1, ()).item(), torch.randint(w - c + 1, ()).item()
        clip = _resized_uint8(decoded, (h, w))[..., top:top + c, left:left + c]
        return clip.permute(1, 0, 2, 3)  # [3, T, c, c]

    def __getitem__(self, index):
        for _ in range(MAX_SKIPS_PER_SAMPLE):
            if index not in self.bad_files:
                try:
                    return self._sample(index), self.labels[index]
                except (OSError, RuntimeError, ValueError) as error:  # missing or corrupt files: never crash a run
                    self.bad_files.add(index, error)
            index = torch.randint(len(self), ()).item()
        raise RuntimeError(f'{MAX_SKIPS_PER_SAMPLE} unreadable videos in a row under {self.videos.root} '
                           f'({int(self.bad_files.flags.sum())} unreadable so far); check the data')


class MultiViewDataset(VideoListDataset):
    def __init__(self, videos, crop_size=256, num_clips=10, num_crops=3, return_index=False, **kwargs):
        super().__init__(videos, **kwargs)
        if num_crops not in (1, 3):
            raise ValueError(f'--num_crops {num_crops}: expected 1 (centre) or 3 (start, centre, end)')
        self.crop_size, self.num_clips, self.num_crops = crop_size, num_clips, num_crops
        self.return_index = return_index

    @property
    def views_per_video(self):
        return self.num_clips * self.num_crops

    def _sample(self, index):
        video = self.open(index)
        starts = eval_clip_starts(Fraction(video.num_frames, self.fps), self.clip_duration, self.num_clips)
        clips = [self.clip_frames(video.num_frames, start) for start in starts]
        needed = sorted(set().union(*clips))
        decoded = video.load(needed)
        h, w = short_side_size(*decoded.shape[-2:], self.crop_size)
        frames = _resized_uint8(decoded, (h, w))  # each needed frame resized once
        row = {frame: k for k, frame in enumerate(needed)}
        s = self.crop_size
        views = []
        for clip in clips:
            x = frames[[row[i] for i in clip]]  # [T, 3, h, w]
            for offset in crop_offsets(max(h, w), s, self.num_crops):
                crop = x[..., offset:offset + s, :] if h > w else x[..., offset:offset + s]
                views.append(crop.permute(1, 0, 2, 3))
        return torch.stack(views)  # [V, 3, T, S, S]

    def __getitem__(self, index):
        if index in self.bad_files:
            return None
        try:
            views = self._sample(index)
        except (OSError, RuntimeError, ValueError) as error:  # left out of the evaluation, counted
            self.bad_files.add(index, error)
            return None
        return (views, self.labels[index], index) if self.return_index else (views, self.labels[index])
