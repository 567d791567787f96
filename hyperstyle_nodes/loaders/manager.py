"""One model cache per process, shared by every node: each model is read from disk once.

    manager = get_manager()
    handle = manager.load(key, builder, device=manager.get_device("auto"), dtype=torch.float32)
    model = handle.use()          # call before every use: puts the model back on its device if it was moved off

`key` is a hashable tuple naming what `builder()` reads (see `file_identity`), plus anything else that changes
the result. A builder that raises leaves nothing in the cache. The cache is an LRU with a byte budget
(HYPERSTYLE_CACHE_BYTES, 8 GiB by default): the least recently used models leave it first, and are freed once
nothing else (e.g. ComfyUI's cache of node outputs) holds them. Inside ComfyUI each model is wrapped in a `comfy.model_patcher.ModelPatcher` and loaded through
`comfy.model_management.load_models_gpu`, so ComfyUI counts its memory, honours --cpu/--lowvram/--novram, and can
move it off the GPU when it needs the room (the next `use()` moves it back without reading the disk). ComfyUI's
"unload models" (`unload_all_models`: POST /free, after an out-of-memory error, after every prompt under
--disable-smart-memory) empties the cache (`unload_all`): the weights are dropped and the next `use()` of a handle
reads its file again, so a handle held in ComfyUI's node cache stays valid.
"""
from __future__ import annotations

import functools
import gc
import logging
import os
import re
import sys
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

log = logging.getLogger("hyperstyle_nodes")

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
DTYPE_CHOICES = ("auto", "fp32", "fp16", "bf16")
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
DEFAULT_CACHE_BYTES = 8 * 1024**3


def file_identity(path: str | os.PathLike) -> tuple[str, int, int]:
    """(absolute path, size, mtime in ns): put this in a key so a changed file is read again."""
    resolved = Path(path).expanduser().resolve()
    stat = resolved.stat()
    return str(resolved), stat.st_size, stat.st_mtime_ns


def _comfy_modules():
    """ComfyUI's model_management and model_patcher, or None outside ComfyUI.

    Only a ComfyUI that is already running counts: importing comfy.model_management from elsewhere would parse
    ComfyUI's command line and initialise CUDA as a side effect.
    """
    if "comfy.model_management" not in sys.modules:
        return None
    try:
        import comfy.model_management as model_management
        import comfy.model_patcher as model_patcher
    except ImportError:
        return None
    return SimpleNamespace(model_management=model_management, model_patcher=model_patcher)


