"""Chat templates: a list of chat messages -> one prompt string, and the stops that end a reply.

Two templates:

- "chatml", Ouro's chat format: each message is `<|im_start|>{role}\\n{content}<|im_end|>\\n` and
  the prompt ends with `<|im_start|>assistant\\n`; a reply ends at the `<|im_end|>` token. It is
  chosen for checkpoints whose tokenizer has both tokens and whose tokenizer_config.json declares
  a chat template written with them (Ouro's chat checkpoints ship one).
- "plain", for everything else, the bundled default model in particular: it has `<|im_start|>`
  and `<|im_end|>` in its vocabulary (ids 1 and 2, reserved as in Ouro) but was trained only on
  Python sources and docs, Austen and synthetic tasks (its MODEL_CARD.md), never on chat, so a
  plain-text layout suits it better:

      System: {content}

      User: {content}

      Assistant: {content}

      Assistant:

  One `{Role}: {content}` block per message, separated by a blank line, then `Assistant:` with
  no trailing space (the model's tokenizer splits words with their leading space). A reply ends
  where the model starts the next turn ("\\nUser:" or "\\nSystem:") or at the end-of-text token.

`python -m looplm serve --chat-template chatml|plain` overrides the choice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
TEMPLATES = ("auto", "chatml", "plain")
_PLAIN_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}


@dataclass
class ChatTemplate:
    """How messages become a prompt for one checkpoint."""

    name: str  # "chatml" or "plain"
    stop: list[int | str] = field(default_factory=list)  # stops added to the request's own

    def render(self, messages: list[tuple[str, str]]) -> str:
        """[(role, content), ...] -> the prompt text, ending where the assistant's reply starts."""
        if self.name == "chatml":
            turns = "".join(f"{IM_START}{role}\n{content}{IM_END}\n" for role, content in messages)
            return f"{turns}{IM_START}assistant\n"
        turns = "".join(f"{_PLAIN_ROLES[role]}: {content}\n\n" for role, content in messages)
        return f"{turns}Assistant:"


def _declares_chatml(path: Path | None) -> bool:
    file = None if path is None else Path(path) / "tokenizer_config.json"
    if file is None or not file.is_file():
        return False
    try:
        template = json.loads(file.read_text()).get("chat_template")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(template, str) and IM_START in template and IM_END in template


def template_for(engine, name: str = "auto") -> ChatTemplate:
    """The chat template of `engine`'s checkpoint (see the module docstring); `name` forces one.

    Raises:
        ValueError: for an unknown name, or "chatml" with a tokenizer that lacks its tokens.
    """
    if name not in TEMPLATES:
        raise ValueError(f"chat template must be one of {TEMPLATES}, got {name!r}")
    tok = engine.tokenizer
    ids = (None, None) if tok is None else (tok.token_to_id(IM_START), tok.token_to_id(IM_END))
    has_tokens = None not in ids
    if name == "chatml" and not has_tokens:
        raise ValueError(f"chat template 'chatml' needs {IM_START} and {IM_END} in the tokenizer")
    eos = engine.default_stop_ids()
    if name == "chatml" or (name == "auto" and has_tokens and _declares_chatml(engine.path)):
        return ChatTemplate("chatml", [ids[1], *eos])
    return ChatTemplate("plain", ["\nUser:", "\nSystem:", *eos])
