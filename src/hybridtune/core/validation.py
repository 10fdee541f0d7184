"""Config validation shared by method configs and run configs: strict keys, readable errors."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError


class StrictModel(BaseModel):
    """A pydantic model whose unknown keys are errors naming the closest valid key."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="wrap")
    @classmethod
    def _reject_unknown_keys(cls, data: Any, handler: Any) -> Any:
        """Unknown keys are one error for the whole mapping (each with its closest valid key),
        reported together with every problem of the known keys, nested sections included."""
        if not isinstance(data, dict):
            return handler(data)
        accepted = accepted_keys(cls)
        given: dict[str, str] = {}
        for key in data:
            field = accepted.get(key)
            if field in given:
                raise ValueError(f"'{given[field]}' and '{key}' are the same option ({field}); give one of them")
            if field is not None:
                given[field] = key
        unknown = [str(key) for key in data if key not in accepted]
        if not unknown:
            return handler(data)
        problems: list[dict[str, Any]] = []
        try:
            handler({k: v for k, v in data.items() if k in accepted})
        except ValidationError as exc:
            problems = [e for e in exc.errors() if e["type"] != "missing"]  # missing: reported only if known ones fit
        message = unknown_keys_message(unknown, sorted(cls.model_fields), cls.__name__, sorted(accepted))
        details = [_detail("unknown_keys", message, (), data)]
        details += [_detail(e["type"], e["msg"], e["loc"], e["input"]) for e in problems]
        raise ValidationError.from_exception_data(cls.__name__, details)


def _detail(kind: str, message: str, loc: tuple, value: Any) -> InitErrorDetails:
    """An error to raise again as it was reported (its message kept verbatim, braces included)."""
    return InitErrorDetails(type=PydanticCustomError(kind, "{message}", {"message": message}), loc=loc, input=value)


def accepted_keys(model: type[BaseModel]) -> dict[str, str]:
    """Every key a model takes -> its field: the field names and their aliases (peft's and
    LLaMA-Factory's names for the same option, declared with ``AliasChoices``)."""
    keys = {}
    for name, field in model.model_fields.items():
        keys[name] = name
        if isinstance(field.validation_alias, AliasChoices):
            keys.update({choice: name for choice in field.validation_alias.choices if isinstance(choice, str)})
    return keys


def unknown_keys_message(keys: list[str], valid: list[str], where: str, candidates: list[str]) -> str:
    """One line for every unknown key of a mapping: each with its closest valid key, the valid keys once."""
    if len(keys) == 1:
        return unknown_key_message(keys[0], valid, where, candidates)
    named = []
    for key in keys:
        close = difflib.get_close_matches(key, candidates, n=1)
        named.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    return f"unknown keys for a {where}: {', '.join(named)}; valid keys: {', '.join(valid)}"


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
