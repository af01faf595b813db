"""SimCLR on CIFAR-10: the official recipe (ResNet-18, CIFAR stem, batch 512, LARS, 1000 epochs).

Run:
  python run.py --config configs/cifar_simclr.py --workdir runs/cifar \
      --config.data.data_dir=../shared/tensorflow_datasets

Checked against the SimCLR paper (Chen et al., 2020, appendix B.9) and the official code's
README command for CIFAR-10 (google-research/simclr, `--train_batch_size=512 --train_epochs=1000
--learning_rate=1.0 --weight_decay=1e-4 --temperature=0.5 --resnet_depth=18 --use_blur=False
--color_jitter_strength=0.5`, LARS, 10 warm-up epochs, linear LR scaling), with the code's
defaults for what the command leaves out: a 3-layer projection head (`num_proj_layers=3`) with BN
on its output, and the objective loss_a + loss_b (twice the mean NT-Xent; losses.py). The paper's
B.9 quotes weight decay 1e-6 for its ResNet-50 sweeps; we follow the code's 1e-4 for ResNet-18.

What to expect, with sources: the official README says the command "should give you around 91%
accuracy" (linear evaluation, ResNet-18, 1000 epochs); the paper's best CIFAR-10 model, a
ResNet-50 trained at batch 1024, reaches 94.0% linear evaluation (appendix B.9). Neither was
reproduced here (a 2-core CPU; docs/results.md has what was measured, and configs/cifar_cpu.py the
20-minute CPU run); expect a little less, since the prepared CIFAR-10 went through one JPEG
round trip.
"""

import ml_collections

# The downstream classifier runs, each with its own `downstream.runs.<run>` settings: fine-tuned
# from the SimCLR encoder and trained from scratch, for `epochs` and for `long_epochs`.
CLASSIFIER_RUNS = ("finetune", "scratch", "finetune_long", "scratch_long")


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # every RNG key (init, data order, augmentation) is folded from this
    # What the settings were chosen on (the report prints it): 'validation' only where they were
    # chosen with data.validation_fraction > 0, never looking at test numbers.
    c.settings_chosen_on = (
        "nothing here: the official recipe (google-research/simclr README and paper), not tuned"
    )
    c.precision = "float32"  # 'float32' or 'bfloat16' (convs/matmuls in bf16; params, BN, loss f32)
    c.restore = ""  # checkpoint dir to restore the encoder from in --mode=downstream ('' = workdir)
    c.overwrite = False  # allow a workdir that holds a run of a different config to be replaced
    c.data = _data()
    c.augment = _augment()
    c.model = _model()
    c.pretrain = _pretrain()
    c.downstream = _downstream()
    c.distill = _distill()
    c.distributed = _distributed()
    return c


def _data() -> ml_collections.ConfigDict:
    d = ml_collections.ConfigDict()
    d.name = "cifar10"  # 'digits' (embedded), 'folder' (an image folder) or a tfds image set
    # tfds: the data_dir of a prepared copy ('' = tfds' default, ~/tensorflow_datasets);
    # folder: DIR with DIR/train/<class>/*, DIR/test/<class>/* and optionally DIR/unlabelled/*.
    d.data_dir = ""
    d.pretrain_split = "train"  # what SimCLR trains on; 'a+b' joins splits ('train+unlabelled')
    d.train_split = "train"  # labelled: the kNN monitor's bank and the downstream labelled subset
    d.test_split = "test"  # labelled: every test accuracy
    d.image_size = 32  # side of the views fed to the encoder
    # Host side: images are decoded to a square canvas (shorter side resized to it, centre crop;
    # 0 = the dataset's own fixed size, CIFAR-10's 32, else image_size); the crops come from it.
    d.canvas = 0
    d.cache_gb = 0.25  # a split whose canvases fit in this many GiB is read into memory once
    d.read_threads = 0  # host threads that read and decode (0 = one per core, at most 16)
    d.prefetch = 2  # batches read ahead: this many on the host and this many on the devices
    d.max_bad_fraction = 0.1  # of a split's files that may not decode (skipped, named); more: stop
    # Per-channel input normalisation (x - mean) / std of pixels in [0, 1]; () = the train
    # split's statistics, computed when the data is loaded (and written to config.json).
    d.mean = ()
    d.std = ()
    d.max_train_examples = 0  # 0 = all; a smaller number subsamples (quick tests)
    # > 0: this class-balanced fraction of the train split (fixed, whatever the seed) is held out
    # and every evaluation scores it instead of the test split: the split to choose settings on.
    d.validation_fraction = 0.0
    return d


