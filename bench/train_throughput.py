"""
bench/train_throughput.py -- training throughput of train.py's packed steps vs padded batches
the way Legal-Eagle trains (HF Trainer + DataCollatorForSeq2Seq, padding to the longest sample).

    .venv/bin/python bench/train_throughput.py                 # CPU, ~3 minutes
    .venv/bin/python bench/train_throughput.py --gpu           # on a GPU, larger model and packs

Both sides train the same randomly initialised Llama (CPU: hidden 256, 4 layers; vocabulary of
the demo tokenizer) on the same SFT samples -- the demo's stage-1 data, built by prepare_data.py
into a temporary folder if --data is not given -- for one pass, so both see the same real
tokens. Reported: real (non-padding) tokens per second over the whole pass, the share of
computed positions that were padding, and peak memory (resident memory on CPU, allocator peak on
GPU). Each side runs in its own subprocess, so neither inherits the other's memory.
  ours      train.py's best-fit packs of up to --max-len tokens (never padded), one pack per
            optimizer step, isolated samples, chunked loss on trained tokens only
  baseline  transformers.Trainer, per_device_train_batch_size = --batch-size samples,
            DataCollatorForSeq2Seq(padding="longest"), samples in data order
  TRL       trl.SFTTrainer (installed by this script, pinned), packing="bfd" + padding_free, the
            completion-only loss from our labels, one pack of the same length per step, no
            gradient checkpointing; plus whether its packed loss equals its samples' losses alone
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def build_model(tokenizer_dir, gpu, seed=0):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    size = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16) if gpu else \
        dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), num_key_value_heads=size["num_attention_heads"] // 2,
                      max_position_embeddings=32768, pad_token_id=tok.pad_token_id, **size)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg), tok


def peak_memory(gpu):
    import torch
    if gpu:
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def train_timer(gpu):
    """A Trainer callback timing train() alone (dataset preparation and model set-up excluded)."""
    import torch
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.t0 = time.time()

        def on_train_end(self, *a, **k):
            if gpu:
                torch.cuda.synchronize()
            self.seconds = time.time() - self.t0
    return Timer()


def run_ours(data, tokenizer_dir, max_len, gpu):
    import numpy as np
    import torch
    from datasets import load_from_disk

    import train
    ds = load_from_disk(data)
    model, _ = build_model(tokenizer_dir, gpu)
    device = torch.device("cuda" if gpu else "cpu")
    model.to(device).train()
    n_trained, _, _ = train.scan_tokens(ds)
    idx, sel_len, _ = train.select_samples(ds["length"], n_trained, max_len, "drop")
    packs = train.pack_best_fit(sel_len, max_len, seed=0)
    runner = train.PackedLM(model, 2048)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu)
    real = computed = 0
    t0 = time.time()
    for p in packs:
        b = train.collate_pack(ds.select(idx[p]), max_len)
        n = train.trained_tokens(b["labels"])
        train.forward_backward(runner, [b], [False], n, 1, device, autocast)
        opt.step()
        opt.zero_grad(set_to_none=True)
        real += int(b["input_ids"].shape[1])
        computed += int(b["input_ids"].shape[1])
    if gpu:
        torch.cuda.synchronize()
    dt = time.time() - t0
    return {"seconds": dt, "real_tokens": real, "computed_positions": computed, "steps": len(packs),
            "samples": int(len(idx)), "peak_bytes": peak_memory(gpu),
            "fill": float(np.sum(sel_len)) / (len(packs) * max_len)}


def run_baseline(data, tokenizer_dir, batch_size, max_len, gpu):
    from datasets import load_from_disk
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments
    ds = load_from_disk(data)
    ds = ds.filter(lambda x: x["length"] <= max_len).select_columns(["input_ids", "labels"])
    model, tok = build_model(tokenizer_dir, gpu)
    collator = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100)
    counted = {"real": 0, "computed": 0}

    def counting(features):
        batch = collator(features)
        counted["real"] += int(batch["attention_mask"].sum())
        counted["computed"] += int(batch["input_ids"].numel())
        return batch

    timer = train_timer(gpu)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=batch_size, num_train_epochs=1,
                                 learning_rate=1e-4, report_to=[], save_strategy="no", logging_strategy="no",
                                 use_cpu=not gpu, bf16=gpu, dataloader_num_workers=0, seed=0,
                                 disable_tqdm=True, remove_unused_columns=False)
        trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=counting,
                          callbacks=[timer])
        trainer.train()
    return {"seconds": timer.seconds, "real_tokens": counted["real"], "computed_positions": counted["computed"],
            "steps": -(-len(ds) // batch_size), "samples": len(ds), "peak_bytes": peak_memory(gpu)}


def run_trl(data, tokenizer_dir, max_len, gpu):
    """The peer most users would pick: TRL's SFTTrainer with best-fit-decreasing packing (padding
    free: position_ids restart per sample, no attention mask), completion-only loss from our
    labels, one pack of <= max_len tokens per step, no gradient checkpointing -- as ours. Also
    measures whether its packed loss isolates samples: the first pack's loss as TRL computes it
    (model(**batch).loss) against each of its samples run alone (plain forward, torch's CE)."""
    import torch
    import torch.nn.functional as F
    from datasets import load_from_disk
    from trl import SFTConfig, SFTTrainer
    ds = load_from_disk(data).filter(lambda x: x["length"] <= max_len)
    ds = ds.map(lambda x: {"completion_mask": [int(y != -100) for y in x["labels"]]}).select_columns(
        ["input_ids", "completion_mask"])
    model, tok = build_model(tokenizer_dir, gpu)
    counted = {"real": 0, "computed": 0, "steps": 0}

    timer = train_timer(gpu)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = SFTConfig(output_dir=tmp, max_length=max_len, packing=True, packing_strategy="bfd", padding_free=True,
                        completion_only_loss=True, per_device_train_batch_size=1, num_train_epochs=1,
                        learning_rate=1e-4, gradient_checkpointing=False, report_to=[], save_strategy="no",
                        logging_strategy="no", use_cpu=not gpu, bf16=gpu, dataloader_num_workers=0, seed=0,
                        disable_tqdm=True)
        trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[timer])
        collate = trainer.data_collator

        def counting(features):
            batch = collate(features)
            counted["real"] += int(batch["input_ids"].numel())  # padding-free: every position is a real token
            counted["computed"] += int(batch["input_ids"].numel())
            counted["steps"] += 1
            return batch
        trainer.data_collator = counting
        # isolation, before any update: TRL's loss on its first pack vs its samples alone
        first = collate([trainer.train_dataset[0]])
        with torch.no_grad():
            packed = model(**{k: v for k, v in first.items()
                              if k in ("input_ids", "position_ids", "labels")}).loss.item()
            starts = (first["position_ids"][0] == 0).nonzero().flatten().tolist() + [first["input_ids"].shape[1]]
            total = n = 0
            for a_, b_ in zip(starts, starts[1:], strict=False):
                ids, lab = first["input_ids"][:, a_:b_], first["labels"][:, a_:b_]
                logits = model(input_ids=ids).logits[0, :-1]
                total += F.cross_entropy(logits.float(), lab[0, 1:], ignore_index=-100, reduction="sum").item()
                n += int((lab[0, 1:] != -100).sum())
        trainer.train()
    return {"seconds": timer.seconds, "real_tokens": counted["real"], "computed_positions": counted["computed"],
            "steps": counted["steps"], "samples": len(ds), "peak_bytes": peak_memory(gpu),
            "first_pack_loss": packed, "first_pack_loss_per_sample": total / n, "first_pack_samples": len(starts) - 1,
            "trl": __import__("trl").__version__}


