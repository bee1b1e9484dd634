"""The plugin's settings table, read from the YAML comments of ``properties/``, and their validation.

Every top-level key of ``properties/overall.yaml`` and ``properties/model/iLoRA.yaml`` carries a comment
``# (TYPE[, RANGE]) meaning``:

- TYPE: ``int``, ``float``, ``bool``, ``str``, ``dict``, ``list``, alternatives joined by ``|`` and
  ``or ~`` where the setting may be unset (``(int or ~, x >= 1)``);
- RANGE: ``x >= 1``, ``x > 0``, ``0 <= x < 1``, ``0 < x <= 1``, or choices ``sum | mean | first``.

:func:`settings_table` parses them (``--help`` prints the table); :func:`check_settings` is called once
by :class:`recbole_ilora.config.Config` on the merged settings, before RecBole or the plugin uses any of
them, and raises :class:`SettingError` (one line naming the setting, where it came from and the fix) on
the first value out of range or the first contradiction between settings. :func:`check_run_environment`
is called by the quick start before any work: the requested GPU exists, the LLM alias is installed.

Reading the table needs only PyYAML (``--help`` stays fast).
"""

from __future__ import annotations

import difflib
import functools
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

__all__ = ["ConfigError", "Setting", "SettingError", "check_model_name", "check_run_environment", "check_settings",
           "help_text", "settings_table"]

_SPEC = re.compile(r"#\s*\((?P<spec>[^()]*)\)\s*(?P<meaning>.*)$")
_KEY = re.compile(r"^(?P<key>[A-Za-z_][\w]*)\s*:")
_BOUND = re.compile(r"^(?:(?P<low>-?[\d.e+-]+)\s*(?P<lop><=|<)\s*)?x\s*(?:(?P<op>>=|>|<=|<)\s*(?P<high>-?[\d.e+-]+))?$")
_MODE = re.compile(r"^(full|labeled|uni[1-9]\d*|pop[1-9]\d*)$")

# RecBole settings the plugin relies on without defaulting them itself, checked the same way.
_RECBOLE_SETTINGS = {
    "eval_step": "(int, x >= 0) validate every N epochs; 0: no validation, the last model is tested",
    "seed": "(int) random seed of the run",
    "MAX_ITEM_LIST_LENGTH": "(int, x >= 1) most recent items of a history that sequential models read",
}


class ConfigError(ValueError):
    """A setting cannot be used as given; the message names the setting, where it came from, and the fix.

    (Re-exported by :mod:`recbole_ilora.config`; defined here so that this module needs no RecBole.) The CLI
    prints it as one line and exits with status 2.
    """


class SettingError(ConfigError):
    """A setting is out of its allowed range, contradicts another, or names a missing file or model."""


@dataclass(frozen=True)
class Setting:
    name: str
    types: tuple[str, ...]  # "int", "float", "bool", "str", "dict", "list", "~" (may be unset)
    low: float | None
    low_inclusive: bool
    high: float | None
    high_inclusive: bool
    choices: tuple[str, ...]
    default: object
    meaning: str
    file: str

    @property
    def spec(self) -> str:
        """The comment's ``TYPE, RANGE`` as written for users."""
        kinds = "|".join(t for t in self.types if t != "~") + (" or ~" if "~" in self.types else "")
        return f"{kinds}, {self.range_text}" if self.range_text else kinds

    @property
    def range_text(self) -> str:
        if self.choices:
            return " | ".join(self.choices)
        if self.low is not None and set(self.types) <= {"list", "dict", "~"}:
            return "non-empty"
        if self.low is not None and self.high is not None:
            return f"{_num(self.low)} {'<=' if self.low_inclusive else '<'} x {'<=' if self.high_inclusive else '<'} {_num(self.high)}"
        if self.low is not None:
            return f"x {'>=' if self.low_inclusive else '>'} {_num(self.low)}"
        if self.high is not None:
            return f"x {'<=' if self.high_inclusive else '<'} {_num(self.high)}"
        return ""

    def problem(self, value) -> str | None:
        """Why ``value`` is not allowed (``"must be ..."``), or None."""
        if value is None:
            return None if "~" in self.types or "dict" in self.types else f"must be set ({self.spec})"
        if not any(_is_type(value, kind) for kind in self.types):
            return f"must be {_article(self.spec)}"
        if isinstance(value, (list, dict)) and self.low is not None and len(value) < self.low:
            return "must not be empty"
        if self.choices and _choice_text(value) not in self.choices:
            return f"must be one of {', '.join(self.choices)}"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if self.low is not None and (value < self.low or (value == self.low and not self.low_inclusive)):
                return f"must be {_article(self.spec)}"
            if self.high is not None and (value > self.high or (value == self.high and not self.high_inclusive)):
                return f"must be {_article(self.spec)}"
        return None


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _article(spec: str) -> str:
    return ("an " if spec[:1] in "aeiou" else "a ") + spec


