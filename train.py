"""
train.py -- full-parameter SFT on packed 32k sequences, the InternLM-Law way (arXiv 2406.14887).

Stage 1 trains the base chat model on legal + general data, stage 2 continues from stage 1 on
high-quality legal data only. Input is the output of prepare_data.py (Arrow datasets with
input_ids / labels / length, labels -100 except on assistant replies).

    python prepare_data.py --recipe recipe.json --tokenizer /models/internlm2-chat-7b --out data/processed
    torchrun --nproc_per_node 8 train.py --stage 1 --model /models/internlm2-chat-7b
    torchrun --nproc_per_node 8 train.py --stage 2            # starts from out/stage1/final
    # the paper's ablation arm: stage 1's and stage 2's data shuffled into one run (out/merged/)
    torchrun --nproc_per_node 8 train.py --stage merged --model /models/internlm2-chat-7b
    # several nodes (the paper: 8 x 8 A100-80GB), the same command on each node:
    torchrun --nnodes 8 --node_rank $NODE_RANK --nproc_per_node 8 --master_addr $MASTER --master_port 29500 \
        train.py --stage 1 --model /models/internlm2-chat-7b
    python train.py --stage 1 --model tiny/ --zero-stage 0     # one process, no DeepSpeed (CPU, small models)

DeepSpeed ZeRO-3 (bf16) from ds_config.json is the default; its "auto" values come from the flags.
A killed or preempted run continues where it stopped when the same command is run again
(--resume auto), also on another number of GPUs; SIGTERM writes a checkpoint first. Output:
out/stage<N>/ (or out/merged/): {log.jsonl, loss.png, train_config.json, checkpoints/, final/}; final/ is a Hugging
Face folder (safetensors, 16-bit, tokenizer and chat template) that evaluate.py and stage 2 load.

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
import functools
import glob
import inspect
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import sys
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist

from common import (
    atomic_write,
    fail,
    fill_efficiency,
    lock_folder,
    log,
    pack_best_fit,
    pyplot,
    read_jsonl,
    staged_folder,
    write_json,
)

# DeepSpeed 0.19 still calls two collectives that torch 2.13 deprecated, and torch's warning repeats
# at every call (~9,000 identical lines in one demo). Exactly those two are silenced: FutureWarning,
# raised from torch.distributed's call wrapper, with their message. Every other warning still shows.
for _collective in ("reduce_scatter_tensor", "all_gather_into_tensor"):
    warnings.filterwarnings("ignore", message=rf"`torch\.distributed\.{_collective}` is deprecated",
                            category=FutureWarning, module=r"torch\.distributed\.c10d_logger")

# ----------------------------------------------------------------------------------------------
# Packing. The packer itself (best-fit decreasing, pack_best_fit, and fill_efficiency) is in
# common.py: prepare_data.py's report counts the packs this script will make with the same code.


def select_samples(lengths, n_trained, max_len, oversize, n_trained_within=None):
    """Which samples can be trained, and how long each will be. Longer-than-max_len samples are
    dropped or truncated (--oversize); samples with no trained token are dropped (they would
    add compute and nothing else), and so are truncated samples whose trained tokens all lay
    beyond max_len (n_trained_within: trained positions among the first max_len tokens).
    Returns (indices, lengths, counts by reason)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    n_trained = np.asarray(n_trained, dtype=np.int64)
    within = n_trained if n_trained_within is None else np.asarray(n_trained_within, dtype=np.int64)
    too_long = lengths > max_len
    counts = {"read": int(len(lengths)), "no_trained_tokens": int((n_trained == 0).sum())}
    keep = n_trained > 0
    if oversize == "drop":
        counts["too_long_dropped"] = int((too_long & keep).sum())
        keep &= ~too_long
    else:
        lost = too_long & keep & (within == 0)
        counts["too_long_truncated"] = int((too_long & keep & ~lost).sum())
        counts["too_long_no_trained_tokens_left"] = int(lost.sum())
        keep &= ~lost
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
        "max_seqlen": max(b - a for a, b in zip(cu, cu[1:], strict=False)),
    }


def trained_tokens(labels):
    """Number of positions that contribute to the loss: common.trained_positions' rule (labels[1:]
    that aren't -100), on a tensor."""
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


def boundary_kwargs(batch, device):
    """The pack's sample boundaries as the forward kwargs every attention receives (varlen kernels
    use them; sdpa and eager ignore them and read the boundaries from position_ids)."""
    cu = batch["cu_seqlens"].to(device)
    return dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=batch["max_seqlen"], max_length_k=batch["max_seqlen"])


def packed_loss_sum(model, batch, chunk):
    """THE LOSS: the one place to change it (train.py calls nothing else for a loss; PackedLM wraps
    it for DDP/DeepSpeed). Forward one pack (collate_pack's batch) through the causal LM `model`
    and return the SUM of its token losses.

    The contract a replacement must keep:
      * return a sum over tokens, not a mean: forward_backward divides by the trained tokens of
        the whole optimizer step (all micro-batches, all ranks). Returning model(**batch).loss (a
        mean) would shrink every gradient by about the step's token count and log a wrong loss;
      * score position t against labels[t + 1], counting only labels != -100; the first label of
        every sample is already -100 (collate_pack), so no sample predicts its pack-mate's start,
        and trained_tokens() counts exactly the positions this sums over;
      * call the model without attention_mask and with use_cache=False, and pass the boundaries
        (boundary_kwargs): that is the state in which transformers reads the sample boundaries
        from position_ids and the varlen kernels get them explicitly (with a cache, or an all-ones
        mask, sdpa would silently let the samples attend to each other)."""
    out = model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                      **boundary_kwargs(batch, batch["input_ids"].device))
    return lm_loss_sum(out.last_hidden_state, model.lm_head.weight, batch["labels"], chunk)


class PackedLM(torch.nn.Module):
    """The model plus its packed loss as one forward, so that DDP (or DeepSpeed) wraps a single
    call: their gradient hooks are armed by the wrapper's forward, not by the model's."""

    def __init__(self, model, chunk):
        super().__init__()
        self.model, self.chunk = model, chunk

    def forward(self, batch):
        return packed_loss_sum(self.model, batch, self.chunk)


# ----------------------------------------------------------------------------------------------
# Attention over packs: the one place to swap it
#
# A pack is one row of several samples; each sample may attend only to its own earlier tokens.
# train.py hands every attention function the sample boundaries (cu_seq_lens_q/k: cumulative
# sample lengths, int32, and max_length_q/k) through the model's forward kwargs, whatever the
# attention is called. To try another kernel, write a function with the signature of
# `per_sample_sdpa` below and register it in `register_packed_attention`: that is the only place.
# (A mask-free attention sees the model's sliding window, if any, as a kwarg: the kernels apply it.)
#
#   varlen             PyTorch's own FlashAttention-2 varlen kernel (torch >= 2.10, CUDA sm80+):
#                      no extra package, O(sum of sample length^2), what --attn auto picks on GPUs
#   varlen_reference   the same slot with a per-sample sdpa loop: the reference the tests hold
#                      `varlen` to, and a way to run this code path on a CPU
#   flash_attention_2  the flash-attn package, through transformers' own integration
#   sdpa / eager       transformers builds a dense [T x T] block-diagonal mask from position_ids


def per_sample_sdpa(q, k, v, cu_seqlens, max_seqlen, scale, window=None):
    """Reference kernel: causal attention on each sample alone. q [T, Hq, D], k/v [T, Hkv, D]
    (Hq a multiple of Hkv), cu_seqlens [n+1] int32, scale (None: 1/sqrt(D)), window (None, or a
    sliding window: each token sees itself and the window-1 tokens before it); returns [T, Hq, D].
    Any kernel swapped in here must compute exactly this."""
    outs = []
    for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True):
        qs, ks, vs = (x[a:b].transpose(0, 1) for x in (q, k, v))
        mask = None
        if window is not None and b - a > window:
            i = torch.arange(b - a, device=q.device)
            mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=mask, is_causal=mask is None, scale=scale,
            enable_gqa=qs.shape[0] != ks.shape[0]).transpose(0, 1))
    return torch.cat(outs)


@functools.cache
def torch_varlen_kwargs(fn, n_q_heads, n_kv_heads, window):
    """Keyword arguments for the installed torch's varlen_attn, whose signature changed per release:
    2.10 takes is_causal; 2.11 takes window_size=(-1, 0) for causal (a tuple: it is compared with
    ==) and accepts fewer KV heads as they are; 2.12+ needs enable_gqa=True for fewer KV heads, and
    has num_splits, where 1 makes a sample's output bitwise independent of its pack-mates. A
    release without `scale` gets None here (the caller folds the scale into q)."""
    params = inspect.signature(fn).parameters
    if "window_size" in params:
        kw = {"window_size": (-1 if window is None else window - 1, 0)}
    elif window is None:
        kw = {"is_causal": True}
    else:
        kw = None  # a sliding window that this torch's kernel cannot apply
    if kw is not None and "enable_gqa" in params and n_q_heads != n_kv_heads:
        kw["enable_gqa"] = True
    if kw is not None and "num_splits" in params:
        kw["num_splits"] = 1
    return kw, "scale" in params


def torch_varlen(q, k, v, cu_seqlens, max_seqlen, scale, window=None):
    """PyTorch's FlashAttention-2 varlen kernel (16-bit only: fp32 inputs are cast to the autocast dtype)."""
    from torch.nn.attention import varlen
    if q.dtype not in (torch.float16, torch.bfloat16):
        if not torch.is_autocast_enabled(q.device.type):
            raise ValueError(f"--attn varlen runs in 16 bits only and got {q.dtype} outside autocast: use --dtype bf16")
        half = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(half), k.to(half), v.to(half)
    if window is not None and max_seqlen <= window:
        window = None  # no sample is longer than the window: plain causal attention is the same
    kw, has_scale = torch_varlen_kwargs(varlen.varlen_attn, q.shape[1], k.shape[1], window)
    if kw is None:
        raise ValueError(f"torch {torch.__version__}'s varlen_attn has no sliding window and this model's is {window} "
                         f"tokens, shorter than a {max_seqlen}-token sample: use torch >= 2.11 or --attn sdpa")
    if has_scale:
        kw = {**kw, "scale": scale}
    elif scale is not None:  # a release without `scale` uses 1/sqrt(D): fold the model's scale into q
        q = q * (scale * math.sqrt(q.shape[-1]))
    return varlen.varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kw)


