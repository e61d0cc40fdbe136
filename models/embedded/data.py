"""The procedural visual-question set the embedded model is trained and evaluated on.

Why procedural: no image data set can be downloaded here, and a generator makes every split
reproducible from (split, seed, index). Each scene is a 336x336 Pillow image of a few flat shapes
(colour x shape x size) on a textured, low-saturation background; the objects cover a minority of the
image, so most of the 24x24 patches are background, as in real photos (which is what token pruning
exploits). Each scene carries ground truth for auxiliary training targets: per-patch labels on the
24x24 grid and a scene summary (which objects, counts, regions).

Question kinds (the paper's evaluation kinds): `exist` (yes/no, POPE-like balanced negatives of three
types: random, popular, adversarial), `count`, `colour`, `position` (relative position of two
objects), `describe` (a long answer, for decode-time eviction).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 336
PATCH = 14
GRID = IMAGE_SIZE // PATCH  # 24 patches a side, 576 in all

COLOURS = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 75, 225),
    "yellow": (240, 215, 35),
    "purple": (150, 55, 195),
    "orange": (250, 135, 25),
}
SHAPES = ["circle", "square", "triangle", "diamond", "cross"]
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds", "cross": "crosses"}
SIZES = {"small": (28, 36), "medium": (46, 56), "large": (66, 80)}  # bounding-box side in pixels
REGIONS = ["top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right"]
KINDS = ["exist", "count", "colour", "position", "describe"]
# The question forms `ask` writes, one per line of the model card's vocabulary section; the model knows no others
# (a word-level vocabulary of these words: any other word is <unk>). tests/models/embedded check `ask` against them.
QUESTION_FORMS = (
    "Is there a <colour> <shape> in the image?",
    "How many <shapes> are there?",
    "How many <colour> objects are there?",
    "What colour is the <shape>?",
    "Where is the <colour> <shape> relative to the <colour> <shape>?",
    "Describe the image.",
)


def matches_a_question_form(question: str) -> bool:
    """Whether `question` is one of QUESTION_FORMS with known colours and shapes (spaces as asked)."""
    fill = {"<colour>": "|".join(COLOUR_NAMES), "<shape>": "|".join(SHAPES), "<shapes>": "|".join(PLURAL.values())}
    text = " ".join(question.split())
    for form in QUESTION_FORMS:
        pattern = re.escape(form)
        for slot, words in fill.items():
            pattern = pattern.replace(re.escape(slot), f"(?:{words})")
        if re.fullmatch(pattern, text):
            return True
    return False
NEG_TYPES = ["random", "popular", "adversarial"]
SPLITS = {"train": 0, "val": 1, "test": 2}
MAX_OBJECTS = 5
MAX_COVERAGE = 0.30  # objects never cover more than this share of the image

COLOUR_NAMES = list(COLOURS)
N_COMBOS = len(COLOURS) * len(SHAPES)
# The generator's prior over (colour, shape) is skewed on purpose, so that "popular" negatives
# (POPE: objects frequent in the data set but absent from this image) mean something.
_PRIOR = np.linspace(2.0, 0.5, N_COMBOS)[np.random.default_rng(1234).permutation(N_COMBOS)]
PRIOR = _PRIOR / _PRIOR.sum()
POPULAR = [int(i) for i in np.argsort(-PRIOR)[:8]]  # the eight most frequent combos


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    size: str
    cx: float  # centre, pixels
    cy: float
    side: float  # bounding-box side, pixels

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def region(self) -> str:
        col = min(int(self.cx // (IMAGE_SIZE / 3)), 2)
        row = min(int(self.cy // (IMAGE_SIZE / 3)), 2)
        return REGIONS[3 * row + col]

    @property
    def combo(self) -> int:
        return COLOUR_NAMES.index(self.colour) * len(SHAPES) + SHAPES.index(self.shape)


@dataclass
class Scene:
    image: Image.Image
    objects: list[Obj]
    patch_object: np.ndarray  # [24, 24] int: 0 background, i+1 = objects[i] covers most of the patch

    def patch_targets(self) -> dict[str, np.ndarray]:
        """Dense per-patch labels (auxiliary targets for the vision tower), each [24, 24]."""
        colour = np.zeros((GRID, GRID), np.int64)  # 0 = background, 1.. = COLOUR_NAMES
        shape = np.zeros((GRID, GRID), np.int64)  # 0 = background, 1.. = SHAPES
        size = np.zeros((GRID, GRID), np.int64)  # 0 = background, 1.. = small, medium, large
        centre = np.zeros((GRID, GRID), np.int64)  # 1 on the patch holding an object's centre
        region = np.zeros((GRID, GRID), np.int64)  # 0 = background, 1.. = REGIONS: the object's, on each of its patches
        for i, o in enumerate(self.objects):
            m = self.patch_object == i + 1
            colour[m] = COLOUR_NAMES.index(o.colour) + 1
            shape[m] = SHAPES.index(o.shape) + 1
            size[m] = list(SIZES).index(o.size) + 1
            region[m] = REGIONS.index(o.region) + 1
            centre[min(int(o.cy // PATCH), GRID - 1), min(int(o.cx // PATCH), GRID - 1)] = 1
        return {"colour": colour, "shape": shape, "size": size, "centre": centre, "region": region}

    def summary(self) -> dict[str, np.ndarray]:
        """Scene summary (auxiliary target read from CLS): which combos, counts, occupied regions."""
        present = np.zeros(N_COMBOS, np.float32)
        by_colour = np.zeros(len(COLOURS), np.int64)
        by_shape = np.zeros(len(SHAPES), np.int64)
        regions = np.zeros(len(REGIONS), np.float32)
        for o in self.objects:
            present[o.combo] = 1.0
            by_colour[COLOUR_NAMES.index(o.colour)] += 1
            by_shape[SHAPES.index(o.shape)] += 1
            regions[REGIONS.index(o.region)] = 1.0
        return {
            "present": present,
            "by_colour": by_colour,
            "by_shape": by_shape,
            "total": np.array(len(self.objects), np.int64),
            "regions": regions,
        }


@dataclass
class QA:
    question: str
    answer: str
    kind: str
    meta: dict = field(default_factory=dict)  # "refs": indices of the objects the question is about;
    # "neg_type" ("random", "popular", "adversarial") for existence questions


@dataclass
class Sample:
    """One evaluation item: a scene and one question about it."""

    image: Image.Image
    question: str
    answer: str
    kind: str
    patch_labels: np.ndarray  # [24, 24] int, 0 = background, i+1 = objects[i]
    summary: dict
    objects: list[Obj]
    meta: dict


# ---------------------------------------------------------------- images


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


def _background(rng: np.random.Generator) -> np.ndarray:
    """A low-saturation texture: smooth noise, an optional stripe/checker pattern, grain. [H, W, 3] float."""
    n = IMAGE_SIZE
    base = rng.uniform(70, 200, 3)
    base = base.mean() + (base - base.mean()) * 0.3  # muted, so that object colours stand out
    g = int(rng.integers(3, 9))
    coarse = Image.fromarray(rng.normal(0, 1, (g, g)).astype(np.float32), mode="F")
    smooth = np.asarray(coarse.resize((n, n), Image.BILINEAR))[..., None] * rng.uniform(8, 22)  # [H, W, 1]
    y, x = np.mgrid[0:n, 0:n].astype(np.float32)
    kind = rng.integers(0, 3)
    if kind == 0:  # stripes at a random angle
        theta, period = rng.uniform(0, np.pi), rng.uniform(8, 30)
        pattern = np.sin(2 * np.pi * (x * np.cos(theta) + y * np.sin(theta)) / period)
    elif kind == 1:  # checker
        period = rng.uniform(10, 40)
        pattern = ((x // period + y // period) % 2) * 2 - 1
    else:
        pattern = np.zeros_like(x)
    pattern = pattern[..., None] * rng.uniform(4, 12)
    grain = rng.normal(0, 5, (n, n, 1))
    return base + smooth + pattern + grain


def _polygon(shape: str, cx: float, cy: float, side: float) -> list[tuple[float, float]] | None:
    h = side / 2
    if shape == "square":
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "diamond":
        return [(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)]
    if shape == "cross":
        t = side / 6
        return [(cx - t, cy - h), (cx + t, cy - h), (cx + t, cy - t), (cx + h, cy - t), (cx + h, cy + t),
                (cx + t, cy + t), (cx + t, cy + h), (cx - t, cy + h), (cx - t, cy + t), (cx - h, cy + t),
                (cx - h, cy - t), (cx - t, cy - t)]  # fmt: skip
    return None  # circle


def _draw(draw: ImageDraw.ImageDraw, o: Obj, fill) -> None:
    poly = _polygon(o.shape, o.cx, o.cy, o.side)
    if poly is None:
        h = o.side / 2
        draw.ellipse([o.cx - h, o.cy - h, o.cx + h, o.cy + h], fill=fill)
    else:
        draw.polygon(poly, fill=fill)


def _place(rng: np.random.Generator, n_objects: int, sizes: list[str]) -> list[Obj]:
    objects: list[Obj] = []
    area = 0.0
    for _ in range(n_objects):
        for _attempt in range(50):
            size = sizes[int(rng.integers(len(sizes)))]
            side = float(rng.uniform(*SIZES[size]))
            if area + side * side > MAX_COVERAGE * IMAGE_SIZE**2:
                continue
            cx, cy = rng.uniform(side / 2 + 4, IMAGE_SIZE - side / 2 - 4, 2)
            if all(np.hypot(cx - p.cx, cy - p.cy) > (side + p.side) / 2 * 1.15 + 6 for p in objects):
                combo = int(rng.choice(N_COMBOS, p=PRIOR))
                colour, shape = COLOUR_NAMES[combo // len(SHAPES)], SHAPES[combo % len(SHAPES)]
                objects.append(Obj(colour, shape, size, float(cx), float(cy), side))
                area += side * side
                break
    return objects


def make_scene(
    split: str = "train", seed: int = 0, index: int = 0, max_objects: int = MAX_OBJECTS, sizes: list[str] | None = None
) -> Scene:
    """The scene number `index` of a split, fully determined by (split, seed, index, max_objects, sizes)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    rng = _rng(SPLITS[split], seed, index, max_objects)
    n = int(rng.integers(1, max_objects + 1))
    objects = _place(rng, n, sizes or list(SIZES))
    pixels = _background(rng)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw, mdraw = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    for i, o in enumerate(objects):
        jitter = rng.integers(-12, 13, 3)
        _draw(draw, o, tuple(int(c) for c in np.clip(np.array(COLOURS[o.colour]) + jitter, 0, 255)))
        _draw(mdraw, o, i + 1)
    return Scene(image, objects, _patch_object(np.asarray(mask), len(objects)))


