"""A procedural vision-language toy world: images of one object with five attributes.

Every image shows one object on a cluttered background. The object has a shape, colour,
texture, size and position, each drawn from a short list of human words (TASKS). Two kinds of
data come from it, both deterministic (item i is rendered from its own seed, no global RNG):
- SyntheticDataset: (PIL image, label) for one attribute, balanced classes, disjoint splits;
  `synthetic` (shape) is the training task, the other attributes are zero-shot targets.
- CaptionDataset: (PIL image, caption) pairs for contrastive pretraining; half the captions name
  all five attributes, the others one to four, through varied templates.
Geometry is given at 64 px and scaled to any resolution; drawing is vectorised numpy. Objects sit
on the corners of a 16-px grid (the toy ViT's patches), which lets a small ViT learn shapes and
positions from scratch in minutes rather than hours.
"""
import functools
import operator

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

SHAPES = ["circle", "square", "triangle", "star", "cross", "diamond", "ring", "heart", "crescent",
          "hexagon"]
COLOURS = {"red": (0.85, 0.1, 0.1), "orange": (0.95, 0.5, 0.05), "yellow": (0.9, 0.85, 0.1),
           "green": (0.1, 0.7, 0.15), "cyan": (0.1, 0.8, 0.85), "blue": (0.1, 0.2, 0.9),
           "purple": (0.55, 0.15, 0.75), "pink": (0.95, 0.45, 0.7)}
TEXTURES = ["plain", "striped", "dotted", "checkered"]
SIZES = {"small": (8.0, 9.5), "medium": (10.5, 12.0), "large": (13.0, 14.5)}   # radius, px at 64
POSITIONS = {"top left": "in the top left", "top": "at the top", "top right": "in the top right",
             "left": "on the left", "center": "in the center", "right": "on the right",
             "bottom left": "in the bottom left", "bottom": "at the bottom",
             "bottom right": "in the bottom right"}
ATTRIBUTES = {"shape": SHAPES, "colour": list(COLOURS), "texture": TEXTURES, "size": list(SIZES),
              "position": list(POSITIONS)}
TASKS = {"synthetic": SHAPES, "synthetic-colour": list(COLOURS), "synthetic-texture": TEXTURES,
         "synthetic-size": list(SIZES), "synthetic-position": list(POSITIONS)}
TASK_ATTRIBUTE = {"synthetic": "shape", "synthetic-colour": "colour",
                  "synthetic-texture": "texture", "synthetic-size": "size",
                  "synthetic-position": "position"}
DOMAINS = {"synthetic-v2": "photo", "synthetic-sketch": "sketch", "synthetic-negative": "negative"}
"""Shifted domains of the training task (its shapes, new draws), for domain generalisation: `v2` a fresh
draw from the same generator (ImageNet-V2's idea), `sketch` the object's outline on a plain ground
(ImageNet-Sketch's), `negative` the photo's negative (a rendition the encoder never saw)."""
SPLITS = {"train": 100, "val": 20, "test": 50}    # default images per class
_STREAMS = {"train": 1, "val": 2, "test": 3, "captions": 4}   # seed streams, disjoint


def sample_attributes(rng, **fixed):
    """Draw {attribute: class name} uniformly; keyword arguments fix some of them."""
    attrs = {a: names[rng.integers(len(names))] for a, names in ATTRIBUTES.items()}
    attrs.update(fixed)
    return attrs


@functools.lru_cache(maxsize=8)
def _grid(res):
    """Pixel-centre coordinates in 64-px units: (res, res) arrays y, x."""
    c = (np.arange(res, dtype=np.float32) + 0.5) * (64.0 / res)
    return np.meshgrid(c, c, indexing="ij")


@functools.lru_cache(maxsize=8)
def _upsampler(res, n=5):
    """(res, n) matrix that linearly interpolates n control points onto res pixels."""
    t = np.linspace(0, n - 1, res)
    return np.maximum(0.0, 1.0 - np.abs(t[:, None] - np.arange(n)[None])).astype(np.float32)


def _polygon(rho, phi, n, phase):
    """Inside a regular n-gon of circumradius 1 with a vertex at angle `phase`."""
    t = np.mod(phi - phase, 2 * np.pi / n) - np.pi / n
    return rho * np.cos(t) <= np.cos(np.pi / n)


