"""recipes.py: every default of train.py in one place, each with its source and the evidence for it.

A recipe is how a method's own source trains it: the loss, the optimiser and schedule, the data
budget and the training attack. Each method trains with its source's recipe by default
(METHOD_RECIPE); `train.py --recipe NAME` trains any method with another one, for controlled
comparisons, and any explicit flag wins over the recipe.

Source tags, with the commits the numbers were read at:
  [B]  the baselines' repository, xinwong/Multimodal-Adversarial-Prompt-Tuning @926889f7
       (AdvCoOp / AdvVPT / AdvIVLP / AdvMaPLe on Dassl)
  [D]  the NAP-Tuning first author's development repository, jiamingzhang94/MAPT (a MaPLe fork on
       Dassl): @d26abda8 the latest code; @9a9bb04e the one logged run (logs/imagnet.out)
  [T]  TeCoA, Mao et al., ICLR 2023: cvlab-columbia/ZSRobust4FoundationModel @1243db66
  [F]  FARE, Schlarmann et al., ICML 2024: chs20/RobustVLM @7de10ee (which also trains TeCoA)
  [C]  a choice of this implementation where the sources are silent
Dassl (under [B] and [D]) defaults what their configs leave out: SGD momentum 0.9, weight decay 5e-4
(dassl/config/defaults.py OPTIM.MOMENTUM, OPTIM.WEIGHT_DECAY).

The two prompt-tuning families train at different radii, as their sources do: the baselines [B]
at eps 1/255 with PGD-2 from a random start, NAP [D] at eps 4/255 with PGD-5 from the clean image.
TeCoA and FARE fine-tune on every training image with their sources' budgets (`tecoa`, `fare`); their
few-shot variants (`tecoa-fewshot`, `fare-fewshot`) are the 16-shot fine-tune of the prompt protocol.
Every model is evaluated at the paper's radius, 1/255, unless evaluate.py's --eps says otherwise.
"""
from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class Recipe:
    """The training defaults of one source; train.py exposes every field as a flag."""
    loss: str             # adv | half | trades | curriculum | fare (train.LOSSES)
    optimizer: str        # sgd (momentum 0.9) | adamw
    lr: float             # peak learning rate
    weight_decay: float   # L2 for sgd, decoupled for adamw
    schedule: str         # epoch: warmup_epochs at warmup_lr, then cosine per epoch (Dassl) | step: linear warm-up
                          # over warmup_steps, then cosine per step to 0 at the last step (cosine_lr of [T] and [F])
    warmup_epochs: int    # schedule epoch: epochs at the constant warmup_lr
    warmup_lr: float
    warmup_steps: int     # schedule step: steps of the linear warm-up lr * (step + 1) / warmup_steps
    epochs: int           # passes over the training set (0: as many as max_steps needs)
    max_steps: int        # > 0: stop after this many optimiser steps, the last epoch cut short (0: `epochs` epochs)
    shots: int            # training images per class (0: every training image)
    batch_size: int       # global batch (split over torchrun processes)
    eps: float            # training attack: L-inf radius in pixels
    alpha: float          # training attack: step size in pixels
    steps: int            # training attack: PGD iterations
    start: str            # training attack's start: random (uniform in the ball) | clean
    attack_momentum: float  # training attack: sign momentum v <- sign(m v + sign(grad)), steps along v (0: plain PGD)
    beta: float           # TRADES weight of KL(clean || adv)
    clean_weight: float   # weight of a clean term beside the adversarial one (0: adversarial only)
    augment: str          # crop-flip (random resized crop + flip) | none (the evaluation's resize + centre crop)
    source: str           # the tags and where each number was read, for --help and the README's recipe table