def _patch_object(mask: np.ndarray, n_objects: int) -> np.ndarray:
    """[336, 336] object-index mask -> [24, 24]: the object covering >= 30% of each patch (else 0)."""
    cells = mask.reshape(GRID, PATCH, GRID, PATCH).transpose(0, 2, 1, 3).reshape(GRID, GRID, PATCH * PATCH)
    counts = np.stack([(cells == i).sum(-1) for i in range(n_objects + 1)], -1)  # [24, 24, n+1]
    counts[..., 0] = 0
    best = counts.argmax(-1)
    return np.where(counts.max(-1) >= 0.3 * PATCH * PATCH, best, 0).astype(np.int64)


# ---------------------------------------------------------------- questions


def description_order(objects: list[Obj]) -> list[int]:
    """Indices of the objects in the order a description names them: by region, then left to right."""
    return sorted(range(len(objects)), key=lambda i: (REGIONS.index(objects[i].region), objects[i].cx))


def _describe(objects: list[Obj]) -> str:
    order = [objects[i] for i in description_order(objects)]
    items = ", ".join(f"a {o.size} {o.colour} {o.shape} at the {o.region}" for o in order)
    n = len(objects)
    return f"There {'is' if n == 1 else 'are'} {n} object{'' if n == 1 else 's'}. {items[0].upper()}{items[1:]}."


