"""User-given paths stay in their folder: inversions in the output folder, node model files in the models folders."""
import shutil

import pytest
import torch

import nodes as pack_nodes
from hyperstyle_nodes import ops, safe_paths
from hyperstyle_nodes.safe_paths import UnsafePathError


@pytest.fixture()
def comfy_like(tmp_path, tiny_ckpts, monkeypatch):
    """cwd with output/ (Save Inversion's folder outside ComfyUI) and a models folder holding the tiny files."""
    models = tmp_path / "models"
    (models / "directions").mkdir(parents=True)
    for name, path in tiny_ckpts.items():
        shutil.copy(path, models / f"tiny_{name}.pt")
    torch.save(torch.randn(1, 64), models / "directions" / "tiny_dir.pt")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for name, path in tiny_ckpts.items():
        shutil.copy(path, outside / f"{name}.pt")
    torch.save(torch.randn(1, 64), outside / "direction.pt")
    work = tmp_path / "comfy"
    (work / "output").mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.setenv("HYPERSTYLE_MODELS_DIR", str(models))
    return {"models": models, "outside": outside, "output": work / "output"}


def latent(batch=1):
    return ops.Latent(torch.zeros(batch, 12, 64), "tiny_hyperstyle.pt:1")


def test_path_under_mirrors_comfyuis_save_path_check(tmp_path):
    root = tmp_path / "output"
    assert safe_paths.path_under(root, "hyperstyle/face", "filename_prefix", "the output folder", "x") == \
        root / "hyperstyle" / "face"
    assert safe_paths.path_under(root, "a/../b", "filename_prefix", "the output folder", "x") == root / "b"
    for bad in ("../x", "a/../../x", str(tmp_path / "abs"), "/etc/passwd", "..", ".", "hyperstyle/../.."):
        with pytest.raises(UnsafePathError, match="is refused: it points outside the output folder"):
            safe_paths.path_under(root, bad, "filename_prefix", "the output folder", "hyperstyle/inversion")
    with pytest.raises(UnsafePathError, match="filename_prefix is empty"):
        safe_paths.path_under(root, "  ", "filename_prefix", "the output folder", "hyperstyle/inversion")


def test_a_folder_linked_into_the_output_folder_stays_usable(tmp_path):
    """Lexical, like ComfyUI: a symlink the user put inside the folder is followed, not refused."""
    root, target = tmp_path / "output", tmp_path / "big_disk"
    root.mkdir(), target.mkdir()
    (root / "linked").symlink_to(target, target_is_directory=True)
    assert safe_paths.path_under(root, "linked/face", "filename_prefix", "the output folder", "x") == \
        root / "linked" / "face"


@pytest.mark.parametrize("prefix", ["../../escaped/name", "../escaped", "ABSOLUTE"])
def test_save_inversion_node_refuses_prefixes_outside_the_output_folder(comfy_like, tmp_path, prefix):
    prefix = str(tmp_path / "escaped_abs" / "name") if prefix == "ABSOLUTE" else prefix
    with pytest.raises(UnsafePathError, match=r"filename_prefix .* is refused: it points outside the output folder"):
        pack_nodes.HyperStyleSaveInversion().save(latent(), prefix)
    assert list(tmp_path.rglob("*.safetensors")) == [], "nothing was written anywhere"
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "escaped_abs").exists()
    assert not (tmp_path.parent / "escaped").exists(), "no folder was created outside output/"


def test_save_and_load_inversion_inside_the_output_folder(comfy_like):
    (path,) = pack_nodes.HyperStyleSaveInversion().save(latent(), "hyperstyle/../faces/one")["result"]
    assert path == str(comfy_like["output"] / "faces" / "one.safetensors")
    loaded, _ = pack_nodes.HyperStyleLoadInversion().load("faces/one.safetensors")
    assert torch.equal(loaded.codes, latent().codes)


