"""
Chapter 8 - editing with a trained diffusion model: fill in a missing part, clean up a rough digit, turn a 3 into an 8.

Usage (copy-paste; each runs on chapter 1's model, or chapter 5's for `translate`, yours or the shipped one):
    python edit.py inpaint --mask left              # hide the left half of 64 test digits and fill it in again
    python edit.py inpaint --mask centre --jumps 0 --guidance 0   # plain replacement: no resampling, no guidance
    python edit.py sdedit                           # rough (blocky) test digits -> clean digits, at five strengths
    python edit.py sdedit --input my_digit.png --strength 0.5   # your own 28x28 drawing
    python edit.py translate --to 8                 # every digit redrawn as an 8, in its own handwriting
    python edit.py inpaint --mask bottom --num-samples 200 --save-npz inpaint_bottom.npz   # for evaluate.py

No diffusion model is trained here (`--ambiguity` trains a small classifier). The model learned ε_θ(x_t, t) for
noisy digits; editing only changes where the sampler starts and what it is told on the way (notes/9-editing.md):
  * inpaint (Lugmayr et al. 2022): the forward process is known in closed form, so at every step the KNOWN pixels
    are replaced by the original digit noised to that step's level, q(x_t | x_0); the model fills in the rest.
    Replacement alone leaves seams: the model never sees how its part should fit, only what is there now.
    RePaint's resampling goes back up a few levels (re-noising) and down again, --jumps times, so both agree;
    reconstruction guidance (--guidance) nudges the hidden pixels so that the model's guess of the whole digit
    matches the known ones, a gradient through the network at every step.
  * sdedit (Meng et al. 2022): noise the rough input up to t_0 = strength · T and denoise from there. Low strength
    keeps the input (and its flaws), high strength makes a clean digit that forgets the input: a trade-off.
  * translate: DDIM inversion (chapter 3) finds the noise the deterministic sampler would turn into THIS digit;
    sampling from that noise with classifier-free guidance towards another digit (chapter 5) keeps the style.

What comes out (in --out-dir):
    edit_inpaint.png     rows: original, masked (grey = hidden), replacement, guided RePaint (up to 16 digits)
    edit_sdedit.png      rows: the rough input, then the result at each --strength (up to 16 digits)
    edit_translate.png   rows: the source digit, the translation (up to 16 digits)
    edit_TASK_all.png    all --num-samples results of the last row
    --save-npz F         the results (uint8 images, the digit they should read as); several strengths: one file each;
                         inpaint also writes plain replacement's to F_replacement.npz

The file reads top to bottom: config -> data -> schedule -> models -> editing -> outputs.
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
TASKS = ["inpaint", "sdedit", "translate"]
MASKS = ["left", "right", "top", "bottom", "centre", "random"]  # which part is hidden
ROUGH = ["blocky", "blur", "thick"]  # how sdedit roughens the test digits when no --input is given
NULL_CLASS = 10  # chapter 5's label for "no label"
COLUMNS = 16  # digits shown in the before/after figure


def parse_args(argv=None):
    common = argparse.ArgumentParser(add_help=False, formatter_class=HelpFormatter)
    common.add_argument("--data-root", default=os.environ.get("MNIST_ROOT", "./data"),
                        help="folder holding MNIST/raw/ (the test digits to edit). Env var MNIST_ROOT sets the default")
    common.add_argument("--out-dir", default=".", help="where the pictures go")
    common.add_argument("--num-samples", type=positive_int, default=64, help="how many test digits to edit")
    common.add_argument("--steps", type=positive_int, default=50,
                        help="network calls for the whole path from noise to digit (a partial path takes its share)")
    common.add_argument("--seed", type=int, default=0, help="which test digits, and the noise")
    common.add_argument("--save-npz", default=None, metavar="PATH",
                        help="export the results: `images` uint8 N x 28 x 28 and `labels`, the digit they should be")
    common.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                        help="auto picks cuda, then mps, then cpu")
    common.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                        help="bfloat16 autocast; auto = on for CUDA and for CPUs with native bf16, off on MPS")
    p = argparse.ArgumentParser(description="Edit digits with a trained diffusion model.", formatter_class=HelpFormatter)
    tasks = p.add_subparsers(dest="task", required=True, metavar="{" + ",".join(TASKS) + "}",
                             help="what to do (`python edit.py TASK --help` lists its flags)")
    ddpm = {"parents": [common], "formatter_class": HelpFormatter}
    inpaint = tasks.add_parser("inpaint", help="fill in a hidden part of test digits", **ddpm)
    sdedit = tasks.add_parser("sdedit", help="turn rough digits into clean ones", **ddpm)
    translate = tasks.add_parser("translate", help="redraw test digits as another digit, keeping the style", **ddpm)
    for task in (inpaint, sdedit):
        task.add_argument("--checkpoint", default="diffusion_model_final.pt", help="chapter 1's model (src.py)")
    inpaint.add_argument("--mask", choices=MASKS, default="left",
                         help="the hidden part: a half, the centre 14x14 square, or random pixels")
    inpaint.add_argument("--keep", type=fraction, default=0.2, help="--mask random: the share of pixels kept")
    inpaint.add_argument("--jumps", type=non_negative_int, default=5,
                         help="RePaint's resampling: at every --jump-length-th level, go back up that many levels "
                              "and down again, this many times; 0 = plain replacement")
    inpaint.add_argument("--jump-length", type=positive_int, default=5, help="levels per jump back up")
    inpaint.add_argument("--guidance", type=non_negative_float, default=4.0,
                         help="reconstruction guidance: how far each step moves the hidden pixels so that the "
                              "model's guess of the clean digit matches the known ones; 0 = off")
    inpaint.add_argument("--ambiguity", type=positive_int, nargs="?", const=1000, default=None, metavar="STEPS",
                         help="also measure how ambiguous the visible part is: train a small CNN for STEPS batches "
                              "(1000 if not given, ~30 s on a laptop) to read the label from it alone")
    sdedit.add_argument("--input", default=None, metavar="PNG",
                        help="your own digit (a light stroke on dark, or dark on light: it is inverted), resized to "
                             "28x28 and edited --num-samples times. Default: roughened test digits")
    sdedit.add_argument("--rough", choices=ROUGH, default="blocky",
                        help="without --input: how the test digits are roughened (7x7 blocks, a blur, thick strokes)")
    sdedit.add_argument("--strength", type=fraction, nargs="+", default=[0.2, 0.4, 0.6, 0.8, 1.0],
                        help="t_0 / T: how far the input is noised before denoising; 0 returns it, 1 ignores it")
    translate.add_argument("--checkpoint", default="classifier_free_model_final.pt",
                           help="chapter 5's conditional model (src_classifier_free.py)")
    translate.add_argument("--to", type=digit, default=None,
                           help="the digit to turn every test digit into. Default: another digit for each, at random")
    translate.add_argument("--weight", type=non_negative_float, default=2.5, help="classifier-free guidance weight w")
    translate.add_argument("--strength", type=fraction, default=1.0,
                           help="how far DDIM inversion goes, t_0 / T: 1 = all the way to noise")
    args = p.parse_args(argv)
    if args.task == "sdedit" and args.input is not None and not os.path.isfile(args.input):
        fail(f"--input: no such file {args.input}")
    return args


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


def fraction(s):
    if not 0 <= float(s) <= 1:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {s}")
    return float(s)


def non_negative_float(s):
    if not float(s) >= 0 or not math.isfinite(float(s)):  # also rejects nan and inf
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {s}")
    return float(s)


def digit(s):
    if not 0 <= int(s) <= 9:
        raise argparse.ArgumentTypeError(f"must be a digit 0-9, got {s}")
    return int(s)


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
# 2. Data: MNIST test digits, their masks and rough versions
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


def test_digits(args):
    """--num-samples MNIST test digits (in [-1, 1]) and their labels, a random choice seeded by --seed."""
    images, labels = load_mnist(args.data_root, train=False)
    if args.num_samples > len(images):
        fail(f"--num-samples {args.num_samples}: the test set has {len(images)} digits")
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))[:args.num_samples]
    return to_model_range(images[pick]), labels[pick]


def make_mask(kind, n, keep=0.2, generator=None):
    """1 where a pixel is KNOWN, 0 where it is hidden and must be filled in: [n, 1, 28, 28]."""
    mask = torch.ones(n, 1, 28, 28)
    hidden = {"left": (slice(None), slice(0, 14)), "right": (slice(None), slice(14, 28)),
              "top": (slice(0, 14), slice(None)), "bottom": (slice(14, 28), slice(None)),
              "centre": (slice(7, 21), slice(7, 21))}
    if kind == "random":
        return (torch.rand(n, 1, 28, 28, generator=generator) < keep).float()
    if kind not in hidden:
        fail(f"unknown mask {kind!r}: choose from {', '.join(MASKS)}")
    rows, cols = hidden[kind]
    mask[:, :, rows, cols] = 0
    return mask


def visible_part_reading(x0, labels, mask, hide, data_root, steps=1000, batch=128):
    """How much of the label the visible part alone carries. A small CNN learns to read MNIST-train digits with
    their pixels hidden as hide(n) hides them, then reads x0 through its mask. Returns the share it reads right
    (about the best any completion can be read right) and its mean probability for the true label (what a sampler
    drawing completions from the true conditional would score, as far as the CNN's probabilities are honest)."""
    images, train_labels = load_mnist(data_root, train=True)
    train, train_labels = to_model_range(images).to(x0.device), train_labels.to(x0.device)
    reader = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                           nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                           nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10)).to(x0.device)
    optimizer = torch.optim.AdamW(reader.parameters(), lr=2e-3)
    draw = torch.Generator().manual_seed(0)
    for _ in tqdm(range(steps), desc="training a reader of the visible part", leave=False):
        pick = torch.randint(len(train), (batch,), generator=draw).to(x0.device)
        loss = F.cross_entropy(reader(hide(batch).to(x0.device) * train[pick]), train_labels[pick])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        p = reader(mask * x0).softmax(1).cpu()
    return (p.argmax(1) == labels).float().mean().item(), p[torch.arange(len(labels)), labels].mean().item()


