"""
LawBench evaluation for the InternLM-Law reproduction.

Score predictions exactly as the official LawBench scorer (open-compass/LawBench, `evaluation/`)
does, task by task, and write tables and charts:

    python evaluate.py score --predictions predictions/ --setting zero_shot --out results/

`--predictions` is LawBench's prediction layout: `DIR/<model>/<task>.json`, each file a JSON object
`{"0": {"origin_prompt": ..., "prediction": ..., "refr": ...}, "1": ...}` (or `DIR/<setting>/<model>/`,
or a single model folder). Outputs, all written atomically:

    results/scores.json   per model, per task: score (0-100), abstention rate, item counts, warnings;
                          per cognitive level and overall averages
    results/scores.csv    one row per (model, task), like LawBench's own results.csv (score 0-100)
    results/scores.png    per-task bars, one colour per model
    stdout                the same numbers as Markdown tables

Generate a checkpoint's predictions in that layout first (greedy, the model's chat template, no
system prompt, as InternLM-Law is evaluated), then score them, or both in one go:

    python evaluate.py generate --model out/stage2/final --lawbench-data LawBench/data --setting zero_shot \
        --out predictions/internlm-law
    python evaluate.py run --model out/stage2/final --lawbench-data LawBench/data --setting zero_shot \
        --out predictions/internlm-law --results results/internlm-law
    # one model per GPU, each task's items split across the ranks
    torchrun --nproc_per_node 8 evaluate.py run --model out/stage2/final ...same flags...
    # through a serving engine (LMDeploy, vLLM, SGLang: anything OpenAI-compatible)
    lmdeploy serve api_server out/stage2/final --server-port 23333 --model-name internlm-law &
    python evaluate.py run --api-base http://127.0.0.1:23333/v1 --model internlm-law --concurrency 64 \
        --lawbench-data LawBench/data --setting zero_shot --out predictions/internlm-law --results results/internlm-law

The paper's subjective evaluation, each model's consultation answers (task 3-8) against GPT-4's,
judged pairwise in both orders by an LLM (local, or served: a 70B, or GPT-4 itself):

    python evaluate.py judge --predictions predictions/ --reference GPT4 \
        --judge-api-base https://api.openai.com/v1 --judge-api-model gpt-4 --judge-api-key-env OPENAI_API_KEY \
        --out results/judge

General ability on CMMLU, prompted and scored as OpenCompass does (chat models: five dev examples as
earlier turns, the reply's first capital letter; base models: --mode ppl), and the paper's arms
side by side (LawBench, CMMLU, win rate, InternLM-Law's published averages):

    python evaluate.py cmmlu --model out/stage2/final --cmmlu-data CMMLU/data --out predictions/internlm-law-cmmlu \
        --results results/internlm-law/cmmlu
    python evaluate.py compare results/two-stage results/one-stage results/merged --out results/compare

Replies are at most 1024 new tokens by default: OpenCompass's max_out_len for LawBench, with which
InternLM-Law was scored.

Why a re-implementation rather than calling LawBench's scripts: the official scorer takes ~210 s per
model on one core (95% in task 2-1, which aligns every sentence twice in subprocesses and decides
"timeouts" by the wall clock), needs LTP/torch just to import, and crashes on malformed input. The
numbers here are the official ones; tests/test_lawbench_published.py pins them against LawBench's
published results.csv.
"""

import argparse
import csv
import json
import math
import os
import re
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

from cherrant import cherrant_edits_many, cherrant_resources, compare_edits, f_beta
from common import (
    api_client,
    append_jsonl,
    atomic_write,
    chat_replies,
    check_served,
    fail,
    generate_replies,
    load_generator,
    lock_folder,
    log,
    model_fingerprint,
    open_jsonl_append,
    pyplot,
    rank_file,
    rank_files,
    read_jsonl_map,
    setup_ranks,
    write_json,
)

HERE = os.path.dirname(os.path.abspath(__file__))
# ChERRANT's lexical resources (from LawBench, Apache-2.0, see lawbench_assets/NOTICE.md).
ASSETS = os.path.join(HERE, "lawbench_assets")

# ----------------------------------------------------------------------------------------------
# The 20 tasks: id -> (English name, Chinese name, metric). Level = first digit of the id:
# 1 memorisation, 2 understanding, 3 application (LawBench's three cognitive levels).

TASKS = {
    "1-1": ("Article Recitation", "法条背诵", "ROUGE-L"),
    "1-2": ("Knowledge Question Answering", "知识问答", "Accuracy"),
    "2-1": ("Document Proofreading", "文件校对", "F0.5"),
    "2-2": ("Dispute Focus Identification", "纠纷焦点识别", "Accuracy"),
    "2-3": ("Marital Disputes Identification", "婚姻纠纷鉴定", "F1"),
    "2-4": ("Issue Topic Identification", "问题主题识别", "Accuracy"),
    "2-5": ("Reading Comprehension", "阅读理解", "rc-F1"),
    "2-6": ("Named-Entity Recognition", "命名实体识别", "soft-F1"),
    "2-7": ("Opinion Summarization", "舆情摘要", "ROUGE-L"),
    "2-8": ("Argument Mining", "论点挖掘", "Accuracy"),
    "2-9": ("Event Detection", "事件检测", "F1"),
    "2-10": ("Trigger Word Extraction", "触发词提取", "soft-F1"),
    "3-1": ("Fact-based Article Prediction", "法条预测(基于事实)", "F1"),
    "3-2": ("Scene-based Article Prediction", "法条预测(基于场景)", "ROUGE-L"),
    "3-3": ("Charge Prediction", "罪名预测", "F1"),
    "3-4": ("Prison Term Prediction w/o Article", "刑期预测(无法条内容)", "log-distance"),
    "3-5": ("Prison Term Prediction w/ Article", "刑期预测(给定法条内容)", "log-distance"),
    "3-6": ("Case Analysis", "案例分析", "Accuracy"),
    "3-7": ("Criminal Damages Calculation", "犯罪金额计算", "Accuracy"),
    "3-8": ("Consultation", "咨询", "ROUGE-L"),
}
LEVELS = {"1": "memorization", "2": "understanding", "3": "application"}


def task_sort_key(task_id):
    level, number = task_id.split("-")
    return int(level), int(number)


class ReferenceError_(ValueError):
    """A reference answer that does not have the format LawBench's data guarantees."""


# ----------------------------------------------------------------------------------------------
# Shared answer-extraction rules

def multi_choice(prediction, options, answer):
    """LawBench's single-choice rule: right iff the answer option is the *only* option mentioned.

    Each option counts once however often it appears; mentioning none is an abstention.
    Returns (correct, abstained)."""
    mentioned = [opt for opt in options if opt in prediction]
    if not mentioned:
        return 0, 1
    return int(mentioned == [answer]), 0


def set_f1(pred, gold):
    """F1 between two sets (0 when either is empty)."""
    common = len(pred & gold)
    precision = common / len(pred) if pred else 0
    recall = common / len(gold) if gold else 0
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0


def char_f1(gold, pred):
    """CAIL/CJRC reading-comprehension F1 over characters: lower-cased, only letters and digits
    kept (Chinese characters are letters to str.isalpha), bag-of-characters overlap. Two empty
    strings agree (1), one empty string scores 0."""
    gold_chars = [c for c in gold.lower() if c.isdigit() or c.isalpha()]
    pred_chars = [c for c in pred.lower() if c.isdigit() or c.isalpha()]
    if not gold_chars or not pred_chars:
        return int(gold_chars == pred_chars)
    same = sum((Counter(gold_chars) & Counter(pred_chars)).values())
    if same == 0:
        return 0
    precision, recall = same / len(pred_chars), same / len(gold_chars)
    return 2 * precision * recall / (precision + recall)


_ASCII_RUN = re.compile("[a-zA-Z0-9]+")
_JIEBA_WORDS = set()  # jieba's dictionary words, UTF-8


def jieba_words(text):
    """list(jieba.cut(text)) -- jieba's default mode, as LawBench segments text for ROUGE-L --
    about 4x faster, word for word the same.

    jieba splits the text into blocks of Chinese/ASCII word characters (its re_han_default) and
    the rest. Within a block it picks the most probable dictionary segmentation (a DAG of
    dictionary words and a dynamic programme over their log frequencies), then hands every run of
    one-character words that is not itself a dictionary word to its HMM (finalseg), which finds
    unknown words. The first step is pure Python and most of the time; rjieba (jieba-rs, the same
    dictionary and the same floating-point sums) does exactly it, with its HMM off. Whether a run
    is a dictionary word we look up in the words of jieba's dictionary file, which load in a
    quarter of the time jieba takes to build its own dictionary. We keep jieba's HMM: jieba-rs's
    can break ties between equally likely segmentations the other way (for example in
    "协协协协协"). Without its HMM, rjieba joins neighbouring single ASCII letters and digits into
    one word, as jieba's own no-HMM mode does; the dictionary holds no word made only of ASCII
    letters and digits, so such a word is always a run of one-character words.
    tests/test_metrics.py checks equality with jieba on LawBench texts, statutes and edge cases."""
    import jieba
    import rjieba
    hmm = jieba.finalseg.cut
    if not _JIEBA_WORDS:
        with jieba.dt.get_dict_file() as f:  # lines "word frequency [tag]"; no frequency is 0
            _JIEBA_WORDS.update(line.split(b" ", 1)[0] for line in f)
    words = []
    for block in jieba.re_han_default.split(text):
        if not block:
            continue
        if not jieba.re_han_default.match(block):  # whitespace runs stay whole, anything else one character each
            for piece in jieba.re_skip_default.split(block):
                if jieba.re_skip_default.match(piece):
                    words.append(piece)
                else:
                    words.extend(piece)
            continue
        run = ""  # consecutive one-character dictionary-route words
        for word in rjieba.cut(block, False) + [None]:
            if word is not None and (len(word) == 1 or _ASCII_RUN.fullmatch(word)):
                run += word
                continue
            if len(run) == 1:
                words.append(run)
            elif run:
                # an unknown run goes to the HMM; a run that is a dictionary word is kept as characters
                words.extend(run if run.encode() in _JIEBA_WORDS else hmm(run))
            run = ""
            if word is not None:
                words.append(word)
    return words


_SEGMENTED = {}


def _segment(text):
    """jieba segmentation joined by spaces, as LawBench feeds rouge_chinese (cached: references
    repeat across models)."""
    out = _SEGMENTED.get(text)
    if out is None:
        out = _SEGMENTED[text] = " ".join(jieba_words(text))
    return out


def rouge_l(predictions, references):
    """Per-item ROUGE-L F of jieba-segmented text, as LawBench computes it with rouge_chinese:
    rouge_chinese's own sentence splitting and word lists, summary-level LCS, its F formula.
    Only the LCS length is computed by rapidfuzz (bit-parallel C++) instead of rouge_chinese's
    dictionary-based table, which makes the long answers of 3-8 a hundred times faster; the
    equality with rouge_chinese's numbers is checked in tests/test_metrics.py.
    An empty prediction becomes "无内容", as in LawBench. A text rouge_chinese refuses (no
    sentence left after splitting) would crash LawBench's batch call; we score that item 0 and
    report it."""
    from rapidfuzz.distance import LCSseq
    from rouge_chinese import Rouge
    cut = Rouge(metrics=["rouge-l"]).cut_sent
    scores, errors = [], []
    for i, (pred, ref) in enumerate(zip(predictions, references, strict=True)):
        hyp = _segment(pred)
        if hyp.strip() == "":
            hyp = "无内容"
        hyp_sents = [" ".join(s.split()) for s in cut(hyp) if len(s) > 0]
        ref_sents = [" ".join(s.split()) for s in cut(_segment(ref)) if len(s) > 0]
        if not hyp_sents or not ref_sents:
            scores.append(0.0)
            errors.append((i, "rouge_chinese finds no sentence in the prediction or reference; scored 0"))
            continue
        hyp_words = [w for s in hyp_sents for w in s.split(" ")]
        ref_words = [w for s in ref_sents for w in s.split(" ")]
        lcs = LCSseq.similarity(ref_words, hyp_words)
        recall, precision = lcs / len(ref_words), lcs / len(hyp_words)
        scores.append(2.0 * ((precision * recall) / (precision + recall + 1e-8)))
    return scores, errors


def cn2an_transform(text):
    """Chinese numerals -> Arabic, with cn2an as LawBench uses it (cached: it is slow and
    predictions repeat). A text with none of the characters a Chinese numeral needs is returned
    as is, without calling cn2an: each of its patterns (dates, fractions, percentages, degrees,
    numbers) matches only around a numeral or unit character (or 廿 半 两, which it rewrites
    first), so on such a text it changes nothing -- yet it costs a regex callback per character."""
    if text not in _CN2AN_CACHE:
        import warnings

        import cn2an
        if not _CN2AN_CHARS:
            numerals = cn2an.Transform()
            _CN2AN_CHARS.update(numerals.all_num + numerals.all_unit + "廿半两")
        if _CN2AN_CHARS.isdisjoint(text):
            _CN2AN_CACHE[text] = text
        else:
            with warnings.catch_warnings():  # it warns about every malformed numeral it leaves as is
                warnings.simplefilter("ignore", UserWarning)
                _CN2AN_CACHE[text] = cn2an.transform(text, "cn2an")
    return _CN2AN_CACHE[text]


_CN2AN_CACHE = {}
_CN2AN_CHARS = set()  # characters some cn2an pattern needs


# ----------------------------------------------------------------------------------------------
# Per-task scorers. Each takes a list of items (dicts with "prompt", "prediction", "refr", "id")
# and returns {"score": 0..1, "abstention_rate": float or None, "errors": [(id, message)]}.
# `abstention_rate` is None where LawBench's results.csv has no abstention for the task.

def _choice_task(items, options, answer_of):
    correct, abstained, errors, scored = 0, 0, [], 0
    for it in items:
        try:
            answer = answer_of(it["refr"])
        except ReferenceError_ as exc:
            errors.append((it["id"], str(exc)))
            continue
        if answer is None:  # an item LawBench itself leaves out
            continue
        ok, abst = multi_choice(it["prediction"], options, answer)
        correct += ok
        abstained += abst
        scored += 1
    # LawBench divides abstentions by all items, accuracy by the items it scored.
    return {"score": correct / scored if scored else 0.0,
            "abstention_rate": abstained / len(items) if items else 0.0, "errors": errors}


def _letter_after(prefix, position):
    def answer_of(refr):
        if not refr.startswith(prefix) or len(refr) <= position or refr[position] not in "ABCDE":
            raise ReferenceError_(f"reference {refr!r} does not start with {prefix!r} + option letter")
        return refr[position]
    return answer_of


