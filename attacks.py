"""Adversarial attacks on image classifiers: fgsm, pgd, cw (PGD on the CW margin), tpgd (TRADES'
KL), transfer (from a surrogate, with DI's diverse_inputs), apgd, apgd_targeted, fab_targeted,
square and autoattack (Croce & Hein 2020), plus parse_eps for the CLIs.

Every attack is a function attack(model, x, y, eps, ...) -> x_adv. `model` is any callable from
images in [0,1] (B, ...) to logits (B, C); put it in eval mode first. x_adv has x's shape, dtype
and device and lies in the eps ball around x (L-inf unless norm="l2") intersected with [0,1].
Attacks are batched and seeded with a private generator, and stop spending work on a point once the
model misclassifies it (except pgd(..., early_stop=False), the plain fixed-step version that
training uses, also on a loss of its own: pgd(..., loss=...); and transfer, which crafts on a
surrogate and hands every point its crafted image). Steps do not depend on the precision the model
computes in (fp16, bf16, autocast): the loss is computed on a float64 copy of the logits and its
gradient, rescaled per point to a max-abs in [1, 2), is what flows back through the model, so a
confident point's softmax gradient cannot underflow to zero in fp16 (see _loss_grad). Input
gradients come from torch.autograd.grad w.r.t. the input only, so the model's parameters never get
a .grad. Bad arguments (images not floats in [0,1], eps or alpha beyond the pixel range, negative
counts, labels that are not classes of the model) are refused with a one-line ValueError.
shared/ATTACKS.md restates the algorithms; fra31/auto-attack is the reference implementation.
"""
import math
import numbers
from functools import partial

import torch
import torch.nn.functional as F


def parse_eps(s):
    """Parse a radius in pixel units: "4/255", "0.0039" or 0.0039 -> float in [0, 1].

    A value above 1 is refused (it would cover the whole pixel range), "8" with a hint to 8/255."""
    text = str(s).strip()
    try:
        num, _, den = text.partition("/")
        value = float(num) / float(den) if den else float(num)
    except (ValueError, ZeroDivisionError):
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"eps {s!r} is not a number: give a fraction such as '4/255' "
                         "or a float such as 0.0157")
    if value < 0:
        raise ValueError(f"eps {s!r} is negative; give a radius such as '4/255'")
    if value > 1:
        hint = f"did you mean {text}/255?" if not den else "give a radius such as '4/255'"
        raise ValueError(f"eps {s!r} is larger than the whole [0,1] pixel range; {hint}")
    return value


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
    """Random point of the eps ball around x (uniform in the L-inf cube unless sphere, then on
    its surface; L2 starts are always on the sphere), clipped to [0,1]."""
    if norm == "linf":
        d = 2 * torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype) - 1
    else:
        d = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    if sphere or norm == "l2":
        d = d / _bc(_norm(d, norm).clamp_min(1e-12), d)
    return (x + eps * d).clamp(0, 1)


def _predict(model, x):
    """Predicted classes (B,) without building a graph."""
    with torch.no_grad():
        return model(x).argmax(1)


def _check_labels(y, z):
    """Refuse labels (B,) that are not classes of logits z (B, C): out of range, the attack would
    silently count the point as misclassified (or crash inside the loss)."""
    bad = (y < 0) | (y >= z.shape[1])
    if bad.any():  # one sync, once per attack
        raise ValueError(f"label {int(y[bad][0])} is not a class of the model, which gives "
                         f"{z.shape[1]} logits (classes 0 to {z.shape[1] - 1}); check the labels "
                         "against the class names")


def _clean_logits(model, x, y):
    """The model's logits (B, C) on the clean images, without a graph, its labels y checked."""
    with torch.no_grad():
        z = model(x)
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
            # The loss and its gradient g_z w.r.t. the logits are computed on a float64 copy of z,
            # and g_z / p, p the largest power of 2 <= max|g_z| of the point, flows back through
            # the model: a confident point's softmax gradient (e^-margin, below fp16's smallest
            # number beyond a margin of ~17) would underflow to 0 in an fp16 model's backward and
            # the attack would never move. Sign and L2-normalised steps ignore a positive factor
            # per point, and a power of 2 scales exactly (FAB's margin loss has p = 1: its
            # gradient is the true one).
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

def _margin(z, y):
    """z_y - max_{i!=y} z_i: positive while the model is right."""
    return z.gather(1, y[:, None])[:, 0] - z.scatter(1, y[:, None], float("-inf")).amax(1)


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
    diff = z.gather(1, y[:, None])[:, 0] - z.gather(1, t[:, None])[:, 0]
    return -diff / (zs[:, 0] - (zs[:, 2] + zs[:, 3]) / 2 + 1e-12)


