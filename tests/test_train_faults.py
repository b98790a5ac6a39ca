"""train.py against the faults of real clusters: every checkpoint carries a manifest (sizes and
sha256, written last); --resume auto takes the newest checkpoint that verifies and says why it
skipped the others; it never starts afresh over existing checkpoints; a save that fails keeps
the previous checkpoint in use. The reference is an uninterrupted run of the same command."""
import json
import os
import shutil

import pytest

import train
from conftest import PORT, read_log

pytestmark = pytest.mark.slow


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
    assert sorted(d for d in os.listdir(root) if d.startswith("step-")) == ["step-0000002", "step-0000004",
                                                                            "step-0000006"]
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
    said = capsys.readouterr().err
    assert "skipping checkpoint step-0000006: " in said and "state.pt has" in said
    assert "resumed from " + os.path.join(root, "step-0000004") in said
    assert_resumed_like_straight(tmp_path, straight)


def test_latest_naming_a_missing_folder_resumes_from_the_newest_complete_checkpoint(tmp_path, demo_prepared, tiny,
                                                                                   straight, capsys):
    root = stopped_at_6(demo_prepared, tiny, tmp_path)
    shutil.rmtree(os.path.join(root, "step-0000006"))  # `latest` still says step-0000006
    capsys.readouterr()
    assert train.main(args(demo_prepared, tiny, tmp_path)) == 0  # used to restart from step 0 and cut the log
    said = capsys.readouterr().err
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


def test_sigterm_during_a_save_lets_it_finish_then_checkpoints_and_stops(tmp_path, demo_prepared, tiny, straight,
                                                                        monkeypatch):
    import signal
    real_save = train.torch.save

    def save_then_sigterm(obj, path, *a, **k):
        if str(path).endswith("state.pt") and "step-0000004" in str(path):
            os.kill(os.getpid(), signal.SIGTERM)  # preemption arrives in the middle of the save
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(train.torch, "save", save_then_sigterm)
    with pytest.raises(SystemExit, match="^143$"):  # (not kept: its traceback would hold the run's lock)
        train.main(args(demo_prepared, tiny, tmp_path))
    root = ckpts(tmp_path)
    # the interrupted save completed and verifies; the step after it was checkpointed, then the run stopped
    assert sorted(d for d in os.listdir(root) if d.startswith("step-")) == ["step-0000002", "step-0000004",
                                                                            "step-0000005"]
    assert all(train.verify_checkpoint(os.path.join(root, d)) is None for d in ("step-0000004", "step-0000005"))
    assert open(os.path.join(root, "latest")).read() == "step-0000005"
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
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(next(PORT)),
           train.__file__, *args(demo_prepared, tiny, out, "--max-steps", "80", "--save-every", "1000")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "run.out", "w") as f:
        launcher = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    run = out / "stage1"
    wait_for(lambda: (run / "log.jsonl").exists() and len(read_log(str(run))) >= 3, 240, "3 steps")
    lock = open(run / ".lock").read()
    assert lock.startswith("host ") and " pid " in lock
    # the same command again while the first runs: refused, naming the holder
    second = subprocess.run([sys.executable, train.__file__, *args(demo_prepared, tiny, out, "--max-steps", "80")],
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
    assert steps < 80
    assert open(run / "checkpoints" / "latest").read() == f"step-{steps:07d}"
    # the folder is free again: the same command resumes where they stopped
    r = subprocess.run([sys.executable, train.__file__, *args(demo_prepared, tiny, out, "--max-steps", "1000")],
                       capture_output=True, text=True, env=env)
    # a changed schedule is refused
    assert r.returncode != 0 and "other settings" in r.stderr, (r.stdout + r.stderr)[-3000:]
    r = subprocess.run(cmd[:6] + [str(next(PORT))] + cmd[7:], capture_output=True, text=True, env=env,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    log = read_log(str(run))
    assert [x["step"] for x in log] == list(range(1, 81))
    assert "has ended; taking over its folder" in r.stdout + r.stderr


def test_resume_plan_keeps_the_global_batch_when_it_can_and_says_what_changed_when_not(monkeypatch):
    said = []
    monkeypatch.setattr(train, "log", said.append)
    pos = {"step": 10, "epoch": 0, "packs_done": 40, "world_size": 4, "grad_accum": 2, "global_batch": 8,
           "total_steps": 30}
    assert train.resume_plan(pos, 4, 2) == (2, None) and not said
    assert train.resume_plan(pos, 2, 2) == (4, None)  # 2 ranks x 4 = 8 packs per step
    assert train.resume_plan(pos, 8, 2) == (1, None)
    assert "keeps its global batch of 8 packs" in said[-1]
    # 3 ranks cannot make 8 packs per step: 3 x 2 = 6, the remaining 20 steps' data takes 27
    assert train.resume_plan(pos, 3, 2) == (2, 10 + 27)
    assert "3 does not divide 8" in said[-1] and "global batch becomes 6" in said[-1] and "37 in all" in said[-1]
    # an explicitly changed --grad-accum on the same ranks is a changed global batch, and said so
    assert train.resume_plan(pos, 4, 4) == (4, 10 + 10)
    assert "--grad-accum changed from 2" in said[-1]


def test_a_changed_global_batch_continues_at_the_same_pack_and_keeps_its_stretched_schedule(tmp_path, demo_prepared,
                                                                                             tiny, capsys):
    assert train.main(args(demo_prepared, tiny, tmp_path, "--stop-after", "3")) == 0  # 1 pack per step
    capsys.readouterr()
    assert train.main(args(demo_prepared, tiny, tmp_path, "--grad-accum", "2", "--stop-after", "1")) == 0
    said = capsys.readouterr().err
    assert "--grad-accum changed from 1" in said and "takes 3 more steps instead of 5 (6 in all)" in said
    assert train.main(args(demo_prepared, tiny, tmp_path, "--grad-accum", "2")) == 0  # the stretched schedule holds
    log = read_log(str(tmp_path / "stage1"))
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert [r["packs"] for r in log] == [[0], [1], [2], [3, 4], [5, 6], [7, 8]]  # no pack skipped or repeated
    assert log[-1]["lr"] < log[2]["lr"]


def test_a_checkpoint_whose_manifest_predates_the_data_position_resumes_from_the_run_config(tmp_path, demo_prepared,
                                                                                          tiny, straight):
    root = stopped_at_6(demo_prepared, tiny, tmp_path)
    path = os.path.join(root, "step-0000006", "manifest.json")
    manifest = json.load(open(path))
    del manifest["position"]  # as the previous train.py wrote it
    json.dump(manifest, open(path, "w"))
    assert train.checkpoint_position(os.path.dirname(path), str(tmp_path / "stage1"))["packs_done"] == 6
    assert train.main(args(demo_prepared, tiny, tmp_path)) == 0
    assert_resumed_like_straight(tmp_path, straight)
