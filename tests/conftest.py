"""Shared pytest fixtures.

Real assets (face photos, RetinaFace weights, edit directions) live outside the repo in `../shared`
(override with HYPERSTYLE_TEST_ASSETS). Tests that need them skip, with the reason, only when the folder is absent.
"""
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _assets_root() -> Path:
    return Path(os.environ.get("HYPERSTYLE_TEST_ASSETS", REPO_ROOT.parent / "shared")).resolve()


@pytest.fixture(scope="session")
def assets_dir() -> Path:
    root = _assets_root()
    if not root.is_dir():
        pytest.skip(f"real test assets not found at {root} (set HYPERSTYLE_TEST_ASSETS to the shared/ folder)")
    return root


@pytest.fixture(scope="session")
def face_photos(assets_dir) -> list:
    photos = sorted((assets_dir / "testdata" / "faces").glob("*.*"))
    if not photos:
        pytest.skip(f"no face photos under {assets_dir / 'testdata' / 'faces'}")
    return photos
