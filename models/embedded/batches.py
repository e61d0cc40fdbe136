"""Training batches and the curriculum: scenes, several independent question/answer turns per image, token ids.

Why several turns: one vision pass serves many answers (design.md, "The embedded model"). Each turn sees the
image and itself only, at a single-turn prompt's positions (`turn_mask`), as inference asks. The curriculum
(`Curriculum`) starts on pooled visual tokens and few large objects; `keep_objects` is the visual-token dropout
of the steps on the real 576. Everything is deterministic from the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vtprune.models.embedded import data
from vtprune.models.embedded import tokenizer as tokenizer_mod


NEG = -1e9  # "masked" in additive attention masks (finite: a fully masked padding row gives no NaN)


@dataclass
class Chat:
    """One image's chat as token lists: ids, next-token targets (-100: none), loss weights, the turn
    each token belongs to (0: the shared prefix) and its position id."""

    ids: list[int]
    targets: list[int]
    weights: list[float]
    turn: list[int]
    position: list[int]


def turn_mask(turn: torch.Tensor) -> torch.Tensor:
    """[B, S] turn of each token (0 = shared prefix, -1 = padding) -> additive mask [B, 1, S, S]:
    causal, no padding keys, and each turn sees the prefix and itself only."""
    s = turn.shape[1]
    key = turn[:, None, :]  # [B, 1, S]
    allowed = torch.tril(torch.ones(s, s, dtype=torch.bool)) & (key >= 0) & ((key == 0) | (key == turn[:, :, None]))
    return torch.where(allowed, 0.0, NEG)[:, None]


@dataclass
class Curriculum:
    pool: int  # visual tokens average-pooled pool x pool (1 = the real 576)
    max_objects: int
    sizes: list[str] | None


class Batcher:
    """Scenes, conversations and token ids, deterministic from the seed."""

    def __init__(self, tok, seed: int, turns: int):
        self.tok, self.seed, self.turns = tok, seed, turns
        self.index = 0
        self._ids: dict[str, list[int]] = {}
        self.image_id = tok.convert_tokens_to_ids(tokenizer_mod.IMAGE_TOKEN)
        self.bos, self.eos, self.pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id

    def ids(self, text: str) -> list[int]:
        if text not in self._ids:
            self._ids[text] = self.tok(text, add_special_tokens=False).input_ids
        return self._ids[text]

    def scenes(self, n: int, cur: Curriculum) -> list[data.Scene]:
        out = [data.make_scene("train", self.seed, self.index + i, cur.max_objects, cur.sizes) for i in range(n)]
        self.index += n
        return out

    def conversation(self, scene: data.Scene, n_image: int, rng, ground: list | None = None,
                     words: list | None = None, keep: np.ndarray | None = None, names: list | None = None,
                     coords: list | None = None) -> Chat:  # fmt: skip
        """Several question/answer turns about one image; the image stands as n_image image tokens.

        The turns are independent: each sees the shared prefix (BOS, "USER:", the image) and itself,
        at the positions a single-turn prompt has (`Chat.turn`, `Chat.position`), which is how every
        question is asked at inference; one vision pass and one prefix serve them all.
        The tokens are the 24x24 patches average-pooled to n_image, or the patches `keep` names (in
        spatial order). `ground` collects (position, head, [n_image] bool): where an answer word is
        predicted, which head should look, and at which visual tokens (the asked objects; for a
        position question head 0 at the first object and head 1 at the second, so that their
        coordinates are not averaged together; for a description, each item at its own object);
        `words` the same for each colour or shape word of a question and the tokens of that colour or shape;
        `names` (position, head, [positions]) for a position question: where its answer is predicted, and
        the question words naming the first object (head 1) and the second (head 2); `coords`
        (position, slot, (x, y)): the centre of the object (slot 0) or of the second object of a
        position question (slot 1) that the language model's middle layer should carry there."""
        ids = [self.bos] + self.ids("USER:") + [self.image_id] * n_image
        prefix = len(ids)
        targets, weights = [-100] * prefix, [0.0] * prefix
        turn, position = [0] * prefix, list(range(prefix))
        qas = data.conversation(scene, rng, self.turns)
        g = int(round(n_image**0.5))
        pool = data.GRID // g

        def view(hit):  # [24, 24] bool -> [n_image]
            if keep is not None:
                return hit.reshape(-1)[keep]
            return hit.reshape(g, pool, g, pool).any((1, 3)).reshape(-1)

        def objects(refs):
            return view(np.isin(scene.patch_object, [r + 1 for r in refs]))

        def centre(ref):
            o = scene.objects[ref]
            return (o.cx / data.IMAGE_SIZE, o.cy / data.IMAGE_SIZE)

        dense = scene.patch_targets() if words is not None else None
        for t, qa in enumerate(qas):
            prompt = self.ids(qa.question) + self.ids("ASSISTANT:")
            answer = self.ids(qa.answer) + [self.eos]
            refs = qa.meta.get("refs", [])
            first = len(ids) + len(prompt) - 1  # the position predicting answer[0]
            if ground is not None and qa.kind == "position":
                ground += [(first, 0, objects(refs[:1])), (first, 1, objects(refs[1:]))]
                if coords is not None:
                    coords += [(first, 0, centre(refs[0])), (first, 1, centre(refs[1]))]
                if names is not None:  # layer 0 first reads the two names apart, in the order asked
                    a, b = self.name_positions(self.ids(qa.question), scene.objects[refs[0]], scene.objects[refs[1]])
                    names += [(first, 1, [len(ids) + j for j in a]), (first, 2, [len(ids) + j for j in b])]
            elif ground is not None and qa.kind == "describe":
                for start, end, ref in self.describe_items(scene, answer):
                    ground += [(first + p, 0, objects([ref])) for p in range(start, end)]
                    if coords is not None:
                        coords += [(first + p, 0, centre(ref)) for p in range(start, end)]
            elif ground is not None and refs:
                ground.append((first, 0, objects(refs)))
            if words is not None:
                for j, tid in enumerate(self.ids(qa.question)):
                    hit = self.word_hit(tid, dense)
                    if hit is not None and hit.any():
                        words.append((len(ids) + j, 0, view(hit)))
            ids += prompt + answer
            turn += [t + 1] * (len(prompt) + len(answer))
            position += range(prefix, prefix + len(prompt) + len(answer))
            # predict answer[j] from the position before it; a turn weighs sqrt(its length): a one-word
            # answer is not drowned by a description, and a description's words are not starved (at
            # 1/length each, the description never got past its first word)
            targets += [-100] * (len(prompt) - 1) + answer + [-100]
            weights += [0.0] * (len(prompt) - 1) + [len(answer) ** -0.5 / len(qas)] * len(answer) + [0.0]
        return Chat(ids, targets, weights, turn, position)

    def name_positions(self, question: list[int], a: data.Obj, b: data.Obj) -> tuple[list[int], list[int]]:
        """Indices of the colour and shape words naming `a` (the first named) and `b` (after it) in a question."""
        words = [self.tok.convert_ids_to_tokens(t) for t in question]
        ia = [words.index(a.colour), words.index(a.shape)]
        ib = [ia[1] + 1 + words[ia[1] + 1 :].index(w) for w in (b.colour, b.shape)]
        return ia, ib

    def describe_items(self, scene: data.Scene, answer: list[int]) -> list[tuple[int, int, int]]:
        """(start, end, object) per item of a description: answer[start:end] are the item's words
        (from its size word to the comma or full stop after its region), in the description's order."""
        order = data.description_order(scene.objects)
        sizes = {self.tok.convert_tokens_to_ids(z) for z in data.SIZES}
        starts = [j for j, t in enumerate(answer) if t in sizes]
        ends = starts[1:] + [len(answer) - 1]
        return [(s, e - 1, ref) for s, e, ref in zip(starts, ends, order)]

    def word_hit(self, tid: int, dense: dict) -> np.ndarray | None:
        """[24, 24] patches of the colour or shape a question word names (None for other words)."""
        word = self.tok.convert_ids_to_tokens(tid)
        if word in data.COLOURS:
            return dense["colour"] == data.COLOUR_NAMES.index(word) + 1
        singular = {v: k for k, v in data.PLURAL.items()}.get(word, word)
        if singular in data.SHAPES:
            return dense["shape"] == data.SHAPES.index(singular) + 1
        return None

    def text_batch(self, scenes, n_image: int, rng, keeps: list | None = None):
        """Padded chats of a batch: ids, targets, weights, the additive attention mask [B, 1, S, S],
        position ids, and the packed grounding targets (answers, words, names, coords)."""
        grounds: list[list] = [[] for _ in scenes]
        words: list[list] = [[] for _ in scenes]
        names: list[list] = [[] for _ in scenes]
        coords: list[list] = [[] for _ in scenes]
        keeps = keeps or [None] * len(scenes)
        chats = [self.conversation(s, n_image, rng, g, w, k, a, c)
                 for s, g, w, k, a, c in zip(scenes, grounds, words, keeps, names, coords)]  # fmt: skip
        length = max(len(c.ids) for c in chats)
        ids = torch.full((len(chats), length), self.pad)
        targets = torch.full((len(chats), length), -100)
        weights = torch.zeros(len(chats), length)
        turn = torch.full((len(chats), length), -1)  # -1: padding
        position = torch.zeros(len(chats), length, dtype=torch.long)
        for i, c in enumerate(chats):
            n = len(c.ids)
            ids[i, :n], targets[i, :n], weights[i, :n] = torch.tensor(c.ids), torch.tensor(c.targets), torch.tensor(c.weights)
            turn[i, :n], position[i, :n] = torch.tensor(c.turn), torch.tensor(c.position)

        def pack(lists):  # -> ([G] row, [G] position, [G] head, [G, n_image] bool)
            where = [(i, pos, head) for i, g in enumerate(lists) for pos, head, _ in g]
            hits = [h for g in lists for _, _, h in g]
            return (
                torch.tensor([w[0] for w in where], dtype=torch.long),
                torch.tensor([w[1] for w in where], dtype=torch.long),
                torch.tensor([w[2] for w in where], dtype=torch.long),
                torch.from_numpy(np.stack(hits)) if hits else torch.zeros(0, n_image, dtype=torch.bool),
            )

        where = [(i, pos, head) for i, a in enumerate(names) for pos, head, _ in a]
        hits = torch.zeros(len(where), length, dtype=torch.bool)
        for g, (_, _, at) in enumerate(x for a in names for x in a):
            hits[g, at] = True
        named = tuple(torch.tensor([w[j] for w in where], dtype=torch.long) for j in range(3)) + (hits,)
        xy = pack([[(p, slot, np.array(c, np.float32)) for p, slot, c in cs] for cs in coords])
        return ids, targets, weights, turn_mask(turn), position, (pack(grounds), pack(words), named, xy)


