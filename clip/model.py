"""The CLIP architecture: ViT and ModifiedResNet image encoders, the causal text transformer.

Parameter names and shapes are those of OpenAI's release, so their state_dicts load strictly.
Attention runs through torch's scaled_dot_product_attention (fused kernels where available) but
keeps nn.MultiheadAttention's parameter names (in_proj_weight, in_proj_bias, out_proj).
Transformers take sequences as [L, N, D], as OpenAI's do, and expose their blocks as
`transformer.resblocks`, so that code outside (nap.py) can run them one at a time.
`encode_image` takes *normalised* images, as OpenAI's does.
"""
from collections import OrderedDict

import math
import torch
import torch.nn.functional as F
from torch import nn


class Bottleneck(nn.Module):
    """ResNet bottleneck; a stride > 1 is an average pool after the 3x3 conv (anti-aliased)."""
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, bias=False)),
                ("1", nn.BatchNorm2d(planes * self.expansion)),
            ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu3(out + identity)


class AttentionPool2d(nn.Module):
    """Pools a feature map [N, C, H, W] -> [N, output_dim] with one query: the mean token."""

    def __init__(self, spacial_dim: int, embed_dim: int, num_heads: int, output_dim: int = None):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spacial_dim ** 2 + 1, embed_dim) / embed_dim ** 0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim or embed_dim)
        self.num_heads = num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).transpose(1, 2)  # [N, HW, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
        x = x + self.positional_embedding.to(x.dtype)
        n, length, c = x.shape
        heads = lambda t: t.view(n, t.shape[1], self.num_heads, c // self.num_heads).transpose(1, 2)
        q, k, v = heads(self.q_proj(x[:, :1])), heads(self.k_proj(x)), heads(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v)  # [N, heads, 1, C/heads]
        return self.c_proj(out.transpose(1, 2).reshape(n, c))


class ModifiedResNet(nn.Module):
    """CLIP's ResNet: 3-conv stem with average pool, anti-aliased strides, attention pooling."""

    def __init__(self, layers, output_dim: int, heads: int, input_resolution: int = 224, width: int = 64):
        super().__init__()
        self.output_dim = output_dim
        self.input_resolution = input_resolution
        self.conv1 = nn.Conv2d(3, width // 2, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, kernel_size=3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)
        self._inplanes = width
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        self.attnpool = AttentionPool2d(input_resolution // 32, width * 32, heads, output_dim)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 3, R, R] normalised images -> [N, output_dim]."""
        x = x.type(self.conv1.weight.dtype)
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.avgpool(self.relu3(self.bn3(self.conv3(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.attnpool(x)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype, returned in the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention on [L, N, D] with nn.MultiheadAttention's parameter names."""

    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.num_heads = n_head
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor = None, is_causal: bool = False) -> torch.Tensor:
        length, n, d = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(length, n, 3, self.num_heads, d // self.num_heads).permute(2, 1, 3, 0, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.out_proj(out.permute(2, 0, 1, 3).reshape(length, n, d))


def causal_mask(length: int) -> torch.Tensor:
    """Additive causal mask [L, L]: 0 on and below the diagonal, -inf above."""
    return torch.full((length, length), float("-inf")).triu_(1)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)); [L, N, D] -> [L, N, D]."""

    def __init__(self, d_model: int, n_head: int, attn_mask: torch.Tensor = None):
        super().__init__()
        self.attn = Attention(d_model, n_head)
        self.ln_1 = LayerNorm(d_model)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(d_model, d_model * 4)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(d_model * 4, d_model)),
        ]))
        self.ln_2 = LayerNorm(d_model)
        self.attn_mask = attn_mask  # a plain attribute, not a buffer: not part of the state_dict
        # The standard causal mask runs as is_causal=True, which lets torch pick a fused kernel.
        self.is_causal = attn_mask is not None and torch.equal(attn_mask, causal_mask(attn_mask.shape[0]))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        if self.attn_mask is None or self.is_causal:
            return self.attn(x, is_causal=self.is_causal)
        return self.attn(x, attn_mask=self.attn_mask.to(dtype=x.dtype, device=x.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of residual attention blocks on [L, N, D]."""

    def __init__(self, width: int, layers: int, heads: int, attn_mask: torch.Tensor = None):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, attn_mask) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class VisionTransformer(nn.Module):
    """ViT image encoder: patches + CLS + positions -> ln_pre -> blocks -> ln_post(CLS) @ proj."""

    def __init__(self, input_resolution: int, patch_size: int, width: int, layers: int, heads: int, output_dim: int):
        super().__init__()
        self.input_resolution = input_resolution
        self.output_dim = output_dim
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((input_resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 3, R, R] normalised images -> tokens [N, 1 + (R/patch)^2, width] (CLS first, before ln_pre)."""
        x = self.conv1(x.type(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Token features [N, L, width] after the blocks -> image features [N, output_dim] from CLS."""
        return self.ln_post(x[:, 0, :]) @ self.proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 3, R, R] normalised images -> [N, output_dim]."""
        x = self.ln_pre(self.embed(x))
        x = self.transformer(x.transpose(0, 1)).transpose(0, 1)
        return self.head(x)


class CLIP(nn.Module):
    """OpenAI's CLIP: an image encoder, a causal text transformer and a learned temperature."""

    def __init__(self, embed_dim: int, image_resolution: int, vision_layers, vision_width: int,
                 vision_patch_size: int, context_length: int, vocab_size: int, transformer_width: int,
                 transformer_heads: int, transformer_layers: int):
        super().__init__()
        self.context_length = context_length
        if isinstance(vision_layers, (tuple, list)):
            self.visual = ModifiedResNet(vision_layers, embed_dim, vision_width * 32 // 64, image_resolution, vision_width)
        else:
            self.visual = VisionTransformer(image_resolution, vision_patch_size, vision_width, vision_layers,
                                            vision_width // 64, embed_dim)
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads,
                                       attn_mask=self.build_attention_mask())
        self.vocab_size = vocab_size
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
        self.initialize_parameters()

    def initialize_parameters(self):
        """CLIP's initialisation (matters only for training from scratch, e.g. the toy CLIP)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if isinstance(self.visual, ModifiedResNet):
            pool = self.visual.attnpool
            for lin in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
                nn.init.normal_(lin.weight, std=pool.c_proj.in_features ** -0.5)
            for name, p in self.visual.named_parameters():
                if name.startswith("layer") and name.endswith("bn3.weight"):
                    nn.init.zeros_(p)
        width, layers = self.transformer.width, self.transformer.layers
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width ** -0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=width ** -0.5 * (2 * layers) ** -0.5)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=width ** -0.5 * (2 * layers) ** -0.5)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    def build_attention_mask(self) -> torch.Tensor:
        return causal_mask(self.context_length)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """[N, 3, R, R] normalised images -> image features [N, embed_dim] (not unit norm)."""
        return self.visual(image.type(self.dtype))

    def embed_text(self, text: torch.Tensor) -> torch.Tensor:
        """Token ids [N, context_length] -> token embeddings + positions [N, context_length, width]."""
        return self.token_embedding(text).type(self.dtype) + self.positional_embedding.type(self.dtype)

    def text_head(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Token features [N, L, width] after the blocks -> text features [N, embed_dim] at the EOT token."""
        x = self.ln_final(x).type(self.dtype)
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """Token ids [N, context_length] -> text features [N, embed_dim] (not unit norm)."""
        x = self.transformer(self.embed_text(text).transpose(0, 1)).transpose(0, 1)
        return self.text_head(x, text)

    def forward(self, image: torch.Tensor, text: torch.Tensor):
        """Images [N, 3, R, R] and tokens [M, context_length] -> (logits_per_image [N, M], logits_per_text [M, N])."""
        image_features = F.normalize(self.encode_image(image), dim=-1)
        text_features = F.normalize(self.encode_text(text), dim=-1)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()


def convert_weights(model: nn.Module, dtype: torch.dtype = torch.float16):
    """Casts conv, linear and attention weights and the projections to dtype, as OpenAI's release does.

    LayerNorms, embeddings and logit_scale stay float32; the forward casts as it goes.
    """
    def cast(module):
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            module.weight.data = module.weight.data.to(dtype)
            if module.bias is not None:
                module.bias.data = module.bias.data.to(dtype)
        if isinstance(module, Attention):
            module.in_proj_weight.data = module.in_proj_weight.data.to(dtype)
            module.in_proj_bias.data = module.in_proj_bias.data.to(dtype)
        for name in ("text_projection", "proj"):
            p = getattr(module, name, None)
            if isinstance(p, nn.Parameter):
                p.data = p.data.to(dtype)
    model.apply(cast)


def config_from_state_dict(state_dict: dict) -> dict:
    """Infers CLIP's constructor arguments from an OpenAI-layout state_dict."""
    sd = state_dict
    if "visual.proj" in sd:
        vision_width, _, vision_patch_size, _ = sd["visual.conv1.weight"].shape
        vision_layers = len([k for k in sd if k.startswith("visual.") and k.endswith(".attn.in_proj_weight")])
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        image_resolution = vision_patch_size * grid
    else:
        vision_layers = tuple(len({k.split(".")[2] for k in sd if k.startswith(f"visual.layer{b}.")}) for b in (1, 2, 3, 4))
        vision_width = sd["visual.layer1.0.conv1.weight"].shape[0]
        vision_patch_size = None
        image_resolution = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5) * 32
    transformer_width = sd["ln_final.weight"].shape[0]
    return dict(
        embed_dim=sd["text_projection"].shape[1], image_resolution=image_resolution,
        vision_layers=vision_layers, vision_width=vision_width, vision_patch_size=vision_patch_size,
        context_length=sd["positional_embedding"].shape[0], vocab_size=sd["token_embedding.weight"].shape[0],
        transformer_width=transformer_width, transformer_heads=transformer_width // 64,
        transformer_layers=len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")}))


def build_model(state_dict: dict, dtype: torch.dtype = torch.float16) -> CLIP:
    """Builds CLIP from an OpenAI-layout state_dict, loads it strictly; weights in dtype (OpenAI: fp16), eval mode."""
    state_dict = {k: v for k, v in state_dict.items() if k not in ("input_resolution", "context_length", "vocab_size")}
    try:
        model = CLIP(**config_from_state_dict(state_dict))
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"this state_dict fits no CLIP model: cannot read its configuration ({e!r}); "
                         f"expected OpenAI's key layout (visual.*, transformer.resblocks.*, token_embedding.weight, ...)") from None
    convert_weights(model, dtype)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state_dict) if expected[k].shape != state_dict[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(f"this state_dict fits no CLIP model: missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                         f"unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}, "
                         f"shape mismatches {wrong[:8]}")
    model.load_state_dict(state_dict, strict=True)
    return model.eval()
