"""Distillation of SASRec's user representation into the LLM (``distill_loss_weight``, after LLM-SRec): off by default
nothing changes; on, the loss is the LM loss + w x (1 - cosine(head(h), z)) computed naively, h the last hidden state at
each prompt's last position; the head belongs to the adapter (trained, saved and loaded with it); text-only batches and
the refused combination."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from peft import set_peft_model_state_dict
from peft.utils import load_peft_weights
from safetensors.torch import load_file

from recbole_ilora.prompt import ANSWER
from recbole_ilora.quick_start import run_recbole_ilora
from tests.helpers import first_training_batch, make_tiny_model, randomize_lora_b

WEIGHT = 0.5
HEAD = "user_distill_head"


def distill_model(tiny_setup, **changes):
    settings = {"curriculum": False, "distill_loss_weight": WEIGHT, **changes}
    model, _ = make_tiny_model(tiny_setup, **settings)
    randomize_lora_b(model)
    model.train()  # lora_dropout is 0 in the tiny settings: training forwards are deterministic
    interaction, candidates, template = first_training_batch(model, tiny_setup[2])
    return model, interaction, candidates, template


def randomize_head(model, seed):
    generator = torch.Generator().manual_seed(seed)
    for parameter in model.adapter.distill_head.parameters():
        parameter.data = torch.randn(parameter.shape, generator=generator) * 0.3


def naive_distill_loss(model, interaction, candidates, template, with_behaviour=True):
    """A plain forward of the causal LM (its last hidden state), each prompt's last position found by a Python search
    for its first answer token, the head applied there, cosine against the frozen SASRec's z."""
    encoded = model.encode(interaction, candidates, template=template, target=interaction["item_id"],
                           with_behaviour=with_behaviour)
    prompts = encoded.prompts
    output = model.llm(inputs_embeds=encoded.inputs_embeds, attention_mask=prompts.attention_mask.long(),
                       gate_input=encoded.gate_input, output_hidden_states=True)
    hidden = output.hidden_states[-1]
    # the last hidden state is the one the LM head reads (after the final norm)
    torch.testing.assert_close(model.llm.get_output_embeddings()(hidden), output.logits)
    z = model.gate_encoder(interaction["item_id_list"], interaction["item_length"])
    losses = []
    for row in range(hidden.shape[0]):
        first_answer = next(i for i in range(int(prompts.lengths[row])) if prompts.kind[row, i] == ANSWER)
        predicted = model.adapter.distill_head(hidden[row, first_answer - 1])
        losses.append(1 - F.cosine_similarity(predicted, z[row].detach(), dim=0))
    return torch.stack(losses).mean()


def test_off_by_default_nothing_changes(tiny_setup, tmp_path):
    off, interaction, candidates, template = distill_model(tiny_setup, distill_loss_weight=0.0)
    on, *_ = distill_model(tiny_setup)
    assert off.distill_loss_weight == 0.0 and off.adapter_config.distill_output_size is None
    assert not hasattr(off.adapter, HEAD) and off.adapter.distill_head is None
    assert set(off.parameter_groups()) == {"lora", "gate", "projector"}
    assert not any(HEAD in name for name in off.trainable_state_dict())
    output = off.training_losses(interaction, candidates, template, with_behaviour=True)
    assert output.distill_loss is None and torch.equal(output.loss, output.lm_loss)
    # The model with the head draws the same initial values for everything else: its LM loss is bit for bit the same.
    assert torch.equal(on.training_losses(interaction, candidates, template, with_behaviour=True).lm_loss, output.lm_loss)
    off.save_pretrained(tmp_path)
    assert not any(HEAD in key for key in load_file(tmp_path / "adapter_model.safetensors"))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["distill_output_size"] is None


def test_the_loss_is_lm_plus_weight_times_the_naive_distill_loss_and_trains_head_and_lora(tiny_setup):
    model, interaction, candidates, template = distill_model(tiny_setup)
    width = model.gate_encoder.hidden_size
    assert model.adapter_config.distill_output_size == width and model.adapter.distill_head[-1].out_features == width
    output = model.training_losses(interaction, candidates, template, with_behaviour=True)
    expected = naive_distill_loss(model, interaction, candidates, template)
    assert 0 < output.distill_loss.item() < 2
    torch.testing.assert_close(output.distill_loss, expected)
    assert torch.equal(output.loss, model.lm_loss_weight * output.lm_loss + WEIGHT * output.distill_loss)

    parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    gradients = dict(zip(parameters, torch.autograd.grad(output.distill_loss, list(parameters.values()),
                                                         allow_unused=True)))
    naive = dict(zip(parameters, torch.autograd.grad(expected, list(parameters.values()), allow_unused=True)))
    reached = {name for name, gradient in gradients.items() if gradient is not None and gradient.abs().sum() > 0}
    assert {name for name in parameters if HEAD in name} <= reached
    assert any("lora_A" in name for name in reached) and any("lora_B" in name for name in reached)
    for name in reached:
        torch.testing.assert_close(gradients[name], naive[name], atol=1e-6, rtol=1e-4)


