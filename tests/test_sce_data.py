"""Video data of SCE (util/sce/data.py, on util/video/io.py): CSV parsing, clip and frame sampling, temporal
difference, crops, skips, demo, loader."""
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

from util.data.samplers import build_eval_loader
from util.runtime import build_train_loader
from util.sce.data import (CenterClipDataset, VideoClipDataset, build_video_dataset, temporal_difference,
                           temporal_difference_pairs)
from util.video.demo import default_demo_video_root, make_demo_videos
from util.video.io import (VideoDecoderUnavailable, clip_frame_indices, random_resized_crop_box, read_video_csv,
                           require_torchcodec, sample_clip_windows, uniform_offsets)

# torchvision 0.29 deprecates its JPEG codec; util.video.io silences this, but pytest resets filters per test



def torchcodec_works():
    try:
        require_torchcodec()
        return True
    except VideoDecoderUnavailable:
        return False


def write_video(folder, values, size=(24, 30)):
    """A frame folder whose frame k is uniformly gray with value values[k] (gray survives JPEG exactly)."""
    folder.mkdir(parents=True)
    for k, value in enumerate(values):
        Image.new('RGB', size[::-1], (int(value),) * 3).save(folder / f'{k + 1:08d}.jpg', quality=100)


def dataset(tmp_path, videos, **kwargs):
    """VideoClipDataset over {relative path: (label, values)} frame folders written under tmp_path."""
    lines = []
    for path, (label, values) in videos.items():
        if values is not None:
            write_video(tmp_path / 'train' / path, values)
        lines.append(f'{path} {label} {len(values) if values is not None else 30}\n')
    (tmp_path / 'train.csv').write_text(''.join(lines))
    kwargs = {'crop_size': 16, 'num_threads_io': 0, 'num_threads_decode': 0, **kwargs}
    return VideoClipDataset(tmp_path / 'train.csv', tmp_path / 'train', **kwargs)


@pytest.fixture(scope='module')
def demo_root(module_tmp):
    return make_demo_videos(module_tmp / 'demo', videos_per_class={'train': 2, 'val': 1},
                            frame_range=(20, 90), frame_size=(32, 40))


# ---------------------------------------------------------------- CSV

def test_csv_parsing_with_spaces_in_paths(tmp_path):
    csv = tmp_path / 'train.csv'
    csv.write_text('abseiling/a b c 0 300\n\nplaying  cards/x  y 12 7\n')
    assert read_video_csv(csv) == [('abseiling/a b c', 0, 300), ('playing  cards/x  y', 12, 7)]
    assert read_video_csv(csv, with_num_frames=False)[0] == ('abseiling/a b c 0', 300, None)
    csv.write_text('a/b 0 10\nbroken_line 3\n')
    with pytest.raises(ValueError, match=r'train.csv:2: expected'):
        read_video_csv(csv)


def test_video_in_folder_with_spaces_loads(tmp_path):
    data = dataset(tmp_path, {'my class/clip one': (4, [10] * 12)})
    clips, label = data[0]
    assert label == 4 and data.labels == [4] and data.num_classes == 5 and len(data) == 1
    assert clips.shape == (2, 3, 8, 16, 16) and clips.dtype == torch.uint8


# ---------------------------------------------------------------- sampling

def test_uniform_offsets_match_floor_linspace():
    assert uniform_offsets(77) == [0, 10, 21, 32, 43, 54, 65, 76]
    for length in range(1, 200):
        assert uniform_offsets(length) == np.floor(np.linspace(0, length - 1, 8)).astype(int).tolist()
    assert uniform_offsets(3) == [0, 0, 0, 0, 1, 1, 1, 2]


def test_clip_frame_indices():
    assert clip_frame_indices(0, Fraction(2.56), 300) == range(0, 77)
    assert clip_frame_indices(Fraction(1, 10), Fraction(1, 10) + Fraction(2.56), 300) == range(3, 80)
    assert clip_frame_indices(0, Fraction(2.56), 40) == range(0, 40)  # shorter video: all its frames
    lengths = {len(clip_frame_indices(s, s + Fraction(2.56), 300)) for s in map(Fraction, np.random.rand(200) * 7)}
    assert lengths == {76, 77}


