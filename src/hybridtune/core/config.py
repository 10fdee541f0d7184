"""HybridConfig: several named method entries that live in one model at once."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator

from ..methods import MethodConfig, method_config
from .validation import describe_errors

_ENTRY_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class HybridConfig(BaseModel):
    """Named method entries, e.g. ``{"lora": LoRAConfig(...), "adapter": AdapterConfig(...)}``.

    Entry names namespace everything the entry owns (checkpoint keys, parameter names), so two
    entries of the same type never collide. Entries are applied in the order written.
    """

    model_config = ConfigDict(extra="forbid")

    methods: dict[str, SerializeAsAny[MethodConfig]] = Field(min_length=1)

    @field_validator("methods", mode="before")
    @classmethod
    def _build_entries(cls, value: Any) -> Any:
        return cls.build_entries(value)

    @staticmethod
    def build_entries(value: Any) -> Any:
        """Plain dicts -> registered method configs, by their ``type`` key."""
        if not isinstance(value, dict):
            return value
        built = {}
        for name, entry in value.items():
            if not isinstance(name, str) or not _ENTRY_NAME.fullmatch(name):
                raise ValueError(f"method entry name {name!r} must be an identifier (letters, digits, _)")
            try:
                built[name] = method_config(entry)
            except ValidationError as exc:
                raise ValueError(f"method entry '{name}': {'; '.join(describe_errors(exc))}") from None
            except ValueError as exc:
                raise ValueError(f"method entry '{name}': {exc}") from None
        return built

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HybridConfig:
        return cls.model_validate(data)
