"""
Chapter 1 - train a DDPM (Ho et al. 2020) on MNIST from scratch, then draw digits with it.

Usage (copy-paste):
    python src.py --minutes 10                      # laptop CPU: ten minutes of training, then pictures
    python src.py                                   # CUDA GPU: the full default run (best quality)
    python src.py --data-root DIR --minutes 10 --out-dir runs/cpu10  # MNIST in DIR/MNIST/raw, results in runs/
    python src.py --resume                          # continue the run saved in diffusion_model_last.pt
    python src.py --sample-only --num-samples 64    # draw again from diffusion_model_final.pt

What comes out (in --out-dir):
    diffusion_model_final.pt    the trained model (+ EMA weights + config); every other chapter loads it
    diffusion_model_last.pt     a resumable checkpoint, rewritten after every epoch and on Ctrl-C
    ddpm_samples.png            a grid of digits drawn with the 1000-step ancestral sampler (Algorithm 2)
    ddpm_denoising_process.png  a few samples, from pure noise (left) to digit (right)
    ddpm_loss_curve.png         training loss per step
    ddpm_preview.png            16 digits from the same noise, redrawn after every epoch (50 respaced steps)
    ddpm_previews.png           all the previews, one row per epoch: watch the digits emerge

The file reads top to bottom: config -> data -> schedule -> model -> train -> sample -> outputs.
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
# 1. Config: every knob in one place. The model/schedule part is saved into the checkpoint, so the other
#    scripts can rebuild exactly this network from the file alone.
# ----------------------------------------------------------------------------------------------------
FINAL_NAME = "diffusion_model_final.pt"
LAST_NAME = "diffusion_model_last.pt"
COSINE_SCHEDULE = {"T": 1000, "kind": "cosine"}  # the CPU default: Improved DDPM's (notes/1-ddpm.md)
SCHEDULE = {"T": 1000, "beta_1": 1e-4, "beta_T": 0.02}  # --schedule linear: the DDPM paper's (Sec. 4)
SIGMA_DATA = 0.5  # --precondition edm: the data's spread EDM's scaling assumes (their value; notes/1-ddpm.md)
RECIPE_KEYS = ["lr", "batch_size", "warmup_steps", "ema_decay", "min_snr_gamma", "noise_shift", "optimizer",
               "muon_lr"]  # into checkpoints
PREVIEW_DIGITS, PREVIEW_STEPS = 16, 50  # the per-epoch preview grid: how many digits, how many sampling steps


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train a DDPM on MNIST and sample digits from it.",
                                formatter_class=HelpFormatter)
    p.add_argument("--data-root", default=os.environ.get("MNIST_ROOT", "./data"),
                   help="folder holding MNIST/raw/ (torchvision layout); downloaded there when online. "
                        "Env var MNIST_ROOT sets the default")
    p.add_argument("--out-dir", default=".", help="where checkpoints and pictures go")
    p.add_argument("--epochs", type=positive_int, default=20, help="passes over the 60k training digits")
    p.add_argument("--minutes", type=positive_float, default=None,
                   help="wall-clock training budget; stops after this many minutes or --epochs, whichever "
                        "comes first, then still saves and samples")
    p.add_argument("--batch-size", type=positive_int, default=128, help="images per training (and sampling) step")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="peak AdamW learning rate (with --optimizer muon: of the parameters Muon leaves to AdamW). "
                        "Default: 8e-3 for the CPU width 16, 2e-3 for wider UNets")
    p.add_argument("--optimizer", choices=["adamw", "muon"], default=None,
                   help="muon: Muon for the hidden layers' weight matrices (at --muon-lr), AdamW at --lr for the "
                        "rest (see class Muon). Default: muon for the CPU width 16, adamw for wider UNets")
    p.add_argument("--muon-lr", type=positive_float, default=0.02,
                   help="--optimizer muon: peak learning rate of the weight matrices (Jordan et al.'s value)")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="linear learning-rate warm-up. Default: 500 for the CPU width 16 on the cosine schedule (it "
                        "goes with the noise shift), 200 otherwise")
    p.add_argument("--ema-decay", type=ema_decay, default=0.999, help="EMA of the weights, used for sampling")
    p.add_argument("--min-snr-gamma", type=float, default=5.0,
                   help="Min-SNR loss weighting (Hang et al. 2023); 0 turns it off (plain DDPM loss). Not used "
                        "with --precondition edm (the CPU default), which brings its own weighting")
    p.add_argument("--precondition", choices=["none", "edm"], default=None,
                   help="edm: Karras et al. 2022's input/output scaling and loss weight around the same UNet; it "
                        "still returns ε to every sampler. none: the layers predict ε themselves (the DDPM paper). "
                        "Saved in the checkpoint (sigma_data). Default: edm for the CPU width 16, none for wider")
    p.add_argument("--sigma-data", type=positive_float, default=SIGMA_DATA,
                   help="--precondition edm: the data's spread σ_data that the scaling assumes. The default is "
                        "EDM's; their derivation, redone for MNIST's non-zero mean, gives 0.96, the root-mean-square "
                        "pixel (notes/1-ddpm.md). Saved in the checkpoint")
    p.add_argument("--noise-shift", type=float, default=None,
                   help="train on noisier levels more often: tilt the draw of t so the levels it visits centre on "
                        "log-SNR = -SHIFT instead of 0; 0 = uniform t (the paper). Default: 1 for the CPU width 16 "
                        "on the cosine schedule, 0 otherwise")
    p.add_argument("--base-channels", type=positive_int, default=None,
                   help="UNet width at 28x28 (doubles, then quadruples, lower down). "
                        "Default: 16 on a CPU and on Apple MPS (the laptop recipe), 64 on a CUDA GPU (best quality)")
    p.add_argument("--no-attention", action="store_true", help="drop the self-attention block at 7x7")
    p.add_argument("--schedule", choices=["linear", "cosine"], default=None,
                   help="noise schedule: Nichol & Dhariwal's cosine one (fades the digit evenly over all T steps) "
                        "or the DDPM paper's linear one. Default: cosine for the CPU width 16, linear for wider")
    p.add_argument("--upsample", choices=["conv-first", "upsample-first"], default=None,
                   help="on the way up, the 3x3 conv before the 2x upsample (at the low resolution: cheaper) or "
                        "after it (the original UNet). Default: conv-first for the CPU width 16, upsample-first "
                        "for wider")
    p.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                   help="bfloat16 autocast; auto = on for CUDA and for CPUs with native bf16, off on MPS")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                   help="auto picks cuda, then mps, then cpu")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="CKPT",
                   help=f"continue training from CKPT (default: OUT_DIR/{LAST_NAME}) at its step count")
    p.add_argument("--sample-only", action="store_true",
                   help=f"skip training: load OUT_DIR/{FINAL_NAME} and sample")
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
# 2. Data: all 60k digits fit in memory as one float32 tensor on the device (188 MB), so batches are plain tensor
#    indexing - much faster on a 2-core laptop than a DataLoader that decodes one PIL image at a time.
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
# 5. Training (DDPM Algorithm 1) and sampling (Algorithm 2)
# ----------------------------------------------------------------------------------------------------
def q_sample(x0, t, noise, sched):
    """The forward process in one jump: x_t ~ q(x_t | x_0) = N(√ᾱ_t x_0, (1-ᾱ_t) I)."""
    alpha_bar = sched["alpha_bar"][t].view(-1, 1, 1, 1)
    signal_rate, noise_rate = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    return signal_rate * x0 + noise_rate * noise


def timestep_probs(alpha_bar, shift):
    """How often training draws each t. Each t is a noise level λ_t = log SNR = log(ᾱ_t / (1 - ᾱ_t)). On the cosine
    schedule, uniform t visits them with density ∝ 1/cosh(λ/2): centred on λ = 0, where signal and noise are
    equal. Multiplying by cosh(λ/2) / cosh((λ + shift)/2) moves that centre to λ = -shift: with shift = 1 the
    noisiest levels are drawn e ≈ 2.7 times as often as the cleanest, relative to uniform (shift = 0)."""
    log_snr = torch.log(alpha_bar / (1 - alpha_bar))
    weights = torch.cosh(log_snr / 2) / torch.cosh((log_snr + shift) / 2)
    return weights / weights.sum()


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


def resume(args, config, model, ema, optimizer, device):
    """Loads --resume's checkpoint into the model, EMA and optimizer; returns its step count and loss history."""
    path = args.resume or os.path.join(args.out_dir, LAST_NAME)
    if not os.path.isfile(path):
        fail(f"--resume: no checkpoint at {path} (a run of src.py writes {LAST_NAME} after each epoch)")
    ckpt = load_checkpoint(path, device)
    if ckpt["config"] != config:
        # e.g. a run from before EDM's scaling became the CPU default, resumed without --precondition none, or one
        # trained with another --sigma-data
        only_the_scaling = {**ckpt["config"], "sigma_data": 0} == {**config, "sigma_data": 0}
        saved = ckpt["config"].get("sigma_data")
        flags = "--precondition none" if saved is None else f"--precondition edm --sigma-data {saved}"
        hint = f" (here {flags})" if only_the_scaling else ""
        fail(f"--resume: {path} was trained with another architecture/schedule {ckpt['config']}; "
             f"pass the same flags{hint} or another --out-dir")
    trained_with = ckpt.get("recipe", {}).get("optimizer", "adamw")  # runs from before --optimizer used AdamW
    if trained_with != args.optimizer:  # the two keep different state: one cannot take over the other's
        fail(f"--resume: {path} was trained with --optimizer {trained_with}; pass it again or use another --out-dir")
    model.load_state_dict(ckpt["model"])
    ema.model.load_state_dict(ckpt["ema"])
    optimizer.load_state_dict(ckpt["optimizer"])
    print(f"resumed from {path} at step {ckpt['step']} (epoch {ckpt['epoch']})")
    # The training recipe comes from this run's flags, as in nanoGPT: say so where it differs from the checkpoint's.
    for key, trained in ckpt.get("recipe", {}).items():
        if getattr(args, key) != trained:
            print(f"note: continuing with {key} = {getattr(args, key)}; the checkpoint was trained with {trained} "
                  f"(pass --{key.replace('_', '-')} {trained} to keep it)")
    return ckpt["step"], list(ckpt["losses"]), list(ckpt.get("previews", []))


