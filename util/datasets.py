"""Image data: where the images are, how they are read, how they are augmented (pretraining, fine-tuning,
evaluation).

`--data_path` may be `demo` (generated photographs, see util/demo_data.py), an ImageNet-style
folder with `train/` inside (the official LocalMIM code appends `train`), a folder of class
folders, or a flat folder of images (labels are not needed to pretrain). Images that cannot be
decoded are skipped with one warning each and counted, so one bad file never stops a long run.
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

from util.bad_files import BadFiles
from util.demo_data import demo_imagefolder
from util.fast_image import FAST_DATA_MODES, EncodedCropReader, RandomResizedCropReader

ACCEPTED_LAYOUTS = ("'demo', a folder with {split}/ inside, a folder of class folders, "
                    "or a flat folder of images")


def resolve_image_root(data_path, split='train') -> Path:
    """Map a `--data_path` value to the folder whose images form the `split` data set."""
    if str(data_path) == 'demo':
        return demo_imagefolder() / split
    path = Path(data_path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f'--data_path {path}: no such folder (accepted: '
                                f'{ACCEPTED_LAYOUTS.format(split=split)})')
    return path / split if (path / split).is_dir() else path


def _is_image_file(path: Path) -> bool:
    return path.is_file() and has_file_allowed_extension(path.name, IMG_EXTENSIONS)


def read_rgb(path):
    with Image.open(path) as image:
        return image.convert('RGB')


class ImageFolderOrFlat(VisionDataset):
    """torchvision ImageFolder over class folders, or one class (label 0) over a flat folder. `loader` reads a
    path (default: the RGB PIL image; util/fast_image.py has readers that crop while decoding).

    An image that cannot be decoded is flagged in `bad_files` (util/bad_files.py) and then either replaced by
    the next decodable one (training: the batch keeps its size) or, with `drop_unreadable`, returned as None
    (evaluation, with util.bad_files.collate_readable: nothing is counted twice).
    """

    def __init__(self, root, transform=None, drop_unreadable=False, loader=None):
        super().__init__(str(root), transform=transform)
        self.loader = loader or read_rgb
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f'image folder {root} does not exist')
        loose_images = sorted(str(p) for p in root.iterdir() if _is_image_file(p))
        samples, classes, class_to_idx = [], [], {}
        try:
            classes, class_to_idx = find_classes(str(root))
            samples = make_dataset(str(root), class_to_idx, IMG_EXTENSIONS, allow_empty=True)
        except FileNotFoundError:  # no subfolders at all
            pass
        if samples and loose_images:
            warnings.warn(f'{root}: using class folders, ignoring {len(loose_images)} image files '
                          f'directly inside it (e.g. {loose_images[0]})')
        elif not samples:
            samples = [(path, 0) for path in loose_images]
            classes, class_to_idx = [''], {'': 0}
        if not samples:
            raise FileNotFoundError(f'no images found in {root} (expected class folders or image files '
                                    f'with extensions {", ".join(IMG_EXTENSIONS)})')
        self.samples = samples
        self.targets = [target for _, target in samples]
        self.classes, self.class_to_idx = classes, class_to_idx
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
    (util/fast_image.py) the same augmentation yields uint8 crops, or with 'device' still-encoded JPEGs, which
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


def build_finetune_dataset(is_train, args, eval_rule=None):
    """`train/` or `val/` class folders of --data_path (`demo`: the demo data's held-out split)."""
    split = 'train' if is_train else 'val'
    root = resolve_image_root(args.data_path, split)
    if root.name != split:
        raise FileNotFoundError(f'--data_path {args.data_path}: fine-tuning needs train/ and val/ class folders inside')
    return ImageFolderOrFlat(root, transform=build_finetune_transform(is_train, args, eval_rule),
                             drop_unreadable=not is_train)
