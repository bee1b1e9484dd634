"""The columns a run needs, read from the atomic files' headers when no YAML names them.

RecBole's default ``load_col`` is ``{inter: [user_id, item_id]}``: a dataset without its own YAML loses
its timestamp (the protocol's leave-one-out split orders by it, and RecBole then fails deep in the split
with "[timestamp] is not exist in interaction") and its titles (the LLM models' prompts). When neither a
YAML nor the command line sets ``load_col``, :func:`infer_columns` takes them from the headers:
``.inter`` -- the id fields and ``TIME_FIELD`` (``timestamp:float``) if the header has it; ``.item``, for
the LLM models -- the id and the title field ``item_text_field`` (when unset: the one ``token``/``token_seq``
field named ``title``, ``*_title``, ``name`` or ``*_name``). What it infers is logged
(``config.inferred_columns``). A column the protocol needs and the files lack ends in one line naming the
file, the field and the fix. Nothing is filled in.
"""

from __future__ import annotations

import re
from pathlib import Path

from recbole_ilora.data.item_text import DatasetError

__all__ = ["check_time_column", "infer_columns", "header_fields"]

_TITLE = re.compile(r"^(title|name|.*_title|.*_name|title_.*)$", re.I)


def header_fields(path: Path, separator: str, encoding: str) -> dict[str, str] | None:
    """``{field: type}`` of an atomic file's header; None when the file is missing or its header unreadable
    (the file checks report those with their own messages)."""
    try:
        with open(path, encoding=encoding) as handle:
            header = handle.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError):
        return None
    fields = {}
    for part in header.split(separator):
        name, colon, kind = part.partition(":")
        if not colon or kind not in ("token", "token_seq", "float", "float_seq"):
            return None  # malformed (another separator?): the file checks say what is wrong
        fields[name] = kind
    return fields


def _order_by_time(config) -> bool:
    from recbole_ilora.data.atomic_reader import setting  # Config or a plain dict (scripts, tests)

    eval_args = setting(config, "eval_args", {})
    return eval_args.get("order", "RO") == "TO" and not setting(config, "benchmark_filename")


def infer_columns(config, needs_titles: bool) -> None:
    """Set ``load_col`` (and ``item_text_field``) of ``config`` from the headers when no settings file set them.

    ``config`` is a RecBole Config after ``data_path`` was joined with the dataset name; ``needs_titles``
    for the LLM models. Raises :class:`DatasetError` when the title field cannot be told apart.
    """
    folder, name = Path(config["data_path"]), config["dataset"]
    separator, encoding = config["field_separator"] or "\t", config["encoding"] or "utf-8"
    uid, iid, time = config["USER_ID_FIELD"], config["ITEM_ID_FIELD"], config["TIME_FIELD"]
    inter_path = folder / f"{name}.inter"
    inter = header_fields(inter_path, separator, encoding)
    if inter is None:
        return  # no such file (benchmark files, a download to come) or unreadable: checked later
    load_col, notes = config["load_col"], []
    given = getattr(config, "external_config_dict", {})
    inferred = load_col == {"inter": [uid, iid]} and "load_col" not in given
    if inferred:
        load_col = {"inter": [uid, iid] + ([time] if time in inter else [])}
        notes.append(f"inter {load_col['inter']}")
    item_path = folder / f"{name}.item"
    item = header_fields(item_path, separator, encoding) if needs_titles else None
    if needs_titles and not item_path.exists() and not config["item_text_field"]:
        raise DatasetError(
            f"Dataset '{name}': {item_path} does not exist, and the LLM models write every item as its title. Add it: "
            f"a header such as '{iid}:token{separator}title:token_seq', then one row per item (id, title)."
        )
    if item is not None:
        field = config["item_text_field"]
        if not field:
            named = [f for f, kind in item.items() if f != iid and kind in ("token", "token_seq") and _TITLE.match(f)]
            if len(named) > 1 and "title" in named:
                named = ["title"]
            if len(named) != 1:
                found = ", ".join(f"{k}:{v}" for k, v in item.items())
                raise DatasetError(
                    f"Dataset '{name}': {item_path}: {'several fields could' if named else 'no field'} hold the item "
                    f"titles for the prompts (header: {found}). Name it: --item_text_field=FIELD (or "
                    f"item_text_field: FIELD in a --config_files YAML)."
                )
            field = config["item_text_field"] = named[0]
            notes.append(f"item_text_field {field!r}")
        if inferred:
            year = config["item_year_field"]
            load_col["item"] = [iid, field] + ([year] if year else [])
            notes.append(f"item {load_col['item']}")
    if inferred:
        config["load_col"] = load_col
    if notes:  # logged by the quick start once the run's log exists (Config is built before it)
        config.inferred_columns = f"Dataset '{name}': from the atomic files' headers: {'; '.join(notes)}."


def check_time_column(config, path: Path, header: dict, loaded) -> None:
    """The leave-one-out split orders by ``TIME_FIELD``: refuse, naming file and fix, when it is not in the header
    of ``path`` or not loaded (RecBole would fail deep in the split: "[timestamp] is not exist in interaction")."""
    if not _order_by_time(config):
        return
    name, time = config["dataset"], config["TIME_FIELD"] if "TIME_FIELD" in config else "timestamp"
    if time not in header:
        raise DatasetError(
            f"Dataset '{name}': {path}: the header has no '{time}' field ({', '.join(f'{k}:{v}' for k, v in header.items())}), "
            f"but the protocol's leave-one-out split orders each user's interactions by it (eval_args order "
            f"'TO'). Add a column '{time}:float' (any number that increases along a user's sequence), set "
            f"TIME_FIELD to the column that does, or split at random: --eval_args=\"{{'order': 'RO'}}\"."
        )
    if header[time] != "float":
        raise DatasetError(
            f"Dataset '{name}': {path}: the header declares '{time}:{header[time]}', but the leave-one-out split orders "
            f"each user's interactions by it, and RecBole orders a '{header[time]}' field by its remapped ids (the "
            f"order of first appearance), not by value. Declare it '{time}:float'."
        )
    if time not in loaded:
        raise DatasetError(
            f"Dataset '{name}': load_col['inter'] is {list(config['load_col']['inter'])}, without '{time}', which the "
            f"leave-one-out split orders by (eval_args order 'TO'). Add it to load_col['inter']."
        )
