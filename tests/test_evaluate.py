"""evaluate.py: FID behaves like a distance, accuracy is right on real digits, bad input gets one line."""
import json
import os
from functools import partial

import numpy as np
import pytest
import torch
from conftest import REAL_MNIST, needs_real_mnist, one_line_error, synthetic_digits

import evaluate

CPU = torch.device("cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_classifier(tiny_mnist, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    args = evaluate.parse_args(["x.npz", "--data-root", tiny_mnist, "--out-dir", str(out), "--classifier-epochs", "2",
                                "--retrain"])
    networks = evaluate.load_networks(args, CPU)  # trains both (tiny budget, not the shipped ones) and caches them
    return *networks["cnn"], out, networks


def fid_of(model, ckpt, images):
    return evaluate.score({"cnn": (model, ckpt)}, torch.from_numpy(images), None, CPU)["fid"]


def test_without_a_cache_the_shipped_networks_score_and_their_test_statistics_are_cached(tiny_mnist, tmp_path,
                                                                                        capsys):
    args = evaluate.parse_args(["x.npz", "--data-root", tiny_mnist, "--out-dir", str(tmp_path)])
    model, ckpt = evaluate.load_network("cnn", args, CPU)
    assert "the shipped weights/mnist_classifier.pt" in capsys.readouterr().err
    shipped = torch.load(os.path.join(ROOT, "weights", "mnist_classifier.pt"), weights_only=True)
    assert all(torch.equal(shipped["model"][k], v) for k, v in model.state_dict().items())
    assert ckpt["test_features"].shape[0] == len(evaluate.load_mnist(tiny_mnist, train=False)[0])
    assert (tmp_path / "mnist_classifier.pt").is_file()  # cached: the next run reads it


def test_fid_of_a_set_against_itself_is_zero(tiny_classifier):
    model, ckpt, _, _ = tiny_classifier
    images, _ = synthetic_digits(500, seed=5)
    _, feats = evaluate.classify(model, torch.from_numpy(images), CPU)
    mu, sigma = evaluate.feature_stats(feats)
    assert evaluate.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-6)
    own = dict(ckpt, test_mu=mu, test_sigma=sigma)
    assert fid_of(model, own, images) == pytest.approx(0, abs=1e-6)


def test_frechet_distance_of_known_gaussians():
    """1-d check of the formula: (μ1-μ2)² + σ1² + σ2² - 2σ1σ2 = (μ1-μ2)² + (σ1-σ2)²."""
    d = evaluate.frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[9.0]]))
    assert d == pytest.approx(4 + 1)


def test_fid_grows_as_images_get_noisier_and_blurrier(tiny_classifier):
    model, ckpt, _, _ = tiny_classifier
    images, _ = synthetic_digits(500, seed=6)
    _, feats = evaluate.classify(model, torch.from_numpy(images), CPU)
    mu, sigma = evaluate.feature_stats(feats)
    ref = dict(ckpt, test_mu=mu, test_sigma=sigma)
    rng = np.random.default_rng(0)
    noisy = [np.clip(images + rng.normal(0, s, images.shape), 0, 255).astype(np.uint8) for s in (0, 30, 60, 120)]
    fids = [fid_of(model, ref, x) for x in noisy]
    assert fids == sorted(fids) and fids[-1] > fids[1] > 0
    blurred = torch.nn.functional.avg_pool2d(torch.from_numpy(images).float()[:, None], 3, 1, 1)
    blurred = blurred[:, 0].round().to(torch.uint8).numpy()
    assert fid_of(model, ref, blurred) > fids[0]


