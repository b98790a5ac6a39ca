"""evaluate.py cmmlu: general ability on CMMLU, prompted and scored as OpenCompass's
cmmlu_gen_c13365.py (chat models) and cmmlu_ppl_8b9c76.py (base models) do.

The expected prompts, answers and scores below are written out by hand from the CMMLU CSVs and
OpenCompass's config text, not produced by the code under test."""
import json
import os

import pytest
import torch

import evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLICE = os.path.join(ROOT, "cmmlu_assets", "data")
SHARED_CMMLU = os.path.join(ROOT, "..", "shared", "cmmlu", "data")


# ---------------------------------------------------------------------------------------------
# Answer extraction: OpenCompass's first_capital_postprocess, case by case

@pytest.mark.parametrize("reply, answer", [
    ("答案是C", "C"),
    ("答案是: B", "B"),                       # the form the five-shot examples teach
    ("B", "B"),
    ("我认为应该选D，因为其余都不对。", "D"),    # a letter inside a Chinese sentence
    ("选项A和C都有道理，但B更好", "A"),          # several letters: the first one counts
    ("不知道", ""),                           # none: counted as no answer (wrong)
    ("", ""),
    ("选c", ""),                              # lower case is not an answer
    ("The answer is B", "T"),                 # any capital: OpenCompass marks this wrong too
    ("答案：Ｃ", "Ｃ"),                         # a full-width capital is a capital, and not A-D
])
def test_the_answer_is_the_first_capital_letter_of_the_reply(reply, answer):
    assert evaluate.first_capital(reply) == answer


# ---------------------------------------------------------------------------------------------
# Reading the CSVs and building the prompts

def test_items_are_read_as_in_the_csv(shared):
    items = evaluate.read_cmmlu_csv(os.path.join(SHARED_CMMLU, "test", "college_law.csv"))
    assert items[1] == {"question": "甲偷割正在使用中的高速公路紧急信息警示屏的电源线，价值 5000 元，甲的行为应认定为",
                        "A": "盗窃罪", "B": "故意毁坏财物罪", "C": "破坏交通设施罪", "D": "破坏交通工具罪",
                        "answer": "C"}
    physics = evaluate.read_cmmlu_csv(os.path.join(SHARED_CMMLU, "test", "high_school_physics.csv"))
    assert physics[0]["question"] == "现已建成的核电站的能量来⾃于" and physics[0]["answer"] == "A"
    # the whole test split: 11,582 questions in 67 files, every answer one of A-D
    data = evaluate.load_cmmlu(SHARED_CMMLU, list(evaluate.CMMLU_SUBJECTS))
    assert len(data) == 67 and all(len(dev) == 5 for dev, _ in data.values())
    assert sum(len(test) for _, test in data.values()) == 11582


def test_zero_shot_prompt_is_opencompass_cmmlu_gen_template():
    item = evaluate.read_cmmlu_csv(os.path.join(SLICE, "test", "college_law.csv"))[1]
    turns = evaluate.cmmlu_dialogue("college_law", item, [])
    assert turns == [{"role": "user", "content":
                      "以下是关于大学法律的单项选择题，请直接给出正确答案的选项。\n"
                      "题目：甲偷割正在使用中的高速公路紧急信息警示屏的电源线，价值 5000 元，甲的行为应认定为\n"
                      "A. 盗窃罪\nB. 故意毁坏财物罪\nC. 破坏交通设施罪\nD. 破坏交通工具罪\n"}]


def test_five_shot_prompt_gives_the_dev_examples_as_earlier_turns_with_their_answers():
    dev = evaluate.read_cmmlu_csv(os.path.join(SLICE, "dev", "college_law.csv"))
    item = evaluate.read_cmmlu_csv(os.path.join(SLICE, "test", "college_law.csv"))[0]
    turns = evaluate.cmmlu_dialogue("college_law", item, dev)
    assert [t["role"] for t in turns] == ["user", "assistant"] * 5 + ["user"]
    assert turns[0]["content"] == ("以下是关于大学法律的单项选择题，请直接给出正确答案的选项。\n"
                                   "题目：根据物权法规定，土地承包经营权的设立时间是\n"
                                   "A. 土地承包经营权登记时\nB. 取得土地承包经营权证时\n"
                                   "C. 土地承包经营权合同生效时\nD. 土地承包经营权合同成立时\n")
    assert turns[1]["content"] == "答案是: C"
    assert [t["content"] for t in turns[1::2]] == [f"答案是: {d['answer']}" for d in dev]
    assert turns[-1]["content"].startswith("以下是关于大学法律的单项选择题，请直接给出正确答案的选项。\n"
                                           "题目：以下情形中应当数罪并罚的是\n")
    assert all(t["content"].endswith("\n") for t in turns[0::2])


