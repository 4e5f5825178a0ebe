"""
Chapter 2 - classifier guidance (Dhariwal & Nichol 2021): steer an unconditional DDPM to the digit you ask for.

Usage (copy-paste):
    python src_cfg.py                               # trains the noisy classifier once (cached), then guided grids
    python src_cfg.py --digits 0 4 9 --scales 3 8
    python src_cfg.py --sampler ddim                # deterministic DDIM-50 instead of the default DPM-Solver++ SDE
    python src_cfg.py --num-samples 200 --scales 0 3 8 --save-npz guided.npz   # for evaluate.py

"cfg" here means *classifier guidance*: a separate classifier's gradient pushes each sampling step towards a
class. Classifier-FREE guidance (Ho & Salimans 2022, src_classifier_free.py) needs no classifier at all - it
trains one conditional model and mixes its conditional and unconditional predictions.

The idea, in plain words. Bayes: log p(x_t | y) = log p(x_t) + log p(y | x_t) + const, so the score of the digits
*of class y* is the unconditional score plus ∇ log p(y | x_t). The diffusion model gives the first part, since
ε_θ(x_t, t) = -√(1-ᾱ_t) ∇ log p(x_t). So the guided noise prediction is

    ε̂ = ε_θ(x_t, t) - s · √(1-ᾱ_t) · ∇_x log p_φ(y | x_t, t)        (s = guidance scale, s = 1 is plain Bayes)

Two details make it work:
  * p_φ must be a classifier of NOISY images x_t that knows t: the sampler only ever shows it noisy x_t, and a
    classifier trained on clean digits has a meaningless gradient there.
  * the gradient is scaled by √(1-ᾱ_t), the factor that turns a score into a noise prediction.

What comes out (in --out-dir):
    noisy_classifier.pt                                   the cached classifier p_φ(y | x_t, t)
    classifier_guidance_scale_{s}_results/samples_class_{k}.png   a grid per scale and digit
    classifier_guidance_scale_{s}.png                     overview per scale (rows = digits)
    classifier_guidance_same_noise.png                    ONE starting noise, guided to each of the ten digits
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
SAMPLERS = {"ddim": (False, 0.0), "ddpm": (False, 1.0),  # name: (second order?, η); see sample_ddim.py
            "dpmpp-2m": (True, 0.0), "dpmpp-2m-sde": (True, 1.0), "restart": (True, 1.0)}
RESTART = {"t_min": 100, "t_max": 400}  # restart: the stretch of timesteps walked twice, as in sample_ddim.py
DEFAULT_SAMPLER = "dpmpp-2m-sde"  # chosen by measurement (accuracy per digit, FID, the grids): RESULTS.md
CLASSIFIER_NAME = "noisy_classifier.pt"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Classifier guidance: steer src.py's DDPM to chosen digits.",
                                formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", default="diffusion_model_final.pt", help="made by `python src.py`")
    p.add_argument("--digits", type=digit, nargs="+", default=list(range(10)), help="digits to draw")
    p.add_argument("--scales", type=non_negative_float, nargs="+", default=[3.0, 8.0],
                   help="guidance scales s (0 = unguided; larger = more on-class, less varied)")
    p.add_argument("--num-samples", type=positive_int, default=8, help="samples per digit and scale")
    p.add_argument("--sampler", choices=list(SAMPLERS), default=DEFAULT_SAMPLER,
                   help="ddim: deterministic DDIM; ddpm: the 1000-step ancestral sampler (ignores --steps); "
                        "dpmpp-2m / dpmpp-2m-sde: DPM-Solver++(2M), deterministic / stochastic; restart: "
                        "dpmpp-2m-sde that walks t = 400..100 twice (sample_ddim.py)")
    p.add_argument("--steps", type=positive_int, default=50, help="network calls per sample (not for --sampler ddpm)")
    p.add_argument("--batch-size", type=positive_int, default=256, help="images per network call when sampling")
    p.add_argument("--data-root", default=os.environ.get("MNIST_ROOT", "./data"),
                   help="MNIST (torchvision layout), to train the noisy classifier; env var MNIST_ROOT")
    p.add_argument("--classifier", default=None, help=f"classifier cache (default: OUT_DIR/{CLASSIFIER_NAME})")
    p.add_argument("--retrain-classifier", action="store_true", help="train the noisy classifier again")
    p.add_argument("--classifier-epochs", type=positive_int, default=8,
                   help="epochs of noisy-classifier training (a few minutes on a CPU, once: it is cached)")
    p.add_argument("--seed", type=int, default=0, help="random seed (the starting noise)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                   help="auto picks cuda, then mps, then cpu")
    p.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                   help="bfloat16 autocast for the UNet; auto = on for CUDA and for CPUs with native bf16")
    p.add_argument("--out-dir", default=".", help="where pictures and the classifier cache go")
    p.add_argument("--save-npz", default=None, metavar="PATH",
                   help="export samples: `images` uint8 N x 28 x 28, `labels` = the requested digits, the scale and "
                        "the sampling time; with several --scales one file per scale (PATH_scale3.npz)")
    return p.parse_args(argv)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help adds each flag's default, but not a default of None: that flag's help says in words what happens."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def positive_int(s):
    if int(s) <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
    return int(s)


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
# 2. Data: MNIST digits and labels, to train the noisy classifier
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
# 4b. The noisy classifier p_φ(y | x_t, t): the UNet's down path (same ResBlocks, same timestep embedding),
#     pooled to 10 logits. GroupNorm, not BatchNorm: each sample's gradient must not depend on the others.
# ----------------------------------------------------------------------------------------------------
class NoisyClassifier(nn.Module):
    def __init__(self, base_channels=32, channel_mults=(1, 2, 2)):
        super().__init__()
        widths = [base_channels * m for m in channel_mults]
        emb_dim = 4 * base_channels
        self.base_channels = base_channels
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.stem = nn.Conv2d(1, base_channels, 3, padding=1)
        self.blocks = nn.ModuleList()
        ch = base_channels
        for width in widths:
            self.blocks.append(ResBlock(ch, width, emb_dim))
            ch = width
        self.head = nn.Sequential(nn.GroupNorm(8, ch), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(ch, 10))

    def forward(self, x, t):
        emb = self.time_mlp(timestep_embedding(t, self.base_channels))
        h = self.stem(x)
        for i, block in enumerate(self.blocks):
            h = block(h, emb)
            if i < len(self.blocks) - 1:
                h = F.avg_pool2d(h, 2)  # 28 -> 14 -> 7
        return self.head(h)


def save_atomic(obj, path):
    """Write to a temp file, then rename: a killed run never leaves a half-written checkpoint."""
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train_classifier(args, schedule, sched, device, bf16, path):
    """Train on exactly what the sampler will show it: q(x_t | x_0) at a random t, with the same schedule."""
    images, labels = load_mnist(args.data_root, train=True)
    data, labels = to_model_range(images).to(device), labels.to(device)
    T = sched["alpha_bar"].shape[0]
    classifier = NoisyClassifier().to(device)
    batch = 128
    steps = args.classifier_epochs * (len(data) // batch)
    opt = torch.optim.AdamW(classifier.parameters(), lr=2e-3, weight_decay=0.01)
    lr_schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=max(steps, 1))
    bar = tqdm(total=steps, desc="training noisy classifier", unit="step")
    for _ in range(args.classifier_epochs):
        order = torch.randperm(len(data), device=device)
        for i in range(len(data) // batch):
            idx = order[i * batch:(i + 1) * batch]
            t = torch.randint(0, T, (len(idx),), device=device)
            x_t = q_sample(data[idx], t, torch.randn_like(data[idx]), sched)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(classifier(x_t, t).float(), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            lr_schedule.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    save_atomic({"kind": "noisy_classifier", "schedule": schedule, "model": classifier.state_dict()}, path)
    print(f"saved {path}")
    return classifier.eval()


def get_classifier(args, schedule, sched, device, bf16):
    """The cached classifier (yours, else the shipped one), or a freshly trained one if missing, unreadable, for
    another schedule, or asked."""
    own = args.classifier or os.path.join(args.out_dir, CLASSIFIER_NAME)
    shipped = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", CLASSIFIER_NAME)
    # none of yours yet: the shipped one, made for the shipped model's schedule (checked below, as for yours)
    path = shipped if not os.path.isfile(own) and not args.classifier and os.path.isfile(shipped) else own
    if os.path.isfile(path) and not args.retrain_classifier:
        try:
            ckpt = torch.load(path, map_location=device, weights_only=True)
            if ckpt.get("kind") != "noisy_classifier" or ckpt["schedule"] != schedule:
                raise ValueError("made for another schedule or by another script")
            classifier = NoisyClassifier().to(device)
            classifier.load_state_dict(ckpt["model"])
            print(f"loaded the noisy classifier from {path}")
            return classifier.eval()
        except Exception as e:
            print(f"{path} can't be used ({type(e).__name__}: {str(e)[:80]}); training it again")
    return train_classifier(args, schedule, sched, device, bf16, own)


@torch.no_grad()
def classifier_accuracy_by_noise(classifier, sched, args, device, timesteps=(0, 250, 500, 750, 999), n=2000):
    """How well p_φ reads the digit from x_t on MNIST-test: the task gets harder as the noise grows."""
    images, labels = load_mnist(args.data_root, train=False)
    x0, labels = to_model_range(images[:n]).to(device), labels[:n].to(device)
    generator = torch.Generator(device="cpu").manual_seed(0)
    accuracies = {}
    for t in timesteps:
        t_batch = torch.full((len(x0),), t, device=device, dtype=torch.long)
        x_t = q_sample(x0, t_batch, torch.randn(x0.shape, generator=generator).to(device), sched)
        accuracies[t] = (classifier(x_t, t_batch).argmax(1) == labels).float().mean().item()
    print("noisy classifier, MNIST-test accuracy by noise level: "
          + "  ".join(f"t={t}: {a:.1%}" for t, a in accuracies.items()))
    return accuracies


# ----------------------------------------------------------------------------------------------------
# 5. Guided sampling
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


def classifier_log_prob_grad(classifier, x, t, y):
    """∇_x log p_φ(y | x_t, t) for each sample (in float32: gradients are sensitive to rounding)."""
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        log_probs = F.log_softmax(classifier(x_in, t), dim=1)
        chosen = log_probs[torch.arange(len(y)), y].sum()  # samples are independent: the sum's grad is per sample
        return torch.autograd.grad(chosen, x_in)[0]


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
def sample_guided(model, classifier, sched, x_T, y, scale, steps, sampler=DEFAULT_SAMPLER, bf16=False, generator=None,
                  progress=True):
    """Any of this chapter's --sampler choices, with the classifier-guided ε̂, in `steps` network calls (ddpm: all T)."""
    second_order, eta = SAMPLERS[sampler]
    walks, ends, t_max = sampler_walks(sampler, steps, sched)
    x = x_T
    with tqdm(total=sum(map(len, walks)), desc=f"guided sampling, scale {scale:g}", disable=not progress,
              leave=False) as bar:
        for w, (timesteps, end) in enumerate(zip(walks, ends)):
            if w == 1:  # restart: back up to t_max, then walk the stretch again
                x = restart_jump(x, ends[0], sched["alpha_bar"][t_max], generator)
            alpha_bars = [sched["alpha_bar"][t] for t in timesteps] + [end]
            previous = None
            for i, t in enumerate(timesteps):
                t_batch = torch.full((len(x),), t, device=x.device, dtype=torch.long)
                with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
                    pred_noise = model(x, t_batch).float()
                if scale != 0:
                    # ε̂ = ε_θ(x_t, t) - s · √(1-ᾱ_t) · ∇ log p_φ(y | x_t, t): nudge the noise estimate so that the
                    # step lands where the classifier is more sure of y. This is the score form of guidance (Dhariwal
                    # & Nichol's Algorithm 2), used here with every sampler - the 1000-step ancestral one too, where
                    # their Algorithm 1 shifts the step's mean by s·σ_t²·∇ log p_φ instead. Both push towards y.
                    grad = classifier_log_prob_grad(classifier, x, t_batch, y)
                    pred_noise = pred_noise - scale * (1 - alpha_bars[i]).sqrt() * grad
                noise = torch.randn(x.shape, device=x.device, generator=generator) if eta > 0 else torch.zeros_like(x)
                x, previous = solver_step(x, pred_noise, alpha_bars, i, previous, second_order, eta, noise)
                bar.update(1)
    return x