def sample_boundaries(kwargs, batch, length, device):
    """(cu_seqlens, max_seqlen) over the flattened [batch * length] tokens: train.py's own when it
    passed them; else where position_ids restart at 0 (each row starts a sample too)."""
    if kwargs.get("cu_seq_lens_q") is not None:
        return kwargs["cu_seq_lens_q"].to(device=device, dtype=torch.int32), int(kwargs["max_length_q"])
    pos = kwargs.get("position_ids")
    starts = torch.zeros(batch, length, dtype=torch.bool, device=device)
    starts[:, 0] = True
    if pos is not None:
        starts |= pos.expand(batch, length).to(device) == 0
    cu = torch.cat([starts.flatten().nonzero()[:, 0], torch.tensor([batch * length], device=device)]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def packed_attention(kernel):
    """A transformers attention function (AttentionInterface) that runs `kernel` on the samples of
    each row: query [B, Hq, T, D] and key/value [B, Hkv, T, D] in, [B, T, Hq, D] out. Training only:
    no padding mask, no KV cache, no dropout."""
    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if attention_mask is not None or key.shape[2] != query.shape[2] or dropout:
            raise ValueError("packed attention is for training on packs: no attention mask, no KV cache, no "
                             "dropout (load the model with attn_implementation='sdpa' to generate)")
        b, h, t, d = query.shape
        cu, max_len = sample_boundaries(kwargs, b, t, query.device)
        q, k, v = (x.transpose(1, 2).reshape(b * t, x.shape[1], d) for x in (query, key, value))
        out = kernel(q, k, v, cu, max_len, scaling, kwargs.get("sliding_window"))
        return out.reshape(b, t, h, d).to(query.dtype), None
    return attention


def no_padding_mask(*args, attention_mask=None, **kwargs):
    """The mask function of the packed attentions: they need no mask, only the boundaries, and a
    padding mask would otherwise be dropped without a word."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("packed attention takes no padding mask: pack the samples (collate_pack) instead, or load "
                         "the model with attn_implementation='sdpa'")
    return None


def register_packed_attention():
    """Make `varlen` and `varlen_reference` names that from_pretrained(attn_implementation=...)
    accepts; their mask function builds no mask (the boundaries are all they need)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    for name, kernel in (("varlen", torch_varlen), ("varlen_reference", per_sample_sdpa)):
        AttentionInterface.register(name, packed_attention(kernel))
        AttentionMaskInterface.register(name, no_padding_mask)


def torch_has_varlen(device):
    """Whether PyTorch's varlen kernel can run here: torch >= 2.10 and an Ampere-or-newer NVIDIA GPU."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def scan_tokens(ds, max_len=None):
    """(trained positions per sample, i.e. labels[1:] != -100; the same among the first max_len
    tokens, what is left after truncation; the largest token id), read from Arrow in record
    batches so that a million samples never become Python lists."""
    import pyarrow.compute as pc
    counts, within, max_id = [], [], -1
    for rb in ds.data.to_batches(max_chunksize=8192):
        labels = rb.column(rb.schema.get_field_index("labels"))
        flat = pc.list_flatten(labels).to_numpy(zero_copy_only=False)
        parent = pc.list_parent_indices(labels).to_numpy(zero_copy_only=False)
        # position of each flattened label inside its own sample (offsets are where samples start)
        starts = labels.offsets.to_numpy(zero_copy_only=False)[:-1] - labels.offsets[0].as_py()
        pos = np.arange(len(flat)) - starts[parent]
        trained = (flat != -100) & (pos >= 1)  # nothing predicts a sample's first token
        counts.append(np.bincount(parent, weights=trained, minlength=len(labels)).astype(np.int64))
        if max_len is not None:
            trained &= pos < max_len
            within.append(np.bincount(parent, weights=trained, minlength=len(labels)).astype(np.int64))
        ids_max = pc.max(pc.list_flatten(rb.column(rb.schema.get_field_index("input_ids")))).as_py()
        max_id = max(max_id, -1 if ids_max is None else ids_max)
    empty = np.zeros(0, dtype=np.int64)
    n_trained = np.concatenate(counts) if counts else empty
    return n_trained, (np.concatenate(within) if within else empty) if max_len is not None else n_trained, max_id


def check_isolation(model):
    """Prove on the real model and attention implementation that packed samples don't see each
    other: the hidden states of a sample inside a pack must equal those of the sample alone.
    Run it under the training autocast: flash-attention only runs in 16-bit."""
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(3, vocab, (9,), generator=g), torch.randint(3, vocab, (7,), generator=g)
    dev = next(model.parameters()).device
    samples = [{"input_ids": a, "labels": a}, {"input_ids": b, "labels": b}]
    packed = collate_pack(samples, len(a) + len(b))
    with torch.no_grad():
        h = model.model(input_ids=packed["input_ids"].to(dev), position_ids=packed["position_ids"].to(dev),
                        use_cache=False, **boundary_kwargs(packed, dev)).last_hidden_state[0, len(a):].float()
        alone = model.model(input_ids=b[None].to(dev), use_cache=False).last_hidden_state[0].float()
    if not (torch.isfinite(h).all() and torch.isfinite(alone).all()):
        raise RuntimeError("the model produces non-finite hidden states on a 16-token input: broken weights?")
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
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_parameters=rope,
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
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
            if old.startswith(".") and old in name:  # a module inside a layer
                name = name.replace(old, new)
                break
            if name.startswith(old):  # a top-level module
                name = new + name[len(old):]
                break
        out[name] = w
    return out


def weight_files(path):
    """The checkpoint's weight shards: safetensors preferred, PyTorch .bin otherwise."""
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    return files or sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))


TOKENIZER_PROBES = [
    "中华人民共和国民法典第五百七十七条　当事人一方不履行合同义务或者履行合同义务不符合约定的，"
    "应当承担继续履行、采取补救措施或者赔偿损失等违约责任。",
    "原告张三诉称：2023年5月1日，被告借款人民币50,000元，约定月利率1.5%。\n\n  被告未到庭。",
    "Article 577 of the Civil Code.  Two  spaces,\ttabs and\nnewlines.",
    " a leading space",
]


def sentencepiece_reference(sp, text, specials, bos):
    """How InternLM2Tokenizer encodes `text` (its remote code, re-stated): BOS, then the pieces
    between special tokens each given to sentencepiece on its own, the special tokens as their ids."""
    ids = [bos] if bos is not None else []
    for part in re.split("(" + "|".join(map(re.escape, specials)) + ")", text) if specials else [text]:
        if part in specials:
            ids.append(sp.piece_to_id(part))
        elif part:
            ids += sp.encode(part)
    return ids


