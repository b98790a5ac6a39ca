"""
train.py -- full-parameter SFT on packed 32k sequences, the InternLM-Law way (arXiv 2406.14887).

Stage 1 trains the base chat model on legal + general data, stage 2 continues from stage 1 on
high-quality legal data only. Input is the output of prepare_data.py (Arrow datasets with
input_ids / labels / length, labels -100 except on assistant replies).

    python prepare_data.py --recipe recipe.json --tokenizer internlm/internlm2-chat-7b --out data/processed
    python train.py --stage 1 --model internlm/internlm2-chat-7b      # one process (small models, CPU)
    torchrun --nproc_per_node 8 train.py --stage 1                   # one node, data parallel
    torchrun --nproc_per_node 8 train.py --stage 2                   # starts from out/stage1/final

How a step works, and why:
  * Packing. Samples are bin-packed whole (best-fit decreasing) into sequences of at most
    --max-len tokens, so ~99% of every 32k sequence is real tokens instead of padding.
  * Isolation. Inside a pack, position_ids restart at 0 for each sample and no attention_mask is
    passed; transformers then builds a block-diagonal causal mask (sdpa/eager) or calls
    flash-attention's varlen kernel with our cu_seqlens, so no token sees another sample. A
    16-token self-check at start-up proves this for the model and attention actually used.
  * Loss. The sum of token losses over the whole optimizer step is divided by the number of
    trained tokens in that step, counted over all micro-batches and all ranks -- not a mean of
    per-micro-batch means, which over-weights tokens of short micro-batches.
  * Memory. lm_head + cross-entropy run in chunks of --loss-chunk tokens and are recomputed in
    backward, so the [32k x 92,544] fp32 logits (12 GB) never exist at once.
  * InternLM2. transformers has no InternLM2 class and the remote code does not isolate packed
    samples, so an InternLM2 checkpoint is converted once to the Llama layout (the fused wqkv is
    split per KV group) and trained as LlamaForCausalLM; the result loads without remote code.
"""
import argparse
import contextlib
import glob
import json
import math
import os
import random
import shutil
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# Packing


def pack_best_fit(lengths, max_len, seed=0, epoch=0):
    """Best-fit-decreasing bin packing of whole samples. Returns a list of packs, each an int64
    array of sample indices, in a shuffled order that depends only on (seed, epoch).

    Samples are visited longest first; each goes into the open pack whose free space is the
    smallest that still fits it. Equal lengths are visited in a random order per epoch, so the
    same samples don't always share a pack; the number of packs doesn't depend on that order.
    Every length must be in [1, max_len]."""
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
    for i, n in zip(order.tolist(), lengths[order].tolist()):
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


def fill_efficiency(packs, lengths, max_len):
    """Real tokens / capacity of the packs (1.0 = no padding at all)."""
    return float(sum(int(lengths[p].sum()) for p in packs)) / (len(packs) * max_len) if packs else 0.0