# ----------------------------------------------------------------------------------------------------
# 6. Outputs
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


def save_npz(args, scale, images, y, sampler_name, seconds):
    """The samples of one scale for evaluate.py: one file per scale when there are several (PATH_scale8.npz)."""
    path = args.save_npz
    if len(args.scales) > 1:
        stem, ext = os.path.splitext(path)
        path = f"{stem}_scale{scale:g}{ext or '.npz'}"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez_compressed(path, images=images.numpy(), labels=y.cpu().numpy(),  # + what evaluate.py --tradeoff plots:
                        guidance="classifier", strength=scale, sampler=sampler_name, seconds=seconds)
    print(f"wrote {path}")


def main(argv=None):
    args = parse_args(argv)
    if args.sampler == "restart" and args.steps < 5:
        fail(f"--sampler restart needs --steps >= 5 (a fifth of them walk t = 400..100 again), got {args.steps}")
    device = pick_device(args.device)
    bf16, bf16_why = use_bf16(args.bf16, device)
    ckpt = load_checkpoint(args.checkpoint, device)
    schedule = ckpt["config"]["schedule"]
    T = schedule["T"]
    if args.sampler != "ddpm" and args.steps > T:
        fail(f"--steps can be at most the {T} timesteps the model was trained with, got {args.steps}")
    try:
        os.makedirs(args.out_dir, exist_ok=True)
    except OSError as e:
        fail(f"cannot create --out-dir {args.out_dir} ({e.strerror})")
    model = model_from_checkpoint(ckpt, args.checkpoint).to(device).eval()
    print(f"device {device} (bf16 autocast {'on' if bf16 else 'off'}: {bf16_why}) | model {args.checkpoint}")
    sched = {k: v.to(device) for k, v in ddpm_schedule(**schedule).items()}
    torch.manual_seed(args.seed)
    classifier = get_classifier(args, schedule, sched, device, bf16)
    classifier_accuracy_by_noise(classifier, sched, args, device)

    steps = T if args.sampler == "ddpm" else args.steps
    sampler_name = f"{args.sampler}-{steps}"
    # The same starting noise for every scale: the figures show what guidance changes, and nothing else.
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    x_T = torch.randn(len(args.digits) * args.num_samples, 1, 28, 28, generator=generator).to(device)
    y = torch.tensor(args.digits, device=device).repeat_interleave(args.num_samples)
    for scale in args.scales:
        noise_gen = torch.Generator(device="cpu" if device.type == "mps" else device).manual_seed(args.seed + 1)
        start = time.perf_counter()
        images = torch.cat([
            to_uint8(sample_guided(model, classifier, sched, xs, ys, scale, steps, args.sampler, bf16, noise_gen))
            for xs, ys in zip(x_T.split(args.batch_size), y.split(args.batch_size))])
        seconds = time.perf_counter() - start
        print(f"scale {scale:g}: {len(images)} guided digits with {sampler_name} in {seconds:.1f}s")
        folder = os.path.join(args.out_dir, f"classifier_guidance_scale_{scale:g}_results")
        os.makedirs(folder, exist_ok=True)
        per_digit = images.view(len(args.digits), args.num_samples, 28, 28)
        for digit, grid in zip(args.digits, per_digit):
            save_grid(grid, os.path.join(folder, f"samples_class_{digit}.png"))
        save_rows(list(per_digit), [str(d) for d in args.digits],
                  os.path.join(args.out_dir, f"classifier_guidance_scale_{scale:g}.png"),
                  f"classifier guidance, scale {scale:g}, {sampler_name}")
        if args.save_npz:
            save_npz(args, scale, images, y, sampler_name, seconds)

    # One starting noise, guided to each of the ten digits: the classifier decides what the noise becomes.
    scale = max(args.scales)
    one_noise = x_T[:1].repeat(10, 1, 1, 1)
    same_noise_gen = torch.Generator(device="cpu" if device.type == "mps" else device).manual_seed(args.seed + 1)
    images = to_uint8(sample_guided(model, classifier, sched, one_noise, torch.arange(10, device=device), scale,
                                    steps, args.sampler, bf16, same_noise_gen, progress=False))
    save_rows([images], [""], os.path.join(args.out_dir, "classifier_guidance_same_noise.png"),
              f"one starting noise guided to 0..9 (scale {scale:g}, {sampler_name})")
    print(f"wrote pictures to {os.path.abspath(args.out_dir)}")


if __name__ == "__main__":
    main()
