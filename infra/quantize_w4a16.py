"""Write a 4-bit weight-only (W4A16) copy of a Hugging Face causal LM in the compressed-tensors format, which vLLM
loads on CPU (its ``cpu_gemm_wna16`` kernel, with LoRA on top) and on GPUs (Marlin), detecting the format from
``config.json``.

Runs in the vLLM environment, where ``compressed-tensors`` is pinned by vLLM itself (started by
``infra.vllm_server.quantize_w4a16``):

    .venv-vllm/bin/python infra/quantize_w4a16.py MODEL_DIR OUT_DIR --group-size 64

Round-to-nearest, symmetric int4, one scale per group of ``group-size`` input weights (the ``W4A16`` preset);
``lm_head`` stays in full precision. No calibration data: GPTQ-style error correction (llm-compressor) would do
better, and is the tool for a real model on a GPU machine. Every linear layer's input size must be a multiple
of the group size (vLLM's CPU kernel also needs input and output sizes that are multiples of 32).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def quantize(src: Path, dst: Path, group_size: int) -> int:
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme
    from compressed_tensors.quantization.utils.helpers import calculate_qparams
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    scheme = preset_name_to_scheme("W4A16", ["Linear"])
    scheme.weights.group_size = group_size
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    count = 0
    for name, module in model.named_modules():
        args = getattr(module, "quantization_scheme", None)
        if args is None:
            continue
        weight = module.weight.data
        if weight.shape[1] % group_size:
            raise SystemExit(f"{name}: input size {weight.shape[1]} is not a multiple of the group size {group_size}")
        groups = weight.reshape(weight.shape[0], -1, group_size)
        scale, zero_point = calculate_qparams(groups.amin(-1), groups.amax(-1), args.weights)
        module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data.copy_(zero_point.reshape(module.weight_zero_point.shape))
        count += 1
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(dst)
    compressor.update_config(dst)
    for path in src.iterdir():
        if path.name.startswith("tokenizer") or path.name in ("chat_template.jinja", "generation_config.json"):
            shutil.copy(path, dst / path.name)
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--group-size", type=int, default=64)
    args = parser.parse_args()
    count = quantize(args.src, args.dst, args.group_size)
    method = json.loads((args.dst / "config.json").read_text())["quantization_config"]["quant_method"]
    print(json.dumps({"quantized_layers": count, "quant_method": method, "out": str(args.dst)}))


if __name__ == "__main__":
    main()
