"""
Chapter 6 - flow matching: learn the straight path from noise to digit, then follow it back in a few calls.

Usage (copy-paste):
    python train_flow.py --minutes 10                 # laptop CPU: ten minutes of training, then pictures
    python train_flow.py --sample-only --steps 20 --num-samples 2000 --save-npz flow.npz   # for evaluate.py
    python train_flow.py --sample-only --sampler midpoint --steps 20   # an ODE solver instead of the SDE
    python train_flow.py --reflow                     # 2-rectified flow from flow_model_final.pt, <= 30 minutes
    python train_flow.py --reflow --sample-only --steps 1 --num-samples 2000 --save-npz reflow1.npz
    python train_flow.py --resume                     # continue the run saved in flow_model_last.pt

The idea (Lipman et al. 2023; Liu et al. 2023; Albergo & Vanden-Eijnden 2023). Put a digit x_0 and a noise ε at the
two ends of a straight line, x_t = (1 - t)·x_0 + t·ε, t from 0 (the digit) to 1 (pure noise). Along it x_t moves at
the constant velocity v = ε - x_0, and the network v_θ(x_t, t) is trained to predict it: the loss is ‖v_θ - v‖².
Many lines pass through the same x_t, so the network learns their average E[ε - x_0 | x_t]; following that averaged
field from t = 1 back to t = 0 carries the noise onto the digits (notes/7-flow-matching.md). Sampling is solving an
ordinary differential equation: Euler, Heun or midpoint; --steps K is K network calls for each of them. Or, with
`--sampler sde`, chapter 3's DPM-Solver++(2M) SDE: the straight path, rescaled, is chapter 1's, so the same solver
runs on it and adds fresh noise at every step.
Chapter 1's DDPM is the same idea on a curved path; this chapter keeps its UNet, its laptop recipe and its scores.

Reflow (Liu et al. 2023). The averaged field's paths bend where lines crossed, so one Euler step lands between
digits. Draw (noise, digit) pairs with the trained flow and train the flow again on THOSE pairs: they come from
one deterministic map, their lines hardly cross, the new paths are straighter, and one or two calls draw a digit.
Chapter 4's kd student learns the same kind of pairs from the DDPM teacher, by plain regression.

What comes out (in --out-dir; with --reflow the files start with reflow_ instead of flow_):
    flow_model_final.pt     the trained flow (+ EMA + config); flow_model_last.pt is resumable
    flow_samples.png        a grid of digits from --sampler with --steps calls (default: the SDE solver, 20 calls)
    flow_preview.png        16 digits from the same noise after every epoch (Euler, 20 calls); flow_previews.png
                            stacks them, one row per epoch
    flow_loss_curve.png     training loss per step
    reflow_pairs.pt         (--reflow) the cached pairs, reused while the flow and the settings match
    reflow_comparison.png   (--reflow) the same noise: the flow as it drew the pairs, then the reflow in 1 and 2 calls

The file reads top to bottom: config -> data -> path -> model -> train -> sample -> outputs.
"""
import argparse
import copy
import hashlib
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
TIME_SCALE = 1000  # the UNet's sinusoidal embedding was made for chapter 1's t = 0..999: t in [0, 1] enters as 1000·t
ODE_SAMPLERS = ["euler", "heun", "midpoint"]  # deterministic: the same noise always gives the same digit
SAMPLERS = ODE_SAMPLERS + ["sde"]  # sde: chapter 3's DPM-Solver++(2M) SDE, on the flow
RECIPE_KEYS = ["lr", "batch_size", "warmup_steps", "ema_decay", "optimizer", "muon_lr", "time_sampling", "logit_mean"]
PREVIEW_DIGITS, PREVIEW_CALLS = 16, 20  # the per-epoch preview grid: how many digits, how many Euler calls
PAIRS_NAME = "reflow_pairs.pt"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train a flow-matching model on MNIST (and reflow it) and sample digits.",
                                formatter_class=HelpFormatter)
    p.add_argument("--data-root", default=os.environ.get("MNIST_ROOT", "./data"),
                   help="folder holding MNIST/raw/ (torchvision layout); downloaded there when online. "
                        "Env var MNIST_ROOT sets the default")
    p.add_argument("--out-dir", default=".", help="where checkpoints and pictures go")
    p.add_argument("--epochs", type=positive_int, default=20, help="passes over the 60k digits (or the pairs)")
    p.add_argument("--minutes", type=positive_float, default=None,
                   help="wall-clock training budget; stops after this many minutes or --epochs, whichever comes "
                        "first, then still saves and samples. Default: none, but 30 with --reflow (pairs included)")
    p.add_argument("--batch-size", type=positive_int, default=128, help="images per training step")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="peak learning rate of AdamW (with Muon: of the parameters Muon leaves to AdamW). Default: "
                        "8e-3 for the CPU width 16, 2e-3 for wider UNets (chapter 1's)")
    p.add_argument("--optimizer", choices=["adamw", "muon"], default=None,
                   help="as in chapter 1. Default: muon for the CPU width 16, adamw for wider UNets")
    p.add_argument("--muon-lr", type=positive_float, default=0.02, help="--optimizer muon: the matrices' peak rate")
    p.add_argument("--warmup-steps", type=int, default=500, help="linear learning-rate warm-up")
    p.add_argument("--ema-decay", type=ema_decay, default=0.999, help="EMA of the weights, used for sampling")
    p.add_argument("--time-sampling", choices=["uniform", "logit-normal"], default="logit-normal",
                   help="how training draws t: uniform (the papers), or logit-normal, t = sigmoid(m + n) with "
                        "n ~ N(0, 1) (Stable Diffusion 3): the middle of the path, where v is hardest, more often")
    p.add_argument("--logit-mean", type=float, default=None,
                   help="m of --time-sampling logit-normal: > 0 tilts the draws towards the noise end. Default: 0, "
                        "and 2 with --reflow, whose 1-call digit is its velocity at t = 1: trained there more "
                        "often, it scored 0.62x the FID of m = 0 (RESULTS.md)")
    p.add_argument("--base-channels", type=positive_int, default=None,
                   help="UNet width at 28x28. Default: 16 on a CPU and on Apple MPS, 64 on a CUDA GPU")
    p.add_argument("--no-attention", action="store_true", help="drop the self-attention block at 7x7")
    p.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                   help="bfloat16 autocast; auto = on for CUDA and for CPUs with native bf16, off on MPS")
    p.add_argument("--seed", type=int, default=0, help="random seed (with --reflow also: which noises the pairs use)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                   help="auto picks cuda, then mps, then cpu")
    p.add_argument("--resume", action="store_true", help="continue training from OUT_DIR/flow_model_last.pt "
                                                         "(with --reflow: reflow_model_last.pt)")
    p.add_argument("--reflow", action="store_true",
                   help="train a 2-rectified flow on (noise, digit) pairs drawn from --checkpoint")
    p.add_argument("--checkpoint", default="flow_model_final.pt",
                   help="--reflow: the flow that draws the pairs, made by `python train_flow.py`")
    p.add_argument("--pairs", type=positive_int, default=60000, help="--reflow: number of (noise, digit) pairs")
    p.add_argument("--pair-steps", type=positive_int, default=20,
                   help="--reflow: the flow's calls per pair (drawing 60k pairs takes minutes on a CPU, once)")
    p.add_argument("--pair-sampler", choices=ODE_SAMPLERS, default="midpoint",
                   help="--reflow: the ODE solver that draws the pairs (a deterministic map; midpoint: the best "
                        "ODE solver at 20 calls, RESULTS.md)")
    p.add_argument("--sample-only", action="store_true",
                   help="skip training: load OUT_DIR/flow_model_final.pt (with --reflow: reflow_model_final.pt)")
    p.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="how the digits are drawn: an ODE solver (euler, heun, midpoint) or sde, chapter 3's "
                        "DPM-Solver++(2M) SDE on the flow. Default: sde (the best at 20 and 50 calls, RESULTS.md), "
                        "euler with --reflow (straight paths: its 1 call is sde's 1 call)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="network calls per digit. Default: 20, or 1 with --reflow")
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
# 3. The path: a straight line from the digit (t = 0) to the noise (t = 1)
# ----------------------------------------------------------------------------------------------------
def interpolate(x0, noise, t):
    """x_t = (1 - t)·x_0 + t·ε. In chapter 1's terms, √ᾱ = 1 - t and √(1 - ᾱ) = t (notes/7-flow-matching.md)."""
    t = t.view(-1, 1, 1, 1)
    return (1 - t) * x0 + t * noise


def sample_time(n, how, logit_mean=0.0, device="cpu"):
    """t for each image of a batch. uniform: t ~ U(0, 1), as the papers do. logit-normal (Esser et al. 2024):
    t = sigmoid(m + n), n ~ N(0, 1); the ends, where x_t is all digit or all noise and v is easy, come up rarely."""
    if how == "uniform":
        return torch.rand(n, device=device)
    return torch.sigmoid(logit_mean + torch.randn(n, device=device))


# ----------------------------------------------------------------------------------------------------
# 4. Model: chapter 1's UNet, unchanged (a test checks); it predicts the velocity v instead of the noise ε
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


def build_model(config):
    # Checkpoints made before "upsample" was saved lack it: they upsample, then convolve. Without "sigma_data" the
    # layers predict ε directly (no preconditioning).
    sigma_data = config.get("sigma_data")
    alpha_bar = ddpm_schedule(**config["schedule"])["alpha_bar"] if sigma_data is not None else None
    return UNet(config["base_channels"], tuple(config["channel_mults"]), config["attention"],
                config.get("upsample") == "conv-first", sigma_data, alpha_bar)


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


def model_from_checkpoint(ckpt, path, weights="ema"):
    """Rebuilds the exact UNet from the config stored in the checkpoint and loads its (EMA) weights."""
    model = build_model(ckpt["config"])
    try:
        model.load_state_dict(ckpt[weights] if weights in ckpt else ckpt["model"])
    except (RuntimeError, KeyError) as e:
        fail(f"{path} does not match this UNet ({str(e).splitlines()[0][:120]})")
    return model


def velocity(model, x, t):
    """v_θ(x, t) for a time t in [0, 1]: one number for the whole batch, or one per image."""
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device).expand(len(x))
    return model(x, t * TIME_SCALE).float()


