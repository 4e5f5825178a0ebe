"""Chapter 8 (edit.py): inpainting, SDEdit and translation against the exact denoiser of Gaussian "digits" (whose
conditional distributions are known in closed form), tiny runs of every task end to end, and bad input."""
import numpy as np
import pytest
import torch
from conftest import one_line_error, refused_flag

import edit

CPU = torch.device("cpu")
MU, C, S = -0.2, 3.0, 0.3  # the Gaussian "digits": x_0 = MU + C·z·u + S·n, one shared stroke u, z and n ~ N(0, 1)
U = torch.linspace(-1, 1, 28).view(1, 28).expand(28, 28).flatten().sin()  # a smooth pattern over the whole image
U = U / U.norm()
ALPHA_BAR = edit.ddpm_schedule(1000, kind="cosine")["alpha_bar"]


class ExactNoise(torch.nn.Module):
    """ε*(x_t, t) = E[ε | x_t] for x_0 ~ N(MU, Σ), Σ = S²I + C²uuᵀ: √(1-ᾱ)·A⁻¹(x_t - √ᾱ·MU) with A = ᾱΣ + (1-ᾱ)I,
    inverted in closed form (Sherman-Morrison). A label, if given, is ignored."""

    def forward(self, x, t, y=None):
        a_bar = ALPHA_BAR[t].double().view(-1, 1)
        r = (x.double().flatten(1) - a_bar.sqrt() * MU)
        a, b = a_bar * S ** 2 + 1 - a_bar, a_bar * C ** 2
        solved = (r - b / (a + b) * (r @ U.double())[:, None] * U.double()) / a
        return ((1 - a_bar).sqrt() * solved).view_as(x).float()


def gaussian_digits(n, seed):
    gen = torch.Generator().manual_seed(seed)
    z, noise = torch.randn(n, 1, generator=gen), torch.randn(n, 784, generator=gen)
    return (MU + C * z * U + S * noise).view(n, 1, 28, 28)


def conditional(x0, mask):
    """Mean and per-pixel variance of the hidden pixels given the known ones (the Gaussian's conditional)."""
    known = mask.flatten().bool()
    u_k, u_h = U[known], U[~known]
    w = x0.flatten()[known] - MU
    gain = C ** 2 / (S ** 2 + C ** 2 * u_k.pow(2).sum())
    mean = MU + u_h * gain * (u_k @ w)
    variance = S ** 2 + C ** 2 * u_h ** 2 * S ** 2 / (S ** 2 + C ** 2 * u_k.pow(2).sum())
    return mean, variance


def test_the_visible_part_reader_measures_how_ambiguous_the_visible_part_is(monkeypatch):
    """Training digits: 3s and 8s with the same left half, 1s with another; the 3s and 8s differ on the right. Read
    through its left half a 3 is as likely an 8 (probability one half each, one of the two read right); read whole,
    each is read right, with certainty."""
    halves = {3: (255, 0), 8: (255, 255), 1: (0, 0)}  # label: (left half, right half) grey levels
    labels = torch.tensor([3, 8, 1] * 10)
    images = torch.zeros(30, 28, 28, dtype=torch.uint8)
    for i, y in enumerate(labels.tolist()):
        images[i, :, :14], images[i, :, 14:] = halves[y]
    monkeypatch.setattr(edit, "load_mnist", lambda root, train=True: (images, labels))
    digits = edit.to_model_range(images[:3])
    for hidden, expected in [("right", 2 / 3), (None, 1.0)]:  # half hidden: the 3 and the 8 get one answer
        hide = (lambda n: edit.make_mask(hidden, n)) if hidden else (lambda n: torch.ones(n, 1, 28, 28))
        read, p_true = edit.visible_part_reading(digits, labels[:3], hide(3), hide, "-", steps=100, batch=30)
        assert read == pytest.approx(expected) and p_true == pytest.approx(expected, abs=0.05)


