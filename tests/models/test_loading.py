"""Loading refuses what it cannot read safely, with one clear line naming the file, before any weight is read."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from vtprune.errors import UserError
from vtprune.models.config import PruneConfig
from vtprune.models.loading import ModelFolder, load_llava, read_config, weight_files


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_loads_a_transformers_checkpoint(tiny_llava_dir):
    model = load_llava(tiny_llava_dir)
    assert model.config.model_type == "llava" and not model.training


def test_pickle_only_checkpoint_is_refused(tiny_llava_dir, tmp_path):
    d = _copy(tiny_llava_dir, tmp_path / "pickled")
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(UserError, match="pickle"):
        load_llava(d)


def test_corrupt_and_truncated_safetensors_are_refused(tiny_llava_dir, tmp_path):
    d = _copy(tiny_llava_dir, tmp_path / "truncated")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(UserError, match="truncated"):
        weight_files(d)
    f.write_bytes(b"\xff" * 64)
    with pytest.raises(UserError, match="not a valid safetensors"):
        load_llava(d)


def test_other_model_type_is_refused(tiny_llava_dir, tmp_path):
    d = _copy(tiny_llava_dir, tmp_path / "other")
    config = json.loads((d / "config.json").read_text())
    config["model_type"] = "blip-2"
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="expected 'llava'"):
        read_config(d)
    config["model_type"] = "llava"
    config["text_config"]["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="text_config.model_type"):
        read_config(d)


def test_missing_shard_is_refused(tmp_path):
    from tiny_models import save_tiny_llava

    d = save_tiny_llava(tmp_path / "sharded", shard=True)
    shards = sorted(d.glob("model-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(UserError, match="missing"):
        load_llava(d)


def test_missing_tensor_is_refused(tiny_llava_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    d = _copy(tiny_llava_dir, tmp_path / "missing-tensor")
    tensors = load_file(d / "model.safetensors")
    tensors.pop(next(k for k in tensors if "lm_head" in k))
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="missing"):
        load_llava(d)


def test_model_folder_checks_the_weights_on_open_and_reads_the_tokenizer_on_first_use(tiny_llava_dir, tmp_path):
    """`vtprune run` relies on the order: config and weights fail first, before the prompt and image are read."""
    d = _copy(tiny_llava_dir, tmp_path / "no-tokenizer")
    (d / "tokenizer.json").unlink()
    folder = ModelFolder(d)
    assert folder.config["model_type"] == "llava"
    with pytest.raises(UserError, match="tokenizer.json"):
        folder.tokenizer
    (d / "model.safetensors").unlink()
    with pytest.raises(UserError, match="safetensors"):
        ModelFolder(d)


def test_model_folder_reference_refuses_a_tokenizer_whose_image_token_differs(tiny_llava_dir, tmp_path):
    d = _copy(tiny_llava_dir, tmp_path / "other-image-token")
    folder = ModelFolder(d)
    config = json.loads((d / "config.json").read_text())
    config["image_token_id"] = folder.tokenizer.image_token_id - 1  # inside the vocabulary (127 + 1 is refused by the config check)
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="image token id"):
        folder.reference(PruneConfig())
    assert ModelFolder(tiny_llava_dir).reference(PruneConfig()).image_token_id == ModelFolder(tiny_llava_dir).tokenizer.image_token_id