TRL_VERSION = "1.16.0"


def ensure_trl():
    """TRL is the peer baseline, not a dependency of ours: installed here, at a pinned version."""
    try:
        import trl
        if trl.__version__ == TRL_VERSION:
            return
    except ImportError:
        pass
    print(f"installing trl=={TRL_VERSION} for the comparison ...", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"trl=={TRL_VERSION}"], check=True)


def subprocess_run(args):
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="a prepare_data.py output folder (default: build the demo's in a temp folder)")
    p.add_argument("--max-len", type=int, nargs="+",
                   help="our pack lengths (default 512 1024 2048 on CPU, 32768 on GPU); "
                   "the baseline drops samples longer than the largest")
    p.add_argument("--batch-size", type=int, help="baseline samples per batch (default 8 on CPU, 16 on GPU)")
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--no-trl", action="store_true", help="skip TRL's SFTTrainer (installed into the venv if missing)")
    p.add_argument("--one", choices=["ours", "baseline", "trl"], help=argparse.SUPPRESS)
    a = p.parse_args()
    lens = a.max_len or ([32768] if a.gpu else [512, 1024, 2048])
    max_len = max(lens)
    batch = a.batch_size or (16 if a.gpu else 8)
    if a.one:
        stage = os.path.join(a.data, "stage1")
        tok = os.path.join(a.data, "tokenizer")
        r = (run_ours(stage, tok, max_len, a.gpu) if a.one == "ours" else run_trl(stage, tok, max_len, a.gpu)
             if a.one == "trl" else run_baseline(stage, tok, batch, max_len, a.gpu))
        print(json.dumps(r))
        return
    with tempfile.TemporaryDirectory() as tmp:
        data = a.data
        if not data:
            import prepare_data
            data = os.path.join(tmp, "data")
            print("building the demo's SFT data (prepare_data.py on recipe.json) ...", flush=True)
            with open(os.devnull, "w") as devnull:
                saved, sys.stdout = sys.stdout, devnull
                try:
                    prepare_data.main(["--recipe", os.path.join(ROOT, "recipe.json"), "--tokenizer",
                                       os.path.join(tmp, "tok"), "--build-tokenizer", "6000", "--out", data])
                finally:
                    sys.stdout = saved
        flags = ["--data", data, "--batch-size", str(batch)] + (["--gpu"] if a.gpu else [])
        base = subprocess_run(flags + ["--max-len", str(max_len), "--one", "baseline"])
        ours = {n: subprocess_run(flags + ["--max-len", str(n), "--one", "ours"]) for n in lens}
        trl = {}
        if not a.no_trl:
            ensure_trl()
            trl = {n: subprocess_run(flags + ["--max-len", str(n), "--one", "trl"]) for n in lens}
    where = "GPU bf16" if a.gpu else f"CPU fp32, {os.cpu_count()} cores"
    print(f"one pass over {base['samples']} SFT samples of <= {max_len} tokens ({where})")
    print(f"{'':24s} {'real tokens':>12s} {'positions':>10s} {'padding':>8s} {'steps':>6s} {'seconds':>8s} "
          f"{'real tok/s':>11s} {'peak GiB':>9s} {'vs baseline':>12s}")
    rate = base["real_tokens"] / base["seconds"]
    rows = [(f"baseline, batch {batch}", base)] + [(f"ours, packs of {n}", r) for n, r in ours.items()] + \
        [(f"TRL, packs of {n}", r) for n, r in trl.items()]
    for name, r in rows:
        pad = 1 - r["real_tokens"] / r["computed_positions"]  # packs are never padded: 0 for ours
        print(f"{name:24s} {r['real_tokens']:12d} {r['computed_positions']:10d} {pad:8.1%} {r['steps']:6d} "
              f"{r['seconds']:8.1f} {r['real_tokens'] / r['seconds']:11,.0f} {r['peak_bytes'] / 2**30:9.2f} "
              f"{r['real_tokens'] / r['seconds'] / rate:6.2f}x tok/s, {r['peak_bytes'] / base['peak_bytes']:.2f}x mem")
    for n, r in trl.items():
        o = ours[n]
        rel = abs(r["first_pack_loss"] - r["first_pack_loss_per_sample"]) / r["first_pack_loss_per_sample"]
        print(f"packs of {n}: ours {o['real_tokens'] / o['seconds'] / (r['real_tokens'] / r['seconds']):.2f}x TRL "
              f"{r['trl']}'s real tokens/s, {o['peak_bytes'] / r['peak_bytes']:.2f}x its peak memory; TRL's first pack "
              f"({r['first_pack_samples']} samples): loss {r['first_pack_loss']:.6f} as TRL computes it vs "
              f"{r['first_pack_loss_per_sample']:.6f} with each sample alone (relative difference {rel:.1e}: "
              f"{'isolated' if rel < 1e-4 else 'NOT isolated'})")


if __name__ == "__main__":
    main()