def _choice_text(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _is_type(value, kind: str) -> bool:
    if kind == "~":
        return value is None
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, {"str": str, "dict": dict, "list": (list, str)}[kind])  # RecBole reads "Hit" as [Hit]


def parse_spec(name: str, spec: str, meaning: str, default, file: str) -> Setting:
    kinds, _, constraint = (part.strip() for part in spec.partition(","))
    nullable = kinds.endswith(" or ~")
    types = tuple(kinds.removesuffix(" or ~").split("|")) + (("~",) if nullable else ())
    unknown = [kind for kind in types if kind not in ("int", "float", "bool", "str", "dict", "list", "~")]
    if unknown:
        raise ValueError(f"{file}: the comment of {name} names unknown type(s) {unknown}")
    low = high = None
    low_inclusive = high_inclusive = True
    choices: tuple[str, ...] = ()
    if constraint:
        bound = _BOUND.match(constraint)
        if bound and (bound["low"] or bound["op"]):
            if bound["low"]:
                low, low_inclusive = float(bound["low"]), bound["lop"] == "<="
            if bound["op"] in (">=", ">"):
                low, low_inclusive = float(bound["high"]), bound["op"] == ">="
            elif bound["op"]:
                high, high_inclusive = float(bound["high"]), bound["op"] == "<="
        elif constraint == "non-empty":
            low = 1.0  # of its length
        else:
            choices = tuple(choice.strip() for choice in constraint.split("|"))
    return Setting(name, types, low, low_inclusive, high, high_inclusive, choices, default, meaning.strip(), file)


def _table_files() -> list[Path]:
    from recbole_ilora.utils import properties_dir

    root = properties_dir()
    return [root / "overall.yaml", root / "model" / "iLoRA.yaml"]


def _read_file(path: Path) -> dict[str, Setting]:
    text = path.read_text(encoding="utf-8")
    defaults = yaml.safe_load(text) or {}
    settings = {}
    for line in text.splitlines():
        key, spec = _KEY.match(line), _SPEC.search(line)
        if key is None:
            continue
        if spec is None:
            raise ValueError(f"{path}: setting {key['key']} has no '# (type) meaning' comment")
        name = key["key"]
        settings[name] = parse_spec(name, spec["spec"], spec["meaning"], defaults.get(name), path.name)
    return settings


@functools.lru_cache(maxsize=1)
def settings_by_file() -> dict[str, dict[str, Setting]]:
    return {path.name: _read_file(path) for path in _table_files()}


@functools.lru_cache(maxsize=1)
def settings_table() -> dict[str, Setting]:
    """``{name: Setting}`` for every plugin setting, in file order (later files win), plus RecBole's few."""
    table: dict[str, Setting] = {}
    for settings in settings_by_file().values():
        table.update(settings)
    for name, comment in _RECBOLE_SETTINGS.items():
        if name not in table:
            match = _SPEC.search("# " + comment)
            table[name] = parse_spec(name, match["spec"], match["meaning"], None, "RecBole")
    return table


