"""Chapter 3's higher-order solvers on a problem with a closed-form answer, and against the samplers they generalise.

Toy data: x_0 ~ N(μ, s²) in every coordinate. Then x_t = √ᾱ x_0 + √(1-ᾱ) ε is Gaussian too, the exact noise
predictor is known, ε*(x_t) = √(1-ᾱ) (x_t - √ᾱ μ) / (ᾱ s² + 1 - ᾱ), and the probability-flow ODE keeps the
standardised coordinate (x_t - √ᾱ μ) / √(ᾱ s² + 1 - ᾱ) constant: its exact solution is a formula.
"""
from functools import partial

import pytest
import torch
from conftest import one_line_error, refused_flag

import sample_ddim
import src

MU, S = 0.3, 0.5
SCHED = sample_ddim.ddpm_schedule(**src.SCHEDULE)


class ExactNoisePredictor(torch.nn.Module):
    """ε*(x_t, t) for the Gaussian toy data, in the UNet's calling convention."""

    def forward(self, x, t):
        alpha_bar = SCHED["alpha_bar"][t].view(-1, 1)
        return (1 - alpha_bar).sqrt() * (x - alpha_bar.sqrt() * MU) / (alpha_bar * S ** 2 + 1 - alpha_bar)


MODEL = ExactNoisePredictor()


def standardised(x, alpha_bar):
    return (x - alpha_bar.sqrt() * MU) / (alpha_bar * S ** 2 + 1 - alpha_bar).sqrt()


def ode_solution_at(x_T, alpha_bar):
    """The exact probability-flow ODE solution from x_T (at t = 999) to the noise level ᾱ."""
    z = standardised(x_T, SCHED["alpha_bar"][-1])
    return alpha_bar.sqrt() * MU + (alpha_bar * S ** 2 + 1 - alpha_bar).sqrt() * z


def dpmpp(x_T, steps, stochastic=False, generator=None, spacing="uniform"):
    return sample_ddim.sample_dpmpp(MODEL, SCHED, x_T, steps, stochastic, spacing, generator=generator, progress=False)


def ddim(x_T, steps, eta=0.0, generator=None, spacing="uniform"):
    return sample_ddim.sample_ddim(MODEL, SCHED, x_T, steps, eta, spacing, generator=generator, progress=False)


