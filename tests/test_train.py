"""The trainer (`python -m hyperstyle_nodes.train`): both stages on a tiny synthetic domain, checkpoints that load
with load_hyperstyle, exact resume, Ctrl-C, data-parallel consistency under torchrun (gloo), clear errors.

Runs on CPU in about a minute: 32-px generator, "micro" encoder/hypernetwork, batches of 2.
"""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hyperstyle_nodes import load_hyperstyle
from hyperstyle_nodes.stylegan2.generator import GeneratorConfig
from hyperstyle_nodes.train.cli import SELFCHECK_DEFAULTS, apply_selfcheck_defaults, build_parser, main
from hyperstyle_nodes.train.data import ShardedSampler, default_workers
from hyperstyle_nodes.train.logs import StageProgress, projected_seconds
from hyperstyle_nodes.train.models import build_hypernet, default_layers_to_tune
from hyperstyle_nodes.train.runs import _loop_config
from hyperstyle_nodes.train.synthetic import SyntheticDomain, build_domain, describe_result

REPO_ROOT = Path(__file__).resolve().parents[1]
SIZE = 32
LAYERS = (5, 6, 8, 9)  # the default for 32 px: non-toRGB layers at 16 and 32 px


def fast(*extra):
    """Options shared by every run here: tiny, quick, quiet."""
    return ["--arch", "micro", "--batch-size", "2", "--workers", "0", "--device", "cpu", "--log-interval", "1",
            "--image-interval", "2", "--no-tensorboard", "--val-batches", "0", *extra]


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def domain(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic")
    return build_domain(folder, SyntheticDomain(size=SIZE, train_images=16, val_images=4, seed=3), LAYERS,
                        log=lambda *a: None)


def data_args(domain):
    return ["--domain", "synthetic", "--train-dir", str(domain["train"]), "--val-dir", str(domain["val"]), "--no-flip"]


@pytest.fixture(scope="module")
def encoder_run(domain, tmp_path_factory):
    out = tmp_path_factory.mktemp("encoder")
    rc = main(["encoder", "--generator", str(domain["generator"]), "--out", str(out), "--max-steps", "10",
               "--lr", "1e-3", "--val-interval", "5", *data_args(domain), *fast()])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def hypernet_run(domain, encoder_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("hypernet")
    rc = main(["hypernet", "--w-encoder", str(encoder_run / "checkpoints" / "best_model.pt"), "--out", str(out),
               "--max-steps", "6", "--n-iters", "2", "--lr", "1e-3", "--val-interval", "3", *data_args(domain),
               *fast()])
    assert rc == 0
    return out


# ---------------------------------------------------------------------------------------------------------------


def test_default_layers_to_tune_match_the_released_model():
    assert default_layers_to_tune(GeneratorConfig.stylegan2(1024)) == "5,6,8,9,11,12,14,15,17,18,20,21,23,24"
    assert default_layers_to_tune(GeneratorConfig.stylegan2(512)) == "5,6,8,9,11,12,14,15,17,18,20,21"
    assert default_layers_to_tune(GeneratorConfig.stylegan2(256)) == "5,6,8,9,11,12,14,15,17,18"
    assert default_layers_to_tune(GeneratorConfig.stylegan2(SIZE, narrow=1 / 16)) == ",".join(map(str, LAYERS))


def test_sampler_shards_disjoint_equal_and_resumable():
    n, batch = 23, 3
    ranks = [ShardedSampler(n, r, 2, shuffle=True, flip=True, seed=5, batch_size=batch) for r in range(2)]
    for s in ranks:
        s.set_epoch(4)
    items = [list(s) for s in ranks]
    assert len(items[0]) == len(items[1]) == 3 * batch  # 23 // (2 * 3) = 3 full batches each
    indices = [i for i, _ in items[0]] + [i for i, _ in items[1]]
    assert len(set(indices)) == len(indices)
    assert any(f for _, f in items[0] + items[1]) and not all(f for _, f in items[0] + items[1])
    ranks[0].set_epoch(4, start_batch=2)
    assert list(ranks[0]) == items[0][2 * batch:]  # a resumed epoch continues where it stopped
    ranks[0].set_epoch(5)
    assert list(ranks[0]) != items[0]  # a new epoch, a new order
    val = [ShardedSampler(5, r, 2, shuffle=False) for r in range(2)]
    assert sorted(i for s in val for i, _ in s) == list(range(5))


def test_encoder_stage_trains_and_writes_released_format(encoder_run, domain):
    val = rows(encoder_run / "logs" / "val.csv")
    assert [int(r["step"]) for r in val] == [0, 5, 10]
    assert float(val[-1]["loss"]) < float(val[0]["loss"])  # loss goes down
    # each validation says when it began: seconds since the stage started, and of those spent training
    wall, train_s = [float(r["wall_seconds"]) for r in val], [float(r["train_seconds"]) for r in val]
    assert train_s[0] < 0.5 and wall == sorted(wall) and train_s == sorted(train_s) and train_s[-1] > 0
    assert all(t <= w for t, w in zip(train_s, wall))
    train = rows(encoder_run / "logs" / "train.csv")
    assert len(train) == 10 and all(float(r["images_per_second"]) > 0 for r in train)
    assert list((encoder_run / "images").glob("val_*.png")) and list((encoder_run / "images").glob("train_*.png"))
    ckpt = torch.load(encoder_run / "checkpoints" / "best_model.pt", map_location="cpu", weights_only=True)
    keys = ckpt["state_dict"].keys()
    assert {k.split(".")[0] for k in keys} == {"encoder", "decoder"}
    assert ckpt["opts"]["encoder_type"] == "WEncoder" and ckpt["opts"]["output_size"] == SIZE
    assert ckpt["latent_avg"].shape == (2 * 5 - 2, 64) and ckpt["step"] > 0
    generator = torch.load(domain["generator"], weights_only=True)
    assert torch.allclose(ckpt["latent_avg"][0], generator["latent_avg"])


def test_hypernet_stage_trains_and_loads_with_load_hyperstyle(hypernet_run, encoder_run, domain):
    val = rows(hypernet_run / "logs" / "val.csv")
    assert float(val[-1]["loss"]) < float(val[0]["loss"])  # loss goes down
    assert {"l2_initial", "l2_pass1", "l2_pass2"} <= set(val[0])
    best = hypernet_run / "checkpoints" / "best_model.pt"
    last = hypernet_run / "checkpoints" / "last.pt"
    for path in (best, last):  # plain tensors and options only
        torch.load(path, map_location="cpu", weights_only=True)
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["step"] == 6 and "optimizer" in ckpt and len(ckpt["rng"]) == 1
    assert ckpt["opts"]["layers_to_tune"] == "5,6,8,9" and ckpt["opts"]["n_iters_per_batch"] == 2
    assert ckpt["opts"]["encoder_type"] == "SharedWeightsHyperNetResNet" and ckpt["opts"]["input_nc"] == 6
    keys = ckpt["state_dict"].keys()
    assert {k.split(".")[0] for k in keys} == {"hypernet", "decoder"}
    assert "hypernet.refinement_blocks.5.hypernet.w1" in keys  # the released layout repeats the shared hypernet

    model = load_hyperstyle(best, w_encoder=encoder_run / "checkpoints" / "best_model.pt")
    images = torch.rand(2, 3, SIZE, SIZE)
    inv = model.invert(images, n_iters=2)
    assert inv.images.shape == (2, 3, SIZE, SIZE) and torch.isfinite(inv.images).all()
    assert [i for i, d in enumerate(inv.deltas) if d is not None] == list(LAYERS)


def test_resume_continues_exactly(domain, encoder_run, tmp_path, capsys):
    enc = str(encoder_run / "checkpoints" / "best_model.pt")
    common = ["hypernet", "--w-encoder", enc, "--n-iters", "2", "--val-interval", "0", "--save-interval", "0",
              *data_args(domain), *fast()]
    assert main(common + ["--out", str(tmp_path / "straight"), "--max-steps", "5"]) == 0
    assert main(common + ["--out", str(tmp_path / "split"), "--max-steps", "2"]) == 0
    capsys.readouterr()
    assert main(common + ["--out", str(tmp_path / "split"), "--max-steps", "5", "--resume", "auto"]) == 0
    assert "training from" in (out := capsys.readouterr().out) and "at step 2" in out
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "checkpoints" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 5
    assert [int(r["step"]) for r in rows(tmp_path / "split" / "logs" / "train.csv")] == [1, 2, 3, 4, 5]
    # model, optimizer, data order and RNG restored: the same weights as a run that was never stopped
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    assert torch.equal(a["optimizer"]["state"][0]["exp_avg"], b["optimizer"]["state"][0]["exp_avg"])


def _env():
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    return env


def test_ctrl_c_stops_cleanly_with_a_checkpoint(domain, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "hyperstyle_nodes.train", "encoder", "--generator", str(domain["generator"]),
           "--out", str(out), "--max-steps", "100000", *data_args(domain), *fast()]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log = out / "logs" / "train.csv"
        deadline = time.time() + 120
        while time.time() < deadline and not (log.is_file() and len(rows(log)) >= 2):
            time.sleep(0.2)
        assert log.is_file(), "training did not start"
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, output
    assert "resume with --resume" in output
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] >= 2 and "optimizer" in ckpt


def test_torchrun_two_processes_hold_identical_weights(domain, encoder_run, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "hyperstyle_nodes.train", "hypernet", "--w-encoder", str(encoder_run / "checkpoints" / "best_model.pt"),
           "--out", str(out), "--max-steps", "2", "--n-iters", "2", "--lr", "1e-3", "--val-interval", "0",
           "--dump-rank-params", *data_args(domain), *fast()]
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    ranks = [torch.load(out / "debug" / f"params_rank{r}.pt", weights_only=True) for r in range(2)]
    saved = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["state_dict"]
    assert saved["hypernet.conv1.weight"].shape == ranks[0]["conv1.weight"].shape
    for name, value in ranks[0].items():
        assert torch.equal(value, ranks[1][name]), name  # gradients were averaged: the same step on both
        assert torch.equal(value, saved[f"hypernet.{name}"]), name  # rank 0 wrote what it holds
    torch.manual_seed(0)  # the trainer's initial weights (--seed 0)
    initial = dict(build_hypernet(GeneratorConfig.stylegan2(SIZE, narrow=1 / 16, style_dim=64), LAYERS,
                                  "micro").named_parameters())
    assert any(not torch.equal(v, initial[k]) for k, v in ranks[0].items())  # the steps did change the weights
    assert len(rows(out / "logs" / "train.csv")) == 2  # one writer: one row per step, not two


def test_synthetic_self_check_end_to_end(tmp_path):
    out = tmp_path / "selfcheck"
    rc = main(["--synthetic", "--out", str(out), "--size", str(SIZE), "--train-images", "8", "--val-images", "4",
               "--encoder-steps", "3", "--hypernet-steps", "3", "--n-iters", "2", "--batch-size", "2",
               "--workers", "0", "--arch", "micro", "--device", "cpu", "--val-interval", "0", "--no-tensorboard"])
    assert rc == 0
    report = json.loads((out / "selfcheck.json").read_text())
    check = report["selfcheck"]
    assert check["val_images"] == 4 and len(check["l2_per_pass_at_256"]) == 3
    assert all(check[k] > 0 for k in ("l2_w_encoder", "l2_hyperstyle", "l2_w_oracle"))
    assert Path(check["grid"]).is_file()
    assert report["encoder"]["step"] == 3 and report["hypernet"]["step"] == 3


# ---- what a newcomer sees: progress, worker counts, the CPU-sized self-check, the summary -----------------------


def test_time_limited_stage_progress_shows_the_time_left():
    now = [1000.0]
    clock = lambda: now[0]  # noqa: E731
    # 10 steps in 30 s after a 10-s validation, a 3-minute budget, 100,000 steps: the budget ends the stage
    bar = StageProgress("encoder", 0, 100_000, 180, elapsed=10, enabled=False, clock=clock)
    assert bar.seconds_left == 170
    now[0] += 30
    bar.update(10, elapsed=40)
    assert bar.seconds_left == pytest.approx(140)  # not 100,000 steps at 3 s (83 hours)
    # the same pace with only 20 steps: the last step ends it, 10 steps from now
    bar = StageProgress("hypernet", 0, 20, 180, elapsed=0, enabled=False, clock=clock)
    now[0] += 30
    bar.update(10, elapsed=30)
    assert bar.seconds_left == pytest.approx(30)
    assert projected_seconds(180, 0, 0, 0, 20) == 180  # before the first step: the budget
    # a first validation longer than the budget: nothing left, not a negative time
    assert StageProgress("hypernet", 0, 20, 240, elapsed=309, enabled=False, clock=clock).seconds_left == 0


def test_time_limited_stage_bar_counts_seconds_of_its_budget(domain, tmp_path, capsys):
    rc = main(["encoder", "--generator", str(domain["generator"]), "--out", str(tmp_path / "enc"), "--max-steps", "3",
               "--max-minutes", "10", "--val-interval", "0", *data_args(domain), *fast()])
    assert rc == 0
    err = capsys.readouterr().err
    assert "encoder (10 min or 3 steps)" in err and " s, left=" in err, err[-2000:]
    assert "/500000" not in err and "/3 [" not in err  # no step-count bar


def test_default_workers_fit_the_machine(monkeypatch):
    for cpus, processes, expected in ((2, 1, 1), (1, 1, 0), (16, 1, 4), (16, 8, 1), (64, 8, 4)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cpus: set(range(n)), raising=False)
        assert default_workers(processes) == expected, (cpus, processes)
    args = build_parser().parse_args(["encoder", "--generator", "g.pt", "--out", "o"])
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert _loop_config(args, Path("o")).workers == default_workers(2)  # --workers left out: the machine's fit


def test_synthetic_domain_build_shows_progress(tmp_path, capsys):
    build_domain(tmp_path, SyntheticDomain(size=SIZE, train_images=6, val_images=2, seed=1), LAYERS, log=print)
    err = capsys.readouterr().err
    assert "synthetic domain" in err and "8/8" in err


def test_self_check_defaults_are_sized_for_the_device():
    args = build_parser().parse_args(["synthetic", "--out", "o", "--size", "32"])
    apply_selfcheck_defaults(args, torch.device("cpu"))
    assert args.size == 32  # given: kept
    cpu = {k: v for k, v in SELFCHECK_DEFAULTS["cpu"].items() if k != "size"}
    assert {k: getattr(args, k) for k in cpu} == cpu
    args = build_parser().parse_args(["synthetic", "--out", "o"])
    apply_selfcheck_defaults(args, torch.device("cuda"))
    assert vars(args).items() >= SELFCHECK_DEFAULTS["gpu"].items()


def test_self_check_summary_says_higher_when_refinement_hurts():
    result = {"val_images": 64, "l2_w_encoder": 0.0500, "l2_hyperstyle": 0.0724, "l2_w_oracle": 0.0300,
              "improvement": 1 - 0.0724 / 0.0500}
    text = describe_result(result, 5)
    assert "44.8% HIGHER" in text and "-44.8" not in text and "lower" not in text
    result.update(l2_hyperstyle=0.0250, improvement=0.5)
    text = describe_result(result, 5)
    assert "50.0% lower" in text and "HIGHER" not in text


# ---- clear errors ---------------------------------------------------------------------------------------------


def test_error_no_images(tmp_path, domain, capsys):
    (tmp_path / "empty").mkdir()
    rc = main(["encoder", "--generator", str(domain["generator"]), "--out", str(tmp_path / "o"), "--domain", "other",
               "--data", str(tmp_path / "empty"), "--lpips-lambda", "0", "--moco-lambda", "0", *fast()])
    assert rc == 2
    assert "no images found" in capsys.readouterr().err


def test_error_encoder_for_another_generator_size(tmp_path, encoder_run, domain, capsys):
    from hyperstyle_nodes.tiny import write_tiny_checkpoints

    other = write_tiny_checkpoints(tmp_path / "tiny64", size=64)["generator"]
    rc = main(["hypernet", "--w-encoder", str(encoder_run / "checkpoints" / "best_model.pt"), "--generator",
               str(other), "--out", str(tmp_path / "o"), *data_args(domain), *fast()])
    assert rc == 2
    err = capsys.readouterr().err
    assert "32-px generator" in err and "64 px" in err and "encoder --generator" in err


@pytest.mark.parametrize("loss", ["lpips", "id", "moco"])
def test_error_missing_loss_weights_says_what_to_do(loss, tmp_path, domain, monkeypatch, capsys):
    registry = tmp_path / "registry.json"
    registry.write_text("{}")
    monkeypatch.setenv("HYPERSTYLE_REGISTRY", str(registry))
    monkeypatch.setenv("HYPERSTYLE_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    lambdas = {"lpips": 0.0, "id": 0.0, "moco": 0.0, loss: 0.5}
    rc = main(["encoder", "--generator", str(domain["generator"]), "--out", str(tmp_path / "o"), "--domain", "other",
               "--lpips-lambda", str(lambdas["lpips"]), "--id-lambda", str(lambdas["id"]),
               "--moco-lambda", str(lambdas["moco"]), "--train-dir", str(domain["train"]),
               "--val-dir", str(domain["val"]), *fast()])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"--{loss}-lambda 0" in err


def test_lpips_lambda_flag_adds_the_loss(tmp_path, domain, monkeypatch):
    """LPIPS wiring with a stand-in network (the real one needs ImageNet AlexNet weights)."""
    from hyperstyle_nodes.train import losses

    class TinyPerceptual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)

        def forward(self, a, b):
            return (self.conv(a) - self.conv(b)).pow(2).mean(dim=(1, 2, 3), keepdim=True)

    monkeypatch.setattr(losses, "build_lpips", lambda weights=None: TinyPerceptual().eval())
    out = tmp_path / "o"
    assert main(["encoder", "--generator", str(domain["generator"]), "--out", str(out), "--max-steps", "2",
                 "--lpips-lambda", "0.8", "--val-interval", "0", *data_args(domain), *fast()]) == 0
    row = rows(out / "logs" / "train.csv")[-1]
    assert float(row["lpips"]) > 0
    assert float(row["loss"]) == pytest.approx(float(row["l2"]) + 0.8 * float(row["lpips"]), rel=1e-4)


def test_pretrained_loss_networks_load_their_released_layouts(tmp_path):
    """ArcFace (TreB1eN key names) and MoCo-v2 (module.encoder_q.*) files load; the right file is required."""
    import torchvision

    from hyperstyle_nodes.train import losses

    arcface = losses.ArcFace()
    keys = arcface.state_dict().keys()
    assert {"input_layer.0.weight", "body.23.res_layer.5.fc2.weight", "output_layer.3.weight",
            "output_layer.4.running_var"} <= set(keys)
    assert len([k for k in keys if k.startswith("body.") and k.endswith("res_layer.1.weight")]) == 24
    torch.save(arcface.state_dict(), tmp_path / "model_ir_se50.pth")
    net = losses.build_arcface(str(tmp_path / "model_ir_se50.pth"))
    assert net(torch.rand(2, 3, 112, 112)).shape == (2, 512)

    resnet = torchvision.models.resnet50(weights=None).state_dict()
    moco = {"state_dict": {f"module.encoder_q.{k}": v for k, v in resnet.items()}, "epoch": 800, "arch": "resnet50"}
    torch.save(moco, tmp_path / "moco.pt")
    assert losses.build_moco(str(tmp_path / "moco.pt"))(torch.rand(1, 3, 64, 64)).shape == (1, 2048)
    torch.save({"state_dict": resnet}, tmp_path / "not_moco.pt")
    with pytest.raises(losses.LossWeightsError, match="--moco-lambda 0"):
        losses.build_moco(str(tmp_path / "not_moco.pt"))


def test_shared_hypernet_is_stored_once(hypernet_run):
    ckpt = torch.load(hypernet_run / "checkpoints" / "best_model.pt", weights_only=True)["state_dict"]
    shared = ckpt["hypernet.shared_weight_hypernet.w2"]
    for layer in LAYERS:  # every shared head's alias is the same tensor, not a copy
        assert ckpt[f"hypernet.refinement_blocks.{layer}.hypernet.w2"].data_ptr() == shared.data_ptr()
