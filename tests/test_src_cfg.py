"""Chapter 2 (src_cfg.py): the guidance gradient points the right way, scale 0 is unguided, bad input."""
from functools import partial

import numpy as np
import pytest
import torch
from conftest import refused_flag, one_line_error

import sample_ddim
import src_cfg

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def guided_setup(tiny_checkpoint, tiny_mnist, tmp_path_factory):
    path = str(tiny_checkpoint / "diffusion_model_final.pt")
    ckpt = src_cfg.load_checkpoint(path, CPU)
    model = src_cfg.model_from_checkpoint(ckpt, path).eval()
    sched = src_cfg.ddpm_schedule(**ckpt["config"]["schedule"])
    out = tmp_path_factory.mktemp("guided")  # its own folder: the shared checkpoint's folder stays as src.py left it
    args = src_cfg.parse_args(["--data-root", tiny_mnist, "--out-dir", str(out), "--classifier-epochs", "15",
                               "--retrain-classifier"])  # its own tiny classifier, not the shipped one
    torch.manual_seed(0)
    classifier = src_cfg.get_classifier(args, ckpt["config"]["schedule"], sched, CPU, False)  # trains and caches
    return model, classifier, sched, out / src_cfg.CLASSIFIER_NAME


def test_classifier_takes_a_batch_of_noisy_images_and_their_timesteps(guided_setup):
    _, classifier, _, _ = guided_setup
    x = torch.randn(4, 1, 28, 28)
    logits = classifier(x, torch.tensor([0, 10, 500, 999]))
    assert logits.shape == (4, 10)
    assert not torch.allclose(classifier(x, torch.full((4,), 0)), classifier(x, torch.full((4,), 999)))


def test_the_gradient_raises_log_p_of_the_target_digit(guided_setup):
    _, classifier, sched, _ = guided_setup
    torch.manual_seed(1)
    t = torch.full((20,), 300)
    x0 = torch.rand(20, 1, 28, 28) * 2 - 1
    x_t = src_cfg.q_sample(x0, t, torch.randn_like(x0), sched)
    y = torch.arange(20) % 10

    def log_p(x):
        return torch.log_softmax(classifier(x, t), 1)[torch.arange(20), y]
    grad = src_cfg.classifier_log_prob_grad(classifier, x_t, t, y)
    assert torch.all(log_p(x_t + 0.01 * grad) > log_p(x_t))


def test_one_guided_step_moves_towards_the_target_digit(guided_setup):
    """A guided DDIM step from t=300 lands where the classifier is more sure of y than the unguided step."""
    model, classifier, sched, _ = guided_setup
    torch.manual_seed(2)
    t, t_prev = 300, 250
    x_t = src_cfg.q_sample(torch.rand(20, 1, 28, 28) * 2 - 1, torch.full((20,), t), torch.randn(20, 1, 28, 28), sched)
    y = torch.arange(20) % 10
    t_batch = torch.full((20,), t)
    with torch.no_grad():
        eps = model(x_t, t_batch)
    grad = src_cfg.classifier_log_prob_grad(classifier, x_t, t_batch, y)
    a, a_prev = sched["alpha_bar"][t], sched["alpha_bar"][t_prev]
    unguided = src_cfg.ddim_step(x_t, eps, a, a_prev, 0.0, 0.0)
    guided = src_cfg.ddim_step(x_t, eps - 3.0 * (1 - a).sqrt() * grad, a, a_prev, 0.0, 0.0)
    log_p = lambda x: torch.log_softmax(classifier(x, torch.full((20,), t_prev)), 1)[torch.arange(20), y]  # noqa
    assert log_p(guided).mean() > log_p(unguided).mean()


