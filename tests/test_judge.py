"""evaluate.py judge: the paper's subjective evaluation, a pairwise LLM-judge win rate against a
reference model (by default LawBench's published GPT-4 answers to consultation task 3-8).

Specified here: the verdict parser on hand-written judge replies, the order swap and its tie
rule, the accounting (win + tie + loss + unparseable = n), the bootstrap interval, the cache, a
tiny local judge on the published answers, and a served judge through the OpenAI-compatible
client (a content-aware stand-in server, and transformers serve)."""
import json
import os

import numpy as np
import pytest

import evaluate as E
from conftest import StandIn, constant_model, serving, stand_in

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "lawbench_assets", "sample_predictions", "zero_shot")


@pytest.mark.parametrize("output,verdict", [
    ("回答A引用了正确的法条，结论准确。\n[[A]]", "A"),
    ("两个回答都提到了《民法典》第577条，但B更完整。\n[[B]]", "B"),
    ("两者相当。[[C]]", "tie"),
    ("理由：……\n评判结果：[[ B ]]", "B"),
    ("先看A……再看B……最初倾向[[A]]，但综合考虑后 [[B]]", "B"),  # the last tag decides
    ("Assistant A is better: it cites the right article.", "A"),
    ("Answer B wins.", "B"),
    ("回答B更好，因为它引用了现行有效的法条。", "B"),
    ("两者不相上下。", "tie"),
    ("It's a tie.", "tie"),
    ("A", "A"), ("【B】", "B"), ("C。", "tie"),
    ("A更好，但B更完整，B更好。", None),  # both sides called better: ambiguous
    ("抱歉，我无法评判这两个回答。", None),  # a refusal
    ("", None), ("   ", None), (None, None),
    ("AAAA", None),  # a degenerate loop is not a verdict
    ("回答A和回答B都引用了法条。", None),  # both letters, no preference
])
def test_the_verdict_parser_reads_tags_phrases_and_bare_letters_and_refuses_the_rest(output, verdict):
    assert E.parse_verdict(output) == verdict


def test_each_question_is_won_only_when_both_orders_prefer_the_model():
    # (verdict with the model as A, verdict with the model as B) -> outcome for the model
    table = {("A", "B"): "win", ("B", "A"): "loss", ("tie", "tie"): "tie",
             ("A", "A"): "tie",  # the judge always picks the first answer: position bias, not a preference
             ("B", "B"): "tie", ("A", "tie"): "tie", ("tie", "A"): "tie",
             (None, "B"): "unparseable", ("A", None): "unparseable", (None, None): "unparseable"}
    for (first, second), outcome in table.items():
        assert E.combine_orders(first, second) == outcome, (first, second)
    assert E.orders_agree("A", "B") and E.orders_agree("tie", "tie") and not E.orders_agree("A", "A")


def test_the_bootstrap_interval_is_seeded_and_has_the_binomial_width():
    wins = [True] * 30 + [False] * 70
    lo, hi = E.bootstrap_interval(wins, n_boot=4000, seed=1)
    assert (lo, hi) == tuple(E.bootstrap_interval(wins, n_boot=4000, seed=1))
    assert lo < 0.3 < hi
    # the normal approximation of a binomial share: +-1.96 sqrt(p(1-p)/n) = +-0.090
    assert hi - lo == pytest.approx(2 * 1.96 * np.sqrt(0.3 * 0.7 / 100), abs=0.02)
    assert E.bootstrap_interval([True] * 5) == [1.0, 1.0] and E.bootstrap_interval([]) == [None, None]


# ---------------------------------------------------------------------------------------------
# A content-aware stand-in judge behind an OpenAI-compatible endpoint

