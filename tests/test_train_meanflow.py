"""Chapter 7 (train_meanflow.py): the MeanFlow identity on Gaussian data (where the average velocity is known in
closed form), the JVP against finite differences, one-step sampling, a tiny run end to end, and bad input."""
import numpy as np
import pytest
import torch
from conftest import loss_before_and_after, one_line_error, refused_flag

import train_meanflow as mf

MU, S = 0.3, 0.5  # the Gaussian "digits": every pixel ~ N(MU, S²), independently


def variance(t, s=S):
    """Var z_t on the straight path: (1 - t)²S² + t²."""
    return (1 - t) ** 2 * s ** 2 + t ** 2


class ExactAverageVelocity(torch.nn.Module):
    """u(z_t, r, t) = (z_t - z_r)/(t - r) along the ODE's path for x_0 ~ N(MU, s²): the flow keeps each sample's
    standardised place, z_τ = (1 - τ)·MU + √V_τ · ξ, so z_r follows from z_t in closed form. At r = t: v(z_t, t)."""

    def __init__(self, s=S):
        super().__init__()
        self.s = s

    def forward(self, z, r, t):
        r, t = (x.double().view(-1, 1, 1, 1) for x in (r, t))
        xi = (z.double() - (1 - t) * MU) / variance(t, self.s).sqrt()
        gap = t - r
        safe = torch.where(gap > 0, gap, torch.ones_like(gap))
        average = (z.double() - (1 - r) * MU - variance(r, self.s).sqrt() * xi) / safe
        # r = t: the instantaneous velocity, d/dt z_t = -MU + ξ·(t - (1 - t)s²)/√V_t
        instantaneous = -MU + xi * (t - (1 - t) * self.s ** 2) / variance(t, self.s).sqrt()
        return torch.where(gap > 0, average, instantaneous)


def marginal_velocity(z, t):
    return ExactAverageVelocity()(z, t, t)


