"""
Chapter 7 - MeanFlow: a digit in ONE network call, trained from scratch (no teacher to distil).

Usage (copy-paste):
    python train_meanflow.py --minutes 45             # laptop CPU: 45 minutes of training, then one-call digits
    python train_meanflow.py --sample-only --steps 1 --num-samples 2000 --seed 1 --save-npz mf1.npz   # evaluate.py
    python train_meanflow.py --sample-only --steps 2  # two calls: a little better
    python train_meanflow.py --resume                 # continue the run saved in meanflow_model_last.pt
    python train_meanflow.py --sample-only --compare  # the same noise: teacher DDIM-50 | kd | DMD | MeanFlow
    python train_meanflow.py --jvp-cost               # what the JVP costs per training step on this machine

The idea (Geng, Deng, Bai, Kolter & He 2025). Chapter 6's flow learns the velocity v(z_t, t) at each instant, so a
sampler must take many small steps along a curved path. MeanFlow learns the AVERAGE velocity over an interval,

    u(z_t, r, t) = 1/(t - r) · ∫_r^t v(z_τ, τ) dτ,        so that  z_r = z_t - (t - r) · u(z_t, r, t)

exactly, however curved the path: one call with r = 0, t = 1 goes from noise to digit. The integral is unknown, but
differentiating (t - r)·u = ∫ v in t gives an identity that holds at every point (notes/8-one-step-from-scratch.md):

    u(z_t, r, t) = v(z_t, t) - (t - r) · d/dt u(z_t, r, t),   d/dt u = v · ∂u/∂z + ∂u/∂t

The network is trained to satisfy it: the target is the right-hand side, with v = ε - x_0 (the straight path's
velocity, as in chapter 6) and d/dt u computed by ONE Jacobian-vector product of the network itself in the direction
(v, 0, 1) - forward-mode differentiation, torch.func.jvp - with a stop-gradient on the target. With r = t the second
term vanishes and it is plain flow matching: a share of every batch is exactly chapter 6's loss.

What comes out (in --out-dir):
    meanflow_model_final.pt    the trained model (+ EMA + config); meanflow_model_last.pt is resumable
    meanflow_samples.png       a grid of digits, --steps calls each
    meanflow_preview.png       16 one-call digits from the same noise after every epoch; meanflow_previews.png stacks them
    meanflow_loss_curve.png    the squared error to the target per step
    meanflow_model_Nmin.pt     with --snapshot-minutes: the EMA weights every N minutes (for a quality-vs-time curve)
    meanflow_comparison.png    with --compare: the SAME noise through chapter 1's teacher (DDIM-50), chapter 4's kd
                               student, chapter 4c's DMD generator (one call each) and MeanFlow (one call)

The file reads top to bottom: config -> data -> path -> model -> train -> sample -> outputs.
"""
import argparse
import copy
import math
import os
import signal
import sys
import time

import matplotlib
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.utils import save_image
from tqdm import tqdm

matplotlib.use("Agg")  # draw into files: no window, works on a machine without a screen
import matplotlib.pyplot as plt  # noqa: E402 (after choosing the backend)

# ----------------------------------------------------------------------------------------------------
# 1. Config: every knob in one place; the model part is saved into the checkpoint.
# ----------------------------------------------------------------------------------------------------
FINAL_NAME = "meanflow_model_final.pt"
LAST_NAME = "meanflow_model_last.pt"
RECIPE_KEYS = ["lr", "batch_size", "warmup_steps", "ema_decay", "optimizer", "muon_lr", "interval_share", "logit_mean",
               "logit_std", "adaptive_p"]
