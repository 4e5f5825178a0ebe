"""
The GPU path, measured: src.py's defaults trained, sampled, scored and timed on this machine - one table.

Usage (copy-paste):
    python gpu_benchmark.py --data-root DIR                    # on a CUDA GPU: about 8 minutes
    python gpu_benchmark.py --minutes 30                       # room for the 20-epoch default on a slower GPU
    python gpu_benchmark.py --device cpu --tiny                # every step in seconds, tiny settings (the tests)

Each step is the command a learner would type. It is printed, then run in this process:
    python src.py --minutes M                       train with this device's defaults (GPU: width 64, bf16)
    python sample_ddim.py --steps 50 --eta 1 ...    50 network calls, N samples to an .npz
    python src.py --sample-only ...                 the 1000-step ancestral sampler, N samples to an .npz
    python evaluate.py A.npz B.npz --json           FID in two networks' features, precision/recall
    python evaluate.py --benchmark --json           images per second of every sampler

What comes out (in --out-dir): everything those scripts write, and gpu_benchmark.md, the table printed at the end.
"""
import argparse
import contextlib
import io
import json
import os
import sys

import torch

import evaluate
import sample_ddim
import src

# settings that shrink every step to seconds on a CPU (--tiny): a width-8 UNet, a few digits, one repeat
TINY = {"train": ["--epochs", "2", "--batch-size", "32", "--base-channels", "8", "--num-samples", "4"],
        "evaluate": ["--classifier-epochs", "1"], "benchmark": ["--repeats", "1", "--batch-size", "4"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train, sample, score and time src.py's defaults on this device.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-root", default=os.environ.get("MNIST_ROOT", "./data"),
                   help="folder holding MNIST/raw/ (torchvision layout); env var MNIST_ROOT sets the default")
    p.add_argument("--out-dir", default="runs/gpu_benchmark", help="where every script's files go")
    p.add_argument("--minutes", type=src.positive_float, default=6.0,
                   help="training budget (src.py --minutes): the default run stops at 20 epochs or here "
                        "(an H200 trains the 20 epochs in about 5 minutes)")
    p.add_argument("--num-samples", type=src.positive_int, default=2000, help="samples per sampler to score (N)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                   help="auto picks cuda, then mps, then cpu")
    p.add_argument("--tiny", action="store_true", help="tiny settings: a smoke test of every step, not a measurement")
    return p.parse_args(argv)


class Tee(io.StringIO):
    """Keeps what is printed and still shows it."""

    def __init__(self, stream):
        super().__init__()
        self.stream = stream

    def write(self, text):
        self.stream.write(text)
        return super().write(text)


def run(script, argv):
    """Prints the command, runs the script's main() here, returns what it printed."""
    print(f"\n$ python {script.__name__}.py {' '.join(argv)}", flush=True)
    tee = Tee(sys.stdout)
    with contextlib.redirect_stdout(tee):
        script.main(argv)
    return tee.getvalue()


def json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def summary(ckpt, scores, bench, device):
    """(what, measured) rows: the device, the model, its training speed, the two FIDs, each sampler's speed."""
    speed, config = ckpt["throughput"], ckpt["config"]
    name = torch.cuda.get_device_name() if device.type == "cuda" else device.type
    bf16, bf16_why = src.use_bf16("auto", device)
    rows = [("device", f"{name}, torch {torch.__version__}, bf16 autocast {'on' if bf16 else 'off'} ({bf16_why})"),
            ("model", f"UNet base width {config['base_channels']}, attention {'on' if config['attention'] else 'off'}"),
            ("training", f"{ckpt['step']} steps ({ckpt['epoch']} epochs) in {speed['seconds'] / 60:.1f} min, "
                         f"{speed['images_per_second']:.0f} img/s")]
    for label, s in zip(["DDIM-50 η=1", "DDPM-1000"], scores):
        rows.append((f"FID {label}, N = {s['n']}",
                     f"{s['fid']:.2f} (MLP features {s['fid_mlp']:.2f}; real-digit floor "
                     f"{s['fid_floor_real_train']:.2f} / {s['fid_mlp_floor_real_train']:.2f}), "
                     f"precision {s['precision']:.3f}, recall {s['recall']:.3f}"))
    return rows + [(f"images/s: {r['sampler']}", f"{r['images_per_second']:.1f} (batch {bench['batch']}, "
                                                 f"{r['speedup_vs_ddpm_1000']:.1f}x DDPM-1000)") for r in bench["rows"]]


def main(argv=None):
    args = parse_args(argv)
    tiny = TINY if args.tiny else {"train": [], "evaluate": [], "benchmark": []}
    out, n = args.out_dir, str(args.num_samples)
    device = ["--device", args.device]
    checkpoint = os.path.join(out, src.FINAL_NAME)
    ddim_npz, ddpm_npz = os.path.join(out, "ddim50_eta1.npz"), os.path.join(out, "ddpm1000.npz")

    run(src, ["--data-root", args.data_root, "--out-dir", out, "--minutes", f"{args.minutes:g}"]
        + tiny["train"] + device)
    run(sample_ddim, ["--checkpoint", checkpoint, "--sampler", "ddim", "--eta", "1", "--steps", "50",
                      "--num-samples", n, "--batch-size", "1000", "--no-ddpm", "--no-inversion", "--out-dir", out,
                      "--save-npz", ddim_npz] + device)
    run(src, ["--sample-only", "--out-dir", out, "--num-samples", n, "--batch-size", "1000", "--save-npz", ddpm_npz]
        + device)
    scores = json_lines(run(evaluate, [ddim_npz, ddpm_npz, "--json", "--out-dir", out, "--data-root", args.data_root]
                            + tiny["evaluate"] + device))
    bench = json_lines(run(evaluate, ["--benchmark", "--json", "--out-dir", out] + tiny["benchmark"] + device))[0]
    rows = summary(torch.load(checkpoint, map_location="cpu", weights_only=True), scores, bench,
                   src.pick_device(args.device))
    table = "| what | measured |\n| --- | --- |\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)
    with open(os.path.join(out, "gpu_benchmark.md"), "w") as f:
        f.write(table)
    print("\n" + table)


if __name__ == "__main__":
    main()
