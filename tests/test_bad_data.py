"""Bad data never passes silently: each case gets one message naming the file, the field and the count.

Tiny atomic datasets are written in tmp_path: 4 users who each watched items 1-4 in order (16
interactions, lines 2-17 of tiny.inter) and 4 titled items; every case breaks one thing.
"""

import logging
import re
from pathlib import Path

import pytest
from recbole.data import create_dataset

import recbole_ilora  # noqa: F401 - RecBole compatibility fixes
from recbole_ilora.config import Config
from recbole_ilora.data import DatasetError, check_atomic_files, check_dataset, item_titles
from recbole_ilora.quick_start import run_recbole_ilora

INTER_HEADER = ["user_id:token", "item_id:token", "rating:float", "timestamp:float"]
ITEM_HEADER = ["item_id:token", "title:token", "year:token"]
TITLES = ["Toy Story", "Heat", "Casino", "Se7en"]


def inter_rows():
    return [[u, i, 4, 10 * t] for u in range(1, 5) for t, i in enumerate(range(1, 5))]


def item_rows():
    return [[i, title, 1995] for i, title in enumerate(TITLES, start=1)]


def table(header, rows, sep="\t") -> str:
    return sep.join(header) + "\n" + "".join(sep.join(map(str, row)) + "\n" for row in rows)


