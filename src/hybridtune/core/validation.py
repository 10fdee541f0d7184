"""Config validation shared by method configs and run configs: strict keys, readable errors."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, ValidationError, model_validator


class StrictModel(BaseModel):
    """A pydantic model whose unknown keys are errors naming the closest valid key."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            accepted = accepted_keys(cls)
            valid = sorted(cls.model_fields)
            unknown = [key for key in data if key not in accepted]
            if unknown:
                raise ValueError(
                    "; ".join(unknown_key_message(str(key), valid, cls.__name__, sorted(accepted)) for key in unknown)
                )
            given: dict[str, str] = {}
            for key in data:
                field = accepted[key]
                if field in given:
                    raise ValueError(f"'{given[field]}' and '{key}' are the same option ({field}); give one of them")
                given[field] = key
        return data


def accepted_keys(model: type[BaseModel]) -> dict[str, str]:
    """Every key a model takes -> its field: the field names and their aliases (peft's and
    LLaMA-Factory's names for the same option, declared with ``AliasChoices``)."""
    keys = {}
    for name, field in model.model_fields.items():
        keys[name] = name
        if isinstance(field.validation_alias, AliasChoices):
            keys.update({choice: name for choice in field.validation_alias.choices if isinstance(choice, str)})
    return keys


def unknown_key_message(key: str, valid: list[str], where: str, candidates: list[str] | None = None) -> str:
    """``candidates``: every key accepted (aliases too) for the closest-match hint; ``valid`` is listed."""
    close = difflib.get_close_matches(key, candidates or valid, n=1)
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