def select_samples(lengths, n_trained, max_len, oversize):
    """Which samples can be trained, and how long each will be. Longer-than-max_len samples are
    dropped or truncated (--oversize); samples with no trained token are dropped (they would
    add compute and nothing else). Returns (indices, lengths, counts by reason)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    n_trained = np.asarray(n_trained, dtype=np.int64)
    too_long = lengths > max_len
    counts = {"read": int(len(lengths)), "no_trained_tokens": int((n_trained == 0).sum())}
    keep = n_trained > 0
    if oversize == "drop":
        counts["too_long_dropped"] = int((too_long & keep).sum())
        keep &= ~too_long
    else:
        counts["too_long_truncated"] = int((too_long & keep).sum())
    idx = np.flatnonzero(keep)
    counts["kept"] = int(len(idx))
    return idx, np.minimum(lengths[idx], max_len), counts


def collate_pack(samples, max_len):
    """One packed sequence from a list of {input_ids, labels} samples (a batch of one row).

    labels stay aligned with input_ids (the model's logits at t are scored against labels[t+1]),
    and the first label of every sample is -100, so the last token of one sample is never trained
    to predict the first token of the next. position_ids restart at 0 per sample: that is how
    transformers recognises the boundaries, and what RoPE needs for the sample to be encoded
    exactly as if it were alone. cu_seqlens are the boundaries for varlen flash-attention."""
    ids, labels, pos, cu = [], [], [], [0]
    for s in samples:
        x, y = list(s["input_ids"][:max_len]), list(s["labels"][:max_len])
        y[0] = -100
        ids += x
        labels += y
        pos += range(len(x))
        cu.append(cu[-1] + len(x))
    if cu[-1] > max_len:
        raise ValueError(f"pack of {cu[-1]} tokens exceeds max_len {max_len}")
    return {
        "input_ids": torch.tensor([ids]),
        "labels": torch.tensor([labels]),
        "position_ids": torch.tensor([pos]),
        "cu_seqlens": torch.tensor(cu, dtype=torch.int32),
        "max_seqlen": max(b - a for a, b in zip(cu, cu[1:])),
    }


def trained_tokens(labels):
    """Number of positions that contribute to the loss (labels[1:] that aren't -100)."""
    return int((labels[..., 1:] != -100).sum())


# ----------------------------------------------------------------------------------------------
# Loss: lm_head + cross-entropy in chunks, recomputed in backward


class ChunkedLMHeadCE(torch.autograd.Function):
    """sum over rows of CE(hidden @ weight.T, targets), without keeping [rows x vocab] logits.

    Forward keeps only the log-sum-exp per row; backward recomputes each chunk's logits and
    turns them into the gradient (softmax - onehot) in place. Peak extra memory is one chunk of
    fp32 logits (chunk x vocab x 4 bytes) plus the fp32 weight gradient being accumulated."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):
        acc = torch.promote_types(hidden.dtype, torch.float32)  # softmax in fp32 (fp64 stays fp64)
        lse = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            logits = (hidden[s:s + chunk] @ weight.T).to(acc)
            lse[s:s + chunk] = torch.logsumexp(logits, dim=-1)
            total += (lse[s:s + chunk] - logits.gather(1, targets[s:s + chunk, None])[:, 0]).sum()
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk = chunk
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, targets, lse = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device)
        for s in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[s:s + ctx.chunk]
            g = (h @ weight.T).to(lse.dtype)
            g.sub_(lse[s:s + ctx.chunk, None]).exp_()  # softmax, in place
            g[torch.arange(len(h), device=g.device), targets[s:s + ctx.chunk]] -= 1.0
            g.mul_(grad_total)
            grad_weight.addmm_(g.T, h.to(lse.dtype))
            grad_hidden[s:s + ctx.chunk] = g.to(hidden.dtype) @ weight
        return grad_hidden, grad_weight.to(weight.dtype), None, None


def lm_loss_sum(hidden, lm_head_weight, labels, chunk):
    """Sum of next-token CE over the trained positions of a [1, T, H] hidden-state row.
    Only rows with a target go through lm_head: prompt tokens cost nothing here."""
    targets = labels[:, 1:].reshape(-1)
    keep = targets != -100
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])[keep]
    return ChunkedLMHeadCE.apply(h, lm_head_weight.to(h.dtype), targets[keep], chunk)


def packed_loss_sum(model, batch, chunk, flash=False):
    """Forward one pack through a causal LM; return the summed CE of its trained tokens.

    No attention_mask and use_cache=False: that is the state in which transformers reads sample
    boundaries from position_ids (with a cache, or with an all-ones mask, it would silently let
    the samples attend to each other). For flash-attention the boundaries go in explicitly."""
    extra = {}
    if flash:
        cu = batch["cu_seqlens"].to(batch["input_ids"].device)
        extra = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=batch["max_seqlen"],
                     max_length_k=batch["max_seqlen"])
    out = model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False, **extra)
    return lm_loss_sum(out.last_hidden_state, model.lm_head.weight, batch["labels"], chunk)


class PackedLM(torch.nn.Module):
    """The model plus its packed loss as one forward, so that DDP (or DeepSpeed) wraps a single
    call: their gradient hooks are armed by the wrapper's forward, not by the model's."""

    def __init__(self, model, chunk, flash):
        super().__init__()
        self.model, self.chunk, self.flash = model, chunk, flash

    def forward(self, batch):
        return packed_loss_sum(self.model, batch, self.chunk, self.flash)


def scan_tokens(ds):
    """(trained positions per sample, i.e. labels[1:] != -100; the largest token id), read from
    Arrow in record batches so that a million samples never become Python lists."""
    import pyarrow.compute as pc
    counts, max_id = [], -1
    for rb in ds.data.to_batches(max_chunksize=8192):
        labels = rb.column(rb.schema.get_field_index("labels"))
        flat = pc.list_flatten(labels).to_numpy(zero_copy_only=False)
        parent = pc.list_parent_indices(labels).to_numpy(zero_copy_only=False)
        n = np.bincount(parent, weights=flat != -100, minlength=len(labels)).astype(np.int64)
        first = pc.list_element(labels, 0).to_numpy(zero_copy_only=False)
        counts.append(n - (first != -100))
        ids_max = pc.max(pc.list_flatten(rb.column(rb.schema.get_field_index("input_ids")))).as_py()
        max_id = max(max_id, -1 if ids_max is None else ids_max)
    return (np.concatenate(counts) if counts else np.zeros(0, dtype=np.int64)), max_id


def check_isolation(model, flash=False):
    """Prove on the real model and attention implementation that packed samples don't see each
    other: the hidden states of a sample inside a pack must equal those of the sample alone.
    Run it under the training autocast: flash-attention only runs in 16-bit."""
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(3, vocab, (9,), generator=g), torch.randint(3, vocab, (7,), generator=g)
    dev = next(model.parameters()).device
    samples = [{"input_ids": a, "labels": a}, {"input_ids": b, "labels": b}]
    packed = collate_pack(samples, len(a) + len(b))
    extra = {}
    if flash:
        cu = packed["cu_seqlens"].to(dev)
        extra = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9, max_length_k=9)
    with torch.no_grad():
        h = model.model(input_ids=packed["input_ids"].to(dev), position_ids=packed["position_ids"].to(dev),
                        use_cache=False, **extra).last_hidden_state[0, len(a):].float()
        alone = model.model(input_ids=b[None].to(dev), use_cache=False).last_hidden_state[0].float()
    err = ((h - alone).abs().max() / alone.abs().max().clamp(min=1e-6)).item()
    exact = not torch.is_autocast_enabled(dev.type) and next(model.parameters()).dtype == torch.float32
    tol = 1e-4 if exact else 5e-2  # a leak changes the first tokens of the second sample by O(1)
    if not err <= tol:
        raise RuntimeError(
            f"packed samples are not isolated with attn_implementation={model.config._attn_implementation!r}: "
            f"a sample inside a pack differs from the same sample alone by {err:.3g} (relative, tolerance "
            f"{tol:g}). Use --attn sdpa or flash_attention_2.")
    return err


# ----------------------------------------------------------------------------------------------
# InternLM2 -> Llama layout

INTERNLM2_RENAMES = [
    ("model.tok_embeddings.", "model.embed_tokens."),
    (".attention.wo.", ".self_attn.o_proj."),
    (".feed_forward.w1.", ".mlp.gate_proj."),
    (".feed_forward.w3.", ".mlp.up_proj."),
    (".feed_forward.w2.", ".mlp.down_proj."),
    (".attention_norm.", ".input_layernorm."),
    (".ffn_norm.", ".post_attention_layernorm."),
    ("output.", "lm_head."),
]


def llama_config_from_internlm2(cfg):
    """LlamaConfig with the same architecture as an InternLM2 config.json (a dict)."""
    from transformers import LlamaConfig
    if cfg.get("bias"):
        raise ValueError("InternLM2 checkpoints with attention bias have no Llama equivalent")
    # InternLM2-Chat-7B uses {"type": "dynamic", "factor": 2.0}: NTK scaling beyond 32k only
    rope = {"rope_type": "default", "rope_theta": cfg.get("rope_theta", 10000.0)}
    scaling = dict(cfg.get("rope_scaling") or {})
    if scaling:
        rope["rope_type"] = scaling.pop("type", scaling.pop("rope_type", "default"))
        rope.update(scaling)
    return LlamaConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
        hidden_act=cfg.get("hidden_act", "silu"), max_position_embeddings=cfg["max_position_embeddings"],
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_parameters=rope, tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"),
        pad_token_id=cfg.get("pad_token_id"), attention_bias=False, architectures=["LlamaForCausalLM"],
        dtype=cfg.get("torch_dtype", cfg.get("dtype", "bfloat16")))


def internlm2_to_llama_tensors(state, n_heads, n_kv_heads):
    """Rename InternLM2 tensors to Llama's and split each fused wqkv.

    InternLM2 stores wqkv as [n_kv_heads x (q_per_kv + 2) x head_dim, hidden]: for each KV group,
    its q_per_kv query heads, then its key head, then its value head. Llama wants all query
    heads, then all key heads, then all value heads, each in their own matrix."""
    out = {}
    for name, w in state.items():
        if ".attention.wqkv." in name:
            q_per_kv = n_heads // n_kv_heads
            g = w.reshape(n_kv_heads, q_per_kv + 2, -1, *w.shape[1:])  # bias or weight alike
            prefix, suffix = name.split(".attention.wqkv.")
            out[f"{prefix}.self_attn.q_proj.{suffix}"] = g[:, :q_per_kv].reshape(-1, *w.shape[1:]).clone()
            out[f"{prefix}.self_attn.k_proj.{suffix}"] = g[:, -2].reshape(-1, *w.shape[1:]).clone()
            out[f"{prefix}.self_attn.v_proj.{suffix}"] = g[:, -1].reshape(-1, *w.shape[1:]).clone()
            continue
        for old, new in INTERNLM2_RENAMES:
            if name.startswith(old) or old in name and old.startswith("."):
                name = new + name[len(old):] if name.startswith(old) else name.replace(old, new)
                break
        out[name] = w
    return out


def weight_files(path):
    """The checkpoint's weight shards: safetensors preferred, PyTorch .bin otherwise."""
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    return files or sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))