RECIPES = {
    # [B] @926889f7 configs/trainers/AdvCoOp/vit_b16_c2_ep100_batch32.yaml (the same numbers in the AdvVPT,
    # AdvIVLP and AdvMaPLe configs): batch 32 (:3); random resized crop + flip (:13); SGD 0.0035, 100 epochs,
    # cosine, 1 constant warm-up epoch at 1e-5 (:16-22); PGD-2 at 1/255, step 1/255, loss adv_half (:34-37).
    # trainers/advcoop.py:372-376: torchattacks.PGD(random_start=True); :385-387 the half-clean batch.
    # scripts/AdvCoOp/zs_vit16_train_AdvCoOp.sh:9,12: 16 shots, seed 1. Momentum 0.9, wd 5e-4: Dassl's defaults.
    "baselines": Recipe(loss="half", optimizer="sgd", lr=0.0035, weight_decay=5e-4, schedule="epoch", warmup_epochs=1,
                        warmup_lr=1e-5, warmup_steps=0, epochs=100, max_steps=0, shots=16, batch_size=32,
                        eps=1 / 255, alpha=1 / 255, steps=2, start="random", attack_momentum=0.0, beta=1.0,
                        clean_weight=0.0, augment="crop-flip",
                        source="[B] @926889f7 configs/trainers/AdvCoOp/vit_b16_c2_ep100_batch32.yaml:3,13,16-22,34-37; "
                               "trainers/advcoop.py:372-387; scripts/AdvCoOp/zs_vit16_train_AdvCoOp.sh:9; "
                               "Dassl defaults"),
    # [D] @d26abda8, the latest code:
    #   trainers/maple.py MaPLe._compute_loss: loss * (T - e) / T + (adv_loss + consistency_loss) * (1 - (T - e) / T),
    #     e = self.epoch (0-based), T = max_epoch; consistency = sum over the refiner keys of 1 - cos(clean, adv),
    #     on with FEATURE_CONSTRAIN = --feature (scripts/main.sh passes --feature True).
    #   train.py:101 EPSILON = 4 / 255; :104 ADV_STEPS = 5; --num_shots default 16.
    #   trainers/maple.py CustomCLIP._init_attacks: PGD 'alpha': None, so attack.py's BaseAttack uses
    #     eps / steps * 1.5; PGDAttack starts from delta = 0 (the clean image). (attack.py is not indexed at
    #     d26abda8; the stored attack.py versions of the repository all read so.)
    #   configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml: batch 32 (:3); crop + flip (:13); AdamW (:16),
    #     lr 1e-4 (:17), 30 epochs (:18), cosine (:19), 1 constant warm-up epoch at 1e-6 (:20-22). wd 5e-4: Dassl.
    "nap": Recipe(loss="curriculum", optimizer="adamw", lr=1e-4, weight_decay=5e-4, schedule="epoch", warmup_epochs=1,
                  warmup_lr=1e-6, warmup_steps=0, epochs=30, max_steps=0, shots=16, batch_size=32, eps=4 / 255,
                  alpha=1.5 * (4 / 255) / 5, steps=5, start="clean", attack_momentum=0.0, beta=1.0, clean_weight=0.0,
                  augment="crop-flip",
                  source="[D] @d26abda8 trainers/maple.py MaPLe._compute_loss, CustomCLIP._init_attacks; "
                         "train.py:101,104; configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml:3,13,16-22"),
    # [D] @9a9bb04e, the one logged run (logs/imagnet.out; the committed config of that commit says batch 64,
    # lr 1e-5, 30 epochs, so the log, not the config, is the evidence for those):
    #   trainers/maple.py MaPLe._compute_loss: loss_total = loss * 0.5 + adv_loss * 0.5 (clean and adversarial CE
    #     of every image) -> loss adv with clean_weight 0.5.
    #   train.py:101 EPSILON = 1 / 255; :104 ADV_STEPS = 5; the attack as at d26abda8 (step 1.5 eps / 5, clean start).
    #   log: "epoch [1/20]" (20 epochs, of which 14 were logged); "# train_x 16,000" in "batch [500/500]" (batch 32);
    #     "shot_16-seed_1.pkl"; "random resized crop ... + random flip"; lr 1.0000e-06 in epoch 1, 1.0000e-04 in
    #     epoch 2, then per epoch 9.9384e-05, ..., 5.0000e-05 in epoch 12: 1 warm-up epoch at 1e-6, then cosine with
    #     T = 20 epochs. The optimiser is not printed: AdamW as in the config of that commit (:16); wd 5e-4: Dassl.
    "nap-logged": Recipe(loss="adv", optimizer="adamw", lr=1e-4, weight_decay=5e-4, schedule="epoch", warmup_epochs=1,
                         warmup_lr=1e-6, warmup_steps=0, epochs=20, max_steps=0, shots=16, batch_size=32, eps=1 / 255,
                         alpha=1.5 * (1 / 255) / 5, steps=5, start="clean", attack_momentum=0.0, beta=1.0,
                         clean_weight=0.5, augment="crop-flip",
                         source="[D] @9a9bb04e logs/imagnet.out; trainers/maple.py MaPLe._compute_loss; "
                                "train.py:101,104; AdamW from configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml:16"),
    # [T] @1243db66: supervised adversarial fine-tuning of the image encoder, CE of PGD images against the frozen
    # text features of "This is a photo of a {}" (nap.PRESETS["tecoa"]).
    #   README.md:66: --batch_size 256 --dataset ImageNet --train_eps 1 --train_numsteps 2 --train_stepsize 1.
    #   finetuning.py:50 10 epochs; :56,58,60,62,64 SGD, lr 1e-7 (the README's command keeps this default),
    #     wd 0, 1000 warm-up steps, momentum 0.9; :483-484 cosine_lr over len(train_loader) * epochs steps,
    #     called before every step (:802-803); utils.py:35-49 lr (step + 1) / warmup, then cosine to 0.
    #   finetuning.py:321-326,350-352: all of ImageNet's training set, Resize(256) + CenterCrop(224), no
    #     augmentation; :656-670 attack_pgd: uniform start in the ball, CE.
    # Not reproduced [C]: its loader keeps the last partial batch (here every batch is full); its crop is
    # 224 of 256 where ours is the evaluation's resize + centre crop.
    "tecoa": Recipe(loss="adv", optimizer="sgd", lr=1e-7, weight_decay=0.0, schedule="step", warmup_epochs=0,
                    warmup_lr=1e-7, warmup_steps=1000, epochs=10, max_steps=0, shots=0, batch_size=256, eps=1 / 255,
                    alpha=1 / 255, steps=2, start="random", attack_momentum=0.0, beta=1.0, clean_weight=0.0,
                    augment="none",
                    source="[T] @1243db66 README.md:66; finetuning.py:50,56-64,321-326,350-352,483-484,656-670; "
                           "utils.py:35-49"),
    # [F] @7de10ee: unsupervised: squared L2 distance (summed over dimensions, averaged over the batch) between the
    # unnormalised embedding of x' and the original encoder's embedding of x; x' maximises the same distance.
    #   README.md:282 (FARE): --steps 20000 --warmup 1400 --batch_size 128 --loss l2 --opt adamw --lr 1e-5
    #     --wd 1e-4 --attack pgd --inner_loss l2 --norm linf --eps 4 --iterations_adv 10 --stepsize_adv 1
    #     --output_normalize False; :284 "--eps 2" for FARE^2.
    #   train/adversarial_training_clip.py:106-116,120-123: all of ImageNet's training set, resize + centre crop
    #     224, no augmentation; :147 shuffled full batches (drop_last); :197 AdamW; :211 open_clip's cosine_lr
    #     (linear warm-up, cosine to 0 at --steps); :221 steps, not epochs; :318 uniform start in the ball.
    #   train/pgd_train.py:17 momentum=0.9, :45-52 v <- sign(0.9 v + sign(grad)), x' <- x' + step * v.
    # [C]: eps 1/255 (FARE^1), the paper's evaluation radius and TeCoA's; the step stays the source's 1/255
    # (its commands keep --stepsize_adv 1 at eps 2 and 4). Not reproduced [C]: its scheduler runs after each
    # step, so its first step uses the full lr; here step 0 uses lr / warmup_steps like every warm-up step.
    "fare": Recipe(loss="fare", optimizer="adamw", lr=1e-5, weight_decay=1e-4, schedule="step", warmup_epochs=0,
                   warmup_lr=1e-5, warmup_steps=1400, epochs=0, max_steps=20_000, shots=0, batch_size=128,
                   eps=1 / 255, alpha=1 / 255, steps=10, start="random", attack_momentum=0.9, beta=1.0,
                   clean_weight=0.0, augment="none",
                   source="[F] @7de10ee README.md:282; train/adversarial_training_clip.py:106-123,147,197,211,221,318; "
                          "train/pgd_train.py:17,45-52; eps 1/255 [C]"),
    # The 16-shot fine-tune of the prompt protocol (16 shots [B], batch 32 [B], crop + flip [C]): the sources'
    # losses and attacks; AdamW 1e-5, wd 1e-4 as [F] trains TeCoA too (README.md:277); 10 epochs as [T];
    # 1 warm-up epoch at 1e-6 [C]. The toy trains tecoa and fare with these (TOY_RECIPE).
    "tecoa-fewshot": Recipe(loss="adv", optimizer="adamw", lr=1e-5, weight_decay=1e-4, schedule="epoch",
                            warmup_epochs=1, warmup_lr=1e-6, warmup_steps=0, epochs=10, max_steps=0, shots=16,
                            batch_size=32, eps=1 / 255, alpha=1 / 255, steps=2, start="random", attack_momentum=0.0,
                            beta=1.0, clean_weight=0.0, augment="crop-flip",
                            source="[T] @1243db66 attack, loss, epochs; [F] @7de10ee README.md:277 optimiser; "
                                   "[B] shots, batch; [C] warm-up, augmentation"),
    "fare-fewshot": Recipe(loss="fare", optimizer="adamw", lr=1e-5, weight_decay=1e-4, schedule="epoch",
                           warmup_epochs=1, warmup_lr=1e-6, warmup_steps=0, epochs=10, max_steps=0, shots=16,
                           batch_size=32, eps=1 / 255, alpha=1 / 255, steps=10, start="random", attack_momentum=0.9,
                           beta=1.0, clean_weight=0.0, augment="crop-flip",
                           source="[F] @7de10ee loss, attack, optimiser; [B] shots, batch; [C] epochs, warm-up, "
                                  "augmentation, eps"),
}

