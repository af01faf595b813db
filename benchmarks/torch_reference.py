"""A plain PyTorch SimCLR training step, the speed reference of benchmarks/vs_torch.py (issue #13).

It is the project's pretrain step (simclr_jax.stages.pretrain.pretrain_step with configs/cifar_simclr.py)
written the way a PyTorch user would: eager on the CPU, and on a GPU tuned as such a user tunes it
(`make_step(..., device='cuda', autocast=torch.bfloat16, compile=True)`: channels_last, bf16
autocast, torch.compile, cuDNN's autotuner):

* ResNet-18 with the CIFAR stem (3x3 conv stride 1, no max-pool), BasicBlocks, base channels
  int(64 * width), BN after every conv (flax momentum 0.9 = torch momentum 0.1, eps 1e-5), the
  last BN scale of each block zero-initialised, 1x1 conv + BN projection shortcuts, global
  average pool: simclr_jax.core.resnet.ResNet18;
* the projection head of simclr_jax.core.networks.ProjectionHead: [Linear(no bias) -> BN -> ReLU] x
  (layers - 1) -> Linear(no bias) -> BN without bias on z (head_bn_output);
* NT-Xent as simclr_jax/core/losses.py (cosine similarities / temperature, self-similarity masked with
  -1e9, mean over the 2N rows), optimised as 2L (losses.OBJECTIVE_SCALE);
* LARS as optax.lars (what simclr_jax.core.optim builds): weight decay added to the gradient, then
  the trust ratio, both on conv / linear kernels only (not on biases and BN parameters), then the
  learning rate, then momentum 0.9.

What it leaves out on purpose: the augmentation. The two views of every image are made once,
before any step, as float32 tensors (random resized crops and flips); the JAX step makes its
views on the device inside the step, which costs 0.3-0.5% of the step (docs/performance.md).

Layout: channels_last (NHWC), PyTorch's recommended memory format for oneDNN (mkldnn)
convolutions on the CPU; `memory_format=torch.contiguous_format` gives NCHW. oneDNN is left at
PyTorch's defaults (torch.backends.mkldnn.enabled).
"""

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

LARGE_NUM = 1e9  # as simclr_jax.core.losses.LARGE_NUM: a finite mask keeps the gradient free of NaN
OBJECTIVE_SCALE = 2.0  # as simclr_jax.core.losses.OBJECTIVE_SCALE: the official loss_a + loss_b
BN_MOMENTUM = 0.1  # torch's running = (1 - m) running + m batch; flax's momentum 0.9
BN_EPS = 1e-5
STAGES = (2, 2, 2, 2)  # ResNet-18


def _conv(c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    conv = nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, bias=False)
    # He init (normal, fan_out): resnet.conv_init's distribution. The Linear layers keep torch's
    # default init (flax's Dense: lecun normal); neither changes the work of a step.
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def _bn2d(c: int, zero_scale: bool = False) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)
    if zero_scale:  # the block starts as the identity (Goyal et al.), as resnet.BasicBlock
        nn.init.zeros_(bn.weight)
    return bn


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = _conv(c_in, c_out, 3, stride), _bn2d(c_out)
        self.conv2, self.bn2 = _conv(c_out, c_out, 3), _bn2d(c_out, zero_scale=True)
        self.proj = None  # identity where the shape is unchanged, as resnet._shortcut
        if stride != 1 or c_in != c_out:
            self.proj = nn.Sequential(_conv(c_in, c_out, 1, stride), _bn2d(c_out))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu((x if self.proj is None else self.proj(x)) + y)


class ResNet18(nn.Module):
    """Normalised images (B, 3, H, W) -> h (B, 8 * int(64 * width))."""

    def __init__(self, width: float = 1.0):
        super().__init__()
        base = int(64 * width)
        self.stem = nn.Sequential(_conv(3, base, 3), _bn2d(base), nn.ReLU())
        blocks, c_in = [], base
        for i, n in enumerate(STAGES):
            for j in range(n):
                blocks.append(BasicBlock(c_in, base * 2**i, 2 if i > 0 and j == 0 else 1))
                c_in = base * 2**i
        self.blocks = nn.Sequential(*blocks)
        self.feat_dim = c_in

    def forward(self, x):
        return self.blocks(self.stem(x)).mean(dim=(2, 3))


