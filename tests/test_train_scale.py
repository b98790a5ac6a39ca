"""train.py as users launch it: torchrun with 2 ranks (gloo, CPU), DeepSpeed ZeRO-3 from
ds_config.json, stage 1 then stage 2, checkpoints that survive kill -9 and SIGTERM, NaN stops,
the final Hugging Face folder, LoRA, continued pre-training and the logs.

Each claim is checked against an independent computation: ZeRO-3 against the plain PyTorch path,
a resumed run against an uninterrupted one, stage 2's first loss against stage 1's weights
evaluated directly, the final folder against DeepSpeed's own fp32 reconstruction of the shards."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

import train
from conftest import PORT, read_log

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(args, nproc=2, wait=True, log=None, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(next(PORT)), os.path.join(ROOT, "train.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:  # output to a file: an unread pipe would fill up and block the run
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **kw)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, **kw)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out


def common(data, model, out, *extra):
    return ["--data", data, "--model", model, "--out-dir", str(out), "--max-len", "512", "--lr", "1e-3",
            "--warmup-ratio", "0", "--log-every", "100", *extra]


def losses(run_dir):
    return [r["loss"] for r in read_log(run_dir)]


def first_step_loss(model_dir, data_dir, max_len, world, accum, seed=42):
    """Loss of a run's first optimizer step, computed directly from the starting weights with the
    same packing: the sum of token losses over the step's packs / their trained tokens."""
    from datasets import load_from_disk
    ds = load_from_disk(data_dir)
    n_trained, _, _ = train.scan_tokens(ds)
    idx, sel_len, _ = train.select_samples(ds["length"], n_trained, max_len, "drop")
    packs = train.pack_best_fit(sel_len, max_len, seed, 0)
    plan = train.step_plan(len(packs), world, accum)[0]
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for p in (p for rank in plan for p in rank if p is not None):
            b = train.collate_pack(ds.select(idx[packs[p]]), max_len)
            total += train.packed_loss_sum(model, b, 256).item()
            n += train.trained_tokens(b["labels"])
    return total / n


# ---------------------------------------------------------------------------------------------
# The two stages under torchrun + DeepSpeed ZeRO-3

def test_stage1_then_stage2_under_torchrun_with_zero3(tmp_path, demo_prepared, tiny):
    out = tmp_path / "out"
    torchrun(["--stage", "1", *common(demo_prepared, tiny, out, "--max-steps", "6", "--save-every", "3")])
    # no --model: stage 2 starts from <out-dir>/stage1/final
    torchrun(["--stage", "2", "--data", demo_prepared, "--out-dir", str(out), "--max-len", "512", "--lr", "1e-3",
              "--warmup-ratio", "0", "--max-steps", "4"])
    s1, s2 = out / "stage1", out / "stage2"
    for run, steps in ((s1, 6), (s2, 4)):
        assert [r["step"] for r in read_log(run)] == list(range(1, steps + 1))
        cfg = json.load(open(run / "train_config.json"))
        assert cfg["zero_stage"] == 3 and cfg["world_size"] == 2
        for f in ("loss.png", "final/model.safetensors", "final/tokenizer.json", "final/chat_template.jinja",
                  "final/train_config.json", "checkpoints/latest"):
            assert (run / f).exists(), f"{run}/{f}"
        rec = read_log(run)[-1]
        for k in ("lr", "grad_norm", "tokens_per_s_per_device", "tflops_per_device", "fill", "peak_mem_gib"):
            assert rec[k] is not None and rec[k] > 0, k
    assert open(s1 / "checkpoints" / "latest").read() == "step-0000006"
    assert {"step-0000003", "step-0000006"} <= set(os.listdir(s1 / "checkpoints"))
    # the manifest holds every rank's DeepSpeed shards, each with the size and sha256 of the file on disk
    ckpt = s1 / "checkpoints" / "step-0000006"
    manifest = json.load(open(ckpt / "manifest.json"))
    names = train.checkpoint_files(str(ckpt))
    assert sum("optim_states" in n for n in names) == 2 and manifest["files"] == train.file_digests(str(ckpt), names)
    # stage 2 starts from stage 1's final weights (by default), on stage-2 data
    cfg2 = json.load(open(s2 / "train_config.json"))
    assert cfg2["model_resolved"] == str(s1 / "final")
    expected = first_step_loss(str(s1 / "final"), os.path.join(demo_prepared, "stage2"), 512, 2, 1)
    assert read_log(s2)[0]["loss"] == pytest.approx(expected, rel=1e-6)
    assert read_log(s2)[0]["loss"] != pytest.approx(
        first_step_loss(tiny, os.path.join(demo_prepared, "stage2"), 512, 2, 1), rel=1e-3)


