"""Tests for data.py on tiny trees built in tmp_path in CoOp's real layout."""
import io
import json
import math
import os

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

import data

EUROSAT_RAW = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
               "PermanentCrop", "Residential", "River", "SeaLake"]
EUROSAT_COOP = ["Annual Crop Land", "Forest", "Herbaceous Vegetation Land", "Highway or Road",
                "Industrial Buildings", "Pasture Land", "Permanent Crop Land",
                "Residential Buildings", "River", "Sea or Lake"]
IMAGENET_FIRST = [("n01440764", "tench"), ("n01443537", "goldfish"),
                  ("n01484850", "great white shark")]


def _noise(w, h, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


def _png(w=6, h=5, seed=0):
    buf = io.BytesIO()
    _noise(w, h, seed).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png()


def _write(path, payload=PNG):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(payload)


def _coop_tree(root, key, classnames, folders=None, per_split=1):
    """A CoOp dataset folder: images in per-class folders and its split_zhou json."""
    info = data.DATASETS[key]
    folder = os.path.join(root, info.folder)
    split = {s: [] for s in data.SPLITS}
    for y, name in enumerate(classnames):
        for s in data.SPLITS:
            for k in range(per_split):
                rel = f"{(folders or classnames)[y]}/{s}_{k}.png"
                _write(os.path.join(folder, info.images, rel), _png(seed=y))
                split[s].append([rel, y, name])
    with open(os.path.join(folder, info.split_file), "w") as f:
        json.dump(split, f)
    return folder


def _imagenet_names(root, folder="imagenet"):
    """classnames.txt with three real ImageNet lines, then made-up ones, in wnid order."""
    names = IMAGENET_FIRST + [(f"n{2000000 + i:08d}", f"thing {i}") for i in range(997)]
    os.makedirs(os.path.join(root, folder), exist_ok=True)
    with open(os.path.join(root, folder, "classnames.txt"), "w") as f:
        f.writelines(f"{w} {n}\n" for w, n in names)
    return names


# ----- CoOp split files --------------------------------------------------------------------


def test_caltech101_reads_coop_split(tmp_path):
    names = ["face", "leopard", "yin_yang"] + [f"class_{i}" for i in range(97)]
    _coop_tree(tmp_path, "caltech101", names, per_split=2)
    ds = data.build_dataset("caltech101", tmp_path, "val", data.eval_transform(8))
    assert ds.classnames[:3] == ["face", "leopard", "yin yang"] and len(ds.classnames) == 100
    assert len(ds) == 200 and ds.targets == [y for y in range(100) for _ in range(2)]
    x, y = ds[5]
    image_dir = tmp_path / "caltech-101" / "101_ObjectCategories"
    assert ds.samples[5][0] == str(image_dir / "yin_yang" / "val_1.png") and y == 2
    assert torch.equal(x, data.eval_transform(8)(_noise(6, 5, seed=2)))


@pytest.mark.parametrize("names", [EUROSAT_RAW, EUROSAT_COOP])
def test_eurosat_class_names_are_coops_readable_ones(tmp_path, names):
    _coop_tree(tmp_path, "eurosat", names, folders=EUROSAT_RAW)
    ds = data.build_dataset("eurosat", tmp_path, "train")
    assert ds.classnames == EUROSAT_COOP
    image, y = ds[9]
    assert y == 9 and image.mode == "RGB" and image.size == (6, 5)


def test_caltech101_raw_folder_names_are_renamed(tmp_path):
    names = ["Faces", "Leopards", "Motorbikes", "airplanes"] + [f"c{i}" for i in range(96)]
    _coop_tree(tmp_path, "caltech101", names)
    assert data.build_dataset("caltech101", tmp_path).classnames[:4] == [
        "face", "leopard", "motorbike", "airplane"]


def test_stanford_cars_paths_are_relative_to_the_dataset_folder(tmp_path):
    names = [f"2012 Car {i}" for i in range(196)]
    folder = _coop_tree(tmp_path, "stanford_cars", names, folders=["cars_train"] * 196)
    ds = data.build_dataset("stanford_cars", tmp_path, "test")
    assert ds.samples[7] == (os.path.join(folder, "cars_train", "test_0.png"), 7)
    assert ds.classnames[7] == "2012 Car 7"


def test_fgvc_aircraft_reads_the_official_lists(tmp_path):
    folder = tmp_path / "fgvc_aircraft"
    variants = ["707-320", "A300B4", "F/A-18"] + [f"V{i}" for i in range(97)]
    (folder / "images").mkdir(parents=True)
    (folder / "variants.txt").write_text("\n".join(variants) + "\n")
    (folder / "images_variant_test.txt").write_text("0034309 A300B4\n1234567 F/A-18\n")
    for image in ("0034309", "1234567"):
        _write(str(folder / "images" / f"{image}.jpg"))
    ds = data.build_dataset("fgvc_aircraft", tmp_path, "test")
    assert ds.classnames[:3] == variants[:3] and len(ds.classnames) == 100
    assert ds.samples == [(str(folder / "images" / "0034309.jpg"), 1),
                          (str(folder / "images" / "1234567.jpg"), 2)]
    with pytest.raises(FileNotFoundError, match="images_variant_val.txt"):
        data.build_dataset("fgvc_aircraft", tmp_path, "val")
    (folder / "images_variant_test.txt").write_text("0034309 B-52\n")
    with pytest.raises(ValueError, match="B-52"):
        data.build_dataset("fgvc_aircraft", tmp_path, "test")


# ----- ImageNet and its variants --------------------------------------------------------------


def test_imagenet_uses_classnames_txt_and_val_folder(tmp_path):
    names = _imagenet_names(tmp_path)
    for wnid, _ in names:
        _write(str(tmp_path / "imagenet" / "images" / "val" / wnid / f"{wnid}_1.JPEG"))
    ds = data.build_dataset("imagenet", tmp_path, "test")
    assert ds.classnames[:3] == ["tench", "goldfish", "great white shark"]
    assert ds.classnames[3] == "thing 0" and ds.targets == list(range(1000))
    assert data.build_dataset("imagenet", tmp_path, "val").samples == ds.samples
    with pytest.raises(FileNotFoundError, match=os.path.join("imagenet", "images", "train")):
        data.build_dataset("imagenet", tmp_path, "train")
    os.remove(tmp_path / "imagenet" / "images" / "val" / "n01440764" / "n01440764_1.JPEG")
    os.rmdir(tmp_path / "imagenet" / "images" / "val" / "n01440764")
    with pytest.raises(ValueError, match="999 class folders, expected 1000"):
        data.build_dataset("imagenet", tmp_path, "test")


def test_imagenet_a_uses_its_200_folders_and_imagenets_classnames(tmp_path):
    names = _imagenet_names(tmp_path)
    kept = names[::5]
    for wnid, _ in kept:
        _write(str(tmp_path / "imagenet-adversarial" / "imagenet-a" / wnid / "a.jpg"))
    _write(str(tmp_path / "imagenet-adversarial" / "imagenet-a" / "README.txt"), b"not a class")
    ds = data.build_dataset("imagenet-a", tmp_path)
    assert ds.classnames == [n for _, n in kept] and ds.targets == list(range(200))
    with pytest.raises(ValueError, match="test-only"):
        data.build_dataset("imagenet_a", tmp_path, "train")


def test_imagenet_v2_labels_are_folder_numbers(tmp_path):
    _imagenet_names(tmp_path, "imagenetv2")
    image_dir = tmp_path / "imagenetv2" / "imagenetv2-matched-frequency-format-val"
    for y in range(1000):
        (image_dir / str(y)).mkdir(parents=True)
    _write(str(image_dir / "2" / "x.jpeg"))
    ds = data.build_dataset("imagenetv2", tmp_path)
    assert ds.targets == [2] and ds.classnames[2] == "great white shark"


# ----- errors -----------------------------------------------------------------------------------


def test_missing_dataset_names_the_folder_and_layout(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        data.build_dataset("dtd", tmp_path)
    assert str(tmp_path / "dtd") in str(e.value)
    assert "split_zhou_DescribableTextures.json" in str(e.value)
    with pytest.raises(FileNotFoundError, match="oxford_flowers"):
        data.build_dataset("Flowers102", tmp_path)


def test_incomplete_dataset_errors(tmp_path):
    folder = _coop_tree(tmp_path, "dtd", [f"texture{i}" for i in range(47)])
    split_file = os.path.join(folder, "split_zhou_DescribableTextures.json")
    gone = os.path.join(folder, "images", "texture3", "test_0.png")
    os.remove(gone)
    with pytest.raises(FileNotFoundError, match="1 of 47 test images are missing") as e:
        data.build_dataset("dtd", tmp_path, "test")
    assert gone in str(e.value)
    data.build_dataset("dtd", tmp_path, "train")   # the train images are all there
    os.remove(split_file)
    with pytest.raises(FileNotFoundError, match=split_file):
        data.build_dataset("dtd", tmp_path, "train")
    _coop_tree(tmp_path, "dtd", [f"texture{i}" for i in range(46)])
    with pytest.raises(ValueError, match="47 classes but 46"):
        data.build_dataset("dtd", tmp_path, "train")


def test_unknown_names_and_splits(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        data.build_dataset("cifar10", tmp_path)
    with pytest.raises(FileNotFoundError, match="no folder"):
        data.build_dataset(str(tmp_path / "nowhere"), tmp_path)
    with pytest.raises(ValueError, match="unknown split"):
        data.build_dataset("dtd", tmp_path, "validation")


def test_default_root_comes_from_nap_data(tmp_path, monkeypatch):
    _coop_tree(tmp_path, "eurosat", EUROSAT_RAW)
    monkeypatch.setenv("NAP_DATA", str(tmp_path))
    assert data.default_root() == str(tmp_path)
    assert len(data.build_dataset("eurosat", split="test")) == 10
    monkeypatch.delenv("NAP_DATA")
    assert data.default_root() == "./data"


def _one_line(e):
    """The message of a raised error, checked to be a single line."""
    text = str(e.value)
    assert "\n" not in text.strip(), text
    return text


@pytest.mark.parametrize("payload, expected", [
    (b'{"train": [["a.png", 0, "a"]], ', "not valid JSON"),
    (b"\xff\xfe not utf-8", "not valid JSON"),
    (b'[["a.png", 0, "a"]]', "a JSON array"),
    (b"3", "a JSON number"),
    (b'{"train": [], "val": []}', "no 'test' list"),
    (b'{"train": [], "val": [], "test": {"a.png": 0}}', "'test' is a JSON object"),
])
def test_malformed_split_file_is_one_line_naming_it(tmp_path, payload, expected):
    folder = _coop_tree(tmp_path, "dtd", [f"texture{i}" for i in range(47)])
    split_file = os.path.join(folder, "split_zhou_DescribableTextures.json")
    _write(split_file, payload)
    with pytest.raises(ValueError) as e:
        data.build_dataset("dtd", tmp_path, "train")
    text = _one_line(e)
    assert split_file in text and expected in text
    assert '{"train": [...], "val": [...], "test": [...]}' in text


@pytest.mark.parametrize("row", [["a.png", 0], "a.png", ["a.png", "0", "a"], [3, 0, "a"],
                                 ["a.png", 0.5, "a"], ["a.png", True, "a"], None,
                                 ["a.png", 0, "a", "extra"]])
def test_split_row_of_the_wrong_shape_names_file_and_row(tmp_path, row):
    folder = _coop_tree(tmp_path, "dtd", [f"texture{i}" for i in range(47)])
    split_file = os.path.join(folder, "split_zhou_DescribableTextures.json")
    with open(split_file) as f:
        splits = json.load(f)
    splits["val"][5] = row
    with open(split_file, "w") as f:
        json.dump(splits, f)
    with pytest.raises(ValueError) as e:
        data.build_dataset("dtd", tmp_path, "test")
    text = _one_line(e)
    assert split_file in text and "val[5]" in text and "[relative_path, label_int, classname]" in text


def test_malformed_classnames_and_aircraft_lists_name_the_line(tmp_path):
    _imagenet_names(tmp_path)
    with open(tmp_path / "imagenet" / "classnames.txt", "a") as f:
        f.write("n09999999\n")
    (tmp_path / "imagenet" / "images" / "val").mkdir(parents=True)
    with pytest.raises(ValueError) as e:
        data.build_dataset("imagenet", tmp_path, "test")
    assert "classnames.txt" in _one_line(e) and "line 1001" in str(e.value)
    assert "'n01440764 tench'" in str(e.value)
    folder = tmp_path / "fgvc_aircraft"
    (folder / "images").mkdir(parents=True)
    (folder / "variants.txt").write_text("\n".join(f"V{i}" for i in range(100)) + "\n")
    (folder / "images_variant_test.txt").write_text("0034309 V1\n1234567\n")
    with pytest.raises(ValueError) as e:
        data.build_dataset("fgvc_aircraft", tmp_path, "test")
    assert "images_variant_test.txt" in _one_line(e) and "line 2" in str(e.value)


# ----- unreadable images ---------------------------------------------------------------------------


def _two_class_tree(root, n=3):
    for name in ("apple", "pear"):
        for k in range(n):
            _write(str(root / "train" / name / f"{k}.png"))
            _write(str(root / "test" / name / f"{k}.png"))


def _jpeg():
    buf = io.BytesIO()
    _noise(40, 30).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("payload, workers", [(PNG[:len(PNG) // 2], 0), (_jpeg()[:300], 0),
                                              (b"not an image at all", 0), (b"", 0),
                                              (_jpeg()[:300], 1)],   # a worker costs 5 s to stop
                         ids=["png-truncated", "jpeg-truncated", "garbage", "empty", "worker"])
def test_unreadable_image_is_one_line_naming_the_file(tmp_path, payload, workers):
    from PIL import ImageFile
    _two_class_tree(tmp_path)
    bad = str(tmp_path / "test" / "pear" / "1.png")
    _write(bad, payload)
    ds = data.build_dataset(str(tmp_path), split="test", transform=data.eval_transform(4))
    assert ds[0][0].shape == (3, 4, 4)   # the good images still load
    with pytest.raises(ValueError) as e:
        list(data.loader(ds, 2, train=False, workers=workers))
    first = str(e.value).splitlines()[0]
    assert first.startswith(f"cannot read image {bad} ") and first.endswith("remove or replace the file")
    assert not ImageFile.LOAD_TRUNCATED_IMAGES


@pytest.mark.parametrize("size", [(12, 10), (30, 30)], ids=["bomb-warning", "bomb-error"])
def test_decompression_bomb_is_refused_naming_the_file(tmp_path, monkeypatch, size):
    _two_class_tree(tmp_path)
    bad = str(tmp_path / "test" / "apple" / "0.png")
    _write(bad, _png(*size))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)   # 120 pixels warn, over 200 fail
    ds = data.build_dataset(str(tmp_path), split="test")
    with pytest.raises(ValueError) as e:
        ds[0]
    text = _one_line(e)
    assert text.startswith(f"cannot read image {bad} ") and "decompression bomb" in text
    assert text.endswith("remove or replace the file")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    assert ds[0][0].size == size


def test_unreadable_image_error_survives_a_worker_with_its_traceback():
    raised = data.UnreadableImage("cannot read image /x/a.png (broken); remove or replace the file")
    try:
        raise raised
    except ValueError:
        from torch._utils import ExceptionWrapper
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(data.UnreadableImage) as e:
        wrapped.reraise()
    lines = str(e.value).splitlines()
    assert lines[0] == str(raised)
    assert lines[1] == "Caught UnreadableImage in DataLoader worker process 0."
    assert "Traceback" in str(e.value)


# ----- folders of class sub-folders ---------------------------------------------------------------


def test_folder_without_splits_is_split_per_class_deterministically(tmp_path):
    for name in ("cat", "golden_retriever"):
        for k in range(10):
            _write(str(tmp_path / name / f"{k}.png"))
    _write(str(tmp_path / "cat" / "notes.txt"), b"not an image")
    splits = {s: data.build_dataset(str(tmp_path), split=s) for s in data.SPLITS}
    assert splits["test"].classnames == ["cat", "golden retriever"]
    assert [len(splits[s]) for s in data.SPLITS] == [10, 4, 6]
    for s in data.SPLITS:
        assert splits[s].targets.count(1) == len(splits[s]) // 2
        assert all(os.path.basename(os.path.dirname(p)) == ["cat", "golden_retriever"][y]
                   for p, y in splits[s].samples)
        assert data.build_dataset(str(tmp_path), split=s).samples == splits[s].samples
    paths = [p for s in data.SPLITS for p, _ in splits[s].samples]
    assert len(set(paths)) == 20


def test_folder_too_small_to_split_is_an_error(tmp_path):
    for name, n in (("a", 3), ("b", 2)):
        for k in range(n):
            _write(str(tmp_path / name / f"{k}.png"))
    with pytest.raises(ValueError, match="fewer than 3 images"):
        data.build_dataset(str(tmp_path), split="test")


def test_folder_with_train_and_test_subtrees(tmp_path):
    for sub, n in (("train", 3), ("test", 2)):
        for name in ("apple", "pear"):
            for k in range(n):
                _write(str(tmp_path / sub / name / f"{k}.png"))
    train = data.build_dataset(str(tmp_path), split="train", transform=data.eval_transform(4))
    test = data.build_dataset(str(tmp_path), split="test")
    assert len(train) == 6 and len(test) == 4 and test.targets == [0, 0, 1, 1]
    assert all(f"{os.sep}test{os.sep}" in p for p, _ in test.samples)
    assert data.build_dataset(str(tmp_path), split="val").samples == test.samples
    assert train[0][0].shape == (3, 4, 4)
    _write(str(tmp_path / "test" / "plum" / "0.png"))
    with pytest.raises(ValueError, match="different class folders"):
        data.build_dataset(str(tmp_path), split="test")


@pytest.mark.parametrize("subtrees", [False, True])
def test_a_single_class_is_refused_naming_the_folder(tmp_path, subtrees):
    base = tmp_path / "train" if subtrees else tmp_path
    for k in range(5):
        _write(str(base / "cat" / f"{k}.png"))
        if subtrees:
            _write(str(tmp_path / "test" / "cat" / f"{k}.png"))
    with pytest.raises(ValueError) as e:
        data.build_dataset(str(tmp_path), split="test")
    text = _one_line(e)
    assert f"{base} holds a single class folder ('cat')" in text and "at least two classes" in text


@pytest.mark.parametrize("folders", [("big cat", "big_cat"), ("Cat", "cat"), ("big  cat", "big_cat"),
                                     ("Big_Cat", "big cat")])
@pytest.mark.parametrize("subtrees", [False, True])
def test_folders_with_the_same_prompt_name_are_refused(tmp_path, folders, subtrees):
    base = tmp_path / "train" if subtrees else tmp_path
    for name in folders + ("dog",):
        for k in range(3):
            _write(str(base / name / f"{k}.png"))
            if subtrees:
                _write(str(tmp_path / "test" / name / f"{k}.png"))
    with pytest.raises(ValueError) as e:
        data.build_dataset(str(tmp_path), split="train")
    text = _one_line(e)
    first, second = sorted(folders)
    assert f"{base / first} and {base / second} give the same class name" in text
    assert "rename" in text


def test_empty_folder_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="class sub-folders|<class>"):
        data.build_dataset(str(tmp_path), split="train")


@pytest.mark.parametrize("subtrees", [False, True])
def test_hidden_entries_are_never_classes_or_images(tmp_path, subtrees):
    bases = [tmp_path / "train", tmp_path / "test"] if subtrees else [tmp_path]
    for base in bases:
        for name in ("cat", "dog"):
            for k in range(4):
                _write(str(base / name / f"{k}.png"))
        for hidden in (".thumbnails/0.png", ".thumbnails/1.png", ".thumbnails/2.png",
                       "cat/.cache/0.png", "cat/._0.png", "dog/.1.png"):
            _write(str(base / hidden), b"not an image: a thumbnail cache or macOS's AppleDouble")
    splits = [data.build_dataset(str(tmp_path), split=s) for s in data.SPLITS]
    assert all(ds.classnames == ["cat", "dog"] for ds in splits)
    paths = [p for ds in splits for p, _ in ds.samples]
    assert len(paths) == (24 if subtrees else 8)   # with sub-trees, val reads test/
    assert not any(f"{os.sep}." in p for p in paths)
    assert all(ds[i][0].size == (6, 5) for ds in splits for i in range(len(ds)))


def test_hidden_entries_in_imagenet_folders_are_skipped(tmp_path):
    names = _imagenet_names(tmp_path)
    image_dir = tmp_path / "imagenet-adversarial" / "imagenet-a"
    for wnid, _ in names[::5]:
        _write(str(image_dir / wnid / "a.jpg"))
    _write(str(image_dir / ".ipynb_checkpoints" / "a.jpg"))
    _write(str(image_dir / names[0][0] / "._a.jpg"), b"macOS AppleDouble")
    ds = data.build_dataset("imagenet_a", tmp_path)
    assert ds.classnames == [n for _, n in names[::5]] and ds.targets == list(range(200))
    v2 = tmp_path / "imagenetv2" / "imagenetv2-matched-frequency-format-val"
    for y in range(1000):
        (v2 / str(y)).mkdir(parents=True)
    _write(str(v2 / "2" / "x.jpeg"))
    _write(str(v2 / "2" / ".x.jpeg"))
    _write(str(v2 / ".trash" / "y.jpeg"))
    assert data.build_dataset("imagenet_v2", tmp_path).samples == [(str(v2 / "2" / "x.jpeg"), 2)]


def _linked_tree(root):
    """dog/ with a sub-folder and a linked image file, cat/ a link to a folder outside the tree."""
    for k in range(3):
        _write(str(root / "elsewhere" / "cats" / f"{k}.png"))
        _write(str(root / "tree" / "dog" / ("puppies" if k else "") / f"{k}.png"))
    _write(str(root / "elsewhere" / "dog.png"))
    os.symlink(root / "elsewhere" / "cats", root / "tree" / "cat")
    os.symlink(root / "elsewhere" / "dog.png", root / "tree" / "dog" / "3.png")
    return root / "tree"


@pytest.mark.parametrize("target", ["..", ".", "../..", "elsewhere"])
def test_a_link_to_a_folder_inside_a_class_folder_is_refused(tmp_path, target):
    from torchvision.datasets import ImageFolder
    tree = _linked_tree(tmp_path)
    ds = data.build_dataset(str(tree), split="train")   # the legitimate links are read as before
    assert ds.classnames == ["cat", "dog"] and len(ds) == 4
    assert all(p.startswith(str(tree)) for p, _ in ds.samples)
    for s in data.SPLITS:   # torchvision's ImageFolder reads the same images in the same order
        assert data.build_dataset(str(tree), split=s).samples == data._split_per_class(
            ImageFolder(str(tree)).samples, s)
    link = tree / "dog" / "more"
    os.symlink(tmp_path / target if target == "elsewhere" else target, link)
    with pytest.raises(ValueError) as e:
        data.build_dataset(str(tree), split="test")
    text = _one_line(e)
    assert text.startswith(f"{link} is a link to the folder ") and "not to folders" in text


@pytest.mark.parametrize("link, target, expected", [
    ("kitten", "cat", "both lead to"), ("kitten", "cat/young", "inside class folder"),
    ("all", ".", "which holds"), ("all", "..", "which holds")])
def test_a_class_folder_linked_back_into_the_tree_is_refused(tmp_path, link, target, expected):
    for k in range(3):
        _write(str(tmp_path / "tree" / "cat" / "young" / f"{k}.png"))
        _write(str(tmp_path / "tree" / "dog" / f"{k}.png"))
    os.symlink(target, tmp_path / "tree" / link)
    with pytest.raises(ValueError) as e:
        data.build_dataset(str(tmp_path / "tree"), split="test")
    text = _one_line(e)
    assert str(tmp_path / "tree" / link) in text and expected in text


# ----- fingerprint ----------------------------------------------------------------------------------


def test_fingerprint_changes_when_two_class_folders_swap_names(tmp_path):
    for name in ("cat", "dog"):
        for k in range(4):
            _write(str(tmp_path / name / f"{k}.png"))
            os.utime(tmp_path / name / f"{k}.png", ns=(10**18, 10**18))   # one time, as from a tar

    def swap():
        for old, new in (("cat", "tmp"), ("dog", "cat"), ("tmp", "dog")):
            os.rename(tmp_path / old, tmp_path / new)

    before = data.build_dataset(str(tmp_path), split="train")
    printed = data.fingerprint(before)
    assert data.fingerprint(data.build_dataset(str(tmp_path), split="train")) == printed
    swap()
    after = data.build_dataset(str(tmp_path), split="train")
    assert after.samples == before.samples and len(after) == 4   # same paths, labels, sizes, times
    assert data.fingerprint(after) != printed
    swap()
    assert data.fingerprint(after) == printed


def test_fingerprint_of_a_few_shot_subset_covers_its_images(tmp_path):
    _two_class_tree(tmp_path, n=4)
    ds = data.build_dataset(str(tmp_path), split="train", transform=data.eval_transform(4))
    sub = data.few_shot(ds, 2, seed=0)
    chosen = data.ImageList([ds.samples[i] for i in sub.indices], ds.classnames)
    assert data.fingerprint(sub) == data.fingerprint(chosen) != data.fingerprint(ds)
    assert data.fingerprint(data.few_shot(ds, 2, seed=1)) != data.fingerprint(sub)
    before = data.fingerprint(sub)
    unused = next(p for i, (p, _) in enumerate(ds.samples) if i not in sub.indices)
    os.utime(unused, ns=(1, 1))
    assert data.fingerprint(sub) == before
    os.utime(ds.samples[sub.indices[0]][0], ns=(1, 1))
    assert data.fingerprint(sub) != before


# ----- few-shot sampling ------------------------------------------------------------------------


class _Labels(torch.utils.data.Dataset):
    """Labels only; loading an item is an error (few_shot must not load images)."""

    def __init__(self, targets, n_classes):
        self.targets, self.classnames = targets, [f"c{i}" for i in range(n_classes)]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        raise AssertionError("few_shot loaded an item")


def test_few_shot_takes_k_per_class_reproducibly():
    targets = torch.tensor([0] * 20 + [1] * 20 + [2] * 3)
    ds = _Labels(targets[torch.randperm(43, generator=torch.Generator().manual_seed(0))].tolist(), 3)
    with pytest.warns(UserWarning, match="fewer than 4 images"):
        sub = data.few_shot(ds, 4, seed=1)
    assert [sub.targets.count(c) for c in range(3)] == [4, 4, 3]
    assert sub.targets == [ds.targets[i] for i in sub.indices] and sub.classnames == ds.classnames
    assert len(set(sub.indices)) == 11
    torch.manual_seed(123)
    with pytest.warns(UserWarning):
        again = data.few_shot(ds, 4, seed=1)
    assert again.indices == sub.indices
    with pytest.warns(UserWarning):
        assert data.few_shot(ds, 4, seed=2).indices != sub.indices
    with pytest.raises(ValueError, match="shots"):
        data.few_shot(ds, 0, seed=1)


class _Items(torch.utils.data.Dataset):
    """(index, label) items: what an item is tells which source image it was."""

    def __init__(self, targets, n_classes):
        self.targets, self.classnames = list(targets), [f"c{i}" for i in range(n_classes)]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return i, self.targets[i]


def _dassl_subsample(items, subsample):
    """Dassl's subsample_classes on a list of (impath, label, classname), written from its rule."""
    labels = sorted({label for _, label, _ in items})
    m = math.ceil(len(labels) / 2)
    selected = labels[:m] if subsample == "base" else labels[m:]
    relabel = {y: new for new, y in enumerate(selected)}
    return [(path, relabel[y], name) for path, y, name in items if y in selected]


@pytest.mark.parametrize("n_classes", [2, 5, 10, 37])
def test_subsample_classes_follows_dassl(n_classes):
    g = torch.Generator().manual_seed(n_classes)
    targets = torch.randint(0, n_classes, (6 * n_classes,), generator=g).tolist()
    targets[:n_classes] = range(n_classes)  # every class present, as in every split here
    ds = _Items(targets, n_classes)
    items = [(i, y, ds.classnames[y]) for i, y in enumerate(targets)]
    assert data.subsample_classes(ds, "all") is ds
    names = []
    for which in ("base", "new"):
        sub = data.subsample_classes(ds, which)
        got = [(sub[k][0], sub[k][1], sub.classnames[sub[k][1]]) for k in range(len(sub))]
        assert got == _dassl_subsample(items, which)
        assert sub.targets == [y for _, y, _ in got]
        names.append(sub.classnames)
    assert len(names[0]) == math.ceil(n_classes / 2) and names[0] + names[1] == ds.classnames
    with pytest.raises(ValueError, match="base"):
        data.subsample_classes(ds, "old")


def test_base_classes_few_shot_in_either_order_and_fingerprints_differ(tmp_path):
    for c in range(5):
        for i in range(6):
            _write(tmp_path / f"class{c}" / f"{i}.png", _png(seed=10 * c + i))
    full = data.build_dataset(str(tmp_path), split="train")
    base = data.subsample_classes(full, "base")
    # Dassl samples the shots first, then keeps the base classes; the reverse draws the same images
    first = data.subsample_classes(data.few_shot(full, 2, seed=3), "base")
    then = data.few_shot(base, 2, seed=3)
    assert sorted(first.dataset.indices[i] for i in first.indices) == sorted(base.indices[i] for i in then.indices)
    prints = {data.fingerprint(d) for d in (full, base, data.subsample_classes(full, "new"), then)}
    assert len(prints) == 4
    base.transform = data.eval_transform(8)  # as evaluate.py sets it: on the images it draws from
    image, label = base[len(base) - 1]
    assert full.transform is base.transform and image.shape == (3, 8, 8) and label == 2


# ----- transforms and loaders --------------------------------------------------------------------


@pytest.mark.parametrize("size,n_px", [((37, 23), 16), ((23, 37), 16), ((13, 9), 16),
                                       ((301, 227), 224)])
def test_eval_transform_matches_openai_preprocess(size, n_px):
    image = _noise(*size, seed=size[0])
    openai = T.Compose([T.Resize(n_px, interpolation=T.InterpolationMode.BICUBIC),
                        T.CenterCrop(n_px), lambda im: im.convert("RGB"), T.ToTensor()])
    x = data.eval_transform(n_px)(image)
    assert type(x) is torch.Tensor and x.dtype == torch.float32 and x.shape == (3, n_px, n_px)
    assert torch.equal(x, openai(image))


def test_train_transform_is_a_random_crop_in_unit_range():
    t = data.train_transform(24)
    image = _noise(50, 31)
    torch.manual_seed(0)
    a, b = t(image), t(image)
    torch.manual_seed(0)
    assert torch.equal(t(image), a) and not torch.equal(a, b)
    assert type(a) is torch.Tensor and a.dtype == torch.float32 and a.shape == (3, 24, 24)
    assert a.min() >= 0 and a.max() <= 1
    dassl = T.Compose([T.RandomResizedCrop(24, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                       T.RandomHorizontalFlip(), T.ToTensor()])   # CoOp/MaPLe's training pipeline
    for seed in range(20):
        torch.manual_seed(seed)
        x = t(image)
        torch.manual_seed(seed)
        assert torch.equal(x, dassl(image))
    flat = t(Image.new("RGB", (40, 30), (200, 100, 51)))
    assert torch.allclose(flat, torch.tensor([200, 100, 51]).view(3, 1, 1) / 255.0, atol=1 / 255)


class _Images(torch.utils.data.Dataset):
    def __init__(self, n):
        self.images = [_noise(20, 17, seed=i) for i in range(n)]
        self.targets, self.classnames = [i % 2 for i in range(n)], ["a", "b"]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.targets[i]


def test_loader_is_reproducible_with_workers():
    ds = data.Transformed(_Images(10), data.train_transform(8))

    def run(seed):
        batches = data.loader(ds, 4, train=True, workers=2, seed=seed)
        return [(x, y) for _ in range(2) for x, y in batches]

    first, second, other = run(3), run(3), run(4)
    assert len(first) == 4 and first[0][0].shape == (4, 3, 8, 8) and first[0][1].dtype == torch.int64
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(first, second))
    assert not all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(first, other))
    plain = list(data.loader(ds, 4, train=False, workers=0))
    assert [len(y) for _, y in plain] == [4, 4, 2] and torch.cat([y for _, y in plain]).tolist() == ds.targets


# ----- synthetic -----------------------------------------------------------------------------------


def test_synthetic_tasks_go_through_synthetic_py():
    import synthetic
    ds = data.build_dataset("synthetic", split="test", transform=data.eval_transform(32))
    assert ds.classnames == synthetic.TASKS["synthetic"] and len(ds) == len(ds.targets)
    x, y = ds[3]
    assert x.shape == (3, 32, 32) and y == ds.targets[3]
    colour = data.build_dataset("synthetic-colour", split="train")
    assert colour.classnames == synthetic.TASKS["synthetic-colour"]
    sub = data.few_shot(colour, 2, seed=0)
    assert len(sub) == 2 * len(colour.classnames)
