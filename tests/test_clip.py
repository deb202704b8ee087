"""clip/: tokenizer ids, OpenAI key layout, strict round trips, loading (TorchScript, state_dict, download)."""
import hashlib
import http.server
import os
import threading
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import Normalize

import clip
from clip.model import CLIP

# Tiny configurations in OpenAI's constructor order: embed_dim, image_resolution, vision_layers,
# vision_width, vision_patch_size, context_length, vocab_size, transformer_width, heads, layers.
TINY_VIT = (32, 32, 2, 64, 8, 77, 49408, 64, 1, 2)
TINY_RN = (32, 64, (1, 1, 1, 1), 32, None, 77, 49408, 64, 1, 2)
VIT_B16 = (512, 224, 12, 768, 16, 77, 49408, 512, 8, 12)


def tiny(cfg=TINY_VIT, seed=0):
    torch.manual_seed(seed)
    return CLIP(*cfg).eval()


# ---------------------------------------------------------------- tokenizer

def test_vocabulary_file_is_openais():
    path = os.path.join(os.path.dirname(clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert digest == "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"


def test_known_token_ids():
    tokens = clip.tokenize(["a photo of a cat.", "a photo of a Yorkshire terrier."])
    assert tokens.dtype == torch.long and tokens.shape == (2, 77)
    assert tokens[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 269, 49407]
    assert tokens[1, :9].tolist() == [49406, 320, 1125, 539, 320, 8633, 14455, 269, 49407]


def test_padding_and_context_length():
    tokens = clip.tokenize("a photo of a cat.", context_length=12)
    assert tokens.tolist() == [[49406, 320, 1125, 539, 320, 2368, 269, 49407, 0, 0, 0, 0]]


def test_too_long_raises_and_truncate_keeps_eot():
    text = "cat " * 100
    with pytest.raises(RuntimeError, match="context length"):
        clip.tokenize(text)
    tokens = clip.tokenize(text, truncate=True)
    assert tokens.shape == (1, 77) and tokens[0, 0] == 49406 and tokens[0, -1] == 49407
    assert (tokens[0, 1:-1] == 2368).all()


def test_cleaning_and_decode():
    tok = clip.tokenizer.get_tokenizer()
    assert tok.encode("A  Photo\nOF a &amp; cat") == tok.encode("a photo of a & cat")
    assert tok.decode(tok.encode("naïve café")).strip() == "naïve café"


# ---------------------------------------------------------------- architecture and keys

def test_vit_b16_keys_and_shapes():
    model = CLIP(*VIT_B16)
    sd = model.state_dict()
    assert len(sd) == 302
    assert sum(v.numel() for v in sd.values()) == 149_620_737
    expected = {
        "visual.conv1.weight": (768, 3, 16, 16), "visual.class_embedding": (768,),
        "visual.positional_embedding": (197, 768), "visual.proj": (768, 512),
        "visual.transformer.resblocks.11.attn.in_proj_weight": (2304, 768),
        "visual.transformer.resblocks.0.attn.in_proj_bias": (2304,),
        "visual.transformer.resblocks.0.attn.out_proj.weight": (768, 768),
        "visual.transformer.resblocks.0.mlp.c_fc.weight": (3072, 768),
        "transformer.resblocks.11.mlp.c_proj.weight": (512, 2048),
        "token_embedding.weight": (49408, 512), "positional_embedding": (77, 512),
        "text_projection": (512, 512), "logit_scale": (), "ln_final.weight": (512,),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert clip.model.config_from_state_dict(sd) == dict(zip(
        ["embed_dim", "image_resolution", "vision_layers", "vision_width", "vision_patch_size", "context_length",
         "vocab_size", "transformer_width", "transformer_heads", "transformer_layers"], VIT_B16))


@pytest.mark.parametrize("cfg", [TINY_VIT, TINY_RN], ids=["vit", "resnet"])
def test_strict_round_trip(cfg):
    model = tiny(cfg)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    rebuilt = clip.build_model(sd, dtype=torch.float32)
    assert set(rebuilt.state_dict()) == set(sd)
    x, t = torch.randn(2, 3, cfg[1], cfg[1]), clip.tokenize(["a cat", "a dog"])
    with torch.no_grad():
        assert torch.equal(model(x, t)[0], rebuilt(x, t)[0])


def test_build_model_defaults_to_openai_half_precision():
    model = clip.build_model(tiny().state_dict())
    assert model.visual.conv1.weight.dtype == torch.float16
    assert model.transformer.resblocks[0].attn.in_proj_weight.dtype == torch.float16
    assert model.ln_final.weight.dtype == torch.float32 and model.logit_scale.dtype == torch.float32


def test_block_by_block_equals_encoders():
    """Running the exposed blocks one at a time reproduces encode_image / encode_text."""
    model = tiny()
    x, t = torch.randn(3, 3, 32, 32), clip.tokenize(["a cat", "a red dog", "x"])
    with torch.no_grad():
        h = model.visual.ln_pre(model.visual.embed(x)).transpose(0, 1)
        for block in model.visual.transformer.resblocks:
            h = block(h)
        assert torch.allclose(model.visual.head(h.transpose(0, 1)), model.encode_image(x), atol=1e-6)
        h = model.embed_text(t).transpose(0, 1)
        for block in model.transformer.resblocks:
            h = block(h)
        assert torch.allclose(model.text_head(h.transpose(0, 1), t), model.encode_text(t), atol=1e-6)


def test_text_attention_is_causal():
    """Changing a later token must not change the features of earlier positions."""
    model = tiny()
    a, b = clip.tokenize(["a photo of a cat"]), clip.tokenize(["a photo of a dog"])
    with torch.no_grad():
        ha = model.transformer(model.embed_text(a).transpose(0, 1))
        hb = model.transformer(model.embed_text(b).transpose(0, 1))
    assert torch.equal(ha[:5], hb[:5]) and not torch.allclose(ha[5], hb[5])


def test_state_dict_that_fits_no_clip_says_which_keys():
    sd = tiny().state_dict()
    del sd["ln_final.bias"]
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \['ln_final.bias'\].*unexpected keys \['extra.weight'\]"):
        clip.build_model(sd)
    with pytest.raises(ValueError, match="fits no CLIP"):
        clip.build_model({"weight": torch.zeros(3)})


# ---------------------------------------------------------------- load()

def test_load_torchscript_archive(tmp_path):
    model = tiny()
    x, t = torch.randn(2, 3, 32, 32), clip.tokenize(["a cat", "a dog"])
    traced = torch.jit.trace_module(model, {"forward": (x, t), "encode_image": (x,), "encode_text": (t,)})
    path = str(tmp_path / "tiny-jit.pt")
    traced.save(path)
    loaded, preprocess = clip.load(path, device="cpu")
    assert isinstance(loaded, CLIP) and not isinstance(loaded, torch.jit.ScriptModule)
    with torch.no_grad():
        assert torch.allclose(loaded(x, t)[0], traced(x, t)[0], atol=1e-5)
        assert torch.allclose(loaded.encode_text(t), traced.encode_text(t), atol=1e-5)


def test_load_state_dict_file_and_dtype(tmp_path):
    model = tiny()
    path = str(tmp_path / "tiny.pt")
    torch.save(model.state_dict(), path)
    loaded, _ = clip.load(path, device="cpu")
    assert loaded.dtype == torch.float32 and not loaded.training
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(x), model.encode_image(x))
    half, _ = clip.load(path, device="cpu", dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.ln_final.weight.dtype == torch.float32


def test_load_refuses_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="ViT-B/16"):
        clip.load("ViT-B/17")
    with pytest.raises(ValueError, match="jit=True"):
        clip.load("ViT-B/16", jit=True)
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="neither a TorchScript archive nor a state_dict"):
        clip.load(str(bad))
    assert len(clip.available_models()) == 9 and "ViT-L/14@336px" in clip.available_models()


def test_preprocess_on_odd_size_image():
    rng = np.random.RandomState(0)
    image = Image.fromarray((rng.rand(301, 217, 3) * 255).astype(np.uint8))  # width 217, height 301
    raw = clip.image_transform(64)(image)
    # Short side to 64 (long side int(64 * 301 / 217) = 88), bicubic, then the centre 64 rows.
    resized = np.asarray(image.resize((64, 88), Image.BICUBIC), dtype=np.float32) / 255
    top = int(round((88 - 64) / 2.0))
    assert raw.shape == (3, 64, 64) and 0 <= raw.min() and raw.max() <= 1
    assert torch.allclose(raw, torch.from_numpy(resized[top:top + 64]).permute(2, 0, 1))
    normed = clip.image_transform(64, normalize=True)(image.convert("L"))  # grey input comes out RGB
    assert normed.shape == (3, 64, 64)
    mean, std = torch.tensor(clip.MEAN)[:, None, None], torch.tensor(clip.STD)[:, None, None]
    assert torch.allclose(clip.image_transform(64, normalize=True)(image), (raw - mean) / std, atol=1e-6)


def test_load_preprocess_gives_unit_range_images_and_normalize_gives_openais(tmp_path):
    """clip.load's preprocess stops at [0, 1] (what PromptedCLIP and the attacks take); normalize=True is OpenAI's,
    the same images normalised afterwards with CLIP's mean/std."""
    path = str(tmp_path / "tiny.pt")
    torch.save(tiny().state_dict(), path)
    _, preprocess = clip.load(path, device="cpu")
    _, openai_preprocess = clip.load(path, device="cpu", normalize=True)
    image = Image.fromarray((np.random.RandomState(1).rand(50, 70, 3) * 255).astype(np.uint8))
    x = preprocess(image)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert x.min() < 0.1 and x.max() > 0.9  # the whole range, not normalised
    normalize = Normalize(clip.MEAN, clip.STD)
    assert torch.allclose(openai_preprocess(image), normalize(x), atol=1e-6)
    assert openai_preprocess(image).min() < 0


# ---------------------------------------------------------------- download against a local server

@pytest.fixture()
def server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield served, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_download_cache_hit_and_checksum(server, tmp_path):
    served, base = server
    payload = os.urandom(100_000)
    digest = hashlib.sha256(payload).hexdigest()
    (served / digest).mkdir()
    (served / digest / "tiny.pt").write_bytes(payload)
    cache = tmp_path / "cache"
    path = clip.download(f"{base}/{digest}/tiny.pt", str(cache))
    assert open(path, "rb").read() == payload
    (served / digest / "tiny.pt").unlink()  # a second call must not touch the network
    assert clip.download(f"{base}/{digest}/tiny.pt", str(cache)) == path
    wrong = "0" * 64
    (served / wrong).mkdir()
    (served / wrong / "bad.pt").write_bytes(payload)
    with pytest.raises(ValueError, match="SHA256.*removed"):
        clip.download(f"{base}/{wrong}/bad.pt", str(cache))
    assert sorted(os.listdir(cache)) == ["tiny.pt"]
    with pytest.raises(ConnectionError, match="by hand"):
        clip.download(f"{base}/{digest}/missing.pt", str(cache))


def test_load_by_name_downloads_once(server, tmp_path, monkeypatch):
    served, base = server
    src = tmp_path / "model.pt"
    torch.save(tiny().state_dict(), src)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    (served / digest).mkdir()
    (served / digest / "Tiny.pt").write_bytes(src.read_bytes())
    monkeypatch.setitem(clip._MODELS, "Tiny", f"{base}/{digest}/Tiny.pt")
    monkeypatch.setenv("CLIP_CACHE", str(tmp_path / "env-cache"))
    model, preprocess = clip.load("Tiny", device="cpu")
    assert os.path.isfile(tmp_path / "env-cache" / "Tiny.pt") and model.visual.input_resolution == 32
