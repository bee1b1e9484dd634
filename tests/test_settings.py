"""Settings table and up-front validation: every bad setting ends in one line naming it and the fix, exit 2."""

from __future__ import annotations

import pytest
import torch

from recbole_ilora.cli import main as cli_main
from recbole_ilora.config import Config, ConfigError
from recbole_ilora.settings import SettingError, check_model_name, help_text, settings_table

BAD_SETTINGS = [
    # (arguments, words the one-line message must contain)
    (["--num_experts=3"], ["num_experts=3", "does not divide lora_rank=8", "1, 2, 4 or 8", "--lora_rank=9"]),
    (["--num_experts=0"], ["num_experts=0", "x >= 1", "Use 1, 2, 4 or 8"]),
    (["--lora_rank=0"], ["lora_rank=0", "x >= 1", "--lora_rank=8"]),
    (["--learning_rate=-1"], ["learning_rate=-1", "x > 0", "--learning_rate=0.0008"]),
    (["--train_batch_size=0"], ["train_batch_size=0", "x >= 1"]),
    (["--llm_path=/nonexistent"], ["llm_path='/nonexistent'", "does not exist", "smollm2-135m"]),
    (["--score_aggregation=foo"], ["score_aggregation='foo'", "sum, mean, first, d3"]),
    (["--score_attention=sparse"], ["score_attention='sparse'", "auto, flex, dense", "--score_attention='auto'"]),
    (["--score_pack_tokens=0"], ["score_pack_tokens=0", "x >= 1", "leave score_pack_tokens unset"]),
    (["--lora_dropout=1.5"], ["lora_dropout=1.5", "0 <= x < 1"]),
    (["--eval_args={'mode': 'ful'}"], ["eval_args={'mode': 'ful'}", "did you mean 'full'"]),
    (["--limit_train_batches=-1"], ["limit_train_batches=-1", "x >= 1", "leave limit_train_batches unset"]),
    (["--epochs=0"], ["epochs=0", "x >= 1"]),
    (["--gradient_accumulation_steps=0"], ["gradient_accumulation_steps=0", "x >= 1"]),
    (["--resume=/nonexistent/run.pth.resume"], ["resume='/nonexistent/run.pth.resume'", "does not exist"]),
    (["--eval_checkpoint=/nonexistent/iLoRA.pth"], ["eval_checkpoint='/nonexistent/iLoRA.pth'", "does not exist"]),
    (["--gate_checkpoint=/nonexistent/SASRec.pth"], ["gate_checkpoint=", "does not exist"]),
    (["--lora_rank=6", "--num_experts=4"], ["does not divide lora_rank=6", "1, 2, 3 or 6", "--lora_rank=8"]),
    (["--num_experts=2.5"], ["num_experts=2.5", "must be an int"]),
    (["--warmup_ratio=2"], ["warmup_ratio=2", "0 <= x <= 1"]),
    (["--compile=maybe"], ["compile='maybe'", "auto, true, false"]),
    (["--llm_dtype=fp8"], ["llm_dtype='fp8'", "auto, bf16, fp16, fp32"]),
    (["--lora_target_modules=[]"], ["lora_target_modules=[]", "must not be empty"]),
    (["--user_token=True", "--use_behaviour_tokens=False"], ["user_token", "needs use_behaviour_tokens"]),
    (["--eval_args={'order': 'XO'}"], ["order 'XO'", "'TO'"]),
    (["--eval_args={'mode': {'valid': 'uni19', 'tst': 'full'}}"], ["mode keys ['tst']"]),
    (["--topk=[0,5]"], ["topk=[0, 5]", "positive int"]),
    (["--metrics=['Hit','NDGC']"], ["'NDGC'", "did you mean ndcg"]),
    (["--valid_metric=NDCG@20"], ["valid_metric='NDCG@20'", "NDCG@10"]),
    (["--llm_path=/tmp"], ["is a folder without config.json"]),
    (["--llm_path=missing.gguf"], ["names no GGUF file"]),
    (["--ghost_token_threshold=0"], ["0 < x <= 1"]),
    (["--eval_args={'mode': 'uni0'}"], ["mode 'uni0'", "N >= 1"]),
    (["--eval_args={'group_by': 'item'}"], ["group_by 'item'"]),
    (["--max_history=0"], ["max_history=0", "x >= 1"]),
    (["--stopping_step=-1"], ["stopping_step=-1", "x >= 0"]),
    (["--resume=/tmp/a.resume", "--eval_checkpoint=/tmp/b.pth"], ["resume='/tmp/a.resume'", "does not exist"]),
    (["--lm_loss_weight=0", "--listwise_loss_weight=0"], ["lm_loss_weight=0", "listwise_loss_weight=0",
                                                         "no training loss", "--lm_loss_weight=1.0"]),
    (["--lm_loss_weight=0"], ["lm_loss_weight=0", "listwise_loss_weight=0.0 (default)", "no training loss"]),
    (["--listwise_loss_weight=-1"], ["listwise_loss_weight=-1", "x >= 0"]),
    (["--score_fusion_weights=[0,-1]"], ["score_fusion_weights=[0, -1]", "holds -1", "finite number >= 0"]),
    (["--score_fusion_weights=[0,'a']"], ["holds 'a'", "--score_fusion_weights="]),
    (["--score_fusion_weights=[]"], ["score_fusion_weights=[]", "must not be empty"]),
    (["--score_fusion=True", "--fixed_eval_negatives=False"], ["score_fusion=True", "fixed_eval_negatives=False",
                                                               "replayed"]),
    (["--score_fusion=maybe"], ["'score_fusion'", "cannot be read as a bool"]),
    (["--distill_loss_weight=0.5", "--lm_loss_weight=0", "--listwise_loss_weight=1"],
     ["distill_loss_weight=0.5", "needs lm_loss_weight > 0", "lm_loss_weight=0 (--lm_loss_weight)"]),
    (["--distill_loss_weight=-1"], ["distill_loss_weight=-1", "x >= 0"]),
]


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("arguments, words", BAD_SETTINGS, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_setting_is_one_line_and_exit_2(arguments, words, capsys):
    code, error = run_cli(["--model=iLoRA", "--dataset=ml-100k", *arguments], capsys)
    assert code == 2
    assert error.count("\n") == 1 and error.startswith("run_recbole_ilora.py: error: Setting "), error
    for word in words:
        assert word in error, (word, error)


def test_suggestions_never_repeat_the_value_already_set(capsys):
    _, error = run_cli(["--model=iLoRA", "--dataset=ml-100k", "--num_experts=0"], capsys)
    assert "lora_rank=8" not in error.split("Use", 1)[1].replace("divide lora_rank=8", "")
    _, error = run_cli(["--model=iLoRA", "--dataset=ml-100k", "--num_experts=3"], capsys)
    assert "num_experts 1, 2, 4 or 8" in error and "3," not in error.split("Use")[1]


def test_contradicting_resume_and_eval_checkpoint(tmp_path):
    resume, trained = tmp_path / "a.pth.resume", tmp_path / "a.pth"
    resume.write_bytes(b"x")
    trained.write_bytes(b"x")
    with pytest.raises(SettingError, match="contradict each other"):
        Config(model="iLoRA", dataset="ml-100k", config_dict={"resume": str(resume), "eval_checkpoint": str(trained)})


def test_a_bad_value_in_a_config_file_names_the_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("lora_dropout: 2\n")
    with pytest.raises(SettingError, match=r"lora_dropout=2 \(config file .*mine.yaml\)"):
        Config(model="iLoRA", dataset="ml-100k", config_file_list=[str(path)])


def test_malformed_yaml_is_one_line(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("epochs: [1, 2\n")
    code, error = run_cli(["--model=iLoRA", f"--config_files={broken}"], capsys)
    assert code == 2 and error.count("\n") == 1 and "broken.yaml is not valid YAML" in error and "line 2" in error


def test_the_baselines_default_is_suggested_for_a_baseline(capsys):
    _, error = run_cli(["--model=SASRec", "--dataset=ml-100k", "--train_batch_size=0"], capsys)
    assert "--train_batch_size=2048, the default" in error  # RecBole's, not iLoRA's 16


@pytest.mark.parametrize("model, suggestion", [("ilora", "iLoRA"), ("sasrec", "SASRec"), ("LLaRa", "LLaRA"),
                                               ("GRU4rec", "GRU4Rec"), ("NoSuchModel", None)])
def test_unknown_model_is_one_line_with_the_closest_names(model, suggestion, capsys):
    code, error = run_cli([f"--model={model}", "--dataset=ml-100k"], capsys)
    assert code == 2 and error.count("\n") == 1 and f"Unknown model {model!r}" in error
    assert "lightgbm" not in error and "Traceback" not in error
    if suggestion:
        assert f"Did you mean {suggestion}" in error


def test_model_is_required(capsys):
    code, error = run_cli(["--dataset=ml-100k"], capsys)
    assert code == 2 and error.count("\n") == 1 and "--model is required" in error


def test_every_known_model_passes_the_name_check():
    for name in ("iLoRA", "LLaRA", "TALLRec", "SASRec", "GRU4Rec", "BPR", "Pop", "LightGBM"):
        check_model_name(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_id_without_a_gpu_is_refused_before_any_work(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, error = run_cli(["--model=SASRec", "--dataset=ml-100k", "--gpu_id=0"], capsys)
    assert code == 2 and error.count("\n") == 1 and "gpu_id='0'" in error and "--gpu_id=''" in error
    assert not (tmp_path / "outputs").exists()  # refused before the log or any checkpoint


def test_help_lists_the_plugin_settings_with_defaults_and_meanings(capsys):
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    out = capsys.readouterr().out
    for text in ("--llm_path=smollm2-135m", "--num_experts=4", "--eval_checkpoint=~", "--lora_dropout=0.1",
                 "(float, 0 <= x < 1) dropout on the LoRA input", "--epochs=50", "--epochs=5"):
        assert text in out, text


def test_every_plugin_setting_has_a_type_and_meaning_and_its_default_fits():
    table = settings_table()
    assert {"llm_path", "num_experts", "eval_checkpoint", "resume", "limit_train_batches"} <= set(table)
    for setting in table.values():
        assert setting.types and setting.meaning, setting.name
        assert setting.problem(setting.default) is None or setting.file == "RecBole", setting.name
    assert "--lora_rank=8" in help_text()


@pytest.mark.parametrize("model", ["SASRec", "iLoRA", "LLaRA", "TALLRec"])
def test_the_shipped_defaults_and_presets_validate(model):
    Config(model=model, dataset="ml-100k", config_file_list=["properties/cpu-demo.yaml"])
    Config(model=model, dataset="ml-100k")


def test_setting_errors_are_config_errors():
    assert issubclass(SettingError, ConfigError)
