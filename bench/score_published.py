"""
How long does scoring LawBench take, and what do our two rewritten hot paths buy?

    .venv/bin/python bench/score_published.py [--shared ../shared/lawbench] [--num-proc 2]

1. Wall time of `evaluate.py score` over every published prediction set in ../shared/lawbench
   (6 models zero-shot + 3 one-shot, 18 tasks each), and seconds per model-task file.
2. ROUGE-L (tasks 1-1, 2-7, 3-2, 3-8 of GPT4 zero-shot): ours vs rouge_chinese's Rouge().get_scores
   as LawBench calls it, same jieba input; results must be identical.
3. Task 2-1 alignment (first N sentences of GPT4 zero-shot): ours vs a literal ChERRANT dynamic
   programme (tests/test_cherrant.py); alignments must be identical.
4. The whole scorer on every published prediction set, ours vs the straightforward per-item way:
   the same scorer with its two rewritten hot paths put back to the obvious code -- ROUGE-L by
   rouge_chinese's Rouge().get_scores one item at a time, as LawBench calls it, and 2-1's alignment
   by the literal cell-by-cell dynamic programme, one pair at a time. Every task score and abstention rate must be
   equal; the wall times are compared (same number of processes).
5. Task 2-1 per model and setting, CPU seconds in one process: ours vs cherrant.py as of commit
   --before-2-1 (default af881d9: one pair at a time, a numpy row loop, every cheapest alignment
   enumerated and merged path by path, as upstream does), loaded with `git show`. Scores must be
   equal.
6. `evaluate.py score` on one model and setting, all 18 tasks, in a fresh process each time (as a
   user runs it): CPU seconds and wall time of this tree vs the tree of commit --before (default
   64019d0, before the compiled aligner and the faster segmentation), extracted with `git archive`
   and run with the same Python. Every task score must be equal. Once more with an empty numba
   cache, to show what the very first run costs.
7. The same work in one process, one model and setting after another, as `evaluate.py score` does
   for a folder of models with --num-proc 1: CPU seconds of each (all 18 tasks). What every
   process pays once (imports, numba's kernels, pinyin and Cilin, the references) lands on the
   first; the others show what one more model costs.
Prints each figure and the ratio baseline/ours, all measured in this run.
"""
import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import cherrant as C  # noqa: E402
import evaluate as E  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=os.path.join(os.path.dirname(ROOT), "shared", "lawbench"),
                    help="folder with LawBench's predictions/ (default ../shared/lawbench)")
    ap.add_argument("--num-proc", type=int, default=2, help="worker processes for the full run (default 2)")
    ap.add_argument("--sentences", type=int, default=40, help="2-1 sentences per model for the alignment comparison")
    ap.add_argument("--before-2-1", default="af881d9",
                    help="commit whose cherrant.py part 5 compares against (default af881d9, before the batched, "
                         "graph-based annotator)")
    ap.add_argument("--before", default="64019d0",
                    help="commit whose whole tree part 6 compares against (default 64019d0, before the compiled "
                         "aligner)")
    ap.add_argument("--parts", default="1,2,3,4,5,6,7", help="which measurements to run (default 1,2,3,4,5,6,7)")
    args = ap.parse_args()
    preds = os.path.join(args.shared, "predictions")

    parts = set(args.parts.split(","))
    gpt4 = os.path.join(preds, "zero_shot", "GPT4")
    if "1" in parts:
        full_run(preds, args.num_proc)
    if "2" in parts:
        rouge_vs_rouge_chinese(gpt4)
    if "3" in parts:
        for model in ("GPT4", "chatglm2-6b-hf"):
            alignment_vs_literal(os.path.join(preds, "zero_shot", model), model, args.sentences)
    if "4" in parts:
        whole_scorer_vs_straightforward(preds, args.num_proc)
    if "5" in parts:
        task_2_1_vs_before(preds, args.before_2_1)
    if "6" in parts:
        fresh_process_vs_before(preds, args.before)
    if "7" in parts:
        one_process_model_after_model(preds)


