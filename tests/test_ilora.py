"""iLoRA, LLaRA and TALLRec on a tiny random Llama and a slice of ml-100k (CPU, deterministic).

The expert mixture itself is tested in test_expert_lora.py, candidate scoring in test_scoring.py.
"""

from __future__ import annotations

import pytest
import torch

from recbole_ilora.prompt import BEHAVIOUR, USER
from recbole_ilora.quick_start import run_recbole_ilora
from recbole_ilora.trainer import iLoRATrainer
from tests.helpers import first_batch, first_training_batch, make_tiny_model, randomize_lora_b


def test_rank_not_divisible_by_experts_is_a_clear_error(tiny_setup):
    with pytest.raises(ValueError, match="multiple of num_experts"):
        make_tiny_model(tiny_setup, lora_rank=6, num_experts=4)


# ------------------------------------------------------------------------------------ the model
def test_gate_weights_sum_to_one_and_differ_across_users(tiny_setup):
    model, _ = make_tiny_model(tiny_setup)
    interaction = first_batch(tiny_setup[2])
    weights = model.expert_weights(model.sequence_representation(interaction))
    assert weights.shape == (len(interaction), 4)
    torch.testing.assert_close(weights.sum(1), torch.ones(len(interaction)))
    assert (weights.max(0).values - weights.min(0).values).max() > 1e-4


def test_gradients_reach_experts_gate_projector_only(tiny_setup):
    model, _ = make_tiny_model(tiny_setup, curriculum=False)
    randomize_lora_b(model)
    model.train()
    model.calculate_loss(first_batch(tiny_setup[2])).backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any(".expert_gate." in n for n in trainable)
    assert any(".behaviour_projector." in n for n in trainable)
    for name, parameter in trainable.items():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    frozen = [p for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)
    assert all(not p.requires_grad and p.grad is None for p in model.gate_encoder.parameters())


def test_prompt_puts_behaviour_token_after_each_title(tiny_setup):
    model, _ = make_tiny_model(tiny_setup)
    interaction, candidates, template = first_training_batch(model, tiny_setup[2])
    history, present = model.recent_history(interaction)
    prompts = model.encode(interaction, candidates, template=template, target=interaction["item_id"]).prompts
    row = int(torch.argmax(present.sum(1)))
    text = model.prompt.decode(prompts, row)
    prompt = model.prompt
    # titles as the prompt writes them: cut at max_title_tokens
    titles = [prompt.tokenizer.decode(prompt.title_ids[i, : prompt.title_len[i]]).strip() for i in range(len(prompt.titles))]
    assert any(title != full for title, full in zip(titles, prompt.titles))  # some are cut on the tiny tokenizer
    shown = [i for i in history[row][present[row]].tolist()] + candidates[row].tolist()
    for item in shown:
        assert f"{titles[item]} [emb]" in text, titles[item]
    assert text.count("[emb]") == len(shown) == int((prompts.kind[row] == BEHAVIOUR).sum())
    # the placeholder carries its own item: the one whose title precedes it
    placeholders = prompts.behaviour_items[row][prompts.kind[row] == BEHAVIOUR].tolist()
    assert placeholders == shown
    assert text.endswith(f"Answer: {titles[int(interaction['item_id'][row])]}\n")
    assert text.index("watched") < text.index(titles[shown[0]])


def test_predict_uni19_finite_one_score_per_row_and_row_order_invariant(tiny_setup):
    model, _ = make_tiny_model(tiny_setup)
    randomize_lora_b(model)
    model.eval()
    interaction = first_batch(tiny_setup[4])
    with torch.no_grad():
        scores = model.predict(interaction)
        assert scores.shape == (len(interaction),) and torch.isfinite(scores).all()
        # shuffle candidates within each user's block of 20 rows (users stay contiguous)
        generator = torch.Generator().manual_seed(1)
        blocks = len(interaction) // 20
        permutation = torch.cat([torch.randperm(20, generator=generator) + 20 * b for b in range(blocks)])
        shuffled = model.predict(interaction[permutation])
    torch.testing.assert_close(shuffled, scores[permutation], atol=1e-5, rtol=1e-5)


def test_full_sort_predict_scores_every_item(tiny_setup):
    model, _ = make_tiny_model(tiny_setup)
    model.eval()
    interaction = first_batch(tiny_setup[4])[torch.arange(0, 40, 20)]
    with torch.no_grad():
        scores = model.full_sort_predict(interaction)
    assert scores.shape == (2, model.n_items)
    assert torch.isinf(scores[:, 0]).all() and torch.isfinite(scores[:, 1:]).all()