def _augment() -> ml_collections.ConfigDict:
    a = ml_collections.ConfigDict()
    a.crop_scale_min = 0.08  # random resized crop area in [crop_scale_min, 1]
    # Also the downstream classifiers' random flip: set 0 where the data the downstream stage
    # reads (downstream.data) is not mirror-invariant (digits), even if pretraining's was.
    a.flip_prob = 0.5
    a.jitter_strength = 0.5  # s: brightness/contrast/saturation 0.8 s, hue 0.2 s (CIFAR 0.5)
    a.jitter_prob = 0.8
    a.grayscale_prob = 0.2
    a.blur_prob = 0.0  # the official CIFAR recipe uses no blur
    return a


def _model() -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.name = "resnet18"  # resnet18 | resnet34 | resnet50 | tiny
    m.width = 1.0  # channel multiplier (base 64 channels)
    m.stem = "cifar"  # 'cifar' (3x3 stride 1, no max-pool) or 'imagenet' (7x7/2 + max-pool)
    # Projection head depth: 3 linear layers, the official code's default (num_proj_layers=3)
    # for its CIFAR-10 command; the paper's v1 head had 2.
    m.head_layers = 3
    m.head_hidden_dim = 0  # 0 = the encoder's feature dim
    m.proj_dim = 128  # z dimension
    # BN (no centring) on z, as the official SimCLR code's head; False: z = W2 relu(BN(W1 h)).
    m.head_bn_output = True
    return m


def _pretrain() -> ml_collections.ConfigDict:
    p = ml_collections.ConfigDict()
    p.batch_size = 512  # global: split over every device of every process
    p.epochs = 1000
    p.num_steps = 0  # > 0 overrides epochs
    p.temperature = 0.5  # tau of NT-Xent
    p.optimizer = "lars"  # lars | sgd | adamw
    p.learning_rate = 1.0  # base LR, scaled by batch_size/256 (linear) or sqrt(batch_size)
    p.lr_scaling = "linear"  # linear | sqrt | none
    p.warmup_epochs = 10.0  # linear warm-up, then cosine decay to 0
    p.weight_decay = 1e-4  # not applied to biases and BN parameters
    p.momentum = 0.9
    p.log_every = 50  # steps between metric fetches / log lines
    p.checkpoint_every = 1000  # steps between orbax checkpoints (and one at the end)
    p.keep_checkpoints = 3
    p.knn_every = 0  # epochs between kNN monitor evaluations (0 = off)
    # Online linear evaluation, as the official code's lineareval_while_pretraining: a linear
    # head on stop_gradient(h) of the first view, trained on the labels in the same step with
    # its own optimizer (never through the encoder); its train accuracy is logged every log_every
    # steps, its test accuracy at each kNN-monitor point. None: on where every pretraining image
    # has a label, off otherwise (docs/online_probe.md).
    p.online_probe = ml_collections.FieldReference(None, field_type=bool)
    return p


def _downstream() -> ml_collections.ConfigDict:
    d = ml_collections.ConfigDict()
    d.epochs = 10  # fine-tune and from-scratch classifiers: the short budget
    d.long_epochs = 100  # ... and the long one, to convergence (0 = off)
    d.label_fraction = 1.0  # class-balanced labelled subset of the train split
    d.batch_size = 256
    d.optimizer = "sgd"  # sgd | adamw | lars
    d.learning_rate = 0.1  # peak, scaled like pretraining (with downstream.batch_size)
    d.lr_scaling = "linear"
    d.warmup_epochs = 1.0
    d.weight_decay = 5e-4
    d.momentum = 0.9
    # Each classifier run's own peak learning rate (0 = learning_rate above) and what it was
    # chosen on ('' = settings_chosen_on): the fine-tuned and the from-scratch classifier, at each
    # budget, need not train best at one rate. Everything else is shared by the runs.
    d.runs = ml_collections.ConfigDict(
        {run: {"learning_rate": 0.0, "chosen_on": ""} for run in CLASSIFIER_RUNS}
    )
    # Linear probe on frozen (standardised) features: logistic regression fitted by L-BFGS, its
    # L2 penalty chosen from the grid by stratified cross-validation on the labelled subset.
    d.linear_l2_grid = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    d.linear_folds = 4
    d.linear_iters = 200
    d.pixel_size = 0  # side of the raw-pixel baselines' images (0 = data.image_size)
    d.knn_k = 200
    d.knn_temperature = 0.1
    d.checkpoint_every = 0  # steps between classifier checkpoints (0 = at each test evaluation)
    d.data = _downstream_data()
    # SimCLRv2's ft_proj_selector: the features the classifiers, the linear probe and kNN read.
    # 0 = h; k in 1..model.head_layers = the output of the projection head's first k layers
    # (head_layers = z), those layers fine-tuned with f (pretrained, or the init's for scratch).
    d.ft_proj_selector = 0
    return d


