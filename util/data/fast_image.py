"""A faster LocalMIM pretraining input pipeline (`run_pretrain.py --fast_data`), same augmentation distribution.

The official transform decodes the whole JPEG, crops, resizes with PIL, flips, and ships float32 tensors that
were normalised on the host. Here each loader worker reads a file into a uint8 crop directly:
- the RandomResizedCrop box and the flip are drawn from the image header's size, with torchvision's own
  `RandomResizedCrop.get_params` and the same random numbers in the same order, so a given RNG state gives the
  official pipeline's box and flip;
- the crop is resized by torch's antialiased bicubic kernel for uint8 images (within 2 grey levels of PIL's,
  nearly always equal) and shipped as uint8 (4x less than float32 through the workers' shared memory);
- with `draft=True` (`--fast_data cpu_draft`) a crop at least twice the output size is decoded at 1/2, 1/4 or
  1/8 scale by the JPEG decoder itself (PIL `Image.draft`): much faster on large photographs, different pixels;
- the float conversion and the ImageNet normalisation happen per batch on the training device
  (`DeviceInput`).
`--fast_data device` goes further: the workers only read the file bytes and draw the box; the batch is decoded
on the device (`torchvision.io.decode_jpeg`, nvJPEG on CUDA), then cropped, resized and flipped there.
"""
import io
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import RandomResizedCrop

FAST_DATA_MODES = ('none', 'cpu', 'cpu_draft', 'device')
CROP_SCALE, CROP_RATIO = (0.2, 1.0), (3 / 4, 4 / 3)


def crop_and_flip(image, scale=CROP_SCALE, ratio=CROP_RATIO):
    """The official transform's random draws, from the image size only (a lazily opened PIL image is not decoded):
    box (left, top, right, bottom) by RandomResizedCrop.get_params, then the flip of RandomHorizontalFlip."""
    top, left, height, width = RandomResizedCrop.get_params(image, scale, ratio)
    flip = bool(torch.rand(1) < 0.5)
    return (left, top, left + width, top + height), flip


