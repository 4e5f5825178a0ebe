"""
The measuring stick - is a set of generated digits any good, and how fast was it made?

Usage (copy-paste):
    python evaluate.py samples.npz                      # FID (+ per-digit accuracy if it has labels)
    python evaluate.py samples.npz --n 2000 --json      # the same, machine-readable
    python evaluate.py my_pngs/                         # a folder of 28x28 PNGs works too
    python evaluate.py --benchmark                      # images/s of each sampler on this device
    python evaluate.py guided_scale*.npz cf_w*.npz --tradeoff images/guidance_tradeoff.png
                                                        # guidance: accuracy vs FID per scale/weight, plot + table
    python evaluate.py sdedit_s*.npz --tradeoff images/sdedit_tradeoff.png   # SDEdit: distance to the input vs FID

Why not the usual Inception FID? Inception-v3 was trained on 299x299 colour photos (and needs weights from the
internet); on 28x28 digits its features mean little. We train a small MNIST classifier once instead (about a
minute or two on a CPU, >= 99% test accuracy) and measure in its feature space:

  * FID: the Fréchet distance between Gaussians fitted to the classifier's penultimate-layer features of your
    samples and of the 10k MNIST test digits. 0 = same statistics; it depends on N, so compare at equal N.
    The "floor" printed next to it is the FID of N *real* training digits: the best a generator can hope for.
  * FID in a second network: the same distance in the features of an independently trained MLP (another
    architecture). One network's FID can be lowered without the digits getting better; a real improvement moves
    both. Report a change that moves one but not the other as exactly that.
  * precision and recall (Kynkäänniemi et al. 2019, k = 3, in the classifier's features): precision = the share of
    your samples that land near some real digit (fidelity); recall = the share of N real test digits that land
    near some sample (diversity: a missing digit or style lowers it). FID mixes the two into one number.
  * accuracy: for samples that carry the digit they were asked to be (`labels`), how often the classifier
    agrees. For unlabeled samples: the class histogram (a missing digit = mode collapse) and mean confidence.

Input: an .npz with `images` uint8 [N, 28, 28] (0-255) and optional `labels` int [N] - what every script's
`--save-npz` writes - or a folder of PNGs. The guidance chapters' files also carry `guidance` (which method),
`strength` (its scale or weight) and `seconds` (sampling time): --tradeoff plots those against each other; edit.py's
SDEdit files carry `distance` (to the input), which --tradeoff then plots against FID instead.
"""
import argparse
import functools
import json
import os
import statistics
import sys
import time

import matplotlib
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

matplotlib.use("Agg")  # draw into files: no window, works on a machine without a screen
import matplotlib.pyplot as plt  # noqa: E402 (after choosing the backend)

# ----------------------------------------------------------------------------------------------------
# 1. Config
# ----------------------------------------------------------------------------------------------------
NETWORKS = {"cnn": "mnist_classifier.pt", "mlp": "mnist_mlp.pt"}  # the two feature networks and their caches
EPOCH_FACTOR = {"cnn": 1, "mlp": 4}  # an MLP step costs ~1/20 of a CNN step: 4x the epochs reach >= 98% all the same
PR_NEIGHBOURS = 3  # k of the k-nearest-neighbour balls in precision/recall (Kynkäänniemi et al. 2019)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="FID / accuracy of generated MNIST digits, and a sampler benchmark.",
                                formatter_class=HelpFormatter)
    p.add_argument("samples", nargs="*", help=".npz files from a --save-npz flag, or folders of 28x28 PNGs")
    p.add_argument("--n", type=positive_int, default=None,
                   help="score a random subset of N samples (seeded by --seed; default: all). FID depends on N, "
                        "so compare at equal N")
    p.add_argument("--data-root", default=os.environ.get("MNIST_ROOT", "./data"),
                   help="folder holding MNIST/raw/ (torchvision layout). Env var MNIST_ROOT sets the default")
    p.add_argument("--out-dir", default=".",
                   help=f"where the two reference networks are cached ({', '.join(NETWORKS.values())})")
    p.add_argument("--classifier-epochs", type=positive_int, default=3,
                   help="epochs when training the CNN (the MLP gets 4x as many, its steps are far cheaper)")
    p.add_argument("--retrain", action="store_true", help="train the reference networks again")
    p.add_argument("--benchmark", action="store_true",
                   help="time every sampler whose checkpoint exists in OUT_DIR (markdown table)")
    p.add_argument("--repeats", type=positive_int, default=3, help="benchmark: timed runs per sampler (median)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="benchmark: images per timed run")
    p.add_argument("--tradeoff", default=None, metavar="PNG",
                   help="guided sets (src_cfg.py / src_classifier_free.py --save-npz): plot accuracy vs FID per "
                        "scale/weight to PNG and print a markdown table")
    p.add_argument("--json", action="store_true", help="print JSON (one object per line) instead of text")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                   help="auto picks cuda, then mps, then cpu")
    args = p.parse_args(argv)
    if not args.samples and not args.benchmark:
        p.error("give a samples file/folder to score, or --benchmark")
    return args


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help adds each flag's default, but not a default of None: that flag's help says in words what happens."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def positive_int(s):
    if int(s) <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
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


