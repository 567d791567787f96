"""The per-process model manager: built once per key, LRU by bytes, device/dtype choice, the ComfyUI path."""
import logging
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from hyperstyle_nodes.loaders import manager as manager_module
from hyperstyle_nodes.loaders.manager import ModelManager, file_identity, get_manager

REPO_ROOT = Path(__file__).resolve().parents[1]
LINEAR_BYTES = (16 * 16 + 16) * 4  # one nn.Linear(16, 16) in float32


class CountingBuilder:
    """builder() stand-in: counts how often the 'disk' is read."""

    def __init__(self, make=lambda: nn.Linear(16, 16)):
        self.calls = 0
        self._make = make

    def __call__(self):
        self.calls += 1
        return self._make()


@pytest.fixture
def no_gpu(monkeypatch):
    """Behave as on a CPU-only machine whatever this one has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(manager_module, "_mps_available", lambda: False)


@pytest.fixture
def cpu_manager(no_gpu, monkeypatch):
    for name in ("comfy", "comfy.model_management", "comfy.model_patcher"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return ModelManager(budget_bytes=10 * LINEAR_BYTES)


def test_each_key_is_read_from_disk_once(cpu_manager, tmp_path, caplog):
    weights = tmp_path / "tiny.pt"
    weights.write_bytes(b"weights")
    builder = CountingBuilder()
    key = ("generator", file_identity(weights))

    with caplog.at_level(logging.INFO, logger="hyperstyle_nodes"):
        handles = [cpu_manager.load(key, builder, device="cpu") for _ in range(3)]

    assert builder.calls == 1 and cpu_manager.disk_loads == 1
    assert handles[0] is handles[1] is handles[2]
    assert handles[0].use() is handles[0].model
    assert [r.getMessage() for r in caplog.records].count("HyperStyle: loading tiny.pt from disk") == 1

    other = cpu_manager.load(("generator", file_identity(weights), "other extra"), builder, device="cpu")
    assert other is not handles[0] and builder.calls == 2 and cpu_manager.disk_loads == 2


def test_a_changed_file_gets_a_new_key(tmp_path):
    weights = tmp_path / "tiny.pt"
    weights.write_bytes(b"one")
    before = file_identity(weights)
    weights.write_bytes(b"three")
    assert file_identity(weights) != before


def test_least_recently_used_models_leave_when_over_budget(no_gpu):
    manager = ModelManager(budget_bytes=2 * LINEAR_BYTES)
    builders = {name: CountingBuilder() for name in "abc"}
    handle_a = manager.load(("a",), builders["a"], device="cpu")
    manager.load(("b",), builders["b"], device="cpu")
    handle_a.use()  # a is now more recently used than b
    manager.load(("c",), builders["c"], device="cpu")

    assert manager.cached_bytes == 2 * LINEAR_BYTES
    manager.load(("a",), builders["a"], device="cpu")
    manager.load(("c",), builders["c"], device="cpu")
    assert (builders["a"].calls, builders["b"].calls, builders["c"].calls) == (1, 1, 1)
    manager.load(("b",), builders["b"], device="cpu")
    assert builders["b"].calls == 2, "b was evicted, so it is read from disk again"

    big = CountingBuilder(lambda: nn.Linear(64, 64))
    manager.load(("big",), big, device="cpu")
    assert manager.cached_bytes == (64 * 64 + 64) * 4, "a model over the budget alone is still kept"

    manager.clear()
    assert manager.cached_bytes == 0
    manager.load(("big",), big, device="cpu")
    assert big.calls == 2


def test_cache_budget_from_the_environment(no_gpu, monkeypatch):
    monkeypatch.setenv("HYPERSTYLE_CACHE_BYTES", "1.5GiB")
    assert ModelManager().budget_bytes == int(1.5 * 2**30)
    monkeypatch.setenv("HYPERSTYLE_CACHE_BYTES", "12345")
    assert ModelManager().budget_bytes == 12345
    monkeypatch.setenv("HYPERSTYLE_CACHE_BYTES", "lots")
    with pytest.raises(ValueError, match="HYPERSTYLE_CACHE_BYTES"):
        ModelManager()


def test_device_choice_on_a_cpu_machine(cpu_manager):
    assert cpu_manager.get_device("auto") == torch.device("cpu")
    assert cpu_manager.get_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        cpu_manager.get_device("cuda")
    with pytest.raises(ValueError, match="MPS"):
        cpu_manager.get_device("mps")
    with pytest.raises(ValueError, match="choose one of auto, cpu, cuda, mps"):
        cpu_manager.get_device("tpu")


def test_dtype_choice(cpu_manager):
    assert cpu_manager.get_dtype("auto", "cpu") == torch.float32
    assert cpu_manager.get_dtype("auto") == torch.float32
    assert cpu_manager.get_dtype("fp32", "cpu") == torch.float32
    assert cpu_manager.get_dtype("fp16", "cpu") == torch.float16
    assert cpu_manager.get_dtype("bf16", "cpu") == torch.bfloat16
    assert cpu_manager.get_dtype(torch.bfloat16) == torch.bfloat16
    with pytest.raises(ValueError, match="choose one of auto, fp32, fp16, bf16"):
        cpu_manager.get_dtype("int8")


@pytest.mark.parametrize("capability, expected", [((9, 0), torch.bfloat16), ((8, 6), torch.bfloat16),
                                                  ((7, 5), torch.float16), ((6, 1), torch.float32)])
def test_auto_dtype_on_cuda_follows_the_gpu_generation(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.delitem(sys.modules, "comfy.model_management", raising=False)
    manager = ModelManager()

    assert manager.get_device("auto") == torch.device("cuda", 0)
    assert manager.get_dtype("auto", "cuda") == expected


def test_dtype_cast_and_device_placement(cpu_manager):
    handle = cpu_manager.load(("half",), CountingBuilder(), device="cpu", dtype="fp16")

    assert handle.model.weight.dtype == torch.float16
    assert handle.dtype == torch.float16 and handle.device == torch.device("cpu")
    assert handle.size_bytes == LINEAR_BYTES // 2
    same_weights_in_fp32 = cpu_manager.load(("half",), CountingBuilder(), device="cpu", dtype="fp32")
    assert same_weights_in_fp32 is not handle, "dtype is part of the cache key"


def test_builder_may_return_an_object_holding_modules(cpu_manager):
    class Pair:
        def __init__(self):
            self.encoder = nn.Linear(16, 16)
            self.decoder = nn.Linear(16, 16)
            self.name = "pair"

    handle = cpu_manager.load(("pair",), Pair, device="cpu")

    assert isinstance(handle.model, Pair)
    assert handle.size_bytes == 2 * LINEAR_BYTES


def test_bad_builder_results_and_keys_are_explained(cpu_manager):
    with pytest.raises(TypeError, match="must return a torch.nn.Module"):
        cpu_manager.load(("nothing",), lambda: 42, device="cpu")
    with pytest.raises(TypeError, match="must be hashable"):
        cpu_manager.load(["a", "list"], CountingBuilder(), device="cpu")


def test_get_manager_is_one_per_process():
    assert get_manager() is get_manager()


# ---------------------------------------------------------------- the ComfyUI path, with stand-in modules


class FakeComfy:
    """Stand-ins for comfy.model_management / comfy.model_patcher (v0.3.64 API) that record what is asked."""

    def __init__(self, monkeypatch):
        self.gpu = torch.device("cuda", 0)  # never touched: the fake patcher moves nothing
        self.patchers = []
        self.load_calls = []
        self.on_gpu = set()
        fake = self

        class ModelPatcher:
            def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
                self.model, self.load_device, self.offload_device = model, load_device, offload_device
                fake.patchers.append(self)

        def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                            force_full_load=False):
            fake.load_calls.append((list(models), force_full_load))
            fake.on_gpu.update(id(m) for m in models)

        def unload_all_models():  # what POST /free {"unload_models": true} ends in
            fake.on_gpu.clear()

        mm = types.ModuleType("comfy.model_management")
        mm.get_torch_device = lambda: fake.gpu
        mm.unet_offload_device = lambda: torch.device("cpu")
        mm.load_models_gpu = load_models_gpu
        mm.unload_all_models = unload_all_models
        mm.should_use_bf16 = lambda device=None, **kwargs: True
        mm.should_use_fp16 = lambda device=None, **kwargs: True
        mp = types.ModuleType("comfy.model_patcher")
        mp.ModelPatcher = ModelPatcher
        package = types.ModuleType("comfy")
        package.model_management, package.model_patcher = mm, mp
        self.model_management = mm
        for name, module in (("comfy", package), ("comfy.model_management", mm), ("comfy.model_patcher", mp)):
            monkeypatch.setitem(sys.modules, name, module)


def test_inside_comfyui_models_go_through_load_models_gpu_every_use(monkeypatch):
    comfy = FakeComfy(monkeypatch)
    manager = ModelManager()
    builder = CountingBuilder()
    assert manager.in_comfyui

    handle = manager.load(("generator",), builder)
    for _ in range(3):
        assert manager.load(("generator",), builder).use() is handle.model

    assert builder.calls == 1 and manager.disk_loads == 1
    [patcher] = comfy.patchers
    assert patcher.model is handle.model
    assert (patcher.load_device, patcher.offload_device) == (comfy.gpu, torch.device("cpu"))
    assert comfy.load_calls == [([patcher], True)] * 3, "each use asks ComfyUI for a full load"



def test_comfyui_unload_empties_the_cache_and_the_next_use_reads_the_file_again(monkeypatch):
    """POST /free {"unload_models": true} ends in unload_all_models: on the CPU only dropping the weights frees them."""
    comfy = FakeComfy(monkeypatch)
    manager = ModelManager()
    builder = CountingBuilder()
    handle = manager.load(("generator",), builder)
    handle.use()
    first = handle.model
    assert manager.cached_bytes == LINEAR_BYTES

    comfy.model_management.unload_all_models()
    assert comfy.on_gpu == set(), "ComfyUI's own unload still runs"
    assert manager.cached_bytes == 0 and not handle.loaded and handle.patcher is None
    assert "unloaded" in repr(handle)

    # the handle ComfyUI's node cache still holds works: its next use reads the file again, once
    assert handle.use() is handle.model is not first
    assert builder.calls == 2 and manager.cached_bytes == LINEAR_BYTES
    assert manager.load(("generator",), builder) is handle and builder.calls == 2
    assert id(comfy.patchers[-1]) in comfy.on_gpu and comfy.patchers[-1].model is handle.model


def test_inside_comfyui_the_budget_applies_and_unload_reaches_models_held_elsewhere(monkeypatch):
    """The cache no longer keeps every model for the server's life; a model ComfyUI still holds is found again."""
    comfy = FakeComfy(monkeypatch)
    manager = ModelManager(budget_bytes=LINEAR_BYTES)
    builders = {name: CountingBuilder() for name in "ab"}
    held = manager.load(("a",), builders["a"])  # as ComfyUI's cache of node outputs holds a loader's output
    manager.load(("b",), builders["b"])
    assert manager.cached_bytes == LINEAR_BYTES, "a left the cache: over the budget"
    assert manager.load(("a",), builders["a"]) is held and builders["a"].calls == 1, "held elsewhere: not re-read"
    manager.load(("b",), builders["b"])
    assert builders["b"].calls == 2, "b was held by nothing once evicted, so it was freed"

    manager.load(("b",), builders["b"])  # now a is out of the cache, but alive
    comfy.model_management.unload_all_models()
    assert not held.loaded and manager.cached_bytes == 0


