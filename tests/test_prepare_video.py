"""prepare_video.py (util/video/prepare.py) on generated video files: frame counts and frame times against the
encoded frames, resizing, unreadable videos, resume, CSVs; the demo video files (util/video/demo.py)."""
import os
import shutil

import pytest
import torch
from torchvision.io import decode_jpeg, read_file

import prepare_video
from util.sce.data import VideoClipDataset
from util.video import demo as video_demo
from util.video.demo import encode_video, make_demo_video_files, make_demo_videos, video_encoder
from util.video.io import FrameFolderVideo, read_video_csv
from util.video.prepare import PARTIAL_DIR, REPORT_NAME, prepare_videos

pytestmark = [pytest.mark.usefixtures('one_thread'),
              pytest.mark.skipif(video_encoder() != 'torchcodec',
                                 reason='torchcodec cannot load the FFmpeg shared libraries (apt-get install ffmpeg)')]

STEP = 6  # grey level of frame k is STEP * k + 3: codec and JPEG errors (a few levels) keep neighbours apart
# relative path: (frames, fps, (height, width))
SOURCE_VIDEOS = {'train/cat/ramp.mp4': (40, 30, (48, 64)), 'train/cat/short clip.mkv': (12, 30, (48, 64)),
                 'val/dog/tall.avi': (30, 25, (64, 48))}
BROKEN = 'train/bird/broken.mp4'  # the only video of its class: the class keeps its label all the same


def grey_ramp(num_frames, size):
    return (torch.arange(num_frames) * STEP + 3).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, *size).contiguous()


@pytest.fixture(scope='module')
def source(module_tmp):
    root = module_tmp / 'videos'
    for path, (num_frames, fps, size) in SOURCE_VIDEOS.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        encode_video(grey_ramp(num_frames, size), root / path, fps)
    (root / BROKEN).parent.mkdir(parents=True)
    (root / BROKEN).write_bytes(torch.randint(256, (4096,), generator=torch.Generator().manual_seed(0),
                                              dtype=torch.uint8).numpy().tobytes())
    return root


@pytest.fixture(scope='module')
def native_25fps(source, module_tmp):
    """The UCF101 settings (25 fps, native size), one process; returns (out folder, result)."""
    out = module_tmp / 'native_25fps'
    return out, prepare_videos(source, out, fps=25, short_side=0, workers=1, progress=False)


def folder_of(path):
    return path.rsplit('.', 1)[0]


def frame_values(folder):
    """Mean grey level of every frame of a frame folder, in file-name order."""
    files = sorted(os.listdir(folder))
    assert files == [f'{i + 1:08d}.jpg' for i in range(len(files))]
    return [decode_jpeg(read_file(str(folder / name))).float().mean().item() for name in files]


