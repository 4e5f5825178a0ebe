"""gpu_benchmark.py: every step runs end to end on the CPU with --tiny (the sampler benchmark with known timings:
it is tested in test_evaluate.py), and the table reports each measurement."""
import evaluate
import gpu_benchmark


def test_tiny_run_prints_the_table(tiny_mnist, tmp_path, capsys, monkeypatch):
    # Known timings in place of the benchmark (its 1000-step sampler then runs once per test session): they must
    # reach the table as they are.
    rows = [{"sampler": "DDPM ancestral, 1000 steps (src.py)", "seconds_per_batch": 2.0, "images_per_second": 2.0},
            {"sampler": "DPM-Solver++(2M) SDE 20 steps (sample_ddim.py)", "seconds_per_batch": 0.05,
             "images_per_second": 80.0}]
    for row in rows:
        row["speedup_vs_ddpm_1000"] = row["images_per_second"] / 2.0
    monkeypatch.setattr(evaluate, "benchmark", lambda args, device: (rows, []))
    gpu_benchmark.main(["--tiny", "--device", "cpu", "--data-root", tiny_mnist, "--out-dir", str(tmp_path),
                        "--num-samples", "8"])
    table = (tmp_path / "gpu_benchmark.md").read_text()
    assert table in capsys.readouterr().out
    for row in ["| device | cpu, torch", "| training | 16 steps (2 epochs)", "| FID DDIM-50 η=1, N = 8 |",
                "| FID DDPM-1000, N = 8 |", "| images/s: DDPM ancestral, 1000 steps (src.py) | 2.0 (batch 4, 1.0x",
                "| images/s: DPM-Solver++(2M) SDE 20 steps (sample_ddim.py) | 80.0 (batch 4, 40.0x DDPM-1000) |"]:
        assert row in table, row
