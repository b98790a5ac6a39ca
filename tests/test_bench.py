"""The GPU benchmark scripts run their CPU smoke mode, so that the code a lent GPU will run is
exercised in CI (the figures themselves are only meaningful on a GPU)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mfu_bench_runs_train_py_steps_and_reports_throughput():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "mfu.py"), "--shape", "tiny", "--max-len", "512",
                          "--steps", "2", "--warmup", "1"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "2 packs of <= 512 tokens" in out.stdout and "tokens/s/device" in out.stdout


def test_gpu_check_runs_every_step_in_its_cpu_smoke_mode_and_refuses_without_a_gpu(tmp_path):
    import json
    out = tmp_path / "gpu-check.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--smoke", "--out", str(out)],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    report = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    assert report["all_ok"] and set(report["steps"]) == {"isolation", "zero3_step", "mfu_7b", "loss_memory",
                                                         "generation"}
    iso = report["steps"]["isolation"]["figures"]
    assert iso["isolated"] and iso["attention"] == "varlen_reference" and iso["kernel_bitwise_equal"]
    z3 = report["steps"]["zero3_step"]["figures"]
    assert z3["tokens"] > 0 and z3["attention"] == "varlen_reference"
    assert z3["checkpoint_write_s"] > 0 and z3["checkpoint_hash_s"] > 0 and 0 < z3["checkpoint_hash_share"] < 1
    assert z3["final_weights_s"] is not None
    assert report["steps"]["generation"]["figures"]["new_tokens_per_s"] > 0
    import torch
    if not torch.cuda.is_available():
        r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--out", str(tmp_path / "x")],
                           capture_output=True, text=True)
        assert r.returncode != 0 and "needs an NVIDIA GPU" in r.stderr and not (tmp_path / "x").exists()


def test_gpu_check_reports_a_failed_workers_own_error_not_only_torchruns_summary(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import gpu_check
    logs = str(tmp_path / "logs")
    rc, _, tail = gpu_check.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                                 "--log-dir", logs, "--tee", "3", os.path.join(ROOT, "train.py"), "--stage", "1",
                                 "--model", "demo_data/tiny_llama.json", "--data", str(tmp_path / "no-such-data")],
                                300, full=True)
    assert rc != 0
    err = gpu_check.worker_error(logs)
    assert err is not None and "no-such-data/stage1 not found: run prepare_data.py" in err