def test_precision_and_recall_separate_fidelity_from_diversity():
    """A set against itself: both 1. Drop half the digits: recall falls, precision stays. Add noise: precision falls
    (and recall rises: the noisy set's wide balls now cover the real digits)."""
    rng = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 4, generator=rng) * 4  # ten "digits" in a 4-d feature space, well apart
    labels = torch.arange(3000) % 10
    real = centres[labels] + torch.randn(3000, 4, generator=rng)
    fake = centres[labels] + torch.randn(3000, 4, generator=rng)
    assert evaluate.precision_recall(real, real) == (1.0, 1.0)
    precision, recall = evaluate.precision_recall(real, fake)
    assert precision > 0.9 and recall > 0.9
    precision_half, recall_half = evaluate.precision_recall(real, fake[labels < 5])
    assert precision_half > 0.9 and recall_half < 0.6
    precision_noisy, _ = evaluate.precision_recall(real, fake + 2 * torch.randn(fake.shape, generator=rng))
    assert precision_noisy < 0.6


def test_n_scores_a_random_subset_not_the_first_digits(tmp_path):
    """Guided files are sorted by digit: the first N would all be zeros."""
    labels = np.repeat(np.arange(10), 20)
    np.savez(tmp_path / "sorted.npz", images=np.zeros((200, 28, 28), np.uint8), labels=labels)
    _, subset, _ = evaluate.load_samples(str(tmp_path / "sorted.npz"), n=50, seed=0)
    assert len(subset) == 50 and len(subset.unique()) >= 8


def test_the_second_network_is_another_architecture(tiny_classifier):
    _, _, _, networks = tiny_classifier
    cnn, mlp = networks["cnn"][0], networks["mlp"][0]
    assert any(isinstance(m, torch.nn.Conv2d) for m in cnn.modules())
    assert not any(isinstance(m, torch.nn.Conv2d) for m in mlp.modules())
    assert networks["mlp"][1]["test_features"].shape == (100, 128)


