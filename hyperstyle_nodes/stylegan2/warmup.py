"""The first call of a shape on a GPU: where its compiled kernels are kept, and telling the user while it warms up.

The first inversion at each batch size and precision compiles kernels (torch.compile) and records CUDA graphs.
Compiled kernels go to a persistent per-user folder (beside the models, not /tmp), so a restart loads them instead
of compiling again. A user's own TORCHINDUCTOR_CACHE_DIR / TRITON_CACHE_DIR (set before the pack was imported)
wins. While a shape warms up, `notice` tells whoever listens: the console by default, ComfyUI's node text in nodes.py,
tqdm in the CLI.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from pathlib import Path
from typing import Callable, Optional

CACHE_ENV = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
# what the user set before importing the pack (Inductor writes its /tmp default into the environment once it runs,
# so a value seen later may be its, not the user's)
_USER_ENV = {name: os.environ.get(name) for name in CACHE_ENV}
_STATE = {"cache": None}
_LOCK = threading.Lock()


def compile_cache_dir() -> Path:
    """The persistent folder for compiled kernels: `.compile_cache` in the models folder (ComfyUI's
    models/hyperstyle, else $HYPERSTYLE_MODELS_DIR or the user cache). Hidden folders are not listed as models."""
    from ..loaders.downloads import model_folders

    return model_folders()[0] / ".compile_cache"


def use_persistent_cache() -> Optional[Path]:
    """Points Inductor's and Triton's caches at `compile_cache_dir()` unless the user chose theirs. Call before
    compiling; idempotent. Returns the folder in use for Inductor (None if it cannot be created: then Inductor keeps
    its default and only the speed of a restart suffers)."""
    with _LOCK:
        if _STATE["cache"] is not None:  # False: tried, could not create it
            return _STATE["cache"] or None
        chosen = _USER_ENV["TORCHINDUCTOR_CACHE_DIR"]
        if chosen:
            _STATE["cache"] = Path(chosen)
            return _STATE["cache"]
        try:
            folder = compile_cache_dir()
            (folder / "inductor").mkdir(parents=True, exist_ok=True)
        except OSError as err:
            print(f"HyperStyle: cannot create the compile cache folder ({err}); compiled kernels stay in "
                  f"PyTorch's temporary folder", file=sys.stderr, flush=True)
            _STATE["cache"] = False
            return None
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder / "inductor")
        if not _USER_ENV["TRITON_CACHE_DIR"]:
            os.environ["TRITON_CACHE_DIR"] = str(folder / "triton")
        _STATE["cache"] = folder / "inductor"
        return _STATE["cache"]


# ---- telling the user ------------------------------------------------------------------------------------------

def _to_console(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


_LISTENERS: list = []
_DEFAULT = {"listener": _to_console}


def notice(message: str) -> None:
    """Tells the innermost listener (`listening`), else the default one (the console unless `set_default_listener`)."""
    (_LISTENERS[-1] if _LISTENERS else _DEFAULT["listener"])(message)


def set_default_listener(callback: Callable[[str], None]) -> None:
    """Where notices go outside any `listening` block (ComfyUI: the console and the running node's text)."""
    _DEFAULT["listener"] = callback


@contextlib.contextmanager
def listening(callback: Callable[[str], None]):
    """Warm-up notices inside the block go to `callback` (a node's text, a tqdm line) instead of the console."""
    _LISTENERS.append(callback)
    try:
        yield
    finally:
        _LISTENERS.remove(callback)


def describe_first_call(batch: int, dtype, compiling: bool) -> str:
    precision = str(dtype).replace("torch.", "")
    what = "compiling GPU kernels and recording CUDA graphs" if compiling else "recording CUDA graphs"
    where = f" (kept in {_STATE['cache']} for later runs)" if compiling and _STATE["cache"] else ""
    return f"HyperStyle: first run at batch {batch}, {precision}: {what}{where}; this happens once per shape"