def convert_internlm2_tokenizer(src, dst, vocab_size, trust_remote_code=False):
    """InternLM2's tokenizer without its remote code, as a tokenizers-backed copy of its
    sentencepiece model (what InternLM's own convert2llama does with LlamaTokenizer). transformers'
    Llama conversion ignores the model's add_dummy_prefix and adds "▁" only at the very start,
    while InternLM2Tokenizer runs sentencepiece on each stretch between special tokens: the
    normaliser is set to do exactly that. The result must encode like sentencepiece itself
    (BOS first, as add_bos_token=True says; no EOS) on probe texts and chat turns, or nothing is written."""
    from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerFast
    model_file = os.path.join(src, "tokenizer.model")
    if not os.path.isfile(model_file):
        if os.path.isfile(os.path.join(src, "tokenizer.json")):  # a checkpoint that already has a fast tokenizer
            tok = PreTrainedTokenizerFast.from_pretrained(src)
            tok.init_kwargs.pop("auto_map", None)
            tok.save_pretrained(dst)
            return tok
        fail(f"{src} has no tokenizer.model (InternLM2's sentencepiece tokenizer) nor tokenizer.json; "
             "copy the model's tokenizer files into it")
    try:
        import sentencepiece
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:
        fail("InternLM2's tokenizer is a sentencepiece model: pip install sentencepiece")
    from tokenizers import decoders, normalizers
    cfg_file = os.path.join(src, "tokenizer_config.json")
    cfg = json.load(open(cfg_file)) if os.path.isfile(cfg_file) else {}
    specials = sorted({t["content"] for t in cfg.get("added_tokens_decoder", {}).values() if t.get("special")}
                      | {t if isinstance(t, str) else t["content"] for t in cfg.get("additional_special_tokens", [])}
                      - {cfg.get(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")},
                      key=len, reverse=True)
    add_bos, add_eos = cfg.get("add_bos_token", True), cfg.get("add_eos_token", False)
    tok = LlamaTokenizer.from_pretrained(src, add_bos_token=add_bos, add_eos_token=add_eos, legacy=True,
                                         additional_special_tokens=specials)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(open(model_file, "rb").read())
    dummy = proto.normalizer_spec.add_dummy_prefix
    backend = tok.backend_tokenizer
    backend.normalizer = normalizers.Sequence(([normalizers.Prepend("▁")] if dummy else [])
                                              + [normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + ([decoders.Strip(" ", 1, 0)] if dummy else []))
    if len(tok) > vocab_size:
        fail(f"{src}: the tokenizer has {len(tok)} tokens but the model only {vocab_size} embeddings")
    tok.init_kwargs.pop("auto_map", None)
    tok.save_pretrained(dst)
    saved = json.load(open(os.path.join(dst, "tokenizer_config.json")))
    saved.pop("auto_map", None)
    saved["tokenizer_class"] = "PreTrainedTokenizerFast"  # the tokenizer.json as written: no class rebuilds it
    with open(os.path.join(dst, "tokenizer_config.json"), "w") as f:
        json.dump(saved, f, indent=2, ensure_ascii=False)
    # the check, on what a later from_pretrained will load
    reloaded = AutoTokenizer.from_pretrained(dst)
    sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
    probes = list(TOKENIZER_PROBES)
    if specials:
        probes.append("".join(f"{specials[i % len(specials)]}{t}" for i, t in enumerate(TOKENIZER_PROBES)))
    # with --trust-remote-code, InternLM2Tokenizer itself is the reference too
    original = AutoTokenizer.from_pretrained(src, trust_remote_code=True) if trust_remote_code else None
    for text in probes:
        ours = reloaded(text)["input_ids"]
        ref = (sentencepiece_reference(sp, text, specials, sp.bos_id() if add_bos else None)
               + ([sp.eos_id()] if add_eos else []))
        for name, expected in [("its sentencepiece model", ref)] + (
                [("InternLM2Tokenizer", original(text)["input_ids"])] if original is not None else []):
            if ours != expected:
                fail(f"the converted tokenizer of {src} does not encode like {name} (text "
                     f"{text[:30]!r}...: {ours[:8]} vs {expected[:8]}); please report it with the tokenizer files")
    return reloaded


def convert_internlm2(src, dst, trust_remote_code=False):
    """Write a Llama-layout copy of the InternLM2 checkpoint `src` to `dst` (atomically), shard
    by shard so memory stays at one shard. The tokenizer and its chat template come along,
    converted from sentencepiece (no remote code needed to load the result)."""
    from safetensors.torch import load_file, save_file
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    files = weight_files(src)
    if not files:
        raise FileNotFoundError(f"{src}: no *.safetensors or pytorch_model*.bin weight files")
    with staged_folder(dst) as tmp:
        convert_internlm2_tokenizer(src, tmp, cfg["vocab_size"], trust_remote_code)  # first: a bad tokenizer fails fast
        weight_map = {}
        for i, file in enumerate(files):
            state = (load_file(file) if file.endswith(".safetensors")
                     else torch.load(file, map_location="cpu", weights_only=True))
            state = internlm2_to_llama_tensors(state, cfg["num_attention_heads"],
                                               cfg.get("num_key_value_heads", cfg["num_attention_heads"]))
            shard = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
            save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(tmp, shard),
                      metadata={"format": "pt"})
            weight_map.update({k: shard for k in state})
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
        llama_config_from_internlm2(cfg).save_pretrained(tmp)
    return dst


def is_internlm2(path):
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        return False
    with open(cfg_file) as f:
        return json.load(f).get("model_type") == "internlm2"


# ----------------------------------------------------------------------------------------------
# Model, schedule, saving


SDPA_PACKED_MAX_LEN = 8192


def pick_attention(requested, device, max_len):
    """The attention implementation (see "Attention over packs"). On a GPU, auto takes a kernel that
    reads the sample boundaries: PyTorch's own varlen kernel, else the flash-attn package. sdpa and
    eager get a dense [T x T] block-diagonal mask per pack, built by transformers from position_ids,
    and a masked kernel that computes the whole square: at 32k a 1 GiB mask and ~4x the attention
    FLOPs of a pack of 8k samples. So on a GPU they run only when asked for, with a warning above
    SDPA_PACKED_MAX_LEN. Registers the varlen names with transformers as a side effect."""
    register_packed_attention()
    if requested == "auto":
        if device.type != "cuda":
            return "sdpa"
        if torch_has_varlen(device):
            return "varlen"
        with contextlib.suppress(ImportError):
            import flash_attn  # noqa: F401
            return "flash_attention_2"
        fail(f"no attention kernel that reads sample boundaries on this GPU: PyTorch {torch.__version__} "
             f"has no torch.nn.attention.varlen (torch >= 2.10 on an Ampere or newer GPU) and flash_attn is not "
             f"installed. Upgrade torch, or pip install flash-attn --no-build-isolation, or pass --attn sdpa to "
             f"accept a dense [{max_len} x {max_len}] mask per pack and full-square attention")
    if requested == "varlen" and not torch_has_varlen(device):
        fail(f"--attn varlen needs PyTorch's varlen kernel (torch >= 2.10, an Ampere or newer NVIDIA GPU); "
             f"this is torch {torch.__version__} on {device.type}. --attn varlen_reference runs the same code path "
             f"with a per-sample sdpa kernel anywhere")
    if requested.startswith("flash"):
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            fail(f"--attn {requested} needs the flash_attn package: pip install flash-attn --no-build-isolation"
                 f"{' (or use --attn varlen: PyTorch has the kernel built in)' if torch_has_varlen(device) else ''}")
    if requested in ("sdpa", "eager") and device.type == "cuda" and max_len > SDPA_PACKED_MAX_LEN:
        log(f"warning: --attn {requested} on a GPU with packs of {max_len} tokens: every pack gets a dense "
            f"[{max_len} x {max_len}] mask and full-square attention; --attn varlen is much faster and smaller")
    return requested


def model_config(path, tokenizer, trust_remote_code):
    """The config of a checkpoint folder, or of a bare config .json (a model trained from random
    init, as the demo does; its vocabulary and special ids then come from the tokenizer)."""
    from transformers import AutoConfig
    if path.endswith(".json") and os.path.isfile(path):
        with open(path) as f:
            cfg = json.load(f)
        cfg.update(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        return AutoConfig.for_model(**cfg)
    return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)


def load_model(path, dtype, attn, trust_remote_code):
    """(model in `dtype`, the dtype its checkpoint was stored in) from a checkpoint folder."""
    from transformers import AutoModelForCausalLM
    stored = model_config(path, None, trust_remote_code).dtype
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn,
                                                 trust_remote_code=trust_remote_code)
    model.config.use_cache = False
    for attr in ("model", "lm_head"):
        if not hasattr(model, attr):
            raise ValueError(f"{path}: expected a decoder-only LM with .model and .lm_head "
                             f"(Llama, Qwen2, Mistral, converted InternLM2 ...), got {type(model).__name__}")
    stored = getattr(torch, stored) if isinstance(stored, str) else stored
    return model, stored if isinstance(stored, torch.dtype) else torch.float32


def check_rope_with_packing(cfg, lengths, name):
    """Refuse RoPE variants that rescale by sequence length when a pack could trigger them.

    Dynamic-NTK and LongRoPE choose their frequencies from the largest position id of the whole
    input (transformers: max(position_ids) + 1), and dynamic NTK keeps the largest one seen. In a
    pack that is the longest sample's length, so once a sample is longer than the original
    context, its pack-mates -- and every later pack -- are encoded differently from how they
    would be alone: packing no longer isolates samples. Below that length nothing is rescaled.
    InternLM2-Chat-7B (dynamic, 32k) at --max-len 32768 is safe; a 4k model packed to 32k is not."""
    rope = getattr(cfg, "rope_parameters", None) or {}
    variants = [rope] if "rope_type" in rope else [v for v in rope.values() if isinstance(v, dict)]
    for r in variants:
        kind = r.get("rope_type", "default")
        if kind not in ("dynamic", "longrope"):
            continue
        limit = cfg.max_position_embeddings if kind == "dynamic" else \
            (r.get("original_max_position_embeddings") or cfg.max_position_embeddings)
        n_over = int((np.asarray(lengths) > limit).sum())
        if n_over:
            fail(f"{name} uses {kind} RoPE, which rescales positions by the longest sample in a pack, and "
                 f"{n_over} of the {len(lengths)} samples are longer than its {limit} tokens: packed samples would "
                 f"change each other's position encoding. Use --max-len {limit} (longer samples are then dropped, "
                 f"or truncated with --oversize truncate), or a static rope scaling (linear, yarn) in its config.json")


def lr_at(step, total, warmup, peak, min_ratio):
    """Linear warmup over `warmup` steps, then cosine decay to min_ratio * peak at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def step_plan(n_packs, world, accum, start=0):
    """Split an epoch's packs, from pack `start` on, into optimizer steps: each step gives every
    rank `accum` packs, rank r taking every world-th one. The last step takes what is left; its
    empty slots are None, run as zero-weight repeats so that every rank does exactly `accum`
    micro-batches per step (DDP's all-reduce and DeepSpeed's accumulation boundary both count on
    it). No pack is dropped. `start` is where a resumed run stands in the epoch: the data position
    is a number of packs, so it means the same on any number of ranks."""
    per_step = world * accum
    return [[[s + j if s + j < n_packs else None for j in range(r, per_step, world)] for r in range(world)]
            for s in range(start, n_packs, per_step)]


def resume_plan(position, world, accum):
    """How a run saved at `position` continues on `world` ranks asked for `accum` packs each per
    step. The global batch (packs per optimizer step) is kept when the new world size divides it,
    by changing the accumulation; otherwise the requested one is used, the remaining data is
    spread over correspondingly more or fewer steps, and the change is reported. Returns (accum,
    total_steps), total_steps None when the schedule is unchanged."""
    saved_world, saved_accum, batch = position["world_size"], position["grad_accum"], position["global_batch"]
    if world == saved_world and accum == saved_accum:
        return accum, None
    if world != saved_world and batch % world == 0:
        log(f"resuming a run of {saved_world} rank(s) x {saved_accum} packs on {world} rank(s): "
            f"--grad-accum {batch // world} keeps its global batch of {batch} packs per step")
        return batch // world, None
    # The global batch changes: the world size does not divide it, or --grad-accum was changed.
    step, saved_total = position["step"], position["total_steps"]
    new_total = step + math.ceil((saved_total - step) * batch / (world * accum))
    why = (f"{world} does not divide {batch}" if world != saved_world else f"--grad-accum changed from {saved_accum}")
    log(f"warning: resuming a run of {saved_world} rank(s) x {saved_accum} packs = {batch} packs per step on "
        f"{world} rank(s) x {accum}: {why}, so the global batch becomes {world * accum} packs. The remaining "
        f"data is the same; it takes {new_total - step} more steps instead of {saved_total - step} ({new_total} "
        f"in all), and the learning-rate schedule is stretched to match. To keep the run unchanged, use a "
        f"--grad-accum with world size x grad-accum = {batch}")
    return accum, new_total


def set_config_dtype(folder, dtype):
    """Record `dtype` (a torch dtype or its name) as the checkpoint's dtype in folder/config.json."""
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)


