"""
Chapter 5 - classifier-FREE guidance (Ho & Salimans 2022): one conditional model, no classifier.

Usage (copy-paste):
    python src_classifier_free.py --minutes 10          # trains a class-conditional DDPM, then guided grids
    python src_classifier_free.py --minutes 10 --recipe first   # the DDPM paper's recipe instead of chapter 1's
    python src_classifier_free.py --sample-only --weights 0 1 2 3 5
    python src_classifier_free.py --sample-only --num-samples 200 --weights 2.5 --save-npz cf.npz   # evaluate.py

Chapter 2 (src_cfg.py) steered an unconditional model with the gradient of a separate noisy classifier. Here the
model itself gets the label: ε_θ(x_t, t, y). During training the label is replaced by a "null" class with
probability p_uncond (10%), so the SAME network also learns the unconditional ε_θ(x_t, t, ∅). At sampling time

    ε̂ = ε_θ(x_t, t, ∅) + w · (ε_θ(x_t, t, y) - ε_θ(x_t, t, ∅))

Convention: w is the weight on the conditional direction, so w = 0 is the unconditional model, w = 1 the plain
conditional model, and w > 1 extrapolates past it (more on-class, less varied). The paper writes the same
thing as (1 + w')·ε(y) - w'·ε(∅), i.e. its w' = our w - 1: a "guidance 0" there is our w = 1. Mixing up the two is
the most common guidance bug. Both branches run in ONE batched forward pass (the batch is doubled).

What comes out (in --out-dir):
    classifier_free_model_final.pt          the conditional model (+ EMA + config); ..._last.pt is resumable
    classifier_free_weight_{w}.png          overview per guidance weight (rows = digits)
    classifier_free_same_noise.png          ONE starting noise, asked for each of the ten digits
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
from torchvision.utils import make_grid
from tqdm import tqdm

matplotlib.use("Agg")  # draw into files: no window, works on a machine without a screen
import matplotlib.pyplot as plt  # noqa: E402 (after choosing the backend)

# ----------------------------------------------------------------------------------------------------
# 1. Config
# ----------------------------------------------------------------------------------------------------
FINAL_NAME = "classifier_free_model_final.pt"
LAST_NAME = "classifier_free_model_last.pt"
SCHEDULE = {"T": 1000, "beta_1": 1e-4, "beta_T": 0.02}  # the DDPM paper's linear noise schedule, as in src.py
COSINE_SCHEDULE = {"T": 1000, "kind": "cosine"}  # Improved DDPM's, src.py's CPU default
# Chapter 1's two recipes (src.py; why each part is there: notes/1-ddpm.md). "laptop": the CPU width 16's - a bold
# learning rate with Muon for the weight matrices, the cosine schedule with noisier levels drawn more often and a
# longer warm-up, the upsampling convs at the low resolution, EDM's scaling. "first": the DDPM paper's, with AdamW.
RECIPES = {"laptop": {"lr": 8e-3, "optimizer": "muon", "muon_lr": 0.02, "warmup_steps": 500, "noise_shift": 1.0,
                      "schedule": COSINE_SCHEDULE, "upsample": "conv-first", "sigma_data": 0.5},
           "first": {"lr": 2e-3, "optimizer": "adamw", "muon_lr": None, "warmup_steps": 200, "noise_shift": 0.0,
                     "schedule": SCHEDULE}}
NULL_CLASS = 10  # the label that means "no label": index 10 of the class embedding
SAMPLERS = {"ddim": (False, 0.0), "ddpm": (False, 1.0),  # name: (second order?, η); see sample_ddim.py
            "dpmpp-2m": (True, 0.0), "dpmpp-2m-sde": (True, 1.0), "restart": (True, 1.0)}
RESTART = {"t_min": 100, "t_max": 400}  # restart: the stretch of timesteps walked twice, as in sample_ddim.py
DEFAULT_SAMPLER = "dpmpp-2m-sde"  # chosen by measurement (accuracy per digit, FID, the grids): RESULTS.md
DEFAULT_WEIGHT = 2.5  # the guided weight w: chosen by measurement, every digit >= 99% judged right (RESULTS.md)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Classifier-free guidance: train a conditional DDPM on MNIST, sample.",
                                formatter_class=HelpFormatter)
    p.add_argument("--data-root", default=os.environ.get("MNIST_ROOT", "./data"),
                   help="folder holding MNIST/raw/ (torchvision layout); env var MNIST_ROOT")
    p.add_argument("--out-dir", default=".", help="where checkpoints and pictures go")
    p.add_argument("--epochs", type=positive_int, default=20, help="passes over the 60k training digits")
    p.add_argument("--minutes", type=positive_float, default=None,
                   help="wall-clock training budget; then it still saves and samples")
    p.add_argument("--batch-size", type=positive_int, default=128, help="images per training (and sampling) step")
    p.add_argument("--recipe", choices=list(RECIPES), default=None,
                   help="laptop: chapter 1's CPU recipe (Muon, cosine schedule, EDM's scaling; see RECIPES); first: "
                        "the DDPM paper's. Default: laptop for the CPU width 16, first for wider UNets (as src.py)")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="peak AdamW learning rate (with Muon: of the parameters it leaves to AdamW). Default: the "
                        "recipe's")
    p.add_argument("--warmup-steps", type=int, default=None, help="linear learning-rate warm-up. Default: the recipe's")
    p.add_argument("--ema-decay", type=float, default=0.999, help="EMA of the weights, used for sampling")
    p.add_argument("--min-snr-gamma", type=float, default=5.0,
                   help="Min-SNR loss weighting, as in src.py (not with the laptop recipe's EDM scaling)")
    p.add_argument("--p-uncond", type=probability, default=0.1, help="probability of dropping the label in training")
    p.add_argument("--base-channels", type=positive_int, default=None,
                   help="UNet width at 28x28; default 16 on a CPU and on Apple MPS, 64 on a CUDA GPU (as src.py)")
    p.add_argument("--no-attention", action="store_true", help="drop the self-attention block at 7x7")
    p.add_argument("--weights", type=non_negative_float, nargs="+", default=[0.0, 1.0, DEFAULT_WEIGHT],
                   help=f"guidance weights w to sample with (0 = unconditional, 1 = conditional, {DEFAULT_WEIGHT:g} = "
                        f"this chapter's choice); the same-noise figure uses the largest")
    p.add_argument("--digits", type=digit, nargs="+", default=list(range(10)), help="digits to draw")
    p.add_argument("--num-samples", type=positive_int, default=8, help="samples per digit and weight")
    p.add_argument("--sampler", choices=list(SAMPLERS), default=DEFAULT_SAMPLER,
                   help="ddim: deterministic DDIM; ddpm: the 1000-step ancestral sampler (ignores --steps); "
                        "dpmpp-2m / dpmpp-2m-sde: DPM-Solver++(2M), deterministic / stochastic; restart: "
                        "dpmpp-2m-sde that walks t = 400..100 twice (sample_ddim.py)")
    p.add_argument("--steps", type=positive_int, default=50, help="DDIM steps")
    p.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                   help="bfloat16 autocast; auto = on for CUDA and for CPUs with native bf16, off on MPS")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                   help="auto picks cuda, then mps, then cpu")
    p.add_argument("--resume", action="store_true", help=f"continue training from OUT_DIR/{LAST_NAME}")
    p.add_argument("--sample-only", action="store_true", help=f"skip training: sample from OUT_DIR/{FINAL_NAME}")
    p.add_argument("--save-npz", default=None, metavar="PATH",
                   help="export `images` uint8 N x 28 x 28, `labels`, the weight and the sampling time; one "
                        "file per weight if several (PATH_w3.npz)")
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


def non_negative_float(s):
    if not float(s) >= 0 or not math.isfinite(float(s)):  # also rejects nan and inf
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {s}")
    return float(s)


def digit(s):
    if not 0 <= int(s) <= 9:
        raise argparse.ArgumentTypeError(f"must be a digit 0-9, got {s}")
    return int(s)


def probability(s):
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
# 2. Data: MNIST digits and their labels
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
# 3. Noise schedule (DDPM paper, Sec. 2 and 4; the cosine one from Improved DDPM). Identical copy in every chapter.
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


def q_sample(x0, t, noise, sched):
    """The forward process in one jump: x_t ~ q(x_t | x_0) = N(√ᾱ_t x_0, (1-ᾱ_t) I)."""
    alpha_bar = sched["alpha_bar"][t].view(-1, 1, 1, 1)
    signal_rate, noise_rate = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    return signal_rate * x0 + noise_rate * noise


# ----------------------------------------------------------------------------------------------------
# 4. Model: a compact UNet. Identical copy in every chapter (a test checks), so they all load the same file.
# ----------------------------------------------------------------------------------------------------
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


class ConditionalUNet(UNet):
    """ε_θ(x_t, t, y): the same UNet (with sigma_data, EDM's scaling too), plus a learned embedding per label (10
    digits + the null class) that is added to the timestep embedding - so every ResBlock knows the noise level and
    the digit."""

    def __init__(self, base_channels=16, channel_mults=(1, 2, 4), attention=True, conv_first=False,
                 sigma_data=None, alpha_bar=None):
        super().__init__(base_channels, channel_mults, attention, conv_first, sigma_data, alpha_bar)
        self.class_emb = nn.Embedding(NULL_CLASS + 1, 4 * base_channels)

    def forward(self, x, t, y):
        return self.denoise(x, t, self.time_mlp(timestep_embedding(t, self.base_channels)) + self.class_emb(y))


def build_conditional_model(config):
    # As src.py's build_model: a config without "upsample" or "sigma_data" (the first recipe's) builds that model.
    sigma_data = config.get("sigma_data")
    alpha_bar = ddpm_schedule(**config["schedule"])["alpha_bar"] if sigma_data is not None else None
    return ConditionalUNet(config["base_channels"], tuple(config["channel_mults"]), config["attention"],
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


def load_conditional(path, device):
    """The trained conditional model (EMA weights) and its checkpoint; one clear line if it can't."""
    ckpt = load_checkpoint(path, device, "classifier_free", "src_classifier_free.py")
    model = build_conditional_model(ckpt["config"])
    model.load_state_dict(ckpt["ema"])
    return model.to(device).eval(), ckpt


