"""First calls on a GPU: compiled kernels go to a persistent folder, and the warm-up is announced once per shape."""
import os

import torch

from hyperstyle_nodes.stylegan2 import cuda_graphs
from hyperstyle_nodes.stylegan2 import generator as stylegan2
from hyperstyle_nodes.stylegan2 import warmup


def fresh_state(monkeypatch, user_env: dict):
    monkeypatch.setattr(warmup, "_USER_ENV", {name: user_env.get(name) for name in warmup.CACHE_ENV})
    monkeypatch.setattr(warmup, "_STATE", {"cache": None})
    for name in warmup.CACHE_ENV:
        if user_env.get(name):
            monkeypatch.setenv(name, user_env[name])
        else:
            monkeypatch.delenv(name, raising=False)


def test_compiled_kernels_are_kept_beside_the_models(tmp_path, monkeypatch):
    monkeypatch.setenv("HYPERSTYLE_MODELS_DIR", str(tmp_path / "models"))
    fresh_state(monkeypatch, {})
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/tmp/torchinductor_someone")  # Inductor's own default, set later
    folder = warmup.use_persistent_cache()
    assert folder == tmp_path / "models" / ".compile_cache" / "inductor" and folder.is_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(folder)
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "models" / ".compile_cache" / "triton")
    assert warmup.use_persistent_cache() == folder  # once per process


def test_the_users_cache_folders_win(tmp_path, monkeypatch):
    monkeypatch.setenv("HYPERSTYLE_MODELS_DIR", str(tmp_path / "models"))
    fresh_state(monkeypatch, {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "mine"), "TRITON_CACHE_DIR": str(tmp_path / "t")})
    assert warmup.use_persistent_cache() == tmp_path / "mine"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "t")
    assert not (tmp_path / "models").exists()
    fresh_state(monkeypatch, {"TRITON_CACHE_DIR": str(tmp_path / "t")})  # only Triton's chosen: Inductor's is ours
    assert warmup.use_persistent_cache() == tmp_path / "models" / ".compile_cache" / "inductor"
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "t")