def test_clip_windows_bounds_and_determinism():
    g = torch.Generator().manual_seed(0)
    windows = [w for _ in range(100) for w in sample_clip_windows(Fraction(10), 2, 2.56, generator=g)]
    assert all(0 <= s <= 10 - Fraction(2.56) and e - s == Fraction(2.56) for s, e in windows)
    g = torch.Generator().manual_seed(0)
    again = [w for _ in range(100) for w in sample_clip_windows(Fraction(10), 2, 2.56, generator=g)]
    assert windows == again and len({s for s, _ in windows}) == 200  # clips independent
    assert sample_clip_windows(Fraction(1), 2, 2.56, generator=g)[0][0] == 0  # shorter than a clip
    lengths = {e - s for s, e in sample_clip_windows(Fraction(20), 50, 1, speeds=(1, 2), generator=g)}
    assert lengths == {1, 2}
    lengths = [float(e - s) for s, e in sample_clip_windows(Fraction(20), 50, 2, jitter_factor=0.1, generator=g)]
    assert all(1.8 <= d <= 2.2 for d in lengths) and len(set(lengths)) == 50


def test_dataset_frame_indices(tmp_path):
    """Frame k has gray value 3k, so the decoded clip tells which frames were taken."""
    data = dataset(tmp_path, {'c/v': (0, [3 * k for k in range(80)])}, num_clips=4)
    torch.manual_seed(0)
    starts = set()
    for clips in (data[0][0] for _ in range(5)):
        for clip in clips:
            indices = [round(v / 3) for v in clip[0, :, 8, 8].tolist()]
            first, length = indices[0], indices[-1] - indices[0] + 1
            assert length in (76, 77) and indices == [first + o for o in uniform_offsets(length)]
            starts.add(first)
    assert starts <= set(range(5)) and len(starts) > 1  # start frame ceil(30 * U[0, 80/30 - 2.56])


# ---------------------------------------------------------------- temporal difference

def test_center_clip_is_the_middle_window_resized_and_centre_cropped(tmp_path):
    """Validation clips: the centre 2.56 s (frames [36.6, 113.4) of a 5 s video at 30 fps, all of a 1 s one),
    4 frames kept uniformly, short side 24 -> 20 then the centre 20 x 20 square; no randomness."""
    dataset(tmp_path, {'a/long': (0, range(150)), 'b/short': (1, [3 * k for k in range(30)])})
    data = build_video_dataset(tmp_path, 'train', center_clip=True, num_frames=4, crop_size=20, num_threads_io=0,
                               num_threads_decode=0)
    assert isinstance(data, CenterClipDataset) and len(data) == 2
    clip, label = data[0]
    assert label == 0 and clip.dtype == torch.uint8 and clip.shape == (3, 4, 20, 20)
    assert clip[0, :, 0, 0].tolist() == [37, 62, 87, 113]  # frame k has gray value k
    assert torch.equal(clip, data[0][0]) and (clip == clip[:, :, :1, :1]).all()
    short, label = data[1]
    assert label == 1 and short[0, :, 0, 0].tolist() == [3 * k for k in (0, 9, 19, 29)]


def test_temporal_difference_pairs():
    selected = [0, 10, 21, 32, 43, 54, 65, 76]
    assert temporal_difference_pairs(selected, 300) == [(i, i + 1) for i in selected[:-1]] + [(75, 76)]
    assert temporal_difference_pairs([0, 0, 1, 1, 2, 2, 3, 3], 4)[-3:] == [(2, 3), (3, 3), (2, 3)]


def test_temporal_difference_values():
    a = torch.tensor([0, 255, 100, 101, 100], dtype=torch.uint8).view(5, 1, 1, 1).expand(5, 3, 2, 2)
    b = torch.tensor([255, 0, 100, 100, 101], dtype=torch.uint8).view(5, 1, 1, 1).expand(5, 3, 2, 2)
    out = temporal_difference(a, b)
    assert out.dtype == torch.uint8 and out.shape == (5, 3, 2, 2)
    gray = lambda v: int(np.float32(v) * np.float32(0.2989) + np.float32(v) * np.float32(0.587)
                         + np.float32(v) * np.float32(0.114))  # torchvision's grayscale, truncated to uint8
    expected = [round((gray(x) - gray(y) + 255) / 2) for x, y in zip([0, 255, 100, 101, 100], [255, 0, 100, 100, 101])]
    assert out[:, 0, 0, 0].tolist() == expected
    assert expected[:3] == [0, 254, 128]  # gray(white) = 254; no change: 127.5 rounds half to even, 128


