"""evaluate.py generate through an OpenAI-compatible server, and across ranks.

The server is a real third-party one: transformers' own `transformers serve`, started by the test
on 127.0.0.1 with a tiny model trained on the demo data (so that it ends its replies with the
chat template's end of turn). The reference is the in-process backend: the same greedy
replies, the same files. Nothing leaves the machine."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import evaluate
from conftest import (
    StandIn,
    constant_model,
    free_port,
    rand_records,
    run_prepare,
    save_tiny_llama,
    serving,
    src,
    stand_in,
    write_jsonl,
)

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLICE = os.path.join(ROOT, "lawbench_assets", "data")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_prepared):
    """A tiny Llama trained briefly on the demo's stage-1 data: its replies stop at <|im_end|>."""
    import train
    base = tmp_path_factory.mktemp("api")
    tiny = save_tiny_llama(str(base / "tiny"), os.path.join(demo_prepared, "tokenizer"))
    assert train.main(["--stage", "1", "--data", demo_prepared, "--model", tiny, "--out-dir", str(base / "out"),
                       "--max-len", "1024", "--lr", "3e-3", "--max-steps", "40", "--warmup-ratio", "0.05",
                       "--zero-stage", "0", "--log-every", "100"]) == 0
    return str(base / "out" / "stage1" / "final")


@pytest.fixture(scope="module")
def server(trained):
    with serving(trained) as url:
        yield url


def generate(model, out, *extra):
    return evaluate.main(["generate", "--model", model, "--lawbench-data", SLICE, "--out", str(out), "--quiet", *extra])


def read(out, task):
    return json.load(open(os.path.join(out, f"{task}.json"), encoding="utf-8"))


TASKS = "1-1,2-5,3-3,3-8"


def test_the_server_and_the_in_process_backend_write_identical_prediction_files(tmp_path, trained, server):
    common = ["--tasks", TASKS, "--limit", "6", "--max-new-tokens", "48"]
    assert generate(trained, tmp_path / "local", *common) == 0
    assert generate(trained, tmp_path / "api", *common, "--api-base", server, "--concurrency", "4") == 0
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(trained)
    stopped = 0
    for task in TASKS.split(","):
        assert (tmp_path / "api" / f"{task}.json").read_bytes() == (tmp_path / "local" / f"{task}.json").read_bytes()
        stopped += sum(len(tok(p["prediction"])["input_ids"]) < 40 for p in read(tmp_path / "api", task).values())
    assert stopped >= 3  # replies ended at the end-of-turn token, not only at the length limit
    meta = json.load(open(tmp_path / "api" / ".generation.json"))
    assert meta["backend"] == "api" and meta["api_base"] == server and meta["model"] == trained
    # a folder of one backend never resumes with the other: the fingerprints differ
    with pytest.raises(SystemExit, match="other fingerprint"):
        generate(trained, tmp_path / "local", *common, "--api-base", server)


def test_a_killed_client_resumes_without_asking_again_for_finished_items(tmp_path, trained, server, monkeypatch):
    common = ["--tasks", "3-8", "--limit", "20", "--max-new-tokens", "96"]
    assert generate(trained, tmp_path / "straight", *common) == 0
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "evaluate.py"), "generate", "--model", trained,
                             "--lawbench-data", SLICE, "--out", str(out), "--quiet", *common, "--api-base", server,
                             "--concurrency", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = out / ".partial" / "3-8.jsonl"
    while not (partial.exists() and partial.read_text(encoding="utf-8").count("\n") >= 4):
        assert proc.poll() is None, "the run finished before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "3-8.json").exists()
    finished = set(evaluate.read_partials(str(out / ".partial"), "3-8", 20))
    done_before = len(finished)
    asked = []
    real = evaluate.chat_replies
    monkeypatch.setattr(evaluate, "chat_replies",
                        lambda c, m, p, todo, *a: (asked.extend(todo), real(c, m, p, todo, *a)))
    assert generate(trained, out, *common, "--api-base", server) == 0
    assert sorted(asked) == sorted(set(range(20)) - finished)
    assert (out / "3-8.json").read_bytes() == (tmp_path / "straight" / "3-8.json").read_bytes()
    assert json.load(open(out / ".generation.json"))["tasks"]["3-8"]["resumed_items"] == done_before >= 4


def test_two_processes_under_torchrun_write_the_files_of_one(tmp_path, trained):
    common = ["--tasks", "1-1,3-6", "--limit", "7", "--max-new-tokens", "24", "--batch-size", "2"]
    assert generate(trained, tmp_path / "one", *common) == 0
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), os.path.join(ROOT, "evaluate.py"), "generate", "--model", trained,
                        "--lawbench-data", SLICE, "--out", str(tmp_path / "two"), "--quiet", *common],
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    for task in ("1-1", "3-6"):
        assert (tmp_path / "two" / f"{task}.json").read_bytes() == (tmp_path / "one" / f"{task}.json").read_bytes()
    assert not (tmp_path / "two" / ".partial").exists()
    assert json.load(open(tmp_path / "two" / ".generation.json"))["processes"] == 2


CMMLU = os.path.join(ROOT, "cmmlu_assets", "data")


def cmmlu(model, out, *extra):
    return evaluate.main(["cmmlu", "--model", model, "--cmmlu-data", CMMLU, "--out", str(out), "--results",
                          str(out) + "-results", "--subjects", "college_law,virology,arts", "--quiet", *extra])


