"""nap.py: equivalences with plain CLIP, deep-prompt data flow, frozen backbone, training, checkpoints, counts."""
import os

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import clip
import nap
from clip.model import CLIP

TINY_VIT = (32, 32, 3, 64, 8, 77, 49408, 64, 1, 3)   # 3 layers per tower
TINY_RN = (32, 64, (1, 1, 1, 1), 32, None, 77, 49408, 64, 1, 3)
NAMES = ["cat", "golden_retriever", "red car"]


def tiny_clip(cfg=TINY_VIT, seed=0):
    torch.manual_seed(seed)
    return CLIP(*cfg).eval()


def small(method, **kw):
    """A preset shrunk to the tiny CLIP's 3 layers."""
    return nap.make_config(method, depth=min(nap.PRESETS[method].depth, 3), **kw)


def images(n=4, seed=1, res=32):
    return torch.rand(n, 3, res, res, generator=torch.Generator().manual_seed(seed))


def coloured_images(n=12):
    """A learnable tiny problem: class c is a noisy image tinted with colour c."""
    y = torch.arange(n) % 3
    colours = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.9, 0.1], [0.1, 0.1, 0.9]])
    x = 0.15 * images(n, seed=3) + 0.8 * colours[y].view(n, 3, 1, 1)
    return x, y


def normalise(x):
    return (x - torch.tensor(clip.MEAN).view(1, 3, 1, 1)) / torch.tensor(clip.STD).view(1, 3, 1, 1)


@pytest.mark.parametrize("cfg", [TINY_VIT, TINY_RN], ids=["vit", "resnet"])
def test_zeroshot_is_plain_clip(cfg):
    model = tiny_clip(cfg)
    prompted = nap.PromptedCLIP(model, NAMES, nap.PRESETS["zeroshot"])
    x = images(res=cfg[1])
    text = clip.tokenize(["a photo of a cat.", "a photo of a golden retriever.", "a photo of a red car."])
    with torch.no_grad():
        assert torch.equal(prompted(x), model(normalise(x), text)[0])


@pytest.mark.parametrize("cfg", [TINY_VIT, TINY_RN], ids=["vit", "resnet"])
def test_advpt_starts_at_zeroshot(cfg):
    """A text context of <= 4 tokens is initialised from 'a photo of a': before training such an AdvPT is zero-shot CLIP."""
    model = tiny_clip(cfg)
    x = images(res=cfg[1])
    with torch.no_grad():
        zs = nap.PromptedCLIP(model, NAMES, nap.PRESETS["zeroshot"])(x)
        pt = nap.PromptedCLIP(model, NAMES, nap.make_config("advpt", text_ctx=4))(x)
    assert torch.allclose(zs, pt, atol=1e-5)


def reference_image_features(model, x, prompts, refiners):
    """Deep visual prompting written out by hand: layer l>1 drops the prompt outputs, refines, appends fresh ones."""
    v, n = model.visual, prompts[0].shape[0] if prompts else 0
    h = v.embed(normalise(x))
    if prompts:
        h = torch.cat([h, prompts[0].expand(len(x), -1, -1)], 1)
    h = v.ln_pre(h)  # [N, L, D]
    for layer, block in enumerate(v.transformer.resblocks, start=1):
        if 2 <= layer <= len(prompts):
            body = h[:, :h.shape[1] - n]
            if refiners:
                r = refiners[layer - 2]
                body = body + r.fc2(torch.relu(r.fc1(body)))
            h = torch.cat([body, prompts[layer - 1].expand(len(x), -1, -1)], 1)
        h = block(h.transpose(0, 1)).transpose(0, 1)
    return F.normalize(v.ln_post(h[:, 0]) @ v.proj, dim=-1)


def test_deep_visual_prompts_and_refiners_follow_the_data_flow():
    model = tiny_clip()
    cfg = nap.make_config("advvlp", depth=3, refine="vision")
    prompted = nap.PromptedCLIP(model, NAMES, cfg)
    x = images()
    with torch.no_grad():
        want = reference_image_features(model, x, prompted.vision_prompts(), list(prompted.vision_refiners))
        assert torch.allclose(prompted.encode_image(x), want, atol=1e-5)
        # depth 2 only prompts the first two layers: a third-layer prompt would be ignored
        two = nap.PromptedCLIP(model, NAMES, nap.make_config("advvlp", depth=2))
        assert len(two.vision_deep) == 1 and len(two.vision_prompts()) == 2