def save_model(model, tokenizer, out, dtype=None, extra_files=None, state=None):
    """Hugging Face folder (safetensors + config + tokenizer + chat template), written atomically.
    Weights are stored in `dtype` (the starting checkpoint's, e.g. bf16), not the fp32 masters;
    `state` replaces the model's own state dict (ZeRO-3: the gathered 16-bit weights)."""
    state = {k: v.to(dtype) if dtype and v.is_floating_point() else v
             for k, v in (state if state is not None else model.state_dict()).items()}
    with staged_folder(out) as tmp:
        model.save_pretrained(tmp, state_dict=state)
        if dtype:  # save_pretrained records the in-memory (fp32) dtype; from_pretrained(dtype="auto") reads this
            set_config_dtype(tmp, dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, obj in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(obj, f, indent=1, ensure_ascii=False)


# ----------------------------------------------------------------------------------------------
# Main


def plot_loss(log_path, png):
    """Loss curve (and learning rate) of a run's log.jsonl, as a PNG."""
    plt = pyplot()
    rows = read_jsonl(log_path)
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1, label="loss (token mean per step)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot([r["step"] for r in rows], [r["lr"] for r in rows], color="tab:orange", lw=1, alpha=0.6, label="lr")
    ax2.set_ylabel("learning rate")
    fig.legend(loc="upper center", bbox_to_anchor=(0.5, 0.88))
    ax.set_title(os.path.basename(os.path.dirname(os.path.abspath(log_path))))
    fig.tight_layout()
    atomic_write(png, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Checkpoints: <run>/checkpoints/step-000123/ plus a `latest` file naming the newest complete one


def latest_checkpoint(ckpt_root):
    """Path of the checkpoint `latest` names, if that folder exists (no verification)."""
    pointer = os.path.join(ckpt_root, "latest")
    if not os.path.isfile(pointer):
        return None
    path = os.path.join(ckpt_root, open(pointer).read().strip())
    return path if os.path.isdir(path) else None


MANIFEST = "manifest.json"


def file_digests(root, names):
    """{relative name: [size, sha256]} of files under root (1 MiB reads: a 7B checkpoint is ~100 GB)."""
    import hashlib
    out = {}
    for name in names:
        h = hashlib.sha256()
        with open(os.path.join(root, name), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        out[name] = [os.path.getsize(os.path.join(root, name)), h.hexdigest()]
    return out


def shared_digests(root, names, rank, world):
    """file_digests with the files dealt out over the ranks (each hashes 1/world of them),
    gathered on every rank."""
    rank_digests = file_digests(root, names[rank::world])
    if not dist.is_initialized() or world == 1:
        return rank_digests
    parts = [None] * world
    dist.all_gather_object(parts, rank_digests)
    return {k: v for part in parts for k, v in part.items()}


def checkpoint_files(path):
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs if f != MANIFEST)


def verify_checkpoint(path, rank=0, world=1):
    """None if `path` is a complete checkpoint (every file of its manifest present with its size
    and sha256, nothing missing), else the reason, naming the file. A collective under torchrun."""
    manifest = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        return f"{path} does not exist"
    if not os.path.isfile(manifest):
        return f"{manifest} is missing (a save that did not finish, or a checkpoint of an older train.py)"
    try:
        expected = json.load(open(manifest))["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{manifest} is unreadable ({exc})"
    names = sorted(expected)
    missing = [n for n in names if not os.path.isfile(os.path.join(path, n))]
    if missing:
        return f"{os.path.join(path, missing[0])} is missing"
    wrong_size = [n for n in names if os.path.getsize(os.path.join(path, n)) != expected[n][0]]
    if wrong_size:
        n = wrong_size[0]
        return (f"{os.path.join(path, n)} has {os.path.getsize(os.path.join(path, n))} bytes, "
                f"the manifest says {expected[n][0]}")
    got = shared_digests(path, names, rank, world)
    bad = [n for n in names if got[n][1] != expected[n][1]]
    return f"{os.path.join(path, bad[0])} does not match its sha256 in the manifest" if bad else None


def checkpoint_to_resume(ckpt_root, rank, world):
    """--resume auto: the newest checkpoint that verifies, `latest` first. Each one that fails is
    reported in one line. None only when there is no checkpoint at all; when there are some and
    none verifies, the run stops instead of silently starting afresh over them."""
    if not os.path.isdir(ckpt_root):
        return None
    found = sorted((d for d in os.listdir(ckpt_root) if d.startswith("step-") and not d.endswith(".tmp")
                    and os.path.isdir(os.path.join(ckpt_root, d))), reverse=True)
    pointer = os.path.join(ckpt_root, "latest")
    named = open(pointer).read().strip() if os.path.isfile(pointer) else None
    if named and named not in found:
        log(f"warning: {pointer} names {named}, which does not exist; looking for the newest complete checkpoint")
    order = ([named] if named in found else []) + [d for d in found if d != named]
    for d in order:
        reason = verify_checkpoint(os.path.join(ckpt_root, d), rank, world)
        if reason is None:
            return os.path.join(ckpt_root, d)
        log(f"warning: skipping checkpoint {d}: {reason}")
    if found:
        fail(f"no checkpoint in {ckpt_root} verifies ({len(found)} found, reasons above); not starting "
             "afresh over them. Resume one by hand with --resume PATH after repairing it, or start over with "
             "--resume none (which deletes them)")
    return None


def rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(st):
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if st["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(ckpt_root, step, engine, model, opt, sched, rank, keep, world=1, position=None):
    """Resumable state of `step` completed steps, written into a temporary folder that gets a
    manifest (every file's size and sha256, and the data `position`) last and is renamed into
    place only when every rank has written successfully; `latest` moves after that. A run killed
    at any moment, or a write that fails on any rank, leaves the previous checkpoint intact and
    pointed to: a failed save stops the run with a message, never with a half-written checkpoint
    in use. Keeps the newest `keep`. Returns the seconds spent writing and hashing (also in the
    manifest), since on a large model either can dominate the time a save stalls training."""
    started = time.time()
    tag = f"step-{step:07d}"
    tmp_tag = tag + ".tmp"
    tmp = os.path.join(ckpt_root, tmp_tag)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    error = None
    try:
        if engine is not None:  # DeepSpeed: every rank writes its own shard of weights and optimizer
            engine.save_checkpoint(ckpt_root, tag=tmp_tag, client_state={"step": step}, save_latest=False)
        elif rank == 0:  # plain/DDP: identical on every rank; only trainable tensors (LoRA: the adapter)
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            torch.save({"model": {n: t for n, t in model.state_dict().items() if n in trainable},
                        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step},
                       os.path.join(tmp, "state.pt"))
        torch.save(rng_state(), os.path.join(tmp, f"rng-{rank}.pt"))
    except Exception as exc:  # disk full, read-only, quota, a lost mount ...
        error = f"rank {rank}: {type(exc).__name__}: {exc}"
    failed = all_sum(error is not None, collective_device())
    seconds = {"write": time.time() - started}
    if not failed:
        barrier()
        digests = shared_digests(tmp, checkpoint_files(tmp), rank, world)
        seconds["hash"] = time.time() - started - seconds["write"]
        if rank == 0:
            try:
                write_json(os.path.join(tmp, MANIFEST), {"step": step, "position": position, "files": digests,
                                                         "seconds": seconds})
            except Exception as exc:
                error = f"rank 0: {type(exc).__name__}: {exc}"
        failed = all_sum(error is not None, collective_device())
    if failed:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        previous = latest_checkpoint(ckpt_root)
        fail(f"saving checkpoint {tag} failed ({error or 'on another rank'}); the previous checkpoint "
             f"{previous or '(none)'} is intact and `latest` still names it. Fix the cause and run the same "
             "command again to resume from it")
    barrier()
    if rank == 0:
        final = os.path.join(ckpt_root, tag)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        atomic_write(os.path.join(ckpt_root, "latest"), lambda f: f.write(tag.encode()))
        old = sorted(d for d in os.listdir(ckpt_root) if d.startswith("step-") and not d.endswith(".tmp"))
        for d in old[:-keep]:
            shutil.rmtree(os.path.join(ckpt_root, d), ignore_errors=True)
    barrier()
    return {**seconds, "total": time.time() - started}


def checkpoint_position(path, run_dir):
    """Where the run saved in `path` stands (see main: step, epoch, packs done in it, world size,
    accumulation, global batch, total steps), from its manifest; for a checkpoint written before
    manifests had it, derived from the step and the run's train_config.json."""
    manifest = json.load(open(os.path.join(path, MANIFEST)))
    if manifest.get("position"):
        return manifest["position"]
    saved = json.load(open(os.path.join(run_dir, "train_config.json")))
    epoch, steps_into_epoch = divmod(manifest["step"], saved["steps_per_epoch"])
    batch = saved["world_size"] * saved["grad_accum"]
    return data_position(manifest["step"], epoch, steps_into_epoch * batch, saved["world_size"], saved["grad_accum"],
                         saved["total_steps"])


def data_position(step, epoch, packs_done, world, accum, total_steps):
    """Where a run stands, as every checkpoint's manifest records it: `packs_done` packs of epoch
    `epoch` are trained after `step` steps of `total_steps`, on `world` ranks x `accum` packs. A
    number of packs means the same on any number of ranks (resume_plan)."""
    return {"step": step, "epoch": epoch, "packs_done": packs_done, "world_size": world, "grad_accum": accum,
            "global_batch": world * accum, "total_steps": total_steps}


def to_universal(path, run_dir, rank):
    """A ZeRO checkpoint written on another number of ranks, converted by DeepSpeed's own
    ds_to_universal into its rank-independent "universal" layout (one file per parameter and
    optimizer state, unsharded) in <run>/universal/<tag>, which any world size can load. Done once
    by rank 0; the folder is derived data and removed after loading."""
    out = os.path.join(run_dir, "universal", os.path.basename(path))
    if rank == 0:
        from types import SimpleNamespace

        from deepspeed.checkpoint import ds_to_universal
        shutil.rmtree(os.path.dirname(out), ignore_errors=True)
        os.makedirs(os.path.dirname(out))
        log(f"converting {path} to DeepSpeed's universal checkpoint layout in {out}")
        with contextlib.redirect_stdout(sys.stderr):  # its progress lines, not the run's story
            ds_to_universal.main(SimpleNamespace(input_folder=path, output_folder=out, num_extract_workers=1,
                                                 num_merge_workers=1, keep_temp_folder=False, strict=True,
                                                 inject_missing_state=True))
    barrier()
    return out


def load_checkpoint(path, engine, model, opt, sched, rank, universal=None):
    """Restore a checkpoint written by save_checkpoint; returns the number of completed steps.
    `universal`: the checkpoint in DeepSpeed's universal layout (to_universal), loaded instead of
    the ZeRO shards when the world size changed."""
    if engine is not None:
        source = universal or path
        inner = engine.optimizer.optimizer  # the torch AdamW inside DeepSpeed's ZeRO optimizer
        hparams = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")} for g in inner.param_groups]
        _, client = engine.load_checkpoint(os.path.dirname(source), tag=os.path.basename(source))
        step = client["step"]
        if universal:
            # DeepSpeed 0.19's universal loading gives every parameter group the hyperparameters
            # of group 0 (our norms and biases would get the matrices' weight decay) and one shared
            # `step` tensor, which AdamW then increments once per group, skewing its bias
            # correction (ZeRO-3 losses drifted by 1e-3 within 3 steps). Put both right.
            for group, own in zip(inner.param_groups, hparams, strict=True):
                group.update(own)
            for state in inner.state.values():
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].clone()
    else:
        st = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=False)
        missing, unexpected = model.load_state_dict(st["model"], strict=False)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        if unexpected or trainable & set(missing):
            raise RuntimeError(f"{path} does not match this model (unexpected {unexpected[:3]}, "
                               f"missing {sorted(trainable & set(missing))[:3]})")
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        step = st["step"]
    rng_file = os.path.join(path, f"rng-{rank}.pt")
    if os.path.exists(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=False))
    return step


# ----------------------------------------------------------------------------------------------
# Main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", type=stage_arg, choices=[1, 2, "merged"], required=True,
                   help="1: legal + general data from the base model; "
                   "2: high-quality legal data from stage 1's weights; merged: the paper's one-run ablation arm, "
                   "stage 1's and stage 2's data shuffled together into one run from the base model "
                   "(into <out-dir>/merged/)")
    p.add_argument("--model", help="starting weights (HF folder or hub id). Default: internlm/internlm2-chat-7b for "
                   "stage 1 and merged, <out-dir>/stage1/final for stage 2. InternLM2 checkpoints are converted to "
                   "the Llama layout first (into <out-dir>/base-llama). A config .json "
                   "(e.g. demo_data/tiny_llama.json) starts from random init, sized to the tokenizer")
    p.add_argument("--data", default="data/processed", help="prepare_data.py output folder holding stage1/, stage2/ "
                   "and tokenizer/ (default %(default)s)")
    p.add_argument("--cpt-data", help="continued pre-training instead of SFT: raw text files (glob; .txt = one "
                   "document per blank-line-separated block, .jsonl/.json = a 'text' field), every token trained, "
                   "documents longer than --max-len split into --max-len pieces. Uses --data's tokenizer/ if present, "
                   "else the model's")
    p.add_argument("--out-dir", default="out", help="runs go to <out-dir>/stage<N>/ (or <out-dir>/merged/; "
                   "default %(default)s)")
    p.add_argument("--max-len", type=int, default=32768,
                   help="tokens per packed sequence (default %(default)s, as the paper)")
    p.add_argument("--oversize", choices=["drop", "truncate"], default="drop",
                   help="samples longer than --max-len: drop them, or keep their first --max-len tokens "
                   "(counted either way)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the stage's data (default %(default)s)")
    p.add_argument("--max-steps", type=int, help="optimizer steps in all (overrides --epochs; the schedule follows it)")
    p.add_argument("--stop-after", type=int, help="end this invocation after N steps, saving a checkpoint, without "
                   "changing the schedule (for jobs split over several allocations)")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="packs per rank per optimizer step; global batch = world size x this x --max-len tokens "
                   "(default %(default)s)")
    p.add_argument("--lr", type=float, default=1e-5, help="peak learning rate (default %(default)s)")
    p.add_argument("--min-lr-ratio", type=float, default=0.0,
                   help="cosine decays to this fraction of --lr (default %(default)s)")
    p.add_argument("--warmup-ratio", type=float, default=0.03,
                   help="share of steps with linear warmup (default %(default)s)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default %(default)s)")
    p.add_argument("--betas", type=float, nargs=2, default=[0.9, 0.95], help="AdamW betas (default 0.9 0.95)")
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping; 0 disables (default %(default)s)")
    p.add_argument("--loss-chunk", type=int, default=2048,
                   help="tokens per lm_head + cross-entropy chunk; peak loss memory ~ chunk x vocab x 8 bytes "
                   "(default %(default)s)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="compute precision: bf16 (DeepSpeed bf16, or autocast with fp32 master weights without it) "
                   "or fp32 (auto: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--attn", default="auto",
                   help="attention over packs: varlen (PyTorch's FlashAttention-2 varlen kernel, torch >= 2.10 "
                   "on CUDA), varlen_reference (the same path with a per-sample sdpa loop), flash_attention_2 (the "
                   "flash-attn package), sdpa, eager (auto: varlen on GPU, else flash_attention_2 if installed; sdpa "
                   "on CPU)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute activations in backward (default: on for GPU, off on CPU)")
    p.add_argument("--checkpoint-every", type=int, default=1, metavar="K",
                   help="with gradient checkpointing, recompute only every K-th decoder layer (1: all; a larger K "
                   "keeps more activations in memory and recomputes less; default %(default)s)")
    p.add_argument("--deepspeed", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "ds_config.json"),
                   help="DeepSpeed config; 'auto' values are filled from the flags "
                   "(default: ds_config.json, ZeRO-3 bf16)")
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3],
                   help="override the config's ZeRO stage; 0 = no DeepSpeed: plain PyTorch (DDP under torchrun). "
                   "On CPU, if DeepSpeed fails to start, the plain loop is used and the reason logged")
    p.add_argument("--save-every", type=int, default=200,
                   help="checkpoint every N steps, and at the end (default %(default)s)")
    p.add_argument("--keep-last", type=int, default=2, help="checkpoints to keep (default %(default)s)")
    p.add_argument("--resume", default="auto", help="'auto': continue from the newest checkpoint in <run>/checkpoints "
                   "that verifies against its manifest (sizes and sha256), `latest` first; stops rather than start "
                   "afresh over checkpoints that all fail. 'none': start afresh (old checkpoints are removed). Or a "
                   "checkpoint folder, which must verify (default %(default)s)")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (peft) instead of all weights; the final "
                   "model is saved merged, the adapter beside it. Plain loop or ZeRO 1/2")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank (default %(default)s)")
    p.add_argument("--lora-alpha", type=int, default=32, help="LoRA alpha (default %(default)s)")
    p.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout (default %(default)s)")
    p.add_argument("--peak-tflops", type=float, help="accelerator peak TFLOP/s for the MFU estimate "
                   "(default: known bf16 dense peaks of A100/H100/H200; none on CPU)")
    p.add_argument("--tensorboard", action="store_true",
                   help="also log to <run>/tensorboard (needs the tensorboard package)")
    p.add_argument("--seed", type=int, default=42, help="packing, shuffling and init seed (default %(default)s)")
    p.add_argument("--log-every", type=int, default=10, help="print a line every N steps (default %(default)s)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow model/tokenizer code from the checkpoint folder")
    return p.parse_args(argv)


