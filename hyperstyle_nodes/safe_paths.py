"""Keeping user-given paths inside their folder: ComfyUI's output folder for inversions, the models folders for weights.

A prompt can come from anyone who reaches the server's HTTP API, so what a node is given (a filename prefix, a saved
inversion, a model name) must not name a file elsewhere. The check is lexical, like ComfyUI's own
`folder_paths.get_save_image_path`: the path is made absolute and normalised ('..' removed) without following
symlinks, so a folder the user linked into models/ or output/ keeps working, while '../x' and '/abs/x' are refused.

Python callers of the library (and the CLI, run by the user in their own shell) keep taking any path; nodes run
inside `confined()` (nodes.py wraps every node function), which makes `check_model_file` refuse weights from outside
the models folders.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import os
from contextvars import ContextVar
from pathlib import Path


class UnsafePathError(ValueError):
    """A user-given path that would leave the folder it must stay in."""


_confined: ContextVar[bool] = ContextVar("hyperstyle_paths_confined", default=False)


def is_inside(path, root) -> bool:
    """Does `path` (made absolute and normalised, symlinks not followed) lie inside `root` (or equal it)?"""
    root, path = os.path.abspath(root), os.path.abspath(path)
    try:
        return os.path.commonpath((root, path)) == root
    except ValueError:  # different drives on Windows
        return False


def path_under(root, relative, what: str, folder_label: str, example: str) -> Path:
    """`root/relative`, refused unless it stays strictly inside `root`.

    `what` names the input ("filename_prefix"), `folder_label` the folder ("ComfyUI's output folder") and
    `example` a good value, for the message.
    """
    text = os.fspath(relative).strip()
    if not text:
        raise UnsafePathError(f"{what} is empty; give a path inside {folder_label}, for example {example!r}")
    target = os.path.abspath(os.path.join(root, text))
    if not is_inside(target, root) or target == os.path.abspath(root):
        raise UnsafePathError(
            f"{what} {text!r} is refused: it points outside {folder_label} ({os.path.abspath(root)}). Give a path "
            f"inside that folder, relative to it, without '..' or a leading '/' (for example {example!r}).")
    return Path(target)


def check_model_file(path, folders) -> Path:
    """`path` as it is, or UnsafePathError while `confined()` if it lies outside every folder of `folders`."""
    if _confined.get() and not any(is_inside(path, folder) for folder in folders):
        shown = ", ".join(str(os.path.abspath(folder)) for folder in folders)
        raise UnsafePathError(
            f"model file {os.fspath(path)!r} is refused: a node may read weights only from the models folder(s) "
            f"({shown}). Put the file there and pick it by name (a registry name such as 'hyperstyle_ffhq', or its "
            f"path relative to the models folder).")
    return Path(path)


@contextlib.contextmanager
def confined():
    """While active (in this thread), `check_model_file` refuses weights outside the models folders."""
    token = _confined.set(True)
    try:
        yield
    finally:
        _confined.reset(token)


def run_confined(function):
    """`function` wrapped to run inside `confined()`."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with confined():
            return function(*args, **kwargs)

    return wrapper


def confine_node(node_class) -> None:
    """Make a ComfyUI node class's FUNCTION run inside `confined()` (plain, static or class method)."""
    name = node_class.FUNCTION
    method = inspect.getattr_static(node_class, name)
    if isinstance(method, (staticmethod, classmethod)):
        setattr(node_class, name, type(method)(run_confined(method.__func__)))
    else:
        setattr(node_class, name, run_confined(method))
