"""The iterator (hyperstyle_nodes/engines/hyperstyle/optimize.py): gradient descent on codes / offsets from the encoder's start, on the
tiny 128-px model; its node (progress with previews, cancel) and its loss networks (tiny stand-ins, never a
download)."""
import shutil
import sys
from pathlib import Path

import pytest
import torch

import nodes as pack_nodes
from conftest import install_fake_comfy
from hyperstyle_nodes import load_hyperstyle, ops
from hyperstyle_nodes.engines.hyperstyle.optimize import _cached_losses, image_losses, lr_factor
from hyperstyle_nodes.train import losses as train_losses

STEPS = 6


def l2(model, inv, images):
    return torch.mean((model.decode(inv.codes, inv.deltas) - torch.nn.functional.interpolate(
        images, size=model.resolution, mode="area")) ** 2).item()


@pytest.fixture(scope="module")
def start(tiny_model, face_batch):
    codes = tiny_model.encode(face_batch)
    return codes, tiny_model.invert(face_batch, n_iters=1, codes=codes, keep_steps=False)


def test_optimizing_the_codes_lowers_the_loss_and_returns_an_inversion(tiny_model, face_batch, start):
    codes, _ = start
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    seen = []
    inv = tiny_model.optimize(face_batch, codes, steps=STEPS, lr=0.05,
                              on_step=lambda i, n, current: seen.append((i, n, tuple(current.shape))))
    assert seen == [(i, STEPS, (2, 3, 128, 128)) for i in range(1, STEPS + 1)]
    assert inv.codes.shape == codes.shape and len(inv.deltas) == tiny_model.generator.n_layers
    assert all(d is None for d in inv.deltas)  # codes only: no offsets appear
    assert inv.images.shape == (2, 3, 128, 128)
    # an ordinary inversion: decoding its codes gives its images (every edit node works on it)
    assert torch.allclose(tiny_model.decode(inv.codes, inv.deltas), inv.images, atol=1e-5)
    start_l2 = torch.mean((tiny_model.decode(codes) - torch.nn.functional.interpolate(
        face_batch, size=128, mode="area")) ** 2).item()
    assert l2(tiny_model, inv, face_batch) < start_l2
    # the model is untouched: no gradients kept on its weights, no weight changed
    assert all(p.grad is None for p in tiny_model.parameters())
    assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in before.items())


def test_zero_steps_give_the_start_back(tiny_model, face_batch, start):
    codes, refined = start
    inv = tiny_model.optimize(face_batch, codes, refined.deltas, steps=0)
    assert torch.equal(inv.codes, codes)
    assert torch.allclose(inv.images, refined.images, atol=1e-5)


def test_each_image_is_optimised_as_if_alone(tiny_model, face_batch, start):
    codes, _ = start
    both = tiny_model.optimize(face_batch, codes, steps=3)
    alone = tiny_model.optimize(face_batch[1:], codes[1:], steps=3)
    # the same up to float rounding (the generator's batched kernels sum in another order: 2.5e-5 seen)
    assert torch.allclose(both.codes[1:], alone.codes, atol=1e-4)


def test_offsets_stay_fixed_unless_optimised(tiny_model, face_batch, start):
    codes, refined = start
    fixed = tiny_model.optimize(face_batch, codes, refined.deltas, steps=2)
    for a, b in zip(fixed.deltas, refined.deltas):
        assert (a is None and b is None) or torch.equal(a, b.float())
    moved = tiny_model.optimize(face_batch, codes, refined.deltas, steps=2, optimize_deltas=True)
    assert any(not torch.equal(a, b.float()) for a, b in zip(moved.deltas, refined.deltas) if a is not None)
    # without starting offsets, the hypernetwork's tuned layers start at zero and move
    fresh = tiny_model.optimize(face_batch, codes, steps=2, optimize_deltas=True)
    tuned = tiny_model.hypernet.tuned_layers()
    assert [i for i, d in enumerate(fresh.deltas) if d is not None] == tuned
    assert all(fresh.deltas[i].abs().sum() > 0 for i in tuned)
    assert torch.allclose(tiny_model.decode(fresh.codes, fresh.deltas), fresh.images, atol=1e-5)