PREVIEW_DIGITS = 16  # the per-epoch preview grid: one-call digits from the same noise
TIME_SCALE = 10  # t in [0, 1] enters the time embedding as 10·t (--time-scale; chapters 1 and 6 use 1000·t)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train a MeanFlow model on MNIST: one network call per digit.",
                                formatter_class=HelpFormatter)
    p.add_argument("--data-root", default=os.environ.get("MNIST_ROOT", "./data"),
                   help="folder holding MNIST/raw/ (torchvision layout); downloaded there when online. "
                        "Env var MNIST_ROOT sets the default")
    p.add_argument("--out-dir", default=".", help="where checkpoints and pictures go")
    p.add_argument("--epochs", type=positive_int, default=40, help="passes over the 60k training digits")
    p.add_argument("--minutes", type=positive_float, default=None,
                   help="wall-clock training budget; stops after this many minutes or --epochs, whichever comes "
                        "first, then still saves and samples")
    p.add_argument("--batch-size", type=positive_int, default=128, help="images per training step")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="peak learning rate of AdamW (with Muon: of the parameters Muon leaves to AdamW). Default: "
                        "8e-3 for the CPU width 16, 2e-3 for wider UNets (chapter 1's)")
    p.add_argument("--optimizer", choices=["adamw", "muon"], default=None,
                   help="as in chapter 1. Default: muon for the CPU width 16, adamw for wider UNets")
    p.add_argument("--muon-lr", type=positive_float, default=0.02, help="--optimizer muon: the matrices' peak rate")
    p.add_argument("--warmup-steps", type=int, default=500, help="linear learning-rate warm-up")
    p.add_argument("--ema-decay", type=ema_decay, default=0.999, help="EMA of the weights, used for sampling")
    p.add_argument("--interval-share", type=fraction, default=0.75,
                   help="share of each batch with r < t (an interval to average over); the rest has r = t: plain "
                        "flow matching. The paper's CIFAR-10 value")
    p.add_argument("--logit-mean", type=float, default=-2.0,
                   help="t and r are drawn as sigmoid(m + s·n), n ~ N(0, 1): m < 0 favours the digit end. The "
                        "paper's CIFAR-10 value; on MNIST it beat m = 2 on both networks at a fixed step budget "
                        "(RESULTS.md)")
    p.add_argument("--logit-std", type=positive_float, default=2.0, help="s of the draw of t and r")
    p.add_argument("--adaptive-p", type=float, default=0.75,
                   help="adaptive loss weight 1/(error + 0.001)^p (the paper's): large errors count less; 0 = plain "
                        "squared error")
    p.add_argument("--time-scale", type=positive_float, default=TIME_SCALE,
                   help="t in [0, 1] enters the sinusoidal time embedding as SCALE·t. Chapters 1 and 6 use 1000; the "
                        "JVP differentiates the embedding too, and at 1000 its fastest feature turns 1000 radians "
                        "over the path (see RESULTS). Saved in the checkpoint")
    p.add_argument("--base-channels", type=positive_int, default=None,
                   help="UNet width at 28x28. Default: 16 on a CPU and on Apple MPS, 64 on a CUDA GPU")
    p.add_argument("--no-attention", action="store_true", help="drop the self-attention block at 7x7")
    p.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                   help="bfloat16 autocast for sampling (training is float32: forward-mode differentiation has no "
                        "bf16 autocast); auto = on for CUDA and for CPUs with native bf16, off on MPS")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                   help="auto picks cuda, then mps, then cpu")
    p.add_argument("--resume", action="store_true", help=f"continue training from OUT_DIR/{LAST_NAME}")
    p.add_argument("--snapshot-minutes", type=positive_float, default=None,
                   help="also save the EMA weights every this many minutes, as meanflow_model_Nmin.pt")
    p.add_argument("--sample-only", action="store_true", help=f"skip training: load OUT_DIR/{FINAL_NAME} and sample")
    p.add_argument("--jvp-cost", action="store_true",
                   help="no training: time a step of this loss against a plain flow-matching step, and print both")
    p.add_argument("--checkpoint", default=None,
                   help=f"--sample-only: sample from this file instead of OUT_DIR/{FINAL_NAME} (e.g. a snapshot)")
    p.add_argument("--compare", action="store_true",
                   help="also draw meanflow_comparison.png: the same noise through --teacher (DDIM-50), --kd, --dmd "
                        "and MeanFlow")
    p.add_argument("--teacher", default="diffusion_model_final.pt", help="--compare: chapter 1's model (src.py)")
    p.add_argument("--kd", default="distilled_model_final.pt", help="--compare: chapter 4's student")
    p.add_argument("--dmd", default="dmd_model_final.pt", help="--compare: chapter 4c's generator")
    p.add_argument("--steps", type=positive_int, default=1, help="network calls per digit")
    p.add_argument("--num-samples", type=positive_int, default=64, help="digits in the final grid")
    p.add_argument("--save-npz", default=None, metavar="PATH",
                   help="also export the samples: `images` uint8 N x 28 x 28, 0-255")
    return p.parse_args(argv)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help adds each flag's default, but not a default of None: that flag's help says in words what happens."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def positive_int(s):
    if int(s) <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
    return int(s)


def positive_float(s):
    if not float(s) > 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
    return float(s)


def ema_decay(s):
    if not 0 <= float(s) < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {s}")
    return float(s)


def fraction(s):
    if not 0 <= float(s) <= 1:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {s}")
    return float(s)


def fail(message):
    """Bad input ends the run with one clear line, not a traceback."""
    sys.exit(f"error: {message}")


def pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        fail("--device cuda asked for, but PyTorch sees no CUDA GPU (try --device auto)")
    if name == "mps" and not torch.backends.mps.is_available():
        fail("--device mps asked for, but this PyTorch has no Apple MPS backend (try --device auto)")
    return torch.device(name)


def cpu_bf16_flags(cpuinfo="/proc/cpuinfo"):
    """The native bf16 instruction sets this CPU lists (x86: avx512_bf16, amx_bf16), read from Linux's cpuinfo.
    Empty where the file is missing (macOS, Windows) or lists none: then bf16 would be emulated, or we cannot tell."""
    try:
        with open(cpuinfo) as f:
            flags = {word for line in f if line.startswith("flags") for word in line.split(":", 1)[1].split()}
    except OSError:
        return set()
    return flags & {"avx512_bf16", "amx_bf16"}


def use_bf16(choice, device):
    """bfloat16 autocast, and why: returns (on, reason). Faster on GPUs and on CPUs with native bf16 instructions.
    PyTorch's own check says yes on any AVX-512 CPU, but without avx512_bf16 it emulates bf16, 2.5x slower than
    float32 (on AVX2 alone, 10x): so auto asks the CPU's flags. MPS stays float32."""
    if choice != "auto":
        return choice == "on", f"--bf16 {choice}"
    if device.type == "cuda":
        on = torch.cuda.is_bf16_supported()
        return on, f"this GPU {'has' if on else 'lacks'} bf16"
    native = cpu_bf16_flags() if device.type == "cpu" and torch.backends.mkldnn.is_available() else set()
    if native:
        return True, f"the CPU has {' and '.join(sorted(native))}"
    return False, "float32 on MPS" if device.type == "mps" else "no native bf16 on this CPU: emulated, it is slower"


# ----------------------------------------------------------------------------------------------------
# 2. Data: all 60k digits in memory as one tensor, as in chapter 1
# ----------------------------------------------------------------------------------------------------
def load_mnist(root, train=True):
    """Returns MNIST as (images uint8 [N, 28, 28], labels int64 [N]); one clear line when it is missing."""
    from torchvision.datasets import MNIST
    try:
        ds = MNIST(root, train=train, download=True)
    except Exception as e:  # offline, or a broken download
        fail(f"MNIST not found in {os.path.abspath(root)}/MNIST/raw and it could not be downloaded "
             f"({type(e).__name__}). Get online once, or put the four MNIST files there, or pass "
             f"--data-root DIR (or set MNIST_ROOT=DIR) for a folder DIR/MNIST/raw that holds them")
    return ds.data, ds.targets


def to_model_range(images_uint8):
    """uint8 0..255 -> float in [-1, 1], with a channel axis: the range the noise schedule assumes."""
    return images_uint8.float().div(127.5).sub(1.0).unsqueeze(1)


