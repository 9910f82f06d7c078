"""PyTorch + PEFT reference for fedpool's decoder training-step benchmark (`--bench lm_step`):
SmolLM2-135M-Instruct loaded by transformers from the same GGUF (dequantized to f32, as
transformers does), PEFT LoRA r=8, alpha 16, on q_proj + v_proj, AdamW, the causal-LM loss on the
last RESP positions of each row only, forward + backward + optimizer step, on this machine's threads.

Usage:  python3 smollm2_torch_step.py GGUF [--threads 2] [--batch 8] [--len 64] [--resp 16]
        [--iters 3] [--checkpointing]
Prints one JSON line: {"case", "batch", "len", "s_per_step_median", "peak_rss_mib"}.
"""
import argparse, json, os, resource, statistics, time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--len", type=int, default=64)
    ap.add_argument("--resp", type=int, default=16)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--checkpointing", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    hf_logging.set_verbosity_error()
    d, f = os.path.dirname(os.path.abspath(a.gguf)), os.path.basename(a.gguf)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32)
    if a.checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (a.batch, a.len), generator=g)
    labels = ids.clone()
    labels[:, : a.len - a.resp] = -100
    times = []
    for i in range(a.iters + 1):
        t = time.perf_counter()
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        if i > 0:
            times.append(time.perf_counter() - t)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    case = "torch+peft f32" + (" + checkpointing" if a.checkpointing else "")
    print(json.dumps({"case": case, "batch": a.batch, "len": a.len, "s_per_step_median": statistics.median(times),
                      "peak_rss_mib": rss}))


if __name__ == "__main__":
    main()