def help_text(width: int = 34) -> str:
    """The table for ``--help``: ``--name=default  (type, range) meaning``, per defaults file."""
    titles = {"overall.yaml": "Plugin settings of every model (properties/overall.yaml; --key=value):",
              "iLoRA.yaml": "LLM models iLoRA, LLaRA, TALLRec (properties/model/iLoRA.yaml; LLaRA and TALLRec: "
                            "num_experts=1, TALLRec: use_behaviour_tokens=False):"}
    lines = []
    for file, settings in settings_by_file().items():
        lines.append(titles.get(file, file))
        for setting in settings.values():
            default = "~" if setting.default is None else setting.default
            text = f"--{setting.name}={default}"
            text = text if len(text) < 60 else text[:56] + "...}"
            lines.append(f"  {text:<{width}} ({setting.spec}) {setting.meaning}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ validation
def _refuse(name: str, value, source: str, problem: str, fix: str) -> SettingError:
    return SettingError(f"Setting {name}={value!r} ({source}) {problem}. {fix}")


def _divisors(number: int) -> list[int]:
    return [d for d in range(1, number + 1) if number % d == 0]


def _words(values) -> str:
    values = [str(v) for v in values]
    return values[0] if len(values) == 1 else ", ".join(values[:-1]) + " or " + values[-1]


def check_settings(settings: dict, sources: dict, defaults: dict | None = None, given: dict | None = None) -> None:
    """Raise :class:`SettingError` on the first plugin setting out of range or contradicting another.

    ``settings`` are the merged settings (defaults and external); ``sources`` says where each external one
    came from (``--lora_rank``, ``config file a.yaml``; the others are defaults); ``defaults`` are the
    values of the defaults files for this model and dataset, suggested as fixes; ``given`` the external
    values as given (a partial dict before merging), shown in messages.
    """
    where = lambda key: sources.get(key, "default")  # noqa: E731
    defaults = settings if defaults is None else defaults
    table = settings_table()
    # lora_rank and num_experts first: the range message of num_experts suggests values that fit lora_rank.
    rank, experts = settings.get("lora_rank"), settings.get("num_experts")
    rank_ok = "lora_rank" in settings and table["lora_rank"].problem(rank) is None
    for name, value in settings.items():
        setting = table.get(name)
        problem = setting.problem(value) if setting is not None else None
        if problem is None:
            continue
        meaning = f" ({setting.meaning})" if setting.meaning else ""
        default = defaults.get(name)
        if name == "num_experts" and rank_ok:
            fix = f"Use {_words(_divisors(rank))} (they divide lora_rank={rank})."
        elif default is not None and default != value and setting.problem(default) is None:
            fix = f"E.g. --{name}={default!r}, the default."
        elif "~" in setting.types:
            fix = f"Give a value in that range, or leave {name} unset."
        else:
            fix = "Give a value in that range."
        raise _refuse(name, value, where(name), problem + meaning, fix)
    if rank_ok and isinstance(experts, int) and not isinstance(experts, bool) and experts >= 1 and rank % experts:
        fits = [d for d in _divisors(rank) if d != experts]
        multiple = -(-rank // experts) * experts
        raise _refuse("num_experts", experts, where("num_experts"),
                      f"does not divide lora_rank={rank}: lora_rank must be a multiple of num_experts (each of "
                      f"the K experts gets rank lora_rank/K)",
                      f"Use num_experts {_words(fits)}, or a lora_rank that is a multiple of {experts} "
                      f"(e.g. --lora_rank={multiple}).")
    _check_auto_sizes(settings, where)
    _check_eval_args(settings.get("eval_args"), (given or {}).get("eval_args", settings.get("eval_args")),
                     where("eval_args"))
    _check_metrics(settings, where)
    _check_files(settings, where)
    if settings.get("user_token") and settings.get("use_behaviour_tokens") is False:
        raise _refuse("user_token", True, where("user_token"), f"contradicts use_behaviour_tokens=False "
                      f"({where('use_behaviour_tokens')}): user_token needs use_behaviour_tokens: true (the user token "
                      "goes through the behavioural tokens' projector)", "Drop user_token, or set use_behaviour_tokens: true.")
    if settings.get("lm_loss_weight") == 0 and settings.get("listwise_loss_weight") == 0:
        raise _refuse("lm_loss_weight", settings["lm_loss_weight"], where("lm_loss_weight"),
                      f"and listwise_loss_weight={settings['listwise_loss_weight']!r} ({where('listwise_loss_weight')}) "
                      "leave no training loss", "Give one a positive weight, e.g. --lm_loss_weight=1.0 (the paper's LM "
                      "loss, the default).")
    _check_score_fusion_weights(settings, where)
    if settings.get("score_fusion") and settings.get("fixed_eval_negatives") is False:
        raise _refuse("score_fusion", True, where("score_fusion"), f"contradicts fixed_eval_negatives=False "
                      f"({where('fixed_eval_negatives')}): its weights are compared on the same candidates, whose LLM "
                      "scores are computed once and replayed", "Drop fixed_eval_negatives=False, or score_fusion.")
    if settings.get("distill_loss_weight"):
        _check_distillation(settings, where)
    if settings.get("resume") and settings.get("eval_checkpoint"):
        raise _refuse("eval_checkpoint", settings["eval_checkpoint"], where("eval_checkpoint"),
                      f"and resume={settings['resume']!r} ({where('resume')}) contradict each other (evaluating a "
                      "trained model vs continuing its training)", "Give one of them.")


def _check_score_fusion_weights(settings: dict, where) -> None:
    """``score_fusion_weights`` is a list of numbers >= 0 (the type check above lets a string through, as a list)."""
    weights = settings.get("score_fusion_weights")
    if weights is None:
        return
    weights_given = weights if isinstance(weights, list) else [weights]
    bad = [w for w in weights_given if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w < float("inf")]
    if bad:
        raise _refuse("score_fusion_weights", weights, where("score_fusion_weights"), f"holds {bad[0]!r}: every weight "
                      "(lambda, SASRec's share of the fused score) must be a finite number >= 0",
                      "E.g. --score_fusion_weights=\"[0.0,0.25,0.5,1.0,2.0,4.0]\", the default (0: the LLM alone).")


def _check_distillation(settings: dict, where) -> None:
    """The distillation loss reads the LM loss's hidden states: that forward must run."""
    weight = settings["distill_loss_weight"]
    if not settings.get("lm_loss_weight"):
        raise _refuse("distill_loss_weight", weight, where("distill_loss_weight"),
                      f"needs lm_loss_weight > 0, not lm_loss_weight={settings.get('lm_loss_weight')!r} "
                      f"({where('lm_loss_weight')}): the hidden states come from the LM loss's forward",
                      "Give lm_loss_weight a positive weight (e.g. --lm_loss_weight=1.0), or --distill_loss_weight=0.0.")


def _check_auto_sizes(settings: dict, where) -> None:
    """Batch sizes are numbers or ``auto`` (:mod:`recbole_ilora.batch_sizes`)."""
    for name in ("train_batch_size", "gradient_accumulation_steps", "eval_batch_size"):
        value = settings.get(name)
        if isinstance(value, str) and value != "auto":
            raise _refuse(name, value, where(name), "must be a positive int or auto",
                          f"E.g. --{name}=auto (sized for the device) or a number.")


def _check_eval_args(eval_args, shown, source: str) -> None:
    if not isinstance(eval_args, dict):
        return  # RecBole's own message; the type check above has refused non-dicts given from outside
    example = "e.g. --eval_args=\"{'mode': 'full'}\" or \"{'mode': 'uni99'}\""
    mode = eval_args.get("mode")
    modes = mode.values() if isinstance(mode, dict) else [mode]
    if isinstance(mode, dict) and set(mode) - {"valid", "test"}:
        raise _refuse("eval_args", shown, source, f"has mode keys {sorted(set(mode) - {'valid', 'test'})}",
                      "mode is one value, or {valid: ..., test: ...}.")
    for value in modes:
        if not isinstance(value, str) or not _MODE.match(value):
            close = difflib.get_close_matches(str(value), ["full", "labeled", "uni19", "uni99", "pop19"], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise _refuse("eval_args", shown, source, f"has mode {value!r}{hint}, which RecBole does not know",
                          f"A mode is 'full' (whole catalogue), 'uniN' / 'popN' (N >= 1 sampled negatives) or 'labeled': {example}.")
    order = eval_args.get("order")
    if order is not None and order not in ("RO", "TO"):
        raise _refuse("eval_args", shown, source, f"has order {order!r}",
                      "order is 'TO' (by timestamp, leave-one-out) or 'RO' (random).")
    split = eval_args.get("split")
    if split is not None and (not isinstance(split, dict) or len(split) != 1 or next(iter(split)) not in ("RS", "LS")):
        raise _refuse("eval_args", shown, source, f"has split {split!r}",
                      "split is {'LS': 'valid_and_test'} (leave-one-out) or {'RS': [0.8, 0.1, 0.1]} (ratios).")
    group_by = eval_args.get("group_by")
    if group_by not in (None, "user", "none"):
        raise _refuse("eval_args", shown, source, f"has group_by {group_by!r}", "group_by is 'user' or 'none'.")


def _check_metrics(settings: dict, where) -> None:
    metric, metrics, topk = settings.get("valid_metric"), settings.get("metrics"), settings.get("topk")
    if metrics is None or topk is None:
        return
    from recbole.evaluator import metric_types

    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    unknown = [m for m in metrics if str(m).lower() not in metric_types]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]).lower(), list(metric_types), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise _refuse("metrics", settings["metrics"], where("metrics"), f"names {unknown[0]!r}{hint}, which RecBole "
                      "does not compute", "Top-k metrics are Hit, NDCG, MRR, Recall, Precision, MAP, ...: e.g. "
                      "--metrics=\"['Hit','NDCG']\".")
    ks = [topk] if isinstance(topk, int) else list(topk)
    if not ks or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ks):
        raise _refuse("topk", settings["topk"], where("topk"), "must be a positive int or a list of them",
                      "E.g. --topk=\"[1,5,10]\".")
    if not isinstance(metric, str):
        return
    name, _, k = metric.partition("@")
    if name.lower() in {m.lower() for m in metrics} and (not k or (k.isdigit() and int(k) in ks)):
        return
    offered = [f"{m}@{t}" for m in metrics for t in ks]
    close = difflib.get_close_matches(metric, offered, n=1) or offered[:1]
    raise _refuse("valid_metric", metric, where("valid_metric"), f"is not among the computed metrics ({', '.join(metrics)} "
                  f"at topk {ks})", f"Use one of them, e.g. --valid_metric={close[0]}, or add it to metrics / topk.")


