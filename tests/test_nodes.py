"""Node classes called directly (no ComfyUI needed), with tiny models placed in a models folder."""
import shutil

import pytest
import torch

import nodes as pack_nodes
from hyperstyle_nodes import CheckpointError, ops
from hyperstyle_nodes.manager import get_manager


@pytest.fixture(scope="module")
def models_dir(tiny_ckpts, tmp_path_factory):
    folder = tmp_path_factory.mktemp("models_hyperstyle")
    for name, path in tiny_ckpts.items():
        shutil.copy(path, folder / f"tiny_{name}.pt")
    return folder


@pytest.fixture()
def in_models_dir(models_dir, monkeypatch):
    monkeypatch.setenv("HYPERSTYLE_MODELS_DIR", str(models_dir))
    return models_dir


@pytest.fixture()
def model(in_models_dir):
    (loaded,) = pack_nodes.HyperStyleLoader().load("tiny_hyperstyle.pt", "tiny_w_encoder.pt", "fp32", "cpu")
    return loaded


def comfy_images(batch=2, size=256, channels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(batch, channels, 16, 16, generator=g)
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear").permute(0, 2, 3, 1)


def test_every_node_declares_its_interface():
    for node_id, cls in pack_nodes.NODE_CLASS_MAPPINGS.items():
        assert node_id in pack_nodes.NODE_DISPLAY_NAME_MAPPINGS
        spec = cls.INPUT_TYPES()
        assert cls.CATEGORY == "HyperStyle" and cls.DESCRIPTION and hasattr(cls, cls.FUNCTION)
        assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES)
        for section in spec.values():
            for name, declared in section.items():
                assert len(declared) == 2 and declared[1].get("tooltip"), f"{node_id}.{name} has no tooltip"


def test_loader_lists_models_in_the_folder(in_models_dir):
    choices = pack_nodes.HyperStyleLoader.INPUT_TYPES()["required"]["checkpoint"][0]
    assert "hyperstyle_ffhq" in choices and "tiny_hyperstyle.pt" in choices


def test_encode_refine_decode(model):
    images = comfy_images(2)
    latent, recon = pack_nodes.HyperStyleEncode().encode(model, images)
    assert latent.codes.shape == (2, model.n_styles, 64) and recon.shape == (2, 128, 128, 3)
    deltas, refined = pack_nodes.HyperStyleRefine().refine(model, images, latent, 2)
    assert refined.shape == (2, 128, 128, 3) and 0 <= refined.min() and refined.max() <= 1
    assert deltas.deltas[14].shape == (2, 16, 32)  # compact on the edge
    (decoded,) = pack_nodes.HyperStyleDecode().decode(model, latent, "native", deltas)
    assert torch.allclose(decoded, refined, atol=1e-5)
    (small,) = pack_nodes.HyperStyleDecode().decode(model, latent, "256", deltas)
    assert small.shape == (2, 256, 256, 3)
    # continue refining from the offsets
    more, _ = pack_nodes.HyperStyleRefine().refine(model, images, latent, 1, deltas)
    assert not torch.allclose(more.deltas[14], deltas.deltas[14])


def test_model_is_read_from_disk_once(in_models_dir):
    manager = get_manager()
    before = manager.disk_loads
    for _ in range(3):
        pack_nodes.HyperStyleLoader().load("tiny_hyperstyle.pt", "tiny_e4e.pt", "fp32", "cpu")
    assert manager.disk_loads - before <= 1


def test_channels_and_batch_rules(model):
    gray, rgba = comfy_images(1, channels=1), comfy_images(1, channels=4)
    latent_gray, _ = pack_nodes.HyperStyleEncode().encode(model, gray)
    latent_rgb, _ = pack_nodes.HyperStyleEncode().encode(model, gray.expand(-1, -1, -1, 3))
    assert torch.allclose(latent_gray.codes, latent_rgb.codes)
    latent_rgba, _ = pack_nodes.HyperStyleEncode().encode(model, rgba)
    latent_drop, _ = pack_nodes.HyperStyleEncode().encode(model, rgba[..., :3])
    assert torch.allclose(latent_rgba.codes, latent_drop.codes)
    # a latent batch of 1 broadcasts against 3 images
    deltas, refined = pack_nodes.HyperStyleRefine().refine(model, comfy_images(3), latent_gray, 1)
    assert refined.shape[0] == 3
    latent2, _ = pack_nodes.HyperStyleEncode().encode(model, comfy_images(2))
    with pytest.raises(ValueError, match="batch sizes do not match"):
        pack_nodes.HyperStyleRefine().refine(model, comfy_images(3), latent2, 1)
    with pytest.raises(ValueError, match="batch sizes do not match"):
        pack_nodes.HyperStyleDecode().decode(model, latent2, "native", deltas)
    with pytest.raises(ValueError, match="1-4 channels"):
        pack_nodes.HyperStyleEncode().encode(model, torch.rand(1, 64, 64, 5))


