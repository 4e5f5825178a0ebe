"""Chapter 4b (train_progressive.py): the two-step target, its float32 arithmetic, the loss weighting, a full run."""
from functools import partial

import numpy as np
import pytest
import torch
from conftest import one_line_error, refused_flag

import train_progressive as tp

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def teacher(tiny_checkpoint):
    path = str(tiny_checkpoint / "diffusion_model_final.pt")
    ckpt = tp.load_checkpoint(path, CPU)
    return tp.model_from_checkpoint(ckpt, path).eval(), tp.ddpm_schedule(**ckpt["config"]["schedule"])


@pytest.mark.parametrize("j,predicts", [(0, "epsilon"), (2, "epsilon"), (2, "x0")])
def test_progressive_target_makes_one_step_equal_two_teacher_steps(teacher, j, predicts):
    model, sched = teacher
    t_seq = torch.tensor(tp.ddim_timesteps(4, sched["alpha_bar"]))  # teacher: 4 steps, student: 2
    abar_seq = torch.cat([sched["alpha_bar"][t_seq], torch.ones(1)])
    torch.manual_seed(0)
    x_t = torch.randn(3, 1, 28, 28)
    jj = torch.full((3,), j)
    target = tp.progressive_target(model, predicts, x_t, t_seq, abar_seq, jj)
    x = x_t  # two teacher DDIM steps, written out
    for k in (0, 1):
        a, a_next = abar_seq[j + k], abar_seq[j + k + 1]
        x = tp.ddim_step(x, tp.predict_noise(model, x, t_seq[jj + k], a, predicts), a, a_next, 0.0, 0.0)
    a, a2 = abar_seq[j], abar_seq[j + 2]
    implied_eps = (x_t - a.sqrt() * target) / (1 - a).sqrt()  # a student predicting x_0 = target...
    one_step = tp.ddim_step(x_t, implied_eps, a, a2, 0.0, 0.0)  # ...takes ONE step
    assert torch.allclose(one_step, x, atol=1e-4)


def test_why_the_target_is_computed_in_float32(teacher):
    """At the first student step the division by α'' - (σ''/σ)α ≈ 0.0055 magnifies the teacher's rounding: with
    the teacher in bf16 the target would move visibly. (train_stage calls it outside the student's autocast.)"""
    model, sched = teacher
    t_seq = torch.tensor(tp.ddim_timesteps(32, sched["alpha_bar"]))
    abar_seq = torch.cat([sched["alpha_bar"][t_seq], torch.ones(1)])
    x_t = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    j = torch.zeros(8, dtype=torch.long)
    fp32 = tp.progressive_target(model, "epsilon", x_t, t_seq, abar_seq, j)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = tp.progressive_target(model, "epsilon", x_t, t_seq, abar_seq, j)
    assert fp32.dtype == torch.float32
    assert (bf16 - fp32).abs().mean() > 0.05  # pixels live in [-1, 1]: a visible change (0.3 on src.py's model)


def test_truncated_snr_weights_clean_samples_more():
    pred, target = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)  # both samples off by 1 in every pixel
    alpha_bar = torch.tensor([0.2, 0.9])  # SNR 0.25 -> weight 1; SNR 9 -> weight 9
    assert tp.progressive_loss(pred, target, alpha_bar, "l1", "none").item() == pytest.approx(1.0)
    assert tp.progressive_loss(pred, target, alpha_bar, "l1", "truncated-snr").item() == pytest.approx((1 + 9) / 2)


def test_end_to_end_resume_and_sample_only(tiny_checkpoint, tiny_mnist, tmp_path, capsys):
    common = ["--checkpoint", str(tiny_checkpoint / "diffusion_model_final.pt"), "--out-dir", str(tmp_path),
              "--teacher-steps", "4", "--batch-size", "64", "--data-root", tiny_mnist, "--num-samples", "2"]
    tp.main(common + ["--epochs", "1", "--save-npz", str(tmp_path / "p.npz")])
    final = torch.load(tmp_path / tp.FINAL_NAME, weights_only=True)
    assert final["config"]["method"] == "progressive" and final["stage"] == 1  # stages 4->2, 2->1
    assert final["teacher_state"] is None and "optimizer" not in final
    assert len(final["losses"]) == 2 * 4  # two stages of one epoch: 256 digits / 64 = 4 steps each
    assert np.load(tmp_path / "p.npz")["images"].shape == (2, 28, 28)
    for name in ["progressive_comparison.png", "progressive_samples.png", "progressive_loss_curve.png"]:
        assert (tmp_path / name).is_file(), name
    tp.main(common + ["--epochs", "2", "--resume"])  # the last stage goes on to 2 epochs
    assert len(torch.load(tmp_path / tp.FINAL_NAME, weights_only=True)["losses"]) == 2 * 4 + 4
    capsys.readouterr()
    tp.main(common + ["--sample-only"])
    assert "faster" in capsys.readouterr().out


bad = partial(one_line_error, tp.main)


def test_bad_input(tiny_checkpoint, tmp_path, capsys):
    assert "run `python src.py` first" in bad(["--checkpoint", str(tmp_path / "missing.pt")])
    assert "must be a power of 2 >= 2" in refused_flag(tp.main, ["--teacher-steps", "6"], capsys)
    assert "run `python train_progressive.py` first" in bad(
        ["--checkpoint", str(tiny_checkpoint / "diffusion_model_final.pt"), "--out-dir", str(tmp_path),
         "--sample-only"])
    torch.save({"kind": "distilled"}, tmp_path / tp.FINAL_NAME)
    assert "not a progressive checkpoint from train_progressive.py" in bad(
        ["--checkpoint", str(tiny_checkpoint / "diffusion_model_final.pt"), "--out-dir", str(tmp_path),
         "--sample-only"])
