"""The shipped weights load into today's code (weights_only), sample finite digits deterministically, and - where
real MNIST is present - score within 10% of the number RESULTS.md records for them, by the recorded command."""
import json
import os
import re

import numpy as np
import pytest
import torch

import evaluate
import sample_ddim
import ship_weights
import src_cfg
import src_classifier_free
import train_distilled
import train_dmd
import train_flow
import train_meanflow
from conftest import REAL_MNIST, needs_real_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = os.path.join(ROOT, "weights")
CPU = torch.device("cpu")
SHIPPED = ["diffusion_model_final.pt", "noisy_classifier.pt", "distilled_model_final.pt", "dmd_model_final.pt",
           "classifier_free_model_final.pt", "flow_model_final.pt", "reflow_model_final.pt", "meanflow_model_final.pt",
           "mnist_classifier.pt", "mnist_mlp.pt"]


def shipped(name):
    return torch.load(os.path.join(WEIGHTS, name), map_location="cpu", weights_only=True)


def test_every_shipped_file_is_there_and_small():
    sizes = {name: os.path.getsize(os.path.join(WEIGHTS, name)) for name in SHIPPED}
    assert sum(sizes.values()) <= 20e6, sizes
    assert sorted(os.listdir(WEIGHTS)) == sorted(SHIPPED)


def digits_twice(draw):
    """draw(seed) twice with one seed and once with another: finite, in range, deterministic, not constant."""
    first, again, other = draw(0), draw(0), draw(1)
    assert torch.isfinite(first).all() and first.abs().max() < 50
    assert torch.equal(first, again) and not torch.equal(first, other)
    return first


def test_the_ddpm_and_its_one_step_students_sample_in_todays_code():
    ckpt = shipped("diffusion_model_final.pt")
    model = sample_ddim.model_from_checkpoint(ckpt, "weights").eval()
    sched = sample_ddim.ddpm_schedule(**ckpt["config"]["schedule"])
    digits_twice(lambda seed: sample_ddim.sample_dpmpp(
        model, sched, torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(seed)), 5, True,
        generator=torch.Generator().manual_seed(seed), progress=False))
    for chapter, name in [(train_distilled, "distilled_model_final.pt"), (train_dmd, "dmd_model_final.pt")]:
        student_ckpt = shipped(name)
        student = chapter.model_from_checkpoint(student_ckpt, name).eval()
        x = digits_twice(lambda seed: chapter.generate(
            student, sched, torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(seed))))
        assert x.shape == (4, 1, 28, 28)


def test_the_flows_sample_in_todays_code():
    for name, calls in [("flow_model_final.pt", 4), ("reflow_model_final.pt", 1)]:
        flow = train_flow.model_from_checkpoint(shipped(name), name).eval()
        digits_twice(lambda seed: train_flow.sample_flow(
            flow, torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(seed)), calls, progress=False))
    ckpt = shipped("meanflow_model_final.pt")
    meanflow = train_meanflow.build_meanflow_model(ckpt["config"])
    meanflow.load_state_dict(ckpt["ema"])
    digits_twice(lambda seed: train_meanflow.sample_meanflow(
        meanflow.eval(), torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(seed))))


def test_the_guidance_models_and_reference_networks_load_in_todays_code():
    model, ckpt = src_classifier_free.load_conditional(os.path.join(WEIGHTS, "classifier_free_model_final.pt"), CPU)
    sched = src_classifier_free.ddpm_schedule(**ckpt["config"]["schedule"])
    y = torch.tensor([3, 8])
    digits_twice(lambda seed: src_classifier_free.sample_guided(
        model, sched, torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(seed)), y, 2.5, 5,
        generator=torch.Generator().manual_seed(seed), progress=False))
    classifier = src_cfg.NoisyClassifier()
    classifier.load_state_dict(shipped("noisy_classifier.pt")["model"])
    assert shipped("noisy_classifier.pt")["schedule"] == shipped("diffusion_model_final.pt")["config"]["schedule"]
    for kind, name in evaluate.NETWORKS.items():
        network = evaluate.MnistClassifier(kind)
        network.load_state_dict(shipped(name)["model"])
        logits, feats = network(torch.zeros(3, 28, 28, dtype=torch.uint8))
        assert logits.shape == (3, 10) and torch.isfinite(feats).all()


def test_ship_weights_keeps_the_ema_and_drops_what_only_training_needs(tmp_path):
    ckpt = {"kind": "ddpm", "config": {"a": 1}, "model": {"w": torch.ones(2)}, "ema": {"w": torch.zeros(2)},
            "optimizer": {"state": 1}, "losses": [0.5]}
    torch.save(ckpt, tmp_path / "x.pt")
    ship_weights.main([str(tmp_path / "x.pt"), "--out-dir", str(tmp_path / "out")])
    slim = torch.load(tmp_path / "out" / "x.pt", weights_only=True)
    assert set(slim) == {"kind", "config", "ema", "losses"} and torch.equal(slim["ema"]["w"], torch.zeros(2))
    classifier = {"kind": "noisy_classifier", "schedule": {}, "model": {"w": torch.ones(1)}}
    assert ship_weights.slim(classifier) == classifier  # no EMA: its weights stay


def test_a_chapter_falls_back_to_the_shipped_weights_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no run of the learner's own here
    ckpt = sample_ddim.load_checkpoint("diffusion_model_final.pt", CPU)
    assert ckpt["kind"] == "ddpm" and "shipped weights/diffusion_model_final.pt" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a path the learner named is never swapped for the shipped one
        sample_ddim.load_checkpoint(os.path.join("runs", "diffusion_model_final.pt"), CPU)


def recorded_checks():
    """RESULTS.md's shipped-weights table: (file, command line(s), recorded value)."""
    text = open(os.path.join(ROOT, "RESULTS.md"), encoding="utf-8").read()
    rows = re.findall(r"^\| `weights/(\S+)` \| .*? \| `(python [^`]+)` \| ([\d.]+) \|$", text, re.M)
    assert len(rows) >= 5, "RESULTS.md lost its shipped-weights table"
    return rows


@pytest.fixture(scope="module")
def reference_cache(tmp_path_factory):
    """One folder for evaluate.py's cache, so the shipped networks' test statistics are computed once per process."""
    return str(tmp_path_factory.mktemp("reference"))


@needs_real_mnist
@pytest.mark.parametrize("name, command, recorded", recorded_checks(), ids=lambda v: str(v)[:30])
def test_shipped_weights_score_what_results_records(name, command, recorded, reference_cache, tmp_path, monkeypatch,
                                                    capsys):
    """The recorded N = 500 check, run as written (sampling, then evaluate.py's FID with the shipped networks)."""
    import importlib
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MNIST_ROOT", REAL_MNIST)  # the chapters' --data-root default
    script, *argv = command.split()[1:]
    importlib.import_module(script[:-3]).main(argv + ["--save-npz", "s.npz"])
    npz = sorted(p for p in os.listdir(tmp_path) if p.endswith(".npz"))[0]
    capsys.readouterr()
    evaluate.main([npz, "--json", "--data-root", REAL_MNIST, "--out-dir", reference_cache])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(np.load(npz)["images"]) == 500
    assert abs(result["fid"] - float(recorded)) <= 0.1 * float(recorded), (name, result["fid"], recorded)
