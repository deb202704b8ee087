"""Adversarial attacks on image classifiers, each attack(model, x, y, eps, ...) -> x_adv: fgsm
(Goodfellow et al. 2015), pgd (Madry et al. 2018), cw (PGD on Carlini & Wagner 2017's margin, as
APT), tpgd (TRADES' KL, Zhang et al. 2019), transfer (I-FGSM, Kurakin et al. 2017, from a surrogate,
with Xie et al. 2019's diverse_inputs), apgd, apgd_targeted, fab_targeted and autoattack (Croce &
Hein 2020), square (Andriushchenko et al. 2020).

`model` maps images in [0,1] (B, ...) to logits (B, C), in eval mode. x_adv has x's shape, dtype
and device, in [0,1] and the eps ball around x (L-inf unless norm="l2"). Attacks are batched and
privately seeded, and drop a point once the model misclassifies it (except pgd(...,
early_stop=False), training's fixed-step version, also on a loss=... of its own, and transfer,
which hands every point its crafted image). The loss is taken on
a float64 copy of the logits and its gradient, rescaled per point, flows back, so steps do not
depend on the model's precision (fp16, bf16: _loss_grad); the parameters never get a .grad. Bad
arguments (images not floats in [0,1], eps or alpha beyond the pixel range, negative counts, labels
that are not classes) are refused with a one-line ValueError. shared/ATTACKS.md restates the
algorithms; fra31/auto-attack is the reference implementation.
"""
import math
import numbers
from functools import partial

import torch
import torch.nn.functional as F

from cmdline import parse_eps  # noqa: F401  (attacks.parse_eps: a radius as the CLIs read it, "4/255" -> 4/255)


# ----------------------------------------------------------------------------- shared helpers

def _prepare(x, y, eps, norm="linf"):
    """Validate the arguments; return a detached working copy of x (>= float32) and y."""
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    if not torch.is_tensor(x):
        raise ValueError(f"images must be a float tensor in [0, 1] (got {type(x).__name__})")
    if not x.is_floating_point():
        raise ValueError(f"images must be floats in [0, 1] (got {str(x.dtype)[6:]}); "
                         "divide by 255")
    if not torch.is_tensor(y) or y.shape != x.shape[:1]:
        raise ValueError(f"y must be a tensor of {len(x)} class indices (one per image), "
                         f"got shape {tuple(getattr(y, 'shape', ()))}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"y must be integer class indices, got {str(y.dtype)[6:]}")
    _check_radius("eps", eps, norm, x)
    if x.numel():
        lo, hi = torch.stack(torch.aminmax(x.detach())).tolist()  # one sync
        if math.isnan(lo) or math.isnan(hi):
            raise ValueError("images must be floats in [0, 1] (got NaN); check how they were made")
        if lo < 0:
            raise ValueError(f"images must be floats in [0, 1] (got min {round(lo, 4)}); "
                             "normalise inside the model, not before the attack")
        if hi > 1:
            fix = "divide by 255" if hi > 2 else "clamp them to [0, 1]"
            raise ValueError(f"images must be floats in [0, 1] (got max {round(hi, 4)}); {fix}")
    return x.detach().to(torch.promote_types(x.dtype, torch.float32)), y.to(x.device).long()


def _check_radius(name, value, norm, x):
    """Refuse an eps or alpha that is not a number in [0, 1] (L2: up to the box's diagonal)."""
    number = (isinstance(value, numbers.Real) and not isinstance(value, bool)
              or torch.is_tensor(value) and value.numel() == 1 and value.is_floating_point())
    if not number or not math.isfinite(value):
        raise ValueError(f"{name} must be a number in pixel units such as {8 / 255:.5f} (8/255), "
                         f"got {value!r}")
    value = float(value)
    if value < 0:
        raise ValueError(f"{name}={value:g} must be >= 0 (a radius in pixel units, e.g. 8/255)")
    if norm == "linf" and value > 1:
        raise ValueError(f"{name}={value:g} is larger than the whole [0,1] pixel range; "
                         f"did you mean {value:g}/255?")
    size = x.shape[1:].numel()  # values per image
    if norm == "l2" and value > math.sqrt(size):
        raise ValueError(f"{name}={value:g} is larger than the L2 diameter of the [0,1] box "
                         f"({math.sqrt(size):.3g} for images of {size} values)")


def _check_count(name, value, minimum):
    """Refuse a step, query, restart, target or EOT count that is not an integer >= minimum."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_number(name, value, hint):
    """Refuse a momentum or kappa that is not a finite real number >= 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < math.inf:
        raise ValueError(f"{name} must be a number >= 0{hint}, got {value!r}")


def _generator(seed, device):
    """A private torch.Generator seeded with `seed`, or None (torch's global RNG) for seed=None."""
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


def _bc(v, x):
    """View per-point values (B,) so they broadcast against x (B, ...)."""
    return v.view(-1, *([1] * (x.dim() - 1)))


def _norm(d, norm):
    """Per-point L-inf or L2 norm: (B, ...) -> (B,)."""
    d = d.flatten(1)
    return d.abs().amax(1) if norm == "linf" else d.norm(dim=1)


def _project(x_adv, x, eps, norm):
    """Project x_adv onto the eps ball around x intersected with the box [0,1]."""
    d = x_adv - x
    if norm == "linf":
        d = d.clamp(-eps, eps)
    else:
        d = d * _bc((eps / _norm(d, "l2").clamp_min(1e-12)).clamp(max=1), d)
    return (x + d).clamp(0, 1)


def _direction(g, norm):
    """Steepest-ascent direction of unit norm for gradient g: sign(g) or g / ||g||_2."""
    return g.sign() if norm == "linf" else g / _bc(_norm(g, "l2").clamp_min(1e-12), g)


def _random_start(x, eps, norm, gen, sphere):
    """Random point of the eps ball around x, clipped to [0,1]: uniform in the L-inf cube, or on
    the sphere if sphere or norm="l2"."""
    if norm == "linf":
        d = 2 * torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype) - 1
    else:
        d = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    if sphere or norm == "l2":
        d = d / _bc(_norm(d, norm).clamp_min(1e-12), d)
    return (x + eps * d).clamp(0, 1)


