"""clip/vision_weights.py: every accepted file format swaps in B's image encoder exactly; misfits are refused in one line."""
import hashlib
import warnings
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch

import clip
from clip.model import CLIP, ModifiedResNet, VisionTransformer

# OpenAI's constructor order: embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size,
# context_length, vocab_size, transformer_width, heads, layers.
TINY_VIT = (32, 32, 2, 64, 8, 77, 49408, 64, 1, 2)
TINY_RN = (32, 64, (1, 1, 1, 1), 32, None, 77, 49408, 64, 1, 2)
VIT_B32 = (512, 224, 12, 768, 32, 77, 49408, 512, 8, 12)
VIT_L14 = (768, 224, 24, 1024, 14, 77, 49408, 768, 12, 12)
RN50 = (1024, 224, (3, 4, 6, 3), 64, None, 77, 49408, 512, 8, 12)


def tiny(cfg, seed):
    torch.manual_seed(seed)
    return CLIP(*cfg).eval()


def visual_of(model, prefix=""):
    return {prefix + k: v.clone() for k, v in model.visual.state_dict().items()}


# Each format as its publisher writes it, built from model B.
FORMATS = {
    "tecoa": lambda b: {"epoch": 10, "state_dict": {"pad_up": torch.zeros(3)}, "add_prompter": {},
                        "vision_encoder_state_dict": visual_of(b, "module."), "best_acc1": 31.5,
                        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5, "params": [0, 1]}]}},
    "robustvlm": lambda b: visual_of(b),  # open_clip's model.visual.state_dict(): OpenAI's key names
    "full-clip": lambda b: b.state_dict(),  # B's text tower must not be loaded
    "visual-prefix": lambda b: visual_of(b, "visual."),
    "module-visual-prefix": lambda b: {"module." + k: v for k, v in b.state_dict().items()},
    "open-clip-training": lambda b: {"epoch": 3, "name": "run",
                                     "state_dict": {"module." + k: v for k, v in b.state_dict().items()}},
    "train-py": lambda b: {"config": {"method": "tecoa"}, "classnames": ["cat", "dog"], "widths": {"text": 64},
                           "trainable": visual_of(b, "clip.visual."), "epoch": 1},
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny CLIPs A (saved as the backbone file) and B of the same shape, per architecture."""
    out = {}
    for name, cfg in (("vit", TINY_VIT), ("resnet", TINY_RN)):
        a, b = tiny(cfg, 0), tiny(cfg, 1)
        if name == "resnet":  # non-default BatchNorm statistics, so that a missed buffer shows
            for m in b.visual.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.1, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
                    m.num_batches_tracked.fill_(7)
        path = tmp_path_factory.mktemp(name) / "a.pt"
        torch.save(a.state_dict(), path)
        out[name] = a, b, str(path), cfg
    return out


def features(model, cfg):
    torch.manual_seed(5)
    x, t = torch.randn(2, 3, cfg[1], cfg[1]), clip.tokenize(["a photo of a cat", "a dog"])
    with torch.no_grad():
        return model.encode_image(x), model.encode_text(t)


def assert_swapped(loaded, a, b, cfg):
    """Image features are B's exactly; the text tower is A's, bit for bit."""
    image, text = features(loaded, cfg)
    assert torch.equal(image, features(b, cfg)[0]) and torch.equal(text, features(a, cfg)[1])
    assert not torch.equal(image, features(a, cfg)[0])
    sd, sd_a = loaded.state_dict(), a.state_dict()
    assert all(torch.equal(sd[k], sd_a[k]) for k in sd if not k.startswith("visual."))
    assert all(torch.equal(sd["visual." + k], v) for k, v in b.visual.state_dict().items())


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_loads_b_image_encoder(models, tmp_path, fmt):
    a, b, a_file, cfg = models["vit"]
    path = tmp_path / f"{fmt}.pt"
    torch.save(FORMATS[fmt](b), path)
    loaded, _ = clip.load(a_file, device="cpu", dtype=torch.float32, vision_weights=str(path))
    assert_swapped(loaded, a, b, cfg)


def test_safetensors_full_open_clip_model(models, tmp_path):
    """open_clip_model.safetensors: a full model, text keys dropped; recognised by its header, not its name."""
    a, b, a_file, cfg = models["vit"]
    for name in ("open_clip_model.safetensors", "weights.bin"):
        path = tmp_path / name
        safetensors.torch.save_file({k: v.contiguous() for k, v in b.state_dict().items()}, str(path))
        loaded, _ = clip.load(a_file, device="cpu", dtype=torch.float32, vision_weights=str(path))
        assert_swapped(loaded, a, b, cfg)


@pytest.mark.parametrize("fmt", ["tecoa", "train-py"])
def test_resnet_encoder_with_batchnorm_statistics(models, tmp_path, fmt):
    """APT's TeCoA RN50 files and a fine-tuned ResNet checkpoint: weights and BatchNorm buffers all come from B."""
    a, b, a_file, cfg = models["resnet"]
    path = tmp_path / f"{fmt}.pt"
    torch.save(FORMATS[fmt](b), path)
    loaded, _ = clip.load(a_file, device="cpu", dtype=torch.float32, vision_weights=str(path))
    assert_swapped(loaded, a, b, cfg)
    assert loaded.visual.layer1[0].bn1.num_batches_tracked.item() == 7


