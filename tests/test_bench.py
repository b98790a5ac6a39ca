"""The GPU benchmark scripts run their CPU smoke mode, so that the code a lent GPU will run is
exercised in CI (the figures themselves are only meaningful on a GPU)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mfu_bench_runs_train_py_steps_and_reports_throughput():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "mfu.py"), "--shape", "tiny", "--max-len", "512",
                          "--steps", "2", "--warmup", "1"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "2 packs of <= 512 tokens" in out.stdout and "tokens/s/device" in out.stdout