# ----------------------------------------------------------------------------------------------------
# 5. Training (flow matching, and reflow on pairs) and sampling (an ODE solver, from t = 1 to t = 0)
# ----------------------------------------------------------------------------------------------------
def flow_loss(model, x0, noise, t):
    """Conditional flow matching: on the line from x_0 to ε the velocity is ε - x_0; regress v_θ(x_t, t) onto it."""
    x_t = interpolate(x0, noise, t)
    target = noise - x0  # v = d/dt x_t: constant along the straight line
    return (velocity(model, x_t, t) - target).pow(2).mean()


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


def file_fingerprint(path):
    """A short hash of the teacher file: cached pairs are only reused for the very same teacher."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def pair_noise(n, seed):
    """The student's inputs z: regenerated from the seed, so the cache stores only the teacher's images."""
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def make_reflow_pairs(args, flow, device, bf16, settings):
    """(z, x_0 = flow(z)) pairs for reflow, cached in OUT_DIR/reflow_pairs.pt while `settings` match (the flow file,
    its solver and calls, the number of pairs, the seed and the precision), as chapter 4 caches its teacher's."""
    path = os.path.join(args.out_dir, PAIRS_NAME)
    if os.path.isfile(path):
        try:
            cache = torch.load(path, map_location="cpu", weights_only=True)
            if cache["settings"] == settings:
                print(f"reusing {path} ({settings['pairs']} pairs, {settings['pair_sampler']}, "
                      f"{settings['pair_steps']} calls)")
                return pair_noise(settings["pairs"], settings["seed"]), cache["x0"].float()
            print(f"{path} was made by another flow or settings: drawing new pairs")
        except Exception as e:
            print(f"{path} is unreadable ({type(e).__name__}): drawing new pairs")
    z = pair_noise(settings["pairs"], settings["seed"])
    x0 = torch.empty_like(z, dtype=torch.float16)
    chunk = 256  # images per call: larger batches fall out of a CPU's caches
    start = time.perf_counter()
    for i in tqdm(range(0, len(z), chunk), desc=f"reflow pairs ({settings['pair_sampler']}, "
                  f"{settings['pair_steps']} calls)", unit="batch"):
        x0[i:i + chunk] = sample_flow(flow, z[i:i + chunk].to(device), settings["pair_steps"],
                                      settings["pair_sampler"], bf16, progress=False).clamp(-1, 1).cpu().half()
    save_atomic({"settings": settings, "x0": x0}, path)
    print(f"drew {len(z)} pairs in {(time.perf_counter() - start) / 60:.1f} min, cached in {path}")
    return z, x0.float()