def _logits(model, x):
    """The model's logits (B, C) without building a graph."""
    with torch.no_grad():
        return model(x)


def _check_labels(y, z):
    """Refuse labels (B,) that are not classes of logits z (B, C) (else: wrongly "fooled")."""
    bad = (y < 0) | (y >= z.shape[1])
    if bad.any():  # one sync, once per attack
        raise ValueError(f"label {int(y[bad][0])} is not a class of the model, which gives "
                         f"{z.shape[1]} logits (classes 0 to {z.shape[1] - 1}); check the labels "
                         "against the class names")


def _clean_logits(model, x, y):
    """The model's logits (B, C) on the clean images, without a graph, its labels y checked."""
    z = _logits(model, x)
    _check_labels(y, z)
    return z


def _input_grad(loss, x):
    """Gradient of loss.sum() w.r.t. x only; zeros where the loss ignores x (constant logits)."""
    if not loss.requires_grad:
        return torch.zeros_like(x)
    (g,) = torch.autograd.grad(loss.sum(), x, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


def _loss_grad(model, x, y, loss_fn, t=None, eot=1, labels=False):
    """Loss (B,), its gradient w.r.t. x times a positive factor per point (B, ...) and the logits
    (B, C), each averaged over `eot` forward passes; labels=True checks y against the logits."""
    x = x.detach().requires_grad_(True)
    loss, logits, grads, scales = 0, 0, [], []
    for _ in range(eot):
        with torch.enable_grad():  # also when the caller runs under torch.no_grad()
            z = model(x)
            if labels:
                _check_labels(y, z)
            # g_z = dloss/dz on a float64 copy of z; g_z / p (p: the largest power of 2 <= the
            # point's max|g_z|) flows back, or a confident point's softmax gradient (e^-margin)
            # underflows to 0 in fp16. Sign and L2 steps ignore the factor, exact as a power of 2
            # (FAB's has p = 1).
            wide = torch.float32 if z.device.type == "mps" else torch.float64  # mps has no float64
            if loss_fn not in _WIDE:  # pgd(loss=...): closures
                wide = x.dtype  # may hold float32 tensors: x's precision (>= float32), as always
            zw = z.detach().to(wide).requires_grad_(True)
            l = loss_fn(zw, y, t)
            g_z = _input_grad(l, zw)
            p = torch.exp2(torch.floor(torch.log2(g_z.flatten(1).abs().amax(1))))  # 0 where g_z = 0
            g = None
            if z.requires_grad:
                g_out = (g_z / _bc(torch.where(p > 0, p, 1), g_z)).to(z.dtype)
                (g,) = torch.autograd.grad(z, x, g_out, allow_unused=True)
            grads.append(torch.zeros_like(x) if g is None else g)
            scales.append(p)
        loss, logits = loss + l.detach().to(x.dtype), logits + z.detach().to(x.dtype)
    # EOT averages true gradients: pass k weighs p_k / max_k p_k
    top = torch.stack(scales).amax(0)
    weights = [torch.where(top > 0, p / top, 0).to(x.dtype) for p in scales]
    grad = sum(g * _bc(w, g) for g, w in zip(grads, weights))
    return loss / eot, grad / eot, logits / eot


# ----------------------------------------------------------------------------- losses (z, y, t)

def _at(z, y):
    """z_y per point: (B, C), (B,) -> (B,)."""
    return z.gather(1, y[:, None])[:, 0]


def _margin(z, y):
    """z_y - max_{i!=y} z_i: positive while the model is right."""
    return _at(z, y) - z.scatter(1, y[:, None], float("-inf")).amax(1)


def _ce(z, y, t=None):
    return F.cross_entropy(z, y, reduction="none")


def _dlr(z, y, t=None):
    """Difference of logits ratio: -(z_y - max_{i!=y} z_i) / (z_pi1 - z_pi3)."""
    if z.shape[1] < 3:
        raise ValueError(f"the DLR loss needs at least 3 classes, the model gives {z.shape[1]}")
    zs = z.sort(1, descending=True).values
    return -_margin(z, y) / (zs[:, 0] - zs[:, 2] + 1e-12)


def _dlr_targeted(z, y, t):
    """Targeted DLR: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)."""
    if z.shape[1] < 4:
        raise ValueError(f"targeted DLR needs at least 4 classes, the model gives {z.shape[1]}")
    zs = z.sort(1, descending=True).values
    return -(_at(z, y) - _at(z, t)) / (zs[:, 0] - (zs[:, 2] + zs[:, 3]) / 2 + 1e-12)


def _target_margin(z, y, t):
    return _at(z, t) - _at(z, y)


def _cw(z, y, kappa):
    """Carlini-Wagner margin clamped as APT's CWLoss: -max(z_y - max_{i!=y} z_i + kappa (B,), 0)."""
    return -(_margin(z, y) + kappa).clamp_min(0)


def _kl(z, y, z_clean):
    """TRADES' KL(softmax(z_clean) || softmax(z)) per point; z_clean (B, C) the clean logits."""
    log_p = F.log_softmax(z_clean.to(z.dtype), 1)
    return F.kl_div(F.log_softmax(z, 1), log_p, reduction="none", log_target=True).sum(1)


_WIDE = (_ce, _dlr, _dlr_targeted, _target_margin, _cw, _kl)  # on a float64 copy of the logits


# ----------------------------------------------------------------------------- FGSM and PGD

def fgsm(model, x, y, eps):
    """One signed-gradient step of size eps on the cross-entropy: (B, ...) -> (B, ...)."""
    x0, y = _prepare(x, y, eps)
    _, g, _ = _loss_grad(model, x0, y, _ce, labels=True)
    return _project(x0 + eps * g.sign(), x0, eps, "linf").to(x.dtype)


def pgd(model, x, y, eps, alpha, steps, random_start=True, norm="linf", early_stop=True, seed=None,
        x_init=None, loss=None, momentum=0.0):
    """PGD on the cross-entropy or a given loss: images (B, ...), labels (B,) -> x_adv (B, ...).

    Madry et al. 2018, "Towards Deep Learning Models Resistant to Adversarial Attacks". eps, alpha:
    radius and step in pixel units, e.g. 8/255 (L-inf) or 0.5 (L2); steps >= 0.
        random_start (True): start uniformly in the L-inf ball (L2: on the sphere).
        norm ("linf"): or "l2". seed (None): of the random start; None: torch's global RNG.
        early_stop (True, evaluation): a point leaves, keeping that image, once the clean image
            or an iterate fools the model. False (training): every point gets every step.
        x_init (None): a start (B, ...) instead of the random one, projected onto ball and box.
        loss (None): the cross-entropy; else loss(outputs, y) -> (B,) to ascend (`model` may then
            return any outputs), e.g. TRADES' KL or FARE's L2 distance to target embeddings.
            Needs early_stop=False.
        momentum (0.0): FARE's training attack's sign momentum (Schlarmann et al. 2024,
            chs20/RobustVLM train/pgd_train.py: 0.9): steps go along v <- d(momentum * v + d(g)),
            v = 0 at first, d the unit steepest-ascent direction. 0: plain PGD.
    Usage: x_adv = pgd(model, x, y, eps=4/255, alpha=1/255, steps=10)
    """
    x0, y, alpha = _prepare_pgd(x, y, eps, alpha, steps, norm)
    loss_fn = _ce if loss is None else _custom_loss(loss, early_stop)
    _check_number("momentum", momentum, " such as 0.9 (FARE's)")
    x_adv = _pgd_start(x0, eps, norm, random_start, seed, x_init)
    return _ascend(model, x0, y, x_adv, eps, alpha, steps, loss_fn, norm, early_stop,
                   momentum=momentum, check_labels=loss is None).to(x.dtype)


def _ascend(model, x0, y, x_adv, eps, alpha, steps, loss_fn, norm="linf", early_stop=True, t=None,
            momentum=0.0, z_clean=None, check_labels=True):
    """pgd's loop, also cw's, tpgd's and transfer's: start x_adv (B, ...) -> x_adv (B, ...).

    `steps` unit steps of alpha up loss_fn(z, y, t) (t (B, ...), e.g. TRADES' clean logits; None:
    y), projected onto ball and box. early_stop: a point leaves, keeping that image, once the clean
    image (logits z_clean, or computed) or an iterate fools the model."""
    t = y if t is None else t
    v = torch.zeros_like(x_adv)  # the momentum's velocity

    def step_along(g, v):  # -> (direction of the step, new velocity)
        d = _direction(g, norm)
        return (d, v) if not momentum else (_direction(momentum * v + d, norm),) * 2

    if not early_stop:
        for step in range(steps):
            _, g, _ = _loss_grad(model, x_adv, y, loss_fn, t, labels=step == 0 and check_labels)
            d, v = step_along(g, v)
            x_adv = _project(x_adv + alpha * d, x0, eps, norm)
        return x_adv
    out = x0.clone()
    z_clean = _clean_logits(model, x0, y) if z_clean is None else z_clean
    i = (z_clean.argmax(1) == y).nonzero()[:, 0]
    x_nat, y, t, x_adv, v = x0[i], y[i], t[i], x_adv[i], v[i]
    g = torch.zeros_like(x_adv)
    for step in range(steps + 1):
        if not len(i):
            break
        if step == steps:  # the last iterate only needs a prediction
            z = _logits(model, x_adv)
        else:
            _, g, z = _loss_grad(model, x_adv, y, loss_fn, t)
        fooled = z.argmax(1) != y
        if fooled.any():
            out[i[fooled]] = x_adv[fooled]
            keep = ~fooled
            i, x_nat, y, t, x_adv, g, v = (u[keep] for u in (i, x_nat, y, t, x_adv, g, v))
        if step < steps:
            d, v = step_along(g, v)
            x_adv = _project(x_adv + alpha * d, x_nat, eps, norm)
    out[i] = x_adv
    return out


def _pgd_start(x, eps, norm, random_start, seed, x_init):
    """pgd's first iterate (B, ...): x_init projected onto ball and box, a random point of the
    ball (random_start) or x."""
    if x_init is not None and (not torch.is_tensor(x_init) or x_init.shape != x.shape):
        got = tuple(x_init.shape) if torch.is_tensor(x_init) else type(x_init).__name__
        raise ValueError(f"x_init must be a tensor of the images' shape {tuple(x.shape)}, "
                         f"got {got}")
    if x_init is not None:
        return _project(x_init.detach().to(x.dtype), x, eps, norm)
    if random_start:
        return _random_start(x, eps, norm, _generator(seed, x.device), False)
    return x


def _custom_loss(loss, early_stop):
    """pgd's `loss` as a loss_fn(z, y, t) for _loss_grad, checking it gives one value per image."""
    if not callable(loss):
        raise ValueError(f"loss must be a callable loss(outputs, y) -> (B,) losses, or None for "
                         f"the cross-entropy, got {loss!r}")
    if early_stop:
        raise ValueError("pgd with a custom loss needs early_stop=False: early stopping reads the "
                         "model's outputs as logits, which they need not be")

    def loss_fn(z, y, t=None):
        value = loss(z, y)
        if not torch.is_tensor(value) or value.shape != y.shape:
            shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise ValueError(f"loss must return one loss per image, shape ({len(y)},), "
                             f"got {shape}")
        return value
    return loss_fn


# ----------------------------------------------------------------------------- CW, TPGD, transfer

def _prepare_pgd(x, y, eps, alpha, steps, norm="linf", apt=False):
    """_prepare, alpha (apt: None is eps / 4, APT's CW and TPGD step) and steps: -> x0, y, alpha."""
    x0, y = _prepare(x, y, eps, norm)
    alpha = eps / 4 if apt and alpha is None else alpha
    _check_radius("alpha", alpha, norm, x)
    _check_count("steps", steps, 0)
    return x0, y, alpha


def cw(model, x, y, eps, alpha=None, steps=100, kappa=0.0, random_start=False, early_stop=True,
       seed=None):
    """PGD on the Carlini-Wagner margin (L-inf): images (B, ...), labels (B,) -> x_adv (B, ...).

    Carlini & Wagner 2017's margin as APT (Li et al. 2024, TreeLLi/APT apt/evaluate.py, CWLoss and
    its pgd) ascends it: -max(z_y - max_{i!=y} z_i + kappa, 0), signed steps, no random start.
    (torchattacks.CWLinf is another attack: Adam in tanh space, no eps ball.)
        alpha (None): step size; None is eps / 4, APT's. steps (100), kappa (0.0, >= 0): APT's.
        random_start (False): start uniformly in the ball instead of at x (APT: x).
        early_stop (True): as pgd's. seed (None): of the random start; None: torch's global RNG.
    Usage: x_adv = cw(model, x, y, eps=4/255, alpha=1/255, steps=100)
    """
    x0, y, alpha = _prepare_pgd(x, y, eps, alpha, steps, apt=True)
    _check_number("kappa", kappa, " (the margin's confidence)")
    x_adv = _pgd_start(x0, eps, "linf", random_start, seed, None)
    kappa = torch.full((len(x0),), float(kappa), dtype=x0.dtype, device=x0.device)
    return _ascend(model, x0, y, x_adv, eps, alpha, steps, _cw, "linf", early_stop,
                   t=kappa).to(x.dtype)


def tpgd(model, x, y, eps, alpha=None, steps=100, early_stop=True, seed=None):
    """TPGD, TRADES' attack: L-inf PGD on KL(softmax(clean) || softmax(adv)): (B, ...) -> (B, ...).

    Zhang et al. 2019, "Theoretically Principled Trade-off between Robustness and Accuracy"; as
    torchattacks.TPGD: start at x + 0.001 * N(0, 1) (here projected onto the ball), signed steps
    up the KL divergence from the clean prediction; y only measures accuracy. APT evaluates with
    torchattacks.TPGD(alpha=eps/4, steps=100).
        alpha (None): step size; None is eps / 4, APT's. steps (100): APT's (torchattacks': 7).
        early_stop (True): as pgd's. seed (None): of the Gaussian start; None: torch's global RNG.
    Not a margin attack: it misses points PGD-CE breaks, more so in fp16, which rounds its small
    logit differences (the tests' toy classifier, 20 steps: PGD-CE broke the 20 breakable points
    of 40 in either precision, TPGD 15 in fp32 and 13 in fp16).
    Usage: x_adv = tpgd(model, x, y, eps=4/255, alpha=1/255, steps=100)
    """
    x0, y, alpha = _prepare_pgd(x, y, eps, alpha, steps, apt=True)
    z_clean = _clean_logits(model, x0, y)
    gen = _generator(seed, x.device)
    noise = torch.randn(x0.shape, generator=gen, device=x.device, dtype=x0.dtype)
    x_adv = _project(x0 + 0.001 * noise, x0, eps, "linf")
    return _ascend(model, x0, y, x_adv, eps, alpha, steps, _kl, "linf", early_stop, t=z_clean,
                   z_clean=z_clean, check_labels=False).to(x.dtype)


def diverse_inputs(x, p, gen=None, resize_rate=0.9):
    """DI-FGSM's input diversity: images (B, C, S, S) -> resized, zero-padded back (probability p).

    Xie et al. 2019, "Improving Transferability of Adversarial Examples with Input Diversity", as
    torchattacks.DIFGSM (resize_rate 0.9, diversity_prob 0.5: the baselines' `di`,
    xinwong/Multimodal-Adversarial-Prompt-Tuning, trainers/advvpt.py before_adv_test), one draw
    per call, from gen in order: a coin (below p: transform), a side rnd in [floor(resize_rate *
    S), S - 1], top and left in [0, S - rnd - 1]; a bilinear resize (align_corners=False, no
    antialiasing) to rnd x rnd, at (top, left) in S x S zeros. (Xie et al. enlarge instead, which
    changes the size: CLIP's encoders take one size.)
    """
    _check_diversity(x, p, resize_rate)

    def draw(low, high):  # an integer uniform in [low, high)
        return int(torch.randint(low, high, (), generator=gen, device=x.device))

    if p == 0 or torch.rand((), generator=gen, device=x.device) >= p:
        return x
    s = x.shape[-1]
    rnd = draw(int(s * resize_rate), s)
    top, left = draw(0, s - rnd), draw(0, s - rnd)
    resized = F.interpolate(x, size=(rnd, rnd), mode="bilinear", align_corners=False)
    return F.pad(resized, (left, s - rnd - left, top, s - rnd - top), value=0)


def _check_diversity(x, p, resize_rate=0.9):
    """Refuse a DI probability outside [0, 1], a resize_rate outside (0, 1), or images that are not
    (B, C, S, S) with a pixel left after the resize."""
    if not isinstance(p, numbers.Real) or isinstance(p, bool) or not 0 <= p <= 1:
        raise ValueError(f"the input diversity probability must be in [0, 1], got {p!r}")
    if not isinstance(resize_rate, numbers.Real) or not 0 < resize_rate < 1:
        raise ValueError(f"resize_rate must be in (0, 1) (shrink, then pad back), "
                         f"got {resize_rate!r}")
    if p and (x.dim() != 4 or x.shape[-1] != x.shape[-2] or int(x.shape[-1] * resize_rate) < 1):
        raise ValueError(f"input diversity needs square images (B, C, S, S) that keep a pixel at "
                         f"resize_rate {resize_rate}, got {tuple(x.shape)}")


def transfer(model, x, y, eps, surrogate, alpha=1 / 255, steps=100, diversity=0.0, seed=None):
    """Transfer attack: I-FGSM (DI-FGSM) on a surrogate: (B, C, H, W), (B,) -> (B, C, H, W).

    Kurakin et al. 2017's iterative FGSM (signed steps from x up the surrogate's cross-entropy)
    with Xie et al. 2019's diverse_inputs at each step with probability `diversity`:
    torchattacks.DIFGSM with decay 0, the baselines' `di` attack. `model` only gives its number of
    classes: every point gets every step, and the crafted images do not depend on the model
    (evaluate.py --save-adv). So a point the model gets wrong clean gets a crafted image too,
    which may fool it less: count it broken where the model is wrong on either image (evaluate.py
    --pgd-score any: robust <= clean point by point) or on the crafted one (--pgd-score last, the
    baselines').
        surrogate: images -> logits (B, C) of the model's classes in its order (else refused).
        alpha (1/255), steps (100): the baselines' test attack.
        diversity (0.0): DI's probability p (torchattacks': 0.5); 0 is plain I-FGSM.
        seed (None): of DI's draws; None: torch's global RNG.
    Usage: x_adv = transfer(target, x, y, eps=4/255, surrogate=zero_shot, diversity=0.5, seed=0)
    """
    x0, y, alpha = _prepare_pgd(x, y, eps, alpha, steps)
    _check_diversity(x0, diversity)
    classes = _clean_logits(model, x0, y).shape[1]
    theirs = _logits(surrogate, x0).shape[1]
    if theirs != classes:
        raise ValueError(f"the surrogate gives {theirs} logits, the model {classes}: a transfer "
                         "attack needs a surrogate of the same classes")
    gen = _generator(seed, x.device)
    crafter = surrogate if not diversity else lambda v: surrogate(diverse_inputs(v, diversity, gen))
    return _ascend(crafter, x0, y, x0, eps, alpha, steps, _ce, "linf", early_stop=False,
                   check_labels=False).to(x.dtype)


# ----------------------------------------------------------------------------- APGD

def _checkpoints(steps):
    """APGD's checkpoints, 1-based steps: ceil(p_j * steps), p_1 = 0.22,
    p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)."""
    p_prev, p, w = 0.0, 0.22, set()
    while p <= 1:
        w.add(math.ceil(round(p * steps, 6)))
        p_prev, p = p, p + max(p - p_prev - 0.03, 0.06)
    return sorted(w)


def _apgd_run(model, x, y, eps, steps, loss_fn, norm, gen, t=None, eot=1, rho=0.75):
    """One APGD run on points (n, ...) from a random start on the eps sphere: -> (x_out, fooled
    (n,)), x_out the first iterate that fooled the model (the point then leaves) or the best."""
    adv = _random_start(x, eps, norm, gen, True)
    loss, g, z = _loss_grad(model, adv, y, loss_fn, t, eot)
    out, fooled = adv.clone(), z.argmax(1) != y
    i, t = torch.arange(len(x), device=x.device), y if t is None else t
    prev, best, g_best, loss_best, loss_ckpt = adv, adv, g, loss, loss
    eta = torch.full_like(loss, 2 * eps)
    reduced, n_up = torch.zeros_like(fooled), torch.zeros_like(loss)
    checkpoints, last = _checkpoints(steps), 0
    for step in range(1, steps + 2):  # the extra pass only drops the points broken last
        keep = ~fooled
        if not keep.all():  # drop the points just broken
            (i, x, y, t, adv, prev, g, eta, best, g_best, loss, loss_best, loss_ckpt, reduced,
             n_up) = (v[keep] for v in (i, x, y, t, adv, prev, g, eta, best, g_best, loss,
                                        loss_best, loss_ckpt, reduced, n_up))
        if step > steps or not len(i):
            break
        a = 1.0 if step == 1 else 0.75
        z_ = _project(adv + _bc(eta, adv) * _direction(g, norm), x, eps, norm)
        adv, prev = _project(adv + a * (z_ - adv) + (1 - a) * (adv - prev), x, eps, norm), adv
        new_loss, g, z = _loss_grad(model, adv, y, loss_fn, t, eot)
        fooled = z.argmax(1) != y
        out[i[fooled]] = adv[fooled]
        n_up, loss = n_up + (new_loss > loss), new_loss
        up = loss > loss_best
        best, g_best = torch.where(_bc(up, adv), adv, best), torch.where(_bc(up, g), g, g_best)
        loss_best = torch.where(up, loss, loss_best)
        if step in checkpoints:  # where progress stalled: halve eta, restart from the best point
            reduce = (n_up < rho * (step - last)) | (~reduced & (loss_best <= loss_ckpt))
            eta = torch.where(reduce, eta / 2, eta)
            adv = torch.where(_bc(reduce, adv), best, adv)
            g = torch.where(_bc(reduce, g), g_best, g)
            reduced, loss_ckpt, n_up, last = reduce, loss_best, torch.zeros_like(n_up), step
    out[i] = best
    broken = torch.ones(len(out), dtype=torch.bool, device=out.device)
    broken[i] = False
    return out, broken


def _apgd_runs(model, x0, y, eps, steps, norm, seed, robust, runs, eot=1):
    """An APGD run per (loss_fn, targets (B,) or None) on the points still `robust`: -> (B, ...)."""
    gen, out = _generator(seed, x0.device), x0.clone()
    for loss_fn, t in runs:
        i = robust.nonzero()[:, 0]
        if not len(i):
            break
        t = None if t is None else t[i]
        out[i], fooled = _apgd_run(model, x0[i], y[i], eps, steps, loss_fn, norm, gen, t, eot)
        robust[i[fooled]] = False
    return out


def apgd(model, x, y, eps, steps=100, loss="ce", restarts=1, seed=0, norm="linf", eot=1):
    """APGD (Croce & Hein 2020) on the "ce" or "dlr" loss: (B, ...) -> x_adv (B, ...).

    Each restart runs on the points still robust; eot > 1 averages loss, gradient and logits over
    that many passes (randomised models). A point never broken gets its last run's best iterate."""
    losses = {"ce": _ce, "dlr": _dlr}
    if loss not in losses:
        raise ValueError(f"loss must be 'ce' or 'dlr', got {loss!r}")
    x0, y = _prepare(x, y, eps, norm)
    _check_count("steps", steps, 0)
    _check_count("restarts", restarts, 1)
    _check_count("eot", eot, 1)
    robust = _clean_logits(model, x0, y).argmax(1) == y
    runs = [(losses[loss], None)] * restarts
    return _apgd_runs(model, x0, y, eps, steps, norm, seed, robust, runs, eot).to(x.dtype)


def apgd_targeted(model, x, y, eps, steps=100, n_targets=9, seed=0, norm="linf"):
    """APGD-T: one APGD run on the targeted DLR loss for each of the n_targets classes ranked
    highest by clean logit after y, each on the points still robust: (B, ...) -> (B, ...)."""
    x0, y, robust, targets = _prepare_targeted(model, x, y, eps, norm, steps, n_targets)
    runs = [(_dlr_targeted, t) for t in targets.T]
    return _apgd_runs(model, x0, y, eps, steps, norm, seed, robust, runs).to(x.dtype)


def _prepare_targeted(model, x, y, eps, norm, steps, n_targets):
    """APGD-T's and FAB-T's checks: -> x0, y, correct (B,), the n_targets next classes (B, k)."""
    x0, y = _prepare(x, y, eps, norm)
    _check_count("steps", steps, 0)
    _check_count("n_targets", n_targets, 1)
    z = _clean_logits(model, x0, y)
    return x0, y, z.argmax(1) == y, z.argsort(1, descending=True)[:, 1:n_targets + 1]


# ----------------------------------------------------------------------------- FAB-T

def _project_hyperplane(p, w, c):
    """Smallest L-inf step d with w.d = c and p + d inside [0,1], per row of p, w (n, D), c (n,).
    Where the box makes c unreachable, d is the full move towards it."""
    w = w * torch.where(c < 0, -1.0, 1.0).to(w.dtype)[:, None]  # now w.d = |c| >= 0
    c = c.abs()
    room = torch.where(w > 0, 1 - p, p)  # how far each coordinate can move along sign(w)
    r, order = room.sort(1)
    a = w.abs().gather(1, order)
    below = (a * r).cumsum(1) - a * r  # sum_{j<k} a_j r_j
    tail = a.flip(1).cumsum(1).flip(1)  # sum_{j>=k} a_j
    reach = (below + r * tail).cummax(1).values  # largest w.d with ||d||_inf <= r_k
    k = torch.searchsorted(reach, c[:, None]).clamp(max=w.shape[1] - 1)
    lam = (c[:, None] - below.gather(1, k)) / tail.gather(1, k).clamp_min(torch.finfo(w.dtype).tiny)
    return w.sign() * torch.minimum(lam, room)


def _final_search(model, x, y, x_adv, steps=10):
    """Shrink each perturbation x_adv - x by bisection along its segment, keeping it adversarial."""
    hi = x.new_ones(len(x))
    lo = torch.zeros_like(hi)
    for _ in range(steps):
        mid = (lo + hi) / 2
        fooled = _logits(model, x + _bc(mid, x) * (x_adv - x)).argmax(1) != y
        lo, hi = torch.where(fooled, lo, mid), torch.where(fooled, mid, hi)
    return torch.where(_bc(hi < 1, x), x + _bc(hi, x) * (x_adv - x), x_adv)


def _fab_run(model, x, y, t, eps, steps, early_stop, alpha_max=0.1, eta=1.05, beta=0.9):
    """Targeted FAB (L-inf) from x itself towards classes t, on points (n, ...) that the model
    classifies correctly. Returns (x_adv, dist (n,)): the closest adversarial found and its
    L-inf distance (inf where none). early_stop drops points once dist <= eps."""
    best, dist = x.clone(), x.new_full((len(x),), math.inf)
    i, xa, ya, ta, cur = torch.arange(len(x), device=x.device), x, y, t, x.clone()
    for _ in range(steps):
        if not len(i):
            break
        # linearise f = z_t - z_y around cur; the boundary is f + w.(z - cur) = 0
        f, g, _ = _loss_grad(model, cur, ya, _target_margin, ta)
        w, c_flat, x_flat = g.flatten(1), cur.flatten(1), xa.flatten(1)
        d1 = _project_hyperplane(c_flat, w, -f).view_as(cur)
        d2 = _project_hyperplane(x_flat, w, -f - (w * (x_flat - c_flat)).sum(1)).view_as(cur)
        n1, n2 = _norm(d1, "linf").clamp_min(1e-8), _norm(d2, "linf").clamp_min(1e-8)
        alpha = _bc((n1 / (n1 + n2)).clamp(0, alpha_max), cur)
        cur = ((cur + eta * d1) * (1 - alpha) + (xa + eta * d2) * alpha).clamp(0, 1)
        fooled = _logits(model, cur).argmax(1) != ya
        d = _norm(cur - xa, "linf")
        better = fooled & (d < dist[i])
        best[i[better]], dist[i[better]] = cur[better], d[better]
        cur = torch.where(_bc(fooled, cur), xa + beta * (cur - xa), cur)  # step back towards x
        if early_stop:
            keep = dist[i] > eps
            i, xa, ya, ta, cur = i[keep], xa[keep], ya[keep], ta[keep], cur[keep]
    found = dist < math.inf
    best[found] = _final_search(model, x[found], y[found], best[found])
    dist[found] = _norm(best[found] - x[found], "linf")
    return best, dist


def fab_targeted(model, x, y, eps, steps=100, n_targets=9, early_stop=True):
    """FAB-T (Croce & Hein 2020, L-inf): minimum-norm attack towards each of the n_targets classes
    ranked highest by clean logit after y: (B, ...) -> (B, ...). A point is broken only if the
    closest adversarial found is within eps, else unchanged. early_stop=False minimises on every
    point and target (to measure the smallest perturbation, e.g. eps=1)."""
    x0, y, correct, targets = _prepare_targeted(model, x, y, eps, "linf", steps, n_targets)
    out, dist = x0.clone(), x0.new_full((len(x0),), math.inf)
    for k in range(targets.shape[1]):
        i = (correct & (dist > eps) if early_stop else correct).nonzero()[:, 0]
        if not len(i):
            break
        adv, d = _fab_run(model, x0[i], y[i], targets[i, k], eps, steps, early_stop)
        better = d < dist[i]
        out[i[better]], dist[i[better]] = adv[better], d[better]
    out[dist > eps] = x0[dist > eps]
    return out.to(x.dtype)


# ----------------------------------------------------------------------------- Square

def _square_p(it, p_init):
    """Square Attack's fraction of the image the square covers at proposal `it` (not rescaled to
    the query budget, as AutoAttack)."""
    for k, bound in enumerate((10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)):
        if it <= bound:
            return p_init / 2 ** k
    return p_init / 512


def square(model, x, y, eps, queries=5000, p_init=0.8, seed=0):
    """Square Attack (Andriushchenko et al. 2020, L-inf): random search on the margin loss from a
    vertical-stripe start, then at most `queries` square proposals per point, kept if they lower
    the margin: images (B, C, H, W) -> (B, C, H, W)."""
    x0, y = _prepare(x, y, eps)
    _check_count("queries", queries, 0)
    if not (isinstance(p_init, numbers.Real) and 0 < p_init <= 1):
        raise ValueError(f"p_init must be in (0, 1], got {p_init!r}")
    if x0.dim() != 4:
        raise ValueError(f"square needs images shaped (B, C, H, W), got {tuple(x0.shape)}")
    gen, out, (_, c, h, w) = _generator(seed, x.device), x0.clone(), x0.shape

    def sign(*shape):  # random +-1
        return 2 * torch.randint(0, 2, shape, generator=gen, device=x.device) - 1

    i = (_clean_logits(model, x0, y).argmax(1) == y).nonzero()[:, 0]
    if not len(i):
        return out.to(x.dtype)
    xa, ya = x0[i], y[i]
    best = _project(xa + eps * sign(len(i), c, 1, w), xa, eps, "linf")
    z = _logits(model, best)
    margin, fooled = _margin(z, ya), z.argmax(1) != ya
    out[i[fooled]] = best[fooled]
    rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    for it in range(queries):
        keep = ~fooled
        i, xa, ya, best, margin = i[keep], xa[keep], ya[keep], best[keep], margin[keep]
        if not len(i):
            break
        s = min(max(round(math.sqrt(_square_p(it, p_init) * h * w)), 1), h, w)
        vh, vw = (torch.randint(0, n - s + 1, (len(i), 1, 1, 1), generator=gen, device=x.device)
                  for n in (h, w))
        r, q = rows.view(1, 1, h, 1) - vh, cols.view(1, 1, 1, w) - vw
        mask = (r >= 0) & (r < s) & (q >= 0) & (q < s)  # one s x s square per image
        cand = _project(best + mask * (2 * eps * sign(len(i), c, 1, 1)), xa, eps, "linf")
        z = _logits(model, cand)
        m = _margin(z, ya)
        better = m < margin
        best, margin = torch.where(_bc(better, best), cand, best), torch.where(better, m, margin)
        fooled = better & (z.argmax(1) != ya)
        out[i[fooled]] = cand[fooled]
    out[i] = best
    return out.to(x.dtype)


# ----------------------------------------------------------------------------- AutoAttack

def autoattack(model, x, y, eps, version="standard", seed=0, steps=100, queries=5000,
               return_info=False):
    """AutoAttack (Croce & Hein 2020, L-inf) or its reduced ensemble: (B, ...) -> x_adv (B, ...).

    Members run in the published order, each on the points still robust; a point keeps the first
    adversarial found. "standard": APGD-CE, APGD-T (9 targets), FAB-T (9 targets), Square
    (`queries`); "rand", for randomised defences: APGD-CE and APGD-DLR with 20 EOT samples.
    "apgd-ce+apgd-t" (APGD-CE, APGD-T) is NOT AutoAttack but the reduced ensemble that TeCoA
    (Mao et al. 2023) and RobustVLM (Schlarmann et al. 2024) report as "AA"; name it
    "apgd-ce+apgd-t" in results. return_info: (x_adv, info), info["clean"] and info["robust"] the
    points right before and after, info[member] the points it broke, e.g. {"clean": 90,
    "apgd-ce": 50, ..., "robust": 30}."""
    members = {
        "standard": [("apgd-ce", partial(apgd, steps=steps, seed=seed)),
                     ("apgd-t", partial(apgd_targeted, steps=steps, seed=seed)),
                     ("fab-t", partial(fab_targeted, steps=steps)),
                     ("square", partial(square, queries=queries, seed=seed))],
        "rand": [("apgd-ce", partial(apgd, steps=steps, seed=seed, eot=20)),
                 ("apgd-dlr", partial(apgd, steps=steps, loss="dlr", seed=seed, eot=20))],
    }
    members["apgd-ce+apgd-t"] = members["standard"][:2]
    if version not in members:
        raise ValueError(f"version must be 'standard', 'rand' or 'apgd-ce+apgd-t', got {version!r}")
    x0, y = _prepare(x, y, eps)
    _check_count("steps", steps, 0)
    _check_count("queries", queries, 0)
    out = x0.clone()
    robust = _clean_logits(model, x0, y).argmax(1) == y
    info = {"clean": int(robust.sum())}
    for name, attack in members[version]:
        i = robust.nonzero()[:, 0]
        broken = torch.zeros(0, dtype=torch.bool)
        if len(i):
            adv = attack(model, x0[i], y[i], eps)
            broken = _logits(model, adv).argmax(1) != y[i]
            out[i[broken]], robust[i[broken]] = adv[broken], False
        info[name] = int(broken.sum())
    info["robust"] = int(robust.sum())
    return (out.to(x.dtype), info) if return_info else out.to(x.dtype)
