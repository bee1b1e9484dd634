"""``--key=value`` settings after a command line's own options, typed by RecBole's rules (``--epochs=3`` is an
int, ``--topk="[1,5]"`` a list): shared by ``run_recbole_ilora.py`` and ``python -m recbole_ilora.analysis``.
"""

from __future__ import annotations

import argparse
from typing import Sequence


class OverrideError(ValueError):
    pass


def parse_overrides(extra: Sequence[str]) -> dict:
    """Turn ``["--epochs=3", "--learning_rate=1e-3"]`` into a dict of RecBole-typed values."""
    overrides: dict = {}
    for arg in extra:
        if not arg.startswith("--") or "=" not in arg:
            raise OverrideError(
                f"Cannot read the argument {arg!r}: RecBole settings are given as --key=value "
                f"(for example --epochs=3). See run_recbole_ilora.py --help."
            )
        key, value = arg[2:].split("=", 1)
        if key in overrides and overrides[key] != value:
            raise OverrideError(f"--{key} is given twice with different values.")
        overrides[key] = value
    return _convert_values(overrides)


def _convert_values(overrides: dict) -> dict:
    # RecBole's own conversion (eval of literals, true/false), without building a Config.
    from recbole.config import Config as RecBoleConfig

    return RecBoleConfig._convert_config_dict(None, dict(overrides))


def parse_with_overrides(parser: argparse.ArgumentParser, argv: Sequence[str] | None):
    """``(args, overrides)``: the parser's own options, and every other ``--key=value`` as typed settings."""
    args, extra = parser.parse_known_args(argv)
    try:
        return args, parse_overrides(extra)
    except OverrideError as error:
        parser.error(str(error))