def projection_head(feat_dim: int, layers: int = 3, out_dim: int = 128, bn_output: bool = True):
    """networks.ProjectionHead (hidden width = feat_dim): no bias on any Linear (the BN after each
    has its own), and the BN on z has a scale but no bias (flax's BatchNorm(use_bias=False))."""
    mods = []
    for _ in range(layers - 1):
        mods.append(nn.Linear(feat_dim, feat_dim, bias=False))
        mods += [nn.BatchNorm1d(feat_dim, eps=BN_EPS, momentum=BN_MOMENTUM), nn.ReLU()]
    mods.append(nn.Linear(feat_dim, out_dim, bias=False))
    if bn_output:
        bn = nn.BatchNorm1d(out_dim, eps=BN_EPS, momentum=BN_MOMENTUM)
        bn.register_parameter("bias", None)  # F.batch_norm then adds no bias
        mods.append(bn)
    return nn.Sequential(*mods)


class SimCLRModel(nn.Module):
    def __init__(self, width: float, head_layers: int = 3, proj_dim: int = 128, bn_output=True):
        super().__init__()
        self.encoder = ResNet18(width)
        self.head = projection_head(self.encoder.feat_dim, head_layers, proj_dim, bn_output)

    def forward(self, x):
        return self.head(self.encoder(x))


def nt_xent(z1, z2, temperature: float):
    """L of simclr_jax.core.losses.nt_xent on one device: mean over the 2N rows of the cross-entropy
    of each row's positive against the 2N - 1 other columns."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)  # (2N, D)
    n = z1.shape[0]
    logits = z @ z.T / temperature
    eye = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(eye, -LARGE_NUM)
    labels = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, labels)


class LARS(torch.optim.Optimizer):
    """optax.lars as simclr_jax.core.optim.make_optimizer builds it: on kernels (ndim > 1, as
    optim.decay_mask) u = g + wd p, then u *= tc |p| / |u| (1 where either norm is 0); biases and
    BN parameters keep u = g; then v = momentum v - lr u and p += v (optax scales by the learning
    rate before its momentum trace). The foreach ops update all tensors in a few calls."""

    def __init__(self, params, lr: float, weight_decay=1e-4, momentum=0.9, trust_coefficient=1e-3):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, tc=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            kernels = [p for p in params if p.ndim > 1]
            others = [p for p in params if p.ndim <= 1]
            updates = self._kernel_updates(kernels, group) + [p.grad for p in others]
            bufs = [self._buffer(p) for p in kernels + others]
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, updates, alpha=-group["lr"])
            torch._foreach_add_(kernels + others, bufs)

    def _buffer(self, p):
        state = self.state[p]
        if "momentum" not in state:
            state["momentum"] = torch.zeros_like(p)  # optax.trace starts at 0
        return state["momentum"]

    @staticmethod
    def _kernel_updates(kernels, group) -> list:
        if not kernels:
            return []
        u = list(
            torch._foreach_add([p.grad for p in kernels], kernels, alpha=group["weight_decay"])
        )
        p_norm = torch.stack(torch._foreach_norm(kernels))
        u_norm = torch.stack(torch._foreach_norm(u))
        ratio = group["tc"] * p_norm / u_norm
        ratio = torch.where((p_norm > 0) & (u_norm > 0), ratio, torch.ones_like(ratio))
        torch._foreach_mul_(u, list(ratio.unbind()))  # on the device: no host sync mid-step
        return u


def make_views(batch: int, n_batches: int = 2, size: int = 32, seed: int = 0, memory_format=None):
    """n_batches pre-made inputs (2 batch, 3, size, size) float32, [views 1; views 2] of random
    images: random resized crops (area 8-100%) and horizontal flips, normalised as
    benchmarks/throughput.make_config normalises its random images (mean 0.5, std 0.29)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n_batches * batch, 3, size, size), generator=g)
    x = images.float() / 255
    v1, v2 = (_crop_flip(x, g) for _ in range(2))
    out = []
    for i in range(n_batches):
        rows = slice(i * batch, (i + 1) * batch)
        views = (torch.cat([v1[rows], v2[rows]]) - 0.5) / 0.29
        out.append(views.contiguous(memory_format=memory_format or torch.channels_last))
    return out


