"""
bench/gpu_check.py -- everything this project claims about a GPU, checked in one command on an
NVIDIA machine, written to one JSON that BENCHMARKS.md quotes (`make gpu-check`).

    make gpu-check                                         # = .venv/bin/python bench/gpu_check.py
    .venv/bin/python bench/gpu_check.py --out results/gpu-check.json
    .venv/bin/python bench/gpu_check.py --smoke            # CPU, tiny shapes: the same code paths (CI runs it)

The checks, in order (each in its own subprocess, so a failure or an out-of-memory in one is
recorded and the rest still run):
  1. isolation   packed == per-sample on the attention train.py picks (PyTorch's varlen kernel):
                 the kernel alone bitwise, then two InternLM2-shaped layers in bf16, samples of
                 1,500 and 2,500 tokens packed together vs the second alone, plus train.py's own
                 16-token start-up check;
  2. zero3_step  three bf16 DeepSpeed ZeRO-3 steps of train.py (torchrun, 1 process) on a randomly
                 initialised InternLM2-1.8B-shaped model with 32k packs of LawBench-shaped samples:
                 tokens/s, MFU, peak memory, the checkpoint's writing and hashing seconds, the final
                 weights' seconds; for a failure, the worker's own last lines;
  3. mfu_7b      bench/mfu.py --shape internlm2-7b --no-optimizer: forward + backward at 32k;
  4. loss_memory bench/loss_memory.py --gpu: chunked vs full-logits loss at 32k x 92,544;
  5. generation  greedy generate() tokens/s of the 1.8B-shaped model, batch 8, 1,024-token prompts.
Without a GPU (and without --smoke) it stops at once and says so.
"""
import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]

SHAPE_18B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=8, vocab_size=92544)
SHAPE_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=6000)


def run(cmd, timeout, env=None, full=False):
    """(return code, seconds, the last lines of output, or all of it with full) of a subprocess."""
    t0 = time.time()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                           env={**os.environ, **(env or {})})
        rc, out = r.returncode, (r.stdout + r.stderr)
    except subprocess.TimeoutExpired as exc:
        rc, out = 124, f"timed out after {timeout} s\n{exc.stdout or ''}"
    lines = str(out).strip().splitlines()
    return rc, time.time() - t0, "\n".join(lines if full else lines[-15:])


