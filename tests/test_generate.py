"""evaluate.py generate / run: LawBench predictions from a checkpoint, in LawBench's own layout,
batched without changing a single reply, resumable after a kill."""
import json
import os

import pytest

import evaluate
from conftest import save_tiny_llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLICE = os.path.join(ROOT, "lawbench_assets", "data")


@pytest.fixture
def tiny_chat_model(tiny):
    """The tiny Llama with the demo tokenizer and its InternLM2-style chat template."""
    return tiny


def generate(model, out, *extra):
    return evaluate.main(["generate", "--model", model, "--lawbench-data", SLICE, "--out", str(out),
                          "--max-new-tokens", "12", "--quiet", *extra])


def test_predictions_have_lawbench_layout_and_score_without_problems(tmp_path, tiny_chat_model, shared):
    out = tmp_path / "preds" / "tiny"
    assert generate(tiny_chat_model, out, "--tasks", "1-1,3-3", "--limit", "4") == 0
    data = json.load(open(os.path.join(SLICE, "zero_shot", "3-3.json"), encoding="utf-8"))
    preds = json.load(open(out / "3-3.json", encoding="utf-8"))
    assert list(preds) == ["0", "1", "2", "3"]
    for k, item in preds.items():
        src = data[int(k)]
        # the prompt LawBench's own predictions record, which its 2-1 metric reads back
        assert item["origin_prompt"] == [{"role": "HUMAN", "prompt": src["instruction"] + "\n" + src["question"]}]
        assert item["refr"] == src["answer"] and isinstance(item["prediction"], str)
    # the same item structure as LawBench's published prediction files
    published = json.load(open(os.path.join(shared, "predictions", "zero_shot", "GPT4", "3-3.json"), encoding="utf-8"))
    assert preds["0"].keys() == published["0"].keys()
    assert published["0"]["origin_prompt"][0]["prompt"] == preds["0"]["origin_prompt"][0]["prompt"]
    meta = json.load(open(out / ".generation.json"))
    assert meta["decoding"] == "greedy" and meta["chat_template"] and set(meta["tasks"]) == {"1-1", "3-3"}
    assert not (out / ".partial").exists()
    report = evaluate.score_predictions(str(tmp_path / "preds"), "zero_shot", tasks=["1-1", "3-3"], progress=False)
    assert report["models"]["tiny"]["problems"] == []
    assert set(report["models"]["tiny"]["tasks"]) == {"1-1", "3-3"}


def test_batched_left_padded_generation_gives_the_replies_of_one_prompt_at_a_time(tmp_path, tiny_chat_model):
    assert generate(tiny_chat_model, tmp_path / "one", "--tasks", "2-5,3-8", "--limit", "6", "--batch-size", "1") == 0
    assert generate(tiny_chat_model, tmp_path / "many", "--tasks", "2-5,3-8", "--limit", "6", "--batch-size", "6") == 0
    for task in ("2-5", "3-8"):
        one = json.load(open(tmp_path / "one" / f"{task}.json", encoding="utf-8"))
        many = json.load(open(tmp_path / "many" / f"{task}.json", encoding="utf-8"))
        assert [v["prediction"] for v in one.values()] == [v["prediction"] for v in many.values()]
        assert any(v["prediction"] for v in one.values())


def test_a_killed_run_resumes_without_redoing_finished_items(tmp_path, tiny_chat_model, monkeypatch):
    assert generate(tiny_chat_model, tmp_path / "straight", "--tasks", "1-1,3-3", "--limit", "5") == 0
    # the killed run: 1-1 finished, 3-3 had three items written and a fourth torn mid-line
    killed = tmp_path / "killed"
    (killed / ".partial").mkdir(parents=True)
    for name in ("1-1.json", ".generation.json"):
        (killed / name).write_bytes((tmp_path / "straight" / name).read_bytes())
    done = json.load(open(tmp_path / "straight" / "3-3.json", encoding="utf-8"))
    lines = [json.dumps({"id": i, "prediction": done[str(i)]["prediction"]}, ensure_ascii=False) for i in (4, 0, 2)]
    (killed / ".partial" / "3-3.jsonl").write_text("\n".join(lines) + '\n{"id": 1, "predic', encoding="utf-8")
    rows = []
    real = evaluate.generate_task

    def counting(reply_fn, prompts, done, *a, only=None):
        rows.append(len([i for i in only if i not in done]))
        return real(reply_fn, prompts, done, *a, only=only)

    monkeypatch.setattr(evaluate, "generate_task", counting)
    assert generate(tiny_chat_model, killed, "--tasks", "1-1,3-3", "--limit", "5") == 0
    assert rows == [2]  # only items 1 and 3 of 3-3; 1-1 not touched
    for task in ("1-1", "3-3"):
        assert (killed / f"{task}.json").read_bytes() == (tmp_path / "straight" / f"{task}.json").read_bytes()
    meta = json.load(open(killed / ".generation.json"))
    assert meta["tasks"]["3-3"]["resumed_items"] == 3 and meta["tasks"]["1-1"]["resumed"] == "complete"
    straight_meta = json.load(open(tmp_path / "straight" / ".generation.json"))
    assert meta["tasks"]["1-1"]["prompts_truncated"] == straight_meta["tasks"]["1-1"]["prompts_truncated"]
    # other weights or settings never resume into the same folder
    with pytest.raises(SystemExit, match="other max_new_tokens"):
        generate(tiny_chat_model, killed, "--tasks", "1-1", "--max-new-tokens", "20")
    other = save_tiny_llama(str(tmp_path / "other"), tiny_chat_model)
    with pytest.raises(SystemExit, match="other fingerprint"):
        generate(other, killed, "--tasks", "1-1")


