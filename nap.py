"""NAP-Tuning: deep text and visual prompts, TokenRefiners, and the prompted CLIP classifier.

Every method of the comparison is a preset of one config (PRESETS): zero-shot CLIP, AdvPT (text
context), AdvVPT (visual deep prompts), AdvVLP (independent deep text+visual prompts), AdvMaPLe
(visual prompts projected from text prompts) and NAP-Tuning (deep text+visual prompts plus
TokenRefiners). `PromptedCLIP(clip_model, classnames, cfg)` freezes the CLIP it is given and
drives its blocks from outside:

  text:   [SOS][ctx_1..ctx_n][class tokens][EOT]       ctx replaces the first n template words
  vision: [CLS][patches][prompt_1..prompt_n]           appended after the positional embedding
  layer l = 2..depth: prompt outputs of layer l-1 are dropped and replaced by fresh prompts,
                      and the other tokens pass a TokenRefiner first: h <- h + W2 relu(W1 h + b1) + b2

Where the refiners sit. [D] refines the image tower's CLS and patch tokens entering each prompted
layer 2..J (refine="vision", the default). Its text blocks build a refiner but bypass it; a
commented variant would refine the SOS token only. refine="text"/"both" is a reading of the
paper's "modality-specific" wording [P], and refines that SOS token only: the attack perturbs the
image alone, so the class-name, EOT and padding tokens carry no adversarial distortion to undo,
and refining EOT (the token read out as the class embedding) would rewrite every class embedding,
which no source does.

Images are in [0, 1]; normalisation happens inside. Text features do not depend on the image:
`text_features()` computes them once, `logits(images, text_features)` reuses them, and
`logits_fn()` returns a plain callable for attacks. Checkpoints hold only the trainable tensors.

To use this file alone, copy it next to any `clip` package with OpenAI's layout (OpenAI's own
package or this project's clip/): it needs only `clip.tokenize` and the attributes every
OpenAI-layout CLIP has (conv1, class_embedding, positional_embedding, ln_pre, transformer.resblocks,
ln_post, proj; token_embedding, positional_embedding, transformer.resblocks, ln_final,
text_projection, logit_scale, context_length), whose blocks take tokens as [length, batch, width].
"""
import copy
import os
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from clip import tokenize