def _target_margin(z, y, t):
    return z.gather(1, t[:, None])[:, 0] - z.gather(1, y[:, None])[:, 0]


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

    Madry et al. 2018, "Towards Deep Learning Models Resistant to Adversarial Attacks".
    Distance: L-inf (norm="linf") or L2 (norm="l2"), in pixel units of images in [0,1].
    Arguments:
        model: callable images (B, ...) -> logits (B, C); with `loss`, any outputs (B, ...).
        x: images (B, ...), floats in [0,1]. y: class indices (B,), also handed to `loss`.
        eps: radius of the ball, e.g. 8/255 (L-inf) or 0.5 (L2). alpha: step size, same units.
        steps: number of gradient steps (>= 0).
        random_start (True): start from a uniform point of the L-inf ball (L2: of the sphere).
        norm ("linf"): "linf" or "l2".
        early_stop (True, evaluation): a point counts as broken once the clean image or any
            iterate fools the model; it keeps that image and is attacked no further. False
            (training): the plain fixed-step attack on every point, returning the last iterate.
        seed (None): seed of the random start; None draws it from torch's global RNG.
        x_init (None): starting point (B, ...) instead of the random start, projected onto the
            ball and box, e.g. a start drawn per image so that it does not depend on the batch.
        loss (None): None ascends the cross-entropy; else a callable loss(outputs, y) -> (B,),
            one loss per image, that PGD ascends instead, e.g. a closure for TRADES' KL
            divergence from the clean prediction or FARE's squared L2 distance to fixed target
            embeddings. Needs early_stop=False, as the outputs need not be logits.
        momentum (0.0): the sign momentum of FARE's training attack (Schlarmann et al. 2024,
            chs20/RobustVLM train/pgd_train.py, where it is 0.9): with d() the unit steepest-ascent
            direction (sign for L-inf, g / ||g||_2 for L2), a velocity v = 0 becomes
            v <- d(momentum * v + d(grad)) at each step, and the step goes along v. 0: plain PGD.
    Usage: x_adv = pgd(model, x, y, eps=4/255, alpha=1/255, steps=10)
    """
    x0, y = _prepare(x, y, eps, norm)
    _check_radius("alpha", alpha, norm, x)
    _check_count("steps", steps, 0)
    loss_fn = _ce if loss is None else _custom_loss(loss, early_stop)
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) \
            or not 0 <= momentum < math.inf:
        raise ValueError(f"momentum must be a number >= 0 such as 0.9 (FARE's), got {momentum!r}")
    x_adv = _pgd_start(x0, eps, norm, random_start, seed, x_init)
    return _ascend(model, x0, y, x_adv, eps, alpha, steps, loss_fn, norm, early_stop,
                   momentum=momentum, check_labels=loss is None).to(x.dtype)


def _ascend(model, x0, y, x_adv, eps, alpha, steps, loss_fn, norm="linf", early_stop=True, t=None,
            momentum=0.0, z_clean=None, check_labels=True):
    """pgd's loop, also cw's, tpgd's and transfer's: start x_adv (B, ...) -> x_adv (B, ...).

    `steps` unit steps of size alpha up loss_fn(z, y, t), each projected onto the eps ball around
    x0 and the box. t: the loss's per-point argument (B, ...), e.g. the clean logits of TRADES' KL;
    None passes y. early_stop: a point leaves once the clean image (logits z_clean, computed when
    None) or an iterate fools the model, keeping that image. check_labels (early_stop=False): check
    y against the logits of the first step."""
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
            with torch.no_grad():
                z = model(x_adv)
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
    """pgd's first iterate (B, ...): x_init projected onto the ball and box, else a random point of
    the ball (random_start), else x itself."""
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

def _pgd_alpha(alpha, eps, x):
    """A step size checked like eps; None -> eps / 4, the step of APT's CW and TPGD evaluations."""
    alpha = eps / 4 if alpha is None else alpha
    _check_radius("alpha", alpha, "linf", x)
    return alpha