def test_rampdown_schedule_lowers_the_rate_to_zero_over_the_last_quarter():
    steps = 100
    factors = [lr_factor(i, steps, "rampdown") for i in range(steps)]
    assert factors[:75] == [1.0] * 75  # held for the first 75%
    assert all(a > b for a, b in zip(factors[74:], factors[75:]))  # then falling
    assert 0 < factors[-1] < 0.01
    assert [lr_factor(i, steps, "constant") for i in range(steps)] == [1.0] * steps
    assert lr_factor(0, 1, "rampdown") == 1.0  # a one-step run takes a full step
    assert lr_factor(3, 4) == 1.0  # constant is the default


def test_schedule_changes_only_the_late_steps(tiny_model, face_batch, start):
    codes, _ = start
    constant = tiny_model.optimize(face_batch, codes, steps=4, lr=0.05)  # the default
    ramped = tiny_model.optimize(face_batch, codes, steps=4, lr=0.05, schedule="rampdown")  # a smaller 4th step
    three = tiny_model.optimize(face_batch, codes, steps=3, lr=0.05, schedule="constant")
    moved = lambda a, b: (a.codes.float() - b.codes.float()).abs().max().item()
    assert 0 < moved(ramped, three) < moved(constant, three)
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'cosine'; use one of constant, rampdown"):
        tiny_model.optimize(face_batch, codes, steps=1, schedule="cosine")


def test_runs_inside_inference_mode_like_comfyui(tiny_ckpts, face_batch):
    """ComfyUI executes nodes under torch.inference_mode(): a model loaded there holds inference tensors, which
    autograd cannot save; the iterator works on its own copies."""
    with torch.inference_mode():
        model = load_hyperstyle(tiny_ckpts["hyperstyle"], w_encoder=tiny_ckpts["w_encoder"])
        codes = model.encode(face_batch[:1])
        inv = model.optimize(face_batch[:1], codes, steps=2, optimize_deltas=True)
    assert inv.codes.shape == codes.shape and not torch.equal(inv.codes, codes)


def test_half_precision_model_optimises_in_fp32(tiny_ckpts, face_batch):
    model = load_hyperstyle(tiny_ckpts["hyperstyle"], w_encoder=tiny_ckpts["w_encoder"], dtype=torch.bfloat16)
    codes = model.encode(face_batch[:1])
    inv = model.optimize(face_batch[:1], codes, steps=2)
    assert inv.codes.dtype == torch.bfloat16 and model.generator.input.input.dtype == torch.bfloat16


def test_cancel_from_the_callback_stops(tiny_model, face_batch, start):
    class Cancelled(Exception):
        pass

    def cancel_at_two(i, n, current):
        if i == 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        tiny_model.optimize(face_batch, start[0], steps=50, on_step=cancel_at_two)
    assert all(p.grad is None for p in tiny_model.parameters())