def write(root: Path, inter=None, item=None, name="tiny", **extra) -> Path:
    """Write ``name``.inter/.item (text, or bytes written as they are); ``extra``: other suffixes."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    files = {"inter": table(INTER_HEADER, inter_rows()) if inter is None else inter,
             "item": table(ITEM_HEADER, item_rows()) if item is None else item, **extra}
    for suffix, content in files.items():
        path = folder / f"{name}.{suffix}"
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return root


def config(root: Path, name="tiny", model="SASRec", **settings) -> Config:
    defaults = {
        "data_path": str(root),
        "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"], "item": ["item_id", "title", "year"]},
        "item_text_field": "title",
        "item_year_field": "year",
        "show_progress": False,
        "state": "WARNING",
    }
    return Config(model=model, dataset=name, config_dict={**defaults, **settings})


def refusal(root: Path, **settings) -> str:
    with pytest.raises(DatasetError) as error:
        check_atomic_files(config(root, **settings))
    return str(error.value)


def edited(rows, index, column, value):
    rows[index][column] = value
    return rows


# (case, inter text, item text, settings, expected message): inter row k is on line k + 2.
CASES = [
    ("header field without type", table(["user_id"] + INTER_HEADER[1:], inter_rows()), None, {},
     r"tiny\.inter: header field 'user_id' has no name:type form\..*type one of token, token_seq, float"),
    ("unknown header type", table(INTER_HEADER[:3] + ["timestamp:int"], inter_rows()), None, {},
     r"tiny\.inter: header field 'timestamp:int' has unknown type 'int'"),
    ("comma-separated file, tab expected", table(INTER_HEADER, inter_rows(), sep=","), None, {},
     r"tiny\.inter: the header is one field when split at field_separator '\\t', but splits into fields at ','"
     r".*field_separator: ','"),
    ("header field twice", None, table(ITEM_HEADER + ["title:token"], [r + ["x"] for r in item_rows()]), {},
     r"tiny\.item: header field 'title' appears twice"),
    ("byte-order mark", "\ufeff" + table(INTER_HEADER, inter_rows()), None, {},
     r"tiny\.inter: the header starts with a byte-order mark.*utf-8-sig"),
    ("empty file", None, "", {}, r"tiny\.item: the file is empty"),
    ("header-only .inter: zero interactions", table(INTER_HEADER, []), None, {},
     r"tiny\.inter: the file has a header but no rows"),
    ("header-only .item: zero items", None, table(ITEM_HEADER, []), {},
     r"tiny\.item: the file has a header but no rows"),
    ("row with a field missing", table(INTER_HEADER, inter_rows()[:3] + [inter_rows()[3][:3]] + inter_rows()[4:]),
     None, {}, r"tiny\.inter: 1 row with 3 fields instead of the header's 4 \(line 5\)"),
    ("every row one field too many (pandas would shift columns)",
     table(INTER_HEADER, [row + [0] for row in inter_rows()]), None, {},
     r"tiny\.inter: 16 rows with 5 fields instead of the header's 4 \(line 2, 3, 4, 5, 6, \.\.\.\)"),
    ("unquoted tab inside a title", None, table(ITEM_HEADER, edited(item_rows(), 1, 1, "He\tat")), {},
     r"tiny\.item: 1 row with 4 fields instead of the header's 3 \(line 3\)"),
    ("unclosed double quote", None, table(ITEM_HEADER, edited(item_rows(), 2, 1, '"Casino')), {},
     r"tiny\.item: the row starting at line 4 cannot be read \(unexpected end of data\)"),
    ("quote closed mid-value", None, table(ITEM_HEADER, edited(item_rows(), 0, 1, '"Toy" Story')), {},
     r"tiny\.item: the row starting at line 2 cannot be read"),
    ("latin-1 byte in a title", None, table(ITEM_HEADER, edited(item_rows(), 1, 1, "Caf\xe9")).encode("latin-1"), {},
     r"tiny\.item, field 'title': 1 line not in utf-8 \(line 3\).*0xe9.*iconv"),
    ("empty title with a year (was prompted as '(1995)')", None,
     table(ITEM_HEADER, edited(item_rows(), 1, 1, "")), {},
     r"tiny\.item, field 'title': 1 row without a value \(line 3\): every item needs a title"),
    ("blank token_seq title", None, table(["item_id:token", "title:token_seq", "year:token"],
                                          edited(edited(item_rows(), 0, 1, "  "), 3, 1, "")), {},
     r"tiny\.item, field 'title': 2 rows without a value \(line 2, 5\): every item needs a title"),
    ("title field missing from .item", None, table(["item_id:token", "name:token", "year:token"], item_rows()), {},
     r"tiny\.item: load_col\['item'\] lists \['title'\], which the header does not have"),
    ("missing timestamps", table(INTER_HEADER, edited(edited(edited(inter_rows(), 1, 3, ""), 6, 3, ""), 10, 3, "")),
     None, {}, r"tiny\.inter, field 'timestamp': 3 rows without a value \(line 3, 8, 12\): RecBole would fill them "
     r"with the column mean"),
    ("rating written as NaN", table(INTER_HEADER, edited(inter_rows(), 4, 2, "NaN")), None, {},
     r"tiny\.inter, field 'rating': 1 row without a value \(line 6\): RecBole would fill them with the column mean"),
    ("missing item id in .inter", table(INTER_HEADER, edited(inter_rows(), 0, 1, "")), None, {},
     r"tiny\.inter, field 'item_id': 1 row without a value \(line 2\): RecBole would drop those rows"),
    ("non-numeric timestamp", table(INTER_HEADER, edited(inter_rows(), 2, 3, "yesterday")), None, {},
     r"tiny\.inter, field 'timestamp': 1 row without a number \(e\.g\. 'yesterday'\) \(line 4\)"),
    ("infinite rating", table(INTER_HEADER, edited(inter_rows(), 7, 2, "inf")), None, {},
     r"tiny\.inter, field 'rating': 1 row without a finite number \(e\.g\. 'inf'\) \(line 9\)"),
    ("interactions of items absent from .item", table(INTER_HEADER, edited(edited(inter_rows(), 3, 1, 9), 7, 1, 9)),
     None, {},
     r"tiny\.inter, field 'item_id': 2 rows naming 1 item absent from .*tiny\.item \(item 9\) \(line 5, 9\): "
     r"RecBole would drop them silently\. .*drop_interactions_of_unknown_items: true"),
    ("item id on two rows of .item", None, table(ITEM_HEADER, item_rows() + [[2, "Heat (again)", 1995]]), {},
     r"tiny\.item, field 'item_id': 1 item id on more than one row \(line 3, 6\): RecBole would keep the first"),
    ("item id with trailing whitespace", table(INTER_HEADER, edited(inter_rows(), 5, 1, "2 ")), None, {},
     r"tiny\.inter, field 'item_id': 1 id with leading or trailing whitespace \(line 7\): RecBole would read '2 ' "
     r"and '2' as two different ids"),
    (".item without item_id column", None, table(["id:token", "title:token", "year:token"], item_rows()),
     {"load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"], "item": ["title", "year"]}},
     r"tiny\.item: no 'item_id' column is loaded"),
    ("everything filtered away by user_inter_num_interval", None, None, {"user_inter_num_interval": "[10,inf)"},
     r"tiny\.inter: RecBole's filters .*'user_inter_num_interval': '\[10,inf\)'.* would leave no interactions "
     r"\(of 16 interactions\)"),
    ("interactions of users absent from a loaded .user", None, None,
     {"load_col": {"inter": ["user_id", "item_id"], "item": ["item_id", "title"], "user": ["user_id", "age"]}},
     r"tiny\.inter, field 'user_id': 4 rows naming 1 user absent from .*tiny\.user \(user 4\)"),
]


@pytest.mark.parametrize("case, inter, item, settings, expected", CASES, ids=[case[0] for case in CASES])
def test_bad_raw_file_is_refused(tmp_path, case, inter, item, settings, expected):
    users = table(["user_id:token", "age:token"], [[1, 20], [2, 30], [3, 40]])  # user 4 is missing
    message = refusal(write(tmp_path, inter, item, user=users), **settings)
    assert message.startswith("Dataset 'tiny': ")
    assert re.search(expected, message), message


def test_good_files_pass_and_load(tmp_path):
    root = write(tmp_path)
    check_atomic_files(config(root))
    dataset = create_dataset(config(root))
    assert dataset.inter_num == 16
    assert item_titles(dataset, config(root))[dataset.token2id("item_id", "2")] == "Heat (1995)"


def test_accepted_on_purpose(tmp_path):
    """Re-interactions (even same timestamp), negative ratings, quoted titles and long histories are data."""
    rows = inter_rows() + [[1, 2, -1, 10]] + [[4, 1 + t % 4, 3, 100 + t] for t in range(30)]
    item = table(ITEM_HEADER, edited(item_rows(), 1, 1, '"Heat\tLA, ""Take"" 2"'))
    root = write(tmp_path, table(INTER_HEADER, rows), item)
    check_atomic_files(config(root, MAX_ITEM_LIST_LENGTH=10))
    dataset = create_dataset(config(root, MAX_ITEM_LIST_LENGTH=10))
    assert dataset.inter_num == len(rows)
    assert item_titles(dataset, config(root))[dataset.token2id("item_id", "2")] == 'Heat LA, "Take" 2 (1995)'


def test_windows_line_ends_blank_lines_and_no_final_newline_are_read_as_recbole_reads_them(tmp_path):
    inter = table(INTER_HEADER, inter_rows()).replace("\n", "\r\n").rstrip("\r\n")
    root = write(tmp_path, inter, table(ITEM_HEADER, item_rows()).replace("\n", "\r\n") + "\r\n   \n")
    check_atomic_files(config(root))
    assert create_dataset(config(root)).inter_num == 16


def test_empty_title_with_year_is_not_prompted_as_the_year(tmp_path):
    # Straight through RecBole (no raw check): item_titles itself must not return "(1995)".
    root = write(tmp_path, item=table(ITEM_HEADER, edited(item_rows(), 1, 1, "")))
    with pytest.raises(DatasetError, match=r"1 of 4 items have an empty 'title' in .*tiny\.item.*item_id 2"):
        item_titles(create_dataset(config(root)), config(root))


def test_opted_in_drop_is_logged_with_its_count(tmp_path, caplog):
    root = write(tmp_path, table(INTER_HEADER, inter_rows() + [[1, 9, 4, 50], [2, 9, 4, 50]]))
    settings = {"drop_interactions_of_unknown_items": True}
    with caplog.at_level(logging.WARNING):
        check_atomic_files(config(root, **settings))
    assert "RecBole drops 2 of 18 interactions of" in caplog.text and "1 item absent from" in caplog.text
    assert create_dataset(config(root, **settings)).inter_num == 16
    with pytest.raises(DatasetError, match=r"drop_interactions_of_unknown_items is set, but RecBole drops rows only"):
        check_atomic_files(config(root, filter_inter_by_user_or_item=False, **settings))


def test_partial_filtering_is_logged_with_what_recbole_keeps(tmp_path, caplog):
    # User 3 has 2 interactions, item 5 one: both go, and items 1 and 2 lose user 3's interactions.
    rows = [row for row in inter_rows() if not (row[0] == 3 and row[1] > 2)] + [[1, 5, 4, 50]]
    root = write(tmp_path, table(INTER_HEADER, rows), table(ITEM_HEADER, item_rows() + [[5, "Fargo", 1996]]))
    settings = {"user_inter_num_interval": "[3,inf)", "item_inter_num_interval": "[3,inf)"}
    with caplog.at_level(logging.INFO):
        check_atomic_files(config(root, **settings))
    dataset = create_dataset(config(root, **settings))
    assert dataset.inter_num == 12  # users 1, 2, 4 x items 1-4
    assert f"keep {dataset.inter_num} of 15 interactions" in caplog.text
    assert "(3 of 4 users, 4 of 5 items)" in caplog.text


def test_max_history_above_max_item_list_length(tmp_path):
    message = refusal(write(tmp_path), model="iLoRA", max_history=20, MAX_ITEM_LIST_LENGTH=10)
    assert "max_history=20 exceeds MAX_ITEM_LIST_LENGTH=10" in message and "Lower max_history to 10" in message


# ------------------------------------------------------------------------------ the candidate pool
def write_pool(root: Path, num_items: int, seen_by_user_1: int, name="pool") -> Path:
    """5 users with 3 distinct items each, user 1 with ``seen_by_user_1``."""
    rows = [[u, 1 + (u * 3 + t) % num_items, 4, t] for u in range(2, 6) for t in range(3)]
    rows += [[1, 1 + t, 4, t] for t in range(seen_by_user_1)]
    items = [[i, f"Item {i}", 2000] for i in range(1, num_items + 1)]
    return write(root, table(INTER_HEADER, rows), table(ITEM_HEADER, items), name=name)


def pool_refusal(root: Path, **settings) -> str:
    cfg = config(root, name="pool", **settings)
    check_atomic_files(cfg)
    with pytest.raises(DatasetError) as error:
        check_dataset(create_dataset(cfg), cfg)
    return str(error.value)


def test_topk_above_the_number_of_items(tmp_path):
    message = pool_refusal(write_pool(tmp_path, 8, 3), eval_args={"mode": "full"})
    assert "topk=[1, 5, 10] asks for the top 10 of the 8 items" in message and "pool.inter" in message
    assert "Lower topk to at most 8" in message


def test_uni19_needs_19_unseen_items_per_user(tmp_path):
    message = pool_refusal(write_pool(tmp_path, 24, 10))
    assert "eval_args mode valid: uni19 needs 19 items each user never interacted with, but 1 of 5 users" in message
    assert "user 1: 14" in message and "Lower the mode to uni14 or less" in message and "pool.inter" in message


def test_topk_beyond_the_uniN_candidates(tmp_path):
    message = pool_refusal(write_pool(tmp_path, 24, 10), eval_args={"mode": "uni5"})
    assert "ranks 6 candidates, fewer than the top 10 asked for" in message
    assert "Lower topk to at most 6" in message


def test_num_candidates_needs_enough_negatives(tmp_path):
    message = pool_refusal(write_pool(tmp_path, 24, 10), model="iLoRA", eval_args={"mode": "full"}, num_candidates=20)
    assert "num_candidates=20 needs 19 negatives per training prompt" in message and "max_history=10" in message
    assert "1 of 5 users" in message and "user 1: 14" in message and "Lower num_candidates to at most 15" in message
    cfg = config(tmp_path, name="pool", model="iLoRA", eval_args={"mode": "full"}, num_candidates=15)
    check_dataset(create_dataset(cfg), cfg)  # the suggested value works


def test_quick_start_refuses_before_training(tmp_path):
    """An 8-item dataset used to train a whole epoch, then fail in torch.topk ('selected index k out of range')."""
    settings = {"data_path": str(write_pool(tmp_path, 8, 3)), "epochs": 1, "show_progress": False, "state": "WARNING",
                "load_col": {"inter": ["user_id", "item_id", "timestamp"]}, "checkpoint_dir": str(tmp_path / "saved")}
    with pytest.raises(DatasetError, match="Lower topk to at most 8"):
        run_recbole_ilora(model="SASRec", dataset="pool", config_dict=settings)
    assert not (tmp_path / "saved").exists() or not any((tmp_path / "saved").iterdir())
    root = write(tmp_path / "gappy", table(INTER_HEADER, edited(inter_rows(), 1, 3, "")))
    settings.update(data_path=str(root))
    with pytest.raises(DatasetError, match=r"field 'timestamp': 1 row without a value \(line 3\)"):
        run_recbole_ilora(model="SASRec", dataset="tiny", config_dict=settings)


def test_bundled_ml100k_passes_every_check():
    for model in ("SASRec", "iLoRA"):
        cfg = Config(model=model, dataset="ml-100k", config_dict={"show_progress": False, "state": "WARNING"})
        check_atomic_files(cfg)
        check_dataset(create_dataset(cfg), cfg)
