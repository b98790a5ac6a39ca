"""evaluate.py score end to end on small hand-made prediction folders: layouts, bad input, outputs."""
import csv
import json
import os

import pytest

import evaluate as E


def write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False))


def choice(pred, refr="正确答案：B。"):
    return {"origin_prompt": [{"role": "HUMAN", "prompt": "问题"}], "prediction": pred, "refr": refr}


@pytest.fixture
def preds(tmp_path):
    root = tmp_path / "preds"
    write(str(root / "m1" / "1-2.json"), {"0": choice("B"), "1": choice("A"),
                                          "2": {"origin_prompt": "q", "refr": "正确答案：C。"}})
    write(str(root / "m1" / "3-6.json"), "{not json")
    write(str(root / "m1" / "notes.json"), {})
    write(str(root / "m2" / "1-2.json"), {"0": choice("B"), "1": choice("B"), "2": choice("")})
    write(str(root / "m2" / "3-7.json"), {"0": {"prediction": "8500元", "refr": "上文涉及到的犯罪金额:8500.0元。"}})
    return root


def test_scores_every_model_and_reports_each_problem_by_file_and_item(preds, tmp_path, capsys):
    out = tmp_path / "results"
    assert E.main(["score", "--predictions", str(preds), "--out", str(out), "--num-proc", "1", "--quiet"]) == 0
    report = json.load(open(out / "scores.json", encoding="utf-8"))
    m1, m2 = report["models"]["m1"], report["models"]["m2"]
    assert m1["tasks"]["1-2"]["score"] == pytest.approx(100 / 3)  # the missing prediction counts as wrong
    assert m1["tasks"]["1-2"]["abstention_rate"] == pytest.approx(1 / 3)  # ... and as an abstention
    assert m1["tasks"]["3-6"]["score"] is None  # unreadable file: reported, not scored
    problems = "\n".join(m1["problems"])
    assert "1-2.json: item 2: missing prediction" in problems
    assert "3-6.json: cannot read as JSON" in problems
    assert "notes.json: not a LawBench task id" in problems
    assert "2-1.json: missing" in problems
    assert m2["tasks"]["1-2"]["score"] == pytest.approx(200 / 3)
    assert "2-1.json: item 2: empty prediction" not in problems
    assert "item 2: empty prediction" in "\n".join(m2["problems"])
    assert m2["averages"]["overall"] == pytest.approx((200 / 3 + 100) / 2)
    assert m2["averages"]["n_tasks"] == 2
    rows = list(csv.DictReader(open(out / "scores.csv", encoding="utf-8")))
    assert {(r["model"], r["task"]) for r in rows} == {("m1", "1-2"), ("m1", "3-6"), ("m2", "1-2"), ("m2", "3-7")}
    assert open(out / "scores.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    stdout = capsys.readouterr().out
    assert "| **AVG** |" in stdout and "| 1-2 | Knowledge Question Answering | Accuracy | 33.33 | 66.67 |" in stdout


def test_single_model_folder_and_setting_subfolder_layouts(tmp_path):
    write(str(tmp_path / "one" / "1-2.json"), {"0": choice("B")})
    assert list(E.find_models(str(tmp_path / "one"), None)) == ["one"]
    write(str(tmp_path / "bench" / "one_shot" / "mx" / "1-2.json"), {"0": choice("B")})
    assert list(E.find_models(str(tmp_path / "bench"), "one_shot")) == ["mx"]


def test_no_prediction_files_is_the_only_fatal_input_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert E.main(["score", "--predictions", str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 2
    assert "no LawBench prediction files" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_item_ids_with_gaps_are_reported(tmp_path):
    write(str(tmp_path / "1-2.json"), {"0": choice("B"), "2": choice("B")})
    items, problems, unscorable = E.load_prediction_file(str(tmp_path / "1-2.json"))
    assert len(items) == 2 and "missing [1]" in problems[0]


def test_unknown_task_and_missing_arguments_fail_clearly(preds, tmp_path, capsys):
    with pytest.raises(SystemExit, match="unknown task id"):
        E.main(["score", "--predictions", str(preds), "--tasks", "9-9"])
    with pytest.raises(SystemExit):
        E.main(["generate"])
    assert "--model" in capsys.readouterr().err


def test_outputs_are_replaced_atomically(tmp_path):
    target = tmp_path / "x.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        E.atomic_write(str(target), lambda f: (f.write(b"half"), (_ for _ in ()).throw(RuntimeError("boom"))))
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["x.json"]