def test_zero3_gives_the_losses_and_weights_of_the_plain_ddp_path(tmp_path, demo_prepared, tiny):
    """... and so does ZeRO-3 through the varlen attention slot (its per-sample reference kernel:
    the boundaries reach the attention of a model DeepSpeed partitioned)."""
    runs = {"z3": ["--zero-stage", "3"], "z0": ["--zero-stage", "0"],
            "z3-varlen": ["--zero-stage", "3", "--attn", "varlen_reference"]}
    for name, extra in runs.items():
        torchrun(["--stage", "1", *common(demo_prepared, tiny, tmp_path / name, "--max-steps", "4",
                                          "--grad-accum", "2", "--weight-decay", "0.1", *extra)])
    assert json.load(open(tmp_path / "z3-varlen" / "stage1" / "train_config.json"))["attention"] == "varlen_reference"
    w0 = load_file(str(tmp_path / "z0" / "stage1" / "final" / "model.safetensors"))
    for name in ("z3", "z3-varlen"):
        for x, y in zip(read_log(tmp_path / name / "stage1"), read_log(tmp_path / "z0" / "stage1"), strict=True):
            assert x["loss"] == pytest.approx(y["loss"], rel=1e-6, abs=1e-6)
            assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
        w3 = load_file(str(tmp_path / name / "stage1" / "final" / "model.safetensors"))
        assert w3.keys() == w0.keys()
        for k in w0:
            torch.testing.assert_close(w3[k], w0[k], atol=1e-5, rtol=0,
                                       msg=lambda m, name=name, k=k: f"{name} {k}: {m}")


def test_final_folder_reloads_with_the_weights_deepspeed_reconstructs_from_its_shards(tmp_path, demo_prepared, tiny):
    out = tmp_path / "out"
    torchrun(["--stage", "1", *common(demo_prepared, tiny, out, "--max-steps", "3")])
    run = out / "stage1"
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    shards = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag="step-0000003")
    reference = LlamaForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    reference.load_state_dict({k.removeprefix("model."): v for k, v in shards.items()}, strict=False)
    final = LlamaForCausalLM.from_pretrained(str(run / "final"), dtype=torch.float32).eval()
    ids = torch.randint(0, final.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(final(ids).logits, reference(ids).logits, atol=0, rtol=0)
        moved = LlamaForCausalLM.from_pretrained(tiny, dtype=torch.float32)(ids).logits
    assert (final(ids).logits - moved).abs().max() > 1e-3  # and it is the trained model, not the start


# ---------------------------------------------------------------------------------------------
# Surviving kill -9 and SIGTERM

def wait_for_step(run_dir, step, proc, output, timeout=300):
    t0 = time.time()
    log = os.path.join(run_dir, "log.jsonl")
    while time.time() - t0 < timeout:
        if os.path.exists(log) and sum(1 for _ in open(log)) >= step:
            return
        assert proc.poll() is None, open(output).read()[-3000:]
        time.sleep(0.02)
    raise AssertionError(f"no step {step} in {timeout}s")


# One uninterrupted ZeRO-3 run on 2 ranks, 14 steps of 2 packs of <= 4096 tokens, crossing into a
# second epoch: the reference for the interrupted and the moved runs below.
LONG = ("--max-len", "4096", "--max-steps", "14", "--save-every", "2")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, demo_prepared, tiny):
    out = tmp_path_factory.mktemp("straight")
    torchrun(["--stage", "1", *common(demo_prepared, tiny, out, *LONG)])
    log = read_log(out / "stage1")
    assert max(r["epoch"] for r in log) == 1
    return out / "stage1"


def assert_same_weights(run_a, run_b, atol):
    w1 = load_file(str(run_a / "final" / "model.safetensors"))
    w2 = load_file(str(run_b / "final" / "model.safetensors"))
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=atol, rtol=0)


