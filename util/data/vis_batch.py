"""The fixed images and mask noise that the pretraining pictures (LocalMIM's and SparK's) draw every few epochs, so
pictures of different epochs compare side by side. The global RNG states are left as they were."""
import random

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms
from torchvision.transforms import InterpolationMode


def vis_transform(input_size):
    """Deterministic view of an image for the pictures: resize, centre crop, ImageNet normalisation."""
    return transforms.Compose([
        transforms.Resize(input_size, interpolation=InterpolationMode.BICUBIC),
        transforms.CenterCrop(input_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])


def fixed_vis_batch(dataset, n=4, seed=0, num_patches=196):
    """(imgs [n, 3, H, W], noise [n, num_patches]): n evenly spaced samples and a fixed mask noise.

    Give a dataset with a deterministic transform (e.g. `ImageFolderOrFlat(root, vis_transform(size))`)
    and `num_patches=model.patch_embed.num_patches`. The global torch and Python RNG states are left
    as they were, even if the dataset's transform is random (it then runs under a seeded, forked RNG).
    """
    n = min(n, len(dataset))
    py_state = random.getstate()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            imgs = torch.stack([dataset[i * len(dataset) // n][0] for i in range(n)])
    finally:
        random.setstate(py_state)
    noise = torch.rand(n, num_patches, generator=torch.Generator().manual_seed(seed))
    return imgs, noise