def _relation(a: Obj, b: Obj) -> str | None:
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if abs(dx) > 1.5 * abs(dy) and abs(dx) > 20:
        return "left" if dx < 0 else "right"
    if abs(dy) > 1.5 * abs(dx) and abs(dy) > 20:
        return "above" if dy < 0 else "below"
    return None


def ask(scene: Scene, kind: str, rng: np.random.Generator, positive: bool | None = None,
        neg_type: str | None = None) -> QA | None:  # fmt: skip
    """One question of `kind` about the scene, or None when the scene cannot carry that kind.

    For `exist`, `positive` and `neg_type` fix the answer and the kind of negative (else drawn)."""
    objs = scene.objects
    present = {o.combo for o in objs}
    names = [o.name for o in objs]
    unique = [o for o in objs if names.count(o.name) == 1]
    if kind == "exist":
        if positive if positive is not None else rng.random() < 0.5:
            o = objs[int(rng.integers(len(objs)))]
            return QA(f"Is there a {o.name} in the image?", "yes", kind, {"neg_type": None, "refs": [objs.index(o)]})
        neg_type = neg_type or NEG_TYPES[int(rng.integers(3))]
        absent = [c for c in range(N_COMBOS) if c not in present]
        if neg_type == "popular":
            pool = [c for c in POPULAR if c not in present]
        elif neg_type == "adversarial":  # shares a colour or a shape with an object in the image
            pool = [c for c in absent if any(c // len(SHAPES) == p // len(SHAPES) or c % len(SHAPES) == p % len(SHAPES) for p in present)]
        else:
            pool = absent
        c = int(rng.choice(pool or absent))
        name = f"{COLOUR_NAMES[c // len(SHAPES)]} {SHAPES[c % len(SHAPES)]}"
        return QA(f"Is there a {name} in the image?", "no", kind, {"neg_type": neg_type, "refs": []})
    if kind == "count":
        if rng.random() < 0.5:
            s = SHAPES[int(rng.integers(len(SHAPES)))]
            n = sum(o.shape == s for o in objs)
            refs = [i for i, o in enumerate(objs) if o.shape == s]
            return QA(f"How many {PLURAL[s]} are there?", str(n), kind, {"refs": refs})
        c = COLOUR_NAMES[int(rng.integers(len(COLOURS)))]
        n = sum(o.colour == c for o in objs)
        refs = [i for i, o in enumerate(objs) if o.colour == c]
        return QA(f"How many {c} objects are there?", str(n), kind, {"refs": refs})
    if kind == "colour":
        shapes = [o.shape for o in objs]
        single = [o for o in objs if shapes.count(o.shape) == 1]
        if not single:
            return None
        o = single[int(rng.integers(len(single)))]
        return QA(f"What colour is the {o.shape}?", o.colour, kind, {"refs": [objs.index(o)]})
    if kind == "position":
        pairs = [(a, b, r) for a in unique for b in unique if a is not b and (r := _relation(a, b))]
        if not pairs:
            return None
        a, b, r = pairs[int(rng.integers(len(pairs)))]
        return QA(f"Where is the {a.name} relative to the {b.name}?", r, kind, {"refs": [objs.index(a), objs.index(b)]})
    if kind == "describe":
        return QA("Describe the image.", _describe(objs), kind, {"refs": list(range(len(objs)))})
    raise ValueError(f"unknown question kind {kind!r}; expected one of {KINDS}")


def conversation(scene: Scene, rng: np.random.Generator, turns: int) -> list[QA]:
    """Several question/answer turns about one scene (one vision pass serves them all in training;
    the turns do not see each other there, so a description cannot give later answers away)."""
    out: list[QA] = []
    for _ in range(turns * 3):
        if len(out) == turns:
            break
        kind = KINDS[int(rng.integers(len(KINDS)))]
        if kind == "describe" and any(q.kind == "describe" for q in out):
            continue
        qa = ask(scene, kind, rng)
        if qa is not None and all(q.question != qa.question for q in out):
            out.append(qa)
    return out


def make_sample(split: str = "test", seed: int = 0, index: int = 0, kind: str | None = None) -> Sample:
    """Evaluation item `index`: kinds cycle through KINDS, existence answers alternate yes/no and
    negatives cycle through NEG_TYPES, so that any prefix of a split is balanced."""
    kind = kind or KINDS[index % len(KINDS)]
    turn = index // len(KINDS)
    positive, neg_type = turn % 2 == 0, NEG_TYPES[(turn // 2) % len(NEG_TYPES)]
    for attempt in range(100):
        scene = make_scene(split, seed, index + 1_000_003 * attempt)
        qa = ask(scene, kind, _rng(SPLITS[split], seed, index, attempt, 7), positive, neg_type)
        if qa is not None:
            return Sample(scene.image, qa.question, qa.answer, qa.kind, scene.patch_object, scene.summary(),
                          scene.objects, qa.meta)  # fmt: skip
    raise RuntimeError(f"no scene could carry a {kind!r} question")  # not reached for the kinds above


# ---------------------------------------------------------------- scoring

_DESC = re.compile(r"(small|medium|large) (\w+) (\w+) at the (top left|top right|bottom left|bottom right|top|bottom|left|right|centre)")


def parse_description(text: str) -> list[tuple[str, str, str, str]]:
    """(size, colour, shape, region) tuples named in a description, in order."""
    return [m.groups() for m in _DESC.finditer(text.lower())]


def score(kind: str, prediction: str, answer: str) -> float:
    """1.0 / 0.0 for short answers (first word, case and punctuation ignored); F1 over the described objects."""
    if kind == "describe":
        pred, gold = parse_description(prediction), parse_description(answer)
        if not pred or not gold:
            return float(pred == gold)
        hit = sum(min(pred.count(t), gold.count(t)) for t in set(gold))
        p, r = hit / len(pred), hit / len(gold)
        return 0.0 if hit == 0 else 2 * p * r / (p + r)
    words = re.findall(r"[a-z0-9]+", prediction.lower())
    return float(bool(words) and words[0] == answer.lower())
