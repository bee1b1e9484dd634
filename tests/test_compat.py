"""Each fix of recbole_ilora.compat: RecBole's original code fails on this stack, the fix works."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import recbole.utils
import torch
from recbole.config.configurator import Config as RecBoleConfig
from recbole.data import create_dataset, data_preparation
from recbole.data.dataset.dataset import Dataset
from recbole.trainer.trainer import Trainer

from recbole_ilora import compat
from recbole_ilora.config import Config


def _gappy_dataset(root):
    """Atomic files with a missing float, a missing token and a token_seq (title) field."""
    folder = root / "gappy"
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    for user in range(1, 7):
        for step, item in enumerate(range(1, 7)):
            rating = "" if (user, item) == (2, 3) else str(1 + (user + item) % 5)
            rows.append(f"{user}\t{(item + user) % 6 + 1}\t{rating}\t{100 * user + step}")
    (folder / "gappy.inter").write_text("\n".join(rows) + "\n")
    items = ["item_id:token\ttitle:token_seq\tgenre:token"]
    items += [f"{i}\tMovie number {i}\t{'' if i == 4 else 'drama'}" for i in range(1, 7)]
    (folder / "gappy.item").write_text("\n".join(items) + "\n")
    return {
        "data_path": str(root),
        "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"], "item": ["item_id", "title", "genre"]},
        "show_progress": False,
        "state": "WARNING",
    }


def test_numpy2_config_needs_fix():
    with pytest.raises(AttributeError):  # RecBole's own: np.float_ is gone in numpy 2
        compat.original(RecBoleConfig, "compatibility_settings")(None)
    config = Config(model="SASRec", dataset="ml-100k")
    assert config["model"] == "SASRec"
    assert np.zeros(2, dtype=np.float).dtype == np.float64  # RecBole's metrics use the alias


def test_pandas3_fillna_fix_keeps_no_nan(tmp_path, monkeypatch):
    overrides = _gappy_dataset(tmp_path)
    dataset = create_dataset(Config(model="SASRec", dataset="gappy", config_dict=overrides))
    rating = np.asarray(dataset.inter_feat["rating"], dtype=float)
    assert not np.isnan(rating).any()  # the gap holds the mean (then normalised), not NaN

    monkeypatch.setattr(Dataset, "_fill_nan", compat.original(Dataset, "_fill_nan"))
    broken = create_dataset(Config(model="SASRec", dataset="gappy", config_dict=overrides))
    assert np.isnan(np.asarray(broken.inter_feat["rating"], dtype=float)).any()  # silent data loss without the fix


def test_pandas3_token_seq_fix(tmp_path, monkeypatch):
    overrides = _gappy_dataset(tmp_path)
    dataset = create_dataset(Config(model="SASRec", dataset="gappy", config_dict=overrides))
    tokens = dataset.field2id_token["title"]
    titles = {" ".join(tokens[ids]) for ids in dataset.item_feat["title"]}
    assert titles - {""} == {f"Movie number {i}" for i in range(1, 7)}  # "" is the padding item

    monkeypatch.setattr(Dataset, "_remap", compat.original(Dataset, "_remap"))
    with pytest.raises(ValueError, match="Length of values"):
        create_dataset(Config(model="SASRec", dataset="gappy", config_dict=overrides))


def test_torch_weights_only_fix(ml100k_slice, tmp_path, monkeypatch):
    from recbole.model.sequential_recommender import GRU4Rec

    config = Config(model="GRU4Rec", dataset="ml-100k-slice",
                    config_dict={**ml100k_slice, "epochs": 1, "checkpoint_dir": str(tmp_path)})
    dataset = create_dataset(config)
    train, valid, test = data_preparation(config, dataset)
    trainer = Trainer(config, GRU4Rec(config, train._dataset).to(config["device"]))  # the GPU when there is one
    trainer.fit(train, valid, saved=True)
    result = trainer.evaluate(test, load_best_model=True)  # reloads the pickled-Config checkpoint
    assert 0.0 <= result["hit@10"] <= 1.0
    trainer.resume_checkpoint(trainer.saved_model_file)

    monkeypatch.setattr(Trainer, "evaluate", compat.original(Trainer, "evaluate"))
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        trainer.evaluate(test, load_best_model=True)


def test_quick_start_does_not_need_ray():
    code = "import sys, recbole_ilora.quick_start, recbole_ilora.cli; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    # RecBole's own quick start cannot be imported on this stack (why the plugin has its own):
    broken = subprocess.run([sys.executable, "-c", "import recbole.quick_start"], capture_output=True, text=True)
    assert broken.returncode != 0


def test_every_fix_is_applied():
    for module, owner, method in compat._SOURCE_FIXES:
        imported = importlib.import_module(module)
        assert compat.is_patched(imported if owner is None else getattr(imported, owner), method), f"{owner}.{method}"
    assert compat.is_patched(recbole.utils, "get_environment")  # the re-export RecBole's callers import


def test_version_mismatch_fails_loudly():
    with pytest.raises(compat.RecBoleVersionError, match="recbole==1.2.1"):
        compat._patch_source("recbole.data.dataset.dataset", "Dataset", "_fill_nan", [("not in the source", "x", 1)])


def test_importing_recbole_models_leaves_anomaly_detection_off():
    from recbole.model.sequential_recommender import SASRec  # noqa: F401

    assert not torch.is_anomaly_enabled()
    # RecBole alone switches it on for the whole process (sine.py), which slows every backward pass:
    code = "import torch, recbole.model.sequential_recommender; print(torch.is_anomaly_enabled())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("True")


def test_a_cpu_run_leaves_the_visible_gpus_alone(monkeypatch):
    """RecBole would set CUDA_VISIBLE_DEVICES="" for gpu_id "", after torch may have counted the GPUs."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    config = RecBoleConfig(model="Pop", dataset="ml-100k", config_dict={"gpu_id": "", "state": "WARNING"})
    assert config["device"] == torch.device("cpu") and os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    monkeypatch.setattr(RecBoleConfig, "_init_device", compat.original(RecBoleConfig, "_init_device"))
    RecBoleConfig(model="Pop", dataset="ml-100k", config_dict={"gpu_id": "", "state": "WARNING"})
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""  # RecBole's own


