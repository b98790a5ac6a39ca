"""
bench/mfu.py -- tokens/s per GPU and MFU of train.py's packed training step at 32k tokens, for a
randomly initialised InternLM2-shaped model, next to XTuner's published 2,965 tokens/s/GPU
(InternLM2-7B, 32k sequences, A100) and the accelerator's bf16 peak.

    .venv/bin/python bench/mfu.py --shape internlm2-1.8b                 # one GPU: full step with AdamW
    .venv/bin/python bench/mfu.py --shape internlm2-7b --no-optimizer    # one 80 GB GPU: forward + backward
    .venv/bin/python bench/mfu.py --shape tiny --max-len 1024 --steps 2  # CPU: the same code, a smoke run

The packs are train.py's: best-fit packs of --max-len tokens built from LawBench-shaped sample
lengths (the bundled slice, as bench/packing.py), random token ids, the second half of every
sample trained. Each step is train.py's forward_backward (isolated samples, chunked loss) plus,
unless --no-optimizer, AdamW on fp32 master weights under bf16 autocast -- train.py's plain loop
on one device. --no-optimizer keeps bf16 weights and skips the optimizer, so that a 7B model and
its gradients fit one 80 GB GPU; the optimizer step is a small part of a 32k step, and model
FLOPs (train.step_flops) don't count it. Attention is train.py's --attn auto (PyTorch's varlen
kernel on a GPU) unless --attn says otherwise.
The first --warmup steps are not timed.
XTuner's figure is converted to MFU with the same FLOP formula and these packs' lengths, so the
comparison is across hardware at equal accounting: A100 bf16 peak 312 TFLOP/s.
"""
import argparse
import json
import os
import sys
import time
from types import SimpleNamespace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]
from packing import lawbench_lengths  # noqa: E402

import train  # noqa: E402

SHAPES = {  # Llama layout of the InternLM2 configs (what train.py converts them to)
    "internlm2-7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=92544),
    "internlm2-1.8b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=16,
                           num_key_value_heads=8, vocab_size=92544),
    "tiny": dict(hidden_size=128, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=6000),
}
XTUNER_TOKENS_PER_S = 2965.0  # InternLM2-7B, 32k, per A100 (XTuner's published benchmark)
A100_BF16_PEAK = 312.0


def make_packs(max_len, n_packs, vocab, seed=0):
    lengths, _ = lawbench_lengths(os.path.join(ROOT, "lawbench_assets", "data"), 40 * n_packs * max_len // 300, seed)
    lengths = lengths[lengths <= max_len]
    packs = train.pack_best_fit(lengths, max_len, seed)[:n_packs]
    g = torch.Generator().manual_seed(seed)
    out = []
    for p in packs:
        samples = []
        for n in lengths[p].tolist():
            ids = torch.randint(3, vocab, (n,), generator=g).tolist()
            samples.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2:]})
        out.append(train.collate_pack(samples, max_len))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="internlm2-1.8b")
    p.add_argument("--max-len", type=int, default=32768, help="tokens per pack (default %(default)s)")
    p.add_argument("--steps", type=int, default=8, help="timed steps (default %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default %(default)s)")
    p.add_argument("--no-optimizer", action="store_true", help="bf16 weights, forward + backward only")
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--checkpoint-every", type=int, default=1, metavar="K",
                   help="train.py's --checkpoint-every: recompute every K-th decoder layer only (default 1: all)")
    p.add_argument("--attn", default="auto", help="train.py's --attn (default auto: varlen on a GPU, sdpa on CPU)")
    p.add_argument("--peak-tflops", type=float, help="override the accelerator's bf16 peak")
    p.add_argument("--json", metavar="FILE", help="also write the figures to FILE (bench/gpu_check.py reads it)")
    a = p.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    attn = train.pick_attention(a.attn, device, a.max_len)
    cfg = LlamaConfig(max_position_embeddings=max(32768, a.max_len), rope_theta=1e6, tie_word_embeddings=False,
                      **SHAPES[a.shape])
    cfg._attn_implementation = attn
    weights = torch.bfloat16 if gpu and a.no_optimizer else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(weights)
    checkpointed = "off"
    if not a.no_gradient_checkpointing and gpu:
        checkpointed = train.checkpoint_layers(model, a.checkpoint_every)
    model.train()
    runner = train.PackedLM(model, 2048)
    opt = None if a.no_optimizer else torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu)
    packs = make_packs(a.max_len, a.warmup + a.steps, cfg.vocab_size)
    n_matmul = train.matmul_params(model)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    flops = tokens = 0
    for k, b in enumerate(packs):
        if k == a.warmup:
            if gpu:
                torch.cuda.synchronize()
            t0 = time.time()
        train.forward_backward(runner, [b], [False], train.trained_tokens(b["labels"]), 1, device, autocast)
        if opt is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        model.zero_grad(set_to_none=True)
        if k >= a.warmup:
            seqlens = b["cu_seqlens"].diff().tolist()
            tokens += sum(seqlens)
            flops += train.step_flops(cfg, n_matmul, seqlens)
    if gpu:
        torch.cuda.synchronize()
    dt = time.time() - t0
    peak = train.peak_tflops(SimpleNamespace(peak_tflops=a.peak_tflops), device)
    where = torch.cuda.get_device_name() if gpu else f"CPU ({os.cpu_count()} cores)"
    mem = torch.cuda.max_memory_allocated() / 2**30 if gpu else None
    tflops = flops / dt / 1e12
    precision = ("bf16 weights" if weights == torch.bfloat16 else
                 "fp32 master weights + bf16 autocast" if gpu else "fp32")
    print(f"{a.shape} ({train.count_params(model) / 1e6:,.0f}M params), {where}, attention {attn}, "
          f"{precision}, {'no optimizer' if a.no_optimizer else 'AdamW'}, "
          f"gradient checkpointing {checkpointed}")
    print(f"{a.steps} packs of <= {a.max_len} tokens (fill {tokens / (a.steps * a.max_len):.1%}): "
          f"{tokens / dt:,.0f} tokens/s/device, {tflops:.1f} model TFLOP/s"
          + (f", MFU {tflops / peak:.1%} of {peak:.0f}" if peak else "")
          + (f", peak memory {mem:.1f} GiB" if mem is not None else ""))
    figures = {"shape": a.shape, "params_m": train.count_params(model) / 1e6, "device": where, "attention": attn,
               "gradient_checkpointing": checkpointed,
               "precision": precision, "optimizer": not a.no_optimizer, "max_len": a.max_len, "steps": a.steps,
               "fill": tokens / (a.steps * a.max_len), "tokens_per_s_per_device": tokens / dt,
               "model_tflops": tflops, "mfu": tflops / peak if peak else None, "peak_memory_gib": mem}
    if a.shape == "internlm2-7b":
        figures["xtuner_tokens_per_s_ratio"] = tokens / dt / XTUNER_TOKENS_PER_S
    if a.json:
        with open(a.json, "w") as f:
            json.dump(figures, f, indent=1)
    if a.shape == "internlm2-7b":
        xtuner_mfu = XTUNER_TOKENS_PER_S * (flops / tokens) / 1e12 / A100_BF16_PEAK
        print(f"XTuner, InternLM2-7B 32k on A100: {XTUNER_TOKENS_PER_S:,.0f} tokens/s/GPU = MFU {xtuner_mfu:.1%} "
              f"with the same FLOP accounting; ours {tokens / dt / XTUNER_TOKENS_PER_S:.2f}x its tokens/s"
              + (f", {tflops / peak / xtuner_mfu:.2f}x its MFU" if peak else ""))


if __name__ == "__main__":
    main()