def test_an_unwritable_models_folder_leaves_the_defaults(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("HYPERSTYLE_MODELS_DIR", str(blocker))
    fresh_state(monkeypatch, {})
    assert warmup.use_persistent_cache() is None
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ and "cannot create" in capsys.readouterr().err
    assert warmup.use_persistent_cache() is None and "kept in" not in warmup.describe_first_call(1, torch.float16, True)


def test_notices_go_to_the_innermost_listener(monkeypatch):
    heard, default = [], []
    monkeypatch.setattr(warmup, "_DEFAULT", {"listener": default.append})
    warmup.notice("a")
    with warmup.listening(heard.append):
        warmup.notice("b")
    warmup.notice("c")
    assert heard == ["b"] and default == ["a", "c"]


def test_a_new_shape_is_announced_once_before_it_is_recorded(monkeypatch):
    """GraphCache says so (batch, precision, whether it compiles) before recording each new batch size and precision;
    the other graphs of the same shape (start, step, decode) and later calls say nothing."""
    cache = cuda_graphs.GraphCache.__new__(cuda_graphs.GraphCache)  # no CUDA here: record is stubbed
    cache.graphs, cache.announced = {}, set()
    out = torch.zeros(1)
    monkeypatch.setattr(cache, "_record", lambda fn, inputs: (type("G", (), {"replay": lambda self: None})(),
                                                                list(inputs), out))
    monkeypatch.setattr(warmup, "use_persistent_cache", lambda: None)
    heard = []
    with warmup.listening(heard.append):
        x1, x8 = torch.zeros(1, 3, dtype=torch.bfloat16), torch.zeros(8, 3, dtype=torch.bfloat16)
        for name in ("start", "step", "step", "decode"):
            cache.run(name, None, [x1])
        cache.run("start", None, [x8])
        monkeypatch.setattr(stylegan2, "_COMPILE", {"enabled": False})
        cache.run("start", None, [x8.float()])
    assert len(heard) == 3
    assert "batch 1, bfloat16: compiling" in heard[0] and "batch 8, bfloat16" in heard[1]
    assert "batch 8, float32: recording CUDA graphs" in heard[2] and "compiling" not in heard[2]


def test_in_comfyui_the_notice_shows_under_the_running_node(monkeypatch, capsys):
    import sys
    import types

    import nodes

    sent = []
    server = types.ModuleType("server")
    server.PromptServer = type("PromptServer", (), {"instance": types.SimpleNamespace(
        send_progress_text=lambda text, node_id: sent.append((text, node_id)))})
    utils = types.ModuleType("comfy_execution.utils")
    context = {"now": types.SimpleNamespace(node_id="7")}
    utils.get_executing_context = lambda: context["now"]
    monkeypatch.setitem(sys.modules, "server", server)
    monkeypatch.setitem(sys.modules, "comfy_execution", types.ModuleType("comfy_execution"))
    monkeypatch.setitem(sys.modules, "comfy_execution.utils", utils)
    nodes._comfy_notice("HyperStyle: first run")
    context["now"] = None  # outside a prompt: the console only
    nodes._comfy_notice("later")
    assert sent == [("HyperStyle: first run", "7")]
    assert capsys.readouterr().out.splitlines() == ["HyperStyle: first run", "later"]


class FakeAllocator:
    """torch.cuda's memory-fraction calls on a pretend 80 GiB card, for the cap logic on CPU."""

    def __init__(self, monkeypatch, fraction=1.0, reserved=2 << 30):
        self.fraction, self.reserved, self.calls = fraction, reserved, []
        props = type("Props", (), {"total_memory": 80 << 30})()
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
        monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device: self.fraction)
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: self.reserved)
        monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", self.set_fraction)

    def set_fraction(self, fraction, device):
        self.calls.append(fraction)
        self.fraction = fraction


def test_a_first_call_runs_under_a_memory_cap_then_the_cap_is_lifted(monkeypatch):
    """The first of the two warm-up calls may add only the budget to what the allocator holds (so cuDNN cannot take a
    65 GiB workspace while choosing its plan); the user's own fraction comes back afterwards."""
    alloc = FakeAllocator(monkeypatch, fraction=0.9)
    cache = cuda_graphs.GraphCache.__new__(cuda_graphs.GraphCache)
    cache.device, cache.warmup_budget = "cuda:0", lambda batch: batch * (1 << 30)
    seen = []
    cache._warm_up(lambda x: seen.append(alloc.fraction), [torch.zeros(3, 2)])
    assert seen == [(2 + 3) / 80, 0.9]  # capped at reserved + 3 images' budget, then the user's 0.9 again
    assert alloc.fraction == 0.9


def test_a_first_call_that_does_not_fit_under_the_cap_runs_again_without_it(monkeypatch):
    alloc = FakeAllocator(monkeypatch)
    cache = cuda_graphs.GraphCache.__new__(cuda_graphs.GraphCache)
    cache.device, cache.warmup_budget = "cuda:0", lambda batch: 1 << 30
    seen = []

    def fn(x):
        seen.append(alloc.fraction)
        if alloc.fraction < 1.0:
            raise torch.cuda.OutOfMemoryError("does not fit")

    cache._warm_up(fn, [torch.zeros(1)])
    assert seen == [3 / 80, 1.0, 1.0] and alloc.fraction == 1.0


def test_a_tighter_cap_already_set_is_kept(monkeypatch):
    alloc = FakeAllocator(monkeypatch, fraction=0.01)
    with cuda_graphs.memory_cap("cuda:0", 1 << 30):
        assert alloc.fraction == 0.01
    with cuda_graphs.memory_cap("cuda:0", None):
        assert alloc.fraction == 0.01
    assert alloc.calls == []
