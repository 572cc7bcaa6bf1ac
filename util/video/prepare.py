"""Video files -> JPEG frame folders, the layout util/video/io.py and the video evaluations read.

Every video under the source folder (mp4, avi, webm, mkv; sub-folders kept) becomes
`<out>/<same relative path without the suffix>/00000001.jpg ...`: frame i (from 0) is the frame shown at
time i / fps, for the floor(duration x fps) times inside the video, like `ffmpeg -r <fps>`. With a short
side the frames are resized (bilinear, antialiased, inside FFmpeg) so that side has that many pixels.

Resumable: a frame folder is written under `<out>/.partial/` and renamed into place when complete, so an
existing folder is a finished one and is skipped on a rerun. `<out>/prepare_video.json` records the settings;
a rerun with other settings is refused. Unreadable videos are listed in `<out>/unreadable_videos.txt` (and
tried again on a rerun). Source folders named train/, val/ or test/ (Kinetics) also get `<out>/<split>.csv`,
`<class>/<video> <label> <num_frames>` per line, labels indexing the sorted class names of all splits.
"""
import functools
import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path, PurePosixPath

import torch
from torchvision.io import encode_jpeg, write_file

from util.video.io import require_torchcodec

VIDEO_SUFFIXES = ('.mp4', '.avi', '.webm', '.mkv')
CSV_SPLITS = ('train', 'val', 'test')
PARTIAL_DIR = '.partial'
SETTINGS_NAME = 'prepare_video.json'
REPORT_NAME = 'unreadable_videos.txt'
FRAMES_PER_CHUNK = 32  # decoded frames held in memory at once per worker


def find_videos(source):
    """Relative POSIX paths of the video files under `source`, sorted; one-line errors for bad input."""
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f'--source {source}: no such folder')
    videos = sorted(p.relative_to(source).as_posix() for p in source.rglob('*')
                    if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
    if not videos:
        raise ValueError(f'--source {source} holds no video files ({", ".join(VIDEO_SUFFIXES)})')
    folders = {}
    for video in videos:
        other = folders.setdefault(frame_folder_name(video), video)
        if other != video:
            raise ValueError(f'--source {source}: {other} and {video} would share one frame folder; '
                             'rename or remove one')
    return videos


def frame_folder_name(video):
    """`<class>/<name>.mp4` -> `<class>/<name>` (the relative frame folder of a video)."""
    path = PurePosixPath(video)
    return str(path.with_name(path.stem))


def frame_count(duration, fps):
    """Frames extracted from `duration` seconds at `fps`: floor(duration x fps), tolerant to float round-off."""
    return math.floor(duration * fps + 1e-6)


def resized_shape(height, width, short_side):
    """(height, width) with the short side at `short_side` and the aspect ratio kept; unchanged for 0."""
    if not short_side:
        return height, width
    if height <= width:
        return short_side, round(width * short_side / height)
    return round(height * short_side / width), short_side


def count_frames(folder):
    return sum(1 for entry in os.scandir(folder) if entry.name.endswith('.jpg'))


def extract_frames(video_path, folder, fps, short_side=0, quality=95):
    """Write the frames of `video_path` at `fps` to `folder/00000001.jpg ...`; returns their number."""
    VideoDecoder = require_torchcodec()
    transforms = None
    if short_side:
        from torchcodec.transforms import Resize
        meta = VideoDecoder(str(video_path), seek_mode='approximate').metadata
        if not meta.height or not meta.width:
            raise ValueError(f'{video_path}: no frame size in the stream header')
        transforms = [Resize(resized_shape(meta.height, meta.width, short_side))]
    decoder = VideoDecoder(str(video_path), seek_mode='exact', transforms=transforms)
    meta = decoder.metadata
    begin = meta.begin_stream_seconds or 0.0
    end = meta.end_stream_seconds if meta.end_stream_seconds is not None else meta.duration_seconds
    num_frames = frame_count((end or 0.0) - begin, fps)
    if num_frames < 1:
        raise ValueError(f'{video_path}: no frames')
    folder.mkdir(parents=True)
    for first in range(0, num_frames, FRAMES_PER_CHUNK):
        indices = range(first, min(first + FRAMES_PER_CHUNK, num_frames))
        frames = decoder.get_frames_played_at(seconds=[begin + i / fps for i in indices]).data
        for i, jpeg in zip(indices, encode_jpeg(list(frames), quality=quality)):
            write_file(str(folder / f'{i + 1:08d}.jpg'), jpeg)
    return num_frames


def prepare_one(video, source, out, fps, short_side=0, quality=95):
    """('done', frames) or ('failed', reason) for one video; never raises for a bad file."""
    partial = out / PARTIAL_DIR / frame_folder_name(video)
    try:
        frames = extract_frames(source / video, partial, fps, short_side, quality)
    except (OSError, RuntimeError, ValueError) as error:  # what torchcodec raises for a bad file
        shutil.rmtree(partial, ignore_errors=True)
        reason = (str(error).strip().splitlines() or [''])[0][:300]
        return 'failed', f'{type(error).__name__}: {reason}'
    final = out / frame_folder_name(video)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial, final)  # a frame folder appears complete or not at all
    return 'done', frames


def _start_worker():
    torch.set_num_threads(1)  # parallelism comes from the processes


