"""Downstream video evaluation pieces: official split files, test views, view averaging, retrieval recall@k and
the trunk checkpoints of util/video/checkpoint.py (hand computations and hand-written files)."""
import math
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from engine_finetune import evaluate
from models.r3d import r3d18_trunk
from util.data.bad_files import collate_readable
from util.data.samplers import UnpaddedDistributedSampler, build_eval_loader
from util.video.checkpoint import load_r3d_trunk, r3d_trunk_state_dict
import util.video.eval
from util.video.eval import (ViewAveragedClassifier, broadcast_buffers, extract_features, normalize_clips,
                             retrieval_recall)
from util.video.splits import VideoList, read_hmdb51_split, read_kinetics_split, read_ucf101_split, video_list
from util.video import views
from util.video.views import MultiViewDataset, TrainClipDataset, crop_offsets, eval_clip_starts, short_side_size

pytestmark = pytest.mark.usefixtures('one_thread')


# ---------------------------------------------------------------- split files

def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_ucf101_split_files(tmp_path):
    write(tmp_path / 'classInd.txt', '1 ApplyEyeMakeup\r\n2 Basketball\r\n3 YoYo\r\n')
    # trainlist's label column is not used (labels come from the class folder): a wrong one changes nothing
    write(tmp_path / 'trainlist01.txt',
          'YoYo/v_YoYo_g08_c01.avi 3\r\nApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 2\r\n')
    write(tmp_path / 'testlist01.txt', 'Basketball/v_Basketball_g01_c01.avi\r\n\r\n')
    write(tmp_path / 'testlist02.txt', 'YoYo/v_YoYo_g02_c01.avi\n')
    items, classes = read_ucf101_split(tmp_path, 1, train=True)
    assert classes == ['ApplyEyeMakeup', 'Basketball', 'YoYo']
    assert items == [('YoYo/v_YoYo_g08_c01', 2, None), ('ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01', 0, None)]
    assert read_ucf101_split(tmp_path, 1, train=False)[0] == [('Basketball/v_Basketball_g01_c01', 1, None)]
    assert read_ucf101_split(tmp_path, 2, train=False, keep_suffix=True)[0] == [('YoYo/v_YoYo_g02_c01.avi', 2, None)]
    write(tmp_path / 'testlist03.txt', 'Surfing/v_Surfing_g01_c01.avi\n')
    with pytest.raises(ValueError, match=r'testlist03.txt:1: .*Surfing'):
        read_ucf101_split(tmp_path, 3, train=False)
    with pytest.raises(FileNotFoundError, match='trainlist02.txt'):
        read_ucf101_split(tmp_path, 2, train=True)


def test_hmdb51_split_files_label_order_and_flags(tmp_path):
    # official lines end with a space; labels follow the sorted file names: kick_ball before kick
    write(tmp_path / 'kick_test_split1.txt', 'k_a.avi 1 \nk_b.avi 2 \nk_c.avi 0 \n')
    write(tmp_path / 'kick_ball_test_split1.txt', 'kb_a.avi 2 \nkb_b.avi 1 \n')
    write(tmp_path / 'brush_hair_test_split1.txt', 'bh_a.avi 1 \n')
    write(tmp_path / 'brush_hair_test_split2.txt', 'bh_a.avi 2 \n')
    train, classes = read_hmdb51_split(tmp_path, 1, train=True)
    assert classes == ['brush_hair', 'kick_ball', 'kick']
    assert train == [('brush_hair/bh_a', 0, None), ('kick_ball/kb_b', 1, None), ('kick/k_a', 2, None)]
    test, _ = read_hmdb51_split(tmp_path, 1, train=False)
    assert test == [('kick_ball/kb_a', 1, None), ('kick/k_b', 2, None)]
    assert read_hmdb51_split(tmp_path, 2, train=False) == ([('brush_hair/bh_a', 0, None)], ['brush_hair'])
    write(tmp_path / 'kick_test_split3.txt', 'k_a.avi 7\n')
    with pytest.raises(ValueError, match=r'kick_test_split3.txt:1'):
        read_hmdb51_split(tmp_path, 3)


