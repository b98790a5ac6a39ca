"""train.py's attention over packs: PyTorch's varlen kernel registered with transformers, the
per-sample reference kernel in the same slot, the boundaries every attention receives, and the
choice --attn auto makes on each kind of machine.

PyTorch's varlen op runs on CUDA only. On CPU the plumbing (registration, layout, boundaries,
dtype, sliding window, each release's signature) is checked by putting stand-ins with each
release's signature where torch keeps the op, and the numbers by holding the whole path to
transformers' own sdpa with its block-diagonal mask: an independent computation."""
import sys
import types

import pytest
import torch
from torch.nn.attention import varlen as torch_varlen_module
from transformers import AutoModelForCausalLM

import train
from conftest import assert_same_grads, grads, make_internlm2_checkpoint, random_samples, tiny_model

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)
train.register_packed_attention()


def loss_and_grads(model, attn, batch, autocast=False):
    model.set_attn_implementation(attn)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = train.packed_loss_sum(model, batch, chunk=16)
    loss.backward()
    return loss.detach(), grads(model)


# ---------------------------------------------------------------------------------------------
# The reference kernel in the varlen slot == transformers' sdpa with its block-diagonal mask

@pytest.mark.parametrize("kind,extra", [
    ("llama", {}),
    ("qwen2", {}),  # q/k/v biases, tied embeddings
    ("mistral", {"sliding_window": None}),
    ("mistral", {"sliding_window": 8}),  # samples up to 40 tokens: the window really cuts
])
def test_varlen_slot_gives_the_losses_and_gradients_of_the_sdpa_path(kind, extra):
    model = tiny_model(kind, **extra)
    batch = train.collate_pack(random_samples(6, seed=3), 512)
    assert int(batch["max_seqlen"]) > 8
    ref_loss, ref_grads = loss_and_grads(model, "sdpa", batch)
    loss, g = loss_and_grads(model, "varlen_reference", batch)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert_same_grads(g, ref_grads)
    # and the start-up self-check holds on the chosen kernel
    assert train.check_isolation(model) < 1e-5


def test_a_sliding_window_is_applied_not_ignored():
    """With the window ignored the second half of a 40-token sample would see further back."""
    model = tiny_model("mistral", sliding_window=8)
    batch = train.collate_pack(random_samples(6, seed=3), 512)
    windowed, _ = loss_and_grads(model, "varlen_reference", batch)
    model.config.sliding_window = None
    for layer in model.model.layers:
        layer.self_attn.config.sliding_window = None
    unwindowed, _ = loss_and_grads(model, "varlen_reference", batch)
    assert abs(windowed.item() - unwindowed.item()) > 1e-3


def test_a_converted_internlm2_loads_and_trains_through_the_varlen_slot(tmp_path, bpe_tokenizer):
    """InternLM2's 6 query heads per 2 KV heads, converted to the Llama layout, loaded by name."""
    src, dst = str(tmp_path / "internlm2"), str(tmp_path / "llama")
    make_internlm2_checkpoint(src, bpe_tokenizer, vocab_size=4000 + 8)
    train.convert_internlm2(src, dst)
    model = AutoModelForCausalLM.from_pretrained(dst, attn_implementation="varlen_reference", dtype=torch.float32)
    assert model.config._attn_implementation == "varlen_reference"
    batch = train.collate_pack(random_samples(5, seed=4, vocab=4000), 512)
    loss, g = loss_and_grads(model, "varlen_reference", batch)
    ref_loss, ref_grads = loss_and_grads(model, "sdpa", batch)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert_same_grads(g, ref_grads, atol=1e-4, rtol=1e-4)  # its random weights give gradients up to ~10


def test_without_train_pys_boundaries_they_come_from_position_ids_and_rows():
    """A forker calling the model directly (no cu_seq_lens) still gets isolated samples: the
    boundaries are where position_ids restart, and every row of a batch starts one."""
    model = tiny_model("llama")
    samples = random_samples(3, seed=6)
    b = train.collate_pack(samples, 512)
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        ref = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits
        model.set_attn_implementation("varlen_reference")
        ours = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
        rows = torch.stack([b["input_ids"][0, :10], b["input_ids"][0, 10:20]])  # two rows, no position_ids
        ours = model(input_ids=rows, use_cache=False).logits
        model.set_attn_implementation("sdpa")
        torch.testing.assert_close(ours, model(input_ids=rows, use_cache=False).logits, atol=1e-5, rtol=1e-5)


