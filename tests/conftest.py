"""Shared test fixtures: a tiny MNIST in torchvision's layout, built by the tests, so they run on a fresh clone."""
import os
import struct

import numpy as np
import pytest
import torch

# The tests use tiny models: one thread is as fast, and it keeps a second job on a 2-core machine responsive.
torch.set_num_threads(1)

REAL_MNIST = os.environ.get("MNIST_ROOT", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
HAVE_REAL_MNIST = os.path.isfile(os.path.join(REAL_MNIST, "MNIST", "raw", "train-images-idx3-ubyte"))
needs_real_mnist = pytest.mark.skipif(not HAVE_REAL_MNIST, reason=f"real MNIST not found at {REAL_MNIST}")


def one_line_error(main, argv):
    """Runs a script's main(argv) that must refuse its input; returns the one-line error it exits with."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    message = str(exc.value.code)
    assert message.startswith("error: ") and "\n" not in message  # one clear line, no traceback
    return message


def refused_flag(main, argv, capsys):
    """Runs a script's main(argv) whose flags argparse must refuse (exit 2); returns its message line."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def loss_before_and_after(loss_fn, optimizer, steps):
    """loss_fn() before and after `steps` steps of the optimizer on it: does training move the loss the right way?"""
    before = loss_fn().item()
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn().backward()
        optimizer.step()
    return before, loss_fn().item()


def synthetic_digits(n, seed):
    """n 28x28 uint8 images whose class k is a bright bar at row 3+2k (plus noise): easy to learn, fast."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    images = rng.integers(0, 40, size=(n, 28, 28)).astype(np.uint8)
    for i, k in enumerate(labels):
        images[i, 3 + 2 * k:5 + 2 * k, 4:24] = 255
    return images, labels.astype(np.uint8)


def write_idx(raw_dir, prefix, images, labels):
    with open(os.path.join(raw_dir, f"{prefix}-images-idx3-ubyte"), "wb") as f:
        f.write(struct.pack(">IIII", 2051, len(images), 28, 28) + images.tobytes())
    with open(os.path.join(raw_dir, f"{prefix}-labels-idx1-ubyte"), "wb") as f:
        f.write(struct.pack(">II", 2049, len(labels)) + labels.tobytes())


@pytest.fixture(scope="session")
def tiny_mnist(tmp_path_factory):
    """A data root with 256 training and 100 test digits in MNIST/raw/ (what torchvision reads)."""
    root = tmp_path_factory.mktemp("tiny_mnist")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw, "train", *synthetic_digits(256, seed=0))
    write_idx(raw, "t10k", *synthetic_digits(100, seed=1))
    return str(root)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_mnist, tmp_path_factory):
    """A DDPM checkpoint from a real (tiny) run of src.py: 160 steps of a width-8 UNet on the tiny data, 10 epochs."""
    import src
    out = tmp_path_factory.mktemp("src_run")
    src.main(["--data-root", tiny_mnist, "--out-dir", str(out), "--epochs", "10", "--batch-size", "16", "--lr", "5e-3",
              "--warmup-steps", "50", "--noise-shift", "0",  # the tiny model's recipe, pinned: tests rely on it
              "--precondition", "none",  # the layers predict ε themselves; tiny_edm_checkpoint has EDM's scaling
              "--optimizer", "adamw",  # tiny_edm_checkpoint takes the CPU default, Muon
              "--base-channels", "8", "--num-samples", "4", "--save-npz", str(out / "samples.npz")])
    return out


@pytest.fixture(scope="session")
def tiny_edm_checkpoint(tiny_mnist, tmp_path_factory):
    """A checkpoint with src.py's CPU default, EDM's scaling, from one quick epoch: the path every chapter must take."""
    import src
    out = tmp_path_factory.mktemp("src_edm_run")
    src.main(["--data-root", tiny_mnist, "--out-dir", str(out), "--epochs", "1", "--batch-size", "64",
              "--base-channels", "8", "--num-samples", "1"])
    return out


def pytest_collection_modifyitems(items):
    """The tests on real MNIST train for a minute or more: start them first, so that with `-n 2` (pytest.ini) the
    other process works through the quick tests meanwhile instead of waiting for them at the end."""
    items.sort(key=lambda item: needs_real_mnist.mark not in list(item.iter_markers("skipif")))