# ----------------------------------------------------------------------------------------------------
# 5. Training (DDPM Algorithm 1 with label dropout) and guided sampling
# ----------------------------------------------------------------------------------------------------
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


def solver_step(x, pred_noise, alpha_bars, i, previous, second_order, eta, noise):
    """Step i of a sampler, from ᾱ = alpha_bars[i] to alpha_bars[i + 1], given the (possibly guided) noise prediction.
    First order: DDIM with its η. Second order: DPM-Solver++(2M), the ODE for η = 0, the SDE for η = 1; it uses
    `previous` = (x_0 prediction, step size h) of step i-1. Returns x at the next level, and this step's pair."""
    alpha_bar, alpha_bar_next = alpha_bars[i], alpha_bars[i + 1]
    if not second_order:
        return ddim_step(x, pred_noise, alpha_bar, alpha_bar_next, eta, noise), None
    pred_x0 = (x - (1 - alpha_bar).sqrt() * pred_noise) / alpha_bar.sqrt()  # ε -> x_0, as in DDIM
    last = i + 2 == len(alpha_bars)  # the final step lands on ᾱ = 1, where λ = ∞: first order, no noise
    prev_pred_x0, h_prev = (None, None) if previous is None or last else previous
    x, h = dpmpp_2m_step(x, pred_x0, prev_pred_x0, h_prev, alpha_bar, alpha_bar_next,
                         noise if eta > 0 and not last else None)
    return x, (pred_x0, h)


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


