"""The listwise training loss (``listwise_loss_weight``): packed scores with gradients equal the naive computation,
one forward per candidate; it combines linearly with the LM loss and is off by default."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from recbole_ilora.prompt import ANSWER
from recbole_ilora.quick_start import run_recbole_ilora
from tests.helpers import first_training_batch, make_tiny_model, randomize_lora_b

EXAMPLES = 4  # prompts of the batch checked against the naive computation (20 forwards each)


def listwise_model(tiny_setup, **changes):
    model, _ = make_tiny_model(tiny_setup, curriculum=False, **changes)
    randomize_lora_b(model)
    model.train()  # lora_dropout is 0 in the tiny settings: training forwards are deterministic
    interaction, candidates, template = first_training_batch(model, tiny_setup[2])
    return model, interaction[torch.arange(EXAMPLES)], candidates[:EXAMPLES], template[:EXAMPLES]


def trainable_gradients(model, loss):
    parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    gradients = torch.autograd.grad(loss, list(parameters.values()), allow_unused=True)
    return dict(zip(parameters, gradients))


def naive_listwise_loss(model, interaction, candidates, template):
    """Each candidate after its own prompt, one forward each: the prompt + that candidate's answer, built as the LM
    loss builds it, scored by the sum of its answer tokens' log-probabilities; softmax cross-entropy on the target."""
    scores = torch.zeros(candidates.shape)
    for example in range(candidates.shape[0]):
        row = interaction[torch.tensor([example])]
        for slot in range(candidates.shape[1]):
            encoded = model.encode(row, candidates[example : example + 1], template=template[example : example + 1],
                                   target=candidates[example : example + 1, slot])
            length = int(encoded.prompts.lengths[0])
            logits = model.llm(inputs_embeds=encoded.inputs_embeds[:, :length], gate_input=encoded.gate_input).logits[0]
            answer = torch.nonzero(encoded.prompts.kind[0, :length] == ANSWER)[:, 0]
            log_probs = torch.log_softmax(logits[answer - 1].float(), -1)
            scores = scores.index_put((torch.tensor(example), torch.tensor(slot)),
                                      log_probs.gather(1, encoded.prompts.input_ids[0, answer, None]).sum())
    target_index = (candidates == interaction["item_id"][:, None]).long().argmax(1)
    return F.cross_entropy(scores, target_index)


@pytest.mark.parametrize("lm_loss_weight", [0.0, 1.0])
def test_listwise_loss_and_gradients_equal_the_naive_computation(tiny_setup, lm_loss_weight):
    # lm_loss_weight 1: the prompt is encoded with the answer appended (for the LM loss) and scored without it.
    model, interaction, candidates, template = listwise_model(tiny_setup, lm_loss_weight=lm_loss_weight,
                                                              listwise_loss_weight=1.0)
    output = model.training_losses(interaction, candidates, template, with_behaviour=True)
    expected = naive_listwise_loss(model, interaction, candidates, template)
    torch.testing.assert_close(output.listwise_loss, expected, atol=1e-5, rtol=1e-6)  # fp32 sums of ~50 in another order
    packed, naive = trainable_gradients(model, output.listwise_loss), trainable_gradients(model, expected)
    assert any(".expert_gate." in n for n in packed) and any(".behaviour_projector." in n for n in packed)
    for name, gradient in packed.items():
        assert gradient is not None and gradient.abs().sum() > 0, name
        # fp32 sums over different groupings (one pack vs 20 forwards): equal to 1e-4 of the gradient's size
        assert (gradient - naive[name]).norm() <= 1e-4 * naive[name].norm(), name


