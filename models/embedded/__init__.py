"""The embedded model: the small LLaVA every command runs on by default, and everything that made it.

Not the method: the method (Stage 1, Stage 2, the reference they are tested on) is the rest of `vtprune.models`.
`checkpoint/` holds the checkpoint in the llava-hf layout (config.json, model.safetensors, tokenizer files; its
model card is checkpoint/README.md; `vtprune train --out` never writes there, and no code lives in
it), and this folder the code that produced it, each file one concept, in the order they are used:

- `data.py`: the procedural visual-question set (scenes, questions, answers, splits by seed) and its scoring rule;
- `tokenizer.py`: the word-level tokenizer and the CLIP preprocessing config the checkpoint ships with;
- `batches.py`: training batches and the curriculum (pooled visual tokens, visual-token dropout, several turns);
- `losses.py`: the vision auxiliary targets, the grounding losses, the text loss;
- `train.py`: the training loop, validation, the checkpoint and its model card (`vtprune train`);
- `eviction_sim.py`: Stage 2's decode-time eviction replayed inside a training forward pass;
- `finetune.py`: pruning-aware fine-tuning (`vtprune train --finetune-pruned`).
"""
