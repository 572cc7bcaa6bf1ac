"""Image data: where the images are, how they are read, how they are augmented (pretraining, fine-tuning,
evaluation).

`--data_path` may be `demo` (generated photographs, see util/data/demo_data.py), `fashion-mnist` or a folder holding
its four idx files (util/data/fashion_mnist.py), an ImageNet-style
folder with `train/` inside (the official LocalMIM code appends `train`), a folder of class
folders, or a flat folder of images (labels are not needed to pretrain). Images that cannot be
decoded are skipped with one warning each and counted, so one bad file never stops a long run.
Fine-tuning reads `train/` and `val/` class folders, or your own data as util/data/user_data.py reads it.
"""
import warnings
from pathlib import Path

from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, auto_augment
from torchvision import transforms
from torchvision.datasets import VisionDataset
from torchvision.datasets.folder import (IMG_EXTENSIONS, find_classes, has_file_allowed_extension,
                                         make_dataset)
from torchvision.transforms import InterpolationMode

from util.cli import check_flags
from util.data.bad_files import BadFiles
from util.data.demo_data import demo_imagefolder
from util.data.fashion_mnist import NAME as FASHION_MNIST, fashion_mnist_imagefolder, holds_idx_files
from util.data.fast_image import FAST_DATA_MODES, EncodedCropReader, RandomResizedCropReader
from util.data.user_data import (check_every_class_has_images, class_folder_samples, csv_classes, csv_samples,
                                 describe_classes, read_label_csv, stratified_split)

ACCEPTED_LAYOUTS = ("'demo', 'fashion-mnist', a folder with {split}/ inside, a folder of class folders, "
                    "or a flat folder of images")


def resolve_image_root(data_path, split='train') -> Path:
    """Map a `--data_path` value to the folder whose images form the `split` data set."""
    path = named_data_folder(data_path)
    if not path.is_dir():
        raise FileNotFoundError(f'--data_path {path}: no such folder (accepted: '
                                f'{ACCEPTED_LAYOUTS.format(split=split)})')
    return path / split if (path / split).is_dir() else path


def named_data_folder(data_path) -> Path:
    """The folder a `--data_path` names: the demo or Fashion-MNIST class folders (built once), else the path."""
    if str(data_path) == 'demo':
        return demo_imagefolder()
    if str(data_path) == FASHION_MNIST:
        return fashion_mnist_imagefolder()
    path = Path(data_path).expanduser()
    return fashion_mnist_imagefolder(path) if path.is_dir() and holds_idx_files(path) else path


def _is_image_file(path: Path) -> bool:
    return path.is_file() and has_file_allowed_extension(path.name, IMG_EXTENSIONS)


def read_rgb(path):
    with Image.open(path) as image:
        return image.convert('RGB')


class LabeledImages(VisionDataset):
    """(path, label) `samples` with their `classes`. `loader` reads a path (default: the RGB PIL image;
    util/data/fast_image.py has readers that crop while decoding).

    An image that cannot be decoded (or is missing) is flagged in `bad_files` (util/data/bad_files.py) and then either
    replaced by the next decodable one (training: the batch keeps its size) or, with `drop_unreadable`, returned as
    None (evaluation, with util.data.bad_files.collate_readable: nothing is counted twice).
    """

    def __init__(self, root, samples, classes, transform=None, drop_unreadable=False, loader=None):
        super().__init__(str(root), transform=transform)
        self.loader = loader or read_rgb
        self.samples = samples
        self.targets = [target for _, target in samples]
        self.classes, self.class_to_idx = classes, {name: index for index, name in enumerate(classes)}
        self.bad_files = BadFiles([path for path, _ in samples], 'image')
        self.drop_unreadable = drop_unreadable

    def __len__(self):
        return len(self.samples)

    def _decode(self, index):
        """`loader(path)` of sample `index` (default: the RGB image), or None (flagged, warned once) if it cannot be
        decoded."""
        if index in self.bad_files:
            return None
        try:
            return self.loader(self.samples[index][0])
        except Exception as error:  # PIL raises many types on bad data; never crash a run
            self.bad_files.add(index, error)
            return None

    def __getitem__(self, index):
        if self.drop_unreadable:
            image = self._decode(index)
            return None if image is None else ((self.transform(image) if self.transform else image),
                                               self.samples[index][1])
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            image = self._decode(candidate)
            if image is not None:
                target = self.samples[candidate][1]
                return (self.transform(image) if self.transform else image), target
        raise RuntimeError(f'none of the {len(self)} images in {self.root} can be decoded')