def test_labelled_npz_and_png_folder(tiny_classifier, tiny_mnist, tmp_path, capsys):
    _, _, out, _ = tiny_classifier
    images, labels = synthetic_digits(40, seed=7)
    np.savez(tmp_path / "s.npz", images=images, labels=labels)
    evaluate.main([str(tmp_path / "s.npz"), "--data-root", tiny_mnist, "--out-dir", str(out), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 40 and sum(result["class_histogram"]) == 40 and "accuracy_per_digit" in result
    assert "fid_floor_real_train" in result and "fid_mlp_floor_real_train" in result
    assert result["fid_mlp"] > 0 and 0 <= result["precision"] <= 1 and 0 <= result["recall"] <= 1
    from PIL import Image
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, img in enumerate(images[:12]):
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    evaluate.main([str(folder), "--data-root", tiny_mnist, "--out-dir", str(out)])
    text = capsys.readouterr().out
    assert "N = 12" in text and "FID" in text and "class histogram" in text


def test_tradeoff_plots_each_guidance_method_through_its_strengths(tiny_classifier, tiny_mnist, tmp_path, capsys):
    """Several guided sets -> one report each, a markdown row each (sorted by strength) and the plot."""
    model, _, out, _ = tiny_classifier
    images, _ = synthetic_digits(40, seed=8)
    judged = evaluate.classify(model, torch.from_numpy(images), CPU)[0].argmax(1).numpy()
    files = []
    for method, strength, wrong in [("classifier", 8.0, 0), ("classifier", 0.0, 20), ("classifier-free", 2.0, 4)]:
        asked = judged.copy()  # every digit asked for is the one the classifier sees ...
        asked[:wrong] = (asked[:wrong] + 1) % 10  # ... but for the first `wrong` of them
        files.append(str(tmp_path / f"{method}_{strength:g}.npz"))
        np.savez(files[-1], images=images, labels=asked, guidance=method, strength=strength, seconds=2.0)
    evaluate.main(files + ["--data-root", tiny_mnist, "--out-dir", str(out), "--tradeoff",
                           str(tmp_path / "plot" / "tradeoff.png")])
    text = capsys.readouterr().out
    assert text.count("FID (MNIST-classifier features") == 3 and (tmp_path / "plot" / "tradeoff.png").is_file()
    rows = [line for line in text.splitlines() if line.startswith("| classifier")]
    assert [row.split(" | ")[1] for row in rows] == ["0", "8", "2"]  # per method, by strength
    accuracy = {row.split(" | ")[1]: row.split(" | ")[4] for row in rows}
    assert accuracy == {"0": "50.0%", "2": "90.0%", "8": "100.0%"}  # 20, 4 and 0 of 40 asked for another digit
    assert all(row.split(" | ")[-1] == "0.0500 |" for row in rows)  # 2 s for 40 images


bad = partial(one_line_error, evaluate.main)


def test_bad_input(tmp_path):
    np.savez(tmp_path / "shape.npz", images=np.zeros((4, 32, 32), np.uint8))
    assert "28 x 28" in bad([str(tmp_path / "shape.npz")])
    np.savez(tmp_path / "dtype.npz", images=np.zeros((4, 28, 28), np.float32))
    assert "uint8" in bad([str(tmp_path / "dtype.npz")])
    np.savez(tmp_path / "empty.npz", images=np.zeros((0, 28, 28), np.uint8))
    assert "no images" in bad([str(tmp_path / "empty.npz")])
    np.savez(tmp_path / "few.npz", images=np.zeros((4, 28, 28), np.uint8))
    assert "fewer than --n 10" in bad([str(tmp_path / "few.npz"), "--n", "10"])
    np.savez(tmp_path / "nokey.npz", pictures=np.zeros((4, 28, 28), np.uint8))
    assert "no `images`" in bad([str(tmp_path / "nokey.npz")])
    np.savez(tmp_path / "labels.npz", images=np.zeros((4, 28, 28), np.uint8), labels=np.array([1, 2, 3, 11]))
    assert "`labels`" in bad([str(tmp_path / "labels.npz")])
    (tmp_path / "junk.npz").write_bytes(b"junk")
    assert "not a readable .npz" in bad([str(tmp_path / "junk.npz")])
    assert "no such file" in bad([str(tmp_path / "missing.npz")])
    assert "no .png" in bad([str(tmp_path)])
    np.savez(tmp_path / "plain.npz", images=np.zeros((4, 28, 28), np.uint8), labels=np.array([1, 2, 3, 4]))
    assert "--tradeoff takes" in bad([str(tmp_path / "plain.npz"), "--tradeoff", str(tmp_path / "t.png")])


def test_benchmark_times_the_samplers_that_exist(tiny_checkpoint, capsys):
    evaluate.main(["--benchmark", "--out-dir", str(tiny_checkpoint), "--repeats", "1", "--batch-size", "2"])
    table = capsys.readouterr().out
    assert "| DDPM ancestral, 1000 steps (src.py) |" in table and "1.0x" in table and "torch" in table
    assert "| DPM-Solver++(2M) SDE 20 steps (sample_ddim.py) |" in table
    assert "run `python train_dmd.py` to time it" in table  # no chapter files here: a note for each


def test_benchmark_without_checkpoint_says_which_script(tmp_path):
    assert "run `python src.py` first" in bad(["--benchmark", "--out-dir", str(tmp_path)])


@needs_real_mnist
def test_reference_classifier_reads_real_digits(tmp_path_factory):
    """On real MNIST, after one epoch (the default trains three): >= 98% test accuracy (evaluate.py's own bar), >= 97%
    through the accuracy path on 1000 labelled test digits, and real digits score far better than blurred ones."""
    out = tmp_path_factory.mktemp("real_eval")
    args = evaluate.parse_args(["x", "--data-root", REAL_MNIST, "--out-dir", str(out), "--classifier-epochs", "1"])
    model, ckpt = evaluate.load_network("cnn", args, CPU)
    assert ckpt["test_accuracy"] >= 0.98
    images, labels = evaluate.load_mnist(REAL_MNIST, train=False)
    result = evaluate.score({"cnn": (model, ckpt)}, images[:1000], labels[:1000], CPU, data_root=REAL_MNIST)
    assert result["accuracy"] >= 0.97
    assert result["fid"] < result["fid_blurred_real_train"] / 5
