"""Shared pytest fixtures.

Real assets (face photos, RetinaFace weights, edit directions) live outside the repo in `../shared`
(override with HYPERSTYLE_TEST_ASSETS). Tests that need them skip, with the reason, only when the folder is absent.
"""
import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Every place a test (or a library it runs: huggingface_hub, torch.hub) could write per-user files by default.
SANDBOXED_ENV = ("HOME", "USERPROFILE", "LOCALAPPDATA", "XDG_CACHE_HOME", "HF_HOME", "TORCH_HOME",
                 "HYPERSTYLE_MODELS_DIR")
_sandbox = {}


def pytest_configure(config):
    """Tests never write outside temporary folders: the home folder, the user caches and the models folder point
    into one temporary folder for the whole run. Set here, before test modules are imported, because libraries
    such as huggingface_hub read their cache paths at import."""
    root = Path(tempfile.mkdtemp(prefix="hyperstyle-tests-home-"))
    _sandbox["root"], _sandbox["patch"] = root, pytest.MonkeyPatch()
    for name in SANDBOXED_ENV:
        _sandbox["patch"].setenv(name, str(root / name.lower()))


def pytest_unconfigure(config):
    if _sandbox:
        _sandbox.pop("patch").undo()
        shutil.rmtree(_sandbox.pop("root"), ignore_errors=True)


def _assets_root() -> Path:
    return Path(os.environ.get("HYPERSTYLE_TEST_ASSETS", REPO_ROOT.parent / "shared")).resolve()


@pytest.fixture(scope="session")
def assets_dir() -> Path:
    root = _assets_root()
    if not root.is_dir():
        pytest.skip(f"real test assets not found at {root} (set HYPERSTYLE_TEST_ASSETS to the shared/ folder)")
    return root


@pytest.fixture(scope="session")
def face_photos(assets_dir) -> list:
    photos = sorted((assets_dir / "testdata" / "faces").glob("*.*"))
    if not photos:
        pytest.skip(f"no face photos under {assets_dir / 'testdata' / 'faces'}")
    return photos


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory) -> dict:
    """Tiny random HyperStyle / W-encoder / e4e / generator files in the released formats (128 px)."""
    from hyperstyle_nodes.tiny import write_tiny_checkpoints

    return write_tiny_checkpoints(tmp_path_factory.mktemp("tiny_ckpts"), size=128, seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_ckpts):
    from hyperstyle_nodes import load_hyperstyle

    return load_hyperstyle(tiny_ckpts["hyperstyle"], w_encoder=tiny_ckpts["w_encoder"])


@pytest.fixture(scope="session")
def face_batch():
    """Two smooth random 'images' in [0, 1] at 256x256 (content does not matter for engine tests)."""
    import torch

    g = torch.Generator().manual_seed(1234)
    low = torch.rand(2, 3, 16, 16, generator=g)
    return torch.nn.functional.interpolate(low, size=(256, 256), mode="bilinear", align_corners=False)


def install_fake_comfy(monkeypatch, progress_bar, interrupt) -> None:
    """Stand-ins for the two ComfyUI modules the nodes use for progress and cancel (comfy.utils.ProgressBar,
    comfy.model_management.throw_exception_if_processing_interrupted)."""
    import sys
    import types

    comfy = types.ModuleType("comfy")
    comfy.utils = types.SimpleNamespace(ProgressBar=progress_bar)
    comfy.model_management = types.SimpleNamespace(throw_exception_if_processing_interrupted=interrupt)
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.utils", comfy.utils)
    monkeypatch.setitem(sys.modules, "comfy.model_management", comfy.model_management)
