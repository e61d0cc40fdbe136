"""Tiny random LLaVA checkpoints saved by `transformers` itself (llava-hf layout), for fast tests."""

from __future__ import annotations

import torch


def tiny_llava_config(gqa: bool = True, image_size: int = 112, vision_layers: int = 6, vocab: int = 128):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers, num_attention_heads=4,
        image_size=image_size, patch_size=14, projection_dim=32,
    )
    text = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2 if gqa else 4, vocab_size=vocab, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=vocab - 1)


def save_tiny_llava(path, seed: int = 0, shard: bool = False, **kwargs):
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(tiny_llava_config(**kwargs)).eval()
    model.save_pretrained(path, max_shard_size="40KB" if shard else "5GB")
    return path


WORDS = ["USER", "ASSISTANT", ":", "?", "what", "is", "in", "the", "image", "a", "red", "blue", "circle", "square", "yes", "no"]


def save_tiny_tokenizer(path, vocab: int = 128, image_size: int = 112):
    """tokenizer.json (+ config) and preprocessor_config.json so the tiny checkpoint runs end to end.

    Word-level: ids 0-2 are <pad> <s> </s>, 3 is <unk>, then WORDS, then filler words, and the image token
    last (id vocab - 1, as in tiny_llava_config).
    """
    import json
    from pathlib import Path

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    path = Path(path)
    tokens = ["<pad>", "<s>", "</s>", "<unk>"] + WORDS
    tokens += [f"w{i}" for i in range(vocab - 1 - len(tokens))] + ["<image>"]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(["<pad>", "<s>", "</s>", "<unk>", "<image>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", "image_token": "<image>",
         "tokenizer_class": "PreTrainedTokenizerFast"}))
    (path / "preprocessor_config.json").write_text(json.dumps(
        {"crop_size": {"height": image_size, "width": image_size}, "size": {"shortest_edge": image_size},
         "do_center_crop": True, "do_normalize": True, "do_resize": True, "do_rescale": True, "do_convert_rgb": True,
         "resample": 3, "rescale_factor": 1 / 255, "image_processor_type": "CLIPImageProcessor",
         "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}))
    return path


def save_tiny_image(path, seed: int = 0, size: int = 150):
    """A small RGB PNG with a bright square on noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = (rng.random((size, size, 3)) * 80).astype("uint8")
    x, y = rng.integers(0, size - 40, 2)
    pixels[y : y + 40, x : x + 40] = rng.integers(150, 256, 3)
    Image.fromarray(pixels).save(path)
    return path
