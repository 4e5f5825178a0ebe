"""gpu_benchmark.py: every step runs end to end on the CPU with --tiny, and the table reports each measurement."""
import gpu_benchmark


def test_tiny_run_prints_the_table(tiny_mnist, tmp_path, capsys):
    gpu_benchmark.main(["--tiny", "--device", "cpu", "--data-root", tiny_mnist, "--out-dir", str(tmp_path),
                        "--num-samples", "8"])
    table = (tmp_path / "gpu_benchmark.md").read_text()
    assert table in capsys.readouterr().out
    for row in ["| device | cpu, torch", "| training | 16 steps (2 epochs)", "| FID DDIM-50 η=1, N = 8 |",
                "| FID DDPM-1000, N = 8 |", "| images/s: DDPM ancestral, 1000 steps (src.py) |",
                "| images/s: DPM-Solver++(2M) SDE 20 steps (sample_ddim.py) |"]:
        assert row in table, row
