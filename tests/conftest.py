"""Shared fixtures."""

from __future__ import annotations

import pytest

from tiny_models import save_tiny_llava


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))
