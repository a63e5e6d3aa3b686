"""A tokenizer's thinking markers: the `</think>` id the decoder watches for, and opening `<think>`
in a prompt whose chat template did not (docs/soft_thinking.md 4.1-4.2)."""

from __future__ import annotations

from codi_jax.errors import InputError


def _single_token(tokenizer, text: str) -> int | None:
  """The id of `text` if it is one vocabulary entry that also encodes alone to that id."""
  tid = tokenizer.token_to_id(text)
  if tid is None or tokenizer.encode(text, add_special_tokens=False) != [tid]:
    return None
  return int(tid)


def resolve_think_end(
  tokenizer, text: str = "auto", *, last_id: bool = False, flag: str = "--think_end"
) -> int | None:
  """The `</think>` id: "auto" (the `</think>` vocabulary entry if it encodes to itself, else None),
  "" or "none" (None), or a text that must encode to one token (last_id: its last id, official rule).
  """
  if text in ("", "none"):
    return None
  if text == "auto":
    return _single_token(tokenizer, "</think>")
  ids = tokenizer.encode(text, add_special_tokens=False)
  if len(ids) == 1:
    return int(ids[0])
  if last_id and ids:
    return int(ids[-1])
  raise InputError(
    f"{flag}: {text!r} is {len(ids)} tokens for this tokenizer, not one; pass "
    f"{flag}_last_id to use its last id (official rule) or {flag}=none"
  )


def open_thinking(tokenizer, ids: list[int], think_start: str = "<think>") -> list[int]:
  """Appends `<think>\\n` unless the (templated) prompt already opened thinking (docs/soft_thinking.md 4.1).

  Only for tokenizers with a `<think>` vocabulary entry; prompts whose last 4 tokens hold it are
  kept as they are.
  """
  start = _single_token(tokenizer, think_start)
  if start is None or start in ids[-4:]:
    return list(ids)
  return list(ids) + tokenizer.encode(think_start + "\n", add_special_tokens=False)
