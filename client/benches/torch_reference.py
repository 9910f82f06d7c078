"""PyTorch + PEFT reference for fedpool's `step` benchmark (client/benches/step.rs runs it in the same run).

The training step is ../shared/bench/torch_step.py's: MiniLM (BertForSequenceClassification) + PEFT LoRA
r=8 alpha=16 on query/value, AdamW lr 5e-4, fp32, forward + backward + optimizer step. Also the evaluation
throughput (`torch.no_grad()` forward of real VADER sentences, length-sorted batches padded to their
longest, as fedpool evaluates) and the process's peak RSS.

Usage: python3 torch_reference.py MODEL_DIR VADER_DIR --case step|eval [--threads 2] [--batch 32] [--len 64]
       [--iters 5] [--real]
Prints one JSON line: {"case", "real", "s_per_step_median" | "sentences_per_s", "peak_rss_mib"}.
"""
import argparse, glob, json, os, random, resource, statistics, time

import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import AutoTokenizer, BertForSequenceClassification
from transformers.utils import logging as hf_logging


def sentences(vader_dir):
    out = []
    for path in sorted(glob.glob(os.path.join(vader_dir, "*_GroundTruth.txt"))):
        for line in open(path, encoding="utf-8").read().split("\n")[1:]:
            line = line.rstrip("\r")
            if not line:
                continue
            _, score, text = line.split("\t")
            if float(score) != 0:
                out.append((text, 1 if float(score) > 0 else 0))
    return out


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("vader")
    ap.add_argument("--case", choices=["step", "eval"], required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--len", type=int, default=64)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--eval-sentences", type=int, default=1024)
    ap.add_argument("--real", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    base = BertForSequenceClassification.from_pretrained(a.model, num_labels=2, local_files_only=True)
    cfg = LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.0,
                     target_modules=["query", "value"])
    model = get_peft_model(base, cfg)
    tok = AutoTokenizer.from_pretrained(a.model, local_files_only=True)
    rng = random.Random(0)
    data = sentences(a.vader)

    if a.case == "eval":
        model.eval()
        rows = rng.sample(data, a.eval_sentences)
        enc = [tok(t, truncation=True, max_length=a.len)["input_ids"] for t, _ in rows]
        order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            with torch.no_grad():
                for s in range(0, len(order), a.batch):
                    chunk = [enc[i] for i in order[s:s + a.batch]]
                    width = max(len(c) for c in chunk)
                    ids = torch.tensor([c + [tok.pad_token_id] * (width - len(c)) for c in chunk])
                    mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in chunk])
                    model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
            times.append(time.perf_counter() - t0)
        print(json.dumps({"case": "eval", "real": True, "sentences_per_s": round(len(enc) / min(times), 2),
                          "peak_rss_mib": round(peak_rss_mib(), 1)}))
        return

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)

    def batches():
        while True:
            if a.real:
                rows = rng.sample(data, a.batch)
                enc = tok([t for t, _ in rows], truncation=True, max_length=a.len, padding=True, return_tensors="pt")
                yield enc["input_ids"], enc["attention_mask"], torch.tensor([l for _, l in rows])
            else:
                ids = torch.randint(1000, 21000, (a.batch, a.len))
                yield ids, torch.ones_like(ids), torch.randint(0, 2, (a.batch,))

    gen = batches()
    times = []
    for i in range(a.iters + 2):
        ids, mask, labels = next(gen)
        t0 = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    print(json.dumps({"case": "step", "real": a.real, "s_per_step_median": round(statistics.median(times), 4),
                      "peak_rss_mib": round(peak_rss_mib(), 1)}))


if __name__ == "__main__":
    main()
