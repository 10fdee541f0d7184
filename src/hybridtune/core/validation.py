"""Config validation shared by method configs and run configs: strict keys, readable errors."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator


class StrictModel(BaseModel):
    """A pydantic model whose unknown keys are errors naming the closest valid key."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            valid = sorted(cls.model_fields)
            unknown = [key for key in data if key not in cls.model_fields]
            if unknown:
                raise ValueError("; ".join(unknown_key_message(str(key), valid, cls.__name__) for key in unknown))
        return data


def unknown_key_message(key: str, valid: list[str], where: str) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown key '{key}' for a {where}{hint} (valid keys: {', '.join(valid)})"


def describe_errors(exc: ValidationError, prefix: str = "") -> list[str]:
    """pydantic's errors as ``key.path: problem`` lines (no URLs, no input dumps)."""
    lines = []
    for err in exc.errors():
        where = ".".join(str(x) for x in (prefix, *err["loc"]) if x != "")
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {msg}" if where else msg)
    return lines
