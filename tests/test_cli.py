"""The headless CLI end to end on the real photos, with tiny checkpoints from a models folder."""
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from hyperstyle_nodes import cli


@pytest.fixture(autouse=True)
def restore_environment(monkeypatch):
    """The CLI sets HYPERSTYLE_MODELS_DIR / HF_HUB_OFFLINE for its process; undo that after each test."""
    monkeypatch.delenv("HYPERSTYLE_MODELS_DIR", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


@pytest.fixture()
def models_dir(tiny_ckpts, assets_dir, tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    for name, path in tiny_ckpts.items():
        shutil.copy(path, folder / f"tiny_{name}.pt")
    shutil.copy(assets_dir / "models/retinaface/retinaface_mobilenet0.25.pth", folder)
    torch.save(torch.randn(1, 64), folder / "tiny_age.pt")
    return folder


def tiny_args(models_dir, *extra):
    return ["--models-dir", str(models_dir), "--checkpoint", "tiny_hyperstyle.pt", "--encoder", "tiny_w_encoder.pt",
            "--detector", "retinaface_mobilenet0.25.pth", "--align-size", "256", "--iterations", "2", "--device",
            "cpu", "--offline", *extra]


def test_edits_every_photo_keeping_its_size(models_dir, assets_dir, tmp_path):
    faces = assets_dir / "testdata" / "faces"
    out = tmp_path / "out"
    code = cli.main(["edit", str(faces), "--out", str(out), "--edit", "tiny_age.pt=+2", "--save-aligned",
                     "--save-inversion", *tiny_args(models_dir)])
    assert code == cli.EXIT_OK
    for photo in sorted(faces.iterdir()):
        edited = out / f"{photo.stem}_edited.png"
        assert edited.is_file(), edited
        assert Image.open(edited).size == Image.open(photo).size
        assert (out / f"{photo.stem}_aligned.png").is_file()
        assert (out / f"{photo.stem}_inversion.safetensors").is_file()


def test_folder_without_faces_fails_clearly(models_dir, tmp_path, capsys):
    empty = tmp_path / "landscapes"
    empty.mkdir()
    Image.new("RGB", (320, 240), (90, 140, 200)).save(empty / "sky.png")
    code = cli.main(["edit", str(empty), "--out", str(tmp_path / "o"), *tiny_args(models_dir)])
    assert code == cli.EXIT_NO_FACE
    assert "no face was found in any photo" in capsys.readouterr().err


def test_missing_weights_offline(tmp_path, capsys, assets_dir):
    photo = assets_dir / "testdata" / "faces" / "astronaut.png"
    code = cli.main(["edit", str(photo), "--out", str(tmp_path / "o"), "--models-dir", str(tmp_path / "empty"),
                     "--offline", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_WEIGHTS
    assert "retinaface_resnet50" in err or "detection_Resnet50_Final.pth" in err
    assert str(tmp_path / "empty") in err


def test_bad_edit_flag(tmp_path, capsys, assets_dir):
    photo = assets_dir / "testdata" / "faces" / "astronaut.png"
    assert cli.main(["edit", str(photo), "--out", str(tmp_path), "--edit", "age"]) == cli.EXIT_USAGE
    assert "expected NAME=STRENGTH" in capsys.readouterr().err


def test_help_explains_every_flag():
    result = subprocess.run([sys.executable, "-m", "hyperstyle_nodes", "edit", "--help"], capture_output=True,
                            text=True)
    assert result.returncode == 0
    for flag in ("--out", "--edit", "--layers", "--iterations", "--checkpoint", "--encoder", "--detector", "--faces",
                 "--threshold", "--align-size", "--feather", "--device", "--precision", "--models-dir", "--offline",
                 "--save-aligned", "--save-inversion"):
        assert flag in result.stdout