def forward_backward(runner, batches, is_filler, step_tokens, world, device, autocast=None):
    """Forward and backward of this rank's micro-batches of one optimizer step; returns their
    summed token loss. Each micro-batch's loss sum (packed_loss_sum) is scaled by world /
    step_tokens, step_tokens being the trained tokens of the whole step on all ranks: the
    accumulated gradient is then exactly that of (sum of all token losses) / (all trained tokens),
    once DDP or DeepSpeed has averaged it over `world` ranks. is_filler[k] marks a filler
    micro-batch (weight 0, see step_plan) that only keeps the ranks in step. With DeepSpeed the
    caller makes the final engine.step() (the boundary)."""
    autocast = autocast or contextlib.nullcontext()
    ddp = isinstance(runner, torch.nn.parallel.DistributedDataParallel)
    deepspeed_engine = hasattr(runner, "is_gradient_accumulation_boundary")
    loss_sum = 0.0
    for k, (b, filler) in enumerate(zip(batches, is_filler, strict=True)):
        b = {key: v.to(device) if torch.is_tensor(v) else v for key, v in b.items()}
        last = k == len(batches) - 1
        # DDP all-reduces gradients only in the backward of the step's last micro-batch
        with runner.no_sync() if ddp and not last else contextlib.nullcontext(), autocast:
            s = runner(b)
        scaled = s * (0.0 if filler else world / step_tokens)
        if deepspeed_engine:
            runner.backward(scaled, scale_wrt_gas=False)  # our scale already is the step's token mean
            if not last:
                runner.step()  # not a boundary: only advances DeepSpeed's micro-step count
        else:
            scaled.backward()
        loss_sum += 0.0 if filler else s.item()
    return loss_sum


def rank_micro_batches(ds, idx, packs, step_packs, rank, max_len):
    """This rank's micro-batches of one step (step_plan's step_packs[rank]: pack numbers, None for
    a slot the epoch's last step has no pack for) and which of them are fillers. A filler repeats
    the step's first pack, to be run at weight 0: every rank must run the same number of
    micro-batches, or DDP's all-reduce and DeepSpeed's accumulation boundary would hang."""
    fill_in = step_packs[0][0]
    slots = step_packs[rank]
    batches = [collate_pack(ds.select(idx[packs[fill_in if p is None else p]]), max_len) for p in slots]
    return batches, [p is None for p in slots]


def optimizer_step(engine, opt, sched, model, clip):
    """Clip, AdamW step, schedule step, zero the gradients; returns the gradient norm (before
    clipping). DeepSpeed does all of it at its accumulation boundary."""
    if engine is not None:
        engine.step()
        return float(engine.get_global_grad_norm() or 0.0)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf")).item()
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return norm


def stop_if_not_finite(what, value, step, ckpt_root, bar, consequence):
    """The NaN/inf stop: close the bar, say what and where, name the last good checkpoint, exit."""
    if math.isfinite(value):
        return
    bar.close()
    msg = (f"error: {what} is {value} at step {step}; {consequence}. "
           f"The last good checkpoint is {latest_checkpoint(ckpt_root) or '(none yet)'}")
    log(msg)
    sys.exit(msg)


def setup_distributed(use_deepspeed):
    """(rank, world, device). torchrun sets the env vars; a plain run is rank 0 of 1 (DeepSpeed
    still wants a process group, so one of size 1 is made for it)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if (world > 1 or use_deepspeed) and not dist.is_initialized():
        if world == 1:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def barrier():
    if dist.is_initialized():
        dist.barrier()


def collective_device():
    """Where a small tensor must live for a collective: the GPU under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_sum(x, device):
    """Sum a number over ranks (identity when not distributed)."""
    t = torch.tensor(float(x), dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.item()


def read_deepspeed_config(path):
    """--deepspeed's JSON, read once (the ZeRO stage comes from it before anything starts)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        fail(f"--deepspeed {path}: {e}")


def deepspeed_config(ds_file, args, world, dtype, zero_stage, hidden):
    """The DeepSpeed config (--deepspeed's, as read) with 'auto' values filled from our flags, so
    the two never disagree."""
    cfg = json.loads(json.dumps(ds_file))  # a copy: the values filled in are this run's
    cfg["train_micro_batch_size_per_gpu"] = 1  # one pack of up to --max-len tokens
    cfg["gradient_accumulation_steps"] = args.grad_accum
    cfg["train_batch_size"] = world * args.grad_accum
    cfg["gradient_clipping"] = args.clip
    cfg["bf16"] = {"enabled": dtype == "bf16"}
    cfg.pop("fp16", None)
    zero = cfg.setdefault("zero_optimization", {})
    zero["stage"] = zero_stage
    auto = {"reduce_bucket_size": hidden * hidden, "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
            "stage3_param_persistence_threshold": 10 * hidden}
    for k, v in auto.items():
        if zero.get(k) == "auto":
            zero[k] = v
    return cfg


def count_params(model):
    """Parameters of the model (ZeRO-3 partitions report their full size in ds_numel)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def matmul_params(model):
    """Weights that take part in matrix products: every 2-D weight except the input embedding,
    which is a lookup (unless it is tied to lm_head). Norms and biases cost next to nothing."""
    emb = model.get_input_embeddings().weight
    tied = emb is model.get_output_embeddings().weight
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()
               if len(getattr(p, "ds_shape", p.shape)) >= 2 and (tied or p is not emb))


def step_flops(cfg, n_matmul, seqlens):
    """Model FLOPs of forward + backward for packs with the given sample lengths: 6 x matmul
    weights x tokens, plus causal attention, 6 x layers x heads x head_dim x sum(len^2) -- each
    sample attends only within itself, and only to earlier tokens (half the square).
    Recomputation from gradient checkpointing is not counted (MFU convention)."""
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attn = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * sum(s * s for s in seqlens)
    return 6 * n_matmul * sum(seqlens) + attn


PEAK_TFLOPS_BF16 = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A800": 312.0, "H800": 989.0, "L40S": 362.0}


def peak_tflops(args, device):
    if args.peak_tflops:
        return args.peak_tflops
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS_BF16.items() if k in name), None)


def load_cpt_data(pattern, tokenizer, max_len, num_proc=None):
    """Raw legal text for continued pre-training, tokenized: every token is trained, each
    document starts as the tokenizer starts a text (BOS for InternLM2 and Llama, nothing for
    Qwen2) and ends with EOS, and documents longer than max_len become consecutive pieces."""
    from datasets import Dataset, load_dataset
    files = sorted(glob.glob(pattern)) or ([pattern] if os.path.isfile(pattern) else [])
    if not files:
        fail(f"--cpt-data {pattern}: no such files")
    docs = []
    for f in files:
        if f.endswith((".jsonl", ".json")):
            ds = load_dataset("json", data_files=f, split="train")
            if "text" not in ds.column_names:
                fail(f"{f}: no 'text' field (fields: {ds.column_names})")
            docs += [t for t in ds["text"] if t and t.strip()]
        else:
            with open(f, encoding="utf-8") as fh:
                docs += [b.strip() for b in fh.read().split("\n\n") if b.strip()]
    eos = tokenizer.eos_token_id
    ids, n_split = [], 0
    # the tokenizer's own special tokens, as in pre-training: InternLM2 and Llama put BOS first
    for enc in tokenizer(docs)["input_ids"]:
        enc = enc if enc and enc[-1] == eos else enc + [eos]
        n_split += len(enc) > max_len
        ids += [enc[i:i + max_len] for i in range(0, len(enc), max_len)]
    ds = Dataset.from_dict({"input_ids": ids, "labels": ids, "length": [len(x) for x in ids]})
    return ds, {"documents": len(docs), "documents_split": n_split, "pieces": len(ids)}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name, as the Hugging Face hub spells ids


