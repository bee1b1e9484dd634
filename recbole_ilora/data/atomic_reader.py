"""Read one atomic file the way RecBole 1.2.1's ``Dataset._load_feat`` does, refusing what it cannot read.

RecBole splits the header at ``field_separator`` into ``name:type`` fields, keeps the fields of
``load_col``/``unload_col``, and reads the rows with pandas (default quoting and missing-value
strings, floats as float64, everything else as str) in ``encoding``. :func:`read_atomic_file` does
the same, vectorised, and first refuses -- naming file, field, count and lines -- a file that is
empty, not text in ``encoding``, has a malformed header, lacks a ``load_col`` field, or has rows
with another number of fields than its header (pandas pads short rows with blanks and, when every
row has one field too many, silently turns the first column into the index).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from recbole_ilora.data.item_text import DatasetError

__all__ = ["AtomicFile", "read_atomic_file", "setting"]

_TYPES = ("token", "token_seq", "float", "float_seq")
_OTHER_SEPARATORS = (",", ";", "|", "\t", " ")
SHOWN = 5  # line numbers quoted per problem


def setting(config, key, default=None):
    """``config[key]``, or ``default`` when unset: RecBole's Config and plain dicts (tests, scripts) alike."""
    value = config[key] if key in config else None
    return default if value is None else value


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def lines_text(lines) -> str:
    lines = np.asarray(lines)
    return ", ".join(str(int(n)) for n in lines[:SHOWN]) + (", ..." if len(lines) > SHOWN else "")


def file_error(dataset, path, problem, fix) -> DatasetError:
    return DatasetError(f"Dataset '{dataset}': {path}: {problem}. {fix}.")


@dataclass
class AtomicFile:
    """One atomic file as RecBole will load it."""

    dataset: str
    path: Path
    source: str  # inter, item, user or an additional_feat_suffix
    types: dict  # every header field -> its type
    frame: pd.DataFrame  # the loaded fields, named by field: float as float64, others as str; NaN = missing
    lines: np.ndarray  # 1-based line number of each row of frame

    def refuse(self, field, count, noun, problem, lines, why, fix) -> DatasetError:
        """The error for ``count`` bad ``noun``s of ``field`` at ``lines``: what is wrong, why it matters, the fix."""
        return DatasetError(
            f"Dataset '{self.dataset}': {self.path}, field '{field}': {plural(count, noun)} {problem} (line "
            f"{lines_text(lines)}): {why}. {fix}."
        )


def _decode(dataset, path: Path, raw: bytes, separator: str, encoding: str) -> str:
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as error:
        lines = pd.Series(raw.decode(encoding, errors="replace").split("\n"))
        bad = np.flatnonzero(lines.str.contains("\ufffd", regex=False).to_numpy())
        header, first = lines.iloc[0].rstrip("\r").split(separator), lines.iloc[bad[0]]
        column = first[: first.index("\ufffd")].count(separator)
        field = header[column].partition(":")[0] if bad[0] > 0 and column < len(header) else "(header)"
        raise DatasetError(
            f"Dataset '{dataset}': {path}, field '{field}': {plural(len(bad), 'line')} not in {encoding} (line "
            f"{lines_text(bad + 1)}): byte {raw[error.start]:#x} is the first that RecBole cannot read. Re-encode "
            f"the file (e.g. iconv -f latin1 -t utf-8), or set encoding: <its codec> in the config."
        ) from None


def _parse_header(dataset, path: Path, text: str, separator: str) -> dict:
    if not text.strip():
        raise file_error(dataset, path, "the file is empty", "Write a header line of name:type fields (e.g. "
                         "user_id:token, item_id:token, timestamp:float), then one row per record")
    header = text.split("\n", 1)[0].rstrip("\r")
    entries = header.split(separator)
    for other in _OTHER_SEPARATORS if len(entries) == 1 else ():
        parts = header.split(other)
        if other != separator and len(parts) > 1 and all(":" in part for part in parts):
            raise file_error(dataset, path, f"the header is one field when split at field_separator {separator!r}, "
                             f"but splits into fields at {other!r}", f"Write the file with {separator!r} between "
                             f"fields, or set field_separator: {other!r} in the config")
    if entries[0].startswith("\ufeff"):
        raise file_error(dataset, path, "the header starts with a byte-order mark, which RecBole would read as "
                         "part of the first field name", "Save the file without BOM, or set encoding: utf-8-sig")
    types = {}
    for entry in entries:
        name, colon, ftype = entry.partition(":")
        if not (name and colon and ftype in _TYPES):
            problem = f"unknown type {ftype!r}" if name and colon and ":" not in ftype else "no name:type form"
            raise file_error(dataset, path, f"header field {entry!r} has {problem}", f"Write every header field "
                             f"as name:type with type one of {', '.join(_TYPES)} (e.g. item_id:token)")
        if name in types:
            raise file_error(dataset, path, f"header field '{name}' appears twice", "Keep one column per field")
        types[name] = ftype
    return types


def _loaded_fields(config, source: str, types: dict, path: Path, dataset: str) -> list[str]:
    """The fields RecBole's ``_get_load_and_unload_col`` keeps; a ``load_col`` field the file lacks is refused."""
    load_col, unload_col = setting(config, "load_col"), setting(config, "unload_col", {})
    if load_col is None or load_col.get(source) == "*":
        wanted = set(types)
    elif source not in load_col:
        return []
    else:
        wanted = set(load_col[source])
        absent = [field for field in load_col[source] if field not in types]
        if absent:  # RecBole would ignore them: the run would go on without, e.g., the titles
            raise file_error(dataset, path, f"load_col['{source}'] lists {absent}, which the header does not have "
                             f"(it has {list(types)})", "Add the column to the file or remove it from "
                             f"load_col['{source}']")
    wanted -= set(unload_col.get(source) or [])
    return [field for field in types if field in wanted]