def _shape_mask(shape, u, v):
    """Boolean mask of `shape` in object coordinates (u right, v up, radius 1)."""
    rho, phi = np.hypot(u, v), np.arctan2(v, u)
    if shape == "circle":
        return rho <= 0.92
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.78
    if shape == "triangle":
        return _polygon(rho, phi, 3, np.pi / 2)
    if shape == "star":
        t = np.abs(np.mod(phi - np.pi / 2, 2 * np.pi / 5) - np.pi / 5) / (np.pi / 5)
        return rho <= 0.42 + 0.58 * t ** 1.5
    if shape == "cross":
        a, b = np.abs(u), np.abs(v)
        return ((a <= 0.32) & (b <= 0.95)) | ((b <= 0.32) & (a <= 0.95))
    if shape == "diamond":
        return np.abs(u) / 0.8 + np.abs(v) <= 1.0
    if shape == "ring":
        return (rho <= 0.95) & (rho >= 0.55)
    if shape == "heart":
        x, y = 1.2 * u, 1.2 * v + 0.2
        return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0
    if shape == "crescent":
        return (rho <= 0.95) & (np.hypot(u - 0.45, v - 0.1) > 0.75)
    if shape == "hexagon":
        return _polygon(rho, phi, 6, 0.0)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _texture(texture, x, y, rng):
    """Pattern in {0, 1} over the image (1 = darkened), x/y in 64-px units."""
    if texture == "plain":
        return np.zeros_like(x)
    a = rng.uniform(0, np.pi)
    xr, yr = x * np.cos(a) + y * np.sin(a), -x * np.sin(a) + y * np.cos(a)
    if texture == "striped":
        return (np.sin(2 * np.pi * xr / rng.uniform(3.5, 5.0) + rng.uniform(0, 2 * np.pi)) > 0
                ).astype(np.float32)
    if texture == "dotted":
        p = rng.uniform(4.5, 6.0)
        fx, fy = np.mod(xr + rng.uniform(0, p), p) - p / 2, np.mod(yr + rng.uniform(0, p), p) - p / 2
        return (fx * fx + fy * fy <= (0.3 * p) ** 2).astype(np.float32)
    if texture == "checkered":
        c = rng.uniform(2.5, 3.5)
        return np.mod(np.floor(xr / c) + np.floor(yr / c), 2).astype(np.float32)
    raise ValueError(f"unknown texture {texture!r}; expected one of {TEXTURES}")


def _outline(mask, width):
    """The pixels of a boolean mask within `width` pixels of its edge (4-neighbour erosion)."""
    inner = mask
    for _ in range(width):
        shrunk = np.zeros_like(inner)
        shrunk[1:-1, 1:-1] = (inner[1:-1, 1:-1] & inner[:-2, 1:-1] & inner[2:, 1:-1]
                              & inner[1:-1, :-2] & inner[1:-1, 2:])
        inner = shrunk
    return mask & ~inner


def render(attrs, res, rng, style="photo"):
    """Draw one image with attributes `attrs` -> uint8 array (res, res, 3); style photo, sketch or negative."""
    y, x = _grid(res)
    # background: a smooth greyish field, lightly tinted
    up = _upsampler(res)
    field = (up @ rng.uniform(-1, 1, (3, 5, 5)).astype(np.float32) @ up.T).transpose(1, 2, 0)
    img = rng.uniform(0.25, 0.75) + 0.12 * field.mean(-1, keepdims=True) + 0.04 * field
    # object
    row, col = divmod(list(POSITIONS).index(attrs["position"]), 3)
    cy, cx = (np.array([row, col]) + 1) * 16 + rng.uniform(-2, 2, 2)   # on patch corners
    r = rng.uniform(*SIZES[attrs["size"]])
    a = rng.uniform(-0.25, 0.25)
    dx, dy = (x - cx) / r, (cy - y) / r
    u, v = dx * np.cos(a) + dy * np.sin(a), -dx * np.sin(a) + dy * np.cos(a)
    mask = _shape_mask(attrs["shape"], u, v)
    colour = np.clip(np.array(COLOURS[attrs["colour"]]) + rng.uniform(-0.08, 0.08, 3), 0, 1)
    colour = colour * rng.uniform(0.8, 1.0)
    shade = 1.0 - rng.uniform(0.35, 0.5) * _texture(attrs["texture"], x, y, rng)
    img = np.where(mask[..., None], colour * shade[..., None], img)
    if style == "sketch":  # a dark outline on a plain light ground
        ground = np.full_like(img, rng.uniform(0.8, 0.95))
        img = np.where(_outline(mask, max(1, round(res / 32)))[..., None], rng.uniform(0.05, 0.2), ground)
    elif style != "photo" and style != "negative":
        raise ValueError(f"unknown style {style!r}; expected photo, sketch or negative")
    img = img + rng.normal(0, 0.03, img.shape)
    img = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    return 255 - img if style == "negative" else img


