"""train.py against the faults of real clusters: every checkpoint carries a manifest (sizes and
sha256, written last); --resume auto takes the newest checkpoint that verifies and says why it
skipped the others; it never starts afresh over existing checkpoints; a save that fails keeps
the previous checkpoint in use. The reference is an uninterrupted run of the same command."""
import json
import os
import shutil

import pytest

import train
from test_train import read_log, save_tiny_llama

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, demo_prepared):
    return save_tiny_llama(str(tmp_path_factory.mktemp("faults") / "llama"), os.path.join(demo_prepared, "tokenizer"))


def args(data, model, out, *extra):
    return ["--stage", "1", "--data", data, "--model", model, "--out-dir", str(out), "--max-len", "512",
            "--lr", "1e-3", "--warmup-ratio", "0", "--max-steps", "8", "--save-every", "2", "--keep-last", "3",
            "--zero-stage", "0", "--log-every", "100", *extra]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, demo_prepared, tiny):
    out = tmp_path_factory.mktemp("straight")
    assert train.main(args(demo_prepared, tiny, out)) == 0
    return [r["loss"] for r in read_log(str(out / "stage1"))]


def ckpts(out):
    return os.path.join(out, "stage1", "checkpoints")


def stopped_at_6(demo_prepared, tiny, out):
    assert train.main(args(demo_prepared, tiny, out, "--stop-after", "6")) == 0
    root = ckpts(out)
    assert sorted(d for d in os.listdir(root) if d.startswith("step-")) == ["step-0000002", "step-0000004", "step-0000006"]
    manifest = json.load(open(os.path.join(root, "step-0000006", "manifest.json")))
    assert manifest["step"] == 6 and {"state.pt", "rng-0.pt"} <= set(manifest["files"])
    return root


def assert_resumed_like_straight(out, straight):
    log = read_log(str(out / "stage1"))
    assert [r["step"] for r in log] == list(range(1, 9))  # every step logged once
    assert [r["loss"] for r in log] == pytest.approx(straight, rel=1e-6, abs=1e-6)


