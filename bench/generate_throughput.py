"""
bench/generate_throughput.py -- LawBench generation speed of evaluate.py's two backends on the
same model, side by side in one run: in-process transformers generate() (batched, left-padded)
against an OpenAI-compatible server at several request concurrencies.

    make demo                                               # the tiny trained model it uses
    .venv/bin/python bench/generate_throughput.py           # CPU, transformers serve, ~2 minutes
    .venv/bin/python bench/generate_throughput.py --api-base http://127.0.0.1:23333/v1 --served-name internlm-law \
        --model /models/internlm-law-7b                     # a GPU node running LMDeploy or vLLM

Without --api-base it starts `transformers serve MODEL` on a free local port (CPU, no continuous
batching) and stops it afterwards. Every run generates the same items (--tasks, --limit, greedy,
--max-new-tokens) into its own temporary folder; reported are items/s over the whole run,
the ratio to the in-process backend (generation time only, model loading and server start
excluded), and whether the prediction files are byte-identical to its.
"""
import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def start_server(model):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = os.path.join(os.path.dirname(sys.executable), "transformers")
    proc = subprocess.Popen([exe, "serve", model, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, start_new_session=True)
    for _ in range(600):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc, f"http://127.0.0.1:{port}/v1"
        except OSError:
            if proc.poll() is not None:
                sys.exit("error: transformers serve exited (pip install 'transformers[serving]')")
            time.sleep(0.2)
    sys.exit("error: transformers serve did not start in 120 s")


def timed_generate(out, model, args, extra):
    """Seconds of generation alone, as evaluate.py records them (model loading not counted)."""
    import evaluate
    assert evaluate.main(["generate", "--model", model, "--lawbench-data", args.lawbench_data, "--out", out,
                          "--tasks", args.tasks, "--limit", str(args.limit), "--max-new-tokens",
                          str(args.max_new_tokens), "--quiet", *extra]) == 0
    return json.load(open(os.path.join(out, ".generation.json")))["generation_seconds"]


def same_files(a, b, tasks):
    return all(open(os.path.join(a, f"{t}.json"), "rb").read() == open(os.path.join(b, f"{t}.json"), "rb").read()
               for t in tasks)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.join(ROOT, "results", "demo", "train", "stage2", "final"),
                   help="model folder for the in-process backend and the local server (default: make demo's stage 2)")
    p.add_argument("--api-base", help="an already running server instead of starting transformers serve")
    p.add_argument("--served-name", help="the model's name on --api-base (default: --model)")
    p.add_argument("--lawbench-data", default=os.path.join(ROOT, "lawbench_assets", "data"))
    p.add_argument("--tasks", default="1-1,3-3,3-8", help="tasks to generate (default %(default)s)")
    p.add_argument("--limit", type=int, default=32, help="items per task (default %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="(default %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="in-process batch size (default %(default)s)")
    p.add_argument("--concurrency", default="1,4,16", help="API concurrencies to run (default %(default)s)")
    args = p.parse_args()
    if not os.path.isdir(args.model):
        sys.exit(f"error: {args.model} not found: run make demo first, or pass --model")
    tasks = args.tasks.split(",")
    n = args.limit * len(tasks)
    proc, url = (None, args.api_base) if args.api_base else start_server(args.model)
    name = args.served_name or args.model
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            base = os.path.join(tmp, "local")
            t_local = timed_generate(base, args.model, args, ["--batch-size", str(args.batch_size)])
            rows.append((f"in-process generate(), batch {args.batch_size}", t_local, True))
            for c in args.concurrency.split(","):
                out = os.path.join(tmp, f"api{c}")
                t = timed_generate(out, name, args, ["--api-base", url, "--concurrency", c])
                rows.append((f"API, concurrency {c}", t, same_files(base, out, tasks)))
        finally:
            if proc:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
    print(f"\n{n} LawBench items ({args.tasks} x {args.limit}), greedy, max {args.max_new_tokens} new tokens, "
          f"server {'transformers serve (CPU)' if proc else url}\n")
    print("| backend | seconds | items/s | vs in-process | files identical to in-process |")
    print("|---|---:|---:|---:|---|")
    for label, t, same in rows:
        print(f"| {label} | {t:.1f} | {n / t:.2f} | {t_local / t:.2f}x | {'yes' if same else 'no'} |")


if __name__ == "__main__":
    main()
