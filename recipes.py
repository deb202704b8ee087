"""recipes.py: every default of train.py in one place, each with its source.

A recipe is how a method's own source trains it: the loss, the optimiser and schedule, the data
budget and the training attack. Each method trains with its source's recipe by default
(METHOD_RECIPE); `train.py --recipe NAME` trains any method with another one, for controlled
comparisons, and any explicit flag wins over the recipe.

Source tags:
  [B]  the baselines' repository (AdvCoOp / AdvVPT / AdvIVLP / AdvMaPLe, adversarial MaPLe fork)
  [D]  the NAP-Tuning first author's development repository (a MaPLe fork)
  [T]  TeCoA, Mao et al., ICLR 2023 (cvlab-columbia/ZSRobust4FoundationModel)
  [F]  FARE, Schlarmann et al., ICML 2024 (chs20/RobustVLM, which also trains TeCoA)
  [C]  a choice of this implementation where the sources are silent

The two prompt-tuning families train at different radii, as their sources do: the baselines [B]
at eps 1/255 with PGD-2 from a random start, NAP [D] at eps 4/255 with PGD-5 from the clean image.
Every model is evaluated at the paper's radius, 1/255, unless evaluate.py's --eps says otherwise.
"""
from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class Recipe:
    """The training defaults of one source; train.py exposes every field as a flag."""
    loss: str             # adv | half | trades | curriculum | fare (train.LOSSES)
    optimizer: str        # sgd (momentum 0.9) | adamw
    lr: float             # peak learning rate, reached after the warm-up, then cosine to 0
    weight_decay: float   # L2 for sgd, decoupled for adamw
    warmup_epochs: int    # epochs at the constant warmup_lr before the cosine schedule
    warmup_lr: float
    epochs: int
    shots: int            # training images per class
    batch_size: int       # global batch (split over torchrun processes)
    eps: float            # training attack: L-inf radius in pixels
    alpha: float          # training attack: step size in pixels
    steps: int            # training attack: PGD iterations
    start: str            # training attack's start: random (uniform in the ball) | clean | gauss (x + 0.001 N(0,1))
    beta: float           # TRADES weight of KL(clean || adv)
    clean_weight: float   # FARE/TeCoA weight of the clean term (0: adversarial only)
    augment: str          # crop-flip (random resized crop + flip) | none
    source: str           # the tags above, for --help and the README's recipe table


RECIPES = {
    # [B]: `half` loss, SGD 0.0035 (m 0.9, wd 5e-4), 1 warm-up epoch at 1e-5, cosine, 100 epochs,
    # batch 32, 16 shots; PGD-2 at 1/255, step 1/255, random start; crop + flip.
    "baselines": Recipe(loss="half", optimizer="sgd", lr=0.0035, weight_decay=5e-4, warmup_epochs=1, warmup_lr=1e-5,
                        epochs=100, shots=16, batch_size=32, eps=1 / 255, alpha=1 / 255, steps=2, start="random",
                        beta=1.0, clean_weight=0.0, augment="crop-flip", source="[B]"),
    # [D]: curriculum loss with the feature-consistency term, AdamW 1e-4, 1 warm-up epoch at 1e-6,
    # cosine, 30 epochs; PGD-5 at 4/255, step 1.5 eps / 5, from the clean image. Weight decay,
    # shots, batch and augmentation as [B] (the MaPLe fork's config) [C].
    "nap": Recipe(loss="curriculum", optimizer="adamw", lr=1e-4, weight_decay=5e-4, warmup_epochs=1, warmup_lr=1e-6,
                  epochs=30, shots=16, batch_size=32, eps=4 / 255, alpha=1.5 * (4 / 255) / 5, steps=5, start="clean",
                  beta=1.0, clean_weight=0.0, augment="crop-flip", source="[D]"),
    # [T]: supervised adversarial fine-tuning of the image encoder: CE of PGD images against the frozen
    # text features of "This is a photo of a {}" (nap.PRESETS["tecoa"]); PGD-2 at 1/255, step 1/255,
    # uniform random start (its README's command). Its own optimiser defaults (SGD, lr 1e-7, 10 epochs of
    # ImageNet at batch 256) do not carry over to 16 shots: AdamW 1e-5, wd 1e-4 as [F] trains TeCoA.
    "tecoa": Recipe(loss="adv", optimizer="adamw", lr=1e-5, weight_decay=1e-4, warmup_epochs=1, warmup_lr=1e-6,
                    epochs=10, shots=16, batch_size=32, eps=1 / 255, alpha=1 / 255, steps=2, start="random",
                    beta=1.0, clean_weight=0.0, augment="crop-flip", source="[T] attack, loss; [F] optimiser"),
    # [F]: unsupervised: squared L2 distance (summed over dimensions, averaged over the batch) between the
    # unnormalised embedding of x' and the original encoder's embedding of x; x' maximises the same
    # distance by PGD-10, step 1/255, uniform random start; AdamW 1e-5, wd 1e-4; eps 1/255 (FARE^1).
    "fare": Recipe(loss="fare", optimizer="adamw", lr=1e-5, weight_decay=1e-4, warmup_epochs=1, warmup_lr=1e-6,
                   epochs=10, shots=16, batch_size=32, eps=1 / 255, alpha=1 / 255, steps=10, start="random",
                   beta=1.0, clean_weight=0.0, augment="crop-flip", source="[F]"),
}

METHOD_RECIPE = {"advpt": "baselines", "advvpt": "baselines", "advvlp": "baselines", "advmaple": "baselines",
                 "nap": "nap", "tecoa": "tecoa", "fare": "fare"}

# The toy world (`--arch toy`: a 4-layer CLIP on procedural 64-px images) changes only what its size
# forces, the same way for every recipe:
TOY = {
    "shots": 100,        # all 100 training images per class: 16 shots of 3-5 classes are too few to learn from
    "epochs": 30,        # 100 epochs of [B] take hours on a CPU; 30 is [D]'s count and enough on the toy
    "augment": "none",   # a random resized crop (0.08 of the area) cuts away the toy's single object
}
TOY_DEPTH = "a preset's depth J of 12 layers is scaled to the toy's 4: round(J * 4 / 12), so 9 -> 3"


def recipe_for(method: str, name: str = None, toy: bool = False) -> Recipe:
    """The recipe a method trains with: `name` if given, else its source's; with the toy's changes if toy."""
    name = name or METHOD_RECIPE.get(method)
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {list(RECIPES)}")
    recipe = RECIPES[name]
    return replace(recipe, **TOY) if toy else recipe


def as_dict(recipe: Recipe) -> dict:
    """The recipe's fields as a dict (without its source tag)."""
    return {k: v for k, v in asdict(recipe).items() if k != "source"}