def time_grid(calls, sampler):
    """The times a sampler visits from t = 1 down to 0 so that it makes exactly `calls` network calls: Euler one
    call per interval (the SDE solver too); Heun and midpoint two, and when `calls` is odd their last interval takes
    an Euler step."""
    intervals = calls if sampler in ("euler", "sde") else (calls + 1) // 2
    return torch.linspace(1, 0, intervals + 1).tolist()


def flow_alpha_bar(t):
    """The straight path is chapter 1's diffusion, rescaled: x_t = (1 - t)·x_0 + t·ε divided by c = √((1 - t)² + t²)
    is √ᾱ·x_0 + √(1 - ᾱ)·ε with ᾱ = (1 - t)²/c² (notes/7-flow-matching.md). Returns ᾱ and c, as tensors."""
    c = math.sqrt((1 - t) ** 2 + t ** 2)
    return torch.tensor((1 - t) ** 2 / c ** 2), c


def log_snr(alpha_bar):
    """λ = log(α/σ) with α = √ᾱ, σ = √(1-ᾱ): half the log signal-to-noise ratio. DPM-Solver steps in λ.
    It grows as the noise shrinks, to +∞ at the clean end (ᾱ = 1)."""
    return 0.5 * (alpha_bar.log() - (1 - alpha_bar).log())


