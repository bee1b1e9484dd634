"""Candidate scoring: packed prefix-cached scores equal plain per-candidate likelihoods, for every aggregation, under
both ways of applying the packing mask (dense SDPA, the reference, and FlexAttention's block mask; on the CPU the
latter runs inductor's CPU kernel, compiled on first use)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, create_mask

from recbole_ilora import scoring
from recbole_ilora.scoring import (FLEX_BLOCK_TOKENS, SCORE_AGGREGATIONS, SDPA_OR_FLEX, PackedScorer, dense_mask,
                                   display_order, flex_block_mask, group_candidate_rows, target_log_probs)
from tests.helpers import first_batch, first_training_batch, make_tiny_model, randomize_lora_b

ATTENTIONS = ("dense", "flex")


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


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("aggregation, user_token", [(a, False) for a in SCORE_AGGREGATIONS] + [("sum", True)])
def test_packed_scores_equal_each_candidate_scored_alone(tiny_setup, aggregation, user_token, attention):
    # d3 with a threshold that some tokens of the random model do cross, so both branches are exercised.
    model, _ = make_tiny_model(tiny_setup, score_aggregation=aggregation, ghost_token_threshold=0.01,
                               user_token=user_token, score_attention=attention)
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
    scorer = PackedScorer(None, None, aggregation="mean", attention="dense")
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


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_a_two_token_end_marker_is_scored_at_contiguous_positions(tiny_setup, monkeypatch, attention):
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
    model, _ = make_tiny_model(tiny_setup, score_attention=attention)
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


# ---------------------------------------------------------------------------------- flex = dense
def random_packs(generator, groups=3):
    """A pack as :class:`PackedScorer` lays it out, of random sizes: right-padded prompts of different lengths, and
    candidates of 1-11 tokens (a fifth of the slots absent) compacted to the front, padding after."""
    prompt_width = int(torch.randint(5, 300, (), generator=generator))
    lengths = torch.randint(1, prompt_width + 1, (groups,), generator=generator)
    prompt_mask = torch.arange(prompt_width) < lengths[:, None]
    slots = int(torch.randint(1, 60, (), generator=generator))
    present = torch.rand(groups, slots, generator=generator) > 0.2
    tokens = torch.randint(1, 12, (groups, slots), generator=generator) * present
    width = int(tokens.sum(1).max())
    segment = torch.full((groups, width), -1)
    offset = torch.zeros(groups, width, dtype=torch.long)
    for group in range(groups):
        count = int(tokens[group].sum())
        segment[group, :count] = torch.arange(slots).repeat_interleave(tokens[group])
        offset[group, :count] = torch.cat([torch.arange(int(t)) for t in tokens[group]])
    return prompt_mask, segment, offset


def test_the_flex_block_mask_is_the_dense_mask():
    """Token by token, the block mask's mask function is the dense mask; its blocks are those create_block_mask finds
    by evaluating it everywhere, and the blocks it calls full (no mask function applied) are full."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        prompt_mask, segment, offset = random_packs(generator)
        groups, length = segment.shape[0], prompt_mask.shape[1] + segment.shape[1]
        dense = dense_mask(prompt_mask, segment)
        block_mask = flex_block_mask(prompt_mask, segment, offset)
        assert torch.equal(create_mask(block_mask.mask_mod, groups, 1, length, length, device="cpu"), dense)
        evaluated = create_block_mask(block_mask.mask_mod, groups, None, length, length, device="cpu")
        assert torch.equal(block_mask.to_dense(), evaluated.to_dense())
        blocks = block_mask.to_dense().shape[-1]
        padded = torch.nn.functional.pad(dense, (0, blocks * FLEX_BLOCK_TOKENS - length) * 2, value=True)
        per_block = padded.view(groups, blocks, FLEX_BLOCK_TOKENS, blocks, FLEX_BLOCK_TOKENS).all(4).all(2)
        full = torch.zeros(groups, blocks, blocks, dtype=torch.bool)
        for group, query_block in torch.cartesian_prod(torch.arange(groups), torch.arange(blocks)).tolist():
            count = int(block_mask.full_kv_num_blocks[group, 0, query_block])
            full[group, query_block, block_mask.full_kv_indices[group, 0, query_block, :count].long()] = True
        assert not (full & ~per_block).any()  # rows past the sequence (the last block's padding) aside


def unin_batch_with_absent_slots(model, loader):
    """The first test batch without some rows of every other user: uniN groups of fewer candidates than the widest
    (``present`` false slots), of titles and prompts of different lengths."""
    interaction = first_batch(loader)
    users, slot = interaction["user_id"], group_candidate_rows(interaction["user_id"], interaction["item_id_list"],
                                                               interaction["item_id"]).row_slot
    first_of_user = torch.cat([torch.tensor([True]), users[1:] != users[:-1]])
    odd_user = (torch.cumsum(first_of_user.long(), 0) - 1) % 2 == 1
    interaction = interaction[torch.nonzero(~(odd_user & (slot % 3 == 2))).squeeze(1)]
    groups, shown, present = shown_candidates(model, interaction)
    assert not present.all() and present.sum(1).min() > 1
    assert len(torch.unique(model.prompt.title_len[shown[present]])) > 3
    assert len(torch.unique(model.encode(interaction[groups.first_row], shown, present).prompts.lengths)) > 1
    return interaction