def test_cast_to_model_dtypes(models, tmp_path):
    """A float16 file into a bfloat16 model: each tensor takes the dtype the model gives it (LayerNorms stay float32)."""
    a, b, a_file, cfg = models["vit"]
    path = tmp_path / "half.pt"
    torch.save({k: v.half() for k, v in visual_of(b).items()}, path)
    loaded, _ = clip.load(a_file, device="cpu", dtype=torch.bfloat16, vision_weights=str(path))
    assert loaded.visual.conv1.weight.dtype == torch.bfloat16 and loaded.visual.ln_post.weight.dtype == torch.float32
    assert torch.equal(loaded.visual.proj, b.visual.proj.half().to(torch.bfloat16))
    assert torch.equal(loaded.visual.ln_post.weight, b.visual.ln_post.weight.half().float())
    assert torch.equal(loaded.transformer.resblocks[0].attn.in_proj_weight,
                       a.transformer.resblocks[0].attn.in_proj_weight.to(torch.bfloat16))


def test_returns_the_files_sha256(models, tmp_path):
    a, b, a_file, cfg = models["vit"]
    path = tmp_path / "tecoa.pth.tar"
    torch.save(FORMATS["tecoa"](b), path)
    model = clip.load(a_file, device="cpu")[0]
    assert clip.load_vision_weights(model, str(path)) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert_swapped(model, a, b, cfg)


# ---------------------------------------------------------------------- refusals

def refusal(model_or_file, path, error=ValueError) -> str:
    """The one-line message with which loading path is refused."""
    with pytest.raises(error) as e:
        if isinstance(model_or_file, str):
            clip.load(model_or_file, device="cpu", vision_weights=str(path))
        else:
            clip.load_vision_weights(model_or_file, str(path))
    message = str(e.value)
    assert "\n" not in message
    return message


def test_wrong_keys_are_named_with_counts(models, tmp_path):
    a, b, a_file, cfg = models["vit"]
    sd = visual_of(b)
    del sd["ln_post.bias"], sd["proj"]
    sd["prompt.weight"] = torch.zeros(4)
    torch.save(sd, tmp_path / "keys.pt")
    message = refusal(a_file, tmp_path / "keys.pt")
    assert "2 missing keys (proj, ln_post.bias)" in message and "1 unexpected key (prompt.weight)" in message
    assert "shapes differ" not in message
    assert "the file looks like a ViT image encoder (width 64, 2 layers, patch 8, 32 px), this model's is a ViT " \
           "image encoder (width 64, 2 layers, patch 8, 32 px, output 32) of no OpenAI model's shape" in message


def test_wrong_shapes_are_named(models, tmp_path):
    a, b, a_file, cfg = models["vit"]
    other = tiny((16, 64, 2, 64, 8, 77, 49408, 64, 1, 2), 2)  # 64 px and 16-d output: two shapes differ
    torch.save(visual_of(other), tmp_path / "shapes.pt")
    message = refusal(a_file, tmp_path / "shapes.pt")
    assert ("shapes differ for 2 keys (positional_embedding: file [65, 64] vs model [17, 64], "
            "proj: file [64, 16] vs model [64, 32])") in message
    assert "missing" not in message and "unexpected" not in message
    assert "(width 64, 2 layers, patch 8, 64 px, output 16)" in message


