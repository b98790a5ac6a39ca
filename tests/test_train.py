"""train.py core: packing, the packed collator, isolation of packed samples, the step-level token
mean, chunked cross-entropy and the InternLM2 -> Llama conversion.

Every claim is checked against an independent computation: per-sample forwards for packing,
one big batch for accumulation, torch's full cross-entropy for the chunked loss, and a plain
re-implementation of InternLM2's forward for the conversion."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import train
from conftest import (
    INTERNLM2,
    assert_same_grads,
    grads,
    make_internlm2_checkpoint,
    random_samples,
    read_log,
    save_tiny_llama,
    tiny_model,
)

ATOL = RTOL = 1e-5


def per_sample_loss_sum(model, samples):
    """The reference: each sample on its own, plain model forward, torch's cross-entropy."""
    total = 0.0
    for s in samples:
        ids, labels = torch.tensor([s["input_ids"]]), torch.tensor([s["labels"]])
        logits = model(input_ids=ids).logits[0]
        total = total + F.cross_entropy(logits[:-1], labels[0, 1:], ignore_index=-100, reduction="sum")
    return total


# ---------------------------------------------------------------------------------------------
# Packing

def greedy_pack(lengths, max_len):
    """The naive baseline: concatenate in order, start a new pack when the next sample won't fit."""
    packs, cur, room = [], [], max_len
    for i, n in enumerate(lengths):
        if n > room:
            packs.append(cur)
            cur, room = [], max_len
        cur.append(i)
        room -= n
    return packs + [cur] if cur else packs


def reference_best_fit_loads(lengths, max_len):
    """Best-fit decreasing written the obvious way (scan every pack): the multiset of pack loads.
    Ties between packs with equal free space don't change it, whichever tie-break is used."""
    loads = []
    for n in sorted(lengths, reverse=True):
        fits = [j for j, load in enumerate(loads) if max_len - load >= n]
        if fits:
            j = min(fits, key=lambda j: max_len - loads[j])
            loads[j] += n
        else:
            loads.append(n)
    return sorted(loads)


def test_packs_never_split_a_sample_and_use_each_exactly_once():
    lengths = np.random.default_rng(1).integers(1, 5000, 20_000)
    packs = train.pack_best_fit(lengths, 8192, seed=3)
    used = np.concatenate(packs)
    assert sorted(used.tolist()) == list(range(len(lengths)))
    assert max(int(lengths[p].sum()) for p in packs) <= 8192


def test_best_fit_equals_the_obvious_implementation():
    for seed in range(5):
        lengths = np.random.default_rng(seed).integers(1, 700, 600)
        packs = train.pack_best_fit(lengths, 1024, seed=seed)
        assert sorted(int(lengths[p].sum()) for p in packs) == reference_best_fit_loads(lengths.tolist(), 1024)


def test_fill_at_32k_on_legal_lengths_is_at_least_99_percent_and_beats_greedy(shared):
    # token lengths shaped like legal SFT data: every LawBench item (both settings) at ~1.4
    # characters per token, resampled to 200k samples -- what bench/packing.py measures
    from bench.packing import lawbench_lengths
    lengths, _ = lawbench_lengths(os.path.join(shared, "data"), 200_000)
    assert 150 < np.median(lengths) < 1500 and lengths.max() > 4000  # short QA to long judgments
    ours = train.pack_best_fit(lengths, 32768)
    naive = greedy_pack(lengths, 32768)
    lower_bound = math.ceil(lengths.sum() / 32768)
    fill = train.fill_efficiency(ours, lengths, 32768)
    assert fill >= 0.99
    assert len(ours) <= len(naive)
    assert len(ours) - lower_bound <= 0.01 * lower_bound


def test_packing_is_deterministic_per_seed_and_epoch_and_reshuffled_across_epochs():
    lengths = np.random.default_rng(0).integers(1, 300, 3000)
    same = [p.tolist() for p in train.pack_best_fit(lengths, 2048, seed=7, epoch=1)]
    assert same == [p.tolist() for p in train.pack_best_fit(lengths, 2048, seed=7, epoch=1)]
    other = [p.tolist() for p in train.pack_best_fit(lengths, 2048, seed=7, epoch=2)]
    assert other != same and len(other) == len(same)  # a new order, as good a packing
    assert [p.tolist() for p in train.pack_best_fit(lengths, 2048, seed=8, epoch=1)] != same