def _check_files(settings: dict, where) -> None:
    for key, what in (("resume", "a .resume checkpoint an interrupted run wrote (its log prints the path)"),
                      ("eval_checkpoint", "a checkpoint (.pth) an earlier run of this model saved in outputs/saved/"),
                      ("gate_checkpoint", "a RecBole SASRec checkpoint (.pth); unset it to pretrain one"),
                      ("prompt_file", "a YAML file of prompt templates like properties/prompts.yaml")):
        value = settings.get(key)
        if value and not Path(str(value)).expanduser().is_file():
            state = "is a folder, not a file" if Path(str(value)).expanduser().is_dir() else "does not exist"
            raise _refuse(key, value, where(key), state, f"Give {what}.")
    llm_path = settings.get("llm_path")
    if isinstance(llm_path, str) and llm_path:
        from recbole_ilora.llm import llm_path_problem

        problem = llm_path_problem(llm_path, check_installed=False)
        if problem:
            raise _refuse("llm_path", llm_path, where("llm_path"), problem[0], problem[1])


def check_run_environment(config) -> None:
    """Before any work: the GPU the run asks for exists, and the LLM alias's package is installed."""
    import torch

    source = config._source.get("gpu_id") if hasattr(config, "_source") else None
    gpu_id = str(config["gpu_id"] if config["gpu_id"] is not None else "").strip()
    if source and gpu_id and config["use_gpu"] is not False:
        wanted = [part.strip() for part in gpu_id.split(",") if part.strip()]
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise SettingError(f"Setting gpu_id={config['gpu_id']!r} ({source}) asks for a GPU, but torch sees no "
                               f"CUDA device here (torch {torch.__version__}, CUDA build: "
                               f"{torch.version.cuda or 'no'}). Drop --gpu_id, or pass --gpu_id='' to run on the CPU.")
    llm_path = config["llm_path"]
    if llm_path and config.model_class is not None and getattr(config.model_class, "needs_gate_encoder", None):
        from recbole_ilora.llm import llm_path_problem

        problem = llm_path_problem(str(llm_path), check_installed=True)
        if problem:
            raise SettingError(f"Setting llm_path={llm_path!r} ({config._source.get('llm_path', 'default')}) "
                               f"{problem[0]}. {problem[1]}")