def timestep_probs(alpha_bar, shift):
    """How often training draws each t. Each t is a noise level λ_t = log SNR = log(ᾱ_t / (1 - ᾱ_t)). On the cosine
    schedule, uniform t visits them with density ∝ 1/cosh(λ/2): centred on λ = 0, where signal and noise are
    equal. Multiplying by cosh(λ/2) / cosh((λ + shift)/2) moves that centre to λ = -shift: with shift = 1 the
    noisiest levels are drawn e ≈ 2.7 times as often as the cleanest, relative to uniform (shift = 0)."""
    log_snr = torch.log(alpha_bar / (1 - alpha_bar))
    weights = torch.cosh(log_snr / 2) / torch.cosh((log_snr + shift) / 2)
    return weights / weights.sum()


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


def drop_labels(y, p_uncond):
    """Replace each label by the null class with probability p_uncond: the model also learns p(x)."""
    drop = torch.rand(y.shape, device=y.device) < p_uncond
    return torch.where(drop, torch.full_like(y, NULL_CLASS), y)


def conditional_loss(model, x0, y, sched, min_snr_gamma=5.0, t_probs=None):
    """src.py's diffusion_loss (the same draw of t and the same weights), now with a label: ‖ε - ε_θ(x_t, t, y)‖²."""
    T = sched["alpha_bar"].shape[0]
    if t_probs is None:
        t = torch.randint(0, T, (x0.shape[0],), device=x0.device)
    else:
        t = torch.multinomial(t_probs, x0.shape[0], replacement=True)  # noisier levels more often (timestep_probs)
    noise = torch.randn_like(x0)
    pred_noise = model(q_sample(x0, t, noise, sched), t, y)
    per_sample = (pred_noise.float() - noise).pow(2).mean(dim=(1, 2, 3))
    snr = sched["alpha_bar"][t] / (1 - sched["alpha_bar"][t])
    if model.sigma_data is not None:
        per_sample = per_sample * (1 + 1 / (model.sigma_data ** 2 * snr))  # EDM's weight, in Min-SNR's place
    elif min_snr_gamma > 0:
        per_sample = per_sample * snr.clamp(max=min_snr_gamma) / snr
    return per_sample.mean()