def test_a_progress_file_torn_inside_a_character_resumes(tmp_path, tiny_chat_model, capsys):
    """A kill while a long Chinese reply is being written leaves half a UTF-8 character at the end."""
    assert generate(tiny_chat_model, tmp_path / "straight", "--tasks", "3-8", "--limit", "4") == 0
    killed = tmp_path / "killed"
    (killed / ".partial").mkdir(parents=True)
    (killed / ".generation.json").write_bytes((tmp_path / "straight" / ".generation.json").read_bytes())
    done = json.load(open(tmp_path / "straight" / "3-8.json", encoding="utf-8"))
    lines = [json.dumps({"id": i, "prediction": done[str(i)]["prediction"]}, ensure_ascii=False).encode()
             for i in (0, 1)]
    torn = json.dumps({"id": 2, "prediction": "根据《中华人民共和国民法典》"}, ensure_ascii=False).encode()
    cut = torn.index("民".encode()) + 1  # one byte into a three-byte character
    (killed / ".partial" / "3-8.jsonl").write_bytes(b"\n".join(lines) + b"\n" + torn[:cut])
    capsys.readouterr()
    assert generate(tiny_chat_model, killed, "--tasks", "3-8", "--limit", "4") == 0
    assert (killed / "3-8.json").read_bytes() == (tmp_path / "straight" / "3-8.json").read_bytes()
    said = capsys.readouterr().err
    assert "Generated 2 new predictions (2 resumed)" in said  # items 2 and 3 were generated


def test_run_generates_then_scores(tmp_path, tiny_chat_model):
    assert evaluate.main(["run", "--model", tiny_chat_model, "--lawbench-data", SLICE,
                          "--out", str(tmp_path / "p" / "m"),
                          "--results", str(tmp_path / "r"), "--tasks", "2-1,3-6", "--limit", "3",
                          "--max-new-tokens", "8", "--quiet"]) == 0
    scores = json.load(open(tmp_path / "r" / "scores.json"))
    assert set(scores["models"]["m"]["tasks"]) == {"2-1", "3-6"}
    assert (tmp_path / "r" / "scores.png").exists() and (tmp_path / "r" / "scores.csv").exists()


def test_bad_inputs_are_named(tmp_path, tiny_chat_model):
    with pytest.raises(SystemExit, match="unknown task"):
        generate(tiny_chat_model, tmp_path / "x", "--tasks", "9-9")
    bad = tmp_path / "data" / "zero_shot"
    bad.mkdir(parents=True)
    (bad / "1-1.json").write_text('[{"instruction": "a", "question": 3}]')
    with pytest.raises(SystemExit, match=r"1-1.json: item 0"):
        evaluate.main(["generate", "--model", tiny_chat_model, "--lawbench-data", str(tmp_path / "data"),
                       "--out", str(tmp_path / "y"), "--tasks", "1-1"])


def test_a_prediction_folder_in_use_by_another_run_is_refused_naming_it(tmp_path, tiny_chat_model):
    """Two runs on one --out would both generate everything and end with a misleading 'no reply'."""
    import common
    out = tmp_path / "busy"
    held, _ = common.lock_folder(str(out), "busy")  # another run holding the folder (flock: per open file)
    try:
        with pytest.raises(SystemExit, match=rf"{out} is in use by host \S+ pid {os.getpid()} since .*another --out"):
            generate(tiny_chat_model, out, "--tasks", "3-8", "--limit", "2")
        with pytest.raises(SystemExit, match=rf"{out} is in use by host .*use another --out"):
            evaluate.main(["judge",
                           "--predictions", os.path.join(ROOT, "lawbench_assets", "sample_predictions", "zero_shot"),
                           "--reference", "GPT4", "--limit", "1", "--judge-model", tiny_chat_model, "--out", str(out)])
    finally:
        held.close()
    assert generate(tiny_chat_model, out, "--tasks", "3-8", "--limit", "2") == 0  # free again: it runs
