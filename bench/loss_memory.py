"""
bench/loss_memory.py -- memory and time of the LM loss at 32k tokens x 92,544 vocab (InternLM2):
full logits + cross-entropy (what model(..., labels=...) does) vs train.py's chunked lm_head + CE.

    .venv/bin/python bench/loss_memory.py            # CPU: fp32, hidden 64
    .venv/bin/python bench/loss_memory.py --gpu      # CUDA: bf16, hidden 4096, exact allocator peaks

Each measurement runs in a fresh subprocess: forward + backward of the loss on random hidden
states, lm_head weight and targets, and reports the peak memory *above* those inputs (the loss's
own cost, its gradients included) and the wall time.
  * CPU: peak resident memory (ru_maxrss minus the resident size just before the loss); large
    tensors are mmap'ed by glibc and returned on free, so this is the peak of live tensors.
    Logits memory does not depend on the hidden size, so hidden 64 keeps the matmuls cheap;
    the times are therefore only comparable with each other, not with a GPU.
    The full-logits loss at 32k needs ~3 x 12 GB and does not fit this 23 GB machine; its 32k
    figure is extrapolated from its measured (linear) growth and marked as such.
  * GPU: torch.cuda.max_memory_allocated, bf16 inputs as in training, hidden 4096 (7B).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402

VOCAB = 92544


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def one(variant, tokens, hidden, chunk, gpu):
    """Run one loss forward+backward; return {'peak_bytes', 'seconds', 'loss'}."""
    dev = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    g = torch.Generator(device=dev).manual_seed(0)
    h = (torch.randn(tokens, hidden, generator=g, device=dev) * 0.5).to(dtype).requires_grad_()
    w = (torch.randn(VOCAB, hidden, generator=g, device=dev) * 0.02).to(dtype).requires_grad_()
    t = torch.randint(0, VOCAB, (tokens,), generator=g, device=dev)
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
    t0 = time.time()
    if variant == "full":
        # as transformers does: lm_head in the compute dtype, logits upcast to fp32, then CE
        loss = F.cross_entropy((h @ w.T).float(), t, reduction="sum")
    else:
        loss = train.ChunkedLMHeadCE.apply(h, w, t, chunk)
    loss.backward()
    if gpu:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"peak_bytes": peak, "seconds": time.time() - t0, "loss": loss.item() / tokens}


def measure(variant, tokens, hidden, chunk, gpu):
    out = subprocess.run([sys.executable, __file__, "--one", variant, str(tokens), "--hidden", str(hidden),
                          "--chunk", str(chunk)] + (["--gpu"] if gpu else []),
                         capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["killed"])[-1][:120]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="measure on CUDA in bf16 (hidden 4096 by default)")
    p.add_argument("--hidden", type=int, help="hidden size (default 64 on CPU, 4096 on GPU)")
    p.add_argument("--chunk", type=int, default=2048, help="train.py --loss-chunk (default %(default)s)")
    p.add_argument("--sizes", help="comma-separated token counts for both variants instead of the defaults "
                   "(a quick run, e.g. 512,1024)")
    p.add_argument("--json", metavar="FILE", help="also write every measurement to FILE")
    p.add_argument("--one", nargs=2, metavar=("VARIANT", "TOKENS"), help=argparse.SUPPRESS)
    a = p.parse_args()
    hidden = a.hidden or (4096 if a.gpu else 64)
    if a.one:
        print(json.dumps(one(a.one[0], int(a.one[1]), hidden, a.chunk, a.gpu)))
        return
    where = f"{torch.cuda.get_device_name()} bf16" if a.gpu else f"CPU fp32 ({os.cpu_count()} cores)"
    print(f"loss forward+backward, vocab {VOCAB}, hidden {hidden}, chunk {a.chunk}, {where}")
    full_sizes = [32768] if a.gpu else [2048, 4096, 8192]
    chunked_sizes = [2048, 8192, 32768]
    if a.sizes:
        full_sizes = chunked_sizes = [int(x) for x in a.sizes.split(",")]
    rows = []
    for variant, sizes in (("full", full_sizes), ("chunked", chunked_sizes)):
        for n in sizes:
            r = measure(variant, n, hidden, a.chunk, a.gpu)
            rows.append((variant, n, r))
            if "error" in r:
                print(f"  {variant:8s} {n:6d} tokens: failed ({r['error']})")
            else:
                print(f"  {variant:8s} {n:6d} tokens: peak {r['peak_bytes'] / 2**30:7.2f} GiB  "
                      f"{r['seconds']:7.2f} s  loss/token {r['loss']:.4f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": where, "vocab": VOCAB, "hidden": hidden, "chunk": a.chunk,
                       "measurements": [{"variant": v, "tokens": n, **r} for v, n, r in rows]}, f, indent=1)
    full = {n: r for v, n, r in rows if v == "full" and "error" not in r}
    chunked = {n: r for v, n, r in rows if v == "chunked" and "error" not in r}
    if 32768 not in full and len(full) >= 2:
        (n0, r0), (n1, r1) = sorted(full.items())[0], sorted(full.items())[-1]
        slope = (r1["peak_bytes"] - r0["peak_bytes"]) / (n1 - n0)
        full[32768] = {"peak_bytes": r1["peak_bytes"] + slope * (32768 - n1), "extrapolated": True,
                       "seconds": r1["seconds"] * 32768 / n1}
        print(f"  full     32768 tokens: peak {full[32768]['peak_bytes'] / 2**30:7.2f} GiB  "
              f"(extrapolated: {slope:,.0f} bytes/token measured from {n0} to {n1} tokens)")
    if 32768 in full and 32768 in chunked:
        f, c = full[32768], chunked[32768]
        print(f"at 32k x {VOCAB}: chunked needs {c['peak_bytes'] / 2**30:.2f} GiB vs {f['peak_bytes'] / 2**30:.2f} GiB "
              f"for full logits ({f['peak_bytes'] / c['peak_bytes']:.1f}x less)"
              + ("; full-logits figure extrapolated" if f.get("extrapolated") else
                 f"; time {c['seconds'] / f['seconds']:.2f}x of full"))
    for n in sorted(set(full) & set(chunked)):
        if not full[n].get("extrapolated") and n != 32768:
            print(f"time at {n} tokens: chunked {chunked[n]['seconds']:.2f} s vs full {full[n]['seconds']:.2f} s "
                  f"({chunked[n]['seconds'] / full[n]['seconds']:.2f}x; chunked recomputes the logits in backward)")


if __name__ == "__main__":
    main()