# ------------------------------------------------------------------------------------------ model names
@functools.lru_cache(maxsize=1)
def known_models() -> tuple[str, ...]:
    """The plugin's model names and RecBole's (read from the packages' sources, nothing imported)."""
    import importlib.util

    names = []
    plugin = Path(__file__).resolve().parent / "model"
    for path in sorted(plugin.glob("*.py")):
        for match in re.finditer(r"^class (\w+)\(", path.read_text(encoding="utf-8"), re.M):
            if match[1].lower() == path.stem:
                names.append(match[1])
    spec = importlib.util.find_spec("recbole")
    root = Path(spec.origin).parent / "model"
    for init in sorted(root.glob("*/__init__.py")):
        names += re.findall(r"^from recbole\.model\.\w+\.\w+ import (\w+)", init.read_text(encoding="utf-8"), re.M)
    return tuple(dict.fromkeys(names))


def check_model_name(model: str, source: str = "--model") -> None:
    """Raise :class:`SettingError` unless ``model`` names a plugin or RecBole model (case matters, as in RecBole);
    ``source`` says where the name was given."""
    names = known_models()
    if model in names:
        return
    same = [name for name in names if name.lower() == str(model).lower()]
    close = same or difflib.get_close_matches(str(model), names, n=3, cutoff=0.6) or \
        [names[i] for i in _close_lower(str(model), names)]
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    raise SettingError(f"Unknown model {model!r} ({source}): neither a recbole-ilora model (iLoRA, LLaRA, TALLRec) "
                       f"nor a RecBole model; names are case-sensitive.{hint}")


def _close_lower(model: str, names) -> list[int]:
    lowered = [name.lower() for name in names]
    return [lowered.index(m) for m in difflib.get_close_matches(model.lower(), lowered, n=3, cutoff=0.6)]
