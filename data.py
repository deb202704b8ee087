"""Datasets, few-shot sampling, transforms and loaders; images leave here as float in [0, 1].

Three kinds of dataset, all returning (image, int label) with `.classnames` and `.targets`:
- the 15 datasets of the prompt-tuning literature (DATASETS, catalog.py) in CoOp's layout under a data root
  (--data-root, else $NAP_DATA, else ./data), read from CoOp's split_zhou_*.json files, the
  official FGVC-Aircraft lists, or ImageNet-style class folders plus CoOp's classnames.txt;
- any folder of class sub-folders (a user's own data), with train/ and test/ (or val/) sub-trees
  or, without them, a seeded 50/20/30 split per class;
- `synthetic` and `synthetic-*`, the procedural tasks of synthetic.py.
Class names are CoOp's, underscores read as spaces. ImageNet's val set serves as its test (and
val) split, as in CoOp; the four ImageNet variants are test-only. Transforms follow CoOp/MaPLe
(bicubic): random resized crop + flip for training, resize + centre crop for evaluation, with
no normalisation (the model normalises). A malformed split or list file, an image that cannot be
decoded, a folder with a single class or with two class folders that read as the same prompt is
refused with a one-line ValueError (FileNotFoundError for what is missing) naming the file.

Folder walks (class folders, their images, ImageNet-style <wnid>/ and <label>/ folders) skip
hidden entries, names starting with ".": they are never classes and never images (.thumbnails/,
macOS's ._x.jpg). Links: an image file may be a link, and a class folder may be a link to a folder
elsewhere (a common way to assemble a dataset). A class folder's sub-folders are read too, but a
link to a folder inside a class folder is never followed: the dataset is refused in one line
naming the link, since such a link can lead back up the tree (a loop) or out of the class. So is
a class folder that links to the dataset folder, a folder above it, or into another class folder.
"""
import hashlib
import inspect
import json
import os
import struct
import warnings
import zlib
from collections import Counter, OrderedDict
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

from catalog import (_ALIASES, _RENAMES, DATASETS, PAPER_EVAL, TEST_ONLY, Info, dataset_key,  # noqa: F401
                     default_root, layout)

SPLITS = ("train", "val", "test")


class UnreadableImage(ValueError):
    """An image file that cannot be decoded. Its message stays the first line also where a
    DataLoader re-raises it from a worker, as type(e)("Caught ... in DataLoader worker ...")."""

    def __init__(self, message):
        tag = f"{type(self).__name__}: "
        if message.startswith("Caught ") and tag in message:  # re-raised from a worker
            own = [line for line in message.splitlines() if tag in line][-1]
            message = f"{own.split(tag, 1)[1]}\n{message}"
        super().__init__(message)


# what PIL raises on a truncated, corrupt or unknown file (UnidentifiedImageError is an OSError)
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error,
                  Image.DecompressionBombError, Image.DecompressionBombWarning)


def load_image(path):
    """The RGB PIL image in `path`; UnreadableImage naming the file if it cannot be decoded.

    PIL's global settings are left alone: truncated files stay errors (ImageFile.
    LOAD_TRUNCATED_IMAGES), and images over the decompression-bomb limit (Image.MAX_IMAGE_PIXELS)
    are refused, also those that PIL would only warn about."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return im.convert("RGB")
    except _DECODE_ERRORS as e:
        if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
            reason = f"too large, a possible decompression bomb: {e}"
        else:
            reason = str(e).replace(repr(path), "").replace(str(path), "").strip(" :")
        raise UnreadableImage(f"cannot read image {path} ({reason or type(e).__name__}); "
                              f"remove or replace the file") from None


class ImageList(Dataset):
    """(path, label) samples -> (transform(RGB PIL image), label); with .classnames, .targets."""

    def __init__(self, samples, classnames, transform=None):
        self.samples, self.classnames, self.transform = samples, classnames, transform
        self.targets = [y for _, y in samples]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, y = self.samples[i]
        image = load_image(path)
        return (image if self.transform is None else self.transform(image)), y


class Transformed(Dataset):
    """A dataset of (image, label) with `transform` applied to the images; same .classnames."""

    def __init__(self, dataset, transform=None):
        self.dataset, self.transform = dataset, transform
        self.classnames, self.targets = dataset.classnames, dataset.targets

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        image, y = self.dataset[i]
        return (image if self.transform is None else self.transform(image)), y


def build_dataset(name, root=None, split="test", transform=None):
    """A dataset of (transform(image), label) with .classnames (list[str]) and .targets."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if name == "synthetic" or name.startswith("synthetic-"):
        import synthetic
        return Transformed(synthetic.SyntheticDataset(task=name, split=split), transform)
    key = dataset_key(name)
    if key in DATASETS:
        samples, classnames = _read_known(key, os.path.expanduser(root or default_root()), split)
        return ImageList(samples, classnames, transform)
    if os.path.isdir(name):
        samples, classnames = _read_tree(name, split)
        return ImageList(samples, classnames, transform)
    if os.sep in name:
        raise FileNotFoundError(f"no folder at {name!r}; expected a folder of class sub-folders "
                                f"(<class>/<image>), optionally under train/ and test/ (or val/)")
    raise ValueError(f"unknown dataset {name!r}; expected one of {list(DATASETS)}, synthetic, "
                     f"synthetic-<task>, or the path of a folder of class sub-folders")