@pytest.mark.parametrize("jumps", [0, 5])
def test_inpainting_keeps_the_known_pixels_exactly_and_draws_the_hidden_ones_from_the_conditional(jumps):
    x0 = gaussian_digits(1, seed=0)
    mask = edit.make_mask("left", 1)
    n = 400
    noise = torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    # 400 levels: with fewer, the ancestral sampler itself draws too narrow a spread (at 50, 16% too narrow even with
    # nothing known; RePaint's extra steps add to it), which is the sampler's discretisation, not inpainting's
    out = edit.inpaint(ExactNoise(), ALPHA_BAR, x0.expand(n, -1, -1, -1), mask, noise, 400, jumps, 5,
                       generator=torch.Generator().manual_seed(2), progress=False)
    known = mask.expand_as(out).bool()
    assert torch.equal(out[known], x0.expand_as(out)[known])  # reproduced exactly, not approximately
    mean, variance = conditional(x0, mask)
    hidden = out.flatten(1)[:, ~mask.flatten().bool()]
    assert (hidden.mean(0) - mean).abs().max() < 0.1  # 4 standard errors of a mean over 400 draws: 4·0.3/20 = 0.06
    assert hidden.var(0).mean().item() == pytest.approx(variance.mean().item(), rel=0.1)


def test_resampling_and_guidance_bring_the_hidden_part_closer_to_the_conditional_than_replacement():
    """A strongly correlated image: the hidden half must follow the known half's z, i.e. carry the shared stroke as
    strongly as the conditional mean says. Replacement alone lags behind; RePaint's jumps and reconstruction guidance
    each tell the hidden half about the known one. Measured along the stroke, where the pixel noise S·n averages out."""
    x0 = gaussian_digits(8, seed=3)
    mask = edit.make_mask("bottom", 8)
    noise = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    means = torch.stack([conditional(x0[i], mask[i])[0] for i in range(8)])
    hidden = ~mask[0].flatten().bool()
    stroke = U[hidden] / U[hidden].norm()
    errors = []
    for jumps, guidance in [(0, 0.0), (5, 0.0), (0, 4.0)]:
        out = edit.inpaint(ExactNoise(), ALPHA_BAR, x0, mask, noise, 20, jumps, 5, guidance,
                           generator=torch.Generator().manual_seed(5), progress=False)
        errors.append(((out.flatten(1)[:, hidden] - means) @ stroke).pow(2).mean().item())
    assert errors[1] < 0.9 * errors[0] and errors[2] < 0.6 * errors[0], errors


def test_the_repaint_schedule_goes_down_to_the_digit_and_back_up_as_told():
    path = edit.repaint_schedule(10, 2, 3)
    assert path[0] == 10 and path[-1] == 0
    assert all(abs(a - b) == 1 for a, b in zip(path, path[1:]))  # one level at a time
    assert sum(b < a for a, b in zip(path, path[1:])) == 10 + 2 * 3 * len(range(0, 10 - 3, 3))  # the calls
    assert edit.repaint_schedule(10, 0, 3) == list(range(10, -1, -1))  # no jumps: plain replacement


def test_sdedit_at_strength_0_returns_the_input_and_at_1_ignores_it():
    x_in, other = gaussian_digits(4, seed=6), gaussian_digits(4, seed=7)
    noise = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(8))
    assert torch.equal(edit.sdedit(ExactNoise(), ALPHA_BAR, x_in, 0.0, noise, 20, progress=False), x_in)
    ignored = [edit.sdedit(ExactNoise(), ALPHA_BAR, x, 1.0, noise, 20, generator=torch.Generator().manual_seed(9),
                           progress=False) for x in (x_in, other)]
    assert torch.equal(*ignored)
    halfway = [edit.sdedit(ExactNoise(), ALPHA_BAR, x, 0.5, noise, 20, generator=torch.Generator().manual_seed(9),
                           progress=False) for x in (x_in, other)]
    assert not torch.allclose(*halfway, atol=0.1)  # in between, the input still counts


def test_translating_to_its_own_label_without_guidance_gives_the_digit_back():
    """Inversion then sampling with w = 1 and the same label is DDIM's round trip: close to the source."""
    x_src = gaussian_digits(4, seed=10)
    y = torch.arange(4)
    back = edit.translate(ExactNoise(), ALPHA_BAR, x_src, y, y, 1.0, 1.0, 200, progress=False)
    assert (back - x_src).abs().mean() < 0.05


def test_masks_hide_what_they_say():
    assert edit.make_mask("left", 1)[0, 0, :, :14].sum() == 0 and edit.make_mask("left", 1)[0, 0, :, 14:].all()
    assert edit.make_mask("bottom", 1)[0, 0, 14:].sum() == 0 and edit.make_mask("top", 1)[0, 0, 14:].all()
    assert edit.make_mask("centre", 1).sum() == 784 - 14 * 14
    kept = edit.make_mask("random", 50, keep=0.2, generator=torch.Generator().manual_seed(0)).mean().item()
    assert kept == pytest.approx(0.2, abs=0.01)


