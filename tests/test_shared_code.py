"""The chapters are self-contained on purpose: each has its own copy of the UNet and the schedule. These copies
must stay identical to src.py's, or a checkpoint would silently load into a different network."""
import importlib
import inspect
import os

import pytest

import src

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAPTERS = ["sample_ddim", "src_cfg", "train_distilled", "train_progressive", "train_dmd", "src_classifier_free",
            "train_flow", "train_meanflow", "edit"]
SHARED_WITH_SRC = ["HelpFormatter", "ddpm_schedule", "timestep_embedding", "ResBlock", "SelfAttention", "UNet",
                   "build_model", "load_checkpoint", "model_from_checkpoint", "fail", "pick_device", "cpu_bf16_flags", "use_bf16",
                   "load_mnist", "to_model_range", "to_uint8", "q_sample", "diffusion_loss", "save_atomic",
                   "save_grid", "EMA", "learning_rate", "positive_int", "positive_float", "ema_decay",
                   "orthogonalize", "Muon", "make_optimizer", "timestep_probs"]
SHARED_WITH_DDIM = ["ddim_timesteps", "ddim_step", "sample_ddim", "log_snr", "dpmpp_2m_step", "solver_step", "clock",
                    "restart_walks", "restart_jump"]
SHARED_WITH_CFG = ["save_rows", "digit", "non_negative_float", "sampler_walks"]
SHARED_WITH_KD = ["generate", "time_per_image", "save_outputs",  # the distillation chapters draw alike
                  "file_fingerprint", "pair_noise", "make_pairs", "distill_loss",  # and share the cached pairs
                  "cached_pair_count", "teacher_seconds_per_pair", "fit_budget",  # and plan a budget alike
                  "student_from", "student_config"]  # and build their students alike
SHARED_WITH_CF = ["ConditionalUNet", "build_conditional_model", "load_conditional", "guided_noise"]  # edit.py's
SHARED_WITH_FLOW = ["interpolate"]  # the straight path of chapters 6 and 7
SHARED_WITH_EDIT = ["fraction"]
SHARED_WITH_DMD = ["save_same_noise"]  # the same-noise figure of the one-call chapters
# what each chapter must carry: the UNet (to load src.py's checkpoint, or to extend it), and for the diffusion chapters
# the schedule and DDIM's step; the flow chapters walk a straight path instead
REQUIRED = ["timestep_embedding", "ResBlock", "SelfAttention", "UNet"]
REQUIRED_DIFFUSION = ["ddpm_schedule", "ddim_step"]
FLOWS = ["train_flow", "train_meanflow"]
present = [c for c in CHAPTERS if os.path.isfile(os.path.join(ROOT, f"{c}.py"))]


def assert_copies_identical(module):
    """Every shared function/class the module carries equals the original's source; returns how many it carries."""
    groups = [(src, SHARED_WITH_SRC), (importlib.import_module("sample_ddim"), SHARED_WITH_DDIM),
              (importlib.import_module("src_cfg"), SHARED_WITH_CFG),
              (importlib.import_module("train_distilled"), SHARED_WITH_KD),
              (importlib.import_module("src_classifier_free"), SHARED_WITH_CF),
              (importlib.import_module("train_flow"), SHARED_WITH_FLOW), (importlib.import_module("edit"), SHARED_WITH_EDIT),
              (importlib.import_module("train_dmd"), SHARED_WITH_DMD)]
    compared = 0
    for original, names in groups:
        for name in names:
            if hasattr(module, name) and module is not original:
                assert inspect.getsource(getattr(module, name)) == inspect.getsource(getattr(original, name)), \
                    f"{module.__name__}.{name} differs from {original.__name__}.{name}"
                compared += 1
    return compared


@pytest.mark.parametrize("chapter", present)
def test_shared_code_is_identical_to_the_original(chapter):
    module = importlib.import_module(chapter)
    compared = assert_copies_identical(module)
    for name in REQUIRED + (REQUIRED_DIFFUSION if chapter not in FLOWS else []):
        assert hasattr(module, name), f"{chapter} lacks its copy of {name}"
    assert compared >= 12


def test_the_evaluators_helpers_are_identical_copies_too():
    import evaluate  # no UNet of its own, but the same argument, device and data helpers
    assert assert_copies_identical(evaluate) >= 4


def test_the_extended_unets_extend_the_shared_one():
    import src_classifier_free as cf
    import train_meanflow as mf
    for module, extended in [(cf, cf.ConditionalUNet), (mf, mf.MeanFlowUNet)]:
        assert issubclass(extended, module.UNet)
        assert inspect.getsource(module.UNet) == inspect.getsource(src.UNet)
