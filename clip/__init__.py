"""OpenAI's CLIP API: available_models(), load() -> (model, preprocess), build_model(), tokenize().

A drop-in for `import clip`. `load` takes one of OpenAI's nine model names (downloaded once to a
cache folder and checked against the SHA256 in its URL) or a path to a local file, which may be
OpenAI's TorchScript archive or a plain state_dict. The model it returns is this package's
`CLIP` module, never a TorchScript one.

One difference from OpenAI's package: the preprocess `load` returns stops at images in [0, 1]
(resize, centre crop, ToTensor), the input this project's models and attacks take (they normalise
inside, so eps is in pixels). `load(..., normalize=True)` returns OpenAI's preprocess, which also
normalises with CLIP's MEAN and STD, for feeding the bare CLIP's `encode_image` as OpenAI's examples
do; `image_transform(n_px, normalize)` builds either.

`load(..., vision_weights=FILE)` then replaces the image encoder with a robust one (TeCoA, FARE,
QT-AFT, a fine-tuned train.py checkpoint; see vision_weights.py), strictly, leaving the text tower
as loaded; `load_vision_weights(model, FILE)` does the same on a loaded model and returns the
file's SHA256.
"""
import hashlib
import os
import urllib.request
import warnings

import torch
from PIL import Image
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor
from tqdm import tqdm

from .model import CLIP, build_model, convert_weights
from .tokenizer import tokenize
from .vision_weights import load_vision_weights, load_visual_state_dict, read_vision_state_dict

__all__ = ["available_models", "load", "build_model", "tokenize", "image_transform", "load_vision_weights",
           "read_vision_state_dict", "CLIP", "MEAN", "STD"]

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)

_BASE = "https://openaipublic.azureedge.net/clip/models"
_MODELS = {
    "RN50": f"{_BASE}/afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
    "RN101": f"{_BASE}/8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599/RN101.pt",
    "RN50x4": f"{_BASE}/7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd/RN50x4.pt",
    "RN50x16": f"{_BASE}/52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa/RN50x16.pt",
    "RN50x64": f"{_BASE}/be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c/RN50x64.pt",
    "ViT-B/32": f"{_BASE}/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B/16": f"{_BASE}/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L/14": f"{_BASE}/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    "ViT-L/14@336px": f"{_BASE}/3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
}


def available_models() -> list:
    """The names of OpenAI's published CLIP models."""
    return list(_MODELS)


def cache_dir(download_root: str = None) -> str:
    """Where weights are cached: download_root, else $CLIP_CACHE, else ~/.cache/clip."""
    return download_root or os.environ.get("CLIP_CACHE") or os.path.expanduser("~/.cache/clip")


def sha256_of(path: str) -> str:
    """The SHA256 hex digest of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, root: str) -> str:
    """Downloads url into root unless a file with the right SHA256 (the URL's parent folder) is there; returns the path."""
    os.makedirs(root, exist_ok=True)
    expected = url.split("/")[-2]
    target = os.path.join(root, os.path.basename(url))
    if os.path.isfile(target):
        if sha256_of(target) == expected:
            return target
        print(f"{target} has the wrong SHA256; downloading it again")
    partial = target + ".part"
    try:
        with urllib.request.urlopen(url, timeout=60) as source, open(partial, "wb") as out:
            total = int(source.info().get("Content-Length") or 0) or None
            with tqdm(total=total, unit="iB", unit_scale=True, unit_divisor=1024, desc=os.path.basename(url)) as bar:
                for chunk in iter(lambda: source.read(1 << 16), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
    except OSError as e:
        if os.path.exists(partial):
            os.remove(partial)
        raise ConnectionError(f"could not download {url} ({e}); download it by hand and put it at {target}, "
                           f"or pass the file's path instead of the model name") from None
    got = sha256_of(partial)
    if got != expected:
        os.remove(partial)
        raise ValueError(f"the file downloaded from {url} has SHA256 {got}, expected {expected}; "
                           f"the partial file was removed, try again")
    os.replace(partial, target)
    return target


def image_transform(n_px: int, normalize: bool = False) -> Compose:
    """PIL image -> [3, n_px, n_px] in [0, 1]: bicubic resize of the short side, centre crop, RGB, ToTensor;
    normalize=True adds CLIP's mean/std, which makes it OpenAI's preprocess."""
    steps = [Resize(n_px, interpolation=InterpolationMode.BICUBIC), CenterCrop(n_px), _to_rgb, ToTensor()]
    return Compose(steps + [Normalize(MEAN, STD)] if normalize else steps)


def _to_rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")


def read_state_dict(path: str) -> dict:
    """A CLIP checkpoint file (OpenAI's TorchScript archive or a plain state_dict) -> state_dict on the CPU."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch >= 2.9 deprecates TorchScript
            return torch.jit.load(path, map_location="cpu").state_dict()
    except RuntimeError:
        pass  # not a TorchScript archive
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        # torch's message advises weights_only=False, i.e. running the file's code: never pass that on
        found = "GLOBAL" in str(e) and "objects besides tensors, which this project never unpickles"
        raise ValueError(f"{path} is neither a TorchScript archive nor a state_dict saved with torch.save: it is not "
                         f"a weights file this project can load safely ({found or type(e).__name__})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path} holds a {type(sd).__name__}, expected a CLIP state_dict")
    return sd


def load(name: str, device="cuda" if torch.cuda.is_available() else "cpu", jit: bool = False,
         download_root: str = None, dtype: torch.dtype = None, vision_weights: str = None, normalize: bool = False):
    """A model name or file path -> (CLIP model in eval mode on device, preprocess for PIL images).

    preprocess gives images in [0, 1], as PromptedCLIP and the attacks take them; normalize=True gives
    OpenAI's preprocess instead (CLIP's mean/std applied), the input of the bare model's encode_image.
    dtype defaults to OpenAI's choice: float32 on the CPU, float16 (conv/linear weights) on CUDA.
    vision_weights: a file whose image encoder replaces the model's, every key and shape matched
    (vision_weights.py lists the formats); the text tower stays as loaded.
    """
    if jit:
        raise ValueError("jit=True is not supported: this package returns its own CLIP module; call load(name) instead")
    visual = None if vision_weights is None else read_vision_state_dict(vision_weights)  # bad files fail before a download
    if name in _MODELS:
        path = download(_MODELS[name], cache_dir(download_root))
    elif os.path.isfile(name):
        path = name
    else:
        raise FileNotFoundError(f"model {name!r} not found: not one of {available_models()} and no file at that path")
    if dtype is None:
        dtype = torch.float32 if torch.device(device).type == "cpu" else torch.float16
    model = build_model(read_state_dict(path), dtype=torch.float32)
    if dtype != torch.float32:
        convert_weights(model, dtype)
    if visual is not None:
        load_visual_state_dict(model, visual, source=vision_weights)
    return model.to(device), image_transform(model.visual.input_resolution, normalize)
