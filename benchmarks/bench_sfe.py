"""Speed and memory of StyleFeatureEditor: invert + one edit, ours against the official code in the same run.

Builds the released shapes (1024 px generator, IResNet-50 inverter with its fuser, the feature editor, IR-SE-50 e4e)
with random weights, no file needed, and times what a user waits for: `invert(images)` (codes, F-space feature and
the reconstruction) followed by one InterFaceGAN-style edit decoded through the feature editor
(`decode(inversion, codes + s/2 d, e4e_codes + s/2 d)`), at each batch size and precision. One JSON line per
measurement (also appended to --out):

    {"kind": "sfe", "impl": "ours" | "official", "gpu", "batch", "precision", "ms_per_image", "invert_ms_per_image",
     "edit_ms_per_image", "peak_alloc_gib", "peak_reserved_gib", "max_abs_diff_vs_official", ...}

ms_per_image: the median over --reps timed calls after --warmup calls, wall clock with torch.cuda.synchronize, divided
by the batch. Precisions: fp32 (TF32 off), tf32 (TF32 convolutions and matmuls), bf16 (ours: the model in bf16; the
official code: torch.autocast to bf16, the closest it has; its CUDA ops take fp32/fp16 only, so a failure is
recorded as an "error" line).

--official DIR times the official code (a checkout of AIRI-Institute/StyleFeatureEditor) the same way: its classes
(FSEFull, psp Generator, Encoder4Editing, Inverter) with random seeded weights, its inversion
(`FSEInferenceRunner._run_on_batch`) and its edit (`FSEInferenceRunner._run_editing_on_batch`, which loops over the
images). Its fused_act/upfirdn2d CUDA extensions are built first (in a child process, --build-timeout seconds); if
they do not build (no nvcc/ninja, CPU) plain-PyTorch reference implementations stand in; the "ops" field says which.
With --official our model is loaded (load_sfe) from official-format files written from the official model's
weights, so both run the same weights and max_abs_diff_vs_official (on the official rows) compares the edited images.

    python benchmarks/bench_sfe.py --table                                     # ours (CUDA)
    python benchmarks/bench_sfe.py --official /path/to/StyleFeatureEditor --table
    python benchmarks/bench_sfe.py --device cpu --tiny --size 128              # CPU smoke test (CI)
    python benchmarks/bench_sfe.py --device cpu --official DIR --parity --skip-bench --size 1024   # parity

--parity (CPU, fp32, the reference ops): the official model read back from official-format random files by its own
FSEFull.load_weights, ours by load_sfe; codes within 1e-4, the inversion and an edited image within 1e-3, and our
batch of 2 against each image alone; one "parity" line with every difference.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import types
from argparse import Namespace
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_pipeline, also when loaded by file path

from hyperstyle_nodes.engines.hyperstyle.encoders import EncoderConfig, build_encoder  # noqa: E402
from hyperstyle_nodes.engines.sfe.feature_editor import FeatureStack, FeatureStackConfig  # noqa: E402
from hyperstyle_nodes.engines.sfe.inverter import Inverter, InverterConfig  # noqa: E402
from hyperstyle_nodes.engines.sfe.model import SFEModel, load_sfe  # noqa: E402
from hyperstyle_nodes.stylegan2.generator import Generator, GeneratorConfig  # noqa: E402
from hyperstyle_nodes.tiny import (TINY_SFE_UNITS, TINY_SFE_WIDTHS, randomize_, tiny_encoder_config,  # noqa: E402
                                   tiny_generator_config)
from bench_pipeline import GIB, Report, memory, sync, test_images  # noqa: E402 - one report format and memory reading for both
from official_code import build_official_ops, patched, reference_ops_module, stub  # noqa: E402

DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16}
EDIT_DEGREE = 5.0  # the official InterFaceGAN edit: codes + degree / 2 * direction
OFFICIAL_OPS = "models.psp.stylegan2.op"  # the official StyleGAN2 CUDA ops (fused_act, upfirdn2d)


# ---- our model ---------------------------------------------------------------------------------------------------

def build_ours(size: int, tiny: bool, seed: int = 0) -> SFEModel:
    """Random weights of the released shapes (or tiny.py's narrow ones), non-trivial BN/PReLU/bias/noise state."""
    rng = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if tiny:
        gen_config = tiny_generator_config(size)
        generator = randomize_(Generator(gen_config), rng).eval()
        channels, _ = generator.feature_shape(9)
        inv_config = InverterConfig(n_styles=gen_config.n_styles, style_dim=gen_config.style_dim,
                                    widths=TINY_SFE_WIDTHS, units=TINY_SFE_UNITS, content_channels=channels,
                                    fuser=FeatureStackConfig(2 * channels, channels))
        editor_config = FeatureStackConfig(2 * channels, channels)
        enc_config = tiny_encoder_config("e4e", gen_config, widths=TINY_SFE_WIDTHS)
    else:
        gen_config = GeneratorConfig.stylegan2(size)
        generator = randomize_(Generator(gen_config), rng).eval()
        inv_config = InverterConfig(n_styles=gen_config.n_styles)
        editor_config = FeatureStackConfig()
        enc_config = EncoderConfig(kind="e4e", n_styles=gen_config.n_styles)
    inverter = randomize_(Inverter(inv_config), rng).eval()
    editor = randomize_(FeatureStack(editor_config), rng).eval()
    e4e = randomize_(build_encoder(enc_config), rng).eval()
    with torch.no_grad():
        latent_avg = generator.mean_latent(1000)[0]
    return SFEModel(generator, inverter, latent_avg, e4e, editor).eval().channels_last_()  # as load_sfe


def edit_direction(style_dim: int, seed: int = 7) -> torch.Tensor:
    """A unit-norm [1, style_dim] W direction, the shape of the official interfacegan_directions/*.pt."""
    d = torch.randn(1, style_dim, generator=torch.Generator().manual_seed(seed))
    return d / d.norm()


class OursRunner:
    impl = "ours"
    ops = "ours"

    def __init__(self, model: SFEModel, direction: torch.Tensor):
        self.model, self.direction = model, direction

    def to(self, device):
        self.model.to(device)
        self.direction = self.direction.to(self.model.device, self.model.dtype)

    def invert(self, images01: torch.Tensor):
        return self.model.invert(images01)

    def edit(self, inversion) -> torch.Tensor:
        move = EDIT_DEGREE / 2 * self.direction
        return self.model.decode(inversion, inversion.codes + move, inversion.e4e_codes + move)


# ---- the official code -------------------------------------------------------------------------------------------

def import_official(official_dir, device: torch.device, build_ops: bool = True,
                    build_timeout: float = 150) -> types.SimpleNamespace:
    """Import the official modules from a checkout. Training/metrics-only dependencies are stubbed (wandb, omegaconf,
    the runner base class, the metrics registry; its class registry, whose dataclass defaults Python 3.11 refuses);
    the op package is the built CUDA extension or the reference stand-ins."""
    root = Path(official_dir).resolve()
    if not (root / "models" / "methods.py").is_file() or not (root / "runners" / "inference_runners.py").is_file():
        raise SystemExit(f"--official {official_dir}: not a StyleFeatureEditor checkout (no models/methods.py or "
                         f"runners/inference_runners.py); clone github.com/AIRI-Institute/StyleFeatureEditor there.")
    ops = build_official_ops(root, OFFICIAL_OPS, device, build_timeout) if build_ops else "reference (not built: --no-build-ops)"
    taken = [name for name in ("models", "utils", "configs", "training", "runners", "editings", "datasets", "criteria")
             if name in sys.modules and not str(getattr(sys.modules[name], "__file__", "") or
                                                 getattr(sys.modules[name], "__path__", [""])[0]).startswith(str(root))]
    if taken:
        raise RuntimeError(f"top-level modules {taken} are already imported from elsewhere; run the official code "
                           f"in a fresh process")
    sys.path.insert(0, str(root))
    for name in ("wandb",):
        if name not in sys.modules:
            with contextlib.suppress(ImportError):
                __import__(name)
        sys.modules.setdefault(name, types.ModuleType(name))
    with contextlib.suppress(ImportError):
        import omegaconf  # noqa: F401
    if "omegaconf" not in sys.modules:
        stub("omegaconf", MISSING="???")

    class ClassRegistry:
        def __init__(self):
            self.classes = {}

        def __getitem__(self, name):
            return self.classes[name]

        def add_to_registry(self, name, *args, **kwargs):
            def add(cls):
                self.classes[name] = cls
                return cls
            return add

    stub("utils.class_registry", ClassRegistry=ClassRegistry)
    stub("runners.base_runner", BaseRunner=object)
    stub("metrics.metrics", metrics_registry=ClassRegistry())
    if ops != "cuda-ext":
        sys.modules[OFFICIAL_OPS] = reference_ops_module(OFFICIAL_OPS)
    elif "torch.utils.cpp_extension" in sys.modules and os.environ.get("CUDA_HOME"):
        # imported before build_official_ops chose the toolkit: the same paths as the child builds, else the
        # official import here would see a changed build file and compile again
        sys.modules["torch.utils.cpp_extension"].CUDA_HOME = os.environ["CUDA_HOME"]
    import importlib
    mods = {name: importlib.import_module(path) for name, path in (
        ("methods", "models.methods"), ("runners", "runners.inference_runners"),
        ("encoders", "models.psp.encoders.psp_encoders"), ("resnet", "models.psp.encoders.feature_resnet"),
        ("stylegan", "models.psp.stylegan2.model"))}
    return types.SimpleNamespace(root=root, ops=ops, **mods)


@torch.no_grad()
def calibrate_batchnorm_(module: nn.Module, run) -> None:
    """Set every BatchNorm's running statistics to those of its input during `run()` (a cumulative average over one
    forward), so that random weights keep a realistic scale through deep residual stacks (uncalibrated, IResNet-50's
    24 blocks grow activations to ~1e28 and every image saturates); the affine weights stay random."""
    norms = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    run()
    for m in norms:
        m.momentum = 0.1
        m.eval()


def build_official(off, size: int = 1024, seed: int = 0, device="cpu", calibrate: bool = True) -> nn.Module:
    """The official FSEFull with random seeded weights, assembled as its __init__ does (set_encoder: Inverter,
    Encoder4Editing(50, 'ir_se'), ContentLayerDeepFast(6, 1024, 512); Generator(size, 512, 8)) minus the file reads:
    FSLikeBackbone's torch.load of ArcFace's IResNet-50 gets that network's own random state, and a stand-in
    module takes the training discriminator's place (the file's `discriminator.*`)."""
    n_styles = 2 * int(math.log2(size)) - 2
    torch.manual_seed(seed)
    rng = torch.Generator().manual_seed(seed)
    opts = Namespace(device=str(device), checkpoint_path="", stylegan_size=size, arcface_model_path="<random>")
    arcface = off.resnet.iresnet50().state_dict()
    with patched(torch, "load", lambda *args, **kwargs: arcface):
        inverter = off.encoders.Inverter(n_styles=n_styles, opts=opts)
    fse = off.methods.FSEFull.__new__(off.methods.FSEFull)
    nn.Module.__init__(fse)
    fse.opts, fse.device, fse.inverter_pth = opts, str(device), None
    fse.inverter = randomize_(inverter, rng)
    fse.e4e_encoder = randomize_(off.encoders.Encoder4Editing(50, "ir_se", opts), rng)
    fse.encoder = randomize_(off.encoders.ContentLayerDeepFast(6, 1024, 512), rng)
    fse.decoder = randomize_(off.stylegan.Generator(size, 512, 8), rng)
    fse.discriminator = nn.Linear(16, 1)  # stands for the training discriminator the released files carry
    fse.pool = nn.AdaptiveAvgPool2d((256, 256))
    fse.eval().requires_grad_(False).to(device)  # first: on CUDA the official mapping network runs its CUDA op
    with torch.no_grad():
        fse.latent_avg = fse.decoder.mean_latent(1000)[0]
    if calibrate:
        _calibrate_official(fse, seed)
    return fse


@torch.no_grad()
def _calibrate_official(fse: nn.Module, seed: int) -> None:
    """calibrate_batchnorm_ for each network on what it reads in the official pipeline: the inverter and e4e on
    images, the fuser on [predicted feature, the generator's feature 9], the feature editor on [fused, an edit's
    delta]."""
    device = fse.latent_avg.device
    x = test_images(2, 256, seed=seed + 99).to(device) * 2 - 1
    inverter = fse.inverter
    calibrate_batchnorm_(inverter.fs_backbone, lambda: inverter.fs_backbone(x))
    calibrate_batchnorm_(fse.e4e_encoder, lambda: fse.e4e_encoder(x))
    codes, predicted = inverter.fs_backbone(x)
    codes = codes + fse.latent_avg

    def feature(w):
        return fse.decoder([w], input_is_latent=True, return_features=True, randomize_noise=False,
                           early_stop=64)[1][9]

    own = feature(codes)
    calibrate_batchnorm_(inverter.fuser, lambda: inverter.fuser(torch.cat([predicted, own], dim=1)))
    fused = inverter.fuser(torch.cat([predicted, own], dim=1))
    move = 2 * edit_direction(codes.shape[-1], seed + 5).to(device)
    delta = own - feature(codes + move)
    calibrate_batchnorm_(fse.encoder, lambda: fse.encoder(torch.cat([fused, delta], dim=1)))
    # the random generator's SFE images have a std of ~7 (most pixels would clamp in [0, 1]): scale its to-RGB
    # layers (linear in their weights and biases; nothing else reads them) to a std of 0.5 for the inversion
    edited = fse.encoder(torch.cat([fused, torch.zeros_like(fused)], dim=1))
    image = fse.decoder([codes], input_is_latent=True, randomize_noise=False,
                        new_features=[None] * 9 + [edited] + [None] * 8)[0]
    gain = 0.5 / float(image.std())
    for to_rgb in [fse.decoder.to_rgb1, *fse.decoder.to_rgbs]:
        to_rgb.conv.weight.mul_(gain)
        to_rgb.bias.mul_(gain)


def write_official_files(fse: nn.Module, folder) -> dict:
    """The official layouts: the editor file (`state_dict` with `encoder.*` = the feature editor, `inverter.*`,
    `discriminator.*`, plus latent_avg, as the training runner's get_save_dict minus the decoder and e4e copies),
    e4e_ffhq_encode.pt (`encoder.*`, `decoder.*`, latent_avg [n_styles, 512] and opts) and the rosinality generator
    file (`g_ema`, latent_avg [512]). The e4e file's latent_avg differs from the generator's on purpose: the official
    code adds the generator file's to both codes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in fse.state_dict().items()}
    pick = lambda *prefixes: {k: v for k, v in state.items() if k.split(".")[0] in prefixes}  # noqa: E731
    latent_avg = fse.latent_avg.detach().cpu().float()
    size = fse.decoder.size
    paths = {"sfe_editor": folder / "sfe_editor.pt", "e4e": folder / "e4e.pt", "generator": folder / "generator.pt"}
    torch.save({"state_dict": pick("encoder", "inverter", "discriminator"), "latent_avg": latent_avg},
               paths["sfe_editor"])
    decoder = {f"decoder.{k}": v for k, v in fse.decoder.state_dict().items()}
    e4e = {f"encoder.{k}": v for k, v in fse.e4e_encoder.state_dict().items()}
    n_styles = 2 * int(math.log2(size)) - 2
    torch.save({"state_dict": {**e4e, **decoder}, "latent_avg": latent_avg.expand(n_styles, -1) + 0.25,
                "opts": {"stylegan_size": size, "encoder_type": "Encoder4Editing", "start_from_latent_avg": True,
                         "dataset_type": "ffhq_encode", "device": "cpu"}}, paths["e4e"])
    torch.save({"g_ema": {k: v.detach().cpu() for k, v in fse.decoder.state_dict().items()},
                "latent_avg": latent_avg}, paths["generator"])
    return paths


def _scratch_dir():
    """Where the temporary official-format files go: memory (/dev/shm) when there is room for the released ~2 GB."""
    shm = Path("/dev/shm")
    with contextlib.suppress(OSError):
        if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 6 * GIB:
            return str(shm)
    return None


class OfficialRunner:
    """The official inversion and edit: FSEInferenceRunner's methods on a stand-in runner holding the model, with
    the InterFaceGAN edit formula of LatentEditor.get_interface_gan_edits (w + degree / 2 * direction)."""
    impl = "official"

    def __init__(self, off, fse: nn.Module, direction: torch.Tensor, device, autocast_dtype=None):
        self.off, self.fse, self.device = off, fse, torch.device(device)
        self.ops = off.ops
        self.autocast_dtype = autocast_dtype
        self.direction = direction
        self.runner = types.SimpleNamespace(
            method=fse, device=self.device,
            get_edited_latent=lambda latent, name, degrees, image=None: [latent + d / 2 * self.direction.to(latent)
                                                                         for d in degrees])

    def to(self, device):
        self.fse.to(device)
        self.fse.latent_avg = self.fse.latent_avg.to(device)  # a plain attribute in FSEFull, not a buffer
        self.fse.device = str(device)

    def _context(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def invert(self, images01: torch.Tensor):
        with self._context():
            _, batch = self.off.runners.FSEInferenceRunner._run_on_batch(self.runner, images01 * 2 - 1)
        return batch

    def invert_full(self, images01: torch.Tensor):
        """(images in [-1, 1], the runner's result batch)."""
        with self._context():
            return self.off.runners.FSEInferenceRunner._run_on_batch(self.runner, images01 * 2 - 1)

    def edit(self, batch) -> torch.Tensor:
        with self._context():
            edited = self.off.runners.FSEInferenceRunner._run_editing_on_batch(self.runner, batch, "direction",
                                                                               [EDIT_DEGREE])
        return ((edited[:, 0].float() + 1) / 2).clamp(0, 1)  # [B, 1, 3, R, R] in [-1, 1] -> ours' range


# ---- parity (CPU, fp32) ------------------------------------------------------------------------------------------

PARITY_LIMITS = {"codes": 1e-4, "e4e_codes": 1e-4, "inversion": 1e-3, "edited": 1e-3}


def parity_check(off, size: int, input_size: int, report, seed: int = 0) -> dict:
    """Ours against the official code on official-format random files, CPU fp32: the official model is read back from
    the files by the official FSEFull.load_weights (into a differently seeded one), ours by load_sfe. Codes within
    1e-4, the inversion and an InterFaceGAN-style edit within 1e-3 (images in [0, 1]; the raw [-1, 1] generator
    outputs are reported too), and our batch of 2 against each image alone."""
    from hyperstyle_nodes.engines.sfe import model as sfe_model
    start = time.perf_counter()
    source = build_official(off, size, seed=seed)
    with tempfile.TemporaryDirectory(prefix="sfe_parity_", dir=_scratch_dir()) as tmp:
        files = write_official_files(source, tmp)
        official = build_official(off, size, seed=seed + 1, calibrate=False)
        official.opts.checkpoint_path = str(files["sfe_editor"])
        official.opts.stylegan_weights = str(files["generator"])
        official.opts.e4e_path = str(files["e4e"])
        with contextlib.redirect_stdout(sys.stderr):
            off.methods.FSEFull.load_weights(official)
        official.eval()
        expected, loaded = source.state_dict(), official.state_dict()
        not_restored = [k for k in expected if not torch.equal(expected[k], loaded[k])]
        if not_restored or not torch.equal(source.latent_avg, official.latent_avg):
            raise RuntimeError(f"the official loader did not read back {not_restored[:5]} from the files")
        del source, expected, loaded
        ours = load_sfe(files["sfe_editor"], e4e=files["e4e"], generator=files["generator"])
    g = torch.Generator().manual_seed(seed + 1234)
    images = test_images(2, input_size, seed=seed + 1234)
    images = (images + 0.05 * torch.randn(images.shape, generator=g)).clamp(0, 1)
    direction = edit_direction(ours.generator.style_dim)
    move = EDIT_DEGREE / 2 * direction
    runner = OfficialRunner(off, official, direction, "cpu")
    with torch.inference_mode():
        off_images, off_batch = runner.invert_full(images)
        off_edit = off.runners.FSEInferenceRunner._run_editing_on_batch(runner.runner, off_batch, "direction",
                                                                        [EDIT_DEGREE])[:, 0]
    raw = lambda t: t.float()  # noqa: E731
    unit = lambda t: ((t.float() + 1) / 2).clamp(0, 1)  # noqa: E731
    mad = lambda a, b: float((a.float() - b.float()).abs().max())  # noqa: E731
    saved = sfe_model.to_unit_range
    sfe_model.to_unit_range = raw  # our generator's raw output, to compare before the [0, 1] clamp as well
    try:
        def ours_run(x):
            with torch.inference_mode():
                inv = ours.invert(x)
                return inv, ours.decode(inv, inv.codes + move, inv.e4e_codes + move)
        inv, edited = ours_run(images)
        alone = {}
        for i in range(2):
            inv1, edited1 = ours_run(images[i:i + 1])
            for name, a, b in (("codes", inv1.codes, inv.codes), ("e4e_codes", inv1.e4e_codes, inv.e4e_codes),
                               ("features", inv1.features, inv.features), ("inversion", unit(inv1.images),
                                                                           unit(inv.images)),
                               ("edited", unit(edited1), unit(edited))):
                alone[name] = max(alone.get(name, 0.0), mad(a, b[i:i + 1]))
    finally:
        sfe_model.to_unit_range = saved
    diffs = {"codes": mad(inv.codes, off_batch["latents"]), "e4e_codes": mad(inv.e4e_codes, off_batch["w_e4e"]),
             "features": mad(inv.features, off_batch["fused_feat"]),
             "inversion": mad(unit(inv.images), unit(off_images)), "edited": mad(unit(edited), unit(off_edit)),
             "inversion_raw": mad(inv.images, off_images), "edited_raw": mad(edited, off_edit)}
    failed = sorted([k for k, limit in PARITY_LIMITS.items() if not diffs[k] <= limit] +
                    [f"alone_{k}" for k in ("codes", "e4e_codes") if not alone[k] <= 1e-4] +
                    [f"alone_{k}" for k in ("inversion", "edited") if not alone[k] <= 1e-3])
    scale = {"codes_abs_max": float(off_batch["latents"].abs().max()),
             "inversion_fraction_clamped": float((off_images.abs() > 1).float().mean()),
             "features_abs_max": float(off_batch["fused_feat"].abs().max()),
             "inversion_raw_std": float(off_images.std()),
             "edit_changes_image_mean": float((unit(off_edit) - unit(off_images)).abs().mean())}
    return report(kind="parity", ops=off.ops, input_size=input_size, max_abs_diff=diffs,
                  batch2_vs_alone_max_abs_diff=alone, scale=scale, limits=PARITY_LIMITS, failed=failed,
                  ok=not failed, seconds=round(time.perf_counter() - start, 1))


# ---- timing ------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def precision_flags(precision: str):
    """fp32 means true fp32 (TF32 off); tf32 turns TF32 on for convolutions and matmuls; bf16 does not use TF32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def reset_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def time_runner(runner, images: torch.Tensor, device, warmup: int, reps: int):
    """(total, invert, edit) medians in seconds per call and the last edited images."""
    totals, inverts, edits = [], [], []
    edited = None
    with torch.inference_mode():
        for i in range(warmup + reps):
            sync(device)
            start = time.perf_counter()
            inversion = runner.invert(images)
            sync(device)
            middle = time.perf_counter()
            edited = runner.edit(inversion)
            sync(device)
            end = time.perf_counter()
            if i >= warmup:
                totals.append(end - start)
                inverts.append(middle - start)
                edits.append(end - middle)
    return statistics.median(totals), statistics.median(inverts), statistics.median(edits), edited


def print_table(rows):
    timed = [r for r in rows if r["kind"] == "sfe" and r.get("ms_per_image") is not None]
    official = {(r["batch"], r["precision"]): r for r in timed if r["impl"] == "official"}
    best_official = {}
    for r in official.values():
        if r["batch"] not in best_official or r["ms_per_image"] < best_official[r["batch"]]:
            best_official[r["batch"]] = r["ms_per_image"]
    lines = ["| GPU | impl (ops) | batch | precision | invert + edit ms/image | invert | edit | peak alloc GiB | "
             "vs official, same precision | vs official's fastest | max abs diff vs official |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in timed:
        same = official.get((r["batch"], r["precision"]))
        speedup = f"{same['ms_per_image'] / r['ms_per_image']:.2f}x" if same and r["impl"] == "ours" else "-"
        best = best_official.get(r["batch"])
        vs_best = f"{best / r['ms_per_image']:.2f}x" if best and r["impl"] == "ours" else "-"
        diff = r.get("max_abs_diff_vs_official")
        lines.append(f"| {r['gpu']} | {r['impl']} ({r['ops']}) | {r['batch']} | {r['precision']} | "
                     f"{r['ms_per_image']} | {r['invert_ms_per_image']} | {r['edit_ms_per_image']} | "
                     f"{r['peak_alloc_gib'] if r['peak_alloc_gib'] is not None else '-'} | {speedup} | {vs_best} | "
                     f"{diff if diff is not None else '-'} |")
    for r in rows:
        if r["kind"] == "sfe" and r.get("error"):
            lines.append(f"| {r['gpu']} | {r['impl']} ({r['ops']}) | {r['batch']} | {r['precision']} | "
                         f"failed: {r['error'][:80]} | | | | | | |")
    print("\n".join(lines), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", type=int, default=1024, help="generator resolution (the released 1024)")
    p.add_argument("--input-size", type=int, default=None, help="input images' side (default: --size)")
    p.add_argument("--tiny", action="store_true", help="ours only: tiny.py's narrow widths (CPU smoke tests)")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--precisions", default="tf32,bf16")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--official", default=None, metavar="DIR", help="also time the official code from this checkout")
    p.add_argument("--no-build-ops", dest="build_ops", action="store_false",
                   help="official: use the reference ops without trying to build the CUDA extensions")
    p.add_argument("--build-timeout", type=float, default=150, help="seconds for building the official CUDA ops")
    p.add_argument("--parity", action="store_true",
                   help="with --official: ours against the official code on CPU in fp32 (at --size) first")
    p.add_argument("--skip-bench", action="store_true", help="no timing (e.g. only --parity)")
    p.add_argument("--cudnn-benchmark", action="store_true")
    p.add_argument("--label", default="", help="free text added to every line")
    p.add_argument("--out", default=None, help="append JSON lines to this file")
    p.add_argument("--table", action="store_true", help="print a markdown table at the end")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.precisions = args.precisions.split(",")
    unknown = set(args.precisions) - set(DTYPES)
    if unknown:
        p.error(f"--precisions: unknown {', '.join(sorted(unknown))} (use {', '.join(DTYPES)})")
    if args.parity and not args.official:
        p.error("--parity compares with the official code: give --official DIR")
    if args.parity and args.device != "cpu":
        p.error("--parity runs on the CPU in fp32 with the reference ops: add --device cpu")
    if args.official and args.tiny:
        p.error("--tiny narrows only our networks; with --official both run the official widths (use --size 128 "
                "for a small generator instead)")
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report = Report(args.out, {"gpu": gpu, "size": args.size, "tiny": args.tiny, "label": args.label})
    report(kind="env", torch=torch.__version__, cuda=torch.version.cuda,
           cudnn=torch.backends.cudnn.version() if device.type == "cuda" else None, reps=args.reps,
           warmup=args.warmup, edit_degree=EDIT_DEGREE, official=args.official)

    start = time.perf_counter()
    off = fse = None
    if args.official:
        off = import_official(args.official, device, args.build_ops, args.build_timeout)
        report(kind="official_ops", ops=off.ops)
    if args.parity:
        row = parity_check(off, args.size, args.input_size or args.size, report)
        if not row["ok"]:
            print(f"# PARITY FAILED: {row['failed']}", file=sys.stderr, flush=True)
    if args.skip_bench:
        if args.table:
            print_table(report.rows)
        return report.rows
    if args.official:
        fse = build_official(off, args.size, seed=0, device=device)
        with tempfile.TemporaryDirectory(prefix="bench_sfe_", dir=_scratch_dir()) as tmp:
            files = write_official_files(fse, tmp)
            master = load_sfe(files["sfe_editor"], e4e=files["e4e"], generator=files["generator"])
        fse.to("cpu")
        fse.latent_avg = fse.latent_avg.cpu()
    else:
        master = build_ours(args.size, args.tiny)
    print(f"# built the model(s) in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    direction = edit_direction(master.generator.style_dim)
    images = test_images(max(args.batches), args.input_size or args.size).to(device)

    for precision in args.precisions:
        dtype = DTYPES[precision]
        with precision_flags(precision):
            runners = [OursRunner(copy.deepcopy(master).to(dtype=dtype), direction)]
            if fse is not None:
                runners.append(OfficialRunner(off, fse, direction, device,
                                              autocast_dtype=None if dtype == torch.float32 else dtype))
            for batch in args.batches:
                x = images[:batch]
                results = {}
                for runner in runners:  # one model on the device at a time: peak memory is its own
                    runner.to(device)
                    reset_memory(device)
                    common = dict(kind="sfe", impl=runner.impl, ops=runner.ops, batch=batch, precision=precision)
                    try:
                        total, inv, edit, edited = time_runner(runner, x, device, args.warmup, args.reps)
                    except Exception as error:  # e.g. the official CUDA ops refusing bf16
                        report(**common, ms_per_image=None, error=f"{type(error).__name__}: {error}"[:500])
                        continue
                    finally:
                        runner.to("cpu")
                    results[runner.impl] = edited.float()
                    row = dict(common, ms_per_image=round(1000 * total / batch, 3),
                               invert_ms_per_image=round(1000 * inv / batch, 3),
                               edit_ms_per_image=round(1000 * edit / batch, 3), **memory(device),
                               finite=bool(torch.isfinite(edited).all()))
                    if runner.impl == "official" and "ours" in results:
                        row["max_abs_diff_vs_official"] = round((results["ours"] - edited.float()).abs().max().item(), 6)
                    report(**row)
            del runners
    if args.table:
        print_table(report.rows)
    return report.rows


if __name__ == "__main__":
    sys.exit(1 if any(r["kind"] == "parity" and not r["ok"] for r in main()) else 0)
