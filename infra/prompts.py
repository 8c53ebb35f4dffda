"""The seed's instruction template, in one place: the base model's corpus, preprocessing and serving use it."""

from __future__ import annotations


def alpaca_prompt(instruction: str, context: str | None = None) -> str:
    """``### Instruction:`` (+ ``### Input:``) + ``### Response:`` header; the response follows it."""
    if context:
        return f"### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
    return f"### Instruction:\n{instruction}\n\n### Response:\n"