def test_the_environment_of_a_cpu_run_on_a_gpu_machine(monkeypatch):
    """RecBole asks CUDA for the memory of the CPU device whenever a GPU exists."""
    config = RecBoleConfig(model="Pop", dataset="ml-100k", config_dict={"gpu_id": "", "state": "WARNING"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("psutil.cpu_percent", lambda interval=None: 0.0)  # RecBole samples it for 1 s
    assert "0.0 / 0.0" in recbole.utils.get_environment(config).draw()
    with pytest.raises((ValueError, AssertionError)):  # "Expected a cuda device" / "not compiled with CUDA"
        compat.original(recbole.utils.utils, "get_environment")(config)


def test_tensors_do_not_alias_pandas_read_only_columns(monkeypatch):
    """pandas 3 hands out read-only column arrays; torch.LongTensor(array) shared them (and warned)."""
    from types import SimpleNamespace

    import pandas as pd
    from recbole.utils import FeatureType

    owner = SimpleNamespace(field2type={"item_id": FeatureType.TOKEN}, config={"numerical_features": []}, field2seqlen={})
    frame = pd.DataFrame({"item_id": [1, 2, 3]})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        interaction = Dataset._dataframe_to_interaction(owner, frame)
    interaction["item_id"][0] = 99
    assert frame["item_id"].tolist() == [1, 2, 3]
    assert not [w for w in caught if "not writable" in str(w.message)]

    monkeypatch.setattr(Dataset, "_dataframe_to_interaction", compat.original(Dataset, "_dataframe_to_interaction"))
    shared = Dataset._dataframe_to_interaction(owner, frame)
    shared["item_id"][0] = 99
    assert frame["item_id"].tolist() == [99, 2, 3]  # RecBole's own: the tensor writes into the DataFrame


def test_recbole_training_uses_the_current_grad_scaler(ml100k_slice, tmp_path, monkeypatch):
    from recbole.model.sequential_recommender import GRU4Rec

    config = Config(model="GRU4Rec", dataset="ml-100k-slice", config_dict={**ml100k_slice, "checkpoint_dir": str(tmp_path)})
    train, _, _ = data_preparation(config, create_dataset(config))
    trainer = Trainer(config, GRU4Rec(config, train._dataset).to(config["device"]))

    def grad_scaler_warnings():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer._train_epoch(train, 0)
        return [w for w in caught if "GradScaler" in str(w.message)]

    assert not grad_scaler_warnings()
    monkeypatch.setattr(Trainer, "_train_epoch", compat.original(Trainer, "_train_epoch"))
    assert grad_scaler_warnings()  # RecBole's own: torch.cuda.amp.GradScaler is deprecated


def test_peft_reading_a_deprecated_transformers_property_is_not_shown():
    """Filtered (that message, from that module) once the plugin is imported; shown without it. In fresh
    processes: pytest drops warning filters installed while it imports the tests."""
    peft_on_a_llama = (
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "from peft import LoraConfig, get_peft_model\n"
        "llm = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,"
        " num_attention_heads=2, num_key_value_heads=2))\n"
        "get_peft_model(llm, LoraConfig(r=2, target_modules=['q_proj']))\n"
    )

    def warned(code: str) -> bool:
        env = {key: value for key, value in os.environ.items() if key != "PYTHONWARNINGS"}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
        return "is_gradient_checkpointing" in out.stderr

    if not warned(peft_on_a_llama):
        pytest.skip("this transformers does not deprecate is_gradient_checkpointing: nothing to filter")
    assert not warned("import recbole_ilora\n" + peft_on_a_llama)
