"""Collaborative training (`encoder --collaborative`): the code cache keeps each image's best code; a tiny run on a
32-px synthetic domain trains, logs the latent loss and the cache, and writes the released W-encoder format."""
import csv

import pytest
import torch

from hyperstyle_nodes.train.cli import main
from hyperstyle_nodes.train.collaborative import CodeCache, image_keys
from hyperstyle_nodes.train.models import load_w_encoder_file
from hyperstyle_nodes.train.synthetic import SyntheticDomain, build_domain


def test_cache_keeps_only_better_codes():
    cache = CodeCache(dim=3, device="cpu")
    keys = torch.tensor([11, 22])
    assert cache.offer(keys, torch.ones(2, 3), torch.tensor([0.5, 0.5])) == 2
    # image 11 gets a worse candidate (kept out), image 22 a better one (kept)
    assert cache.offer(keys, torch.full((2, 3), 2.0), torch.tensor([0.7, 0.1])) == 1
    codes, losses = cache.lookup(torch.tensor([22, 11]))
    assert codes[:, 0].tolist() == [2.0, 1.0] and losses.tolist() == pytest.approx([0.1, 0.5])
    for i in range(100):  # grows past its first allocation
        cache.offer(torch.tensor([1000 + i]), torch.full((1, 3), float(i)), torch.tensor([1.0]))
    assert len(cache) == 102 and cache.lookup(torch.tensor([1099]))[0][0, 0] == 99.0


def test_image_keys_identify_images():
    images = torch.rand(3, 3, 8, 8)
    keys = image_keys(images)
    assert keys.dtype == torch.int64 and len(set(keys.tolist())) == 3
    assert torch.equal(image_keys(images.clone()), keys)
    assert image_keys(images.flip(-1))[0] != keys[0]  # a flipped image is another image


def test_collaborative_encoder_run(tmp_path):
    domain = build_domain(tmp_path / "domain", SyntheticDomain(size=32, train_images=8, val_images=2, seed=3),
                          (5, 6, 8, 9), log=lambda *a: None)
    out = tmp_path / "run"
    rc = main(["encoder", "--collaborative", "--iterator-steps", "2", "--generator", str(domain["generator"]),
               "--out", str(out), "--max-steps", "4", "--lr", "1e-3", "--val-interval", "4", "--domain", "synthetic",
               "--train-dir", str(domain["train"]), "--val-dir", str(domain["val"]), "--no-flip", "--arch", "micro",
               "--batch-size", "2", "--workers", "0", "--device", "cpu", "--log-interval", "1",
               "--image-interval", "2", "--no-tensorboard", "--val-batches", "0"])
    assert rc == 0
    with open(out / "logs" / "train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    assert [float(r["cache_images"]) for r in rows] == [2, 4, 6, 8]  # one epoch of 8 images, 2 per batch
    assert all(float(r["latent"]) > 0 for r in rows)
    # the training loss is the image loss plus the latent loss
    assert all(float(r["loss"]) == pytest.approx(float(r["l2"]) + float(r["latent"]), rel=1e-4) for r in rows)
    enc = load_w_encoder_file(out / "checkpoints" / "best_model.pt")  # the released W-encoder format
    assert enc.output_size == 32 and enc.generator is not None
    opts = torch.load(out / "checkpoints" / "best_model.pt", weights_only=True, map_location="cpu")["opts"]
    assert opts["collaborative"] is True and opts["iterator_steps"] == 2