def _read_known(key, root, split):
    """Samples [(path, label)] and class names of one of DATASETS, checked against the disk."""
    info = DATASETS[key]
    folder = os.path.join(root, info.folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"dataset not found. {layout(key, root)}")
    if key in TEST_ONLY and split != "test":
        raise ValueError(f"{key} is a test-only dataset; ask for split='test', not {split!r}")
    try:
        if info.split_file:
            samples, names = _read_coop_split(os.path.join(folder, info.split_file),
                                              os.path.join(folder, info.images), split)
        elif key == "fgvc_aircraft":
            samples, names = _read_aircraft(folder, split)
        elif key == "imagenet_v2":
            samples, names = _read_numbered_folders(os.path.join(folder, info.images),
                                                    _imagenet_names(root, folder), info.n_classes)
        else:
            images = os.path.join(folder, info.images)
            if key == "imagenet":  # CoOp tests (and validates) on ImageNet's val set
                images = os.path.join(images, "train" if split == "train" else "val")
            samples, names = _read_wnid_folders(images, _imagenet_names(root, folder),
                                                info.n_classes)
    except (FileNotFoundError, ValueError) as e:
        raise _with(e, f". {layout(key, root)}") from None
    if len(names) != info.n_classes:
        raise ValueError(f"{key} has {info.n_classes} classes but {len(names)} were read. "
                         f"{layout(key, root)}")
    listed = info.split_file or key == "fgvc_aircraft"  # the others were read from the disk
    missing = [p for p, _ in samples if not os.path.isfile(p)] if listed else []
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(samples)} {split} images are missing, "
                                f"e.g. {missing[0]}. {layout(key, root)}")
    renames = _RENAMES.get(key, {})
    return samples, [renames.get(n, n).replace("_", " ") for n in names]


def _with(e, suffix):
    """A FileNotFoundError or ValueError like e (its base type: a subclass such as
    json.JSONDecodeError takes other arguments) with `suffix` appended to the message."""
    return (FileNotFoundError if isinstance(e, FileNotFoundError) else ValueError)(f"{e}{suffix}")


_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number",
               bool: "boolean", type(None): "null"}