def _row_layout(dataset, path: Path, raw: bytes, text: str, separator: str, encoding: str) -> tuple:
    """Number of fields of every non-blank data row and its 1-based line, split as pandas splits them."""
    sep_bytes = separator.encode(encoding)
    if '"' not in text and len(separator) == 1 and len(sep_bytes) == 1 and "\n".encode(encoding) == b"\n":
        data = np.frombuffer(raw, dtype=np.uint8)
        newlines = np.flatnonzero(data == 10)
        starts, ends = np.r_[0, newlines + 1], np.r_[newlines, len(data)]
        if starts[-1] == len(data):  # nothing after the final newline
            starts, ends = starts[:-1], ends[:-1]
        separators = np.flatnonzero(data == sep_bytes[0])
        fields = np.searchsorted(separators, ends) - np.searchsorted(separators, starts) + 1
        # pandas skips lines that are empty or hold only spaces ("\r" of "\r\n" included)
        written = np.logical_or.reduceat((data != 32) & (data != 13) & (data != 10), starts) & (ends > starts)
        rows = np.flatnonzero(written)
        rows = rows[rows > 0]  # line 1 is the header
        return fields[rows], rows + 1
    if len(separator) == 1:  # quoted values may hold separators and newlines: the csv module decides
        # strict, as in pandas' python engine (RecBole's): a malformed quote is an error, not a guess
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=separator, strict=True)
        next(reader)
        layout, last = [], reader.line_num
        try:
            for row in reader:  # only files with quotes come here (the converted item files: a few thousand rows)
                if len(row) > 1 or (row and row[0].strip()):
                    layout.append((len(row), last + 1))
                last = reader.line_num
        except csv.Error as error:
            raise file_error(dataset, path, f"the row starting at line {last + 1} cannot be read ({error}): a "
                             "double quote opens a value that is not closed or closed mid-value", "Close the quote, "
                             "double a quote inside a quoted value (\"\"), or quote the whole value") from None
        layout = np.asarray(layout, dtype=np.int64).reshape(-1, 2)
        return layout[:, 0], layout[:, 1]
    lines = pd.Series(text.split("\n")[1:])  # pandas reads a longer separator as a regular expression
    written = (lines.str.strip() != "").to_numpy()
    return (lines[written].str.count(separator) + 1).to_numpy(), np.flatnonzero(written) + 2


def _read_frame(text: str, separator: str, types: dict, loaded: list, float_dtype) -> pd.DataFrame:
    columns = {f"{field}:{types[field]}": float_dtype if types[field] == "float" else str for field in loaded}
    frame = pd.read_csv(io.StringIO(text), sep=separator, usecols=list(columns), dtype=columns,
                        engine="c" if len(separator) == 1 else "python")
    frame.columns = [column.partition(":")[0] for column in frame.columns]
    return frame[loaded]


def read_atomic_file(path: Path, source: str, config) -> AtomicFile | None:
    """``path`` as RecBole's ``Dataset._load_feat`` reads it, or None if RecBole loads no field of it."""
    dataset = config["dataset"]
    separator, encoding = setting(config, "field_separator", "\t"), setting(config, "encoding", "utf-8")
    raw = path.read_bytes()
    text = _decode(dataset, path, raw, separator, encoding)
    types = _parse_header(dataset, path, text, separator)
    loaded = _loaded_fields(config, source, types, path, dataset)
    if not loaded:
        return None
    fields, lines = _row_layout(dataset, path, raw, text, separator, encoding)
    ragged = fields != len(types)
    if ragged.any():
        found = " or ".join(map(str, np.unique(fields[ragged])[:3]))
        raise file_error(
            dataset, path, f"{plural(int(ragged.sum()), 'row')} with {found} fields instead of the header's "
            f"{len(types)} (line {lines_text(lines[ragged])}); pandas would pad or shift their values",
            f"Give every row {len(types)} values separated by {separator!r} (an empty cell for a missing value; "
            f"a value containing {separator!r} in double quotes)",
        )
    if len(lines) == 0:
        raise file_error(dataset, path, "the file has a header but no rows", "Add its records" + (
            ", or remove the file (or its entry in load_col)" if source != "inter" else ""))
    try:
        frame = _read_frame(text, separator, types, loaded, np.float64)
    except ValueError:  # a float cell that is no number: find and name it
        frame = _read_frame(text, separator, types, loaded, str)
        for field in [field for field in loaded if types[field] == "float"]:
            present = frame[field].dropna()
            bad = pd.to_numeric(present, errors="coerce").isna().to_numpy()
            if bad.any():
                raise AtomicFile(dataset, path, source, types, frame, lines).refuse(
                    field, int(bad.sum()), "row", f"without a number (e.g. {present[bad].iloc[0]!r})",
                    lines[frame.index.get_indexer(present.index[bad])], "RecBole reads this float field as float64",
                    "Write numbers there, or declare the field :token if its values are labels")
        raise
    if len(frame) != len(lines):  # pandas and the layout above must agree on the rows
        raise file_error(dataset, path, f"pandas reads {len(frame)} rows where {len(lines)} are written",
                         "Check the double quotes of the values")
    return AtomicFile(dataset, path, source, types, frame, lines)
