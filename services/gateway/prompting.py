"""Prompt templates in the gateway: every template, compiled, refreshed with the keys (within
a second of a change), and rendered into a chat request that names one (appliance/prompts.py)."""

from __future__ import annotations

import random

import msgspec

from appliance import prompts
from appliance.errors import InvalidRequest, invalid_value


class PromptTemplates:
    def __init__(self):
        self.by_name: dict[str, prompts.Template] = {}
        self._stamp: tuple | None = None
        self._rng = random.Random()

    def refresh(self, db) -> None:
        """Reload the templates when one changed (blocking: called on the refresh thread)."""
        stamp = prompts.stamp(db)
        if stamp != self._stamp:
            self.by_name, self._stamp = prompts.load_all(db), stamp

    def apply(self, body: bytes) -> tuple[bytes, str | None]:
        """The request with its `template` rendered into its messages, and "name:version";
        as it was, and None, when it names none."""
        try:
            data = msgspec.json.decode(body)
        except msgspec.DecodeError:
            return body, None  # the schema's decoding says what is wrong with it
        if not isinstance(data, dict) or "template" not in data:
            return body, None
        try:
            use = msgspec.convert(data.pop("template"), prompts.Use)
        except msgspec.ValidationError as exc:
            raise invalid_value(exc, "template") from None
        template = self.by_name.get(use.name)
        if template is None:
            raise InvalidRequest(f"no prompt template named {use.name!r}", param="template.name")
        version = template.choose(use.version, self._rng)
        parts = template.render(version, use.variables)
        messages = data.get("messages")
        messages = list(messages) if isinstance(messages, list) else []
        if "system" in parts:
            messages.insert(0, {"role": "system", "content": parts["system"]})
        if "user" in parts:
            messages.append({"role": "user", "content": parts["user"]})
        data["messages"] = messages
        return msgspec.json.encode(data), f"{use.name}:{version}"
