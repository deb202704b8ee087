"""Robust image encoders: replace a CLIP's `visual` weights with an adversarially fine-tuned one.

`load_vision_weights(model, path)` reads `path` into a state dict with OpenAI's `visual` key names
(`conv1.weight`, `class_embedding`, `positional_embedding`, `ln_pre.*`, `transformer.resblocks.N.*`,
`ln_post.*`, `proj`; for ResNet CLIPs `conv1..3`, `bn1..3`, `layer1..4.*`, `attnpool.*`), checks that
it fits `model.visual` exactly (every key present, no other key, every shape equal), casts it to the
model's dtypes on the model's device and loads it. The text tower is not touched. It returns the
file's SHA256, which results and checkpoints record. Files it reads:

- TeCoA checkpoints (Mao et al., cvlab-columbia/ZSRobust4FoundationModel; APT links the same
  files): `vision_encoder_state_dict` holds OpenAI keys, possibly `module.`-prefixed; the prompter,
  optimizer, epoch and accuracy entries are ignored.
- RobustVLM's `*_eps_*.pt` (FARE and TeCoA, ViT-B/32 and ViT-L/14): open_clip's
  `model.visual.state_dict()`. open_clip's OpenAI-architecture VisionTransformer and ModifiedResNet
  use OpenAI's parameter names, so the keys need no renaming.
- Full state dicts, OpenAI's or open_clip's (`open_clip_pytorch_model.bin`,
  `open_clip_model.safetensors`, open_clip training checkpoints under `state_dict`): their
  `visual.*` part. `module.` (DataParallel) and `visual.` prefixes are stripped, alone or together.
- QT-AFT's ViT-B/16 weights (OpenAI `visual` keys).
- train.py checkpoints of a fine-tuned image encoder: `trainable` holds `clip.visual.<key>`.
  A checkpoint whose `trainable` holds only prompts and refiners is refused.

Files are read with torch.load(..., weights_only=True) or, for safetensors files (recognised by
their header, whatever their name), with safetensors; a pickle of arbitrary Python objects is
refused. OpenAI's TorchScript archives are CLIP models, not image-encoder weights: give them to
`clip.load` as the model.

LAION-initialised open_clip models (e.g. ViT-B-32 `laion2b_*`) have the same key names and shapes
as OpenAI's ViT-B/32 but use plain GELU, not QuickGELU, and some another text tower: they are not
OpenAI-architecture CLIPs. The keys cannot tell them apart, so such a file loads here and gives
wrong features; use image encoders fine-tuned from OpenAI's weights only.
"""
import os
import re
import zipfile

import safetensors.torch
import torch
from torch import nn

__all__ = ["load_vision_weights", "read_vision_state_dict", "load_visual_state_dict", "describe_visual"]

# OpenAI's image encoders: (kind, width, layers or blocks per stage, patch, resolution, output dim).
OPENAI_VISUAL = {
    "ViT-B/32": ("ViT", 768, 12, 32, 224, 512),
    "ViT-B/16": ("ViT", 768, 12, 16, 224, 512),
    "ViT-L/14": ("ViT", 1024, 24, 14, 224, 768),
    "ViT-L/14@336px": ("ViT", 1024, 24, 14, 336, 768),
    "RN50": ("ResNet", 64, (3, 4, 6, 3), None, 224, 1024),
    "RN101": ("ResNet", 64, (3, 4, 23, 3), None, 224, 512),
    "RN50x4": ("ResNet", 80, (4, 6, 10, 6), None, 288, 640),
    "RN50x16": ("ResNet", 96, (6, 8, 18, 8), None, 384, 768),
    "RN50x64": ("ResNet", 128, (3, 15, 36, 10), None, 448, 1024),
}
SHOW = 3  # keys named per kind of mismatch in an error line