def roughen(x, how):
    """A rough version of digits in [-1, 1]: 7x7 blocks (a crude sketch), a blur, or strokes twice as thick."""
    if how == "blocky":
        return F.interpolate(F.avg_pool2d(x, 4), scale_factor=4, mode="nearest").sign()
    if how == "blur":
        return F.avg_pool2d(F.pad(x, (2, 2, 2, 2), value=-1), 5, stride=1)
    return F.max_pool2d(x, 3, stride=1, padding=1)  # thick: every stroke grows by a pixel on each side


def read_png(path):
    """A user's drawing as one digit in [-1, 1], white on black like MNIST; one clear line if it isn't an image."""
    from PIL import Image
    try:
        image = Image.open(path).convert("L")
    except Exception as e:
        fail(f"--input {path} is not an image ({type(e).__name__})")
    if image.size != (28, 28):
        print(f"--input {path} is {image.size[0]}x{image.size[1]}: resized to 28x28")
        image = image.resize((28, 28), Image.LANCZOS)
    x = torch.from_numpy(np.asarray(image).copy())
    if x.float().mean() > 127:  # dark strokes on a light page: MNIST is the other way round
        x = 255 - x
    return to_model_range(x[None])


# ----------------------------------------------------------------------------------------------------
# 3. Schedule: the checkpoint's own, and the levels a sampler visits
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