def test_comfyui_unload_is_wrapped_once_for_every_manager(monkeypatch):
    comfy = FakeComfy(monkeypatch)
    managers = [ModelManager(), ModelManager()]
    wrapped = comfy.model_management.unload_all_models
    ModelManager()
    assert comfy.model_management.unload_all_models is wrapped, "a second manager does not wrap the wrapper"
    handles = [m.load(("x",), CountingBuilder()) for m in managers]
    comfy.model_management.unload_all_models()
    assert not any(h.loaded for h in handles)


def test_unload_all_outside_comfyui_keeps_handles_usable(cpu_manager):
    builder = CountingBuilder()
    handle = cpu_manager.load(("a",), builder)
    assert cpu_manager.unload_all() == LINEAR_BYTES
    assert cpu_manager.cached_bytes == 0 and handle.model is None
    assert isinstance(handle.use(), nn.Linear) and builder.calls == 2
    assert cpu_manager.unload_all() == LINEAR_BYTES and cpu_manager.unload_all() == 0


def test_a_failed_load_leaves_nothing_in_the_cache(cpu_manager):
    def broken():
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        cpu_manager.load(("broken",), broken)
    assert cpu_manager.cached_bytes == 0 and cpu_manager._handles == {}
    builder = CountingBuilder()
    assert isinstance(cpu_manager.load(("broken",), builder).use(), nn.Linear) and builder.calls == 1

    # a failed reload after an unload keeps the handle empty, and the next use tries again
    handle = cpu_manager.load(("flaky",), CountingBuilder())
    cpu_manager.unload_all()
    handle._builder = broken
    with pytest.raises(RuntimeError):
        handle.use()
    assert not handle.loaded and cpu_manager.cached_bytes == 0


