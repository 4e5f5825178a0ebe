"""Every sampler of every chapter, at every legal call count and spacing, on both schedules, lands on finite digits.

The model here is the exact noise predictor for data that is one fixed image x0: ε*(x_t, t) = (x_t - √ᾱ_t x0)/√(1-ᾱ_t).
Its x_0 guess is x0 at every step, so every sampler must return x0 itself - unless a step divides by zero (two visits
on one noise level: the cosine schedule's ᾱ is floored, so t = 995..999 are one level) or is otherwise wrong."""
from types import SimpleNamespace

import pytest
import torch

import sample_ddim
import src_cfg
import src_classifier_free
import train_progressive

STEPS = [1, 2, 3, 5, 10, 20, 50, 100, 223, 224, 280, 445, 500, 999, 1000]
SCHEDULES = {"linear": {"T": 1000}, "cosine": {"T": 1000, "kind": "cosine"}}
X0 = torch.linspace(-0.9, 0.9, 16).view(1, 1, 4, 4).repeat(2, 1, 1, 1)  # a small "digit" in [-1, 1]; two of them


def exact_eps(sched):
    def model(x, t, y=None):  # y: the class-conditional chapter's label (this data has one class)
        alpha_bar = sched["alpha_bar"][t].view(-1, 1, 1, 1)
        return (x - alpha_bar.sqrt() * X0.repeat(len(x) // len(X0), 1, 1, 1)) / (1 - alpha_bar).sqrt()
    return model


def assert_lands_on_x0(x, what, tolerance=1e-3):
    assert torch.isfinite(x).all(), f"{what}: non-finite digits"
    assert (x - X0).abs().max() < tolerance, f"{what}: off by {(x - X0).abs().max():.3g}"


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("spacing", ["uniform", "trailing", "quadratic"])
@pytest.mark.parametrize("sampler", ["ddim", "ddim-eta1", "dpmpp-2m", "dpmpp-2m-sde", "restart"])
def test_chapter_3_samplers_at_every_step_count(schedule, spacing, sampler):
    sched = sample_ddim.ddpm_schedule(**SCHEDULES[schedule])
    args = SimpleNamespace(eta=1.0 if sampler == "ddim-eta1" else 0.0, spacing=spacing)
    for steps in STEPS:
        if sampler == "restart" and steps < 5:  # refused by the CLI: a fifth of the calls walk the stretch again
            continue
        x_T = torch.randn(X0.shape, generator=torch.Generator().manual_seed(steps))
        x = sample_ddim.run_sampler(sampler.removesuffix("-eta1"), exact_eps(sched), sched, x_T, steps, args, False,
                                    torch.Generator().manual_seed(0))
        assert_lands_on_x0(x, f"{sampler} {spacing} {schedule} --steps {steps}")


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmpp-2m", "dpmpp-2m-sde", "restart"])
def test_guided_chapters_samplers_at_every_step_count(schedule, sampler):
    sched = sample_ddim.ddpm_schedule(**SCHEDULES[schedule])
    model, y = exact_eps(sched), torch.tensor([3, 7])
    for steps in STEPS if sampler != "ddpm" else [1000]:
        if sampler == "restart" and steps < 5:  # refused by the CLI, as in chapter 3
            continue
        x_T = torch.randn(X0.shape, generator=torch.Generator().manual_seed(steps))
        # scale 0 / weight 1: the exact model's own prediction, so both chapters' step code must land on x0
        cg = src_cfg.sample_guided(model, None, sched, x_T, y, 0.0, steps, sampler, progress=False,
                                   generator=torch.Generator().manual_seed(0))
        assert_lands_on_x0(cg, f"src_cfg {sampler} {schedule} --steps {steps}")
        cf = src_classifier_free.sample_guided(model, sched, x_T, y, 1.0, steps, sampler, progress=False,
                                               generator=torch.Generator().manual_seed(0))
        assert_lands_on_x0(cf, f"src_classifier_free {sampler} {schedule} --steps {steps}")


@pytest.mark.parametrize("steps", [5, 20, 50])
def test_the_guided_chapters_restart_is_chapter_3s(steps):
    """Unguided (scale 0, weight 1), the guided chapters' restart walks chapter 3's path with the same random numbers,
    on a model that is not exact (so a wrong visit, jump or noise draw would change the digits)."""
    sched = sample_ddim.ddpm_schedule(T=1000, kind="cosine")

    def model(x, t, y=None):
        return 0.3 * x + 0.1 * torch.sin(t.float().view(-1, 1, 1, 1) / 100)
    x_T, y = torch.randn(X0.shape, generator=torch.Generator().manual_seed(1)), torch.tensor([3, 7])
    reference = sample_ddim.sample_restart(model, sched, x_T, steps, generator=torch.Generator().manual_seed(0),
                                           progress=False)
    cg = src_cfg.sample_guided(model, None, sched, x_T, y, 0.0, steps, "restart", progress=False,
                               generator=torch.Generator().manual_seed(0))
    cf = src_classifier_free.sample_guided(model, sched, x_T, y, 1.0, steps, "restart", progress=False,
                                           generator=torch.Generator().manual_seed(0))
    assert torch.equal(cg, reference) and torch.allclose(cf, reference, atol=1e-5)
    no_restart = src_cfg.sample_guided(model, None, sched, x_T, y, 0.0, steps, "dpmpp-2m-sde", progress=False,
                                       generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(no_restart, reference, atol=1e-3)  # restart's extra walk does change the digits


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("teacher_steps", [2 ** k for k in range(1, 10)])  # 2 ... 512, the powers of two <= T
def test_progressive_targets_at_every_teacher_step_count(schedule, teacher_steps):
    """With the exact teacher, one student step must aim at x0 itself, at every stage's every step. (In float32 the
    target's division by α'' - (σ''/σ)α, tiny where two close steps are noisy, magnifies rounding to ~1e-3.)"""
    sched = train_progressive.ddpm_schedule(**SCHEDULES[schedule])
    timesteps = train_progressive.ddim_timesteps(teacher_steps, sched["alpha_bar"])
    assert all(a > b for a, b in zip(sched["alpha_bar"][timesteps][1:], sched["alpha_bar"][timesteps]))
    t_seq = torch.tensor(timesteps)
    abar_seq = torch.cat([sched["alpha_bar"][t_seq], torch.ones(1)])
    for j in range(0, len(timesteps) - 1, 2):
        x_t = train_progressive.q_sample(X0, t_seq[[j, j]], torch.randn(X0.shape), sched)
        target = train_progressive.progressive_target(exact_eps(sched), "epsilon", x_t, t_seq, abar_seq,
                                                      torch.tensor([j, j]))
        assert_lands_on_x0(target, f"progressive {schedule} --teacher-steps {teacher_steps}, step {j}", 1e-2)