def cw(model, x, y, eps, alpha=None, steps=100, kappa=0.0, random_start=False, early_stop=True,
       seed=None):
    """PGD on the Carlini-Wagner margin (L-inf): images (B, ...), labels (B,) -> x_adv (B, ...).

    Carlini & Wagner 2017's margin as APT (Li et al. 2024, TreeLLi/APT apt/evaluate.py, CWLoss and
    its pgd) ascends it beside PGD-CE: loss = -max(z_y - max_{i!=y} z_i + kappa, 0), signed steps,
    no random start. The clamp makes a point's gradient 0 once max_{i!=y} z_i >= z_y + kappa.
    (torchattacks.CWLinf is another attack: Adam on tanh-space variables, no eps ball.)
    Arguments:
        model: callable images (B, ...) -> logits (B, C). x: images in [0,1]. y: classes (B,).
        eps: L-inf radius in pixel units, e.g. 1/255.
        alpha (None): step size; None is eps / 4, APT's. steps (100): APT's.
        kappa (0.0): the confidence, APT's default; >= 0.
        random_start (False): start from a uniform point of the ball instead of x (APT: x).
        early_stop (True): as pgd's (a point is broken once the clean image or any iterate fools
            the model); False returns the last iterate of every point.
        seed (None): seed of the random start; None draws it from torch's global RNG.
    Usage: x_adv = cw(model, x, y, eps=4/255, alpha=1/255, steps=100)
    """
    x0, y = _prepare(x, y, eps)
    alpha = _pgd_alpha(alpha, eps, x)
    _check_count("steps", steps, 0)
    if isinstance(kappa, bool) or not isinstance(kappa, numbers.Real) or not 0 <= kappa < math.inf:
        raise ValueError(f"kappa must be a number >= 0 (the margin's confidence), got {kappa!r}")
    x_adv = _pgd_start(x0, eps, "linf", random_start, seed, None)
    kappa = torch.full((len(x0),), float(kappa), dtype=x0.dtype, device=x0.device)
    return _ascend(model, x0, y, x_adv, eps, alpha, steps, _cw, "linf", early_stop,
                   t=kappa).to(x.dtype)


def tpgd(model, x, y, eps, alpha=None, steps=100, early_stop=True, seed=None):
    """TPGD, TRADES' attack: L-inf PGD on KL(softmax(clean) || softmax(adv)): (B, ...) -> (B, ...).

    Zhang et al. 2019, "Theoretically Principled Trade-off between Robustness and Accuracy"; as
    torchattacks.TPGD: start at x + 0.001 * N(0, 1) (here also projected onto the ball, which
    torchattacks leaves to the first step), signed steps up the KL divergence of the model's
    prediction from its clean one. The loss needs no labels; y is what robust accuracy (and early
    stopping) is measured against. APT evaluates with torchattacks.TPGD(alpha=eps/4, steps=100).
    Arguments:
        model: callable images (B, ...) -> logits (B, C). x: images in [0,1]. y: classes (B,).
        eps: L-inf radius in pixel units. alpha (None): step size; None is eps / 4, APT's.
        steps (100): APT's (torchattacks' default is 7).
        early_stop (True): as pgd's; False returns the last iterate of every point.
        seed (None): seed of the Gaussian start; None draws it from torch's global RNG.
    Not a margin attack: it leaves some points a PGD-CE breaks. Its gradient is made of small
    differences of logits near the clean image, which a model computing in fp16 rounds: there it
    is weaker still (measured on the tests' confident toy classifier, 20 steps: PGD-CE broke the 20
    breakable points of 40 in either precision, TPGD 15 in fp32 and 13 in fp16).
    Usage: x_adv = tpgd(model, x, y, eps=4/255, alpha=1/255, steps=100)
    """
    x0, y = _prepare(x, y, eps)
    alpha = _pgd_alpha(alpha, eps, x)
    _check_count("steps", steps, 0)
    z_clean = _clean_logits(model, x0, y)
    gen = _generator(seed, x.device)
    noise = torch.randn(x0.shape, generator=gen, device=x.device, dtype=x0.dtype)
    x_adv = _project(x0 + 0.001 * noise, x0, eps, "linf")
    return _ascend(model, x0, y, x_adv, eps, alpha, steps, _kl, "linf", early_stop, t=z_clean,
                   z_clean=z_clean, check_labels=False).to(x.dtype)