def levels(alpha_bar, steps, strength=1.0):
    """The timesteps a path from t_0 = strength · (T-1) down to 0 visits, in about strength · steps calls, and their
    ᾱ with ᾱ = 1 (the clean digit) appended: the last step lands on x_0."""
    t0 = round(strength * (len(alpha_bar) - 1))
    timesteps = ddim_timesteps(max(1, round(strength * steps)), alpha_bar[:t0 + 1])
    return timesteps, [alpha_bar[t] for t in timesteps] + [torch.ones((), device=alpha_bar.device)]


# ----------------------------------------------------------------------------------------------------
# 4. Models: chapter 1's UNet (ε_θ(x_t, t)) and chapter 5's conditional one (ε_θ(x_t, t, y)), as their chapters
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


def load_conditional(path, device):
    """The trained conditional model (EMA weights) and its checkpoint; one clear line if it can't."""
    ckpt = load_checkpoint(path, device, "classifier_free", "src_classifier_free.py")
    model = build_conditional_model(ckpt["config"])
    model.load_state_dict(ckpt["ema"])
    return model.to(device).eval(), ckpt


def guided_noise(model, x, t_batch, y, weight):
    """ε̂ = ε(x_t, ∅) + w · (ε(x_t, y) - ε(x_t, ∅)), both branches in ONE forward pass of a doubled batch."""
    null = torch.full_like(y, NULL_CLASS)
    cond, uncond = model(torch.cat([x, x]), torch.cat([t_batch, t_batch]), torch.cat([y, null])).float().chunk(2)
    return uncond + weight * (cond - uncond)