def guided_noise(model, x, t_batch, y, weight):
    """ε̂ = ε(x_t, ∅) + w · (ε(x_t, y) - ε(x_t, ∅)), both branches in ONE forward pass of a doubled batch."""
    null = torch.full_like(y, NULL_CLASS)
    cond, uncond = model(torch.cat([x, x]), torch.cat([t_batch, t_batch]), torch.cat([y, null])).float().chunk(2)
    return uncond + weight * (cond - uncond)


def restart_walks(steps, alpha_bar, spacing="uniform"):
    """Restart's visits (Xu et al. 2023), `steps` in all, as three walks: the usual path (4/5 of the calls) down to
    t_min, its first visit at or below RESTART["t_min"]; the stretch t_max -> t_min again (the other 1/5); the rest
    of the usual path. Returns the three lists of timesteps, t_min and t_max."""
    restart_calls = max(1, steps // 5)
    path = ddim_timesteps(steps - restart_calls, alpha_bar, spacing)
    k = next((i for i, t in enumerate(path) if t <= RESTART["t_min"]), len(path) - 1)  # first visit <= t_min
    t_min, t_max = path[k], RESTART["t_max"]
    again = np.linspace(t_max, t_min + 1, restart_calls).round().astype(int).tolist()  # the stretch, walked again
    return [path[:k], again, path[k:]], t_min, t_max


def restart_jump(x, alpha_bar_min, alpha_bar_max, generator=None):
    """Back up from the noise level ᾱ_min to the noisier ᾱ_max with the forward process in one go:
    x_max = √(ᾱ_max/ᾱ_min) x_min + √(1 - ᾱ_max/ᾱ_min) z. The fresh noise z shrinks the errors gathered so far."""
    z = torch.randn(x.shape, device=x.device, generator=generator)
    return (alpha_bar_max / alpha_bar_min).sqrt() * x + (1 - alpha_bar_max / alpha_bar_min).sqrt() * z


def sampler_walks(sampler, steps, sched):
    """What a --sampler visits, as walks that each end on a noise level ᾱ: one walk down to the digit (ᾱ = 1), or for
    restart three (restart_walks), the second starting after a jump back up to t_max. Returns the walks (lists of
    timesteps), the ᾱ each ends on, and t_max (None: no jump)."""
    one = torch.ones((), device=sched["alpha_bar"].device)
    if sampler != "restart":
        T = sched["alpha_bar"].shape[0]
        return [ddim_timesteps(T if sampler == "ddpm" else steps, sched["alpha_bar"])], [one], None
    walks, t_min, t_max = restart_walks(steps, sched["alpha_bar"])
    return walks, [sched["alpha_bar"][t_min]] * 2 + [one], t_max


@torch.no_grad()
def sample_guided(model, sched, x_T, y, weight, steps, sampler=DEFAULT_SAMPLER, bf16=False, generator=None,
                  progress=True):
    """Any of this chapter's --sampler choices, with the classifier-free guided ε̂, in `steps` network calls (ddpm:
    all T)."""
    second_order, eta = SAMPLERS[sampler]
    walks, ends, t_max = sampler_walks(sampler, steps, sched)
    x = x_T
    with tqdm(total=sum(map(len, walks)), desc=f"sampling, w={weight:g}", disable=not progress, leave=False) as bar:
        for w, (timesteps, end) in enumerate(zip(walks, ends)):
            if w == 1:  # restart: back up to t_max, then walk the stretch again
                x = restart_jump(x, ends[0], sched["alpha_bar"][t_max], generator)
            alpha_bars = [sched["alpha_bar"][t] for t in timesteps] + [end]
            previous = None
            for i, t in enumerate(timesteps):
                t_batch = torch.full((len(x),), t, device=x.device, dtype=torch.long)
                with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
                    pred_noise = guided_noise(model, x, t_batch, y, weight)
                noise = torch.randn(x.shape, device=x.device, generator=generator) if eta > 0 else torch.zeros_like(x)
                x, previous = solver_step(x, pred_noise, alpha_bars, i, previous, second_order, eta, noise)
                bar.update(1)
    return x


def resume(path, config, model, ema, optimizer, device):
    """Loads LAST_NAME into the model, EMA and optimizer; returns the step count and the loss history."""
    _, ckpt = load_conditional(path, device)
    if ckpt["config"] != config:
        fail(f"--resume: {path} was trained with another config {ckpt['config']}; pass the same flags")
    model.load_state_dict(ckpt["model"])
    ema.model.load_state_dict(ckpt["ema"])
    optimizer.load_state_dict(ckpt["optimizer"])
    print(f"resumed from {path} at step {ckpt['step']}")
    return ckpt["step"], list(ckpt["losses"])


def train(args, config, device, bf16):
    images, labels = load_mnist(args.data_root, train=True)
    data, labels = to_model_range(images).to(device), labels.to(device)
    if len(data) < args.batch_size:
        fail(f"only {len(data)} training images but --batch-size {args.batch_size}")
    sched = {k: v.to(device) for k, v in ddpm_schedule(**config["schedule"]).items()}
    model = build_conditional_model(config).to(device)
    print(f"conditional UNet "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters | p_uncond {args.p_uncond} | "
          f"{args.recipe} recipe")
    optimizer = make_optimizer(model, args)
    t_probs = timestep_probs(sched["alpha_bar"], args.noise_shift) if args.noise_shift else None
    ema = EMA(model, args.ema_decay)
    steps_per_epoch = len(data) // args.batch_size
    total_steps = args.epochs * steps_per_epoch
    last_path = os.path.join(args.out_dir, LAST_NAME)
    step, losses = resume(last_path, config, model, ema, optimizer, device) if args.resume else (0, [])

    def checkpoint():
        return {"kind": "classifier_free", "config": config, "model": model.state_dict(),
                "ema": ema.model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "losses": losses}

    budget_s = args.minutes * 60 if args.minutes else float("inf")
    start, start_step = time.time(), step
    generator = torch.Generator(device="cpu").manual_seed(args.seed + step)
    bar = tqdm(total=total_steps, initial=step, desc="training", unit="step")
    try:
        while step < total_steps and time.time() - start < budget_s:
            order = torch.randperm(len(data), generator=generator).to(device)
            for i in range(steps_per_epoch):
                elapsed = time.time() - start
                if step >= total_steps or elapsed >= budget_s:
                    break
                rate = learning_rate(args, step, max(step / total_steps, elapsed / budget_s))
                for group in optimizer.param_groups:  # Muon's matrices follow the same curve to their own peak
                    group["lr"] = rate * args.muon_lr / args.lr if group.get("muon") else rate
                idx = order[i * args.batch_size:(i + 1) * args.batch_size]
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    loss = conditional_loss(model, data[idx], drop_labels(labels[idx], args.p_uncond), sched,
                                            args.min_snr_gamma, t_probs)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                ema.update(model, step)
                step += 1
                losses.append(loss.item())
                bar.update(1)
                if step % 20 == 0:
                    bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}", min=f"{elapsed / 60:.1f}")
            save_atomic(checkpoint(), last_path)
    except KeyboardInterrupt:
        save_atomic(checkpoint(), last_path)
        print(f"\ninterrupted at step {step}: saved {last_path}; continue with --resume")
        sys.exit(130)
    bar.close()
    seconds = time.time() - start
    print(f"trained {step - start_step} steps in {seconds / 60:.1f} min "
          f"({(step - start_step) * args.batch_size / seconds:.0f} img/s)")
    final = checkpoint()
    del final["optimizer"]
    save_atomic(final, os.path.join(args.out_dir, FINAL_NAME))
    return ema.model.eval()


