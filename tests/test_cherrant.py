"""Task 2-1: our char-level ChERRANT against a literal, slow implementation of its alignment
rules, and the behaviours of the official annotator the published scores depend on."""
import random

import cherrant as C
import evaluate as E


def literal_alignment(src, tgt, scans=None):
    """ChERRANT's alignment, written the slow, obvious way: per cell, substitution / insertion /
    deletion, and a transposition found by scanning k = 1, 2, ... back along the diagonal while the
    diagonal cost changes, comparing sorted windows. Returns {(a, b): (set of ops, k+1 or 0)}.
    `scans`, a dict, receives per mismatched cell (window length found or 0, windows compared)."""
    n, m = len(src), len(tgt)
    vocab_s, vocab_t = sorted(set(src)), sorted(set(tgt))
    table = C.substitution_costs(vocab_s, vocab_t)
    sub = {(a, b): table[i, j] for i, a in enumerate(vocab_s) for j, b in enumerate(vocab_t)}
    cost = [[0.0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        cost[i][0] = cost[i - 1][0] + 1
    for j in range(1, m + 1):
        cost[0][j] = cost[0][j - 1] + 1
    out = {}
    for i in range(n):
        for j in range(m):
            if src[i] == tgt[j]:
                cost[i + 1][j + 1] = cost[i][j]
                out[i + 1, j + 1] = ({"M"}, 0)
                continue
            options = {"S": cost[i][j] + sub[src[i], tgt[j]], "I": cost[i + 1][j] + 1, "D": cost[i][j + 1] + 1}
            k, klen, compared = 1, 0, 0
            while i - k >= 0 and j - k >= 0 and cost[i - k + 1][j - k + 1] != cost[i - k][j - k]:
                compared += 1
                if sorted(src[i - k:i + 1]) == sorted(tgt[j - k:j + 1]):
                    options["T"] = cost[i - k][j - k] + k
                    klen = k + 1
                    break
                k += 1
            if scans is not None:
                scans[i + 1, j + 1] = (klen, compared)
            best = min(options.values())
            cost[i + 1][j + 1] = best
            ops = {name for name, c in options.items() if c == best}
            out[i + 1, j + 1] = (ops, klen if "T" in ops else 0)
    return out


def decode(ops, ktrans):
    names = {C.OP_M: "M", C.OP_S: "S", C.OP_I: "I", C.OP_D: "D", C.OP_T: "T"}
    return {(a, b): ({name for bit, name in names.items() if ops[a, b] & bit},
                     int(ktrans[a, b]) if ops[a, b] & C.OP_T else 0)
            for a in range(1, ops.shape[0]) for b in range(1, ops.shape[1])}


def random_pairs(count, seed):
    rng = random.Random(seed)
    alphabet = list("上述证据收集程序合法内容客观真实足以认定指控事实，。的了a1")
    for _ in range(count):
        letters = alphabet[:rng.randint(2, len(alphabet))]
        src = [rng.choice(letters) for _ in range(rng.randint(1, 14))]
        if rng.random() < 0.5:  # near-copies with swaps and insertions: transposition territory
            tgt = src[:]
            for _ in range(rng.randint(1, 3)):
                x, y = rng.randrange(len(tgt)), rng.randrange(len(tgt))
                tgt[x], tgt[y] = tgt[y], tgt[x]
            if rng.random() < 0.5:
                tgt.insert(rng.randrange(len(tgt) + 1), rng.choice(letters))
        else:
            tgt = [rng.choice(letters) for _ in range(rng.randint(1, 14))]
        yield src, tgt


def test_fast_alignment_equals_the_literal_dynamic_programme():
    C.cherrant_resources()
    for src, tgt in random_pairs(1500, seed=0):
        ops, ktrans, _ = C.cherrant_align(src, tgt)
        assert decode(ops, ktrans) == literal_alignment(src, tgt), (src, tgt)


def test_fast_alignment_equals_the_literal_one_on_real_lawbench_sentences(shared):
    import json
    import os
    data = json.load(open(os.path.join(shared, "predictions", "zero_shot", "GPT4", "2-1.json"), encoding="utf-8"))
    for key in list(data)[:40]:
        it = data[key]
        src, pred, _ = E.cherrant_prepare(E.prompt_text(it["origin_prompt"]), it["prediction"], it["refr"])
        if src != pred:
            s, t = C.cherrant_tokens(src), C.cherrant_tokens(pred)
            ops, ktrans, _ = C.cherrant_align(s, t)
            assert decode(ops, ktrans) == literal_alignment(s, t)


def test_substitution_cost_components():
    table = C.substitution_costs(["诉", "，", "a"], ["述", "｡", "。"])
    # 诉/述: same Cilin class H-i but different sub-class (2/6), shared reading "su" (0), two
    # non-punctuation characters (0.25)
    assert table[0, 0] == 2 / 6 + 0 + 0.25
    assert table[1, 1] == 4 / 6 + 0.5 + 0.0  # two punctuation marks (unknown to Cilin, not Chinese)
    # ChERRANT's punctuation list has the half-width "｡" but not "。" (U+3002): a mixed pair, 0.499
    assert table[1, 2] == 4 / 6 + 0.5 + 0.499
    assert table[2, 0] == 4 / 6 + 0.5 + 0.25  # Latin letter: unknown class, not Chinese


def literal_substitution_cost(a, b):
    """ChERRANT's char-level substitution cost of a -> b, from its definition, token by token."""
    r = C.cherrant_resources()
    code_a, code_b = r["semantic"].get(a), r["semantic"].get(b)
    semantic = 2 * (3 - sum(x == y for x, y in zip(code_a, code_b, strict=True))) if code_a and code_b else 4
    chinese = all("\u4e00" <= ch <= "\u9fff" for ch in a + b)
    similar = (C._pinyins(a) & C._pinyins(b) or b in r["confusion"].get(a, ()) or a in r["confusion"].get(b, ()))
    spelling = 0.0 if chinese and similar else 0.5
    pa, pb = a in C.ALIGN_PUNCT, b in C.ALIGN_PUNCT
    position = 0.0 if pa and pb else 0.25 if not pa and not pb else 0.499
    return semantic / 6.0 + spelling + position


def test_substitution_costs_equal_their_definition_on_real_sentences(shared):
    # Every token pair of the first 2-1 sentences and GPT-4's corrections, bit for bit.
    import json
    import os
    data = json.load(open(os.path.join(shared, "predictions", "zero_shot", "GPT4", "2-1.json"), encoding="utf-8"))
    src, tgt = set(), set()
    for it in list(data.values())[:60]:
        s, p, r = E.cherrant_prepare(E.prompt_text(it["origin_prompt"]), it["prediction"], it["refr"])
        src |= set(C.cherrant_tokens(s))
        tgt |= set(C.cherrant_tokens(p)) | set(C.cherrant_tokens(r))
    src, tgt = sorted(src), sorted(tgt)
    assert len(src) > 300 and len(tgt) > 300
    table = C.substitution_costs(src, tgt)
    assert [[literal_substitution_cost(a, b) for b in tgt] for a in src] == table.tolist()
    # Every component varies: 10 distinct costs, among them similar characters (under 0.6)
    assert len(set(table.ravel().tolist())) >= 10 and table.min() < 0.6


def test_identical_prediction_is_a_noop_and_misses_every_reference_edit():
    source, reference = "上诉证据收集程序合法", "上述证据收集程序合法"
    hyp = C.cherrant_edits(source, source)
    ref = C.cherrant_edits(source, reference)
    assert hyp == {(-1, -1, "-NONE-"): ["noop"]}
    assert ref == {(1, 2, "述"): ["S"]}
    assert C.compare_edits(hyp, ref) == (0, 0, 1)
    assert C.compare_edits(ref, ref) == (1, 0, 0)


def test_word_order_swap_becomes_one_W_edit():
    edits = C.cherrant_edits("被告人对事实无异议", "被告人对事实异无议")
    assert list(edits.values()) == [["W"]]
    assert list(edits) == [(6, 8, "异无")]


def test_edits_shared_by_distinct_cheapest_alignments_count_once_per_alignment():
    # Two distinct cheapest edit lists; both delete 人, so that edit counts twice.
    edits = C.cherrant_edits("，告判人", "，，，判")
    assert edits[(3, 4, "-NONE-")] == ["R", "R"]
    assert sorted(k for k, v in edits.items() if v == ["S"]) == [(1, 2, "，"), (1, 2, "，，")]
    reference = {(3, 4, "-NONE-"): ["R"]}
    assert C.compare_edits(edits, reference) == (1, 3, 0)  # a TP per reference entry, an FP per hyp entry


def test_not_annotatable_reference_skips_the_sentence():
    assert C.compare_edits({(0, 1, "x"): ["S"]}, {(-1, -1, "-NONE-"): ["NA"]}) == (0, 0, 0)


def test_exploding_alignment_falls_back_to_the_one_character_answer():
    # Two unrelated sentences of equal length: astronomically many cheapest alignments. The
    # official annotator times out and re-annotates the prediction as "无"; so do we.
    source = "本院认为被告人张某以非法占有为目的秘密窃取他人财物数额较大其行为已构成盗窃罪依法应予惩处" * 2
    prediction = "根据上述事实和证据可以认定原告主张的借款关系成立被告应当按照约定偿还借款本金及利息费用" * 2
    edits, work, failed = C.cherrant_annotate(source, prediction)
    assert failed and work > C.CHERRANT_WORK_BUDGET
    assert C.cherrant_edits(source, prediction) == C.cherrant_annotate(source, "无")[0]


def test_empty_or_whitespace_prediction_is_treated_like_a_timeout():
    source, pred, ref = E.cherrant_prepare("纠正句子。句子：\n上诉证据合法", " \u3000 ", "上述证据合法")
    assert pred == ""  # whitespace-only: upstream's lookup fails and the sentence is redone with "无"
    assert C.cherrant_edits(source, pred) == C.cherrant_annotate(source, "无")[0]
    assert E.cherrant_prepare("句子：\n上诉证据合法", "", "上述证据合法")[1] == "无内容"


def test_prediction_is_truncated_and_converted_to_simplified_chinese():
    source, pred, ref = E.cherrant_prepare("句子：\n上诉证据", "上述證據" + "啊" * 20, "上述证据")
    assert pred == "上述证据" + "啊" * 5  # at most 5 characters longer than the reference
    assert source == "上诉证据"


def test_f_half_is_rounded_like_chERRANT_prints_it():
    assert C.f_beta(1, 2, 3) == round(1.25 * (1 / 3) * 0.25 / (0.25 * (1 / 3) + 0.25), 4)
    assert C.f_beta(0, 0, 0) == 1.0  # nothing to find and nothing claimed
    assert C.f_beta(0, 5, 0) == 0.0


def enumerate_alignments(ops, ktrans, first_only):
    """Every cheapest alignment, path by path, as upstream walks them: each a list of
    (op, src_start, src_end, tgt_start, tgt_end)."""
    n, m = ops.shape[0] - 1, ops.shape[1] - 1
    paths, stack = [], [(n, m, [])]
    while stack:
        a, b, tail = stack.pop()
        if a == 0 and b == 0:
            paths.append(tail[::-1])
            continue
        for op, pa, pb in C._cell_ops(ops, ktrans, a, b, first_only):
            stack.append((pa, pb, tail + [(op, pa, a, pb, b)]))
    return paths


def distinct_by_enumeration(ops, ktrans, first_only):
    return sorted({tuple(C.run_edits(path)) for path in enumerate_alignments(ops, ktrans, first_only)})


def test_path_counts_and_edit_lists_from_the_graph_equal_walking_every_path():
    C.cherrant_resources()
    single = 0
    for src, tgt in random_pairs(1500, seed=7):
        ops, ktrans, _ = C.cherrant_align(src, tgt)
        for first_only in (False, True):
            assert C.count_alignments(ops, ktrans, first_only) == len(enumerate_alignments(ops, ktrans, first_only))
            lists = C.distinct_run_edit_lists(ops, ktrans, first_only)
            assert sorted(map(tuple, lists)) == distinct_by_enumeration(ops, ktrans, first_only), (src, tgt)
            assert len({tuple(x) for x in lists}) == len(lists)  # each distinct list once
            if C.count_alignments(ops, ktrans, first_only) == 1:
                single += 1
                assert [C.only_alignment(ops, ktrans, first_only)] == enumerate_alignments(ops, ktrans, first_only)
    assert single > 300


def test_pairs_aligned_together_equal_the_literal_programme(monkeypatch):
    # Consecutive pairs share token ids and a cost table; a small vocabulary limit forces many
    # batches, and pairs that alone exceed it.
    C.cherrant_resources()
    pairs = list(random_pairs(400, seed=11))
    for limit in (C.ALIGN_VOCABULARY, 12):
        monkeypatch.setattr(C, "ALIGN_VOCABULARY", limit)
        for (src, tgt), (ops, ktrans, iters) in zip(pairs, C.cherrant_align_many(pairs), strict=True):
            assert ops.shape == (len(src) + 1, len(tgt) + 1)
            scans = {}
            assert decode(ops, ktrans) == literal_alignment(src, tgt, scans), (src, tgt)
            assert {cell: int(iters[cell[0] - 1, cell[1] - 1]) for cell in scans} == {c: v[1] for c, v in scans.items()}
    assert any(len(set(s) | set(t)) > 12 for s, t in pairs)


def test_a_far_from_source_answer_has_thousands_of_paths_but_one_edit_list(shared):
    # chatglm2-6b's published answer to a 2-1 item: the paths differ only inside runs that merge.
    import json
    import os
    data = json.load(open(os.path.join(shared, "predictions", "zero_shot", "chatglm2-6b-hf", "2-1.json"),
                          encoding="utf-8"))
    checked = 0
    for it in data.values():
        src, pred, _ = E.cherrant_prepare(E.prompt_text(it["origin_prompt"]), it["prediction"], it["refr"])
        if src == pred or not pred:
            continue
        s, t = C.cherrant_tokens(src), C.cherrant_tokens(pred)
        ops, ktrans, _ = C.cherrant_align(s, t)
        first_only = abs(len(s) - len(t)) > 10
        if not 1000 <= C.count_alignments(ops, ktrans, first_only) <= 5000:
            continue
        lists = C.distinct_run_edit_lists(ops, ktrans, first_only)
        assert sorted(map(tuple, lists)) == distinct_by_enumeration(ops, ktrans, first_only)
        checked += 1
        if checked == 3:
            break
    assert checked == 3


def test_items_without_a_usable_source_sentence_are_reported_not_fatal():
    items = [{"id": 0, "prompt": "没有标记", "prediction": "x", "refr": "y"},
             {"id": 1, "prompt": "句子：\n", "prediction": "x", "refr": "y"},
             {"id": 2, "prompt": "句子：\n上诉证据合法", "prediction": "上述证据合法", "refr": "上述证据合法"}]
    r = E.score_2_1(items)
    assert [e[0] for e in r["errors"]] == [0, 1]
    assert r["score"] == 1.0