def test_dataset_temporal_difference(tmp_path):
    values = [(k * k * 5) % 251 for k in range(20)]  # 20 frames < one clip: all taken, start 0
    data = dataset(tmp_path, {'c/v': (0, values)}, time_difference_prob=1.0)
    clips, _ = data[0]
    assert clips.dtype == torch.float32 and 0 <= clips.min() and clips.max() <= 255
    selected = uniform_offsets(20)
    expected = [(values[a] - values[b] + 255) / 2 for a, b in temporal_difference_pairs(selected, 20)]
    for clip in clips:
        got = clip[0, :, 8, 8]
        assert torch.equal(got, got.round()) and torch.allclose(got, torch.tensor(expected), atol=1.5)
    assert data.time_difference_prob == 1.0
    plain = dataset(tmp_path / 'p', {'c/v': (0, values)}, time_difference_prob=0.5)
    torch.manual_seed(0)
    kinds = {bool(torch.allclose(clip[0, :, 8, 8], torch.tensor(values, dtype=torch.float32)[selected], atol=1.5))
             for _ in range(8) for clip in plain[0][0]}
    assert kinds == {True, False}  # the coin is flipped per clip; float32 output either way


# ---------------------------------------------------------------- crop

def test_crop_box_within_the_default_scale_and_ratio():
    g = torch.Generator().manual_seed(0)
    for _ in range(500):
        top, left, h, w = random_resized_crop_box(256, 340, generator=g)
        assert 0 <= top <= 256 - h and 0 <= left <= 340 - w
        assert 0.2 - 0.01 <= h * w / (256 * 340) <= 0.766 + 0.01
        assert 0.75 - 0.01 <= w / h <= 1.3333 + 0.01
    assert random_resized_crop_box(10, 200, generator=g) == (0, 93, 10, 13)  # fallback: central, ratio clamped


def test_same_crop_on_all_frames(tmp_path):
    texture = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    folder = tmp_path / 'train' / 'c' / 'v'
    folder.mkdir(parents=True)
    for k in range(100):
        Image.fromarray(texture).save(folder / f'{k + 1:08d}.jpg', quality=95)
    (tmp_path / 'train.csv').write_text('c/v 0 100\n')
    data = VideoClipDataset(tmp_path / 'train.csv', tmp_path / 'train', crop_size=(24, 32), num_threads_io=2,
                            num_threads_decode=2)
    torch.manual_seed(1)
    clips, _ = data[0]
    assert clips.shape == (2, 3, 8, 24, 32)
    for clip in clips:
        assert all(torch.equal(clip[:, 0], clip[:, t]) for t in range(8))
    assert not torch.equal(clips[0], clips[1])  # one box per clip


# ---------------------------------------------------------------- skipping, determinism, errors

def test_missing_and_corrupt_videos_are_skipped_and_counted(tmp_path):
    data = dataset(tmp_path, {'a/good': (0, [50] * 30), 'a/missing': (1, None), 'b/corrupt': (2, [60] * 30)})
    (tmp_path / 'train' / 'b' / 'corrupt' / '00000001.jpg').write_bytes(b'not a jpeg')
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match='skipping unreadable video'):
        labels = [data[i][1] for i in range(3) for _ in range(3)]
    assert set(labels) == {0} and data.bad_files.count() == 2


def test_validation_leaves_unreadable_videos_out(tmp_path):
    dataset(tmp_path, {'a/good': (0, [50] * 30), 'a/missing': (1, None), 'b/corrupt': (2, [60] * 30),
                       'b/also_good': (3, [70] * 30)})
    (tmp_path / 'train' / 'b' / 'corrupt' / '00000005.jpg').write_bytes(b'not a jpeg')
    val = CenterClipDataset(tmp_path / 'train.csv', tmp_path / 'train', crop_size=16, num_threads_io=0,
                            num_threads_decode=0)
    with pytest.warns(UserWarning, match='skipping unreadable video'):
        batches = list(build_eval_loader(val, 2, 0, False, False))
    assert batches[1][1].tolist() == [3] and [len(b[0]) for b in batches] == [1, 1]  # not a neighbour, not twice
    assert val.bad_files.count() == 2


def test_sampling_is_deterministic_under_a_seed(demo_root):
    data = build_video_dataset(demo_root, crop_size=32, time_difference_prob=0.2)
    torch.manual_seed(3)
    first = [data[i][0] for i in range(3)]
    torch.manual_seed(3)
    assert all(torch.equal(a, data[i][0]) for i, a in enumerate(first))
    assert not torch.equal(first[0], data[0][0])


def test_build_errors_name_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match='no such folder') as error:
        build_video_dataset(tmp_path / 'nothing')
    assert '\n' not in str(error.value)
    (tmp_path / 'train').mkdir()
    with pytest.raises(FileNotFoundError, match=r'missing .*train\.csv'):
        build_video_dataset(tmp_path)
    with pytest.raises(ValueError, match='frame folders only'):
        build_video_dataset('demo', decoder='video')