def check_inputs(args):
    """Every path the run needs, checked before anything heavy is loaded, so that a typo costs a
    second and names itself (not a tokenizer or hub traceback minutes later). Returns the
    tokenizer folder to use: prepare_data.py's (the data was tokenized with it) or the model's."""
    if args.cpt_data:
        if not (glob.glob(args.cpt_data) or os.path.isfile(args.cpt_data)):
            fail(f"--cpt-data {args.cpt_data}: no such files")
    else:
        for stage_dir in stage_data_dirs(args):
            if not os.path.isdir(stage_dir):
                fail(f"{stage_dir} not found: run prepare_data.py --out {args.data} first (or pass --data)")
            if not os.path.isfile(os.path.join(stage_dir, "state.json")):  # what datasets' save_to_disk writes last
                fail(f"{stage_dir} is not a saved dataset (no state.json: empty, or an interrupted copy); "
                     f"run prepare_data.py --out {args.data} again")
    model = args.model
    tok_dir = os.path.join(args.data, "tokenizer")
    has_tok = os.path.isdir(tok_dir)
    if has_tok and not any(os.path.isfile(os.path.join(tok_dir, f)) for f in TOKENIZER_FILES):
        fail(f"{tok_dir} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): an interrupted copy? "
             f"run prepare_data.py --out {args.data} again")
    if model is None:
        return tok_dir if has_tok else None
    if model.endswith(".json"):
        if not os.path.isfile(model):
            fail(f"--model {model}: no such config file")
        if not has_tok:
            fail(f"--model {model} is a bare config (random init), which has no tokenizer: expected "
                 f"prepare_data.py's {tok_dir} (pass --data)")
    elif os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            fail(f"--model {model} has no config.json: not a Hugging Face model folder")
        if not has_tok and not any(os.path.isfile(os.path.join(model, f)) for f in TOKENIZER_FILES):
            fail(f"no tokenizer: neither {tok_dir} nor --model {model} has tokenizer files "
                 f"({', '.join(TOKENIZER_FILES)})")
    elif os.path.exists(model) or not HUB_ID.match(model):
        fail(f"--model {model}: no such folder (nor a hub id like internlm/internlm2-chat-7b)")
    return tok_dir if has_tok else None


def hub_snapshot(repo_id):
    """A hub model id -> the local folder of its files (downloaded once into the Hugging Face
    cache: each node's local rank 0 first, then the others read the cache). Safetensors only."""
    from huggingface_hub import snapshot_download
    def fetch():
        try:
            return snapshot_download(repo_id, ignore_patterns=["*.bin", "*.pth", "*.pt", "*.gguf", "*.h5",
                                                                "*.msgpack", "*.onnx"])
        except Exception as e:  # offline, unknown repo, gated, ...: one line, not a traceback
            reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
            fail(f"--model {repo_id} is not a local folder, and fetching it from the Hugging Face hub "
                 f"failed ({type(e).__name__}: {reason}); pass the path of a downloaded model folder")

    local_rank0 = int(os.environ.get("LOCAL_RANK", 0)) == 0
    if local_rank0:
        log(f"downloading {repo_id} from the Hugging Face hub into its cache")
        path = fetch()
    barrier()  # the other ranks of the node then find the files in the cache
    if not local_rank0:
        path = fetch()
    return path


def init_from_config(cfg_path, tokenizer, seed, dst):
    """A random-init model from a bare config .json, written once as a checkpoint folder that
    every run then loads. Initialising here, in fp32 on one process, makes the weights depend
    only on (config, vocabulary, seed): DeepSpeed ZeRO-3 would otherwise initialise them
    partitioned, with other random numbers than ZeRO-0/1/2 and than another world size."""
    import hashlib

    from transformers import AutoModelForCausalLM
    key = {"config_sha256": hashlib.sha256(open(cfg_path, "rb").read()).hexdigest(), "vocab": len(tokenizer),
           "seed": seed, "torch": torch.__version__}
    key_file = os.path.join(dst, "init.json")
    if os.path.isfile(key_file) and json.load(open(key_file)) == key:
        return dst
    config = model_config(cfg_path, tokenizer, False)
    stored = config.dtype
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    torch.random.set_rng_state(state)
    with staged_folder(dst) as tmp:
        model.save_pretrained(tmp)
        set_config_dtype(tmp, stored if stored is not None else "float32")  # fp32 tensors, the config's dtype
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "init.json"), "w") as f:
            json.dump(key, f)
    return dst


def resolve_model(args, tok_dir, master):
    """The weights to start from, as a local folder: --model, else InternLM2-Chat-7B (stage 1 and
    merged) or stage 1's final weights (stage 2). A hub id is downloaded; an InternLM2 checkpoint is
    converted once to the Llama layout; a config .json is initialised once (rank 0 writes, the
    others wait)."""
    model_path = args.model or ("internlm/internlm2-chat-7b" if args.stage != 2  # stage 1, merged: the base model
                                else os.path.join(args.out_dir, "stage1", "final"))
    if args.stage == 2 and args.model is None and not os.path.isdir(model_path):
        fail(f"stage 2 starts from stage 1's weights, but {model_path} does not exist "
             "(run --stage 1 first, or pass --model)")
    if model_path.endswith(".json"):
        from transformers import AutoTokenizer
        init = os.path.join(args.out_dir, run_name(args.stage), "init")
        if master:
            init_from_config(model_path, AutoTokenizer.from_pretrained(tok_dir), args.seed, init)
        barrier()
        return init
    if not os.path.exists(model_path):
        model_path = hub_snapshot(model_path)
    if is_internlm2(model_path):
        converted = os.path.join(args.out_dir, "base-llama")
        if master and not os.path.isdir(converted):
            log(f"converting InternLM2 checkpoint {model_path} to the Llama layout in {converted}")
            convert_internlm2(model_path, converted, args.trust_remote_code)
        barrier()
        model_path = converted
    return model_path


def stage_arg(text):
    """--stage: 1 and 2 as numbers (the code compares them), "merged" as itself."""
    return int(text) if text in ("1", "2") else text


def run_name(stage):
    """The run's folder under --out-dir: stage1, stage2, or merged."""
    return "merged" if stage == "merged" else f"stage{stage}"


def stage_data_dirs(args):
    """prepare_data.py's dataset folder(s) the stage trains on: the merged arm takes stage 1's and
    stage 2's together (the paper's ablation: the same samples as the two-stage recipe, in one run)."""
    names = ["stage1", "stage2"] if args.stage == "merged" else [f"stage{args.stage}"]
    return [os.path.join(args.data, name) for name in names]


def check_schema(ds, name):
    """The columns a stage dataset needs, with integer token lists: a missing `labels` would
    otherwise be read from whatever column comes last."""
    import pyarrow as pa
    need = {"input_ids": "list", "labels": "list", "length": "int"}
    schema = ds.data.schema
    missing = [c for c in need if c not in schema.names]
    if missing:
        fail(f"{name} has no {', '.join(missing)} column(s) (it has {', '.join(schema.names)}): "
             "train.py reads prepare_data.py's output (input_ids, labels -100 outside the replies, length)")
    for col, kind in need.items():
        t = schema.field(col).type
        ok = (pa.types.is_integer(t.value_type) if pa.types.is_list(t) or pa.types.is_large_list(t) else False) \
            if kind == "list" else pa.types.is_integer(t)
        if not ok:
            fail(f"{name}: column {col} is {t}, expected {'a list of token ids' if kind == 'list' else 'an integer'}")


def load_stage_data(args, tokenizer):
    """The stage's dataset (prepare_data.py's, or --cpt-data raw text), the samples that train
    (within --max-len, with trained tokens; --oversize decides the rest) and their counts."""
    from datasets import load_from_disk
    if args.cpt_data:
        ds, extra_counts = load_cpt_data(args.cpt_data, tokenizer, args.max_len)
        data_name = args.cpt_data
    else:
        parts = []
        for part in stage_data_dirs(args):  # check_inputs has found each, with its state.json
            with open(os.path.join(part, "state.json")) as f:
                empty = not json.load(f).get("_data_files")  # datasets cannot load a saved dataset of 0 rows
            ds = None if empty else load_from_disk(part)
            if empty or not len(ds):
                fail(f"{part} has no rows: prepare_data.py kept no record for stage {os.path.basename(part)[5:]} (its "
                     f"{os.path.join(args.data, 'report.md')} says why; stage 2 takes high_quality sources only, or "
                     "others graded by --judge-model)")
            check_schema(ds, part)
            parts.append(ds)
        extra_counts = None
        if len(parts) > 1:  # merged: one dataset; the packer shuffles the two stages' samples together
            from datasets import concatenate_datasets
            columns = ["input_ids", "labels", "length"]
            try:
                ds = concatenate_datasets([p.select_columns(columns) for p in parts])
            except ValueError as exc:  # e.g. other integer types: datasets made by different tools
                fail(f"{' and '.join(stage_data_dirs(args))} cannot be trained as one dataset ({exc}); write both "
                     "with one prepare_data.py run")
            extra_counts = {f"rows_{os.path.basename(p)}": len(d) for p, d in zip(stage_data_dirs(args), parts,
                                                                                 strict=True)}
        data_name = " + ".join(stage_data_dirs(args))
    check_schema(ds, data_name)
    lengths = ds.data.column("length").to_numpy().astype(np.int64)
    n_trained, n_within, max_id = scan_tokens(ds, args.max_len)
    idx, sel_len, counts = select_samples(lengths, n_trained, args.max_len, args.oversize, n_within)
    if extra_counts:
        counts.update(extra_counts)
    if not len(idx):
        fail(f"no trainable sample in {data_name} (counts: {counts})")
    return ds, data_name, idx, sel_len, counts, max_id


def checkpoint_layers(model, every):
    """Gradient checkpointing on every `every`-th decoder layer (0, every, 2*every, ...): those
    recompute their activations in backward, the others keep them. Every layer (every=1) needs the
    least memory; on a GPU with memory to spare a larger `every` recomputes less. Returns how many
    layers are checkpointed, e.g. "16/32 layers"."""
    from transformers.modeling_layers import GradientCheckpointingLayer
    if every < 1:
        fail(f"--checkpoint-every {every}: give 1 or more (--no-gradient-checkpointing turns it off)")
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i % every == 0
    return f"{sum(layer.gradient_checkpointing for layer in layers)}/{len(layers)} layers"