def test_depth_one_is_shallow_prompting():
    model = tiny_clip()
    prompted = nap.PromptedCLIP(model, NAMES, nap.make_config("advvlp", depth=1, ctx_init=""))
    x = images()
    with torch.no_grad():
        # text: the context replaces the embeddings of the placeholder words, then plain CLIP runs
        tokens = prompted.tokens
        emb = model.token_embedding(tokens)
        emb[:, 1:3] = prompted.text_ctx
        h = model.transformer((emb + model.positional_embedding).transpose(0, 1)).transpose(0, 1)
        text = F.normalize(model.text_head(h, tokens), dim=-1)
        assert torch.allclose(prompted.encode_text(), text, atol=1e-5)
        image = reference_image_features(model, x, [prompted.vision_ctx], [])
        assert torch.allclose(prompted.encode_image(x), image, atol=1e-5)
        assert len(prompted.text_deep) == 0 and len(prompted.vision_deep) == 0


def test_zero_init_refiners_give_the_prompts_only_model():
    model = tiny_clip()
    with_refiners = nap.PromptedCLIP(model, NAMES, small("nap", refiner_init="zero"))
    prompts_only = nap.PromptedCLIP(model, NAMES, small("nap", refine="none"))  # the same prompts, no refiners
    prompts_only.load_state_dict({k: v for k, v in with_refiners.trainable_state_dict().items() if "refiners" not in k},
                                 strict=False)
    x = images()
    with torch.no_grad():
        assert torch.equal(with_refiners(x), prompts_only(x))
        default = nap.PromptedCLIP(model, NAMES, small("nap"))
        default.load_state_dict(prompts_only.trainable_state_dict(), strict=False)
        assert not torch.allclose(default(x), prompts_only(x), atol=1e-4)  # default-init refiners do act


def test_refine_flag_places_refiners():
    model = tiny_clip()
    for refine, text, vision in [("none", False, False), ("text", True, False), ("vision", False, True), ("both", True, True)]:
        m = nap.PromptedCLIP(model, NAMES, small("nap", refine=refine))
        assert hasattr(m, "text_refiners") == text and hasattr(m, "vision_refiners") == vision
        if text:
            assert len(m.text_refiners) == 2 and m.text_refiners[0].fc1.out_features == 128  # depth-1, hidden 2d


def test_presets_follow_their_sources():
    """nap as [D] at both commits, advpt as [B]'s AdvCoOp script, the other baselines as [B]'s configs."""
    cfg = nap.PRESETS["nap"]
    assert (cfg.text_ctx, cfg.vision_ctx, cfg.depth, cfg.coupling, cfg.refine) == (16, 16, 12, "maple", "vision")
    assert nap.PromptConfig() == cfg  # the dataclass's defaults are NAP's
    assert (nap.PRESETS["advpt"].text_ctx, nap.PRESETS["advpt"].depth) == (32, 1)
    for method in ("advvpt", "advvlp", "advmaple"):
        assert nap.PRESETS[method].depth == 9 and nap.PRESETS[method].refine == "none"
    # 16 and 32 tokens are more than "a photo of a" has: random init, read as "X X .. X {}."
    assert nap.text_template(cfg) == " ".join(["X"] * 16) + " {}."
    assert nap.text_template(nap.PRESETS["advpt"]) == " ".join(["X"] * 32) + " {}."
    assert nap.text_template(nap.PRESETS["advmaple"]) == "a photo of a {}."  # 2 tokens from its words


def test_maple_projections_of_layers_2_to_J_start_as_copies_of_one_layer():
    torch.manual_seed(0)
    m = nap.PromptedCLIP(tiny_clip(), NAMES, small("advmaple"))
    first, *deeper = m.proj
    assert len(deeper) == 2
    for p in deeper[1:]:
        assert torch.equal(p.weight, deeper[0].weight) and torch.equal(p.bias, deeper[0].bias)
        assert p.weight.data_ptr() != deeper[0].weight.data_ptr()  # copies, not one shared layer
    assert not torch.equal(first.weight, deeper[0].weight)


def test_text_refiners_refine_the_sos_token_only():
    """At the first refined layer the tokens after SOS enter the block exactly as without refiners."""
    model = tiny_clip()
    seen = {}
    hook = model.transformer.resblocks[1].register_forward_pre_hook(lambda _, a: seen.setdefault(len(seen), a[0]))
    with torch.no_grad():
        torch.manual_seed(0)
        plain = nap.PromptedCLIP(model, NAMES, small("nap", refine="none"))
        torch.manual_seed(0)
        refined = nap.PromptedCLIP(model, NAMES, small("nap", refine="text"))
        refined.text_refiners[0].fc2.bias.fill_(0.5)
        plain.encode_text(), refined.encode_text()
    hook.remove()
    h_plain, h_refined = seen[0], seen[1]  # [L, C, D] entering block 2
    assert torch.equal(h_refined[1:], h_plain[1:])
    assert not torch.allclose(h_refined[:1], h_plain[:1])