def test_a_text_only_batch_is_distilled_too(tiny_setup):
    # Curriculum batches have no behavioural token; the last prompt position is still there to distil.
    model, interaction, candidates, template = distill_model(tiny_setup, curriculum=True)
    output = model.training_losses(interaction, candidates, template, with_behaviour=False)
    torch.testing.assert_close(output.distill_loss,
                               naive_distill_loss(model, interaction, candidates, template, with_behaviour=False))
    assert torch.equal(output.loss, model.lm_loss_weight * output.lm_loss + WEIGHT * output.distill_loss)
    output.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.adapter.distill_head.parameters())


def test_the_head_is_saved_and_loaded_with_the_adapter_and_the_checkpoint(tiny_setup, tmp_path):
    model, interaction, candidates, template = distill_model(tiny_setup)
    randomize_head(model, seed=1)
    assert set(model.parameter_groups()["distill_head"]) == set(model.adapter.distill_head.parameters())
    expected = model.training_losses(interaction, candidates, template, with_behaviour=True)
    model.save_pretrained(tmp_path)
    assert any(HEAD in key for key in load_file(tmp_path / "adapter_model.safetensors"))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["distill_output_size"] == model.gate_encoder.hidden_size

    fresh, *_ = distill_model(tiny_setup)
    head, loaded_head = model.adapter.distill_head.state_dict(), fresh.adapter.distill_head.state_dict()
    assert not all(torch.equal(head[key], loaded_head[key]) for key in head)  # so that loading has something to do
    set_peft_model_state_dict(fresh.llm, load_peft_weights(str(tmp_path), device="cpu"))  # as recommend.py loads
    loaded_head = fresh.adapter.distill_head.state_dict()
    assert all(torch.equal(head[key], loaded_head[key]) for key in head)
    loaded = fresh.training_losses(interaction, candidates, template, with_behaviour=True)
    assert torch.equal(loaded.distill_loss, expected.distill_loss) and torch.equal(loaded.loss, expected.loss)

    # the training checkpoints (trainable_state_dict) keep it too
    state = model.trainable_state_dict()
    assert any(HEAD in name for name in state)
    other, *_ = distill_model(tiny_setup)
    other.load_trainable_state_dict(state)
    assert torch.equal(other.training_losses(interaction, candidates, template, with_behaviour=True).loss, expected.loss)


def test_without_the_lm_loss_it_is_refused_in_one_line(tiny_setup):
    with pytest.raises(ValueError) as refusal:
        make_tiny_model(tiny_setup, distill_loss_weight=WEIGHT, lm_loss_weight=0.0, listwise_loss_weight=1.0)
    message = str(refusal.value)
    words = ["distill_loss_weight=0.5", "needs lm_loss_weight > 0", "--lm_loss_weight=1.0"]
    assert "\n" not in message and all(word in message for word in words), message


def test_the_model_refuses_it_too_when_built_from_a_config_directly(tiny_setup):
    from recbole_ilora.config import Config
    from recbole_ilora.pipeline import build_model
    from tests.helpers import SLICE_NAME

    config = Config(model="iLoRA", dataset=SLICE_NAME, config_dict=dict(tiny_setup[0]))
    config["distill_loss_weight"] = WEIGHT  # past the settings check
    config["lm_loss_weight"] = 0.0
    config["listwise_loss_weight"] = 1.0
    with pytest.raises(ValueError, match="^distill_loss_weight > 0 needs lm_loss_weight > 0"):
        build_model(config, tiny_setup[2]._dataset)


def test_training_with_distillation_runs_end_to_end(tiny_setup, tmp_path):
    saved = tmp_path / "saved"
    overrides = {**tiny_setup[0], "limit_train_batches": 2, "checkpoint_dir": str(saved),
                 "distill_loss_weight": WEIGHT}
    result = run_recbole_ilora("iLoRA", "ml-100k-slice", config_dict=overrides)
    test = result["test_result"]
    assert test["hit@1"] <= test["hit@5"] <= test["hit@10"] and 0 <= test["ndcg@10"] <= 1
    checkpoint, = saved.glob("iLoRA-*.pth")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert any(HEAD in name for name in state["state_dict"])
    groups = {group["name"]: group for group in state["optimizer"]["param_groups"]}
    assert groups["distill_head"]["weight_decay"] == groups["projector"]["weight_decay"] > 0