def to_uint8(x):
    """float in [-1, 1] with a channel axis -> uint8 0..255 images [N, 28, 28]."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).squeeze(1).cpu()


# ----------------------------------------------------------------------------------------------------
# 3. The path: chapter 6's straight line, and the two times r <= t of an interval on it
# ----------------------------------------------------------------------------------------------------
def interpolate(x0, noise, t):
    """x_t = (1 - t)·x_0 + t·ε. In chapter 1's terms, √ᾱ = 1 - t and √(1 - ᾱ) = t (notes/7-flow-matching.md)."""
    t = t.view(-1, 1, 1, 1)
    return (1 - t) * x0 + t * noise


def sample_interval(n, share, logit_mean, logit_std, device="cpu"):
    """(r, t) for each image of a batch, 0 <= r <= t <= 1: two logit-normal draws, sorted (the paper's sampler);
    then a share 1 - `share` of the batch gets r = t, where the MeanFlow loss is chapter 6's flow matching."""
    a, b = (torch.sigmoid(logit_mean + logit_std * torch.randn(n, device=device)) for _ in range(2))
    r, t = torch.minimum(a, b), torch.maximum(a, b)
    return torch.where(torch.rand(n, device=device) < share, r, t), t


# ----------------------------------------------------------------------------------------------------
# 4. Model: chapter 1's UNet (unchanged, a test checks) with a second embedding, for the interval's length t - r
# ----------------------------------------------------------------------------------------------------
def ddpm_schedule(T, *, kind="linear", beta_1=1e-4, beta_T=0.02, s=0.008):
    """The tensors named after the paper's symbols. Index t runs 0..T-1 (the paper's t = 1..T).
    kind="linear": β_t rises in a straight line from beta_1 to beta_T (the DDPM paper, Sec. 4).
    kind="cosine": ᾱ_t falls along a cosine instead (Nichol & Dhariwal 2021, Eq. 17): the digit fades evenly over
    all T steps, where the linear schedule has all but erased it by t ≈ 600 and spends the rest on pure noise."""
    beta = torch.linspace(beta_1, beta_T, T, dtype=torch.float64)  # β_t: noise added at step t (linear)
    if kind == "cosine":
        f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
        # ᾱ_t = f(t)/f(0), floored at the linear schedule's ᾱ_T ≈ 4e-5: x_T is noise just as nearly, and ε -> x_0
        # never divides by √ᾱ ≈ 0 (the paper clips β_t at 0.999 instead, which leaves ᾱ_T ≈ 2e-9).
        alpha_bar = (f[1:] / f[0]).clamp(min=torch.cumprod(1.0 - beta, dim=0)[-1].item())
        beta = 1.0 - alpha_bar / torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])  # 1 - ᾱ_t/ᾱ_{t-1}
    elif kind != "linear":
        raise ValueError(f"unknown noise schedule {kind!r} (linear or cosine)")
    alpha = 1.0 - beta  # α_t = 1 - β_t
    alpha_bar = torch.cumprod(alpha, dim=0)  # ᾱ_t = α_1 · α_2 ··· α_t: signal kept after t steps
    alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])  # ᾱ_{t-1}, ᾱ_0 = 1
    posterior_var = beta * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)  # β̃_t = β_t (1-ᾱ_{t-1}) / (1-ᾱ_t)
    # Computed in float64 on the CPU, stored float32 (Apple MPS has no float64).
    return {name: value.float() for name, value in dict(
        beta=beta, alpha=alpha, alpha_bar=alpha_bar, alpha_bar_prev=alpha_bar_prev,
        posterior_var=posterior_var).items()}