def _read_coop_split(path, image_dir, split):
    """CoOp's {"train"|"val"|"test": [[relpath, label, classname], ...]} -> samples, names."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"split file {path} is missing")
    expected = 'expected CoOp\'s {"train": [...], "val": [...], "test": [...]}'
    try:
        with open(path, encoding="utf-8") as f:
            splits = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"split file {path} is not valid JSON ({e}); {expected}") from None
    if not isinstance(splits, dict):
        raise ValueError(f"split file {path} holds a JSON {_JSON_TYPES[type(splits)]}; {expected}")
    for s in SPLITS:
        if s not in splits:
            raise ValueError(f"split file {path} has no {s!r} list; {expected}")
        if not isinstance(splits[s], list):
            raise ValueError(f"split file {path}: {s!r} is a JSON {_JSON_TYPES[type(splits[s])]}; "
                             f"{expected}")
    names = {}
    for s in SPLITS:
        for k, row in enumerate(splits[s]):
            if not (isinstance(row, list) and len(row) == 3 and isinstance(row[0], str)
                    and type(row[1]) is int and isinstance(row[2], str)):
                raise ValueError(f"split file {path}: {s}[{k}] is {json.dumps(row)[:80]}; expected "
                                 f'[relative_path, label_int, classname], e.g. ["a/1.jpg", 0, "a"]')
            _, label, classname = row
            if names.setdefault(label, classname) != classname:
                raise ValueError(f"split file {path} names label {label} both "
                                 f"{names[label]!r} and {classname!r}")
    if sorted(names) != list(range(len(names))):
        raise ValueError(f"split file {path} has labels that are not 0..{len(names) - 1}")
    samples = [(os.path.join(image_dir, rel), label) for rel, label, _ in splits[split]]
    return samples, [names[y] for y in range(len(names))]


def _read_aircraft(folder, split):
    """FGVC-Aircraft's variants.txt and images_variant_<split>.txt -> samples, names."""
    names = _read_lines(os.path.join(folder, "variants.txt"))
    label = {n: i for i, n in enumerate(names)}
    samples = []
    for image, variant in _read_pairs(os.path.join(folder, f"images_variant_{split}.txt"),
                                      "'0034309 A300B4'"):
        if variant not in label:
            raise ValueError(f"images_variant_{split}.txt names variant {variant!r}, "
                             f"which is not in variants.txt")
        samples.append((os.path.join(folder, "images", image + ".jpg"), label[variant]))
    return samples, names


def _read_lines(path):
    """The non-empty lines of a text file, stripped."""
    return [line for _, line in _numbered_lines(path)]


def _numbered_lines(path):
    """[(line number, stripped line)] of the non-empty lines of a UTF-8 text file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing")
    try:
        with open(path, encoding="utf-8") as f:
            return [(n, line.strip()) for n, line in enumerate(f, 1) if line.strip()]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _read_pairs(path, example):
    """The non-empty lines of a text file split at their first space: [(first, rest)]."""
    pairs = []
    for n, line in _numbered_lines(path):
        pair = line.split(" ", 1)
        if len(pair) != 2:
            raise ValueError(f"line {n} of {path} is {line[:80]!r}; expected lines like {example}")
        pairs.append(pair)
    return pairs


def _imagenet_names(root, folder):
    """CoOp's classnames.txt ('n01440764 tench' per line), from `folder` or root/imagenet."""
    for path in (os.path.join(folder, "classnames.txt"),
                 os.path.join(root, "imagenet", "classnames.txt")):
        if os.path.isfile(path):
            return OrderedDict(_read_pairs(path, "'n01440764 tench'"))
    raise FileNotFoundError(f"classnames.txt is missing from {folder} and {root}/imagenet")


def _visible(folder):
    """The entries (os.DirEntry) of one folder whose names do not start with '.', sorted by name."""
    with os.scandir(folder) as entries:
        return sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)


def _folders(folder):
    """Sorted names of the visible sub-folders of one folder, links to folders included."""
    return [e.name for e in _visible(folder) if e.is_dir()]


def _is_image(entry):
    """Whether an os.DirEntry's name has an image extension (torchvision's IMG_EXTENSIONS)."""
    return entry.name.lower().endswith(IMG_EXTENSIONS)


def _image_files(folder):
    """Sorted paths of the visible image files in one folder (links to files included)."""
    return [e.path for e in _visible(folder) if e.is_file() and _is_image(e)]


def _walk_images(class_dir):
    """Paths of the visible images under one class folder, sub-folders included, in torchvision
    ImageFolder's order (by folder, then name); a link to a folder in it is refused."""
    found, todo = [], [class_dir]
    while todo:
        folder = todo.pop()
        for e in _visible(folder):
            if e.is_dir(follow_symlinks=False):
                todo.append(e.path)
            elif e.is_dir():  # a link to a folder
                raise ValueError(f"{e.path} is a link to the folder {os.path.realpath(e.path)}"
                                 f", inside class folder {class_dir}; a class folder may hold "
                                 f"links to image files, not to folders (one can lead back up "
                                 f"the tree): put the folder itself there, or remove the link")
            elif _is_image(e):  # a file, a link to one, or a broken link (an error when read)
                found.append((folder, e.name))
    return [os.path.join(folder, name) for folder, name in sorted(found)]


