"""The headless CLI end to end on the real photos, with tiny checkpoints from a models folder."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from hyperstyle_nodes import cli

REPO_ROOT = Path(__file__).resolve().parents[1]


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


def test_offline_run_lists_every_missing_file_at_once(tmp_path, capsys, assets_dir):
    """Nothing downloaded: one run names the detector, checkpoint, encoder and each direction, with URL and path."""
    from hyperstyle_nodes.loaders import downloads

    photo = assets_dir / "testdata" / "faces" / "astronaut.png"
    empty = tmp_path / "empty"
    code = cli.main(["edit", str(photo), "--out", str(tmp_path / "o"), "--models-dir", str(empty), "--offline",
                     "--device", "cpu", "--edit", "age=2", "--edit", "interfacegan_smile=-1", "--edit", "age=-1"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_WEIGHTS
    registry = downloads.load_registry()
    for name in ("retinaface_resnet50", "hyperstyle_ffhq", "faces_w_encoder", "interfacegan_age",
                 "interfacegan_smile"):
        entry = registry[name]
        assert entry.url in err, name
        assert err.count(f"save as {empty / entry.local_name}\n") == 1, name  # each once, age asked for twice
    assert "--offline was given" in err and "HF_HUB_OFFLINE" not in err  # what the user did, not how we did it
    assert not empty.exists()  # nothing created or downloaded


def test_failed_download_also_names_the_other_missing_files(tmp_path, capsys, assets_dir, monkeypatch):
    """Online but unreachable: the download error comes with the rest of what is missing, not one file per run."""
    from hyperstyle_nodes import ops
    from hyperstyle_nodes.loaders import downloads

    def unreachable(name, device):
        raise downloads.WeightsUnavailableError(f"'{name}' is not downloaded yet and the Hub could not be reached")

    monkeypatch.setattr(ops, "load_detector", unreachable)
    photo = assets_dir / "testdata" / "faces" / "astronaut.png"
    code = cli.main(["edit", str(photo), "--out", str(tmp_path / "o"), "--models-dir", str(tmp_path / "empty"),
                     "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_WEIGHTS
    assert "'retinaface_resnet50' is not downloaded yet" in err
    assert "--checkpoint hyperstyle_ffhq" in err and "--encoder faces_w_encoder" in err
    assert "--detector" not in err.split("Also not downloaded yet")[1]


@pytest.mark.parametrize("flag, value", [("--iterations", "-3"), ("--threshold", "1.0"), ("--feather", "-1"),
                                         ("--layers", "a:b")])
def test_values_the_run_cannot_use_are_usage_errors(tmp_path, capsys, assets_dir, flag, value):
    photo = assets_dir / "testdata" / "faces" / "astronaut.png"
    code = cli.main(["edit", str(photo), "--out", str(tmp_path / "o"), "--models-dir", str(tmp_path / "empty"),
                     "--offline", flag, value])
    assert code == cli.EXIT_USAGE
    assert flag in capsys.readouterr().err


def test_unknown_edit_name_is_a_usage_error_listing_the_known_names(models_dir, tmp_path, capsys, assets_dir):
    photo = assets_dir / "testdata" / "faces" / "astronaut.png"
    code = cli.main(["edit", str(photo), "--out", str(tmp_path / "o"), "--edit", "unknown=2", *tiny_args(models_dir)])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE
    assert "--edit unknown=2" in err
    for known in ("age", "smile", "pose", "interfacegan_age", "ganspace_ffhq_pca"):
        assert known in err


def test_registry_name_of_another_kind_is_a_usage_error(tmp_path, capsys, assets_dir):
    photo = assets_dir / "testdata" / "faces" / "astronaut.png"
    code = cli.main(["edit", str(photo), "--out", str(tmp_path / "o"), "--models-dir", str(tmp_path / "empty"),
                     "--offline", "--encoder", "hyperstyle_ffhq"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE
    assert "--encoder hyperstyle_ffhq" in err and "faces_w_encoder, e4e_ffhq_encode" in err


@pytest.mark.parametrize("where", ["a file", "inside a file"])
def test_unwritable_out_is_refused_up_front(tmp_path, capsys, assets_dir, where):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a user's file")
    out = blocker if where == "a file" else blocker / "results"
    photo = assets_dir / "testdata" / "faces" / "astronaut.png"
    code = cli.main(["edit", str(photo), "--out", str(out), "--models-dir", str(tmp_path / "empty"), "--offline"])
    assert code == cli.EXIT_USAGE  # before any weights are looked at
    assert f"--out {out}" in capsys.readouterr().err
    assert blocker.read_text() == "a user's file"


def test_outputs_never_collide_or_replace_a_file(models_dir, assets_dir, tmp_path, capsys):
    """same.jpg + same.png give two results; with --out = the input folder, the user's p_edited.png survives."""
    folder = tmp_path / "photos"
    folder.mkdir()
    sources = {"same.jpg": "portrait_a.jpg", "same.png": "portrait_b.jpg", "p.png": "astronaut.png",
               "p_edited.png": "portrait_b.jpg"}  # the last: a user's photo that happens to end in _edited
    for name, source in sources.items():
        photo = Image.open(assets_dir / "testdata" / "faces" / source).convert("RGB")
        photo.thumbnail((256, 256))  # small: this test is about names, not quality
        photo.save(folder / name, format="JPEG" if name.endswith(".jpg") else "PNG")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    sizes = {name: Image.open(folder / name).size for name in before}

    code = cli.main(["edit", str(folder), "--out", str(folder), *tiny_args(models_dir), "--iterations", "0"])
    output = capsys.readouterr()
    assert code == cli.EXIT_OK
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.name in before} == before  # no input touched
    written = sorted(set(p.name for p in folder.iterdir()) - set(before))
    assert written == ["p_edited_1.png", "p_edited_edited.png", "same_jpg_edited.png", "same_png_edited.png"]
    assert Image.open(folder / "same_jpg_edited.png").size == sizes["same.jpg"]
    assert Image.open(folder / "same_png_edited.png").size == sizes["same.png"]
    assert "wrote p_edited_1.png instead" in output.out + output.err  # the user is told
    assert "edited 4 of 4" in output.out