def test_kinetics_csv_and_class_folder_check(tmp_path):
    write(tmp_path / 'train.csv', 'b/v1 1 40\na/v0 0 50\n')
    items, classes = read_kinetics_split(tmp_path, train=True)
    assert items == [('train/b/v1', 1, 40), ('train/a/v0', 0, 50)] and classes == ['a', 'b']
    with pytest.raises(FileNotFoundError, match='2 class folder'):
        video_list('kinetics', tmp_path, train=True)
    for name in ('a', 'b'):
        (tmp_path / 'train' / name).mkdir(parents=True)
    assert len(video_list('kinetics', tmp_path, train=True)) == 2


# ---------------------------------------------------------------- test views

def test_view_geometry_by_hand():
    assert short_side_size(240, 320, 256) == (256, 341)  # UCF101 / HMDB51 frames
    assert short_side_size(320, 240, 256) == (341, 256)  # portrait
    assert crop_offsets(341, 256, 3) == [0, 43, 85] and crop_offsets(341, 256, 1) == [43]
    assert eval_clip_starts(Fraction(5), Fraction(2.56), 10) == [k * (5 - Fraction(2.56)) / 9 for k in range(10)]
    assert eval_clip_starts(Fraction(2), 2.56, 10) == [0] * 10  # short video: ten identical clips


class CodedVideo:
    """Frames [3, 24, 40] whose channels hold the frame index, the column and the row: exact values, no JPEG."""

    def __init__(self, num_frames):
        self.num_frames = num_frames

    def load(self, indices):
        frames = torch.zeros(len(indices), 3, 24, 40, dtype=torch.uint8)
        frames[:, 0] = torch.tensor(indices, dtype=torch.uint8)[:, None, None]
        frames[:, 1] = torch.arange(40, dtype=torch.uint8)
        frames[:, 2] = torch.arange(24, dtype=torch.uint8)[:, None]
        return frames


def test_training_clips_start_anywhere_a_whole_clip_fits(monkeypatch):
    """A 10 s video (250 frames at 25 fps), 1 s clips: the start is uniform over [0, 9] s, i.e. first frames 0..225."""
    videos = VideoList(root=Path('unused'), items=[('a/v', 0, 250)], classes=['a'])
    dataset = TrainClipDataset(videos, crop_size=24, short_side=(24, 24), fps=25, num_frames=4, clip_duration=1.0,
                               num_threads_io=0, num_threads_decode=0)
    monkeypatch.setattr(dataset, 'open', lambda index: CodedVideo(250))
    torch.manual_seed(0)
    firsts = torch.tensor([int(dataset[0][0][0, 0, 0, 0]) for _ in range(300)])
    assert firsts.min() <= 10 and 215 <= firsts.max() <= 225
    seconds = torch.bincount(torch.div(firsts, 25, rounding_mode='floor').clamp(max=8), minlength=9)
    assert seconds.min() >= 15, seconds  # 33 expected in each second of the 9


def test_training_clips_are_scaled_over_the_whole_short_side_range(monkeypatch):
    videos = VideoList(root=Path('unused'), items=[('a/v', 0, 50)], classes=['a'])
    dataset = TrainClipDataset(videos, crop_size=24, short_side=(24, 32), fps=25, num_frames=2, clip_duration=0.2,
                               num_threads_io=0, num_threads_decode=0)
    monkeypatch.setattr(dataset, 'open', lambda index: CodedVideo(50))
    shorts, resize = [], views.short_side_size
    monkeypatch.setattr(views, 'short_side_size', lambda h, w, short: shorts.append(short) or resize(h, w, short))
    torch.manual_seed(0)
    for _ in range(100):
        assert dataset[0][0].shape == (3, 2, 24, 24)
    assert sorted(set(shorts)) == list(range(24, 33))