def test_inside_comfyui_auto_device_and_dtype_come_from_comfyui(monkeypatch):
    comfy = FakeComfy(monkeypatch)
    manager = ModelManager()

    assert manager.get_device("auto") == comfy.gpu
    assert manager.get_dtype("auto") == torch.bfloat16
    comfy.model_management.should_use_bf16 = lambda device=None, **kwargs: False  # e.g. --force-fp16 on a T4
    assert manager.get_dtype("auto") == torch.float16
    assert manager.get_dtype("auto", "cpu") == torch.float32


def test_inside_comfyui_a_cpu_model_is_offloaded_to_the_cpu(monkeypatch):
    comfy = FakeComfy(monkeypatch)
    manager = ModelManager()

    manager.load(("on cpu",), CountingBuilder(), device="cpu").use()

    [patcher] = comfy.patchers
    assert patcher.load_device == patcher.offload_device == torch.device("cpu")


# ---------------------------------------------------------------- the real ComfyUI, when a checkout is given

REAL_COMFYUI_SCRIPT = textwrap.dedent("""
    import sys
    comfy_dir, repo_root = sys.argv[1], sys.argv[2]
    sys.path[:0] = [comfy_dir, repo_root]
    sys.argv = ["main.py", "--cpu"]
    import comfy.options
    comfy.options.enable_args_parsing()
    import comfy.model_management as mm
    import torch
    from hyperstyle_nodes.loaders.manager import ModelManager

    calls = []
    manager = ModelManager()
    assert manager.in_comfyui
    handle = manager.load(("real comfy",), lambda: calls.append(1) or torch.nn.Linear(8, 8))
    assert handle.use() is handle.model
    assert handle.patcher in mm.loaded_models(), "ComfyUI tracks the model"
    patcher = handle.patcher
    mm.unload_all_models()
    assert patcher not in mm.loaded_models(), "unload_all_models released it"
    assert not handle.loaded and manager.cached_bytes == 0, "...and emptied our cache"
    handle.use()
    assert handle.patcher in mm.loaded_models() and len(calls) == 2 and manager.disk_loads == 2
    print("real ComfyUI ok", mm.get_torch_device())
""")