def test_cmmlu_five_shot_dialogues_get_the_same_replies_through_a_server(tmp_path, trained, server):
    """The examples go to the server as earlier chat turns; its chat template must render them as the
    in-process backend does, reply for reply."""
    assert cmmlu(trained, tmp_path / "local", "--max-new-tokens", "16") == 0
    assert cmmlu(trained, tmp_path / "api", "--max-new-tokens", "16", "--api-base", server) == 0
    for s in ("college_law", "virology", "arts"):
        assert (tmp_path / "api" / f"{s}.json").read_bytes() == (tmp_path / "local" / f"{s}.json").read_bytes()
    local = json.load(open(str(tmp_path / "local") + "-results/cmmlu.json"))
    api = json.load(open(str(tmp_path / "api") + "-results/cmmlu.json"))
    assert local["subjects"] == api["subjects"] and local["overall"] == api["overall"]


def test_cmmlu_perplexity_under_torchrun_writes_the_files_of_one_process(tmp_path, trained):
    assert cmmlu(trained, tmp_path / "one", "--mode", "ppl", "--shots", "2", "--batch-size", "2") == 0
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), os.path.join(ROOT, "evaluate.py"), "cmmlu", "--model", trained,
                        "--cmmlu-data", CMMLU, "--out", str(tmp_path / "two"), "--results", str(tmp_path / "two-r"),
                        "--subjects", "college_law,virology,arts", "--quiet", "--mode", "ppl", "--shots", "2",
                        "--batch-size", "2"], env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    for s in ("college_law", "virology", "arts"):
        assert (tmp_path / "two" / f"{s}.json").read_bytes() == (tmp_path / "one" / f"{s}.json").read_bytes()
    assert json.load(open(tmp_path / "two-r" / "cmmlu.json"))["n_items"] == 9


def test_the_stage2_judge_grades_the_same_through_a_server(tmp_path, bpe_tokenizer):
    """prepare_data.py's judge: the same rubric, parser and cache through --judge-api-base."""
    sources = [src("hq", write_jsonl(tmp_path / "a.jsonl", rand_records(3, 1))),
               src("web", write_jsonl(tmp_path / "b.jsonl", rand_records(5, 2)), high_quality=False)]
    judge = constant_model(bpe_tokenizer, "4", str(tmp_path / "judge4"))
    args = ["--judge-max-new-tokens", 1, "--judge-threshold", 4, "--judge-cache", tmp_path / "cache.jsonl"]
    _, local = run_prepare(tmp_path, bpe_tokenizer, sources, args + ["--judge-model", judge])
    with serving(judge) as url:
        api = args + ["--judge-api-base", url, "--judge-api-model", judge]
        _, served = run_prepare(tmp_path, bpe_tokenizer, sources, api)
        assert served["judge"]["generated"] == 5 and served["judge"]["score_counts"] == local["judge"]["score_counts"]
        assert served["stages"]["stage2"]["rows_per_source"] == local["stages"]["stage2"]["rows_per_source"]
        _, again = run_prepare(tmp_path, bpe_tokenizer, sources, api)  # cached per served judge
        assert again["judge"]["generated"] == 0 and again["judge"]["cached"] == 5


# ---------------------------------------------------------------------------------------------
# Servers that fail: a stand-in that answers 503 / 429 first, and one that is not there at all


class Flaky(StandIn):
    failures = []  # status codes to answer with, in order, before succeeding
    calls = []

    def answer(self, req):
        Flaky.calls.append(req)
        if Flaky.failures:
            return Flaky.failures.pop(0), "busy"
        return 200, "答：" + req["messages"][0]["content"][:4]


@pytest.fixture()
def flaky():
    Flaky.calls.clear()
    with stand_in(Flaky) as url:
        yield url


def test_requests_are_greedy_single_user_turns_retried_on_429_and_5xx(tmp_path, flaky):
    Flaky.failures[:] = [503, 429, 500]
    assert generate("judge-70b", tmp_path / "p", "--api-base", flaky, "--tasks", "1-1", "--limit", "2",
                    "--max-new-tokens", "33", "--concurrency", "1", "--retries", "3") == 0
    assert len(Flaky.calls) == 2 + 3
    data = json.load(open(os.path.join(SLICE, "zero_shot", "1-1.json"), encoding="utf-8"))
    for req in Flaky.calls:
        assert req["temperature"] == 0 and req["max_tokens"] == 33 and req["model"] == "judge-70b"
        assert len(req["messages"]) == 1 and req["messages"][0]["role"] == "user"  # no system prompt
    assert {r["messages"][0]["content"] for r in Flaky.calls} == {d["instruction"] + "\n" + d["question"]
                                                                  for d in data[:2]}
    preds = read(tmp_path / "p", "1-1")
    assert preds["0"]["prediction"] == "答：" + data[0]["instruction"][:4]
    # retries spent: one line naming the item and the status, nothing written as a reply
    Flaky.failures[:] = [503] * 10
    with pytest.raises(SystemExit, match=r"request for item 0 failed with HTTP 503 .* run again to resume"):
        generate("judge-70b", tmp_path / "q", "--api-base", flaky, "--tasks", "1-1", "--limit", "1", "--retries", "1")
    assert evaluate.read_partials(str(tmp_path / "q" / ".partial"), "1-1", 1) == {}


def test_an_unreachable_server_or_an_unserved_model_is_one_clear_line(tmp_path, flaky):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(SystemExit, match=f"cannot reach an OpenAI-compatible server at {dead}"):
        generate("m", tmp_path / "a", "--api-base", dead, "--tasks", "1-1", "--limit", "1", "--retries", "0")
    with pytest.raises(SystemExit, match=r"does not serve a model named 'gpt-5' \(it serves: judge-70b\)"):
        generate("gpt-5", tmp_path / "b", "--api-base", flaky, "--tasks", "1-1", "--limit", "1")
    with pytest.raises(SystemExit, match="--api-key-env NO_SUCH_VAR_X: that environment variable is not set"):
        generate("judge-70b", tmp_path / "c", "--api-base", flaky, "--api-key-env", "NO_SUCH_VAR_X")