def _read_wnid_folders(image_dir, wnid_names, n_classes):
    """<image_dir>/<wnid>/<image>, label = rank of the wnid among the folders -> samples, names."""
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"{image_dir} is missing")
    wnids = _folders(image_dir)
    if len(wnids) != n_classes:
        raise ValueError(f"{image_dir} has {len(wnids)} class folders, expected {n_classes}")
    unknown = [w for w in wnids if w not in wnid_names]
    if unknown:
        raise ValueError(f"class folders {unknown[:3]} of {image_dir} are not in classnames.txt")
    samples = [(p, y) for y, w in enumerate(wnids)
               for p in _image_files(os.path.join(image_dir, w))]
    return samples, [wnid_names[w] for w in wnids]


def _read_numbered_folders(image_dir, wnid_names, n_classes):
    """ImageNetV2: <image_dir>/<label>/<image>, names in classnames.txt order -> samples, names."""
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"{image_dir} is missing")
    found = set(_folders(image_dir))
    if found != {str(y) for y in range(n_classes)}:
        raise ValueError(f"{image_dir} should hold class folders 0..{n_classes - 1}, "
                         f"found {len(found)} folders")
    samples = [(p, y) for y in range(n_classes)
               for p in _image_files(os.path.join(image_dir, str(y)))]
    return samples, list(wnid_names.values())[:n_classes]


def _read_tree(path, split):
    """A folder of class sub-folders, with train/ and test/ (or val/) sub-trees or split here."""
    expected = (f"expected {path}/<class>/<image>, or {path}/train/<class>/<image> with "
                f"{path}/test/ (or val/) holding the same class folders")
    subtrees = [s for s in SPLITS if os.path.isdir(os.path.join(path, s))]
    try:
        if "train" not in subtrees:
            samples, classes = _read_classes(path)
            counts = Counter(y for _, y in samples)
            few = [c for y, c in enumerate(classes) if counts[y] < 3]
            if few:
                raise ValueError(f"classes {few[:5]} have fewer than 3 images, too few for a "
                                 f"50/20/30 split")
            return _split_per_class(samples, split), _names(classes)
        wanted = {"train": ["train"], "val": ["val", "test"], "test": ["test", "val"]}[split]
        sub = next((s for s in wanted if s in subtrees), None)
        if sub is None:
            raise FileNotFoundError(f"no {' or '.join(wanted)} folder in {path}")
        classes = _folders(os.path.join(path, "train"))
        _check_classes(os.path.join(path, "train"), classes)
        if _folders(os.path.join(path, sub)) != classes:
            raise ValueError(f"{path}/{sub} and {path}/train hold different class folders")
        samples, _ = _read_classes(os.path.join(path, sub))
    except (FileNotFoundError, ValueError) as e:
        raise _with(e, f"; {expected}") from None
    return samples, _names(classes)


def _read_classes(folder):
    """<folder>/<class>/[...]/<image> -> samples [(path, label)], class folder names; checked."""
    classes = _folders(folder)
    _check_classes(folder, classes)
    _check_class_links(folder, classes)
    samples = [(p, y) for y, c in enumerate(classes) for p in _walk_images(os.path.join(folder, c))]
    labels = {y for _, y in samples}
    empty = [c for y, c in enumerate(classes) if y not in labels]
    if empty:
        raise FileNotFoundError(f"class folders {empty[:5]} of {folder} hold no image files "
                                f"({', '.join(IMG_EXTENSIONS)})")
    return samples, classes


def _names(folders):
    return [f.replace("_", " ") for f in folders]


def _check_classes(folder, classes):
    """Refuse a folder with no class folder or a single one, and two folders whose prompts read
    the same: names are read with underscores as spaces; CLIP's tokenizer lowercases and collapses
    spaces."""
    if not classes:
        raise FileNotFoundError(f"no class folders in {folder}")
    if len(classes) < 2:
        raise ValueError(f"{folder} holds a single class folder ({classes[0]!r}); accuracy needs "
                         f"at least two classes")
    seen = {}
    for c in classes:
        prompt = " ".join(c.replace("_", " ").split()).lower()
        if prompt in seen:
            raise ValueError(f"class folders {os.path.join(folder, seen[prompt])} and "
                             f"{os.path.join(folder, c)} give the same class name {prompt!r} "
                             f"(underscores read as spaces, case ignored); rename or merge them")
        seen[prompt] = c


