"""The expert LoRA tuner on a tiny random Llama: exact mixture, scaling, validation, routing lifetime."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from recbole_ilora.expert_lora import ExpertLoraConfig, ExpertLoraModel, ExpertRouting, attach_routing
from recbole_ilora.llm import build_tiny_llama
from tests.helpers import randomize_lora_b

TARGETS = ("q_proj", "v_proj", "down_proj")


def tiny_peft(settings: ExpertLoraConfig):
    torch.manual_seed(0)
    llm, _ = build_tiny_llama(["a tiny corpus of words for the tokenizer"])
    llm.requires_grad_(False)
    model = get_peft_model(llm, settings.to_peft())
    randomize_lora_b(model)
    return model.eval()


def test_uniform_gate_with_per_expert_scaling_equals_plain_peft_lora():
    """The authors' alpha/(r/K) per expert times gate weights 1/K is exactly plain LoRA's alpha/r."""
    settings = ExpertLoraConfig(rank=8, num_experts=4, dropout=0.0, target_modules=TARGETS)
    plain = tiny_peft(settings)
    ids = torch.randint(0, 100, (3, 7))
    reference = plain.get_base_model().get_decoder()(input_ids=ids).last_hidden_state
    gate = torch.nn.Linear(5, 4, bias=False)
    torch.nn.init.zeros_(gate.weight)  # uniform mixture whatever the input
    mixed = ExpertLoraModel(tiny_peft(settings), settings, gate)
    output = mixed(torch.randn(3, 5), input_ids=ids).last_hidden_state
    torch.testing.assert_close(output, reference)


def test_experts_mix_per_example_exactly():
    """Σ_k w_k B_k A_k x · alpha/(r/K), checked on one adapted layer against a hand computation."""
    model = tiny_peft(ExpertLoraConfig(rank=8, num_experts=4, target_modules=TARGETS))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    routing = ExpertRouting(rank=8)
    attach_routing(model, routing)
    x = torch.randn(2, 5, layer.in_features)
    weights = torch.softmax(torch.randn(2, 4), -1)
    routing.rank_weights = weights.repeat_interleave(2, -1) * 4  # per-expert scaling: K x the gate weights
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # [r, in], [out, r]
    expected = layer.base_layer(x)
    for k in range(4):
        rows = slice(2 * k, 2 * k + 2)
        delta = x @ A[rows].T @ B[:, rows].T * (32 / 2)  # per-expert scaling alpha / (r/K)
        expected = expected + weights[:, k, None, None] * delta
    torch.testing.assert_close(layer(x), expected)


def test_each_example_gets_its_own_mixture_through_the_model():
    settings = ExpertLoraConfig(rank=8, num_experts=4, dropout=0.0, target_modules=TARGETS)
    torch.manual_seed(1)
    model = ExpertLoraModel(tiny_peft(settings), settings, torch.nn.Linear(5, 4, bias=False))
    ids, z = torch.randint(0, 100, (2, 7)), torch.randn(2, 5)
    together = model(z, input_ids=ids).last_hidden_state
    apart = torch.cat([model(z[i : i + 1], input_ids=ids[i : i + 1]).last_hidden_state for i in range(2)])
    torch.testing.assert_close(together, apart)
    swapped = model(z.flip(0), input_ids=ids).last_hidden_state
    assert not torch.allclose(swapped, together)  # the mixture depends on each example's gate input


def test_gate_weights_live_for_one_decoder_call_only():
    settings = ExpertLoraConfig(rank=8, num_experts=2, target_modules=TARGETS)
    model = ExpertLoraModel(tiny_peft(settings), settings, torch.nn.Linear(5, 2, bias=False))
    ids = torch.randint(0, 100, (2, 7))
    model(torch.randn(2, 5), input_ids=ids)
    assert model.routing.rank_weights is None
    with pytest.raises(RuntimeError, match="outside ExpertLoraModel"):
        model.decoder(input_ids=ids)  # the adapted layers refuse to run without a mixture
    with pytest.raises(RuntimeError, match="batch of 3"):
        model(torch.randn(3, 5), input_ids=ids)
    assert model.routing.rank_weights is None  # cleared after a failing call too
    with pytest.raises(ValueError, match="gate input"):
        model(None, input_ids=ids)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"rank": 6, "num_experts": 4}, "multiple of num_experts"),
        ({"num_experts": 0}, "multiple of num_experts"),
        ({"expert_scaling": "sqrt"}, "expert_scaling"),
        ({"gate_temperature": 0.0}, "gate_temperature"),
        ({"dropout": 1.0}, "lora_dropout"),
        ({"target_modules": ()}, "lora_target_modules"),
    ],
)
def test_settings_are_validated_once(changes, message):
    with pytest.raises(ValueError, match=message):
        ExpertLoraConfig(**changes)


def test_settings_from_recbole_config_and_gate_presence():
    config = {"lora_rank": 8, "lora_alpha": 32, "lora_dropout": 0.1, "lora_target_modules": ["q_proj"],
              "num_experts": 4, "expert_scaling": "peft", "gate_temperature": 2.0}
    settings = ExpertLoraConfig.from_config(config)
    assert (settings.expert_rank, settings.gate_scale, settings.gated) == (2, 1.0, True)
    assert ExpertLoraConfig(num_experts=4).gate_scale == 4.0
    with pytest.raises(ValueError, match="need a gate"):
        ExpertLoraModel(tiny_peft(settings), settings, gate=None)
    one = ExpertLoraConfig(num_experts=1, target_modules=TARGETS)
    with pytest.raises(ValueError, match="need a gate"):
        ExpertLoraModel(tiny_peft(one), one, gate=torch.nn.Linear(5, 1))