def _parse_bytes(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not match:
        raise ValueError(f"HYPERSTYLE_CACHE_BYTES must be a number of bytes such as 8589934592 or 8GiB, "
                         f"not {text!r}")
    number, unit = float(match.group(1)), match.group(2)
    return int(number * 1024 ** " kmgt".index(unit or " "))


def _module_bytes(module: nn.Module) -> int:
    tensors = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _as_module(model) -> nn.Module:
    """The nn.Module to move and account for: the model itself, or its modules gathered in a ModuleList."""
    if isinstance(model, nn.Module):
        return model
    values = model.values() if isinstance(model, Mapping) else vars(model).values() if hasattr(model, "__dict__") else ()
    modules = [value for value in values if isinstance(value, nn.Module)]
    if not modules:
        raise TypeError(f"the model builder returned a {type(model).__name__}; it must return a torch.nn.Module "
                        "or an object (or dict) whose attributes (values) are nn.Modules")
    return nn.ModuleList(modules)


def _describe(key) -> str:
    """Short names for the log: file names found in the key, else the key itself."""
    names = []

    def visit(part):
        if isinstance(part, (tuple, list)):
            for item in part:
                visit(item)
        elif isinstance(part, (str, Path)) and (os.sep in str(part) or "/" in str(part)):
            names.append(Path(part).name)

    visit(key)
    return ", ".join(names) if names else repr(key)


class ModelHandle:
    """A cached model. Call `use()` before each use: it returns the model, on its device (read again from its file
    if the cache was emptied since)."""

    def __init__(self, manager: ModelManager, cache_key, builder: Callable[[], object], load_device: torch.device,
                 dtype):
        self.model = None  # these four are filled by the manager, and emptied by `unload_all`
        self.module: nn.Module | None = None
        self.size_bytes = 0
        self.patcher = None  # ComfyUI's ModelPatcher, inside ComfyUI only
        self.load_device = load_device
        self.dtype_requested = dtype
        self._builder = builder
        self._manager = manager
        self._cache_key = cache_key

    @property
    def loaded(self) -> bool:
        return self.model is not None

    def use(self):
        return self._manager._use(self)

    @property
    def device(self) -> torch.device:
        """Where the weights are now (normally `load_device`; the CPU under ComfyUI's --novram)."""
        if self.module is None:
            return self.load_device
        for tensor in self.module.parameters():
            return tensor.device
        for tensor in self.module.buffers():
            return tensor.device
        return self.load_device

    @property
    def dtype(self) -> torch.dtype:
        if self.module is None:
            return self.dtype_requested or torch.float32
        for tensor in self.module.parameters():
            if tensor.is_floating_point():
                return tensor.dtype
        return torch.float32

    def __repr__(self):
        state = f"{self.size_bytes / 2**20:.1f} MiB" if self.loaded else "unloaded"
        return f"ModelHandle({_describe(self._cache_key[0])}, {state}, {self.load_device})"


class ModelManager:
    """Builds each model once per key and keeps it; see the module docstring."""

    def __init__(self, budget_bytes: int | None = None):
        self._comfy = _comfy_modules()
        if budget_bytes is None:
            env = os.environ.get("HYPERSTYLE_CACHE_BYTES")
            budget_bytes = _parse_bytes(env) if env else DEFAULT_CACHE_BYTES
        self.budget_bytes = budget_bytes
        self.disk_loads = 0  # how many times a builder ran (read weights from disk)
        self._handles: OrderedDict[Hashable, ModelHandle] = OrderedDict()  # the cache, within the budget
        # every handle still alive, in the cache or held elsewhere: found again by `load`, emptied by `unload_all`
        self._alive: weakref.WeakValueDictionary[Hashable, ModelHandle] = weakref.WeakValueDictionary()
        self._lock = threading.RLock()
        if self.in_comfyui:
            _empty_on_comfyui_unload(self._comfy.model_management, self)

    @property
    def in_comfyui(self) -> bool:
        return self._comfy is not None

    @property
    def cached_bytes(self) -> int:
        with self._lock:
            return sum(handle.size_bytes for handle in self._handles.values() if handle.loaded)

    def load(self, key: Hashable, builder: Callable[[], object], device=None, dtype=None) -> ModelHandle:
        """The cached model for `key`, built by `builder()` the first time.

        `device`: where it runs (None: `get_device("auto")`). `dtype`: None keeps the builder's dtypes, else the
        floating-point weights are cast to it ('fp32'/'fp16'/'bf16' or a torch.dtype).
        """
        try:
            hash(key)
        except TypeError:
            raise TypeError(f"model cache keys must be hashable (tuples, not lists or dicts): {key!r}") from None
        device = self.get_device("auto" if device is None else device)
        dtype = None if dtype is None else self.get_dtype(dtype, device)
        cache_key = (key, str(device), str(dtype))
        with self._lock:
            handle = self._handles.get(cache_key) or self._alive.get(cache_key)
            if handle is None:
                handle = ModelHandle(self, cache_key, builder, device, dtype)
                self._fill(handle)  # raises before the handle is stored: a failed load is never cached
                self._alive[cache_key] = handle
            elif not handle.loaded:  # emptied by `unload_all`
                handle._builder = builder
                self._fill(handle)
            self._keep(handle)
            return handle

    def _keep(self, handle: ModelHandle) -> None:
        """Put a loaded handle at the recent end of the cache, and make room under the budget."""
        self._handles[handle._cache_key] = handle
        self._handles.move_to_end(handle._cache_key)
        self._evict_over_budget(keep=handle._cache_key)

    def _fill(self, handle: ModelHandle) -> None:
        """Run the handle's builder and put the result on its device; on any error the handle stays empty."""
        log.info("HyperStyle: loading %s from disk", _describe(handle._cache_key[0]))
        self.disk_loads += 1
        model = handle._builder()
        module = _as_module(model)
        device, dtype = handle.load_device, handle.dtype_requested
        if dtype is not None:
            module.to(dtype=dtype)  # casts floating-point tensors only
        patcher = None
        if self.in_comfyui:
            mm = self._comfy.model_management
            offload = mm.unet_offload_device() if device == mm.get_torch_device() else torch.device("cpu")
            patcher = self._comfy.model_patcher.ModelPatcher(module, load_device=device, offload_device=offload)
        else:
            module.to(device)
        handle.model, handle.module, handle.patcher = model, module, patcher
        handle.size_bytes = _module_bytes(module)

    def _use(self, handle: ModelHandle):
        with self._lock:
            if not handle.loaded:
                self._fill(handle)
            self._keep(handle)
        if handle.patcher is not None:
            # Full load: our modules are plain torch layers, which cannot run half on the GPU, half off it.
            self._comfy.model_management.load_models_gpu([handle.patcher], force_full_load=True)
        return handle.model

    def _evict_over_budget(self, keep) -> None:
        total = sum(handle.size_bytes for handle in self._handles.values())
        for cache_key in list(self._handles):
            if total <= self.budget_bytes:
                break
            if cache_key == keep:  # the model just asked for stays, even alone over the budget
                continue
            dropped = self._handles.pop(cache_key)
            total -= dropped.size_bytes
            log.info("HyperStyle: dropping %s from the model cache (over the %.1f GiB budget)",
                     _describe(cache_key[0]), self.budget_bytes / 2**30)

    def unload_all(self) -> int:
        """Drop every cached model's weights (ComfyUI's "unload models" calls this); returns the bytes released.

        Handles stay valid: the next `use()` (or `load()` of the same key) reads the file again.
        """
        with self._lock:
            loaded = [handle for handle in self._alive.values() if handle.loaded]
            released = sum(handle.size_bytes for handle in loaded)
            for handle in loaded:
                handle.model = handle.module = handle.patcher = None
                handle.size_bytes = 0
            self._handles.clear()
        if loaded:
            gc.collect()  # models with reference cycles would otherwise wait for the next collection
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.empty_cache()
            _return_freed_memory_to_the_os()
            log.info("HyperStyle: unloaded %d model(s), %.1f MiB", len(loaded), released / 2**20)
        return released

    def clear(self) -> None:
        """Forget every cached model (memory is freed once nothing else holds them)."""
        with self._lock:
            self._handles.clear()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()

    def get_device(self, requested: str | torch.device = "auto") -> torch.device:
        """'auto' (ComfyUI's device inside ComfyUI, else cuda, mps or cpu), 'cpu', 'cuda', 'cuda:N' or 'mps'."""
        text = str(requested).strip().lower()
        if text == "auto":
            if self.in_comfyui:
                return self._comfy.model_management.get_torch_device()
            if torch.cuda.is_available():
                return torch.device("cuda", torch.cuda.current_device())
            if _mps_available():
                return torch.device("mps")
            return torch.device("cpu")
        kind, _, index = text.partition(":")
        if kind not in DEVICE_CHOICES or (index and not index.isdigit()) or (index and kind != "cuda"):
            raise ValueError(f"unknown device {requested!r}; choose one of {', '.join(DEVICE_CHOICES)} (or cuda:N)")
        if kind == "cuda":
            if not torch.cuda.is_available():
                raise ValueError("device 'cuda' was asked for, but PyTorch sees no CUDA GPU "
                                 "(torch.cuda.is_available() is False); choose 'auto' or 'cpu'")
            number = int(index) if index else torch.cuda.current_device()
            if number >= torch.cuda.device_count():
                raise ValueError(f"device {requested!r} does not exist: PyTorch sees "
                                 f"{torch.cuda.device_count()} CUDA GPU(s)")
            return torch.device("cuda", number)
        if kind == "mps" and not _mps_available():
            raise ValueError("device 'mps' was asked for, but PyTorch's MPS backend (Apple GPU) is not available; "
                             "choose 'auto' or 'cpu'")
        return torch.device(kind)

    def get_dtype(self, requested: str | torch.dtype = "auto", device: str | torch.device | None = None) -> torch.dtype:
        """'auto', 'fp32', 'fp16' or 'bf16' (or a torch.dtype) -> torch.dtype for weights on `device`."""
        if isinstance(requested, torch.dtype):
            if requested not in _DTYPES.values():
                raise ValueError(f"unsupported dtype {requested}; choose one of {', '.join(DTYPE_CHOICES)}")
            return requested
        text = str(requested).strip().lower()
        if text in _DTYPES:
            return _DTYPES[text]
        if text != "auto":
            raise ValueError(f"unknown dtype {requested!r}; choose one of {', '.join(DTYPE_CHOICES)}")
        device = self.get_device("auto" if device is None else device)
        if device.type == "cpu":
            return torch.float32  # half precision on CPU is slow and some ops lack kernels
        if self.in_comfyui:
            # ComfyUI knows the GPU quirks and honours --force-fp32 / --force-fp16.
            mm = self._comfy.model_management
            if mm.should_use_bf16(device):
                return torch.bfloat16
            if mm.should_use_fp16(device):
                return torch.float16
            return torch.float32
        if device.type == "cuda":
            major, _ = torch.cuda.get_device_capability(device)
            # bf16 first: StyleGAN2's modulated convolutions and HyperStyle's weight offsets can leave fp16's range
            # (max 65504; StyleGAN2-ADA clamps its fp16 layers for that reason); bf16 has float32's range and its
            # lower precision is invisible in 8-bit images. Ampere (8.x) and newer run bf16 natively.
            if major >= 8:
                return torch.bfloat16
            if major >= 7:  # Volta/Turing: fast fp16, no bf16
                return torch.float16
            return torch.float32  # Pascal and older: fp16 is slow
        return torch.float32  # MPS and others: correctness first


def _empty_on_comfyui_unload(model_management, manager: ModelManager) -> None:
    """Make ComfyUI's `unload_all_models` also call `manager.unload_all()`.

    ComfyUI has no event for it, and on the CPU its own unload (moving models to the offload device) frees nothing, so
    the function is wrapped, once per process; ComfyUI looks it up on the module at each call (main.py's /free
    handling, execution.py), so every caller gets the wrapper. Our call comes after ComfyUI's, which has then already
    taken our ModelPatchers out of its list of loaded models.
    """
    original = model_management.unload_all_models
    managers = getattr(original, "hyperstyle_managers", None)
    if managers is None:
        managers = weakref.WeakSet()

        @functools.wraps(original)
        def unload_all_models(*args, **kwargs):
            result = original(*args, **kwargs)
            for each in list(managers):
                each.unload_all()
            return result

        unload_all_models.hyperstyle_managers = managers
        model_management.unload_all_models = unload_all_models
    managers.add(manager)


def _return_freed_memory_to_the_os() -> None:
    """glibc keeps freed heap memory for reuse; give it back so the process's memory actually drops after an unload.

    In a CPU ComfyUI server, unloading a 163 MiB model lowered the resident memory by 48 MiB without this, 448 MiB
    with it (the rest is what loading the checkpoint had left on the heap).
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to do
        pass


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


_manager: ModelManager | None = None
_manager_lock = threading.Lock()


def get_manager() -> ModelManager:
    """The process-wide ModelManager shared by every node."""
    global _manager
    with _manager_lock:
        if _manager is None:
            _manager = ModelManager()
        return _manager