PROMPT_METHODS = [m for m, cfg in nap.PRESETS.items() if cfg.finetune == "none"]


@pytest.mark.parametrize("method", PROMPT_METHODS)
def test_backbone_frozen_and_every_preset_trains(method):
    model = tiny_clip()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prompted = nap.PromptedCLIP(model, NAMES, small(method)).train()
    x, y = coloured_images()
    params = [p for p in prompted.parameters() if p.requires_grad]
    if method == "zeroshot":
        assert params == []
        return
    opt = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(prompted(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training


def test_resnet_backbone_batchnorm_stays_frozen_in_train_mode():
    model = tiny_clip(TINY_RN)
    before = model.visual.bn1.running_mean.clone()
    prompted = nap.PromptedCLIP(model, NAMES, nap.PRESETS["advpt"]).train()
    prompted(images(res=64))
    assert torch.equal(model.visual.bn1.running_mean, before)


def test_rows_do_not_depend_on_the_batch():
    prompted = nap.PromptedCLIP(tiny_clip(), NAMES, small("nap"))
    x = images(6)
    with torch.no_grad():
        full = prompted(x)
        assert torch.allclose(full[2:3], prompted(x[2:3]), atol=1e-5)
        assert torch.allclose(full[:3], prompted(x[:3]), atol=1e-5)


def test_logits_fn_and_layers():
    prompted = nap.PromptedCLIP(tiny_clip(), NAMES, small("nap"))
    x = images()
    fn = prompted.logits_fn()
    with torch.no_grad():
        assert torch.equal(fn(x), prompted(x))  # the cached text features and visual prompts change nothing
        features, layers = prompted.encode_image(x, return_layers=True)
    assert len(layers) == 3 and layers[0].shape == (4, 1 + 16 + 16, 64)  # CLS, 4x4 patches, 16 prompts
    assert torch.equal(features, prompted.encode_image(x))


def test_resnet_refuses_visual_methods():
    with pytest.raises(ValueError, match="needs a ViT CLIP"):
        nap.PromptedCLIP(tiny_clip(TINY_RN), NAMES, small("advvpt"))


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="unknown method"):
        nap.make_config("coop")
    with pytest.raises(ValueError, match="refine must be one of"):
        nap.make_config("nap", refine="all")
    with pytest.raises(ValueError, match="vision_ctx must equal text_ctx"):
        nap.make_config("advmaple", vision_ctx=4)
    with pytest.raises(ValueError, match="exceeds the number of transformer layers"):
        nap.PromptedCLIP(tiny_clip(), NAMES, nap.PRESETS["nap"])  # depth 9 > 3 layers


def test_images_outside_unit_range_are_refused_with_the_fix(tmp_path):
    """Each way of getting the input range wrong has its own one-line fix; [0, 1] from clip.load's preprocess passes."""
    model = nap.PromptedCLIP(tiny_clip(), NAMES, small("nap"))
    x = images()
    with pytest.raises(ValueError, match=r"got values up to 255; divide by 255$"):
        model(x * 255)
    with pytest.raises(ValueError, match=r"looks normalised with CLIP's mean/std; pass images in \[0, 1\] \(the model "
                                         r"normalises inside\): use the preprocess from this project's clip.load"):
        model(normalise(x))
    with pytest.raises(ValueError, match=r"got values in \[-3, 0.9\d*\]; clamp or rescale them into \[0, 1\]$"):
        model(torch.cat([x[:1] - 3, x[1:]]))
    with pytest.raises(ValueError, match=r"got values in \[\S+, 1.5\]; clamp or rescale"):
        model(x * 1.5)
    with pytest.raises(ValueError, match=r"floats in \[0, 1\], got torch.uint8; convert with images.float\(\) / 255"):
        model((x * 255).to(torch.uint8))
    path = str(tmp_path / "tiny.pt")
    torch.save(tiny_clip().state_dict(), path)
    backbone, preprocess = clip.load(path, device="cpu")
    picture = Image.fromarray((images(1, res=48)[0].permute(1, 2, 0) * 255).to(torch.uint8).numpy())
    assert nap.PromptedCLIP(backbone, NAMES, small("nap"))(preprocess(picture)[None]).shape == (1, len(NAMES))


def test_checkpoint_round_trip(tmp_path):
    model = tiny_clip()
    prompted = nap.PromptedCLIP(model, NAMES, small("nap"))
    with torch.no_grad():
        for p in prompted.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    path = str(tmp_path / "ckpt.pt")
    nap.save_checkpoint(prompted, path, arch="tiny")
    ckpt = nap.load_checkpoint(path)
    assert ckpt["arch"] == "tiny" and ckpt["classnames"] == ["cat", "golden retriever", "red car"]
    assert not any(k.startswith("clip.") for k in ckpt["trainable"])
    restored = nap.from_checkpoint(tiny_clip(), ckpt)
    x = images()
    with torch.no_grad():
        assert torch.equal(restored(x), prompted(x))
    with pytest.raises(ValueError, match="pass transfer=True"):
        nap.from_checkpoint(tiny_clip(), ckpt, classnames=["plane", "ship"])
    assert nap.from_checkpoint(tiny_clip(), ckpt, classnames=["plane", "ship"], transfer=True)(x).shape == (4, 2)
    wide = CLIP(32, 32, 3, 128, 8, 77, 49408, 128, 2, 3).eval()
    with pytest.raises(ValueError, match="text width 64"):
        nap.from_checkpoint(wide, ckpt)


def test_bad_checkpoint_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        nap.load_checkpoint(str(tmp_path / "missing.pt"))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="corrupt"):
        nap.load_checkpoint(str(corrupt))
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="not a NAP checkpoint"):
        nap.load_checkpoint(str(other))
    newer = tmp_path / "newer.pt"
    prompted = nap.PromptedCLIP(tiny_clip(), NAMES, small("advpt"))
    torch.save({**nap.checkpoint_dict(prompted), "config": {**nap.checkpoint_dict(prompted)["config"], "gate": 1}}, newer)
    with pytest.raises(ValueError, match=r"config fields this version does not know \(gate\)"):
        nap.load_checkpoint(str(newer))


