"""Chapter 5 (src_classifier_free.py): the guidance convention, label dropout, no null-class leak, round trip."""
from functools import partial

import numpy as np
import pytest
import torch
from conftest import refused_flag, one_line_error

import src_classifier_free as cf

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def trained(tiny_mnist, tmp_path_factory):
    out = tmp_path_factory.mktemp("cf_run")
    cf.main(["--data-root", tiny_mnist, "--out-dir", str(out), "--epochs", "2", "--batch-size", "64",
             "--base-channels", "8", "--num-samples", "1", "--steps", "3", "--weights", "0", "2"])
    return out


def test_weight_0_is_unconditional_and_weight_1_is_conditional():
    torch.manual_seed(0)
    model = cf.ConditionalUNet(8).eval()
    x, t, y = torch.randn(3, 1, 28, 28), torch.tensor([5, 500, 900]), torch.tensor([1, 4, 9])
    with torch.no_grad():
        uncond = model(x, t, torch.full_like(y, cf.NULL_CLASS))
        cond = model(x, t, y)
        assert torch.allclose(cf.guided_noise(model, x, t, y, 0.0), uncond, atol=1e-5)
        assert torch.allclose(cf.guided_noise(model, x, t, y, 1.0), cond, atol=1e-5)
        assert torch.allclose(cf.guided_noise(model, x, t, y, 3.0), uncond + 3 * (cond - uncond), atol=1e-4)


def test_label_dropout_rate_matches_p_uncond():
    torch.manual_seed(0)
    y = torch.randint(0, 10, (200_000,))
    dropped = cf.drop_labels(y, 0.1)
    assert (dropped == cf.NULL_CLASS).float().mean().item() == pytest.approx(0.1, abs=0.005)
    kept = dropped != cf.NULL_CLASS
    assert torch.equal(dropped[kept], y[kept])


def test_the_null_class_never_leaks_into_the_conditional_branch():
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, x, t, y):
            seen.append(y.clone())
            return torch.zeros_like(x)
    y = torch.tensor([0, 3, 9])
    cf.sample_guided(Recorder(), cf.ddpm_schedule(**cf.SCHEDULE), torch.randn(3, 1, 28, 28), y, 3.0, 5, progress=False)
    assert len(seen) == 5
    for labels in seen:
        assert torch.equal(labels[:3], y) and torch.all(labels[3:] == cf.NULL_CLASS)


def test_training_run_writes_a_checkpoint_that_round_trips(trained, tmp_path):
    ckpt = torch.load(trained / cf.FINAL_NAME, weights_only=True)
    assert ckpt["kind"] == "classifier_free" and ckpt["step"] == 2 * (256 // 64) and ckpt["config"]["p_uncond"] == 0.1
    model, _ = cf.load_conditional(str(trained / cf.FINAL_NAME), torch.device("cpu"))
    assert torch.equal(model.class_emb.weight, ckpt["ema"]["class_emb.weight"])
    config = ckpt["config"]  # the width-8 CPU run gets chapter 1's laptop recipe, and its model EDM's scaling
    assert config["recipe"] == "laptop" and config["schedule"]["kind"] == "cosine"
    assert config["upsample"] == "conv-first"
    assert model.sigma_data == config["sigma_data"] == 0.5
    for name in ["classifier_free_weight_0.png", "classifier_free_weight_2.png", "classifier_free_same_noise.png"]:
        assert (trained / name).is_file(), name
    import shutil
    shutil.copy(trained / cf.FINAL_NAME, tmp_path)
    cf.main(["--out-dir", str(tmp_path), "--sample-only", "--digits", "2", "5", "--num-samples", "2", "--steps", "2",
             "--weights", "1", "--save-npz", str(tmp_path / "cf.npz")])
    npz = np.load(tmp_path / "cf.npz")
    assert npz["images"].shape == (4, 28, 28) and npz["labels"].tolist() == [2, 2, 5, 5]
    assert npz["guidance"] == "classifier-free" and npz["strength"] == 1 and npz["seconds"] > 0  # for --tradeoff


def test_the_benchmark_times_classifier_free_sampling(trained, tiny_checkpoint):
    """The benchmark's classifier-free row, run without the rest of the benchmark (its 1000-step row is slow)."""
    import evaluate
    import src
    model = src.model_from_checkpoint(src.load_checkpoint(str(tiny_checkpoint / "diffusion_model_final.pt"), CPU), "-")
    args = evaluate.parse_args(["--benchmark", "--out-dir", str(trained)])
    x_T = torch.randn(2, 1, 28, 28)
    samplers, notes = evaluate.chapter_samplers(args, CPU, model, cf.ddpm_schedule(**cf.SCHEDULE), x_T, False)
    names = [name for name, _ in samplers]
    assert names == [f"classifier-free guided {cf.DEFAULT_SAMPLER} 50 steps, w {cf.DEFAULT_WEIGHT:g} "
                     f"(src_classifier_free.py)"]
    assert samplers[0][1]().shape == x_T.shape
    assert len(notes) == 4 and all("run `python " in note for note in notes)  # the chapters not trained here


bad = partial(one_line_error, cf.main)


def test_a_first_recipe_checkpoint_builds_the_model_it_was(trained):
    """Checkpoints of the first recipe (no "upsample", no "sigma_data": the linear schedule, no scaling) still load."""
    first = {"base_channels": 8, "channel_mults": [1, 2, 4], "attention": True, "schedule": cf.SCHEDULE}
    model = cf.build_conditional_model(first)
    assert model.sigma_data is None and isinstance(model.upsamples[1][0], torch.nn.Upsample)  # upsample, then conv
    x, t, y = torch.randn(2, 1, 28, 28), torch.tensor([5, 900]), torch.tensor([3, cf.NULL_CLASS])
    emb = model.time_mlp(cf.timestep_embedding(t, 8)) + model.class_emb(y)
    assert torch.equal(model(x, t, y), model.trunk(x, emb))  # the layers' output is ε itself


def test_bad_input(tmp_path, capsys):
    assert "--weights: must be a number >= 0, got -1" in refused_flag(cf.main, ["--weights", "-1"], capsys)
    assert "--digits: must be a digit 0-9, got 10" in refused_flag(cf.main, ["--digits", "10"], capsys)
    assert "--p-uncond: must be in [0, 1), got 1" in refused_flag(cf.main, ["--p-uncond", "1"], capsys)
    assert "run `python src_classifier_free.py` first" in bad(["--out-dir", str(tmp_path), "--sample-only"])