def test_an_unreadable_training_video_is_counted_and_replaced(monkeypatch):
    videos = VideoList(root=Path('root'), items=[('a/broken', 0, 50), ('b/fine', 1, 50)], classes=['a', 'b'])
    dataset = TrainClipDataset(videos, crop_size=24, short_side=(24, 24), fps=25, num_frames=2, clip_duration=0.2,
                               num_threads_io=0, num_threads_decode=0)

    def open_video(index):
        if index == 0:
            raise OSError('moov atom not found')
        return CodedVideo(50)
    monkeypatch.setattr(dataset, 'open', open_video)
    with pytest.warns(UserWarning, match=r'skipping unreadable video root/a/broken \(OSError: moov atom not found\)'):
        clip, label = dataset[0]
    assert label == 1 and clip.shape == (3, 2, 24, 24) and dataset.bad_files.count() == 1


def test_a_crop_count_other_than_one_or_three_is_refused():
    with pytest.raises(ValueError, match=r'^--num_crops 2: expected 1 \(centre\) or 3 \(start, centre, end\)$'):
        MultiViewDataset(VideoList(root=Path('root'), items=[], classes=[]), num_crops=2)


def test_an_unreadable_evaluation_video_is_left_out_and_counted(monkeypatch):
    videos = VideoList(root=Path('root'), items=[('a/broken', 0, 50)], classes=['a'])
    dataset = MultiViewDataset(videos, crop_size=24, num_clips=1, num_crops=1, fps=25, num_frames=2,
                               clip_duration=0.2, num_threads_io=0, num_threads_decode=0)

    def broken(index):
        raise RuntimeError('could not open input')
    monkeypatch.setattr(dataset, 'open', broken)
    with pytest.warns(UserWarning, match=r'skipping unreadable video root/a/broken \(RuntimeError: could not open'):
        assert dataset[0] is None
    assert dataset[0] is None and dataset.bad_files.count() == 1  # not read again


def test_frame_folders_are_read_on_the_datasets_thread_pool(tmp_path):
    from torchvision.io import encode_jpeg
    colours = torch.tensor([[200, 0, 0], [0, 200, 0], [0, 0, 200]], dtype=torch.uint8)
    (tmp_path / 'a' / 'v').mkdir(parents=True)
    for i, colour in enumerate(colours):
        encode = encode_jpeg(colour[:, None, None].expand(3, 16, 16).contiguous(), quality=100)
        (tmp_path / 'a' / 'v' / f'{i + 1:08d}.jpg').write_bytes(encode.numpy().tobytes())
    videos = VideoList(root=tmp_path, items=[('a/v', 0, None)], classes=['a'])  # UCF101 lists give no frame count
    dataset = MultiViewDataset(videos, crop_size=16, num_clips=1, num_crops=1, fps=3, num_frames=3,
                               clip_duration=1.0, num_threads_io=2, num_threads_decode=2)
    video = dataset.open(0)
    assert video.num_frames == 3 and video.pool is dataset._thread_pool() and video.decode_threads == 2
    frames = video.load([2, 0, 1])
    assert (frames.float().mean((2, 3)) - colours[[2, 0, 1]].float()).abs().max() < 3


def test_thirty_views_are_clip_major_at_the_protocol_times_and_crops(monkeypatch):
    videos = VideoList(root=Path('unused'), items=[('a/v', 4, 100)], classes=['a'])
    dataset = MultiViewDataset(videos, crop_size=24, num_clips=10, num_crops=3, fps=25, num_frames=8,
                               clip_duration=2.56, num_threads_io=0, num_threads_decode=0)
    monkeypatch.setattr(dataset, 'open', lambda index: CodedVideo(100))
    views, label = dataset[0]
    assert views.shape == (30, 3, 8, 24, 24) and label == 4
    # 100 frames at 25 fps = 4 s; clip k starts at k (4 - d) / 9 s and spans frames ceil(25 s) .. ceil(25 (s + d)) - 1,
    # d the float 2.56 taken exactly (a hair above 2.56, as pytorchvideo's Fraction(clip_duration)): 65 frames
    d = Fraction(2.56)
    for k in range(10):
        start = (4 - d) * k / 9
        first, end = math.ceil(25 * start), min(math.ceil(25 * (start + d)), 100)
        expected = [first + math.floor(i * (end - first - 1) / 7) for i in range(8)]
        for c, left in enumerate((0, 8, 16)):
            view = views[3 * k + c]
            assert view[0, :, 0, 0].tolist() == expected, (k, c)
            assert view[1, 0, 0].tolist() == list(range(left, left + 24))  # columns of crop c
            assert view[2, 0, :, 0].tolist() == list(range(24))  # full height