def adamw(model, args):
    """AdamW with weight decay on matrices only, not on norms and biases (ZeRO-3 partitions keep
    the real shape in ds_shape: p.dim() is 1 for every partitioned parameter)."""
    matrix = {n: len(getattr(p, "ds_shape", p.shape)) >= 2 for n, p in model.named_parameters()}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for n, p in trainable if matrix[n]], "weight_decay": args.weight_decay},
                              {"params": [p for n, p in trainable if not matrix[n]], "weight_decay": 0.0}],
                             lr=args.lr, betas=tuple(args.betas))


# What a resume may change. Every key of train_config.json is in exactly one of these sets (a test
# checks it, so a new flag must be placed): the settings in RESUME_REFUSED define the run (its data,
# model, length, seed, LoRA shape, precision and sharding) and cannot change mid-run; those in
# RESUME_APPLIED are what users change on purpose (a lower lr after a NaN stop, clipping, the save
# cadence, the kernel) and take effect from the resumed step on, with a warning and an entry in the
# config's "changes"; RESUME_FREE may differ freely (where and how long this process runs; the world
# size and accumulation are elastic, see resume_plan; the rest is derived from the settings above).
RESUME_REFUSED = {"stage", "model_resolved", "model_in_out_dir", "data", "cpt_data", "max_len", "oversize",
                  "max_steps", "epochs", "seed", "lora", "lora_r", "lora_alpha", "lora_dropout", "zero_stage",
                  "compute_dtype"}
RESUME_APPLIED = {"lr", "min_lr_ratio", "warmup_ratio", "weight_decay", "betas", "clip", "save_every", "keep_last",
                  "loss_chunk", "gradient_checkpointing", "checkpoint_every", "attn", "attention", "deepspeed"}
RESUME_FREE = {"model", "out_dir", "resume", "stop_after", "log_every", "tensorboard", "peak_tflops",
               "trust_remote_code", "world_size", "grad_accum", "total_steps", "steps_per_epoch", "data_counts",
               "fill", "changes", "dtype"}  # dtype: as asked (auto); compute_dtype is what it resolved to


def compare_settings(saved, config, start, step):
    """The settings changed since the run being resumed, as [{setting, old, new, from_step}]; stops
    on one that cannot change. The starting model is compared by its place inside --out-dir when
    both runs made it there (init/, base-llama/, stage1/final), so a copied run folder resumes."""
    def value(cfg, key):
        if key == "model_resolved" and saved.get("model_in_out_dir") and config.get("model_in_out_dir"):
            return cfg.get("model_in_out_dir")
        if key == "model_in_out_dir":  # compared through model_resolved above
            return None
        return cfg.get(key)
    refused = {k: (value(saved, k), value(config, k)) for k in sorted(RESUME_REFUSED)
               if value(saved, k) != value(config, k)}
    if refused:
        said = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
        fail(f"{start} belongs to a run with other settings ({said}). These define the run and cannot "
             "change mid-run: resume with the same ones, or start afresh with --resume none (or another --out-dir)")
    return [{"setting": k, "old": saved.get(k), "new": config[k], "from_step": step + 1} for k in sorted(RESUME_APPLIED)
            if k in saved and saved[k] != config[k]]


def apply_hyperparameters(opt, sched, args):
    """After loading a checkpoint, put this command's lr, betas and weight decay into the optimizer
    and schedule, which the checkpoint restored with the old ones; the lr of the next step follows
    the (possibly new) schedule at the resumed step, as if the run had had these settings all along."""
    decay = [args.weight_decay, 0.0]  # adamw's two groups: matrices, then norms and biases
    for group, wd in zip(opt.param_groups, decay, strict=False):  # a wrapper may have dropped an empty group
        group.update(betas=tuple(args.betas), weight_decay=wd, initial_lr=args.lr)
    sched.base_lrs = [args.lr] * len(opt.param_groups)
    for group, factor in zip(opt.param_groups, sched.lr_lambdas, strict=True):
        group["lr"] = args.lr * factor(sched.last_epoch)
    sched._last_lr = [group["lr"] for group in opt.param_groups]


def resume_step(args, start, run_dir, config, engine, model, opt, sched, rank, world, position):
    """Load checkpoint `start` (None: a fresh run) and return the steps it holds. A checkpoint
    written with settings that define the run is refused; settings users change on purpose are
    applied from here on, with a warning, and recorded in config["changes"] (compare_settings).
    The world size and accumulation may differ (resume_plan); ZeRO shards of another world size are
    loaded through the universal layout."""
    if not start:
        return 0
    saved_file = os.path.join(run_dir, "train_config.json")
    saved = json.load(open(saved_file)) if os.path.exists(saved_file) else config
    changes = compare_settings(saved, config, start, position["step"])
    config["changes"] = saved.get("changes", []) + changes
    universal = None
    if engine is not None and position["world_size"] != world:
        universal = to_universal(start, run_dir, rank)
    step = load_checkpoint(start, engine, model, opt, sched, rank, universal)
    if universal:
        barrier()
        if rank == 0:
            shutil.rmtree(os.path.dirname(universal), ignore_errors=True)
    # Always, not only when they differ from train_config.json: a run that changed them and died before
    # its next checkpoint has already recorded the new values there, while this checkpoint holds the old.
    apply_hyperparameters(opt, sched, args)
    for c in changes:
        log(f"warning: --{c['setting'].replace('_', '-')} changed since the run being resumed: {c['old']!r} -> "
            f"{c['new']!r}, applied from step {step + 1} on (recorded in train_config.json's \"changes\")")
    log(f"resumed from {start}: {step} steps done"
        + (f", saved on {position['world_size']} rank(s)" if universal else ""))
    return step


def save_final(final, args, run_dir, model, peft_model, engine, zero_stage, tokenizer, stored_dtype, config, master):
    """The final weights: a Hugging Face folder in the checkpoint's own dtype (LoRA: merged, and
    the adapter beside it; ZeRO-3: the shards gathered to rank 0, a collective)."""
    if args.lora:
        if master:
            adapter = os.path.join(run_dir, "final-adapter")
            with staged_folder(adapter) as tmp:
                peft_model.save_pretrained(tmp)
            merged = peft_model.merge_and_unload()
            save_model(merged, tokenizer, final, stored_dtype, {"train_config.json": config})
    elif engine is not None and zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # collective: gathers the shards on rank 0
        if master:
            state = {k.removeprefix("model."): v for k, v in state.items()}
            save_model(model, tokenizer, final, stored_dtype, {"train_config.json": config}, state=state)
    elif master:
        save_model(model, tokenizer, final, stored_dtype, {"train_config.json": config})


def choose_checkpoint(args, ckpt_root, run_dir, rank, world):
    """(checkpoint to resume or None, its data position, its world size's accumulation plan):
    the newest one that verifies (--resume auto; never afresh over existing ones), a given one
    (which must verify), or none (--resume none deletes the old ones). Decided before anything
    else: a checkpoint of another world size changes the accumulation and how DeepSpeed loads it."""
    if args.resume == "none" and rank == 0:
        shutil.rmtree(ckpt_root, ignore_errors=True)
    barrier()
    if args.resume == "auto":
        start = checkpoint_to_resume(ckpt_root, rank, world)
    elif args.resume == "none":
        start = None
    else:
        start = args.resume
        reason = verify_checkpoint(start, rank, world)
        if reason:
            fail(f"--resume {start}: {reason}")
    position = checkpoint_position(start, run_dir) if start else None
    resumed_total = None
    if position:  # on another world size, the accumulation that keeps the global batch
        args.grad_accum, resumed_total = resume_plan(position, world, args.grad_accum)
    return start, position, resumed_total


