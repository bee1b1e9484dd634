"""iLoRA, LLaRA and TALLRec on a tiny random Llama and a slice of ml-100k (CPU, deterministic)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from recbole.data import create_dataset, data_preparation
from recbole.utils import init_seed

from recbole_ilora.config import Config
from recbole_ilora.expert_lora import ExpertGateState, attach_expert_gate
from recbole_ilora.llm import build_tiny_llama
from recbole_ilora.model.ilora import iLoRA
from recbole_ilora.model.llara import LLaRA
from recbole_ilora.prompt import BEHAVIOUR
from recbole_ilora.quick_start import run_recbole_ilora
from recbole_ilora.trainer import iLoRATrainer
from tests.helpers import TINY_LLM, first_batch, randomize_lora_b

TINY = {**TINY_LLM, "epochs": 1, "lora_dropout": 0.0}


@pytest.fixture(scope="module")
def setup(ml100k_slice, tmp_path_factory):
    """Config, dataloaders; the gate encoder is pretrained once here and reused by every test."""
    overrides = {**ml100k_slice, **TINY, "checkpoint_dir": str(tmp_path_factory.mktemp("saved"))}
    config = Config(model="iLoRA", dataset="ml-100k-slice", config_dict=overrides)
    init_seed(config["seed"], True)
    train, valid, test = data_preparation(config, create_dataset(config))
    return overrides, config, train, valid, test


def make_model(setup, model_class=iLoRA, **changes):
    overrides, _, train, _, _ = setup
    config = Config(model=model_class.__name__, dataset="ml-100k-slice", config_dict={**overrides, **changes})
    init_seed(config["seed"], True)
    return model_class(config, train._dataset), config


# ------------------------------------------------------------------------------------ the mixture
def _tiny_peft(rank=8):
    torch.manual_seed(0)
    llm, _ = build_tiny_llama(["a tiny corpus of words for the tokenizer"])
    model = get_peft_model(llm, LoraConfig(r=rank, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"]))
    randomize_lora_b(model)
    return model.eval()


def test_one_expert_equals_plain_peft_lora():
    model = _tiny_peft()
    ids = torch.randint(0, 100, (3, 7))
    plain = model(ids).logits
    state = ExpertGateState(rank=8, num_experts=1)
    handles = attach_expert_gate(model, state)
    state.set(torch.softmax(torch.randn(3, 1), -1))  # one expert: weight 1 whatever the logits
    gated = model(ids).logits
    for handle in handles:
        handle.remove()
    assert torch.equal(plain, gated)


def test_experts_mix_per_example_exactly():
    """Σ_k w_k B_k A_k x · alpha/(r/K), checked on one adapted layer against a hand computation."""
    model = _tiny_peft()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    state = ExpertGateState(rank=8, num_experts=4, expert_scaling="per_expert")
    attach_expert_gate(model, state)
    x = torch.randn(2, 5, layer.in_features)
    weights = torch.softmax(torch.randn(2, 4), -1)
    state.set(weights)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # [r, in], [out, r]
    expected = layer.base_layer(x)
    for k in range(4):
        rows = slice(2 * k, 2 * k + 2)
        delta = x @ A[rows].T @ B[:, rows].T * (32 / 2)  # per-expert scaling alpha / (r/K)
        expected = expected + weights[:, k, None, None] * delta
    torch.testing.assert_close(layer(x), expected)


def test_rank_not_divisible_by_experts_is_a_clear_error(setup):
    with pytest.raises(ValueError, match="divisible by num_experts"):
        make_model(setup, lora_rank=6, num_experts=4)


# ------------------------------------------------------------------------------------ the model
def test_gate_weights_sum_to_one_and_differ_across_users(setup):
    model, _ = make_model(setup)
    interaction = first_batch(setup[2])
    weights = model.expert_weights(model.sequence_representation(interaction))
    assert weights.shape == (len(interaction), 4)
    torch.testing.assert_close(weights.sum(1), torch.ones(len(interaction)))
    assert (weights.max(0).values - weights.min(0).values).max() > 1e-4


def test_gradients_reach_experts_gate_projector_only(setup):
    model, _ = make_model(setup, curriculum=False)
    randomize_lora_b(model)
    model.train()
    model.calculate_loss(first_batch(setup[2])).backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any(n.startswith("gate.") for n in trainable)
    assert any(n.startswith("projector.") for n in trainable)
    for name, parameter in trainable.items():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    frozen = [p for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)
    assert all(not p.requires_grad and p.grad is None for p in model.gate_encoder.parameters())


def test_prompt_puts_behaviour_token_after_each_title(setup):
    model, _ = make_model(setup)
    interaction = first_batch(setup[2])
    history, present = model._recent_history(interaction)
    candidates = model._training_candidates(interaction["item_id"], history)
    template = torch.zeros(len(interaction), dtype=torch.long)
    prompts = model.prompt.build(history, present, candidates, template, True, target=interaction["item_id"])
    row = int(torch.argmax(present.sum(1)))
    text = model.prompt.decode(prompts, row)
    titles = model.prompt.titles
    shown = [i for i in history[row][present[row]].tolist()] + candidates[row].tolist()
    for item in shown:
        assert f"{titles[item]} [emb]" in text, titles[item]
    assert text.count("[emb]") == len(shown) == int((prompts.kind[row] == BEHAVIOUR).sum())
    # the placeholder carries its own item: the one whose title precedes it
    placeholders = prompts.behaviour_items[row][prompts.kind[row] == BEHAVIOUR].tolist()
    assert placeholders == shown
    assert text.endswith(f"Answer: {titles[int(interaction['item_id'][row])]}\n")
    assert text.index("watched") < text.index(titles[shown[0]])


def test_packed_scoring_equals_scoring_each_candidate_alone(setup):
    model, _ = make_model(setup)
    randomize_lora_b(model)
    model.eval()
    interaction = first_batch(setup[4])
    group, slot, first_row, items, present = model._group_rows(interaction)
    prompts = model._candidate_prompts(interaction, first_row, items, present)
    user_repr = model._user_repr(interaction[first_row])
    with torch.no_grad():
        packed = model._score_items(prompts, user_repr, items, present)
        model.score_pack_tokens = 1  # one candidate per forward: the unpacked reference
        alone = model._score_items(prompts, user_repr, items, present)
    torch.testing.assert_close(packed, alone, atol=1e-4, rtol=1e-4)
    # and against a plain forward of prompt + answer, without any cache
    g, m = 0, 3
    ids, valid = model.prompt.answer_tokens(items[g, m : m + 1])
    answer = ids[0, valid[0]]
    length = int(prompts.lengths[g])
    with torch.no_grad(), model._gated(user_repr[g : g + 1]):
        embeds = model._input_embeddings(prompts)[g : g + 1, :length]
        full = torch.cat([embeds, model.embed_tokens(answer)[None]], 1)
        logits = model.lm_head(model.decoder(inputs_embeds=full).last_hidden_state)[0, length - 1 : -1]
    reference = torch.log_softmax(logits.float(), -1).gather(1, answer[:, None]).mean()
    torch.testing.assert_close(packed[g, m], reference, atol=1e-4, rtol=1e-4)


def test_predict_uni19_finite_one_score_per_row_and_row_order_invariant(setup):
    model, _ = make_model(setup)
    randomize_lora_b(model)
    model.eval()
    interaction = first_batch(setup[4])
    with torch.no_grad():
        scores = model.predict(interaction)
        assert scores.shape == (len(interaction),) and torch.isfinite(scores).all()
        # shuffle candidates within each user's block of 20 rows (users stay contiguous)
        generator = torch.Generator().manual_seed(1)
        blocks = len(interaction) // 20
        permutation = torch.cat([torch.randperm(20, generator=generator) + 20 * b for b in range(blocks)])
        shuffled = model.predict(interaction[permutation])
    torch.testing.assert_close(shuffled, scores[permutation], atol=1e-5, rtol=1e-5)


def test_prompt_candidate_order_is_not_positive_first(setup):
    model, _ = make_model(setup)
    interaction = first_batch(setup[4])
    _, _, first_row, items, present = model._group_rows(interaction)
    order = model._prompt_order(interaction["user_id"][first_row], items, present)
    positions_of_positive = (order == 0).nonzero()[:, 1]
    assert positions_of_positive.float().std() > 0  # the target lands at varying positions


def test_full_sort_predict_scores_every_item(setup):
    model, _ = make_model(setup)
    model.eval()
    interaction = first_batch(setup[4])[torch.arange(0, 40, 20)]
    with torch.no_grad():
        scores = model.full_sort_predict(interaction)
    assert scores.shape == (2, model.n_items)
    assert torch.isinf(scores[:, 0]).all() and torch.isfinite(scores[:, 1:]).all()


def test_overfitting_one_batch_ranks_the_true_title_first(setup):
    model, config = make_model(setup, curriculum=False, lora_rank=16, num_experts=4)
    interaction = first_batch(setup[4])[torch.arange(0, 80)]  # 4 users x 20 candidates
    _, _, first_row, _, _ = model._group_rows(interaction)
    train = interaction[first_row]  # the positives, as training samples
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(60):
        optimizer.zero_grad()
        model.calculate_loss(train).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        scores = model.predict(interaction).view(4, 20)
    assert (scores.argmax(1) == 0).all()  # row 0 of each user is the target


def test_checkpoint_save_load_gives_identical_scores(setup, tmp_path):
    model, config = make_model(setup)
    randomize_lora_b(model)
    trainer = iLoRATrainer(config, model)
    trainer.scheduler = trainer._build_scheduler(10)
    trainer._save_checkpoint(0, verbose=False, saved_model_file=str(tmp_path / "ckpt.pth"))
    model.eval()
    interaction = first_batch(setup[4])
    with torch.no_grad():
        before = model.predict(interaction)
    checkpoint = torch.load(tmp_path / "ckpt.pth", weights_only=False)
    assert checkpoint["trainable_only"]
    assert set(checkpoint["state_dict"]) == {n for n, p in model.named_parameters() if p.requires_grad}
    fresh, _ = make_model(setup)
    fresh.load_trainable_state_dict(checkpoint["state_dict"])
    fresh.eval()
    with torch.no_grad():
        after = fresh.predict(interaction)
    assert torch.equal(before, after)
    other, _ = make_model(setup, lora_rank=4, num_experts=2)
    with pytest.raises(KeyError, match="trainable tensors"):
        other.load_trainable_state_dict({"lora.not.there": torch.zeros(1)})


def test_unknown_llm_path_is_a_clear_error(setup):
    with pytest.raises(FileNotFoundError, match="neither an alias"):
        make_model(setup, llm_path="./no/such/model")


@pytest.mark.parametrize("model_name", ["iLoRA", "LLaRA", "TALLRec"])
def test_plugin_models_train_and_evaluate_end_to_end(model_name, setup, tmp_path):
    overrides = {**setup[0], "eval_generate": True, "generate_max_new_tokens": 8}
    result = run_recbole_ilora(model_name, "ml-100k-slice", config_dict=overrides)
    test = result["test_result"]
    assert test["hit@1"] <= test["hit@5"] <= test["hit@10"] and 0 <= test["ndcg@10"] <= 1
    assert 0 <= test["gen_valid_ratio"] <= 1 and 0 <= test["gen_hr@1_all"] <= test["gen_hr@1_valid"] <= 1


def test_ilora_parameter_count_within_one_percent_of_llara(setup):
    ilora, _ = make_model(setup)
    llara, _ = make_model(setup, LLaRA)
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert count(ilora) > count(llara)
    assert count(ilora) <= 1.01 * count(llara)