class Progress:
    """tqdm when installed, else one line every few seconds: videos done, videos/s, ETA."""

    def __init__(self, total, enabled=True):
        self.total, self.enabled, self.done, self.start, self.last_print = total, enabled, 0, time.time(), 0.0
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, unit='video', dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, counts):
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix(counts, refresh=False)
            self.bar.update()
            return
        now = time.time()
        if self.enabled and (now - self.last_print > 5 or self.done == self.total):
            rate = self.done / max(now - self.start, 1e-9)
            eta = time.strftime('%H:%M:%S', time.gmtime((self.total - self.done) / rate))
            print(f'{self.done}/{self.total} videos, {rate:.2f} videos/s, ETA {eta} '
                  + ' '.join(f'{k}={v}' for k, v in counts.items()), file=sys.stderr, flush=True)
            self.last_print = now

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _as_flags(settings):
    return ' '.join(f'--{name} {value:g}' for name, value in settings.items())


def check_settings(out, settings):
    """Refuse to complete `out` with other extraction settings than it was started with."""
    path = out / SETTINGS_NAME
    if path.is_file():
        previous = json.loads(path.read_text())
        if previous != settings:
            raise ValueError(f'{out} was prepared with {_as_flags(previous)}, not {_as_flags(settings)}: use the '
                             'same flags or another --out')
    else:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings) + '\n')


def csv_rows(videos, frame_counts):
    """{split: ['<class>/<video> <label> <num_frames>', ...]} for the extracted videos under train/, val/, test/.
    Labels index the sorted class folders of all `videos` of these splits, extracted or not, so an unreadable
    video never shifts them."""
    in_splits = [video.split('/', 2) for video in videos if video.split('/')[0] in CSV_SPLITS]
    label = {name: k for k, name in enumerate(sorted({parts[1] for parts in in_splits}))}
    rows = {parts[0]: [] for parts in in_splits}
    for folder, frames in sorted(frame_counts.items()):
        split, _, rest = folder.partition('/')
        if split in rows:
            rows[split].append(f'{rest} {label[rest.split("/")[0]]} {frames}')
    return rows


def extract_all(videos, task, workers, record):
    """`task(video)` for every video, in `workers` processes; `record(video, *result)` as each ends."""
    if workers <= 1 or len(videos) <= 1:
        for video in videos:
            record(video, *task(video))
        return
    # fork, as DataLoader workers do: no module imported again; torch has run no op (no thread pool) yet
    context = multiprocessing.get_context('fork' if sys.platform == 'linux' else None)
    with ProcessPoolExecutor(min(workers, len(videos)), mp_context=context, initializer=_start_worker) as pool:
        jobs = {pool.submit(task, video): video for video in videos}
        for job in as_completed(jobs):
            try:
                record(jobs[job], *job.result())
            except BrokenProcessPool:
                raise RuntimeError('a worker process died (e.g. FFmpeg crashed on a video); run the same command '
                                   'again: finished videos are kept') from None


def prepare_videos(source, out, fps, short_side=0, workers=1, quality=95, progress=True):
    """Extract every video of `source` into frame folders under `out` (see the module docstring).
    Returns {'done', 'skipped', 'failed': counts, 'frames': {frame folder: frames}, 'failures': {video: reason}}."""
    source, out = Path(source), Path(out)
    if fps <= 0:
        raise ValueError(f'--fps {fps}: must be positive')
    if short_side < 0:
        raise ValueError(f'--short_side {short_side}: must be 0 (native size) or a positive number of pixels')
    if not 1 <= quality <= 100:
        raise ValueError(f'--quality {quality}: must be in 1..100')
    videos = find_videos(source)
    unlabelled = [v for v in videos if v.split('/')[0] in CSV_SPLITS and v.count('/') < 2]
    if unlabelled:
        raise ValueError(f'--source {source}: {unlabelled[0]} is not in a class folder '
                         '(expected <split>/<class>/<video>)')
    require_torchcodec()  # one clear error up front rather than one per video
    check_settings(out, {'fps': fps, 'short_side': short_side, 'quality': quality})
    shutil.rmtree(out / PARTIAL_DIR, ignore_errors=True)  # left by an interrupted run

    counts = {'done': 0, 'skipped': 0, 'failed': 0}
    frame_counts, failures = {}, {}
    bar = Progress(len(videos), progress)

    def record(video, status, value):
        counts[status] += 1
        if status == 'failed':
            failures[video] = value
        else:
            frame_counts[frame_folder_name(video)] = value
        bar.update(counts)

    todo = []
    for video in videos:
        if (out / frame_folder_name(video)).is_dir():
            record(video, 'skipped', count_frames(out / frame_folder_name(video)))
        else:
            todo.append(video)
    try:
        task = functools.partial(prepare_one, source=source, out=out, fps=fps, short_side=short_side, quality=quality)
        extract_all(todo, task, workers, record)
    finally:
        bar.close()
    shutil.rmtree(out / PARTIAL_DIR, ignore_errors=True)

    report = out / REPORT_NAME
    if failures:
        report.write_text(''.join(f'{video}\t{reason}\n' for video, reason in sorted(failures.items())))
    elif report.exists():
        report.unlink()
    for split, rows in csv_rows(videos, frame_counts).items():
        (out / f'{split}.csv').write_text(''.join(row + '\n' for row in rows))
    return {**counts, 'frames': frame_counts, 'failures': failures}