def _crop_flip(x, g):
    """A random square crop of 8-100% of the area, resized back (bilinear), flipped half the
    time: one affine grid_sample for the whole batch (made before timing, so cost is no matter)."""
    n = x.shape[0]
    side = torch.sqrt(0.08 + 0.92 * torch.rand(n, generator=g))  # crop side / image side
    shift = (1 - side)[:, None] * (
        2 * torch.rand(n, 2, generator=g) - 1
    )  # centre, inside the image
    flip = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = side * flip, side
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", align_corners=False)


def make_step(width: float, batch: int, head_layers: int = 3, **kw):
    """A callable that runs one LARS step of SimCLR on the next pre-made batch of views (cycling
    over kw n_batches, default 2): `step()` returns the loss L as a float (the step has finished),
    `step(sync=False)` the loss tensor, without waiting for the device.

    kw: proj_dim (128), bn_output (True), temperature (0.5), lr (the config's 1.0 x batch / 256,
    constant: the JAX step's warm-up + cosine schedule changes no work), weight_decay (1e-4),
    momentum (0.9), n_batches, seed (0), memory_format (torch.channels_last), and how a PyTorch
    user tunes the step for an accelerator: device ('cpu'; 'cuda' also turns on cuDNN's autotuner
    and TF32 matmuls), autocast (None, or a dtype such as torch.bfloat16: the network's forward
    under torch.autocast, the loss in float32 as the project's), compile (False; True:
    torch.compile of the forward and the loss, kw compile_mode and compile_backend). The thread
    count is the caller's (torch.set_num_threads).
    """
    torch.manual_seed(kw.get("seed", 0))
    device = torch.device(kw.get("device", "cpu"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    fmt = kw.get("memory_format", torch.channels_last)
    model = SimCLRModel(width, head_layers, kw.get("proj_dim", 128), kw.get("bn_output", True))
    model = model.to(device=device, memory_format=fmt).train()
    lr = kw.get("lr", 1.0 * batch / 256)
    opt = LARS(model.parameters(), lr, kw.get("weight_decay", 1e-4), kw.get("momentum", 0.9))
    views = make_views(batch, kw.get("n_batches", 2), seed=kw.get("seed", 0), memory_format=fmt)
    data = [v.to(device) for v in views]  # keeps the memory format
    temperature, counter = kw.get("temperature", 0.5), itertools.count()
    autocast = kw.get("autocast")

    def forward_loss(x):
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            z = model(x)  # (2N, D)
        z1, z2 = z.float().chunk(2)
        return nt_xent(z1, z2, temperature)

    if kw.get("compile", False):
        backend = kw.get("compile_backend", "inductor")  # 'aot_eager': traced, not generated
        forward_loss = torch.compile(forward_loss, mode=kw.get("compile_mode"), backend=backend)

    def step(sync: bool = True):
        loss = forward_loss(data[next(counter) % len(data)])
        opt.zero_grad(set_to_none=True)
        (OBJECTIVE_SCALE * loss).backward()
        opt.step()
        return loss.item() if sync else loss

    step.model, step.device = model, device
    return step


def self_check(width: float = 0.125, batch: int = 16, steps: int = 4) -> list:
    """Losses of `steps` steps on one repeated batch: finite, and the last below the first."""
    step = make_step(width, batch, n_batches=1)
    losses = [step() for _ in range(steps)]
    if not all(math.isfinite(x) for x in losses) or not losses[-1] < losses[0]:
        raise AssertionError(f"the PyTorch step does not train: losses {losses}")
    return losses


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    print("losses", self_check())
