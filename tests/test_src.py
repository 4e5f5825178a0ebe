"""Chapter 1 (src.py): schedule maths, UNet, training step, checkpoints, the CLI end to end, bad input."""
import math
import os
import subprocess
import sys
from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import loss_before_and_after, one_line_error, refused_flag

import src

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


run_main = partial(one_line_error, src.main)  # for a run that must fail: its one-line error message


# --- schedule ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedule_tensors_agree_with_each_other(kind):
    s = src.ddpm_schedule(T=1000, kind=kind)
    assert torch.all(s["alpha_bar"][1:] <= s["alpha_bar"][:-1])
    assert 0 < s["alpha_bar"][-1] < 1e-4 < s["alpha_bar"][0] < 1
    assert torch.allclose(s["alpha_bar"], torch.cumprod(1 - s["beta"].double(), 0).float())
    assert torch.allclose(s["alpha_bar_prev"][1:], s["alpha_bar"][:-1]) and s["alpha_bar_prev"][0] == 1
    assert s["posterior_var"][0] == 0 and torch.all(s["posterior_var"][1:] <= s["beta"][1:])


def test_linear_schedule_is_the_ddpm_papers_and_old_checkpoints_still_get_it():
    s = src.ddpm_schedule(**src.SCHEDULE)  # the default, saved as before the cosine option existed
    assert s["beta"][0].item() == pytest.approx(1e-4) and s["beta"][-1].item() == pytest.approx(0.02)
    assert torch.all(s["alpha_bar"][1:] < s["alpha_bar"][:-1])


