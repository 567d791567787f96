"""The test suite itself: it runs whatever the clone folder is called, and writes nothing outside temporary folders."""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from hyperstyle_nodes.loaders import downloads

REPO_ROOT = Path(__file__).resolve().parents[1]
PROBE = '''import sys
from pathlib import Path


def test_pytest_never_imports_the_comfyui_entry_point():
    entry = Path(__file__).resolve().parents[1] / "__init__.py"
    loaded = [Path(m.__file__).resolve() for m in list(sys.modules.values()) if getattr(m, "__file__", None)]
    assert entry not in loaded
'''


def _quiet_env(**changes) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(changes)
    return env


@pytest.mark.parametrize("folder_name", ["hyperstyle-nodes", "hyperstyle_pack"])
def test_suite_runs_whatever_the_clone_folder_is_called(tmp_path, folder_name):
    # The README's clone folder has a hyphen; pytest must not import the root __init__.py (ComfyUI's entry point)
    # under the folder's name, under any name.
    clone = tmp_path / folder_name
    (clone / "tests").mkdir(parents=True)
    for name in ("pyproject.toml", "__init__.py"):
        shutil.copy(REPO_ROOT / name, clone / name)
    (clone / "tests" / "test_probe.py").write_text(PROBE)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=clone,
                         capture_output=True, text=True, env=_quiet_env(), timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 passed" in run.stdout


def test_default_models_folder_is_a_temporary_one(monkeypatch):
    monkeypatch.delenv("HYPERSTYLE_MODELS_DIR")  # the per-user default, as outside ComfyUI without the variable
    folder = downloads.models_dir()
    assert Path(tempfile.gettempdir()).resolve() in folder.resolve().parents


def test_suite_leaves_the_home_folder_alone(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = _quiet_env(HOME=str(home))
    for name in ("XDG_CACHE_HOME", "HF_HOME", "TORCH_HOME", "HYPERSTYLE_MODELS_DIR"):
        env.pop(name, None)
    test = "tests/test_suite_hygiene.py::test_default_models_folder_is_a_temporary_one"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], cwd=REPO_ROOT,
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert sorted(p.relative_to(home).as_posix() for p in home.rglob("*")) == []


def test_library_imports_itself_only_relatively():
    """Inside ComfyUI the pack is the package `custom_nodes/<folder>` and the library its subpackage: the absolute
    name `hyperstyle_nodes` is importable there only if the user also pip-installed it. An absolute self-import in
    the library would make ComfyUI report IMPORT FAILED for the whole pack."""
    import ast

    library = Path(__file__).resolve().parents[1] / "hyperstyle_nodes"
    absolute = []
    for path in sorted(library.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else \
                [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            absolute += [f"{path.relative_to(library.parent)}:{node.lineno}" for name in names
                         if name == "hyperstyle_nodes" or name.startswith("hyperstyle_nodes.")]
    assert not absolute, f"absolute self-imports (use relative ones): {absolute}"