def test_packing_rejects_lengths_it_cannot_place():
    with pytest.raises(ValueError):
        train.pack_best_fit([10, 2049], 2048)


def test_oversize_and_untrainable_samples_are_counted_never_lost():
    lengths = [10, 5000, 20, 6000, 30]
    n_trained = [5, 100, 0, 50, 10]
    idx, sel, counts = train.select_samples(lengths, n_trained, 4096, "drop")
    assert idx.tolist() == [0, 4] and sel.tolist() == [10, 30]
    assert counts == {"read": 5, "no_trained_tokens": 1, "too_long_dropped": 2, "kept": 2}
    idx, sel, counts = train.select_samples(lengths, n_trained, 4096, "truncate")
    assert idx.tolist() == [0, 1, 3, 4] and sel.tolist() == [10, 4096, 4096, 30]
    assert counts == {"read": 5, "no_trained_tokens": 1, "too_long_truncated": 2, "too_long_no_trained_tokens_left": 0,
                      "kept": 4}
    # with trained tokens only beyond 4096, sample 3 has none left once truncated: dropped, counted
    idx, sel, counts = train.select_samples(lengths, n_trained, 4096, "truncate", [5, 100, 0, 0, 10])
    assert idx.tolist() == [0, 1, 4] and counts["too_long_no_trained_tokens_left"] == 1 and counts["kept"] == 3


def test_step_plan_gives_every_pack_once_and_every_rank_accum_micro_batches_per_step():
    for n_packs, world, accum in [(10, 1, 3), (10, 2, 2), (7, 4, 1), (3, 4, 2), (16, 4, 4), (1, 2, 2)]:
        plan = train.step_plan(n_packs, world, accum)
        seen = [p for step in plan for rank in step for p in rank if p is not None]
        assert sorted(seen) == list(range(n_packs))
        assert len(plan) == math.ceil(n_packs / (world * accum))
        for step in plan:
            assert len(step) == world and all(len(r) == accum for r in step)
            assert step[0][0] is not None  # the filler for empty slots


def test_lr_schedule_warms_up_linearly_then_follows_a_cosine():
    lrs = [train.lr_at(s, 100, 10, 1e-5, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-6) and lrs[9] == pytest.approx(1e-5)
    assert lrs[10] == pytest.approx(1e-5)
    assert lrs[55] == pytest.approx(1e-6 + 0.5 * 9e-6)  # half way through the cosine
    assert lrs[-1] == pytest.approx(1e-6, rel=1e-2)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))


# ---------------------------------------------------------------------------------------------
# The collator