def check_isolation(smoke):
    """Step 1, in this (sub)process: a sample inside a pack vs the same sample alone, on the kernel
    train.py chooses (PyTorch's varlen kernel on a GPU; its per-sample reference slot in --smoke).
    The kernel alone must give bitwise the same output (num_splits=1 makes FA2 batch invariant);
    the whole model in bf16 only to a tolerance (its matmuls see other row counts)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import train
    gpu = torch.cuda.is_available() and not smoke
    device = torch.device("cuda" if gpu else "cpu")
    attn = train.pick_attention("auto" if gpu else "varlen_reference", device, 4096)
    shape = {**(SHAPE_TINY if smoke else SHAPE_18B), "num_hidden_layers": 2}
    dtype = torch.bfloat16 if gpu else torch.float32
    la, lb = (150, 250) if smoke else (1500, 2500)
    # the kernel alone: q/k/v of two samples packed vs the second one alone
    kernel = {"varlen": train.torch_varlen, "varlen_reference": train.per_sample_sdpa}.get(attn)
    kernel_fig = {}
    if kernel is not None:
        g = torch.Generator(device=device).manual_seed(2)
        heads, kv, d = (shape["num_attention_heads"], shape["num_key_value_heads"],
                        shape["hidden_size"] // shape["num_attention_heads"])
        q, k, v = (torch.randn(la + lb, n, d, generator=g, device=device, dtype=dtype) for n in (heads, kv, kv))
        cu = lambda *lens: torch.tensor([0, *lens], dtype=torch.int32, device=device).cumsum(0, dtype=torch.int32)  # noqa: E731
        with torch.no_grad():
            packed = kernel(q, k, v, cu(la, lb), lb, None)[la:]
            alone = kernel(q[la:], k[la:], v[la:], cu(lb), lb, None)
        # FA2 without num_splits (torch 2.10/2.11) may split a long sample's keys by batch shape
        from torch.nn.attention import varlen
        expected = kernel is train.per_sample_sdpa or "num_splits" in inspect.signature(varlen.varlen_attn).parameters
        kernel_fig = {"kernel_bitwise_equal": bool(torch.equal(packed, alone)), "kernel_bitwise_expected": expected,
                      "kernel_max_abs_diff": (packed.float() - alone.float()).abs().max().item()}
    torch.manual_seed(0)
    cfg = LlamaConfig(max_position_embeddings=32768, rope_theta=1e6, **shape)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    model.set_attn_implementation(attn)
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(3, cfg.vocab_size, (la,), generator=g), torch.randint(3, cfg.vocab_size, (lb,), generator=g)
    packed = train.collate_pack([{"input_ids": a, "labels": a}, {"input_ids": b, "labels": b}], la + lb)
    with torch.no_grad():
        h = model.model(input_ids=packed["input_ids"].to(device), position_ids=packed["position_ids"].to(device),
                        use_cache=False, **train.boundary_kwargs(packed, device)).last_hidden_state[0, la:].float()
        alone = model.model(input_ids=b[None].to(device), use_cache=False).last_hidden_state[0].float()
        err = ((h - alone).abs().max() / alone.abs().max()).item()
        startup = train.check_isolation(model)
    tol = 5e-2 if gpu else 1e-4
    return {"attention": attn, "dtype": str(dtype), "samples": [la, lb], "relative_error": err,
            "startup_check_error": startup, "tolerance": tol, **kernel_fig,
            "isolated": err <= tol and (kernel_fig.get("kernel_bitwise_equal", True)
                                        or not kernel_fig.get("kernel_bitwise_expected"))}


def worker_error(log_dir):
    """The last lines of the first failed worker's own output (torchrun's summary names only the
    rank), from the files torchrun --tee writes under log_dir."""
    import glob
    for path in sorted(glob.glob(os.path.join(log_dir, "**", "stderr.log"), recursive=True)):
        lines = open(path, errors="replace").read().strip().splitlines()
        if any(x.startswith(("Traceback", "error:")) or "Error" in x for x in lines):
            return "\n".join(lines[-30:])
    return None


def train_figures(out_dir, output):
    """zero3_step's figures: the last step's row of log.jsonl, the attention used, and how long
    the last checkpoint (writing vs hashing, from its manifest) and the final weights took."""
    import glob
    import re
    run = os.path.join(out_dir, "stage1")
    rows = [json.loads(x) for x in open(os.path.join(run, "log.jsonl"))]
    fig = {k: rows[-1][k] for k in ("loss", "tokens", "tokens_per_s_per_device", "mfu", "peak_mem_gib", "fill",
                                    "time_s")}
    fig["attention"] = json.load(open(os.path.join(run, "train_config.json")))["attention"]
    manifests = sorted(glob.glob(os.path.join(run, "checkpoints", "step-*", "manifest.json")))
    if manifests:
        sec = json.load(open(manifests[-1])).get("seconds", {})
        fig["checkpoint_write_s"], fig["checkpoint_hash_s"] = sec.get("write"), sec.get("hash")
        if sec.get("write") is not None and sec.get("hash") is not None:
            fig["checkpoint_hash_share"] = sec["hash"] / max(sec["write"] + sec["hash"], 1e-9)
    m = re.search(r"saved \S+ after \d+ steps \(([\d.]+) s\)", output)
    fig["final_weights_s"] = float(m.group(1)) if m else None
    return fig


def make_model_and_data(folder, smoke, max_len):
    """A random InternLM2-shaped Llama folder (with the demo-style BPE tokenizer, which only
    has to load) and a prepare_data.py-shaped stage-1 dataset of LawBench-shaped random samples."""
    import numpy as np
    import torch
    from datasets import Dataset
    from packing import lawbench_lengths
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    shape = SHAPE_TINY if smoke else SHAPE_18B
    torch.manual_seed(0)
    cfg = LlamaConfig(max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, **shape)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model_dir = os.path.join(folder, "model")
    model.save_pretrained(model_dir)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, shape["vocab_size"])}}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<pad>")),
                                  pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(model_dir)
    lengths, _ = lawbench_lengths(os.path.join(ROOT, "lawbench_assets", "data"), 400 if smoke else 4000, 0)
    lengths = [int(n) for n in lengths if n <= max_len]
    rng = np.random.default_rng(0)
    rows = []
    for n in lengths:
        ids = rng.integers(3, shape["vocab_size"], n).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2:], "length": n})
    data = os.path.join(folder, "data")
    Dataset.from_list(rows).save_to_disk(os.path.join(data, "stage1"))
    tok.save_pretrained(os.path.join(data, "tokenizer"))
    return model_dir, data


def generation_speed(model_dir, smoke):
    """Step 5: greedy generate() tokens/s, batch 8, 1,024-token prompts, 256 new tokens."""
    import torch
    from transformers import AutoModelForCausalLM
    gpu = torch.cuda.is_available() and not smoke
    device = torch.device("cuda" if gpu else "cpu")
    model = AutoModelForCausalLM.from_pretrained(model_dir,
                                                 dtype=torch.bfloat16 if gpu else torch.float32).to(device).eval()
    batch, prompt, new = (2, 64, 16) if smoke else (8, 1024, 256)
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt), device=device)
    with torch.no_grad():
        model.generate(input_ids=ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
        if gpu:
            torch.cuda.synchronize()
        t0 = time.time()
        out = model.generate(input_ids=ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        if gpu:
            torch.cuda.synchronize()
    dt = time.time() - t0
    made = (out.shape[1] - prompt) * batch
    return {"batch": batch, "prompt_tokens": prompt, "new_tokens": new, "seconds": dt,
            "new_tokens_per_s": made / dt, "sequences_per_s": batch / dt}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "results", "gpu-check.json"), help="(default %(default)s)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes and lengths: exercise every step's code")
    p.add_argument("--step", help=argparse.SUPPRESS)  # run one in-process step (isolation, generation)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.step:
        fig = check_isolation(a.smoke) if a.step == "isolation" else generation_speed(a.model_dir, a.smoke)
        print("FIGURES " + json.dumps(fig))
        return 0
    import torch
    if not a.smoke and not torch.cuda.is_available():
        sys.exit("error: make gpu-check needs an NVIDIA GPU, and torch sees none here (torch.cuda.is_available() "
                 "is False). Its CPU smoke run is: .venv/bin/python bench/gpu_check.py --smoke")
    smoke = ["--smoke"] if a.smoke else []
    max_len = 1024 if a.smoke else 32768
    report = {"date": time.strftime("%Y-%m-%d"), "smoke": a.smoke,
              "device": "CPU (smoke)" if a.smoke else torch.cuda.get_device_name(),
              "torch": torch.__version__, "steps": {}}
    try:
        import flash_attn
        report["flash_attn"] = flash_attn.__version__  # optional: train.py uses PyTorch's own kernel
    except ImportError:
        report["flash_attn"] = None
    try:
        import transformers
        report["transformers"] = transformers.__version__
        import deepspeed
        report["deepspeed"] = deepspeed.__version__
    except ImportError as exc:
        report["missing"] = str(exc)

    def record(name, rc, seconds, tail, figures=None):
        report["steps"][name] = {"ok": rc == 0 and figures is not None, "rc": rc, "seconds": round(seconds, 1),
                                 "figures": figures, "output_tail": tail if rc else tail.splitlines()[-3:]}
        print(f"[{'ok' if rc == 0 and figures is not None else 'FAILED'}] {name} ({seconds:.0f} s)"
              + (f": {json.dumps(figures)[:300]}" if figures else f"\n{tail}"), flush=True)

    def in_subprocess(step, extra=(), timeout=900):
        rc, dt, tail = run([sys.executable, __file__, "--step", step, *smoke, *extra], timeout)
        line = next((x for x in tail.splitlines()[::-1] if x.startswith("FIGURES ")), None)
        record(step, rc, dt, tail, json.loads(line[8:]) if line else None)

    with tempfile.TemporaryDirectory() as tmp:
        in_subprocess("isolation")
        model_dir, data = make_model_and_data(tmp, a.smoke, max_len)
        out_dir, logs = os.path.join(tmp, "run"), os.path.join(tmp, "torchrun-logs")
        rc, dt, tail = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                            "--log-dir", logs, "--tee", "3",
                            os.path.join(ROOT, "train.py"), "--stage", "1", "--model", model_dir, "--data", data,
                            "--out-dir", out_dir, "--max-len", str(max_len), "--max-steps", "3", "--zero-stage", "3",
                            "--dtype", "fp32" if a.smoke else "bf16", "--save-every", "1000", "--warmup-ratio", "0",
                            *(["--attn", "varlen_reference"] if a.smoke else [])],
                           1800, env={"OMP_NUM_THREADS": "1"} if a.smoke else None, full=True)
        if rc:
            tail = (worker_error(logs) or "") + "\n--- torchrun ---\n" + "\n".join(tail.splitlines()[-15:])
        record("zero3_step", rc, dt, "\n".join(tail.splitlines()[-45:]),
               train_figures(out_dir, tail) if rc == 0 else None)
        fig_file = os.path.join(tmp, "mfu.json")
        mfu = [sys.executable, os.path.join(ROOT, "bench", "mfu.py"), "--json", fig_file]
        mfu += ["--shape", "tiny", "--max-len", "1024", "--steps", "2", "--warmup", "1"] if a.smoke else \
            ["--shape", "internlm2-7b", "--no-optimizer"]
        rc, dt, tail = run(mfu, 1800)
        record("mfu_7b", rc, dt, tail, json.load(open(fig_file)) if rc == 0 and os.path.exists(fig_file) else None)
        fig_file = os.path.join(tmp, "loss.json")
        loss = [sys.executable, os.path.join(ROOT, "bench", "loss_memory.py"), "--json", fig_file]
        loss += ["--sizes", "512,1024"] if a.smoke else ["--gpu"]
        rc, dt, tail = run(loss, 1800)
        record("loss_memory", rc, dt, tail, json.load(open(fig_file)) if rc == 0 and os.path.exists(fig_file) else None)
        in_subprocess("generation", ["--model-dir", model_dir])
    report["all_ok"] = all(s["ok"] for s in report["steps"].values())
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"{'all checks passed' if report['all_ok'] else 'SOME CHECKS FAILED'}; figures in {a.out}")
    return 0 if report["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