@pytest.fixture(scope="module")
def cf_checkpoint(tmp_path_factory):
    """An untrained width-8 conditional model, saved as chapter 5 saves it: enough to run translate end to end."""
    path = tmp_path_factory.mktemp("cf") / "classifier_free_model_final.pt"
    config = {"base_channels": 8, "channel_mults": [1, 2, 4], "attention": False,
              "schedule": {"T": 1000, "beta_1": 1e-4, "beta_T": 0.02}}
    torch.save({"kind": "classifier_free", "config": config,
                "ema": edit.build_conditional_model(config).state_dict()}, path)
    return path


@pytest.mark.parametrize("task", [["inpaint", "--mask", "centre", "--jumps", "1", "--ambiguity", "5"],
                                  ["sdedit", "--strength", "0.3", "1"],
                                  ["translate", "--to", "3"]])
def test_every_task_runs_end_to_end(task, tiny_mnist, tiny_edm_checkpoint, cf_checkpoint, tmp_path, capsys):
    checkpoint = cf_checkpoint if task[0] == "translate" else tiny_edm_checkpoint / "diffusion_model_final.pt"
    edit.main(task + ["--checkpoint", str(checkpoint), "--data-root", tiny_mnist, "--out-dir", str(tmp_path),
                      "--num-samples", "5", "--steps", "4", "--save-npz", str(tmp_path / "e.npz"), "--bf16", "off"])
    assert (tmp_path / f"edit_{task[0]}.png").is_file() and (tmp_path / f"edit_{task[0]}_all.png").is_file()
    files = sorted(tmp_path.glob("e*.npz"))
    assert [f.name for f in files] == {"inpaint": ["e.npz", "e_replacement.npz"], "sdedit": ["e_s0.3.npz", "e_s1.npz"],
                                       "translate": ["e.npz"]}[task[0]]
    npz = np.load(files[0])
    if task[0] == "inpaint":
        assert np.load(files[1])["jumps"] == 0 and npz["jumps"] == 1  # replacement's file and RePaint's
        assert np.load(files[1])["guidance"] == 0 and npz["guidance"] == 4  # guided by default
        assert "reads the true label from the visible part alone" in capsys.readouterr().out
    assert npz["images"].shape == (5, 28, 28) and npz["images"].dtype == np.uint8 and npz["labels"].shape == (5,)
    if task[0] == "translate":
        assert (npz["labels"] == 3).all()


def test_sdedit_takes_a_png_drawn_dark_on_light(tiny_edm_checkpoint, tmp_path):
    from PIL import Image
    drawing = np.full((56, 56), 255, np.uint8)
    drawing[10:46, 26:30] = 0  # a "1", dark on a white page, twice MNIST's size
    Image.fromarray(drawing).save(tmp_path / "one.png")
    x = edit.read_png(str(tmp_path / "one.png"))
    assert x.shape == (1, 1, 28, 28) and x.mean() < -0.5 and x.max() > 0.5  # inverted: a light stroke on black
    edit.main(["sdedit", "--input", str(tmp_path / "one.png"), "--strength", "0.4", "--num-samples", "3",
               "--steps", "4", "--checkpoint", str(tiny_edm_checkpoint / "diffusion_model_final.pt"),
               "--out-dir", str(tmp_path), "--save-npz", str(tmp_path / "mine.npz"), "--bf16", "off"])
    assert "labels" not in np.load(tmp_path / "mine.npz")  # your own drawing has no label to judge


def test_bad_input_gives_one_line(tmp_path, capsys):
    assert "no such file" in one_line_error(edit.main, ["sdedit", "--input", str(tmp_path / "missing.png")])
    (tmp_path / "notes.png").write_text("not a picture")
    assert "is not an image" in one_line_error(edit.read_png, str(tmp_path / "notes.png"))
    assert "src.py" in one_line_error(edit.main, ["inpaint", "--checkpoint", str(tmp_path / "none.pt")])
    assert "unknown mask" in one_line_error(lambda kind: edit.make_mask(kind, 1), "diagonal")
    assert "invalid choice" in refused_flag(edit.main, ["inpaint", "--mask", "diagonal"], capsys)
    assert "must be in [0, 1]" in refused_flag(edit.main, ["sdedit", "--strength", "1.5"], capsys)
    assert "must be a digit" in refused_flag(edit.main, ["translate", "--to", "12"], capsys)
    assert "required" in refused_flag(edit.main, [], capsys)