def draft_for_crop(image, box, size):
    """Asks the JPEG decoder for the smallest 1/2^k scale at which the crop still covers size x size pixels;
    returns the box in the coordinates of the reduced image (fractional) and the reduction (1: none)."""
    left, top, right, bottom = box
    reduction = next((r for r in (8, 4, 2) if r * size <= min(right - left, bottom - top)), 1)
    if reduction == 1:
        return box, 1
    width, height = image.size
    drafted = image.draft('RGB', (width // reduction, height // reduction))
    if drafted is None:  # not a JPEG
        return box, 1
    scale = drafted[1][2] / width
    return tuple(c * scale for c in box), reduction


def resize_uint8(crop_hwc, size):
    """[H, W, 3] uint8 -> [3, size, size] uint8, antialiased bicubic (torch's uint8 kernel, close to PIL's)."""
    crop = crop_hwc.contiguous().permute(2, 0, 1).unsqueeze(0)  # channels-last: the uint8 kernel is fast on it
    return F.interpolate(crop, size=(size, size), mode='bicubic', antialias=True, align_corners=False)[0]


class RandomResizedCropReader:
    """A dataset `loader`: path -> [3, size, size] uint8 crop, flipped at random (LocalMIM's augmentation).

    RGB and grey JPEGs are decoded by torchvision (libjpeg-turbo straight into a tensor), other files by PIL.
    `resize='pil'` decodes, crops and resizes with PIL as the official transform does: same pixels, slower."""

    def __init__(self, size, draft=False, resize='torch'):
        self.size, self.draft, self.resize = size, draft, resize

    def __call__(self, path):
        with open(path, 'rb') as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            box, flip = crop_and_flip(image)
            box, reduction = draft_for_crop(image, box, self.size) if self.draft else (box, 1)
            if self.resize == 'pil' or reduction > 1:  # PIL resizes (a drafted box has fractional coordinates)
                rgb = _decoded_rgb(image)
                size = (self.size, self.size)
                out = (rgb.resize(size, Image.Resampling.BICUBIC, box=box) if reduction > 1 else
                       rgb.crop(box).resize(size, Image.Resampling.BICUBIC))
                return _flipped(torch.from_numpy(np.array(out)).permute(2, 0, 1), flip)
            if image.format != 'JPEG' or image.mode not in ('RGB', 'L'):
                crop = _decoded_rgb(image).crop(box)
                pixels = torch.frombuffer(bytearray(crop.tobytes()), dtype=torch.uint8).view(crop.height, crop.width, 3)
            else:  # torchvision's decoder: no RGBX -> RGB repacking, and the crop is a view
                left, top, right, bottom = box
                decoded = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
                pixels = decoded.permute(1, 2, 0)[top:bottom, left:right]
        return _flipped(resize_uint8(pixels, self.size), flip)


def _decoded_rgb(image):
    image.load()  # at the reduced scale after a draft
    return image if image.mode == 'RGB' else image.convert('RGB')


def _flipped(chw, flip):
    return (chw.flip(-1) if flip else chw).contiguous()


class EncodedCrops(dict):
    """One image (or, collated, a batch) still JPEG-encoded: 'jpeg' file bytes and 'params' = left, top, right,
    bottom, flip. A dict so that the default collate and pin_memory keep its type; `len` and `to` make it pass
    through the engine like an image tensor."""

    def __len__(self):
        params = self['params']
        return len(params) if params.dim() == 2 else 1

    def to(self, device, non_blocking=False):
        return self  # the bytes go to the decoder from the host; the boxes are read on the host


class EncodedCropReader:
    """A dataset `loader` for `--fast_data device`: the file's bytes and its crop box and flip, nothing decoded.
    A file that is not a baseline RGB or grey JPEG (ImageNet has a few CMYK JPEGs and one PNG) is decoded here
    and re-encoded at JPEG quality 95."""

    def __call__(self, path):
        with open(path, 'rb') as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as image:
            box, flip = crop_and_flip(image)
            if image.format != 'JPEG' or image.mode not in ('RGB', 'L'):
                buffer = io.BytesIO()
                image.convert('RGB').save(buffer, 'JPEG', quality=95)
                data = buffer.getvalue()
        return EncodedCrops(jpeg=data, params=torch.tensor([*box, flip]))


def decode_crops(batch, size, device):
    """EncodedCrops batch -> [B, 3, size, size] float (0-255, rounded like uint8 pixels) on `device`: one batched
    decode_jpeg call, then each crop resized (antialiased bicubic) and flipped there."""
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in batch['jpeg']]
    try:
        images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:  # one bad file fails the whole call: decode one by one, replace the bad ones
        images = [_decode_or_none(d, device) for d in data]
        good = next((im for im in images if im is not None), None)
        if good is None:
            raise
        images = [good if im is None else im for im in images]
    crops = []
    for image, (left, top, right, bottom, flip) in zip(images, batch['params'].tolist()):
        crop = image[None, :, top:bottom, left:right].float()
        crop = F.interpolate(crop, size=(size, size), mode='bicubic', antialias=True, align_corners=False)
        crops.append(crop.flip(-1) if flip else crop)
    return torch.cat(crops).round_().clamp_(0, 255)


def _decode_or_none(data, device):
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as error:
        warnings.warn(f'device JPEG decode failed, replaced by another image of the batch: {error}')
        return None


class DeviceInput:
    """Turns the loader's batches into the model's input on the device: uint8 crops (or EncodedCrops) to float,
    scaled to [0, 1] and normalised with the ImageNet mean and std, as ToTensor + Normalize would on the host."""

    def __init__(self, size, device, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD):
        self.size, self.device = size, torch.device(device)
        self.scale = (torch.tensor(std, device=self.device) * 255).view(1, 3, 1, 1)
        self.shift = (torch.tensor(mean, device=self.device) * 255).view(1, 3, 1, 1)

    def __call__(self, samples):
        with torch.autocast(self.device.type, enabled=False):  # the engine calls compute_loss under autocast
            if isinstance(samples, EncodedCrops):
                samples = decode_crops(samples, self.size, self.device)
            return (samples.to(self.device, torch.float32, non_blocking=True) - self.shift) / self.scale

    def wrap(self, compute_loss):
        """The engine's `compute_loss`, fed normalised float images."""
        return lambda model, samples, targets: compute_loss(model, self(samples), targets)

