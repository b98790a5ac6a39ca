"""
common.py -- what prepare_data.py, train.py and evaluate.py all need: messages, atomic file and
folder writes, append-only JSONL files, the chat template's end of turn, and generation -- in
process (evaluate.py's LawBench replies and judge, prepare_data.py's judge: one copy of loading,
dtype, batching, left padding, stop ids and the split over torchrun ranks) or through an
OpenAI-compatible server -- and charts that render Chinese. Standard library only at import
(torch, transformers, openai and matplotlib are imported by the functions that use them), so
importing it costs nothing (`evaluate.py score` never imports torch) and each script can be
forked with just this file beside it.
"""
import contextlib
import glob
import json
import os
import re
import shutil
import stat
import sys
import tempfile


def log(msg):
    """A line for the user, on stderr, from rank 0 only when several processes run (RANK and
    WORLD_SIZE, as torchrun sets them; the other ranks would repeat it; a stray RANK alone, as some
    job systems set, silences nothing), written around any tqdm progress bar, not through it."""
    if int(os.environ.get("RANK", 0)) != 0 and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        return
    try:
        from tqdm import tqdm
        tqdm.write(msg, file=sys.stderr)
        sys.stderr.flush()
    except ImportError:
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


def read_jsonl(path):
    """The rows of an append-only JSONL file (progress, cache, log) that a kill may have cut at any
    byte, even inside a multi-byte character: a line that does not decode or parse as a JSON
    object is skipped (it is the torn last one; its item is simply done again). A missing file
    has no rows."""
    rows = []
    if path and os.path.exists(path):
        with open(path, "rb") as f:
            for line in f:
                try:
                    row = json.loads(line.decode("utf-8"))
                except ValueError:  # UnicodeDecodeError and JSONDecodeError are both ValueErrors
                    continue
                if isinstance(row, dict):
                    rows.append(row)
    return rows


def read_jsonl_map(path, key, value):
    """{row[key]: row[value]} from an append-only JSONL file (read_jsonl); a row without the fields
    is skipped like a torn one."""
    return {row[key]: row[value] for row in read_jsonl(path)
            if key in row and value in row and isinstance(row[key], (str, int, float, bool))}


def open_jsonl_append(path):
    """An append-only JSONL file (progress, cache) opened for appending. A line torn by a kill is
    closed first, so that the next record starts on a line of its own (the torn one is then
    skipped on reading: read_jsonl_map)."""
    torn = False
    if os.path.exists(path) and os.path.getsize(path):
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
    out = open(path, "a", encoding="utf-8")
    if torn:
        out.write("\n")
    return out


def rank_file(path, rank):
    """The JSONL file rank `rank` appends to under torchrun, so that no two processes write one
    file: `path` itself for rank 0 (and a single process), <stem>.rank<r><ext> beside it else."""
    if rank == 0:
        return path
    stem, ext = os.path.splitext(path)
    return f"{stem}.rank{rank}{ext}"


def rank_files(path):
    """`path` and every rank_file beside it that exists, whatever number of ranks wrote them (a
    run may resume on another number of processes)."""
    folder, name = os.path.split(path)
    stem, ext = os.path.splitext(name)
    pattern = re.compile(re.escape(stem) + r"\.rank\d+" + re.escape(ext))
    names = sorted(os.listdir(folder or ".")) if os.path.isdir(folder or ".") else []
    return [p for p in [path, *(os.path.join(folder, n) for n in names if pattern.fullmatch(n))] if os.path.exists(p)]


def append_jsonl(f, rows):
    """Append dict rows to a file from open_jsonl_append, one JSON line each, and make them durable
    (flush + fsync) before returning: what a resumed run reads back is what was said to be done."""
    f.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    f.flush()
    if stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # not /dev/null (no cache asked for)
        os.fsync(f.fileno())


def write_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, ensure_ascii=False, indent=1).encode("utf-8")))


