"""
Shipped weights - copies trained checkpoints into weights/, so that a fresh clone draws digits without training.

Usage (copy-paste), after the runs whose commands RESULTS.md gives:
    python ship_weights.py RUN/diffusion_model_final.pt RUN/noisy_classifier.pt EVAL/mnist_classifier.pt
    python ship_weights.py --out-dir my_weights RUN/diffusion_model_final.pt   # anywhere else

Every chapter that finds no checkpoint of yours under its default name uses the copy in weights/ (and says so);
evaluate.py scores with the shipped reference networks unless told --retrain, so its numbers match RESULTS.md's.

A shipped file keeps what sampling needs: the config, the loss history and the EMA weights (every chapter samples
from those). It drops what only resumes training (the optimizer state, the raw weights beside an EMA, DMD's fake
score) and what is recomputed in seconds (a reference network's MNIST-test features and their statistics).
"""
import argparse
import os
import sys

import torch

DROPPED = ["optimizer", "optimizers", "fake", "teacher_state", "test_features", "test_mu", "test_sigma"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Copy trained checkpoints, slimmed, into weights/.")
    p.add_argument("checkpoints", nargs="+", help="final checkpoints of the chapters, or evaluate.py's networks")
    p.add_argument("--out-dir", default=None,
                   help="where the slimmed copies go, each under its own file name. Default: weights/ beside this "
                        "script, where the chapters look")
    args = p.parse_args(argv)
    args.out_dir = args.out_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
    return args


def slim(ckpt):
    """The checkpoint without what only training needs: the raw weights go where an EMA of them stays."""
    return {key: value for key, value in ckpt.items()
            if key not in DROPPED and not (key == "model" and "ema" in ckpt)}


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    for path in args.checkpoints:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            sys.exit(f"error: {path} is not a readable checkpoint ({type(e).__name__})")
        if not isinstance(ckpt, dict) or "kind" not in ckpt:
            sys.exit(f"error: {path} is not a checkpoint of this project's scripts")
        out = os.path.join(args.out_dir, os.path.basename(path))
        torch.save(slim(ckpt), out)
        print(f"{path} ({os.path.getsize(path) / 1e6:.1f} MB) -> {out} ({os.path.getsize(out) / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
