"""Greedy generation with transformers, batched: the in-process reference that vLLM's output is compared to."""

from __future__ import annotations

from typing import Any

from infra.prompts import alpaca_prompt


def instruction_prompt(instruction: str) -> str:
    """The seed's prompt template, without the response."""
    return alpaca_prompt(instruction)


def greedy_generate(
    model: Any, tokenizer: Any, prompts: list[str], *, max_new_tokens: int, batch_size: int = 32
) -> list[str]:
    """Greedy completions of ``prompts`` (left-padded batches); stops at EOS, returns the decoded new text."""
    import torch

    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outputs: list[str] = []
    try:
        model.eval()
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True)
            with torch.no_grad():
                generated = model.generate(
                    **batch,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                )
            new_tokens = generated[:, batch["input_ids"].shape[1] :]
            outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = previous_side
    return outputs