def diverse_inputs(x, p, gen=None, resize_rate=0.9):
    """DI-FGSM's input diversity: images (B, C, S, S) -> resized, zero-padded back (probability p).

    Xie et al. 2019, "Improving Transferability of Adversarial Examples with Input Diversity", as
    torchattacks.DIFGSM draws it (its defaults resize_rate 0.9, diversity_prob 0.5, which the
    baselines' `di` attack uses: xinwong/Multimodal-Adversarial-Prompt-Tuning, trainers/advvpt.py
    before_adv_test), one draw per call for the whole batch, from gen in this order: a coin (below
    p: transform), a side rnd uniform in [floor(resize_rate * S), S - 1], top and left each uniform
    in [0, S - rnd - 1]; then a bilinear resize (align_corners=False, no antialiasing) to rnd x
    rnd, placed at (top, left) in an S x S frame of zeros. Xie et al. enlarge instead (299 -> [299,
    330), padded to 330), which changes the size: CLIP's encoders take one size.
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
    square (B, C, S, S) with at least one pixel left after the resize."""
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

    Kurakin et al. 2017's iterative FGSM (from x, `steps` signed steps of alpha up the surrogate's
    cross-entropy, projected onto the ball and box) with Xie et al. 2019's input diversity
    (diverse_inputs) with probability `diversity` at each step: torchattacks.DIFGSM with decay 0
    (no momentum), the baselines' `di` attack (see diverse_inputs), run on a surrogate. `model`
    is only asked for its number of classes: every point gets every step on the surrogate, and the
    crafted images do not depend on the model (one crafting serves every model: evaluate.py
    --save-adv), which sees only them, as a black-box model would. So a point the model gets wrong
    on the clean image gets a crafted image too, which may happen to fool it less: count a point
    broken where the model is wrong on either image to keep robust <= clean accuracy point by
    point, as the other attacks do (evaluate.py --pgd-score any), or on the crafted one alone
    (--pgd-score last, the baselines' scoring).
    Arguments:
        model: the target, callable images -> logits (B, C). surrogate: callable images -> logits
            (B, C) of the same classes in the same order (refused otherwise).
        eps: L-inf radius in pixel units. alpha (1/255), steps (100): the baselines' test attack.
        diversity (0.0): the probability p of DI's transform (torchattacks' default 0.5); 0 is
            plain I-FGSM.
        seed (None): seed of DI's draws; None draws them from torch's global RNG.
    Usage: x_adv = transfer(target, x, y, eps=4/255, surrogate=zero_shot, diversity=0.5, seed=0)
    """
    x0, y = _prepare(x, y, eps)
    _check_radius("alpha", alpha, "linf", x)
    _check_count("steps", steps, 0)
    _check_diversity(x0, diversity)
    classes = _clean_logits(model, x0, y).shape[1]
    with torch.no_grad():
        theirs = surrogate(x0).shape[1]
    if theirs != classes:
        raise ValueError(f"the surrogate gives {theirs} logits, the model {classes}: a transfer "
                         "attack needs a surrogate of the same classes")
    gen = _generator(seed, x.device)
    crafter = surrogate if not diversity else lambda v: surrogate(diverse_inputs(v, diversity, gen))
    return _ascend(crafter, x0, y, x0, eps, alpha, steps, _ce, "linf", early_stop=False,
                   check_labels=False).to(x.dtype)


# ----------------------------------------------------------------------------- APGD

def _checkpoints(steps):
    """APGD's step-size checkpoints w_j = ceil(p_j * steps), p_1 = 0.22,
    p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), as 1-based step counts."""
    p_prev, p, w = 0.0, 0.22, set()
    while p <= 1:
        w.add(math.ceil(round(p * steps, 6)))
        p_prev, p = p, p + max(p - p_prev - 0.03, 0.06)
    return sorted(w)


def _apgd_run(model, x, y, eps, steps, loss_fn, norm, gen, t=None, eot=1, rho=0.75):
    """One APGD run on points (n, ...) from a random start on the eps sphere.

    Returns (x_out, fooled (n,)): x_out holds the first iterate that fooled the model where one
    did (such points leave the run at once) and the highest-loss iterate elsewhere."""
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


def apgd(model, x, y, eps, steps=100, loss="ce", restarts=1, seed=0, norm="linf", eot=1):
    """APGD (Croce & Hein 2020) on the "ce" or "dlr" loss: (B, ...) -> x_adv (B, ...).

    Each restart runs on the points still robust; eot > 1 averages loss, gradient and logits
    over that many forward passes (for randomised models). Points never broken get the
    highest-loss iterate of their last run."""
    losses = {"ce": _ce, "dlr": _dlr}
    if loss not in losses:
        raise ValueError(f"loss must be 'ce' or 'dlr', got {loss!r}")
    x0, y = _prepare(x, y, eps, norm)
    _check_count("steps", steps, 0)
    _check_count("restarts", restarts, 1)
    _check_count("eot", eot, 1)
    gen, out = _generator(seed, x.device), x0.clone()
    robust = _clean_logits(model, x0, y).argmax(1) == y
    for _ in range(restarts):
        i = robust.nonzero()[:, 0]
        if not len(i):
            break
        out[i], fooled = _apgd_run(model, x0[i], y[i], eps, steps, losses[loss], norm, gen, eot=eot)
        robust[i[fooled]] = False
    return out.to(x.dtype)


def apgd_targeted(model, x, y, eps, steps=100, n_targets=9, seed=0, norm="linf"):
    """APGD-T: one APGD run on the targeted DLR loss for each of the n_targets classes ranked
    highest by clean logit after y, each on the points still robust: (B, ...) -> (B, ...)."""
    x0, y = _prepare(x, y, eps, norm)
    _check_count("steps", steps, 0)
    _check_count("n_targets", n_targets, 1)
    gen, out = _generator(seed, x.device), x0.clone()
    z = _clean_logits(model, x0, y)
    robust = z.argmax(1) == y
    targets = z.argsort(1, descending=True)[:, 1:n_targets + 1]
    for k in range(targets.shape[1]):
        i = robust.nonzero()[:, 0]
        if not len(i):
            break
        out[i], fooled = _apgd_run(model, x0[i], y[i], eps, steps, _dlr_targeted, norm, gen,
                                   t=targets[i, k])
        robust[i[fooled]] = False
    return out.to(x.dtype)


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
    hi = torch.ones(len(x), dtype=x.dtype, device=x.device)
    lo = torch.zeros_like(hi)
    for _ in range(steps):
        mid = (lo + hi) / 2
        fooled = _predict(model, x + _bc(mid, x) * (x_adv - x)) != y
        lo, hi = torch.where(fooled, lo, mid), torch.where(fooled, mid, hi)
    return torch.where(_bc(hi < 1, x), x + _bc(hi, x) * (x_adv - x), x_adv)


def _fab_run(model, x, y, t, eps, steps, early_stop, alpha_max=0.1, eta=1.05, beta=0.9):
    """Targeted FAB (L-inf) from x itself towards classes t, on points (n, ...) that the model
    classifies correctly. Returns (x_adv, dist (n,)): the closest adversarial found and its
    L-inf distance (inf where none). early_stop drops points once dist <= eps."""
    best, dist = x.clone(), torch.full((len(x),), math.inf, dtype=x.dtype, device=x.device)
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
        fooled = _predict(model, cur) != ya
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
    closest adversarial found is within eps; others come back unchanged. early_stop=False keeps
    minimising on every point and target (to measure the smallest perturbation, e.g. eps=1)."""
    x0, y = _prepare(x, y, eps)
    _check_count("steps", steps, 0)
    _check_count("n_targets", n_targets, 1)
    z = _clean_logits(model, x0, y)
    correct = z.argmax(1) == y
    targets = z.argsort(1, descending=True)[:, 1:n_targets + 1]
    out, dist = x0.clone(), torch.full((len(x0),), math.inf, dtype=x0.dtype, device=x0.device)
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
    """Fraction of the image the square covers at proposal `it`: Square Attack's piecewise
    schedule, not rescaled to the query budget (as in AutoAttack)."""
    for k, bound in enumerate((10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)):
        if it <= bound:
            return p_init / 2 ** k
    return p_init / 512


