"""
bench/packing.py -- how full are train.py's packs, and how long does packing take?

    .venv/bin/python bench/packing.py                                   # lengths from the bundled LawBench slice
    .venv/bin/python bench/packing.py --lawbench ../shared/lawbench/data # all 20 tasks, both settings

Sample lengths: the character length of every LawBench item (instruction + question + answer +
20 characters of chat template) at 1.4 characters per token -- statute questions, judgment
summaries and consultations, i.e. legal SFT data -- resampled to --samples samples.
At 4k, 8k and 32k tokens per pack (samples longer than the pack are left out at that size):
  ours          train.pack_best_fit: best-fit decreasing
  greedy        concatenate in data order, start a new pack when the next sample doesn't fit
  first-fit     each sample, in data order, into the first pack with room
  lower bound   ceil(total tokens / pack size) packs: no packing can use fewer
Fill = real tokens / (packs x pack size). Then the time to pack 1M samples at 32k, ours vs greedy.
"""
import argparse
import glob
import json
import math
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402


def lawbench_lengths(folder, n, seed=0, chars_per_token=1.4):
    chars = [len(it["instruction"]) + len(it["question"]) + len(it["answer"]) + 20
             for f in glob.glob(os.path.join(folder, "**", "*.json"), recursive=True)
             for it in json.load(open(f, encoding="utf-8"))]
    if not chars:
        sys.exit(f"error: no LawBench task files under {folder}")
    tokens = np.maximum(8, (np.array(chars) / chars_per_token).astype(np.int64))
    return np.random.default_rng(seed).choice(tokens, n), len(chars)


def greedy(lengths, max_len):
    packs, room = 0, 0
    for n in lengths.tolist():
        if n > room:
            packs, room = packs + 1, max_len
        room -= n
    return packs


def first_fit(lengths, max_len):
    room = np.zeros(len(lengths), dtype=np.int64)  # at most one pack per sample
    used = 0
    for n in lengths.tolist():
        j = int(np.argmax(room[:used] >= n)) if used else 0
        if used == 0 or room[j] < n:
            j, used = used, used + 1
            room[j] = max_len
        room[j] -= n
    return used


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lawbench", default=os.path.join(ROOT, "lawbench_assets", "data"),
                   help="LawBench data folder whose item lengths are resampled (default: the bundled slice)")
    p.add_argument("--samples", type=int, default=200_000, help="samples for the fill comparison (default %(default)s)")
    a = p.parse_args()
    lengths, n_items = lawbench_lengths(a.lawbench, a.samples)
    print(f"{a.samples} samples resampled from {n_items} LawBench items ({a.lawbench}); tokens: "
          f"median {int(np.median(lengths))}, p99 {int(np.percentile(lengths, 99))}, max {lengths.max()}")
    print(f"{'pack':>6} {'samples':>8} {'lower bound':>12} {'ours (BFD)':>16} {'greedy':>16} {'first-fit':>16}")
    for max_len in (4096, 8192, 32768):
        ln = lengths[lengths <= max_len]
        total = int(ln.sum())
        t0 = time.time()
        ours = len(train.pack_best_fit(ln, max_len))
        t_ours = time.time() - t0
        cells = [f"{k:6d} {total / (k * max_len):6.2%}" for k in (ours, greedy(ln, max_len), first_fit(ln, max_len))]
        print(f"{max_len:6d} {len(ln):8d} {math.ceil(total / max_len):12d} " + " ".join(f"{c:>16}" for c in cells)
              + f"   (ours packed in {t_ours:.2f} s)")
    big = np.random.default_rng(1).choice(lengths, 1_000_000)
    t0 = time.time()
    packs = train.pack_best_fit(big, 32768)
    t_ours = time.time() - t0
    t0 = time.time()
    greedy(big, 32768)
    t_greedy = time.time() - t0
    print(f"1M samples at 32k: ours {t_ours:.2f} s ({len(packs)} packs, fill "
          f"{train.fill_efficiency(packs, big, 32768):.2%}), greedy {t_greedy:.2f} s "
          f"-> ours takes {t_ours / t_greedy:.1f}x greedy's time")


if __name__ == "__main__":
    main()