def test_kill_9_mid_run_then_resume_gives_the_uninterrupted_loss_curve(tmp_path, demo_prepared, tiny, straight):
    args = ["--stage", "1", *common(demo_prepared, tiny, tmp_path / "killed", *LONG)]
    output = tmp_path / "killed.out"
    with open(output, "w") as f:
        proc = torchrun(args, wait=False, log=f)
    run = tmp_path / "killed" / "stage1"
    wait_for_step(run, 6, proc, output)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(read_log(run))
    assert 6 <= done_before < 14, "the run was not killed mid-way"
    torchrun(args)  # the same command again: --resume auto
    resumed = read_log(run)
    assert [r["step"] for r in resumed] == list(range(1, 15))  # nothing repeated, nothing skipped
    np.testing.assert_allclose([r["loss"] for r in resumed], losses(straight), rtol=1e-6, atol=1e-6)
    assert_same_weights(run, straight, atol=1e-6)


# Resume on another number of ranks: the data position is a number of packs

def assert_same_run(resumed, straight, rel):
    """The same steps, the same packs in each, the same losses; every pack once per epoch."""
    assert [r["step"] for r in resumed] == [r["step"] for r in straight]  # every step logged once
    assert [r["packs"] for r in resumed] == [r["packs"] for r in straight]
    assert [r["trained_tokens"] for r in resumed] == [r["trained_tokens"] for r in straight]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in straight], rel=rel, abs=rel)
    assert [r["lr"] for r in resumed] == pytest.approx([r["lr"] for r in straight], rel=1e-12)
    epochs = {}
    for r in resumed:
        epochs.setdefault(r["epoch"], []).extend(r["packs"])
    assert sorted(epochs[0]) == list(range(len(epochs[0])))  # epoch 0: every pack exactly once
    assert len(set(epochs[1])) == len(epochs[1]) > 0  # epoch 1 begun, no pack twice


def test_zero3_resumes_on_fewer_and_on_more_ranks_through_the_universal_checkpoint(tmp_path, demo_prepared, tiny,
                                                                                    straight):
    """2 ranks -> stopped -> 1 rank -> stopped -> 2 ranks under ZeRO-3 against 2 ranks throughout:
    the shards of 2 ranks are converted by DeepSpeed's ds_to_universal and loaded by 1 rank,
    whose shards are converted again for 2."""
    def run(nproc, *extra):
        return torchrun(["--stage", "1", *common(demo_prepared, tiny, tmp_path / "moved", *LONG, *extra)], nproc=nproc)

    run(2, "--stop-after", "4")
    said = run(1, "--stop-after", "8")  # steps 5-12, across the epoch boundary, on one rank accumulating 2 packs
    assert "keeps its global batch of 2 packs" in said.stderr and "universal checkpoint layout" in said.stderr
    run(2)
    moved = tmp_path / "moved" / "stage1"
    assert_same_run(read_log(moved), read_log(straight), rel=1e-5)
    assert not (moved / "universal").exists()  # the converted copy is removed once loaded
    assert_same_weights(moved, straight, atol=1e-5)


def test_zero2_resumes_on_fewer_ranks_through_the_universal_checkpoint(tmp_path, demo_prepared, tiny, straight):
    """ZeRO-2 partitions only the optimizer state; its conversion takes the other branch of
    ds_to_universal. 2 ranks -> stopped -> 1 rank, against the same uninterrupted run."""
    a = ["--stage", "1", *common(demo_prepared, tiny, tmp_path / "moved", *LONG, "--zero-stage", "2")]
    torchrun(a + ["--stop-after", "4"])
    assert "saved on 2 rank(s)" in torchrun(a, nproc=1).stderr
    moved = tmp_path / "moved" / "stage1"
    assert_same_run(read_log(moved), read_log(straight), rel=1e-5)
    assert_same_weights(moved, straight, atol=1e-5)


def test_the_plain_loop_resumes_on_fewer_and_on_more_ranks(tmp_path, demo_prepared, tiny, straight):
    """The same chain in the plain loop (DDP over gloo, then one process), whose state does not
    depend on the world size; its reference is the ZeRO-3 run, equal to it (see above)."""
    a = ["--stage", "1", *common(demo_prepared, tiny, tmp_path / "moved", *LONG, "--zero-stage", "0")]
    torchrun(a + ["--stop-after", "4"])
    assert train.main(a + ["--stop-after", "8"]) == 0
    torchrun(a)
    moved = tmp_path / "moved" / "stage1"
    assert_same_run(read_log(moved), read_log(straight), rel=1e-5)
    assert_same_weights(moved, straight, atol=1e-5)


