"""Nothing a user changes on resume is silently ignored (train.py resume_step): a setting that
defines the run is refused by name; one that users change on purpose (the lr after a NaN stop,
clipping, the save cadence) is applied from the resumed step on, said, and recorded in
train_config.json's "changes". The references are the schedule written out by hand and the runs
themselves."""
import json
import math
import os
import shutil

import pytest

import train
from conftest import read_log

pytestmark = pytest.mark.slow


def args(data, model, out, *extra):
    return ["--stage", "1", "--data", data, "--model", model, "--out-dir", str(out), "--max-len", "512",
            "--lr", "1e-3", "--warmup-ratio", "0.05", "--max-steps", "30", "--save-every", "5", "--seed", "0",
            "--zero-stage", "0", "--log-every", "100", *extra]


def config(out):
    return json.load(open(os.path.join(out, "stage1", "train_config.json")))


def cosine(step, total, warmup, peak):
    """The schedule written out: linear warmup, then cosine to 0 (the lr used at 0-based `step`)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def test_every_setting_in_the_run_config_is_classified_for_resume(tmp_path, demo_prepared, tiny):
    assert train.main(args(demo_prepared, tiny, tmp_path, "--max-steps", "1")) == 0
    keys = set(config(tmp_path))
    sets = (train.RESUME_REFUSED, train.RESUME_APPLIED, train.RESUME_FREE)
    assert keys == set().union(*sets)
    assert sum(len(s) for s in sets) == len(set().union(*sets))  # disjoint


def test_a_changed_lr_is_applied_from_the_resumed_step_said_and_recorded(tmp_path, demo_prepared, tiny, capsys):
    assert train.main(args(demo_prepared, tiny, tmp_path, "--stop-after", "10")) == 0
    capsys.readouterr()
    assert train.main(args(demo_prepared, tiny, tmp_path, "--lr", "2e-3")) == 0
    err = "".join(capsys.readouterr())
    assert "warning: --lr changed since the run being resumed: 0.001 -> 0.002, applied from step 11 on" in err
    log = read_log(str(tmp_path / "stage1"))
    assert [r["step"] for r in log] == list(range(1, 31))
    warmup = int(0.05 * 30)
    for r in log:  # steps 1-10 at the old peak, 11 on at the new one, on the same schedule
        peak = 1e-3 if r["step"] <= 10 else 2e-3
        assert r["lr"] == pytest.approx(cosine(r["step"] - 1, 30, warmup, peak), rel=1e-9), r["step"]
    cfg = config(tmp_path)
    assert cfg["lr"] == 0.002 and cfg["changes"] == [{"setting": "lr", "old": 0.001, "new": 0.002, "from_step": 11}]
    assert json.load(open(tmp_path / "stage1" / "final" / "train_config.json"))["changes"] == cfg["changes"]


def test_after_a_nan_stop_a_lower_lr_lets_the_run_go_on(tmp_path, demo_prepared, tiny):
    """The standard recovery. Five good steps are saved; resumed with an lr that blows the weights
    up (applied: with it ignored, nothing would happen), the run stops at the first non-finite
    loss, before the bad update, naming the last good checkpoint; the same command with a low lr
    resumes from that checkpoint and finishes."""
    assert train.main(args(demo_prepared, tiny, tmp_path, "--stop-after", "5", "--clip", "0")) == 0
    with pytest.raises(SystemExit, match=r"loss is (nan|inf) at step 7.*last good checkpoint is .*step-0000005"):
        train.main(args(demo_prepared, tiny, tmp_path, "--lr", "1e30", "--clip", "0"))
    assert train.main(args(demo_prepared, tiny, tmp_path, "--lr", "1e-4", "--clip", "0")) == 0
    log = read_log(str(tmp_path / "stage1"))
    assert [r["step"] for r in log] == list(range(1, 31)) and all(math.isfinite(r["loss"]) for r in log)
    assert [(c["setting"], c["new"], c["from_step"]) for c in config(tmp_path)["changes"]] == \
        [("lr", 1e30, 6), ("lr", 1e-4, 6)]


def test_settings_that_define_the_run_are_refused_by_name(tmp_path, demo_prepared, tiny):
    assert train.main(args(demo_prepared, tiny, tmp_path, "--stop-after", "5")) == 0
    for flag, value, name in (("--seed", "1", "seed"), ("--max-len", "1024", "max_len"),
                              ("--oversize", "truncate", "oversize"), ("--max-steps", "40", "max_steps"),
                              ("--dtype", "bf16", "compute_dtype")):
        with pytest.raises(SystemExit, match=rf"other settings \((.*; )?{name}: .* -> .*\).*--resume none"):
            train.main(args(demo_prepared, tiny, tmp_path, flag, value))
    # and nothing was touched: the unchanged command still resumes at step 6
    assert train.main(args(demo_prepared, tiny, tmp_path, "--stop-after", "1")) == 0
    assert read_log(str(tmp_path / "stage1"))[-1]["step"] == 6


def test_a_changed_save_cadence_and_clip_take_effect(tmp_path, demo_prepared, tiny, capsys):
    assert train.main(args(demo_prepared, tiny, tmp_path, "--stop-after", "10")) == 0
    assert train.main(args(demo_prepared, tiny, tmp_path, "--save-every", "3", "--keep-last", "10", "--clip", "0.5",
                           "--stop-after", "6")) == 0
    err = "".join(capsys.readouterr())
    for name in ("--save-every", "--keep-last", "--clip"):
        assert f"warning: {name} changed since the run being resumed" in err
    steps = sorted(d for d in os.listdir(tmp_path / "stage1" / "checkpoints") if d.startswith("step-"))
    assert steps[-3:] == ["step-0000012", "step-0000015", "step-0000016"]  # every 3rd, and at the stop
    assert {c["setting"] for c in config(tmp_path)["changes"]} == {"save_every", "keep_last", "clip"}


def test_an_unchanged_resume_says_nothing_and_records_no_change(tmp_path, demo_prepared, tiny, capsys):
    assert train.main(args(demo_prepared, tiny, tmp_path, "--stop-after", "5", "--log-every", "1")) == 0
    assert train.main(args(demo_prepared, tiny, tmp_path, "--stop-after", "5")) == 0  # log_every: free
    assert "changed since" not in "".join(capsys.readouterr()) and config(tmp_path)["changes"] == []


def test_a_copied_run_folder_resumes_where_the_original_stopped(tmp_path, demo_prepared, capsys):
    """The model a run starts from lives inside its folder (init/ from a config .json): it is
    compared by its place in --out-dir, so a copy of the folder resumes."""
    model = os.path.join(train.__file__.rsplit("/", 1)[0], "demo_data", "tiny_llama.json")
    a = args(demo_prepared, model, tmp_path / "a", "--max-steps", "8")
    assert train.main(a + ["--stop-after", "5"]) == 0
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "a")
    b = args(demo_prepared, model, tmp_path / "b", "--max-steps", "8")
    capsys.readouterr()
    assert train.main(b) == 0
    assert "resumed from" in "".join(capsys.readouterr())
    assert [r["step"] for r in read_log(str(tmp_path / "b" / "stage1"))] == list(range(1, 9))
    assert config(tmp_path / "b")["model_in_out_dir"] == os.path.join("stage1", "init")


def test_a_new_lr_holds_even_when_its_first_run_died_before_a_checkpoint(tmp_path, demo_prepared, tiny, monkeypatch):
    """The run that lowered the lr recorded it in train_config.json and died (OOM, a lost node)
    before its first save; the same command again must train at the new lr, not the checkpoint's."""
    assert train.main(args(demo_prepared, tiny, tmp_path, "--stop-after", "5")) == 0

    def crash(*a, **k):
        raise RuntimeError("lost the node")
    with monkeypatch.context() as m:
        m.setattr(train, "forward_backward", crash)
        with pytest.raises(RuntimeError, match="lost the node"):
            train.main(args(demo_prepared, tiny, tmp_path, "--lr", "1e-4"))
    assert config(tmp_path)["lr"] == 1e-4  # already recorded
    assert train.main(args(demo_prepared, tiny, tmp_path, "--lr", "1e-4", "--stop-after", "2")) == 0
    log = read_log(str(tmp_path / "stage1"))
    assert [r["step"] for r in log] == list(range(1, 8))
    for r in log[5:]:
        assert r["lr"] == pytest.approx(cosine(r["step"] - 1, 30, int(0.05 * 30), 1e-4), rel=1e-9), r["step"]