def _check_class_links(folder, classes):
    """Refuse class folders that lead (by links) to `folder`, a folder above it, the same folder
    or one inside another: their images would be read again, under another label."""
    rule = ("a class folder may be a link to its own folder of images, not to the dataset, a "
            "folder above it or another class folder's images; fix or remove the link")
    top, owner = os.path.realpath(folder), {}
    for c in classes:
        path, real = os.path.join(folder, c), os.path.realpath(os.path.join(folder, c))
        if os.path.commonpath([top, real]) == real:
            raise ValueError(f"class folder {path} leads to {real}, which holds {folder}; {rule}")
        if real in owner:
            raise ValueError(f"class folders {os.path.join(folder, owner[real])} and {path} both "
                             f"lead to {real}; {rule}")
        owner[real] = c
    for real, c in owner.items():
        above = os.path.dirname(real)
        while above not in owner and above != os.path.dirname(above):
            above = os.path.dirname(above)
        if above in owner:
            raise ValueError(f"class folder {os.path.join(folder, c)} leads to {real}, inside "
                             f"class folder {os.path.join(folder, owner[above])}; {rule}")


def _split_per_class(samples, split, seed=0):
    """Seeded 50% train / 20% val / 30% test of every class's samples (rounded per class)."""
    g = torch.Generator().manual_seed(seed)
    by_class = {}
    for path, y in samples:
        by_class.setdefault(y, []).append((path, y))
    chosen = []
    for y in sorted(by_class):
        items = by_class[y]
        perm = torch.randperm(len(items), generator=g).tolist()
        n_train, n_val = round(0.5 * len(items)), round(0.2 * len(items))
        start, stop = {"train": (0, n_train), "val": (n_train, n_train + n_val),
                       "test": (n_train + n_val, len(items))}[split]
        chosen += sorted((items[i] for i in perm[start:stop]), key=lambda s: s[0])
    return chosen


def fingerprint(dataset) -> str:
    """SHA256 over the class names and, per image file, its path, label, size, modification time
    and inode (for procedural data: its generator's code, task, split and size).

    The inode tells which file a path now leads to: two class folders whose names are swapped
    keep every path, size and time (a rename touches neither), but not which file is where. A
    Subset (few_shot's) covers the images it holds; Transformed is looked through."""
    h = hashlib.sha256(json.dumps(list(dataset.classnames)).encode())
    inner, index = dataset, None
    while isinstance(inner, (Subset, Transformed)):
        if isinstance(inner, Subset):
            index = list(inner.indices) if index is None else [inner.indices[i] for i in index]
        inner = inner.dataset
    samples = getattr(inner, "samples", None)
    if samples is None:
        task, split = getattr(inner, "task", ""), getattr(inner, "split", "")
        h.update(f"{type(inner).__name__} {task} {split} {len(inner)}".encode())
        h.update(b"" if index is None else json.dumps([int(i) for i in index]).encode())
        h.update(open(inspect.getsourcefile(type(inner)), "rb").read())
        return h.hexdigest()
    for path, label in (samples if index is None else [samples[i] for i in index]):
        try:
            st = os.stat(path)
        except OSError:
            raise FileNotFoundError(f"{path} is listed in the dataset but cannot be read; restore it or fix the split file") from None
        h.update(f"{path}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\n".encode())
    return h.hexdigest()


