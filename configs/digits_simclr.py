"""The embedded default: SimCLR on scikit-learn's handwritten digits, a few minutes on 2 CPU cores.

Run (no network, no data to prepare):
  python run.py --config configs/digits_simclr.py --workdir runs/digits

The 1,797 8x8 digit images ship with scikit-learn; they are resized to 16x16 RGB and split
80/20 into train/test with a fixed permutation. Pretraining uses every train image without its
label; the evaluation uses a 5% class-balanced labelled subset (72 images, 7-8 a class): the
frozen encoder's linear probe and kNN against raw pixels and the random-init encoder, and the
same classifier fine-tuned from the SimCLR encoder and trained from scratch, for 10 epochs and
for 200. What it measured is in docs/results.md ("The digits demo").

Settings chosen on validation data, never on test numbers (`python
benchmarks/choose_demo_settings.py`; results in benchmarks/results/digits_settings/): with 20% of
the train split held out (`--config.data.validation_fraction=0.2`) and seeds 0 and 1, 160
pretraining epochs beat 96 and 48 on the frozen probes' validation accuracy (linear + kNN mean
93.6% against 91.8% and 86.1%). 160 is the largest number of epochs tried, to keep the demo to a
few minutes on 2 cores: the pick sits at that edge, and more epochs may well do better.

Each classifier run has its own learning rate (downstream.runs), from one search over the same
grid (0.003, 0.01, 0.03, 0.1, 0.3), budgets and seeds for all four (mean validation accuracy at
the last epoch): fine-tuned 0.01 at 10 epochs (87.8%) and 0.03 at 200 (95.0%); from scratch 0.1
at 200 epochs (90.4%; 0.03 88.5%, 0.3 89.2%) and 0.3 at 10 (18.9%: near chance at every rate, so
that pick, at the grid's edge, is noise; 10 epochs are too few for scratch whatever the rate).

Distillation, after that run: `python run.py --config configs/digits_simclr.py --workdir
runs/digits --mode=distill` trains a student of the encoder's architecture from scratch on the
fine-tuned teacher's predictions over the 1,437 train images (labels unused), and the same student
on the 72 labels alone, and adds both to report.md (docs/beyond.md, "Distillation").
"""

from configs import cifar_simclr

# What the distillation's two learning rates were chosen on (docs/beyond.md, "Distillation");
# its epochs and temperature were fixed beforehand, not chosen.
DISTILL_CHOSEN = (
    "validation, for the two learning rates (the grid 0.03, 0.1, 0.3 for both students' rates "
    "(and 1.0 for the distilled one, whose pick sat at 0.3), seed 0, 20% of the train split held "
    "out: benchmarks/results/digits_distill/choices.md); the epochs (50, and 200 for the labels-"
    "only student) and T = 1 (SimCLRv2's) were fixed beforehand, not chosen"
)
DISTILL_LR = 0.3


def get_config():
    c = cifar_simclr.get_config()
    c.data.name = "digits"
    c.model.name = "resnet18"
    c.model.width = 0.125  # 8 base channels: small enough for 2 CPU cores
    c.data.image_size = 16  # the 8x8 sources hold no more: 4x cheaper than 32 px
    c.augment.flip_prob = 0.0  # a mirrored 2, 3, 4, 5, 7 or 9 is no digit
    c.augment.crop_scale_min = 0.3  # 8x8 sources carry little detail; keep crops informative
    c.pretrain.batch_size = 256
    c.pretrain.epochs = 160  # 800 steps of 256 images (chosen on validation: see the docstring)
    c.pretrain.learning_rate = 2.0
    c.pretrain.warmup_epochs = 10.0
    c.pretrain.log_every = 20
    c.pretrain.checkpoint_every = 120
    c.pretrain.knn_every = 40
    c.downstream.label_fraction = 0.05  # 72 labelled images (7-8 a class)
    # 3 steps an epoch on 72 images; 24 images per BatchNorm batch (at 8 the statistics are
    # too noisy: fine-tuning then wrecks the pretrained features before it improves them).
    c.downstream.batch_size = 24
    c.downstream.learning_rate = 0.01  # as is (no batch scaling); each run's own below
    c.downstream.lr_scaling = "none"
    chosen = (
        "validation (one search for every classifier run: the grid 0.003 to 0.3 at the run's own "
        "budget, seeds 0 and 1, 20% of the train split held out: "
        "benchmarks/results/digits_settings/choices.md)"
    )
    picks = {"finetune": 0.01, "scratch": 0.3, "finetune_long": 0.03, "scratch_long": 0.1}
    for run, lr in picks.items():
        c.downstream.runs[run].learning_rate = lr
        c.downstream.runs[run].chosen_on = chosen
    c.downstream.long_epochs = 200  # scratch still climbs after 100
    c.downstream.knn_k = 20
    # --mode=distill (after the demo's run, same --workdir): a student of the encoder's own
    # architecture learns finetune_long's predictions (T = 1, as SimCLRv2) over the pretraining
    # split's images, 128 a step (11 steps an epoch); its labels-only twin trains on the 72
    # labels as scratch_long does. Each rate picked on validation (DISTILL_CHOSEN).
    c.distill.teacher = "finetune_long"
    c.distill.temperature = 1.0
    c.distill.epochs = 50
    c.distill.batch_size = 128
    c.distill.lr_scaling = "none"
    c.distill.learning_rate = DISTILL_LR
    c.distill.labels_epochs = 200
    c.distill.labels_learning_rate = 0.1
    c.distill.chosen_on = DISTILL_CHOSEN
    c.settings_chosen_on = (
        "validation (pretraining epochs and each classifier run's learning rate; 20% of the "
        "train split held out, seeds 0 and 1: benchmarks/results/digits_settings/choices.md)"
    )
    return c