def dpmpp_2m_step(x, pred_x0, prev_pred_x0, h_prev, alpha_bar, alpha_bar_next, noise=None):
    """One DPM-Solver++(2M) update from x_s to x_t (Lu et al. 2022, Algorithm 2), in data (x_0) prediction.
    With `noise`: SDE-DPM-Solver++(2M), the stochastic variant. Returns x_t and the step size h (for the next step).

    The ODE's linear part is integrated exactly; the x_0 prediction is held constant over the step (first order,
    prev_pred_x0 = None: that is DDIM η=0 for the ODE, η=1 for the SDE) or extrapolated along a line in λ."""
    alpha_t, sigma_s, sigma_t = alpha_bar_next.sqrt(), (1 - alpha_bar).sqrt(), (1 - alpha_bar_next).sqrt()
    h = log_snr(alpha_bar_next) - log_snr(alpha_bar)  # the step size in λ (> 0: towards less noise)
    # D: the x_0 the step assumes. First order: this step's prediction. Second order: extrapolate the line through
    # the previous and this prediction, D = x̂_0(s) + (x̂_0(s) - x̂_0(prev)) / (2r), with r = h_prev / h.
    D = pred_x0 if prev_pred_x0 is None else pred_x0 + (pred_x0 - prev_pred_x0) * (h / (2 * h_prev))
    if noise is None:
        # ODE: x_t = (σ_t/σ_s) x_s - α_t (e^{-h} - 1) D           (expm1(u) = e^u - 1, accurate for small u)
        return sigma_t / sigma_s * x - alpha_t * torch.expm1(-h) * D, h
    # SDE: x_t = (σ_t/σ_s) e^{-h} x_s + α_t (1 - e^{-2h}) D + σ_t √(1 - e^{-2h}) z
    # (more of x_s is replaced by D and by fresh noise z than in the ODE: errors are washed out, not carried)
    keep = -torch.expm1(-2 * h)  # 1 - e^{-2h}
    return sigma_t / sigma_s * (-h).exp() * x + alpha_t * keep * D + sigma_t * keep.sqrt() * noise, h


