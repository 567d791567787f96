"""Node classes called directly (no ComfyUI needed), with tiny models placed in a models folder."""
import shutil

import pytest
import torch

import nodes as pack_nodes
from conftest import install_fake_comfy
from hyperstyle_nodes import CheckpointError, ops
from hyperstyle_nodes.loaders.manager import get_manager


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

    install_fake_comfy(monkeypatch, FakeBar, interrupt_after_two)
    images = comfy_images(1)
    latent, _ = ops.encode(model, images)
    with pytest.raises(Interrupted):
        pack_nodes.HyperStyleRefine().refine(model, images, latent, 5)
    assert updates == [1, 2]


@pytest.fixture(scope="module")
def other_models(models_dir, tmp_path_factory):
    """Two more 128-px HyperStyle files beside the tiny ones: another generator with other tuned layers, and the
    same generator with another hypernetwork."""
    from hyperstyle_nodes.tiny import write_tiny_checkpoints

    other = write_tiny_checkpoints(tmp_path_factory.mktemp("other"), size=128, seed=7, layers_to_tune="0,2,3,5,14")
    same_gen = write_tiny_checkpoints(tmp_path_factory.mktemp("same_gen"), size=128, seed=0, layers_to_tune="0,2,3")
    shutil.copy(other["hyperstyle"], models_dir / "tiny_other_hyperstyle.pt")
    shutil.copy(same_gen["hyperstyle"], models_dir / "tiny_samegen_hyperstyle.pt")
    return models_dir


def test_latents_and_offsets_are_refused_by_another_model(model, other_models):
    """Before: the model ids were never compared, and offsets of another same-size checkpoint decoded silently."""
    (other,) = pack_nodes.HyperStyleLoader().load("tiny_other_hyperstyle.pt", "tiny_w_encoder.pt", "fp32", "cpu")
    images = comfy_images(1)
    latent, _ = pack_nodes.HyperStyleEncode().encode(model, images)
    offsets, _ = pack_nodes.HyperStyleRefine().refine(model, images, latent, 1)
    other_latent, _ = pack_nodes.HyperStyleEncode().encode(other, images)
    with pytest.raises(ValueError, match=r"Offsets from tiny_hyperstyle.pt:\d+ \(generator \w+\) cannot be used "
                                         r"with tiny_other_hyperstyle.pt:\d+ .*this model's HyperStyle Refine"):
        pack_nodes.HyperStyleDecode().decode(other, other_latent, "native", offsets)
    with pytest.raises(ValueError, match=r"Latent from tiny_hyperstyle.pt.* cannot be used with "
                                         r"tiny_other_hyperstyle.pt.*e4e Encode.*load tiny_hyperstyle.pt in Load"):
        pack_nodes.HyperStyleRefine().refine(other, images, latent, 1)
    with pytest.raises(ValueError, match="Latent from tiny_hyperstyle.pt"):
        pack_nodes.HyperStyleDecode().decode(other, latent, "native")
    with pytest.raises(ValueError, match="Offsets from tiny_hyperstyle.pt"):
        pack_nodes.HyperStyleRefine().refine(other, images, other_latent, 1, offsets)
    assert other.signature and other.signature != model.signature


def test_signatures_let_the_same_generator_through(model, other_models, tmp_path, tiny_ckpts, in_models_dir):
    """What must keep working: edited latents, another domain's generator, a saved inversion loaded back, e4e codes
    refined with the W-encoder model of the same file, the file converted to safetensors, and offsets decoded by
    another HyperStyle file built on the same generator (they fit it: same image)."""
    from hyperstyle_nodes.loaders import convert

    images = comfy_images(1)
    (with_e4e,) = pack_nodes.HyperStyleLoader().load("tiny_hyperstyle.pt", "tiny_e4e.pt", "fp32", "cpu")
    latent, _ = pack_nodes.HyperStyleEncode().encode(with_e4e, images)
    offsets, refined = pack_nodes.HyperStyleRefine().refine(model, images, latent, 1)
    torch.save(torch.randn(1, 64), in_models_dir / "sig_dir.pt")  # nodes read weights only from the models folder
    (edited,) = pack_nodes.HyperStyleApplyEdit().edit(latent, "sig_dir.pt", 0, -1, 1.0, 0)
    assert edited.signature == model.signature
    pack_nodes.HyperStyleDecode().decode(model, edited, "native", offsets)
    (gen,) = pack_nodes.HyperStyleLoadGenerator().load("tiny_generator.pt", "fp32", "cpu")
    pack_nodes.HyperStyleDecode().decode(model, edited, "native", offsets, gen)
    saved = ops.save_inversion(tmp_path, "inv", edited, offsets)
    loaded_latent, loaded_offsets = ops.load_inversion(saved)
    assert loaded_latent.signature == loaded_offsets.signature == model.signature
    pack_nodes.HyperStyleDecode().decode(model, loaded_latent, "native", loaded_offsets)
    (same_gen,) = pack_nodes.HyperStyleLoader().load("tiny_samegen_hyperstyle.pt", "tiny_w_encoder.pt", "fp32", "cpu")
    assert same_gen.signature == model.signature
    (decoded,) = pack_nodes.HyperStyleDecode().decode(same_gen, latent, "native", offsets)
    assert torch.allclose(decoded, refined, atol=1e-5)
    assert convert.main([str(tiny_ckpts["hyperstyle"]), str(tmp_path / "hs.safetensors")]) == 0
    assert ops.load_model(str(tmp_path / "hs.safetensors"), device="cpu").signature == model.signature


def test_save_inversion_refuses_a_latent_and_offsets_of_different_models(tmp_path):
    codes, deltas = torch.zeros(1, 12, 64), [None] * 19 + [torch.zeros(1, 16, 32)]
    with pytest.raises(ValueError, match=r"latent \(a.pt, generator 111\) and the offsets \(b.pt, generator 222\)"):
        ops.save_inversion(tmp_path, "x", ops.Latent(codes, "a.pt", "111"), ops.Offsets(deltas, "b.pt", "222"))
    saved = ops.save_inversion(tmp_path, "x", ops.Latent(codes, "a.pt", "111"), ops.Offsets(deltas, "a.pt", "111"))
    assert ops.load_inversion(saved)[1].signature == "111"
    assert not list(tmp_path.glob("x_0*"))  # the refused pair wrote nothing