# ----------------------------------------------------------------------------------------------------
# 2. Data: MNIST for the classifier and the reference statistics; the samples to score
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


def load_samples(path, n=None, seed=0):
    """Reads an .npz (`images` uint8 [N, 28, 28], optional `labels`) or a folder of PNGs.

    Returns (images, labels or None, meta): meta = the guidance chapters' extra fields, when present."""
    labels, meta = None, {}
    if os.path.isdir(path):
        from PIL import Image
        files = sorted(f for f in os.listdir(path) if f.lower().endswith(".png"))
        if not files:
            fail(f"{path} holds no .png files")
        images = np.stack([np.asarray(Image.open(os.path.join(path, f)).convert("L")) for f in files])
    elif os.path.isfile(path):
        try:
            with np.load(path) as npz:
                if "images" not in npz:
                    fail(f"{path} has no `images` array (it has: {', '.join(npz.files) or 'nothing'})")
                images = npz["images"]
                labels = npz["labels"] if "labels" in npz else None
                meta = {k: npz[k].item() for k in ("guidance", "strength", "sampler", "seconds", "distance") if k in npz}
        except (ValueError, OSError, EOFError) as e:
            fail(f"{path} is not a readable .npz file ({type(e).__name__})")
    else:
        fail(f"no such file or folder: {path}")
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        fail(f"`images` must be N x 28 x 28, got shape {tuple(images.shape)}")
    if images.dtype != np.uint8:
        fail(f"`images` must be uint8 0-255, got {images.dtype}")
    if len(images) == 0:
        fail(f"{path} holds no images")
    if labels is not None and (labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer)
                               or labels.min() < 0 or labels.max() > 9):
        fail(f"`labels` must be N integers 0-9 matching `images`, got shape {labels.shape} {labels.dtype}")
    if n is not None:  # a random subset: the guidance chapters' files are sorted by digit, the first N are not fair
        if len(images) < n:
            fail(f"{path} holds {len(images)} images, fewer than --n {n}")
        keep = np.sort(np.random.default_rng(seed).permutation(len(images))[:n])
        images = images[keep]
        labels = labels[keep] if labels is not None else None
    labels = torch.from_numpy(labels.astype(np.int64)) if labels is not None else None
    return torch.from_numpy(images), labels, meta


# ----------------------------------------------------------------------------------------------------
# 3. Models: two reference networks, each a digit classifier whose 128-d penultimate layer is a feature space
# ----------------------------------------------------------------------------------------------------
class MnistClassifier(nn.Module):
    """kind "cnn": a small VGG-style convnet, the main yardstick. kind "mlp": a plain multi-layer perceptron on the
    pixels, no convolutions - another architecture, trained separately, for a second opinion."""

    def __init__(self, kind="cnn"):
        super().__init__()
        if kind == "cnn":
            self.features = nn.Sequential(
                nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(0.25), nn.Linear(64 * 7 * 7, 128), nn.ReLU())
        else:
            self.features = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 512), nn.ReLU(), nn.Dropout(0.25),
                                          nn.Linear(512, 128), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.25), nn.Linear(128, 10))

    def forward(self, images_uint8):
        x = (images_uint8.float().unsqueeze(1) / 255.0 - 0.1307) / 0.3081  # MNIST mean/std
        feats = self.features(x)
        return self.head(feats), feats