def sde_step(x, v, t, s, previous, generator=None):
    """One step of chapter 3's `dpmpp-2m-sde` from time t down to s, on the flow: divided by c, the flow's x_t is
    chapter 1's x at level ᾱ(t), and the velocity gives the x_0 the solver extrapolates, x̂_0 = x_t - t·v. Each step
    replaces part of x with fresh noise, which washes out the errors an ODE solver carries to the end; the last step
    (to t = 0) adds none. Returns x at s and this step's (x̂_0, h) for the next step."""
    (alpha_bar_t, c_t), (alpha_bar_s, c_s) = flow_alpha_bar(t), flow_alpha_bar(s)
    pred_x0 = x - t * v  # x_t = x_0 + t·(ε - x_0) = x_0 + t·v
    last = s == 0
    prev_pred_x0, h_prev = (None, None) if previous is None or last else previous
    noise = None if last else torch.randn(x.shape, generator=generator).to(x.device)
    x, h = dpmpp_2m_step(x / c_t, pred_x0, prev_pred_x0, h_prev, alpha_bar_t, alpha_bar_s, noise)
    return x * c_s, (pred_x0, h)


@torch.no_grad()
def sample_flow(model, noise, calls, sampler="heun", bf16=False, progress=True, frames=None, generator=None):
    """Solve dx/dt = v_θ(x, t) from x = noise at t = 1 back to t = 0 in exactly `calls` network calls (sde: a
    stochastic path to the same distribution; `generator` draws its fresh noise).
    frames: a list that gets x after every interval (the noise-to-digit picture)."""
    x, ts, left, previous = noise, time_grid(calls, sampler), calls, None
    for t, s in tqdm(list(zip(ts[:-1], ts[1:])), desc=f"{sampler} sampling", disable=not progress, leave=False):
        dt = s - t  # < 0: we walk back in time
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            v = velocity(model, x, t)  # the slope here
            if sampler == "sde":
                x, previous = sde_step(x, v, t, s, previous, generator)
                left -= 1
            elif sampler == "euler" or left == 1:
                x, left = x + dt * v, left - 1  # Euler: this slope for the whole interval (first order)
            elif sampler == "heun":  # Heun (trapezoid): the mean of the slopes at both ends (second order)
                v_end = velocity(model, x + dt * v, s)
                x, left = x + dt * (v + v_end) / 2, left - 2
            else:  # midpoint: the slope halfway along, reached with half an Euler step (second order)
                x, left = x + dt * velocity(model, x + dt / 2 * v, t + dt / 2), left - 2
        if frames is not None:
            frames.append(x.clone())
    return x


def resume(path, config, model, ema, optimizer, device):
    """Loads a _last checkpoint into the model, EMA and optimizer; returns its step, losses and previews."""
    ckpt = load_checkpoint(path, device, "flow", "train_flow.py")
    if ckpt["config"] != config:
        fail(f"--resume: {path} was trained with another architecture {ckpt['config']}; pass the same flags")
    model.load_state_dict(ckpt["model"])
    ema.model.load_state_dict(ckpt["ema"])
    optimizer.load_state_dict(ckpt["optimizer"])
    print(f"resumed from {path} at step {ckpt['step']}")
    return ckpt["step"], list(ckpt["losses"]), list(ckpt["previews"])