def _distill() -> ml_collections.ConfigDict:
    """--mode=distill (SimCLRv2's distillation, after --mode=downstream in the same workdir)."""
    d = ml_collections.ConfigDict()
    # The downstream run whose final checkpoint teaches: 'finetune_long' (needs
    # downstream.long_epochs > 0) or 'finetune'.
    d.teacher = "finetune_long"
    d.temperature = 1.0  # T of softmax(logits / T), teacher's and student's (SimCLRv2 used 1)
    d.epochs = 30  # over the pretraining split (labelled + unlabelled images, labels unused)
    d.batch_size = 256  # global, over the pretraining split
    d.optimizer = "sgd"  # sgd | adamw | lars
    d.learning_rate = 0.1  # peak, scaled like pretraining (with distill.batch_size)
    d.lr_scaling = "linear"
    d.warmup_epochs = 1.0  # linear warm-up, then cosine decay to 0
    d.weight_decay = 5e-4  # not applied to biases and BN parameters
    d.momentum = 0.9
    # The student, from scratch: config.model with this name and width ('' / 0: the teacher's
    # own network; e.g. width = half of model.width for a smaller one).
    d.model = ml_collections.ConfigDict({"name": "", "width": 0.0})
    # Its baseline: the same student from the same initial weights on the labelled subset's hard
    # labels alone (downstream's batch, optimizer and schedule), for this budget and peak rate.
    d.labels_epochs = 100
    d.labels_learning_rate = 0.1  # peak, scaled with downstream.batch_size by its lr_scaling
    d.chosen_on = ""  # what the distill settings were chosen on ('' = settings_chosen_on)
    # The view both networks see: 'translate' (the classifiers' reflect-pad-and-translate crop and
    # flip; the default, what every distill number so far used) or 'resized_crop' (the official
    # SimCLRv2 distillation's random resized crop over augment.crop_scale_min..1 and flip, colour
    # off).
    d.student_view = "translate"
    return d


def _downstream_data() -> ml_collections.ConfigDict:
    """Transfer evaluation: the dataset every downstream method and baseline reads (the frozen
    probes, the fine-tune vs scratch runs, the neighbours picture). Its images are resized to
    data.image_size and normalised with data.mean / data.std: the encoder's input, as pretrained.
    The labelled fraction is downstream.label_fraction, whichever data the stage reads: it is a
    setting of the evaluation, not of a dataset, so it is one key for both cases."""
    t = ml_collections.ConfigDict()
    # '' = the pretraining data itself (config.data; the keys below are then not read); else
    # 'digits', 'folder' (with data_dir) or a prepared tfds image set, as data.name.
    t.name = ""
    t.data_dir = ""  # as data.data_dir: the folder DIR, or the tfds data_dir ('' = tfds' default)
    t.train_split = "train"  # labelled: the downstream labelled subset is drawn from it
    t.test_split = "test"  # labelled: every downstream test accuracy
    t.max_train_examples = 0  # 0 = all of the train split; a smaller number subsamples it
    # > 0: this class-balanced fraction of its train split is held out and scored instead of its
    # test split (choose transfer settings on it); data.validation_fraction stays pretraining's.
    t.validation_fraction = 0.0
    return t


def _distributed() -> ml_collections.ConfigDict:
    d = ml_collections.ConfigDict()
    d.enabled = False  # call jax.distributed.initialize() (auto on TPU pods / SLURM)
    d.coordinator_address = ""  # host:port of process 0 ('' = auto-detect)
    d.num_processes = 0  # 0 = auto-detect
    d.process_id = -1  # -1 = auto-detect
    return d