# ----------------------------------------------------------------------------------------------------
# 5. Editing
# ----------------------------------------------------------------------------------------------------
def predict_noise(eps, x, t, bf16):
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        return eps(x, torch.full((len(x),), t, device=x.device, dtype=torch.long)).float()


def repaint_schedule(K, jumps, jump_length):
    """The order in which inpainting visits its K levels: K (pure noise) down to 0 (the digit); every step down is
    one network call. RePaint's resampling (their Sec. 4.2): after stepping down to every jump_length-th level,
    go back up jump_length levels and down again, `jumps` times. jumps = 0: straight down, K calls."""
    jumps_left = {t: jumps for t in range(0, K - jump_length, jump_length)}
    t, path = K, [K]
    while t > 0:
        t -= 1
        path.append(t)
        if jumps_left.get(t, 0) > 0:
            jumps_left[t] -= 1
            path.extend(range(t + 1, t + jump_length + 1))
            t += jump_length
    return path


def reconstruction_gradient(eps, x, t, alpha_bar_t, x0, mask, bf16):
    """Reconstruction guidance (Ho et al. 2022, normalised as in Chung et al. 2023): the model's guess of the clean
    digit, x̂_0(x_t), should match the known pixels. Its gradient runs back through the network, so the hidden part
    learns at every step what the known part needs of it; replacement alone only puts the known part back.
    Returns ε_θ(x_t) and ∇_x ‖mask · (x̂_0(x_t) - x0)‖, one norm per digit."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        pred_noise = predict_noise(eps, x, t, bf16)
        pred_x0 = (x - (1 - alpha_bar_t).sqrt() * pred_noise) / alpha_bar_t.sqrt()
        distance = (mask * (pred_x0 - x0)).flatten(1).norm(dim=1)
        gradient, = torch.autograd.grad(distance.sum(), x)
    return pred_noise.detach(), gradient


@torch.no_grad()
def inpaint(eps, alpha_bar, x0, mask, noise, steps, jumps=0, jump_length=5, guidance=0.0, bf16=False,
            generator=None, progress=True):
    """Fill in where mask = 0, keeping x0 where mask = 1 (Lugmayr et al. 2022, Algorithm 1 with their jumps; with
    guidance > 0, each step down also moves the hidden pixels along -guidance · reconstruction_gradient).
    Level k of the path has ᾱ_k (k = 0: the clean digit, ᾱ = 1; k = K: pure noise)."""
    timesteps, bars = levels(alpha_bar, steps)
    timesteps, bars = timesteps[::-1], bars[::-1]  # now level k: timesteps[k - 1], ᾱ = bars[k]
    K = len(timesteps)

    def fresh():
        return torch.randn(x0.shape, generator=generator).to(x0.device)

    path = repaint_schedule(K, jumps, jump_length)
    x = noise  # level K
    for k, k_next in tqdm(list(zip(path[:-1], path[1:])), desc="inpainting", disable=not progress, leave=False):
        if k_next < k:  # down: one ancestral step (DDPM's posterior, = DDIM with η = 1) on the whole image ...
            if guidance > 0:
                pred_noise, gradient = reconstruction_gradient(eps, x, timesteps[k - 1], bars[k], x0, mask, bf16)
            else:
                pred_noise, gradient = predict_noise(eps, x, timesteps[k - 1], bf16), 0.0
            x = ddim_step(x, pred_noise, bars[k], bars[k_next], 1.0, fresh()) - guidance * (1 - mask) * gradient
            # ... then the known pixels are replaced: x_0 noised to this level, q(x_t | x_0) in closed form
            known = bars[k_next].sqrt() * x0 + (1 - bars[k_next]).sqrt() * fresh()
            x = mask * known + (1 - mask) * x
        else:  # up (RePaint's jump back): q(x_k' | x_k) re-noises the whole image, known and generated together
            ratio = bars[k_next] / bars[k]  # ᾱ_k'/ᾱ_k: the signal kept from level k to the noisier k'
            x = ratio.sqrt() * x + (1 - ratio).sqrt() * fresh()
    return x


@torch.no_grad()
def denoise(eps, x, timesteps, bars, eta, bf16=False, generator=None, progress=True):
    """From x at timesteps[0] down to the clean digit: DDIM with η (1 = DDPM's ancestral steps, 0 = deterministic)."""
    for i, t in enumerate(tqdm(timesteps, desc="denoising", disable=not progress, leave=False)):
        noise = torch.randn(x.shape, generator=generator).to(x.device) if eta > 0 else 0.0
        x = ddim_step(x, predict_noise(eps, x, t, bf16), bars[i], bars[i + 1], eta, noise)
    return x


def sdedit(eps, alpha_bar, x_in, strength, noise, steps, bf16=False, generator=None, progress=True):
    """SDEdit (Meng et al. 2022): noise the input to t_0 = strength · (T-1), then denoise with ancestral steps.
    Strength 0 returns the input; strength 1 starts from the pure noise, as chapter 1 samples (the input's share
    there, √ᾱ_T ≈ 0.006 on both schedules, is dropped rather than kept)."""
    if strength == 0:
        return x_in.clone()
    timesteps, bars = levels(alpha_bar, steps, strength)
    x = noise if strength == 1 else bars[0].sqrt() * x_in + (1 - bars[0]).sqrt() * noise  # q(x_t0 | x_in)
    return denoise(eps, x, timesteps, bars, 1.0, bf16, generator, progress)


@torch.no_grad()
def translate(model, alpha_bar, x_src, y_src, y_to, weight, strength, steps, bf16=False, progress=True):
    """DDIM-invert x_src (with its own label) up to t_0 = strength · (T-1), then sample back down, guided to y_to."""
    timesteps, bars = levels(alpha_bar, steps, strength)
    x = x_src
    for i in reversed(range(len(timesteps))):  # inversion: the η = 0 update run backwards, clean -> noisy
        # (ε is taken at the noisier level before x is there: the approximation of chapter 3's invert_ddim)
        pred_noise = predict_noise(lambda x_, t_: model(x_, t_, y_src), x, timesteps[i], bf16)
        x = ddim_step(x, pred_noise, bars[i + 1], bars[i], 0.0, 0.0)
    return denoise(lambda x_, t_: guided_noise(model, x_, t_, y_to, weight), x, timesteps, bars, 0.0, bf16,
                   progress=progress)


# ----------------------------------------------------------------------------------------------------
# 6. Outputs: the before/after figure, the full grid, the .npz files
# ----------------------------------------------------------------------------------------------------
def save_grid(images_uint8, path, nrow=8):
    """Tiles digits (uint8 [N, 28, 28]) into one PNG, `nrow` to a row, with a thin black border between them."""
    save_image(images_uint8.unsqueeze(1).float() / 255, path, nrow=nrow, padding=2)


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


def save_npz(path, images, labels, **meta):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    labels = {} if labels is None else {"labels": labels.numpy()}
    np.savez_compressed(path, images=images.numpy(), **labels, **meta)
    print(f"wrote {path} ({len(images)} images)")


def main(argv=None):
    args = parse_args(argv)
    try:
        os.makedirs(args.out_dir, exist_ok=True)
    except OSError as e:
        fail(f"cannot create --out-dir {args.out_dir} ({e.strerror})")
    device = pick_device(args.device)
    bf16, bf16_why = use_bf16(args.bf16, device)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    print(f"device {device} (bf16 autocast {'on' if bf16 else 'off'}: {bf16_why})")
    if args.task == "translate":
        model, ckpt = load_conditional(args.checkpoint, device)
    else:
        ckpt = load_checkpoint(args.checkpoint, device)
        model = model_from_checkpoint(ckpt, args.checkpoint).to(device).eval()
    alpha_bar = ddpm_schedule(**ckpt["config"]["schedule"])["alpha_bar"].to(device)
    if args.task == "sdedit" and args.input:
        x0, labels = read_png(args.input).repeat(args.num_samples, 1, 1, 1), None  # no label: nothing to judge
    else:
        x0, labels = test_digits(args)
    x0 = x0.to(device)
    noise = torch.randn(x0.shape, generator=generator).to(device)
    out = lambda name: os.path.join(args.out_dir, name)  # noqa: E731
    start = time.perf_counter()

    if args.task == "inpaint":
        mask = make_mask(args.mask, len(x0), args.keep, generator).to(device)
        rows, names = [x0, mask * x0], ["original", f"masked ({args.mask})"]
        settings = sorted({(0, 0.0), (args.jumps, args.guidance)})  # replacement first; then yours, same noise
        for jumps, guidance in settings:
            seed = torch.Generator().manual_seed(args.seed + 1)
            rows.append(inpaint(model, alpha_bar, x0, mask, noise, args.steps, jumps, args.jump_length, guidance,
                                bf16, seed))
            names.append(("replacement" if jumps == 0 else f"RePaint, {jumps} jumps")
                         + (f", guidance {guidance:g}" if guidance else ""))
            print(f"{names[-1]}: {len(repaint_schedule(args.steps, jumps, args.jump_length)) - 1} calls per digit"
                  + (" (each with a backward pass)" if guidance else ""))
        if args.ambiguity:
            read, p_true = visible_part_reading(x0, labels, mask, lambda n: make_mask(args.mask, n, args.keep),
                                                args.data_root, args.ambiguity)
            print(f"ambiguity: a CNN trained on MNIST-train with the same pixels hidden reads the true label from the "
                  f"visible part alone in {read:.1%} of these digits; its mean probability for it is {p_true:.1%}")
        title = f"inpainting: the hidden {args.mask} part filled in by chapter 1's model"
        replaced = args.save_npz and args.save_npz.replace(".npz", "") + "_replacement.npz"  # both, for evaluate.py
        npz = [(args.save_npz if (jumps, guidance) == settings[-1] else replaced, result, labels,
                {"jumps": jumps, "guidance": guidance, "mask": args.mask})
               for (jumps, guidance), result in zip(settings, rows[2:])]
    elif args.task == "sdedit":
        x_in = x0 if args.input else roughen(x0, args.rough)
        rows, names, npz = [x_in], ["input" if args.input else f"rough ({args.rough})"], []
        for s in args.strength:
            edited = sdedit(model, alpha_bar, x_in, s, noise, args.steps, bf16, generator)
            distance = (to_uint8(edited).float() - to_uint8(x_in).float()).abs().mean().item() / 255
            rows.append(edited)
            names.append(f"strength {s:g}")
            print(f"strength {s:g}: mean distance to the input {distance:.3f} (of the 0-1 pixel range)")
            path = args.save_npz and (args.save_npz if len(args.strength) == 1 else
                                      args.save_npz.replace(".npz", "") + f"_s{s:g}.npz")
            npz.append((path, edited, labels, {"guidance": "sdedit", "strength": s, "distance": distance}))
        title = "SDEdit: noise the input to strength x T, then denoise"
    else:
        offset = torch.randint(1, 10, (len(x0),), generator=generator)  # another digit for each, at random
        y_to = torch.full_like(labels, args.to) if args.to is not None else (labels + offset) % 10
        moved = translate(model, alpha_bar, x0, labels.to(device), y_to.to(device), args.weight, args.strength,
                          args.steps, bf16)
        distance = (to_uint8(moved).float() - to_uint8(x0).float()).abs().mean().item() / 255
        print(f"mean distance to the source digit {distance:.3f} (of the 0-1 pixel range)")
        rows, names = [x0, moved], ["source", "translated" + (f" to {args.to}" if args.to is not None else "")]
        title = f"translation: DDIM inversion, then classifier-free guidance (w = {args.weight:g}) to the new digit"
        npz = [(args.save_npz, moved, y_to, {"strength": args.strength, "distance": distance})]
    seconds = time.perf_counter() - start
    print(f"edited {len(x0)} digits in {seconds:.1f}s")

    images = [to_uint8(r) for r in rows]
    save_rows([im[:COLUMNS] for im in images], names, out(f"edit_{args.task}.png"), title)
    save_grid(images[-1], out(f"edit_{args.task}_all.png"), nrow=8)
    for path, result, digits, meta in npz:
        if path:
            save_npz(path, to_uint8(result), digits, seconds=seconds, **meta)
    print(f"wrote {out(f'edit_{args.task}.png')} (rows: {', '.join(names)}) and {out(f'edit_{args.task}_all.png')}")


if __name__ == "__main__":
    main()