def test_perplexity_candidates_end_in_each_answer():
    dev = evaluate.read_cmmlu_csv(os.path.join(SLICE, "dev", "college_law.csv"))[:1]
    item = evaluate.read_cmmlu_csv(os.path.join(SLICE, "test", "college_law.csv"))[1]
    cands = evaluate.cmmlu_candidates("college_law", item, dev)
    question = ("以下是关于大学法律的单项选择题，请直接给出正确答案的选项。\n"
                "题目：甲偷割正在使用中的高速公路紧急信息警示屏的电源线，价值 5000 元，甲的行为应认定为\n"
                "A. 盗窃罪\nB. 故意毁坏财物罪\nC. 破坏交通设施罪\nD. 破坏交通工具罪")
    example = ("以下是关于大学法律的单项选择题，请直接给出正确答案的选项。\n"
               "题目：根据物权法规定，土地承包经营权的设立时间是\n"
               "A. 土地承包经营权登记时\nB. 取得土地承包经营权证时\n"
               "C. 土地承包经营权合同生效时\nD. 土地承包经营权合同成立时")
    assert cands == {x: f"{example}\n答案是: C\n\n\n\n\n{question}\n答案是: {x}" for x in "ABCD"}
    assert evaluate.cmmlu_candidates("college_law", item, [])["B"] == f"{question}\n答案是: B"


@pytest.mark.parametrize("content, where, says", [
    (",Question,A,B,C,D\n0,q,a,b,c,d\n", ":1:", "no Answer column"),
    (",Question,A,B,C,D,Answer\n0,q,a,b,c,d,E\n", ":2:", "answer 'E' is not one of A, B, C, D"),
    (",Question,A,B,C,D,Answer\n0,q,a,b,c,d,\n", ":2:", "answer '' is not one of A, B, C, D"),
    (",Question,A,B,C,D,Answer\n0,q,a,b,c,d,A\n1,q,a,b,c\n", ":3:", "5 fields, the header has 7"),
    ("", ":1:", "empty file"),
])
def test_a_bad_csv_stops_naming_file_and_line(tmp_path, content, where, says):
    path = tmp_path / "agronomy.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(SystemExit) as stop:
        evaluate.read_cmmlu_csv(str(path))
    assert f"{path}{where}" in str(stop.value) and says in str(stop.value)


def test_unknown_subjects_and_missing_files_are_named(tmp_path):
    with pytest.raises(SystemExit, match=r"anatomyy \(did you mean anatomy\?\)"):
        evaluate.parse_subjects("agronomy,anatomyy")
    (tmp_path / "dev").mkdir()
    (tmp_path / "test").mkdir()
    with pytest.raises(SystemExit) as stop:
        evaluate.load_cmmlu(str(tmp_path), ["agronomy"])
    assert os.path.join(str(tmp_path), "dev", "agronomy.csv") in str(stop.value)


# ---------------------------------------------------------------------------------------------
# Scoring: per subject, per category (plain means over subjects) and overall

def write_predictions(folder, subject, replies_and_gold):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{subject}.json"), "w", encoding="utf-8") as f:
        json.dump({str(i): {"origin_prompt": [], "prediction": p, "refr": g}
                   for i, (p, g) in enumerate(replies_and_gold)}, f, ensure_ascii=False)


def test_scores_are_means_over_subjects_per_category_and_overall(tmp_path):
    d = str(tmp_path / "preds")
    # anatomy (STEM): 3 of 4 right; arts (Humanities): 1 of 2; chinese_history (Humanities, China specific): 0 of 1
    write_predictions(d, "anatomy", [("答案是: A", "A"), ("B", "B"), ("选C", "C"), ("不会", "D")])
    write_predictions(d, "arts", [("答案是D", "D"), ("The answer is A", "A")])
    write_predictions(d, "chinese_history", [("A", "B")])
    r = evaluate.score_cmmlu(d)
    assert {s: v["accuracy"] for s, v in r["subjects"].items()} == {"anatomy": 75.0, "arts": 50.0,
                                                                    "chinese_history": 0.0}
    # no answer: no capital letter, or a first capital outside A-D
    assert r["subjects"]["anatomy"]["no_answer"] == 1 and r["subjects"]["arts"]["no_answer"] == 1
    assert r["categories"]["STEM"] == {"accuracy": 75.0, "subjects": 1}
    assert r["categories"]["Humanities"] == {"accuracy": 25.0, "subjects": 2}
    assert r["categories"]["China specific"] == {"accuracy": 0.0, "subjects": 1}
    assert r["categories"]["Other"] == {"accuracy": None, "subjects": 0}
    assert r["overall"] == pytest.approx(125 / 3)  # mean of 75, 50, 0 -- not 4 right of 7 items (57.1)
    assert r["n_items"] == 7 and len(r["missing_subjects"]) == 64