@pytest.mark.parametrize("kwargs, match", [
    ({"steps": -1}, "steps must be >= 0"),
    ({"lr": 0.0}, "learning rate must be > 0"),
    ({"mse": 0.0}, "every loss weight is 0"),
    ({"mse": -1.0}, "loss weights must be >= 0"),
])
def test_bad_settings_are_clear_errors(tiny_model, face_batch, start, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_model.optimize(face_batch, start[0], steps=kwargs.pop("steps", 1), **kwargs)


def test_codes_of_another_batch_are_a_clear_error(tiny_model, face_batch, start):
    with pytest.raises(ValueError, match="codes have batch size 2 but there are 3 images"):
        tiny_model.optimize(torch.cat([face_batch, face_batch[:1]]), start[0], steps=1)


class TinyPerceptual(torch.nn.Module):
    """A stand-in for lpips.LPIPS: a random conv's feature distance, per image [B, 1, 1, 1]."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, a, b):
        return (self.conv(a) - self.conv(b)).pow(2).mean(dim=(1, 2, 3), keepdim=True)


def test_lpips_comes_from_the_trainers_loss_code(tiny_model, face_batch, start, monkeypatch):
    """One code path with the trainer: the LPIPS network is built by train/losses.build_lpips (here a stand-in)."""
    built = []
    monkeypatch.setattr(train_losses, "build_lpips", lambda weights=None: built.append(weights) or TinyPerceptual())
    _cached_losses.cache_clear()
    try:
        losses = image_losses(mse=1.0, lpips=0.8, weights={"lpips": "/explicit/alexnet.pth"})
        assert built == ["/explicit/alexnet.pth"] and losses.lambdas["lpips"] == 0.8
        assert image_losses(mse=1.0, lpips=0.8, weights={"lpips": "/explicit/alexnet.pth"}) is losses  # loaded once
        inv = tiny_model.optimize(face_batch, start[0], steps=2, lpips=0.8, weights={"lpips": "/explicit/alexnet.pth"})
        assert inv.codes.shape == start[0].shape
    finally:
        _cached_losses.cache_clear()


def test_missing_lpips_weights_say_what_to_do(tiny_model, face_batch, start, tmp_path, monkeypatch):
    monkeypatch.setenv("HYPERSTYLE_MODELS_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    _cached_losses.cache_clear()
    with pytest.raises(train_losses.LossWeightsError, match="set the LPIPS / identity weight to 0"):
        tiny_model.optimize(face_batch, start[0], steps=1, lpips=0.8)
    _cached_losses.cache_clear()


# ---------------------------------------------------------------------------------------------------------------
# The node


@pytest.fixture()
def node_model(tiny_ckpts, tmp_path, monkeypatch):
    for name, path in tiny_ckpts.items():
        shutil.copy(path, tmp_path / f"tiny_{name}.pt")
    monkeypatch.setenv("HYPERSTYLE_MODELS_DIR", str(tmp_path))
    (loaded,) = pack_nodes.HyperStyleLoader().load("tiny_hyperstyle.pt", "tiny_w_encoder.pt", "fp32", "cpu")
    return loaded


def fake_comfy(monkeypatch, interrupt_at=None):
    """comfy.utils.ProgressBar / model_management stand-ins recording (value, total, preview) per update."""
    updates = []

    class FakeBar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            updates.append((value, total, preview))

    class Interrupted(Exception):
        pass

    def interrupt():
        if interrupt_at is not None and len(updates) >= interrupt_at:
            raise Interrupted("cancelled by the user")

    install_fake_comfy(monkeypatch, FakeBar, interrupt)
    return updates, Interrupted


def test_node_shows_progress_with_previews_and_chains_into_decode(node_model, face_batch, monkeypatch):
    updates, _ = fake_comfy(monkeypatch)
    monkeypatch.setattr(pack_nodes.HyperStyleOptimize, "PREVIEW_EVERY", 2)
    image = face_batch[:1].permute(0, 2, 3, 1)
    latent, _ = ops.encode(node_model, image)
    deltas, _ = ops.refine(node_model, image, latent, 1)
    out_latent, out_deltas, recon = pack_nodes.HyperStyleOptimize().optimize(
        node_model, image, latent, 5, 0.05, 1.0, 0.0, 0.0, "codes + offsets", deltas)
    assert [u[:2] for u in updates] == [(i, 5) for i in range(1, 6)]
    previews = [u[2] for u in updates]
    assert [p is not None for p in previews] == [True, True, False, True, True]  # the first, every 2nd, the last
    kind, picture, _ = previews[1]
    assert kind == "JPEG" and picture.size == (128, 128)
    assert recon.shape == (1, 128, 128, 3) and out_latent.codes.shape == latent.codes.shape
    (decoded,) = pack_nodes.HyperStyleDecode().decode(node_model, out_latent, "native", out_deltas)
    assert torch.allclose(decoded, recon, atol=1e-5)


def test_node_can_be_cancelled(node_model, face_batch, monkeypatch):
    updates, Interrupted = fake_comfy(monkeypatch, interrupt_at=3)
    image = face_batch[:1].permute(0, 2, 3, 1)
    latent, _ = ops.encode(node_model, image)
    with pytest.raises(Interrupted):
        pack_nodes.HyperStyleOptimize().optimize(node_model, image, latent, 100, 0.01, 1.0, 0.0, 0.0, "codes")
    assert [u[0] for u in updates] == [1, 2, 3]


# ---------------------------------------------------------------------------------------------------------------
# The CLI flag


def test_cli_optimize_steps_changes_the_saved_inversion(tiny_ckpts, assets_dir, tmp_path, monkeypatch, capsys):
    from hyperstyle_nodes import cli
    from hyperstyle_nodes.loaders import inversion_io

    monkeypatch.delenv("HYPERSTYLE_MODELS_DIR", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the CLI sets these for its process; undone after
    models = tmp_path / "models"
    models.mkdir()
    for name, path in tiny_ckpts.items():
        shutil.copy(path, models / f"tiny_{name}.pt")
    shutil.copy(assets_dir / "models/retinaface/retinaface_mobilenet0.25.pth", models)
    photo = assets_dir / "testdata" / "faces" / "astronaut.png"
    common = ["--models-dir", str(models), "--checkpoint", "tiny_hyperstyle.pt", "--encoder", "tiny_w_encoder.pt",
              "--detector", "retinaface_mobilenet0.25.pth", "--align-size", "256", "--iterations", "1", "--device",
              "cpu", "--offline", "--save-inversion"]
    codes = {}
    for steps in (0, 3):
        out = tmp_path / f"out{steps}"
        assert cli.main(["edit", str(photo), "--out", str(out), "--optimize-steps", str(steps), *common]) == cli.EXIT_OK
        codes[steps] = inversion_io.load_inversion(next(out.glob("astronaut_inversion*.safetensors")))[0]
    assert codes[0].shape == codes[3].shape and not torch.equal(codes[0], codes[3])
    # a loss network that is not there fails before any photo, saying what to do
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    _cached_losses.cache_clear()
    code = cli.main(["edit", str(photo), "--out", str(tmp_path / "o"), "--optimize-steps", "3",
                     "--optimize-lpips", "0.8", *common])
    assert code == cli.EXIT_WEIGHTS
    assert "set the LPIPS / identity weight to 0" in capsys.readouterr().err
    assert cli.main(["edit", str(photo), "--out", str(tmp_path / "o"), "--optimize-steps", "-1", *common]) == \
        cli.EXIT_USAGE


# ---------------------------------------------------------------------------------------------------------------
# The benchmark (CPU smoke run on a run folder of tiny checkpoints)


def test_bench_optimize_on_cpu(tiny_ckpts, face_batch, tmp_path):
    import json

    from PIL import Image

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_optimize

    run = tmp_path / "run"
    for stage, name in (("hypernet", "hyperstyle"), ("encoder", "w_encoder")):
        (run / stage / "checkpoints").mkdir(parents=True)
        shutil.copy(tiny_ckpts[name], run / stage / "checkpoints" / "best_model.pt")
    (run / "domain" / "val").mkdir(parents=True)
    for i, image in enumerate(face_batch):
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).astype("uint8")).save(run / "domain/val" / f"{i}.png")
    out = tmp_path / "bench.jsonl"
    assert bench_optimize.main(["--run", str(run), "--device", "cpu", "--steps", "0,2", "--n-iters", "1", "--lr",
                                "0.05", "--speed", "--speed-size", "32", "--speed-steps", "2", "--speed-warmup", "1",
                                "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    quality = {(r["optimize"], r["start"], r["steps"]): r for r in rows if r["kind"] == "quality"}
    starts = ("a_average_latent", "b_encoder", "c_encoder_hyperstyle")
    modes = ("codes", "codes+offsets")
    assert set(quality) == {(m, s, k) for m in modes for s in starts for k in (0, 2)}
    for mode in modes:
        for start in starts:
            assert quality[(mode, start, 2)]["l2"] < quality[(mode, start, 0)]["l2"]
            assert quality[(mode, start, 2)]["schedule"] == "constant"
        # the same start in both modes before any step
        for start in starts:
            assert quality[("codes", start, 0)]["l2"] == pytest.approx(quality[("codes+offsets", start, 0)]["l2"])
    assert quality[("codes", "c_encoder_hyperstyle", 2)]["offsets"] == "HyperStyle's, fixed"
    assert quality[("codes+offsets", "a_average_latent", 2)]["offsets"] == "zero, optimised"
    verdicts = {r["optimize"]: r for r in rows if r["kind"] == "verdict"}
    assert set(verdicts) == set(modes)
    for mode, verdict in verdicts.items():
        l2 = {s: [quality[(mode, s, k)]["l2"] for k in (0, 2)] for s in starts}
        assert verdict["l2"] == l2
        assert verdict["b_below_a_at_every_step_count"] == all(b < a for b, a in zip(l2["b_encoder"],
                                                                                     l2["a_average_latent"]))
    speed = [r for r in rows if r["kind"] == "speed"]
    assert len(speed) == 1 and speed[0]["steps_per_second"] > 0
