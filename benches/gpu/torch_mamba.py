#!/usr/bin/env python3
"""PyTorch reference for the Mamba benchmark of issue 24: `transformers`' MambaForCausalLM
with mamba-130m's shape (24 blocks of width 768, N = 16, expand 2, conv 4, dt rank 48,
50,280-token vocabulary, tied embeddings), random weights, trained the way the worker's
`gpu_mamba_bench` trains its own Mamba: f32 masters, bf16 autocast (or plain f32), gradient
clipping at 1.0, fused AdamW. The GPU machine has no `mamba-ssm` kernels, so `transformers`
runs its own PyTorch path; --mode picks which:

  eager     the default path (a Python loop over time steps),
  mambapy   `use_mambapy=True` (its parallel scan in PyTorch),
  compiled  the default path under torch.compile,
  compiled-mambapy  the parallel scan under torch.compile.

Measurement follows the candle binary: warm-up steps, then each step timed on its own with
torch.cuda.synchronize() before each clock read, median of the timed steps. Memory is
torch.cuda.max_memory_reserved(). A JSON line on stdout after the warm-up and after each timed
step, each replacing the one before (the last is the result; one cut off by a time limit
still says how far it got: "partial" and the steps timed so far, or only the warm-up's time,
which includes compiling); a run that runs out of memory prints a JSON line with "error":
"out of memory" instead.

    python3 benches/gpu/torch_mamba.py --mode eager --context 2048 --steps 3
"""

import argparse
import json
import statistics
import time

import torch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["eager", "mambapy", "compiled", "compiled-mambapy"], default="eager")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=["bf16", "f32"], default="bf16")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args()

    from transformers import MambaConfig, MambaForCausalLM

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    cfg = MambaConfig(
        vocab_size=50280,
        hidden_size=768,
        num_hidden_layers=24,
        state_size=16,
        expand=2,
        conv_kernel=4,
        time_step_rank=48,
        tie_word_embeddings=True,
        use_mambapy=a.mode.endswith("mambapy"),
    )
    dev = torch.device("cuda")
    model = MambaForCausalLM(cfg).to(dev)
    params = sum(t.numel() for t in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    fwd = torch.compile(model) if a.mode.startswith("compiled") else model
    g = torch.Generator().manual_seed(42)
    batches = [
        torch.randint(0, cfg.vocab_size, (a.batch, a.context), generator=g).to(dev) for _ in range(2)
    ]
    use_bf16 = a.dtype == "bf16"

    def step(i):
        x = batches[i % 2]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
            loss = fwd(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    out = {
        "impl": "transformers-" + a.mode,
        "model": "mamba",
        "params": params,
        "context": a.context,
        "batch": a.batch,
        "dtype": a.dtype,
        "torch": torch.__version__,
    }
    try:
        t0 = time.perf_counter()
        for i in range(a.warmup):
            step(i)
        torch.cuda.synchronize()
        out.update(warmup_s=time.perf_counter() - t0, partial="warm-up only")
        print(json.dumps(out), flush=True)
        times = []
        for i in range(a.steps):
            t0 = time.perf_counter()
            loss = step(a.warmup + i)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            s = statistics.median(times)
            out.update(
                median_step_ms=s * 1e3,
                tokens_per_s=a.batch * a.context / s,
                memory_gib=torch.cuda.max_memory_reserved() / 2**30,
                last_loss=loss,
                steps=len(times),
            )
            if len(times) == a.steps:
                out.pop("partial")
            else:
                out["partial"] = f"{len(times)} of {a.steps} steps"
            print(json.dumps(out), flush=True)
    except torch.OutOfMemoryError:
        out.update(error="out of memory", memory_gib=torch.cuda.max_memory_reserved() / 2**30)
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