def lock_folder(folder, advice):
    """An exclusive lock on an output folder (a training run, a prediction or judge folder) for
    this process, with its host, pid and start time in `folder/.lock`: two runs never write the
    same files. flock is released by the kernel when its holder dies, so a lock left by a killed
    run is never in the way (its record is returned, to be reported). A busy folder stops with
    the holder and `advice`. Returns (the open lock file, which must stay open for the whole run;
    the previous holder's record)."""
    import fcntl
    import socket
    import time
    os.makedirs(folder, exist_ok=True)
    f = open(os.path.join(folder, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        fail(f"{folder} is in use by {holder}; {advice}")
    f.seek(0)
    previous = f.read().strip()
    f.seek(0)
    f.truncate()
    f.write(f"host {socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    return f, previous


@contextlib.contextmanager
def staged_folder(final):
    """Build a folder in `with staged_folder(final) as tmp:`, beside `final`; when the block ends it
    replaces `final` (the old one is removed only after the swap). If the block fails, the staging
    folder is removed: a crashed 7B conversion leaves no 15 GB behind. Staging folders of earlier
    processes that died before either (final.tmp-<pid>, that pid gone) are removed first."""
    final = final.rstrip("/")
    for stale in glob.glob(glob.escape(final) + ".tmp-*"):
        pid = stale.rsplit("-", 1)[1]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = f"{final}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(final):
        old = f"{final}.old-{os.getpid()}"
        os.rename(final, old)
    os.rename(tmp, final)
    if old:
        shutil.rmtree(old)


def pid_alive(pid):
    """Whether a process with this id exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------------------------
# Packing: train.py packs with it, prepare_data.py's report counts the packs train.py will make


CJK_FONTS = ["Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "WenQuanYi Micro Hei", "WenQuanYi Zen Hei",
             "SimHei", "Microsoft YaHei", "PingFang SC", "Heiti SC", "AR PL UMing CN", "Droid Sans Fallback"]
_CJK_WARNED = []


def pyplot(text=""):
    """matplotlib.pyplot, headless, with a Chinese font as fallback behind DejaVu Sans when one is
    installed (matplotlib falls back glyph by glyph), so chart labels such as subject and task names
    render instead of empty boxes. A font installed after matplotlib built its font cache is found
    on disk. Without one, a chart whose `text` holds Chinese says so once (not once per glyph)."""
    import warnings

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import font_manager
    installed = {f.name for f in font_manager.fontManager.ttflist}
    if not any(name in installed for name in CJK_FONTS):
        for path in font_manager.findSystemFonts():
            if re.search(r"wqy|cjk|droidsansfallback|simhei|msyh|sourcehansans|notosanssc", path.lower()):
                with contextlib.suppress(Exception):  # an unreadable font file is not our problem
                    font_manager.fontManager.addfont(path)
        installed = {f.name for f in font_manager.fontManager.ttflist}
    cjk = [name for name in CJK_FONTS if name in installed]
    plt.rcParams["font.family"] = ["DejaVu Sans", *cjk]  # a list: the generic "sans-serif" never falls back
    if not cjk and re.search("[\u4e00-\u9fff]", text):
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        if not _CJK_WARNED:
            _CJK_WARNED.append(True)
            log("warning: no Chinese font installed; Chinese labels in charts show as boxes "
                "(Debian/Ubuntu: apt-get install fonts-wqy-microhei, or fonts-noto-cjk)")
    return plt


def pack_best_fit(lengths, max_len, seed=0, epoch=0):
    """Best-fit-decreasing bin packing of whole samples. Returns a list of packs, each an int64
    array of sample indices, in a shuffled order that depends only on (seed, epoch).

    Samples are visited longest first; each goes into the open pack whose free space is the
    smallest that still fits it. Equal lengths are visited in a random order per epoch, so the
    same samples don't always share a pack; the number of packs doesn't depend on that order.
    Every length must be in [1, max_len]."""
    import numpy as np
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.min() < 1 or lengths.max() > max_len):
        raise ValueError(f"sample lengths must be in [1, {max_len}]")
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(lengths))
    order = perm[np.argsort(-lengths[perm], kind="stable")]
    # Best fit needs "smallest free space >= length" a million times. Free spaces are integers in
    # [1, max_len], so one Python int serves as a bitset of the free-space values some pack has:
    # shifting it right by `length` and taking the lowest set bit answers the query in a few
    # word-parallel big-int operations, ~1M samples in a few seconds, with no tree to maintain.
    by_space = [[] for _ in range(max_len + 1)]  # free space -> ids of packs with exactly that space
    has_space = 0
    members = []
    for i, n in zip(order.tolist(), lengths[order].tolist(), strict=True):
        above = has_space >> n
        if above:
            space = n + (above & -above).bit_length() - 1
            b = by_space[space].pop()
            if not by_space[space]:
                has_space ^= 1 << space
        else:
            space, b = max_len, len(members)
            members.append([])
        members[b].append(i)
        space -= n
        if space:
            if not by_space[space]:
                has_space |= 1 << space
            by_space[space].append(b)
    return [np.array(members[b], dtype=np.int64) for b in rng.permutation(len(members))]


def trained_positions(labels):
    """The trained-token rule, in one place: the positions 1.. whose label is not -100. The loss
    scores the logits at t against labels[t + 1], so nothing predicts a sample's first token and
    its label never counts (train.py's collate_pack sets it to -100; its trained_tokens and
    scan_tokens apply this rule vectorised, and prepare_data.py's report counts with it)."""
    return sum(1 for y in labels[1:] if y != -100)


def fill_efficiency(packs, lengths, max_len):
    """Real tokens / capacity of the packs (1.0 = no padding at all)."""
    return float(sum(int(lengths[p].sum()) for p in packs)) / (len(packs) * max_len) if packs else 0.0


# ----------------------------------------------------------------------------------------------
# Chat templates and in-process generation (torch and transformers are imported inside)


def special_tokens(tok, every_added=False):
    """The tokenizer's special tokens, sorted: its named ones (bos, eos, ...) and the added tokens
    marked special; every_added: all added tokens, also those not marked special (a chat template's
    end of turn may be added without the flag)."""
    added = {t.content for t in tok.added_tokens_decoder.values() if every_added or t.special}
    return sorted(set(tok.all_special_tokens) | added)


def end_of_turn(tok, override=None):
    """The token that closes an assistant turn in the chat template (trained, so the model
    learns to stop). Found by rendering a probe conversation."""
    if override:
        return override
    probe = [{"role": "user", "content": "PROBEQ"}, {"role": "assistant", "content": "PROBEA"}]
    text = tok.apply_chat_template(probe, tokenize=False)
    after = text[text.index("PROBEA") + len("PROBEA"):]
    for s in sorted(special_tokens(tok, every_added=True), key=len, reverse=True):
        if s and after.startswith(s):
            return s
    fail("cannot tell the end-of-turn token from the chat template (the assistant text is "
         f"followed by {after[:20]!r}); give it with --eot-token")


def model_fingerprint(path, api_base=None):
    """Identifies the weights behind a prediction folder, so that a resume never mixes replies of
    two models: the weight files' names, sizes and modification times, and config.json; for a
    served model, the server's URL and the model's name."""
    import hashlib
    if api_base:
        return hashlib.sha256(f"{api_base.rstrip('/')}\0{path}".encode()).hexdigest()[:16]
    h = hashlib.sha256(str(os.path.abspath(path)).encode())
    if os.path.isdir(path):
        for name in sorted(os.listdir(path)):
            full = os.path.join(path, name)
            if name.endswith((".safetensors", ".bin")) or name == "config.json":
                st = os.stat(full)
                h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def setup_ranks(api):
    """(rank, world, device, collectives). Under torchrun the in-process backend splits each
    task's items across the ranks, one model per GPU; a server needs one client process."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and api:
        fail("with --api-base run one process (python evaluate.py ...): the serving engine does the "
             "parallelism; raise --concurrency instead")
    if api:
        return 0, 1, None, (lambda: None), (lambda x: x)
    import torch
    import torch.distributed as dist
    rank, local = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def barrier():
        if world > 1:
            dist.barrier()

    def total(x):
        if world == 1:
            return x
        t = torch.tensor(int(x), device=device)
        dist.all_reduce(t)
        return int(t.item())
    return rank, world, device, barrier, total


def load_generator(path, trust_remote_code, device):
    """(model, tokenizer, ids that end a reply) for greedy batched generation with left padding, on
    `device`: a GPU computes in bf16 (a checkpoint stored in fp32 too), a CPU in the stored dtype."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype="auto", trust_remote_code=trust_remote_code)
    except ValueError as exc:
        fail(f"cannot load {path} ({exc}); checkpoints with their own modelling code (e.g. InternLM2) need "
             "--trust-remote-code")
    if device is not None and device.type == "cuda" and model.dtype == torch.float32:
        model.to(torch.bfloat16)
    model.to(device).eval()
    stop = {tok.eos_token_id}
    if tok.chat_template:
        stop.add(tok.convert_tokens_to_ids(end_of_turn(tok)))
    stop |= set(model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list)
                else [model.generation_config.eos_token_id])
    return model, tok, sorted(i for i in stop if i is not None)


def as_messages(prompt):
    """A prompt as chat messages: a text is one user turn; a list of {role, content} is kept."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def generate_replies(model, tok, stop_ids, prompts, todo, batch_size, max_new_tokens, on_batch):
    """Greedy replies to prompts[i] for i in todo, each as one user turn of the model's chat
    template (or a dialogue: a list of {role, content}, e.g. few-shot examples as earlier turns),
    in batches; on_batch([(i, reply), ...]) after each. Longest prompts first: batches of similar
    lengths waste no padding, and an out-of-memory error shows up in the first batch rather than
    after an hour. Returns the number of prompts truncated to fit the context. Without a chat
    template a prompt is its plain text (a dialogue's turns joined by newlines)."""
    import torch
    limit = getattr(model.config, "max_position_embeddings", None)
    texts = {i: tok.apply_chat_template(as_messages(prompts[i]), tokenize=False, add_generation_prompt=True)
             if tok.chat_template else "\n".join(m["content"] for m in as_messages(prompts[i])) for i in todo}
    ids = {i: tok(t, add_special_tokens=not tok.chat_template)["input_ids"] for i, t in texts.items()}
    truncated = 0
    todo = sorted(todo, key=lambda i: -len(ids[i]))
    for k in range(0, len(todo), batch_size):
        batch = todo[k:k + batch_size]
        rows = []
        for i in batch:
            x = ids[i]
            if limit and len(x) + max_new_tokens > limit:  # keep the end: the question and the reply cue
                x, truncated = x[len(x) + max_new_tokens - limit:], truncated + 1
            rows.append(x)
        width = max(map(len, rows))
        input_ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows], device=model.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=model.device)
        with torch.no_grad():
            gen = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False, num_beams=1,
                                 max_new_tokens=max_new_tokens, eos_token_id=stop_ids, pad_token_id=tok.pad_token_id,
                                 temperature=None, top_p=None, top_k=None)
        replies = []
        for i, row in zip(batch, gen[:, width:].tolist(), strict=True):
            row = row[:next((j for j, t in enumerate(row) if t in stop_ids), len(row))]
            replies.append((i, tok.decode(row, skip_special_tokens=True)))
        on_batch(replies)
    return truncated


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
    """Greedy replies (temperature 0) to prompts[i] for i in todo, each sent as one user turn (or
    the dialogue a list of {role, content} gives) with no system prompt, `concurrency` requests in
    flight. on_reply(i, text) runs in the caller's thread as each reply arrives, so it can append
    to a resumable file without a lock. A request that still fails after the client's retries
    stops the run; replies already given are kept."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    import openai

    def ask(i):
        r = client.chat.completions.create(model=model, messages=as_messages(prompts[i]), temperature=0,
                                           max_tokens=max_tokens)
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