def load_vision_weights(model: nn.Module, path: str) -> str:
    """Replaces model.visual's weights with the image encoder in path (strictly); returns the file's SHA256 hex."""
    from . import sha256_of  # clip/__init__.py imports this module before it defines sha256_of
    load_visual_state_dict(model, read_vision_state_dict(path), source=path)
    return sha256_of(path)


def read_vision_state_dict(path: str) -> dict:
    """A weights file in any accepted format -> {OpenAI visual key: tensor} on the CPU, keys in file order."""
    obj = _read(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, expected a dict of image-encoder weights")
    sd = _unwrap(obj, path)
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if any(k.startswith("visual.") for k in sd):  # a whole CLIP: keep the image encoder only
        sd = {k.removeprefix("visual.").removeprefix("module."): v for k, v in sd.items() if k.startswith("visual.")}
    if not any(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} holds no tensors under its entries ({_first(list(sd))}); expected an image "
                         f"encoder's state dict, a TeCoA checkpoint or a full CLIP state dict")
    return sd


def load_visual_state_dict(model: nn.Module, state_dict: dict, source: str = "the state dict"):
    """Loads {OpenAI visual key: tensor} into model.visual after a strict key and shape check, in the model's dtypes."""
    target = model.visual.state_dict()
    missing = [k for k in target if k not in state_dict]
    unexpected = [k for k in state_dict if k not in target]
    wrong = [k for k in target if k in state_dict and _shape(state_dict[k]) != tuple(target[k].shape)]
    if missing or unexpected or wrong:
        sizes = [f"{k}: file {list(_shape(state_dict[k]))} vs model {list(target[k].shape)}" for k in wrong]
        problems = [f"{_count(missing, 'missing key')} ({_first(missing)})" if missing else "",
                    f"{_count(unexpected, 'unexpected key')} ({_first(unexpected)})" if unexpected else "",
                    f"shapes differ for {_count(wrong, 'key')} ({_first(sizes)})" if wrong else ""]
        raise ValueError(f"{source} does not fit this CLIP's image encoder: {'; '.join(p for p in problems if p)}; "
                         f"the file looks like {describe_visual(state_dict)}, this model's is {describe_visual(target)}")
    cast = {k: v.to(device=target[k].device, dtype=target[k].dtype) for k, v in state_dict.items()}
    model.visual.load_state_dict(cast, strict=True)


def describe_visual(state_dict: dict) -> str:
    """{OpenAI visual key: tensor} -> e.g. 'a ViT-L/14 image encoder (width 1024, 24 layers, patch 14, 224 px, output 768)'."""
    dims = _visual_dims(state_dict)
    if dims is None:
        return f"no CLIP image encoder (its first keys: {_first(list(state_dict))})"
    kind, width, layers, patch, resolution, output = dims
    shown = [f"width {width}" if width else "",
             (f"{layers} layers" if kind == "ViT" else "blocks " + "-".join(map(str, layers))) if layers else "",
             f"patch {patch}" if patch else "", f"{resolution} px" if resolution else "",
             f"output {output}" if output else ""]
    shape = ", ".join(s for s in shown if s)
    for name, known in OPENAI_VISUAL.items():
        if dims == known:
            return f"{'an' if name.startswith('RN') else 'a'} {name} image encoder ({shape})"
    complete = None not in (dims[:3] + dims[4:] if kind == "ResNet" else dims)  # a ResNet has no patch size
    return f"a {kind} image encoder ({shape})" + (" of no OpenAI model's shape" if complete else "")


# ---------------------------------------------------------------------- reading files

