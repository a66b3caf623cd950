#!/usr/bin/env python3
"""PyTorch reference for the GPU throughput benchmark of issue 6.

The same MoE transformer as the worker's (byte vocabulary, RMSNorm, RoPE, causal attention,
every layer MoE with 8 SwiGLU experts of hidden 2*d, top-2, tied embeddings, Switch
load-balancing loss), written the way a PyTorch user writes it: eager mode,
scaled_dot_product_attention, a Python loop over experts with index_add_, fused AdamW, and
bf16 autocast or plain f32 (TF32 off, as candle's default), or, as an explicitly labelled
opt-in row, f32 with TF32 matrix products (--dtype tf32, against candle's --dtype tf32). The
MoE is dropless, as is the candle side's benchmark config.

Measurement follows the candle binary (benches/src/bin/gpu_moe_bench.rs): warm-up steps
first, then each step timed on its own with torch.cuda.synchronize() before each clock read,
median of the timed steps. FLOPs per step = 6 * active_params * tokens + attention FLOPs,
counted by the same formula as the candle side (see flops_per_step). One JSON line per run
on stdout, appended to --json when given.

    python3 benches/gpu/torch_moe.py --config small --dtype bf16 --steps 25 --json out.jsonl
"""

import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

PEAK_FLOPS = 780e12  # measured dense bf16 peak of the H100, the candle side uses the same

CONFIGS = {
    # name: (d_model, layers, heads, context, batch)
    "tiny": (64, 2, 4, 64, 2),
    "small": (384, 6, 6, 256, 32),
    "base": (768, 12, 12, 512, 16),
}
VOCAB = 256
N_EXPERTS = 8
TOP_K = 2
AUX_COEF = 0.01


def active_params(d, layers, vocab=VOCAB, n_experts=N_EXPERTS, top_k=TOP_K):
    """Parameters a token passes through in matrix products: per layer the four attention
    projections, the router and top_k SwiGLU experts of hidden 2*d; plus the (tied) head.
    Norm gains and the embedding lookup are left out. Same count as the candle side."""
    hidden = 2 * d
    per_layer = 4 * d * d + n_experts * d + top_k * 3 * d * hidden
    return vocab * d + layers * per_layer


def flops_per_step(d, layers, seq, batch):
    """6 * active_params * tokens + 12 * layers * d * seq^2 * batch (QK^T and AV, forward and
    a backward of twice the forward, causal mask not discounted). Same formula as the candle
    side."""
    tokens = seq * batch
    attn = 12 * layers * d * seq * seq * batch
    return 6 * active_params(d, layers) * tokens + attn


def rope_tables(seq, head_dim, theta, device):
    half = head_dim // 2
    freq = theta ** (-2.0 * torch.arange(half, dtype=torch.float64) / head_dim)
    ang = torch.arange(seq, dtype=torch.float64)[:, None] * freq[None, :]
    return ang.cos().float().to(device), ang.sin().float().to(device)


def apply_rope(x, cos, sin):
    # "rotate half" form on [B, H, T, hd], as the worker does.
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos = cos.to(x.dtype)
    sin = sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.wq = nn.Linear(d, d, bias=False)
        self.wk = nn.Linear(d, d, bias=False)
        self.wv = nn.Linear(d, d, bias=False)
        self.wo = nn.Linear(d, d, bias=False)

    def forward(self, x, cos, sin):
        b, t, d = x.shape
        hd = d // self.heads

        def split(y):
            return y.view(b, t, self.heads, hd).transpose(1, 2)

        q = apply_rope(split(self.wq(x)), cos, sin)
        k = apply_rope(split(self.wk(x)), cos, sin)
        v = split(self.wv(x))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(o.transpose(1, 2).reshape(b, t, d))