def test_the_packed_attention_refuses_what_it_is_not_for():
    model = tiny_model("llama")
    model.set_attn_implementation("varlen_reference")
    ids = torch.tensor([[5, 6, 7, 8]])
    with pytest.raises(ValueError, match="no padding mask"):  # padding would otherwise be dropped silently
        model(input_ids=ids, attention_mask=torch.tensor([[0, 1, 1, 1]]), use_cache=False)
    with pytest.raises(ValueError, match="no attention mask, no KV cache"):  # generation
        model.generate(input_ids=ids, max_new_tokens=2, do_sample=False)
    # an all-ones mask hides the boundaries from sdpa (see test_train); here they still come from position_ids
    b = train.collate_pack(random_samples(3, seed=8), 512)
    with torch.no_grad():
        ones = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False,
                     attention_mask=torch.ones_like(b["input_ids"])).logits
        model.set_attn_implementation("sdpa")
        ref = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits
    torch.testing.assert_close(ones, ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# PyTorch's varlen_attn, each release's signature, faked where torch keeps it

def fake_release(signature):
    """A stand-in for torch.nn.attention.varlen.varlen_attn with one release's keywords, which
    checks what it is given the way that release would and computes with the reference kernel."""
    calls = []

    def check_and_compute(q, k, v, cu_q, cu_k, max_q, max_k, causal, window, scale, kw):
        assert q.dtype in (torch.float16, torch.bfloat16) and q.dtype == k.dtype == v.dtype, "FA2 is 16-bit only"
        assert cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k) and max_q == max_k
        assert causal, "training attention must be causal"
        calls.append(kw)
        return train.per_sample_sdpa(q, k, v, cu_q, max_q, scale, window)

    if signature == "2.10":
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
            return check_and_compute(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal, None, None,
                                     {"is_causal": is_causal})
    elif signature == "2.11":
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                        window_size=(-1, -1)):
            assert isinstance(window_size, tuple), "2.11 compares window_size with a tuple"
            w = None if window_size[0] == -1 else window_size[0] + 1
            return check_and_compute(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size[1] == 0, w,
                                     scale, {"window_size": window_size, "scale": scale})
    else:
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                        window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
            if not enable_gqa and query.shape[1] != key.shape[1]:
                raise ValueError("Expect query and key/value to have the same number of heads")
            assert isinstance(window_size, tuple)
            w = None if window_size[0] == -1 else window_size[0] + 1
            return check_and_compute(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size[1] == 0, w,
                                     scale, {"window_size": window_size, "scale": scale, "enable_gqa": enable_gqa,
                                             "num_splits": num_splits})
    return varlen_attn, calls


def test_the_installed_torchs_own_signature_is_read_right():
    kw, has_scale = train.torch_varlen_kwargs(torch_varlen_module.varlen_attn, 32, 8, None)
    assert kw == {"window_size": (-1, 0), "enable_gqa": True, "num_splits": 1} and has_scale  # torch 2.12+


