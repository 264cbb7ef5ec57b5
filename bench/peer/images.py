"""
The eval image transform with Pillow and NumPy (Resize of the short side with bicubic filtering, CenterCrop,
normalisation to CHW float32, as torchvision composes it for CLIP), timed on the same JPEGs ours decodes.
"""
import io
import os
import tarfile
import time

import numpy as np
from PIL import Image


class Transform:
    def __init__(self, size, mean, std):
        self.size = size
        self.mean = np.array(mean, dtype=np.float32).reshape(1, 1, 3)
        self.std = np.array(std, dtype=np.float32).reshape(1, 1, 3)

    def __call__(self, jpeg):
        image = Image.open(io.BytesIO(jpeg)).convert("RGB")
        w, h = image.size
        s = self.size
        size = (s, s * h // w) if w <= h else (s * w // h, s)
        image = image.resize(size, Image.BICUBIC)
        left, top = round((size[0] - s) / 2), round((size[1] - s) / 2)
        image = image.crop((left, top, left + s, top + s))
        x = (np.asarray(image, dtype=np.float32) / 255 - self.mean) / self.std
        return np.ascontiguousarray(x.transpose(2, 0, 1))


def decode_rows(spec):
    """One process, files read into memory first: the transform alone, as decode_224 times ours."""
    transform = Transform(spec["size"], spec["mean"], spec["std"])
    files = sorted(os.listdir(spec["dir"]))
    jpegs = []
    for name in files:
        with open(os.path.join(spec["dir"], name), "rb") as f:
            jpegs.append(f.read())
    for jpeg in jpegs[:10]:
        transform(jpeg)
    start = time.perf_counter()
    for jpeg in jpegs:
        transform(jpeg)
    seconds = time.perf_counter() - start
    note = f"Pillow {Image.__version__}, one process, {len(jpegs)} JPEGs"
    return {"decode_224": {"value": len(jpegs) / seconds, "unit": "images/s", "note": note}}, {}


class JpegMembers:
    """The JPEG members of tar shards as a map-style dataset: each item is read from its shard and transformed."""

    def __init__(self, shards, transform):
        self.transform = transform
        self.items = []
        for shard in shards:
            with tarfile.open(shard) as tar:
                for m in tar.getmembers():
                    if m.isfile() and m.name.endswith(".jpg"):
                        self.items.append((shard, m.offset_data, m.size))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        import torch

        shard, offset, length = self.items[i]
        with open(shard, "rb") as f:
            f.seek(offset)
            return torch.from_numpy(self.transform(f.read(length)))


def loader_rows(spec):
    """
    A pass of torch's DataLoader over the tar shards' JPEGs, as a PyTorch training script would load them: worker
    processes decode and collate whole batches into shared memory. The workers start and run one untimed pass first,
    as ours runs warm.
    """
    from torch.utils.data import DataLoader

    dataset = JpegMembers(spec["shards"], Transform(spec["size"], spec["mean"], spec["std"]))
    loader = DataLoader(dataset, batch_size=spec["batch"], num_workers=spec["workers"], persistent_workers=True)

    def one_pass():
        return sum(batch.shape[0] for batch in loader)

    one_pass()
    start = time.perf_counter()
    images = one_pass()
    seconds = time.perf_counter() - start
    note = f"DataLoader, {spec['workers']} workers, batches of {spec['batch']} over the tar shards; eval transform, no tokenizer"
    return {"loader_224": {"value": images / seconds, "unit": "images/s", "note": note}}, {}