def score_1_2(items):  # 知识问答 (JEC-QA knowledge): "正确答案：B。"
    return _choice_task(items, ["A", "B", "C", "D"], _letter_after("正确答案：", 5))


def score_3_6(items):  # 案例分析 (JEC-QA case analysis): "正确答案:C。" (ASCII colon)
    return _choice_task(items, ["A", "B", "C", "D"], _letter_after("正确答案:", 5))


def score_2_8(items):  # 论点挖掘: "[正确答案]C<eoa>"
    return _choice_task(items, ["A", "B", "C", "D", "E"], _letter_after("[正确答案]", 6))


DISPUTE_FOCI = ["诉讼主体", "租金情况", "利息", "本金争议", "责任认定", "责任划分", "损失认定及处理",
                "原审判决是否适当", "合同效力", "财产分割", "责任承担", "鉴定结论采信问题", "诉讼时效", "违约",
                "合同解除", "肇事逃逸"]


def score_2_2(items):  # 纠纷焦点识别: "争议焦点类别：责任认定。"
    def answer_of(refr):
        focus = refr[7:-1]
        if focus == "赔偿":  # a label outside the option list; LawBench skips these items
            return None
        if not refr.startswith("争议焦点类别：") or focus not in DISPUTE_FOCI:
            raise ReferenceError_(f"reference {refr!r} is not '争议焦点类别：<focus>。'")
        return focus
    return _choice_task(items, DISPUTE_FOCI, answer_of)


ISSUE_TOPICS = ["婚姻家庭", "劳动纠纷", "交通事故", "债权债务", "刑事辩护", "合同纠纷", "房产纠纷", "侵权", "公司法",
                "医疗纠纷", "拆迁安置", "行政诉讼", "建设工程", "知识产权", "综合咨询", "人身损害", "涉外法律",
                "海事海商", "消费权益", "抵押担保"]


def score_2_4(items):  # 问题主题识别: the reference is the bare topic
    def answer_of(refr):
        if refr not in ISSUE_TOPICS:
            raise ReferenceError_(f"reference {refr!r} is not one of the 20 topics")
        return refr
    return _choice_task(items, ISSUE_TOPICS, answer_of)


def _label_f1_task(items, options, gold_of):
    """Multi-label tasks: the labels whose names occur in the prediction vs the gold labels."""
    scores, abstained, errors = [], 0, []
    for it in items:
        try:
            gold = gold_of(it["refr"])
        except ReferenceError_ as exc:
            errors.append((it["id"], str(exc)))
            continue
        found = {opt for opt in options if opt in it["prediction"]}
        abstained += not found
        scores.append(set_f1(found, gold))
    return {"score": sum(scores) / len(scores) if scores else 0.0,
            "abstention_rate": abstained / len(items) if items else 0.0, "errors": errors}


MARITAL_LABELS = ["婚后有子女", "限制行为能力子女抚养", "有夫妻共同财产", "支付抚养费", "不动产分割", "婚后分局",
                  "二次起诉离婚", "按月给付抚养费", "准予离婚", "有夫妻共同债务", "婚前个人财产", "法定离婚",
                  "不履行家庭义务", "存在非婚生子", "适当帮助", "不履行离婚协议", "损害赔偿", "感情不和分居满二年",
                  "子女随非抚养权人生活", "婚后个人财产"]


def score_2_3(items):  # 婚姻纠纷鉴定: "类别:婚后有子女、限制行为能力子女抚养。"
    def gold_of(refr):
        labels = refr[3:-1].split("、")
        if (not (refr.startswith("类别:") and refr.endswith("。")) or
                any(label not in MARITAL_LABELS for label in labels)):
            raise ReferenceError_(f"reference {refr!r} is not '类别:<label>、...。' with known labels")
        return set(labels)
    return _label_f1_task(items, MARITAL_LABELS, gold_of)


EVENT_TYPES = ["支付/给付", "欺骗", "搜查/扣押", "要求/请求", "卖出", "买入", "获利", "拘捕", "鉴定", "同意/接受",
               "供述", "联络", "帮助/救助", "租用/借用", "受伤", "伪造", "卖淫", "伤害人身", "赔偿", "归还/偿还"]


def score_2_9(items):  # 事件检测: "支付/给付;欺骗"
    return _label_f1_task(items, EVENT_TYPES, lambda refr: set(refr.split(";")))


CHARGES = [
    "侮辱", "违法发放贷款", "失火", "票据诈骗", "帮助犯罪分子逃避处罚", "重大责任事故", "对非国家工作人员行贿",
    "非法制造、销售非法制造的注册商标标识", "非法制造、买卖、运输、邮寄、储存枪支、弹药、爆炸物",
    "非法获取公民个人信息", "扰乱无线电通讯管理秩序", "非法持有、私藏枪支、弹药", "拒不执行判决、裁定", "虚开发票",
    "巨额财产来源不明", "组织、领导、参加黑社会性质组织", "非法获取国家秘密", "以危险方法危害公共安全", "非法持有毒品",
    "聚众扰乱公共场所秩序、交通秩序", "包庇毒品犯罪分子", "滥伐林木", "伪造公司、企业、事业单位、人民团体印章",
    "非法占用农用地", "走私废物", "串通投标", "非法采伐、毁坏国家重点保护植物", "冒充军人招摇撞骗", "玩忽职守",
    "重婚", "招收公务员、学生徇私舞弊", "组织、领导传销活动", "非法猎捕、杀害珍贵、濒危野生动物", "侵犯著作权",
    "非法种植毒品原植物", "伪造、变造、买卖武装部队公文、证件、印章", "倒卖文物", "伪造、变造居民身份证", "滥用职权",
    "诽谤", "猥亵儿童", "非法转让、倒卖土地使用权", "挪用公款", "污染环境", "出售、购买、运输假币", "敲诈勒索",
    "高利转贷", "故意伤害", "持有、使用假币", "单位受贿", "强奸", "引诱、容留、介绍卖淫", "虐待",
    "生产、销售伪劣农药、兽药、化肥、种子", "妨害公务", "容留他人吸毒", "拐骗儿童", "强制猥亵、侮辱妇女",
    "非法处置查封、扣押、冻结的财产", "骗取贷款、票据承兑、金融票证", "强迫他人吸毒", "非法拘禁",
    "非法携带枪支、弹药、管制刀具、危险物品危及公共安全", "绑架", "聚众斗殴", "破坏计算机信息系统",
    "制造、贩卖、传播淫秽物品", "虐待被监管人", "贷款诈骗", "赌博", "徇私舞弊不征、少征税款",
    "盗窃、抢夺枪支、弹药、爆炸物、危险物质", "故意杀人", "介绍贿赂", "提供侵入、非法控制计算机信息系统程序、工具",
    "编造、故意传播虚假恐怖信息", "妨害作证", "强迫卖淫", "走私、贩卖、运输、制造毒品", "伪证", "拐卖妇女、儿童",
    "过失损坏武器装备、军事设施、军事通信", "破坏广播电视设施、公用电信设施", "洗钱", "职务侵占", "倒卖车票、船票",
    "抢劫", "侵占", "掩饰、隐瞒犯罪所得、犯罪所得收益", "徇私舞弊不移交刑事案件", "引诱、教唆、欺骗他人吸毒", "遗弃",
    "生产、销售伪劣产品", "放火", "非法采矿", "对单位行贿", "盗窃、抢夺枪支、弹药、爆炸物", "破坏易燃易爆设备",
    "妨害信用卡管理", "制作、复制、出版、贩卖、传播淫秽物品牟利", "金融凭证诈骗", "私分国有资产",
    "走私国家禁止进出口的货物、物品", "假冒注册商标", "危险物品肇事", "走私普通货物、物品", "经济犯", "虚报注册资本",
    "盗掘古文化遗址、古墓葬", "传播淫秽物品", "窝藏、包庇", "拒不支付劳动报酬", "行贿", "开设赌场", "传授犯罪方法",
    "协助组织卖淫", "保险诈骗", "破坏生产经营", "破坏交通设施", "打击报复证人", "非法侵入住宅", "非国家工作人员受贿",
    "过失致人重伤", "伪造、变造金融票证", "窝藏、转移、隐瞒毒品、毒赃", "帮助毁灭、伪造证据",
    "走私珍贵动物、珍贵动物制品", "生产、销售假药", "逃税", "挪用特定款物", "聚众扰乱社会秩序",
    "组织、强迫、引诱、容留、介绍卖淫", "合同诈骗", "非法生产、销售间谍专用器材", "破坏交通工具", "传播性病",
    "强迫交易", "隐匿、故意销毁会计凭证、会计帐簿、财务会计报告", "非法组织卖血", "强迫劳动", "破坏电力设备",
    "销售假冒注册商标的商品", "收买被拐卖的妇女、儿童", "诬告陷害", "脱逃", "非法经营", "徇私枉法", "信用卡诈骗",
    "生产、销售不符合安全标准的食品", "非法行医", "伪造货币", "动植物检疫徇私舞弊", "单位行贿", "破坏监管秩序", "盗窃",
    "盗伐林木", "重大劳动安全事故", "非法吸收公众存款", "非法制造、出售非法制造的发票", "非法狩猎", "组织卖淫",
    "非法买卖、运输、携带、持有毒品原植物种子、幼苗", "挪用资金", "诈骗", "伪造、变造、买卖国家机关公文、证件、印章",
    "持有伪造的发票", "贪污", "非法生产、买卖警用装备", "投放危险物质", "伪造、倒卖伪造的有价票证", "集资诈骗", "抢夺",
    "生产、销售有毒、有害食品", "非法捕捞水产品", "过失致人死亡", "非法买卖制毒物品",
    "虚开增值税专用发票、用于骗取出口退税、抵扣税款发票", "寻衅滋事", "危险驾驶", "故意毁坏财物", "招摇撞骗",
    "盗窃、侮辱尸体", "走私武器、弹药", "非法收购、运输、加工、出售国家重点保护植物、国家重点保护植物制品",
    "非法出售发票", "劫持船只、汽车", "受贿", "聚众哄抢", "交通肇事"]


def score_3_3(items):  # 罪名预测: "罪名:盗窃;诈骗". Charge names are matched as substrings, as in LawBench
    # (so a prediction of "抢劫" also "mentions" nothing else, but "盗窃、抢夺枪支..." mentions 盗窃 too).
    def gold_of(refr):
        if not refr.startswith("罪名:"):
            raise ReferenceError_(f"reference {refr!r} does not start with '罪名:'")
        return set(refr.replace("罪名:", "").split(";"))
    return _label_f1_task(items, CHARGES, gold_of)


def score_3_1(items):  # 法条预测(基于事实): "法条:刑法第264条、第67条" -> article numbers
    scores, abstained, errors = [], 0, []
    for it in items:
        refr = it["refr"]
        numbers = refr.replace("法条:刑法第", "").replace("条", "").split("、")
        if (not (refr.startswith("法条:刑法第") and refr.endswith("条")) or
                not all(n.isdigit() and int(n) <= 490 for n in numbers)):
            errors.append((it["id"], f"reference {refr!r} is not '法条:刑法第<n>条、...' with n <= 490"))
            continue
        predicted = set()
        # Each "、"-separated chunk contributes at most its first number, after dropping "第..款"
        # (paragraph numbers) and unwrapping "第...条" so cn2an sees the bare numeral.
        for chunk in it["prediction"].split("、"):
            chunk = chunk.replace("万元", "元")
            chunk = re.sub(r"第(.*?)款", "", chunk)
            chunk = re.sub(r"第(.*?)条", lambda m: m.group(1), chunk)
            digits = re.findall(r"\d+", cn2an_transform(chunk))
            if digits:
                predicted.add(int(digits[0]))
        abstained += not predicted
        scores.append(set_f1(predicted, {int(n) for n in numbers}))
    return {"score": sum(scores) / len(scores) if scores else 0.0,
            "abstention_rate": abstained / len(items) if items else 0.0, "errors": errors}


LOG_216 = math.log(216)  # 18 years in months + 1: the largest distance LawBench counts


def score_prison_term(items):  # 3-4 / 3-5 刑期预测: "刑期:12个月" vs the first month/year figure predicted
    distances, abstained, errors = [], 0, []
    for it in items:
        refr = it["refr"]
        if "死刑" in refr or "无期" in refr:  # death / life sentences: LawBench skips them
            continue
        months = refr.replace("刑期:", "").replace("个月", "")
        if not (refr.startswith("刑期:") and refr.endswith("个月") and months.isdigit()):
            errors.append((it["id"], f"reference {refr!r} is not '刑期:<n>个月'"))
            continue
        pred = cn2an_transform(it["prediction"])
        # "个月" figures first, then "月" figures (which re-match the same numbers), then years.
        month_figures = ([int(x[:-2]) for x in re.findall(r"\d+个月", pred)] +
                         [int(x[:-1]) for x in re.findall(r"\d+月", pred)])
        year_figures = [int(x[:-1]) for x in re.findall(r"\d+年", pred)]
        if month_figures:
            guess = month_figures[0]
        elif year_figures:
            guess = year_figures[0] * 12
        else:
            abstained += 1
            distances.append(LOG_216)
            continue
        distances.append(abs(math.log(int(months) + 1) - math.log(guess + 1)))
    mean = sum(distances) / len(distances) if distances else LOG_216
    return {"score": (LOG_216 - mean) / LOG_216,
            "abstention_rate": abstained / len(items) if items else 0.0, "errors": errors}


def score_3_7(items):  # 犯罪金额计算: right iff the exact amount appears among the numbers predicted
    correct, abstained, errors = 0, 0, []
    for it in items:
        refr = it["refr"]
        amount = refr.replace("上文涉及到的犯罪金额:", "").replace("元。", "")
        try:
            if (not (refr.startswith("上文涉及到的犯罪金额:") and refr.endswith("元。")) or
                    "千元" in refr or "万" in refr):
                raise ValueError
            amount = float(amount)
        except ValueError:
            errors.append((it["id"], f"reference {refr!r} is not '上文涉及到的犯罪金额:<number>元。'"))
            continue
        numbers = [float(x) for x in re.findall(r"\d+\.?\d*", it["prediction"])]
        abstained += not numbers
        correct += amount in numbers
    return {"score": correct / len(items) if items else 0.0,
            "abstention_rate": abstained / len(items) if items else 0.0, "errors": errors}