@pytest.mark.parametrize("aggregation", SCORE_AGGREGATIONS)
def test_flex_scores_equal_dense_scores(tiny_setup, aggregation):
    """uniN groups with absent slots, and a full ranking in one pack (flex's default) and in several (dense's)."""
    model, _ = make_tiny_model(tiny_setup, score_aggregation=aggregation, ghost_token_threshold=0.01,
                               score_attention="flex")
    randomize_lora_b(model)
    model.eval()
    interaction = unin_batch_with_absent_slots(model, tiny_setup[4])
    users = first_batch(tiny_setup[4])
    users = users[torch.nonzero(torch.diff(users["user_id"], prepend=users["user_id"][:1] - 1)).squeeze(1)]
    with torch.no_grad():
        flex, flex_ranking = model.predict(interaction), model.full_sort_predict(users)
        model.scorer.pack_tokens = 300
        flex_ranking_in_packs = model.full_sort_predict(users)
        model.scorer.attention, model.scorer.pack_tokens = "dense", None
        dense, dense_ranking = model.predict(interaction), model.full_sort_predict(users)
    torch.testing.assert_close(flex, dense, atol=1e-4, rtol=1e-4)
    for ranking in (flex_ranking, flex_ranking_in_packs):
        torch.testing.assert_close(ranking[:, 1:], dense_ranking[:, 1:], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_target_log_probs_equal_the_cross_entropy_compiled_or_not(dtype):
    """The flex path's log-probabilities (one reduction over the logits, compiled with the decoder) against the unfused
    path's ``-cross_entropy`` of the fp32 logits, on the same half- or full-precision logits, blocks of two lengths."""
    generator = torch.Generator().manual_seed(0)
    compiled = torch.compile(target_log_probs, dynamic=True)
    for tokens in (37, 5):
        logits = (8 * torch.randn(tokens, 1000, generator=generator)).to(dtype)
        targets = torch.randint(1000, (tokens,), generator=generator)
        expected = -torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
        torch.testing.assert_close(target_log_probs(logits, targets), expected, atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(compiled(logits, targets), expected, atol=1e-5, rtol=1e-6)
        assert target_log_probs(logits, targets).dtype == torch.float32


def test_flex_runs_for_the_scorer_only(tiny_setup, monkeypatch):
    """Under flex the scorer's calls go through FlexAttention and the LM loss's through SDPA, in one model; auto is
    flex on CUDA only; dense leaves the LLM's attention as it was loaded."""
    calls = []

    def counted(name):
        function = getattr(scoring, name)
        return lambda *args, **kwargs: calls.append(name) or function(*args, **kwargs)

    for name in ("flex_attention_forward", "sdpa_attention_forward"):
        monkeypatch.setattr(scoring, name, counted(name))
    model, _ = make_tiny_model(tiny_setup, score_attention="flex", curriculum=False)
    assert model.adapter.model.config._attn_implementation == SDPA_OR_FLEX
    with torch.no_grad():
        model.eval()
        model.predict(first_batch(tiny_setup[4]))
        assert set(calls) == {"flex_attention_forward"}
        calls.clear()
        model.train()
        model.calculate_loss(first_batch(tiny_setup[2]))
        assert set(calls) == {"sdpa_attention_forward"}
    model.scorer.attention = "auto"
    assert model.scorer.uses_flex(torch.device("cuda")) and not model.scorer.uses_flex(torch.device("cpu"))
    assert not model.scorer.uses_flex(torch.device("cuda"), many_candidates=False)  # uniN stays dense under auto
    model.scorer.attention = "flex"
    assert model.scorer.uses_flex(torch.device("cuda"), many_candidates=False)
    dense, _ = make_tiny_model(tiny_setup, score_attention="dense")
    assert dense.adapter.model.config._attn_implementation == "sdpa"
    assert not dense.scorer.uses_flex(torch.device("cuda"))
    with pytest.raises(ValueError, match="score_attention"):
        PackedScorer(None, None, attention="sparse")


def test_the_lm_loss_and_its_gradients_are_bitwise_those_of_plain_sdpa(tiny_setup):
    """Switching the LLM to sdpa_or_flex (what flex and auto do) leaves training exactly as it was under SDPA."""
    batch = None

    def loss_and_gradients(attention):
        nonlocal batch
        model, _ = make_tiny_model(tiny_setup, score_attention=attention)
        randomize_lora_b(model)
        model.eval()  # no dropout: the comparison is of the attention alone
        batch = batch or first_training_batch(model, tiny_setup[2])
        loss = model.training_losses(*batch, with_behaviour=True).loss
        loss.backward()
        return model.adapter.model.config._attn_implementation, loss.detach(), [
            parameter.grad.clone() for parameter in model.parameters() if parameter.grad is not None]

    dense = loss_and_gradients("dense")
    for attention in ("auto", "flex"):
        implementation, loss, gradients = loss_and_gradients(attention)
        assert (dense[0], implementation) == ("sdpa", SDPA_OR_FLEX)
        assert torch.equal(loss, dense[1]) and len(gradients) == len(dense[2]) > 0
        assert all(torch.equal(a, b) for a, b in zip(gradients, dense[2]))