def _read(path: str):
    """Loads a safetensors file or a torch.save file of tensors and plain containers; one-line errors otherwise."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"vision weights file {path} does not exist; give the path of an image encoder's "
                                f"weights (.pt, .pth.tar, .bin or .safetensors)")
    if _is_safetensors(path):
        try:
            return safetensors.torch.load_file(path, device="cpu")
        except Exception as e:
            raise ValueError(f"{path} has a safetensors header but cannot be read ({_one_line(e)})") from None
    if _is_torchscript(path):
        raise ValueError(f"{path} is a TorchScript archive (a whole model, as OpenAI publishes CLIP), not image-"
                         f"encoder weights: give it to clip.load as the model")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        message = str(e)
        if "weights_only" in message or "Weights only" in message:
            found = re.search(r"GLOBAL ([\w.]+)", message)
            raise ValueError(f"{path} is not a weights file this project can load safely: it is neither a safetensors "
                             f"file nor a torch.save file of tensors and plain containers"
                             + (f" (it pickles {found.group(1)})" if found else "")) from None
        raise ValueError(f"{path} cannot be read as a weights file ({type(e).__name__}: {_one_line(e)})") from None


def _is_safetensors(path: str) -> bool:
    """A safetensors file starts with an 8-byte little-endian header length, then the JSON header's '{'."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:] == b"{" and int.from_bytes(head[:8], "little") < os.path.getsize(path)


def _is_torchscript(path: str) -> bool:
    """TorchScript archives are zip files with a constants.pkl record, as torch.load tells them apart."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(name.endswith("constants.pkl") for name in z.namelist())


def _unwrap(obj: dict, path: str) -> dict:
    """The state dict inside a checkpoint: train.py's `trainable`, TeCoA's `vision_encoder_state_dict`, a `state_dict`."""
    if {"config", "classnames", "trainable"} <= set(obj):  # a checkpoint written by train.py
        visual = {k.removeprefix("clip.visual."): v for k, v in obj["trainable"].items() if k.startswith("clip.visual.")}
        if not visual:
            method = obj["config"].get("method", "?") if isinstance(obj["config"], dict) else "?"
            raise ValueError(f"{path} is a train.py checkpoint of method {method!r} that holds prompts, not an image "
                             f"encoder (its tensors: {_first(list(obj['trainable']))}); give it to evaluate.py as "
                             f"--checkpoint instead")
        return visual
    for entry in ("vision_encoder_state_dict", "state_dict"):  # TeCoA first: its `state_dict` is the prompter
        if isinstance(obj.get(entry), dict):
            return obj[entry]
    return obj


def _visual_dims(sd: dict):
    """(kind, width, layers, patch, resolution, output dim) read off a visual state dict's shapes (None: unknown)."""
    shape = lambda key: _shape(sd[key]) if key in sd else None
    if any(k.startswith(("layer1.", "attnpool.")) for k in sd):
        blocks = tuple(len({k.split(".")[1] for k in sd if k.startswith(f"layer{s}.")}) for s in (1, 2, 3, 4))
        width = (shape("layer1.0.conv1.weight") or shape("conv3.weight") or (None,))[0]
        pos, c_proj = shape("attnpool.positional_embedding"), shape("attnpool.c_proj.weight")
        resolution = round((pos[0] - 1) ** 0.5) * 32 if pos else None
        return "ResNet", width, blocks if all(blocks) else None, None, resolution, (c_proj or (None,))[0]
    if not {"conv1.weight", "class_embedding", "positional_embedding"} & set(sd):
        return None
    conv, pos, proj = shape("conv1.weight"), shape("positional_embedding"), shape("proj")
    width = conv[0] if conv else (pos[1] if pos and len(pos) == 2 else None)
    patch = conv[-1] if conv and len(conv) == 4 else None
    blocks = {int(m.group(1)) for m in (re.match(r"transformer\.resblocks\.(\d+)\.", k) for k in sd) if m}
    resolution = patch * round((pos[0] - 1) ** 0.5) if patch and pos else None
    output = proj[1] if proj and len(proj) == 2 else None
    return "ViT", width, max(blocks) + 1 if blocks else None, patch, resolution, output


def _shape(value) -> tuple:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else (type(value).__name__,)


def _count(items: list, noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def _first(keys: list) -> str:
    return ", ".join(map(str, keys[:SHOW])) + (", ..." if len(keys) > SHOW else "")


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:200]
