"""Training throughput and model FLOPs utilisation (MFU) of a ~1B Llama in bf16 on one GPU.

    python tests/benchmarks/gpu_mfu.py [--out result.json] [--tiny]     # standalone: needs torch + transformers
    .venv/bin/python tests/benchmarks/run.py gpu_training_mfu            # as part of make bench

The model is the Llama 3.2 1B architecture (16 layers, hidden 2048, 32 query / 8 KV heads, MLP 8192, vocab
128,256, tied embeddings), randomly initialised — the numbers depend on the shapes, not on the weights. Each
variant runs the training step the fine-tune stage runs on a GPU (bf16, SDPA attention, fused AdamW, causal-LM
loss) on fixed-length batches, 3 warm-up steps then 10 timed ones:

- ``full_eager``: every weight trained, eager PyTorch;
- ``full_compiled``: the same model under ``torch.compile``;
- ``lora_eager``: base frozen, LoRA r=16 on q/k/v/o through PEFT (the stage's default adapter).

MFU = model FLOPs per second / the chip's dense bf16 peak (989 TFLOP/s for H100/H200 SXM, the datasheet figure).
Model FLOPs per token, PaLM appendix B: 6·N for a full step (N = parameters that take part in matrix products:
the input embedding lookup is not one, the tied LM head is) plus 12·layers·hidden·seq for attention. A LoRA
step computes no gradient for frozen weights, so it is charged 4·N + the attention term + 6·N_lora. The
achieved rate of one 8192³ bf16 matrix product is measured in the same run as the practical ceiling.

Only torch, transformers and (for the LoRA variant) peft are imported, so this runs on a bare GPU worker.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from typing import Any

DATASHEET_BF16_PEAK = 989e12  # H100 / H200 SXM, dense bf16
GOAL = 0.40

LLAMA_1B = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    tie_word_embeddings=True,
)
TINY = dict(
    hidden_size=128,
    intermediate_size=352,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    vocab_size=512,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)


def model_flops_per_token(n_matmul_params: int, layers: int, hidden: int, seq: int, *, lora_params: int = 0) -> float:
    """PaLM's count; ``lora_params`` > 0 means a LoRA step (no weight gradients for the frozen base)."""
    attention = 12 * layers * hidden * seq
    if lora_params:
        return 4 * n_matmul_params + attention + 6 * lora_params
    return 6 * n_matmul_params + attention


def matmul_ceiling(torch: Any, size: int = 8192) -> float:
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * size**3 / (time.perf_counter() - started)


def run_variant(torch: Any, shape: dict[str, Any], variant: str, batch: int, seq: int, device: str) -> dict[str, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, attn_implementation="sdpa", use_cache=False)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    n_matmul = sum(p.numel() for p in model.parameters()) - (
        0 if config.tie_word_embeddings else model.get_input_embeddings().weight.numel()
    )
    lora_params = 0
    if variant.startswith("lora"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=16,
                lora_alpha=32,
                lora_dropout=0.05,
                task_type="CAUSAL_LM",
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            ),
        )
        lora_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=device == "cuda")
    step_model = torch.compile(model) if variant.endswith("compiled") else model
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)

    def step() -> Any:
        loss = step_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    warm_started = time.perf_counter()
    for _ in range(3):
        step()
    sync()
    warmup_s = time.perf_counter() - warm_started
    started = time.perf_counter()
    timed = 10
    for _ in range(timed):
        loss = step()
    sync()
    elapsed = time.perf_counter() - started
    tokens_per_s = timed * batch * seq / elapsed
    flops = model_flops_per_token(n_matmul, config.num_hidden_layers, config.hidden_size, seq, lora_params=lora_params)
    result = {
        "variant": variant,
        "batch": batch,
        "seq": seq,
        "params": n_matmul,
        "lora_params": lora_params,
        "step_s": elapsed / timed,
        "warmup_s": warmup_s,
        "tokens_per_s": tokens_per_s,
        "model_tflops_per_s": tokens_per_s * flops / 1e12,
        "mfu": tokens_per_s * flops / DATASHEET_BF16_PEAK,
        "final_loss": float(loss.detach()),
    }
    if device == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 1024**3
    return result


def measure(
    *,
    tiny: bool = False,
    variants: tuple[str, ...] = ("full_eager", "full_compiled", "lora_eager"),
    batch: int = 8,
    seq: int = 2048,
) -> dict[str, Any]:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not tiny:
        return {"skipped": "no CUDA device on this machine", "goal": f">= {GOAL:.2f} MFU on H100/H200", "met": None}
    shape, batch, seq = (TINY, 2, 64) if tiny else (LLAMA_1B, batch, seq)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "goal": f">= {GOAL:.2f}",
        "variants": {},
    }
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        ceiling = matmul_ceiling(torch)
        result["matmul_ceiling_tflops"] = ceiling / 1e12
    for variant in variants:
        try:
            result["variants"][variant] = run_variant(torch, shape, variant, batch, seq, device)
        except Exception as exc:  # one variant failing (e.g. the compiler) must not hide the others
            result["variants"][variant] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        print(variant, json.dumps(result["variants"][variant]), flush=True)
        gc.collect()  # the variant's model and optimizer went out of scope: free them before the next
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    full = [v["mfu"] for name, v in result["variants"].items() if name.startswith("full") and "mfu" in v]
    result["mfu"] = max(full) if full else None
    result["met"] = bool(full) and max(full) >= GOAL and device == "cuda"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the result as JSON here")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model, to check the script on a CPU")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    args = parser.parse_args()
    result = measure(tiny=args.tiny, batch=args.batch, seq=args.seq)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
