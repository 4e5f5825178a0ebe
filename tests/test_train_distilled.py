"""Chapter 4 (train_distilled.py): deterministic cached pairs, the student learns, resume, bad input."""
from functools import partial

import numpy as np
import pytest
import torch
from conftest import loss_before_and_after, one_line_error, refused_flag

import train_distilled as td

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def teacher(tiny_checkpoint):
    path = str(tiny_checkpoint / "diffusion_model_final.pt")
    ckpt = td.load_checkpoint(path, CPU)
    return td.model_from_checkpoint(ckpt, path).eval(), td.ddpm_schedule(**ckpt["config"]["schedule"]), path


def pair_args(out_dir, *extra):
    out_dir.mkdir(exist_ok=True)
    return td.parse_args(["--out-dir", str(out_dir), "--pairs", "8", "--teacher-steps", "3", *extra])


def test_pairs_are_deterministic_and_cached_per_teacher(teacher, tmp_path, capsys):
    model, sched, path = teacher
    settings = {"teacher": td.file_fingerprint(path), "teacher_steps": 3, "pairs": 8, "seed": 0}
    z1, x1 = td.make_pairs(pair_args(tmp_path / "a"), model, sched, CPU, False, settings)
    z2, x2 = td.make_pairs(pair_args(tmp_path / "b"), model, sched, CPU, False, settings)
    assert torch.equal(z1, z2) and torch.equal(x1, x2)  # same z -> same x_0, computed twice
    capsys.readouterr()
    _, x3 = td.make_pairs(pair_args(tmp_path / "a"), model, sched, CPU, False, settings)
    assert "reusing" in capsys.readouterr().out and torch.equal(x1, x3)
    other = dict(settings, teacher="another-teacher")
    torch.save({"settings": other, "x0": torch.zeros(8, 1, 28, 28).half()}, tmp_path / "a" / td.PAIRS_NAME)
    _, x4 = td.make_pairs(pair_args(tmp_path / "a"), model, sched, CPU, False, settings)
    assert "another teacher or settings" in capsys.readouterr().out and torch.equal(x1, x4)


@pytest.mark.parametrize("kind", ["l1-clip", "l1", "mse"])
def test_a_few_student_steps_lower_the_loss(teacher, kind):
    import copy
    model, sched, _ = teacher
    student = copy.deepcopy(model).train().requires_grad_(True)
    z = td.pair_noise(16, 0)
    target = td.sample_ddim(model, sched, z, 3, progress=False).clamp(-1, 1)  # as make_pairs stores them

    def loss_with_grad():  # the student's one step from z (t = T-1) against the teacher's image
        return td.distill_loss(student(z, torch.full((16,), 999)), target, kind)
    before, after = loss_before_and_after(loss_with_grad, torch.optim.AdamW(student.parameters(), lr=2e-3), steps=20)
    assert after < 0.8 * before


def test_distill_loss_is_the_per_pixel_mean_of_the_named_distance():
    pred, target = torch.zeros(2, 1, 28, 28), torch.zeros(2, 1, 28, 28)
    pred[0, 0, 0, :4] = 2.0  # 4 of 1568 pixels off by 2
    assert td.distill_loss(pred, target, "l1").item() == pytest.approx(4 * 2 / 1568)
    assert td.distill_loss(pred, target, "mse").item() == pytest.approx(4 * 4 / 1568)


def test_l1_clip_ignores_only_overshoot_past_a_black_or_white_target():
    target = torch.tensor([-1.0, -1.0, -0.5, 1.0, 1.0, 0.0])
    pred = torch.tensor([-1.5, 0.5, -1.5, 1.2, 0.6, 1.3], requires_grad=True)
    # blacker than a black target: 0; wrong side of a black target: 1.5; an in-between target: the full 1.0;
    # whiter than a white target: 0; below a white target: 0.4; past white where the target is grey: 1.3
    loss = td.distill_loss(pred, target, "l1-clip")
    assert loss.item() == pytest.approx((0 + 1.5 + 1.0 + 0 + 0.4 + 1.3) / 6)
    assert td.distill_loss(pred, target, "l1").item() == pytest.approx((0.5 + 1.5 + 1.0 + 0.2 + 0.4 + 1.3) / 6)
    loss.backward()
    assert pred.grad.tolist() == pytest.approx([0, 1 / 6, -1 / 6, 0, -1 / 6, 1 / 6])  # outside [-1, 1] still learns


def test_fit_budget_cuts_every_phase_by_the_same_share():
    assert td.fit_budget(120, [1000, 500], [0.01, 0.1]) == 1.0  # 60 s of work fits 120 s: all of it
    assert td.fit_budget(30, [1000, 500], [0.01, 0.1]) == pytest.approx(0.5)
    assert td.fit_budget(30, [1000, 500], [0.02, 0.2]) == pytest.approx(0.25)  # twice as slow: half as much again
    assert td.fit_budget(30, [0, 500], [0.01, 0.1]) == pytest.approx(0.6)  # nothing to make in the first phase