def test_sigterm_checkpoints_the_current_step_and_the_same_command_resumes(tmp_path, demo_prepared, tiny):
    out = tmp_path / "out"
    args = [sys.executable, os.path.join(ROOT, "train.py"), "--stage", "1",
            *common(demo_prepared, tiny, out, "--max-steps", "40", "--save-every", "1000", "--zero-stage", "0",
                    "--max-len", "1024")]
    output_file = tmp_path / "run.out"
    with open(output_file, "w") as f:
        proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT)
    run = out / "stage1"
    wait_for_step(run, 5, proc, output_file)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    output = open(output_file).read()
    assert proc.returncode == 143, output[-2000:]
    steps = len(read_log(run))
    assert 5 <= steps < 40 and "SIGTERM" in output
    assert open(run / "checkpoints" / "latest").read() == f"step-{steps:07d}"
    # a resume with other settings is refused rather than silently mixing two runs
    refused = subprocess.run(args[:-2] + ["--max-len", "512"], capture_output=True, text=True)
    assert refused.returncode != 0 and "other settings" in refused.stderr
    assert subprocess.run(args, capture_output=True, text=True).returncode == 0
    assert [r["step"] for r in read_log(run)] == list(range(1, 41))
    # --stop-after splits a run in two invocations with the same result
    split = tmp_path / "split"
    base = [*common(demo_prepared, tiny, split, "--max-steps", "40", "--zero-stage", "0", "--max-len", "1024")]
    assert train.main(["--stage", "1", *base, "--stop-after", "17"]) == 0
    assert len(read_log(split / "stage1")) == 17 and not (split / "stage1" / "final").exists()
    assert train.main(["--stage", "1", *base]) == 0
    np.testing.assert_allclose(losses(split / "stage1"), losses(run), rtol=1e-6, atol=1e-6)


def test_a_nan_loss_stops_the_run_before_the_update_and_keeps_the_last_good_checkpoint(tmp_path, demo_prepared,
                                                                                      tiny, monkeypatch):
    calls = {"n": 0}
    forward = train.PackedLM.forward

    def poisoned(self, batch):
        calls["n"] += 1
        loss = forward(self, batch)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(train.PackedLM, "forward", poisoned)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        train.main(["--stage", "1", *common(demo_prepared, tiny, out, "--max-steps", "10", "--save-every", "1",
                                            "--zero-stage", "0")])
    assert "loss is nan at step 4" in str(stop.value) and "step-0000003" in str(stop.value)
    run = out / "stage1"
    assert open(run / "checkpoints" / "latest").read() == "step-0000003"
    assert len(read_log(run)) == 3
    state = torch.load(run / "checkpoints" / "step-0000003" / "state.pt", weights_only=False)
    assert state["step"] == 3 and all(torch.isfinite(t).all() for t in state["model"].values())


# ---------------------------------------------------------------------------------------------
# LoRA, continued pre-training, logs

def test_lora_trains_only_adapters_and_saves_a_merged_model_and_the_adapter(tmp_path, demo_prepared, tiny):
    out = tmp_path / "out"
    assert train.main(["--stage", "1", *common(demo_prepared, tiny, out, "--max-steps", "12", "--zero-stage", "0",
                                               "--lora", "--lora-r", "4", "--lr", "5e-3")]) == 0
    run = out / "stage1"
    log = read_log(run)
    assert np.mean([r["loss"] for r in log[-3:]]) < np.mean([r["loss"] for r in log[:3]])
    assert (run / "final-adapter" / "adapter_config.json").exists()
    ckpt = torch.load(run / "checkpoints" / "step-0000012" / "state.pt", weights_only=False)
    assert ckpt["model"] and all("lora_" in k for k in ckpt["model"])  # only the adapters are trained
    merged = load_file(str(run / "final" / "model.safetensors"))
    base = load_file(os.path.join(tiny, "model.safetensors"))
    assert merged.keys() == base.keys()  # a plain Llama folder, adapters merged in
    assert (merged["model.layers.0.self_attn.q_proj.weight"]
            - base["model.layers.0.self_attn.q_proj.weight"]).abs().max() > 0
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    with pytest.raises(SystemExit, match="--lora needs"):
        train.main(["--stage", "1", *common(demo_prepared, tiny, out, "--lora", "--zero-stage", "3")])


def test_lora_through_the_varlen_slot_gives_the_sdpa_losses(tmp_path, demo_prepared, tiny):
    args = lambda name, *extra: ["--stage", "1", *common(demo_prepared, tiny, tmp_path / name, "--max-steps", "4",  # noqa: E731
                                                         "--zero-stage", "0", "--lora", "--lora-r", "4", *extra)]
    assert train.main(args("sdpa")) == 0
    assert train.main(args("varlen", "--attn", "varlen_reference")) == 0
    assert losses(tmp_path / "varlen" / "stage1") == pytest.approx(losses(tmp_path / "sdpa" / "stage1"), rel=1e-5)