def test_collator_restarts_positions_masks_each_first_label_and_marks_boundaries():
    samples = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]},
               {"input_ids": [8, 9], "labels": [-100, 9]},
               {"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4]}]
    b = train.collate_pack(samples, 16)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, 1, 2, 3, 4]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    # the first token of every sample is never a target: nothing is trained across a boundary
    assert b["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, -100, 3, 4]]
    assert b["cu_seqlens"].tolist() == [0, 3, 5, 9] and b["max_seqlen"] == 4
    assert train.trained_tokens(b["labels"]) == 5
    with pytest.raises(ValueError):
        train.collate_pack(samples, 8)


def test_trained_tokens_and_max_id_read_from_arrow_match_the_rows(demo_prepared):
    from datasets import load_from_disk
    ds = load_from_disk(os.path.join(demo_prepared, "stage1"))
    expected = [sum(y != -100 for y in lab[1:]) for lab in ds["labels"]]
    counts, within, max_id = train.scan_tokens(ds, 256)
    assert counts.tolist() == expected and sum(expected) > 0
    assert within.tolist() == [sum(y != -100 for y in lab[1:256]) for lab in ds["labels"]] != expected
    assert max_id == max(max(ids) for ids in ds["input_ids"])


# ---------------------------------------------------------------------------------------------
# Packed == unpacked

@pytest.mark.parametrize("kind,attn", [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa")])
def test_packed_forward_equals_per_sample_forwards_logits_loss_and_every_gradient(kind, attn):
    model = tiny_model(kind, attn)
    samples = random_samples(5, seed=1)
    b = train.collate_pack(samples, 512)
    # logits: each sample's slice of the packed row equals the sample run alone
    with torch.no_grad():
        packed = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits[0]
        for s, start, end in zip(samples, b["cu_seqlens"][:-1], b["cu_seqlens"][1:], strict=True):
            alone = model(input_ids=torch.tensor([s["input_ids"]])).logits[0]
            torch.testing.assert_close(packed[start:end], alone, atol=ATOL, rtol=RTOL)
    # loss and gradients: our packed, chunked loss vs per-sample full cross-entropy
    model.zero_grad()
    ours = train.packed_loss_sum(model, b, chunk=16)
    ours.backward()
    g_packed = grads(model)
    model.zero_grad()
    ref = per_sample_loss_sum(model, samples)
    ref.backward()
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=RTOL)
    assert_same_grads(g_packed, grads(model))


def test_an_all_ones_attention_mask_would_let_packed_samples_see_each_other():
    """The failure mode the collator avoids: with a 2D all-ones mask transformers no longer reads
    the boundaries from position_ids, and the second sample attends to the first."""
    model = tiny_model()
    samples = random_samples(2, seed=2, min_len=10)
    b = train.collate_pack(samples, 512)
    n0 = len(samples[0]["input_ids"])
    with torch.no_grad():
        leaky = model(input_ids=b["input_ids"], position_ids=b["position_ids"],
                      attention_mask=torch.ones_like(b["input_ids"]), use_cache=False).logits[0, n0:]
        alone = model(input_ids=torch.tensor([samples[1]["input_ids"]])).logits[0]
    assert (leaky - alone).abs().max() > 1e-3


def test_isolation_self_check_passes_for_real_attention_and_catches_a_leak():
    lm = tiny_model()
    assert train.check_isolation(lm) < 1e-5

    class Leaky:  # the same model, called the way that silently disables isolation
        config = lm.config

        def parameters(self):
            return lm.parameters()

        def model(self, **kw):
            return lm.model(attention_mask=torch.ones_like(kw["input_ids"]), **kw)

    with pytest.raises(RuntimeError, match="not isolated"):
        train.check_isolation(Leaky())


# ---------------------------------------------------------------------------------------------
# The token-level mean over the whole step

def test_accumulating_micro_batches_of_different_sizes_equals_one_big_batch():
    model = tiny_model()
    samples = random_samples(9, seed=4)
    micro = [train.collate_pack(samples[:1], 512), train.collate_pack(samples[1:3], 512),
             train.collate_pack(samples[3:], 512)]
    counts = [train.trained_tokens(b["labels"]) for b in micro]
    assert len(set(counts)) == 3  # really different token counts
    runner = train.PackedLM(model, chunk=8)
    model.zero_grad()
    loss_sum = train.forward_backward(runner, micro, [False] * 3, sum(counts), 1, torch.device("cpu"))
    g_accum = grads(model)
    # one big batch: all samples in one pack, mean over all its trained tokens
    model.zero_grad()
    big = train.collate_pack(samples, 1024)
    n = train.trained_tokens(big["labels"])
    assert n == sum(counts)
    big_loss = train.packed_loss_sum(model, big, chunk=1024) / n
    big_loss.backward()
    assert loss_sum / n == pytest.approx(big_loss.item(), rel=1e-6)
    assert_same_grads(g_accum, grads(model))
    # and the per-micro-batch mean (HF Trainer's pre-2024 behaviour) really is different
    model.zero_grad()
    wrong = sum(train.packed_loss_sum(model, b, 8) / c for b, c in zip(micro, counts, strict=True)) / len(micro)
    assert abs(wrong.item() - big_loss.item()) > 1e-3


def test_a_filler_micro_batch_changes_nothing():
    model = tiny_model()
    samples = random_samples(4, seed=5)
    real = [train.collate_pack(samples[:2], 512), train.collate_pack(samples[2:], 512)]
    runner = train.PackedLM(model, chunk=8)
    n = sum(train.trained_tokens(b["labels"]) for b in real)
    model.zero_grad()
    a = train.forward_backward(runner, real, [False, False], n, 1, torch.device("cpu"))
    g = grads(model)
    model.zero_grad()
    b = train.forward_backward(runner, real + [real[0]], [False, False, True], n, 1, torch.device("cpu"))
    assert a == pytest.approx(b)
    assert_same_grads(g, grads(model), atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_flops_estimate_matches_torchs_flop_counter(kind):
    """The MFU numerator, against torch's own count of one forward + backward. Eager attention
    computes the full square of scores, twice our causal half; everything else must agree."""
    from torch.utils.flop_counter import FlopCounterMode
    model = tiny_model(kind, "eager")
    T = 37
    ids = torch.randint(0, 97, (1, T), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    c = model.config
    causal_half = 6 * c.num_hidden_layers * c.hidden_size * T * T
    ours = train.step_flops(c, train.matmul_params(model), [T])
    assert counter.get_total_flops() == ours + causal_half


# ---------------------------------------------------------------------------------------------
# Chunked cross-entropy

@pytest.mark.parametrize("chunk", [1, 7, 16, 64, 1000])
def test_chunked_ce_equals_full_ce_values_and_gradients(chunk):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(61, 24, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(300, 24, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 300, (61,), generator=g)
    ours = train.ChunkedLMHeadCE.apply(hidden, weight, targets, chunk)
    gh, gw = torch.autograd.grad(ours * 0.37, [hidden, weight])  # a non-unit upstream gradient
    full = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    rh, rw = torch.autograd.grad(full * 0.37, [hidden, weight])
    torch.testing.assert_close(ours, full, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(gh, rh, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(gw, rw, atol=1e-10, rtol=1e-10)


def test_chunked_ce_in_bf16_matches_the_full_logits_path_that_hf_models_take():
    """bf16 hidden states and weights, fp32 softmax: the same numerics as lm_head in bf16 followed
    by an fp32 cross-entropy, as transformers' own loss does it."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(40, 64, generator=g).bfloat16().requires_grad_()
    weight = (torch.randn(500, 64, generator=g) * 0.1).bfloat16().requires_grad_()
    targets = torch.randint(0, 500, (40,), generator=g)
    ours = train.ChunkedLMHeadCE.apply(hidden, weight, targets, 8)
    gh, gw = torch.autograd.grad(ours, [hidden, weight])
    full = F.cross_entropy((hidden @ weight.T).float(), targets, reduction="sum")
    rh, rw = torch.autograd.grad(full, [hidden, weight])
    torch.testing.assert_close(ours, full, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(gh.float(), rh.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(gw.float(), rw.float(), atol=2e-2, rtol=2e-2)


def test_loss_only_runs_lm_head_on_trained_positions():
    model = tiny_model()
    b = train.collate_pack(random_samples(3, seed=6), 512)
    seen = []
    orig = train.ChunkedLMHeadCE.apply
    try:
        train.ChunkedLMHeadCE.apply = lambda h, w, t, c: seen.append(h.shape[0]) or orig(h, w, t, c)
        train.packed_loss_sum(model, b, chunk=8)
    finally:
        train.ChunkedLMHeadCE.apply = orig
    assert seen == [train.trained_tokens(b["labels"])] and seen[0] < b["input_ids"].shape[1]


# ---------------------------------------------------------------------------------------------
# InternLM2 -> Llama


def internlm2_reference_logits(state, ids):
    """InternLM2's forward written from its modeling code, on its own weights: the fused wqkv
    projection is applied first and its output split per KV group (q_per_kv queries, 1 key,
    1 value), RoPE with rotate_half, GQA, causal softmax attention, SwiGLU, RMSNorm."""
    c = INTERNLM2
    h, kv, hid = c["num_attention_heads"], c["num_key_value_heads"], c["hidden_size"]
    d, q_per_kv, T = hid // h, h // kv, len(ids)

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c["rms_norm_eps"]))

    inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, d, 2).float() / d))
    ang = torch.outer(torch.arange(T).float(), inv)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rope(x):  # x: [heads, T, d]
        rot = torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1)
        return x * cos + rot * sin

    x = state["model.tok_embeddings.weight"][ids]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = rms(x, state[p + "attention_norm.weight"])
        qkv = (a @ state[p + "attention.wqkv.weight"].T).view(T, kv, q_per_kv + 2, d)
        q = qkv[:, :, :q_per_kv].reshape(T, h, d).transpose(0, 1)
        k = qkv[:, :, -2].transpose(0, 1).repeat_interleave(q_per_kv, 0)
        v = qkv[:, :, -1].transpose(0, 1).repeat_interleave(q_per_kv, 0)
        q, k = rope(q), rope(k)
        scores = q @ k.transpose(1, 2) / math.sqrt(d)
        scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
        o = (scores.softmax(-1) @ v).transpose(0, 1).reshape(T, h * d)
        x = x + o @ state[p + "attention.wo.weight"].T
        m = rms(x, state[p + "ffn_norm.weight"])
        x = x + (F.silu(m @ state[p + "feed_forward.w1.weight"].T) * (m @ state[p + "feed_forward.w3.weight"].T)) \
            @ state[p + "feed_forward.w2.weight"].T
    return rms(x, state["model.norm.weight"]) @ state["output.weight"].T


@pytest.mark.parametrize("rope_scaling", [None, {"type": "dynamic", "factor": 2.0}])  # the latter: InternLM2-Chat-7B's
def test_converted_internlm2_gives_the_logits_of_internlm2s_own_forward(tmp_path, bpe_tokenizer, rope_scaling):
    src, dst = str(tmp_path / "internlm2"), str(tmp_path / "llama")
    state = make_internlm2_checkpoint(src, bpe_tokenizer, rope_scaling=rope_scaling)
    train.convert_internlm2(src, dst)
    assert train.is_internlm2(src) and not train.is_internlm2(dst)
    model = LlamaForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()  # no remote code
    assert model.config.rope_parameters["rope_type"] == (rope_scaling or {}).get("type", "default")
    ids = torch.tensor([5, 17, 3, 99, 42, 8, 64, 11, 0, 7])
    with torch.no_grad():
        ours = model(input_ids=ids[None]).logits[0]
    torch.testing.assert_close(ours, internlm2_reference_logits(state, ids), atol=1e-5, rtol=1e-5)
    # the converted model trains on packs with isolation like any Llama
    assert train.check_isolation(model) < 1e-5
    assert os.path.exists(os.path.join(dst, "model.safetensors.index.json"))
    assert os.path.exists(os.path.join(dst, "tokenizer.json"))


# ---------------------------------------------------------------------------------------------
# End to end on the demo data


@pytest.mark.slow
def test_a_short_run_on_the_demo_data_lowers_the_loss_and_saves_a_loadable_model(tmp_path, demo_prepared):
    base = save_tiny_llama(str(tmp_path / "tiny"), os.path.join(demo_prepared, "tokenizer"))
    out = str(tmp_path / "out")
    assert train.main(["--stage", "1", "--data", demo_prepared, "--model", base, "--out-dir", out,
                       "--max-len", "1024", "--lr", "2e-3", "--max-steps", "40", "--warmup-ratio", "0.1",
                       "--grad-accum", "2", "--log-every", "10", "--zero-stage", "0"]) == 0
    log = read_log(os.path.join(out, "stage1"))
    assert [r["step"] for r in log] == list(range(1, 41))
    first, last = np.mean([r["loss"] for r in log[:5]]), np.mean([r["loss"] for r in log[-5:]])
    assert last < first - 1.0, (first, last)
    assert all(r["fill"] > 0.5 for r in log)
    final = os.path.join(out, "stage1", "final")
    assert os.path.exists(os.path.join(final, "model.safetensors"))
    cfg = json.load(open(os.path.join(final, "train_config.json")))
    assert cfg["stage"] == 1 and cfg["data_counts"]["kept"] == cfg["data_counts"]["read"]
    reloaded = LlamaForCausalLM.from_pretrained(final)
    assert reloaded.config.vocab_size == LlamaConfig.from_pretrained(base).vocab_size


@pytest.mark.slow
def test_an_internlm2_base_model_is_converted_once_and_trained_as_llama(tmp_path, demo_prepared):
    src = str(tmp_path / "internlm2")
    tok = os.path.join(demo_prepared, "tokenizer")
    from transformers import AutoTokenizer
    make_internlm2_checkpoint(src, tok, vocab_size=len(AutoTokenizer.from_pretrained(tok)), dtype="bfloat16")
    out = str(tmp_path / "out")
    assert train.main(["--stage", "1", "--data", demo_prepared, "--model", src, "--out-dir", out,
                       "--max-len", "512", "--max-steps", "2", "--zero-stage", "0"]) == 0
    assert not train.is_internlm2(os.path.join(out, "base-llama"))
    cfg = json.load(open(os.path.join(out, "stage1", "final", "train_config.json")))
    assert cfg["model_resolved"] == os.path.join(out, "base-llama")
    assert len(read_log(os.path.join(out, "stage1"))) == 2
    # trained with fp32 master weights, saved in the checkpoint's own bf16
    from safetensors.torch import load_file
    final = os.path.join(out, "stage1", "final")
    assert {t.dtype for t in load_file(os.path.join(final, "model.safetensors")).values()} == {torch.bfloat16}
    assert LlamaForCausalLM.from_pretrained(final, dtype="auto").dtype == torch.bfloat16


@pytest.mark.slow
def test_two_ranks_give_the_loss_and_weights_of_one_rank_with_the_same_global_batch(tmp_path, demo_prepared):
    """torchrun with 2 processes (gloo), 1 pack each per step == 1 process accumulating 2 packs:
    the step's token mean is taken over both ranks, so the result can't depend on the split."""
    import subprocess
    import sys

    from safetensors.torch import load_file
    base = save_tiny_llama(str(tmp_path / "tiny"), os.path.join(demo_prepared, "tokenizer"))
    common = ["--stage", "1", "--data", demo_prepared, "--model", base, "--max-len", "512",
              "--max-steps", "3", "--lr", "1e-3", "--warmup-ratio", "0", "--zero-stage", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29517", train.__file__, *common, "--grad-accum", "1",
                          "--out-dir", str(tmp_path / "two")], env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks (OMP_NUM_THREADS=1): the same reduction order in every matmul
    try:
        assert train.main(common + ["--grad-accum", "2", "--out-dir", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    log1, log2 = read_log(str(tmp_path / "one" / "stage1")), read_log(str(tmp_path / "two" / "stage1"))
    assert [r["trained_tokens"] for r in log1] == [r["trained_tokens"] for r in log2]
    for a, b in zip(log1, log2, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    w1 = load_file(str(tmp_path / "one" / "stage1" / "final" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "stage1" / "final" / "model.safetensors"))
    w0 = load_file(os.path.join(base, "model.safetensors"))
    for name in w0:
        assert (w1[name] - w0[name]).abs().max() > 1e-4, name  # training moved it
        torch.testing.assert_close(w1[name], w2[name], atol=1e-5, rtol=0, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.slow
def test_the_merged_arm_trains_once_on_stage_1_and_stage_2_together_every_trained_token_once(tmp_path,
                                                                                                  demo_prepared):
    """The paper's one-run ablation: --stage merged starts from the base model, reads both stage
    datasets, and one epoch trains exactly the tokens of stage 1 plus those of stage 2 (counted
    here from the Arrow rows, independently of the packer and the collator)."""
    from datasets import load_from_disk
    base = save_tiny_llama(str(tmp_path / "tiny"), os.path.join(demo_prepared, "tokenizer"))
    out = str(tmp_path / "out")
    assert train.main(["--stage", "merged", "--data", demo_prepared, "--model", base, "--out-dir", out,
                       "--max-len", "2048", "--epochs", "1", "--zero-stage", "0", "--log-every", "1000"]) == 0
    assert sorted(os.listdir(out)) == ["merged"]  # not stage1/ or stage2/: the arms live side by side
    rows = {s: load_from_disk(os.path.join(demo_prepared, s)) for s in ("stage1", "stage2")}
    expected = sum(sum(1 for label in r["labels"][1:] if label != -100) for ds in rows.values() for r in ds)
    log = read_log(os.path.join(out, "merged"))
    assert sum(r["trained_tokens"] for r in log) == expected
    cfg = json.load(open(os.path.join(out, "merged", "final", "train_config.json")))
    assert cfg["stage"] == "merged" and cfg["model_resolved"] == base
    assert cfg["data_counts"]["read"] == len(rows["stage1"]) + len(rows["stage2"]) == cfg["data_counts"]["kept"]
    assert (cfg["data_counts"]["rows_stage1"], cfg["data_counts"]["rows_stage2"]) == (len(rows["stage1"]),
                                                                                       len(rows["stage2"]))