class Expert(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.w_gate = nn.Linear(d, hidden, bias=False)
        self.w_up = nn.Linear(d, hidden, bias=False)
        self.w_down = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class MoE(nn.Module):
    def __init__(self, d, hidden, n_experts, top_k):
        super().__init__()
        self.n_experts = n_experts
        self.top_k = top_k
        self.router = nn.Linear(d, n_experts, bias=False)
        self.experts = nn.ModuleList(Expert(d, hidden) for _ in range(n_experts))

    def forward(self, x):
        # x: [N, d]
        probs = F.softmax(self.router(x).float(), dim=-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        gates = top_p / top_p.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(top_i == e)  # host sync, as users write it
            if tok.numel() == 0:
                continue
            y = expert(x[tok]) * gates[tok, slot, None]
            out.index_add_(0, tok, y.to(out.dtype))
        # Switch load-balancing loss: E * sum_e (share of assignments to e) * (mean prob of e).
        counts = F.one_hot(top_i, self.n_experts).sum(dim=(0, 1)).float()
        frac = counts / (x.shape[0] * self.top_k)
        aux = self.n_experts * (frac * probs.mean(dim=0)).sum()
        return out, aux


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.attn_norm = nn.RMSNorm(d, eps=1e-5)
        self.attn = Attention(d, heads)
        self.ffn_norm = nn.RMSNorm(d, eps=1e-5)
        self.moe = MoE(d, 2 * d, N_EXPERTS, TOP_K)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        b, t, d = x.shape
        f, aux = self.moe(self.ffn_norm(x).reshape(b * t, d))
        return x + f.view(b, t, d), aux


class Model(nn.Module):
    def __init__(self, d, layers, heads, context):
        super().__init__()
        self.tok_emb = nn.Embedding(VOCAB, d)
        self.layers = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.final_norm = nn.RMSNorm(d, eps=1e-5)
        self.head_dim = d // heads
        self.context = context
        std = 0.02
        out_std = std / math.sqrt(2 * layers)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                is_out = name.endswith("wo.weight") or name.endswith("w_down.weight")
                nn.init.normal_(p, std=out_std if is_out else std)

    def forward(self, tokens, targets):
        b, t = tokens.shape
        cos, sin = rope_tables(t, self.head_dim, 10_000.0, tokens.device)
        x = self.tok_emb(tokens)
        aux_total = 0.0
        for layer in self.layers:
            x, aux = layer(x, cos, sin)
            aux_total = aux_total + aux
        logits = F.linear(self.final_norm(x), self.tok_emb.weight)  # tied head
        ce = F.cross_entropy(logits.float().view(-1, VOCAB), targets.view(-1))
        return ce + AUX_COEF * aux_total, ce


def run(config, dtype, device, warmup, steps):
    d, layers, heads, ctx, batch = CONFIGS[config]
    torch.manual_seed(1)
    model = Model(d, layers, heads, ctx).to(device)
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=1e-3,
        betas=(0.9, 0.95),
        eps=1e-8,
        weight_decay=0.01,
        fused=device.type == "cuda",
    )
    gen = torch.Generator(device="cpu").manual_seed(42)
    batches = [
        (
            torch.randint(0, VOCAB, (batch, ctx), generator=gen).to(device),
            torch.randint(0, VOCAB, (batch, ctx), generator=gen).to(device),
        )
        for _ in range(4)
    ]
    use_bf16 = dtype == "bf16"

    def step(i):
        x, y = batches[i % len(batches)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss, ce = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return ce

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    first_loss = None
    for i in range(warmup):
        ce = step(i)
        if i == 0:
            first_loss = ce.item()
    sync()
    times = []
    last_loss = None
    for i in range(steps):
        t0 = time.perf_counter()
        ce = step(warmup + i)
        sync()
        times.append(time.perf_counter() - t0)
        last_loss = ce.item()
        if first_loss is None:
            first_loss = last_loss
    step_s = statistics.median(times)
    tokens = batch * ctx
    flops = flops_per_step(d, layers, ctx, batch)
    return {
        "impl": "pytorch",
        "config": config,
        "dtype": dtype,
        "device": str(device),
        "tokens_per_step": tokens,
        "steps": steps,
        "warmup": warmup,
        "median_step_ms": step_s * 1e3,
        "tokens_per_s": tokens / step_s,
        "flops_per_step": float(flops),
        "active_params": active_params(d, layers),
        "mfu": flops / step_s / PEAK_FLOPS,
        "peak_tflops": PEAK_FLOPS / 1e12,
        "first_loss": first_loss,
        "last_loss": last_loss,
        "dropped": 0,
        "torch": torch.__version__,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="small")
    # tf32: f32 weights and activations with TF32 tensor-core matrix products
    # (allow_tf32), an explicit opt-in compared with candle's --dtype tf32, never the f32 row.
    p.add_argument("--dtype", choices=["f32", "tf32", "bf16"], default="bf16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--json")
    a = p.parse_args()
    if a.steps < 1:
        p.error("--steps must be at least 1")
    torch.backends.cuda.matmul.allow_tf32 = a.dtype == "tf32"
    torch.backends.cudnn.allow_tf32 = a.dtype == "tf32"
    result = run(a.config, a.dtype, torch.device(a.device), a.warmup, a.steps)
    line = json.dumps(result)
    print(line, flush=True)
    if a.json:
        with open(a.json, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    sys.exit(main())