@pytest.mark.parametrize("lm_loss_weight", [0.0, 1.0])
def test_listwise_loss_and_gradients_under_flex_attention_equal_dense(tiny_setup, monkeypatch, lm_loss_weight):
    """PyTorch refuses FlexAttention's backward pass on a CPU (inductor has no CPU kernel for it), but its eager
    reference implementation has one: with that check lifted and torch.compile's stance eager, the flex scorer's
    loss and gradients equal those of the dense mask (tested above against the naive computation)."""
    monkeypatch.setattr(torch.nn.attention.flex_attention, "_validate_device", lambda *tensors: None)
    model, interaction, candidates, template = listwise_model(tiny_setup, lm_loss_weight=lm_loss_weight,
                                                              listwise_loss_weight=1.0, score_attention="flex")

    def loss_and_gradients():
        loss = model.training_losses(interaction, candidates, template, with_behaviour=True).listwise_loss
        return loss, trainable_gradients(model, loss)

    with torch.compiler.set_stance("force_eager"):
        flex, flex_gradients = loss_and_gradients()
    model.scorer.attention = "dense"
    dense, dense_gradients = loss_and_gradients()
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-6)
    for name, gradient in flex_gradients.items():
        assert gradient is not None and gradient.abs().sum() > 0, name
        assert (gradient - dense_gradients[name]).norm() <= 1e-4 * dense_gradients[name].norm(), name  # fp32, as above


def test_off_by_default_the_loss_is_the_lm_loss_and_the_scorer_never_runs(tiny_setup, monkeypatch):
    model, interaction, candidates, template = listwise_model(tiny_setup)
    assert (model.lm_loss_weight, model.listwise_loss_weight) == (1.0, 0.0)
    monkeypatch.setattr(model, "scorer", None)  # calling it would fail
    output = model.training_losses(interaction, candidates, template, with_behaviour=True)
    assert output.listwise_loss is None and torch.equal(output.loss, output.lm_loss)
    assert torch.equal(output.loss, F.cross_entropy(output.logits.float(), output.labels))
    # the LM loss, computed plainly: every logit of the prompt + answer, the answer's positions picked afterwards
    encoded = model.encode(interaction, candidates, template=template, target=interaction["item_id"])
    prompts = encoded.prompts
    logits = model.llm(inputs_embeds=encoded.inputs_embeds, attention_mask=prompts.attention_mask.long(),
                       gate_input=encoded.gate_input).logits[:, :-1]
    answer = prompts.kind[:, 1:] == ANSWER
    torch.testing.assert_close(output.loss, F.cross_entropy(logits[answer].float(), prompts.input_ids[:, 1:][answer]))


def test_the_weights_combine_the_two_losses_linearly(tiny_setup):
    model, interaction, candidates, template = listwise_model(tiny_setup)

    def losses(lm_loss_weight, listwise_loss_weight):
        model.lm_loss_weight, model.listwise_loss_weight = lm_loss_weight, listwise_loss_weight
        return model.training_losses(interaction, candidates, template, with_behaviour=True)

    lm_only, listwise_only, both = losses(1.0, 0.0), losses(0.0, 1.0), losses(0.7, 0.3)
    assert listwise_only.lm_loss is None and listwise_only.logits is None  # the LM loss's forward is skipped
    torch.testing.assert_close(both.lm_loss, lm_only.lm_loss, atol=0, rtol=0)
    torch.testing.assert_close(both.listwise_loss, listwise_only.listwise_loss, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(both.loss, 0.7 * lm_only.loss + 0.3 * listwise_only.loss, atol=1e-5, rtol=1e-6)
    assert listwise_only.loss > 0 and torch.equal(listwise_only.loss, listwise_only.listwise_loss)


def test_training_with_the_listwise_loss_runs_end_to_end(tiny_setup, tmp_path):
    overrides = {**tiny_setup[0], "limit_train_batches": 2, "checkpoint_dir": str(tmp_path / "saved"),
                 "listwise_loss_weight": 0.5}
    result = run_recbole_ilora("iLoRA", "ml-100k-slice", config_dict=overrides)
    test = result["test_result"]
    assert test["hit@1"] <= test["hit@5"] <= test["hit@10"] and 0 <= test["ndcg@10"] <= 1
