"""Calibrate ``sharding.speed.EFFICIENCY``: a bare forward's FLOP/s (counted as ``harvest plan`` counts them)
against the matmul probe ``harvest plan`` runs, side by side in one process.

    .venv/bin/python bench/plan_calibration.py                          # CPU, Pythia-160m's shape, 1 thread
    .venv/bin/python bench/plan_calibration.py --device cuda --config jobs/configs/gpt-j-6b --dtype float16 \\
        --batch 8 --seq 512                                             # on a GPU: GPT-J-6B (weights uninitialised)

Each repetition runs the probe, then two timed forwards of the base model (no LM head: the plan counts none
unless ``capture.top_k``), and prints the ratio. The weights are random (CPU) or uninitialised (CUDA): speed does
not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, GPTNeoXConfig

from sharding.speed import probe_flops

PYTHIA_160M = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                   vocab_size=50304, rotary_pct=0.25, max_position_embeddings=2048)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--config", help="a directory with config.json (default: Pythia-160m's shape)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    config = AutoConfig.from_pretrained(args.config) if args.config else GPTNeoXConfig(**PYTHIA_160M)
    dtype = getattr(torch, args.dtype)
    if args.device == "cuda":
        with torch.device("meta"):
            model = AutoModel.from_config(config, torch_dtype=dtype)
        model = model.to_empty(device="cuda")
    else:
        model = AutoModel.from_config(config).to(dtype)
    model.eval()
    blocks = getattr(model, "h", None) or getattr(model, "layers")
    block_params = sum(p.numel() for p in blocks[0].parameters())
    # the plan's count (sharding/plan.py, _costs): 2 per weight and attention over half the sequence, per block
    flops_per_token = len(blocks) * (2 * block_params + 2 * args.seq * config.hidden_size)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=args.device)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    rows = []
    with torch.inference_mode():
        model(ids, use_cache=False)
        sync()
        for _ in range(args.reps):
            probe = probe_flops(args.device, args.dtype, args.threads)
            t0 = time.perf_counter()
            for _ in range(2):
                model(ids, use_cache=False)
            sync()
            tps = 2 * ids.numel() / (time.perf_counter() - t0)
            rows.append({"probe_flops": probe, "tokens_per_s": tps, "forward_flops": tps * flops_per_token,
                         "efficiency": tps * flops_per_token / probe})
            print(f"probe {probe / 1e9:,.1f} GFLOP/s, forward {tps:,.0f} tok/s = {tps * flops_per_token / 1e9:,.1f} "
                  f"GFLOP/s ({flops_per_token / 1e6:,.1f} MFLOP/token): efficiency {rows[-1]['efficiency']:.3f}")
    name = torch.cuda.get_device_name() if args.device == "cuda" else Path("/proc/cpuinfo").read_text().split(
        "model name")[1].split(":")[1].split("\n")[0].strip()
    print(json.dumps({"device": name, "threads": args.threads, "dtype": args.dtype, "runs": rows}))


if __name__ == "__main__":
    main()