def _rouge_task(items, strip=None):
    refs = [it["refr"].replace(strip, "") if strip else it["refr"] for it in items]
    scores, errors = rouge_l([it["prediction"] for it in items], refs)
    return {"score": sum(scores) / len(scores) if scores else 0.0, "abstention_rate": None,
            "errors": [(items[i]["id"], msg) for i, msg in errors]}


def score_1_1(items):  # 法条背诵: ROUGE-L against the article text ("答案:" prefix removed)
    return _rouge_task(items, strip="答案:")


def score_rouge(items):  # 2-7 舆情摘要, 3-2 法条预测(基于场景), 3-8 咨询
    return _rouge_task(items)


def score_2_5(items):  # 阅读理解: character F1 against the answer ("回答:" removed)
    scores = [char_f1(it["refr"].replace("回答:", ""), it["prediction"]) for it in items]
    return {"score": sum(scores) / len(scores) if scores else 0.0, "abstention_rate": None, "errors": []}


NER_TYPES = ["犯罪嫌疑人", "受害人", "被盗货币", "物品价值", "盗窃获利", "被盗物品", "作案工具", "时间", "地点",
             "组织机构"]


def _predicted_entities(pred):
    """Entities written as "<type>:<value>" or "<type>：<value>"; the value runs to the next space or
    newline; "无"/"未提及" mean none. A later mention of a type overrides an earlier one, and a
    type name within 2 characters of the end is ignored (LawBench's rule)."""
    found = {}
    for etype in NER_TYPES:
        for m in re.finditer(etype, pred):
            end = m.end()
            if end >= len(pred) - 2 or pred[end] not in ":：":
                continue
            value = re.split("\n| ", pred[end + 1:].strip())[0].strip()
            if value not in ("无", "未提及"):
                found[etype] = value
    return found


def score_2_6(items):  # 命名实体识别: soft F1 = char-F1 of each predicted value vs the gold value
    total = 0.0
    for it in items:
        gold = dict(seg.split(":")[:2] for seg in it["refr"].split(";")) if it["refr"].strip() else {}
        pred = _predicted_entities(it["prediction"])
        if not gold:
            total += not pred
            continue
        matched = [char_f1(gold[t], v) for t, v in pred.items() if t in gold]
        precision = sum(matched) / len(pred) if pred else 0
        recall = sum(matched) / len(gold)
        total += 2 * precision * recall / (precision + recall + 1e-10)
    # LawBench computes an abstention rate here but returns it under a misspelt key, so its
    # results.csv always shows 0; we report none rather than a number nobody publishes.
    return {"score": total / len(items) if items else 0.0, "abstention_rate": None, "errors": []}


def score_2_10(items):  # 触发词提取: soft F1 of ";"-separated triggers, compared position by position
    total = 0.0
    for it in items:
        golds, preds = it["refr"].split(";"), it["prediction"].split(";")
        # as LawBench: position by position, the extra triggers of the longer list unmatched
        matched = [char_f1(g, p) for g, p in zip(golds, preds, strict=False)]
        precision, recall = sum(matched) / len(preds), sum(matched) / len(golds)
        total += 2 * precision * recall / (precision + recall + 1e-10)
    return {"score": total / len(items) if items else 0.0, "abstention_rate": None, "errors": []}


# ----------------------------------------------------------------------------------------------
# Task 2-1 (文件校对, document proofreading): ChERRANT's char-level span-based F0.5, in cherrant.py.

def cherrant_prepare(prompt, prediction, reference):
    """Source, prediction and reference strings exactly as LawBench feeds them to ChERRANT."""
    start = prompt.index("句子：\n") + 4
    source = re.sub(r"\n|\t", "", prompt[start:].split("\n")[0])
    # "\r" would split the line in upstream's text files (and crash its comparison); treat it
    # like the other line breaks instead.
    pred = re.sub(r"\n|\t|\r", "", prediction)
    if len(pred) - len(reference) > 5:  # truncate predictions >5 characters longer than the reference
        pred = pred[:len(reference) + 5]
    if len(pred) == 0:
        pred = "无内容"
    ref = re.sub(r"\n|\t|\r", "", reference)
    t2s = cherrant_resources()["t2s"]
    # Whitespace is removed everywhere; only corrections are converted to simplified Chinese.
    return "".join(source.split()), t2s.convert("".join(pred.split())), t2s.convert("".join(ref.split()))



_EDITS = {}  # (source, target) -> edits, for every pair annotated in this process


def score_2_1(items):
    tp = fp = fn = 0
    errors, prepared = [], []
    for it in items:
        try:
            prepared.append((it["id"], *cherrant_prepare(it["prompt"], it["prediction"], it["refr"])))
        except ValueError:
            errors.append((it["id"], "prompt has no '句子：\\n' marker, so the source sentence is unknown"))
    # Annotate every reference and prediction in one batch: aligning many pairs together is
    # faster than one by one (cherrant.cherrant_align_many). The cache spans calls, since every
    # model is scored against the same references (and a prediction equal to one costs nothing).
    pairs = [(source, ref) for _, source, _, ref in prepared] + [(source, pred) for _, source, pred, _ in prepared]
    edits = cherrant_edits_many(pairs, cache=_EDITS)
    refs, hyps = edits[:len(prepared)], edits[len(prepared):]
    for (item_id, source, _, _), hyp_edits, ref_edits in zip(prepared, hyps, refs, strict=True):
        if hyp_edits is None or ref_edits is None:  # an empty source sentence: upstream crashes, we report it
            errors.append((item_id, f"ChERRANT cannot annotate source {source!r}"))
            continue
        t, f, n = compare_edits(hyp_edits, ref_edits)
        tp, fp, fn = tp + t, fp + f, fn + n
    return {"score": f_beta(tp, fp, fn), "abstention_rate": None, "errors": errors}


SCORERS = {
    "1-1": score_1_1, "1-2": score_1_2, "2-1": score_2_1, "2-2": score_2_2, "2-3": score_2_3,
    "2-4": score_2_4, "2-5": score_2_5, "2-6": score_2_6, "2-7": score_rouge, "2-8": score_2_8,
    "2-9": score_2_9, "2-10": score_2_10, "3-1": score_3_1, "3-2": score_rouge, "3-3": score_3_3,
    "3-4": score_prison_term, "3-5": score_prison_term, "3-6": score_3_6, "3-7": score_3_7,
    "3-8": score_rouge,
}


# ----------------------------------------------------------------------------------------------
# Reading prediction files. Nothing is dropped silently: every problem is reported with the file
# and item id, and counted in scores.json.

def prompt_text(origin_prompt):
    """LawBench stores the prompt as a string or as [{"role": "HUMAN", "prompt": ...}]."""
    if isinstance(origin_prompt, list) and origin_prompt and isinstance(origin_prompt[0], dict):
        return str(origin_prompt[0].get("prompt", ""))
    return origin_prompt if isinstance(origin_prompt, str) else ""


def load_prediction_file(path):
    """Read one LawBench prediction file. Returns (items, problems, n_unscorable).

    Raises ValueError (naming the file) when the file is not a JSON object at all. Items whose
    prediction is missing, null or not text are scored as empty answers (wrong, and abstentions
    where LawBench counts them); items without a reference cannot be scored and are counted."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read as JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object {{\"0\": {{...}}, ...}}, found {type(data).__name__}")
    items, problems, unscorable = [], [], 0
    ids = []
    for key in data:
        if isinstance(key, str) and key.isdigit():
            ids.append(int(key))
        else:
            problems.append(f"{path}: key {key!r} is not an item id; ignored")
            unscorable += 1
    ids.sort()
    gaps = sorted(set(range(len(ids))) - set(ids))
    if gaps:
        problems.append(f"{path}: item ids are not 0..{len(ids) - 1} "
                        f"(missing {gaps[:10]}{'...' if len(gaps) > 10 else ''}); "
                        "LawBench's scorer would stop here, we score the items present")
    for i in ids:
        raw = data[str(i)]
        if not isinstance(raw, dict) or not isinstance(raw.get("refr"), str):
            problems.append(f"{path}: item {i}: no reference answer ('refr'); cannot be scored")
            unscorable += 1
            continue
        pred = raw.get("prediction")
        if not isinstance(pred, str):
            problems.append(f"{path}: item {i}: {'missing' if pred is None else 'non-text'} prediction; "
                            "scored as an empty answer")
            pred = ""
        elif not pred.strip():
            problems.append(f"{path}: item {i}: empty prediction; scored as an empty answer")
        items.append({"id": i, "prompt": prompt_text(raw.get("origin_prompt")), "prediction": pred,
                      "refr": raw["refr"]})
    return items, problems, unscorable


def find_models(pred_dir, setting):
    """{model: folder} for DIR/<model>/<task>.json, DIR/<setting>/<model>/<task>.json or a single
    model folder DIR/<task>.json."""
    def has_tasks(folder):
        return any(name[:-5] in TASKS for name in os.listdir(folder) if name.endswith(".json"))

    if not os.path.isdir(pred_dir):
        return {}
    if setting and os.path.isdir(os.path.join(pred_dir, setting)):
        pred_dir = os.path.join(pred_dir, setting)
    if has_tasks(pred_dir):
        return {os.path.basename(os.path.normpath(pred_dir)): pred_dir}
    models = {}
    for name in sorted(os.listdir(pred_dir)):
        folder = os.path.join(pred_dir, name)
        if not name.startswith(".") and os.path.isdir(folder) and has_tasks(folder):
            models[name] = folder
    return models


def score_file(job):
    """Score one (model, task, path) job; runs in a worker process."""
    model, task, path = job
    started = time.time()
    try:
        items, problems, unscorable = load_prediction_file(path)
    except ValueError as exc:
        return {"model": model, "task": task, "score": None, "abstention_rate": None, "n_items": 0,
                "n_unscorable": 0, "problems": [str(exc)], "seconds": time.time() - started}
    result = SCORERS[task](items)
    for item_id, message in result["errors"]:
        problems.append(f"{path}: item {item_id}: {message}")
    return {"model": model, "task": task, "score": 100.0 * result["score"] if items else None,
            "abstention_rate": result["abstention_rate"], "n_items": len(items),
            "n_unscorable": unscorable + len(result["errors"]), "problems": problems,
            "seconds": time.time() - started}


def averages(task_scores):
    """Mean score per cognitive level and overall (LawBench's AVG), over the tasks present."""
    present = {t: s for t, s in task_scores.items() if s is not None}
    out = {}
    for level, name in LEVELS.items():
        vals = [s for t, s in present.items() if t.startswith(level + "-")]
        out[name] = sum(vals) / len(vals) if vals else None
    out["overall"] = sum(present.values()) / len(present) if present else None
    out["n_tasks"] = len(present)
    return out


def score_predictions(pred_dir, setting=None, models=None, tasks=None, num_proc=None, progress=True):
    """Score every model under pred_dir. Returns the scores.json structure."""
    found = find_models(pred_dir, setting)
    if models:
        missing = [m for m in models if m not in found]
        if missing:
            fail(f"no predictions for model(s) {missing} under {pred_dir} (found: {sorted(found)})")
        found = {m: found[m] for m in models}
    wanted = sorted(tasks or TASKS, key=task_sort_key)
    jobs, report = [], {}
    for model, folder in found.items():
        report[model] = {"folder": folder, "tasks": {}, "missing_tasks": [], "problems": []}
        for name in sorted(os.listdir(folder)):
            if name.endswith(".json") and name[:-5] not in TASKS and not name.startswith("."):
                report[model]["problems"].append(f"{os.path.join(folder, name)}: not a LawBench task id; ignored")
        for task in wanted:
            path = os.path.join(folder, f"{task}.json")
            if os.path.isfile(path):
                jobs.append((model, task, path))
            else:
                report[model]["missing_tasks"].append(task)
                report[model]["problems"].append(f"{path}: missing; task {task} not scored")
    if not jobs:
        return None
    # Task 2-1 is by far the slowest: start those first so the pool stays busy.
    jobs.sort(key=lambda j: (j[1] != "2-1", task_sort_key(j[1])))
    num_proc = max(1, min(num_proc or os.cpu_count() or 1, len(jobs)))
    from tqdm import tqdm
    bar = tqdm(total=len(jobs), desc="scoring", unit="file", disable=not progress, file=sys.stderr)
    pool = ProcessPoolExecutor(num_proc) if num_proc > 1 else None
    results = []
    try:
        for res in (pool.map if pool else map)(score_file, jobs):
            results.append(res)
            bar.update()
    finally:
        if pool:
            pool.shutdown()
    bar.close()
    for res in results:
        model = res.pop("model")
        task = res.pop("task")
        report[model]["problems"].extend(res.pop("problems"))
        report[model]["tasks"][task] = res
    for entry in report.values():
        entry["tasks"] = dict(sorted(entry["tasks"].items(), key=lambda kv: task_sort_key(kv[0])))
        entry["averages"] = averages({t: r["score"] for t, r in entry["tasks"].items()})
    return {"setting": setting, "predictions": os.path.abspath(pred_dir), "models": report}


# ----------------------------------------------------------------------------------------------
# Output

def _fmt(x, digits=2):
    return "-" if x is None else f"{x + 0.0:.{digits}f}"  # + 0.0: -0.0 prints as 0.00


def markdown_tables(report):
    models = list(report["models"])
    head = "| Task | Name | Metric | " + " | ".join(models) + " |\n"
    rule = "| :-- | :-- | :-- | " + " | ".join(":--:" for _ in models) + " |\n"
    lines = ["## Scores (0-100)\n\n", head, rule]
    avg_rows = [("AVG", "overall"), ("AVG 1-x", "memorization"), ("AVG 2-x", "understanding"),
                ("AVG 3-x", "application")]
    for label, key in avg_rows:
        cells = [_fmt(report["models"][m]["averages"][key]) for m in models]
        lines.append(f"| **{label}** | {key} | mean | " + " | ".join(cells) + " |\n")
    lines.append("| tasks scored | | | " +
                 " | ".join(str(report["models"][m]["averages"]["n_tasks"]) for m in models) + " |\n")
    tasks = sorted({t for m in models for t in report["models"][m]["tasks"]}, key=task_sort_key)
    for t in tasks:
        cells = [_fmt(report["models"][m]["tasks"].get(t, {}).get("score")) for m in models]
        lines.append(f"| {t} | {TASKS[t][0]} | {TASKS[t][2]} | " + " | ".join(cells) + " |\n")
    lines += ["\n## Abstention rate (%)\n\n", head, rule]
    for t in tasks:
        rates = [report["models"][m]["tasks"].get(t, {}).get("abstention_rate") for m in models]
        if all(r is None for r in rates):
            continue
        cells = [_fmt(None if r is None else 100 * r) for r in rates]
        lines.append(f"| {t} | {TASKS[t][0]} | {TASKS[t][2]} | " + " | ".join(cells) + " |\n")
    return "".join(lines)


def write_csv(report, f):
    rows = [["setting", "model", "task", "name", "metric", "score", "abstention_rate", "n_items", "n_unscorable"]]
    for model, entry in report["models"].items():
        for task, r in entry["tasks"].items():
            rows.append([report["setting"] or "", model, task, TASKS[task][0], TASKS[task][2],
                         "" if r["score"] is None else repr(r["score"]),
                         "" if r["abstention_rate"] is None else repr(r["abstention_rate"]),
                         r["n_items"], r["n_unscorable"]])
    import io
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    f.write(buf.getvalue().encode("utf-8"))


def plot_scores(report, f):
    plt = pyplot()
    models = list(report["models"])
    tasks = sorted({t for m in models for t in report["models"][m]["tasks"]}, key=task_sort_key)
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(tasks) * max(1, len(models)) ** 0.5 + 3), 4.5))
    for k, model in enumerate(models):
        ys = [report["models"][model]["tasks"].get(t, {}).get("score") or 0.0 for t in tasks]
        xs = [i + (k - (len(models) - 1) / 2) * width for i in range(len(tasks))]
        avg = report["models"][model]["averages"]["overall"]
        ax.bar(xs, ys, width=width, label=f"{model} (AVG {_fmt(avg)})")
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels(tasks)
    ax.set_ylabel("score (0-100)")
    ax.set_ylim(0, 100)
    ax.set_title(f"LawBench {report['setting'] or ''}".strip())
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=min(3, len(models)))
    fig.tight_layout()
    fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def write_outputs(report, out_dir):
    write_json(os.path.join(out_dir, "scores.json"), report)
    atomic_write(os.path.join(out_dir, "scores.csv"), lambda f: write_csv(report, f))
    atomic_write(os.path.join(out_dir, "scores.png"), lambda f: plot_scores(report, f))