def timestep_embedding(t, dim):
    """Sinusoidal embedding of the timestep (as in Transformers): tells every block how noisy x_t is."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, with the timestep embedding added in between; plus a skip path."""

    def __init__(self, in_ch, out_ch, emb_dim, groups=8):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]  # every block knows the noise level
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the pixels of a low-resolution (7x7) feature map: global context."""

    def __init__(self, ch, heads=4, groups=8):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2)
        q, k, v = qkv.unbind(1)  # each [b, heads, pixels, c/heads]
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    """ε_θ(x_t, t): predicts the noise in x_t. 28x28 -> 14x14 -> 7x7 and back, with skip connections.
    With sigma_data (src.py --precondition edm) it still returns ε, but its layers work on EDM's scaled input and
    output instead (see forward); alpha_bar is then the schedule's ᾱ_t, which the scaling needs."""

    def __init__(self, base_channels=16, channel_mults=(1, 2, 4), attention=True, conv_first=False,
                 sigma_data=None, alpha_bar=None):
        super().__init__()
        widths = [base_channels * m for m in channel_mults]
        emb_dim = 4 * base_channels
        self.base_channels = base_channels
        self.sigma_data = sigma_data
        if sigma_data is not None:  # rebuilt from the checkpoint's config, so not saved with the weights
            self.register_buffer("alpha_bar", alpha_bar.float(), persistent=False)
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.stem = nn.Conv2d(1, base_channels, 3, padding=1)
        # Down path: one ResBlock per level, then a strided conv halves the size (not after the last level).
        self.down_blocks = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        ch = base_channels
        for i, width in enumerate(widths):
            self.down_blocks.append(ResBlock(ch, width, emb_dim))
            ch = width
            last = i == len(widths) - 1
            self.downsamples.append(nn.Identity() if last else nn.Conv2d(ch, ch, 3, stride=2, padding=1))
        self.mid1 = ResBlock(ch, ch, emb_dim)
        self.mid_attn = SelfAttention(ch) if attention else nn.Identity()
        self.mid2 = ResBlock(ch, ch, emb_dim)
        # Up path: mirror image; each level concatenates the skip saved at the same size on the way down.
        self.up_blocks = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for i in reversed(range(len(widths))):
            self.up_blocks.append(ResBlock(ch + widths[i], widths[i], emb_dim))
            ch = widths[i]
            first = i == 0
            # Doubling the size: a nearest-neighbour upsample and a 3x3 conv. Conv first (src.py's default on the
            # CPU) runs the conv at the low resolution, for a quarter of its FLOPs; the original order after it.
            up = [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)]
            self.upsamples.append(nn.Identity() if first else nn.Sequential(*(up[::-1] if conv_first else up)))
        self.head = nn.Sequential(nn.GroupNorm(8, ch), nn.SiLU(), nn.Conv2d(ch, 1, 3, padding=1))

    def forward(self, x, t):
        return self.denoise(x, t, self.time_mlp(timestep_embedding(t, self.base_channels)))

    def denoise(self, x, t, emb):
        """ε, given the embedding of what the model is conditioned on (here: the timestep t alone)."""
        if self.sigma_data is None:
            return self.trunk(x, emb)  # the layers' output is ε itself
        # EDM preconditioning (Karras et al. 2022, Sec. 5 and Table 1) on this schedule. In EDM's variables
        # x = x_t/√ᾱ = x_0 + σε with σ² = (1-ᾱ)/ᾱ, the denoiser is D(x) = c_skip·x + c_out·F(c_in·x), with
        # c_in = 1/√(σ² + σ_data²), c_skip = σ_data²/(σ² + σ_data²), c_out = σ·σ_data/√(σ² + σ_data²).
        alpha_bar = self.alpha_bar[t].view(-1, 1, 1, 1)
        scale = (1 - alpha_bar + self.sigma_data ** 2 * alpha_bar).sqrt()  # x_t's std if the digits' std were σ_data
        x_in = x / scale  # c_in·x = x_t/scale: unit-variance input, for data of spread σ_data
        out = self.trunk(x_in, emb)
        # ε = (x - D)/σ, rewritten in x_t. The layers' target is -ε where x_t is nearly clean and x_0/σ_data where it
        # is nearly all noise, so their errors are never magnified by 1/√ᾱ as ε-prediction's are on the way to x_0.
        return ((1 - alpha_bar).sqrt() * x_in - self.sigma_data * alpha_bar.sqrt() * out) / scale

    def trunk(self, x, emb):
        """The UNet proper, given the embedding of what it is conditioned on (here: the timestep)."""
        h = self.stem(x)
        skips = []
        for block, down in zip(self.down_blocks, self.downsamples):
            h = block(h, emb)
            skips.append(h)
            h = down(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for block, up in zip(self.up_blocks, self.upsamples):
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
            h = up(h)
        return self.head(h)


class MeanFlowUNet(UNet):
    """u_θ(z, r, t): the UNet's time embedding of t, plus a learned embedding of the interval's length t - r (the
    paper's best choice of inputs), added together so every ResBlock knows both. Times enter as time_scale·t."""

    def __init__(self, base_channels=16, channel_mults=(1, 2, 4), attention=True, time_scale=TIME_SCALE):
        super().__init__(base_channels, channel_mults, attention, conv_first=True)
        emb_dim = 4 * base_channels
        self.time_scale = time_scale
        self.interval_mlp = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

    def forward(self, z, r, t):
        emb = self.time_mlp(timestep_embedding(t * self.time_scale, self.base_channels))
        gap = self.interval_mlp(timestep_embedding((t - r) * self.time_scale, self.base_channels))
        return self.trunk(z, emb + gap)


def build_meanflow_model(config):
    return MeanFlowUNet(config["base_channels"], tuple(config["channel_mults"]), config["attention"],
                        config["time_scale"])


def build_model(config):
    # Checkpoints made before "upsample" was saved lack it: they upsample, then convolve. Without "sigma_data" the
    # layers predict ε directly (no preconditioning).
    sigma_data = config.get("sigma_data")
    alpha_bar = ddpm_schedule(**config["schedule"])["alpha_bar"] if sigma_data is not None else None
    return UNet(config["base_channels"], tuple(config["channel_mults"]), config["attention"],
                config.get("upsample") == "conv-first", sigma_data, alpha_bar)


def model_from_checkpoint(ckpt, path, weights="ema"):
    """Rebuilds the exact UNet from the config stored in the checkpoint and loads its (EMA) weights."""
    model = build_model(ckpt["config"])
    try:
        model.load_state_dict(ckpt[weights] if weights in ckpt else ckpt["model"])
    except (RuntimeError, KeyError) as e:
        fail(f"{path} does not match this UNet ({str(e).splitlines()[0][:120]})")
    return model


def load_checkpoint(path, device, kind="ddpm", script="src.py"):
    """Loads a checkpoint safely (weights_only: no code runs) onto any device; one clear line if it can't.
    `kind` is the tag its script stores in it ("ddpm": src.py's model), `script` the one that writes it.
    Your own run comes first; a default name (no folder) that you have not trained yet falls back to the copy
    shipped in weights/, and says so."""
    shipped = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", os.path.basename(path))
    if not os.path.isfile(path) and os.path.dirname(path) in ("", ".") and os.path.isfile(shipped):
        print(f"no {path} of your own: using the shipped weights/{os.path.basename(path)} "
              f"(`python {script}` trains yours)", file=sys.stderr)
        path = shipped
    if not os.path.isfile(path):
        fail(f"no checkpoint at {path} - run `python {script}` first to make it")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        fail(f"{path} is not a readable checkpoint ({type(e).__name__}); delete it and run `python {script}` again")
    if not isinstance(ckpt, dict) or ckpt.get("kind") != kind:
        fail(f"{path} is not a {kind} checkpoint from {script}")
    return ckpt


# ----------------------------------------------------------------------------------------------------
# 5. Training (the MeanFlow identity, with one Jacobian-vector product) and sampling (one call, or a few)
# ----------------------------------------------------------------------------------------------------
def average_velocity_and_derivative(model, z, r, t, v):
    """u_θ(z, r, t) and its total derivative in t along a path through z with velocity v: d/dt u = ∂u/∂z · dz/dt +
    ∂u/∂r · dr/dt + ∂u/∂t · dt/dt, the Jacobian of u times the vector (v, 0, 1). Forward-mode differentiation gets
    it in one pass together with u itself, which keeps its gradient for the optimizer."""
    return torch.func.jvp(lambda z_, t_: model(z_, r, t_), (z, t), (v, torch.ones_like(t)))


def meanflow_loss(model, x0, noise, r, t, adaptive_p=0.75):
    """The network's u_θ(z_t, r, t) against the identity's right-hand side, v - (t - r)·d/dt u_θ, held fixed.
    Returns the weighted loss to minimise and the plain squared error per pixel (to watch)."""
    z = interpolate(x0, noise, t)
    v = noise - x0  # the straight path's velocity: dz/dt
    u, du_dt = average_velocity_and_derivative(model, z, r, t, v)
    target = (v - (t - r).view(-1, 1, 1, 1) * du_dt).detach()  # stop-gradient: a target, not a path to train along
    error = (u - target).pow(2).sum(dim=(1, 2, 3))  # per image
    # adaptive weight (the paper's): 1/(error + c)^p, held fixed - a batch's worst images do not dominate its step
    weight = (error.detach() + 1e-3) ** -adaptive_p
    return (weight * error).mean(), error.mean().item() / x0[0].numel()


class EMA:
    """Exponential moving average of the weights: a smoother model that samples visibly better."""

    def __init__(self, model, decay):
        self.decay = decay
        self.model = copy.deepcopy(model).requires_grad_(False)

    @torch.no_grad()
    def update(self, model, step):
        # Warm-up: early on, follow the model closely. (1+s)/(10+s) stays below 0.999 until step ~9,000, so on a
        # short run the average spans about its last tenth (a length that measured right: RESULTS.md, ch. 1).
        decay = min(self.decay, (1 + step) / (10 + step))
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            ema_p.lerp_(p, 1 - decay)


def orthogonalize(G, steps=5):
    """The matrix nearest to G whose singular values are all 1 (U·Vᵀ of G's SVD), roughly, by a quintic Newton-
    Schulz iteration: matrix products only, no SVD. Jordan et al. (2024) tuned a, b, c so that five steps take every
    singular value above about 1/300 of G's norm to between about 0.7 and 1.2: close enough for a step's direction.
    (A smaller one grows by a⁵ ≈ 490: still far more, relative to the rest, than the gradient gave it.)"""
    a, b, c = 3.4445, -4.7750, 2.0315
    wide = G.shape[0] <= G.shape[1]
    X = G if wide else G.T  # work with the smaller of X·Xᵀ and Xᵀ·X
    X = X / (X.norm() + 1e-7)  # the Frobenius norm is at least the largest singular value: all now <= 1
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X  # each singular value s becomes a·s + b·s³ + c·s⁵
    return X if wide else X.T


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al. 2024) for the hidden layers' weight matrices, AdamW for every other parameter.
    Adam scales each number of the gradient on its own. Muon reads a layer's weights as one matrix (a conv's as
    out_channels x in_channels·3·3), keeps a momentum of its gradient, and steps along that momentum with all its
    singular values set to 1: directions the gradient hardly pushes move as far as the dominant ones. The stem and
    the head (one image channel in or out), the biases and the norms' scales stay with AdamW (weight decay 0)."""

    def __init__(self, model, lr, adamw_lr, momentum=0.95, betas=(0.9, 0.999), eps=1e-8):
        named = list(model.named_parameters())
        hidden = [p.ndim >= 2 and not name.startswith(("stem.", "head.")) for name, p in named]
        groups = [{"params": [p for (_, p), h in zip(named, hidden) if h], "lr": lr, "muon": True},
                  {"params": [p for (_, p), h in zip(named, hidden) if not h], "lr": adamw_lr, "muon": False}]
        super().__init__(groups, {"momentum": momentum, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in (p for p in group["params"] if p.grad is not None):
                state = self.state[p]
                if group["muon"]:
                    momentum = state.setdefault("momentum", torch.zeros_like(p)).mul_(group["momentum"]).add_(p.grad)
                    ahead = p.grad + group["momentum"] * momentum  # Nesterov: where the momentum is heading
                    update = orthogonalize(ahead.reshape(len(p), -1))
                    # a tall matrix's unit singular values spread over more rows: √(rows/cols) evens the step size
                    scale = max(1.0, update.shape[0] / update.shape[1]) ** 0.5
                    p.add_(update.view_as(p), alpha=-group["lr"] * scale)
                else:  # AdamW's update, written out (weight decay 0)
                    state["step"] = state.get("step", 0) + 1
                    beta1, beta2 = group["betas"]
                    m = state.setdefault("exp_avg", torch.zeros_like(p)).lerp_(p.grad, 1 - beta1)
                    v = state.setdefault("exp_avg_sq", torch.zeros_like(p)).lerp_(p.grad ** 2, 1 - beta2)
                    m_hat, v_hat = m / (1 - beta1 ** state["step"]), v / (1 - beta2 ** state["step"])
                    p.addcdiv_(m_hat, v_hat.sqrt() + group["eps"], value=-group["lr"])


def make_optimizer(model, args):
    if args.optimizer == "muon":
        return Muon(model, lr=args.muon_lr, adamw_lr=args.lr)
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)


def learning_rate(args, step, progress):
    """Linear warm-up and a cosine decay to 5% of the peak as training `progress` goes 0 -> 1, whichever is lower:
    on a run only a few times longer than its warm-up, the ramp hands over to the decay where they cross, no jump."""
    warmup = (step + 1) / args.warmup_steps if step < args.warmup_steps else 1.0
    decay = 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return args.lr * min(warmup, decay)


def save_atomic(obj, path):
    """Write to a temp file, then rename: a killed run never leaves a half-written checkpoint."""
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


@torch.no_grad()
def sample_meanflow(model, noise, steps=1, bf16=False):
    """From noise (t = 1) to digit (t = 0) in `steps` jumps of equal length: z_r = z_t - (t - r)·u_θ(z_t, r, t)."""
    x, ts = noise, torch.linspace(1, 0, steps + 1).tolist()
    for t, r in zip(ts[:-1], ts[1:]):
        t_batch, r_batch = (torch.full((len(x),), value, device=x.device) for value in (t, r))
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            x = x - (t - r) * model(x, r_batch, t_batch).float()
    return x


def resume(path, config, model, ema, optimizer, device):
    """Loads LAST_NAME into the model, EMA and optimizer; returns its step, losses and previews."""
    ckpt = load_checkpoint(path, device, "meanflow", "train_meanflow.py")
    if ckpt["config"] != config:
        fail(f"--resume: {path} was trained with another architecture {ckpt['config']}; pass the same flags")
    model.load_state_dict(ckpt["model"])
    ema.model.load_state_dict(ckpt["ema"])
    optimizer.load_state_dict(ckpt["optimizer"])
    print(f"resumed from {path} at step {ckpt['step']}")
    return ckpt["step"], list(ckpt["losses"]), list(ckpt["previews"])


def train(args, config, device):
    """The MeanFlow loss over MNIST for --epochs or --minutes; a checkpoint and a preview after every epoch."""
    images, _ = load_mnist(args.data_root, train=True)
    data = to_model_range(images).to(device)
    if len(data) < args.batch_size:
        fail(f"only {len(data)} training images but --batch-size {args.batch_size}")
    model = build_meanflow_model(config).to(device)
    print(f"UNet {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, base width "
          f"{config['base_channels']}")
    optimizer = make_optimizer(model, args)
    ema = EMA(model, args.ema_decay)
    steps_per_epoch = len(data) // args.batch_size
    total_steps = args.epochs * steps_per_epoch
    last = os.path.join(args.out_dir, LAST_NAME)
    step, losses, previews = resume(last, config, model, ema, optimizer, device) if args.resume else (0, [], [])

    def checkpoint():
        return {"kind": "meanflow", "config": config, "model": model.state_dict(), "ema": ema.model.state_dict(),
                "optimizer": optimizer.state_dict(), "step": step, "losses": losses, "previews": previews,
                "recipe": {k: getattr(args, k) for k in RECIPE_KEYS}}

    budget_s = args.minutes * 60 if args.minutes else float("inf")
    snapshot_s = args.snapshot_minutes * 60 if args.snapshot_minutes else float("inf")
    start, start_step, next_snapshot = time.time(), step, snapshot_s
    generator = torch.Generator().manual_seed(args.seed + step)  # batch order, reproducible
    bar = tqdm(total=total_steps, initial=step, desc="training", unit="step")
    try:
        while step < total_steps and time.time() - start < budget_s:
            order = torch.randperm(len(data), generator=generator).to(device)
            for i in range(steps_per_epoch):
                elapsed = time.time() - start
                if step >= total_steps or elapsed >= budget_s:
                    break
                if elapsed >= next_snapshot:
                    minutes = f"{next_snapshot / 60:g}"
                    save_atomic(dict(checkpoint(), model=None, optimizer=None, minutes=minutes),
                                os.path.join(args.out_dir, f"meanflow_model_{minutes}min.pt"))
                    next_snapshot += snapshot_s
                rate = learning_rate(args, step, max(step / total_steps, elapsed / budget_s))
                for group in optimizer.param_groups:  # Muon's matrices follow the same curve to their own peak
                    group["lr"] = rate * args.muon_lr / args.lr if group.get("muon") else rate
                x0 = data[order[i * args.batch_size:(i + 1) * args.batch_size]]
                r, t = sample_interval(len(x0), args.interval_share, args.logit_mean, args.logit_std, device)
                loss, squared_error = meanflow_loss(model, x0, torch.randn_like(x0), r, t, args.adaptive_p)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                ema.update(model, step)
                losses.append(squared_error)
                step += 1
                bar.update(1)
                if step % 20 == 0:
                    bar.set_postfix(error=f"{np.mean(losses[-100:]):.4f}", min=f"{elapsed / 60:.1f}")
            previews.append(save_preview(ema.model, args, device))
            save_atomic(checkpoint(), last)
    except KeyboardInterrupt:
        save_atomic(checkpoint(), last)
        print(f"\ninterrupted at step {step}: saved {last}; continue with `python train_meanflow.py --resume`")
        sys.exit(130)
    bar.close()
    seconds = time.time() - start
    print(f"trained {step - start_step} steps in this run, {step} in all "
          f"({(step - start_step) / seconds:.2f} steps/s over {seconds / 60:.1f} min)")
    final = checkpoint()
    del final["optimizer"]  # the final file is for sampling; the resumable state is in LAST_NAME
    final["throughput"] = {"steps": step - start_step, "seconds": seconds}
    save_atomic(final, os.path.join(args.out_dir, FINAL_NAME))
    return ema.model, losses, previews


# ----------------------------------------------------------------------------------------------------
# 6. Outputs: preview per epoch, sample grid, loss curve, optional .npz export
# ----------------------------------------------------------------------------------------------------
def save_grid(images_uint8, path, nrow=8):
    """Tiles digits (uint8 [N, 28, 28]) into one PNG, `nrow` to a row, with a thin black border between them."""
    save_image(images_uint8.unsqueeze(1).float() / 255, path, nrow=nrow, padding=2)


def clock(device):
    """time.perf_counter() once the device has finished its queued work (CUDA and MPS run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()
    return time.perf_counter()


def save_preview(model, args, device):
    """16 one-call digits from the same noise after every epoch: the latest in meanflow_preview.png."""
    noise = torch.randn(PREVIEW_DIGITS, 1, 28, 28, generator=torch.Generator().manual_seed(args.seed)).to(device)
    images = to_uint8(sample_meanflow(model.eval(), noise))
    model.train()
    save_grid(images, os.path.join(args.out_dir, "meanflow_preview.png"), nrow=PREVIEW_DIGITS)
    return images


def save_results(model, losses, previews, args, device, bf16):
    model.eval()
    out = lambda name: os.path.join(args.out_dir, f"meanflow_{name}")  # noqa: E731
    if previews:
        save_grid(torch.cat(previews), out("previews.png"), nrow=PREVIEW_DIGITS)
    if losses:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(losses, alpha=0.3, lw=0.5, label="per step")
        window = min(100, len(losses))
        ax.plot(np.arange(window - 1, len(losses)), np.convolve(losses, np.ones(window) / window, "valid"),
                label=f"mean of {window}")
        ax.set(xlabel="step", ylabel="squared error to the target, per pixel", yscale="log",
               title="MeanFlow training")
        ax.legend()
        fig.savefig(out("loss_curve.png"), dpi=100, bbox_inches="tight")
        plt.close(fig)
    noise = torch.randn(args.num_samples, 1, 28, 28, generator=torch.Generator().manual_seed(args.seed))
    start = clock(device)
    samples = torch.cat([sample_meanflow(model, noise[i:i + 256].to(device), args.steps, bf16)
                         for i in range(0, len(noise), 256)])  # in chunks: a giant batch falls out of the caches
    seconds = clock(device) - start
    print(f"sampled {args.num_samples} digits with {args.steps} call(s) each in {seconds:.2f}s "
          f"({args.num_samples / seconds:.0f} img/s)")
    images = to_uint8(samples)
    save_grid(images[:100], out("samples.png"), nrow=10 if len(images) > 64 else 8)
    if args.save_npz:
        os.makedirs(os.path.dirname(os.path.abspath(args.save_npz)), exist_ok=True)
        np.savez_compressed(args.save_npz, images=images.numpy(), seconds=seconds)
        print(f"wrote {args.save_npz} ({len(images)} images)")
    print(f"wrote pictures to {os.path.abspath(args.out_dir)}")


def ddim_timesteps(K, alpha_bar, spacing="uniform"):
    """The timesteps visited (at most K, from T-1 down; T = len(alpha_bar)). After the last one comes a final step to
    x_0 (ᾱ = 1): without it, the digits would keep the little noise that is left at the last visited t.
    uniform: evenly from T-1 to 0. trailing: T-1, T-1-T/K, ..., T/K-1 (Lin et al. 2024). quadratic: evenly in √t
    (Song et al. 2021), so more of the visits fall at low noise, where the digit's details are decided.
    A visit whose ᾱ equals the one before is dropped: the cosine schedule floors ᾱ, so t = 995..999 are ONE noise
    level, and a step between two of them has length 0 (DPM-Solver would divide by it). So above ~220 calls the
    cosine schedule gets up to 4 fewer calls than K; the schedule itself stays, and so do the checkpoints trained on it."""
    T = len(alpha_bar)
    if spacing == "uniform":
        steps = np.linspace(T - 1, 0, K).round().astype(int)  # 999, ..., 0
    elif spacing == "trailing":
        steps = (T - np.arange(K) * T / K).round().astype(int) - 1  # 999, 979, ..., 19 for K=50
    else:
        steps = (np.linspace(np.sqrt(T - 1), 0, K) ** 2).round().astype(int)  # 999, 959, ..., 2, 0 for K=50
        for i in reversed(range(K - 1)):  # near t = 0, rounding can land two visits on one t: keep them apart
            steps[i] = max(steps[i], steps[i + 1] + 1)
    steps = steps.tolist()
    return [t for i, t in enumerate(steps) if i == 0 or alpha_bar[t] > alpha_bar[steps[i - 1]]]


def ddim_step(x, pred_noise, alpha_bar, alpha_bar_prev, eta, noise):
    """One DDIM update from x_t to x_prev (Song et al. 2021, Eq. 12), written with named terms."""
    # predicted x_0: undo the forward process with the model's noise, x_0 ≈ (x_t - √(1-ᾱ_t) ε_θ) / √ᾱ_t
    pred_x0 = (x - (1 - alpha_bar).sqrt() * pred_noise) / alpha_bar.sqrt()
    # σ_t(η) = η · √((1-ᾱ_prev)/(1-ᾱ_t)) · √(1 - ᾱ_t/ᾱ_prev): η=1 gives DDPM's posterior std, η=0 no noise
    sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)).sqrt() if eta > 0 else 0.0
    # "direction pointing to x_t": the part of the noise we keep, √(1-ᾱ_prev-σ²) · ε_θ
    dir_xt = (1 - alpha_bar_prev - sigma ** 2).clamp(min=0).sqrt() * pred_noise
    # x_prev = √ᾱ_prev · pred_x0 + direction + σ z
    return alpha_bar_prev.sqrt() * pred_x0 + dir_xt + sigma * noise


@torch.no_grad()
def sample_ddim(model, sched, x_T, steps, eta=0.0, spacing="uniform", bf16=False, generator=None, progress=True,
                frames=None):
    """Walk from the noise x_T to digits in `steps` model calls. eta=1 with steps=T is DDPM (src.py's Algorithm 2).
    frames: a list that gets x after every call (for an animation)."""
    timesteps = ddim_timesteps(steps, sched["alpha_bar"], spacing)
    one = torch.ones((), device=x_T.device)
    x = x_T
    for i, t in enumerate(tqdm(timesteps, desc=f"DDIM {steps} steps", disable=not progress, leave=False)):
        t_batch = torch.full((len(x),), t, device=x.device, dtype=torch.long)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            pred_noise = model(x, t_batch).float()
        # ᾱ of the next (lower) timestep; after the last one we land on x_0 itself, where ᾱ = 1
        alpha_bar_prev = sched["alpha_bar"][timesteps[i + 1]] if i + 1 < len(timesteps) else one
        noise = torch.randn(x.shape, device=x.device, generator=generator) if eta > 0 else torch.zeros_like(x)
        x = ddim_step(x, pred_noise, sched["alpha_bar"][t], alpha_bar_prev, eta, noise)
        if frames is not None:
            frames.append(x)
    return x


@torch.no_grad()
def generate(student, sched, z, bf16=False):
    """The point of it all: ONE network call from noise z (at t = T-1) to a digit."""
    t = torch.full((len(z),), sched["alpha_bar"].shape[0] - 1, device=z.device, dtype=torch.long)
    with torch.autocast(z.device.type, dtype=torch.bfloat16, enabled=bf16):
        return student(z, t).float()


def save_same_noise(rows, path):
    """One row of digits per (label, uint8 images) pair, the same noise in every column."""
    n = len(rows[0][1])
    fig, axes = plt.subplots(len(rows), n, figsize=(n, 1.2 * len(rows)), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for col in range(n):
            axes[r, col].imshow(images[col].numpy(), cmap="gray", vmin=0, vmax=255)
            axes[r, col].set_xticks([])
            axes[r, col].set_yticks([])
        axes[r, 0].set_ylabel(label, fontsize=7)
    fig.suptitle("same noise z: teacher vs one-step students", fontsize=9)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def compare(args, model, device, bf16):
    """Four ways to a digit from the SAME ten noises: chapter 1's teacher with 50 deterministic DDIM calls, and in
    one call each chapter 4's kd student, chapter 4c's DMD generator and this chapter's MeanFlow."""
    z = torch.randn(10, 1, 28, 28, generator=torch.Generator().manual_seed(args.seed)).to(device)
    teacher_ckpt = load_checkpoint(args.teacher, device)
    teacher = model_from_checkpoint(teacher_ckpt, args.teacher).to(device).eval()
    sched = {k: v.to(device) for k, v in ddpm_schedule(**teacher_ckpt["config"]["schedule"]).items()}
    rows = [("teacher\nDDIM-50", to_uint8(sample_ddim(teacher, sched, z, 50, bf16=bf16, progress=False)))]
    for label, path, kind, script in [("kd\n1 call", args.kd, "distilled", "train_distilled.py"),
                                      ("DMD\n1 call", args.dmd, "dmd", "train_dmd.py")]:
        student = model_from_checkpoint(load_checkpoint(path, device, kind, script), path).to(device).eval()
        rows.append((label, to_uint8(generate(student, sched, z, bf16))))
    rows.append(("MeanFlow\n1 call", to_uint8(sample_meanflow(model, z, 1, bf16))))
    save_same_noise(rows, os.path.join(args.out_dir, "meanflow_comparison.png"))
    print(f"wrote {os.path.join(args.out_dir, 'meanflow_comparison.png')}")


def jvp_cost(args, config, device, repeats=10):
    """What the JVP costs here: seconds per training step (forward, backward, optimizer step; float32) of this
    chapter's loss and of plain flow matching (r = t, no JVP), the same network and batch size, measured in one run."""
    model = build_meanflow_model(config).to(device)
    optimizer = make_optimizer(model, args)
    x0 = torch.rand(args.batch_size, 1, 28, 28, device=device) * 2 - 1  # the cost does not depend on the digits

    def step(with_jvp):
        noise = torch.randn_like(x0)
        r, t = sample_interval(len(x0), args.interval_share, args.logit_mean, args.logit_std, device)
        if with_jvp:
            loss = meanflow_loss(model, x0, noise, r, t, args.adaptive_p)[0]
        else:
            loss = (model(interpolate(x0, noise, t), t, t) - (noise - x0)).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    seconds = {}
    for name, with_jvp in [("flow matching, no JVP", False), ("MeanFlow, with the JVP", True)]:
        for _ in range(3):  # warm-up: the first steps allocate memory
            step(with_jvp)
        start = clock(device)
        for _ in range(repeats):
            step(with_jvp)
        seconds[name] = (clock(device) - start) / repeats
        print(f"{name}: {1000 * seconds[name]:.0f} ms a step ({args.batch_size / seconds[name]:.0f} img/s)")
    ratio = seconds["MeanFlow, with the JVP"] / seconds["flow matching, no JVP"]
    print(f"the JVP makes a training step {ratio:.1f}x as long on {device} (float32, batch {args.batch_size})")
    return ratio


def main(argv=None):
    args = parse_args(argv)
    try:
        os.makedirs(args.out_dir, exist_ok=True)
    except OSError as e:
        fail(f"cannot create --out-dir {args.out_dir} ({e.strerror})")
    if not os.access(args.out_dir, os.W_OK):
        fail(f"--out-dir {args.out_dir} is not writable")
    device = pick_device(args.device)
    bf16, bf16_why = use_bf16(args.bf16, device)
    torch.manual_seed(args.seed)

    if args.sample_only:
        path = args.checkpoint or os.path.join(args.out_dir, FINAL_NAME)
        ckpt = load_checkpoint(path, device, "meanflow", "train_meanflow.py")
        model = build_meanflow_model(ckpt["config"])
        model.load_state_dict(ckpt["ema"])
        save_results(model.to(device).eval(), ckpt["losses"], [], args, device, bf16)
        if args.compare:
            compare(args, model, device, bf16)
        return

    base_channels = args.base_channels or (64 if device.type == "cuda" else 16)  # a Mac (MPS) is a laptop too
    args.lr = args.lr or (8e-3 if base_channels <= 16 else 2e-3)
    args.optimizer = args.optimizer or ("muon" if base_channels <= 16 else "adamw")
    config = {"base_channels": base_channels, "channel_mults": [1, 2, 4], "attention": not args.no_attention,
              "upsample": "conv-first", "path": "straight", "inputs": "t, t - r", "time_scale": args.time_scale}
    if args.jvp_cost:
        return jvp_cost(args, config, device)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C mid-step: train() saves, then stops
    print(f"device {device} (training float32; sampling with bf16 autocast {'on' if bf16 else 'off'}: {bf16_why})")
    ema_model, losses, previews = train(args, config, device)
    save_results(ema_model, losses, previews, args, device, bf16)
    if args.compare:
        compare(args, ema_model, device, bf16)


if __name__ == "__main__":
    main()