def test_overfitting_one_batch_ranks_the_true_title_first(tiny_setup):
    # The tiny LLM's frozen tied embeddings (std 0.02, width 32) cap its logits near uniform, so a summed
    # log-prob mostly counts answer tokens: the length-free mean shows whether training reached the title.
    model, config = make_tiny_model(tiny_setup, curriculum=False, lora_rank=16, num_experts=4,
                                    score_aggregation="mean")
    interaction = first_batch(tiny_setup[4])[torch.arange(0, 80)]  # 4 users x 20 candidates
    train = interaction[torch.arange(0, 80, 20)]  # the positives (the first row of each user), as training samples
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


def test_checkpoint_save_load_gives_identical_scores(tiny_setup, tmp_path):
    model, config = make_tiny_model(tiny_setup)
    randomize_lora_b(model)
    trainer = iLoRATrainer(config, model)
    trainer.scheduler = trainer._build_scheduler(10)
    trainer._save_checkpoint(0, verbose=False, saved_model_file=str(tmp_path / "ckpt.pth"))
    model.eval()
    interaction = first_batch(tiny_setup[4])
    with torch.no_grad():
        before = model.predict(interaction)
    checkpoint = torch.load(tmp_path / "ckpt.pth", weights_only=False)
    assert checkpoint["trainable_only"]
    assert set(checkpoint["state_dict"]) == {n for n, p in model.named_parameters() if p.requires_grad}
    fresh, _ = make_tiny_model(tiny_setup)
    fresh.load_trainable_state_dict(checkpoint["state_dict"])
    fresh.eval()
    with torch.no_grad():
        after = fresh.predict(interaction)
    assert torch.equal(before, after)
    other, _ = make_tiny_model(tiny_setup, lora_rank=4, num_experts=2)
    with pytest.raises(KeyError, match="trainable tensors"):
        other.load_trainable_state_dict({"lora.not.there": torch.zeros(1)})


def test_unknown_llm_path_is_a_clear_error(tiny_setup):
    from recbole_ilora.llm import resolve_llm_folder
    from recbole_ilora.settings import SettingError

    with pytest.raises(SettingError, match=r"llm_path='./no/such/model' \(--llm_path\) does not exist"):
        make_tiny_model(tiny_setup, llm_path="./no/such/model")  # refused with the settings, before any work
    with pytest.raises(FileNotFoundError, match="neither an alias"):
        resolve_llm_folder("./no/such/model")


@pytest.mark.parametrize("model_name", ["iLoRA", "LLaRA", "TALLRec"])
def test_plugin_models_train_and_evaluate_end_to_end(model_name, tiny_setup, tmp_path):
    overrides = {**tiny_setup[0], "eval_generate": True, "generate_max_new_tokens": 8}
    result = run_recbole_ilora(model_name, "ml-100k-slice", config_dict=overrides)
    test = result["test_result"]
    assert test["hit@1"] <= test["hit@5"] <= test["hit@10"] and 0 <= test["ndcg@10"] <= 1
    assert 0 <= test["gen_valid_ratio"] <= 1 and 0 <= test["gen_hr@1_all"] <= test["gen_hr@1_valid"] <= 1


def test_ilora_parameter_count_within_one_percent_of_llara(tiny_setup):
    ilora, _ = make_tiny_model(tiny_setup)
    llara, _ = make_tiny_model(tiny_setup, "LLaRA")
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert count(ilora) > count(llara)
    assert count(ilora) <= 1.01 * count(llara)


def test_same_metrics_whether_the_gate_encoder_is_pretrained_or_cached(tiny_setup, tmp_path):
    """Pretraining draws random numbers only on a cache miss; the run after it must not see the difference."""
    overrides = {**tiny_setup[0], "checkpoint_dir": str(tmp_path / "saved"), "limit_train_batches": 3}
    cold = run_recbole_ilora("iLoRA", "ml-100k-slice", config_dict=overrides)
    assert list((tmp_path / "saved" / "gate_encoders").glob("*.pth"))
    warm = run_recbole_ilora("iLoRA", "ml-100k-slice", config_dict=overrides)
    assert cold["test_result"] == warm["test_result"]
    assert cold["best_valid_result"] == warm["best_valid_result"]