def caption(attrs, rng):
    """A caption naming a random non-empty subset of `attrs` with a random template."""
    count = min(rng.integers(1, 9), 5)     # half the captions name all five attributes
    named = set(rng.permutation(list(ATTRIBUTES))[:count])
    words = [attrs[a] for a in ("size", "colour", "texture") if a in named]
    if "shape" in named:
        words.append(attrs["shape"])
    elif rng.random() < 0.5:
        words.append(["shape", "object", "thing"][rng.integers(3)])
    if "position" in named:
        if rng.random() < 0.5:
            words.insert(0, attrs["position"])
        else:
            if not words:
                words.append("shape")
            words.append(POSITIONS[attrs["position"]])
    prefix = ["a photo of a", "a photo of a", "a picture of a", "an image of a", "a rendering of a",
              "a", "there is a", ""][rng.integers(8)]
    text = " ".join([prefix] + words).strip()
    return text + "." if rng.random() < 0.7 else text


def _item_rng(seed, stream, task, index):
    """Independent generator for one item (seed, stream, task, index all select it)."""
    return np.random.default_rng([seed, _STREAMS[stream], task, index])


class SyntheticDataset(Dataset):
    """Classify one attribute: item i -> (PIL RGB image, int label), labels balanced."""

    def __init__(self, task="synthetic", split="train", size=None, resolution=64, seed=0):
        if task not in TASKS and task not in DOMAINS:
            raise ValueError(f"unknown synthetic task {task!r}; expected one of {list(TASKS) + list(DOMAINS)}")
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
        self.task, self.split, self.resolution, self.seed = task, split, resolution, seed
        self.style = DOMAINS.get(task, "photo")
        self.attribute = TASK_ATTRIBUTE.get(task, "shape")
        self.classnames = list(TASKS.get(task, SHAPES))
        n = len(self.classnames)
        self.size = SPLITS[split] * n if size is None else int(size)
        self.targets = [i % n for i in range(self.size)]
        self._task_id = (list(TASKS) + list(DOMAINS)).index(task)  # a domain's images are new draws

    def __len__(self):
        return self.size

    def _draw(self, i):
        i = operator.index(i)  # an int, or a 0-d integer tensor from a sampler
        if not 0 <= i < self.size:
            raise IndexError(f"index {i} out of range for {self.size} items")
        rng = _item_rng(self.seed, self.split, self._task_id, i)
        return sample_attributes(rng, **{self.attribute: self.classnames[self.targets[i]]}), rng

    def attributes(self, i):
        """The attributes of item i, as {attribute: class name}."""
        return self._draw(i)[0]

    def __getitem__(self, i):
        attrs, rng = self._draw(i)
        return Image.fromarray(render(attrs, self.resolution, rng, self.style)), self.targets[i]


class CaptionDataset(Dataset):
    """Image-caption pairs for contrastive pretraining: item i -> (PIL RGB image, caption)."""

    def __init__(self, size=100_000, resolution=64, seed=0):
        self.size, self.resolution, self.seed = int(size), resolution, seed

    def __len__(self):
        return self.size

    def _draw(self, i):
        i = operator.index(i)
        if not 0 <= i < self.size:
            raise IndexError(f"index {i} out of range for {self.size} items")
        rng = _item_rng(self.seed, "captions", 0, i)
        attrs = sample_attributes(rng)
        return attrs, caption(attrs, rng), rng

    def attributes(self, i):
        """The attributes of item i, as {attribute: class name}."""
        return self._draw(i)[0]

    def array(self, i):
        """Item i without PIL: (uint8 array (res, res, 3), caption)."""
        attrs, text, rng = self._draw(i)
        return render(attrs, self.resolution, rng), text

    def __getitem__(self, i):
        arr, text = self.array(i)
        return Image.fromarray(arr), text
