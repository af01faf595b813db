"""SimCLR on ImageNet-1k: the paper's default recipe (ResNet-50, 224 px, blur, batch 4096, LARS).

Run (a TPU pod slice or a multi-GPU host; the global batch is split over every device of every
process, and each process streams only its own devices' rows):
  python run.py --config configs/imagenet_simclr.py --workdir gs-or-local/run \
      --config.data.data_dir=/path/to/tensorflow_datasets      # imagenet2012, array_record
or, from an image folder (DIR/train/<wnid>/*.JPEG, DIR/validation/<wnid>/*.JPEG):
  python run.py --config configs/imagenet_simclr.py --workdir W --config.data.name=folder \
      --config.data.data_dir=DIR

Taken from the official code (google-research/simclr, v1): its README's ImageNet command,
"which reflects the default hyperparameters in our paper" -- `--train_batch_size=4096
--train_epochs=100 --learning_rate=0.3 --weight_decay=1e-6 --temperature=0.1
--dataset=imagenet2012 --image_size=224 --eval_split=validation` -- with the code's defaults for
what it leaves out: ResNet-50, colour-jitter strength 1.0, Gaussian blur on (each view blurred
with probability 0.5), linear LR scaling (0.3 x 4096 / 256 = 4.8), 10 warm-up epochs then cosine,
LARS with momentum 0.9 excluding biases and BN. The paper's projection head is a 2-layer MLP to
128 dimensions (section 2.1, figure 8 for the dimension).

What to expect, with sources: the official README says its linear evaluation of this 100-epoch
run "should give you around 64.5% accuracy" (top-1 on the validation split); its released
ResNet-50 (1x), pretrained for 1000 epochs, lists 69.1% (README table; the paper's table 6 gives
69.3%). Not reproduced here: no machine of this project holds ImageNet. The README says 100
epochs take "around 6 hours with 32 TPU v3s".

Host side: images are decoded and resized on host threads to a 256 px canvas (shorter side,
centre crop; `images.to_canvas`), and the random resized crop to 224 px is taken from it on the
device. The official code crops from the full-resolution image instead: ours sees at most the
central square of each photograph. Normalisation uses the usual ImageNet channel statistics
(the official code feeds [0, 1] pixels unnormalised; the BN after the stem makes the two close).
"""

from configs import cifar_simclr


def get_config():
    c = cifar_simclr.get_config()
    c.precision = "bfloat16"  # TPU / GPU matrix units; parameters, BN and the loss stay float32
    c.data.name = "imagenet2012"
    c.data.train_split = "train"
    c.data.test_split = "validation"  # the official --eval_split
    c.data.image_size = 224
    c.data.canvas = 256
    c.data.cache_gb = 0.0  # 1.28M images: always streamed
    c.data.mean = (0.485, 0.456, 0.406)  # ImageNet's statistics: no pass over 1.28M images
    c.data.std = (0.229, 0.224, 0.225)
    c.augment.jitter_strength = 1.0
    c.augment.blur_prob = 0.5
    c.model.name = "resnet50"
    c.model.stem = "imagenet"
    c.model.head_layers = 2
    c.model.proj_dim = 128
    c.pretrain.batch_size = 4096
    c.pretrain.epochs = 100
    c.pretrain.learning_rate = 0.3  # x batch / 256 (linear): 4.8
    c.pretrain.temperature = 0.1
    c.pretrain.weight_decay = 1e-6
    c.pretrain.warmup_epochs = 10.0
    c.pretrain.log_every = 100
    c.pretrain.checkpoint_every = 2000
    c.pretrain.knn_every = 10
    # Downstream on 1% of the labels (the paper's semi-supervised split size, 12.8k images):
    # the linear probe and kNN on frozen features, and fine-tune vs scratch at 30 / 90 epochs.
    c.downstream.label_fraction = 0.01
    c.downstream.epochs = 30
    c.downstream.long_epochs = 90
    c.downstream.batch_size = 1024
    c.downstream.pixel_size = 32  # the raw-pixel baselines at 32 px: 224 px pixels do not fit
    return c