def test_load_inversion_node_refuses_files_outside_the_output_folder(comfy_like, tmp_path):
    from hyperstyle_nodes.loaders.inversion_io import save_inversion
    secret = save_inversion(tmp_path / "secret", torch.zeros(1, 12, 64), [None] * 3, "m")
    for name in ("../../secret.safetensors", str(secret)):
        with pytest.raises(UnsafePathError, match="inversion .* is refused: it points outside the output folder"):
            pack_nodes.HyperStyleLoadInversion().load(name)


def test_loader_nodes_read_weights_only_from_the_models_folders(comfy_like):
    outside = comfy_like["outside"]
    refused = "is refused: a node may read weights only from the models folder"
    with pytest.raises(UnsafePathError, match=refused):
        pack_nodes.HyperStyleLoader().load(str(outside / "hyperstyle.pt"), "none", "fp32", "cpu")
    with pytest.raises(UnsafePathError, match=refused):
        pack_nodes.HyperStyleLoader().load("../elsewhere/hyperstyle.pt", "none", "fp32", "cpu")
    with pytest.raises(UnsafePathError, match=refused):  # the encoder slot too
        pack_nodes.HyperStyleLoader().load("tiny_hyperstyle.pt", str(outside / "w_encoder.pt"), "fp32", "cpu")
    with pytest.raises(UnsafePathError, match=refused):
        pack_nodes.HyperStyleLoadGenerator().load(str(outside / "generator.pt"), "fp32", "cpu")
    with pytest.raises(UnsafePathError, match=refused):
        pack_nodes.HyperStyleAlignFace().align(torch.rand(1, 64, 64, 3), str(outside / "generator.pt"), "256",
                                               "largest", 0, 0.9, "error")
    for node, args in ((pack_nodes.HyperStyleApplyEdit(), (0, -1, 1.0, 0)),
                       (pack_nodes.HyperStyleEditSweep(), (0, -1, -1.0, 1.0, 3))):
        with pytest.raises(UnsafePathError, match=refused):
            getattr(node, node.FUNCTION)(latent(), str(outside / "direction.pt"), *args)

    # inside the models folder (by name or by path relative to it) everything still loads
    (model,) = pack_nodes.HyperStyleLoader().load("tiny_hyperstyle.pt", "tiny_w_encoder.pt", "fp32", "cpu")
    (edited,) = pack_nodes.HyperStyleApplyEdit().edit(latent(), "directions/tiny_dir.pt", 0, -1, 1.0, 0)
    assert model.n_styles == 12 and edited.codes.shape == (1, 12, 64)


def test_python_callers_keep_taking_any_path(comfy_like):
    """The library and the CLI run the user's own paths: only nodes are confined."""
    outside = comfy_like["outside"]
    model = ops.load_model(str(outside / "hyperstyle.pt"), str(outside / "w_encoder.pt"), "fp32", "cpu")
    assert model.n_styles == 12
    assert ops.apply_edit(latent(), str(outside / "direction.pt"), 1.0).codes.shape == (1, 12, 64)


def test_confine_node_wraps_plain_static_and_class_methods():
    seen = []

    class Plain:
        FUNCTION = "run"

        def run(self, x):
            seen.append(safe_paths._confined.get())
            return x

    class Static:
        FUNCTION = "run"

        @staticmethod
        def run(x):
            seen.append(safe_paths._confined.get())
            return x

    class ClassMethod:
        FUNCTION = "run"

        @classmethod
        def run(cls, x):
            seen.append(safe_paths._confined.get())
            return x

    for node_class in (Plain, Static, ClassMethod):
        safe_paths.confine_node(node_class)
        assert getattr(node_class(), "run")(7) == 7
    assert seen == [True, True, True] and safe_paths._confined.get() is False
    assert all(getattr(pack_nodes.NODE_CLASS_MAPPINGS[name], cls.FUNCTION).__wrapped__
               for name, cls in pack_nodes.NODE_CLASS_MAPPINGS.items())
