"""Chapter 4c (train_dmd.py): the distribution-matching gradient on toy problems with exact scores, the fake score
learns, the teacher doesn't, end to end with resume and --init, bad input."""
import copy
import math
from functools import partial

import numpy as np
import pytest
import torch
from conftest import one_line_error, refused_flag

import train_dmd as dmd
import train_distilled as td

CPU = torch.device("cpu")
SCHED = dmd.ddpm_schedule(T=1000, kind="linear")


class MixtureDenoiser(torch.nn.Module):
    """The exact ε-predictor E[ε | x_t] for data = Σ_k π_k N(m_k, s² I), each m_k the same in every pixel:
    x_t ~ Σ_k π_k N(a m_k, (a² s² + σ²) I) with a = √ᾱ_t, σ² = 1 - ᾱ_t, so ε = σ (x_t - a m̄(x_t)) / (a² s² + σ²),
    m̄ the responsibility-weighted centre."""

    def __init__(self, centres, s, weights=None):
        super().__init__()
        self.centres, self.s = torch.as_tensor(centres).float().detach(), float(s)
        self.log_pi = torch.zeros(len(self.centres)) if weights is None else torch.as_tensor(weights).log()

    def forward(self, x_t, t):
        alpha_bar = SCHED["alpha_bar"][t].view(-1, 1)
        a, sigma2 = alpha_bar.sqrt(), 1 - alpha_bar
        var = a ** 2 * self.s ** 2 + sigma2
        x = x_t.flatten(1)
        dist2 = ((x[:, None, :] - a[:, :, None] * self.centres[None, :, None]) ** 2).sum(-1)
        resp = torch.softmax(self.log_pi - 0.5 * dist2 / var, dim=1)
        centre = a * (resp * self.centres).sum(1, keepdim=True)
        return (sigma2.sqrt() * (x - centre) / var).view_as(x_t)


class ToyGenerator(torch.nn.Module):
    """G(z) = b + w z + c tanh(4u), u = a standard normal number made from z: c lets it put samples in two modes."""

    def __init__(self, b, w, c=0.0):
        super().__init__()
        self.p = torch.nn.Parameter(torch.tensor([b, w, c]))

    def centre(self, u):
        return self.p[0] + self.p[2] * torch.tanh(4 * u)

    def forward(self, z, t):
        u = z.flatten(1).mean(1) * math.sqrt(z[0].numel())
        return self.centre(u).view(-1, 1, 1, 1) + self.p[1] * z

    def exact_fake_score(self):
        """The generator's own distribution, a mixture over a grid of u: what the fake score would learn."""
        with torch.no_grad():
            u = torch.linspace(-3, 3, 61)
            return MixtureDenoiser(self.centre(u), self.p[1].abs().item(), torch.softmax(-u ** 2 / 2, 0))


def train_toy(generator, real, steps, reg_weight=0.0, pairs=None, lr=0.02):
    """Adam on train_dmd.generator_loss with the exact real and fake scores; returns 4000 samples' pixel means."""
    z_pair, x0_pair = pairs or (torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4))
    optimizer = torch.optim.Adam(generator.parameters(), lr=lr)
    for _ in range(steps):
        idx = torch.randint(0, len(z_pair), (64,))
        loss, _, _ = dmd.generator_loss(generator, real, generator.exact_fake_score(), torch.randn(64, 1, 4, 4),
                                        z_pair[idx], x0_pair[idx], SCHED, reg_weight, False)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return generator(torch.randn(4000, 1, 4, 4), None)


def test_the_dmd_gradient_moves_a_generator_onto_the_target_gaussian():
    torch.manual_seed(0)
    generator = ToyGenerator(-0.3, 0.4)  # N(-0.3, 0.4²) per pixel; the target is N(0.3, 0.15²)
    x = train_toy(generator, MixtureDenoiser([0.3], 0.15), steps=300)
    assert abs(x.mean().item() - 0.3) < 0.02  # from 0.6 off
    assert abs(x.std().item() - 0.15) < 0.02  # from 0.25 off