def test_continued_pretraining_trains_every_token_of_raw_text(tmp_path, demo_prepared, tiny, statute_rows):
    text = tmp_path / "statutes.txt"
    docs = [f"{law}{num}　{body}" for law, num, body in statute_rows[:300]]
    docs.append("".join(body for _, _, body in statute_rows[300:360]))  # longer than --max-len: split, not dropped
    text.write_text("\n\n".join(docs), encoding="utf-8")
    out = tmp_path / "out"
    assert train.main(["--stage", "1", *common(demo_prepared, tiny, out, "--max-steps", "8", "--zero-stage", "0",
                                               "--cpt-data", str(text), "--lr", "3e-3")]) == 0
    run = out / "stage1"
    counts = json.load(open(run / "train_config.json"))["data_counts"]
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(os.path.join(demo_prepared, "tokenizer"))
    n_tokens = [len(tok(d, add_special_tokens=False)["input_ids"]) + 1 for d in docs]  # + EOS
    assert counts["documents"] == 301 and counts["documents_split"] == sum(n > 512 for n in n_tokens) >= 1
    assert counts["pieces"] == counts["kept"] == sum(-(-n // 512) for n in n_tokens)
    for r in read_log(run):
        # every position is trained except the first of each piece (nothing predicts it)
        assert r["tokens"] - r["trained_tokens"] < r["tokens"] * 0.2
    log = read_log(run)
    assert log[-1]["loss"] < log[0]["loss"]


def test_tensorboard_gets_the_same_scalars_as_the_jsonl(tmp_path, demo_prepared, tiny):
    out = tmp_path / "out"
    assert train.main(["--stage", "1", *common(demo_prepared, tiny, out, "--max-steps", "3", "--zero-stage", "0",
                                               "--tensorboard")]) == 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(out / "stage1" / "tensorboard"))
    acc.Reload()
    tb = [e.value for e in acc.Scalars("train/loss")]
    np.testing.assert_allclose(tb, losses(out / "stage1"), rtol=1e-6)


def test_on_cpu_a_deepspeed_that_cannot_start_falls_back_to_the_plain_loop(tmp_path, demo_prepared, tiny,
                                                                          monkeypatch, capsys):
    import deepspeed

    def broken(*a, **k):
        raise RuntimeError("shm comm op failed to build")

    monkeypatch.setattr(deepspeed, "init_distributed", broken)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(var, raising=False)  # restored after the test: main sets them for its 1-process group
    monkeypatch.setenv("MASTER_PORT", str(next(PORT)))
    out = tmp_path / "out"
    assert train.main(["--stage", "1", *common(demo_prepared, tiny, out, "--max-steps", "2")]) == 0
    printed = capsys.readouterr().err
    assert "DeepSpeed unavailable on this CPU machine (RuntimeError: shm comm op failed to build)" in printed
    assert "plain PyTorch" in printed
    assert json.load(open(out / "stage1" / "train_config.json"))["zero_stage"] == 0
    assert len(read_log(out / "stage1")) == 2


def test_zero3_resumed_with_another_lr_and_betas_uses_them_from_the_resumed_step(tmp_path, demo_prepared, tiny):
    """DeepSpeed restores its optimizer's and schedule's hyperparameters from the checkpoint; the
    command's new ones must win (train.apply_hyperparameters), as in the plain loop."""
    a = ["--stage", "1", *common(demo_prepared, tiny, tmp_path, "--max-steps", "8", "--warmup-ratio", "0.25")]
    torchrun(a + ["--stop-after", "4"])
    out = torchrun(a + ["--lr", "3e-3", "--betas", "0.8", "0.9"])
    assert "--lr changed since the run being resumed: 0.001 -> 0.003, applied from step 5 on" in out.stdout + out.stderr
    log = read_log(tmp_path / "stage1")
    assert [r["step"] for r in log] == list(range(1, 9))
    for r in log:
        peak = 1e-3 if r["step"] <= 4 else 3e-3
        assert r["lr"] == pytest.approx(train.lr_at(r["step"] - 1, 8, 2, peak, 0.0), rel=1e-9)
    changes = json.load(open(tmp_path / "stage1" / "train_config.json"))["changes"]
    assert {c["setting"] for c in changes} == {"lr", "betas"}
