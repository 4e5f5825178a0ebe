"""
Chapter 3 - fast sampling: the same trained model, 20x-100x fewer network calls (DDIM, DPM-Solver++).

Usage (copy-paste):
    python sample_ddim.py                           # DDIM grids at 20, 50, 100 calls + DDPM-1000, a timing table
    python sample_ddim.py --steps 50 --gif denoising.gif   # noise becoming digits, one frame per call
    python sample_ddim.py --steps 50 --eta 1        # the same 50 calls with fresh noise at every step
    python sample_ddim.py --sampler ddim dpmpp-2m dpmpp-2m-sde --steps 10 20 50   # one figure row per pair
    python sample_ddim.py --sampler dpmpp-2m-sde --steps 20 --num-samples 2000 --save-npz s20.npz   # for evaluate.py

It loads diffusion_model_final.pt from `python src.py` (EMA weights) - or, until you have trained one, the copy
shipped in weights/ - and rebuilds the exact UNet from the config stored inside. Nothing is retrained: a sampler
is only a way to walk from noise to a digit. --steps K means K network calls, whatever the sampler (above ~220
calls the cosine schedule gets up to 4 fewer: its t = 995..999 are one noise level, visited once).

Samplers (--sampler):
    ddim          Song et al. 2021. --eta 0: deterministic (an ODE); --eta 1: DDPM's ancestral step, strided.
    dpmpp-2m      DPM-Solver++(2M) (Lu et al. 2022): the same ODE as DDIM eta=0, solved to second order.
    dpmpp-2m-sde  its stochastic twin (SDE-DPM-Solver++(2M)): second order, with fresh noise like eta=1.
    restart       dpmpp-2m-sde that, once near the end, jumps back up to more noise and walks t = 400..100 again
                  (Restart sampling, Xu et al. 2023): a fifth of the calls spent where a small model errs.

What comes out (in --out-dir):
    {sampler}_samples_{K}_steps.png a grid for each sampler and call count K (the same starting noise for all)
    ddpm_samples_1000_steps.png     the 1000-step ancestral sampler of src.py, the first 10 of the same noises
    ddim_comparison.png             rows = samplers, columns = the same noise: deterministic rows (DDIM η = 0,
                                    dpmpp-2m) keep one digit per column; stochastic rows may draw another
    ddim_inversion.png              real digit -> noise (deterministic ODE) -> reconstruction
    --gif PATH                      16 digits from noise to digit, one frame per network call

What we learned:
  * DDPM's reverse step is random; DDIM shows that a whole family of samplers shares the SAME training objective,
    indexed by η: η = 1 is DDPM's ancestral step, η = 0 is deterministic (an ODE - noise maps to one digit).
  * A deterministic path can take big strides, so 50 of the 1000 timesteps are enough to draw a digit.
  * Deterministic also means invertible: run the ODE forwards and you get the noise that draws a given digit.
  * But deterministic also means the model's small errors are never washed out: on a small model the same 50
    calls with η = 1 (fresh noise at every step) give clearly better digits than η = 0.
  * A second-order solver (DPM-Solver++) reuses the previous step's prediction to bend its stride along the
    curve: the same path in fewer calls. Its stochastic twin adds the fresh noise back.
"""
import argparse
import math
import os
import sys
import time

import matplotlib
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

matplotlib.use("Agg")  # draw into files: no window, works on a machine without a screen
import matplotlib.pyplot as plt  # noqa: E402 (after choosing the backend)

