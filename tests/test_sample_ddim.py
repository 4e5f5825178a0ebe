"""Chapter 3 (sample_ddim.py): the DDIM update against DDPM, determinism, inversion, timesteps, bad input."""
import os
from functools import partial

import numpy as np
import pytest
import torch
from conftest import refused_flag, one_line_error, synthetic_digits

import sample_ddim
import src

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint):
    path = str(tiny_checkpoint / "diffusion_model_final.pt")
    ckpt = sample_ddim.load_checkpoint(path, CPU)  # a checkpoint from src.py loads here
    model = sample_ddim.model_from_checkpoint(ckpt, path).eval()
    return model, sample_ddim.ddpm_schedule(**ckpt["config"]["schedule"])


@pytest.mark.parametrize("t", [999, 500, 1])
def test_eta_1_on_all_steps_is_src_ddpm_ancestral_step(tiny_model, t):
    """σ_t(η=1) = √β̃_t and the DDIM mean equals src.py's posterior mean: DDPM is DDIM with η=1."""
    model, s = tiny_model
    torch.manual_seed(0)
    x, z = torch.randn(4, 1, 28, 28), torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        eps = model(x, torch.full((4,), t))
    ddim = sample_ddim.ddim_step(x, eps, s["alpha_bar"][t], s["alpha_bar"][t - 1], 1.0, z)
    mean = (x - s["beta"][t] / (1 - s["alpha_bar"][t]).sqrt() * eps) / s["alpha"][t].sqrt()  # src.py, Algorithm 2
    ddpm = mean + s["posterior_var"][t].sqrt() * z
    assert torch.allclose(ddim, ddpm, atol=1e-4)


def test_eta_1_with_all_steps_reproduces_src_sample_ddpm(tiny_model):
    """On a schedule without repeated levels, draw for draw. (On the cosine one DDIM skips the no-op visits of
    t = 995..998, so it takes fewer random draws than src.py's Algorithm 2: the same distribution, other draws.)"""
    model, _ = tiny_model
    s = sample_ddim.ddpm_schedule(T=1000)
    g = torch.Generator().manual_seed(3)
    ddpm, _ = src.sample_ddpm(model, s, 2, CPU, generator=g, progress=False)
    g = torch.Generator().manual_seed(3)
    x_T = torch.randn(2, 1, 28, 28, generator=g)
    ddim = sample_ddim.sample_ddim(model, s, x_T, 1000, eta=1.0, generator=g, progress=False)
    assert torch.allclose(ddim, ddpm, rtol=1e-4, atol=1e-3)


def test_src_preview_sampler_is_ddim_eta_1_on_the_same_timesteps(tiny_model):
    """src.py's preview: Algorithm 2 on 50 respaced timesteps. That is exactly DDIM with η=1 and 50 uniform steps."""
    model, s = tiny_model
    g = torch.Generator().manual_seed(4)
    preview, _ = src.sample_ddpm(model, s, 2, CPU, generator=g, progress=False, steps=50)
    g = torch.Generator().manual_seed(4)
    x_T = torch.randn(2, 1, 28, 28, generator=g)
    ddim = sample_ddim.sample_ddim(model, s, x_T, 50, eta=1.0, generator=g, progress=False)
    assert torch.allclose(preview, ddim, atol=1e-4)


def test_eta_0_is_deterministic(tiny_model):
    model, s = tiny_model
    x_T = torch.randn(3, 1, 28, 28)
    a = sample_ddim.sample_ddim(model, s, x_T, 10, progress=False)
    b = sample_ddim.sample_ddim(model, s, x_T, 10, progress=False, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b)
    c = sample_ddim.sample_ddim(model, s, x_T, 10, eta=1.0, progress=False)
    assert not torch.allclose(a, c)


def test_inversion_encodes_a_digit_to_noise_and_back(tiny_model):
    """Encode real digits to noise with the deterministic ODE, decode them back: a small error. On the linear
    schedule: the cosine one's last steps are big jumps in noise level, where the inversion's approximation
    (ε taken at the next step) is coarse, and its round trip is several times worse (RESULTS.md, chapter 1)."""
    model, s = tiny_model[0], sample_ddim.ddpm_schedule(**src.SCHEDULE)
    x0 = sample_ddim.to_model_range(torch.from_numpy(synthetic_digits(4, seed=3)[0]))
    x_T = sample_ddim.invert_ddim(model, s, x0, 100)
    assert 0.7 < x_T.std().item() < 1.3  # it really went to noise
    recon = sample_ddim.sample_ddim(model, s, x_T, 100, progress=False)
    assert (recon - x0).abs().mean().item() < 0.05


@pytest.mark.parametrize("spacing", ["uniform", "trailing", "quadratic"])
@pytest.mark.parametrize("K", [1, 20, 50, 100, 1000])
def test_timesteps(K, spacing):
    steps = sample_ddim.ddim_timesteps(K, sample_ddim.ddpm_schedule(T=1000)["alpha_bar"], spacing)
    assert len(steps) == len(set(steps)) == K
    assert steps[0] == 999 and steps == sorted(steps, reverse=True) and steps[-1] >= 0
    if spacing == "uniform" and K > 1:
        assert steps[-1] == 0  # (the final step then goes from t=0 to x_0 itself, see the next test)