def meta_visual(cfg) -> torch.nn.Module:
    """CLIP(*cfg).visual without memory (meta tensors: shapes only), as CLIP's constructor builds it."""
    embed_dim, resolution, layers, width, patch = cfg[:5]
    with torch.device("meta"):
        if isinstance(layers, tuple):
            return ModifiedResNet(layers, embed_dim, width * 32 // 64, resolution, width)
        return VisionTransformer(resolution, patch, width, layers, width // 64, embed_dim)


def shaped_like(cfg, path):
    """Writes a visual state dict with cfg's shapes (zero-stride views of one zero: a few KB on disk)."""
    sd = meta_visual(cfg).state_dict()
    torch.save({k: torch.zeros((), dtype=v.dtype).expand(v.shape) for k, v in sd.items()}, path)


@pytest.mark.parametrize("cfg, looks_like", [
    (VIT_L14, "the file looks like a ViT-L/14 image encoder (width 1024, 24 layers, patch 14, 224 px, output 768)"),
    (RN50, "the file looks like an RN50 image encoder (width 64, blocks 3-4-6-3, 224 px, output 1024)"),
])
def test_other_architecture_into_vit_b32(tmp_path, cfg, looks_like):
    model = SimpleNamespace(visual=meta_visual(VIT_B32))  # the check needs model.visual only
    shaped_like(cfg, tmp_path / "other.pt")
    message = refusal(model, tmp_path / "other.pt")
    assert looks_like in message
    assert message.endswith("this model's is a ViT-B/32 image encoder (width 768, 12 layers, patch 32, 224 px, output 512)")
    if cfg == VIT_L14:
        assert "144 unexpected keys (transformer.resblocks.12." in message
        assert "shapes differ for 152 keys (class_embedding: file [1024] vs model [768], " in message
    else:
        assert "151 missing keys (class_embedding, positional_embedding, proj, ...)" in message
        assert "338 unexpected keys (bn1.weight, bn1.bias, bn1.running_mean, ...)" in message
        assert "shapes differ for 1 key (conv1.weight: file [32, 3, 3, 3] vs model [768, 3, 32, 32])" in message


@pytest.mark.parametrize("name, cfg", [
    ("ViT-B/32", VIT_B32[:5]), ("ViT-B/16", (512, 224, 12, 768, 16)), ("ViT-L/14", VIT_L14[:5]),
    ("ViT-L/14@336px", (768, 336, 24, 1024, 14)), ("RN50", RN50[:5]), ("RN101", (512, 224, (3, 4, 23, 3), 64, None)),
    ("RN50x4", (640, 288, (4, 6, 10, 6), 80, None)), ("RN50x16", (768, 384, (6, 8, 18, 8), 96, None)),
    ("RN50x64", (1024, 448, (3, 15, 36, 10), 128, None))])
def test_shapes_name_each_openai_model(name, cfg):
    """OpenAI's constructor arguments (as in their model files) -> an encoder whose shapes describe_visual names."""
    assert f" {name} image encoder (" in clip.vision_weights.describe_visual(meta_visual(cfg).state_dict())


def test_nap_checkpoint_is_refused_as_prompts(models, tmp_path):
    a, b, a_file, cfg = models["vit"]
    ckpt = {"config": {"method": "nap"}, "classnames": ["cat"], "widths": {"text": 64},
            "trainable": {"text_ctx": torch.zeros(2, 64), "vision_ctx": torch.zeros(2, 64)}}
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    message = refusal(a_file, tmp_path / "checkpoint.pt")
    assert "holds prompts, not an image encoder" in message and "'nap'" in message and "--checkpoint" in message


class Payload:
    """Stands for anything pickled beside tensors (code would run on unpickling with weights_only=False)."""


def test_pickled_objects_are_refused_without_unsafe_advice(models, tmp_path):
    a, b, a_file, cfg = models["vit"]
    torch.save({"model": Payload(), **visual_of(b)}, tmp_path / "pickle.pt")
    message = refusal(a_file, tmp_path / "pickle.pt")
    assert "not a weights file this project can load safely" in message and "Payload" in message
    assert "weights_only" not in message and "False" not in message


def test_unreadable_and_missing_files(models, tmp_path):
    a, b, a_file, cfg = models["vit"]
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    message = refusal(a_file, tmp_path / "garbage.pt")
    assert "not a weights file this project can load safely" in message and "weights_only" not in message
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    assert "holds a list, expected a dict" in refusal(a_file, tmp_path / "list.pt")
    torch.save({"epoch": 3, "note": "x"}, tmp_path / "no-tensors.pt")
    assert "holds no tensors under its entries (epoch, note)" in refusal(a_file, tmp_path / "no-tensors.pt")
    assert "does not exist" in refusal(a_file, tmp_path / "absent.pt", FileNotFoundError)
    with warnings.catch_warnings():  # torch >= 2.9 deprecates TorchScript, which OpenAI's archives are
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.trace(torch.nn.Linear(2, 2), torch.zeros(1, 2)).save(str(tmp_path / "archive.pt"))
    assert "TorchScript archive" in refusal(a_file, tmp_path / "archive.pt")