def test_scale_0_is_exactly_unguided_sampling(guided_setup):
    """With each sampler: DDIM, and the default DPM-Solver++(2M) SDE (the same fresh noise on both sides)."""
    model, classifier, sched, _ = guided_setup
    x_T, y = torch.randn(4, 1, 28, 28), torch.tensor([1, 2, 3, 4])
    guided = src_cfg.sample_guided(model, classifier, sched, x_T, y, 0.0, 10, "ddim", progress=False)
    plain = sample_ddim.sample_ddim(model, sched, x_T, 10, progress=False)
    assert torch.equal(guided, plain)
    nudged = src_cfg.sample_guided(model, classifier, sched, x_T, y, 3.0, 10, "ddim", progress=False)
    assert not torch.allclose(nudged, plain)
    guided = src_cfg.sample_guided(model, classifier, sched, x_T, y, 0.0, 10, "dpmpp-2m-sde",
                                   generator=torch.Generator().manual_seed(0), progress=False)
    plain = sample_ddim.sample_dpmpp(model, sched, x_T, 10, stochastic=True, generator=torch.Generator().manual_seed(0),
                                     progress=False)
    assert torch.equal(guided, plain)


def test_without_a_classifier_of_your_own_the_shipped_one_is_loaded(tmp_path, capsys):
    args = src_cfg.parse_args(["--out-dir", str(tmp_path)])
    schedule = {"T": 1000, "kind": "cosine"}  # the shipped model's, which the shipped classifier was trained on
    src_cfg.get_classifier(args, schedule, src_cfg.ddpm_schedule(**schedule), CPU, False)
    assert "loaded the noisy classifier from" in capsys.readouterr().out
    assert not (tmp_path / src_cfg.CLASSIFIER_NAME).exists()  # nothing trained, nothing written


def test_cli_end_to_end(guided_setup, tiny_checkpoint, tiny_mnist, tmp_path, capsys):
    import shutil
    shutil.copy(guided_setup[3], tmp_path)  # the cache from the fixture is reused
    src_cfg.main(["--checkpoint", str(tiny_checkpoint / "diffusion_model_final.pt"), "--digits", "0", "7",
                  "--scales", "0", "3", "--num-samples", "2", "--steps", "5", "--data-root", tiny_mnist,
                  "--out-dir", str(tmp_path), "--save-npz", str(tmp_path / "g.npz")])
    out = capsys.readouterr().out
    assert "loaded the noisy classifier" in out and "t=999" in out
    for name in ["classifier_guidance_scale_3_results/samples_class_7.png", "classifier_guidance_scale_0.png",
                 "classifier_guidance_scale_3.png", "classifier_guidance_same_noise.png"]:
        assert (tmp_path / name).is_file(), name
    npz = np.load(tmp_path / "g_scale3.npz")
    assert npz["images"].shape == (4, 28, 28) and npz["labels"].tolist() == [0, 0, 7, 7]
    assert npz["guidance"] == "classifier" and npz["strength"] == 3 and npz["seconds"] > 0  # for --tradeoff


def test_a_corrupt_classifier_cache_is_retrained(tiny_checkpoint, tiny_mnist, tmp_path, capsys):
    (tmp_path / "noisy_classifier.pt").write_bytes(b"garbage")
    src_cfg.main(["--checkpoint", str(tiny_checkpoint / "diffusion_model_final.pt"), "--digits", "3",
                  "--scales", "1", "--num-samples", "1", "--steps", "2", "--classifier-epochs", "1",
                  "--data-root", tiny_mnist, "--out-dir", str(tmp_path)])
    assert "training it again" in capsys.readouterr().out
    assert torch.load(tmp_path / "noisy_classifier.pt", weights_only=True)["kind"] == "noisy_classifier"


bad = partial(one_line_error, src_cfg.main)


def test_bad_input(tmp_path, capsys):
    assert "--digits: must be a digit 0-9, got 10" in refused_flag(src_cfg.main, ["--digits", "10"], capsys)
    assert "--scales: must be a number >= 0, got -1" in refused_flag(src_cfg.main, ["--scales", "-1"], capsys)
    assert "run `python src.py` first" in bad(["--checkpoint", str(tmp_path / "missing.pt")])