@pytest.fixture(scope="module")
def x_T():
    return torch.randn(2000, 4, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("steps,tolerance", [(20, 0.06), (50, 0.008)])
def test_dpmpp_2m_lands_on_the_exact_ode_solution(x_T, steps, tolerance):
    """With quadratic spacing (most visits at low noise, where this toy's x_0 prediction bends most)."""
    exact = ode_solution_at(x_T, torch.tensor(1.0))  # x_0 itself: μ + s · (standardised x_T)
    dpm_error = (dpmpp(x_T, steps, spacing="quadratic") - exact).abs().max().item()
    ddim_error = (ddim(x_T, steps, spacing="quadratic") - exact).abs().max().item()
    assert dpm_error < tolerance
    assert dpm_error < ddim_error / 3  # the same ODE, the same calls: a much smaller error than first order


@pytest.mark.parametrize("spacing", ["uniform", "quadratic"])
def test_dpmpp_2m_converges_at_second_order(x_T, spacing):
    """Halving the step size divides the error by ~4 (DDIM, first order: by ~2). Every path ends with the same
    first-order jump from t = 0 to x_0, so the reference is that jump applied to the exact solution at t = 0."""
    alpha_bar_0 = SCHED["alpha_bar"][0]
    at_t0 = ode_solution_at(x_T, alpha_bar_0)
    eps = MODEL(at_t0, torch.zeros(len(x_T), dtype=torch.long))
    reference = (at_t0 - (1 - alpha_bar_0).sqrt() * eps) / alpha_bar_0.sqrt()

    def error_ratio(sampler, steps):
        coarse, fine = ((sampler(x_T, k, spacing=spacing) - reference).abs().max().item() for k in (steps, 2 * steps))
        return coarse / fine

    assert 3.5 < error_ratio(dpmpp, 80) < 4.6
    assert 1.8 < error_ratio(ddim, 80) < 2.2


def test_dpmpp_2m_sde_samples_have_the_data_mean_and_variance():
    """In distribution, not path by path: each sample gets its own fresh noise. (With few, coarse steps the
    variance comes out too large - the second-order term extrapolates the noise too - so: 100 quadratic steps.)"""
    n = 200_000
    x_T = torch.randn(n, 1, generator=torch.Generator().manual_seed(1))
    samples = dpmpp(x_T, 100, stochastic=True, generator=torch.Generator().manual_seed(2), spacing="quadratic")
    # standard errors: s/√n for the mean, s²·√(2/n) for the variance; 5 of them is a tolerance, not luck
    assert samples.mean().item() == pytest.approx(MU, abs=5 * S / n ** 0.5)
    assert samples.var().item() == pytest.approx(S ** 2, abs=5 * S ** 2 * (2 / n) ** 0.5)


def test_restart_samples_have_the_data_mean_and_variance_in_exactly_the_calls_asked_for():
    """The jump back up is the forward process itself, so from correct digits at t_min it gives correct x at t_max:
    Restart must not bias the distribution. And --steps K means K calls, the stretch walked twice included."""
    n, calls = 200_000, []

    def counting_model(x, t):
        calls.append(int(t[0]))
        return MODEL(x, t)

    x_T = torch.randn(n, 1, generator=torch.Generator().manual_seed(1))
    samples = sample_ddim.sample_restart(counting_model, SCHED, x_T, 100, "quadratic",
                                         generator=torch.Generator().manual_seed(2), progress=False)
    assert len(calls) == 100
    went_back_up = [i for i in range(1, len(calls)) if calls[i] > calls[i - 1]]
    assert len(went_back_up) == 1
    jump = went_back_up[0]  # up from below the last visit above t_min to t_max, then 20 calls, then on from t_min
    assert calls[jump] == sample_ddim.RESTART["t_max"]
    assert calls[jump - 1] > sample_ddim.RESTART["t_min"] >= calls[jump + 20]
    assert samples.mean().item() == pytest.approx(MU, abs=5 * S / n ** 0.5)
    assert samples.var().item() == pytest.approx(S ** 2, abs=5 * S ** 2 * (2 / n) ** 0.5)


def test_with_all_1000_steps_dpmpp_2m_follows_the_ddim_eta_0_path(x_T):
    """The same path; what is left between them is DDIM's own first-order error at 1000 steps (~0.006 here)."""
    assert torch.allclose(dpmpp(x_T, 1000), ddim(x_T, 1000), atol=1e-2)


def test_with_all_1000_steps_dpmpp_2m_sde_is_ancestral_sampling(x_T):
    """In distribution: the same mean and variance. And with the same fresh noise at every step, the second-order
    term only nudges DDPM's ancestral path (mean change 0.008 on values of size ~0.5)."""
    sde = dpmpp(x_T, 1000, stochastic=True, generator=torch.Generator().manual_seed(3))
    ancestral = ddim(x_T, 1000, eta=1.0, generator=torch.Generator().manual_seed(3))
    assert sde.mean().item() == pytest.approx(ancestral.mean().item(), abs=0.005)
    assert sde.var().item() == pytest.approx(ancestral.var().item(), abs=0.01)
    assert (sde - ancestral).abs().mean().item() < 0.02


def test_the_first_order_step_is_ddim(x_T):
    """Without a previous prediction the DPM-Solver++ update is DDIM's: η=0 for the ODE, η=1 for the SDE."""
    t, t_next = 600, 550
    ab, ab_next = SCHED["alpha_bar"][t], SCHED["alpha_bar"][t_next]
    eps = MODEL(x_T, torch.full((len(x_T),), t))
    pred_x0 = (x_T - (1 - ab).sqrt() * eps) / ab.sqrt()
    z = torch.randn_like(x_T)
    ode, _ = sample_ddim.dpmpp_2m_step(x_T, pred_x0, None, None, ab, ab_next)
    sde, _ = sample_ddim.dpmpp_2m_step(x_T, pred_x0, None, None, ab, ab_next, z)
    assert torch.allclose(ode, sample_ddim.ddim_step(x_T, eps, ab, ab_next, 0.0, 0.0), atol=1e-5)
    assert torch.allclose(sde, sample_ddim.ddim_step(x_T, eps, ab, ab_next, 1.0, z), atol=1e-5)


bad = partial(one_line_error, sample_ddim.main)


@pytest.mark.parametrize("sampler", sample_ddim.SAMPLERS)
def test_bad_steps_with_each_sampler(sampler, tiny_checkpoint, capsys):
    ckpt = str(tiny_checkpoint / "diffusion_model_final.pt")
    steps_zero = ["--checkpoint", ckpt, "--sampler", sampler, "--steps", "0"]
    assert "--steps: must be > 0, got 0" in refused_flag(sample_ddim.main, steps_zero, capsys)
    assert "at most the 1000 timesteps" in bad(["--checkpoint", ckpt, "--sampler", sampler, "--steps", "1001"])


def test_restart_needs_five_calls(tiny_checkpoint):
    ckpt = str(tiny_checkpoint / "diffusion_model_final.pt")
    assert "needs --steps >= 5" in bad(["--checkpoint", ckpt, "--sampler", "restart", "--steps", "4", "20"])


def test_unknown_sampler_is_refused(capsys):
    assert "invalid choice: 'foo'" in refused_flag(sample_ddim.main, ["--sampler", "foo"], capsys)
