"""`--model ORG/NAME`: resolved offline from a Hugging Face cache that the test lays out as huggingface_hub does
(blobs/, snapshots/<commit>/ links, refs/main), checked by the library's own cache scanner; downloads only when allowed."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

import pytest

from vtprune.cli import main
from vtprune.models.loading import default_model_dir, read_config, resolve_model, weight_files

from tiny_models import save_tiny_image, save_tiny_llava, save_tiny_tokenizer

REPO = "vtprune-test/embedded-llava"


def lay_out_cache(cache: Path, repo_id: str, folder: Path, commit: str = "a" * 40, ref: str = "main") -> Path:
    """Put `folder`'s files in a hub cache: blobs named by content hash, snapshot links to them, and a ref."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = repo / "snapshots" / commit
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        blob = repo / "blobs" / digest
        if not blob.exists():
            shutil.copyfile(f, blob)
        link = snapshot / f.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hf") / "hub"
    snapshot = lay_out_cache(cache, REPO, default_model_dir())
    return cache, snapshot


def test_the_cache_layout_is_the_librarys_own(hub_cache):
    from huggingface_hub import scan_cache_dir

    cache, snapshot = hub_cache
    info = scan_cache_dir(cache)
    assert not info.warnings, info.warnings
    (repo,) = info.repos
    assert repo.repo_id == REPO and set(repo.refs) == {"main"}
    (revision,) = repo.revisions
    assert revision.commit_hash == snapshot.name
    assert {f.file_name for f in revision.files} == {p.name for p in default_model_dir().iterdir() if p.is_file()}


def test_an_id_resolves_offline_to_its_snapshot_through_hf_hub_cache_and_hf_home(hub_cache, monkeypatch):
    cache, snapshot = hub_cache
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert resolve_model(REPO) == snapshot
    assert resolve_model(f"{REPO}@{snapshot.name}") == snapshot  # a pinned commit
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(cache.parent))  # HF_HOME/hub
    assert resolve_model(REPO) == snapshot
    assert read_config(snapshot)["model_type"] == "llava" and weight_files(snapshot)
    # A folder that exists is never taken for an id, and a non-id is left for the loader's own message.
    assert resolve_model(str(default_model_dir())) == default_model_dir()
    assert resolve_model("no/such/folder/deep") == Path("no/such/folder/deep")


def test_run_with_an_id_answers_like_run_with_the_folder(hub_cache, monkeypatch, tmp_path, capsys):
    cache, _ = hub_cache
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    image = save_tiny_image(tmp_path / "a.png")
    args = ["run", "--image", str(image), "--prompt", "Is there a red circle in the image?", "--max-new-tokens", "6", "--json"]
    assert main([*args, "--model", REPO]) == 0
    by_id = json.loads(capsys.readouterr().out)
    assert main([*args, "--model", str(default_model_dir())]) == 0
    by_folder = json.loads(capsys.readouterr().out)
    assert by_id["token_ids"] == by_folder["token_ids"] and by_id["kept_index"] == by_folder["kept_index"]
    assert Path(by_id["model"]).parent.parent.name == "models--" + REPO.replace("/", "--")


def test_a_sharded_snapshot_loads_though_its_shards_link_out_of_the_folder(tmp_path):
    folder = save_tiny_tokenizer(save_tiny_llava(tmp_path / "sharded", shard=True))
    assert (folder / "model.safetensors.index.json").is_file()
    snapshot = lay_out_cache(tmp_path / "hub", "tiny/sharded", folder)
    files = weight_files(snapshot)
    assert len(files) > 1 and all(f.is_symlink() and f.parent == snapshot for f in files)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket closes


@pytest.mark.parametrize("env, flags, says", [
    ({}, [], "not in the Hugging Face cache"),  # offline by default: no download is tried
    ({"HF_HUB_OFFLINE": "1"}, ["--download"], "HF_HUB_OFFLINE=1 forbids downloads"),
    ({}, ["--download"], "cannot download"),  # allowed, but the hub (a closed loopback port here) is unreachable
    ({"HF_HUB_OFFLINE": "0"}, [], "cannot download"),
])
def test_a_missing_id_is_one_clear_line_and_downloads_only_when_allowed(tmp_path, monkeypatch, capsys, env, flags, says):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")  # never the real hub, even when allowed
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert main(["run", "--model", "nobody/missing-model", "--image", "x.png", "--prompt", "hi", "--json", *flags]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1 and says in out.err, out.err
    assert out.err.startswith("vtprune: error: --model: ") or out.err.startswith("vtprune: error: --download: ")
    assert not any((tmp_path / "empty-hub").rglob("*.safetensors"))