def test_a_full_disk_while_saving_is_an_oserror_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    """torch.save turns a failed write into a RuntimeError; atomic_save raises the disk's OSError (ENOSPC) instead."""
    import builtins
    import errno
    path = str(tmp_path / "checkpoint.pt")
    nap.atomic_save({"epoch": 1}, path)

    class FullDisk:
        def __init__(self, *_):
            pass

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *_):
            return False

    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda p, *a, **k: FullDisk() if str(p).startswith(path + ".tmp")
                        else real_open(p, *a, **k))
    with pytest.raises(OSError) as failed:
        nap.atomic_save({"epoch": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert failed.value.errno == errno.ENOSPC
    assert torch.load(path)["epoch"] == 1 and os.listdir(tmp_path) == ["checkpoint.pt"]


def test_parameter_counts_on_vit_b16():
    """Trainable parameters of each preset on ViT-B/16 (README table): prompts vs refiners."""
    model = CLIP(512, 224, 12, 768, 16, 77, 49408, 512, 8, 12)
    counts = {m: nap.count_parameters(nap.PromptedCLIP(model, NAMES, cfg)) for m, cfg in nap.PRESETS.items()}
    maple_proj = 9 * (512 * 768 + 768)
    assert counts["zeroshot"]["total"] == 0
    assert counts["advpt"] == {"prompts": 32 * 512, "refiners": 0, "encoder": 0, "total": 16_384}
    assert counts["advvpt"]["prompts"] == 9 * 2 * 768
    assert counts["advvlp"]["prompts"] == 9 * 2 * 512 + 9 * 2 * 768
    assert counts["advmaple"]["prompts"] == 9 * 2 * 512 + maple_proj == 3_555_072
    nap_prompts = 12 * 16 * 512 + 12 * (512 * 768 + 768)  # 16 tokens at 12 layers, a projection per layer
    refiners = 11 * (768 * 1536 * 2 + 1536 + 768)  # image tower, layers 2..12
    assert counts["nap"] == {"prompts": nap_prompts, "refiners": refiners, "encoder": 0, "total": nap_prompts + refiners}
    assert nap_prompts + refiners == 30_803_712  # 30.8 M
    visual = sum(p.numel() for p in model.visual.parameters())
    assert counts["tecoa"] == counts["fare"] == {"prompts": 0, "refiners": 0, "encoder": visual, "total": visual}
    assert visual == 86_192_640  # OpenAI's ViT-B/16 image encoder (86.2 M)
    assert 768 * 1536 * 2 + 1536 + 768 == 2_361_600 and 512 * 1024 * 2 + 1024 + 512 == 1_050_112  # PAPER.md sizes


# ---------------------------------------------------------------------- nap.py on another OpenAI-layout CLIP

class OpenAIBlock(torch.nn.Module):
    """A residual attention block in OpenAI's layout and keys, built on nn.MultiheadAttention (not this project's)."""

    def __init__(self, width, heads, mask=None):
        super().__init__()
        from collections import OrderedDict
        from clip.model import LayerNorm, QuickGELU
        self.attn = torch.nn.MultiheadAttention(width, heads)
        self.ln_1, self.ln_2, self.attn_mask = LayerNorm(width), LayerNorm(width), mask
        self.mlp = torch.nn.Sequential(OrderedDict(c_fc=torch.nn.Linear(width, 4 * width), gelu=QuickGELU(),
                                                   c_proj=torch.nn.Linear(4 * width, width)))

    def forward(self, x):  # [L, N, D]
        h = self.ln_1(x)
        mask = None if self.attn_mask is None else self.attn_mask.to(x.dtype)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


def foreign_clip(width=64, layers=3, patch=8, res=32, embed=32):
    """An OpenAI-layout CLIP object with none of this project's helper methods: only the standard attributes."""
    from clip.model import LayerNorm
    tower = lambda mask=None: torch.nn.Module()
    text, vision = tower(), tower()
    text.resblocks = torch.nn.Sequential(*[OpenAIBlock(width, 1, clip.model.causal_mask(77)) for _ in range(layers)])
    vision.resblocks = torch.nn.Sequential(*[OpenAIBlock(width, 1) for _ in range(layers)])
    model, visual = torch.nn.Module(), torch.nn.Module()
    visual.conv1 = torch.nn.Conv2d(3, width, patch, patch, bias=False)
    visual.class_embedding = torch.nn.Parameter(torch.zeros(width))
    visual.positional_embedding = torch.nn.Parameter(torch.zeros((res // patch) ** 2 + 1, width))
    visual.ln_pre, visual.ln_post, visual.transformer = LayerNorm(width), LayerNorm(width), vision
    visual.proj = torch.nn.Parameter(torch.zeros(width, embed))
    model.visual, model.transformer, model.context_length = visual, text, 77
    model.token_embedding = torch.nn.Embedding(49408, width)
    model.positional_embedding = torch.nn.Parameter(torch.zeros(77, width))
    model.ln_final, model.text_projection = LayerNorm(width), torch.nn.Parameter(torch.zeros(width, embed))
    model.logit_scale = torch.nn.Parameter(torch.zeros([]))
    return model


@pytest.mark.parametrize("method", ["zeroshot", "advvlp", "nap"])
def test_nap_drives_any_openai_layout_clip(method):
    """The same weights in a foreign OpenAI-layout model (strict keys) give this project's logits."""
    ours = tiny_clip()
    theirs = foreign_clip().eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    torch.manual_seed(1)
    a = nap.PromptedCLIP(ours, NAMES, small(method))
    b = nap.PromptedCLIP(theirs, NAMES, small(method))
    b.load_state_dict(a.trainable_state_dict(), strict=False)
    x = images()
    with torch.no_grad():
        assert torch.allclose(a(x), b(x), atol=1e-4), (a(x) - b(x)).abs().max()
        if method == "zeroshot":  # and exactly the foreign model's own computation
            v = theirs.visual
            h = F.conv2d(normalise(x), v.conv1.weight, stride=8).flatten(2).transpose(1, 2)
            h = torch.cat([v.class_embedding.expand(len(x), 1, -1), h], 1) + v.positional_embedding
            h = v.transformer.resblocks(v.ln_pre(h).transpose(0, 1)).transpose(0, 1)
            image = F.normalize(v.ln_post(h[:, 0]) @ v.proj, dim=-1)
            t = b.tokens
            h = theirs.transformer.resblocks((theirs.token_embedding(t) + theirs.positional_embedding).transpose(0, 1))
            text = F.normalize(theirs.ln_final(h.transpose(0, 1))[torch.arange(3), t.argmax(-1)] @ theirs.text_projection, dim=-1)
            assert torch.equal(b(x), theirs.logit_scale.exp() * image @ text.t())


def test_curriculum_layers_are_blocks_before_depth_and_the_last():
    """[D]'s consistency keys: the outputs of blocks 1..J-1 and of the final block (not block J)."""
    prompted = nap.PromptedCLIP(tiny_clip(), NAMES, nap.make_config("nap", depth=2))
    outputs = []
    hooks = [b.register_forward_hook(lambda m, a, out: outputs.append(out.transpose(0, 1)))
             for b in prompted.clip.visual.transformer.resblocks]
    with torch.no_grad():
        _, layers = prompted.encode_image(images(), return_layers=True)
    for h in hooks:
        h.remove()
    assert len(outputs) == 3 and len(layers) == 2
    assert torch.equal(layers[0], outputs[0]) and torch.equal(layers[1], outputs[2])
