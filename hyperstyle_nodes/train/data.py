"""Training images: find them, split train/val, load, resize, flip; shard them over processes.

Each item is (x, y), both in [-1, 1]:
    x  [3, 256, 256]   what the encoder and the hypernetwork see (the same resize as HyperStyleModel.preprocess)
    y  [3, S, S]       the target the losses compare with, S = min(generator size, 256) (the official loss size)
Flips are decided by the sampler from (seed, epoch, position), not by a worker's random state, so a resumed run
sees exactly the images, flipped exactly as, an uninterrupted run would.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset, Sampler

from ..engines.hyperstyle.model import HYPERNET_INPUT_SIZE

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})


class DataError(ValueError):
    """The image folders cannot be used as they are; the message says what to do."""


def find_images(folder) -> list:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise DataError(f"no images found in {folder} (searched its subfolders too for "
                        f"{', '.join(sorted(IMAGE_EXTENSIONS))}). Point --data at a folder of images of the domain, "
                        "aligned/cropped the way the generator draws them (faces: FFHQ-aligned), or try the "
                        "self-check with --synthetic.")
    return files


def split_files(data=None, train_dir=None, val_dir=None, val_split: float = 0.05, seed: int = 0):
    """(train files, val files) from one folder split at random (`val_split`: a fraction, or a count if >= 1) or
    from two folders."""
    if data is not None and (train_dir is not None or val_dir is not None):
        raise DataError("give either --data (one folder, split into train/val) or --train-dir and --val-dir")
    if data is None:
        if train_dir is None or val_dir is None:
            raise DataError("no training images given: pass --data FOLDER (split into train/val by --val-split), "
                            "or --train-dir and --val-dir")
        return find_images(train_dir), find_images(val_dir)
    files = find_images(data)
    if len(files) < 2:
        raise DataError(f"{data} holds {len(files)} image; training needs at least 2 (one to hold out for "
                        "validation), and really thousands")
    n_val = int(val_split) if val_split >= 1 else max(1, round(len(files) * val_split))
    n_val = min(n_val, len(files) - 1)
    order = list(range(len(files)))
    random.Random(seed).shuffle(order)
    val = sorted(files[i] for i in order[:n_val])
    train = sorted(files[i] for i in order[n_val:])
    return train, val


def resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """[3, H, W] -> [3, size, size], bilinear with antialiasing (as HyperStyleModel.preprocess)."""
    if image.shape[-2:] == (size, size):
        return image
    return F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


def load_image(path) -> torch.Tensor:
    """An image file -> [3, H, W] float in [0, 1]."""
    try:
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except OSError as err:
        raise DataError(f"cannot read image {path}: {err}. Remove or replace the file.") from err
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255)


class ImageFolderDataset(Dataset):
    """Indexed by (index, flip) pairs from ShardedSampler (a plain index means no flip)."""

    def __init__(self, files: list, target_size: int):
        self.files = list(files)
        self.target_size = target_size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, item):
        index, flip = item if isinstance(item, tuple) else (item, False)
        image = load_image(self.files[index])
        if flip:
            image = image.flip(-1)
        x = resize(image, HYPERNET_INPUT_SIZE)
        y = x if self.target_size == HYPERNET_INPUT_SIZE else resize(image, self.target_size)
        return x * 2 - 1, y * 2 - 1


class ShardedSampler(Sampler):
    """Yields this process's (index, flip) pairs for one epoch.

    Training (shuffle=True): a permutation seeded by (seed, epoch), cut to a multiple of world_size * batch_size so
    every process runs the same number of full batches, then dealt out rank::world_size. `start_batch` skips the
    batches a resumed run already trained on. Validation (shuffle=False): every image once, in order, dealt out the
    same way (processes may get one image more or less; metrics are summed over processes, so nothing repeats).
    """

    def __init__(self, n: int, rank: int = 0, world_size: int = 1, shuffle: bool = True, flip: bool = False,
                 seed: int = 0, batch_size: int = 1):
        self.n, self.rank, self.world_size = n, rank, world_size
        self.shuffle, self.flip, self.seed, self.batch_size = shuffle, flip, seed, batch_size
        self.epoch, self.start_batch = 0, 0
        if shuffle and self.batches_per_epoch == 0:
            raise DataError(f"{n} training images are too few for batches of {batch_size} on {world_size} "
                            f"process(es): need at least {batch_size * world_size}. Add images or lower --batch-size.")

    @property
    def batches_per_epoch(self) -> int:
        return self.n // (self.world_size * self.batch_size) if self.shuffle else -(-self._per_rank() // self.batch_size)

    def _per_rank(self) -> int:
        return len(range(self.rank, self.n, self.world_size))

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def _order(self) -> tuple:
        if not self.shuffle:
            return list(range(self.n)), [False] * self.n
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        flips = (torch.rand(self.n, generator=g) < 0.5).tolist() if self.flip else [False] * self.n
        keep = self.batches_per_epoch * self.world_size * self.batch_size
        return order[:keep], flips[:keep]

    def __iter__(self):
        order, flips = self._order()
        mine = list(zip(order, flips))[self.rank::self.world_size]
        return iter(mine[self.start_batch * self.batch_size:])

    def __len__(self):
        if not self.shuffle:
            return self._per_rank()
        return (self.batches_per_epoch - self.start_batch) * self.batch_size


def ignore_sigint(_worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C to the main process, which stops cleanly and saves a checkpoint."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def default_workers(processes_on_this_machine: int = 1) -> int:
    """Image-loading processes per training process: up to 4, leaving one CPU per process for the training itself
    (2 CPUs, one process: 1 worker; PyTorch warns when all processes together start more workers than CPUs)."""
    try:
        cpus = len(os.sched_getaffinity(0))  # the CPUs this process may use (containers, taskset)
    except AttributeError:  # macOS, Windows
        cpus = os.cpu_count() or 1
    return max(0, min(4, cpus // max(processes_on_this_machine, 1) - 1))


def make_loader(dataset, sampler: ShardedSampler, batch_size: int, workers: int, pin_memory: bool,
                drop_last: bool) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
        pin_memory=pin_memory, persistent_workers=False, worker_init_fn=ignore_sigint if workers else None,
        # the loader's own seed source: iterating it never draws from the global RNG
        generator=torch.Generator().manual_seed(sampler.seed))


def describe_split(train: list, val: list, folder: Optional[str] = None) -> str:
    where = f" from {folder}" if folder else ""
    return f"{len(train)} training and {len(val)} validation images{where}"
