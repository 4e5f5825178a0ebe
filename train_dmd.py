"""
Chapter 4c - distribution matching distillation (DMD): a one-step generator that learns the teacher's whole
*distribution* of digits, not one path through it.

Usage (copy-paste):
    python train_dmd.py                             # pairs once (cached), regression warm-up, DMD: <= 45 minutes
    python train_dmd.py --minutes 15                # a wall-clock budget for the whole run, pairs included
    python train_dmd.py --init distilled_model_final.pt --regression-steps 0   # start from chapter 4's kd student
    python train_dmd.py --sample-only --num-samples 2000 --save-npz dmd.npz   # for evaluate.py

The idea (Yin et al. 2024, "One-step Diffusion with Distribution Matching Distillation"; DMD2, Yin et al. 2024).
Chapter 4's kd student copies the teacher's deterministic map z -> x_0 and so inherits that map's errors. DMD asks
instead: do the generator's digits, as a *set*, look like the teacher's? It compares two denoisers on the same
noised generator digit x_t:
  - the "real" score: the frozen teacher, which knows what real digits look like at every noise level;
  - the "fake" score: a copy of the teacher trained online, with the ordinary DDPM loss, on the generator's own
    digits, so it knows what the *generator's* digits look like.
The generator starts as a copy of the teacher's layers too, read as x_0 (student_from: a teacher with EDM's scaling,
src.py's CPU default, lends them without the scaling; the fake score keeps it, being a diffusion model).
Where the two disagree, the generator is moved toward the teacher's guess and away from its own (section 5).
That is the gradient of KL(generator || teacher), which seeks modes: alone it can over-draw easy digits. A small
regression onto cached teacher pairs (chapter 4's idea) keeps every digit in play. The run starts with a cheap
phase of regression alone (chapter 4's kd in brief), so that distribution matching refines digits, not noise.

What comes out (in --out-dir):
    distill_pairs.pt                    cached (z, x_0) teacher pairs, reused while teacher and settings match
    dmd_model_final.pt                  the one-step generator (+ EMA + config); dmd_model_last.pt resumable
    dmd_comparison.png                  the SAME noise: teacher DDIM-50 | kd student (--kd, if found) | DMD, 1 step
    dmd_samples.png                     a grid of one-step digits
    dmd_loss_curve.png                  the three losses: distribution matching, regression, fake score
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
# 1. Config
# ----------------------------------------------------------------------------------------------------
FINAL_NAME = "dmd_model_final.pt"
LAST_NAME = "dmd_model_last.pt"
PAIRS_NAME = "distill_pairs.pt"  # the same cache as chapter 4's: one set of pairs serves both chapters
PREFIX = "dmd"  # the pictures this chapter writes: dmd_samples.png, dmd_comparison.png, dmd_loss_curve.png
FIGURE_STEPS = 50  # the teacher's DDIM steps in the comparison figure
NOISE_RANGE = (0.02, 0.98)  # the fractions of T between which the generator's digits are noised (the paper's)
HIGH_NOISE_FROM, HIGH_NOISE_SHARE = 0.6, 0.5  # ...and half of them above 0.6T, where a digit's class is decided


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Distil src.py's DDPM into a one-step generator by distribution "
                                            "matching (DMD).", formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", default="diffusion_model_final.pt", help="the teacher, made by `python src.py`")
    p.add_argument("--init", default=None, metavar="PATH",
                   help="start the generator from a kd student (train_distilled.py's distilled_model_final.pt) "
                        "instead of the teacher's weights")
    p.add_argument("--kd", default="distilled_model_final.pt", metavar="PATH",
                   help="a kd student to show in the comparison figure (skipped if the file is not there)")
    p.add_argument("--pairs", type=positive_int, default=30000,
                   help="cached (noise, teacher digit) pairs for the regression term")
    p.add_argument("--teacher-steps", type=positive_int, default=25, help="the teacher's DDIM steps per pair")
    p.add_argument("--regression-steps", type=non_negative_int, default=8000,
                   help="phase 1: generator updates by regression alone (chapter 4's kd, cheap), a warm start")
    p.add_argument("--steps", type=positive_int, default=6000,
                   help="phase 2: generator updates by distribution matching + regression")
    p.add_argument("--minutes", type=positive_float, default=45.0,
                   help="wall-clock budget for the whole run, teacher pairs + training: a few seconds' probe "
                        "measures this machine's speed and cuts --pairs, --regression-steps and --steps "
                        "alike to fit, a shorter run of the same recipe; then it still saves and samples")
    p.add_argument("--batch-size", type=positive_int, default=32, help="generator digits (and pairs) per update")
    p.add_argument("--fake-updates", type=positive_int, default=2,
                   help="fake-score updates per generator update (DMD2's two time-scale rule)")
    p.add_argument("--reg-weight", type=non_negative_float, default=0.25,
                   help="weight of the regression term (0 = distribution matching alone)")
    p.add_argument("--regression-lr", type=positive_float, default=1e-3, help="peak learning rate of phase 1")
    p.add_argument("--lr", type=positive_float, default=2e-4,
                   help="peak AdamW learning rate of phase 2 (generator and fake score)")
    p.add_argument("--warmup-steps", type=int, default=100, help="linear learning-rate warm-up")
    p.add_argument("--ema-decay", type=ema_decay, default=0.999, help="EMA of the generator's weights")
    p.add_argument("--seed", type=int, default=0, help="random seed (also: which noises z the pairs use)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                   help="auto picks cuda, then mps, then cpu")
    p.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                   help="bfloat16 autocast; auto = on for CUDA and for CPUs with native bf16, off on MPS")
    p.add_argument("--out-dir", default=".", help="where the pairs, checkpoints and pictures go")
    p.add_argument("--resume", action="store_true", help=f"continue training from OUT_DIR/{LAST_NAME}")
    p.add_argument("--sample-only", action="store_true", help=f"no training: sample from OUT_DIR/{FINAL_NAME}")
    p.add_argument("--num-samples", type=positive_int, default=64, help="one-step digits to draw at the end")
    p.add_argument("--save-npz", default=None, metavar="PATH",
                   help="export the one-step samples: `images` uint8 N x 28 x 28")
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


def non_negative_int(s):
    if int(s) < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return int(s)


def non_negative_float(s):
    if not float(s) >= 0 or not math.isfinite(float(s)):  # also rejects nan and inf
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {s}")
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
# 2. Data: the generator's inputs are noises z; its targets the teacher's digits and scores (section 5)
# ----------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------
# 5. Distribution matching: the teacher's DDIM sampler and pairs, the two scores, the losses, the training loop
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



def q_sample(x0, t, noise, sched):
    """The forward process in one jump: x_t ~ q(x_t | x_0) = N(√ᾱ_t x_0, (1-ᾱ_t) I)."""
    alpha_bar = sched["alpha_bar"][t].view(-1, 1, 1, 1)
    signal_rate, noise_rate = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    return signal_rate * x0 + noise_rate * noise


def diffusion_loss(model, x0, sched, min_snr_gamma=5.0, t_probs=None):
    """DDPM Algorithm 1, one step: noise x_0 to a random t, ask the model which noise was added.
    t_probs (src.py's timestep_probs) draws some t more often; None draws them uniformly, as the paper does."""
    T = sched["alpha_bar"].shape[0]
    if t_probs is None:
        t = torch.randint(0, T, (x0.shape[0],), device=x0.device)  # t ~ Uniform({1, ..., T})
    else:
        t = torch.multinomial(t_probs, x0.shape[0], replacement=True)  # t ~ t_probs
    noise = torch.randn_like(x0)  # ε ~ N(0, I)
    x_t = q_sample(x0, t, noise, sched)
    pred_noise = model(x_t, t)
    per_sample = (pred_noise.float() - noise).pow(2).mean(dim=(1, 2, 3))  # ‖ε - ε_θ(x_t, t)‖²
    snr = sched["alpha_bar"][t] / (1 - sched["alpha_bar"][t])  # each x_t's signal-to-noise ratio
    sigma_data = getattr(model, "sigma_data", None)  # set on src.py's UNet by --precondition edm
    if sigma_data is not None:
        # EDM's weighting λ = 1/c_out² (their Sec. 5 and Table 1): every noise level's error counts alike in the
        # layers' own output. On ε's error that is this weight; it takes Min-SNR's place.
        per_sample = per_sample * (1 + 1 / (sigma_data ** 2 * snr))
    elif min_snr_gamma > 0:
        # Min-SNR weighting: nearly-clean steps (huge signal-to-noise ratio) are easy and their gradients
        # fight the useful noisy steps; capping their weight at γ/SNR makes training converge much faster.
        per_sample = per_sample * snr.clamp(max=min_snr_gamma) / snr
    return per_sample.mean()



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


def make_pairs(args, teacher, sched, device, bf16, settings):
    """(z, x_0 = teacher DDIM(z)) pairs, cached in OUT_DIR/distill_pairs.pt while `settings` match (the teacher
    file, its steps, the number of pairs, the seed and the precision: bf16 and float32 pairs differ slightly)."""
    path = os.path.join(args.out_dir, PAIRS_NAME)
    if os.path.isfile(path):
        try:
            cache = torch.load(path, map_location="cpu", weights_only=True)
            if cache["settings"] == settings:
                print(f"reusing {path} ({settings['pairs']} pairs, teacher DDIM-{settings['teacher_steps']})")
                return pair_noise(settings["pairs"], settings["seed"]), cache["x0"].float()
            print(f"{path} was made by another teacher or settings: generating new pairs")
        except Exception as e:
            print(f"{path} is unreadable ({type(e).__name__}): generating new pairs")
    z = pair_noise(settings["pairs"], settings["seed"])
    x0 = torch.empty_like(z, dtype=torch.float16)
    chunk = 256  # images per teacher call: larger batches fall out of a CPU's caches
    start = time.perf_counter()
    for i in tqdm(range(0, len(z), chunk), desc=f"teacher pairs (DDIM-{settings['teacher_steps']})", unit="batch"):
        out = sample_ddim(teacher, sched, z[i:i + chunk].to(device), settings["teacher_steps"], bf16=bf16,
                          progress=False)
        x0[i:i + chunk] = out.clamp(-1, 1).cpu().half()
    seconds = time.perf_counter() - start
    save_atomic({"settings": settings, "x0": x0}, path)
    print(f"generated {len(z)} pairs in {seconds / 60:.1f} min, cached in {path}")
    return z, x0.float()


def cached_pair_count(out_dir, settings):
    """How many pairs OUT_DIR/distill_pairs.pt holds when this teacher made them with these settings (their number
    aside), else 0. A cache from an earlier run is used whole, and the budget then goes to training."""
    try:
        cached = torch.load(os.path.join(out_dir, PAIRS_NAME), map_location="cpu", weights_only=True)["settings"]
    except Exception:  # none yet, or unreadable: make_pairs says which and makes new ones
        return 0
    same = {k: v for k, v in cached.items() if k != "pairs"} == {k: v for k, v in settings.items() if k != "pairs"}
    return cached["pairs"] if same else 0


def teacher_seconds_per_pair(teacher, sched, steps, device, bf16):
    """What one teacher pair costs on this machine: one timed DDIM run on 128 noises, after a warm-up run."""
    with torch.random.fork_rng():  # the probe leaves the run's random numbers as they were
        z = torch.randn(128, 1, 28, 28).to(device)
        return time_per_image(lambda: sample_ddim(teacher, sched, z, steps, bf16=bf16, progress=False), len(z), device)


def fit_budget(budget_s, work, seconds_each):
    """The share (at most 1) of the planned work that fits in budget_s. Every phase is cut by the same share, so a
    slower machine runs a shorter run of the same recipe, not the first phases in full and the last one cut short.
    work: the units each phase plans (pairs, steps); seconds_each: what one unit costs, measured on this machine."""
    needed = sum(n * s for n, s in zip(work, seconds_each))
    return 1.0 if needed <= budget_s else budget_s / needed


def distill_loss(pred_x0, target_x0, kind):
    """How far the student's digit is from the target digit, averaged over pixels.

    mse: the mean of what the student is unsure about - where it can't tell if a stroke goes here or there, it
    paints both half-grey: soft digits. l1: the median - each pixel commits to ink or background: sharper.
    l1-clip: L1 on the picture as it is shown. Pictures are clipped to [-1, 1] (black .. white), so where the
    target is pure black, a student pixel even blacker changes nothing we see: that costs nothing (same for white).
    The student no longer spends effort hitting exactly -1 on the background."""
    if kind == "mse":
        return F.mse_loss(pred_x0, target_x0)
    error = pred_x0 - target_x0
    if kind == "l1-clip":
        past_black = (target_x0 <= -1) & (error < 0)
        past_white = (target_x0 >= 1) & (error > 0)
        error = error.masked_fill(past_black | past_white, 0.0)
    return error.abs().mean()


def student_from(teacher):
    """A trainable copy of the teacher's layers, whose output the student reads as x_0 (not ε). A teacher with EDM's
    scaling (`src.py --precondition edm`, the CPU default) wraps those layers in it, which turns their output into ε;
    the copy drops the wrapper. From pure noise such layers already output about x_0/σ_data (note 4)."""
    student = copy.deepcopy(teacher)
    student.sigma_data = None  # forward() then returns the layers' output as it is
    return student


def student_config(teacher_config, **settings):
    """The student's checkpoint config: the teacher's network without EDM's scaling (the student has none, see
    student_from), plus how the student was distilled."""
    return dict({k: v for k, v in teacher_config.items() if k != "sigma_data"}, **settings)


@torch.no_grad()
def generate(student, sched, z, bf16=False):
    """The point of it all: ONE network call from noise z (at t = T-1) to a digit."""
    t = torch.full((len(z),), sched["alpha_bar"].shape[0] - 1, device=z.device, dtype=torch.long)
    with torch.autocast(z.device.type, dtype=torch.bfloat16, enabled=bf16):
        return student(z, t).float()


def pred_x0(model, x_t, t, sched, bf16=False):
    """A denoiser's guess of the clean digit: x_0 = (x_t - √(1-ᾱ_t) ε_θ(x_t, t)) / √ᾱ_t, clipped to the data's
    range [-1, 1]. For a diffusion model this guess *is* its score: ∇log p_t(x_t) = -(x_t - √ᾱ_t x_0)/(1-ᾱ_t)."""
    alpha_bar = sched["alpha_bar"][t].view(-1, *([1] * (x_t.dim() - 1)))
    with torch.autocast(x_t.device.type, dtype=torch.bfloat16, enabled=bf16):
        pred_noise = model(x_t, t).float()
    return ((x_t - (1 - alpha_bar).sqrt() * pred_noise) / alpha_bar.sqrt()).clamp(-1, 1)


def distribution_matching_loss(x, x0_real, x0_fake):
    """The DMD generator loss (Yin et al. 2024, Eq. 7-8), for generator digits x and, at a noised copy x_t of
    them, the real (teacher) and fake denoisers' guesses of the clean digit.

    The gradient of KL(p_fake || p_real) with respect to a digit is s_fake(x_t) - s_real(x_t), the difference of
    the two scores; in x_0 terms it points along x0_fake - x0_real: away from what the generator's digits look
    like, toward what real digits look like. The paper's weight w_t divides it by the mean distance |x - x0_real|
    of each digit, so every noise level and every digit pulls with about the same strength. The loss
    0.5 ‖x - sg(x - grad)‖² (sg = stop-gradient) has exactly `grad` as its gradient with respect to x."""
    dims = tuple(range(1, x.dim()))
    weight = (x - x0_real).abs().mean(dim=dims, keepdim=True).clamp(min=1e-4).detach()  # per-sample w_t
    grad = (x0_fake - x0_real) / weight
    return 0.5 * F.mse_loss(x, (x - grad).detach())


def fake_score_step(fake, optimizer, generator, z, sched, bf16):
    """Keeps the fake score up to date: the ordinary DDPM loss (Algorithm 1), on the generator's current digits."""
    x = generate(generator, sched, z, bf16)  # no gradient flows into the generator here
    with torch.autocast(z.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = diffusion_loss(fake, x, sched)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(fake.parameters(), 1.0)
    optimizer.step()
    return loss.item()


def generator_loss(generator, teacher, fake, z, z_pair, x0_pair, sched, reg_weight, bf16):
    """One generator loss: regression onto cached teacher pairs, plus distribution matching on fresh noise z.
    fake=None is the regression warm-up: regression alone. Returns the total and the two terms (to plot)."""
    T = sched["alpha_bar"].shape[0]

    def one_step(noise):  # ONE call from noise to digit, with gradient
        with torch.autocast(noise.device.type, dtype=torch.bfloat16, enabled=bf16):
            return generator(noise, torch.full((len(noise),), T - 1, device=noise.device, dtype=torch.long)).float()

    loss_reg = distill_loss(one_step(z_pair), x0_pair, "l1-clip")  # regression (chapter 4): G(z) ≈ teacher(z)
    if fake is None:
        return loss_reg, float("nan"), loss_reg.item()
    x = one_step(z)
    t = torch.randint(int(NOISE_RANGE[0] * T), int(NOISE_RANGE[1] * T), (len(z),), device=z.device)
    # more weight on the high levels: there matching keeps each digit's share (the paper's uniform t: too many ones)
    high = torch.rand(len(z), device=z.device) < HIGH_NOISE_SHARE  # these digits get a level above HIGH_NOISE_FROM * T
    t[high] = torch.randint(int(HIGH_NOISE_FROM * T), int(NOISE_RANGE[1] * T), (int(high.sum()),), device=z.device)
    x_t = q_sample(x.detach(), t, torch.randn_like(x), sched)  # noise the generator's digits to a random level
    with torch.no_grad():  # neither score learns here: the teacher is frozen, the fake has its own step
        x0_real, x0_fake = pred_x0(teacher, x_t, t, sched, bf16), pred_x0(fake, x_t, t, sched, bf16)
    loss_dm = distribution_matching_loss(x, x0_real, x0_fake)
    return loss_dm + reg_weight * loss_reg, loss_dm.item(), loss_reg.item()


def phase_lr(args, step, time_fraction):
    """The generator's learning rate. The regression warm-up (--regression-lr) and distribution matching (--lr)
    each get their own warm-up and cosine decay; the second also decays with the time budget."""
    if step < args.regression_steps:
        return args.regression_lr / args.lr * learning_rate(args, step, step / args.regression_steps)
    k = step - args.regression_steps
    return learning_rate(args, k, max(k / args.steps, time_fraction))


def checkpoint_of(args, config, generator, ema, fake, optimizers, step, losses, final=False):
    """What the run saves: the final file is for sampling; LAST_NAME adds the fake score and optimizers to resume."""
    config = student_config(config, method="dmd", predicts="x0", reg_weight=args.reg_weight,
                            fake_updates=args.fake_updates)
    ckpt = {"kind": "dmd", "config": config, "model": generator.state_dict(), "ema": ema.model.state_dict(),
            "step": step, "losses": losses}
    if final:
        return ckpt
    return dict(ckpt, fake=fake.state_dict(), optimizers=[o.state_dict() for o in optimizers])


def setup(args, teacher, device):
    """The generator (the teacher's weights, or a kd student's with --init), its EMA, the fake score (the teacher's
    weights) and one AdamW optimizer each; with --resume, all of it as LAST_NAME saved it."""
    generator = student_from(teacher)
    if args.init:
        student = load_checkpoint(args.init, device, "distilled", "train_distilled.py")
        generator = model_from_checkpoint(student, args.init).to(device)
    generator.train().requires_grad_(True)
    fake = copy.deepcopy(teacher).train().requires_grad_(True)  # a diffusion model like the teacher: it returns ε
    optimizers = [torch.optim.AdamW(m.parameters(), lr=args.lr, weight_decay=0.0) for m in (generator, fake)]
    ema = EMA(generator, args.ema_decay)
    step, losses = 0, {"distribution matching": [], "regression": [], "fake score": []}
    if args.resume:
        path = os.path.join(args.out_dir, LAST_NAME)
        ckpt = load_checkpoint(path, device, "dmd", "train_dmd.py")
        generator.load_state_dict(ckpt["model"])
        ema.model.load_state_dict(ckpt["ema"])
        fake.load_state_dict(ckpt["fake"])
        for optimizer, state in zip(optimizers, ckpt["optimizers"]):
            optimizer.load_state_dict(state)
        step, losses = ckpt["step"], ckpt["losses"]
        print(f"resumed from {path} at step {step}")
    return generator, ema, fake, optimizers, step, losses


def train_step(args, generator, fake, optimizers, teacher, z_all, x0_all, sched, matching, bf16):
    """One generator update: regression onto a batch of cached pairs, and in phase 2 (matching) distribution matching
    too, after --fake-updates steps of the fake score. Returns the three losses (NaN: not used this step)."""
    B, device = args.batch_size, z_all.device
    # two time-scales (DMD2): the fake score takes several steps per generator step, to keep up with it
    fake_losses = [fake_score_step(fake, optimizers[1], generator, torch.randn(B, 1, 28, 28, device=device), sched,
                                   bf16) for _ in range(args.fake_updates if matching else 0)]
    idx = torch.randint(0, len(z_all), (B,), device=device)
    z = torch.randn(B, 1, 28, 28, device=device) if matching else None  # fresh noise: phase 2 only
    loss, loss_dm, loss_reg = generator_loss(generator, teacher, fake if matching else None, z, z_all[idx],
                                             x0_all[idx], sched, args.reg_weight, bf16)
    optimizers[0].zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(generator.parameters(), 1.0)
    optimizers[0].step()
    return loss_dm, loss_reg, float(np.mean(fake_losses)) if fake_losses else float("nan")


def plan(args, teacher, generator, fake, sched, settings, device, bf16, run_start):
    """How many pairs, regression steps and DMD steps fit --minutes here: what each costs is measured (a few seconds,
    real steps on throwaway copies) and all three are cut alike (fit_budget). Sets settings["pairs"], and
    args.regression_steps and args.steps to the plan."""
    cached = cached_pair_count(args.out_dir, settings)
    pair_s = 0.0 if cached else teacher_seconds_per_pair(teacher, sched, args.teacher_steps, device, bf16)
    probe = [copy.deepcopy(generator), copy.deepcopy(fake)]
    probe_optimizers = [torch.optim.AdamW(m.parameters(), lr=0.0) for m in probe]
    with torch.random.fork_rng():  # the probe leaves the run's random numbers as they were
        z = torch.randn(args.batch_size, 1, 28, 28).to(device)
        reg_s, dmd_s = (time_per_image(lambda: [train_step(args, *probe, probe_optimizers, teacher, z, z.clamp(-1, 1),
                                                           sched, matching, bf16) for _ in range(3)], 3, device)
                        for matching in (False, True))
    pairs, budget_s = cached or args.pairs, args.minutes * 60 - (time.time() - run_start)
    share = fit_budget(budget_s, [0 if cached else pairs, args.regression_steps, args.steps], [pair_s, reg_s, dmd_s])
    settings["pairs"] = pairs if cached else max(args.batch_size, round(pairs * share))
    args.regression_steps, args.steps = round(args.regression_steps * share), max(1, round(args.steps * share))
    made = "cached" if cached else f"{pair_s * 1e3:.1f} ms each"
    print(f"plan for --minutes {args.minutes:g} on this machine: {settings['pairs']} pairs ({made}) + "
          f"{args.regression_steps} regression steps ({reg_s * 1e3:.0f} ms each) + {args.steps} DMD steps "
          f"({dmd_s * 1e3:.0f} ms each), {share:.0%} of the full recipe")


def train(args, teacher, ckpt_config, sched, device, bf16):
    """Phase 1: --regression-steps of regression alone. Phase 2: --steps of fake-score updates alternating with
    generator updates (distribution matching + regression). Stops early when the budget is spent."""
    run_start = time.time()  # --minutes covers the pairs too: what they take, training doesn't get
    settings = {"teacher": file_fingerprint(args.checkpoint), "teacher_steps": args.teacher_steps,
                "pairs": args.pairs, "seed": args.seed, "schedule": ckpt_config["schedule"], "bf16": bf16}
    generator, ema, fake, optimizers, step, losses = setup(args, teacher, device)
    plan(args, teacher, generator, fake, sched, settings, device, bf16, run_start)
    z_all, x0_all = (v.to(device) for v in make_pairs(args, teacher, sched, device, bf16, settings))
    last_path = os.path.join(args.out_dir, LAST_NAME)

    def save(final=False):
        ckpt = checkpoint_of(args, ckpt_config, generator, ema, fake, optimizers, step, losses, final)
        save_atomic(ckpt, os.path.join(args.out_dir, FINAL_NAME) if final else last_path)

    budget_s = args.minutes * 60 - (time.time() - run_start)
    if budget_s <= 0:
        fail(f"the teacher pairs used the whole --minutes {args.minutes:g} budget; they are cached now: run the "
             f"same command again to train, or raise --minutes")
    start, total = time.time(), args.regression_steps + args.steps
    bar = tqdm(total=total, initial=step, desc="regression warm-up, then DMD", unit="step")
    try:
        while step < total and time.time() - start < budget_s:
            matching = step >= args.regression_steps  # phase 2: distribution matching on top of the regression
            lr = phase_lr(args, step, (time.time() - start) / budget_s)
            for optimizer in optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = lr
            for key, value in zip(losses, train_step(args, generator, fake, optimizers, teacher, z_all, x0_all, sched,
                                                     matching, bf16)):
                losses[key].append(value)
            ema.update(generator, step)
            step += 1
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix({k.split()[0]: f"{np.mean(v[-100:]):.4f}" for k, v in losses.items()})
            if step % 500 == 0:
                save()
    except KeyboardInterrupt:
        save()
        print(f"\ninterrupted: saved {last_path}; continue with `python train_dmd.py --resume`")
        sys.exit(130)  # the shell's code for "stopped by Ctrl-C"
    bar.close()
    save()
    seconds = time.time() - start
    print(f"trained the generator for {seconds / 60:.1f} min ({step} steps)")
    save(final=True)
    return ema.model.eval(), losses, seconds


# ----------------------------------------------------------------------------------------------------
# 6. Outputs
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


def time_per_image(fn, n, device):
    """Seconds per image of fn() (one warm-up run excluded; the clock waits for the GPU to finish)."""
    fn()
    start = clock(device)
    fn()
    return (clock(device) - start) / n


def load_kd_student(path, device):
    """Chapter 4's kd student for the figure, or None (with a note) when there is none at `path`."""
    if not path or not os.path.isfile(path):
        print(f"no kd student at {path} (`python train_distilled.py` makes one): the figure shows teacher and DMD")
        return None
    return model_from_checkpoint(load_checkpoint(path, device, "distilled", "train_distilled.py"), path).to(device)


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


def save_dmd_outputs(args, generator, teacher, sched, device, bf16, losses):
    z = torch.randn(args.num_samples, 1, 28, 28, generator=torch.Generator().manual_seed(args.seed + 1)).to(device)
    images = to_uint8(generate(generator, sched, z, bf16))  # the same noise as train_distilled.py's samples
    save_grid(images[:100], os.path.join(args.out_dir, f"{PREFIX}_samples.png"), nrow=10 if len(images) > 64 else 8)
    if args.save_npz:
        os.makedirs(os.path.dirname(os.path.abspath(args.save_npz)), exist_ok=True)
        np.savez_compressed(args.save_npz, images=images.numpy())
        print(f"wrote {args.save_npz} ({len(images)} images)")
    n = min(10, args.num_samples)
    rows = [(f"teacher\nDDIM-{FIGURE_STEPS}", to_uint8(sample_ddim(teacher, sched, z[:n], FIGURE_STEPS, bf16=bf16,
                                                                   progress=False)))]
    kd = load_kd_student(args.kd, device)
    if kd is not None:
        rows.append(("kd student\n1 step", to_uint8(generate(kd.eval(), sched, z[:n], bf16))))
    rows.append(("DMD\n1 step", images[:n]))
    save_same_noise(rows, os.path.join(args.out_dir, f"{PREFIX}_comparison.png"))
    batch = z[:64]
    one_s = time_per_image(lambda: generate(generator, sched, batch, bf16), len(batch), device)
    teacher_s = time_per_image(lambda: sample_ddim(teacher, sched, batch, FIGURE_STEPS, bf16=bf16, progress=False),
                               len(batch), device)
    print(f"DMD generator: {1 / one_s:.0f} img/s | teacher DDIM-{FIGURE_STEPS}: {1 / teacher_s:.1f} img/s | "
          f"{teacher_s / one_s:.0f}x faster (batch {len(batch)}, {device})")
    if any(losses.values()):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for label, values in losses.items():
            ax.plot(values, lw=0.5, label=label)  # NaN (not plotted) where a term was not computed
        ax.set(xlabel="generator step", ylabel="loss", yscale="log", title="regression warm-up, then DMD")
        ax.legend()
        fig.savefig(os.path.join(args.out_dir, f"{PREFIX}_loss_curve.png"), dpi=100, bbox_inches="tight")
        plt.close(fig)
    print(f"wrote pictures to {os.path.abspath(args.out_dir)}")


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    bf16, bf16_why = use_bf16(args.bf16, device)
    torch.manual_seed(args.seed)
    ckpt = load_checkpoint(args.checkpoint, device)
    if args.teacher_steps > ckpt["config"]["schedule"]["T"]:
        fail(f"--teacher-steps can be at most the {ckpt['config']['schedule']['T']} timesteps of the teacher")
    try:
        os.makedirs(args.out_dir, exist_ok=True)
    except OSError as e:
        fail(f"cannot create --out-dir {args.out_dir} ({e.strerror})")
    teacher = model_from_checkpoint(ckpt, args.checkpoint).to(device).eval().requires_grad_(False)
    sched = {k: v.to(device) for k, v in ddpm_schedule(**ckpt["config"]["schedule"]).items()}
    print(f"device {device} (bf16 autocast {'on' if bf16 else 'off'}: {bf16_why}) | teacher {args.checkpoint} "
          f"(step {ckpt['step']})")
    if args.sample_only:
        path = os.path.join(args.out_dir, FINAL_NAME)
        dmd = load_checkpoint(path, device, "dmd", "train_dmd.py")
        generator = model_from_checkpoint(dmd, path).to(device).eval()
        save_dmd_outputs(args, generator, teacher, sched, device, bf16, dmd["losses"])
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    start = time.time()
    generator, losses, train_seconds = train(args, teacher, ckpt["config"], sched, device, bf16)
    total = time.time() - start
    print(f"time: teacher pairs {(total - train_seconds) / 60:.1f} min + regression warm-up and DMD "
          f"{train_seconds / 60:.1f} min = {total / 60:.1f} min")
    save_dmd_outputs(args, generator, teacher, sched, device, bf16, losses)


if __name__ == "__main__":
    main()
