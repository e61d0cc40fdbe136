"""Shared fixtures."""

from __future__ import annotations

import pytest

from tiny_models import save_tiny_image, save_tiny_llava, save_tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    path = save_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))
    return save_tiny_tokenizer(path)


@pytest.fixture(scope="session")
def tiny_image(tmp_path_factory):
    return save_tiny_image(tmp_path_factory.mktemp("images") / "tiny.png")