# ----------------------------------------------------------------------------------------------------
# 1. Config
# ----------------------------------------------------------------------------------------------------
SAMPLERS = ["ddim", "dpmpp-2m", "dpmpp-2m-sde", "restart"]
RESTART = {"t_min": 100, "t_max": 400}  # restart: the stretch of timesteps walked twice (see sample_restart)
COLUMNS = 10  # digits per row of the same-noise comparison figure (and of the 1000-step reference row)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="DDIM sampling (and inversion) from src.py's trained DDPM.",
                                formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", default="diffusion_model_final.pt", help="made by `python src.py`")
    p.add_argument("--sampler", choices=SAMPLERS, nargs="+", default=["ddim"],
                   help="which sampler(s); see the top of this file")
    p.add_argument("--steps", type=positive_int, nargs="+", default=[20, 50, 100],
                   help="network calls per sample (one grid per sampler and count)")
    p.add_argument("--eta", type=eta_value, default=0.0,
                   help="ddim only: 0 = deterministic, 1 = fresh DDPM-like noise at every step")
    p.add_argument("--spacing", choices=["uniform", "trailing", "quadratic"], default="uniform",
                   help="which K of the 1000 timesteps to visit (see ddim_timesteps); all end with a step to x_0")
    p.add_argument("--num-samples", type=positive_int, default=64, help="digits per grid")
    p.add_argument("--batch-size", type=positive_int, default=256,
                   help="images per network call (a huge batch is slower on a CPU: it falls out of the caches)")
    p.add_argument("--no-ddpm", action="store_true",
                   help=f"skip the 1000-step DDPM reference row (drawn for the figure's {COLUMNS} columns only)")
    p.add_argument("--no-inversion", action="store_true", help="skip the DDIM inversion figure")
    p.add_argument("--data-root", default=os.environ.get("MNIST_ROOT", "./data"),
                   help="MNIST (torchvision layout) for the inversion figure's real digits; env var MNIST_ROOT")
    p.add_argument("--seed", type=int, default=0, help="random seed (the starting noise)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                   help="auto picks cuda, then mps, then cpu")
    p.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                   help="bfloat16 autocast; auto = on for CUDA and for CPUs with native bf16, off on MPS")
    p.add_argument("--out-dir", default=".", help="where pictures go")
    p.add_argument("--gif", default=None, metavar="PATH",
                   help="also an animated GIF: 16 digits from noise to digit, one frame per call of the first "
                        "--sampler/--steps pair (DDIM for restart)")
    p.add_argument("--save-npz", default=None, metavar="PATH",
                   help="export samples (`images` uint8 N x 28 x 28); with several samplers or counts, one file "
                        "each, named after them (PATH_dpmpp-2m_20steps.npz)")
    return p.parse_args(argv)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help adds each flag's default, but not a default of None: that flag's help says in words what happens."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def positive_int(s):
    if int(s) <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
    return int(s)


def eta_value(s):
    if not 0 <= float(s) <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 (deterministic) and 1 (DDPM-like), got {s}")
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
# 2. Data: real digits for the inversion figure
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
# 5. Sampling: the DDIM update, and its inverse
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


@torch.no_grad()
def invert_ddim(model, sched, x0, steps, spacing="uniform", bf16=False):
    """DDIM inversion: run the deterministic (η=0) update backwards, x_0 -> x_T. Possible only because η=0
    makes sampling a deterministic ODE: every digit has "its" noise. Approximation: ε_θ is evaluated at the
    next, noisier timestep (we don't know x there yet), which is accurate when steps are small."""
    timesteps = ddim_timesteps(steps, sched["alpha_bar"], spacing)[::-1]  # ascending: 0 ... 999
    x = x0
    alpha_bar = torch.ones((), device=x0.device)  # x_0 is clean: ᾱ = 1
    for t in timesteps:
        t_batch = torch.full((len(x),), t, device=x.device, dtype=torch.long)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            pred_noise = model(x, t_batch).float()
        # the same update as ddim_step with η=0, with "prev" and "next" swapped
        x = ddim_step(x, pred_noise, alpha_bar, sched["alpha_bar"][t], 0.0, 0.0)
        alpha_bar = sched["alpha_bar"][t]
    return x


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


def dpmpp_solve(model, sched, x, timesteps, alpha_bar_end, stochastic, bf16, generator, bar):
    """DPM-Solver++(2M) through the visited `timesteps` (one model call each), landing on the noise level
    alpha_bar_end (1 = the digit itself). First order on the first step (no previous prediction yet) and on the
    last, second order in between. stochastic=True: the SDE variant. `bar` (a tqdm) ticks once per call."""
    alpha_bars = [sched["alpha_bar"][t] for t in timesteps] + [alpha_bar_end]
    eta = 1.0 if stochastic else 0.0
    previous = None
    for i, t in enumerate(timesteps):
        t_batch = torch.full((len(x),), t, device=x.device, dtype=torch.long)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            pred_noise = model(x, t_batch).float()
        noise = torch.randn(x.shape, device=x.device, generator=generator) if stochastic else None
        x, previous = solver_step(x, pred_noise, alpha_bars, i, previous, True, eta, noise)
        bar.update(1)
    return x


