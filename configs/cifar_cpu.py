"""SimCLR on real CIFAR-10 in about 20 minutes of pretraining on 2 CPU cores.

Run (CIFAR-10 prepared in tfds format under DIR, e.g. ../shared/tensorflow_datasets):
  python run.py --config configs/cifar_cpu.py --workdir runs/cifar_cpu --config.data.data_dir=DIR

The official recipe (configs/cifar_simclr.py: ResNet-18 CIFAR stem, LARS at lr 1.0 x batch/256,
weight decay 1e-4, temperature 0.5, 3-layer head, the same augmentations) shrunk to what 2 cores
do in 20 minutes: a quarter-width ResNet-18 (16 base channels), 16x16 views (every image,
training and evaluation, is resized to 16 px: 4x cheaper than 32), batch 256, 9 epochs. The
downstream comparison uses 10% of the train labels (5,000 images, class-balanced).

What it reached on this project's 2-vCPU machine (2026-11-30; README.md "Results" has the table
with its baselines): 21.0 min of pretraining (~385 images/s), then with every train label the
frozen encoder's kNN (k=200, T=0.1) is 45.9% (43.1% / 45.7% after epochs 3 / 6) -- short of the
55% we aimed at; with 10% labels, linear probe 47.0% (raw-pixel logistic regression 39.0%), kNN
40.9% (raw pixels 27.4%), fine-tuned 54.5% vs scratch 39.7% after 10 epochs, 62.2% vs 54.2% after
30 (neither converged). 35:52 wall for the whole run. 32 px views in the same time do no better
(4 epochs, ~155 images/s: 44.6% kNN with every label).
"""

from configs import cifar_simclr


def get_config():
    c = cifar_simclr.get_config()
    c.model.width = 0.25  # 16 base channels
    c.data.image_size = 16
    c.pretrain.batch_size = 256
    c.pretrain.epochs = 9  # 1,755 steps, ~20 min at ~390 images/s
    c.pretrain.warmup_epochs = 0.5
    c.pretrain.checkpoint_every = 390
    c.pretrain.knn_every = 3  # kNN monitor (all train labels) after epochs 3, 6 and 9
    c.downstream.label_fraction = 0.1
    c.downstream.long_epochs = 30
    c.settings_chosen_on = (
        "the official recipe shrunk to 20 CPU minutes; width, view size and epochs chosen for "
        "speed (images/s), not on accuracy"
    )
    return c
