"""
common.py -- what prepare_data.py, train.py and evaluate.py all need: messages, atomic file and
folder writes, and the client for OpenAI-compatible servers (evaluate.py's generation and
prepare_data.py's judge). Standard library only at import (openai is imported by the client's
functions), so importing it costs nothing (`evaluate.py score` never imports torch) and each
script can be forked with just this file beside it.
"""
import json
import os
import shutil
import sys
import tempfile


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def fail(msg):
    """Stop with a one-line message (no traceback): for bad input, not for bugs."""
    raise SystemExit(f"error: {msg}")


def atomic_write(path, write):
    """Write via a temporary file in the same folder, then rename: readers never see half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide results from the rest of a team
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_jsonl_map(path, key, value):
    """{row[key]: row[value]} from an append-only JSONL file (a progress file or a cache). A line
    torn by a killed run, or one without the fields, is skipped: that item is simply done again."""
    out = {}
    if path and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                    out[row[key]] = row[value]
                except (ValueError, KeyError, TypeError):
                    continue
    return out


def write_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, ensure_ascii=False, indent=1).encode("utf-8")))


def staging_dir(final):
    """An empty folder beside `final` to build it in; replace_dir swaps it in."""
    tmp = final.rstrip("/") + f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def replace_dir(tmp, final):
    """Move a finished folder into place; the old one (if any) is removed only afterwards."""
    old = None
    if os.path.exists(final):
        old = final.rstrip("/") + f".old-{os.getpid()}"
        os.rename(final, old)
    os.rename(tmp, final)
    if old:
        shutil.rmtree(old)


# ----------------------------------------------------------------------------------------------
# OpenAI-compatible serving engines (vLLM, LMDeploy, SGLang, transformers serve, OpenAI itself):
# evaluate.py's LawBench generation and prepare_data.py's judge. `openai` is imported only here.


def api_client(api_base, api_key_env=None, timeout=600.0, retries=5):
    """(client, names of the served models or None) for an OpenAI-compatible server. The openai
    client retries connection errors, 408/409/429 and 5xx with exponential backoff (0.5 s doubling
    to 8 s), `retries` times. An unreachable server stops here, in one line naming the URL."""
    try:
        import openai
    except ImportError:
        fail("--api-base needs the openai client: pip install openai")
    key = None
    if api_key_env:
        key = os.environ.get(api_key_env)
        if not key:
            fail(f"--api-key-env {api_key_env}: that environment variable is not set")
    # openai's connection pool (1000 connections) is larger than any --concurrency
    client = openai.OpenAI(base_url=api_base, api_key=key or "EMPTY", timeout=timeout, max_retries=retries)
    try:
        served = [m.id for m in client.with_options(max_retries=min(retries, 2)).models.list()]
    except openai.APIConnectionError as exc:
        fail(f"cannot reach an OpenAI-compatible server at {api_base} ({exc.__cause__ or exc}); is it running, "
             "and does the URL end in /v1?")
    except openai.AuthenticationError:
        fail(f"{api_base} refused the API key" + (f" in ${api_key_env}" if api_key_env else " (pass --api-key-env)"))
    except openai.APIStatusError:
        served = None  # reachable, but it does not list its models (transformers serve without a cache)
    return client, served


def check_served(served, model, api_base):
    if served is not None and model not in served:
        fail(f"{api_base} does not serve a model named {model!r} (it serves: {', '.join(served) or 'none'}); "
             "pass one of those names")


def chat_replies(client, model, prompts, todo, max_tokens, concurrency, on_reply):
    """Greedy replies (temperature 0) to prompts[i] for i in todo, each sent as one user turn with
    no system prompt, `concurrency` requests in flight. on_reply(i, text) runs in the caller's
    thread as each reply arrives, so it can append to a resumable file without a lock. A request
    that still fails after the client's retries stops the run; replies already given are kept."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    import openai

    def ask(i):
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompts[i]}],
                                           temperature=0, max_tokens=max_tokens)
        return i, r.choices[0].message.content or ""

    pool = ThreadPoolExecutor(max_workers=max(1, concurrency))
    futures = {pool.submit(ask, i): i for i in todo}
    try:
        for fut in as_completed(futures):
            try:
                i, text = fut.result()
            except openai.APIError as exc:
                detail = getattr(exc, "status_code", None)
                fail(f"request for item {futures[fut]} failed{f' with HTTP {detail}' if detail else ''} "
                     f"({str(exc).splitlines()[0][:300]}); the replies received so far are kept: run again to resume")
            on_reply(i, text)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