@torch.no_grad()
def classify(model, images_uint8, device, batch=1000):
    """Returns (logits [N, 10], features [N, 128]) as float32 CPU tensors."""
    model.eval()
    logits, feats = [], []
    for i in range(0, len(images_uint8), batch):
        lg, ft = model(images_uint8[i:i + batch].to(device))
        logits.append(lg.float().cpu())
        feats.append(ft.float().cpu())
    return torch.cat(logits), torch.cat(feats)


def save_atomic(obj, path):
    """Write to a temp file, then rename: a killed run never leaves a half-written checkpoint."""
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train_network(kind, args, device, path):
    """Trains one reference network on MNIST-train; caches it with its MNIST-test features and their statistics."""
    torch.manual_seed(args.seed)
    train_x, train_y = load_mnist(args.data_root, train=True)
    model = MnistClassifier(kind).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    epochs = args.classifier_epochs * EPOCH_FACTOR[kind]
    steps = epochs * (len(train_x) // 128)
    lr_schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=max(steps, 1))
    bar = tqdm(total=steps, desc=f"training the reference {kind}", unit="step")
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(train_x))
        for i in range(len(train_x) // 128):
            idx = order[i * 128:(i + 1) * 128]
            x = train_x[idx].to(device)
            # small random shifts (+-2 px) make the features robust to the slightly off-centre generated digits
            x = torch.roll(x, shifts=tuple(torch.randint(-2, 3, (2,)).tolist()), dims=(1, 2))
            loss = F.cross_entropy(model(x)[0], train_y[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            lr_schedule.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    ckpt = {"kind": "mnist_classifier", "network": kind, "model": model.state_dict(),
            **test_statistics(model, args, device)}
    save_atomic(ckpt, path)
    print(f"reference {kind}: {ckpt['test_accuracy']:.2%} MNIST-test accuracy, cached in {path}", file=sys.stderr)
    return ckpt


def test_statistics(model, args, device):
    """The network's accuracy on the 10k MNIST-test digits, their features and the features' mean and covariance:
    what every FID, precision and recall compares with (a few seconds)."""
    test_x, test_y = load_mnist(args.data_root, train=False)
    logits, feats = classify(model, test_x, device)
    mu, sigma = feature_stats(feats)
    return {"test_accuracy": (logits.argmax(1) == test_y).float().mean().item(), "test_mu": mu, "test_sigma": sigma,
            "test_features": feats}


def load_network(kind, args, device):
    """One reference network: cached in --out-dir, else the one shipped in weights/ (its test features recomputed
    and cached), else trained - and trained again if unreadable, from an older version, or with --retrain."""
    path = os.path.join(args.out_dir, NETWORKS[kind])
    shipped = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", NETWORKS[kind])
    if not os.path.isfile(path) and os.path.isfile(shipped) and not args.retrain:
        ckpt = torch.load(shipped, map_location="cpu", weights_only=True)
        model = MnistClassifier(kind).to(device)
        model.load_state_dict(ckpt["model"])
        print(f"reference {kind}: the shipped weights/{NETWORKS[kind]} (--retrain trains your own)", file=sys.stderr)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_atomic({**ckpt, **test_statistics(model.eval(), args, device)}, path)
    ckpt = None
    if os.path.isfile(path) and not args.retrain:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            print(f"warning: {path} is unreadable ({type(e).__name__}); training it again", file=sys.stderr)
        if ckpt is not None and (not isinstance(ckpt, dict) or ckpt.get("kind") != "mnist_classifier"):
            fail(f"{path} is not a reference network from evaluate.py (delete it or pass another --out-dir)")
        if ckpt is not None and "test_features" not in ckpt:
            print(f"note: {path} predates precision/recall; training it again", file=sys.stderr)
            ckpt = None
    if ckpt is None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        ckpt = train_network(kind, args, device, path)
    model = MnistClassifier(kind).to(device)
    model.load_state_dict(ckpt["model"])
    if ckpt["test_accuracy"] < 0.98:
        print(f"warning: the reference {kind} reaches only {ckpt['test_accuracy']:.2%} on MNIST-test "
              f"(want >= 98%); retrain with more --classifier-epochs", file=sys.stderr)
    return model, ckpt


def load_networks(args, device):
    """{kind: (model, cached checkpoint)} for both yardsticks; the CNN first (its features give precision/recall)."""
    return {kind: load_network(kind, args, device) for kind in NETWORKS}


# ----------------------------------------------------------------------------------------------------
# 4. Metrics
# ----------------------------------------------------------------------------------------------------
def feature_stats(feats):
    """Mean and covariance of the features (float64 numpy, on the CPU: MPS has no float64)."""
    f = feats.double().numpy()
    return torch.from_numpy(f.mean(0)), torch.from_numpy(np.cov(f, rowvar=False))


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """FID = ‖μ₁ - μ₂‖² + Tr(Σ₁ + Σ₂ - 2 (Σ₁Σ₂)^½).

    Tr((Σ₁Σ₂)^½) is the sum of the square roots of the eigenvalues of Σ₁Σ₂, which are those of the symmetric
    matrix √Σ₁ Σ₂ √Σ₁ - so two symmetric eigen-decompositions do it, no scipy needed."""
    mu1, sigma1, mu2, sigma2 = (np.asarray(a, dtype=np.float64) for a in (mu1, sigma1, mu2, sigma2))
    w, v = np.linalg.eigh(sigma1)
    sqrt_sigma1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    eig = np.linalg.eigvalsh(sqrt_sigma1 @ sigma2 @ sqrt_sigma1)
    trace_sqrt = np.sqrt(np.clip(eig, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def precision_recall(real, fake, k=PR_NEIGHBOURS, chunk=1000):
    """Improved precision and recall (Kynkäänniemi et al. 2019). A set's "manifold" is the union of balls, one
    around each of its points, reaching that point's k-th nearest neighbour in the same set.
    precision = share of `fake` inside the real manifold; recall = share of `real` inside the fake manifold."""
    def rows(a, b, reduce):  # reduce(distances from a chunk of a's rows to all of b), chunk by chunk: low memory
        return torch.cat([reduce(torch.cdist(a[i:i + chunk], b)) for i in range(0, len(a), chunk)])

    def inside(points, centres):
        radii = rows(centres, centres, lambda d: d.kthvalue(k + 1, dim=1).values)  # +1: a point is its own 0th
        return rows(points, centres, lambda d: (d <= radii).any(dim=1)).float().mean().item()

    return inside(fake, real), inside(real, fake)


def blur(images_uint8, sigma=1.0):
    """Gaussian blur (σ in pixels): real digits made soft, a yardstick for "blurry" samples."""
    from torchvision.transforms.functional import gaussian_blur
    out = gaussian_blur(images_uint8.float().unsqueeze(1), kernel_size=5, sigma=sigma)
    return out.squeeze(1).round().clamp(0, 255).to(torch.uint8)


@functools.lru_cache(maxsize=8)
def yardstick_stats(model, data_root, n, seed, device):
    """Feature statistics of n real training digits (the floor) and of the same digits blurred. They depend only on
    n, so several sample files of one size scored in one run (--tradeoff) compute them once."""
    train_x, _ = load_mnist(data_root, train=True)
    real = train_x[torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))[:n]]
    return {"floor_real_train": feature_stats(classify(model, real, device)[1]),
            "blurred_real_train": feature_stats(classify(model, blur(real), device)[1])}


def score(networks, images, labels, device, data_root=None, seed=0):
    """All metrics of one sample set as a dict: per network its FID (key `fid` for the CNN, `fid_mlp` for the MLP)
    and, with data_root, the same-N yardsticks; the CNN's judgement of the digits; precision/recall."""
    result = {"n": len(images)}
    for kind, (model, ckpt) in networks.items():
        prefix = "fid" if kind == "cnn" else f"fid_{kind}"
        logits, feats = classify(model, images, device)
        result[prefix] = frechet_distance(*feature_stats(feats), ckpt["test_mu"], ckpt["test_sigma"])
        if data_root is not None:  # two yardsticks at the same N: real training digits (the floor), and blurred ones
            for key, stats in yardstick_stats(model, data_root, len(images), seed, device).items():
                result[f"{prefix}_{key}"] = frechet_distance(*stats, ckpt["test_mu"], ckpt["test_sigma"])
        if kind != "cnn":
            continue
        real = ckpt["test_features"][torch.randperm(len(ckpt["test_features"]),
                                                    generator=torch.Generator().manual_seed(seed))[:len(images)]]
        result["precision"], result["recall"] = precision_recall(real, feats)
        probs = logits.softmax(1)
        pred = probs.argmax(1)
        result.update(classifier_test_accuracy=ckpt["test_accuracy"], mean_confidence=probs.max(1).values.mean().item(),
                      class_histogram=torch.bincount(pred, minlength=10).tolist())
        if labels is not None:
            correct = (pred == labels).float()
            result["accuracy"] = correct.mean().item()
            result["accuracy_per_digit"] = {int(d): correct[labels == d].mean().item()
                                            for d in labels.unique().tolist()}
    return result


def print_report(result, path):
    print(f"{path}: N = {result['n']}")
    for key, name in [("fid", "MNIST-classifier features"), ("fid_mlp", "second network: MLP features")]:
        floor = (f"   (same N: real training digits {result[key + '_floor_real_train']:.2f} = the floor, "
                 f"blurred σ = 1 px {result[key + '_blurred_real_train']:.2f})" if key + "_floor_real_train" in result
                 else "")
        print(f"  FID ({name}, vs MNIST-test) = {result[key]:.2f}{floor}")
    print(f"  precision {result['precision']:.3f} (fidelity)   recall {result['recall']:.3f} (diversity)   "
          f"k = {PR_NEIGHBOURS}, vs {result['n']} MNIST-test digits")
    print(f"  class histogram (0-9): {result['class_histogram']}   mean confidence {result['mean_confidence']:.3f}")
    if "accuracy" in result:
        per = "  ".join(f"{d}:{a:.0%}" for d, a in sorted(result["accuracy_per_digit"].items()))
        print(f"  judged the requested digit: {result['accuracy']:.2%}   per digit  {per}")


def print_tradeoff(results, path):
    """Guidance trade-off: one line per method through its scales/weights, the share of wrong digits (x, log
    scale: 10% and 0.1% wrong are far apart) against FID (y). Files that carry `distance` (edit.py's SDEdit) are
    plotted against that instead: how far each result moved from its input, against FID."""
    import matplotlib.ticker
    symbol = {"classifier": "s", "classifier-free": "w"}  # each chapter's name for its guidance strength
    faithfulness = all("distance" in r for r in results)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    print("| guidance | strength | sampler | N | judged the requested digit | per digit 0-9 (%) | worst digit | FID | "
          "FID (MLP) | sampling s/image |" + (" distance to the input |" if faithfulness else ""))
    print("| --- | ---: | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |" + (" ---: |" if faithfulness else ""))
    for method in sorted({r["guidance"] for r in results}):
        rows = sorted((r for r in results if r["guidance"] == method), key=lambda r: r["strength"])
        wrong = [max(100 * (1 - r["accuracy"]), 0.01) for r in rows]  # 0% wrong still needs a place on a log axis
        xs = [r["distance"] for r in rows] if faithfulness else wrong
        fid = [r["fid"] for r in rows]
        ax.plot(xs, fid, "o-", label=f"{method} ({symbol.get(method, 'strength')})")
        for r, x, y in zip(rows, xs, fid):
            ax.annotate(f"{symbol.get(method, '')}={r['strength']:g}", (x, y), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
            worst = min(r["accuracy_per_digit"].items(), key=lambda kv: kv[1])
            per_image = f"{r['seconds'] / r['n']:.4f}" if "seconds" in r else "-"
            per_digit = " ".join(f"{round(100 * a, 1):g}" for _, a in sorted(r["accuracy_per_digit"].items()))
            print(f"| {method} | {r['strength']:g} | {r.get('sampler', '-')} | {r['n']} | {r['accuracy']:.1%} | "
                  f"{per_digit} | {worst[0]}: {worst[1]:.1%} | {r['fid']:.1f} | {r['fid_mlp']:.1f} | {per_image} |"
                  + (f" {r['distance']:.3f} |" if faithfulness else ""))
    n = sorted({r["n"] for r in results})
    if faithfulness:
        ax.set_xlabel("mean distance of each result to its input (0-1 pixel range): unfaithfulness")
        ax.set_title("SDEdit: faithful to the input vs realistic")
    else:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.invert_xaxis()  # more accurate to the right
        ax.set_xlabel("samples judged a different digit than asked (%, log scale)")
        ax.set_title("guidance: on-class accuracy vs sample quality")
    ax.set_ylabel(f"FID (lower is better), N = {', '.join(map(str, n))}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    print(f"\nwrote {path}")


# ----------------------------------------------------------------------------------------------------
# 5. Benchmark: images per second of every sampler whose checkpoint exists (median of repeats, warm-up excluded)
# ----------------------------------------------------------------------------------------------------
def time_sampler(fn, repeats, device):
    """Median seconds of fn() over `repeats` runs, after one untimed warm-up run."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
        elif device.type == "mps":
            torch.mps.synchronize()
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def chapter_samplers(args, device, unet, sched, x_T, bf16):
    """(name, fn) for each later chapter whose trained file is in --out-dir, and a note for each one that is not."""
    import src_cfg
    import src_classifier_free
    import train_distilled
    import train_dmd
    import train_progressive
    y = torch.arange(len(x_T), device=device) % 10  # the digits the guided samplers are asked for: 0-9, repeated

    def classifier_guided(path):
        classifier = src_cfg.NoisyClassifier().to(device).eval()
        classifier.load_state_dict(torch.load(path, map_location=device, weights_only=True)["model"])
        return lambda: src_cfg.sample_guided(unet, classifier, sched, x_T, y, 8.0, 50, bf16=bf16, progress=False)

    def classifier_free(path):  # on the schedule its own checkpoint was trained with
        conditional, ckpt = src_classifier_free.load_conditional(path, device)
        own = {k: v.to(device) for k, v in src_classifier_free.ddpm_schedule(**ckpt["config"]["schedule"]).items()}
        return lambda: src_classifier_free.sample_guided(conditional, own, x_T, y, src_classifier_free.DEFAULT_WEIGHT,
                                                         50, bf16=bf16, progress=False)

    def one_step(chapter, kind):  # a distilled student: one call from noise to digit
        def build(path):
            ckpt = chapter.load_checkpoint(path, device, kind, f"{chapter.__name__}.py")
            student = chapter.model_from_checkpoint(ckpt, path).to(device).eval()
            return lambda: chapter.generate(student, sched, x_T, bf16)
        return build

    chapters = [(f"classifier-guided {src_cfg.DEFAULT_SAMPLER} 50 steps, scale 8", "src_cfg.py",
                 src_cfg.CLASSIFIER_NAME, classifier_guided),
                (f"classifier-free guided {src_classifier_free.DEFAULT_SAMPLER} 50 steps, "
                 f"w {src_classifier_free.DEFAULT_WEIGHT:g}",
                 "src_classifier_free.py", src_classifier_free.FINAL_NAME, classifier_free),
                ("distilled, 1 step", "train_distilled.py", train_distilled.FINAL_NAME,
                 one_step(train_distilled, "distilled")),
                ("progressive-distilled, 1 step", "train_progressive.py", train_progressive.FINAL_NAME,
                 one_step(train_progressive, "progressive")),
                ("distribution-matching distilled, 1 step", "train_dmd.py", train_dmd.FINAL_NAME,
                 one_step(train_dmd, "dmd"))]
    samplers, notes = [], []
    for name, script, filename, build in chapters:
        path = os.path.join(args.out_dir, filename)
        if os.path.isfile(path):
            samplers.append((f"{name} ({script})", build(path)))
        else:
            notes.append(f"no {path}: run `python {script}` to time it")
    return samplers, notes


def benchmark(args, device):
    """Rows of {sampler, seconds_per_batch, images_per_second, speedup}: each chapter's own sampler is imported
    and timed as a learner runs it, from the checkpoints found in --out-dir (skipped, with a note, if missing)."""
    import sample_ddim
    import src
    ddpm_path = os.path.join(args.out_dir, src.FINAL_NAME)
    if not os.path.isfile(ddpm_path):
        fail(f"--benchmark needs {ddpm_path} - run `python src.py` first (or pass --out-dir)")
    ckpt = src.load_checkpoint(ddpm_path, device)
    unet = src.model_from_checkpoint(ckpt, ddpm_path).to(device).eval()
    bf16 = src.use_bf16("auto", device)[0]
    sched = {k: v.to(device) for k, v in src.ddpm_schedule(**ckpt["config"]["schedule"]).items()}
    b = args.batch_size
    x_T = torch.randn(b, 1, 28, 28, generator=torch.Generator().manual_seed(args.seed)).to(device)
    samplers = [("DDPM ancestral, 1000 steps (src.py)", lambda: src.sample_ddpm(unet, sched, b, device, bf16,
                                                                                 progress=False))]
    for k in (20, 50, 100):
        samplers.append((f"DDIM {k} steps (sample_ddim.py)",
                         lambda k=k: sample_ddim.sample_ddim(unet, sched, x_T, k, bf16=bf16, progress=False)))
    samplers.append(("DPM-Solver++(2M) SDE 20 steps (sample_ddim.py)",
                     lambda: sample_ddim.sample_dpmpp(unet, sched, x_T, 20, True, bf16=bf16, progress=False)))
    more, notes = chapter_samplers(args, device, unet, sched, x_T, bf16)
    samplers += more
    rows = []
    for name, fn in samplers:
        seconds = time_sampler(fn, args.repeats, device)
        rows.append({"sampler": name, "seconds_per_batch": seconds, "images_per_second": b / seconds})
        print(f"  timed {name}: {seconds:.3f}s per {b} images", file=sys.stderr)
    for row in rows:
        row["speedup_vs_ddpm_1000"] = row["images_per_second"] / rows[0]["images_per_second"]
    return rows, notes


def print_benchmark(rows, notes, device, batch):
    name = torch.cuda.get_device_name() if device.type == "cuda" else device.type
    print(f"device: {name}, torch {torch.__version__}, batch {batch}, median of repeats, warm-up excluded\n")
    print(f"| sampler | images/s | s per {batch}-image grid | speed-up vs DDPM-1000 |")
    print("| --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['sampler']} | {r['images_per_second']:.1f} | {r['seconds_per_batch']:.3f} | "
              f"{r['speedup_vs_ddpm_1000']:.1f}x |")
    for note in notes:
        print(f"\nnote: {note}")


# ----------------------------------------------------------------------------------------------------
# 6. Main
# ----------------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    if args.benchmark:
        rows, notes = benchmark(args, device)
        if args.json:
            print(json.dumps({"device": str(device), "torch": torch.__version__, "batch": args.batch_size,
                              "rows": rows, "notes": notes}))
        else:
            print_benchmark(rows, notes, device, args.batch_size)
        return
    sets = [(path, *load_samples(path, args.n, args.seed)) for path in args.samples]  # bad input fails before any work
    if args.tradeoff:
        for path, _, labels, meta in sets:
            if labels is None or "guidance" not in meta or "strength" not in meta:
                fail(f"{path} has no labels/guidance/strength: --tradeoff takes the .npz files that "
                     f"src_cfg.py, src_classifier_free.py and `edit.py sdedit` write with --save-npz")
    networks = load_networks(args, device)
    results = []
    for path, images, labels, meta in sets:
        result = dict(score(networks, images, labels, device, args.data_root, args.seed), file=path, **meta)
        results.append(result)
        if args.json:
            print(json.dumps(result))
        else:
            print_report(result, path)
    if args.tradeoff:
        print()
        print_tradeoff(results, args.tradeoff)


if __name__ == "__main__":
    main()