# ---------------------------------------------------------------- view averaging

class LookupModel(nn.Module):
    """Logits of a view from a table, the view's id read from its (normalised) first pixel."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, x):
        ids = (x[:, 0, 0, 0, 0] * 0.225 + 0.45) * 255
        return self.table[ids.round().long()]


def test_thirty_view_softmax_average_equals_hand_computation():
    num_views, classes = 30, 3
    g = torch.Generator().manual_seed(0)
    table = torch.randn(2 * num_views, classes, generator=g, dtype=torch.float64) * 3
    # video 0: 29 views prefer class 0, one has a huge logit for class 1: mean logits pick 1, mean softmax 0
    table[:29] = torch.tensor([2.0, 0.0, 0.0])
    table[29] = torch.tensor([0.0, 100.0, 0.0])
    ids = torch.arange(2 * num_views, dtype=torch.uint8)
    videos = ids.view(2, num_views, 1, 1, 1, 1).expand(2, num_views, 3, 1, 2, 2)  # view i's pixels all hold i
    model = ViewAveragedClassifier(LookupModel(table.float()))
    hand = []
    for v in range(2):
        rows = table[v * 30:(v + 1) * 30].tolist()
        probs = [[math.exp(z) / sum(math.exp(y) for y in row) for z in row] for row in rows]
        hand.append([sum(p[c] for p in probs) / num_views for c in range(classes)])
    torch.testing.assert_close(model(videos).exp().double(), torch.tensor(hand, dtype=torch.float64), rtol=1e-5, atol=0)
    assert table[:30].mean(0).argmax() == 1 and max(range(3), key=lambda c: hand[0][c]) == 0
    labels = [0, max(range(3), key=lambda c: hand[1][c])]
    dataset = [(videos[i], labels[i]) for i in range(2)]
    stats = evaluate(build_eval_loader(dataset, 2, 0, False, False), model, 'cpu')
    assert (stats['acc1'], stats['count']) == (100.0, 2)
    assert stats['loss'] == pytest.approx(-sum(math.log(hand[i][labels[i]]) for i in range(2)) / 2, rel=1e-5)


def test_normalize_clips():
    x = torch.tensor([0, 255], dtype=torch.uint8)
    torch.testing.assert_close(normalize_clips(x), torch.tensor([-0.45 / 0.225, 0.55 / 0.225]))
    with torch.autocast('cpu', dtype=torch.bfloat16):  # the features' dtype is the model's business, not this
        torch.testing.assert_close(normalize_clips(x * 0 + 101), torch.tensor([101 / 255 - 0.45] * 2) / 0.225)


# ---------------------------------------------------------------- retrieval

def test_retrieval_recall_on_a_hand_built_bank_with_centring_and_ties():
    # each set is centred on its own mean: a common offset of 100 in the bank and of -5 in the queries
    bank = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]) + 100
    queries = torch.tensor([[3.0, 0.0], [-1.0, 0.0], [1.0, 2.0], [1.0, -2.0]]) - 5
    # centred and normalised: bank (1, 0), (1, 0), (-1, 0), (-0.2, 1) / n, (-0.2, -1) / n (bank mean (0.2, 0)),
    # queries (1, 0), (-1, 0), (0, 1), (0, -1) (query mean (1, 0)). Nearest bank items in order, ties in bank order:
    # query 0: 0 = 1, 3 = 4, 2 / query 1: 2, 3 = 4, 0 = 1 / query 2: 3, 0 = 1 = 2, 4 / query 3: 4, 0 = 1 = 2, 3
    bank_labels, query_labels = torch.tensor([0, 1, 2, 3, 4]), torch.tensor([1, 2, 3, 0])
    # found at rank 2 (bank 1 after its tie bank 0), 1, 1, 2 (bank 0 after bank 4)
    recall = retrieval_recall(queries, query_labels, bank, bank_labels, ks=(1, 2, 3, 25))
    assert recall == {1: 50.0, 2: 100.0, 3: 100.0, 25: 100.0}  # k beyond the bank: the whole bank
    # the tie the other way round (labels of bank 0 and 1 swapped): query 0 is found at rank 1
    swapped = torch.tensor([1, 0, 2, 3, 4])
    assert retrieval_recall(queries, query_labels, bank, swapped, ks=(1, 2))[1] == 75.0
    # labels 0 and 2 swapped: query 3 (label 0) finds bank 2 last of its three-way tie (rank 4), query 1 (label 2)
    # finds bank 0 after bank 2, 3 and 4 (rank 4); queries 0 and 2 as before (ranks 2 and 1)
    moved = torch.tensor([2, 1, 0, 3, 4])
    assert retrieval_recall(queries, query_labels, bank, moved, ks=(3, 4)) == {3: 50.0, 4: 100.0}


def test_retrieval_reports_the_protocols_k_and_breaks_long_ties_in_bank_order():
    bank, labels = torch.ones(300, 4), torch.tensor([7] + [1] * 299)  # centred: all zero, every similarity ties
    recall = retrieval_recall(torch.randn(3, 4), torch.tensor([7, 7, 7]), bank, labels)
    assert list(recall) == [1, 5, 10, 15, 20, 25] and recall[1] == 100.0  # SCE's R@k; bank item 0 comes first


def test_a_sharded_evaluation_takes_rank_zeros_buffers(one_process_group, monkeypatch):
    sent = []
    broadcast = torch.distributed.broadcast
    monkeypatch.setattr(torch.distributed, 'broadcast', lambda t, src: (sent.append((t.shape, src)), broadcast(t, src)))
    monkeypatch.setattr(util.video.eval, 'get_world_size', lambda: 2)
    broadcast_buffers(nn.BatchNorm1d(3))
    assert sent == [((3,), 0), ((3,), 0), ((), 0)]  # running mean, running var, batches tracked


# ---------------------------------------------------------------- trunk checkpoints

@pytest.fixture(scope='module')
def trunk_weights():
    """A trunk whose BN statistics are not the defaults, and another one: the momentum trunk."""
    g = torch.Generator().manual_seed(3)
    online, momentum = r3d18_trunk(), r3d18_trunk()
    for model in (online, momentum):
        for name, buffer in model.named_buffers():
            if buffer.is_floating_point():
                buffer.copy_(torch.rand(buffer.shape, generator=g) + 0.5)
    return online.model.state_dict(), momentum.model.state_dict()


def test_eztorch_checkpoint_loads_the_online_trunk_strictly(trunk_weights, tmp_path):
    online, momentum = trunk_weights
    state = {**{f'trunk.model.{k}': v for k, v in online.items()},
             **{f'momentum_trunk.model.{k}': v for k, v in momentum.items()},
             'projector.layers.0.weight': torch.zeros(4, 512), 'queue': torch.zeros(256, 8)}
    path = tmp_path / 'epoch=199.ckpt'
    torch.save({'state_dict': state, 'epoch': 199, 'global_step': 31000}, path)
    trunk = load_r3d_trunk(r3d18_trunk(), path)
    for key, value in online.items():
        assert torch.equal(trunk.model.state_dict()[key], value), key
    assert not torch.equal(online['blocks.0.norm.running_mean'], momentum['blocks.0.norm.running_mean'])
    # ours: {'model': SCE state dict}; trunk-only files, stripped or with the r3d18_trunk prefix
    for source in ({'model': state}, online, {f'model.{k}': v for k, v in online.items()}):
        got = r3d_trunk_state_dict(source)
        assert list(got) == list(online) and all(torch.equal(got[k], online[k]) for k in online)


@pytest.mark.parametrize('change, message', ids=['missing', 'unexpected', 'shape', 'no_trunk'], argvalues=[
    (lambda s: s.pop('trunk.model.blocks.4.res_blocks.1.branch2.norm_b.running_var'), '1 missing'),
    (lambda s: s.update({'trunk.model.blocks.5.conv.weight': torch.zeros(1)}), '1 unexpected'),
    (lambda s: s.update({'trunk.model.blocks.0.conv.weight': torch.zeros(64, 3, 3, 7, 7)}), r'has shape \(64, 3, 3'),
    (lambda s: [s.pop(k) for k in list(s)] and s.update({'backbone.conv1.weight': torch.zeros(1)}), 'no R3D trunk'),
])
def test_mismatching_checkpoint_is_one_clear_line(trunk_weights, change, message):
    state = {f'trunk.model.{k}': v for k, v in trunk_weights[0].items()}
    change(state)
    with pytest.raises(ValueError, match=message) as error:
        r3d_trunk_state_dict({'state_dict': state})
    assert '\n' not in str(error.value)


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(FileNotFoundError, match='no such checkpoint'):
        r3d_trunk_state_dict(tmp_path / 'nope.pth')


# ---------------------------------------------------------------- sharded feature extraction

class MeanTrunk(nn.Module):
    """A stand-in trunk: the mean of each channel, 3 features."""
    num_features = 3

    def forward(self, x):
        return x.mean((2, 3, 4))


class BatchNormTrunk(MeanTrunk):
    """MeanTrunk behind a BatchNorm whose running statistics are set: in eval mode x -> (x - 0.3) / 2."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm3d(3, eps=0)
        with torch.no_grad():
            self.bn.running_mean.fill_(0.3)
            self.bn.running_var.fill_(4.0)

    def forward(self, x):
        return super().forward(self.bn(x))