def test_the_last_step_lands_on_pred_x0(tiny_model):
    """The final update uses ᾱ_prev = 1, so it returns the model's x_0 prediction (no leftover noise)."""
    model, s = tiny_model
    x = torch.randn(2, 1, 28, 28)
    eps = torch.randn_like(x)
    out = sample_ddim.ddim_step(x, eps, s["alpha_bar"][19], torch.tensor(1.0), 0.0, 0.0)
    assert torch.allclose(out, (x - (1 - s["alpha_bar"][19]).sqrt() * eps) / s["alpha_bar"][19].sqrt())


def test_cli_writes_grids_npz_and_timing(tiny_checkpoint, tiny_mnist, tmp_path, capsys):
    sample_ddim.main(["--checkpoint", str(tiny_checkpoint / "diffusion_model_final.pt"), "--steps", "5", "10",
                      "--num-samples", "4", "--out-dir", str(tmp_path), "--data-root", tiny_mnist,
                      "--save-npz", str(tmp_path / "s.npz")])
    out = capsys.readouterr().out
    for name in ["ddim_samples_5_steps.png", "ddim_samples_10_steps.png", "ddpm_samples_1000_steps.png",
                 "ddim_comparison.png", "ddim_inversion.png"]:
        assert (tmp_path / name).is_file(), name
    assert np.load(tmp_path / "s_5steps.npz")["images"].shape == (4, 28, 28)
    assert "speed-up vs DDPM-1000" in out and "DDIM inversion" in out


def test_the_default_run_is_quick_the_reference_row_covers_the_figure_only(tiny_checkpoint, tmp_path, monkeypatch,
                                                                            capsys):
    """1000 calls cost minutes for a whole grid on a CPU: DDPM draws the comparison figure's 10 columns only, and its
    speed-up is not quoted against 64 digits drawn at another batch size. Offline, the inversion figure is skipped."""
    drawn = []
    original = sample_ddim.run_sampler
    monkeypatch.setattr(sample_ddim, "run_sampler", lambda name, model, sched, x, *a: drawn.append((name, len(x)))
                        or original(name, model, sched, x, *a))
    monkeypatch.setattr(sample_ddim, "load_mnist", lambda *a, **k: sample_ddim.fail("MNIST not found (offline)"))
    sample_ddim.main(["--checkpoint", str(tiny_checkpoint / "diffusion_model_final.pt"), "--steps", "3",
                      "--num-samples", "12", "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert drawn == [("ddim", 12), ("ddpm", sample_ddim.COLUMNS)]
    assert "| ddim 3 steps (η=0) | 3 |" in out and out.split("| ddim 3 steps (η=0) | 3 |")[1].split("\n")[0].endswith("| - |")
    assert "skipped the inversion figure: error: MNIST not found (offline)" in out
    assert (tmp_path / "ddim_comparison.png").is_file() and not (tmp_path / "ddim_inversion.png").exists()


def test_gif_shows_every_call_and_stays_small(tiny_checkpoint, tmp_path):
    from PIL import Image
    sample_ddim.main(["--checkpoint", str(tiny_checkpoint / "diffusion_model_final.pt"), "--steps", "6",
                      "--num-samples", "16", "--no-ddpm", "--no-inversion", "--out-dir", str(tmp_path),
                      "--gif", str(tmp_path / "d.gif")])
    gif = Image.open(tmp_path / "d.gif")
    assert gif.n_frames == 7 and gif.size == (2 * 122, 2 * 122)  # the noise, then x after each of the 6 calls
    assert os.path.getsize(tmp_path / "d.gif") < 1e6


@pytest.mark.parametrize("schedule", [{"T": 1000, "kind": "cosine"},  # as `src.py` saves its default
                                      {"T": 1000, "beta_1": 1e-4, "beta_T": 0.02}])  # and `--schedule linear`
def test_a_checkpoint_is_sampled_on_its_own_schedule(schedule, tiny_checkpoint, tmp_path, monkeypatch):
    ckpt = torch.load(tiny_checkpoint / "diffusion_model_final.pt", weights_only=True)
    ckpt["config"]["schedule"] = schedule
    torch.save(ckpt, tmp_path / "ckpt.pt")
    built, original = [], sample_ddim.ddpm_schedule
    monkeypatch.setattr(sample_ddim, "ddpm_schedule", lambda T, **kw: built.append((T, kw)) or original(T, **kw))
    sample_ddim.main(["--checkpoint", str(tmp_path / "ckpt.pt"), "--steps", "5", "--num-samples", "2",
                      "--no-ddpm", "--no-inversion", "--out-dir", str(tmp_path)])
    assert built == [(1000, {k: v for k, v in schedule.items() if k != "T"})]
    assert (tmp_path / "ddim_samples_5_steps.png").is_file()


bad = partial(one_line_error, sample_ddim.main)


def test_bad_input(tiny_checkpoint, tmp_path, capsys):
    ckpt = str(tiny_checkpoint / "diffusion_model_final.pt")
    assert "run `python src.py` first" in bad(["--checkpoint", str(tmp_path / "missing.pt")])
    assert "--eta: must be between 0" in refused_flag(sample_ddim.main, ["--checkpoint", ckpt, "--eta", "-1"], capsys)
    torch.save({"kind": "noisy_classifier", "model": {}}, tmp_path / "other.pt")
    assert "not a ddpm checkpoint from src.py" in bad(["--checkpoint", str(tmp_path / "other.pt")])
