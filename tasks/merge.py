"""Merge a LoRA adapter into its 16-bit (or fp32) base: one plain model directory another engine can serve.

    merge_adapter(base_path, adapter_dir, out_dir)     # out_dir: config.json, weights, tokenizer

Used for the serving comparison (merged weights vs runtime LoRA). A QLoRA adapter merges into a reload of the
base in 16 bits, never into the 4-bit layers.
"""

from __future__ import annotations

from pathlib import Path


def merge_adapter(base_path: str | Path, adapter_dir: Path, out_dir: Path) -> Path:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out_dir / "config.json").exists():
        return out_dir
    base = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    tmp = out_dir.with_name(out_dir.name + ".partial")
    merged.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(tmp)
    tmp.rename(out_dir)  # complete or absent
    return out_dir