# AdvPT is [B]'s AdvCoOp, whose training script uses 32 randomly initialised context tokens
# (scripts/AdvCoOp/zs_vit16_train_AdvCoOp.sh:8 NCTX=32); that is the advpt preset's business (nap.PRESETS).
METHOD_RECIPE = {"advpt": "baselines", "advvpt": "baselines", "advvlp": "baselines", "advmaple": "baselines",
                 "nap": "nap", "tecoa": "tecoa", "fare": "fare"}

# The toy world (`--arch toy`: a 4-layer CLIP on procedural 64-px images) changes only what its size
# forces, the same way for every recipe:
TOY = {
    "shots": 100,        # all 100 training images per class: 16 shots of 3-5 classes are too few to learn from
    "epochs": 30,        # 100 epochs of [B] take hours on a CPU; 30 is [D]'s count and enough on the toy
    "augment": "none",   # a random resized crop (0.08 of the area) cuts away the toy's single object
}
# ... and its few hundred images cannot carry the fine-tuners' ImageNet budgets (10 epochs of SGD at lr 1e-7,
# 20,000 steps at batch 128): it trains tecoa and fare with their few-shot recipes, with the changes above.
TOY_RECIPE = {"tecoa": "tecoa-fewshot", "fare": "fare-fewshot"}
TOY_DEPTH = "a preset's depth J of 12 layers is scaled to the toy's 4: round(J * 4 / 12), so 9 -> 3"


def recipe_name(method: str, name: str = None, toy: bool = False) -> str:
    """The name of the recipe a method trains with: `name` if given, else its source's; the toy's stand-in if toy."""
    name = name or METHOD_RECIPE.get(method)
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {list(RECIPES)}")
    return TOY_RECIPE.get(name, name) if toy else name


def recipe_for(method: str, name: str = None, toy: bool = False) -> Recipe:
    """The recipe a method trains with: `name` if given, else its source's; with the toy's changes if toy."""
    recipe = RECIPES[recipe_name(method, name, toy)]
    return replace(recipe, **TOY) if toy else recipe


def tag(name: str) -> str:
    """A recipe's source tags, e.g. "[T]" or "[T][F][B][C]", in the order they first appear in its source."""
    source = RECIPES[name].source
    tags = [source[i:i + 3] for i in range(len(source) - 2) if source[i] == "[" and source[i + 2] == "]"]
    return "".join(dict.fromkeys(tags))


def as_dict(recipe: Recipe) -> dict:
    """The recipe's fields as a dict (without its source tag)."""
    return {k: v for k, v in asdict(recipe).items() if k != "source"}