class ImageFolderOrFlat(LabeledImages):
    """torchvision ImageFolder over class folders, or one class (label 0) over a flat folder."""

    def __init__(self, root, transform=None, drop_unreadable=False, loader=None):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f'image folder {root} does not exist')
        loose_images = sorted(str(p) for p in root.iterdir() if _is_image_file(p))
        samples, classes = [], []
        try:
            classes, class_to_idx = find_classes(str(root))
            samples = make_dataset(str(root), class_to_idx, IMG_EXTENSIONS, allow_empty=True)
        except FileNotFoundError:  # no subfolders at all
            pass
        if samples and loose_images:
            warnings.warn(f'{root}: using class folders, ignoring {len(loose_images)} image files '
                          f'directly inside it (e.g. {loose_images[0]})')
        elif not samples:
            samples, classes = [(path, 0) for path in loose_images], ['']
        if not samples:
            raise FileNotFoundError(f'no images found in {root} (expected class folders or image files '
                                    f'with extensions {", ".join(IMG_EXTENSIONS)})')
        super().__init__(root, samples, classes, transform, drop_unreadable, loader)


def build_pretrain_transform(input_size):
    """LocalMIM pretraining augmentation: random resized crop, flip, ImageNet normalisation."""
    return transforms.Compose([
        transforms.RandomResizedCrop(input_size, scale=(0.2, 1.0),
                                     interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])


def build_pretrain_dataset(data_path, input_size, fast_data='none'):
    """The pretraining data set: the `train` split of `data_path`, with the LocalMIM transform. With `fast_data`
    (util/data/fast_image.py) the same augmentation yields uint8 crops, or with 'device' still-encoded JPEGs, which
    `fast_image.DeviceInput` turns into normalised images on the device."""
    root = resolve_image_root(data_path, 'train')
    if fast_data == 'none':
        return ImageFolderOrFlat(root, transform=build_pretrain_transform(input_size))
    if fast_data == 'device':
        return ImageFolderOrFlat(root, loader=EncodedCropReader())
    if fast_data in ('cpu', 'cpu_draft'):
        return ImageFolderOrFlat(root, loader=RandomResizedCropReader(input_size, draft=fast_data == 'cpu_draft'))
    raise ValueError(f'--fast_data {fast_data}: one of {", ".join(FAST_DATA_MODES)}')


def _posterize_zero_bits_ok(img, bits_to_keep, **kwargs):
    """timm's RandAugment asks for 0 bits at the top magnitude (m9 + noise reaches 10); Pillow >= 12
    refuses 0 (older Pillow returned a black image). Keep the old meaning instead of crashing mid-run."""
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return _timm_posterize(img, bits_to_keep, **kwargs)


_timm_posterize = auto_augment.posterize
auto_augment.NAME_TO_OP.update({name: _posterize_zero_bits_ok for name in auto_augment.NAME_TO_OP
                                if name.startswith('Posterize')})


EVAL_RESIZE_RULES = ('mae', 'convnext')


def build_eval_transform(input_size, crop_pct=None, rule='mae'):
    """Evaluation: bicubic resize to int(input_size / crop_pct) on the short side, centre crop, normalisation.

    rule 'mae' (MAE / LocalMIM fine-tuning): crop_pct defaults to 224/256 up to 224 px and to 1.0 above.
    rule 'convnext' (ConvNeXt / SLaK / SparK, https://github.com/VITA-Group/SLaK/blob/main/datasets.py): crop_pct
    defaults to 224/256, and from 384 px on the image is resized to exactly input_size x input_size (an
    aspect ratio other than 1 is warped, nothing is cropped).
    """
    if rule not in EVAL_RESIZE_RULES:
        raise ValueError(f'unknown eval resize rule {rule!r} (one of {", ".join(EVAL_RESIZE_RULES)})')
    if crop_pct is not None and not 0 < crop_pct <= 1:
        raise ValueError(f'--crop_pct must be in (0, 1], got {crop_pct}')
    bicubic = InterpolationMode.BICUBIC
    if rule == 'convnext' and input_size >= 384:
        resize = [transforms.Resize((input_size, input_size), interpolation=bicubic)]
    else:
        if crop_pct is None:
            crop_pct = 224 / 256 if rule == 'convnext' or input_size <= 224 else 1.0
        resize = [transforms.Resize(int(input_size / crop_pct), interpolation=bicubic),
                  transforms.CenterCrop(input_size)]
    return transforms.Compose([*resize, transforms.ToTensor(),
                               transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])


def build_finetune_transform(is_train, args, eval_rule=None):
    """Training: timm's create_transform (bicubic random resized crop, flip, then --aa, --color_jitter, random
    erasing --reprob), where --aa may also be `ta_wide` (torchvision's TrivialAugmentWide in the AutoAugment slot,
    as SparK's fine-tuning uses below 384 px). With --aa none, --reprob 0 and no --color_jitter that is crop + flip
    only (MAE's linear-probe transform). Evaluation: `build_eval_transform` with --crop_pct and `eval_rule` (default:
    --eval_resize, else 'mae')."""
    if not is_train:
        rule = eval_rule or getattr(args, 'eval_resize', 'mae')
        return build_eval_transform(args.input_size, getattr(args, 'crop_pct', None), rule)
    from timm.data import create_transform
    aa = None if args.aa in (None, '', 'none') else args.aa
    transform = create_transform(args.input_size, is_training=True, color_jitter=args.color_jitter,
                                 auto_augment=None if aa == 'ta_wide' else aa, interpolation='bicubic',
                                 re_prob=args.reprob, re_mode=args.remode, re_count=args.recount,
                                 mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
    if aa == 'ta_wide':  # where timm puts its AutoAugment: right after the crop and the flip
        transform.transforms.insert(2, transforms.TrivialAugmentWide(interpolation=InterpolationMode.BICUBIC))
    return transform


def add_finetune_data_args(parser, default_data_path):
    """The data flags of the fine-tuning scripts (run_finetune.py, main_slak.py)."""
    parser.add_argument('--data_path', default=default_data_path, type=str,
                        help="train/ and val/ class folders inside, one folder of class folders (with --val_fraction), "
                             "the folder the --train_csv paths are relative to, or 'demo'")
    parser.add_argument('--val_fraction', default=None, type=float, metavar='F',
                        help='hold out this fraction of each class of --data_path (or of --train_csv) for validation: '
                             'the same split on every process and resume, chosen by --seed')
    parser.add_argument('--train_csv', default=None, metavar='FILE',
                        help='training images as "path,label" lines (paths relative to --data_path, labels integers '
                             '0..N-1 or class names; an optional header line)')
    parser.add_argument('--val_csv', default=None, metavar='FILE', help='validation images, as --train_csv')


def check_finetune_data_args(args):
    """The data flags fit together and the CSV files exist (before anything is written)."""
    check_flags(args, {'--val_fraction': '(0, 1)'})
    if args.val_csv and not args.train_csv:
        raise ValueError('--val_csv needs --train_csv (the training labels define the class list)')
    if args.val_csv and args.val_fraction is not None:
        raise ValueError('--val_fraction and --val_csv both give a validation set: use one of them')
    if args.train_csv and not args.val_csv and args.val_fraction is None:
        raise ValueError('--train_csv needs --val_csv FILE or --val_fraction F (a validation set)')
    for flag, path in (('--train_csv', args.train_csv), ('--val_csv', args.val_csv)):
        if path and not Path(path).expanduser().is_file():
            raise FileNotFoundError(f'{flag} {path}: no such file')


def check_resumed_split(saved_args, args):
    """A resumed run selects the training and validation images its checkpoint was trained with (another split
    would move validation images into training)."""
    names = ('val_fraction', 'train_csv', 'val_csv') + (('seed',) if args.val_fraction is not None else ())
    for name in names:
        if name in saved_args and saved_args[name] != getattr(args, name):
            raise ValueError(f'the checkpoint in {args.output_dir or "--resume"} was trained with --{name} '
                             f'{saved_args[name]}, not {getattr(args, name)}: resume with the same data flags, or '
                             f'start a new --output_dir')


def _data_folder(data_path):
    folder = named_data_folder(data_path)
    if not folder.is_dir():
        raise FileNotFoundError(f'--data_path {data_path}: no such folder')
    return folder


def finetune_samples(is_train, args):
    """(root, samples, classes) of the training or validation set that --data_path, --val_fraction, --train_csv and
    --val_csv select, or None for `train/` and `val/` class folders."""
    if args.train_csv:
        root = _data_folder(args.data_path)
        entries = read_label_csv(args.train_csv, root)
        classes = csv_classes(entries, args.train_csv)
        kind = 'integer labels' if classes == [str(i) for i in range(len(classes))] else 'class names, sorted'
        print(f'{args.train_csv}: {len(classes)} classes ({kind}): {describe_classes(classes)}')
        csv_path = args.train_csv if is_train or not args.val_csv else args.val_csv
        samples = csv_samples(entries if csv_path == args.train_csv else read_label_csv(csv_path, root), classes,
                              csv_path)
    elif args.val_fraction is not None:
        root = resolve_image_root(args.data_path, 'train')
        samples, classes = class_folder_samples(root)
    else:
        return None
    if args.val_fraction is not None:
        samples = stratified_split(samples, args.val_fraction, args.seed, root)[0 if is_train else 1]
        if not samples:
            raise ValueError(f'--val_fraction {args.val_fraction} holds out no images of {args.train_csv or root}: '
                             f'every class has a single image, which stays in training')
        print(f'--val_fraction {args.val_fraction} (--seed {args.seed}): {len(samples)} '
              f'{"training" if is_train else "validation"} images of {root}')
    return root, samples, classes


def _labelled_as_in_train(val, train_root):
    """`val/` labelled by the class list of `train/`: a class folder missing from `val/` must not shift the
    labels of the classes after it."""
    train_classes, _ = find_classes(str(train_root))
    if val.classes == train_classes:
        return val
    unknown = sorted(set(val.classes) - set(train_classes))
    if unknown:
        raise ValueError(f'{val.root}: class folders {", ".join(unknown[:3])} are not in {train_root}: the '
                         f'validation classes must be training classes')
    index = {name: i for i, name in enumerate(train_classes)}
    samples = [(path, index[val.classes[label]]) for path, label in val.samples]
    return LabeledImages(val.root, samples, train_classes, val.transform, val.drop_unreadable, val.loader)


def build_finetune_dataset(is_train, args, eval_rule=None, transform=None):
    """The training or validation set: `train/` or `val/` class folders of --data_path (`demo`: the demo data's
    held-out split), or the sets util/data/user_data.py makes from --val_fraction or --train_csv / --val_csv.
    `transform`: instead of the split's fine-tuning transform."""
    transform = transform or build_finetune_transform(is_train, args, eval_rule)
    selected = finetune_samples(is_train, args)
    if selected is not None:
        dataset = LabeledImages(*selected, transform, drop_unreadable=not is_train)
    else:
        split = 'train' if is_train else 'val'
        root = resolve_image_root(args.data_path, split)
        if root.name != split:
            raise FileNotFoundError(f'--data_path {args.data_path}: fine-tuning needs train/ and val/ class folders '
                                    f'inside, or --val_fraction F to split one folder of class folders, or --train_csv')
        dataset = ImageFolderOrFlat(root, transform=transform, drop_unreadable=not is_train)
        if is_train:
            check_every_class_has_images(dataset.samples, dataset.classes, root)
        else:
            dataset = _labelled_as_in_train(dataset, resolve_image_root(args.data_path, 'train'))
    if len(dataset.classes) > args.nb_classes:
        raise ValueError(f'{args.train_csv or dataset.root}: {len(dataset.classes)} classes, more than --nb_classes '
                         f'{args.nb_classes}')
    return dataset