# ---------------------------------------------------------------- demo and loader

def test_demo_layout_and_csv(demo_root, tmp_path, monkeypatch):
    for split, per_class in (('train', 2), ('val', 1)):
        rows = read_video_csv(demo_root / f'{split}.csv')
        classes = sorted(p.name for p in (demo_root / split).iterdir())
        assert len(classes) == 6 and len(rows) == 6 * per_class
        for path, label, num_frames in rows:
            frames = sorted((demo_root / split / path).iterdir())
            assert path.split('/')[0] == classes[label] and 20 <= num_frames <= 90
            assert [f.name for f in frames] == [f'{k + 1:08d}.jpg' for k in range(num_frames)]
    with Image.open(demo_root / 'val' / rows[0][0] / '00000001.jpg') as frame:
        assert frame.size == (40, 32)
    again = make_demo_videos(tmp_path / 'again', videos_per_class={'train': 2, 'val': 1}, frame_range=(20, 90),
                             frame_size=(32, 40))
    assert (again / 'train.csv').read_text() == (demo_root / 'train.csv').read_text()
    path = read_video_csv(demo_root / 'train.csv')[-1][0] + '/00000005.jpg'
    assert (again / 'train' / path).read_bytes() == (demo_root / 'train' / path).read_bytes()
    monkeypatch.setenv('DEMO_DATA_ROOT', str(tmp_path / 'demo'))
    assert default_demo_video_root() == tmp_path / 'demo_videos'
    (tmp_path / 'again').rename(tmp_path / 'demo_videos')  # prebuilt, so 'demo' does not build the full set
    assert len(build_video_dataset('demo', 'val')) == 6


def test_loader_with_two_workers(demo_root):
    data = build_video_dataset(demo_root, crop_size=32, num_threads_io=1, num_threads_decode=1)
    data[0]  # starts the decode thread pool in this process: forked workers must start their own
    loader = build_train_loader(data, batch_size=4, num_workers=2, pin_mem=True, seed=0)
    loader.sampler.set_epoch(0)
    batches = list(loader)
    assert len(batches) == 3 and loader.drop_last
    clips, labels = batches[0]
    assert clips.shape == (4, 2, 3, 8, 32, 32) and clips.dtype == torch.uint8 and labels.shape == (4,)


# ---------------------------------------------------------------- torchcodec

def test_video_decoder_without_ffmpeg_fails_in_one_line(tmp_path, monkeypatch):
    try:  # where FFmpeg loads, pretend it does not (torchcodec imports without it and sets this flag)
        from torchcodec._core import ops
        monkeypatch.setattr(ops, '_FFMPEG_AVAILABLE', False)
    except ImportError:
        pass  # no torchcodec: the same error
    (tmp_path / 'train.csv').write_text('c/v.mp4 0\n')
    (tmp_path / 'train').mkdir()
    with pytest.raises(ValueError, match='FFmpeg') as error:
        VideoClipDataset(tmp_path / 'train.csv', tmp_path / 'train', decoder='video')
    assert '\n' not in str(error.value) and 'install' in str(error.value)


@pytest.mark.skipif(not torchcodec_works(), reason='torchcodec cannot load FFmpeg shared libraries here')
def test_video_decoder_reads_mp4(tmp_path):
    from torchcodec.encoders import VideoEncoder
    frames = torch.arange(90, dtype=torch.uint8).mul(2).view(90, 1, 1, 1).expand(90, 3, 32, 48).contiguous()
    (tmp_path / 'train' / 'c').mkdir(parents=True)
    VideoEncoder(frames, frame_rate=30).to_file(str(tmp_path / 'train' / 'c' / 'v 1.mp4'))
    (tmp_path / 'train.csv').write_text('c/v 1.mp4 0\nc/missing.mp4 0\n')
    data = VideoClipDataset(tmp_path / 'train.csv', tmp_path / 'train', decoder='video', crop_size=16)
    torch.manual_seed(0)
    clips, label = data[0]
    assert clips.shape == (2, 3, 8, 16, 16) and clips.dtype == torch.uint8 and label == 0
    values = clips[0, 0, :, 8, 8].float() / 2  # ~ frame index, up to codec error
    assert 70 <= float(values[-1] - values[0]) <= 80
    with pytest.warns(UserWarning, match='skipping'):
        assert data[1][1] == 0 and data.bad_files.count() == 1