def test_cosine_schedule_follows_the_cosine_and_ends_where_the_linear_one_does():
    cosine, linear = src.ddpm_schedule(**src.COSINE_SCHEDULE), src.ddpm_schedule(**src.SCHEDULE)
    f = [np.cos((t / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2 for t in (0, 500)]
    assert cosine["alpha_bar"][499].item() == pytest.approx(f[1] / f[0], rel=1e-4)  # paper t = 500, index 499
    assert cosine["alpha_bar"][-1].item() == pytest.approx(linear["alpha_bar"][-1].item(), rel=1e-4)  # the floor
    assert cosine["alpha_bar"][599] > 10 * linear["alpha_bar"][599]  # t = 600: ᾱ ≈ 0.34, not 0.026
    with pytest.raises(ValueError, match="unknown noise schedule"):
        src.ddpm_schedule(T=10, kind="quadratic")


@pytest.mark.parametrize("t", [0, 300, 999])
def test_q_sample_has_the_moments_of_q_xt_given_x0(t):
    s = src.ddpm_schedule(**src.SCHEDULE)
    x0 = torch.full((20000, 1, 2, 2), 0.7)
    torch.manual_seed(0)
    x_t = src.q_sample(x0, torch.full((20000,), t), torch.randn_like(x0), s)
    a = s["alpha_bar"][t].item()
    assert x_t.mean().item() == pytest.approx(np.sqrt(a) * 0.7, abs=0.01)
    assert x_t.var().item() == pytest.approx(1 - a, abs=0.01 + 0.02 * (1 - a))


# --- model ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("base,attention", [(8, True), (16, False)])
def test_unet_keeps_the_image_shape(base, attention):
    model = src.UNet(base, (1, 2, 4), attention)
    x = torch.randn(3, 1, 28, 28)
    assert model(x, torch.tensor([0, 500, 999])).shape == x.shape


def test_conv_first_convolves_at_the_low_resolution_and_old_checkpoints_keep_the_original_order():
    seen = {}
    for conv_first in (False, True):
        model = src.UNet(8, conv_first=conv_first)
        conv = [m for m in model.upsamples[0] if isinstance(m, torch.nn.Conv2d)][0]
        conv.register_forward_hook(lambda m, inp, out, k=conv_first: seen.update({k: inp[0].shape[-1]}))
        model(torch.randn(1, 1, 28, 28), torch.tensor([5]))
    assert seen == {False: 14, True: 7}  # the first upsample doubles 7x7 to 14x14: its conv runs at 7x7 or 14x14
    config = {"base_channels": 8, "channel_mults": [1, 2, 4], "attention": True, "schedule": src.SCHEDULE}
    old = src.UNet(8)  # a checkpoint saved before the "upsample" key existed
    rebuilt = src.model_from_checkpoint({"config": config, "ema": old.state_dict()}, "old.pt")
    assert [type(m) for m in rebuilt.upsamples[0]] == [torch.nn.Upsample, torch.nn.Conv2d]
    new = src.build_model({**config, "upsample": "conv-first"})
    assert [type(m) for m in new.upsamples[0]] == [torch.nn.Conv2d, torch.nn.Upsample]


EDM_CONFIG = {"base_channels": 8, "channel_mults": [1, 2, 4], "attention": True, "schedule": src.COSINE_SCHEDULE,
              "sigma_data": src.SIGMA_DATA}


def edm_pair():
    """A preconditioned UNet and a plain one with the same weights: the plain one's output is the layers' own."""
    torch.manual_seed(0)
    model = src.build_model(EDM_CONFIG)
    plain = src.build_model({k: v for k, v in EDM_CONFIG.items() if k != "sigma_data"})
    plain.load_state_dict(model.state_dict())  # ᾱ is not among the saved weights
    return model, plain


def edm_variables(t):
    """EDM's own quantities at timestep t (Karras et al. 2022, Table 1), in float64: x = x_t/√ᾱ = x_0 + σε."""
    alpha_bar = src.ddpm_schedule(**src.COSINE_SCHEDULE)["alpha_bar"][t].view(-1, 1, 1, 1).double()
    sigma, sd = ((1 - alpha_bar) / alpha_bar).sqrt(), EDM_CONFIG["sigma_data"]
    c_in, c_skip = 1 / (sigma ** 2 + sd ** 2).sqrt(), sd ** 2 / (sigma ** 2 + sd ** 2)
    return alpha_bar, sigma, c_in, c_skip, sigma * sd / (sigma ** 2 + sd ** 2).sqrt()  # the last: c_out


def test_edm_preconditioning_returns_the_noise_whose_x0_is_edms_denoiser():
    model, plain = edm_pair()
    x_t, t = torch.randn(4, 1, 28, 28), torch.tensor([0, 300, 700, 999])
    alpha_bar, sigma, c_in, c_skip, c_out = edm_variables(t)
    x = x_t.double() / alpha_bar.sqrt()
    denoised = c_skip * x + c_out * plain((c_in * x).float(), t).double()  # D = c_skip x + c_out F(c_in x)
    pred_x0 = (x_t - (1 - alpha_bar).sqrt() * model(x_t, t).double()) / alpha_bar.sqrt()  # what every sampler does
    assert torch.allclose(pred_x0, denoised, atol=1e-3)  # float32 ε, divided by √ᾱ down to 0.006
    assert not torch.allclose(model(x_t, t), plain(x_t, t), atol=1e-2)


def test_edm_loss_weighs_every_level_alike_in_the_layers_output():
    model, plain = edm_pair()
    sched, x0 = src.ddpm_schedule(**src.COSINE_SCHEDULE), torch.rand(8, 1, 28, 28) * 2 - 1
    probs = torch.zeros(1000)
    probs[[20, 500, 990]] = 1 / 3
    torch.manual_seed(3)
    loss = src.diffusion_loss(model, x0, sched, t_probs=probs)  # Min-SNR's default γ is passed, and not used
    torch.manual_seed(3)  # the same draws of t and ε, in the same order
    t = torch.multinomial(probs, 8, replacement=True)
    noise = torch.randn_like(x0)
    alpha_bar, sigma, c_in, c_skip, c_out = edm_variables(t)
    x = x0.double() + sigma * noise
    target = (x0 - c_skip * x) / c_out  # EDM's effective target for the layers, weight 1 at every σ
    expected = (plain((c_in * x).float(), t).double() - target).pow(2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-3)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_few_training_steps_lower_the_loss_on_a_fixed_batch(optimizer):
    torch.manual_seed(0)
    model = src.UNet(8)
    s = src.ddpm_schedule(**src.SCHEDULE)
    x0 = torch.rand(16, 1, 28, 28) * 2 - 1

    def loss_at_fixed_noise():
        torch.manual_seed(1)  # same t and ε every time: only the weights change
        return src.diffusion_loss(model, x0, s)

    args = SimpleNamespace(optimizer=optimizer, lr=2e-3, muon_lr=0.02)
    before, after = loss_before_and_after(loss_at_fixed_noise, src.make_optimizer(model, args), steps=5)
    assert after < 0.9 * before


@pytest.mark.parametrize("shape", [(16, 144), (64, 576), (64, 16)])  # a conv's out x in·3·3; a tall emb matrix
def test_orthogonalize_sets_every_singular_value_near_1(shape):
    torch.manual_seed(0)
    k = min(shape)
    U, _ = torch.linalg.qr(torch.randn(shape[0], k))
    V, _ = torch.linalg.qr(torch.randn(shape[1], k))
    G = U @ torch.diag(torch.logspace(-2, 0, k)) @ V.T  # singular values 0.01 to 1, as lopsided as gradients are
    X = src.orthogonalize(G)
    singular_values = torch.linalg.svdvals(X)
    assert singular_values.min() > 0.6 and singular_values.max() < 1.25
    # U·Vᵀ itself, with G's own singular vectors (the largest singular value of the difference), not any such matrix
    assert torch.linalg.matrix_norm(X - U @ V.T, ord=2) < 0.35


def test_muon_steps_the_hidden_matrices_and_leaves_the_rest_to_adamw():
    model = src.UNet(8)
    muon, adamw = src.Muon(model, lr=0.02, adamw_lr=2e-3).param_groups
    names = {id(p): name for name, p in model.named_parameters()}
    in_muon = {names[id(p)] for p in muon["params"]}
    assert "down_blocks.0.conv1.weight" in in_muon and "mid_attn.qkv.weight" in in_muon
    assert not any(n.startswith(("stem.", "head.")) or n.endswith("bias") for n in in_muon)
    assert len(in_muon) + len(adamw["params"]) == len(names) and muon["lr"] == 0.02 and adamw["lr"] == 2e-3


@pytest.mark.parametrize("schedule", [src.SCHEDULE, src.COSINE_SCHEDULE])
def test_timestep_probs_are_uniform_at_shift_0_and_tilt_toward_noise(schedule):
    alpha_bar = src.ddpm_schedule(**schedule)["alpha_bar"]
    assert torch.allclose(src.timestep_probs(alpha_bar, 0.0), torch.full((1000,), 1e-3))
    p = src.timestep_probs(alpha_bar, 1.0)
    assert abs(p.sum().item() - 1) < 1e-5
    assert (p[1:] >= p[:-1] * (1 - 1e-6)).all()  # the noisier the level, the more often it is drawn
    assert 2.0 < (p[-1] / p[0]).item() < math.e + 1e-3  # a gentle tilt, bounded by e^(shift)
    if schedule is src.COSINE_SCHEDULE:  # half the draws now land above t ≈ 650 (uniform: 500)
        assert 600 < torch.searchsorted(p.cumsum(0), torch.tensor(0.5)).item() < 700


def test_diffusion_loss_draws_t_from_t_probs():
    s = src.ddpm_schedule(**src.COSINE_SCHEDULE)
    seen = []

    def spy(x, t):
        seen.append(t)
        return torch.zeros_like(x)
    probs = torch.zeros(1000)
    probs[[10, 900]] = 0.5
    src.diffusion_loss(spy, torch.zeros(64, 1, 28, 28), s, t_probs=probs)
    src.diffusion_loss(spy, torch.zeros(64, 1, 28, 28), s)  # None: uniform over all T
    assert set(seen[0].tolist()) == {10, 900} and len(set(seen[1].tolist())) > 40


@pytest.mark.parametrize("total_steps", [936, 9360])  # a slow CPU's ten minutes; 20 epochs
def test_learning_rate_ramps_then_decays_without_a_jump(total_steps):
    args = SimpleNamespace(lr=8e-3, warmup_steps=500)
    rates = [src.learning_rate(args, s, s / total_steps) for s in range(total_steps)]
    assert rates[0] == args.lr / args.warmup_steps and rates[-1] < 0.06 * args.lr
    assert max(abs(b - a) for a, b in zip(rates, rates[1:])) < 1.001 * args.lr / args.warmup_steps  # no jumps
    assert max(rates) > (0.99 if total_steps > 5000 else 0.5) * args.lr  # a long run reaches its peak rate


def test_ddpm_sampler_step_is_algorithm_2():
    """With a model that always predicts ε=0 and a one-step schedule check: x_{t-1} = x_t/√α_t + σ_t z."""
    s = src.ddpm_schedule(T=3, beta_1=1e-4, beta_T=0.02)
    zero_model = lambda x, t: torch.zeros_like(x)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    out, snaps = src.sample_ddpm(zero_model, s, 2, torch.device("cpu"), generator=g, snapshot_steps=(2, 1, 0),
                                 progress=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 28, 28, generator=g)
    for t in (2, 1):
        x = x / s["alpha"][t].sqrt() + s["posterior_var"][t].sqrt() * torch.randn(x.shape, generator=g)
        assert torch.allclose(snaps[t], x, atol=1e-5)
    assert torch.allclose(out, x / s["alpha"][0].sqrt(), atol=1e-5)


# --- checkpoints, resume, the CLI -------------------------------------------------------------------
def test_checkpoint_round_trip_and_outputs(tiny_checkpoint):
    out = tiny_checkpoint
    for name in ["diffusion_model_final.pt", "diffusion_model_last.pt", "ddpm_samples.png",
                 "ddpm_denoising_process.png", "ddpm_loss_curve.png"]:
        assert (out / name).is_file(), name
    assert not list(out.glob("*.tmp"))
    ckpt = torch.load(out / "diffusion_model_final.pt", map_location="cpu", weights_only=True)
    assert ckpt["kind"] == "ddpm" and ckpt["step"] == 10 * (256 // 16) and ckpt["epoch"] == 10
    assert ckpt["config"]["base_channels"] == 8 and ckpt["config"]["schedule"] == src.COSINE_SCHEDULE
    assert ckpt["config"]["upsample"] == "conv-first"  # the defaults, saved so every chapter rebuilds this UNet
    assert "sigma_data" not in ckpt["config"]  # --precondition none, as the fixture asked
    assert ckpt["recipe"]["lr"] == 5e-3 and ckpt["recipe"]["batch_size"] == 16  # how it was trained, for the record
    assert ckpt["recipe"]["noise_shift"] == 0.0 and ckpt["recipe"]["warmup_steps"] == 50  # as the fixture asked
    model = src.model_from_checkpoint(ckpt, "final")  # rebuilt from the config alone
    assert torch.equal(model.state_dict()["stem.weight"], ckpt["ema"]["stem.weight"])
    samples = np.load(out / "samples.npz")["images"]
    assert samples.shape == (4, 28, 28) and samples.dtype == np.uint8


def test_a_student_drops_edms_scaling_and_starts_from_the_teachers_digit_over_sigma_data():
    import train_distilled
    model, plain = edm_pair()
    student = train_distilled.student_from(model)
    z, t = torch.randn(4, 1, 28, 28), torch.full((4,), 999)  # pure noise, where every one-step student starts
    assert torch.equal(student(z, t), plain(z, t)) and model.sigma_data == EDM_CONFIG["sigma_data"]  # teacher kept
    alpha_bar = src.ddpm_schedule(**src.COSINE_SCHEDULE)["alpha_bar"][999]
    teacher_x0 = (z - (1 - alpha_bar).sqrt() * model(z, t)) / alpha_bar.sqrt()  # the teacher's guess of the digit
    layers_out = student(z, t)
    assert layers_out.std() > 0.1  # the layers' output is not ~0, so the next line can fail
    c_skip_x = EDM_CONFIG["sigma_data"] ** 2 * alpha_bar.sqrt() * z.abs().max()  # the guess's c_skip·x part, ~0.002z
    assert torch.allclose(EDM_CONFIG["sigma_data"] * layers_out, teacher_x0, atol=1.1 * c_skip_x.item())


def test_the_cpu_default_edm_is_saved_sampled_guided_benchmarked_and_distilled(tiny_edm_checkpoint, tiny_mnist,
                                                                                tmp_path, capsys):
    import evaluate
    import sample_ddim
    import src_cfg
    import train_distilled
    import train_dmd
    import train_progressive
    path = tiny_edm_checkpoint / "diffusion_model_final.pt"
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["config"]["sigma_data"] == src.SIGMA_DATA and "alpha_bar" not in ckpt["ema"]  # with no flag given
    assert sample_ddim.model_from_checkpoint(ckpt, str(path)).sigma_data == src.SIGMA_DATA
    sample_ddim.main(["--checkpoint", str(path), "--steps", "5", "--num-samples", "2", "--no-ddpm", "--no-inversion",
                      "--out-dir", str(tmp_path)])
    assert (tmp_path / "ddim_samples_5_steps.png").is_file()
    src_cfg.main(["--checkpoint", str(path), "--digits", "3", "--scales", "3", "--num-samples", "1", "--steps", "3",
                  "--classifier-epochs", "1", "--data-root", tiny_mnist, "--out-dir", str(tmp_path / "guided")])
    assert (tmp_path / "guided" / "classifier_guidance_scale_3.png").is_file()
    capsys.readouterr()
    evaluate.main(["--benchmark", "--out-dir", str(tiny_edm_checkpoint), "--repeats", "1", "--batch-size", "2"])
    assert "| DPM-Solver++(2M) SDE 20 steps (sample_ddim.py) |" in capsys.readouterr().out
    # Every distillation chapter takes it; its student drops the scaling, and so does the student's checkpoint.
    common = ["--checkpoint", str(path), "--teacher-steps", "4", "--batch-size", "32", "--num-samples", "2"]
    runs = {train_distilled: ["--pairs", "32", "--epochs", "1"],
            train_progressive: ["--data-root", tiny_mnist, "--epochs", "1"],
            train_dmd: ["--pairs", "32", "--regression-steps", "1", "--steps", "1"]}
    for chapter, extra in runs.items():
        out = tmp_path / chapter.__name__
        chapter.main(common + extra + ["--out-dir", str(out)])
        final = torch.load(out / chapter.FINAL_NAME, map_location="cpu", weights_only=True)
        assert "sigma_data" not in final["config"] and final["config"]["predicts"] == "x0", chapter.__name__
        assert chapter.model_from_checkpoint(final, "final").sigma_data is None
    # Resumed, progressive distillation's later-stage teacher is an earlier student: no scaling either.
    args = train_progressive.parse_args(["--teacher-steps", "4"])
    teacher = train_progressive.model_from_checkpoint(ckpt, str(path))
    student = train_progressive.student_from(teacher)
    state = {"ema": train_progressive.EMA(student, 0.9),
             "optimizer": torch.optim.AdamW(student.parameters())}
    last = tmp_path / "train_progressive" / train_progressive.LAST_NAME
    assert torch.load(last, weights_only=True)["teacher_state"] is not None  # stage 2's teacher was saved
    stage_teacher = train_progressive.resume(str(last), args, student, teacher, state, torch.device("cpu"))
    assert stage_teacher.sigma_data is None and teacher.sigma_data == src.SIGMA_DATA
    # DMD's generator is a student; its fake score stays a diffusion model like the teacher: scaled, returning ε.
    generator, _, fake, _, _, _ = train_dmd.setup(train_dmd.parse_args([]), teacher, torch.device("cpu"))
    assert generator.sigma_data is None and fake.sigma_data == src.SIGMA_DATA


def test_resume_continues_at_the_same_step(tiny_mnist, tmp_path, capsys):
    common = ["--data-root", tiny_mnist, "--out-dir", str(tmp_path), "--batch-size", "64",
              "--base-channels", "8", "--num-samples", "1", "--schedule", "linear", "--upsample", "upsample-first",
              "--precondition", "none"]
    src.main(common + ["--epochs", "1", "--lr", "4e-3"])
    first = torch.load(tmp_path / "diffusion_model_last.pt", weights_only=True)
    assert first["step"] == 4 and len(first["losses"]) == 4
    # with these three flags the config is saved exactly as before they existed, so such runs still resume
    assert first["config"] == {"base_channels": 8, "channel_mults": [1, 2, 4], "attention": True,
                               "schedule": src.SCHEDULE}
    src.main(common + ["--epochs", "3", "--resume"])
    resumed = torch.load(tmp_path / "diffusion_model_last.pt", weights_only=True)
    assert resumed["step"] == 12 and resumed["losses"][:4] == first["losses"]
    # resumed without --lr: the width's default rate, and one line says the checkpoint was trained with another
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert notes == ["note: continuing with lr = 0.008; the checkpoint was trained with 0.004 (pass --lr 0.004 to "
                     "keep it)"] and resumed["recipe"]["lr"] == 0.008


def test_a_preview_after_every_epoch_shows_digits_emerging(tiny_checkpoint):
    """The fixture's run had 10 epochs: 10 rows of 16 preview digits, the latest also alone, all in the checkpoint."""
    from PIL import Image
    previews = torch.load(tiny_checkpoint / "diffusion_model_final.pt", weights_only=True)["previews"]
    assert len(previews) == 10 and previews[0].shape == (src.PREVIEW_DIGITS, 28, 28)
    assert not torch.equal(previews[0], previews[-1])  # the model changed, the noise did not
    assert Image.open(tiny_checkpoint / "ddpm_previews.png").size == (2 + 16 * 30, 2 + 10 * 30)
    assert Image.open(tiny_checkpoint / "ddpm_preview.png").size == (2 + 16 * 30, 2 + 30)


def test_sample_only_reloads_the_final_checkpoint(tiny_checkpoint, tmp_path):
    import shutil
    shutil.copy(tiny_checkpoint / "diffusion_model_final.pt", tmp_path)
    src.main(["--out-dir", str(tmp_path), "--sample-only", "--num-samples", "3", "--save-npz",
              str(tmp_path / "again.npz")])
    assert np.load(tmp_path / "again.npz")["images"].shape == (3, 28, 28)


@pytest.mark.parametrize("flags,recipe", [
    # CPU: the 10-min recipe
    (["--base-channels", "16"], (8e-3, 500, 1.0, src.COSINE_SCHEDULE, "conv-first", 0.5, "muon")),
    # GPU: the recipe it was measured with
    (["--base-channels", "64"], (2e-3, 200, 0.0, src.SCHEDULE, None, None, "adamw")),
    # the noise shift (and the warm-up it needs) is derived for the cosine schedule: not switched on for linear
    (["--base-channels", "16", "--schedule", "linear"], (8e-3, 200, 0.0, src.SCHEDULE, "conv-first", 0.5, "muon")),
    (["--base-channels", "16", "--precondition", "none", "--optimizer", "adamw"],
     (8e-3, 500, 1.0, src.COSINE_SCHEDULE, "conv-first", None, "adamw"))])
def test_the_default_recipe_depends_on_the_width_and_schedule(flags, recipe, tiny_mnist, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(src, "train", lambda args, config, *_: seen.append(
        (args.lr, args.warmup_steps, args.noise_shift, config["schedule"], config.get("upsample"),
         config.get("sigma_data"), args.optimizer)) or sys.exit(0))
    with pytest.raises(SystemExit):
        src.main(["--data-root", tiny_mnist, "--out-dir", str(tmp_path)] + flags)
    assert seen == [recipe]


@pytest.mark.parametrize("device, width", [("cpu", 16), ("mps", 16), ("cuda", 64)])
def test_a_mac_gets_the_laptop_recipe_and_only_cuda_the_wide_one(device, width, tiny_mnist, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(src, "pick_device", lambda name: torch.device(device))
    monkeypatch.setattr(src, "use_bf16", lambda choice, dev: (False, "test"))
    monkeypatch.setattr(src, "train", lambda args, config, *_: seen.append(config["base_channels"]) or sys.exit(0))
    with pytest.raises(SystemExit):
        src.main(["--data-root", tiny_mnist, "--out-dir", str(tmp_path)])
    assert seen == [width]


def test_cli_end_to_end_in_a_subprocess(tiny_mnist, tmp_path):
    """What a learner types, with --minutes as the stop: trains, saves, samples, exits 0."""
    result = subprocess.run([sys.executable, "src.py", "--data-root", tiny_mnist, "--out-dir", str(tmp_path),
                             "--minutes", "0.02", "--epochs", "50", "--batch-size", "32", "--base-channels", "8",
                             "--num-samples", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))  # one thread, like the tests beside it
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "diffusion_model_final.pt").is_file()
    assert "trained" in result.stdout and "img/s" in result.stdout


def test_help_explains_every_flag():
    result = subprocess.run([sys.executable, "src.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0
    for flag in ["--data-root", "--out-dir", "--epochs", "--minutes", "--batch-size", "--lr", "--seed", "--device",
                 "--resume", "--num-samples", "--save-npz", "--schedule", "--upsample", "--noise-shift",
                 "--warmup-steps"]:
        assert flag in result.stdout


# --- bad input: one clear line, nothing lost ----------------------------------------------------------
def test_no_data_offline_says_where_to_put_it(tmp_path, monkeypatch):
    from torchvision.datasets import MNIST

    def offline(self):
        raise RuntimeError("no network")
    monkeypatch.setattr(MNIST, "download", offline)
    message = run_main(["--data-root", str(tmp_path / "empty"), "--out-dir", str(tmp_path), "--epochs", "1"])
    assert "MNIST not found" in message and "--data-root" in message


def test_unwritable_out_dir(tmp_path):
    (tmp_path / "a_file").write_text("x")
    assert "--out-dir" in run_main(["--out-dir", str(tmp_path / "a_file" / "sub")])


@pytest.mark.parametrize("minutes", ["0", "-1", "nan"])
def test_minutes_must_be_positive(minutes, capsys):
    assert "--minutes: must be > 0" in refused_flag(src.main, ["--minutes", minutes], capsys)


def test_ema_decay_must_be_below_1(capsys):
    assert "--ema-decay: must be in [0, 1), got 1" in refused_flag(src.main, ["--ema-decay", "1"], capsys)


def test_resume_without_checkpoint(tiny_mnist, tmp_path):
    message = run_main(["--data-root", tiny_mnist, "--out-dir", str(tmp_path), "--resume"])
    assert "no checkpoint" in message and "diffusion_model_last.pt" in message


def test_resume_with_another_architecture(tiny_checkpoint, tiny_mnist, tmp_path):
    message = run_main(["--data-root", tiny_mnist, "--out-dir", str(tmp_path), "--base-channels", "16",
                        "--resume", str(tiny_checkpoint / "diffusion_model_last.pt")])
    assert "another architecture" in message and "--precondition" not in message


def test_resume_across_the_scaling_names_the_flag(tiny_checkpoint, tiny_mnist, tmp_path):
    """The fixture's run has no EDM scaling; the CPU default now has it: the one line says which flag to pass."""
    message = run_main(["--data-root", tiny_mnist, "--out-dir", str(tmp_path), "--base-channels", "8",
                        "--resume", str(tiny_checkpoint / "diffusion_model_last.pt")])
    assert "another architecture" in message and "(here --precondition none)" in message


def test_resume_with_another_sigma_data_names_the_flags(tiny_edm_checkpoint, tiny_mnist, tmp_path):
    message = run_main(["--data-root", tiny_mnist, "--out-dir", str(tmp_path), "--base-channels", "8", "--sigma-data",
                        "0.96", "--resume", str(tiny_edm_checkpoint / "diffusion_model_last.pt")])
    assert f"(here --precondition edm --sigma-data {src.SIGMA_DATA})" in message


def test_resume_with_another_optimizer_names_the_flag(tiny_checkpoint, tiny_mnist, tmp_path):
    """Muon keeps a momentum per matrix, AdamW two averages per number: a run continues with the one it began with."""
    message = run_main(["--data-root", tiny_mnist, "--out-dir", str(tmp_path), "--base-channels", "8", "--precondition",
                        "none", "--optimizer", "muon", "--resume", str(tiny_checkpoint / "diffusion_model_last.pt")])
    assert "was trained with --optimizer adamw" in message


def test_corrupt_checkpoint(tmp_path):
    (tmp_path / "diffusion_model_final.pt").write_bytes(b"not a checkpoint")
    assert "not a readable checkpoint" in run_main(["--out-dir", str(tmp_path), "--sample-only"])


@pytest.mark.parametrize("shift", [0.0, 1.0])
def test_noise_shift_reaches_the_loss(shift, tiny_mnist, tmp_path, monkeypatch):
    seen = []

    def record_and_stop(model, x0, sched, min_snr_gamma, t_probs):
        seen.append(t_probs)
        raise KeyboardInterrupt
    monkeypatch.setattr(src, "diffusion_loss", record_and_stop)
    with pytest.raises(SystemExit):
        src.main(["--data-root", tiny_mnist, "--out-dir", str(tmp_path), "--batch-size", "32", "--base-channels", "8",
                  "--noise-shift", str(shift)])
    if shift:
        assert torch.allclose(seen[0], src.timestep_probs(src.ddpm_schedule(**src.COSINE_SCHEDULE)["alpha_bar"], 1.0))
    else:
        assert seen == [None]  # uniform t, exactly as before the flag existed


def test_checkpoint_of_another_kind(tmp_path):
    torch.save({"kind": "mnist_classifier", "model": {}}, tmp_path / "diffusion_model_final.pt")
    assert "not a ddpm checkpoint from src.py" in run_main(["--out-dir", str(tmp_path), "--sample-only"])


def test_interrupted_run_saves_a_resumable_checkpoint_and_no_final(tiny_mnist, tmp_path, monkeypatch):
    calls = {"n": 0}
    real_loss = src.diffusion_loss

    def interrupt_on_third_step(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_loss(*a, **k)
    monkeypatch.setattr(src, "diffusion_loss", interrupt_on_third_step)
    with pytest.raises(SystemExit) as exc:
        src.main(["--data-root", tiny_mnist, "--out-dir", str(tmp_path), "--batch-size", "32", "--base-channels", "8"])
    assert exc.value.code == 130
    assert torch.load(tmp_path / "diffusion_model_last.pt", weights_only=True)["step"] == 2
    assert not (tmp_path / "diffusion_model_final.pt").exists()


@pytest.mark.parametrize("flags, native", [
    ("fpu avx2 avx512f avx512bw", set()),  # AVX-512 without bf16: PyTorch would emulate it, 2.5x slower
    ("fpu avx2 avx512f avx512_bf16", {"avx512_bf16"}),
    ("fpu avx512f avx512_bf16 amx_bf16 amx_tile", {"avx512_bf16", "amx_bf16"}),
    ("fpu sse4_2 avx2", set())])  # AVX2 only: 10x slower emulated
def test_bf16_auto_asks_the_cpus_own_flags(tmp_path, monkeypatch, flags, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: some CPU\nflags\t\t: {flags}\n\n"
                       f"processor\t: 1\nflags\t\t: {flags}\n")
    assert src.cpu_bf16_flags(str(cpuinfo)) == native
    monkeypatch.setattr(src, "cpu_bf16_flags", lambda: native)
    on, why = src.use_bf16("auto", torch.device("cpu"))
    assert on == (bool(native) and torch.backends.mkldnn.is_available())
    assert ("the CPU has" if on else "no native bf16") in why


def test_bf16_is_off_where_the_cpu_cannot_be_read_and_on_mps(tmp_path):
    assert src.cpu_bf16_flags(str(tmp_path / "missing")) == set()  # macOS, Windows: no /proc/cpuinfo
    assert src.use_bf16("auto", torch.device("mps")) == (False, "float32 on MPS")
    assert src.use_bf16("on", torch.device("cpu")) == (True, "--bf16 on")
    assert src.use_bf16("off", torch.device("cpu")) == (False, "--bf16 off")
