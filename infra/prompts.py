"""The seed's instruction template, in one place: the base model's corpus, preprocessing and serving use it."""

from __future__ import annotations


def alpaca_prompt(instruction: str, context: str | None = None) -> str:
    """``### Instruction:`` (+ ``### Input:``) + ``### Response:`` header; the response follows it."""
    if context:
        return f"### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


# The same format as a chat template (Jinja, as transformers and vLLM apply it), so OpenAI-style chat requests
# reach a model in the prompt it was trained on: BOS, an optional system text, then each user turn as an
# ``### Instruction:`` block with its ``### Response:`` header and each assistant turn as the response + EOS.
ALPACA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}### Instruction:\n{{ message['content'] }}\n\n### Response:\n"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}\n\n"
    "{% endif %}"
    "{% endfor %}"
)
