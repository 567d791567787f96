"""Collaborative training (`encoder --collaborative`): the code cache keeps each image's best code; a tiny run on a
32-px synthetic domain trains, logs the latent loss and the cache, and writes the released W-encoder format."""
import csv
import os
import subprocess
import sys
from pathlib import Path

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


REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def domain(tmp_path_factory):
    return build_domain(tmp_path_factory.mktemp("domain"), SyntheticDomain(size=32, train_images=8, val_images=2,
                                                                             seed=3), (5, 6, 8, 9), log=lambda *a: None)


def collaborative_args(domain, out, *extra):
    return ["encoder", "--collaborative", "--iterator-steps", "2", "--generator", str(domain["generator"]),
            "--out", str(out), "--lr", "1e-3", "--domain", "synthetic", "--train-dir", str(domain["train"]),
            "--val-dir", str(domain["val"]), "--no-flip", "--arch", "micro", "--batch-size", "2", "--workers", "0",
            "--device", "cpu", "--log-interval", "1", "--no-tensorboard", "--val-batches", "0", *extra]


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_collaborative_encoder_run(domain, tmp_path):
    out = tmp_path / "run"
    assert main(collaborative_args(domain, out, "--max-steps", "4", "--val-interval", "4", "--image-interval",
                                   "2")) == 0
    logged = rows(out / "logs" / "train.csv")
    assert len(logged) == 4
    assert [float(r["cache_images"]) for r in logged] == [2, 4, 6, 8]  # one epoch of 8 images, 2 per batch
    assert all(float(r["latent"]) > 0 for r in logged)
    # the training loss is the image loss plus the latent loss
    assert all(float(r["loss"]) == pytest.approx(float(r["l2"]) + float(r["latent"]), rel=1e-4) for r in logged)
    enc = load_w_encoder_file(out / "checkpoints" / "best_model.pt")  # the released W-encoder format
    assert enc.output_size == 32 and enc.generator is not None
    opts = torch.load(out / "checkpoints" / "best_model.pt", weights_only=True, map_location="cpu")["opts"]
    assert opts["collaborative"] is True and opts["iterator_steps"] == 2


def test_collaborative_under_torchrun_shares_the_cache(domain, tmp_path):
    """Two processes: the same weights on both, and each step's cache holds both processes' images."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "hyperstyle_nodes.train", *collaborative_args(domain, out, "--max-steps", "2", "--val-interval", "0",
                                                         "--image-interval", "0", "--dump-rank-params")]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    ranks = [torch.load(out / "debug" / f"params_rank{r}.pt", weights_only=True) for r in range(2)]
    for name, value in ranks[0].items():
        assert torch.equal(value, ranks[1][name]), name
    assert [float(r["cache_images"]) for r in rows(out / "logs" / "train.csv")] == [4, 8]  # 2 processes x 2 images


def test_cache_find_tells_known_from_new_images():
    cache = CodeCache(dim=2, device="cpu")
    known, codes, losses = cache.find(torch.tensor([5, 6]))  # an empty cache
    assert known.tolist() == [False, False] and torch.isinf(losses).all() and codes.shape == (2, 2)
    cache.offer(torch.tensor([6]), torch.tensor([[1.0, 2.0]]), torch.tensor([0.3]))
    known, codes, losses = cache.find(torch.tensor([5, 6]))
    assert known.tolist() == [False, True] and codes[1].tolist() == [1.0, 2.0]
    assert torch.isinf(losses[0]) and losses[1].item() == pytest.approx(0.3)


@pytest.mark.parametrize("start", ["encoder", "cache"])
def test_iterator_start(domain, tmp_path, monkeypatch, start):
    """--iterator-start cache: an image seen before is refined further from its cached code (when that beats the
    encoder's); encoder: always from the encoder's code."""
    from hyperstyle_nodes.train import collaborative

    calls = []
    real = collaborative.descend

    def recording(generator, target, codes, *args, **kwargs):
        calls.append((collaborative.image_keys(target).tolist(), codes.clone()))
        result = real(generator, target, codes, *args, **kwargs)
        calls[-1] += (result[0].clone(),)
        return result

    monkeypatch.setattr(collaborative, "descend", recording)
    out = tmp_path / start
    # 8 images, 2 per batch: two epochs; a tiny encoder learning rate, so the cached codes stay the better ones
    # (the encoder's codes still change with the batch: its BatchNorm layers use batch statistics)
    assert main(collaborative_args(domain, out, "--max-steps", "8", "--val-interval", "0", "--image-interval", "0",
                                   "--lr", "1e-7", "--iterator-start", start)) == 0
    first = {k: refined[i] for keys, _, refined in calls[:4] for i, k in enumerate(keys)}
    assert len(first) == 8 and len(calls) == 8
    continued = [torch.equal(codes[i], first[key]) for keys, codes, _ in calls[4:] for i, key in enumerate(keys)]
    # cache: an image continues from where epoch 1 left it, unless the encoder's code is now better (here most
    # continue: the encoder barely learns); encoder: every image starts from the encoder's code again
    assert sum(continued) >= (4 if start == "cache" else 0) and (start == "cache" or not any(continued))
    opts = torch.load(out / "checkpoints" / "last.pt", weights_only=True, map_location="cpu")["opts"]
    assert opts["iterator_start"] == start