def few_shot(dataset, shots, seed):
    """`shots` images per class, drawn with `seed` from dataset.targets alone -> Subset.

    The draw reads only the labels (no image is loaded, the global RNG is untouched), so the same
    dataset and seed give the same indices. A class with fewer than `shots` images keeps all of
    them, with a warning (as CoOp/Dassl do). The Subset carries .classnames and .targets.
    """
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    targets = torch.as_tensor(list(dataset.targets), dtype=torch.long)
    n_classes = len(dataset.classnames)
    counts = torch.bincount(targets, minlength=n_classes)
    by_class = torch.argsort(targets, stable=True).split(counts.tolist())
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for members in by_class:
        chosen += members[torch.randperm(len(members), generator=g)[:shots]].tolist()
    short = [dataset.classnames[c] for c in range(n_classes) if counts[c] < shots]
    if short:
        warnings.warn(f"{len(short)} of {n_classes} classes have fewer than {shots} images "
                      f"(e.g. {short[:3]}); all their images are used")
    chosen.sort()
    subset = Subset(dataset, chosen)
    subset.classnames, subset.targets = dataset.classnames, targets[chosen].tolist()
    return subset


SUBSAMPLE = ("all", "base", "new")


class ClassSubset(Subset):
    """The images of some classes of a dataset, relabelled 0..k-1 in class order; .classnames, .targets."""

    def __init__(self, dataset, classes):
        keep = {c: new for new, c in enumerate(classes)}
        indices = [i for i, y in enumerate(dataset.targets) if y in keep]
        super().__init__(dataset, indices)
        self.relabel = keep
        self.classnames = [dataset.classnames[c] for c in classes]
        self.targets = [keep[dataset.targets[i]] for i in indices]

    def __getitem__(self, i):
        image, y = self.dataset[self.indices[i]]
        return image, self.relabel[y]

    def __getitems__(self, items):
        return [self[i] for i in items]

    @property
    def transform(self):
        """The transform of the dataset it draws from (setting it sets that one's)."""
        return self.dataset.transform

    @transform.setter
    def transform(self, transform):
        self.dataset.transform = transform


def subsample_classes(dataset, which="all"):
    """Base-to-new split, Dassl's `subsample_classes` rule: of the n classes (labels sorted), the first
    ceil(n/2) are `base`, the rest `new`, each relabelled from 0; `all` returns the dataset unchanged.

    Dassl takes the labels present in the training split; every dataset here has every class in
    each split, so the rule reads the class list (n = len(classnames)) and gives the same split on
    train, val and test."""
    if which not in SUBSAMPLE:
        raise ValueError(f"unknown class subsample {which!r}; expected one of {SUBSAMPLE}")
    if which == "all":
        return dataset
    n = len(dataset.classnames)
    m = -(-n // 2)  # ceil(n / 2)
    return ClassSubset(dataset, list(range(m)) if which == "base" else list(range(m, n)))


def eval_transform(n_px):
    """PIL image -> (3, n_px, n_px) float32 in [0,1]: bicubic resize of the short side, centre
    crop; the same numbers as OpenAI's CLIP preprocess before its normalisation."""
    return v2.Compose([v2.Resize(n_px, interpolation=v2.InterpolationMode.BICUBIC),
                       v2.CenterCrop(n_px), _to_tensor()])


def train_transform(n_px):
    """PIL image -> (3, n_px, n_px) float32 in [0,1]: random resized crop (scale 0.08-1,
    bicubic) and horizontal flip, as CoOp/MaPLe train (Dassl's random_resized_crop, random_flip)."""
    return v2.Compose([v2.RandomResizedCrop(n_px, scale=(0.08, 1.0),
                                            interpolation=v2.InterpolationMode.BICUBIC),
                       v2.RandomHorizontalFlip(), _to_tensor()])


def _to_tensor():
    return v2.Compose([v2.ToImage(), v2.ToPureTensor(), v2.Lambda(_unit_range)])


def _unit_range(x):
    """uint8 -> float32 / 255, bit for bit as torchvision's classic ToTensor (not * (1/255))."""
    return x.to(torch.float32).div_(255)


def loader(dataset, batch_size, train, workers=4, device="cpu", seed=0):
    """Batches (B, 3, n, n) float32, (B,) int64; shuffled (dropping a last partial batch) if train.

    A seeded generator fixes the shuffling and the workers' seeds, hence their random crops, so a
    training run is reproducible; with workers=0 the crops draw from the global torch RNG instead.
    """
    return DataLoader(dataset, batch_size=batch_size, shuffle=train, num_workers=workers,
                      pin_memory=torch.device(device).type == "cuda",
                      drop_last=train and len(dataset) >= batch_size,
                      generator=torch.Generator().manual_seed(seed),
                      persistent_workers=workers > 0)