# ----------------------------------------------------------------------------------------------
# Command line

def parse_tasks(spec):
    """--tasks "1-1,3-3" -> ["1-1", "3-3"]; None when not given (all tasks)."""
    tasks = spec.split(",") if spec else None
    unknown = [t for t in tasks or [] if t not in TASKS]
    if unknown:
        fail(f"unknown task id(s) {unknown}; LawBench tasks are {', '.join(TASKS)}")
    return tasks


def cmd_score(args):
    started = time.time()
    tasks = parse_tasks(args.tasks)
    report = score_predictions(args.predictions, args.setting, args.models.split(",") if args.models else None,
                               tasks, args.num_proc, progress=not args.quiet)
    if report is None:
        log(f"error: no LawBench prediction files (<task>.json) found under {args.predictions} "
            f"(expected DIR/<model>/<task>.json or DIR/{args.setting or '<setting>'}/<model>/<task>.json)")
        return 2
    problems = [p for entry in report["models"].values() for p in entry["problems"]]
    if problems:
        log(f"{len(problems)} input problem(s); the first ones (all are in scores.json):")
        for p in problems[:args.show_problems]:
            log("  " + p)
    write_outputs(report, args.out)
    print(markdown_tables(report))
    n_files = sum(len(e["tasks"]) for e in report["models"].values())
    log(f"Scored {n_files} task files of {len(report['models'])} model(s) in {time.time() - started:.1f} s; "
        f"wrote {os.path.join(args.out, 'scores.json')}, scores.csv, scores.png")
    return 0


# ----------------------------------------------------------------------------------------------
# Generation


def lawbench_prompt(item):
    """What LawBench puts before a model: the instruction, a newline, the question (exactly the
    `origin_prompt` of its published predictions, which task 2-1's metric reads back)."""
    return item["instruction"] + "\n" + item["question"]


def load_lawbench_task(data_dir, setting, task):
    path = os.path.join(data_dir, setting, f"{task}.json")
    try:
        with open(path, encoding="utf-8") as f:
            items = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        fail(f"{path}: cannot read LawBench task file ({exc})")
    for i, it in enumerate(items if isinstance(items, list) else [None]):
        if (not isinstance(it, dict) or
                not all(isinstance(it.get(k), str) for k in ("instruction", "question", "answer"))):
            fail(f"{path}: item {i} is not {{instruction, question, answer}} text")
    return items


def read_partial(path):
    """{item id: prediction} from a task's append-only progress file. A line torn by a kill is
    the last one; it is ignored and that item generated again."""
    done = {}
    for i, pred in read_jsonl_map(path, "id", "prediction").items():
        try:
            done[int(i)] = pred
        except (TypeError, ValueError):
            pass
    return done


def read_partials(partial_dir, task, n_items):
    """{item id: prediction} from every rank's progress file of a task (<task>.jsonl, and
    <task>.rank<r>.jsonl under torchrun: common.rank_file; a run may resume on another number of
    processes, or through a server)."""
    done = {}
    for path in rank_files(os.path.join(partial_dir, f"{task}.jsonl")):
        done.update(read_partial(path))
    return {i: p for i, p in done.items() if i < n_items}


def generate_task(reply_fn, prompts, done, partial_path, bar, only=None):
    """Replies for the prompts not in `done` (and in `only`: this rank's share), appended to
    partial_path batch by batch. reply_fn(prompts, todo, on_batch) is the local model's greedy
    generation (or CMMLU's perplexity choice). Returns the number of prompts truncated to fit."""
    todo = [i for i in range(len(prompts)) if i not in done and (only is None or i in only)]
    with open_jsonl_append(partial_path) as out:
        def on_batch(replies):
            done.update(replies)
            append_jsonl(out, [{"id": i, "prediction": text} for i, text in replies])
            bar.update(len(replies))
        return reply_fn(prompts, todo, on_batch)


def generate_task_api(client, model_name, prompts, done, partial_path, todo, concurrency, max_new_tokens, bar):
    """generate_task through an OpenAI-compatible server: the server applies the model's chat
    template and stops at its end of turn; replies are appended as they arrive, in any order."""
    with open_jsonl_append(partial_path) as out:
        def on_reply(i, text):
            done[i] = text
            append_jsonl(out, [{"id": i, "prediction": text}])
            bar.update(1)
        chat_replies(client, model_name, prompts, todo, max_new_tokens, concurrency, on_reply)


def origin_prompt(prompt):
    """A prompt as OpenCompass's prediction files record it: a list of HUMAN/BOT turns (a single
    string is one HUMAN turn; CMMLU's perplexity candidates are kept as {label: text})."""
    if isinstance(prompt, str):
        return [{"role": "HUMAN", "prompt": prompt}]
    if isinstance(prompt, dict):
        return prompt
    return [{"role": "HUMAN" if m["role"] == "user" else "BOT", "prompt": m["content"]} for m in prompt]


def prompt_chars(prompt):
    """A prompt's length in characters: one text, the turns of a dialogue, or the longest candidate."""
    if isinstance(prompt, str):
        return len(prompt)
    if isinstance(prompt, dict):
        return max(map(len, prompt.values()))
    return sum(len(m["content"]) for m in prompt)


def cmd_generate(args):
    tasks = parse_tasks(args.tasks) or list(TASKS)
    data = {t: load_lawbench_task(args.lawbench_data, args.setting, t)[:args.limit] for t in tasks}
    jobs = {t: ([lawbench_prompt(it) for it in items], [it["answer"] for it in items]) for t, items in data.items()}
    return generate_predictions(args, jobs, args.setting, set(TASKS))


def generate_predictions(args, jobs, setting, known, reply_fn=None, decoding="greedy"):
    """The prediction folder --out for jobs {task: (prompts, answers)}: <task>.json per task in
    LawBench's (and OpenCompass's) layout, generated in-process (torchrun-sharded) or through
    --api-base. Resumable item by item; refuses a folder made by other weights, another setting
    (`setting` names the benchmark too) or another reply length. `known`: the task file names of
    this benchmark, to recognise a folder of unknown origin. reply_fn(model, tok, stop_ids, args) ->
    the local reply function (default: greedy generation); `decoding` names it in the folder's
    record ("perplexity" has no reply length)."""
    from tqdm import tqdm
    api = bool(args.api_base)
    rank, world, device, barrier, total = setup_ranks(api)
    master = rank == 0
    if api:
        client, served = api_client(args.api_base, args.api_key_env, args.timeout, args.retries)
        check_served(served, args.model, args.api_base)
        backend = {"backend": "api", "api_base": args.api_base, "chat_template": "the server's"}
    else:
        model, tok, stop_ids = load_generator(args.model, args.trust_remote_code, device)
        if not tok.chat_template and master and reply_fn is None:
            log(f"warning: {args.model} has no chat template; prompts are given as plain text")
        backend = {"backend": "transformers", "processes": world, "chat_template": bool(tok.chat_template)}
        replies = (reply_fn or greedy_replies)(model, tok, stop_ids, args)
    if master:  # one writer per prediction folder (held until this process ends)
        out_lock, _ = lock_folder(args.out, "two generate runs must not write the same --out; wait for that one "  # noqa: F841
                                  "(or stop it: a rerun resumes), or use another --out")
    partial_dir = os.path.join(args.out, ".partial")
    meta = {"model": args.model, "fingerprint": model_fingerprint(args.model, args.api_base), "setting": setting,
            "max_new_tokens": args.max_new_tokens if decoding == "greedy" else None, "decoding": decoding,
            **backend}
    meta_path = os.path.join(args.out, ".generation.json")
    old_tasks = {}
    if os.path.exists(meta_path):
        old = json.load(open(meta_path, encoding="utf-8"))
        old_tasks = old.get("tasks") or {}
        diff = [k for k in ("fingerprint", "setting", "max_new_tokens") if old.get(k) != meta[k]]
        if diff:
            fail(f"{args.out} holds predictions made with other {', '.join(diff)} "
                 f"({old.get('model')}, {old.get('setting')}); use another --out, or delete it to start over")
    elif os.path.isdir(args.out):
        existing = [n for n in os.listdir(args.out) if n.endswith(".json") and n[:-5] in known]
        if existing or os.path.isdir(partial_dir):
            fail(f"{args.out} already holds predictions of unknown origin; use another --out")
    barrier()  # every rank has checked the folder before rank 0 writes into it
    if master:
        os.makedirs(partial_dir, exist_ok=True)
        write_json(meta_path, {**meta, "tasks": {}})
    barrier()
    meta["tasks"] = {}
    started = time.time()
    for task, (prompts, answers) in jobs.items():
        final = os.path.join(args.out, f"{task}.json")
        if os.path.exists(final) and len(json.load(open(final, encoding="utf-8"))) == len(prompts):
            before = old_tasks.get(task, {})  # what the run that finished it recorded
            meta["tasks"][task] = {"items": len(prompts), "resumed": "complete",
                                   **({"prompts_truncated": before["prompts_truncated"]}
                                      if "prompts_truncated" in before else {})}
            continue
        done = read_partials(partial_dir, task, len(prompts))
        resumed = len(done)
        # this rank's share: the remaining items dealt out longest first, so every rank gets a similar load
        remaining = sorted((i for i in range(len(prompts)) if i not in done),
                           key=lambda i: (-prompt_chars(prompts[i]), i))
        rank_share = remaining[rank::world]
        barrier()  # all ranks have read the progress files before any appends to them
        rank_path = rank_file(os.path.join(partial_dir, f"{task}.jsonl"), rank)
        truncated = 0
        with tqdm(total=len(prompts), initial=resumed, desc=f"{setting} {task}", unit="item",
                  disable=args.quiet or not master) as bar:
            if api:
                generate_task_api(client, args.model, prompts, done, rank_path, rank_share, args.concurrency,
                                  args.max_new_tokens, bar)
            else:
                truncated = generate_task(replies, prompts, done, rank_path, bar, only=set(rank_share))
        barrier()
        truncated = total(truncated)
        if master:
            done = read_partials(partial_dir, task, len(prompts))
            missing = [i for i in range(len(prompts)) if i not in done]
            if missing:
                fail(f"{task}: no reply for items {missing[:10]}; run again to resume")
            preds = {str(i): {"origin_prompt": origin_prompt(prompts[i]), "prediction": done[i], "refr": answer}
                     for i, answer in enumerate(answers)}
            write_json(final, preds)
            for path in rank_files(os.path.join(partial_dir, f"{task}.jsonl")):  # also an earlier run's ranks
                os.unlink(path)
        barrier()
        meta["tasks"][task] = {"items": len(prompts), "resumed_items": resumed, "prompts_truncated": truncated}
    if master:
        if os.path.isdir(partial_dir) and not os.listdir(partial_dir):
            os.rmdir(partial_dir)
        elapsed = time.time() - started
        meta["generation_seconds"] = round(elapsed, 3)  # after loading the model: generation alone
        write_json(meta_path, meta)  # a dot-file: the scorer reads DIR/<task>.json only
        n = sum(len(p) for p, _ in jobs.values())
        resumed = sum(t.get("resumed_items", t["items"] if t.get("resumed") == "complete" else 0)
                      for t in meta["tasks"].values())
        log(f"Generated {n - resumed} new predictions ({resumed} resumed) for {len(jobs)} task(s) in {elapsed:.0f} s "
            f"({(n - resumed) / max(elapsed, 1e-9):.2f} items/s, "
            f"{'server ' + args.api_base if api else f'{world} process(es)'}) -> {args.out}")
    barrier()
    return 0


def greedy_replies(model, tok, stop_ids, args):
    """The local reply function: greedy generation in batches of --batch-size (common.py)."""
    def replies(prompts, todo, on_batch):
        return generate_replies(model, tok, stop_ids, prompts, todo, args.batch_size, args.max_new_tokens, on_batch)
    return replies


def cmd_run(args):
    """generate into --out (the prediction folder), then score that folder into --results."""
    rc = cmd_generate(args)
    if rc or int(os.environ.get("RANK", 0)) != 0:  # under torchrun, rank 0 scores
        return rc
    # cmd_score reads its own flags: --predictions is what was just generated, --out its results
    score_args = argparse.Namespace(**{**vars(args), "predictions": args.out, "models": None,
                                       "out": results_folder(args)})
    return cmd_score(score_args)


def results_folder(args):
    """--results, else results/<name of the prediction folder --out>."""
    return args.results or os.path.join("results", os.path.basename(os.path.normpath(args.out)))