class Judge(StandIn):
    """Prefers the answer containing 依据 (cites a legal basis); a tie when both or neither do;
    says nothing useful when the question contains 拒答."""
    served = "judge"
    prompts = []

    def answer(self, req):
        prompt = req["messages"][0]["content"]
        Judge.prompts.append(prompt)
        question = prompt.split("【问题】\n")[1].split("\n\n【回答A】")[0]
        a = prompt.split("【回答A】\n")[1].split("\n\n【回答B】")[0]
        b = prompt.split("【回答B】\n")[1]
        cite_a, cite_b = "依据" in a, "依据" in b
        return 200, ("我无法判断。" if "拒答" in question else
                     "理由：只有A给出了法律依据。\n[[A]]" if cite_a and not cite_b else
                     "理由：只有B给出了法律依据。\n[[B]]" if cite_b and not cite_a else "两者相当。\n[[C]]")


@pytest.fixture()
def judge_server():
    Judge.prompts.clear()
    with stand_in(Judge) as url:
        yield url


def write_questions(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return str(path)


def test_win_rate_accounting_through_a_served_judge_equals_an_independent_count(tmp_path, judge_server, capsys):
    rng = np.random.default_rng(3)
    rows, expected = [], {"ours": [], "other": []}
    for i in range(40):
        q = f"问题{i}：合同违约怎么办？" + ("拒答" if i % 13 == 5 else "")
        cites = {m: bool(rng.random() < p) for m, p in (("ours", 0.7), ("other", 0.3), ("GPT4", 0.5))}
        answers = {m: f"{m}的回答{i}。" + ("法律依据：《民法典》第五百七十七条。" if c else "")
                   for m, c in cites.items()}
        rows.append({"id": i, "question": q, "answers": answers})
        for m in ("ours", "other"):  # the stand-in's rule, applied directly
            expected[m].append("unparseable" if "拒答" in q else "win" if cites[m] and not cites["GPT4"]
                               else "loss" if cites["GPT4"] and not cites[m] else "tie")
    qfile = write_questions(tmp_path / "q.jsonl", rows)
    args = ["judge", "--questions", qfile, "--reference", "GPT4", "--judge-api-base", judge_server,
            "--judge-api-model", "judge", "--out", str(tmp_path / "out"), "--quiet"]
    assert E.main(args) == 0
    assert len(Judge.prompts) == 2 * 2 * 40  # two models x both orders x 40 questions
    result = json.load(open(tmp_path / "out" / "winrate.json", encoding="utf-8"))
    for m in ("ours", "other"):
        r, c = result["models"][m], {k: expected[m].count(k) for k in ("win", "tie", "loss", "unparseable")}
        assert {k: r[k] for k in c} == c and r["n"] == 40 == sum(c.values())
        assert r["win_rate"] == pytest.approx(c["win"] / 40)
        assert r["win_rate_ties_half"] == pytest.approx((c["win"] + c["tie"] / 2) / (40 - c["unparseable"]))
        lo, hi = r["win_rate_ci95"]
        assert lo <= r["win_rate"] <= hi
        assert r["unparseable_items"] == ["5", "18", "31"]
        assert r["position_consistency"] == pytest.approx(37 / 40)  # this judge has no position bias
    assert result["models"]["ours"]["win_rate"] > result["models"]["other"]["win_rate"]
    judgments = [json.loads(line) for line in open(tmp_path / "out" / "judgments.jsonl", encoding="utf-8")]
    assert len(judgments) == 160 and {j["order"] for j in judgments} == {"model_first", "reference_first"}
    assert sum(j["verdict"] is None for j in judgments) == 2 * 2 * 3  # unparseable: listed, never dropped
    assert (tmp_path / "out" / "winrate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "| ours | 40 |" in table and "95% CI" in table
    # the rubric and both answers go to the judge in both orders, with the question as asked
    first = Judge.prompts[0]
    assert first.startswith(E.PAIRWISE_RUBRIC.split("{question}")[0]) and "【回答A】" in first
    # a rerun: every verdict from the cache, nothing sent
    Judge.prompts.clear()
    assert E.main(args) == 0
    assert Judge.prompts == [] and json.load(open(tmp_path / "out" / "winrate.json", encoding="utf-8")) == result


def test_bad_judge_inputs_are_named(tmp_path, judge_server):
    qfile = write_questions(tmp_path / "q.jsonl", [{"id": 1, "question": "q", "answers": {"a": "x", "b": "y"}}])
    with pytest.raises(SystemExit, match="--reference GPT4: no answers by that name"):
        E.main(["judge", "--questions", qfile, "--reference", "GPT4", "--judge-api-base", judge_server,
                "--judge-api-model", "judge", "--out", str(tmp_path / "o")])
    (tmp_path / "bad.jsonl").write_text('{"id": 1, "question": "q"}\n', encoding="utf-8")
    with pytest.raises(SystemExit, match=r"bad.jsonl:1: expected \{id, question, answers"):
        E.main(["judge", "--questions", str(tmp_path / "bad.jsonl"), "--reference", "a", "--judge-model", "x",
                "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="--judge-model PATH or --judge-api-base"):
        E.main(["judge", "--questions", qfile, "--reference", "a", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="--reference nobody: neither a folder nor a model"):
        E.main(["judge", "--predictions", SAMPLE, "--reference", "nobody", "--judge-model", "x",
                "--out", str(tmp_path / "o")])


# ---------------------------------------------------------------------------------------------
# Real judges: a tiny local model, and the same model served by transformers serve

@pytest.mark.slow
def test_a_tiny_local_judge_on_the_published_consultation_answers(tmp_path, bpe_tokenizer, monkeypatch):
    """LawBench's published GPT-4 and Qwen-7B-Chat answers to 3-8 (their prompts recorded inside
    and outside a chat template), judged by a model that always answers "A": it prefers whichever
    answer comes first, so every question is a tie once the orders are swapped."""
    judge = constant_model(bpe_tokenizer, "A", str(tmp_path / "judgeA"))
    args = ["judge", "--predictions", SAMPLE, "--reference", "GPT4", "--limit", "6", "--judge-model", judge,
            "--max-new-tokens", "1", "--out", str(tmp_path / "out"), "--quiet"]
    assert E.main(args) == 0
    r = json.load(open(tmp_path / "out" / "winrate.json", encoding="utf-8"))
    assert r["tasks"] == ["3-8"] and r["reference"] == "GPT4" and list(r["models"]) == ["qwen-7b-chat-hf"]
    q = r["models"]["qwen-7b-chat-hf"]
    assert (q["n"], q["win"], q["tie"], q["loss"], q["unparseable"]) == (6, 0, 6, 0, 0)
    assert q["win_rate"] == 0.0 and q["position_consistency"] == 0.0
    rows = [json.loads(line) for line in open(tmp_path / "out" / "judgments.jsonl", encoding="utf-8")]
    assert {row["verdict"] for row in rows} == {"A"} and len(rows) == 12
    import transformers

    def no_model(*a, **k):
        raise AssertionError("the judge was loaded although every verdict is cached")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model)
    assert E.main(args) == 0


@pytest.mark.slow
def test_a_served_judge_gives_the_verdicts_of_the_same_judge_in_process(tmp_path, bpe_tokenizer):
    judge = constant_model(bpe_tokenizer, "B", str(tmp_path / "judgeB"))
    base = ["judge", "--predictions", SAMPLE, "--reference", "GPT4", "--limit", "4", "--max-new-tokens", "1", "--quiet"]
    assert E.main(base + ["--judge-model", judge, "--out", str(tmp_path / "local")]) == 0
    with serving(judge) as url:
        assert E.main(base + ["--judge-api-base", url, "--judge-api-model", judge, "--out", str(tmp_path / "api")]) == 0
    local = [json.loads(x) for x in open(tmp_path / "local" / "judgments.jsonl", encoding="utf-8")]
    served = [json.loads(x) for x in open(tmp_path / "api" / "judgments.jsonl", encoding="utf-8")]
    assert [(x["id"], x["order"], x["output"], x["verdict"]) for x in served] == \
        [(x["id"], x["order"], x["output"], x["verdict"]) for x in local]
    assert {x["verdict"] for x in local} == {"B"}
    a = json.load(open(tmp_path / "api" / "winrate.json"))["models"]
    b = json.load(open(tmp_path / "local" / "winrate.json"))["models"]
    assert a == b
