"""Chapter 6 (train_flow.py): the samplers against the exact velocity field of Gaussian data (where the flow is known
in closed form), the loss, reflow's cached pairs, a tiny run end to end, and bad input."""
import numpy as np
import pytest
import torch
from conftest import loss_before_and_after, one_line_error, refused_flag

import train_flow as tf

CPU = torch.device("cpu")
MU, S = 0.3, 0.5  # the Gaussian "digits": every pixel ~ N(MU, S²), independently


class ExactVelocity(torch.nn.Module):
    """The marginal velocity E[ε - x_0 | x_t] of the straight path for x_0 ~ N(MU, S²): x_t is Gaussian with mean
    (1 - t)·MU and variance V = (1 - t)²S² + t², and v = (t - (1 - t)S²)/V · (x - (1 - t)·MU) - MU.
    It takes the network's time input, 1000·t, and counts its calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x, t_scaled):
        self.calls += 1
        t = (t_scaled / tf.TIME_SCALE).double().view(-1, 1, 1, 1)
        variance = (1 - t) ** 2 * S ** 2 + t ** 2
        return ((t - (1 - t) * S ** 2) / variance * (x.double() - (1 - t) * MU) - MU).float()


def endpoint_error(sampler, calls, z):
    """Mean distance to the exact ODE's endpoint: the flow keeps each noise's standardised place, x_0 = MU + S·z."""
    x = tf.sample_flow(ExactVelocity(), z.double(), calls, sampler, progress=False)
    return (x.double() - (MU + S * z.double())).abs().mean().item()


@pytest.mark.parametrize("sampler", tf.SAMPLERS)
@pytest.mark.parametrize("calls", [1, 2, 3, 4, 5, 8, 20])
def test_every_sampler_makes_exactly_the_calls_asked_for(sampler, calls):
    model = ExactVelocity()
    tf.sample_flow(model, torch.randn(2, 1, 28, 28), calls, sampler, progress=False)
    assert model.calls == calls


def test_euler_with_many_steps_lands_on_the_data_distribution():
    z = torch.randn(256, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    x = tf.sample_flow(ExactVelocity(), z, 400, "euler", progress=False)
    assert x.mean().item() == pytest.approx(MU, abs=0.01) and x.std().item() == pytest.approx(S, abs=0.01)


def test_the_sde_sampler_lands_on_the_data_distribution_by_its_own_path():
    """Chapter 3's `dpmpp-2m-sde` on the flow: fresh noise at every step, so not the ODE's endpoint of each noise,
    but the same distribution; a seed repeats a path, another seed draws another."""
    z = torch.randn(256, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    draw = lambda seed, calls=200: tf.sample_flow(ExactVelocity(), z, calls, "sde", progress=False,  # noqa: E731
                                                  generator=torch.Generator().manual_seed(seed))
    x = draw(1)
    assert x.mean().item() == pytest.approx(MU, abs=0.01) and x.std().item() == pytest.approx(S, abs=0.01)
    assert torch.equal(x, draw(1)) and (x - draw(2)).abs().mean() > 0.1
    assert (x - (MU + S * z)).abs().mean() > 0.1  # not the ODE's endpoint
    assert draw(1, calls=1).sub(MU).abs().max() < 1e-5  # one call from pure noise: the best guess, E[x_0] = MU


@pytest.mark.parametrize("sampler, fall", [("euler", (1.6, 2.5)), ("heun", (3.2, 5)), ("midpoint", (3.2, 10))])
def test_the_error_falls_with_the_samplers_order_when_the_calls_double(sampler, fall):
    """Euler's error halves when the calls double (first order); Heun's falls ~4x (second order). Midpoint is second
    order too, but on this field its leading error term nearly cancels: it falls ~8x, at least 4x is asserted."""
    z = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    errors = [endpoint_error(sampler, calls, z) for calls in (32, 64, 128)]
    for coarse, fine in zip(errors, errors[1:]):
        assert fall[0] < coarse / fine < fall[1], errors


def test_the_exact_field_is_what_the_loss_is_minimised_by():
    """The conditional target ε - x_0 is noisy, but its mean given x_t is the marginal velocity (the CFM argument):
    the loss of the exact field is lower than that of the same field nudged either way."""
    gen = torch.Generator().manual_seed(2)
    x0 = MU + S * torch.randn(512, 1, 28, 28, generator=gen)
    noise, t = torch.randn(512, 1, 28, 28, generator=gen), torch.rand(512, generator=gen)
    exact = tf.flow_loss(ExactVelocity(), x0, noise, t).item()

    class Nudged(ExactVelocity):
        def __init__(self, by):
            super().__init__()
            self.by = by

        def forward(self, x, t_scaled):
            return super().forward(x, t_scaled) * (1 + self.by)
    assert all(exact < tf.flow_loss(Nudged(by), x0, noise, t).item() for by in (-0.05, 0.05))


def test_the_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    model = tf.UNet(base_channels=8, attention=False)
    x0 = torch.rand(16, 1, 28, 28) * 2 - 1
    noise, t = torch.randn_like(x0), torch.rand(16)
    before, after = loss_before_and_after(lambda: tf.flow_loss(model, x0, noise, t),
                                          torch.optim.AdamW(model.parameters(), lr=3e-3), steps=30)
    assert after < 0.7 * before


def test_time_sampling_uniform_and_logit_normal():
    torch.manual_seed(0)
    uniform, logit = tf.sample_time(20000, "uniform"), tf.sample_time(20000, "logit-normal", 1.0)
    assert 0 <= uniform.min() and uniform.max() <= 1 and uniform.mean().item() == pytest.approx(0.5, abs=0.01)
    assert torch.logit(logit).mean().item() == pytest.approx(1.0, abs=0.03)  # m shifts the draws to the noise end
    assert torch.logit(logit).std().item() == pytest.approx(1.0, abs=0.03)


@pytest.fixture(scope="module")
def flow_run(tiny_mnist, tmp_path_factory):
    """A real (tiny) run of train_flow.py: a width-8 UNet, 2 epochs of the 256 tiny digits."""
    out = tmp_path_factory.mktemp("flow_run")
    tf.main(["--data-root", tiny_mnist, "--out-dir", str(out), "--epochs", "2", "--batch-size", "32",
             "--base-channels", "8", "--no-attention", "--warmup-steps", "4", "--num-samples", "8", "--steps", "3",
             "--bf16", "off"])
    return out


def test_a_tiny_run_writes_its_checkpoints_and_pictures(flow_run):
    for name in ["flow_model_final.pt", "flow_model_last.pt", "flow_samples.png", "flow_previews.png",
                 "flow_loss_curve.png"]:
        assert (flow_run / name).is_file(), name
    ckpt = torch.load(flow_run / "flow_model_final.pt", weights_only=True)
    assert ckpt["kind"] == "flow" and ckpt["step"] == 16 and "optimizer" not in ckpt
    assert ckpt["config"]["path"] == "straight" and ckpt["recipe"]["time_sampling"] == "logit-normal"
    assert ckpt["recipe"]["logit_mean"] == 0.0  # the middle of the path; reflow tilts it (below)


def test_sample_only_exports_what_evaluate_reads(flow_run, tmp_path):
    npz = tmp_path / "s.npz"
    tf.main(["--out-dir", str(flow_run), "--sample-only", "--sampler", "midpoint", "--steps", "4",
             "--num-samples", "5", "--save-npz", str(npz), "--bf16", "off"])
    images = np.load(npz)["images"]
    assert images.shape == (5, 28, 28) and images.dtype == np.uint8


def test_resume_continues_at_the_saved_step(flow_run, tiny_mnist):
    tf.main(["--data-root", tiny_mnist, "--out-dir", str(flow_run), "--epochs", "3", "--batch-size", "32",
             "--base-channels", "8", "--no-attention", "--warmup-steps", "4", "--num-samples", "4", "--steps", "2",
             "--bf16", "off", "--resume"])
    assert torch.load(flow_run / "flow_model_final.pt", weights_only=True)["step"] == 24


def test_reflow_pairs_are_deterministic_and_cached(flow_run, tmp_path, capsys):
    path = str(flow_run / "flow_model_final.pt")
    flow = tf.model_from_checkpoint(tf.load_checkpoint(path, CPU, "flow", "train_flow.py"), path).eval()
    settings = {"flow": tf.file_fingerprint(path), "pair_sampler": "heun", "pair_steps": 2, "pairs": 6, "seed": 0,
                "bf16": False}
    runs = []
    for name in ["a", "b", "a"]:
        (tmp_path / name).mkdir(exist_ok=True)
        runs.append(tf.make_reflow_pairs(tf.parse_args(["--out-dir", str(tmp_path / name)]), flow, CPU, False,
                                         settings))
    assert all(torch.equal(runs[0][i], run[i]) for run in runs for i in (0, 1))  # same seed, same pairs
    assert "reusing" in capsys.readouterr().out  # the third came from the cache
    z, x0 = runs[0]
    assert torch.allclose(x0, tf.sample_flow(flow, z, 2, "heun", progress=False).clamp(-1, 1), atol=1e-2)


def test_a_tiny_reflow_writes_its_comparison(flow_run):
    tf.main(["--reflow", "--checkpoint", str(flow_run / "flow_model_final.pt"), "--out-dir", str(flow_run),
             "--pairs", "64", "--pair-steps", "2", "--epochs", "1", "--batch-size", "32", "--warmup-steps", "2",
             "--num-samples", "4", "--bf16", "off"])
    assert (flow_run / "reflow_comparison.png").is_file() and (flow_run / "reflow_pairs.pt").is_file()
    reflow = torch.load(flow_run / "reflow_model_final.pt", weights_only=True)
    assert reflow["step"] == 2 and reflow["recipe"]["logit_mean"] == 2.0  # t near 1, where its 1-call digit is read


def test_bad_input_gives_one_line(tmp_path, capsys, tiny_checkpoint):
    message = one_line_error(tf.main, ["--sample-only", "--out-dir", str(tmp_path)])
    assert "train_flow.py" in message
    message = one_line_error(tf.main, ["--reflow", "--checkpoint", str(tiny_checkpoint / "diffusion_model_final.pt"),
                                       "--out-dir", str(tmp_path)])
    assert "not a flow checkpoint" in message
    assert "must be > 0" in refused_flag(tf.main, ["--steps", "0"], capsys)
    assert "invalid choice" in refused_flag(tf.main, ["--sampler", "rk4"], capsys)