@pytest.mark.parametrize("pair_s, step_s", [(0.001, 0.01), (0.005, 0.15), (0.01, 0.3)])
def test_the_plan_is_a_shorter_run_of_the_same_recipe_on_a_slower_machine(teacher, tmp_path, monkeypatch, pair_s,
                                                                          step_s):
    """Given the probes' costs, the pairs and the student's steps shrink together (same epochs), and fit."""
    model, sched, path = teacher
    monkeypatch.setattr(td, "teacher_seconds_per_pair", lambda *a: pair_s)
    monkeypatch.setattr(td, "time_per_image", lambda fn, n, device: step_s)
    args = td.parse_args(["--checkpoint", path, "--out-dir", str(tmp_path), "--pairs", "6400", "--epochs", "4",
                          "--minutes", "1"])  # the full recipe: 6400 pairs and 4 x 100 steps
    settings = {"teacher": td.file_fingerprint(path), "teacher_steps": 25, "pairs": 6400, "seed": 0}

    def plan():
        return td.plan(args, model, td.student_from(model), sched, settings, torch.full((64,), 999), CPU, False,
                       td.time.time())
    steps = plan()
    share = min(1.0, 60 / (6400 * pair_s + 400 * step_s))
    assert settings["pairs"] == pytest.approx(6400 * share, abs=1) and steps == 4 * (settings["pairs"] // 64)
    assert settings["pairs"] * pair_s + steps * step_s <= 60
    # pairs cached by an earlier run (any number of them) are used whole: the budget then cuts the steps alone
    torch.save({"settings": dict(settings, pairs=1280), "x0": torch.zeros(1280, 1, 28, 28).half()},
               tmp_path / td.PAIRS_NAME)
    settings["pairs"], args.minutes = 6400, 0.25
    steps = plan()
    assert settings["pairs"] == 1280 and steps == round(80 * min(1.0, 15 / (80 * step_s)))


def test_kd_end_to_end_resume_and_sample_only(tiny_checkpoint, tmp_path, capsys):
    common = ["--checkpoint", str(tiny_checkpoint / "diffusion_model_final.pt"), "--out-dir", str(tmp_path),
              "--pairs", "64", "--teacher-steps", "2", "--batch-size", "32", "--num-samples", "4"]
    td.main(common + ["--epochs", "1"])
    assert torch.load(tmp_path / td.LAST_NAME, weights_only=True)["step"] == 2
    td.main(common + ["--epochs", "3", "--resume", "--save-npz", str(tmp_path / "one.npz")])
    final = torch.load(tmp_path / td.FINAL_NAME, weights_only=True)
    assert final["step"] == 6 and final["config"]["method"] == "kd" and "optimizer" not in final
    assert final["config"]["batch_size"] == 32 and final["config"]["loss"] == "l1-clip"  # how it was trained
    assert np.load(tmp_path / "one.npz")["images"].shape == (4, 28, 28)
    for name in ["distilled_comparison.png", "distilled_samples.png", "distilled_loss_curve.png", td.PAIRS_NAME]:
        assert (tmp_path / name).is_file(), name
    out = capsys.readouterr().out
    assert "reusing" in out and "faster" in out
    td.main(common + ["--sample-only"])


def test_the_budget_covers_the_pairs_too(tiny_checkpoint, tmp_path):
    """--minutes is for the whole run: pairs that eat it all leave a clear line (and a cache for the next run)."""
    args = ["--checkpoint", str(tiny_checkpoint / "diffusion_model_final.pt"), "--out-dir", str(tmp_path),
            "--pairs", "64", "--teacher-steps", "2", "--batch-size", "32", "--minutes", "1e-9"]
    assert "pairs used the whole --minutes 1e-09 budget" in one_line_error(td.main, args)
    assert (tmp_path / td.PAIRS_NAME).is_file() and not (tmp_path / td.FINAL_NAME).exists()


bad = partial(one_line_error, td.main)


def test_bad_input(tiny_checkpoint, tmp_path, capsys):
    assert "run `python src.py` first" in bad(["--checkpoint", str(tmp_path / "missing.pt")])
    assert "--pairs: must be > 0, got 0" in refused_flag(td.main, ["--pairs", "0"], capsys)
    assert "--lr: must be > 0, got 0" in refused_flag(td.main, ["--lr", "0"], capsys)
    assert "run `python train_distilled.py` first" in bad(
        ["--checkpoint", str(tiny_checkpoint / "diffusion_model_final.pt"), "--out-dir", str(tmp_path),
         "--sample-only"])