def keep_objects(scenes, rng) -> list[np.ndarray]:
    """Visual-token dropout: every object patch of each scene plus the same number of background
    patches drawn at random (log-uniform, 4 to all), in spatial order. [K] int64 per scene.

    Why: the language model then learns to find objects among any number of tokens (what Stage 1
    hands it: a few dozen), and a step costs a fraction of one on all 576."""
    obj = [np.flatnonzero(s.patch_object.reshape(-1) > 0) for s in scenes]
    n_back = int(np.exp(rng.uniform(np.log(4), np.log(data.GRID**2))))
    total = min(max(len(o) for o in obj) + n_back, data.GRID**2)
    keeps = []
    for o in obj:
        back = np.setdiff1d(np.arange(data.GRID**2), o)
        keeps.append(np.sort(np.concatenate([o, rng.choice(back, total - len(o), replace=False)])))
    return keeps


def dense_targets(scenes) -> dict[str, torch.Tensor]:
    keys = ["colour", "shape", "size", "centre", "region"]
    per = [s.patch_targets() for s in scenes]
    out = {k: torch.from_numpy(np.stack([p[k] for p in per]).reshape(len(scenes), -1)) for k in keys}  # [B, 576]
    sums = [s.summary() for s in scenes]
    for k in ["present", "by_colour", "by_shape", "total", "regions"]:
        out[k] = torch.from_numpy(np.stack([s[k] for s in sums]))
    return out