@pytest.mark.parametrize("release", ["2.10", "2.11", "2.12"])
def test_each_release_gets_its_own_keywords_and_the_reference_result(monkeypatch, release):
    fake, calls = fake_release(release)
    monkeypatch.setattr(torch_varlen_module, "varlen_attn", fake)
    g = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 9, 30, 31, 47], dtype=torch.int32)
    q, k, v = (torch.randn(47, h, 16, generator=g).to(torch.bfloat16) for h in (4, 2, 2))
    scale = 0.3  # not 1/sqrt(16): a release without `scale` must fold it into q
    out = train.torch_varlen(q, k, v, cu, 21, scale)
    torch.testing.assert_close(out, train.per_sample_sdpa(q, k, v, cu, 21, scale), atol=2e-2, rtol=2e-2)
    expected = {"2.10": {"is_causal": True},
                "2.11": {"window_size": (-1, 0), "scale": scale},
                "2.12": {"window_size": (-1, 0), "scale": scale, "enable_gqa": True, "num_splits": 1}}[release]
    assert calls == [expected]
    # a sliding window shorter than a sample: passed on where the release has window_size, refused where not
    calls.clear()
    if release == "2.10":
        with pytest.raises(ValueError, match="has no sliding window"):
            train.torch_varlen(q, k, v, cu, 21, scale, window=8)
        train.torch_varlen(q, k, v, cu, 21, scale, window=21)  # no sample longer than the window: plain causal
        assert calls == [{"is_causal": True}]
    else:
        out = train.torch_varlen(q, k, v, cu, 21, scale, window=8)
        assert calls[0]["window_size"] == (7, 0)
        torch.testing.assert_close(out, train.per_sample_sdpa(q, k, v, cu, 21, scale, 8), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("release", ["2.10", "2.11", "2.12"])
def test_a_model_through_each_release_matches_the_reference_kernel_under_bf16_autocast(monkeypatch, release):
    """The whole model path in training's precision (fp32 weights, bf16 autocast: q and k come out
    of RoPE in fp32 and must be cast, v is already bf16)."""
    fake, calls = fake_release(release)
    monkeypatch.setattr(torch_varlen_module, "varlen_attn", fake)
    model = tiny_model("llama")
    batch = train.collate_pack(random_samples(5, seed=7), 512)
    loss, g = loss_and_grads(model, "varlen", batch, autocast=True)
    ref_loss, ref_grads = loss_and_grads(model, "varlen_reference", batch, autocast=True)
    assert len(calls) == model.config.num_hidden_layers  # once per layer in forward
    torch.testing.assert_close(loss, ref_loss, atol=1e-3, rtol=1e-3)
    assert_same_grads(g, ref_grads, atol=1e-3, rtol=1e-2)
    # and fp32 without autocast is refused rather than silently run in another precision
    model.set_attn_implementation("varlen")
    with pytest.raises(ValueError, match="16 bits only"):
        train.packed_loss_sum(model, batch, chunk=16)


# ---------------------------------------------------------------------------------------------
# What --attn auto chooses

@pytest.fixture
def machine(monkeypatch):
    """Fake the parts of a machine pick_attention looks at: the GPU's compute capability, whether
    torch has the varlen module, whether flash_attn imports."""
    def set_up(capability=(9, 0), varlen=True, flash=False):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
        monkeypatch.setitem(sys.modules, "torch.nn.attention.varlen", torch_varlen_module if varlen else None)
        monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn") if flash else None)
    return set_up


@pytest.mark.parametrize("capability,varlen,flash,expected", [
    ((9, 0), True, False, "varlen"),             # H100/H200 with torch >= 2.10: no extra package needed
    ((8, 0), True, True, "varlen"),              # A100, flash-attn installed too: torch's own kernel
    ((9, 0), False, True, "flash_attention_2"),  # torch < 2.10 with flash-attn
    ((7, 0), True, True, "flash_attention_2"),   # V100: no FA2 in torch; flash_attn decides (and checks itself)
])
def test_auto_attention_on_a_gpu(machine, capability, varlen, flash, expected, monkeypatch):
    machine(capability, varlen, flash)
    said = []
    monkeypatch.setattr(train, "log", said.append)
    assert train.pick_attention("auto", GPU, 32768) == expected
    assert said == []


@pytest.mark.parametrize("capability,varlen", [((9, 0), False), ((7, 5), True)])
def test_auto_attention_on_a_gpu_with_no_boundary_aware_kernel_stops_and_says_what_to_do(machine, capability, varlen):
    machine(capability, varlen, flash=False)
    with pytest.raises(SystemExit, match=r"no attention kernel that reads sample boundaries.*torch >= 2\.10.*"
                                         r"pip install flash-attn.*--attn sdpa to accept a dense \[4096 x 4096\]"):
        train.pick_attention("auto", GPU, 4096)


def test_explicit_choices(machine, monkeypatch):
    machine(varlen=True, flash=False)
    said = []
    monkeypatch.setattr(train, "log", said.append)
    assert train.pick_attention("varlen", GPU, 32768) == "varlen"
    assert train.pick_attention("sdpa", GPU, 32768) == "sdpa"  # asked for: runs, with the warning
    assert "dense [32768 x 32768] mask" in said[-1] and "--attn varlen" in said[-1]
    assert train.pick_attention("sdpa", GPU, 8192) == "sdpa" and len(said) == 1
    with pytest.raises(SystemExit, match=r"needs the flash_attn package.*or use --attn varlen"):
        train.pick_attention("flash_attention_2", GPU, 4096)
    assert train.pick_attention("varlen_reference", CPU, 4096) == "varlen_reference"
    with pytest.raises(SystemExit, match=r"--attn varlen needs PyTorch's varlen kernel.*on cpu.*varlen_reference"):
        train.pick_attention("varlen", CPU, 4096)
    machine(varlen=False, flash=True)
    assert train.pick_attention("flash_attention_2", GPU, 32768) == "flash_attention_2"
    with pytest.raises(SystemExit, match="--attn varlen needs PyTorch's varlen kernel"):
        train.pick_attention("varlen", GPU, 4096)


def test_auto_on_cpu_is_sdpa_and_says_nothing(machine, monkeypatch):
    machine(varlen=True, flash=True)
    said = []
    monkeypatch.setattr(train, "log", said.append)
    assert train.pick_attention("auto", CPU, 32768) == "sdpa" and said == []


def test_varlen_with_an_fp32_run_is_refused_up_front(tmp_path, demo_prepared, tiny, monkeypatch):
    """PyTorch's varlen kernel is 16-bit only: a GPU run asked for --dtype fp32 stops in one line
    instead of failing inside the first attention layer."""
    monkeypatch.setattr(train, "pick_attention", lambda *a: "varlen")  # what auto picks on a GPU
    with pytest.raises(SystemExit, match="--attn varlen computes in 16 bits and this run is --dtype fp32"):
        train.main(["--stage", "1", "--data", demo_prepared, "--model", tiny, "--out-dir", str(tmp_path),
                    "--zero-stage", "0", "--dtype", "fp32", "--max-len", "512"])
