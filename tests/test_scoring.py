"""Candidate scoring: packed prefix-cached scores equal plain per-candidate likelihoods, for every aggregation."""

from __future__ import annotations

import math

import pytest
import torch

from recbole_ilora.scoring import SCORE_AGGREGATIONS, PackedScorer, display_order, group_candidate_rows
from tests.helpers import first_batch, make_tiny_model, randomize_lora_b


def shown_candidates(model, interaction):
    """RecBole's rows grouped per user, and each user's candidates in the order the prompt lists them."""
    groups = group_candidate_rows(interaction["user_id"], interaction["item_id_list"], interaction["item_id"])
    order = display_order(interaction["user_id"][groups.first_row], groups.items, groups.present, model.seed)
    return groups, torch.gather(groups.items, 1, order), torch.gather(groups.present, 1, order)


def reference_token_log_probs(model, interaction, group: int, slot: int) -> torch.Tensor:
    """Log-probabilities of one candidate's answer tokens after its own full prompt: one plain forward, no packing."""
    groups, shown, present = shown_candidates(model, interaction)
    encoded = model.encode(interaction[groups.first_row], shown, present)
    ids, valid = model.prompt.answer_tokens(groups.items[group, slot : slot + 1])
    answer = ids[0, valid[0]]
    length = int(encoded.prompts.lengths[group])
    gate_input = None if encoded.gate_input is None else encoded.gate_input[group : group + 1]
    embeds = encoded.inputs_embeds[group : group + 1, :length]
    full = torch.cat([embeds, model.llm.get_input_embeddings()(answer)[None]], 1)
    logits = model.llm(inputs_embeds=full, gate_input=gate_input).logits[0, length - 1 : -1]
    return torch.log_softmax(logits.float(), -1).gather(1, answer[:, None])[:, 0]


@pytest.mark.parametrize("aggregation, user_token", [(a, False) for a in SCORE_AGGREGATIONS] + [("sum", True)])
def test_packed_scores_equal_each_candidate_scored_alone(tiny_setup, aggregation, user_token):
    # d3 with a threshold that some tokens of the random model do cross, so both branches are exercised.
    model, _ = make_tiny_model(tiny_setup, score_aggregation=aggregation, ghost_token_threshold=0.01,
                               user_token=user_token)
    randomize_lora_b(model)
    model.eval()
    interaction = first_batch(tiny_setup[4])
    with torch.no_grad():
        packed = model.predict(interaction)
        model.scorer.pack_tokens = 1  # one candidate per continuation: the unpacked reference
        alone = model.predict(interaction)
        torch.testing.assert_close(packed, alone, atol=1e-4, rtol=1e-4)
        groups = shown_candidates(model, interaction)[0]
        for group, slot in [(0, 0), (0, 3), (1, 7)]:
            log_probs = reference_token_log_probs(model, interaction, group, slot)
            expected = {
                "mean": log_probs.mean(),
                "sum": log_probs.sum(),
                "first": log_probs[0],
                "d3": log_probs.sum() / max(1, int((log_probs <= math.log(0.01)).sum())),
            }[aggregation]
            row = int(torch.nonzero((groups.row_group == group) & (groups.row_slot == slot))[0])
            torch.testing.assert_close(packed[row], expected, atol=1e-4, rtol=1e-4)


def test_aggregations_on_crafted_log_probs():
    """Two candidates: tokens (-1, -2, -0.01) and (-3,)."""
    log_probs = torch.tensor([-1.0, -2.0, -0.01, -3.0])
    slot = torch.tensor([0, 0, 0, 1])
    offset = torch.tensor([0, 1, 2, 0])
    scorer = PackedScorer(None, None, aggregation="mean")
    results = {}
    for aggregation in SCORE_AGGREGATIONS:
        scorer.aggregation = aggregation
        results[aggregation] = scorer.aggregate(log_probs, slot, offset, 2).tolist()
    assert results["sum"] == pytest.approx([-3.01, -3.0])
    assert results["mean"] == pytest.approx([-3.01 / 3, -3.0])
    assert results["first"] == pytest.approx([-1.0, -3.0])
    assert results["d3"] == pytest.approx([-3.01 / 2, -3.0])  # the near-certain token does not count as length
    with pytest.raises(ValueError, match="score_aggregation"):
        PackedScorer(None, None, aggregation="max")


def test_rows_are_grouped_per_user_and_history():
    users = torch.tensor([7, 7, 7, 3, 3, 7])
    seq = torch.tensor([[1, 2], [1, 2], [1, 2], [4, 5], [4, 5], [1, 9]])
    items = torch.tensor([10, 11, 12, 13, 14, 15])
    groups = group_candidate_rows(users, seq, items)
    assert groups.row_group.tolist() == [0, 0, 0, 1, 1, 2]
    assert groups.row_slot.tolist() == [0, 1, 2, 0, 1, 0]
    assert groups.first_row.tolist() == [0, 3, 5]
    assert groups.items.tolist() == [[10, 11, 12], [13, 14, 0], [15, 0, 0]]
    assert groups.present.sum(1).tolist() == [3, 2, 1]


def test_display_order_is_not_positive_first_and_ignores_row_order(tiny_setup):
    interaction = first_batch(tiny_setup[4])
    groups = group_candidate_rows(interaction["user_id"], interaction["item_id_list"], interaction["item_id"])
    users = interaction["user_id"][groups.first_row]
    order = display_order(users, groups.items, groups.present, seed=2020)
    positions_of_positive = (order == 0).nonzero()[:, 1]
    assert positions_of_positive.float().std() > 0  # the target lands at varying positions
    shown = torch.gather(groups.items, 1, order)
    flipped = groups.items.flip(1)
    shown_flipped = torch.gather(flipped, 1, display_order(users, flipped, groups.present.flip(1), seed=2020))
    assert torch.equal(shown, shown_flipped)  # the same list whatever order RecBole's rows came in


def test_a_two_token_end_marker_is_scored_at_contiguous_positions(tiny_setup, monkeypatch):
    """Llama-2's tokenizer writes the answer's closing newline as two tokens. Packed scoring must give them the
    positions they have after the candidate's own prompt, not positions gapped by the title slot's padding."""
    from tokenizers import normalizers

    from recbole_ilora import llm

    build = llm.build_tiny_tokenizer

    def crlf_tokenizer(corpus, vocab_size=512):
        tokenizer = build(corpus, vocab_size)
        tokenizer.backend_tokenizer.normalizer = normalizers.Replace("\n", "\r\n")  # "\n" -> two byte tokens
        return tokenizer

    monkeypatch.setattr(llm, "build_tiny_tokenizer", crlf_tokenizer)
    model, _ = make_tiny_model(tiny_setup)
    assert model.prompt.answer_end_ids.numel() == 2
    randomize_lora_b(model)
    model.eval()
    interaction = first_batch(tiny_setup[4])
    groups = shown_candidates(model, interaction)[0]
    with torch.no_grad():
        packed = model.predict(interaction)
        for group, slot in [(0, 0), (0, 5), (1, 11)]:
            row = int(torch.nonzero((groups.row_group == group) & (groups.row_slot == slot))[0])
            expected = reference_token_log_probs(model, interaction, group, slot).sum()
            torch.testing.assert_close(packed[row], expected, atol=1e-4, rtol=1e-4)