def test_category_membership_matches_cmmlus_published_group_sizes():
    count = {c: sum(c in evaluate.cmmlu_categories(s) for s in evaluate.CMMLU_SUBJECTS)
             for c in evaluate.CMMLU_CATEGORIES}
    # the group sizes of OpenCompass's cmmlu summarizer (and CMMLU's own categories.py)
    assert count == {"STEM": 17, "Humanities": 13, "Social Science": 22, "Other": 15, "China specific": 15}
    assert sorted(evaluate.CMMLU_SUBJECTS) == sorted(n[:-4] for n in os.listdir(os.path.join(SLICE, "test")))


# ---------------------------------------------------------------------------------------------
# End to end with a tiny model

def cmmlu(model, out, *extra):
    return evaluate.main(["cmmlu", "--model", model, "--cmmlu-data", SLICE, "--out", str(out),
                          "--results", str(out) + "-results", "--max-new-tokens", "6", "--quiet", *extra])


@pytest.mark.slow
def test_generation_writes_opencompass_layout_scores_and_resumes(tmp_path, tiny, capsys):
    out = tmp_path / "p"
    assert cmmlu(tiny, out, "--subjects", "agronomy,college_law", "--shots", "2") == 0
    preds = json.load(open(out / "college_law.json", encoding="utf-8"))
    assert len(preds) == 3 and preds["0"]["refr"] == "B"
    assert [t["role"] for t in preds["0"]["origin_prompt"]] == ["HUMAN", "BOT", "HUMAN", "BOT", "HUMAN"]
    report = json.load(open(str(out) + "-results/cmmlu.json", encoding="utf-8"))
    assert report["setting"] == "cmmlu_2shot_gen" and report["n_items"] == 6
    expected = {s: 100 * sum(evaluate.first_capital(v["prediction"]) == v["refr"] for v in p.values()) / 3
                for s in ("agronomy", "college_law")
                for p in [json.load(open(out / f"{s}.json", encoding="utf-8"))]}
    assert {s: r["accuracy"] for s, r in report["subjects"].items()} == expected
    assert os.path.getsize(str(out) + "-results/cmmlu.png") > 10_000
    assert "| **overall** |" in capsys.readouterr().out
    # a rerun resumes: nothing generated again, same files
    before = (out / "agronomy.json").read_bytes()
    assert cmmlu(tiny, out, "--subjects", "agronomy,college_law", "--shots", "2") == 0
    assert (out / "agronomy.json").read_bytes() == before
    assert "Generated 0 new predictions (6 resumed)" in capsys.readouterr().err
    # a run over fewer subjects into the same folder scores only its own
    assert cmmlu(tiny, out, "--subjects", "agronomy", "--shots", "2") == 0
    assert list(json.load(open(str(out) + "-results/cmmlu.json"))["subjects"]) == ["agronomy"]
    # another number of shots into the same folder is refused: the predictions would mix
    with pytest.raises(SystemExit, match="cmmlu_2shot_gen"):
        cmmlu(tiny, out, "--subjects", "agronomy,college_law", "--shots", "5")


@pytest.mark.slow
def test_perplexity_mode_picks_the_candidate_with_the_lowest_mean_token_loss(tmp_path, tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = tmp_path / "ppl"
    # 8 sequences per batch: two questions' candidates, padded to one width
    assert cmmlu(tiny, out, "--subjects", "anatomy", "--mode", "ppl", "--shots", "1", "--batch-size", "8") == 0
    preds = json.load(open(out / "anatomy.json", encoding="utf-8"))
    # independently: transformers' own loss (mean over the n-1 predicted tokens) of each whole text
    model, tok = AutoModelForCausalLM.from_pretrained(tiny), AutoTokenizer.from_pretrained(tiny)
    dev = evaluate.read_cmmlu_csv(os.path.join(SLICE, "dev", "anatomy.csv"))[:1]
    for i, item in enumerate(evaluate.read_cmmlu_csv(os.path.join(SLICE, "test", "anatomy.csv"))):
        losses = {}
        for label, text in evaluate.cmmlu_candidates("anatomy", item, dev).items():
            ids = torch.tensor([tok(text)["input_ids"]])
            with torch.no_grad():
                losses[label] = model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1) / ids.shape[1]
        assert preds[str(i)]["prediction"] == min(losses, key=losses.get)
        assert set(preds[str(i)]["origin_prompt"]) == set("ABCD")
    meta = json.load(open(out / ".generation.json"))
    assert meta["decoding"] == "perplexity" and meta["max_new_tokens"] is None
    # a rerun with another reply length resumes: perplexity has none
    assert cmmlu(tiny, out, "--subjects", "anatomy", "--mode", "ppl", "--shots", "1", "--max-new-tokens", "99") == 0


def test_perplexity_mode_refuses_a_server():
    with pytest.raises(SystemExit, match="--mode ppl"):
        evaluate.main(["cmmlu", "--model", "m", "--cmmlu-data", SLICE, "--out", "/nonexistent/x", "--mode", "ppl",
                       "--api-base", "http://127.0.0.1:9/v1"])