@pytest.mark.parametrize("reg_weight", [0.0, 0.25])
def test_a_generator_stuck_in_one_mode_finds_both(reg_weight):
    """Two modes at ±0.5; the generator starts with all its samples at +0.5. With the regression term (pairs from a
    deterministic two-mode map) both modes fill. With exact scores, distribution matching alone finds the second
    mode too: its high noise levels see one blob centred between the modes. The collapse the papers report needs a
    learned fake score that lags behind; on MNIST the regression term is the guard."""
    torch.manual_seed(0)
    z_pair = torch.randn(2000, 1, 4, 4)
    side = torch.sign(z_pair.flatten(1).mean(1)).view(-1, 1, 1, 1)
    x0_pair = 0.5 * side + 0.1 * (z_pair - z_pair.mean((1, 2, 3), keepdim=True))
    x = train_toy(ToyGenerator(0.5, 0.1), MixtureDenoiser([-0.5, 0.5], 0.1), steps=300, reg_weight=reg_weight,
                  pairs=(z_pair, x0_pair))
    share_low = (x.flatten(1).mean(1) < 0).float().mean().item()
    assert 0.4 < share_low < 0.6


def test_matching_draws_half_its_levels_above_the_high_noise_cut(monkeypatch):
    """t is uniform in NOISE_RANGE, and HIGH_NOISE_SHARE of the digits are drawn again above HIGH_NOISE_FROM * T."""
    levels, q_sample = [], dmd.q_sample
    monkeypatch.setattr(dmd, "q_sample", lambda x, t, *a: levels.append(t) or q_sample(x, t, *a))
    torch.manual_seed(0)
    generator = ToyGenerator(0.0, 1.0)
    pair = torch.zeros(1, 1, 4, 4)
    dmd.generator_loss(generator, MixtureDenoiser([0.0], 1.0), generator.exact_fake_score(),
                       torch.randn(20000, 1, 4, 4), pair, pair, SCHED, 0.0, False)
    t = torch.cat(levels).float() / len(SCHED["alpha_bar"])
    (lo, hi), cut, share = dmd.NOISE_RANGE, dmd.HIGH_NOISE_FROM, dmd.HIGH_NOISE_SHARE
    assert lo <= t.min() and t.max() < hi
    expected = share + (1 - share) * (hi - cut) / (hi - lo)  # drawn high, or uniform and landing high anyway
    assert abs((t >= cut).float().mean().item() - expected) < 0.02
    assert abs((t < 0.3).float().mean().item() - (1 - share) * (0.3 - lo) / (hi - lo)) < 0.02  # the low levels stay


def test_the_loss_gradient_is_the_normalised_score_difference():
    x = torch.randn(3, 1, 4, 4, requires_grad=True)
    x0_real, x0_fake = torch.rand(3, 1, 4, 4), torch.rand(3, 1, 4, 4)
    dmd.distribution_matching_loss(x, x0_real, x0_fake).backward()
    weight = (x - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    expected = (x0_fake - x0_real) / weight / x.numel()  # the mean over elements divides by their number
    assert torch.allclose(x.grad, expected.detach(), atol=1e-6)


@pytest.fixture(scope="module")
def teacher(tiny_checkpoint):
    path = str(tiny_checkpoint / "diffusion_model_final.pt")
    ckpt = dmd.load_checkpoint(path, CPU)
    return dmd.model_from_checkpoint(ckpt, path).eval().requires_grad_(False), path


def test_the_fake_score_learns_the_generators_digits_and_the_teacher_gets_no_gradient(teacher):
    model, _ = teacher
    generator, fake = copy.deepcopy(model), copy.deepcopy(model).requires_grad_(True)
    z = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(0))

    def fake_loss():  # the denoising loss on fixed generator digits, with fixed noise
        torch.manual_seed(1)
        with torch.no_grad():
            return dmd.diffusion_loss(fake, dmd.generate(generator, SCHED, z), SCHED).item()
    before = fake_loss()
    optimizer = torch.optim.AdamW(fake.parameters(), lr=3e-3)
    for _ in range(30):
        dmd.fake_score_step(fake, optimizer, generator, z, SCHED, False)
    assert fake_loss() < 0.95 * before  # deterministic: fixed digits, noise and timesteps
    fake.zero_grad(set_to_none=True)
    student = copy.deepcopy(model).requires_grad_(True)
    loss, _, _ = dmd.generator_loss(student, model, fake, z[:4], z[4:8], torch.zeros(4, 1, 28, 28), SCHED, 0.25, False)
    loss.backward()
    assert all(p.grad is None for p in model.parameters()) and all(p.grad is None for p in fake.parameters())
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)