@torch.no_grad()
def sample_dpmpp(model, sched, x_T, steps, stochastic=False, spacing="uniform", bf16=False, generator=None,
                 progress=True):
    """DPM-Solver++(2M) from the noise x_T to digits in `steps` model calls (stochastic=True: the SDE)."""
    timesteps = ddim_timesteps(steps, sched["alpha_bar"], spacing)
    one = torch.ones((), device=x_T.device)  # ᾱ = 1: the last step lands on x_0
    name = "DPM-Solver++(2M) SDE" if stochastic else "DPM-Solver++(2M)"
    with tqdm(total=steps, desc=f"{name} {steps} steps", disable=not progress, leave=False) as bar:
        return dpmpp_solve(model, sched, x_T, timesteps, one, stochastic, bf16, generator, bar)


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


@torch.no_grad()
def sample_restart(model, sched, x_T, steps, spacing="uniform", bf16=False, generator=None, progress=True):
    """Restart sampling (Xu et al. 2023) on DPM-Solver++(2M) SDE, `steps` model calls in all (restart_walks):
    1. walk the usual path down to t_min; 2. jump back up to t_max (restart_jump); 3. walk the stretch
    t_max -> t_min again, where this model's errors enter; 4. carry on down the usual path to x_0.
    Each walk is one dpmpp_solve, so each ends with a first-order step that adds no fresh noise."""
    (before, again, after), t_min, t_max = restart_walks(steps, sched["alpha_bar"], spacing)
    alpha_bar_min = sched["alpha_bar"][t_min]
    one = torch.ones((), device=x_T.device)
    with tqdm(total=steps, desc=f"Restart {steps} steps", disable=not progress, leave=False) as bar:
        x = dpmpp_solve(model, sched, x_T, before, alpha_bar_min, True, bf16, generator, bar)  # 1.
        x = restart_jump(x, alpha_bar_min, sched["alpha_bar"][t_max], generator)  # 2.
        x = dpmpp_solve(model, sched, x, again, alpha_bar_min, True, bf16, generator, bar)  # 3.
        return dpmpp_solve(model, sched, x, after, one, True, bf16, generator, bar)  # 4.


def run_sampler(name, model, sched, x_T, steps, args, bf16, generator):
    """One sampler by its --sampler name with this run's settings; "ddpm" = the ancestral reference (DDIM η=1,
    every timestep)."""
    if name == "ddpm":
        return sample_ddim(model, sched, x_T, steps, 1.0, "uniform", bf16, generator)
    if name == "ddim":
        return sample_ddim(model, sched, x_T, steps, args.eta, args.spacing, bf16, generator)
    if name == "restart":
        return sample_restart(model, sched, x_T, steps, args.spacing, bf16, generator)
    return sample_dpmpp(model, sched, x_T, steps, name == "dpmpp-2m-sde", args.spacing, bf16, generator)


