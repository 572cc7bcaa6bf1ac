"""The video lists of the downstream data sets, read from their official split files.

- UCF101 (https://www.crcv.ucf.edu/data/UCF101.php, `ucfTrainTestlist/`): `classInd.txt` (`1 ApplyEyeMakeup`),
  `trainlist0N.txt` (`<Class>/<v_...>.avi <label>`), `testlist0N.txt` (`<Class>/<v_...>.avi`). The label is the
  classInd index - 1 of the video's class folder; trainlist's own label column is not used.
- HMDB51 (https://serre-lab.clps.brown.edu/resource/hmdb-a-large-human-motion-database/, `testTrainMulti_7030_splits/`):
  one `<class>_test_splitN.txt` per class, lines `<video>.avi <flag>` with 1 = train, 2 = test, 0 = unused.
  Labels follow the sorted split-file names, as eztorch's (so `kick_ball` comes before `kick`).
- Kinetics: `<root>/train.csv` and `val.csv` (`<class>/<video> <label> <num_frames>`, util/video/io.py);
  the test split is val.

Frame folders are `<root>/<Class>/<video stem>/00000001.jpg ...` (Kinetics: `<root>/{train,val}/<class>/...`);
with video files the `.avi` (or the CSV's) name is kept. UCF101 and HMDB51 frame counts are counted when a
video is first opened.
"""
import re
from dataclasses import dataclass
from pathlib import Path

from util.video.io import read_video_csv

DATASETS = ('kinetics', 'ucf101', 'hmdb51')
NOMINAL_FPS = {'kinetics': 30, 'ucf101': 25, 'hmdb51': 30}


@dataclass
class VideoList:
    """Videos of one split: `items` are (path relative to `root`, label, frame count or None)."""
    root: Path
    items: list
    classes: list

    def __len__(self):
        return len(self.items)


def _lines(path):
    """(line number, stripped line) of a text file, blank lines skipped (the official files end lines with CRLF)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'missing split file {path}')
    return [(n, line.strip()) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]


def read_ucf101_classes(path):
    """Class names of classInd.txt in label order (label = index - 1)."""
    indexed = {}
    for n, line in _lines(path):
        parts = line.split(None, 1)
        if len(parts) != 2 or not parts[0].isdigit():
            raise ValueError(f'{path}:{n}: expected "<index> <class>", got {line!r}')
        indexed[int(parts[0])] = parts[1]
    if sorted(indexed) != list(range(1, len(indexed) + 1)):
        raise ValueError(f'{path}: class indices must run 1..{len(indexed)}')
    return [indexed[i] for i in range(1, len(indexed) + 1)]


def read_ucf101_split(split_dir, split=1, train=True, keep_suffix=False):
    """(items, classes) of UCF101 split `split`: items are (`<Class>/<stem>`, label, None)."""
    split_dir = Path(split_dir)
    classes = read_ucf101_classes(split_dir / 'classInd.txt')
    label_of = {name: i for i, name in enumerate(classes)}
    list_path = split_dir / f'{"train" if train else "test"}list{split:02d}.txt'
    items = []
    for n, line in _lines(list_path):
        video = line.split()[0]
        name, _, file = video.partition('/')
        if name not in label_of or not file:
            raise ValueError(f'{list_path}:{n}: {video!r} is not <class>/<video> with a class of classInd.txt')
        items.append((video if keep_suffix else video.rsplit('.', 1)[0], label_of[name], None))
    return items, classes


def read_hmdb51_split(split_dir, split=1, train=True, keep_suffix=False):
    """(items, classes) of HMDB51 split `split` from the per-class `<class>_test_split<split>.txt` files."""
    split_dir = Path(split_dir)
    pattern = re.compile(rf'^(.+)_test_split{split}\.txt$')
    files = sorted(p.name for p in split_dir.glob(f'*_test_split{split}.txt'))
    if not files:
        raise FileNotFoundError(f'{split_dir}: no HMDB51 split files <class>_test_split{split}.txt')
    classes = [pattern.match(name).group(1) for name in files]
    wanted = '1' if train else '2'
    items = []
    for label, (name, file) in enumerate(zip(classes, files)):
        for n, line in _lines(split_dir / file):
            parts = line.rsplit(None, 1)
            if len(parts) != 2 or parts[1] not in ('0', '1', '2'):
                raise ValueError(f'{split_dir / file}:{n}: expected "<video>.avi <0|1|2>", got {line!r}')
            if parts[1] == wanted:
                video = parts[0] if keep_suffix else parts[0].rsplit('.', 1)[0]
                items.append((f'{name}/{video}', label, None))
    return items, classes


def read_kinetics_split(root, train=True, decoder='frame'):
    """(items, classes) of `<root>/{train,val}.csv`; classes are the sorted class folders of the split."""
    split = 'train' if train else 'val'
    items = read_video_csv(Path(root) / f'{split}.csv', with_num_frames=decoder == 'frame')
    classes = sorted({path.split('/')[0] for path, _, _ in items})
    return [(f'{split}/{path}', label, frames) for path, label, frames in items], classes


def video_list(dataset, root, split=1, train=True, decoder='frame', split_dir=None):
    """The VideoList of a split; `split_dir` holds the split files (default: `root`). Checks that every class
    folder the list names exists under `root`, so a wrong --data_path fails at once."""
    if dataset not in DATASETS:
        raise ValueError(f'--dataset {dataset!r}: expected one of {", ".join(DATASETS)}')
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f'--data_path {root}: no such folder')
    if dataset == 'kinetics':
        items, classes = read_kinetics_split(root, train, decoder)
    else:
        read = read_ucf101_split if dataset == 'ucf101' else read_hmdb51_split
        items, classes = read(split_dir or root, split, train, keep_suffix=decoder == 'video')
    if not items:
        raise ValueError(f'{dataset} split {split} lists no {"train" if train else "test"} videos')
    folders = sorted({path.rsplit('/', 1)[0] for path, _, _ in items})
    missing = [f for f in folders if not (root / f).is_dir()]
    if missing:
        raise FileNotFoundError(f'--data_path {root}: {len(missing)} class folder(s) of the {dataset} list are '
                                f'missing, e.g. {root / missing[0]}')
    return VideoList(root, items, classes)
