"""train.py --checkpoint-every K: gradient checkpointing on every K-th decoder layer. The layers
checkpointed recompute their forward in backward (counted here), the others do not, and the
loss and every gradient are those of no checkpointing at all."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import train
from conftest import assert_same_grads, grads, random_samples


def four_layer_model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).float()
    model.config._attn_implementation = "sdpa"
    return model


def step(model, batch):
    """One forward + backward in training mode; (loss, gradients, forward calls per layer)."""
    calls = [0] * len(model.model.layers)
    for i, layer in enumerate(model.model.layers):  # a module hook would not see the recompute: count calls
        def counting(*a, i=i, forward=layer.mlp.forward, **k):
            calls[i] += 1
            return forward(*a, **k)
        layer.mlp.forward = counting
    model.train()
    model.zero_grad()
    loss = train.packed_loss_sum(model, batch, chunk=16)
    loss.backward()
    return loss.detach(), grads(model), calls


@pytest.mark.parametrize("every,checkpointed,expected_calls", [
    (1, "4/4 layers", [2, 2, 2, 2]),
    (2, "2/4 layers", [2, 1, 2, 1]),
    (3, "2/4 layers", [2, 1, 1, 2]),
    (5, "1/4 layers", [2, 1, 1, 1]),
])
def test_every_kth_layer_recomputes_and_the_gradients_do_not_change(every, checkpointed, expected_calls):
    batch = train.collate_pack(random_samples(5, seed=2), 512)
    ref_loss, ref_grads, calls = step(four_layer_model(), batch)
    assert calls == [1, 1, 1, 1]  # no checkpointing: one forward per layer
    model = four_layer_model()
    assert train.checkpoint_layers(model, every) == checkpointed
    loss, g, calls = step(model, batch)
    assert calls == expected_calls
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert_same_grads(g, ref_grads)


def test_a_non_positive_k_is_refused():
    with pytest.raises(SystemExit, match="--checkpoint-every 0: give 1 or more"):
        train.checkpoint_layers(four_layer_model(), 0)