def square(model, x, y, eps, queries=5000, p_init=0.8, seed=0):
    """Square Attack (Andriushchenko et al. 2020, L-inf): random search on the margin loss from a
    vertical-stripe start, then `queries` square proposals at most per point, each accepted only
    if it lowers the margin: images (B, C, H, W) -> (B, C, H, W)."""
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
    with torch.no_grad():
        z = model(best)
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
        with torch.no_grad():
            z = model(cand)
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

    Members run in the published order, each on the points still robust, and each point keeps
    the first adversarial found (the worst case). "standard": APGD-CE, APGD-T (9 targets),
    FAB-T (9 targets), Square (`queries`); "rand", for randomised defences: APGD-CE and APGD-DLR
    with 20 EOT samples per gradient. "apgd-ce+apgd-t" is NOT AutoAttack but the reduced ensemble
    that TeCoA (Mao et al. 2023) and RobustVLM (Schlarmann et al. 2024) report as "AA": APGD-CE
    then APGD-T (9 targets); name it "apgd-ce+apgd-t" in results. With return_info, returns
    (x_adv, info): info["clean"] and info["robust"] count the points classified correctly before
    and after, info[member] the points that member broke, e.g. {"clean": 90, "apgd-ce": 50, ...,
    "robust": 30}."""
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
            broken = _predict(model, adv) != y[i]
            out[i[broken]], robust[i[broken]] = adv[broken], False
        info[name] = int(broken.sum())
    info["robust"] = int(robust.sum())
    return (out.to(x.dtype), info) if return_info else out.to(x.dtype)