def convert_internlm2(src, dst, trust_remote_code=False):
    """Write a Llama-layout copy of the InternLM2 checkpoint `src` to `dst` (atomically), shard
    by shard so memory stays at one shard. The tokenizer and its chat template come along."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer
    from prepare_data import replace_dir
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    files = weight_files(src)
    if not files:
        raise FileNotFoundError(f"{src}: no *.safetensors or pytorch_model*.bin weight files")
    tmp = dst.rstrip("/") + f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    weight_map = {}
    for i, file in enumerate(files):
        state = load_file(file) if file.endswith(".safetensors") else torch.load(file, map_location="cpu", weights_only=True)
        state = internlm2_to_llama_tensors(state, cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"]))
        shard = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(tmp, shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in state})
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
    llama_config_from_internlm2(cfg).save_pretrained(tmp)
    try:
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
    except Exception:
        # InternLM2's tokenizer class is remote code, but its tokenizer.model is a plain
        # sentencepiece model that LlamaTokenizer reads (InternLM's own convert2llama does this).
        from transformers import LlamaTokenizer
        tok = LlamaTokenizer.from_pretrained(src)
    tok.init_kwargs.pop("auto_map", None)
    tok.save_pretrained(tmp)
    replace_dir(tmp, dst)
    return dst


def is_internlm2(path):
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        return False
    with open(cfg_file) as f:
        return json.load(f).get("model_type") == "internlm2"


# ----------------------------------------------------------------------------------------------
# Model, schedule, saving


def pick_attention(requested, device):
    if requested != "auto":
        return requested
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401
            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def load_model(path, dtype, attn, trust_remote_code):
    """(model in `dtype`, the dtype its checkpoint was stored in)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    stored = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).dtype
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn,
                                                 trust_remote_code=trust_remote_code)
    model.config.use_cache = False
    for attr in ("model", "lm_head"):
        if not hasattr(model, attr):
            raise ValueError(f"{path}: expected a decoder-only LM with .model and .lm_head "
                             f"(Llama, Qwen2, Mistral, converted InternLM2 ...), got {type(model).__name__}")
    stored = getattr(torch, stored) if isinstance(stored, str) else stored
    return model, stored if isinstance(stored, torch.dtype) else torch.float32