def clock(device):
    """time.perf_counter() once the device has finished its queued work (CUDA and MPS run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()
    return time.perf_counter()


# ----------------------------------------------------------------------------------------------------
# 6. Outputs
# ----------------------------------------------------------------------------------------------------
def save_grid(images_uint8, path, nrow=8):
    """Tiles digits (uint8 [N, 28, 28]) into one PNG, `nrow` to a row, with a thin black border between them."""
    save_image(images_uint8.unsqueeze(1).float() / 255, path, nrow=nrow, padding=2)


def npz_path(path, sampler, steps, args):
    """One file per sampler and call count when there are several: out.npz -> out_dpmpp-2m_20steps.npz."""
    stem, ext = os.path.splitext(path)
    parts = ([sampler] if len(args.sampler) > 1 else []) + ([f"{steps}steps"] if len(args.steps) > 1 else [])
    return "_".join([stem] + parts) + (ext or ".npz") if parts else path


def save_npz(path, images):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez_compressed(path, images=images.numpy())
    print(f"wrote {path} ({len(images)} images)")


def print_timing(results, T, batches, device):
    """Seconds per image, and how much faster than the 1000-step ancestral sampler - where that drew as many images
    (a smaller batch costs more per image on a CPU, so the figure's 10 DDPM digits are no yardstick for 64)."""
    ddpm = [(seconds / len(images), len(images)) for name, _, images, seconds in results if name.startswith("DDPM")]
    print(f"\n| sampler | model calls | s per image | speed-up vs DDPM-{T} |\n| --- | ---: | ---: | ---: |")
    for name, steps, images, seconds in results:
        same_batch = ddpm and ddpm[0][1] == len(images)
        speedup = f"{ddpm[0][0] / (seconds / len(images)):.1f}x" if same_batch else "-"
        print(f"| {name} | {steps} | {seconds / len(images):.4f} | {speedup} |")
    print(f"({batches} on {device}; warm-up excluded)")
    if ddpm and any(ddpm[0][1] != len(images) for _, _, images, _ in results):
        print(f"(speed-ups only at equal numbers of images: `--num-samples {COLUMNS}` times every sampler alike)")
    print()


def save_comparison(results, path, columns=COLUMNS):
    """Rows = samplers, columns = the same starting noise."""
    columns = min(columns, len(results[0][2]))
    fig, axes = plt.subplots(len(results), columns, figsize=(columns, len(results) * 1.1), squeeze=False)
    for row, (name, steps, images, seconds) in enumerate(results):
        for col in range(columns):
            axes[row, col].imshow(images[col].numpy(), cmap="gray", vmin=0, vmax=255)
            axes[row, col].set_xticks([])
            axes[row, col].set_yticks([])
        axes[row, 0].set_ylabel(name.replace(" (", "\n("), fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle("same starting noise, different samplers", fontsize=9)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def save_inversion(model, sched, images, args, device, bf16, n=6, steps=100):
    """original -> DDIM-inverted noise -> reconstruction from that noise."""
    x0 = to_model_range(images[:n]).to(device)
    x_T = invert_ddim(model, sched, x0, steps, args.spacing, bf16)
    recon = sample_ddim(model, sched, x_T, steps, 0.0, args.spacing, bf16, progress=False)
    error = (recon - x0).abs().mean().item()
    print(f"DDIM inversion ({steps} steps): mean |reconstruction - original| = {error:.4f} (pixel range -1..1)")
    fig, axes = plt.subplots(3, n, figsize=(n, 3.3), squeeze=False)
    for col in range(n):
        for row, (img, title) in enumerate([(x0, "original"), (x_T, "inverted noise x_T"), (recon, "reconstruction")]):
            axes[row, col].imshow(img[col, 0].float().cpu().numpy(), cmap="gray",
                                  vmin=-1 if row != 1 else -3, vmax=1 if row != 1 else 3)
            axes[row, col].set_xticks([])
            axes[row, col].set_yticks([])
            if col == 0:
                axes[row, 0].set_ylabel(title, fontsize=7)
    fig.suptitle(f"DDIM inversion, {steps} steps: mean abs error {error:.3f}", fontsize=9)
    fig.savefig(os.path.join(args.out_dir, "ddim_inversion.png"), dpi=100, bbox_inches="tight")
    plt.close(fig)


def save_gif(model, sched, x_T, args, bf16, path, n=16):
    """Noise becoming digits: x_t of n digits after every DDIM call of the first --sampler/--steps pair (its η for
    ddim; the ODE, η = 0, otherwise), shown at twice their size, the last frame held for a moment."""
    from PIL import Image  # torchvision's own dependency
    frames, steps = [x_T[:n]], args.steps[0]
    eta = args.eta if args.sampler[0] == "ddim" else 0.0
    sample_ddim(model, sched, x_T[:n], steps, eta, args.spacing, bf16, progress=False, frames=frames)
    pictures = [Image.fromarray(make_grid(to_uint8(x).unsqueeze(1), nrow=4, padding=2, pad_value=255)[0].numpy())
                for x in frames]
    pictures = [p.resize((2 * p.width, 2 * p.height), Image.NEAREST) for p in pictures]
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=[120] * (len(pictures) - 1) + [2000],
                     loop=0, optimize=True)
    print(f"wrote {path} ({len(frames)} frames, {os.path.getsize(path) / 1e3:.0f} kB)")


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    bf16, bf16_why = use_bf16(args.bf16, device)
    ckpt = load_checkpoint(args.checkpoint, device)
    T = ckpt["config"]["schedule"]["T"]
    if any(k > T for k in args.steps):
        fail(f"--steps can be at most the {T} timesteps the model was trained with, got {args.steps}")
    if "restart" in args.sampler and min(args.steps) < 5:
        fail(f"--sampler restart needs --steps >= 5 (a fifth of them walk t = 400..100 again), got {args.steps}")
    try:
        os.makedirs(args.out_dir, exist_ok=True)
    except OSError as e:
        fail(f"cannot create --out-dir {args.out_dir} ({e.strerror})")
    model = model_from_checkpoint(ckpt, args.checkpoint).to(device).eval()
    sched = {k: v.to(device) for k, v in ddpm_schedule(**ckpt["config"]["schedule"]).items()}
    print(f"device {device} (bf16 autocast {'on' if bf16 else 'off'}: {bf16_why}) | {args.checkpoint}: "
          f"step {ckpt['step']}, EMA weights | {', '.join(args.sampler)}, eta {args.eta:g} (ddim), "
          f"{args.spacing} spacing")

    # The SAME starting noise for every sampler and step count, so the figures show the same digits converging.
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    x_T = torch.randn(args.num_samples, 1, 28, 28, generator=generator).to(device)
    # warm-up at the real batch shape (the first call for a new shape sets up kernels): excluded from the timings
    sample_ddim(model, sched, x_T[:args.batch_size], 2, bf16=bf16, progress=False)

    eta_note = f" (η={args.eta:g})"
    runs = [(f"{s} {k} steps{eta_note if s == 'ddim' else ''}", s, k, x_T) for s in args.sampler for k in args.steps]
    if not args.no_ddpm:  # the reference, for the figure's columns only: 1000 calls cost minutes for a full grid
        runs.append((f"DDPM {T} steps (ancestral, {min(COLUMNS, len(x_T))} digits)", "ddpm", T, x_T[:COLUMNS]))
    results = []
    for label, sampler, steps, noise in runs:
        noise_gen = torch.Generator(device="cpu" if device.type == "mps" else device).manual_seed(args.seed + 1)
        start = clock(device)
        images = torch.cat([to_uint8(run_sampler(sampler, model, sched, chunk, steps, args, bf16, noise_gen))
                            for chunk in noise.split(args.batch_size)])
        results.append((label, steps, images, clock(device) - start))
        save_grid(images[:100], os.path.join(args.out_dir, f"{sampler}_samples_{steps}_steps.png"),
                  nrow=10 if len(images) > 64 else 8)
        if args.save_npz and sampler != "ddpm":
            save_npz(npz_path(args.save_npz, sampler, steps, args), images)
    print_timing(results, T, f"{len(x_T)} images in batches of {args.batch_size}", device)
    save_comparison(results, os.path.join(args.out_dir, "ddim_comparison.png"))
    if args.gif:
        save_gif(model, sched, x_T, args, bf16, args.gif)
    if not args.no_inversion:
        try:  # real digits to invert: MNIST-test, downloaded on first use
            images, _ = load_mnist(args.data_root, train=False)
        except SystemExit as e:  # offline and no --data-root: the samples above are still worth having
            print(f"skipped the inversion figure: {e.code}")
        else:
            save_inversion(model, sched, images, args, device, bf16)
    print(f"wrote pictures to {os.path.abspath(args.out_dir)}")


if __name__ == "__main__":
    main()