def coded_videos(monkeypatch, n):
    """n videos of coded frames (40 + 9 i frames), 9 views each, with their indices."""
    videos = VideoList(root=Path('unused'), items=[(f'a/v{i}', i % 2, 40 + 9 * i) for i in range(n)], classes=['a'])
    dataset = MultiViewDataset(videos, crop_size=24, num_clips=3, num_crops=3, fps=25, num_frames=4,
                               clip_duration=1.0, num_threads_io=0, num_threads_decode=0, return_index=True)
    monkeypatch.setattr(dataset, 'open', lambda index: CodedVideo(40 + 9 * index))
    return dataset


def view_mean_features(dataset, i):
    """Video i's MeanTrunk feature by hand: the view-mean of its normalised frames' channel means."""
    views = (dataset[i][0].double() / 255 - 0.45) / 0.225
    return views.mean((0, 2, 3, 4))


def test_sharded_extraction_gives_every_video_once(monkeypatch):
    dataset = coded_videos(monkeypatch, 5)
    whole, whole_counts = extract_features(build_eval_loader(dataset, 2, 0, False, False), MeanTrunk(), 'cpu', 5)
    assert whole_counts.tolist() == [1] * 5
    for i in range(5):
        assert whole[i].tolist() == pytest.approx(view_mean_features(dataset, i).tolist(), rel=1e-6)
    shards = [DataLoader(dataset, batch_size=2, sampler=UnpaddedDistributedSampler(dataset, 2, rank),
                         collate_fn=collate_readable) for rank in (0, 1)]
    parts = [extract_features(loader, MeanTrunk(), 'cpu', 5) for loader in shards]  # what each rank sums
    assert (parts[0][1] + parts[1][1]).tolist() == [1] * 5  # 3 videos on rank 0, 2 on rank 1, none twice
    torch.testing.assert_close(parts[0][0] + parts[1][0], whole)


def test_extraction_runs_a_training_trunk_in_eval_mode_and_leaves_its_statistics(monkeypatch):
    dataset = coded_videos(monkeypatch, 3)
    trunk = BatchNormTrunk().train()  # as the trunk of a run that trains
    before = {k: v.clone() for k, v in trunk.state_dict().items()}
    features, _ = extract_features(build_eval_loader(dataset, 2, 0, False, False), trunk, 'cpu', 3)
    assert trunk.training
    assert all(torch.equal(v, before[k]) for k, v in trunk.state_dict().items())
    for i in range(3):  # the running statistics, not the batch's: (feature - 0.3) / 2
        expected = (view_mean_features(dataset, i) - 0.3) / 2
        assert features[i].tolist() == pytest.approx(expected.tolist(), rel=1e-5)
