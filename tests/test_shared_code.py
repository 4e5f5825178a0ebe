"""The chapters are self-contained on purpose: each has its own copy of the UNet and the schedule. These copies
must stay identical to src.py's, or a checkpoint would silently load into a different network."""
import importlib
import inspect
import os

import pytest

import src

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAPTERS = ["sample_ddim", "src_cfg", "train_distilled", "src_classifier_free"]
SHARED_WITH_SRC = ["ddpm_schedule", "timestep_embedding", "ResBlock", "SelfAttention", "UNet", "build_model",
                   "load_checkpoint", "model_from_checkpoint", "fail", "pick_device", "use_bf16", "load_mnist",
                   "to_model_range", "to_uint8", "q_sample", "save_atomic", "save_grid"]
SHARED_WITH_DDIM = ["ddim_timesteps", "ddim_step"]
present = [c for c in CHAPTERS if os.path.isfile(os.path.join(ROOT, f"{c}.py"))]


@pytest.mark.parametrize("chapter", present)
def test_shared_code_is_identical_to_the_original(chapter):
    module = importlib.import_module(chapter)
    ddim = importlib.import_module("sample_ddim")
    compared = 0
    for originals, names in [(src, SHARED_WITH_SRC), (ddim, SHARED_WITH_DDIM)]:
        for name in names:
            if hasattr(module, name) and module is not originals:
                assert inspect.getsource(getattr(module, name)) == inspect.getsource(getattr(originals, name)), \
                    f"{chapter}.{name} differs from {originals.__name__}.{name}"
                compared += 1
    # every chapter that loads src.py's checkpoint carries the whole model and schedule
    for name in ["ddpm_schedule", "timestep_embedding", "ResBlock", "SelfAttention", "UNet", "build_model"]:
        assert hasattr(module, name), f"{chapter} lacks its copy of {name}"
    assert compared >= 8