def train_step(model, ema, optimizer, x0, sched, t_probs, step, args, device, bf16):
    """Algorithm 1 on one batch: the loss, one optimizer step, then the EMA follows. Returns the loss."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = diffusion_loss(model, x0, sched, args.min_snr_gamma, t_probs)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # one bad batch can't wreck the run
    optimizer.step()
    ema.update(model, step)
    return loss.item()


def train(args, config, device, bf16):
    """Algorithm 1 over the data for --epochs or --minutes; a checkpoint and a preview grid after every epoch."""
    images, _ = load_mnist(args.data_root, train=True)
    data = to_model_range(images).to(device)  # [60000, 1, 28, 28] in [-1, 1]
    if len(data) < args.batch_size:
        fail(f"only {len(data)} training images but --batch-size {args.batch_size}")
    sched = {k: v.to(device) for k, v in ddpm_schedule(**config["schedule"]).items()}
    t_probs = timestep_probs(sched["alpha_bar"], args.noise_shift) if args.noise_shift else None
    model = build_model(config).to(device)
    print(f"UNet "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, base width {config['base_channels']}")
    optimizer = make_optimizer(model, args)
    ema = EMA(model, args.ema_decay)
    steps_per_epoch = len(data) // args.batch_size
    total_steps = args.epochs * steps_per_epoch
    step, losses, previews = 0, [], []
    if args.resume is not None:
        step, losses, previews = resume(args, config, model, ema, optimizer, device)

    def checkpoint():
        return {"kind": "ddpm", "config": config, "model": model.state_dict(), "ema": ema.model.state_dict(),
                "optimizer": optimizer.state_dict(), "step": step, "epoch": step // steps_per_epoch,
                "losses": losses, "previews": previews, "recipe": {k: getattr(args, k) for k in RECIPE_KEYS}}

    budget_s = args.minutes * 60 if args.minutes else float("inf")
    start, start_step = time.time(), step
    generator = torch.Generator(device="cpu").manual_seed(args.seed + step)  # batch order, reproducible
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
                x0 = data[order[i * args.batch_size:(i + 1) * args.batch_size]]
                losses.append(train_step(model, ema, optimizer, x0, sched, t_probs, step, args, device, bf16))
                step += 1
                bar.update(1)
                if step % 20 == 0:
                    bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}", epoch=step // steps_per_epoch,
                                    min=f"{elapsed / 60:.1f}")
            previews.append(save_preview(ema.model, sched, args, device, bf16))  # what the EMA model draws now
            save_atomic(checkpoint(), os.path.join(args.out_dir, LAST_NAME))  # per-epoch (or budget end)
    except KeyboardInterrupt:
        save_atomic(checkpoint(), os.path.join(args.out_dir, LAST_NAME))
        print(f"\ninterrupted at step {step}: saved {os.path.join(args.out_dir, LAST_NAME)}; "
              f"continue with `python src.py --resume --out-dir {args.out_dir}`")
        sys.exit(130)  # the shell's code for "stopped by Ctrl-C"
    bar.close()
    seconds = time.time() - start
    print(f"trained {step - start_step} steps in this run, {step} in all "
          f"({(step - start_step) * args.batch_size / seconds:.0f} img/s over {seconds / 60:.1f} min)")
    final = checkpoint()
    del final["optimizer"]  # the final file is for sampling; the resumable state is in LAST_NAME
    final["throughput"] = {"steps": step - start_step, "seconds": seconds,  # this run's training speed
                           "images_per_second": (step - start_step) * args.batch_size / seconds}
    save_atomic(final, os.path.join(args.out_dir, FINAL_NAME))
    return ema.model, losses, previews


@torch.no_grad()
def sample_ddpm(model, sched, n, device, bf16=False, generator=None, snapshot_steps=(), progress=True, steps=None):
    """DDPM Algorithm 2 (ancestral sampling): start from pure noise and denoise, one timestep after the other.

    steps=None visits all T timesteps. steps=K visits K of them, evenly spread ("respacing", Nichol & Dhariwal
    2021): the same update, where each β is the one that takes ᾱ from one visited timestep to the next - a cheap
    preview. Returns the final images and {t: x_t} for each t in snapshot_steps (the denoising-process figure)."""
    T = sched["alpha_bar"].shape[0]
    visited = list(range(T)) if steps is None else np.linspace(0, T - 1, steps).round().astype(int).tolist()
    alpha_bar = sched["alpha_bar"][visited].cpu().double()  # float64 on the CPU (MPS has none), like the schedule
    alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])  # ᾱ_{t-1}, ᾱ_0 = 1
    beta = 1 - alpha_bar / alpha_bar_prev  # β_t = 1 - ᾱ_t/ᾱ_{t-1}: with all T timesteps, the schedule's own β_t
    posterior_std = (beta * (1 - alpha_bar_prev) / (1 - alpha_bar)).sqrt()  # σ_t = √β̃_t
    alpha_bar, beta, posterior_std = (v.float().to(device) for v in (alpha_bar, beta, posterior_std))
    x = torch.randn(n, 1, 28, 28, device=device, generator=generator)  # x_T ~ N(0, I)
    snapshots = {}
    for i in tqdm(reversed(range(len(visited))), total=len(visited), desc="DDPM sampling", disable=not progress,
                  leave=False):
        t_batch = torch.full((n,), visited[i], device=device, dtype=torch.long)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            pred_noise = model(x, t_batch).float()
        # Posterior mean: μ = 1/√α_t · (x_t - β_t/√(1-ᾱ_t) · ε_θ(x_t, t)), with α_t = 1 - β_t
        mean = (x - beta[i] / (1 - alpha_bar[i]).sqrt() * pred_noise) / (1 - beta[i]).sqrt()
        # x_{t-1} = μ + σ_t z (no noise on the last step, t = 0)
        z = torch.randn(x.shape, device=device, generator=generator) if i > 0 else torch.zeros_like(x)
        x = mean + posterior_std[i] * z
        if visited[i] in snapshot_steps:
            snapshots[visited[i]] = x.clone()
    return x, snapshots


# ----------------------------------------------------------------------------------------------------
# 6. Outputs: preview per epoch, sample grid, denoising process, loss curve, optional .npz export
# ----------------------------------------------------------------------------------------------------
def save_grid(images_uint8, path, nrow=8):
    """Tiles digits (uint8 [N, 28, 28]) into one PNG, `nrow` to a row, with a thin black border between them."""
    save_image(images_uint8.unsqueeze(1).float() / 255, path, nrow=nrow, padding=2)


def save_preview(model, sched, args, device, bf16):
    """16 digits from the same noise after every epoch (a 50-step respaced sampler: a small fraction of an epoch).
    ddpm_preview.png shows the latest; ddpm_previews.png stacks them, one row per epoch: digits emerge."""
    generator = torch.Generator(device="cpu" if device.type == "mps" else device).manual_seed(args.seed)
    images = to_uint8(sample_ddpm(model.eval(), sched, PREVIEW_DIGITS, device, bf16, generator, progress=False,
                                  steps=PREVIEW_STEPS)[0])
    save_grid(images, os.path.join(args.out_dir, "ddpm_preview.png"), nrow=PREVIEW_DIGITS)
    return images


def save_outputs(model, config, losses, previews, args, device, bf16):
    sched = {k: v.to(device) for k, v in ddpm_schedule(**config["schedule"]).items()}
    T = sched["alpha_bar"].shape[0]
    model.eval()
    if previews:
        save_grid(torch.cat(previews), os.path.join(args.out_dir, "ddpm_previews.png"), nrow=PREVIEW_DIGITS)
    generator = torch.Generator(device="cpu" if device.type == "mps" else device).manual_seed(args.seed)
    snapshot_steps = sorted({int(round(s)) for s in np.linspace(T - 1, 0, 10)}, reverse=True)
    start = time.time()
    # in batches of --batch-size: one giant batch is slower on a CPU (it falls out of the caches)
    chunks = [sample_ddpm(model, sched, min(args.batch_size, args.num_samples - i), device, bf16, generator,
                          snapshot_steps) for i in range(0, args.num_samples, args.batch_size)]
    samples, snapshots = torch.cat([x for x, _ in chunks]), chunks[0][1]
    seconds = time.time() - start
    print(f"sampled {args.num_samples} digits with {T} DDPM steps in {seconds:.1f}s "
          f"({args.num_samples / seconds:.2f} img/s)")
    images = to_uint8(samples)
    save_grid(images[:100], os.path.join(args.out_dir, "ddpm_samples.png"), nrow=10 if len(images) > 64 else 8)
    save_denoising_process(snapshots, os.path.join(args.out_dir, "ddpm_denoising_process.png"))
    if losses:
        save_loss_curve(losses, os.path.join(args.out_dir, "ddpm_loss_curve.png"))
    if args.save_npz:
        os.makedirs(os.path.dirname(os.path.abspath(args.save_npz)), exist_ok=True)
        np.savez_compressed(args.save_npz, images=images.numpy())
        print(f"wrote {args.save_npz} ({len(images)} images)")
    print(f"wrote pictures to {os.path.abspath(args.out_dir)}")


def save_denoising_process(snapshots, path, n_show=6):
    """Rows = a few samples, columns = x_t from t = T-1 (noise) to t = 0 (digit)."""
    steps = list(snapshots)
    n_show = min(n_show, len(snapshots[steps[0]]))
    fig, axes = plt.subplots(n_show, len(steps), figsize=(len(steps), n_show), squeeze=False)
    for col, t in enumerate(steps):
        for row in range(n_show):
            axes[row, col].imshow(snapshots[t][row, 0].clamp(-1, 1).cpu().numpy(), cmap="gray", vmin=-1, vmax=1)
            axes[row, col].axis("off")
        axes[0, col].set_title(f"t={t}", fontsize=8)
    fig.suptitle("reverse process: noise -> digit", fontsize=9)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def save_loss_curve(losses, path):
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, alpha=0.3, lw=0.5, label="per step")
    window = min(100, len(losses))
    ax.plot(np.arange(window - 1, len(losses)), np.convolve(losses, np.ones(window) / window, "valid"),
            label=f"mean of {window}")
    ax.set(xlabel="step", ylabel="loss", yscale="log", title="DDPM training loss")
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


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
        path = os.path.join(args.out_dir, FINAL_NAME)
        ckpt = load_checkpoint(path, device)
        model = model_from_checkpoint(ckpt, path).to(device)
        save_outputs(model, ckpt["config"], ckpt["losses"], [], args, device, bf16)
        return

    base_channels = args.base_channels or (64 if device.type == "cuda" else 16)  # a Mac (MPS) is a laptop too
    # The recipe sprint (RESULTS.md) found what the narrow CPU UNet learns most from in ten minutes: a bold
    # learning rate, the cosine schedule, the upsampling convs at the low resolution, and noisier levels drawn
    # more often - with a longer warm-up, without which that pair can blow up in the first few hundred steps -
    # and EDM's scaling of the UNet's input and output, and Muon's orthogonalised steps for the weight matrices.
    # Over 20 epochs the linear schedule catches up, so wider UNets (GPU runs) keep the recipe they were measured
    # with (AdamW included: Muon is unmeasured there).
    narrow = base_channels <= 16
    args.lr = args.lr or (8e-3 if narrow else 2e-3)
    args.schedule = args.schedule or ("cosine" if narrow else "linear")
    shifted = narrow and args.schedule == "cosine"  # the shift's rule (timestep_probs) is derived for cosine only
    args.warmup_steps = args.warmup_steps if args.warmup_steps is not None else (500 if shifted else 200)
    args.noise_shift = args.noise_shift if args.noise_shift is not None else (1.0 if shifted else 0.0)
    args.upsample = args.upsample or ("conv-first" if narrow else "upsample-first")
    args.precondition = args.precondition or ("edm" if narrow else "none")
    args.optimizer = args.optimizer or ("muon" if narrow else "adamw")
    config = {"base_channels": base_channels, "channel_mults": [1, 2, 4], "attention": not args.no_attention,
              "schedule": COSINE_SCHEDULE if args.schedule == "cosine" else SCHEDULE}
    if args.upsample == "conv-first":  # the original order is saved as before (no key), so old runs resume
        config["upsample"] = "conv-first"
    if args.precondition == "edm":  # likewise: no key means the layers predict ε directly
        config["sigma_data"] = args.sigma_data
    # Ctrl-C in the middle of a step raises KeyboardInterrupt; train() catches it and saves.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    print(f"device {device} (bf16 autocast {'on' if bf16 else 'off'}: {bf16_why})")
    ema_model, losses, previews = train(args, config, device, bf16)
    save_outputs(ema_model, config, losses, previews, args, device, bf16)


if __name__ == "__main__":
    main()