def test_bad_photos_are_skipped_and_the_rest_edited(models_dir, assets_dir, tmp_path, capsys, monkeypatch):
    """A decompression bomb (PIL's error or warning) or an unreadable file fails that photo only: exit 5."""
    folder = tmp_path / "photos"
    folder.mkdir()
    good = Image.open(assets_dir / "testdata" / "faces" / "astronaut.png")
    good.thumbnail((256, 256))
    good.save(folder / "a_good.png")  # 65,536 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)  # PIL's is 89 million: a small stand-in for tests
    Image.new("L", (500, 500)).save(folder / "b_bomb.png")      # over twice the limit: DecompressionBombError
    Image.new("L", (350, 350)).save(folder / "c_large.png")     # over the limit: DecompressionBombWarning
    (folder / "d_broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    code = cli.main(["edit", str(folder), "--out", str(out), *tiny_args(models_dir), "--iterations", "0"])
    printed = capsys.readouterr().out
    assert code == cli.EXIT_PARTIAL
    assert sorted(p.name for p in out.iterdir()) == ["a_good_edited.png"]
    for name in ("b_bomb.png", "c_large.png"):
        assert f"{name}: skipped" in printed and "decompression bomb" in printed
    assert "d_broken.jpg: failed" in printed
    assert "edited 1 of 4" in printed


@pytest.mark.parametrize("damage", ["transposed tensor", "missing key"])
def test_damaged_checkpoint_exits_4_naming_it(models_dir, assets_dir, tmp_path, capsys, damage):
    ckpt = torch.load(models_dir / "tiny_hyperstyle.pt", weights_only=True)
    state = ckpt["state_dict"]
    key = next(k for k, v in state.items() if k.startswith("decoder.") and v.ndim == 2 and v.shape[0] != v.shape[1])
    if damage == "transposed tensor":
        state[key] = state[key].t().contiguous()
    else:
        del state[key]
    torch.save(ckpt, models_dir / "tiny_hyperstyle.pt")
    photo = assets_dir / "testdata" / "faces" / "astronaut.png"
    code = cli.main(["edit", str(photo), "--out", str(tmp_path / "o"), *tiny_args(models_dir)])
    assert code == cli.EXIT_WEIGHTS
    assert "--checkpoint tiny_hyperstyle.pt" in capsys.readouterr().err


def test_exif_orientation_is_applied(models_dir, assets_dir, tmp_path):
    """A phone photo stored sideways with EXIF orientation 6 is edited upright, at its displayed size."""
    upright = Image.open(assets_dir / "testdata" / "faces" / "portrait_a.jpg")
    upright.thumbnail((256, 256))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # EXIF 6 says: rotate 270 to display
    exif = Image.Exif()
    exif[0x0112] = 6
    folder = tmp_path / "phone"
    folder.mkdir()
    stored.save(folder / "phone.jpg", exif=exif, quality=95)
    out = tmp_path / "out"
    code = cli.main(["edit", str(folder), "--out", str(out), *tiny_args(models_dir), "--iterations", "0"])
    assert code == cli.EXIT_OK
    assert Image.open(out / "phone_edited.png").size == upright.size != stored.size


def test_fp16_on_cpu_runs_fp32_and_says_so(models_dir, assets_dir, tmp_path, capsys, monkeypatch):
    from hyperstyle_nodes import ops

    asked = []

    def record_precision(checkpoint, encoder, precision, device, generator=None):
        asked.append(precision)
        raise RuntimeError("stop here: only the precision asked for matters")

    monkeypatch.setattr(ops, "load_model", record_precision)
    photo = assets_dir / "testdata" / "faces" / "astronaut.png"
    cli.main(["edit", str(photo), "--out", str(tmp_path / "o"), *tiny_args(models_dir), "--precision", "fp16"])
    assert asked == ["fp32"]
    assert "fp16 on the CPU runs fp32 instead" in capsys.readouterr().err


def test_bad_edit_flag(tmp_path, capsys, assets_dir):
    photo = assets_dir / "testdata" / "faces" / "astronaut.png"
    assert cli.main(["edit", str(photo), "--out", str(tmp_path), "--edit", "age"]) == cli.EXIT_USAGE
    assert "expected NAME=STRENGTH" in capsys.readouterr().err


def test_help_explains_every_flag_without_importing_torch():
    """`python -m hyperstyle_nodes edit --help` must not wait for torch (8 s on a cold CPU machine)."""
    probe = ("import runpy, sys\n"
             "sys.argv = ['hyperstyle_nodes', 'edit', '--help']\n"
             "try:\n"
             "    runpy.run_module('hyperstyle_nodes', run_name='__main__', alter_sys=True)\n"
             "except SystemExit as done:\n"
             "    assert done.code == 0, done.code\n"
             "print('HEAVY MODULES:', sorted(m for m in ('torch', 'numpy', 'PIL', 'huggingface_hub') "
             "if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    assert "HEAVY MODULES: []" in result.stdout
    for flag in ("--out", "--edit", "--layers", "--iterations", "--checkpoint", "--encoder", "--detector", "--faces",
                 "--threshold", "--align-size", "--feather", "--device", "--precision", "--models-dir", "--offline",
                 "--save-aligned", "--save-inversion"):
        assert flag in result.stdout


def test_library_names_still_import_from_the_package():
    """The lazy package keeps `from hyperstyle_nodes import load_hyperstyle, CheckpointError, ops` working."""
    import hyperstyle_nodes
    from hyperstyle_nodes import CheckpointError, load_hyperstyle, ops
    from hyperstyle_nodes.loaders.checkpoints import CheckpointError as direct

    assert CheckpointError is direct and callable(load_hyperstyle) and ops.__name__ == "hyperstyle_nodes.ops"
    assert set(hyperstyle_nodes.__all__) <= set(dir(hyperstyle_nodes))
    with pytest.raises(ImportError):
        from hyperstyle_nodes import no_such_name  # noqa: F401


# ---- --engine sfe ------------------------------------------------------------------------------------------------


@pytest.fixture()
def sfe_models_dir(models_dir, tmp_path):
    from hyperstyle_nodes.tiny import make_tiny_sfe

    for name, path in make_tiny_sfe(tmp_path / "sfe_files").items():
        shutil.copy(path, models_dir / f"tiny_{name}.pt")
    return models_dir


def sfe_args(models_dir, *extra):
    return ["--models-dir", str(models_dir), "--engine", "sfe", "--checkpoint", "tiny_sfe_editor.pt", "--encoder",
            "tiny_e4e.pt", "--generator", "tiny_generator.pt", "--detector", "retinaface_mobilenet0.25.pth",
            "--align-size", "256", "--device", "cpu", "--offline", *extra]


def test_engine_sfe_edits_and_saves_an_sfe_inversion(sfe_models_dir, assets_dir, tmp_path):
    from hyperstyle_nodes.loaders import inversion_io

    photo = assets_dir / "testdata" / "faces" / "astronaut.png"
    out = tmp_path / "out"
    code = cli.main(["edit", str(photo), "--out", str(out), "--edit", "tiny_age.pt=+2", "--save-inversion",
                     *sfe_args(sfe_models_dir)])
    assert code == cli.EXIT_OK
    assert Image.open(out / "astronaut_edited.png").size == Image.open(photo).size
    _, _, meta = inversion_io.load_inversion(out / "astronaut_inversion.safetensors")
    assert meta["model_id"].startswith("tiny_sfe_editor.pt") and "features" in meta["sfe"]


def test_engine_sfe_refuses_hyperstyle_steps_and_checkpoints(sfe_models_dir, assets_dir, tmp_path, capsys):
    photo = assets_dir / "testdata" / "faces" / "astronaut.png"
    code = cli.main(["edit", str(photo), "--out", str(tmp_path / "o"), *sfe_args(sfe_models_dir, "--iterations",
                                                                                 "3")])
    assert code == cli.EXIT_USAGE
    assert "--iterations: HyperStyle only; --engine sfe inverts in one pass" in capsys.readouterr().err
    code = cli.main(["edit", str(photo), "--out", str(tmp_path / "o"), *sfe_args(sfe_models_dir, "--checkpoint",
                                                                                 "tiny_hyperstyle.pt")])
    assert code == cli.EXIT_USAGE
    assert "is a hyperstyle checkpoint, but --engine is sfe" in capsys.readouterr().err


def test_engine_sfe_picks_its_default_files(tmp_path, capsys, assets_dir):
    photo = assets_dir / "testdata" / "faces" / "astronaut.png"
    code = cli.main(["edit", str(photo), "--out", str(tmp_path / "o"), "--models-dir", str(tmp_path / "empty"),
                     "--offline", "--engine", "sfe", "--edit", "fs_glasses=10", "--edit", "lipstick=20"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_WEIGHTS
    for named in ("--checkpoint sfe_editor_light", "--encoder e4e_ffhq_encode", "--generator stylegan2-ffhq-config-f",
                  "--edit fs_glasses=10: ", "Eyeglasses_boundary.npy", "--edit lipstick=20: ", "ffhq_pca.pt"):
        assert named in err, named