def full_run(preds, num_proc):
    t0 = time.time()
    n_files = 0
    for setting in ("zero_shot", "one_shot"):
        report = E.score_predictions(preds, setting, num_proc=num_proc, progress=False)
        n_files += sum(len(e["tasks"]) for e in report["models"].values())
        for model, entry in report["models"].items():
            slow = {t: r["seconds"] for t, r in entry["tasks"].items()}
            print(f"  {setting:9s} {model:28s} {sum(slow.values()):6.1f} s of work  (2-1: {slow['2-1']:.1f} s)")
    full = time.time() - t0
    print(f"[1] scored {n_files} files (9 model/setting pairs) in {full:.1f} s wall with {num_proc} processes")


def rouge_vs_rouge_chinese(gpt4):
    import jieba
    from rouge_chinese import Rouge
    ours_t = base_t = 0.0
    E.jieba_words("预热一下"), list(jieba.cut("预热一下"))  # dictionaries loaded outside the timing
    for task in ("1-1", "2-7", "3-2", "3-8"):
        items, _, _ = E.load_prediction_file(os.path.join(gpt4, f"{task}.json"))
        refs = [it["refr"].replace("答案:", "") if task == "1-1" else it["refr"] for it in items]
        preds_ = [it["prediction"] for it in items]
        E._SEGMENTED.clear()
        t = time.time()
        ours, _ = E.rouge_l(preds_, refs)
        ours_t += time.time() - t
        t = time.time()
        hyps = [" ".join(jieba.cut(h)) for h in preds_]
        hyps = [h if h.strip() else "无内容" for h in hyps]
        base = [s["rouge-l"]["f"] for s in Rouge().get_scores(hyps, [" ".join(jieba.cut(r)) for r in refs])]
        base_t += time.time() - t
        assert ours == base, task
    print(f"[2] ROUGE-L, 2000 items: rouge_chinese {base_t:.2f} s, ours {ours_t:.2f} s, "
          f"ratio {base_t / ours_t:.1f}x (identical scores)")


def alignment_vs_literal(folder, model, sentences):
    from test_cherrant import decode, literal_alignment
    items, _, _ = E.load_prediction_file(os.path.join(folder, "2-1.json"))
    pairs = []
    for it in items[:sentences]:
        s, p, _ = E.cherrant_prepare(it["prompt"], it["prediction"], it["refr"])
        if s != p:
            pairs.append((C.cherrant_tokens(s), C.cherrant_tokens(p)))
    C.cherrant_align(*pairs[0])  # load resources outside the timing
    t = time.time()
    fast = [C.cherrant_align(s, p) for s, p in pairs]
    fast_t = time.time() - t
    fast = [decode(ops, ktrans) for ops, ktrans, _ in fast]  # to compare; the literal one builds this as it goes
    t = time.time()
    slow = [literal_alignment(s, p) for s, p in pairs]
    slow_t = time.time() - t
    assert fast == slow
    print(f"[3] 2-1 alignment, {model}, {len(pairs)} sentences: literal DP {slow_t:.2f} s, ours {fast_t:.2f} s, "
          f"ratio {slow_t / fast_t:.1f}x (identical alignments)")


def per_item_rouge(predictions, references):
    """ROUGE-L the way LawBench computes it: jieba, then rouge_chinese's get_scores, item by item."""
    import jieba
    from rouge_chinese import Rouge
    rouge = Rouge()
    scores, errors = [], []
    for i, (pred, ref) in enumerate(zip(predictions, references, strict=True)):
        hyp = " ".join(jieba.cut(pred))
        try:
            scores.append(rouge.get_scores(hyp if hyp.strip() else "无内容",
                                           " ".join(jieba.cut(ref)))[0]["rouge-l"]["f"])
        except ValueError as exc:
            scores.append(0.0)
            errors.append((i, f"rouge_chinese: {exc}; scored 0"))
    return scores, errors


_PLAIN_CN2AN = {}


def plain_cn2an(text):
    """cn2an on every text (cached like ours), without skipping texts that have no numeral."""
    import warnings

    import cn2an
    if text not in _PLAIN_CN2AN:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            _PLAIN_CN2AN[text] = cn2an.transform(text, "cn2an")
    return _PLAIN_CN2AN[text]