def test_frame_counts_and_times_follow_the_extraction_fps(native_25fps):
    out, result = native_25fps
    for path, (num_frames, fps, size) in SOURCE_VIDEOS.items():
        expected = num_frames * 25 // fps  # floor(duration x 25): frames shown at t = 0, 1/25, ...
        values = frame_values(out / folder_of(path))
        assert result['frames'][folder_of(path)] == len(values) == expected, path
        shown = [i * fps // 25 for i in range(expected)]  # the source frame displayed at t = i / 25
        assert [round((v - 3) / STEP) for v in values] == shown, path
        assert decode_jpeg(read_file(str(out / folder_of(path) / '00000001.jpg'))).shape == (3, *size)


def test_unreadable_video_is_listed_and_the_others_are_done(native_25fps):
    out, result = native_25fps
    assert (result['done'], result['skipped'], result['failed']) == (3, 0, 1)
    assert list(result['failures']) == [BROKEN]
    report = (out / REPORT_NAME).read_text().splitlines()
    assert len(report) == 1 and report[0].startswith(BROKEN + '\t')
    assert not (out / folder_of(BROKEN)).exists() and not (out / PARTIAL_DIR).exists()


def test_csvs_list_extracted_videos_with_labels_of_all_class_folders(native_25fps):
    out, _ = native_25fps
    # bird, cat, dog: the class folders of both splits, sorted (bird's only video is unreadable)
    assert (out / 'train.csv').read_text() == 'cat/ramp 1 33\ncat/short clip 1 10\n'
    assert (out / 'val.csv').read_text() == 'dog/tall 2 30\n'
    path, label, num_frames = read_video_csv(out / 'train.csv')[1]
    frames = FrameFolderVideo(out / 'train' / path, num_frames).load(range(num_frames))
    assert frames.shape == (10, 3, 48, 64) and label == 1


def test_rerun_skips_finished_videos_and_redoes_missing_ones(source, native_25fps):
    out, first = native_25fps
    kept = out / 'train/cat/ramp/00000001.jpg'
    stamp = kept.stat().st_mtime_ns
    shutil.rmtree(out / 'val/dog/tall')  # as if the run had been killed before this video
    (out / PARTIAL_DIR / 'val/dog/tall').mkdir(parents=True)  # with its half-written folder left behind
    (out / PARTIAL_DIR / 'val/dog/tall/00000099.jpg').write_bytes(b'partial')
    again = prepare_videos(source, out, fps=25, short_side=0, workers=1, progress=False)
    assert (again['done'], again['skipped'], again['failed']) == (1, 2, 1)
    assert again['frames'] == first['frames'] and kept.stat().st_mtime_ns == stamp
    assert len(os.listdir(out / 'val/dog/tall')) == 30 and not (out / PARTIAL_DIR).exists()
    assert (out / 'val.csv').read_text() == 'dog/tall 2 30\n'


def test_short_side_resize_in_worker_processes_matches_one_process(source, module_tmp):
    """The Kinetics settings (30 fps, short side 32 here) through the script with 2 processes."""
    out = module_tmp / 'short_side'
    args = prepare_video.get_args_parser().parse_args(
        ['--source', str(source), '--out', str(out), '--fps', '30', '--short_side', '32', '--workers', '2',
         '--no_progress'])
    result = prepare_video.main(args)
    assert result['frames'] == {'train/cat/ramp': 40, 'train/cat/short clip': 12, 'val/dog/tall': 36}
    landscape = decode_jpeg(read_file(str(out / 'train/cat/ramp/00000040.jpg')))
    portrait = decode_jpeg(read_file(str(out / 'val/dog/tall/00000001.jpg')))
    assert landscape.shape == (3, 32, 43) and portrait.shape == (3, 43, 32)  # 64 x 32 / 48 = 42.7
    assert round((landscape.float().mean().item() - 3) / STEP) == 39
    one_process = prepare_videos(source, module_tmp / 'short_side_1', fps=30, short_side=32, progress=False)
    assert one_process['frames'] == result['frames']


def test_bad_input_fails_before_writing(source, native_25fps, tmp_path):
    with pytest.raises(ValueError, match='--fps 0'):
        prepare_videos(source, tmp_path / 'a', fps=0)
    with pytest.raises(FileNotFoundError, match='--source'):
        prepare_videos(tmp_path / 'missing', tmp_path / 'b', fps=30)
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='no video files'):
        prepare_videos(tmp_path / 'empty', tmp_path / 'c', fps=30)
    assert sorted(os.listdir(tmp_path)) == ['empty']
    with pytest.raises(ValueError, match='--fps 25 --short_side 0 --quality 95, not --fps 30'):
        prepare_videos(source, native_25fps[0], fps=30, short_side=0)


def test_demo_video_files_give_back_the_demo_frame_folders(tmp_path, monkeypatch):
    frames_root = make_demo_videos(tmp_path / 'frames', videos_per_class={'train': 2, 'val': 1},
                                   frame_range=(8, 12))
    monkeypatch.setattr(prepare_video, 'make_demo_video_files',  # the demo, smaller
                        lambda: make_demo_video_files(tmp_path / 'files', frames_root))
    out = tmp_path / 'frames_again'
    args = prepare_video.get_args_parser().parse_args(['--source', 'demo', '--out', str(out), '--short_side', '0',
                                                       '--workers', '1', '--no_progress'])
    assert prepare_video.main(args)['failed'] == 0
    assert sorted(p.name for p in (tmp_path / 'files/train/coffee').iterdir()) == ['coffee_000.mp4', 'coffee_001.avi']
    for split in ('train', 'val'):  # same videos, labels and frame counts as the frame folders encoded
        assert (out / f'{split}.csv').read_text() == (frames_root / f'{split}.csv').read_text()
    files = VideoClipDataset(tmp_path / 'files/val.csv', tmp_path / 'files/val', decoder='video', crop_size=16)
    assert len(files) == 6 and files.paths[0] == 'astronaut/astronaut_000.mp4' and files.labels[-1] == 5
    assert files[0][0].shape == (2, 3, 8, 16, 16)


@pytest.mark.skipif(shutil.which('ffmpeg') is None, reason='no ffmpeg command')
def test_ffmpeg_command_fallback_encodes_the_same_frames(tmp_path, monkeypatch):
    monkeypatch.setattr(video_demo, 'video_encoder', lambda: 'ffmpeg')
    encode_video(grey_ramp(9, (32, 48)), tmp_path / 'v.avi', fps=30)
    prepare_videos(tmp_path, tmp_path / 'out', fps=30, short_side=0, progress=False)
    assert [round((v - 3) / STEP) for v in frame_values(tmp_path / 'out/v')] == list(range(9))