def test_a_gate_encoder_pretrained_on_another_device_is_not_reused(tiny_setup, monkeypatch):
    """A cache shared by a CPU and a GPU machine: each pretrains (and finds) its own gate encoder."""
    from recbole_ilora.config import Config
    from recbole_ilora.gate_encoder import gate_encoder_path

    config = Config(model="iLoRA", dataset="ml-100k-slice", config_dict=tiny_setup[0])
    on_cpu = gate_encoder_path(config)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    config["device"] = torch.device("cuda")
    on_h200 = gate_encoder_path(config)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    on_h100 = gate_encoder_path(config)
    assert len({on_cpu, on_h200, on_h100}) == 3 and on_cpu.parent == on_h200.parent
    config["device"] = torch.device("cpu")
    assert gate_encoder_path(config) == on_cpu


def test_learning_curve_records_test_metrics_without_changing_the_run(tiny_setup, tmp_path):
    overrides = {**tiny_setup[0], "epochs": 2, "limit_train_batches": 2, "stopping_step": 10}
    plain = run_recbole_ilora("iLoRA", "ml-100k-slice", config_dict=overrides)
    curve = run_recbole_ilora("iLoRA", "ml-100k-slice", config_dict={**overrides, "learning_curve": True})
    assert plain["learning_curve"] == [] and [p["epoch"] for p in curve["learning_curve"]] == [1, 2]
    assert curve["test_result"] == plain["test_result"]  # recording the curve does not change training
    last = curve["learning_curve"][-1]
    assert set(last["test_result"]) == set(plain["test_result"]) and last["optimizer_steps"] == 4


def test_a_saved_checkpoint_is_evaluated_again_bit_identically(tiny_setup, tmp_path):
    overrides = {**tiny_setup[0], "limit_train_batches": 2, "checkpoint_dir": str(tmp_path / "saved")}
    trained = run_recbole_ilora("iLoRA", "ml-100k-slice", config_dict=overrides)
    checkpoint = next(path for path in (tmp_path / "saved").glob("iLoRA-*.pth"))
    again = [run_recbole_ilora("iLoRA", "ml-100k-slice", config_dict={**overrides, "eval_checkpoint": str(checkpoint)})
             for _ in range(2)]
    assert again[0]["test_result"] == again[1]["test_result"] == trained["test_result"]
    assert again[0]["best_valid_result"] == trained["best_valid_result"]
    summed = run_recbole_ilora("iLoRA", "ml-100k-slice",
                               config_dict={**overrides, "eval_checkpoint": str(checkpoint), "score_aggregation": "mean"})
    assert summed["test_result"] != trained["test_result"]  # the same weights, ranked by another score


def test_gate_encoder_pretrains_when_the_model_is_built_without_gradients(tiny_setup, tmp_path):
    """Evaluation scripts build models under torch.no_grad(); a cache miss must still train the SASRec."""
    with torch.no_grad():
        model, _ = make_tiny_model(tiny_setup, checkpoint_dir=str(tmp_path / "saved"))
    assert list((tmp_path / "saved" / "gate_encoders").glob("*.pth")) and model.gate_encoder is not None


def test_user_token_carries_the_projected_sequence_representation(tiny_setup):
    model, _ = make_tiny_model(tiny_setup, user_token=True)
    interaction = first_batch(tiny_setup[2])
    history, present = model.recent_history(interaction)
    template = torch.zeros(len(interaction), dtype=torch.long)
    with torch.no_grad():
        encoded = model.encode(interaction, template=template)
    prompts = encoded.prompts
    text = model.prompt.decode(prompts, 0)
    assert "(this user's taste: [emb])" in text and text.index("taste") > text.index(model.prompt.titles[int(history[0][present[0]][-1])])
    user_positions = prompts.behaviour_items == USER
    assert user_positions.sum(1).tolist() == [1] * len(interaction)  # one user token per prompt
    user_repr = model.sequence_representation(interaction)
    with torch.no_grad():
        expected = model.adapter.projector(user_repr.float())
    torch.testing.assert_close(encoded.inputs_embeds[user_positions], expected)
    plain = model.prompt.build(history, present, None, template, True)
    assert prompts.input_ids.shape[1] > plain.input_ids.shape[1] and not (plain.behaviour_items == USER).any()
    model.curriculum = False
    model.calculate_loss(interaction).backward()  # trains through the user token too
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.adapter.projector.parameters())
    with pytest.raises(ValueError, match="user_token needs use_behaviour_tokens"):
        make_tiny_model(tiny_setup, "TALLRec", user_token=True)