def literal_align_arrays(src, tgt):
    """tests/test_cherrant.py's literal dynamic programme, in the form the scorer consumes:
    (ops bitmask, window length found, windows compared) per cell."""
    import numpy as np
    from test_cherrant import literal_alignment
    scans = {}
    cells = literal_alignment(src, tgt, scans)
    n, m = len(src), len(tgt)
    bits = {"M": C.OP_M, "S": C.OP_S, "I": C.OP_I, "D": C.OP_D, "T": C.OP_T}
    ops = np.zeros((n + 1, m + 1), dtype=np.int64)
    ops[1:, 0], ops[0, 1:] = C.OP_D, C.OP_I
    ktrans = np.zeros((n + 1, m + 1), dtype=np.int64)
    iters = np.zeros((n, m), dtype=np.int64)
    for (a, b), (names, _) in cells.items():
        ops[a, b] = sum(bits[x] for x in names)
    for (a, b), (klen, compared) in scans.items():
        ktrans[a, b], iters[a - 1, b - 1] = klen, compared
    return ops, ktrans, iters


def whole_scorer_vs_straightforward(preds, num_proc):
    def score_all():
        t = time.time()
        reports = {s: E.score_predictions(preds, s, num_proc=num_proc, progress=False)
                   for s in ("zero_shot", "one_shot")}
        return reports, time.time() - t

    ours, ours_t = score_all()
    fast = E.rouge_l, C.cherrant_align_many, E.cn2an_transform
    # worker processes fork with these
    E.rouge_l, C.cherrant_align_many, E.cn2an_transform = (
        per_item_rouge, lambda pairs: [literal_align_arrays(s, t) for s, t in pairs], plain_cn2an)
    try:
        base, base_t = score_all()
    finally:
        E.rouge_l, C.cherrant_align_many, E.cn2an_transform = fast
    n = differ = 0
    for setting in ours:
        for model, entry in ours[setting]["models"].items():
            for task, r in entry["tasks"].items():
                b = base[setting]["models"][model]["tasks"][task]
                n += 1
                differ += (r["score"], r.get("abstention_rate")) != (b["score"], b.get("abstention_rate"))
    print(f"[4] whole scorer, {n} files: straightforward {base_t:.1f} s, ours {ours_t:.1f} s wall "
          f"({num_proc} processes), ratio {base_t / ours_t:.1f}x; files with a different score or abstention: {differ}")


def task_2_1_vs_before(preds, before):
    """Task 2-1 scored by this cherrant.py and by the one of commit `before` (loaded with git show),
    each in this process, one model and setting at a time, references annotated afresh each time."""
    import importlib.util
    import subprocess
    import tempfile
    code = subprocess.run(["git", "-C", ROOT, "show", f"{before}:cherrant.py"], check=True,
                          capture_output=True, text=True).stdout
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "cherrant_before.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(code)
        spec = importlib.util.spec_from_file_location("cherrant_before", path)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
    old.ASSETS = C.ASSETS
    for module in (C, old):  # pinyin, Cilin and OpenCC loaded outside the timing
        module.cherrant_edits("上诉", "上述")

    def score_before(items):  # evaluate.score_2_1 as it was: one pair at a time
        tp = fp = fn = 0
        gold = {}
        for it in items:
            source, pred, ref = E.cherrant_prepare(it["prompt"], it["prediction"], it["refr"])
            t, f, n = old.compare_edits(old.cherrant_edits(source, pred), old.cherrant_edits(source, ref, cache=gold))
            tp, fp, fn = tp + t, fp + f, fn + n
        return old.f_beta(tp, fp, fn)

    def timed(fn, items):
        E._EDITS.clear()  # as in a fresh process: the references are annotated too
        t = time.process_time()
        return fn(items), time.process_time() - t

    worst = [0.0, 0.0]
    for setting in ("zero_shot", "one_shot"):
        for model in sorted(os.listdir(os.path.join(preds, setting))):
            path = os.path.join(preds, setting, model, "2-1.json")
            if not os.path.isfile(path):
                continue
            items, _, _ = E.load_prediction_file(path)
            base, base_t = timed(score_before, items)
            ours, ours_t = timed(lambda x: E.score_2_1(x)["score"], items)
            assert ours == base, (setting, model, ours, base)
            worst = [max(worst[0], base_t), max(worst[1], ours_t)]
            print(f"[5] 2-1 {setting:9s} {model:28s} before ({before}) {base_t:6.1f} s, ours {ours_t:5.1f} s CPU, "
                  f"ratio {base_t / ours_t:4.1f}x (F0.5 {ours:.4f} both)")
    print(f"[5] 2-1, slowest model and setting: before {worst[0]:.1f} s, ours {worst[1]:.1f} s CPU, "
          f"ratio {worst[0] / worst[1]:.1f}x")


