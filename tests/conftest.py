"""Shared test set-up: run from any directory, and offline.

CI and the developers' machines have no internet, so the tests point tiktoken and
tiny Shakespeare at the local copies in ../shared when they exist. Users' machines
download both instead (see README).
"""
import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED = REPO_ROOT.parent / "shared"
sys.path.insert(0, str(REPO_ROOT))

if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED / "tiktoken_cache").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "tiktoken_cache")
if "TINYSHAKESPEARE_PATH" not in os.environ and (SHARED / "data" / "tinyshakespeare.txt").is_file():
    os.environ["TINYSHAKESPEARE_PATH"] = str(SHARED / "data" / "tinyshakespeare.txt")


@pytest.fixture
def tinyshakespeare_path():
    path = os.environ.get("TINYSHAKESPEARE_PATH")
    if not path or not Path(path).is_file():
        pytest.skip("tiny Shakespeare is not on disk and the tests do not download it")
    return Path(path)