def test_the_cpu_time_projection_does_not_change_the_run(tiny_setup):
    """It runs one training batch before training: the batch order and the random streams must not move."""
    from recbole_ilora.quick_start import _time_one_step

    model, config = make_tiny_model(tiny_setup)
    train = tiny_setup[2]
    before = (train.generator.get_state(), torch.get_rng_state())
    assert _time_one_step(model, train, config) > 0
    assert torch.equal(train.generator.get_state(), before[0]) and torch.equal(torch.get_rng_state(), before[1])


def test_evaluating_with_fewer_candidates_leaves_training_prompts_unchanged(tiny_setup):
    """uni9 evaluation lists 10 candidates, training 20: scoring must not change what training prompts say."""
    model, _ = make_tiny_model(tiny_setup, eval_args={"mode": {"valid": "uni9", "test": "uni9"}})
    interaction, candidates, template = first_training_batch(model, tiny_setup[2])

    def training_prompt():
        return model.prompt.decode(model.encode(interaction, candidates, template=template).prompts, 0)

    before = training_prompt()
    assert "following 20 movie titles" in before
    test = first_batch(tiny_setup[4])
    ten_per_user = torch.cat([torch.arange(20 * u, 20 * u + 10) for u in range(len(test) // 20)])
    model.eval()
    with torch.no_grad():
        scored = model.encode(test[ten_per_user][torch.arange(0, len(ten_per_user), 10)],
                              test["item_id"][ten_per_user].view(-1, 10))
        model.predict(test[ten_per_user])
    assert "following 10 movie titles" in model.prompt.decode(scored.prompts, 0)
    assert training_prompt() == before


def test_the_frozen_sasrec_stays_in_eval_mode_while_the_model_trains(tiny_setup):
    """Its dropout would make the gate input and behavioural tokens of a training batch random."""
    model, _ = make_tiny_model(tiny_setup)
    interaction, candidates, template = first_training_batch(model, tiny_setup[2])

    def encoded():
        with torch.no_grad():
            out = model.encode(interaction, candidates, template=template)
        return out.gate_input, out.inputs_embeds

    model.eval()
    gate_input, embeddings = encoded()
    model.train()
    assert model.training and not model.gate_encoder.training
    for _ in range(2):
        torch.testing.assert_close(encoded(), (gate_input, embeddings), rtol=0, atol=0)


def autograd_node_names(tensor: torch.Tensor) -> set:
    """The names of every backward function that ``tensor``'s gradient goes through."""
    seen, stack = set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(next_node for next_node, _ in node.next_functions)
    return {type(node).__name__ for node in seen}


def test_behaviour_tokens_are_written_as_masked_scatter_would_without_a_data_dependent_backward(tiny_setup):
    """encode writes the projected items at their flat indices: the same embeddings and gradients as
    masked_scatter, whose backward (masked_select) would make the host wait for the device."""
    model, _ = make_tiny_model(tiny_setup)
    interaction, candidates, template = first_training_batch(model, tiny_setup[2])
    token_embedding = model.llm.get_input_embeddings()
    token_embedding.weight.requires_grad_(True)  # frozen in training: here to compare the input gradient too
    trainable = {"token embedding": token_embedding.weight,
                 **{f"projector.{name}": p for name, p in model.adapter.projector.named_parameters()}}
    encoded = model.encode(interaction, candidates, template=template, target=interaction["item_id"])
    prompts = encoded.prompts
    placeholders = prompts.kind == BEHAVIOUR
    assert placeholders.any() and not placeholders.all()
    vectors = model.gate_encoder.item_embedding(prompts.behaviour_items[placeholders].clamp(min=0))
    behaviour = model.adapter.projector(vectors.float())
    expected = token_embedding(prompts.input_ids).masked_scatter(placeholders[..., None], behaviour)
    assert torch.equal(encoded.inputs_embeds, expected)
    cotangent = torch.randn(expected.shape, generator=torch.Generator().manual_seed(0))
    got = torch.autograd.grad(encoded.inputs_embeds, list(trainable.values()), cotangent)
    want = torch.autograd.grad(expected, list(trainable.values()), cotangent)
    assert len(trainable) > 2
    for name, grad, reference in zip(trainable, got, want, strict=True):
        assert torch.equal(grad, reference), name
    assert not any(name.startswith(("MaskedScatter", "MaskedSelect", "Nonzero")) for name in
                   autograd_node_names(encoded.inputs_embeds))