def fresh_process_vs_before(preds, before):
    """`evaluate.py score --num-proc 1` per model and setting, each in a new process: this tree vs
    the tree of commit `before`. CPU time is the child's user + system time."""
    import json
    import resource
    import subprocess
    import tempfile

    def run(tree, folder, out, env=None):
        r0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
        subprocess.run([sys.executable, os.path.join(tree, "evaluate.py"), "score", "--predictions", folder,
                        "--num-proc", "1", "--quiet", "--out", out], check=True, capture_output=True, env=env)
        r1, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.time() - t0
        with open(os.path.join(out, "scores.json"), encoding="utf-8") as f:
            entry = next(iter(json.load(f)["models"].values()))
        scores = {t: (r["score"], r.get("abstention_rate")) for t, r in entry["tasks"].items()}
        return r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime, wall, scores

    with tempfile.TemporaryDirectory() as tmp:
        old_tree = os.path.join(tmp, "before")
        os.makedirs(old_tree)
        archive = subprocess.run(["git", "-C", ROOT, "archive", before], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", old_tree], input=archive, check=True)
        folders = [(s, m) for s in ("zero_shot", "one_shot") for m in sorted(os.listdir(os.path.join(preds, s)))
                   if os.path.isdir(os.path.join(preds, s, m))]
        run(ROOT, os.path.join(preds, *folders[0]), os.path.join(tmp, "warm"))  # numba's cache filled once
        worst = [0.0, 0.0]
        for setting, model in folders:
            folder = os.path.join(preds, setting, model)
            base_cpu, base_wall, base = run(old_tree, folder, os.path.join(tmp, "old"))
            ours_cpu, ours_wall, ours = run(ROOT, folder, os.path.join(tmp, "new"))
            assert ours == base, (setting, model)
            worst = [max(worst[0], base_cpu), max(worst[1], ours_cpu)]
            print(f"[6] fresh process {setting:9s} {model:28s} before ({before}) {base_cpu:5.1f} s CPU "
                  f"({base_wall:5.1f} s wall), ours {ours_cpu:4.1f} s CPU ({ours_wall:4.1f} s wall), "
                  f"ratio {base_cpu / ours_cpu:3.1f}x; 18 task scores equal")
        print(f"[6] slowest model and setting, fresh process: before {worst[0]:.1f} s CPU, ours {worst[1]:.1f} s CPU, "
              f"ratio {worst[0] / worst[1]:.1f}x")
        env = dict(os.environ, NUMBA_CACHE_DIR=os.path.join(tmp, "empty-numba-cache"))
        cold_cpu, cold_wall, _ = run(ROOT, os.path.join(preds, *folders[0]), os.path.join(tmp, "cold"), env)
        print(f"[6] the very first run (empty numba cache, so the aligner is compiled), {folders[0][1]} "
              f"{folders[0][0]}: {cold_cpu:.1f} s CPU ({cold_wall:.1f} s wall)")


def one_process_model_after_model(preds):
    """In a new process (nothing loaded yet): every model and setting scored in turn, CPU seconds each."""
    import subprocess
    code = f"""
import os, sys, time
sys.path.insert(0, {ROOT!r})
import evaluate as E
preds = {preds!r}
for setting in ("zero_shot", "one_shot"):
    for model in sorted(os.listdir(os.path.join(preds, setting))):
        folder = os.path.join(preds, setting, model)
        if not os.path.isdir(folder):
            continue
        t = time.process_time()
        E.score_predictions(folder, None, num_proc=1, progress=False)
        print(setting, model, round(time.process_time() - t, 2), flush=True)
"""
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    rows = [line.split() for line in out.splitlines()]
    for i, (setting, model, cpu) in enumerate(rows):
        note = " (first: pays the process's start-up)" if i == 0 else ""
        print(f"[7] one process, in turn: {setting:9s} {model:28s} {float(cpu):4.1f} s CPU{note}")
    rest = [float(cpu) for _, _, cpu in rows[1:]]
    print(f"[7] first model {float(rows[0][2]):.1f} s CPU; each further model {min(rest):.1f} - {max(rest):.1f} s CPU; "
          f"all {len(rows)} in {time.time() - t0:.1f} s wall")


if __name__ == "__main__":
    main()