def test_dmd_end_to_end_resume_init_and_sample_only(teacher, tmp_path, capsys):
    _, path = teacher
    td.main(["--checkpoint", path, "--out-dir", str(tmp_path), "--pairs", "32", "--teacher-steps", "2",
             "--batch-size", "16", "--epochs", "1", "--num-samples", "2"])  # a kd student, for --init and the figure
    kd = str(tmp_path / td.FINAL_NAME)
    common = ["--checkpoint", path, "--out-dir", str(tmp_path), "--pairs", "32", "--teacher-steps", "2",
              "--batch-size", "8", "--num-samples", "4", "--kd", kd, "--init", kd, "--regression-steps", "1"]
    dmd.main(common + ["--steps", "2"])  # 1 regression step, then 2 distribution-matching steps
    assert torch.load(tmp_path / dmd.LAST_NAME, weights_only=True)["step"] == 3
    dmd.main(common + ["--steps", "3", "--resume", "--save-npz", str(tmp_path / "one.npz")])
    final = torch.load(tmp_path / dmd.FINAL_NAME, weights_only=True)
    assert final["step"] == 4 and final["config"]["method"] == "dmd" and "optimizers" not in final
    assert [len(v) for v in final["losses"].values()] == [4, 4, 4]  # one entry per generator update
    fake_losses = final["losses"]["fake score"]  # none in the regression warm-up, one per step after it
    assert np.isnan(fake_losses[0]) and not np.isnan(fake_losses[1:]).any()
    assert np.load(tmp_path / "one.npz")["images"].shape == (4, 28, 28)
    for name in ["dmd_comparison.png", "dmd_samples.png", "dmd_loss_curve.png"]:
        assert (tmp_path / name).is_file(), name
    out = capsys.readouterr().out
    assert "reusing" in out and "faster" in out  # kd's cached pairs serve DMD too
    dmd.main(common + ["--sample-only"])


def test_the_plan_cuts_pairs_regression_and_dmd_steps_alike(teacher, tmp_path, monkeypatch):
    """Given the probes' costs (a DMD step costs more than a regression step), every phase shrinks by one share."""
    model, path = teacher
    monkeypatch.setattr(dmd, "teacher_seconds_per_pair", lambda *a: 0.01)
    step_costs = iter([0.2, 0.6])  # the probes time a regression step, then a DMD step (it trains the fake score too)
    monkeypatch.setattr(dmd, "time_per_image", lambda fn, n, device: next(step_costs))
    args = dmd.parse_args(["--checkpoint", path, "--out-dir", str(tmp_path), "--pairs", "3000",
                           "--regression-steps", "100", "--steps", "100", "--minutes", "1"])  # 30 + 20 + 60 s
    settings = {"teacher": dmd.file_fingerprint(path), "teacher_steps": 25, "pairs": 3000, "seed": 0}
    generator, fake = dmd.student_from(model), copy.deepcopy(model)
    dmd.plan(args, model, generator, fake, SCHED, settings, CPU, False, dmd.time.time())
    assert (settings["pairs"], args.regression_steps, args.steps) == (1636, 55, 55)  # 60 s of 110: 6/11 of each


bad = partial(one_line_error, dmd.main)


def test_bad_input(teacher, tmp_path, capsys):
    _, path = teacher
    assert "run `python src.py` first" in bad(["--checkpoint", str(tmp_path / "missing.pt")])
    assert "--minutes: must be > 0, got 0" in refused_flag(dmd.main, ["--minutes", "0"], capsys)
    assert "--reg-weight: must be a number >= 0, got -1" in refused_flag(dmd.main, ["--reg-weight", "-1"], capsys)
    assert "is not a distilled checkpoint from train_distilled.py" in bad(
        ["--checkpoint", path, "--out-dir", str(tmp_path), "--pairs", "8", "--teacher-steps", "2", "--init", path])
    assert "run `python train_dmd.py` first" in bad(["--checkpoint", path, "--out-dir", str(tmp_path),
                                                    "--sample-only"])