def train(args, config, model, x0_data, partners, device, bf16, budget_s):
    """Flow matching over x0_data for --epochs or the budget; `partners` are reflow's noises (None: fresh noise
    every step). A checkpoint and a preview after every epoch."""
    optimizer = make_optimizer(model, args)
    ema = EMA(model, args.ema_decay)
    last = os.path.join(args.out_dir, f"{args.prefix}_model_last.pt")
    steps_per_epoch = len(x0_data) // args.batch_size
    total_steps = args.epochs * steps_per_epoch
    step, losses, previews = resume(last, config, model, ema, optimizer, device) if args.resume else (0, [], [])

    def checkpoint():
        return {"kind": "flow", "config": config, "model": model.state_dict(), "ema": ema.model.state_dict(),
                "optimizer": optimizer.state_dict(), "step": step, "losses": losses, "previews": previews,
                "recipe": {k: getattr(args, k) for k in RECIPE_KEYS}}

    start, start_step = time.time(), step
    generator = torch.Generator().manual_seed(args.seed + step)  # batch order, reproducible
    bar = tqdm(total=total_steps, initial=step, desc=f"training ({args.prefix})", unit="step")
    try:
        while step < total_steps and time.time() - start < budget_s:
            order = torch.randperm(len(x0_data), generator=generator).to(device)
            for i in range(steps_per_epoch):
                elapsed = time.time() - start
                if step >= total_steps or elapsed >= budget_s:
                    break
                rate = learning_rate(args, step, max(step / total_steps, elapsed / budget_s))
                for group in optimizer.param_groups:  # Muon's matrices follow the same curve to their own peak
                    group["lr"] = rate * args.muon_lr / args.lr if group.get("muon") else rate
                batch = order[i * args.batch_size:(i + 1) * args.batch_size]
                x0 = x0_data[batch]
                noise = torch.randn_like(x0) if partners is None else partners[batch]
                t = sample_time(len(x0), args.time_sampling, args.logit_mean, device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    loss = flow_loss(model, x0, noise, t)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                ema.update(model, step)
                losses.append(loss.item())
                step += 1
                bar.update(1)
                if step % 20 == 0:
                    bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}", min=f"{elapsed / 60:.1f}")
            previews.append(save_preview(ema.model, args, device, bf16))
            save_atomic(checkpoint(), last)
    except KeyboardInterrupt:
        save_atomic(checkpoint(), last)
        print(f"\ninterrupted at step {step}: saved {last}; continue with --resume")
        sys.exit(130)
    bar.close()
    seconds = time.time() - start
    print(f"trained {step - start_step} steps in this run, {step} in all "
          f"({(step - start_step) * args.batch_size / seconds:.0f} img/s over {seconds / 60:.1f} min)")
    final = checkpoint()
    del final["optimizer"]  # the final file is for sampling; the resumable state is in the _last file
    final["throughput"] = {"steps": step - start_step, "seconds": seconds}
    save_atomic(final, os.path.join(args.out_dir, f"{args.prefix}_model_final.pt"))
    return ema.model, losses, previews


# ----------------------------------------------------------------------------------------------------
# 6. Outputs: preview per epoch, sample grid, reflow comparison, loss curve, optional .npz export
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


def save_preview(model, args, device, bf16):
    """16 digits from the same noise after every epoch: the latest in PREFIX_preview.png."""
    noise = torch.randn(PREVIEW_DIGITS, 1, 28, 28, generator=torch.Generator().manual_seed(args.seed)).to(device)
    images = to_uint8(sample_flow(model.eval(), noise, PREVIEW_CALLS, "euler", bf16, progress=False))
    model.train()
    save_grid(images, os.path.join(args.out_dir, f"{args.prefix}_preview.png"), nrow=PREVIEW_DIGITS)
    return images


