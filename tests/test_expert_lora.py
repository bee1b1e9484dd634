"""The expert LoRA peft method on a tiny random Llama: exact mixture, scaling, routing per call (nested calls,
activation checkpointing), validation, and peft's save/load."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from recbole_ilora.expert_lora import ExpertLoraConfig, ExpertLoraModel
from recbole_ilora.llm import build_tiny_llama
from tests.helpers import randomize_lora_b

TARGETS = ["q_proj", "v_proj", "down_proj"]
GATE_INPUT = 5


def tiny_llm():
    torch.manual_seed(0)
    llm, _ = build_tiny_llama(["a tiny corpus of words for the tokenizer"])
    return llm.requires_grad_(False)


def expert_lora(num_experts=4, **changes):
    settings = dict(r=8, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, num_experts=num_experts,
                    gate_input_size=GATE_INPUT if num_experts > 1 else None, task_type="CAUSAL_LM")
    model = get_peft_model(tiny_llm(), ExpertLoraConfig(**{**settings, **changes}))
    randomize_lora_b(model)
    return model.eval()


def test_the_method_is_a_registered_peft_tuner():
    model = expert_lora()
    assert isinstance(model, PeftModel) and isinstance(model.base_model, ExpertLoraModel)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any(".expert_gate." in n for n in trainable)
    assert all("lora_" in n or ".expert_gate." in n for n in trainable)


def test_one_expert_is_plain_peft_lora():
    ids = torch.randint(0, 100, (3, 7))
    plain = get_peft_model(tiny_llm(), LoraConfig(r=8, lora_alpha=32, target_modules=TARGETS, task_type="CAUSAL_LM"))
    randomize_lora_b(plain)
    one = expert_lora(num_experts=1)
    assert not hasattr(one.base_model, "expert_gate")
    assert torch.equal(one.eval()(input_ids=ids).logits, plain.eval()(input_ids=ids).logits)


def test_uniform_gate_with_per_expert_scaling_equals_plain_peft_lora():
    """The authors' alpha/(r/K) per expert times gate weights 1/K is exactly plain LoRA's alpha/r."""
    ids = torch.randint(0, 100, (3, 7))
    plain = expert_lora(num_experts=1)
    mixed = expert_lora()
    torch.nn.init.zeros_(mixed.base_model.gate.weight)  # a uniform mixture whatever the input
    torch.testing.assert_close(mixed(input_ids=ids, gate_input=torch.randn(3, GATE_INPUT)).logits,
                               plain(input_ids=ids).logits)


def test_experts_mix_per_example_exactly():
    """Σ_k w_k B_k A_k x · alpha/(r/K), checked on one adapted layer against a hand computation."""
    model = expert_lora(lora_dropout=0.1)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    seen = {}
    layer.register_forward_hook(lambda module, args, output: seen.update(x=args[0], y=output))
    z = torch.randn(2, GATE_INPUT)
    model(input_ids=torch.randint(0, 100, (2, 6)), gate_input=z)
    weights = model.base_model.expert_weights(z)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # [r, in], [out, r]
    expected = layer.base_layer(seen["x"])
    for k in range(4):
        rows = slice(2 * k, 2 * k + 2)
        delta = seen["x"] @ A[rows].T @ B[:, rows].T * (32 / 2)  # per-expert scaling alpha / (r/K)
        expected = expected + weights[:, k, None, None] * delta
    torch.testing.assert_close(seen["y"], expected)


def test_each_example_gets_its_own_mixture():
    model = expert_lora()
    ids, z = torch.randint(0, 100, (2, 7)), torch.randn(2, GATE_INPUT)
    together = model(input_ids=ids, gate_input=z).logits
    apart = torch.cat([model(input_ids=ids[i : i + 1], gate_input=z[i : i + 1]).logits for i in range(2)])
    torch.testing.assert_close(together, apart)
    assert not torch.allclose(model(input_ids=ids, gate_input=z.flip(0)).logits, together)


def test_gate_weights_are_bound_for_one_call_only():
    model = expert_lora(num_experts=2)
    routing = model.base_model.routing
    ids = torch.randint(0, 100, (2, 7))
    model(input_ids=ids, gate_input=torch.randn(2, GATE_INPUT))
    assert routing.layer_calls_in_progress == 0
    with pytest.raises(RuntimeError, match="without gate weights"):
        model.base_model.model(input_ids=ids)  # the adapted layers refuse to run without a mixture
    with pytest.raises(RuntimeError, match="batch of 3"):
        model(input_ids=ids, gate_input=torch.randn(3, GATE_INPUT))
    assert routing.layer_calls_in_progress == 0  # released after a failing call too
    with pytest.raises(ValueError, match="gate input"):
        model(input_ids=ids)


def test_a_call_nested_inside_a_layer_does_not_change_the_outer_calls_weights():
    """A routed call made while a decoder layer runs (here from a hook on its first adapted projection) binds its
    own weights; the layer's later projections still use the outer call's."""
    model = expert_lora()
    ids, z = torch.randint(0, 100, (2, 7)), torch.randn(2, GATE_INPUT)
    reference = model(input_ids=ids, gate_input=z).logits
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    depth = []

    def nested_call(*_):
        if not depth:  # once, not from inside the nested call itself
            depth.append(1)
            model(input_ids=ids[:1], gate_input=torch.randn(1, GATE_INPUT))
            depth.clear()

    nested = q_proj.register_forward_hook(nested_call)
    try:
        torch.testing.assert_close(model(input_ids=ids, gate_input=z).logits, reference)
    finally:
        nested.remove()


def test_activation_checkpointing_recomputes_layers_with_their_own_weights():
    """Two routed forwards with different gate inputs, then one backward: recomputing each checkpointed layer must
    use its own call's weights. Loss and gradients equal those without checkpointing. (transformers' default,
    non-reentrant checkpointing; the reentrant kind cannot take a gradient through keyword arguments at all.)"""
    ids, z = torch.randint(0, 100, (2, 7)), torch.randn(2, 2, GATE_INPUT)

    def loss_and_gradients(checkpointing: bool):
        model = expert_lora().train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        loss = sum(model(input_ids=ids, gate_input=z[i]).logits.square().mean() for i in range(2))
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]

    loss, grads = loss_and_gradients(False)
    checkpointed_loss, checkpointed_grads = loss_and_gradients(True)
    torch.testing.assert_close(checkpointed_loss, loss)
    for checkpointed, plain in zip(checkpointed_grads, grads):
        torch.testing.assert_close(checkpointed, plain)


def test_generation_is_routed_per_example():
    model = expert_lora()
    ids, z = torch.randint(3, 100, (2, 5)), torch.randn(2, GATE_INPUT)
    together = model.generate(input_ids=ids, gate_input=z, max_new_tokens=4, do_sample=False, pad_token_id=0)
    alone = model.generate(input_ids=ids[1:], gate_input=z[1:], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(together[1:], alone) and model.base_model.routing.layer_calls_in_progress == 0


def test_save_pretrained_then_from_pretrained_restores_experts_and_gate(tmp_path):
    model = expert_lora()
    ids, z = torch.randint(0, 100, (2, 7)), torch.randn(2, GATE_INPUT)
    expected = model(input_ids=ids, gate_input=z).logits
    model.save_pretrained(tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    loaded = PeftModel.from_pretrained(tiny_llm(), tmp_path)
    assert isinstance(loaded.peft_config["default"], ExpertLoraConfig)
    assert torch.equal(loaded(input_ids=ids, gate_input=z).logits, expected)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"r": 6, "num_experts": 4}, "num_experts=3 or lora_rank=8"),
        ({"num_experts": 3}, "num_experts=4 or lora_rank=9"),
        ({"num_experts": 0}, "num_experts must be at least 1"),
        ({"r": 0}, "lora_rank must be at least 1"),
        ({"expert_scaling": "sqrt"}, "expert_scaling"),
        ({"gate_temperature": 0.0}, "gate_temperature"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"gate_input_size": None}, "gate_input_size"),
        ({"distill_output_size": 0}, "distill_output_size must be positive"),
    ],
)
def test_settings_are_validated_once(changes, message):
    settings = {"r": 8, "num_experts": 4, "gate_input_size": GATE_INPUT, "target_modules": TARGETS, **changes}
    with pytest.raises(ValueError, match=message):
        ExpertLoraConfig(**settings)


def test_settings_from_a_recbole_config():
    config = {"lora_rank": 8, "lora_alpha": 32, "lora_dropout": 0.1, "lora_target_modules": ["q_proj"],
              "num_experts": 4, "expert_scaling": "peft", "gate_temperature": 2.0}
    settings = ExpertLoraConfig.from_config(config, gate_input_size=GATE_INPUT)
    assert (settings.expert_rank, settings.gate_scale, settings.gated) == (2, 1.0, True)
    assert ExpertLoraConfig.from_config({**config, "expert_scaling": "per_expert"}, GATE_INPUT).gate_scale == 4.0
    assert ExpertLoraConfig.from_config({**config, "num_experts": 1}).gate_input_size is None