def test_nodes_check_image_values(model):
    """NaN pixels and 0..255 float images are refused with the range found (before: NaN / clamped to white)."""
    images = comfy_images(1)
    broken = images.clone()
    broken[0, 10, 10, 2] = float("inf")
    latent, _ = pack_nodes.HyperStyleEncode().encode(model, images)
    with pytest.raises(ValueError, match="NaN or infinite"):
        pack_nodes.HyperStyleEncode().encode(model, broken)
    with pytest.raises(ValueError, match="NaN or infinite"):
        pack_nodes.HyperStyleRefine().refine(model, broken, latent, 1)
    with pytest.raises(ValueError, match=r"values from .* to 2\d\d.*divide it by 255"):
        pack_nodes.HyperStyleEncode().encode(model, images * 255)
    as_uint8 = (images * 255).round().to(torch.uint8)
    from_uint8, _ = pack_nodes.HyperStyleEncode().encode(model, as_uint8)
    from_float, _ = pack_nodes.HyperStyleEncode().encode(model, as_uint8.float() / 255)
    assert torch.equal(from_uint8.codes, from_float.codes)


def test_wrong_checkpoint_kind_in_loader(in_models_dir):
    with pytest.raises(CheckpointError, match="tiny_generator.pt is a StyleGAN2 generator"):
        pack_nodes.HyperStyleLoader().load("tiny_generator.pt", "tiny_w_encoder.pt", "fp32", "cpu")
    with pytest.raises(CheckpointError, match="tiny_hyperstyle.pt is a HyperStyle checkpoint.*needs a HyperStyle "
                                              "W-encoder"):
        pack_nodes.HyperStyleLoader().load("tiny_hyperstyle.pt", "tiny_hyperstyle.pt", "fp32", "cpu")


def test_domain_generator_uses_offsets_only_on_the_official_layers(model, in_models_dir, monkeypatch):
    (gen,) = pack_nodes.HyperStyleLoadGenerator().load("tiny_generator.pt", "fp32", "cpu")
    latent, _ = pack_nodes.HyperStyleEncode().encode(model, comfy_images(1))
    deltas, _ = pack_nodes.HyperStyleRefine().refine(model, comfy_images(1), latent, 1)
    seen = {}
    real_decode = model.handle.model.decode

    def spy(codes, deltas=None, generator=None, **kw):
        seen["layers"] = [i for i, d in enumerate(deltas) if d is not None]
        seen["generator"] = generator
        return real_decode(codes, deltas, generator=generator, **kw)

    monkeypatch.setattr(model.handle.model, "decode", spy)
    pack_nodes.HyperStyleDecode().decode(model, latent, "native", deltas, gen)
    # the tiny model tunes 0..15; the official rule keeps 14, 15, 17, 18, 20, 21, 23, 24 only
    assert seen["layers"] == [14, 15] and seen["generator"] is gen.handle.model
    assert ops.domain_adaptation_deltas(list(range(26)))[13] is None


def test_refine_reports_progress_and_can_be_cancelled(model, monkeypatch):
    """Inside ComfyUI, Refine advances a ProgressBar per iteration and stops when the user cancels."""
    import sys
    import types

    updates = []

    class FakeBar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None):
            updates.append(value)

    class Interrupted(Exception):
        pass

    def interrupt_after_two():
        if len(updates) >= 2:
            raise Interrupted("cancelled by the user")

    comfy = types.ModuleType("comfy")
    comfy.utils = types.SimpleNamespace(ProgressBar=FakeBar)
    comfy.model_management = types.SimpleNamespace(throw_exception_if_processing_interrupted=interrupt_after_two)
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.utils", comfy.utils)
    monkeypatch.setitem(sys.modules, "comfy.model_management", comfy.model_management)
    images = comfy_images(1)
    latent, _ = ops.encode(model, images)
    with pytest.raises(Interrupted):
        pack_nodes.HyperStyleRefine().refine(model, images, latent, 5)
    assert updates == [1, 2]
