"""The dataset catalogue: each named dataset's folder, layout, class count, CoOp template and source.

No torch here, so that the command lines can check a named dataset's folder before torch loads
(cmdline.check_inputs); data.py reads the datasets and re-exports these names.
"""
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Info:
    folder: str      # the dataset's folder under the data root
    images: str      # image folder inside it; split files give paths relative to it
    split_file: str  # CoOp's split file inside the folder ("" where CoOp reads other files)
    n_classes: int
    template: str    # CoOp's zero-shot prompt for the dataset
    source: str      # where to download the images


DATASETS = {
    "imagenet": Info("imagenet", "images", "", 1000, "a photo of a {}.",
                     "image-net.org (ILSVRC-2012 train and val, val sorted into class folders)"),
    "caltech101": Info("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", 100,
                       "a photo of a {}.", "data.caltech.edu/records/mzrjq-6wc02"),
    "oxford_pets": Info("oxford_pets", "images", "split_zhou_OxfordPets.json", 37,
                        "a photo of a {}, a type of pet.", "robots.ox.ac.uk/~vgg/data/pets"),
    "stanford_cars": Info("stanford_cars", "", "split_zhou_StanfordCars.json", 196,
                          "a photo of a {}.", "Stanford Cars (its cars_train/ and cars_test/)"),
    "oxford_flowers": Info("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json", 102,
                           "a photo of a {}, a type of flower.",
                           "robots.ox.ac.uk/~vgg/data/flowers/102 (102flowers.tgz)"),
    "food101": Info("food-101", "images", "split_zhou_Food101.json", 101,
                    "a photo of {}, a type of food.",
                    "data.vision.ee.ethz.ch/cvl/datasets_extra/food-101"),
    "fgvc_aircraft": Info("fgvc_aircraft", "images", "", 100,
                          "a photo of a {}, a type of aircraft.",
                          "robots.ox.ac.uk/~vgg/data/fgvc-aircraft (fgvc-aircraft-2013b.tar.gz, "
                          "its data/ folder renamed fgvc_aircraft/)"),
    "sun397": Info("sun397", "SUN397", "split_zhou_SUN397.json", 397, "a photo of a {}.",
                   "vision.princeton.edu/projects/2010/SUN (SUN397.tar.gz)"),
    "dtd": Info("dtd", "images", "split_zhou_DescribableTextures.json", 47, "{} texture.",
                "robots.ox.ac.uk/~vgg/data/dtd (dtd-r1.0.1.tar.gz)"),
    "eurosat": Info("eurosat", "2750", "split_zhou_EuroSAT.json", 10,
                    "a centered satellite photo of {}.", "github.com/phelber/EuroSAT (RGB)"),
    "ucf101": Info("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json", 101,
                   "a photo of a person doing {}.",
                   "UCF-101-midframes.zip (middle video frames), linked in CoOp's DATASETS.md"),
    "imagenet_v2": Info("imagenetv2", "imagenetv2-matched-frequency-format-val", "", 1000,
                        "a photo of a {}.",
                        "github.com/modestyachts/ImageNetV2 (matched-frequency)"),
    "imagenet_sketch": Info("imagenet-sketch", "images", "", 1000, "a photo of a {}.",
                            "github.com/HaohanWang/ImageNet-Sketch"),
    "imagenet_a": Info("imagenet-adversarial", "imagenet-a", "", 200, "a photo of a {}.",
                       "github.com/hendrycks/natural-adv-examples"),
    "imagenet_r": Info("imagenet-rendition", "imagenet-r", "", 200, "a photo of a {}.",
                       "github.com/hendrycks/imagenet-r"),
}
TEST_ONLY = ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")
PAPER_EVAL = ["imagenet", "caltech101", "dtd", "eurosat", "oxford_pets", "fgvc_aircraft", "food101",
              "stanford_cars", "sun397", "ucf101"]
_ALIASES = {"flowers102": "oxford_flowers", "imagenetv2": "imagenet_v2"}
# CoOp renames these folder names when it writes its split files; names read from a split file
# go through the same map, so a split file that holds the raw folder names reads the same.
_RENAMES = {
    "caltech101": {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard",
                   "Motorbikes": "motorbike"},
    "eurosat": {"AnnualCrop": "Annual Crop Land",
                "HerbaceousVegetation": "Herbaceous Vegetation Land",
                "Highway": "Highway or Road", "Industrial": "Industrial Buildings",
                "Pasture": "Pasture Land", "PermanentCrop": "Permanent Crop Land",
                "Residential": "Residential Buildings", "SeaLake": "Sea or Lake"},
}


def default_root():
    """The data root when none is given: $NAP_DATA, else ./data."""
    return os.environ.get("NAP_DATA") or "./data"


def dataset_key(name: str) -> str:
    """A dataset name as DATASETS spells it ('Oxford-Pets' -> 'oxford_pets', aliases resolved); other names as lowered."""
    key = name.lower().replace("-", "_")
    return _ALIASES.get(key, key)


def layout(key, root):
    """One sentence: where the dataset was looked for and what should be there."""
    info = DATASETS[key]
    folder = os.path.join(root, info.folder)
    images = os.path.join(folder, info.images, "...")
    if info.split_file:
        expected = f"{images} and {os.path.join(folder, info.split_file)}"
    elif key == "fgvc_aircraft":
        expected = (f"{images}, {folder}/variants.txt and {folder}/images_variant_"
                    f"{{train,val,test}}.txt")
    elif key == "imagenet":
        expected = f"{folder}/images/{{train,val}}/<wnid>/<image> and {folder}/classnames.txt"
    else:
        expected = (f"{images} and a classnames.txt (in {folder} or {root}/imagenet) with lines "
                    f"like 'n01440764 tench'")
    return (f"{key}: looked in {folder}; expected CoOp's layout: {expected}. Images: "
            f"{info.source}; split files and classnames.txt: CoOp's DATASETS.md "
            f"(github.com/KaiyangZhou/CoOp). Point --data-root (or $NAP_DATA) at the folder "
            f"that holds {info.folder}/.")