def test_a_truncated_newest_checkpoint_is_skipped_and_the_previous_one_resumed(tmp_path, demo_prepared, tiny,
                                                                               straight, capsys):
    root = stopped_at_6(demo_prepared, tiny, tmp_path)
    state = os.path.join(root, "step-0000006", "state.pt")
    with open(state, "r+b") as f:  # a copy cut short / a disk fault
        f.truncate(os.path.getsize(state) // 2)
    capsys.readouterr()
    assert train.main(args(demo_prepared, tiny, tmp_path)) == 0  # used to die in torch's zip reader
    said = capsys.readouterr().out
    assert "skipping checkpoint step-0000006: " in said and "state.pt has" in said
    assert "resumed from " + os.path.join(root, "step-0000004") in said
    assert_resumed_like_straight(tmp_path, straight)


def test_latest_naming_a_missing_folder_resumes_from_the_newest_complete_checkpoint(tmp_path, demo_prepared, tiny,
                                                                                   straight, capsys):
    root = stopped_at_6(demo_prepared, tiny, tmp_path)
    shutil.rmtree(os.path.join(root, "step-0000006"))  # `latest` still says step-0000006
    capsys.readouterr()
    assert train.main(args(demo_prepared, tiny, tmp_path)) == 0  # used to restart from step 0 and cut the log
    said = capsys.readouterr().out
    assert "names step-0000006, which does not exist" in said and "resumed from" in said
    assert_resumed_like_straight(tmp_path, straight)


def test_an_explicit_resume_that_fails_verification_stops_naming_the_file(tmp_path, demo_prepared, tiny):
    root = stopped_at_6(demo_prepared, tiny, tmp_path)
    state = os.path.join(root, "step-0000004", "state.pt")
    with open(state, "r+b") as f:  # same size, one byte changed: only the sha256 can tell
        f.seek(os.path.getsize(state) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(SystemExit, match=r"--resume .*step-0000004: .*state.pt does not match its sha256"):
        train.main(args(demo_prepared, tiny, tmp_path, "--resume", os.path.join(root, "step-0000004")))
    os.remove(os.path.join(root, "step-0000002", "manifest.json"))
    with pytest.raises(SystemExit, match=r"manifest.json is missing"):
        train.main(args(demo_prepared, tiny, tmp_path, "--resume", os.path.join(root, "step-0000002")))


def test_when_no_checkpoint_verifies_the_run_stops_instead_of_starting_afresh(tmp_path, demo_prepared, tiny):
    root = stopped_at_6(demo_prepared, tiny, tmp_path)
    for d in ("step-0000002", "step-0000004", "step-0000006"):
        with open(os.path.join(root, d, "state.pt"), "r+b") as f:
            f.truncate(100)
    with pytest.raises(SystemExit, match=r"no checkpoint in .* verifies \(3 found.*not starting afresh"):
        train.main(args(demo_prepared, tiny, tmp_path))
    assert len(read_log(str(tmp_path / "stage1"))) == 6  # the log of the 6 steps is left alone


def test_a_failed_save_keeps_the_previous_checkpoint_and_the_next_run_resumes_from_it(tmp_path, demo_prepared, tiny,
                                                                                      straight, monkeypatch):
    real_save = train.torch.save
    calls = {"state": 0}

    def failing_save(obj, path, *a, **k):
        if str(path).endswith("state.pt"):
            calls["state"] += 1
            if calls["state"] == 2:  # the save at step 4: the disk is full
                raise OSError(28, "No space left on device")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(train.torch, "save", failing_save)
    with pytest.raises(SystemExit, match=r"saving checkpoint step-0000004 failed \(rank 0: OSError: .*No space left "
                                         r"on device\); the previous checkpoint .*step-0000002 is intact"):
        train.main(args(demo_prepared, tiny, tmp_path))
    root = ckpts(tmp_path)
    assert open(os.path.join(root, "latest")).read() == "step-0000002"
    assert sorted(os.listdir(root)) == ["latest", "step-0000002"]  # no half-written folder left behind
    assert train.verify_checkpoint(os.path.join(root, "step-0000002")) is None
    monkeypatch.setattr(train.torch, "save", real_save)
    assert train.main(args(demo_prepared, tiny, tmp_path)) == 0
    assert_resumed_like_straight(tmp_path, straight)


# ---------------------------------------------------------------------------------------------
# One writer per run folder; workers do not outlive their launcher

def wait_for(predicate, seconds, what):
    import time
    for _ in range(int(seconds * 10)):
        if predicate():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def test_a_second_run_on_a_busy_run_folder_is_refused_and_orphaned_workers_stop(tmp_path, demo_prepared, tiny):
    import signal
    import subprocess
    import sys

    import psutil
    from test_train_scale import PORT
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(next(PORT)),
           train.__file__, *args(demo_prepared, tiny, out, "--max-steps", "120", "--save-every", "1000")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "run.out", "w") as f:
        launcher = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    run = out / "stage1"
    wait_for(lambda: (run / "log.jsonl").exists() and len(read_log(str(run))) >= 3, 240, "3 steps")
    lock = open(run / ".lock").read()
    assert lock.startswith("host ") and " pid " in lock
    # the same command again while the first runs: refused, naming the holder
    second = subprocess.run([sys.executable, train.__file__, *args(demo_prepared, tiny, out, "--max-steps", "120")],
                            capture_output=True, text=True, env=env)
    assert second.returncode != 0 and "is in use by host" in second.stderr, second.stderr[-2000:]
    # the launcher alone is killed (its workers run in sessions of their own): they checkpoint and stop
    workers = psutil.Process(launcher.pid).children(recursive=True)
    assert len(workers) >= 2
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    wait_for(lambda: not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers), 120,
             "the orphaned workers to exit")
    steps = len(read_log(str(run)))
    assert steps < 120
    assert open(run / "checkpoints" / "latest").read() == f"step-{steps:07d}"
    # the folder is free again: the same command resumes where they stopped
    r = subprocess.run([sys.executable, train.__file__, *args(demo_prepared, tiny, out, "--max-steps", str(steps + 2))],
                       capture_output=True, text=True, env=env)
    assert r.returncode != 0 and "other settings" in r.stderr  # a changed schedule is refused, as always
    r = subprocess.run(cmd[:6] + [str(next(PORT))] + cmd[7:], capture_output=True, text=True, env=env,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    log = read_log(str(run))
    assert [x["step"] for x in log] == list(range(1, 121))
    assert "has ended; taking over its folder" in r.stdout + r.stderr