def lr_at(step, total, warmup, peak, min_ratio):
    """Linear warmup over `warmup` steps, then cosine decay to min_ratio * peak at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def step_plan(n_packs, world, accum):
    """Split an epoch's packs into optimizer steps: each step gives every rank `accum` packs,
    rank r taking every world-th one. The last step takes what is left, with equal micro-batch
    counts on all ranks (None = a rank with nothing left runs a zero-weight repeat, so that the
    gradient all-reduce still lines up). No pack is dropped."""
    per_step = world * accum
    steps = []
    for s in range(0, n_packs, per_step):
        ids = list(range(s, min(s + per_step, n_packs)))
        k = math.ceil(len(ids) / world)
        steps.append([[ids[j] if j < len(ids) else None for j in range(r, k * world, world)] for r in range(world)])
    return steps


def save_model(model, tokenizer, out, dtype=None, extra_files=None):
    """Hugging Face folder (safetensors + config + tokenizer + chat template), written atomically.
    Weights are stored in `dtype` (the starting checkpoint's, e.g. bf16), not the fp32 masters."""
    from prepare_data import replace_dir
    tmp = out.rstrip("/") + f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    state = {k: v.to(dtype) if dtype and v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.save_pretrained(tmp, state_dict=state)
    if dtype:  # save_pretrained records the in-memory (fp32) dtype; from_pretrained(dtype="auto") reads this
        cfg_file = os.path.join(tmp, "config.json")
        with open(cfg_file) as f:
            cfg = json.load(f)
        cfg["dtype"] = str(dtype).removeprefix("torch.")
        with open(cfg_file, "w") as f:
            json.dump(cfg, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    for name, obj in (extra_files or {}).items():
        with open(os.path.join(tmp, name), "w") as f:
            json.dump(obj, f, indent=1, ensure_ascii=False)
    replace_dir(tmp, out)


# ----------------------------------------------------------------------------------------------
# Main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", type=int, choices=[1, 2], required=True,
                   help="1: legal + general data from the base model; 2: high-quality legal data from stage 1's weights")
    p.add_argument("--model", help="starting weights (HF folder or hub id). Default: internlm/internlm2-chat-7b for "
                   "stage 1, <out-dir>/stage1/final for stage 2. InternLM2 checkpoints are converted to the Llama "
                   "layout first (into <out-dir>/base-llama)")
    p.add_argument("--data", help="prepare_data.py output folder holding stage1/, stage2/ and tokenizer/ "
                   "(default data/processed)", default="data/processed")
    p.add_argument("--out-dir", default="out", help="runs go to <out-dir>/stage<N>/ (default %(default)s)")
    p.add_argument("--max-len", type=int, default=32768, help="tokens per packed sequence (default %(default)s, as the paper)")
    p.add_argument("--oversize", choices=["drop", "truncate"], default="drop",
                   help="samples longer than --max-len: drop them, or keep their first --max-len tokens (counted either way)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the stage's data (default %(default)s)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (overrides --epochs)")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="packs per rank per optimizer step; global batch = world size x this x --max-len tokens (default %(default)s)")
    p.add_argument("--lr", type=float, default=1e-5, help="peak learning rate (default %(default)s)")
    p.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine decays to this fraction of --lr (default %(default)s)")
    p.add_argument("--warmup-ratio", type=float, default=0.03, help="share of steps with linear warmup (default %(default)s)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default %(default)s)")
    p.add_argument("--betas", type=float, nargs=2, default=[0.9, 0.95], help="AdamW betas (default 0.9 0.95)")
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping; 0 disables (default %(default)s)")
    p.add_argument("--loss-chunk", type=int, default=2048,
                   help="tokens per lm_head + cross-entropy chunk; peak loss memory ~ chunk x vocab x 8 bytes (default %(default)s)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="compute precision: bf16 autocast with fp32 master weights, or fp32 (auto: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--attn", default="auto", help="attention implementation: sdpa, flash_attention_2, eager "
                   "(auto: flash_attention_2 on GPU if installed, else sdpa)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute activations in backward (default: on for GPU, off on CPU)")
    p.add_argument("--seed", type=int, default=42, help="packing, shuffling and init seed (default %(default)s)")
    p.add_argument("--log-every", type=int, default=1, help="print a line every N steps (default %(default)s)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model/tokenizer code from the checkpoint folder")
    return p.parse_args(argv)


def forward_backward(runner, batches, real, n_step, world, device, autocast=contextlib.nullcontext()):
    """Forward and backward of this rank's micro-batches of one optimizer step; returns their
    summed token loss. Each micro-batch's loss sum is scaled by world / n_step, n_step being the
    trained tokens of the whole step on all ranks: the accumulated gradient is then exactly that
    of (sum of all token losses) / (all trained tokens), once DDP has averaged it over `world`
    ranks. real[k] False marks a filler micro-batch (weight 0) that only keeps ranks in step."""
    ddp = isinstance(runner, torch.nn.parallel.DistributedDataParallel)
    loss_sum = 0.0
    for k, (b, is_real) in enumerate(zip(batches, real)):
        b = {key: v.to(device) if torch.is_tensor(v) else v for key, v in b.items()}
        # DDP all-reduces gradients only in the backward of the step's last micro-batch
        with runner.no_sync() if ddp and k < len(batches) - 1 else contextlib.nullcontext(), autocast:
            s = runner(b)
        (s * (world / n_step if is_real else 0.0)).backward()
        loss_sum += s.item() if is_real else 0.0
    return loss_sum


def setup_distributed():
    """(rank, world, local_rank, device) -- torchrun sets the env vars; a plain run is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, local, device


def all_sum(x, device):
    """Sum a number over ranks (identity when not distributed)."""
    t = torch.tensor(float(x), dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.item()


def main(argv=None):
    args = parse_args(argv)
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    rank, world, _, device = setup_distributed()
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    run_dir = os.path.join(args.out_dir, f"stage{args.stage}")
    data_dir = os.path.join(args.data, f"stage{args.stage}")
    if not os.path.isdir(data_dir):
        sys.exit(f"error: {data_dir} not found: run prepare_data.py --out {args.data} first")
    tok_dir = os.path.join(args.data, "tokenizer")
    model_path = args.model or ("internlm/internlm2-chat-7b" if args.stage == 1
                                else os.path.join(args.out_dir, "stage1", "final"))
    if args.stage == 2 and args.model is None and not os.path.isdir(model_path):
        sys.exit(f"error: stage 2 starts from stage 1's weights, but {model_path} does not exist")
    if is_internlm2(model_path):
        converted = os.path.join(args.out_dir, "base-llama")
        if master and not os.path.isdir(converted):
            log(f"converting InternLM2 checkpoint {model_path} to the Llama layout in {converted}")
            convert_internlm2(model_path, converted, args.trust_remote_code)
        if dist.is_initialized():
            dist.barrier()
        model_path = converted

    # --- data: select, pack, plan steps
    ds = load_from_disk(data_dir)
    lengths = ds.data.column("length").to_numpy().astype(np.int64)
    n_trained, max_id = scan_tokens(ds)
    idx, sel_len, counts = select_samples(lengths, n_trained, args.max_len, args.oversize)
    if not len(idx):
        sys.exit(f"error: no trainable sample in {data_dir} (counts: {counts})")
    packs0 = pack_best_fit(sel_len, args.max_len, args.seed, 0)
    steps_per_epoch = len(step_plan(len(packs0), world, args.grad_accum))
    total_steps = args.max_steps or max(1, math.ceil(args.epochs * steps_per_epoch))
    warmup = int(args.warmup_ratio * total_steps)
    log(f"data: {counts['read']} samples in {data_dir}, {counts['kept']} trainable ({counts}); "
        f"{len(packs0)} packs of <= {args.max_len} tokens, fill {fill_efficiency(packs0, sel_len, args.max_len):.2%}; "
        f"{steps_per_epoch} steps/epoch on {world} rank(s) x {args.grad_accum} packs; {total_steps} steps")

    # --- model
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    attn = pick_attention(args.attn, device)
    flash = attn.startswith("flash")
    model, stored_dtype = load_model(model_path, torch.float32, attn, args.trust_remote_code)
    model.to(device)
    gc = args.gradient_checkpointing if args.gradient_checkpointing is not None else device.type == "cuda"
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if max_id >= model.config.vocab_size:
        sys.exit(f"error: {data_dir} has token id {max_id} but {model_path} has only {model.config.vocab_size} "
                 "embeddings: the data was tokenized for another model (prepare_data.py --tokenizer)")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    with autocast:
        err = check_isolation(model, flash)
    log(f"model: {model_path} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), attention {attn}, "
        f"compute {dtype}, gradient checkpointing {'on' if gc else 'off'}; packed-sample isolation checked (err {err:.1e})")
    tokenizer = AutoTokenizer.from_pretrained(tok_dir if os.path.isdir(tok_dir) else model_path,
                                              trust_remote_code=args.trust_remote_code)
    model.train()
    packed_lm = PackedLM(model, args.loss_chunk, flash)
    ddp = torch.nn.parallel.DistributedDataParallel(packed_lm) if world > 1 else None
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=tuple(args.betas))

    # --- training loop
    os.makedirs(run_dir, exist_ok=True)
    log_path = os.path.join(run_dir, "log.jsonl")
    log_file = open(log_path, "w") if master else None
    step, epoch, t_start = 0, 0, time.time()
    while step < total_steps:
        packs = pack_best_fit(sel_len, args.max_len, args.seed, epoch)
        for plan in step_plan(len(packs), world, args.grad_accum):
            if step >= total_steps:
                break
            t0 = time.time()
            lr = lr_at(step, total_steps, warmup, args.lr, args.min_lr_ratio)
            for group in opt.param_groups:
                group["lr"] = lr
            mine = plan[rank]
            batches = [collate_pack(ds.select(idx[packs[p if p is not None else plan[0][0]]]), args.max_len) for p in mine]
            n_step = all_sum(sum(trained_tokens(b["labels"]) for b, p in zip(batches, mine) if p is not None), device)
            loss_sum = forward_backward(ddp or packed_lm, batches, [p is not None for p in mine], n_step, world,
                                        device, autocast)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip if args.clip > 0 else float("inf")).item()
            if not math.isfinite(grad_norm) or not math.isfinite(loss_sum):
                sys.exit(f"error: non-finite loss or gradient at step {step} (loss sum {loss_sum}, grad norm {grad_norm}); stopping")
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss = all_sum(loss_sum, device) / n_step
            real = all_sum(sum(int(b["input_ids"].shape[1]) for b, p in zip(batches, mine) if p is not None), device)
            dt = time.time() - t0
            rec = {"step": step + 1, "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                   "trained_tokens": int(n_step), "tokens": int(real), "tokens_per_s": real / dt,
                   "fill": real / (sum(p is not None for r in plan for p in r) * args.max_len), "time_s": dt}
            if master:
                log_file.write(json.dumps(rec) + "\n")
                log_file.flush()
                if (step + 1) % args.log_every == 0 or step + 1 == total_steps:
                    log(f"step {step + 1}/{total_steps}  loss {loss:.4f}  lr {lr:.2e}  grad-norm {grad_norm:.3f}  "
                        f"{real / dt:,.0f} tok/s")
            step += 1
        epoch += 1

    if master:
        log_file.close()
        config = {**vars(args), "model_resolved": model_path, "world_size": world, "attention": attn,
                  "compute_dtype": dtype, "total_steps": total_steps, "data_counts": counts}
        save_model(model, tokenizer, os.path.join(run_dir, "final"), stored_dtype, {"train_config.json": config})
        log(f"saved {os.path.join(run_dir, 'final')} after {step} steps in {time.time() - t_start:.0f}s; log {log_path}")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