def save_results(model, losses, previews, args, device, bf16, source=None):
    """The sample grid (+ .npz), the loss curve and previews; with a reflow's `source` flow, the comparison."""
    model.eval()
    out = lambda name: os.path.join(args.out_dir, f"{args.prefix}_{name}")  # noqa: E731
    if previews:
        save_grid(torch.cat(previews), out("previews.png"), nrow=PREVIEW_DIGITS)
    if losses:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(losses, alpha=0.3, lw=0.5, label="per step")
        window = min(100, len(losses))
        ax.plot(np.arange(window - 1, len(losses)), np.convolve(losses, np.ones(window) / window, "valid"),
                label=f"mean of {window}")
        ax.set(xlabel="step", ylabel="loss", yscale="log", title=f"{args.prefix} training loss")
        ax.legend()
        fig.savefig(out("loss_curve.png"), dpi=100, bbox_inches="tight")
        plt.close(fig)
    noise = torch.randn(args.num_samples, 1, 28, 28, generator=torch.Generator().manual_seed(args.seed))
    start = clock(device)
    fresh = torch.Generator().manual_seed(args.seed + 1)  # --sampler sde's noise along the way
    samples = torch.cat([sample_flow(model, noise[i:i + 256].to(device), args.steps, args.sampler, bf16,
                                     generator=fresh)
                         for i in range(0, len(noise), 256)])  # in chunks: a giant batch falls out of the caches
    seconds = clock(device) - start
    print(f"sampled {args.num_samples} digits, {args.sampler} with {args.steps} calls, in {seconds:.1f}s "
          f"({args.num_samples / seconds:.0f} img/s)")
    images = to_uint8(samples)
    save_grid(images[:100], out("samples.png"), nrow=10 if len(images) > 64 else 8)
    if source is not None:  # the same 10 noises: where the pairs came from, then the straightened flow
        rows = [sample_flow(m, noise[:10].to(device), calls, sampler, bf16, progress=False)
                for m, calls, sampler in ((source, args.pair_steps, args.pair_sampler), (model, 1, "euler"),
                                          (model, 2, "euler"))]
        save_grid(to_uint8(torch.cat(rows)), out("comparison.png"), nrow=10)
        print(f"wrote {out('comparison.png')}: the flow as it drew the pairs (top), reflow 1 call, 2 calls")
    if args.save_npz:
        os.makedirs(os.path.dirname(os.path.abspath(args.save_npz)), exist_ok=True)
        np.savez_compressed(args.save_npz, images=images.numpy(), seconds=seconds)
        print(f"wrote {args.save_npz} ({len(images)} images)")
    print(f"wrote pictures to {os.path.abspath(args.out_dir)}")


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
    args.prefix = "reflow" if args.reflow else "flow"
    args.steps = args.steps or (1 if args.reflow else 20)
    args.sampler = args.sampler or ("euler" if args.reflow else "sde")
    args.logit_mean = (2.0 if args.reflow else 0.0) if args.logit_mean is None else args.logit_mean

    if args.sample_only:
        path = os.path.join(args.out_dir, f"{args.prefix}_model_final.pt")
        ckpt = load_checkpoint(path, device, "flow", "train_flow.py" + (" --reflow" if args.reflow else ""))
        save_results(model_from_checkpoint(ckpt, path).to(device), ckpt["losses"], [], args, device, bf16)
        return

    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C mid-step: train() saves, then stops
    print(f"device {device} (bf16 autocast {'on' if bf16 else 'off'}: {bf16_why})")
    if args.reflow:
        # The new flow starts from the old one's weights (Liu et al.): it only has to straighten the paths.
        ckpt = load_checkpoint(args.checkpoint, device, "flow", "train_flow.py")
        config = ckpt["config"]
        source = model_from_checkpoint(ckpt, args.checkpoint).to(device).eval()
        budget_s = (args.minutes or 30.0) * 60
        start = time.time()
        settings = {"flow": file_fingerprint(args.checkpoint), "pair_sampler": args.pair_sampler,
                    "pair_steps": args.pair_steps, "pairs": args.pairs, "seed": args.seed, "bf16": bf16}
        partners, x0_data = make_reflow_pairs(args, source, device, bf16, settings)
        partners, x0_data = partners.to(device), x0_data.to(device)
        model = copy.deepcopy(source).train().requires_grad_(True)
        budget_s -= time.time() - start  # the pairs came out of the same budget
    else:
        base_channels = args.base_channels or (64 if device.type == "cuda" else 16)  # a Mac (MPS) is a laptop too
        narrow = base_channels <= 16  # chapter 1's laptop recipe for the narrow UNet, its GPU recipe for wider ones
        config = {"base_channels": base_channels, "channel_mults": [1, 2, 4], "attention": not args.no_attention,
                  "upsample": "conv-first" if narrow else "upsample-first", "path": "straight"}
        images, _ = load_mnist(args.data_root, train=True)
        x0_data, partners, source = to_model_range(images).to(device), None, None
        model = build_model(config).to(device)
        budget_s = args.minutes * 60 if args.minutes else float("inf")
    args.lr = args.lr or (8e-3 if config["base_channels"] <= 16 else 2e-3)
    args.optimizer = args.optimizer or ("muon" if config["base_channels"] <= 16 else "adamw")
    if len(x0_data) < args.batch_size:
        fail(f"only {len(x0_data)} training images but --batch-size {args.batch_size}")
    print(f"UNet {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, base width "
          f"{config['base_channels']}; t drawn {args.time_sampling}")
    ema_model, losses, previews = train(args, config, model, x0_data, partners, device, bf16, budget_s)
    save_results(ema_model, losses, previews, args, device, bf16, source)


if __name__ == "__main__":
    main()
