"""Fine-tuning on your own images: one folder of class folders split by `--val_fraction`, or CSV label files
(`--train_csv`, `--val_csv`). Both give (path, label) samples and a class list for util.data.datasets.LabeledImages.

The split depends only on the file names, the class sizes and `--seed` (a SHA-256 of seed and relative path ranks
the images of each class), never on random state or on Python's per-process string hashing: every rank, every
resumed run and every later run with the same files and seed holds out the same images.
"""
import csv
import hashlib
import math
import os
import re
from collections import defaultdict
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, has_file_allowed_extension, make_dataset


def validation_count(class_size, fraction):
    """Images of a class of `class_size` held out for validation: class_size x fraction rounded half up, at least 1
    and at most class_size - 1 (a class of one image keeps it for training)."""
    return min(class_size - 1, max(1, math.floor(class_size * fraction + 0.5)))


def _split_key(seed, path, root):
    relative = Path(os.path.relpath(path, root)).as_posix()  # the same wherever the data folder is mounted
    return hashlib.sha256(f'{seed}/{relative}'.encode()).hexdigest(), relative


def stratified_split(samples, fraction, seed, root):
    """(train, val) partition of `samples` [(path, label)], both in the order of `samples`: in each class the
    `validation_count` images with the smallest SHA-256 of (seed, path relative to root) go to validation."""
    by_class = defaultdict(list)
    for path, label in samples:
        by_class[label].append(path)
    held_out = set()
    for paths in by_class.values():
        ranked = sorted(paths, key=lambda path: _split_key(seed, path, root))
        held_out.update(ranked[:validation_count(len(ranked), fraction)])
    return ([s for s in samples if s[0] not in held_out], [s for s in samples if s[0] in held_out])


def check_every_class_has_images(samples, classes, where):
    counts = defaultdict(int)
    for _, label in samples:
        counts[label] += 1
    empty = [name for index, name in enumerate(classes) if not counts[index]]
    if empty:
        more = f' (nor {len(empty) - 1} more)' if len(empty) > 1 else ''
        raise ValueError(f'{where}: class {empty[0]!r} has no images{more}; add images or remove the class')


def class_folder_samples(root):
    """(samples, classes) of the class folders in `root`, sorted as torchvision's ImageFolder sorts them."""
    try:
        classes, class_to_idx = find_classes(str(root))
    except FileNotFoundError:
        raise FileNotFoundError(f'{root} has no class folders (one folder of images per class)') from None
    samples = make_dataset(str(root), class_to_idx, IMG_EXTENSIONS, allow_empty=True)
    check_every_class_has_images(samples, classes, str(root))
    return samples, classes


def read_label_csv(csv_path, root):
    """[(path, label text, line number)] of a `path,label` file, each path joined to `root` (an absolute path stays
    as it is). A first line whose path has no image extension (such as `path,label`) is a header."""
    entries = []
    with open(Path(csv_path).expanduser(), newline='') as f:
        for line, row in enumerate(csv.reader(f), 1):
            row = [field.strip() for field in row]
            if not any(row):
                continue
            if len(row) != 2 or not all(row):
                raise ValueError(f'{csv_path} line {line}: expected "path,label", got {",".join(row)!r}')
            if not entries and line == 1 and not has_file_allowed_extension(row[0], IMG_EXTENSIONS):
                continue
            entries.append((str(Path(root) / row[0]), row[1], line))
    if not entries:
        raise ValueError(f'{csv_path}: no "path,label" lines')
    return entries


def _is_integer(text):
    return re.fullmatch(r'-?\d+', text) is not None


def csv_classes(entries, csv_path):
    """The class list of a training CSV: `0`..`N-1` when every label is an integer (each class needs an image),
    else the sorted label names."""
    labels = [label for _, label, _ in entries]
    if not all(_is_integer(label) for label in labels):
        return sorted(set(labels))
    negative = next((e for e in entries if int(e[1]) < 0), None)
    if negative:
        raise ValueError(f'{csv_path} line {negative[2]}: label {negative[1]} is negative (integer labels are 0..N-1)')
    present = {int(label) for label in labels}
    first_missing = min(set(range(len(present) + 1)) - present)
    if first_missing < max(present):
        raise ValueError(f"{csv_path}: class '{first_missing}' has no images (labels go up to {max(present)}); "
                         f'integer labels must be 0..N-1, each with an image')
    return [str(i) for i in range(len(present))]


def csv_samples(entries, classes, csv_path):
    """[(path, class index)] of CSV entries; a label not in `classes` is an error."""
    class_to_idx = {name: index for index, name in enumerate(classes)}
    integer_labels = classes == [str(i) for i in range(len(classes))]
    samples = []
    for path, label, line in entries:
        key = str(int(label)) if integer_labels and _is_integer(label) else label  # '007' is class 7
        if key not in class_to_idx:
            shown = f'0..{len(classes) - 1}' if integer_labels else \
                ', '.join(classes[:10]) + (', ...' if len(classes) > 10 else '')
            raise ValueError(f'{csv_path} line {line}: label {label!r} is not in the class list of the training CSV '
                             f'({shown})')
        samples.append((path, class_to_idx[key]))
    return samples


def describe_classes(classes, limit=20):
    """`0=cat, 1=dog, ...` for the log."""
    shown = ', '.join(f'{i}={name}' for i, name in enumerate(classes[:limit]))
    return shown + (f', ... ({len(classes)} in all)' if len(classes) > limit else '')