# ----------------------------------------------------------------------------------------------
# CMMLU: general ability, the paper's claim that legal training keeps it. Scored as OpenCompass
# scores it (open-compass/opencompass at a5acc4bb): configs/datasets/cmmlu/cmmlu_gen_c13365.py for
# chat models (the question as a HUMAN turn, five dev examples as earlier turns answered
# "答案是: X", greedy, the first capital letter of the reply is the answer: first_capital_postprocess
# in utils/text_postprocessors.py) and cmmlu_ppl_8b9c76.py for base models (the candidate with the
# lowest perplexity). Zero-shot is the same template without the examples. Subjects, Chinese
# names and categories are CMMLU's own (haonan-li/CMMLU d6e7b716, src/categories.py; OpenCompass's
# summarizer groups repeat them); a category's score and the overall score are plain means over
# subjects, not over items, as OpenCompass's summarizer averages.

CMMLU_SUBJECTS = {  # subject (CSV file name): (Chinese name, CMMLU subcategories)
    "agronomy": ("农学", ["other"]),
    "anatomy": ("解剖学", ["biology"]),
    "ancient_chinese": ("古汉语", ["linguistics", "china specific"]),
    "arts": ("艺术学", ["arts"]),
    "astronomy": ("天文学", ["physics"]),
    "business_ethics": ("商业伦理", ["business"]),
    "chinese_civil_service_exam": ("中国公务员考试", ["politics", "china specific"]),
    "chinese_driving_rule": ("中国驾驶规则", ["other", "china specific"]),
    "chinese_food_culture": ("中国饮食文化", ["culture", "china specific"]),
    "chinese_foreign_policy": ("中国外交政策", ["politics", "china specific"]),
    "chinese_history": ("中国历史", ["history", "china specific"]),
    "chinese_literature": ("中国文学", ["literature", "china specific"]),
    "chinese_teacher_qualification": ("中国教师资格", ["education", "china specific"]),
    "clinical_knowledge": ("临床知识", ["other"]),
    "college_actuarial_science": ("大学精算学", ["math"]),
    "college_education": ("大学教育学", ["education"]),
    "college_engineering_hydrology": ("大学工程水文学", ["engineering"]),
    "college_law": ("大学法律", ["law"]),
    "college_mathematics": ("大学数学", ["math"]),
    "college_medical_statistics": ("大学医学统计", ["statistics"]),
    "college_medicine": ("大学医学", ["other"]),
    "computer_science": ("计算机科学", ["computer science"]),
    "computer_security": ("计算机安全", ["other"]),
    "conceptual_physics": ("概念物理学", ["physics"]),
    "construction_project_management": ("建设工程管理", ["other", "china specific"]),
    "economics": ("经济学", ["economics"]),
    "education": ("教育学", ["education"]),
    "electrical_engineering": ("电气工程", ["engineering"]),
    "elementary_chinese": ("小学语文", ["linguistics", "china specific"]),
    "elementary_commonsense": ("小学常识", ["other", "china specific"]),
    "elementary_information_and_technology": ("小学信息技术", ["other"]),
    "elementary_mathematics": ("初等数学", ["math"]),
    "ethnology": ("民族学", ["culture", "china specific"]),
    "food_science": ("食品科学", ["other"]),
    "genetics": ("遗传学", ["biology"]),
    "global_facts": ("全球事实", ["global"]),
    "high_school_biology": ("高中生物", ["biology"]),
    "high_school_chemistry": ("高中化学", ["chemistry"]),
    "high_school_geography": ("高中地理", ["geography"]),
    "high_school_mathematics": ("高中数学", ["math"]),
    "high_school_physics": ("高中物理学", ["physics"]),
    "high_school_politics": ("高中政治", ["politics", "china specific"]),
    "human_sexuality": ("人类性行为", ["other"]),
    "international_law": ("国际法学", ["law"]),
    "journalism": ("新闻学", ["sociology"]),
    "jurisprudence": ("法理学", ["law"]),
    "legal_and_moral_basis": ("法律与道德基础", ["other"]),
    "logical": ("逻辑学", ["philosophy"]),
    "machine_learning": ("机器学习", ["computer science"]),
    "management": ("管理学", ["business"]),
    "marketing": ("市场营销", ["business"]),
    "marxist_theory": ("马克思主义理论", ["philosophy"]),
    "modern_chinese": ("现代汉语", ["linguistics", "china specific"]),
    "nutrition": ("营养学", ["other"]),
    "philosophy": ("哲学", ["philosophy"]),
    "professional_accounting": ("专业会计", ["business"]),
    "professional_law": ("专业法学", ["law"]),
    "professional_medicine": ("专业医学", ["other"]),
    "professional_psychology": ("专业心理学", ["psychology"]),
    "public_relations": ("公共关系", ["politics"]),
    "security_study": ("安全研究", ["politics"]),
    "sociology": ("社会学", ["culture"]),
    "sports_science": ("体育学", ["other"]),
    "traditional_chinese_medicine": ("中医中药", ["other", "china specific"]),
    "virology": ("病毒学", ["biology"]),
    "world_history": ("世界历史", ["history"]),
    "world_religions": ("世界宗教", ["global"]),
}
CMMLU_CATEGORIES = {  # category: its subcategories (a subject may count in two: China specific overlaps)
    "STEM": ["physics", "chemistry", "biology", "computer science", "math", "engineering", "statistics"],
    "Humanities": ["history", "philosophy", "law", "arts", "literature", "global"],
    "Social Science": ["linguistics", "business", "politics", "culture", "economics", "geography", "psychology",
                       "education", "sociology"],
    "Other": ["other"],
    "China specific": ["china specific"],
}
CMMLU_COLUMNS = ["Question", "A", "B", "C", "D", "Answer"]  # after CMMLU's unnamed index column
CMMLU_LABELS = ("A", "B", "C", "D")  # a tuple: "" in "ABCD" would be True


def cmmlu_categories(subject):
    subcats = CMMLU_SUBJECTS[subject][1]
    return [c for c, members in CMMLU_CATEGORIES.items() if any(s in members for s in subcats)]


def read_cmmlu_csv(path):
    """[{question, A, B, C, D, answer}] from one CMMLU CSV: a header row (index, Question, A, B,
    C, D, Answer), then one question per row. A missing column, a short row or an answer outside
    A-D stops here, naming the file and line."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"{path}: cannot read CMMLU CSV ({exc})")
    if not rows:
        fail(f"{path}:1: empty file; expected the header ,Question,A,B,C,D,Answer")
    header = [h.strip().lstrip("\ufeff") for h in rows[0]]
    missing = [c for c in CMMLU_COLUMNS if c not in header[1:]]
    if missing:
        fail(f"{path}:1: no {', '.join(missing)} column(s) in the header {rows[0]}; CMMLU's CSVs are "
             f"index,{','.join(CMMLU_COLUMNS)}")
    at = {c: header.index(c, 1) for c in CMMLU_COLUMNS}
    items = []
    for line, row in enumerate(rows[1:], 2):
        if not row:
            continue
        if len(row) != len(header):
            fail(f"{path}:{line}: {len(row)} fields, the header has {len(header)} (an unquoted comma or newline?)")
        answer = row[at["Answer"]].strip()
        if answer not in CMMLU_LABELS:
            fail(f"{path}:{line}: answer {answer!r} is not one of A, B, C, D")
        items.append({"question": row[at["Question"]], **{k: row[at[k]] for k in CMMLU_LABELS}, "answer": answer})
    return items


def load_cmmlu(data_dir, subjects, limit=None):
    """{subject: (dev items, test items)} from a CMMLU data folder (DIR/dev/<subject>.csv and
    DIR/test/<subject>.csv; a checkout's root, with data/ inside, also works)."""
    if not os.path.isdir(os.path.join(data_dir, "dev")) and os.path.isdir(os.path.join(data_dir, "data", "dev")):
        data_dir = os.path.join(data_dir, "data")
    for split in ("dev", "test"):
        if not os.path.isdir(os.path.join(data_dir, split)):
            fail(f"--cmmlu-data {data_dir}: no {split}/ folder; expected CMMLU's data/ folder "
                 "(dev/<subject>.csv and test/<subject>.csv)")
    data = {}
    for s in subjects:
        dev, test = (os.path.join(data_dir, split, f"{s}.csv") for split in ("dev", "test"))
        for path in (dev, test):
            if not os.path.isfile(path):
                fail(f"{path}: missing; CMMLU has one CSV per subject in dev/ and test/ (or pass --subjects)")
        data[s] = (read_cmmlu_csv(dev), read_cmmlu_csv(test)[:limit])
    return data


def parse_subjects(spec):
    subjects = spec.split(",") if spec else list(CMMLU_SUBJECTS)
    unknown = [s for s in subjects if s not in CMMLU_SUBJECTS]
    if unknown:
        import difflib
        hints = [f"{u} (did you mean {difflib.get_close_matches(u, CMMLU_SUBJECTS, 1)[0]}?)"
                 if difflib.get_close_matches(u, CMMLU_SUBJECTS, 1) else u for u in unknown]
        fail(f"unknown CMMLU subject(s) {', '.join(hints)}; the 67 subjects are the CSV names, e.g. agronomy")
    return subjects


def cmmlu_question(subject, item):
    """OpenCompass's CMMLU question turn (cmmlu_gen_c13365.py's HUMAN prompt)."""
    return (f"以下是关于{CMMLU_SUBJECTS[subject][0]}的单项选择题，请直接给出正确答案的选项。\n"
            f"题目：{item['question']}\nA. {item['A']}\nB. {item['B']}\nC. {item['C']}\nD. {item['D']}")


def cmmlu_dialogue(subject, item, examples):
    """The generation prompt: each example a user turn and its answer "答案是: X" as the assistant's
    turn, then the question. Every user turn ends in a newline, as OpenCompass's chat models
    (HuggingFacewithChatTemplate, and its vLLM and LMDeploy wrappers) send them: their default
    meta template merges an empty SYSTEM-as-HUMAN item into each HUMAN turn, joined by '\\n'."""
    turns = []
    for ex in examples:
        turns += [{"role": "user", "content": cmmlu_question(subject, ex) + "\n"},
                  {"role": "assistant", "content": f"答案是: {ex['answer']}"}]
    return turns + [{"role": "user", "content": cmmlu_question(subject, item) + "\n"}]


def cmmlu_candidates(subject, item, examples):
    """The perplexity prompts, {label: text}, as cmmlu_ppl_8b9c76.py renders them for a base model:
    the examples (each with its own answer) three newlines apart, five newlines, then the question
    with each candidate answer."""
    shots = "\n\n\n".join(f"{cmmlu_question(subject, ex)}\n答案是: {ex['answer']}" for ex in examples)
    prefix = shots + "\n\n\n\n\n" if examples else ""
    return {label: f"{prefix}{cmmlu_question(subject, item)}\n答案是: {label}" for label in CMMLU_LABELS}


def first_capital(text):
    """OpenCompass's first_capital_postprocess: the first upper-case character of the reply, any
    letter (so "The answer is B" answers "T", wrong, in OpenCompass too), or "" when there is none."""
    return next((c for c in text if c.isupper()), "")


def perplexity_choices(model, tok, stop_ids, args):
    """The local reply function of --mode ppl: for each item the label whose candidate text has the
    lowest perplexity, OpenCompass's PPLInferencer with HuggingFaceBaseModel.get_ppl: the summed
    next-token loss of the whole text divided by its number of tokens. --batch-size counts
    sequences here (4 per question): the logits of a batch are [sequences x length x vocabulary],
    12 GB in fp32 for 32 sequences of 1,000 tokens at InternLM2's 92,544, so the loss is taken one
    sequence at a time."""
    import torch
    limit = getattr(model.config, "max_position_embeddings", None)
    per_batch = max(1, args.batch_size // len(CMMLU_LABELS))

    def replies(prompts, todo, on_batch):
        truncated = 0
        for k in range(0, len(todo), per_batch):
            batch = todo[k:k + per_batch]
            rows = []
            for i in batch:
                cut = False
                for label in CMMLU_LABELS:
                    ids = tok(prompts[i][label])["input_ids"]
                    if limit and len(ids) > limit:  # keep the end: the question and the candidate
                        ids, cut = ids[-limit:], True
                    rows.append(ids)
                truncated += cut
            width = max(map(len, rows))
            pad = tok.pad_token_id if tok.pad_token_id is not None else 0
            input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=model.device)
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=model.device)
            with torch.no_grad():
                logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
                ppl = [(torch.nn.functional.cross_entropy(logits[j, :-1].float(), input_ids[j, 1:], reduction="none")
                        * mask[j, 1:]).sum().item() / mask[j].sum().item() for j in range(len(rows))]
            n = len(CMMLU_LABELS)
            on_batch([(i, CMMLU_LABELS[min(range(n), key=lambda c, b=b: ppl[b * n + c])]) for b, i in enumerate(batch)])
        return truncated
    return replies