COUPLINGS = ("independent", "maple")
REFINE = ("none", "vision", "text", "both")
REFINER_INITS = ("default", "zero")
FINETUNE = ("none", "vision")
MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's image normalisation (OpenAI's preprocess)
STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class PromptConfig:
    """The knobs of every method; PRESETS names the published combinations."""
    method: str = "nap"
    text_ctx: int = 16                # learnable text context vectors after SOS (0: fixed template)
    vision_ctx: int = 16              # learnable visual prompt tokens after CLS+patches (0: none)
    depth: int = 12                   # layers 1..depth get prompts (J); 1 is shallow prompting
    coupling: str = "maple"           # independent prompts, or visual prompt = Linear(text prompt) per layer
    ctx_init: str = "a photo of a"    # text context initialised from these words when text_ctx <= their count
    template: str = "a photo of a {}."  # the zero-shot prompt; also the text around the learnable context
    refine: str = "vision"            # TokenRefiners on: none / vision ([D]) / text / both (a reading of [P])
    refiner_hidden: float = 2.0       # refiner hidden width = refiner_hidden * token width
    refiner_init: str = "default"     # default (nn.Linear's) or zero (refiner starts as the identity)
    finetune: str = "none"            # none (CLIP frozen) or vision: the whole image encoder trains (TeCoA, FARE)

    def __post_init__(self):
        checks = [
            (self.coupling in COUPLINGS, f"coupling must be one of {COUPLINGS}, got {self.coupling!r}"),
            (self.refine in REFINE, f"refine must be one of {REFINE}, got {self.refine!r}"),
            (self.refiner_init in REFINER_INITS, f"refiner_init must be one of {REFINER_INITS}, got {self.refiner_init!r}"),
            (self.finetune in FINETUNE, f"finetune must be one of {FINETUNE}, got {self.finetune!r}"),
            (self.text_ctx >= 0 and self.vision_ctx >= 0, "text_ctx and vision_ctx must be >= 0"),
            (self.depth >= 1, f"depth must be >= 1, got {self.depth}"),
            (self.refiner_hidden > 0, f"refiner_hidden must be > 0, got {self.refiner_hidden}"),
            ("{}" in self.template, f"template must contain '{{}}' for the class name, got {self.template!r}"),
            (self.coupling != "maple" or self.vision_ctx in (0, self.text_ctx),
             "maple coupling projects each text prompt to a visual prompt: vision_ctx must equal text_ctx"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def vision_prompts(self) -> bool:
        return self.vision_ctx > 0

    @property
    def deep_text(self) -> bool:
        """Fresh text prompts at layers 2..depth."""
        return self.text_ctx > 0 and self.depth > 1

    @property
    def trainable(self) -> bool:
        return self.text_ctx > 0 or self.vision_ctx > 0 or self.refine != "none"


# Each preset names its evidence. [B]: the baselines' repository (xinwong/Multimodal-Adversarial-Prompt-Tuning);
# [D]: the NAP first author's development repository jiamingzhang94/MAPT, at d26abda8 (latest code) and
# 9a9bb04e (the logged run); [T] TeCoA, [F] FARE; [P] the paper's text; [C] a choice of ours.
PRESETS = {
    "zeroshot": PromptConfig("zeroshot", text_ctx=0, vision_ctx=0, depth=1, coupling="independent", refine="none"),
    # [B] scripts/AdvCoOp/zs_vit16_train_AdvCoOp.sh: NCTX=32, random init ("X X .. X"), class token at the end
    "advpt": PromptConfig("advpt", text_ctx=32, vision_ctx=0, depth=1, coupling="independent", refine="none"),
    # [B] AdvVPT / AdvIVLP / AdvMaPLe configs: 2 tokens per branch from "a photo of a", prompt depth 9
    "advvpt": PromptConfig("advvpt", text_ctx=0, vision_ctx=2, depth=9, coupling="independent", refine="none"),
    "advvlp": PromptConfig("advvlp", text_ctx=2, vision_ctx=2, depth=9, coupling="independent", refine="none"),
    "advmaple": PromptConfig("advmaple", text_ctx=2, vision_ctx=2, depth=9, coupling="maple", refine="none"),
    # [D] at both commits: MaPLe coupling, 16 random context tokens ("X X .. X"), prompt depth 12, a TokenRefiner
    # per prompted image layer 2..J; the text branch bypasses its refiner (`prefix_refined = prefix`)
    "nap": PromptConfig("nap", text_ctx=16, vision_ctx=16, depth=12, coupling="maple", refine="vision"),
    # fine-tuning baselines: no prompts, the image encoder itself is trained (their losses differ: recipes.py)
    "tecoa": PromptConfig("tecoa", text_ctx=0, vision_ctx=0, depth=1, coupling="independent", refine="none",
                          template="This is a photo of a {}", finetune="vision"),  # TeCoA's training prompt [T]
    "fare": PromptConfig("fare", text_ctx=0, vision_ctx=0, depth=1, coupling="independent", refine="none",
                         finetune="vision"),
}


def make_config(method: str, **overrides) -> PromptConfig:
    """A preset by name with some fields replaced (None values are ignored)."""
    if method not in PRESETS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(PRESETS)}")
    known = {f.name for f in fields(PromptConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown config fields {sorted(unknown)}; known: {sorted(known)}")
    return replace(PRESETS[method], **{k: v for k, v in overrides.items() if v is not None})


class TokenRefiner(nn.Module):
    """Residual token MLP: h -> h + W2 relu(W1 h + b1) + b2 on [..., width], hidden = factor * width."""

    def __init__(self, width: int, hidden_factor: float = 2.0, zero_init: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(width, int(round(hidden_factor * width)))
        self.fc2 = nn.Linear(int(round(hidden_factor * width)), width)
        if zero_init:
            nn.init.zeros_(self.fc2.weight)
            nn.init.zeros_(self.fc2.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(F.relu(self.fc1(h.to(self.fc1.weight.dtype)))).to(h.dtype)


def prompt_init(n: int, width: int) -> nn.Parameter:
    """n fresh prompt vectors ~ N(0, 0.02^2): [n, width]."""
    return nn.Parameter(torch.randn(n, width) * 0.02)


def n_init_tokens(cfg: PromptConfig) -> int:
    """How many tokens the context-initialisation words take."""
    return int((tokenize(cfg.ctx_init)[0] > 0).sum()) - 2 if cfg.ctx_init else 0  # less SOS and EOT


def is_vit(clip_model: nn.Module) -> bool:
    """True for a ViT image encoder (tokens that can be prompted), False for a ResNet."""
    return hasattr(clip_model.visual, "class_embedding")


# The range of a [0, 1] image after CLIP's normalisation, (0 - mean) / std .. (1 - mean) / std: about [-1.79, 2.15]
NORMALISED = (min(-m / s for m, s in zip(MEAN, STD)), max((1 - m) / s for m, s in zip(MEAN, STD)))


def check_images(images: torch.Tensor):
    """Refuses images that are not floats in [0, 1] in one line saying how to fix it: uint8 or 0..255 floats
    (divide by 255), images already normalised with CLIP's mean/std (the model normalises), anything else."""
    if not torch.is_floating_point(images):
        raise ValueError(f"images must be floats in [0, 1], got {images.dtype}; convert with images.float() / 255")
    if not images.numel():
        return
    lo, hi = torch.stack(torch.aminmax(images.detach())).tolist()  # one sync
    tol = 1e-6
    if lo >= -tol and hi <= 1 + tol:
        return
    if lo >= -tol and hi > NORMALISED[1] + tol:
        raise ValueError(f"images must be in [0, 1] (the model normalises them), got values up to {hi:.4g}; "
                         f"divide by 255")
    if lo < -tol and NORMALISED[0] - tol <= lo and hi <= NORMALISED[1] + tol:
        raise ValueError(f"images must be in [0, 1], got values in [{lo:.4g}, {hi:.4g}], which looks normalised "
                         f"with CLIP's mean/std; pass images in [0, 1] (the model normalises inside): use the "
                         f"preprocess from this project's clip.load, or leave out the Normalize step")
    raise ValueError(f"images must be in [0, 1] (the model normalises them), got values in [{lo:.4g}, {hi:.4g}]; "
                     f"clamp or rescale them into [0, 1]")


def text_template(cfg: PromptConfig) -> str:
    """The tokenised class prompt: cfg.template when the context is initialised from its words, else 'X X .. X {}.'"""
    if cfg.text_ctx == 0 or (cfg.text_ctx <= n_init_tokens(cfg) and cfg.template.startswith(cfg.ctx_init)):
        return cfg.template
    return " ".join(["X"] * cfg.text_ctx) + " {}."


class PromptedCLIP(nn.Module):
    """Frozen CLIP + learnable prompts and refiners: forward(images [N,3,R,R] in [0,1]) -> logits [N, n_classes]."""

    def __init__(self, clip_model: nn.Module, classnames, cfg: PromptConfig = PRESETS["nap"]):
        super().__init__()
        vit = is_vit(clip_model)
        if not vit and (cfg.vision_ctx > 0 or cfg.refine in ("vision", "both")):
            raise ValueError(f"method {cfg.method!r} prompts the image encoder, which needs a ViT CLIP; "
                             f"this one has a ResNet image encoder (use zeroshot or advpt, or a ViT model)")
        if cfg.depth > len(clip_model.transformer.resblocks) or (vit and cfg.depth > len(clip_model.visual.transformer.resblocks)):
            raise ValueError(f"depth {cfg.depth} exceeds the number of transformer layers of this CLIP")
        self.clip = clip_model.requires_grad_(False).eval()
        if cfg.finetune == "vision":
            self.clip.visual.requires_grad_(True)
        self.cfg = cfg
        d_text = clip_model.ln_final.weight.shape[0]
        d_vision = clip_model.visual.conv1.out_channels if vit else None
        self.widths = {"text": d_text, "vision": d_vision}
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)
        self.set_classnames(classnames)

        n, deep = cfg.text_ctx, cfg.depth - 1
        if n > 0:  # text context: from the template's first n words, else random
            from_words = text_template(cfg) == cfg.template
            with torch.no_grad():
                init = clip_model.token_embedding(self.tokens[:1, 1:1 + n]).float()[0]
            self.text_ctx = nn.Parameter(init.clone() if from_words else torch.randn(n, d_text) * 0.02)
            self.text_deep = nn.ParameterList([prompt_init(n, d_text) for _ in range(deep)])
        if cfg.vision_ctx > 0 and cfg.coupling == "maple":  # as MaPLe [B][D]: layer 1's own Linear, and layers
            first, deeper = nn.Linear(d_text, d_vision), nn.Linear(d_text, d_vision)  # 2..J start as copies of one
            self.proj = nn.ModuleList([first, *(copy.deepcopy(deeper) for _ in range(deep))])
        elif cfg.vision_ctx > 0:
            self.vision_ctx = prompt_init(cfg.vision_ctx, d_vision)
            self.vision_deep = nn.ParameterList([prompt_init(cfg.vision_ctx, d_vision) for _ in range(deep)])
        zero = cfg.refiner_init == "zero"
        if cfg.refine in ("text", "both"):
            self.text_refiners = nn.ModuleList([TokenRefiner(d_text, cfg.refiner_hidden, zero) for _ in range(deep)])
        if cfg.refine in ("vision", "both"):
            self.vision_refiners = nn.ModuleList([TokenRefiner(d_vision, cfg.refiner_hidden, zero) for _ in range(deep)])

    # ------------------------------------------------------------------ bookkeeping

    def set_classnames(self, classnames):
        """Sets the classes to score (zero-shot transfer swaps them); underscores become spaces."""
        if isinstance(classnames, (str, bytes)) or not all(isinstance(c, str) for c in classnames):
            raise ValueError(f"classnames must be a list of class-name strings, e.g. ['cat', 'dog'], "
                             f"got {type(classnames).__name__} {str(classnames)[:40]!r}")
        classnames = [c.replace("_", " ") for c in classnames]
        if len(set(c.lower() for c in classnames)) < len(classnames):
            dup = sorted({c for c in classnames if [d.lower() for d in classnames].count(c.lower()) > 1})
            raise ValueError(f"classnames give the same prompt twice ({', '.join(dup[:4])}): CLIP's tokenizer ignores "
                             f"case and underscores; rename the classes so that each prompt is distinct")
        if not classnames:
            raise ValueError("classnames is empty: give the names of the classes to score")
        self.classnames = classnames
        template = text_template(self.cfg)
        try:
            tokens = tokenize([template.format(c) for c in classnames], context_length=self.clip.context_length)
        except RuntimeError as e:  # a class name too long for CLIP's context
            raise ValueError(f"a class prompt does not fit CLIP's {self.clip.context_length} tokens "
                             f"({str(e).splitlines()[0][:120]}); shorten the class name") from None
        self.register_buffer("tokens", tokens.to(self.clip.token_embedding.weight.device), persistent=False)

    def train(self, mode: bool = True):
        """Trains prompts and refiners; the frozen CLIP stays in eval mode (its BatchNorms never update)."""
        super().train(mode)
        self.clip.eval()
        return self

    def trainable_state_dict(self) -> dict:
        """The learnable tensors only (prompts, projections, refiners; the image encoder if fine-tuned), detached, on the CPU."""
        return {k: v.detach().cpu() for k, v in self.state_dict().items() if self.is_trained(k)}

    def is_trained(self, key: str) -> bool:
        """Whether a state_dict key is learned by this method (and so saved in its checkpoints)."""
        return not key.startswith("clip.") or (self.cfg.finetune == "vision" and key.startswith("clip.visual."))

    # ------------------------------------------------------------------ prompts per layer

    def text_prompts(self) -> list:
        """Text prompts for layers 1..depth: a list of [text_ctx, d_text] (empty without text context)."""
        return [self.text_ctx, *self.text_deep] if self.cfg.text_ctx > 0 else []

    def vision_prompts(self) -> list:
        """Visual prompts for layers 1..depth: a list of [vision_ctx, d_vision] (empty without visual prompts)."""
        if self.cfg.vision_ctx == 0:
            return []
        if self.cfg.coupling == "maple":
            return [proj(p) for proj, p in zip(self.proj, self.text_prompts())]
        return [self.vision_ctx, *self.vision_deep]

    # ------------------------------------------------------------------ encoders

    def encode_text(self) -> torch.Tensor:
        """Text features for the current prompts: [n_classes, embed_dim], unit norm."""
        model, tokens, n = self.clip, self.tokens, self.cfg.text_ctx
        prompts, refiners = self.text_prompts(), getattr(self, "text_refiners", None)
        dtype = model.text_projection.dtype  # the blocks' dtype (fp16 for OpenAI's CUDA weights)
        h = model.token_embedding(tokens).to(dtype) + model.positional_embedding.to(dtype)  # [C, L, D]
        if prompts:
            pos = model.positional_embedding[1:1 + n].to(dtype)
            ctx = (prompts[0].to(dtype) + pos).expand(len(tokens), -1, -1)  # [C, n, D]
            h = torch.cat([h[:, :1],        # SOS        [C, 1, D]
                           ctx,             # context    [C, n, D]
                           h[:, 1 + n:]],   # class, EOT [C, L-1-n, D]
                          dim=1)
        h = h.transpose(0, 1)  # NLD -> LND
        for i, block in enumerate(model.transformer.resblocks):
            if 1 <= i < self.cfg.depth:
                if refiners is not None:  # the SOS token only: [D]'s commented text variant (see the module docstring)
                    h = torch.cat([refiners[i - 1](h[:1]), h[1:]])                          # SOS [1, C, D], rest
                if self.cfg.deep_text:
                    h = torch.cat([h[:1],                                                   # SOS     [1, C, D]
                                   prompts[i].to(h.dtype).unsqueeze(1).expand(-1, h.shape[1], -1),  # fresh   [n, C, D]
                                   h[1 + n:]])                                              # the rest
            h = block(h)
        h = model.ln_final(h.transpose(0, 1)).to(dtype)  # LND -> NLD
        eot = h[torch.arange(len(tokens)), tokens.argmax(dim=-1)]  # the EOT token has the largest id: [C, D]
        return F.normalize((eot @ model.text_projection).float(), dim=-1)

    def embed_patches(self, images: torch.Tensor) -> torch.Tensor:
        """Images [N, 3, R, R] in [0, 1] -> tokens [N, 1 + (R/patch)^2, width] before ln_pre, in float32.

        The normalisation and the patch embedding always run in float32, outside autocast: at eps
        1/255 the perturbation is about 1% of a token's size, and rounding x + delta to 16 bits
        before the patch embedding would distort it by several percent (bf16: ~14%).
        """
        visual = self.clip.visual
        with torch.autocast(images.device.type, enabled=False):
            x = (images.float() - self.mean) / self.std
            x = F.conv2d(x, visual.conv1.weight.float(), stride=visual.conv1.stride)  # [N, width, g, g]
            x = x.flatten(2).transpose(1, 2)  # [N, g*g, width]
            cls = visual.class_embedding.float().expand(len(x), 1, -1)  # [N, 1, width]
            return torch.cat([cls, x], dim=1) + visual.positional_embedding.float()

    def encode_image(self, images: torch.Tensor, return_layers: bool = False, vision_prompts: list = None):
        """Images [N, 3, R, R] in [0, 1] -> unit-norm features [N, embed_dim] (and the curriculum loss's block outputs).

        vision_prompts: the per-layer visual prompts if already computed (attacks reuse them across steps)."""
        features, layers = self.image_embedding(images, return_layers=True, vision_prompts=vision_prompts)
        features = F.normalize(features, dim=-1)
        return (features, layers) if return_layers else features

    def image_embedding(self, images: torch.Tensor, return_layers: bool = False, vision_prompts: list = None):
        """Images [N, 3, R, R] in [0, 1] -> image features [N, embed_dim], not normalised (and block outputs).

        The block outputs are those the curriculum loss compares [D]: blocks 1..depth-1 and the
        last block, each [N, L, width] with the prompt tokens.
        """
        check_images(images)
        visual = self.clip.visual
        if not is_vit(self.clip):  # ResNet: no tokens to prompt
            features = visual(((images - self.mean) / self.std).to(visual.conv1.weight.dtype)).float()
            return (features, []) if return_layers else features
        prompts = self.vision_prompts() if vision_prompts is None else vision_prompts
        refiners, n = getattr(self, "vision_refiners", None), self.cfg.vision_ctx
        h = self.embed_patches(images)  # [N, 1 + g*g, width], float32
        if prompts:
            h = torch.cat([h,                                              # CLS + patches [N, 1+g*g, D]
                           prompts[0].to(h.dtype).expand(len(h), -1, -1)],  # prompts       [N, n, D]
                          dim=1)
        h = visual.ln_pre(h)
        if not torch.is_autocast_enabled(h.device.type):  # without autocast the blocks need their weights' dtype
            h = h.to(visual.proj.dtype)
        h = h.transpose(0, 1)  # NLD -> LND
        layers, blocks = [], visual.transformer.resblocks
        for i, block in enumerate(blocks):
            if 1 <= i < self.cfg.depth:
                body = h[:len(h) - n]  # CLS + patches (the prompts are the last n tokens)
                if refiners is not None:
                    body = refiners[i - 1](body)
                if prompts:
                    body = torch.cat([body, prompts[i].to(h.dtype).unsqueeze(1).expand(-1, h.shape[1], -1)])
                h = body
            h = block(h)
            if return_layers and (i < self.cfg.depth - 1 or i == len(blocks) - 1):
                layers.append(h.transpose(0, 1))
        x = visual.ln_post(h[0])  # CLS: [N, width]
        features = (x.to(visual.proj.dtype) @ visual.proj).float()
        return (features, layers) if return_layers else features

    # ------------------------------------------------------------------ classifier

    def text_features(self) -> torch.Tensor:
        """Alias of encode_text, named for what callers cache: [n_classes, embed_dim]."""
        return self.encode_text()

    def logits(self, images: torch.Tensor, text_features: torch.Tensor, vision_prompts: list = None) -> torch.Tensor:
        """Images [N, 3, R, R] in [0, 1] and cached text features [C, E] -> logits [N, C]."""
        features = self.encode_image(images, vision_prompts=vision_prompts)
        return self.clip.logit_scale.exp().float() * features @ text_features.t()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images [N, 3, R, R] in [0, 1] -> logits [N, n_classes] (text features recomputed)."""
        return self.logits(images, self.text_features())

    @torch.no_grad()
    def logits_fn(self):
        """A callable images -> logits with the text features and visual prompts computed once, now, and frozen (for attacks)."""
        text_features = self.text_features().detach()
        prompts = [p.detach() for p in self.vision_prompts()]  # maple: one projection per layer, not one per step
        return lambda images: self.logits(images, text_features, prompts)


# ---------------------------------------------------------------------- parameter counts

def count_parameters(model: PromptedCLIP) -> dict:
    """Trained parameters by kind: {'prompts': n, 'refiners': n, 'encoder': n, 'total': n}."""
    counts = {"prompts": 0, "refiners": 0, "encoder": 0}
    for name, p in model.named_parameters():
        if model.is_trained(name):
            counts["encoder" if name.startswith("clip.") else "refiners" if "refiners" in name else "prompts"] += p.numel()
    counts["total"] = counts["prompts"] + counts["refiners"] + counts["encoder"]
    return counts


# ---------------------------------------------------------------------- checkpoints

def checkpoint_dict(model: PromptedCLIP, **extra) -> dict:
    """What a checkpoint holds: config, class names, backbone widths, trainable tensors, plus extra entries."""
    return {"config": asdict(model.cfg), "classnames": list(model.classnames), "widths": dict(model.widths),
            "trainable": model.trainable_state_dict(), **extra}


def atomic_save(obj, path: str):
    """torch.save to a temporary file beside path, then rename: a crash never leaves a half-written file.

    A failed write (a full disk) is raised as the OSError the file gave: torch.save reports it as a
    RuntimeError, which would hide it as a bug."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            writer = _KeepWriteError(f)
            try:
                torch.save(obj, writer)
            except RuntimeError:
                if writer.error is not None:
                    raise writer.error from None
                raise
        os.replace(tmp, path)
    except BaseException:  # a full disk or an interrupt: no half-written file is left behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class _KeepWriteError:
    """A binary file whose write errors are kept, so that atomic_save can raise them as they were."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()


def save_checkpoint(model: PromptedCLIP, path: str, **extra):
    """Writes the trainable tensors, config and class names (a few MB) atomically to path."""
    atomic_save(checkpoint_dict(model, **extra), path)


def load_checkpoint(path: str) -> dict:
    """Reads a checkpoint written by save_checkpoint (weights_only=True); clear errors for missing or corrupt files."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist; give the path of a checkpoint.pt written by train.py")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "weights_only" in str(e):
            raise ValueError(f"checkpoint {path} holds Python objects besides tensors; it is not a weights file this "
                             f"project can load safely (give a checkpoint.pt written by train.py)") from None
        raise ValueError(f"checkpoint {path} cannot be read ({type(e).__name__}); the file is corrupt or not a "
                         f"checkpoint written by train.py") from None
    if not isinstance(ckpt, dict) or not {"config", "classnames", "trainable"} <= set(ckpt):
        raise ValueError(f"{path} is not a NAP checkpoint: it lacks config / classnames / trainable entries")
    unknown = sorted(set(ckpt["config"]) - {f.name for f in fields(PromptConfig)})
    if unknown:
        raise ValueError(f"checkpoint {path} has config fields this version does not know ({', '.join(unknown)}); "
                         f"it was written by another version of nap.py: use that version, or update this one")
    return ckpt


def from_checkpoint(clip_model: nn.Module, ckpt: dict, classnames=None, transfer: bool = False,
                    template: str = None) -> PromptedCLIP:
    """Rebuilds the prompted model on clip_model from a checkpoint dict.

    By default it scores the classes it was trained on; other class names need transfer=True, the
    explicit zero-shot transfer path (prompts and refiners are class-agnostic). template replaces
    the class prompt of methods without learned text (zeroshot, tecoa, fare).
    """
    cfg = PromptConfig(**{**ckpt["config"], **({"template": template} if template else {})})
    if classnames is not None and [str(c).replace("_", " ") for c in classnames] != list(ckpt["classnames"]) and not transfer:
        raise ValueError(f"the checkpoint was trained on {len(ckpt['classnames'])} other classes "
                         f"({', '.join(ckpt['classnames'][:3])}, ...); pass transfer=True to score new classes zero-shot")
    width = clip_model.ln_final.weight.shape[0]
    if ckpt.get("widths", {}).get("text") not in (None, width):
        raise ValueError(f"the checkpoint was trained on a CLIP with text width {ckpt['widths']['text']}, this "
                         f"backbone has {width}: load the backbone it was trained on (its arch: {ckpt.get('arch', '?')})")
    model = PromptedCLIP(clip_model, ckpt["classnames"] if classnames is None else classnames, cfg)
    model_keys = set(model.trainable_state_dict())
    if model_keys != set(ckpt["trainable"]):
        raise ValueError(f"checkpoint tensors do not fit method {cfg.method!r} on this backbone: missing "
                         f"{sorted(model_keys - set(ckpt['trainable']))[:5]}, unexpected {sorted(set(ckpt['trainable']) - model_keys)[:5]}")
    try:
        model.load_state_dict(ckpt["trainable"], strict=False)
    except RuntimeError as e:
        raise ValueError(f"checkpoint tensors do not fit this backbone (was it trained on {ckpt.get('arch', '?')}?): "
                         f"{str(e).splitlines()[-1].strip()}") from None
    return model
