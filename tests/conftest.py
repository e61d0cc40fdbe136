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


@pytest.fixture(scope="session")
def tiny_bundle(tiny_llava_dir, tmp_path_factory):
    """The tiny checkpoint exported once with the default pruning config (snapkv: no PrefillSelect)."""
    from vtprune.export.bundle import export_bundle
    from vtprune.models.config import PruneConfig

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    export_bundle(tiny_llava_dir, out, PruneConfig())
    return out


@pytest.fixture(scope="session")
def tiny_h2o_bundle(tiny_llava_dir, tmp_path_factory):
    """The tiny checkpoint exported with the paper's H2O, whose prefill shortens the prompt (PrefillSelect)."""
    from vtprune.export.bundle import export_bundle
    from vtprune.models.config import PruneConfig

    out = tmp_path_factory.mktemp("bundles") / "tiny-h2o"
    export_bundle(tiny_llava_dir, out, PruneConfig(policy="h2o"))
    return out


@pytest.fixture(scope="session")
def tiny_ort_bundle(tiny_llava_dir, tmp_path_factory):
    """The tiny checkpoint with the ORT-targeted decoder (export/ort_ops.py), default pruning config."""
    from vtprune.export.bundle import export_bundle
    from vtprune.models.config import PruneConfig

    out = tmp_path_factory.mktemp("bundles") / "tiny-ort"
    export_bundle(tiny_llava_dir, out, PruneConfig(), decoder_form="ort")
    return out


@pytest.fixture(scope="session")
def tiny_inplace_bundle(tiny_llava_dir, tmp_path_factory):
    """The tiny checkpoint with the in-place decoder (export/inplace.py), default pruning config."""
    from vtprune.export.bundle import export_bundle
    from vtprune.models.config import PruneConfig

    out = tmp_path_factory.mktemp("bundles") / "tiny-inplace"
    export_bundle(tiny_llava_dir, out, PruneConfig(), decoder_form="inplace")
    return out


@pytest.fixture(scope="session")
def embedded_bundle(tmp_path_factory):
    """The shipped embedded model exported once with the default pruning config (about 20 s)."""
    from vtprune.export.bundle import export_bundle
    from vtprune.models.config import PruneConfig
    from vtprune.models.loading import default_model_dir

    out = tmp_path_factory.mktemp("embedded") / "bundle"
    export_bundle(default_model_dir(), out, PruneConfig())
    return out