def test_with_a_real_comfyui_checkout():
    comfy_dir = os.environ.get("COMFYUI_DIR")
    if not comfy_dir:
        pytest.skip("set COMFYUI_DIR to a ComfyUI checkout (its requirements installed) to run this")
    result = subprocess.run([sys.executable, "-c", REAL_COMFYUI_SCRIPT, comfy_dir, str(REPO_ROOT)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "real ComfyUI ok" in result.stdout


def test_an_encoder_of_another_code_width_is_refused_at_load_and_not_cached(tiny_ckpts, tmp_path, no_gpu):
    """It used to load, fail only in Encode with a raw size mismatch, and stay in the cache."""
    from hyperstyle_nodes import CheckpointError, ops
    from hyperstyle_nodes.engines.hyperstyle.encoders import build_encoder
    from hyperstyle_nodes.tiny import tiny_encoder_config, tiny_generator_config

    narrow_codes = build_encoder(tiny_encoder_config("w_encoder", tiny_generator_config(128, style_dim=32)))
    other = tmp_path / "w_encoder_32.pt"
    torch.save({"state_dict": {f"encoder.{k}": v for k, v in narrow_codes.state_dict().items()},
                "opts": {"output_size": 128, "encoder_type": "WEncoder", "input_nc": 3}}, other)
    manager = get_manager()
    cached, loads = manager.cached_bytes, manager.disk_loads
    with pytest.raises(CheckpointError) as raised:
        ops.load_model(str(tiny_ckpts["hyperstyle"]), str(other), "fp32", "cpu")
    message = str(raised.value)
    assert "The W-encoder w_encoder_32.pt makes 32-wide latent codes" in message
    assert f"HyperStyle checkpoint {tiny_ckpts['hyperstyle'].name} takes 64-wide codes" in message
    assert manager.disk_loads == loads + 1 and manager.cached_bytes == cached, "nothing stays cached"
