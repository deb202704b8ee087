"""FLOPs of the attack step and the text encoder, analytic (image_flops, text_flops) and counted by
torch.utils.flop_counter; the MFU of a measured rate; the projected wall time of the paper's PGD-100 protocol."""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bench_common import duration

# The paper's PGD-100 protocol: test images and classes of ImageNet and the 9 transfer datasets (CoOp splits)
PROTOCOL = {"imagenet": (50000, 1000), "caltech101": (2465, 100), "dtd": (1692, 47), "eurosat": (8100, 10),
            "oxford_pets": (3669, 37), "fgvc_aircraft": (3333, 100), "food101": (30300, 101),
            "stanford_cars": (8041, 196), "sun397": (19850, 397), "ucf101": (3783, 101)}


# ---------------------------------------------------------------------- analytic and counted

def image_flops(model, batch=1):
    """Matmul FLOPs (2 per multiply-add) of one attack step of model.logits on `batch` images with cached
    text features: (forward, backward to the input). Counted: the patch-embedding conv, per block the
    qkv / output / MLP projections and the two attention products over all tokens (CLS, patches,
    prompts), the refiners on the non-prompt tokens, the head and the logits. Not counted: norms,
    softmax, activations, additions (<1%), and the text-to-visual prompt projections, which
    logits_fn() computes once for all steps. Backward: no weight gradients are needed, so each
    projection costs its forward once more (the gradient of its input); the attention products
    twice (gradients of both operands)."""
    visual, cfg = model.clip.visual, model.cfg
    d, patch = visual.conv1.out_channels, visual.conv1.kernel_size[0]
    patches, layers, embed = visual.positional_embedding.shape[0] - 1, visual.transformer.layers, visual.proj.shape[1]
    tokens = patches + 1 + cfg.vision_ctx
    linear = patches * 3 * patch ** 2 * d + layers * tokens * 12 * d * d + d * embed + embed * len(model.classnames)
    if cfg.refine in ("vision", "both"):
        hidden = int(round(cfg.refiner_hidden * d))
        linear += (cfg.depth - 1) * (tokens - cfg.vision_ctx) * 2 * d * hidden
    attention = layers * 2 * tokens * tokens * d
    return 2 * batch * (linear + attention), 2 * batch * (linear + 2 * attention)


def text_flops(model):
    """Matmul FLOPs of one text-encoder forward over all the model's classes (attention counted dense,
    as the peers' kernels compute it; a causal kernel may skip up to half of those products)."""
    text, cfg = model.clip.transformer, model.cfg
    d, length, embed = text.width, model.clip.context_length, model.clip.text_projection.shape[1]
    per_class = text.layers * (length * 12 * d * d + 2 * length * length * d) + d * embed
    if cfg.refine in ("text", "both"):
        per_class += (cfg.depth - 1) * (length - cfg.text_ctx) * 2 * d * int(round(cfg.refiner_hidden * d))
    return 2 * len(model.classnames) * per_class


def counted_flops(fn):
    """FLOPs torch.utils.flop_counter counts while fn() runs, attention in its plain (math) form so that
    every product is seen: an int."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def attack_step_counted(model, batch, device):
    """(forward, backward) FLOPs counted for one attack step of model.logits_fn() on `batch` random images."""
    fn = model.logits_fn()
    x = torch.rand(batch, 3, model.clip.visual.input_resolution, model.clip.visual.input_resolution, device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    with torch.no_grad():
        forward = counted_flops(lambda: fn(x))
    x.requires_grad_(True)
    total = counted_flops(lambda: torch.autograd.grad(F.cross_entropy(fn(x), y), x))
    return forward, total - forward


# ---------------------------------------------------------------------- the protocol's wall time

def protocol_seconds(image_steps_per_s, text_s_per_class, step_flops, forward_flops, steps=100, work=1.0):
    """Projected seconds of PGD-`steps` on PROTOCOL: sum_d N_d (work * steps + 4 f) / R + sum_d C_d t_c, where
    R = image-steps per second, f = forward / (forward + backward) FLOPs (4 forward-only passes per image:
    the clean prediction, PGD's first and last, the robust count), t_c = text-encoder seconds per class."""
    per_image = work * steps + 4 * forward_flops / step_flops
    return sum(n * per_image / image_steps_per_s + c * text_s_per_class for n, c in PROTOCOL.values())


def report_flops(model, counted, eval_row, peak_tflops):
    """The analytic FLOPs with the counted check, MFU of ours-full, and the projected PGD-100 protocol."""
    forward, backward = image_flops(model, batch=1)
    step = forward + backward
    print(f"\nFLOPs of one attack step per image ({len(model.classnames)} classes, {model.cfg.vision_ctx} visual "
          f"prompts, depth {model.cfg.depth}): analytic, and counted by FlopCounterMode (math attention) at batch "
          f"{counted['batch']}.\n")
    print("| | forward GFLOP | backward-to-input GFLOP | total GFLOP |")
    print("|---|---:|---:|---:|")
    print(f"| analytic | {forward / 1e9:.4f} | {backward / 1e9:.4f} | {step / 1e9:.4f} |")
    fwd_c, bwd_c, b = counted["forward"], counted["backward"], counted["batch"]
    fwd_a, bwd_a = image_flops(model, batch=b)
    print(f"| counted / analytic at batch {b} | {fwd_c / fwd_a:.4f} | {bwd_c / bwd_a:.4f} | "
          f"{(fwd_c + bwd_c) / (fwd_a + bwd_a):.4f} |")
    if eval_row is None:
        return
    rate = eval_row["batch"] * eval_row["steps"] / eval_row["full_s"]  # image-steps per second, ours-full
    achieved = rate * step
    mfu = f", MFU {100 * achieved / (peak_tflops * 1e12):.1f}% of {peak_tflops:g} TFLOP/s" if peak_tflops else ""
    print(f"\nAttack step (ours-full, {eval_row['classes']} classes, batch {eval_row['batch']}): {rate:,.2f} "
          f"image-steps/s x {step / 1e9:.2f} GFLOP = {achieved / 1e12:.4f} TFLOP/s{mfu}.")
    text_per_class = eval_row["text_s"] / eval_row["classes"]
    upper = protocol_seconds(rate, text_per_class, step, forward)
    at_work = protocol_seconds(rate, text_per_class, step, forward, work=eval_row["work"])
    images = sum(n for n, _ in PROTOCOL.values())
    print(f"Paper's PGD-100 protocol ({images:,} test images, 10 datasets) at this rate: at most "
          f"{duration(upper)} (every image all 100 steps); {duration(at_work)} at the work fraction "
          f"measured here ({eval_row['work']:.2f}, random weights).")
