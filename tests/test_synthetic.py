import re
from collections import Counter

import numpy as np
import pytest

import synthetic
from synthetic import ATTRIBUTES, TASKS, CaptionDataset, SyntheticDataset


def pixels(image):
    return np.asarray(image)


def test_tasks_are_attribute_words():
    assert len(TASKS) >= 4 and "synthetic" in TASKS
    assert max(TASKS, key=lambda t: len(TASKS[t])) == "synthetic"
    for task, names in TASKS.items():
        assert len(set(names)) == len(names) >= 2
        assert names == ATTRIBUTES[SyntheticDataset(task).attribute]


def test_item_is_deterministic_and_rgb():
    a, b = SyntheticDataset("synthetic", "test"), SyntheticDataset("synthetic", "test")
    for i in (0, 7, 123):
        (x, y), (x2, y2) = a[i], b[i]
        assert x.mode == "RGB" and x.size == (64, 64)
        assert y == y2 and np.array_equal(pixels(x), pixels(x2))
    # the item does not depend on what was drawn before it (no global RNG)
    np.random.seed(1)
    assert np.array_equal(pixels(a[7][0]), pixels(SyntheticDataset("synthetic", "test")[7][0]))


def test_tensor_indices_give_the_same_item():
    """Samplers may hand out 0-d integer tensors; they index like ints."""
    import torch
    ds, captions = SyntheticDataset("synthetic", "test"), CaptionDataset(10)
    assert np.array_equal(pixels(ds[torch.tensor(7)][0]), pixels(ds[7][0])) and ds[torch.tensor(7)][1] == ds[7][1]
    assert captions[torch.tensor(3)][1] == captions[3][1]


def test_splits_seeds_and_tasks_differ():
    base = pixels(SyntheticDataset("synthetic", "train")[0][0])
    others = [SyntheticDataset("synthetic", "test")[0][0], SyntheticDataset("synthetic", "val")[0][0],
              SyntheticDataset("synthetic", "train", seed=1)[0][0],
              SyntheticDataset("synthetic-colour", "train")[0][0], CaptionDataset(10)[0][0]]
    for other in others:
        assert not np.array_equal(base, pixels(other))


def test_balanced_default_sizes_and_labels_match_attributes():
    for task, names in TASKS.items():
        data = SyntheticDataset(task, "train")
        assert len(data) == 100 * len(names) == len(data.targets)
        assert set(Counter(data.targets).values()) == {100}
        assert data.classnames == names
        for i in (0, 1, len(data) - 1):
            assert data.attributes(i)[data.attribute] == names[data.targets[i]]
    assert len(SyntheticDataset("synthetic", "test")) == 50 * len(TASKS["synthetic"])
    assert len(SyntheticDataset("synthetic-size", "val", size=7)) == 7


def test_nuisance_attributes_vary():
    data = SyntheticDataset("synthetic-colour", "train", size=400)
    for attribute in ("shape", "texture", "size", "position"):
        seen = Counter(data.attributes(i)[attribute] for i in range(len(data)))
        assert len(seen) == len(ATTRIBUTES[attribute])


def test_resolution():
    image, _ = SyntheticDataset("synthetic", "test", resolution=32)[3]
    assert image.size == (32, 32)


def test_object_is_drawn_where_its_position_says():
    # the object's colour is far from the greyish background: find its pixels, check the grid cell
    data = SyntheticDataset("synthetic-position", "test", size=90)
    for i in range(len(data)):
        image, label = data[i]
        x = pixels(image).astype(float) / 255
        saturated = x.max(-1) - x.min(-1) > 0.3
        rows, cols = np.nonzero(saturated)
        centres = 0.25 + 0.25 * np.arange(3)
        nearest = np.abs(centres - rows.mean() / 64).argmin(), np.abs(centres - cols.mean() / 64).argmin()
        assert nearest == divmod(label, 3), data.attributes(i)


def test_size_orders_object_area():
    data = SyntheticDataset("synthetic-size", "test", size=60)
    area = {name: [] for name in data.classnames}
    for i in range(len(data)):
        image, label = data[i]
        x = pixels(image).astype(float) / 255
        area[data.classnames[label]].append(((x.max(-1) - x.min(-1)) > 0.3).mean())
    assert np.median(area["small"]) < np.median(area["medium"]) < np.median(area["large"])


def mentioned(text, names):
    return {n for n in names if re.search(rf"\b{n}\b", text)}


def test_captions_name_attributes_of_their_image():
    data = CaptionDataset(size=300)
    texts = set()
    for i in range(len(data)):
        attrs, (image, text) = data.attributes(i), data[i]
        texts.add(text)
        assert image.size == (64, 64) and text
        named = 0
        for attribute, names in ATTRIBUTES.items():
            words = mentioned(text, names)
            # every value named is the image's (position words nest: "top" is in "top left")
            assert all(w in attrs[attribute] for w in words), (text, attrs)
            named += attrs[attribute] in words
        assert named >= 1, text
    assert len(texts) > 250    # varied
    assert any(t.startswith("a photo of a ") for t in texts)


def test_single_attribute_prompts_occur_in_captions():
    # zero-shot prompts "a photo of a {class}." must look like some pretraining captions
    texts = {synthetic.caption(synthetic.sample_attributes(rng), rng).rstrip(".")
             for rng in map(np.random.default_rng, range(60000))}
    for names in TASKS.values():
        assert all(f"a photo of a {n}" in texts for n in names)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="expected one of"):
        SyntheticDataset("imagenet")
    with pytest.raises(ValueError, match="expected one of"):
        SyntheticDataset("synthetic", "dev")
    with pytest.raises(IndexError):
        SyntheticDataset("synthetic", "test", size=5)[5]


def test_domains_are_new_draws_of_the_shapes_in_another_style():
    photo = SyntheticDataset("synthetic", "test")
    for name in synthetic.DOMAINS:
        ds = SyntheticDataset(name, "test")
        assert ds.classnames == TASKS["synthetic"] and ds.targets == photo.targets and len(ds) == len(photo)
        assert ds.attributes(3) != photo.attributes(3) or not np.array_equal(pixels(ds[3][0]), pixels(photo[3][0]))
    attrs = synthetic.sample_attributes(np.random.default_rng(0), shape="star", position="center")
    draw = lambda style: synthetic.render(attrs, 64, np.random.default_rng(5), style)  # noqa: E731
    assert np.array_equal(draw("negative"), 255 - draw("photo"))
    sketch = draw("sketch").astype(int).mean(-1)
    dark, light = sketch < 100, sketch > 150
    assert dark.sum() + light.sum() == 64 * 64 and 20 < dark.sum() < 400  # an outline, not a filled shape
    ys, xs = np.nonzero(dark)
    assert abs(ys.mean() - 32) < 4 and abs(xs.mean() - 32) < 4  # around the object in the centre
    with pytest.raises(ValueError, match="sketch"):
        synthetic.render(attrs, 64, np.random.default_rng(5), "cartoon")