def test_the_identity_holds_for_the_exact_average_velocity():
    """u = v - (t - r)·du/dt, with du/dt by the chapter's JVP in the direction of the true flow (v, 0, 1)."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(64, 1, 28, 28, generator=gen, dtype=torch.float64)
    t = 0.1 + 0.85 * torch.rand(64, generator=gen, dtype=torch.float64)
    r = t * torch.rand(64, generator=gen, dtype=torch.float64)
    u, du_dt = mf.average_velocity_and_derivative(ExactAverageVelocity(), z, r, t, marginal_velocity(z, t))
    right_side = marginal_velocity(z, t) - (t - r).view(-1, 1, 1, 1) * du_dt
    assert (u - right_side).abs().max() < 1e-8
    assert (u - marginal_velocity(z, t)).abs().mean() > 0.05  # and u is not just v: the identity has work to do


def test_the_loss_is_zero_where_the_exact_average_velocity_is_known_and_the_lines_do_not_cross():
    """Data of one point (S = 0): every line leaves MU, so the conditional velocity is the marginal one, and the
    exact u has zero MeanFlow loss - while a wrong u does not."""
    gen = torch.Generator().manual_seed(1)
    x0, noise = torch.full((32, 1, 28, 28), MU, dtype=torch.float64), torch.randn(32, 1, 28, 28, generator=gen,
                                                                               dtype=torch.float64)
    r, t = mf.sample_interval(32, 0.75, 0.0, 1.0)
    exact = ExactAverageVelocity(s=0.0)
    loss, error = mf.meanflow_loss(exact, x0, noise, r.double(), t.double())
    assert error < 1e-12

    class Off(ExactAverageVelocity):
        def forward(self, z, r, t):
            return super().forward(z, r, t) + 0.1 * t.double().view(-1, 1, 1, 1)
    assert mf.meanflow_loss(Off(s=0.0), x0, noise, r.double(), t.double())[1] > 1e-4


def test_the_jvp_matches_finite_differences():
    torch.manual_seed(0)
    model = mf.MeanFlowUNet(base_channels=8, attention=True)  # float32, as the time embedding is
    z, v = torch.randn(3, 1, 28, 28), torch.randn(3, 1, 28, 28)
    r, t = torch.tensor([0.0, 0.2, 0.5]), torch.tensor([1.0, 0.7, 0.5])
    _, du_dt = mf.average_velocity_and_derivative(model, z, r, t, v)
    # a central difference, moving z along v and t by h (not r); h small against 1/time_scale, large against float32's
    # rounding
    h = 1e-3
    with torch.no_grad():
        finite = (model(z + h * v, r, t + h) - model(z - h * v, r, t - h)) / (2 * h)
        without_z = (model(z, r, t + h) - model(z, r, t - h)) / (2 * h)  # forgetting that z moves with t
    assert (du_dt - finite).norm() < 5e-3 * du_dt.norm()
    assert (du_dt - without_z).norm() > 0.05 * du_dt.norm()  # so the check above can tell the two apart


def test_one_step_sampling_with_the_exact_u_lands_on_the_data_distribution():
    noise = torch.randn(256, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    for steps in (1, 2):
        x = mf.sample_meanflow(ExactAverageVelocity(), noise, steps)
        assert x.mean().item() == pytest.approx(MU, abs=0.01) and x.std().item() == pytest.approx(S, abs=0.01)


def test_the_interval_sampler_orders_r_before_t_and_keeps_the_flow_matching_share():
    torch.manual_seed(0)
    r, t = mf.sample_interval(20000, 0.75, 2.0, 2.0)
    assert (r <= t).all() and (0 <= r).all() and (t <= 1).all()
    assert (r == t).float().mean().item() == pytest.approx(0.25, abs=0.02)


def test_the_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    model = mf.MeanFlowUNet(base_channels=8, attention=False)
    x0 = torch.rand(16, 1, 28, 28) * 2 - 1
    noise = torch.randn_like(x0)
    r, t = mf.sample_interval(16, 0.75, 0.0, 1.0)
    before, after = loss_before_and_after(lambda: mf.meanflow_loss(model, x0, noise, r, t, 0.0)[0],
                                          torch.optim.AdamW(model.parameters(), lr=3e-3), steps=30)
    assert after < 0.7 * before


@pytest.fixture(scope="module")
def meanflow_run(tiny_mnist, tmp_path_factory):
    out = tmp_path_factory.mktemp("meanflow_run")
    mf.main(["--data-root", tiny_mnist, "--out-dir", str(out), "--epochs", "2", "--batch-size", "32",
             "--base-channels", "8", "--no-attention", "--warmup-steps", "4", "--num-samples", "6",
             "--snapshot-minutes", "0.0001", "--bf16", "off"])
    return out


def test_a_tiny_run_writes_its_checkpoints_snapshots_and_pictures(meanflow_run):
    for name in ["meanflow_model_final.pt", "meanflow_model_last.pt", "meanflow_samples.png", "meanflow_previews.png",
                 "meanflow_loss_curve.png"]:
        assert (meanflow_run / name).is_file(), name
    assert len(list(meanflow_run.glob("meanflow_model_*min.pt"))) >= 2  # a snapshot every 0.006 s
    ckpt = torch.load(meanflow_run / "meanflow_model_final.pt", weights_only=True)
    assert ckpt["kind"] == "meanflow" and ckpt["step"] == 16 and np.isfinite(ckpt["losses"]).all()


def test_sample_only_and_resume(meanflow_run, tiny_mnist, tmp_path):
    npz = tmp_path / "s.npz"
    mf.main(["--out-dir", str(meanflow_run), "--sample-only", "--steps", "2", "--num-samples", "5",
             "--save-npz", str(npz), "--bf16", "off"])
    assert np.load(npz)["images"].shape == (5, 28, 28)
    snapshot = sorted(meanflow_run.glob("meanflow_model_*min.pt"))[0]
    mf.main(["--sample-only", "--checkpoint", str(snapshot), "--out-dir", str(tmp_path),
             "--num-samples", "2", "--bf16", "off"])  # a snapshot samples like a final checkpoint
    mf.main(["--data-root", tiny_mnist, "--out-dir", str(meanflow_run), "--epochs", "3", "--batch-size", "32",
             "--base-channels", "8", "--no-attention", "--warmup-steps", "4", "--num-samples", "2", "--bf16", "off",
             "--resume"])
    assert torch.load(meanflow_run / "meanflow_model_final.pt", weights_only=True)["step"] == 24


def test_jvp_cost_times_both_steps_without_training(tmp_path, capsys):
    ratio = mf.main(["--jvp-cost", "--base-channels", "8", "--no-attention", "--batch-size", "4", "--bf16", "off",
                     "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "flow matching, no JVP:" in out and "MeanFlow, with the JVP:" in out and "x as long" in out
    assert ratio > 0 and not list(tmp_path.iterdir())  # timed only: no checkpoint, no picture


def test_bad_input_gives_one_line(tmp_path, capsys):
    assert "train_meanflow.py" in one_line_error(mf.main, ["--sample-only", "--out-dir", str(tmp_path)])
    assert "must be in [0, 1]" in refused_flag(mf.main, ["--interval-share", "1.5"], capsys)
    assert "must be > 0" in refused_flag(mf.main, ["--steps", "0"], capsys)


def test_the_comparison_figure_draws_the_same_noise_through_all_four(meanflow_run, tmp_path):
    import os
    weights = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights")
    mf.main(["--sample-only", "--out-dir", str(meanflow_run), "--num-samples", "2", "--compare", "--bf16", "off",
             "--teacher", os.path.join(weights, "diffusion_model_final.pt"),
             "--kd", os.path.join(weights, "distilled_model_final.pt"),
             "--dmd", os.path.join(weights, "dmd_model_final.pt")])
    assert (meanflow_run / "meanflow_comparison.png").is_file()
