"""evaluate.py compare: several runs' result folders in one table (Markdown, CSV) and one chart.

The run folders are made by the real scorers (LawBench's published sample predictions, CMMLU
predictions written here) and, for the judge, a winrate.json in the layout `evaluate.py judge`
writes; some runs are partial on purpose."""
import csv
import json
import os

import pytest

import evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "lawbench_assets", "sample_predictions")


def lawbench_run(folder, model, setting="zero_shot"):
    assert evaluate.main(["score", "--predictions", SAMPLE, "--setting", "zero_shot", "--models", model,
                          "--out", os.path.join(folder, f"lawbench-{setting}"), "--quiet", "--num-proc", "1"]) == 0
    report = json.load(open(os.path.join(folder, f"lawbench-{setting}", "scores.json")))
    if setting != "zero_shot":  # the same scores, filed as another setting
        report["setting"] = setting
        evaluate.write_json(os.path.join(folder, f"lawbench-{setting}", "scores.json"), report)
    return report["models"][model]


def cmmlu_run(folder, right_per_subject):
    preds = os.path.join(folder, "cmmlu-preds")
    os.makedirs(preds)
    for subject, (right, n) in right_per_subject.items():
        rows = {str(i): {"origin_prompt": [], "prediction": "答案是: A" if i < right else "B", "refr": "A"}
                for i in range(n)}
        json.dump(rows, open(os.path.join(preds, f"{subject}.json"), "w"))
    json.dump({"setting": "cmmlu_5shot_gen", "model": "m"}, open(os.path.join(preds, ".generation.json"), "w"))
    report = evaluate.score_cmmlu(preds)
    evaluate.write_json(os.path.join(folder, "cmmlu", "cmmlu.json"), report)
    return report


def winrate_run(folder, model, win, n, ci):
    os.makedirs(os.path.join(folder, "judge"))
    json.dump({"judge": "j", "rubric_version": "pairwise-v1", "reference": "GPT4", "questions": n,
               "models": {model: {"n": n, "win": win, "tie": 0, "loss": n - win, "unparseable": 0,
                                  "win_rate": win / n, "win_rate_ci95": ci}}},
              open(os.path.join(folder, "judge", "winrate.json"), "w"))


def test_runs_side_by_side_with_empty_cells_for_what_a_run_lacks(tmp_path, capsys):
    full, partial, cmmlu_only = (str(tmp_path / n) for n in ("two-stage", "one-stage", "merged"))
    gpt4 = lawbench_run(full, "GPT4")
    gpt4_one = lawbench_run(full, "GPT4", "one_shot")
    c = cmmlu_run(full, {"anatomy": (3, 4), "arts": (0, 2)})
    winrate_run(full, "two-stage", 7, 20, [0.15, 0.55])
    qwen = lawbench_run(partial, "qwen-7b-chat-hf")
    cmmlu_run(cmmlu_only, {"virology": (1, 1)})
    out = tmp_path / "cmp"
    capsys.readouterr()  # the scorers' own tables
    assert evaluate.main(["compare", full, partial, cmmlu_only, "--out", str(out)]) == 0
    table = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): [x.strip() for x in line.split("|")[2:-1]]
            for line in table.split("## CMMLU")[0].splitlines() if line.startswith("| ") and "---" not in line}
    assert rows["run"] == ["LawBench zero-shot AVG", "LawBench one-shot AVG", "CMMLU 5-shot gen",
                           "win rate vs GPT4 [95% CI]"]
    assert rows["two-stage"] == [f"{gpt4['averages']['overall']:.2f}", f"{gpt4_one['averages']['overall']:.2f}",
                                 "37.50", "35.0% [15.0-55.0]"]  # CMMLU: mean of 75% and 0%, not 3 of 6 items
    assert c["overall"] == 37.5
    assert rows["one-stage"] == [f"{qwen['averages']['overall']:.2f}", "", "", ""]
    assert rows["merged"] == ["", "", "100.00", ""]
    assert rows["InternLM-Law-7B (paper)"] == ["67.71", "67.67", "", ""]
    assert rows["InternLM2-Chat-7B (paper)"] == ["45.80", "48.53", "", ""]
    # per task, and per CMMLU category
    assert f"| 3-8 | 咨询 | {gpt4['tasks']['3-8']['score']:.2f} |" in table
    assert "| STEM | 75.00 |  | 100.00 |" in table and "| Humanities | 0.00 |  |  |" in table
    # the CSV holds the same numbers, one line per (run, metric)
    lines = list(csv.DictReader(open(out / "compare.csv", encoding="utf-8")))
    value = {(r["run"], r["metric"]): r["value"] for r in lines}
    assert float(value[("two-stage", "lawbench zero_shot")]) == pytest.approx(gpt4["averages"]["overall"])
    assert float(value[("one-stage", "lawbench zero_shot 2-1")]) == pytest.approx(qwen["tasks"]["2-1"]["score"])
    assert float(value[("two-stage", "winrate GPT4")]) == pytest.approx(35.0)
    assert value[("InternLM-Law-7B (paper)", "lawbench one_shot")] == "67.67"
    assert ("merged", "lawbench zero_shot") not in value
    assert (out / "compare.md").read_text(encoding="utf-8") + "\n" == table  # the file is what was printed
    assert os.path.getsize(out / "compare.png") > 20_000


