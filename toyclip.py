"""The toy CLIP (`--arch toy`): a tiny CLIP from this project's `clip` package, pretrained offline.

OpenAI's weights cannot be fetched everywhere, so `load()` builds a small ViT CLIP on first use:
it is trained contrastively on the procedural image-caption pairs of synthetic.CaptionDataset
(a few minutes on two CPU cores), saved as a plain state_dict `toy-<hash of config>.pt` in the
same cache folder as OpenAI's weights, and from then on loaded from there like any CLIP file.
The model is the same `clip.model.CLIP` (OpenAI's state_dict layout, real tokenizer, context
length 77), only narrow and shallow. `python toyclip.py` builds it and prints its zero-shot
accuracy on every synthetic task.
"""
import dataclasses
import hashlib
import json
import math
import os
import time

import cmdline


def parse_args(argv=None):
    p = cmdline.Parser(description="Build (or load) the toy CLIP and print its zero-shot accuracy.")
    p.add_argument("--download-root", default=None, help="cache folder (default $CLIP_CACHE or ~/.cache/clip)")
    p.add_argument("--rebuild", action="store_true", help="pretrain again even if a cached file exists")
    p.add_argument("--device", default="cpu", type=cmdline.device_arg, help="cpu, cuda or cuda:N")
    args = p.parse_args(argv)
    if args.download_root:
        cmdline.check_writable(args.download_root, folder=True, flag="--download-root")
    return args


if __name__ == "__main__":  # a bad flag or cache folder is refused here, before torch loads (which takes seconds)
    cmdline.run_cli(parse_args)

import numpy as np  # noqa: E402  (the heavy imports follow the checks above)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

import clip  # noqa: E402
import synthetic  # noqa: E402


@dataclasses.dataclass
class ToyConfig:
    """Architecture and pretraining recipe of the toy CLIP; its hash names the cached file."""
    embed_dim: int = 128
    image_resolution: int = 64
    vision_patch_size: int = 16
    vision_width: int = 128      # heads = width // 64
    vision_layers: int = 4
    text_width: int = 128        # heads = width // 64, as clip.build_model infers them
    text_layers: int = 4
    steps: int = 1500
    batch_size: int = 128
    lr: float = 2.5e-4           # higher rates stretch the ViT's early plateau (no localisation)
    warmup: int = 30
    weight_decay: float = 0.1
    text_window: int = 24        # pretraining captions are at most this many tokens
    seed: int = 0

    def name(self) -> str:
        """File name of the cached state_dict: toy-<first 12 hex digits of the config's hash>.pt."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return f"toy-{hashlib.sha256(blob).hexdigest()[:12]}.pt"


def build_untrained(cfg: ToyConfig) -> clip.model.CLIP:
    """A freshly initialised toy CLIP (float32, context length 77, OpenAI's vocabulary)."""
    return clip.model.CLIP(cfg.embed_dim, cfg.image_resolution, cfg.vision_layers, cfg.vision_width,
                           cfg.vision_patch_size, 77, 49408, cfg.text_width, cfg.text_width // 64,
                           cfg.text_layers)


def encode_text_window(model, tokens):
    """Token ids [N, W] (W <= 77, EOT inside) -> text features [N, embed_dim].

    The text transformer is causal, so the features at EOT equal those of encode_text on the
    same ids zero-padded to 77; pretraining runs only the first W positions to save time.
    """
    x = model.token_embedding(tokens) + model.positional_embedding[:tokens.shape[1]]
    x = model.transformer(x.transpose(0, 1)).transpose(0, 1)
    return model.text_head(x, tokens)


def caption_batch(data, start, count, text_window):
    """Items start..start+count of a CaptionDataset -> (normalised images [N,3,R,R], tokens [N,W])."""
    arrays, texts = zip(*(data.array(i) for i in range(start, start + count)))
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255)
    tokens = clip.tokenize(list(texts), context_length=text_window)
    return normalise(images), tokens


def normalise(images):
    """Images [N, 3, R, R] in [0, 1] -> CLIP's input, normalised with its mean and std (the bare model does not)."""
    mean, std = torch.tensor(clip.MEAN).view(3, 1, 1), torch.tensor(clip.STD).view(3, 1, 1)
    return (images - mean.to(images.device)) / std.to(images.device)


def contrastive_loss(model, images, tokens):
    """Symmetric InfoNCE of CLIP over a batch of matching (image, caption) pairs -> scalar."""
    img = F.normalize(model.encode_image(images), dim=-1)
    txt = F.normalize(encode_text_window(model, tokens), dim=-1)
    logits = model.logit_scale.exp() * img @ txt.t()
    target = torch.arange(len(images))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def pretrain(cfg: ToyConfig, progress: bool = True):
    """Trains a toy CLIP from scratch on the CPU -> (model, list of per-step losses)."""
    torch.manual_seed(cfg.seed)
    model = build_untrained(cfg).train()
    data = synthetic.CaptionDataset(cfg.steps * cfg.batch_size, cfg.image_resolution, cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=cfg.weight_decay)
    schedule = lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * s / cfg.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    losses = []
    bar = tqdm(range(cfg.steps), desc=f"pretraining toy CLIP {cfg.name()}", disable=not progress)
    for step in bar:
        images, tokens = caption_batch(data, step * cfg.batch_size, cfg.batch_size, cfg.text_window)
        loss = contrastive_loss(model, images, tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval(), losses


def load(device="cpu", download_root=None, rebuild=False, config: ToyConfig = None, dtype=None):
    """-> (toy CLIP in eval mode, preprocess), like clip.load; pretrains and caches it on first use."""
    cfg = config or ToyConfig()
    path = os.path.join(clip.cache_dir(download_root), cfg.name())
    if rebuild or not os.path.isfile(path):
        model, _ = pretrain(cfg)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, path)
    return clip.load(path, device=device, dtype=dtype)


@torch.no_grad()
def zeroshot_accuracy(model, preprocess, task, split="test", template="a photo of a {}.",
                      size=None, batch_size=500):
    """Top-1 zero-shot accuracy (in [0,1]) of `model` on a synthetic task with one prompt per class.

    preprocess: load()'s, PIL image -> [3, R, R] in [0, 1]; the images are normalised here for the bare CLIP."""
    data = synthetic.SyntheticDataset(task, split, size=size)
    device = model.logit_scale.device
    tokens = clip.tokenize([template.format(c) for c in data.classnames]).to(device)
    text = F.normalize(model.encode_text(tokens), dim=-1)
    correct = 0
    for start in range(0, len(data), batch_size):
        items = [data[i] for i in range(start, min(start + batch_size, len(data)))]
        images = normalise(torch.stack([preprocess(im) for im, _ in items]).to(device))
        pred = (F.normalize(model.encode_image(images), dim=-1) @ text.t()).argmax(-1)
        correct += (pred.cpu() == torch.tensor([y for _, y in items])).sum().item()
    return correct / len(data)


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    model, preprocess = load(args.device, args.download_root, args.rebuild)
    print(f"toy CLIP ready in {time.time() - t0:.0f} s")
    for task, classes in synthetic.TASKS.items():
        acc = zeroshot_accuracy(model, preprocess, task)
        print(f"{task:20s} zero-shot {100 * acc:5.1f}%  (chance {100 / len(classes):4.1f}%, {len(classes)} classes)")


if __name__ == "__main__":
    cmdline.run_cli(main)