def read_cmmlu_predictions(path):
    """[(prediction, gold)] from one subject's prediction file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        rows = [(str(v["prediction"]), v["refr"]) for _, v in sorted(data.items(), key=lambda kv: int(kv[0]))]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        fail(f"{path}: not a CMMLU prediction file ({{\"0\": {{prediction, refr}}, ...}}: {exc})")
    return rows


def score_cmmlu(pred_dir, only=None):
    """Accuracy (0-100) per subject, per category and overall from a prediction folder of
    `evaluate.py cmmlu` (<subject>.json; `only` these subjects), the answer of each reply taken by
    first_capital."""
    meta_path = os.path.join(pred_dir, ".generation.json")
    meta = json.load(open(meta_path, encoding="utf-8")) if os.path.exists(meta_path) else {}
    subjects = {}
    for s in only or CMMLU_SUBJECTS:
        path = os.path.join(pred_dir, f"{s}.json")
        if not os.path.isfile(path):
            continue
        rows = read_cmmlu_predictions(path)
        answers = [first_capital(p) for p, _ in rows]
        correct = sum(a == g for a, (_, g) in zip(answers, rows, strict=True))
        subjects[s] = {"name": CMMLU_SUBJECTS[s][0], "n": len(rows), "correct": correct,
                       "accuracy": 100.0 * correct / len(rows) if rows else None,
                       "no_answer": sum(a not in CMMLU_LABELS for a in answers),
                       "answers": dict(sorted(Counter(answers).items()))}
    if not subjects:
        fail(f"{pred_dir}: no CMMLU prediction files (<subject>.json, e.g. agronomy.json)")

    def mean(names):
        vals = [subjects[s]["accuracy"] for s in names if subjects[s]["accuracy"] is not None]
        return sum(vals) / len(vals) if vals else None
    categories = {c: {"accuracy": mean([s for s in subjects if c in cmmlu_categories(s)]),
                      "subjects": sum(c in cmmlu_categories(s) for s in subjects)} for c in CMMLU_CATEGORIES}
    return {"benchmark": "cmmlu", "setting": meta.get("setting"), "model": meta.get("model"),
            "predictions": os.path.abspath(pred_dir), "overall": mean(subjects), "n_subjects": len(subjects),
            "n_items": sum(r["n"] for r in subjects.values()), "categories": categories, "subjects": subjects,
            "averaging": "plain mean over subjects (OpenCompass's naive_average), not over items",
            "missing_subjects": [s for s in CMMLU_SUBJECTS if s not in subjects]}


def cmmlu_markdown(report):
    lines = [f"## CMMLU accuracy (%), {report['setting']}, {report['n_items']} questions, "
             f"{report['n_subjects']} subjects\n\n| category | subjects | accuracy |\n|---|---:|---:|\n"]
    for c, r in report["categories"].items():
        lines.append(f"| {c} | {r['subjects']} | {_fmt(r['accuracy'])} |\n")
    lines.append(f"| **overall** | {report['n_subjects']} | **{_fmt(report['overall'])}** |\n\n")
    lines.append("| subject | 科目 | questions | correct | no answer | accuracy |\n|---|---|---:|---:|---:|---:|\n")
    for s, r in report["subjects"].items():
        lines.append(f"| {s} | {r['name']} | {r['n']} | {r['correct']} | {r['no_answer']} | {_fmt(r['accuracy'])} |\n")
    return "".join(lines)


def cmmlu_csv(report, f):
    import io
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["setting", "level", "name", "chinese_name", "categories", "questions", "correct", "accuracy"])
    w.writerow([report["setting"], "overall", "cmmlu", "", "", report["n_items"], "", repr(report["overall"])])
    for c, r in report["categories"].items():
        w.writerow([report["setting"], "category", c, "", "", "", "",
                    "" if r["accuracy"] is None else repr(r["accuracy"])])
    for s, r in report["subjects"].items():
        w.writerow([report["setting"], "subject", s, r["name"], ";".join(cmmlu_categories(s)), r["n"], r["correct"],
                    "" if r["accuracy"] is None else repr(r["accuracy"])])
    f.write(buf.getvalue().encode("utf-8"))


def plot_cmmlu(report, f):
    """Per-subject accuracy, labelled with the Chinese subject names, coloured by category."""
    plt = pyplot("".join(r["name"] for r in report["subjects"].values()))
    order = list(CMMLU_CATEGORIES)
    subjects = sorted(report["subjects"], key=lambda s: (order.index(cmmlu_categories(s)[0]), s))  # by category
    colours = dict(zip(CMMLU_CATEGORIES, ("tab:blue", "tab:orange", "tab:green", "tab:gray", "tab:red"), strict=True))
    fig, ax = plt.subplots(figsize=(8, max(3.0, 0.22 * len(subjects) + 1.5)))
    ys = range(len(subjects))
    first = [next(c for c in cmmlu_categories(s) if c != "China specific") for s in subjects]
    ax.barh(list(ys), [report["subjects"][s]["accuracy"] or 0.0 for s in subjects],
            color=[colours[c] for c in first])
    ax.set_yticks(list(ys))
    ax.set_yticklabels([f"{report['subjects'][s]['name']}{' *' if 'China specific' in cmmlu_categories(s) else ''}"
                        for s in subjects], fontsize=8)
    ax.set_ylim(len(subjects) - 0.5, -0.5)  # first subject on top
    ax.axvline(25, color="black", linestyle=":", linewidth=1)
    ax.set_xlim(0, 100)
    ax.set_xlabel("accuracy (%); dotted: chance (25%); * China specific")
    ax.set_title(f"CMMLU {report['setting']}: overall {_fmt(report['overall'])}", fontsize=10)
    from matplotlib.patches import Patch
    ax.legend(handles=[Patch(color=colours[c], label=f"{c} {_fmt(report['categories'][c]['accuracy'])}")
                       for c in CMMLU_CATEGORIES if c != "China specific"], fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def cmd_cmmlu(args):
    subjects = parse_subjects(args.subjects)
    data = load_cmmlu(args.cmmlu_data, subjects, args.limit)
    if args.mode == "ppl" and args.api_base:
        fail("--mode ppl scores the four candidates with the local model's own losses; it cannot go through "
             "--api-base (use --mode gen, or load the model)")
    if args.shots not in range(6):
        fail(f"--shots {args.shots}: CMMLU's dev split has 5 examples per subject; give 0 to 5")
    build = cmmlu_dialogue if args.mode == "gen" else cmmlu_candidates
    jobs = {s: ([build(s, item, dev[:args.shots]) for item in test], [item["answer"] for item in test])
            for s, (dev, test) in data.items()}
    setting = f"cmmlu_{args.shots}shot_{args.mode}"
    if args.mode == "ppl":
        rc = generate_predictions(args, jobs, setting, set(CMMLU_SUBJECTS), perplexity_choices, "perplexity")
    else:
        rc = generate_predictions(args, jobs, setting, set(CMMLU_SUBJECTS))
    if rc or int(os.environ.get("RANK", 0)) != 0:  # under torchrun, rank 0 scores
        return rc
    report = score_cmmlu(args.out, subjects)  # this run's subjects only, not others an earlier run left
    results = results_folder(args)
    write_json(os.path.join(results, "cmmlu.json"), report)
    atomic_write(os.path.join(results, "cmmlu.csv"), lambda f: cmmlu_csv(report, f))
    atomic_write(os.path.join(results, "cmmlu.png"), lambda f: plot_cmmlu(report, f))
    print(cmmlu_markdown(report))
    log(f"CMMLU {setting}: {_fmt(report['overall'])} over {report['n_subjects']} subjects; wrote "
        f"{os.path.join(results, 'cmmlu.json')}, cmmlu.csv, cmmlu.png")
    return 0


# ----------------------------------------------------------------------------------------------
# Pairwise LLM judge: the paper's subjective evaluation (win rate against GPT-4, judged by an LLM)

# A fixed rubric. Change PAIRWISE_RUBRIC_VERSION whenever the text changes: it is part of the
# cache key, so verdicts of two rubrics are never mixed.
PAIRWISE_RUBRIC_VERSION = "pairwise-v1"
PAIRWISE_RUBRIC = (
    "你是一名资深的中国法律专家，请评判两个AI助手对同一个法律问题的回答哪一个更好。\n"
    "评判标准：\n"
    "1. 法律正确性：结论与分析是否符合中国现行法律；\n"
    "2. 法条引用：引用的法律条文是否正确、现行有效，是否与问题相关；\n"
    "3. 完整性：是否回答了问题的全部要点；\n"
    "4. 清晰性：表述是否清楚、有条理，便于当事人理解；\n"
    "5. 不捏造：是否没有编造事实、案例或法条。\n"
    "回答出现的先后顺序和篇幅长短都不应影响你的判断。\n"
    "请先用一两句话说明理由，然后在最后一行只输出评判结果：[[A]] 表示回答A更好，[[B]] 表示回答B更好，"
    "[[C]] 表示两者相当。\n\n"
    "【问题】\n{question}\n\n【回答A】\n{answer_a}\n\n【回答B】\n{answer_b}\n"
)
VERDICT_TAG = re.compile(r"\[\[\s*(A|B|C|TIE|平局|相当)\s*\]\]", re.I)
PREFERS = {side: re.compile(r"(?:回答|答案|助手|assistant|answer|response)?\s*" + side +
                            r"\s*(?:的回答)?\s*(?:更好|更优|更佳|较好|较优|胜出|获胜|is\s+better|wins|"
                            r"is\s+superior)", re.I)
           for side in "AB"}
TIE_WORDS = re.compile(r"两者相当|二者相当|不相上下|难分伯仲|平局|同样好|一样好|"
                       r"\btie\b|equally\s+good|equally\s+well", re.I)


def parse_verdict(output):
    """'A', 'B', 'tie' or None from a judge's reply. The last [[A]]/[[B]]/[[C]] tag decides;
    without one, a single unambiguous phrase ("回答A更好", "Assistant B is better", "两者相当") or
    a bare letter. Replies that name both sides as better, refuse, or say nothing are None."""
    import unicodedata
    text = unicodedata.normalize("NFKC", output or "").strip()
    if not text:
        return None
    tags = VERDICT_TAG.findall(text)
    if tags:
        last = tags[-1].upper()
        return last if last in "AB" else "tie"
    said = {side for side, rx in PREFERS.items() if rx.search(text)} | ({"tie"} if TIE_WORDS.search(text) else set())
    if len(said) == 1:
        return said.pop()
    bare = re.fullmatch(r"[\[(【「]*\s*([ABC])\s*[\])】」]*\s*[.。]?", text, re.I)
    if bare and not said:
        letter = bare.group(1).upper()
        return letter if letter in "AB" else "tie"
    return None


def combine_orders(model_first, reference_first):
    """The outcome for the model of one question judged in both orders (position bias): the
    verdict with the model as A, and with the model as B. Both must agree for a win or a loss;
    orders that disagree are a tie; an unparseable verdict in either makes it unparseable."""
    if model_first is None or reference_first is None:
        return "unparseable"
    a = {"A": "win", "B": "loss", "tie": "tie"}[model_first]
    b = {"B": "win", "A": "loss", "tie": "tie"}[reference_first]
    return a if a == b else "tie"


def orders_agree(model_first, reference_first):
    return (model_first is not None and reference_first is not None and
            {"A": "win", "B": "loss", "tie": "tie"}[model_first] ==
            {"B": "win", "A": "loss", "tie": "tie"}[reference_first])


def bootstrap_interval(wins, n_boot=2000, seed=0, level=0.95):
    """Percentile bootstrap interval of the win rate: questions resampled with replacement."""
    import numpy as np
    w = np.asarray(wins, dtype=float)
    if not len(w):
        return [None, None]
    rng = np.random.default_rng(seed)
    rates = w[rng.integers(0, len(w), size=(n_boot, len(w)))].mean(axis=1)
    lo, hi = np.quantile(rates, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def judge_questions(args):
    """(questions [{id, task, question}], answers {model: {question id: answer}}, reference name)
    from a prediction folder (every model against --reference on the same items), or from
    --questions FILE (JSONL: id, question, answers keyed by model name)."""
    answers = {}
    if args.questions:
        questions = []
        with open(args.questions, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    qid, q, ans = str(row["id"]), row["question"], row["answers"]
                    assert isinstance(q, str) and isinstance(ans, dict)
                except (ValueError, KeyError, TypeError, AssertionError):
                    fail(f"{args.questions}:{n}: expected {{id, question, answers: {{model: text}}}}")
                questions.append({"id": qid, "task": "questions", "question": q})
                for m, a in ans.items():
                    answers.setdefault(m, {})[qid] = a if isinstance(a, str) else ""
        ref = args.reference
        if ref not in answers:
            fail(f"--reference {ref}: no answers by that name in {args.questions} "
                 f"(names: {', '.join(sorted(answers))})")
        questions = questions[:args.limit] if args.limit else questions
        return questions, answers, ref
    models = find_models(args.predictions, args.setting)
    if os.path.isdir(args.reference):
        ref, ref_dir = os.path.basename(os.path.normpath(args.reference)), args.reference
    elif args.reference in models:
        ref, ref_dir = args.reference, models[args.reference]
    else:
        fail(f"--reference {args.reference}: neither a folder nor a model in {args.predictions} "
             f"(models: {', '.join(models) or 'none'})")
    models = {m: d for m, d in models.items() if m != ref}
    if not models:
        fail(f"no model to compare with {ref} in {args.predictions}")
    questions = []
    for task in parse_tasks(args.tasks) or ["3-8"]:
        def read(folder, who, task=task):
            path = os.path.join(folder, f"{task}.json")
            try:
                items, _, _ = load_prediction_file(path)
            except (OSError, ValueError) as exc:
                fail(f"{who}: cannot read {path} ({exc})")
            return {str(it["id"]): it for it in items}
        ref_items = read(ref_dir, ref)
        ids = sorted(ref_items, key=int)[:args.limit] if args.limit else sorted(ref_items, key=int)
        plain = {k: ref_items[k]["prompt"].strip() for k in ids}
        for m, folder in models.items():
            items = read(folder, m)
            for k in ids:
                if k not in items:
                    fail(f"{m}/{task}.json has no item {k}, which {ref} answers")
                # published predictions record the prompt inside their chat template: one contains the other
                model_prompt, ref_prompt = items[k]["prompt"].strip(), ref_items[k]["prompt"].strip()
                if model_prompt and ref_prompt and model_prompt not in ref_prompt and ref_prompt not in model_prompt:
                    fail(f"{m}/{task}.json item {k} asks another question than {ref}'s: "
                         "the two were generated from different LawBench data")
                if model_prompt and (not plain.get(k) or len(model_prompt) < len(plain[k])):
                    plain[k] = model_prompt
                answers.setdefault(m, {})[f"{task}/{k}"] = items[k]["prediction"]
        for k in ids:  # the question as asked, without any model's chat template around it
            questions.append({"id": f"{task}/{k}", "task": task, "question": plain.get(k) or ref_items[k]["prompt"]})
            answers.setdefault(ref, {})[f"{task}/{k}"] = ref_items[k]["prediction"]
    return questions, answers, ref


def judge_key(judge, question, answer_a, answer_b):
    import hashlib
    return hashlib.sha256(f"{PAIRWISE_RUBRIC_VERSION}\0{judge}\0{question}\0"
                          f"{answer_a}\0{answer_b}".encode()).hexdigest()


def plot_winrates(result, f):
    plt = pyplot()
    names = list(result["models"])
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(names) + 2), 4.5))
    bottom = [0.0] * len(names)
    for outcome, colour, hatch in (("win", "tab:green", None), ("tie", "silver", None), ("loss", "tab:red", None),
                                   ("unparseable", "white", "//")):
        share = [result["models"][m][outcome] / max(1, result["models"][m]["n"]) for m in names]
        ax.bar(names, share, bottom=bottom, color=colour, hatch=hatch, edgecolor="black", linewidth=0.5, label=outcome)
        bottom = [b + s for b, s in zip(bottom, share, strict=True)]
    rates = [result["models"][m]["win_rate"] for m in names]
    lo = [r - result["models"][m]["win_rate_ci95"][0] for r, m in zip(rates, names, strict=True)]
    hi = [result["models"][m]["win_rate_ci95"][1] - r for r, m in zip(rates, names, strict=True)]
    ax.errorbar(names, rates, yerr=[lo, hi], fmt="o", color="black", capsize=4, label="win rate, 95% CI")
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"share of questions (against {result['reference']})")
    judge = result["judge"].split("|")[-1].split("@")[0].rstrip("/")
    ax.set_title(f"judge {os.path.basename(judge)} ({result['rubric_version']}), {result['questions']} questions, "
                 "both orders", fontsize=10)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def cmd_judge(args):
    from tqdm import tqdm
    questions, answers, ref = judge_questions(args)
    models = [m for m in answers if m != ref]
    api = bool(args.judge_api_base)
    if api == bool(args.judge_model):
        fail("give the judge as --judge-model PATH or --judge-api-base URL --judge-api-model NAME")
    if api and not args.judge_api_model:
        fail("--judge-api-base needs --judge-api-model NAME")
    # the judge's identity in the cache key: URL and name, or the local folder and its weights' fingerprint
    judge = (f"{args.judge_api_base.rstrip('/')}|{args.judge_api_model}" if api else
             f"{os.path.abspath(args.judge_model)}@{model_fingerprint(args.judge_model)}")
    # every (model, question, order): the prompt and its cache key
    jobs = []
    for m in models:
        for q in questions:
            answer, reference = answers[m][q["id"]], answers[ref][q["id"]]
            for order, (a, b) in (("model_first", (answer, reference)), ("reference_first", (reference, answer))):
                jobs.append({"model": m, "id": q["id"], "task": q["task"], "order": order,
                             "key": judge_key(judge, q["question"], a, b),
                             "prompt": PAIRWISE_RUBRIC.format(question=q["question"], answer_a=a, answer_b=b)})
    out_lock, _ = lock_folder(args.out, "two judge runs must not write the same --out; wait for that one, or "  # noqa: F841
                              "use another --out")
    cache_path = args.cache or os.path.join(args.out, "judge_cache.jsonl")
    cache = read_jsonl_map(cache_path, "key", "output")  # torn lines are judged again
    todo_jobs = list({j["key"]: j for j in jobs if j["key"] not in cache}.values())
    prompts = {k: j["prompt"] for k, j in enumerate(todo_jobs)}
    started = time.time()
    if todo_jobs:
        with open_jsonl_append(cache_path) as cf, tqdm(total=len(todo_jobs), desc="judge", unit="verdict",
                                                  disable=args.quiet) as bar:
            def keep(replies):
                rows = [{"key": todo_jobs[k]["key"], "output": text} for k, text in replies]
                cache.update((r["key"], r["output"]) for r in rows)
                append_jsonl(cf, rows)
                bar.update(len(replies))
            if api:
                client, served = api_client(args.judge_api_base, args.judge_api_key_env, args.timeout, args.retries)
                check_served(served, args.judge_api_model, args.judge_api_base)
                chat_replies(client, args.judge_api_model, prompts, list(prompts), args.max_new_tokens,
                             args.concurrency, lambda k, text: keep([(k, text)]))
            else:
                import torch
                device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
                model, tok, stop_ids = load_generator(args.judge_model, args.trust_remote_code, device)
                generate_replies(model, tok, stop_ids, prompts, list(prompts), args.batch_size,
                                 args.max_new_tokens, keep)
    # verdicts, then one outcome per (model, question)
    rows, verdict = [], {}
    for j in jobs:
        out = cache[j["key"]]
        v = parse_verdict(out)
        verdict[(j["model"], j["id"], j["order"])] = v
        rows.append({"model": j["model"], "reference": ref, "task": j["task"], "id": j["id"], "order": j["order"],
                     "answer_a": j["model"] if j["order"] == "model_first" else ref, "output": out, "verdict": v})
    result = {"judge": judge, "rubric_version": PAIRWISE_RUBRIC_VERSION, "reference": ref,
              "questions": len(questions), "tasks": sorted({q["task"] for q in questions}, key=task_sort_key
                                                          if args.questions is None else str),
              "tie_convention": "win_rate = wins / n, the paper's share of wins against the reference: ties, and "
                                "questions with an unparseable verdict, count as not won. A question is won only "
                                "when both orders prefer the model; orders that disagree make a tie. "
                                "win_rate_ties_half = (wins + ties / 2) / (n - unparseable).",
              "models": {}}
    for m in models:
        outcome = {q["id"]: combine_orders(verdict[(m, q["id"], "model_first")],
                                           verdict[(m, q["id"], "reference_first")])
                   for q in questions}
        c = Counter(outcome.values())
        n = len(questions)
        parsed = n - c["unparseable"]
        result["models"][m] = {
            "n": n, "win": c["win"], "tie": c["tie"], "loss": c["loss"], "unparseable": c["unparseable"],
            "win_rate": c["win"] / n if n else None,
            "win_rate_ci95": bootstrap_interval([outcome[q["id"]] == "win" for q in questions],
                                                args.bootstrap, args.seed),
            "win_rate_ties_half": (c["win"] + c["tie"] / 2) / parsed if parsed else None,
            # questions whose two verdicts agree once the swap is undone: how little position bias there is
            "position_consistency": sum(orders_agree(verdict[(m, q["id"], "model_first")],
                                                     verdict[(m, q["id"], "reference_first")]) for q in questions) / n
            if n else None,
            "unparseable_items": [q["id"] for q in questions if outcome[q["id"]] == "unparseable"],
        }
    atomic_write(os.path.join(args.out, "judgments.jsonl"),
                 lambda f: f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")))
    write_json(os.path.join(args.out, "winrate.json"), result)
    atomic_write(os.path.join(args.out, "winrate.png"), lambda f: plot_winrates(result, f))
    print(f"\nPairwise judge {judge} (rubric {PAIRWISE_RUBRIC_VERSION}) against {ref}, {len(questions)} questions, "
          "each judged in both orders\n")
    print("| model | n | win | tie | loss | unparseable | win rate | 95% CI | ties as half |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|")
    for m, r in result["models"].items():
        lo, hi = r["win_rate_ci95"]
        half = "-" if r["win_rate_ties_half"] is None else f"{100 * r['win_rate_ties_half']:.1f}%"
        ci = "-" if lo is None else f"{100 * lo:.1f}-{100 * hi:.1f}%"
        print(f"| {m} | {r['n']} | {r['win']} | {r['tie']} | {r['loss']} | {r['unparseable']} | "
              f"{100 * r['win_rate']:.1f}% | {ci} | {half} |")
    log(f"\n{len(todo_jobs)} verdicts generated, {len(jobs) - len(todo_jobs)} from the cache, in "
        f"{time.time() - started:.0f} s; wrote {os.path.join(args.out, 'winrate.json')}, judgments.jsonl, winrate.png")
    return 0


# ----------------------------------------------------------------------------------------------
# Comparing runs: the paper's ablations side by side (general share, one stage / two stages /
# merged), from the result folders the commands above write.

# InternLM-Law's published LawBench averages (arXiv 2406.14887, Table 2) and its base model's.
PUBLISHED = {"InternLM-Law-7B (paper)": {"lawbench zero_shot": 67.71, "lawbench one_shot": 67.67},
             "InternLM2-Chat-7B (paper)": {"lawbench zero_shot": 45.80, "lawbench one_shot": 48.53}}


def parse_runs(specs):
    """RUN arguments -> {name: folder}. A RUN is a folder (named by its last component) or
    NAME=FOLDER. Two runs with one name, a missing folder: stop, naming them."""
    runs = {}
    for spec in specs:
        # a folder whose path holds "=" (results/lr=3e-3) is a folder; otherwise NAME=FOLDER splits at the first "="
        name, _, folder = ("", "", spec) if os.path.isdir(spec) or "=" not in spec else spec.partition("=")
        name = name or os.path.basename(os.path.normpath(folder))
        if not os.path.isdir(folder):
            fail(f"{folder}: no such run folder")
        if name in runs:
            fail(f"two runs are named {name!r} ({runs[name]} and {folder}); name them: NAME=FOLDER")
        runs[name] = folder
    return runs


def pick_model(path, models, run):
    """The run's entry in a result file that may hold several models: the only one, or the one named
    like the run."""
    if len(models) == 1:
        return next(iter(models))
    if run in models:
        return run
    fail(f"{path} holds {len(models)} models ({', '.join(models)}) and none is named {run!r}: score the run's "
         "own predictions into its folder, or name the run after its model (NAME=FOLDER)")


def lawbench_setting_of(pred_folder):
    """The LawBench setting a prediction folder was generated with (its .generation.json), or None."""
    try:
        with open(os.path.join(pred_folder, ".generation.json"), encoding="utf-8") as f:
            setting = json.load(f).get("setting")
    except (OSError, ValueError, AttributeError):
        return None
    return setting if setting in ("zero_shot", "one_shot") else None


def run_results(name, folder):
    """{metric key: value} of one run: every LawBench scores.json, CMMLU cmmlu.json and judge
    winrate.json under its folder. Keys: "lawbench <setting>" (AVG) and "lawbench <setting> <task>",
    "cmmlu <setting>" and "cmmlu <setting> <category>", "winrate <reference>" ({rate, ci95, n}, in %
    like every other value)."""
    found, origin = {}, {}

    def put(key, value, path):
        if key in origin and origin[key] != path:
            fail(f"run {name!r} has two results for {key}: {origin[key]} and {path}; keep one (or compare them "
                 "as two runs)")
        found[key], origin[key] = value, path

    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for fname in sorted(files):
            if fname not in ("scores.json", "cmmlu.json", "winrate.json"):
                continue
            path = os.path.join(root, fname)
            try:
                with open(path, encoding="utf-8") as f:
                    data = json.load(f)
                if fname == "scores.json":
                    entry = data["models"][pick_model(path, data["models"], name)]
                    setting = data.get("setting") or lawbench_setting_of(entry["folder"])
                    if setting is None:
                        fail(f"{path}: scored without --setting, and {entry['folder']} does not record one; score "
                             "it again with --setting zero_shot or one_shot")
                    put(f"lawbench {setting}", entry["averages"]["overall"], path)
                    for task, r in entry["tasks"].items():
                        put(f"lawbench {setting} {task}", r["score"], path)
                elif fname == "cmmlu.json":
                    put(f"cmmlu {data['setting']}", data["overall"], path)
                    for cat, r in data["categories"].items():
                        put(f"cmmlu {data['setting']} {cat}", r["accuracy"], path)
                else:
                    r = data["models"][pick_model(path, data["models"], name)]
                    pct = [None if x is None else 100 * x for x in (r["win_rate"], *r["win_rate_ci95"])]
                    put(f"winrate {data['reference']}", {"rate": pct[0], "ci95": pct[1:], "n": r["n"]}, path)
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                fail(f"{path}: not a result file of evaluate.py ({type(exc).__name__}: {exc})")
    if not found:
        fail(f"{folder} (run {name!r}) holds no results: no scores.json (evaluate.py run/score), cmmlu.json "
             "(evaluate.py cmmlu) or winrate.json (evaluate.py judge) under it")
    return found


def compare_columns(results):
    """The headline metrics present in any run, in a fixed order: LawBench AVG per setting, CMMLU
    overall per setting, win rate per reference."""
    keys = {k for r in results.values() for k in r}
    lawbench = sorted(k for k in keys if k.startswith("lawbench ") and len(k.split()) == 2)
    cols = [k for s in ("zero_shot", "one_shot") for k in lawbench if k == f"lawbench {s}"]
    cols += [k for k in lawbench if k not in cols]
    cols += sorted(k for k in keys if k.startswith("cmmlu ") and len(k.split(" ", 2)) == 2)
    return cols + sorted(k for k in keys if k.startswith("winrate "))


def column_title(key):
    parts = key.split(" ", 2)
    if parts[0] == "lawbench":
        return f"LawBench {parts[1].replace('_', '-')} AVG" if len(parts) == 2 else \
            f"LawBench {parts[1].replace('_', '-')} {parts[2]}"
    if parts[0] == "cmmlu":
        setting = parts[1].replace("cmmlu_", "").replace("shot_", "-shot ")  # cmmlu_5shot_gen -> 5-shot gen
        return f"CMMLU {setting}" + (f" {parts[2]}" if len(parts) == 3 else "")
    return f"win rate vs {parts[1]} [95% CI]"


def cell(value):
    """A table cell: "" for a missing metric, 2 decimals, a win rate in % with its interval."""
    if value is None:
        return ""
    if isinstance(value, dict):
        if value["rate"] is None:
            return ""
        lo, hi = value["ci95"]
        return f"{value['rate']:.1f}%" + ("" if lo is None else f" [{lo:.1f}-{hi:.1f}]")
    return _fmt(value)


def compare_markdown(results, cols):
    rows = {**results, **PUBLISHED}
    lines = ["## Runs side by side (scores 0-100; empty: not measured for that run)\n\n",
             "| run | " + " | ".join(column_title(c) for c in cols) + " |\n",
             "|---|" + "---:|" * len(cols) + "\n"]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(cell(r.get(c)) for c in cols) + " |\n")
    cmmlu = [c.split()[1] for c in cols if c.startswith("cmmlu ")]
    if cmmlu:
        heads = [f"{n} {column_title('cmmlu ' + s)[6:]}" for s in cmmlu for n in results]
        lines += ["\n## CMMLU per category (plain means over subjects)\n\n",
                  "| category | " + " | ".join(heads) + " |\n", "|---|" + "---:|" * len(heads) + "\n"]
        for c in CMMLU_CATEGORIES:
            lines.append(f"| {c} | " + " | ".join(cell(results[n].get(f"cmmlu {s} {c}")) for s in cmmlu
                                                   for n in results) + " |\n")
    tasks = sorted({k.split()[2] for r in results.values() for k in r if k.startswith("lawbench ")
                    and len(k.split()) == 3}, key=task_sort_key)
    settings = [c.split()[1] for c in cols if c.startswith("lawbench ")]
    if tasks:
        heads = [f"{n} {s.replace('_', '-')}" for s in settings for n in results]
        lines += ["\n## LawBench per task\n\n", "| task | name | " + " | ".join(heads) + " |\n",
                  "|---|---|" + "---:|" * len(heads) + "\n"]
        for t in tasks:
            vals = [cell(results[n].get(f"lawbench {s} {t}")) for s in settings for n in results]
            lines.append(f"| {t} | {TASKS[t][1]} | " + " | ".join(vals) + " |\n")
    return "".join(lines)


def compare_csv(results, runs, f):
    """Long format: one line per (run, metric), the published reference values included."""
    import io
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["run", "folder", "metric", "value", "ci95_low", "ci95_high", "n"])
    for name, r in {**results, **PUBLISHED}.items():
        for key, value in sorted(r.items()):
            if isinstance(value, dict):
                lo, hi = value["ci95"]
                w.writerow([name, runs.get(name, "published"), key, *("" if x is None else repr(x)
                                                                      for x in (value["rate"], lo, hi)), value["n"]])
            else:
                w.writerow([name, runs.get(name, "published"), key, "" if value is None else repr(value), "", "", ""])
    f.write(buf.getvalue().encode("utf-8"))


def plot_compare(results, cols, f):
    """Left: the headline metrics, one bar per run (colour and hatch per run), the published
    InternLM-Law and base-model LawBench averages as dashed marks. Right: LawBench per task of the
    first setting measured, labelled with the tasks' Chinese names."""
    names = list(results)
    plt = pyplot("".join(v[1] for v in TASKS.values()) + "".join(names))
    tasks_setting = next((c.split()[1] for c in cols if c.startswith("lawbench ")), None)
    tasks = sorted({k.split()[2] for r in results.values() for k in r
                    if tasks_setting and k.startswith(f"lawbench {tasks_setting} ")}, key=task_sort_key)
    fig, axes = plt.subplots(1, 2 if tasks else 1, figsize=(16 if tasks else 9, 5.5),
                             gridspec_kw={"width_ratios": [1, 1.6]} if tasks else None, squeeze=False)
    colours = plt.get_cmap("tab10").colors
    hatches = ["", "//", "..", "xx", "\\\\", "oo", "--", "++"]
    width = 0.8 / max(1, len(names))
    ax = axes[0][0]
    for k, name in enumerate(names):
        xs, ys, err = [], [], [[], []]
        for i, c in enumerate(cols):
            v = results[name].get(c)
            if v is None or (isinstance(v, dict) and v["rate"] is None):
                continue
            y = v["rate"] if isinstance(v, dict) else v
            lo, hi = v["ci95"] if isinstance(v, dict) and v["ci95"][0] is not None else (y, y)
            xs.append(i + (k - (len(names) - 1) / 2) * width)
            ys.append(y)
            err[0].append(y - lo)
            err[1].append(hi - y)
        bars = ax.bar(xs, ys, width=width, color=colours[k % 10], hatch=hatches[k % len(hatches)],
                      edgecolor="black", linewidth=0.5, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
        with_ci = [j for j in range(len(xs)) if err[0][j] or err[1][j]]
        if with_ci:
            ax.errorbar([xs[j] for j in with_ci], [ys[j] for j in with_ci], fmt="none", ecolor="black", capsize=3,
                        yerr=[[err[0][j] for j in with_ci], [err[1][j] for j in with_ci]])
    for (ref, values), style in zip(PUBLISHED.items(), ("--", ":"), strict=True):
        for i, c in enumerate(cols):
            if c in values:
                ax.hlines(values[c], i - 0.45, i + 0.45, colors="black", linestyles=style, linewidth=1.2,
                          label=ref if i == min(j for j, cc in enumerate(cols) if cc in values) else None)
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels([column_title(c).replace(" [95% CI]", "") for c in cols],
                       rotation=35, ha="right", fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("score / accuracy / win rate (%)")
    ax.set_title("headline metrics per run (bars: 95% CI of win rates)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    if tasks:
        ax = axes[0][1]
        for k, name in enumerate(names):
            ys = [results[name].get(f"lawbench {tasks_setting} {t}") for t in tasks]
            xs = [i + (k - (len(names) - 1) / 2) * width for i in range(len(tasks))]
            ax.bar(xs, [y or 0.0 for y in ys], width=width, color=colours[k % 10], hatch=hatches[k % len(hatches)],
                   edgecolor="black", linewidth=0.5, label=name)
        ax.set_xticks(range(len(tasks)))
        ax.set_xticklabels([f"{t} {TASKS[t][1]}" for t in tasks], rotation=60, ha="right", fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_title(f"LawBench {tasks_setting.replace('_', '-')} per task", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def cmd_compare(args):
    runs = parse_runs(args.runs)
    results = {name: run_results(name, folder) for name, folder in runs.items()}
    cols = compare_columns(results)
    table = compare_markdown(results, cols)
    atomic_write(os.path.join(args.out, "compare.md"), lambda f: f.write(table.encode("utf-8")))
    atomic_write(os.path.join(args.out, "compare.csv"), lambda f: compare_csv(results, runs, f))
    atomic_write(os.path.join(args.out, "compare.png"), lambda f: plot_compare(results, cols, f))
    print(table)
    log(f"Compared {len(runs)} run(s) on {len(cols)} headline metric(s); wrote {os.path.join(args.out, 'compare.md')}, "
        "compare.csv, compare.png")
    return 0


def add_generation_flags(q, max_tokens_why):
    """The flags every generating command shares: the model, its backend, batching and retries."""
    q.add_argument("--model", required=True, help="Hugging Face model folder (e.g. out/stage2/final) or hub id; "
                   "with --api-base, the name the server serves it under")
    q.add_argument("--batch-size", type=int, default=8, help="prompts per generate() call (default %(default)s)")
    q.add_argument("--max-new-tokens", type=int, default=1024,
                   help=f"reply length limit (default %(default)s: {max_tokens_why})")
    q.add_argument("--api-base", metavar="URL", help="generate through an OpenAI-compatible server instead of "
                   "loading the model (vLLM, LMDeploy, SGLang, transformers serve), e.g. http://127.0.0.1:23333/v1")
    q.add_argument("--api-key-env", metavar="VAR", help="environment variable holding the server's API key "
                   "(default: none; local engines need none)")
    q.add_argument("--concurrency", type=int, default=16,
                   help="requests in flight with --api-base (default %(default)s)")
    q.add_argument("--timeout", type=float, default=600.0,
                   help="seconds per request with --api-base (default %(default)s)")
    q.add_argument("--retries", type=int, default=5, help="retries of a request on connection errors, 429 and 5xx, "
                   "with exponential backoff (default %(default)s)")
    q.add_argument("--trust-remote-code", action="store_true",
                   help="allow the checkpoint's own modelling code (needed for unconverted InternLM2)")
    q.add_argument("--quiet", action="store_true", help="no progress bars")


def main(argv=None):
    parser = argparse.ArgumentParser(description="LawBench evaluation, scored exactly as LawBench's official scorer; "
                                     "CMMLU as OpenCompass scores it; runs compared side by side.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("score", help="score LawBench prediction files",
                       description="Score LawBench predictions (DIR/<model>/<task>.json) "
                                   "with LawBench's official metrics.")
    p.add_argument("--predictions", required=True, metavar="DIR",
                   help="folder of predictions: DIR/<model>/<task>.json, DIR/<setting>/<model>/<task>.json, "
                        "or one model's folder DIR/<task>.json")
    p.add_argument("--setting", choices=["zero_shot", "one_shot"], default=None,
                   help="LawBench setting; picks DIR/<setting>/ when it exists and labels the results")
    p.add_argument("--out", default="results", metavar="DIR",
                   help="where scores.json, scores.csv and scores.png go (default: results/)")
    p.add_argument("--models", default=None, help="comma-separated model folder names to score (default: all)")
    p.add_argument("--tasks", default=None, help="comma-separated task ids to score, e.g. 1-1,3-3 (default: all 20)")
    p.add_argument("--num-proc", type=int, default=None,
                   help="worker processes (default: all cores); files are scored in parallel")
    p.add_argument("--show-problems", type=int, default=20, metavar="N",
                   help="how many input problems to print (all are recorded in scores.json; default 20)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_score)
    for name, text, func in (
            ("generate", "generate LawBench predictions from a checkpoint (greedy, the model's chat template)",
             cmd_generate),
            ("run", "generate LawBench predictions, then score them", cmd_run)):
        q = sub.add_parser(name, help=text, description=text)
        q.add_argument("--lawbench-data", required=True, metavar="DIR",
                       help="LawBench's data folder: DIR/<setting>/<task>.json, "
                            "lists of {instruction, question, answer}")
        q.add_argument("--setting", choices=["zero_shot", "one_shot"], default="zero_shot",
                       help="LawBench setting (default %(default)s)")
        q.add_argument("--out", required=True, metavar="DIR",
                       help="prediction folder, LawBench's layout: DIR/<task>.json "
                            "(resumable: finished items are kept)")
        q.add_argument("--tasks", default=None, help="comma-separated task ids, e.g. 1-1,3-3 (default: all 20)")
        q.add_argument("--limit", type=int, default=None, help="only the first N items of each task (quick looks)")
        add_generation_flags(q, "OpenCompass's max_out_len for LawBench, with which InternLM-Law was scored")
        if name == "run":
            q.add_argument("--results", default=None, metavar="DIR",
                           help="where the scores go (default results/<name of --out>)")
            q.add_argument("--num-proc", type=int, default=None, help="scoring worker processes (default: all cores)")
            q.add_argument("--show-problems", type=int, default=20, metavar="N", help="input problems to print")
        q.set_defaults(func=func)
    c = sub.add_parser("cmmlu", help="CMMLU general ability: generate (or rank by perplexity) and score, "
                       "as OpenCompass does", description="General ability on CMMLU (67 subjects of Chinese "
                       "four-option questions), prompted and scored as OpenCompass's cmmlu_gen_c13365 (chat models: "
                       "examples as earlier turns, the reply's first capital letter is the answer) or cmmlu_ppl_8b9c76 "
                       "(base models: the lowest-perplexity answer). Accuracy per subject, per category and overall "
                       "(plain means over subjects).")
    c.add_argument("--cmmlu-data", required=True, metavar="DIR",
                   help="CMMLU's data folder: DIR/dev/<subject>.csv (the examples) and DIR/test/<subject>.csv")
    c.add_argument("--shots", type=int, default=5,
                   help="examples from dev before each question, 0-5 (default %(default)s, OpenCompass's)")
    c.add_argument("--mode", choices=["gen", "ppl"], default="gen",
                   help="gen: chat models answer (default); ppl: base models, the candidate with the lowest "
                        "perplexity (in-process only; --batch-size then counts sequences, 4 per question)")
    c.add_argument("--out", required=True, metavar="DIR",
                   help="prediction folder: DIR/<subject>.json, OpenCompass's layout (resumable)")
    c.add_argument("--results", default=None, metavar="DIR",
                   help="where cmmlu.json, cmmlu.csv and cmmlu.png go (default results/<name of --out>)")
    c.add_argument("--subjects", default=None, help="comma-separated subjects (CSV names; default: all 67)")
    c.add_argument("--limit", type=int, default=None, help="only the first N questions of each subject")
    add_generation_flags(c, "as for LawBench; the answer is the reply's first capital letter")
    c.set_defaults(func=cmd_cmmlu)
    j = sub.add_parser("judge", help="pairwise LLM-judge win rate of each model against a reference model",
                       description="The paper's subjective evaluation: each model's answers against a reference's "
                       "(default: LawBench's published GPT-4 answers to the consultation task 3-8), judged by an LLM "
                       "in both orders with a fixed rubric; win rate with a bootstrap 95% interval.")
    j.add_argument("--predictions", metavar="DIR", help="LawBench prediction layout, DIR/<model>/<task>.json: "
                   "every model in it is compared with --reference on the same items")
    j.add_argument("--reference", required=True, help="the model to compare against: a model folder name in DIR "
                   "(e.g. GPT4), a folder of <task>.json, or an answer name in --questions")
    j.add_argument("--tasks", default=None,
                   help="LawBench tasks whose items are the questions (default 3-8, consultation)")
    j.add_argument("--setting", choices=["zero_shot", "one_shot"], default=None, help="picks DIR/<setting>/ if present")
    j.add_argument("--questions", metavar="FILE",
                   help="instead of DIR: JSONL of {id, question, answers: {model: text}}")
    j.add_argument("--limit", type=int, default=None, help="only the first N questions (per task)")
    j.add_argument("--judge-model", metavar="PATH", help="a local causal LM as the judge (transformers, greedy)")
    j.add_argument("--judge-api-base", metavar="URL", help="an OpenAI-compatible server as the judge (a served 70B, or "
                   "https://api.openai.com/v1 for GPT-4 with --judge-api-key-env OPENAI_API_KEY)")
    j.add_argument("--judge-api-model", metavar="NAME", help="the judge's name on that server (e.g. gpt-4)")
    j.add_argument("--judge-api-key-env", metavar="VAR", help="environment variable holding the judge server's API key")
    j.add_argument("--out", required=True, metavar="DIR",
                   help="judgments.jsonl, winrate.json, winrate.png (and the cache)")
    j.add_argument("--cache", metavar="FILE", help="judge output cache, keyed by judge, rubric version and "
                   "both answers (default OUT/judge_cache.jsonl); a killed run resumes from it")
    j.add_argument("--max-new-tokens", type=int, default=512,
                   help="judge reply length (reason + verdict; default %(default)s)")
    j.add_argument("--batch-size", type=int, default=4, help="local judge batch size (default %(default)s)")
    j.add_argument("--concurrency", type=int, default=16,
                   help="requests in flight with --judge-api-base (default %(default)s)")
    j.add_argument("--timeout", type=float, default=600.0,
                   help="seconds per request with --judge-api-base (default %(default)s)")
    j.add_argument("--retries", type=int, default=5,
                   help="retries on connection errors, 429 and 5xx (default %(default)s)")
    j.add_argument("--bootstrap", type=int, default=2000,
                   help="bootstrap resamples for the 95%% interval (default %(default)s)")
    j.add_argument("--seed", type=int, default=0, help="bootstrap seed (default %(default)s)")
    j.add_argument("--trust-remote-code", action="store_true", help="allow the local judge's own modelling code")
    j.add_argument("--quiet", action="store_true", help="no progress bar")
    j.set_defaults(func=cmd_judge)
    k = sub.add_parser("compare", help="several runs' results side by side: one table (Markdown, CSV) and one chart",
                       description="The paper's ablations side by side: each RUN is a result folder (evaluate.py "
                       "run/score's scores.json, cmmlu's cmmlu.json, judge's winrate.json, found anywhere under it); "
                       "LawBench averages and per task, CMMLU overall and per category, win rate with its 95%% CI, "
                       "and InternLM-Law's published LawBench averages as reference rows. A metric a run lacks is "
                       "an empty cell.")
    k.add_argument("runs", nargs="+", metavar="RUN", help="a run's result folder, or NAME=FOLDER (default name: the "
                   "folder's last component)")
    k.add_argument("--out", default="results/compare", metavar="DIR",
                   help="where compare.md, compare.csv and compare.png go (default %(default)s)")
    k.set_defaults(func=cmd_compare)
    args = parser.parse_args(argv)
    if args.func is cmd_judge and not (args.predictions or args.questions):
        parser.error("judge needs --predictions DIR or --questions FILE")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
