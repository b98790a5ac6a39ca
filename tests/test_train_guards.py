"""train.py refuses what it cannot train correctly, and says why in one line, before loading
anything heavy: samples left without a trained token by truncation, datasets without labels,
RoPE variants that packing would corrupt, a GPU without flash-attention at lengths sdpa cannot
serve, tokenizer-less or mistyped model paths. InternLM2's sentencepiece tokenizer is converted
so that it encodes exactly as sentencepiece itself does, and a model built from a bare config
starts from the same weights whatever the ZeRO stage.

The references are independent: Python loops over the rows, sentencepiece's own encoder, the
model's forward on a sample alone."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import train
from conftest import make_internlm2_checkpoint, read_log, save_tiny_llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_stage_data(folder, rows, tokenizer_dir, stage=1):
    """A prepare_data.py-shaped output folder: <folder>/stage<N>/ (Arrow) and <folder>/tokenizer/."""
    from datasets import Dataset
    Dataset.from_list(rows).save_to_disk(os.path.join(folder, f"stage{stage}"))
    shutil.copytree(tokenizer_dir, os.path.join(folder, "tokenizer"))
    return folder


def sft_row(n_tokens, trained_from, vocab=500, seed=0):
    """n_tokens of prompt-then-reply: labels -100 before position `trained_from`, ids after."""
    ids = np.random.default_rng(seed).integers(3, vocab, n_tokens).tolist()
    return {"input_ids": ids, "labels": [-100] * trained_from + ids[trained_from:], "length": n_tokens}


# ---------------------------------------------------------------------------------------------
# Truncation

def test_trained_tokens_left_after_truncation_are_counted_per_sample(tmp_path):
    from datasets import Dataset
    rows = [sft_row(100, 80, seed=1), sft_row(100, 10, seed=2), sft_row(30, 5, seed=3), sft_row(64, 63, seed=4)]
    ds = Dataset.from_list(rows)
    n_trained, within, _ = train.scan_tokens(ds, 64)
    # independently: labels[1:] that aren't -100, and those among the first 64 tokens
    assert n_trained.tolist() == [sum(y != -100 for y in r["labels"][1:]) for r in rows] == [20, 90, 25, 1]
    assert within.tolist() == [sum(y != -100 for y in r["labels"][1:64]) for r in rows] == [0, 54, 25, 1]
    idx, sel, counts = train.select_samples(ds["length"], n_trained, 64, "truncate", within)
    assert idx.tolist() == [1, 2, 3] and sel.tolist() == [64, 30, 64]
    assert counts == {"read": 4, "no_trained_tokens": 0, "too_long_truncated": 1,
                      "too_long_no_trained_tokens_left": 1, "kept": 3}


@pytest.mark.slow
def test_truncate_drops_samples_whose_replies_lie_beyond_max_len_instead_of_dividing_by_zero(tmp_path, bpe_tokenizer):
    """Every step here used to contain only truncated prompts: 0 trained tokens, ZeroDivisionError."""
    rows = [sft_row(200, 150, seed=i) for i in range(4)] + [sft_row(40, 20, seed=9), sft_row(50, 10, seed=10)]
    data = write_stage_data(str(tmp_path / "data"), rows, bpe_tokenizer)
    model = save_tiny_llama(str(tmp_path / "tiny"), bpe_tokenizer)
    out = tmp_path / "out"
    assert train.main(["--stage", "1", "--data", data, "--model", model, "--out-dir", str(out), "--max-len", "128",
                       "--oversize", "truncate", "--epochs", "1", "--zero-stage", "0", "--log-every", "100"]) == 0
    counts = json.load(open(out / "stage1" / "train_config.json"))["data_counts"]
    assert counts == {"read": 6, "no_trained_tokens": 0, "too_long_truncated": 0,
                      "too_long_no_trained_tokens_left": 4, "kept": 2}
    log = read_log(str(out / "stage1"))
    assert sum(r["trained_tokens"] for r in log) == 20 + 40  # both short samples, labels[1:]


# ---------------------------------------------------------------------------------------------
# Dataset schema

@pytest.mark.parametrize("columns,message", [
    (("input_ids", "length", "attention_mask"), "no labels column"),
    (("input_ids", "labels"), "no length column"),
])
def test_a_stage_dataset_without_a_needed_column_is_refused_naming_it(tmp_path, bpe_tokenizer, columns, message):
    rows = [{k: v for k, v in sft_row(20, 5, seed=i).items() if k in columns} for i in range(3)]
    for r in rows:
        if "attention_mask" in columns:  # the last column: it used to be read as the labels
            r["attention_mask"] = [1] * 20
    data = write_stage_data(str(tmp_path / "data"), rows, bpe_tokenizer)
    model = save_tiny_llama(str(tmp_path / "tiny"), bpe_tokenizer)
    with pytest.raises(SystemExit, match=message):
        train.main(["--stage", "1", "--data", data, "--model", model, "--out-dir", str(tmp_path / "out"),
                    "--max-len", "64", "--zero-stage", "0"])


def test_labels_that_are_not_token_lists_are_refused(tmp_path, bpe_tokenizer):
    rows = [{**sft_row(20, 5, seed=i), "labels": "not tokens"} for i in range(2)]
    data = write_stage_data(str(tmp_path / "data"), rows, bpe_tokenizer)
    model = save_tiny_llama(str(tmp_path / "tiny"), bpe_tokenizer)
    with pytest.raises(SystemExit, match="column labels is string, expected a list of token ids"):
        train.main(["--stage", "1", "--data", data, "--model", model, "--out-dir", str(tmp_path / "out"),
                    "--max-len", "64", "--zero-stage", "0"])


# ---------------------------------------------------------------------------------------------
# RoPE that depends on the pack

def dynamic_rope_model(max_pos=32):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=max_pos,
                      rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    model = LlamaForCausalLM(cfg).float().eval()
    model.config._attn_implementation = "sdpa"
    return model


def hidden_of_second_sample(model, len_a, b):
    a = torch.arange(3, 3 + len_a) % 90 + 3
    packed = train.collate_pack([{"input_ids": a, "labels": a}, {"input_ids": b, "labels": b}], len_a + len(b))
    with torch.no_grad():
        return model.model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                           use_cache=False).last_hidden_state[0, len_a:]


def test_dynamic_ntk_rope_makes_a_sample_depend_on_a_longer_pack_mate_which_is_why_it_is_refused():
    b = torch.arange(20) * 7 % 90 + 3
    model = dynamic_rope_model(max_pos=32)
    with torch.no_grad():
        alone = model.model(input_ids=b[None], use_cache=False).last_hidden_state[0]
    # pack-mate within the original context: exact
    torch.testing.assert_close(hidden_of_second_sample(dynamic_rope_model(32), 25, b), alone, atol=1e-5, rtol=1e-5)
    # pack-mate beyond it: RoPE rescaled for the whole pack, b is encoded differently (50x float noise
    # on this tiny random model; 8.9e-2 on the logits of a real one)
    assert (hidden_of_second_sample(dynamic_rope_model(32), 40, b) - alone).abs().max() > 5e-4
    cfg = model.config
    train.check_rope_with_packing(cfg, np.array([25, 7, 32]), "m")  # nothing longer than 32: allowed
    with pytest.raises(SystemExit,
                       match=r"dynamic RoPE.*1 of the 3 samples are longer than its 32 tokens.*--max-len 32"):
        train.check_rope_with_packing(cfg, np.array([40, 7, 30]), "m")
    long = LlamaConfig(max_position_embeddings=4096, rope_parameters={
        "rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 4, "long_factor": [2.0] * 4,
        "original_max_position_embeddings": 1024})
    with pytest.raises(SystemExit, match="longrope RoPE.*1024 tokens"):
        train.check_rope_with_packing(long, np.array([2000]), "m")
    static = LlamaConfig(max_position_embeddings=32,
                         rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})
    train.check_rope_with_packing(static, np.array([64]), "m")  # linear scaling doesn't look at the length


@pytest.mark.slow
def test_train_refuses_a_dynamic_rope_model_packed_beyond_its_context(tmp_path, bpe_tokenizer):
    tok = AutoTokenizer.from_pretrained(bpe_tokenizer)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}))
    model.save_pretrained(str(tmp_path / "m"))
    tok.save_pretrained(str(tmp_path / "m"))
    rows = [sft_row(100, 10, seed=1), sft_row(30, 10, seed=2)]
    data = write_stage_data(str(tmp_path / "data"), rows, bpe_tokenizer)
    args = ["--stage", "1", "--data", data, "--model", str(tmp_path / "m"), "--out-dir", str(tmp_path / "out"),
            "--zero-stage", "0", "--max-steps", "1"]
    with pytest.raises(SystemExit, match="dynamic RoPE"):
        train.main(args + ["--max-len", "128"])
    assert train.main(args + ["--max-len", "64"]) == 0  # the 100-token sample is dropped; nothing is rescaled


# ---------------------------------------------------------------------------------------------
# Paths, before anything heavy

def run_main(args):
    with pytest.raises(SystemExit) as e:
        train.main(args)
    return str(e.value.code)


def test_missing_data_is_named_before_any_tokenizer_or_model_is_loaded(tmp_path, bpe_tokenizer):
    no_tok = tmp_path / "weights-only"
    LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(str(no_tok))
    for model in (os.path.join(ROOT, "demo_data", "tiny_llama.json"), str(no_tok)):
        msg = run_main(["--stage", "1", "--data", str(tmp_path / "nowhere"), "--model", model, "--zero-stage", "0"])
        assert msg.startswith("error: ") and "nowhere/stage1 not found: run prepare_data.py" in msg, msg
    data = write_stage_data(str(tmp_path / "data"), [sft_row(20, 5)], bpe_tokenizer)
    shutil.rmtree(os.path.join(data, "tokenizer"))
    msg = run_main(["--stage", "1", "--data", data, "--model", str(no_tok), "--zero-stage", "0"])
    assert "no tokenizer: neither" in msg and "weights-only has tokenizer files" in msg, msg
    msg = run_main(["--stage", "1", "--data", data, "--model", os.path.join(ROOT, "demo_data", "tiny_llama.json"),
                    "--zero-stage", "0"])
    assert "bare config (random init), which has no tokenizer" in msg, msg


def test_an_empty_stage_folder_tokenizer_folder_or_stage_are_one_line_errors(tmp_path, bpe_tokenizer):
    """What a crashed copy or a recipe that fed no record to a stage leaves: each named in one line
    (they were a FileNotFoundError, a ValueError and an IndexError from datasets)."""
    model = os.path.join(ROOT, "demo_data", "tiny_llama.json")
    run = lambda data: run_main(["--stage", "1", "--data", data, "--model", model, "--zero-stage", "0",  # noqa: E731
                                 "--out-dir", str(tmp_path / "out")])
    empty_stage = tmp_path / "a"
    (empty_stage / "stage1").mkdir(parents=True)
    shutil.copytree(bpe_tokenizer, empty_stage / "tokenizer")
    assert "a/stage1 is not a saved dataset (no state.json" in run(str(empty_stage))
    empty_tok = write_stage_data(str(tmp_path / "b"), [sft_row(20, 5)], bpe_tokenizer)
    shutil.rmtree(os.path.join(empty_tok, "tokenizer"))
    os.makedirs(os.path.join(empty_tok, "tokenizer"))
    assert "b/tokenizer has no tokenizer files" in run(empty_tok)
    from datasets import Dataset
    no_rows = tmp_path / "c"
    Dataset.from_list([sft_row(20, 5)]).select([]).save_to_disk(str(no_rows / "stage1"))
    shutil.copytree(bpe_tokenizer, no_rows / "tokenizer")
    msg = run(str(no_rows))
    assert msg.startswith("error: ") and "c/stage1 has no rows: prepare_data.py kept no record for stage 1" in msg


def test_an_unknown_model_path_or_unreachable_hub_id_is_one_line_not_a_traceback(tmp_path, bpe_tokenizer, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # nothing leaves the machine
    data = write_stage_data(str(tmp_path / "data"), [sft_row(20, 5)], bpe_tokenizer)
    base = ["--stage", "1", "--data", data, "--zero-stage", "0", "--out-dir", str(tmp_path / "out")]
    assert run_main(base + ["--model", "./no/such/model"]).startswith("error: --model ./no/such/model: no such folder")
    assert run_main(base + ["--model", str(tmp_path / "missing.json")]).startswith("error: --model")
    msg = run_main(base + ["--model", "no-such-org/no-such-model"])
    assert msg.startswith("error: --model no-such-org/no-such-model is not a local folder, and fetching it from the "
                          "Hugging Face hub failed (LocalEntryNotFoundError"), msg
    assert "\n" not in msg
    msg = run_main(base + ["--model", str(tmp_path), "--deepspeed", str(tmp_path / "none.json")])
    assert msg.startswith("error: --deepspeed"), msg


# ---------------------------------------------------------------------------------------------
# InternLM2's sentencepiece tokenizer

SPECIALS = ["<|im_start|>", "<|im_end|>", "<|action_start|>", "<|action_end|>"]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
                 "'<|im_end|>' + '\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def make_internlm2_sentencepiece(path, texts, dummy_prefix):
    """InternLM2's tokenizer files as its checkpoint ships them: a sentencepiece BPE with byte
    fallback and its chat tokens as user-defined pieces, identity normalisation, and a
    tokenizer_config.json that names the remote-code InternLM2Tokenizer class."""
    import sentencepiece as spm
    os.makedirs(path, exist_ok=True)
    corpus = os.path.join(path, "corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        f.write("\n".join(t.replace("\n", " ") for t in texts))
    spm.SentencePieceTrainer.train(
        input=corpus, model_prefix=os.path.join(path, "tokenizer"), vocab_size=3000, model_type="bpe",
        character_coverage=0.995, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=dummy_prefix,
        split_digits=True, allow_whitespace_only_pieces=True, user_defined_symbols=SPECIALS, minloglevel=2)
    os.remove(corpus)
    os.remove(os.path.join(path, "tokenizer.vocab"))
    sp = spm.SentencePieceProcessor(model_file=os.path.join(path, "tokenizer.model"))
    added = {str(sp.piece_to_id(t)): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                     "normalized": False, "single_word": False} for t in SPECIALS}
    json.dump({"tokenizer_class": "InternLM2Tokenizer", "auto_map": {"AutoTokenizer": [
        "tokenization_internlm2.InternLM2Tokenizer", "tokenization_internlm2_fast.InternLM2TokenizerFast"]},
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>",
        "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": added,
        "additional_special_tokens": SPECIALS, "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False},
        open(os.path.join(path, "tokenizer_config.json"), "w"), ensure_ascii=False)
    return sp


def internlm2_encode(sp, text):
    """InternLM2Tokenizer's encoding, from its definition: <s>, then sentencepiece on each stretch
    of text between special tokens, each special token as its own id; no </s>."""
    ids = [sp.bos_id()]
    for part in re.split("(" + "|".join(re.escape(t) for t in SPECIALS) + ")", text):
        ids += [sp.piece_to_id(part)] if part in SPECIALS else sp.encode(part) if part else []
    return ids


@pytest.mark.parametrize("dummy_prefix", [True, False])
def test_internlm2s_sentencepiece_tokenizer_converts_to_one_that_encodes_identically(tmp_path, statute_rows,
                                                                                    bpe_tokenizer, dummy_prefix):
    src, dst = str(tmp_path / "internlm2"), str(tmp_path / "llama")
    make_internlm2_checkpoint(src, bpe_tokenizer, vocab_size=3072)
    for f in os.listdir(src):  # the BPE stand-in out, InternLM2's own tokenizer files in
        if f.startswith(("tokenizer", "special_tokens", "chat_template")):
            os.remove(os.path.join(src, f))
    statutes = [f"{law}{num}　{body}" for law, num, body in statute_rows[:1500]]
    sp = make_internlm2_sentencepiece(src, statutes + ["The quick brown fox, 2024."] * 10, dummy_prefix)
    train.convert_internlm2(src, dst)
    tok = AutoTokenizer.from_pretrained(dst)  # no remote code
    texts = statutes[1500 - 40:] + [
        "原告诉称：2023年5月1日被告借款50,000元。\n\n  被告未到庭。", "Two  spaces\tand a tab", " leading space", "",
        "<|im_start|>user\n根据《民法典》第五百七十七条，违约责任是什么？<|im_end|>\n<|im_start|>assistant\n",
        "x<|im_end|>y<|action_start|> z"]
    for text in texts:
        assert tok(text)["input_ids"] == internlm2_encode(sp, text), text
    messages = [{"role": "user", "content": statutes[-1][:60] + "？"}, {"role": "assistant", "content": statutes[-2]}]
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert rendered.startswith("<s><|im_start|>user\n")  # the chat template came along
    assert tok(rendered, add_special_tokens=False)["input_ids"] == internlm2_encode(sp, rendered[len("<s>"):])
    assert tok.decode(tok(statutes[-3])["input_ids"], skip_special_tokens=True) == statutes[-3]
    # raw text for continued pre-training starts with BOS, as InternLM2 was pre-trained
    doc = tmp_path / "doc.txt"
    doc.write_text(statutes[0], encoding="utf-8")
    ds, _ = train.load_cpt_data(str(doc), tok, 4096)
    assert ds[0]["input_ids"] == internlm2_encode(sp, statutes[0]) + [sp.eos_id()]


def test_an_internlm2_folder_without_tokenizer_files_or_sentencepiece_is_refused(tmp_path, bpe_tokenizer, monkeypatch):
    src = str(tmp_path / "internlm2")
    make_internlm2_checkpoint(src, bpe_tokenizer)
    for f in os.listdir(src):
        if f.startswith("tokenizer"):
            os.remove(os.path.join(src, f))
    with pytest.raises(SystemExit, match="has no tokenizer.model .* nor tokenizer.json"):
        train.convert_internlm2(src, str(tmp_path / "out"))  # it used to get a 3-token tokenizer
    assert not os.path.exists(tmp_path / "out")
    open(os.path.join(src, "tokenizer.model"), "wb").close()
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    with pytest.raises(SystemExit, match="pip install sentencepiece"):
        train.convert_internlm2(src, str(tmp_path / "out"))


# ---------------------------------------------------------------------------------------------
# One initialisation, whatever the ZeRO stage

@pytest.mark.slow
def test_a_config_json_model_starts_from_the_same_weights_under_zero3_and_without_deepspeed(tmp_path, demo_prepared):
    cfg = os.path.join(ROOT, "demo_data", "tiny_llama.json")
    args = ["--stage", "1", "--data", demo_prepared, "--model", cfg, "--max-len", "512", "--max-steps", "1",
            "--lr", "1e-3", "--warmup-ratio", "0", "--log-every", "100"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    z3 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                         "29533", os.path.join(ROOT, "train.py"), *args, "--zero-stage", "3", "--grad-accum", "1",
                         "--out-dir", str(tmp_path / "z3")], env=env, capture_output=True, text=True)
    assert z3.returncode == 0, z3.stderr[-3000:]
    assert train.main(args + ["--zero-stage", "0", "--grad-accum", "2", "--out-dir", str(tmp_path / "z0")]) == 0
    from safetensors.torch import load_file
    w3 = load_file(str(tmp_path / "z3" / "stage1" / "init" / "model.safetensors"))
    w0 = load_file(str(tmp_path / "z0" / "stage1" / "init" / "model.safetensors"))
    assert w3.keys() == w0.keys() and all(torch.equal(w3[k], w0[k]) for k in w0)
    (l3,), (l0,) = [r["loss"] for r in read_log(str(tmp_path / "z3" / "stage1"))], \
        [r["loss"] for r in read_log(str(tmp_path / "z0" / "stage1"))]
    assert l3 == pytest.approx(l0, rel=1e-6)  # they used to differ by 5e-4 (8.72336 vs 8.71840)
    # the same seed and config give the same init; another seed another one
    tok = AutoTokenizer.from_pretrained(os.path.join(demo_prepared, "tokenizer"))
    again = train.init_from_config(cfg, tok, 42, str(tmp_path / "again"))
    assert all(torch.equal(load_file(os.path.join(again, "model.safetensors"))[k], w0[k]) for k in w0)
    other = train.init_from_config(cfg, tok, 7, str(tmp_path / "other"))
    k = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(load_file(os.path.join(other, "model.safetensors"))[k], w0[k])


# ---------------------------------------------------------------------------------------------
# Quiet logs: DeepSpeed's calls of deprecated torch collectives, and nothing else

def test_only_the_two_known_deprecated_collective_warnings_are_silenced():
    """In a fresh interpreter (pytest installs its own warning filters around each test)."""
    code = """if True:
        import json, sys, warnings
        import train

        def shown(message, category=FutureWarning, module="torch.distributed.c10d_logger"):
            with warnings.catch_warnings(record=True) as caught:  # train.py's filters, unchanged
                warnings.warn_explicit(message, category, "c10d_logger.py", 83, module=module, registry={})
            return bool(caught)

        out = {}
        for name in ("reduce_scatter_tensor", "all_gather_into_tensor"):
            msg = f"`torch.distributed.{name}` is deprecated. Please use `torch.distributed.x` instead."
            out[name] = [shown(msg), shown(msg, module="train"), shown(msg, category=UserWarning)]
        out["other torch"] = shown("`torch.distributed._all_gather_base` is a private function and will be deprecated.")
        out["other deepspeed"] = shown("something else entirely", module="deepspeed.runtime.engine")
        print(json.dumps(out))
    """
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    # silenced from torch's wrapper; the same words from our code, or as another category, still show
    assert out["reduce_scatter_tensor"] == out["all_gather_into_tensor"] == [False, True, True]
    assert out["other torch"] and out["other deepspeed"]
