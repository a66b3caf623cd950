#!/usr/bin/env python3
"""PyTorch reference for the LoRA/QLoRA benchmark of issue 20: `transformers`' LlamaForCausalLM
with TinyLlama-1.1B's shape (hidden 2048, 22 layers, intermediate 5632, 32 heads, 4 key/value
heads, vocabulary 32,000, RoPE theta 10,000, untied head), random weights, a PEFT LoRA on it,
trained the way the worker's `gpu_lora_bench` trains: the base frozen in bf16, or in 4-bit NF4
with double quantisation through bitsandbytes (QLoRA; compute in bf16), the adapters in f32
(PEFT's default upcast), rank 16, alpha 32, dropout 0.05 on q, k, v, o, gate, up and down;
`batch` random sequences of `seq` tokens with `labels = input_ids`; gradient clipping at 1.0
and fused AdamW (betas 0.9/0.95, weight decay 0.01, as the worker's). --checkpoint turns on
transformers' gradient checkpointing per decoder layer (non-reentrant, so no input needs a
gradient). No autocast: the base's products run in bf16 and PEFT runs the adapters' in f32
(it casts the input up); the worker keeps its adapters in f32 but casts them to bf16 for their
products, so it does a little less arithmetic in f32 than this reference.

The 4-bit base is made the way people load one: the random bf16 model is saved once (in
--save-dir, default /tmp/potluck-torch-llama-SHAPE) and loaded with a BitsAndBytesConfig.

Measurement follows the candle binary: warm-up steps, then each step timed on its own with
torch.cuda.synchronize() before each clock read, median of the timed steps. The peak counters
are reset after the load (and its cache emptied), so memory is the training's:
torch.cuda.max_memory_allocated() and max_memory_reserved() (the latter is what the worker's
`memory_gib` compares with). A JSON line on stdout after the warm-up and after each timed
step, each replacing the one before (the last is the result; one cut off by a time limit still
says how far it got: "partial"); a run that runs out of memory prints "error": "out of
memory", one without bitsandbytes for --base nf4 prints "error": "bitsandbytes not installed".

    python3 benches/gpu/torch_peft.py --base nf4 --checkpoint --steps 5
"""

import argparse
import json
import os
import statistics
import time

import torch

SHAPES = {
    "tinyllama": dict(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
    ),
    "tiny": dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    ),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", choices=list(SHAPES), default="tinyllama")
    p.add_argument("--base", choices=["bf16", "nf4"], default="bf16")
    p.add_argument("--checkpoint", action="store_true")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--attn", default="sdpa", help="attn_implementation: sdpa or eager")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--save-dir", default=None)
    a = p.parse_args()

    out = {
        "impl": "torch-peft",
        "shape": a.shape,
        "base": a.base,
        "rank": a.rank,
        "alpha": a.alpha,
        "dropout": a.dropout,
        "batch": a.batch,
        "seq": a.seq,
        "checkpoint": a.checkpoint,
        "attn": a.attn,
        "torch": torch.__version__,
    }
    if a.base == "nf4":
        try:
            import bitsandbytes  # noqa: F401

            out["bitsandbytes"] = bitsandbytes.__version__
        except ImportError:
            out["error"] = "bitsandbytes not installed"
            print(json.dumps(out), flush=True)
            return

    import peft
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    out.update(transformers=transformers.__version__, peft=peft.__version__)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    shape = dict(SHAPES[a.shape])
    shape["max_position_embeddings"] = max(shape["max_position_embeddings"], a.seq)
    cfg = LlamaConfig(
        **shape,
        attn_implementation=a.attn,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
    )
    dev = torch.device("cuda")
    # transformers 4.56 renamed torch_dtype to dtype; older ones know only torch_dtype.
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    t0 = time.perf_counter()
    if a.base == "bf16":
        with dev:
            model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    else:
        from transformers import BitsAndBytesConfig

        save = a.save_dir or f"/tmp/potluck-torch-llama-{a.shape}-{shape['max_position_embeddings']}"
        if not os.path.exists(os.path.join(save, "config.json")):
            with dev:
                m = LlamaForCausalLM(cfg).to(torch.bfloat16)
            m.save_pretrained(save)
            del m
        model = LlamaForCausalLM.from_pretrained(
            save,
            attn_implementation=a.attn,
            device_map={"": 0},
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            ),
            **{dtype_kw: torch.bfloat16},
        )
    model.config.use_cache = False
    if a.checkpoint:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(
        r=a.rank,
        lora_alpha=a.alpha,
        lora_dropout=a.dropout,
        target_modules=TARGETS,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    model.train()
    trainable = [t for t in model.parameters() if t.requires_grad]
    out.update(
        base_params=sum(t.numel() for t in model.parameters() if not t.requires_grad),
        trainable_params=sum(t.numel() for t in trainable),
        adapter_dtype=str(trainable[0].dtype).removeprefix("torch."),
    )
    opt = torch.optim.AdamW(trainable, lr=a.lr, betas=(0.9, 0.95), weight_decay=0.01, fused=True)
    g = torch.Generator().manual_seed(42)
    batches = [
        torch.randint(0, cfg.vocab_size, (a.batch, a.seq), generator=g).to(dev) for _ in range(2)
    ]
    torch.cuda.synchronize()
    out["load_s"] = time.perf_counter() - t0
    torch.cuda.empty_cache()
    out["load_gib"] = torch.cuda.memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()

    def step(i):
        x = batches[i % 2]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    def memory():
        return dict(
            memory_gib=torch.cuda.max_memory_reserved() / 2**30,
            allocated_gib=torch.cuda.max_memory_allocated() / 2**30,
        )

    try:
        t0 = time.perf_counter()
        first = None
        for i in range(a.warmup):
            loss = step(i)
            first = loss if first is None else first
        torch.cuda.synchronize()
        out.update(warmup_s=time.perf_counter() - t0, partial="warm-up only", **memory())
        if first is not None:
            out["first_loss"] = first
        print(json.dumps(out), flush=True)
        times = []
        for i in range(a.steps):
            t0 = time.perf_counter()
            loss = step(a.warmup + i)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            s = statistics.median(times)
            out.setdefault("first_loss", loss)
            out.update(
                median_step_ms=s * 1e3,
                tokens_per_s=a.batch * a.seq / s,
                last_loss=loss,
                steps=len(times),
                **memory(),
            )
            if len(times) == a.steps:
                out.pop("partial")
            else:
                out["partial"] = f"{len(times)} of {a.steps} steps"
            print(json.dumps(out), flush=True)
    except torch.OutOfMemoryError:
        out.update(error="out of memory", **memory())
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