# ----------------------------------------------------------------------------------------------------
# 6. Outputs
# ----------------------------------------------------------------------------------------------------
def save_rows(rows, row_labels, path, title):
    """A figure with one labelled row of 28x28 images per entry of `rows` (each uint8 [n, 28, 28], same n)."""
    n = len(rows[0])
    grid = make_grid(torch.cat(list(rows)).unsqueeze(1), nrow=n, padding=2)[0]  # each image in a 30x30 cell
    fig, ax = plt.subplots(figsize=(max(3, n * 0.5), len(rows) * 0.5 + 0.6))
    ax.imshow(grid.numpy(), cmap="gray", vmin=0, vmax=255)
    ax.set_yticks([2 + i * 30 + 14 for i in range(len(rows))], row_labels, fontsize=8)
    ax.set_xticks([])
    ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    if args.sampler == "restart" and args.steps < 5:
        fail(f"--sampler restart needs --steps >= 5 (a fifth of them walk t = 400..100 again), got {args.steps}")
    try:
        os.makedirs(args.out_dir, exist_ok=True)
    except OSError as e:
        fail(f"cannot create --out-dir {args.out_dir} ({e.strerror})")
    device = pick_device(args.device)
    bf16, bf16_why = use_bf16(args.bf16, device)
    print(f"device {device} (bf16 autocast {'on' if bf16 else 'off'}: {bf16_why})")
    torch.manual_seed(args.seed)
    if args.sample_only:
        model, ckpt = load_conditional(os.path.join(args.out_dir, FINAL_NAME), device)
        config = ckpt["config"]
    else:
        base_channels = args.base_channels or (64 if device.type == "cuda" else 16)
        args.recipe = args.recipe or ("laptop" if base_channels <= 16 else "first")  # as src.py picks
        recipe = RECIPES[args.recipe]
        args.lr = args.lr or recipe["lr"]
        args.warmup_steps = recipe["warmup_steps"] if args.warmup_steps is None else args.warmup_steps
        args.optimizer, args.muon_lr, args.noise_shift = recipe["optimizer"], recipe["muon_lr"], recipe["noise_shift"]
        config = {"base_channels": base_channels, "channel_mults": [1, 2, 4], "attention": not args.no_attention,
                  "schedule": recipe["schedule"], "p_uncond": args.p_uncond, "recipe": args.recipe}
        config.update({k: recipe[k] for k in ("upsample", "sigma_data") if k in recipe})
        signal.signal(signal.SIGINT, signal.default_int_handler)
        model = train(args, config, device, bf16)
    sched = {k: v.to(device) for k, v in ddpm_schedule(**config["schedule"]).items()}
    T = config["schedule"]["T"]
    steps = T if args.sampler == "ddpm" else args.steps
    sampler_name = f"{args.sampler}-{steps}"
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    x_T = torch.randn(len(args.digits) * args.num_samples, 1, 28, 28, generator=generator).to(device)
    y = torch.tensor(args.digits, device=device).repeat_interleave(args.num_samples)
    for weight in args.weights:
        noise_gen = torch.Generator(device="cpu" if device.type == "mps" else device).manual_seed(args.seed + 1)
        start = time.perf_counter()
        images = torch.cat([to_uint8(sample_guided(model, sched, xs, ys, weight, steps, args.sampler, bf16, noise_gen))
                            for xs, ys in zip(x_T.split(args.batch_size), y.split(args.batch_size))])
        seconds = time.perf_counter() - start
        print(f"w = {weight:g}: {len(images)} digits with {sampler_name} in {seconds:.1f}s")
        per_digit = images.view(len(args.digits), args.num_samples, 28, 28)
        save_rows(list(per_digit), [str(d) for d in args.digits],
                  os.path.join(args.out_dir, f"classifier_free_weight_{weight:g}.png"),
                  f"classifier-free guidance, w = {weight:g}, {sampler_name}")
        if args.save_npz:
            path = args.save_npz
            if len(args.weights) > 1:
                stem, ext = os.path.splitext(path)
                path = f"{stem}_w{weight:g}{ext or '.npz'}"
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            np.savez_compressed(path, images=images.numpy(), labels=y.cpu().numpy(),  # + what evaluate.py
                                guidance="classifier-free", strength=weight,     # --tradeoff plots
                                sampler=sampler_name, seconds=seconds)
            print(f"wrote {path}")
    # One starting noise, asked for each of the ten digits
    weight = max(args.weights)
    same_noise_gen = torch.Generator(device="cpu" if device.type == "mps" else device).manual_seed(args.seed + 1)
    images = to_uint8(sample_guided(model, sched, x_T[:1].repeat(10, 1, 1, 1), torch.arange(10, device=device),
                                    weight, steps, args.sampler, bf16, same_noise_gen, progress=False))
    save_rows([images], [""], os.path.join(args.out_dir, "classifier_free_same_noise.png"),
              f"one starting noise, labels 0..9 (w = {weight:g}, {sampler_name})")
    print(f"wrote pictures to {os.path.abspath(args.out_dir)}")


if __name__ == "__main__":
    main()