def test_bad_run_folders_stop_with_a_line_naming_them(tmp_path):
    empty = tmp_path / "a" / "empty"
    empty.mkdir(parents=True)
    with pytest.raises(SystemExit, match=f"{empty} \\(run 'empty'\\) holds no results"):
        evaluate.main(["compare", str(empty), "--out", str(tmp_path / "o")])
    one, two = str(tmp_path / "x" / "arm"), str(tmp_path / "y" / "arm")
    cmmlu_run(one, {"virology": (1, 1)})
    cmmlu_run(two, {"virology": (0, 1)})
    with pytest.raises(SystemExit, match="two runs are named 'arm'"):
        evaluate.main(["compare", one, two, "--out", str(tmp_path / "o")])
    assert evaluate.main(["compare", f"first={one}", f"second={two}", "--out", str(tmp_path / "o")]) == 0
    with pytest.raises(SystemExit, match="no such run folder"):
        evaluate.main(["compare", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    # a LawBench scores.json of several models, none named like the run
    both = str(tmp_path / "both")
    assert evaluate.main(["score", "--predictions", SAMPLE, "--setting", "zero_shot", "--out", both, "--quiet",
                          "--num-proc", "1"]) == 0
    with pytest.raises(SystemExit, match="holds 2 models .* none is named 'both'"):
        evaluate.main(["compare", both, "--out", str(tmp_path / "o")])
    assert evaluate.main(["compare", f"GPT4={both}", "--out", str(tmp_path / "o")]) == 0
    # two results of one kind in one run
    cmmlu_run(str(tmp_path / "x" / "arm" / "again"), {"virology": (1, 1)})
    with pytest.raises(SystemExit, match="two results for cmmlu cmmlu_5shot_gen"):
        evaluate.main(["compare", one, "--out", str(tmp_path / "o")])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "winrate.json").write_text("{}")
    with pytest.raises(SystemExit, match="winrate.json: not a result file"):
        evaluate.main(["compare", str(broken), "--out", str(tmp_path / "o")])


def test_a_lawbench_score_without_setting_takes_it_from_the_predictions_or_says_how_to_fix_it(tmp_path):
    preds = tmp_path / "preds" / "arm"
    os.makedirs(preds)
    for name in ("1-2.json", "3-6.json"):
        with open(os.path.join(SAMPLE, "zero_shot", "GPT4", name), encoding="utf-8") as f:
            (preds / name).write_text(f.read(), encoding="utf-8")
    run = tmp_path / "runs" / "lr=3e-3"  # a folder name with "=" in it is still one folder
    assert evaluate.main(["score", "--predictions", str(preds), "--out", str(run / "lawbench"), "--quiet",
                          "--num-proc", "1"]) == 0
    assert json.load(open(run / "lawbench" / "scores.json"))["setting"] is None
    with pytest.raises(SystemExit, match="scored without --setting"):
        evaluate.main(["compare", str(run), "--out", str(tmp_path / "o")])
    (preds / ".generation.json").write_text(json.dumps({"setting": "one_shot"}))  # as evaluate.py generate writes
    assert evaluate.main(["compare", str(run), f"again={run}", "--out", str(tmp_path / "o")]) == 0
    lines = list(csv.DictReader(open(tmp_path / "o" / "compare.csv", encoding="utf-8")))
    assert {r["run"] for r in lines if r["metric"] == "lawbench one_shot"} == {
        "lr=3e-3", "again", "InternLM-Law-7B (paper)", "InternLM2-Chat-7B (paper)"}
