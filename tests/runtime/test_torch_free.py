"""`vtprune.runtime` must run where torch and transformers are not installed (design.md: a bundle needs only
onnxruntime, numpy, tokenizers and pillow). A subprocess blocks both at the import system, imports every module of
the package (found by walking it, so modules added later are covered too) and runs the torch-free pieces."""

import subprocess
import sys
import textwrap

BLOCKED = ("torch", "torchvision", "transformers", "accelerate", "bitsandbytes")

CHILD = textwrap.dedent(
    """
    import importlib, importlib.abc, pkgutil, sys

    BLOCKED = {blocked!r}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{{name}} is blocked: vtprune.runtime must not import it")
            return None

    sys.meta_path.insert(0, Block())
    for name in list(sys.modules):
        if name.split(".")[0] in BLOCKED:
            del sys.modules[name]

    import vtprune.runtime
    names = [m.name for m in pkgutil.walk_packages(vtprune.runtime.__path__, "vtprune.runtime.")]
    names += ["vtprune.models.config", "vtprune.models.preprocess", "vtprune.models.prompt"]  # what it imports from below
    for name in names:
        importlib.import_module(name)

    # Exercise the pieces, not only their imports.
    import json, pathlib, tempfile
    import numpy as np
    from PIL import Image
    from tokenizers import Tokenizer, models, pre_tokenizers
    from vtprune.runtime.memory import current_rss_mb, peak_rss_mb
    from vtprune.models.preprocess import PreprocessConfig, load_image, preprocess
    from vtprune.models.prompt import PromptTokenizer

    tmp = pathlib.Path(tempfile.mkdtemp())
    Image.fromarray(np.full((40, 60, 3), 128, np.uint8)).save(tmp / "a.png")
    config = PreprocessConfig.from_dict({{"size": {{"shortest_edge": 16}}, "crop_size": {{"height": 16, "width": 16}}}})
    pixels = preprocess(load_image(tmp / "a.png"), config)
    assert pixels.shape == (1, 3, 16, 16) and pixels.dtype == np.float32, (pixels.shape, pixels.dtype)

    tok = Tokenizer(models.WordLevel({{"<unk>": 0, "<image>": 1, "USER": 2, "ASSISTANT": 3, ":": 4, "hi": 5}}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<image>"])
    tok.save(str(tmp / "tokenizer.json"))
    prompt = PromptTokenizer.from_files(tmp / "tokenizer.json").build("hi")
    assert prompt.input_ids.tolist() == [2, 4, 1, 5, 3, 4] and prompt.image_index == 2, prompt

    assert peak_rss_mb() > 0 and current_rss_mb() > 0
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not loaded, loaded
    print("OK", len(names), "modules:", " ".join(names))
    """
)


def test_runtime_imports_and_runs_without_torch_or_transformers():
    result = subprocess.run(
        [sys.executable, "-c", CHILD.format(blocked=BLOCKED)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("OK"), result.stdout
    for module in ("vtprune.models.preprocess", "vtprune.models.prompt", "vtprune.runtime.memory"):
        assert module in result.stdout, result.stdout


def test_the_blocker_really_blocks():
    """The check above is only worth something if `import torch` fails under the same blocker."""
    child = CHILD.split("import vtprune.runtime")[0] + "import torch\n"
    result = subprocess.run([sys.executable, "-c", child.format(blocked=BLOCKED)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "torch is blocked" in result.stderr