def main(argv=None):
    # --- 1. config and inputs: flags, --deepspeed, every path (nothing heavy loads before they check out)
    args = parse_args(argv)
    from tqdm import tqdm
    from transformers import AutoTokenizer
    ds_file = read_deepspeed_config(args.deepspeed)
    zero_stage = (args.zero_stage if args.zero_stage is not None
                  else ds_file.get("zero_optimization", {}).get("stage", 0))
    tok_dir = check_inputs(args)
    if args.lora and zero_stage == 3:
        fail("--lora needs --zero-stage 0, 1 or 2 (merging adapters into ZeRO-3 shards is not supported)")
    if args.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            fail("--tensorboard needs the tensorboard package (pip install tensorboard)")

    # --- 2. processes, seeds, the run folder's lock
    rank, world, device = setup_distributed(zero_stage > 0)
    master = rank == 0
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    run_dir = os.path.join(args.out_dir, run_name(args.stage))
    ckpt_root = os.path.join(run_dir, "checkpoints")
    if master:  # one writer per run folder; held until this process ends
        run_lock, previous_holder = lock_folder(  # noqa: F841
            run_dir, "two runs must not write the same run folder. Stop that run first (kill -TERM its torchrun "
            "launcher and wait: the workers checkpoint and exit), or use another --out-dir")
        if previous_holder:
            log(f"{run_dir}: the previous run ({previous_holder}) has ended; taking over its folder")
    barrier()

    # --- 3. the checkpoint to resume from, if any
    start, position, resumed_total = choose_checkpoint(args, ckpt_root, run_dir, rank, world)

    # --- 4. tokenizer, data, plan (identical on every rank: packing is deterministic)
    model_path = resolve_model(args, tok_dir, master)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir or model_path, trust_remote_code=args.trust_remote_code)
    ds, data_name, idx, sel_len, counts, max_id = load_stage_data(args, tokenizer)
    packs0 = pack_best_fit(sel_len, args.max_len, args.seed, 0)
    fill0 = fill_efficiency(packs0, sel_len, args.max_len)
    steps_per_epoch = len(step_plan(len(packs0), world, args.grad_accum))
    total_steps = args.max_steps or max(1, math.ceil(args.epochs * steps_per_epoch))
    if position:  # the schedule of the run being resumed (stretched when its global batch changes now)
        total_steps = resumed_total or position["total_steps"]
    warmup = int(args.warmup_ratio * total_steps)
    model_cfg = model_config(model_path, tokenizer, args.trust_remote_code)
    check_rope_with_packing(model_cfg, sel_len, model_path)  # before loading weights: the lengths decide
    log(f"data: {counts['read']} samples in {data_name}, {counts['kept']} trainable ({counts}); "
        f"{len(packs0)} packs of <= {args.max_len} tokens, fill {fill0:.2%}; "
        f"{steps_per_epoch} steps/epoch on {world} rank(s) x {args.grad_accum} packs; {total_steps} steps")

    # --- 5. model (+ LoRA). Under ZeRO-3 DeepSpeed's config must exist before the weights load.
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    attn = pick_attention(args.attn, device, args.max_len)
    if attn == "varlen" and dtype == "fp32":
        fail("--attn varlen computes in 16 bits and this run is --dtype fp32: use --dtype bf16, or --attn sdpa")
    engine = ds_keepalive = None
    if zero_stage > 0:
        try:
            import deepspeed
            deepspeed.init_distributed(dist_backend=dist.get_backend())  # adopts our process group
            ds_cfg = deepspeed_config(ds_file, args, world, dtype, zero_stage, model_cfg.hidden_size)
            if position and position["world_size"] != world:  # ZeRO shards of another world size
                ds_cfg["checkpoint"] = {**ds_cfg.get("checkpoint", {}), "load_universal": True}
            if zero_stage == 3:
                # must exist before from_pretrained: transformers then builds the model already
                # partitioned (deepspeed.zero.Init), so no rank ever holds all 7B weights
                from transformers.integrations import HfDeepSpeedConfig
                ds_keepalive = HfDeepSpeedConfig(ds_cfg)  # noqa: F841
        except Exception as e:
            if device.type == "cuda":
                raise
            log(f"DeepSpeed unavailable on this CPU machine ({type(e).__name__}: {e}); using the plain PyTorch loop")
            zero_stage = 0
    # without DeepSpeed the weights stay fp32 (master weights) and bf16 is autocast
    load_dtype = torch.bfloat16 if zero_stage > 0 and dtype == "bf16" else torch.float32
    model, stored_dtype = load_model(model_path, load_dtype, attn, args.trust_remote_code)
    if max_id >= model.config.vocab_size:
        fail(f"{data_name} has token id {max_id} but {model_path} has only {model.config.vocab_size} embeddings: "
             "the data was tokenized for another model (prepare_data.py --tokenizer)")
    grad_ckpt = args.gradient_checkpointing if args.gradient_checkpointing is not None else device.type == "cuda"
    if grad_ckpt:
        checkpointed = checkpoint_layers(model, args.checkpoint_every)
    peft_model = None
    if args.lora:
        from peft import LoraConfig, get_peft_model
        if grad_ckpt:
            model.enable_input_require_grads()
        # get_peft_model injects the adapters into `model` itself, which PackedLM keeps using
        peft_model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha,
                                                      lora_dropout=args.lora_dropout, target_modules="all-linear",
                                                      task_type="CAUSAL_LM"))
    n_params, n_matmul = count_params(model), matmul_params(model)

    # --- 6. optimizer, schedule, and the wrapper that runs the steps (DeepSpeed engine, DDP, or none).
    # `model` stays the Hugging Face model throughout; `packed_lm` is it plus the loss, what gets wrapped.
    packed_lm = PackedLM(model, args.loss_chunk)
    opt = adamw(model, args)

    def make_schedule(optimizer):  # DeepSpeed calls it with its own wrapper of `opt`
        return torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                 lambda s: lr_at(s, total_steps, warmup, 1.0, args.min_lr_ratio))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16" and zero_stage == 0)
    ddp = None
    if zero_stage > 0:
        if zero_stage == 3:
            # PackedLM reads lm_head.weight itself instead of calling lm_head: tell ZeRO-3 to gather it
            deepspeed.zero.register_external_parameter(packed_lm, model.get_output_embeddings().weight)
        # DeepSpeed wraps the optimizer too: from here `opt` is its ZeRO optimizer around our AdamW
        engine, opt, _, sched = deepspeed.initialize(model=packed_lm, optimizer=opt, lr_scheduler=make_schedule,
                                                     config=ds_cfg)
        runner = engine
    else:
        sched = make_schedule(opt)
        packed_lm.to(device)
        ddp = torch.nn.parallel.DistributedDataParallel(packed_lm) if world > 1 else None
        runner = ddp or packed_lm
    with torch.no_grad(), autocast:
        err = check_isolation(model)
    model.train()
    log(f"model: {model_path} ({n_params / 1e6:.1f}M params{', LoRA' if args.lora else ''}), attention {attn}, "
        f"compute {dtype}, "
        f"{'DeepSpeed ZeRO-' + str(zero_stage) if zero_stage else 'plain PyTorch' + (' DDP' if ddp else '')}, "
        f"gradient checkpointing {checkpointed if grad_ckpt else 'off'}; "
        f"packed-sample isolation checked (err {err:.1e})")

    # --- 7. restore the checkpoint, write the run's config, open the log, arm the signals
    in_out_dir = os.path.relpath(model_path, args.out_dir)
    config = {**vars(args), "model_resolved": model_path, "world_size": world, "attention": attn,
              "compute_dtype": dtype, "model_in_out_dir": None if in_out_dir.startswith("..") else in_out_dir,
              "changes": [], "zero_stage": zero_stage, "total_steps": total_steps, "steps_per_epoch": steps_per_epoch,
              "data_counts": counts, "fill": fill0}
    step = resume_step(args, start, run_dir, config, engine, model, opt, sched, rank, world, position)
    os.makedirs(run_dir, exist_ok=True)
    log_path = os.path.join(run_dir, "log.jsonl")
    if master:
        write_json(os.path.join(run_dir, "train_config.json"), config)
        # keep the log of the steps the checkpoint contains; anything after it is redone
        kept = [json.dumps(r) + "\n" for r in read_jsonl(log_path) if r.get("step", step + 1) <= step] if step else []
        atomic_write(log_path, lambda f: f.write("".join(kept).encode()))
    log_file = open(log_path, "a") if master else None
    tb = SummaryWriter(os.path.join(run_dir, "tensorboard")) if master and args.tensorboard else None
    # SIGTERM (preemption, scancel, torchrun shutting down): finish the step, checkpoint, exit
    stop = {"signal": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(signal=True))
    # torchrun (torch 2.13) starts each worker in its own session: if the launcher is killed, the
    # workers would train on as orphans. A worker whose parent changed treats it as a SIGTERM.
    launcher = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None

    peak = peak_tflops(args, device)
    # in a log file (SLURM, nohup) a redraw every 30 s, not ten a second: the step lines above are the record
    bar = tqdm(total=total_steps, initial=step, disable=not master, desc=f"stage {args.stage}", dynamic_ncols=True,
               mininterval=0.1 if sys.stderr.isatty() else 30.0)
    end = min(total_steps, step + args.stop_after) if args.stop_after else total_steps
    last_saved = step if start else -1

    def checkpoint(step, position):  # a save stalls training: say how long, and on what
        took = save_checkpoint(ckpt_root, step, engine, model, opt, sched, rank, args.keep_last, world, position)
        log(f"checkpoint step-{step:07d}: {took['total']:.1f} s (writing {took['write']:.1f} s, "
            f"hashing {took['hash']:.1f} s)")

    def log_step(rec):  # rank 0: log.jsonl, TensorBoard, the bar, and every --log-every steps a line
        if not master:
            return
        log_file.write(json.dumps(rec) + "\n")
        log_file.flush()
        if tb:
            for k in ("loss", "lr", "grad_norm", "tokens_per_s_per_device", "fill", "peak_mem_gib"):
                tb.add_scalar(f"train/{k}", rec[k], rec["step"])
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tokens_per_s']:,.0f}")
        if rec["step"] % args.log_every == 0 or rec["step"] == total_steps:
            log(f"step {rec['step']}/{total_steps}  loss {rec['loss']:.4f}  lr {rec['lr']:.2e}  "
                f"grad-norm {rec['grad_norm']:.3f}  {rec['tokens_per_s_per_device']:,.0f} tok/s/device"
                + (f"  MFU {rec['mfu']:.1%}" if peak else ""))

    # --- 8. train: one optimizer step per step_plan entry, --grad-accum packs per rank. The data
    # position (`done` packs of epoch `epoch` trained) is what every checkpoint saves.
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    epoch, done = (position["epoch"], position["packs_done"]) if position else (0, 0)
    while step < end:
        packs = pack_best_fit(sel_len, args.max_len, args.seed, epoch)
        for step_packs in step_plan(len(packs), world, args.grad_accum, start=done):
            t0 = time.time()
            # this rank's packs, collated; the loss is the mean over the step's trained tokens on all ranks
            batches, is_filler = rank_micro_batches(ds, idx, packs, step_packs, rank, args.max_len)
            step_tokens = all_sum(sum(trained_tokens(b["labels"]) for b, f in zip(batches, is_filler, strict=True)
                                      if not f), device)
            lr = sched.get_last_lr()[0]
            # forward and backward of every micro-batch
            loss_sum = forward_backward(runner, batches, is_filler, step_tokens, world, device, autocast)
            loss = all_sum(loss_sum, device) / step_tokens
            stop_if_not_finite("loss", loss, step + 1, ckpt_root, bar, "stopped before the optimizer step")
            # the update
            grad_norm = optimizer_step(engine, opt, sched, packed_lm, args.clip)
            stop_if_not_finite("gradient norm", grad_norm, step + 1, ckpt_root, bar,
                               "the weights are no longer usable")
            step += 1
            trained = sorted(p for rank_packs in step_packs for p in rank_packs if p is not None)
            done += len(trained)
            # metrics and logs
            dt = time.time() - t0
            seqlens = [int(x) for b, f in zip(batches, is_filler, strict=True) if not f for x in b["cu_seqlens"].diff()]
            tokens = all_sum(sum(seqlens), device)
            flops = all_sum(step_flops(model.config, n_matmul, seqlens), device)
            mem = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                   else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
            log_step({"step": step, "epoch": epoch, "packs": trained, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                      "trained_tokens": int(step_tokens), "tokens": int(tokens), "tokens_per_s": tokens / dt,
                      "tokens_per_s_per_device": tokens / dt / world, "tflops_per_device": flops / dt / world / 1e12,
                      "mfu": flops / dt / world / 1e12 / peak if peak else None,
                      "fill": tokens / (len(trained) * args.max_len), "peak_mem_gib": mem / 2**30, "time_s": dt})
            # stop (SIGTERM, the launcher gone) or save
            if launcher is not None and os.getppid() != launcher:
                stop["signal"] = True
            stop_now = all_sum(stop["signal"], device) > 0
            position = data_position(step, epoch + (done == len(packs)), done % len(packs), world, args.grad_accum,
                                     total_steps)
            if step % args.save_every == 0 or step == end or stop_now:
                checkpoint(step, position)
                last_saved = step
            if stop_now:
                bar.close()
                log(f"SIGTERM (or the launcher died): checkpoint {ckpt_root}/step-{step:07d} saved; run the same "
                    "command to resume")
                sys.exit(143)
            if step >= end:
                break
        else:  # the epoch is done
            epoch, done = epoch + 1, 0

    # --- 9. finish: the last checkpoint, the loss curve, the final weights
    bar.close()
    if last_saved != step:
        checkpoint(step, position)
    if master:
        log_file.close()
        if tb:
            tb.close()
        plot_loss(log_path, os.path.join(run_dir, "loss.png"))
    if step < total_steps:
        log(f"stopped after step {step} of {total_steps} (--stop-after); run the same command to continue")
    else:  # a Hugging Face folder in the checkpoint's own dtype
        final = os.path.join(run_dir, "final")
        t0 = time.time()
        save_final(final, args, run_dir, model, peft_model, engine, zero_stage, tokenizer, stored_dtype, config, master)
        barrier()
        log(f"saved {final} after {step} steps ({time.time() - t0:.1f} s); log {log_path}, "
            f"curve {os.path.join(run_dir, 'loss.png')}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
