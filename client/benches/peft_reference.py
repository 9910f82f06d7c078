"""PyTorch + HF PEFT training reference that fedpool's LoRA is compared against: same data, same
hyperparameters.

Model: BertForSequenceClassification over the MiniLM checkpoint (sentence-transformers/all-MiniLM-L6-v2,
classifier newly initialised) with a PEFT LoRA adapter (task SEQ_CLS, so the classifier is a trainable
`modules_to_save` copy; the pooler stays frozen). fp32, CPU. Modes:

  federated    FedAvg-LoRA (as FedIT): each round every client starts from the global trainable tensors
               (LoRA A/B of every target + the classifier), trains with a fresh AdamW, and the server sets
               the global tensors to the example-weighted mean of the clients'. After every round: accuracy
               and mean cross-entropy on the union of the clients' test sets.
  centralised  the same model trained on the union of the clients' training sets, evaluated on the union of
               the test sets after every epoch (and every --eval-every steps).

Batching mirrors fedpool's BatchOrder: a seeded shuffle per epoch, the last short batch of an epoch dropped
(every step sees --batch rows unless the data is smaller), so an epoch is len(train) // batch steps.
Shuffle seeds: centralised `seed`; federated client k in round r `(seed << 32) | (r << 16) | k`. The seed
also goes to torch.manual_seed before the model is built (classifier and LoRA A init, dropout masks).
Defaults are HF's (pooler head, dropout 0.1, AdamW weight decay 0.01). fedpool's trainer (client/src/train)
pools by masked mean and uses AdamW weight decay 0; to compare like with like pass `--pooling mean
--weight-decay 0` and the dropout fedpool trains with (`--hidden-dropout P --attention-dropout P`).

Setup (once):
  python3 -m venv ~/torch-venv
  ~/torch-venv/bin/pip install torch transformers peft     # tested: torch 2.15, transformers 5.24, peft 0.21.2
  assets (MiniLM, VADER, TREC, SMS) as fetched by scripts/fetch-assets.sh, under $FEDPOOL_ASSETS
  (default /work/main/assets)

Usage:
  ~/torch-venv/bin/python client/benches/peft_reference.py federated --split SPLIT.json [--rounds 5]
      [--local-epochs 1 | --local-steps N] [--seeds 0 1 2] [--out runs.jsonl] [common flags]
  ~/torch-venv/bin/python client/benches/peft_reference.py centralised --split SPLIT.json [--epochs 3]
      [--eval-every STEPS] [--seeds 0 1 2] [--out runs.jsonl] [common flags]
  SPLIT.json: {"client-name": {"train": [ids...], "test": [ids...]}, ...} with fedpool's example ids of
  --data vader|trec|trec-fine|sms.

Prints one JSON line per (seed, round/epoch) to stdout: {"mode", "seed", "round" | "epoch", "step",
"accuracy", "loss", "train_loss", "seconds"} ("step": optimizer steps so far, summed over clients), then a
summary line per seed ({"summary": true, ...}, with "upload_bytes_fp32" in federated mode). --out also writes
them as JSONL. Progress goes to stderr.
"""
import argparse
import csv
import json
import math
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from peft import LoraConfig, TaskType, get_peft_model
from transformers import AutoConfig, AutoTokenizer, BertForSequenceClassification
from transformers.utils import logging as hf_logging

ASSETS = os.environ.get("FEDPOOL_ASSETS", "/work/main/assets")
VADER_FILES = ["tweets", "movieReviewSnippets", "amazonReviewSnippets", "nytEditorialSnippets"]
# Rust's char::is_whitespace (Unicode White_Space), for str::trim; Python's strip() also strips \x1c-\x1f.
RUST_WS = "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"


def fail(message):
    sys.exit(f"peft_reference: {message}")


def log(message):
    print(message, file=sys.stderr, flush=True)


# ---- fedpool's built-in datasets (client/src/data/builtin.rs): id -> (text, label) ----

def read_text(path):
    try:
        with open(path, encoding="utf-8", newline="") as f:  # newline="": no \r translation
            return f.read()
    except FileNotFoundError:
        fail(f"asset missing: {path}")


def rust_lines(text):
    """Rust `str::lines` after stripping a BOM: split on \\n, drop one trailing \\r, no final empty line."""
    lines = text.removeprefix("\ufeff").split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def load_vader(assets):
    examples, next_id = {}, 0
    for name in VADER_FILES:
        path = os.path.join(assets, "vader", f"{name}_GroundTruth.txt")
        lines = [line for line in rust_lines(read_text(path)) if line.strip(RUST_WS)]
        if not lines or [h.strip(RUST_WS) for h in lines[0].split("\t")] != ["id", "sentiment", "text"]:
            fail(f"{path}: expected the header 'id<TAB>sentiment<TAB>text'")
        for row in lines[1:]:
            id_, next_id = next_id, next_id + 1
            fields = row.split("\t", 2)
            if len(fields) != 3:
                fail(f"{path}: expected id<TAB>score<TAB>text, found {row!r}")
            score = float(fields[1].strip(RUST_WS))
            if not math.isfinite(score):
                fail(f"{path}: score {fields[1]!r} is not finite")
            if score != 0.0:
                examples[id_] = (fields[2], int(score > 0.0))
    return examples, ["negative", "positive"]


def sorted_names(values):
    """fedpool's `sorted_names`: distinct values sorted, numerically if all are integers."""
    names = sorted(set(values))
    try:
        return sorted(names, key=int)
    except ValueError:
        return names


def load_trec(assets, fine):
    path = os.path.join(assets, "trec", "question_labels.txt")
    seen, kept = set(), []
    for line_no, row in enumerate(rust_lines(read_text(path))):  # 0-based line number = id
        if not row.strip(RUST_WS):
            continue
        label, _, question = row.partition(" ")
        coarse, _, fine_part = label.partition(":")
        if " " not in row or not coarse or not fine_part or not question.strip(RUST_WS):
            fail(f"{path}:{line_no + 1}: expected 'COARSE:fine question', found {row!r}")
        key = (label if fine else coarse, question)
        if key not in seen:
            seen.add(key)
            kept.append((line_no, *key))
    names = sorted_names(label for _, label, _ in kept)
    index = {n: i for i, n in enumerate(names)}
    return {id_: (q, index[label]) for id_, label, q in kept}, names


def load_sms(assets):
    path = os.path.join(assets, "sms", "sms-spam.csv")
    with open(path, encoding="utf-8", newline="") as f:
        records = [r for r in csv.reader(f) if r]  # the Rust csv crate skips empty lines too
    header = [h.strip(RUST_WS) for h in records[0]]
    label_at, text_at = header.index("spam"), header.index("text")
    texts = []  # (text, label) in message order
    for record in records[1:]:
        if len(record) != len(header):
            fail(f"{path}: a record has {len(record)} fields, the header {len(header)}")
        label = {"0": 0, "1": 1}.get(record[label_at].strip(RUST_WS))
        if label is None:
            fail(f"{path}: spam must be 0 or 1, found {record[label_at]!r}")
        first, *parts = record[text_at].split("\n")
        texts.append([first, label])
        for part in parts:  # lines of the original TSV that a stray quote swallowed
            prefix = next((p for p in ("ham\t", "spam\t") if part.startswith(p)), None)
            if prefix:
                texts.append([part[len(prefix):], int(prefix == "spam\t")])
            else:
                texts[-1][0] += "\n" + part
    return {i: tuple(t) for i, t in enumerate(texts)}, ["ham", "spam"]


def load_dataset(name, assets):
    loaders = {"vader": load_vader, "trec": lambda a: load_trec(a, False),
               "trec-fine": lambda a: load_trec(a, True), "sms": load_sms}
    if name not in loaders:
        fail(f"unknown --data {name!r} (valid: {', '.join(loaders)})")
    return loaders[name](assets)


def load_split(path, examples):
    with open(path, encoding="utf-8") as f:
        split = json.load(f)
    if not isinstance(split, dict) or not split:
        fail(f"{path}: expected a non-empty object of clients")
    clients = []
    for name, parts in split.items():
        ids = {part: parts.get(part) if isinstance(parts, dict) else None for part in ("train", "test")}
        for part, values in ids.items():
            if not isinstance(values, list) or not all(type(v) is int for v in values):
                fail(f"{path}: client {name!r}: '{part}' must be a list of integer ids")
            missing = [v for v in values if v not in examples]
            if missing:
                fail(f"{path}: client {name!r} ({part}): id {missing[0]} does not exist"
                     + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        clients.append((name, ids["train"], ids["test"]))
    return clients


# ---- batching, model, training ----

class BatchOrder:
    """fedpool's BatchOrder: shuffled at creation and whenever the next batch would run past the end."""

    def __init__(self, n, batch, seed):
        self.n, self.batch, self.pos = n, max(1, min(batch, n)), 0
        self.gen = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(n, generator=self.gen).tolist()

    def steps_per_epoch(self):
        return self.n // self.batch

    def next(self):
        if self.pos + self.batch > self.n:
            self.order, self.pos = torch.randperm(self.n, generator=self.gen).tolist(), 0
        self.pos += self.batch
        return self.order[self.pos - self.batch:self.pos]


def pad(rows, pad_id):
    width = max(len(tokens) for tokens, _ in rows)
    ids = torch.tensor([t + [pad_id] * (width - len(t)) for t, _ in rows])
    mask = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t, _ in rows])
    return ids, mask, torch.tensor([label for _, label in rows])


def build_model(args, num_labels, seed):
    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(args.model, num_labels=num_labels, local_files_only=True)
    if args.hidden_dropout is not None:
        config.hidden_dropout_prob = args.hidden_dropout
    if args.attention_dropout is not None:
        config.attention_probs_dropout_prob = args.attention_dropout
    if args.classifier_dropout is not None:
        config.classifier_dropout = args.classifier_dropout
    base = BertForSequenceClassification.from_pretrained(args.model, config=config, local_files_only=True,
                                                         dtype=torch.float32)
    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=args.rank, lora_alpha=args.alpha,
                      lora_dropout=args.lora_dropout, target_modules=args.targets)
    return get_peft_model(base, lora).float()


def logits(model, ids, mask, pooling):
    if pooling == "cls-pooler":
        return model(input_ids=ids, attention_mask=mask).logits
    inner = model.base_model.model  # the BertForSequenceClassification, LoRA injected
    hidden = inner.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)  # sentence-transformers' (and fedpool's) mean
    return inner.classifier(inner.dropout(pooled))


@torch.no_grad()
def check_head(model, rows, pad_id):
    """The hand-built head (bert -> dropout -> classifier) must be the model's own: compare on cls-pooler."""
    model.eval()
    ids, mask, _ = pad(rows, pad_id)
    inner = model.base_model.model
    manual = inner.classifier(inner.dropout(inner.bert(input_ids=ids, attention_mask=mask).pooler_output))
    if not torch.allclose(manual, logits(model, ids, mask, "cls-pooler"), atol=1e-5):
        fail("the hand-built head does not reproduce the model's logits (PEFT/transformers layout changed?)")


def trainable(model, announce):
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if any("pooler" in n for n, _ in params):
        fail("the pooler is trainable")
    if announce:
        log("trainable: " + ", ".join(f"{n} {tuple(p.shape)}" for n, p in params))
    return params


def make_optimizer(params, args):
    head = [p for n, p in params if ".classifier." in n]
    lora = [p for n, p in params if "lora_" in n]
    if len(head) + len(lora) != len(params) or not head:
        fail("unexpected trainable parameters: " + ", ".join(n for n, _ in params))
    groups = [{"params": lora, "lr": args.lr, "base_lr": args.lr},
              {"params": head, "lr": args.head_lr, "base_lr": args.head_lr}]
    return torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)


def train_step(model, optimizer, rows, args, pad_id, progress):
    """One AdamW step; `progress` = step / total steps for the linear schedule."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * ((1.0 - progress) if args.schedule == "linear" else 1.0)
    model.train()
    ids, mask, labels = pad(rows, pad_id)
    loss = F.cross_entropy(logits(model, ids, mask, args.pooling), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


@torch.no_grad()
def evaluate(model, rows, args, pad_id):
    """Accuracy and mean cross-entropy; length-sorted batches, as fedpool evaluates."""
    model.eval()
    rows = sorted(rows, key=lambda r: len(r[0]))
    correct, loss_sum = 0, 0.0
    for start in range(0, len(rows), args.eval_batch):
        ids, mask, labels = pad(rows[start:start + args.eval_batch], pad_id)
        out = logits(model, ids, mask, args.pooling)
        loss_sum += F.cross_entropy(out, labels, reduction="sum").item()
        correct += (out.argmax(-1) == labels).sum().item()
    return correct / len(rows), loss_sum / len(rows)


def run_federated(args, model, params, clients, test, seed, emit, pad_id):
    global_state = {n: p.detach().clone() for n, p in params}
    step, t0 = 0, time.perf_counter()
    for rnd in range(1, args.rounds + 1):
        sums = {n: torch.zeros_like(t, dtype=torch.float64) for n, t in global_state.items()}
        total, losses = 0, []
        for k, (_, train, _) in enumerate(clients):
            if not train:
                continue
            with torch.no_grad():
                for n, p in params:
                    p.copy_(global_state[n])
            order = BatchOrder(len(train), args.batch, (seed << 32) | (rnd << 16) | k)
            steps = args.local_steps or args.local_epochs * order.steps_per_epoch()
            optimizer = make_optimizer(params, args)
            for s in range(steps):
                losses.append(train_step(model, optimizer, [train[i] for i in order.next()], args, pad_id, s / steps))
            for n, p in params:
                sums[n] += len(train) * p.detach().double()
            total, step = total + len(train), step + steps
        global_state = {n: (s / total).float() for n, s in sums.items()}
        with torch.no_grad():
            for n, p in params:
                p.copy_(global_state[n])
        accuracy, loss = evaluate(model, test, args, pad_id)
        emit({"mode": "federated", "seed": seed, "round": rnd, "step": step, "accuracy": accuracy, "loss": loss,
              "train_loss": sum(losses) / max(len(losses), 1), "seconds": time.perf_counter() - t0})
    return step


def run_centralised(args, model, params, clients, test, seed, emit, pad_id):
    train = [row for _, rows, _ in clients for row in rows]
    order = BatchOrder(len(train), args.batch, seed)
    per_epoch = order.steps_per_epoch()
    total = args.epochs * per_epoch
    optimizer = make_optimizer(params, args)
    losses, t0 = [], time.perf_counter()
    for step in range(1, total + 1):
        losses.append(train_step(model, optimizer, [train[i] for i in order.next()], args, pad_id, (step - 1) / total))
        end_of_epoch = step % per_epoch == 0
        if end_of_epoch or (args.eval_every and step % args.eval_every == 0):
            accuracy, loss = evaluate(model, test, args, pad_id)
            epoch = step // per_epoch if end_of_epoch else round(step / per_epoch, 4)
            emit({"mode": "centralised", "seed": seed, "epoch": epoch, "step": step, "accuracy": accuracy,
                  "loss": loss, "train_loss": sum(losses) / len(losses), "seconds": time.perf_counter() - t0})
            losses = []
    return total


def write_rounds_csv(folder, history, bytes_per_round):
    """fedpool-sim's rounds.csv header and decimals; macro-F1 and simulated time are not measured."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "rounds.csv"), "w", encoding="utf-8") as f:
        f.write("round,accuracy,macro_f1,loss,bytes_up,bytes_down,sim_seconds,wall_seconds,"
                "global_accuracy,global_macro_f1,global_loss\n")
        previous = 0.0
        for r in history:  # "seconds" counts from the run's start; rounds.csv has each round's
            f.write(f"{r['round']},{r['accuracy']:.6f},,{r['loss']:.6f},{bytes_per_round},{bytes_per_round},"
                    f"0.000,{r['seconds'] - previous:.3f},,,\n")
            previous = r["seconds"]


def main():
    ap = argparse.ArgumentParser(description="PyTorch + PEFT LoRA reference for fedpool (federated / centralised).")
    ap.add_argument("mode", choices=["federated", "centralised"])
    ap.add_argument("--split", required=True, help="JSON {client: {train: [ids], test: [ids]}}")
    ap.add_argument("--model", default=os.path.join(ASSETS, "minilm"))
    ap.add_argument("--data", default="vader", help="vader | trec | trec-fine | sms")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--local-steps", type=int, default=0, help="steps per client and round (overrides epochs)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--eval-every", type=int, default=0, help="centralised: also evaluate every N steps")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--head-lr", type=float, default=None, help="classifier learning rate (default --lr)")
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--schedule", choices=["constant", "linear"], default="constant")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--eval-batch", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--lora-dropout", type=float, default=0.0)
    ap.add_argument("--targets", nargs="+", default=["query", "value"])
    ap.add_argument("--hidden-dropout", type=float, default=None)
    ap.add_argument("--attention-dropout", type=float, default=None)
    ap.add_argument("--classifier-dropout", type=float, default=None, help="default: the hidden dropout")
    ap.add_argument("--pooling", choices=["cls-pooler", "mean"], default="cls-pooler")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="also write every line to this JSONL file")
    ap.add_argument("--rounds-csv", metavar="DIR",
                    help="federated, one seed: also write DIR/rounds.csv in fedpool-sim's format (bytes: the fp32 "
                         "payload of every client's upload and download, no framing), for `fedpool-sim plot`")
    args = ap.parse_args()
    args.head_lr = args.lr if args.head_lr is None else args.head_lr
    if min(args.rounds, args.epochs, args.local_epochs, args.batch, args.eval_batch) < 1:
        fail("--rounds, --epochs, --local-epochs, --batch and --eval-batch must be at least 1")
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

    examples, label_names = load_dataset(args.data, ASSETS)
    clients = load_split(args.split, examples)
    tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    ids = sorted({i for _, train, test in clients for i in train + test})
    encoded = tok([examples[i][0] for i in ids], truncation=True, max_length=args.max_len)["input_ids"]
    rows = {i: (e, examples[i][1]) for i, e in zip(ids, encoded)}
    clients = [(name, [rows[i] for i in train], [rows[i] for i in test]) for name, train, test in clients]
    test = [row for _, _, rows_ in clients for row in rows_]
    if not test or not any(train for _, train, _ in clients):
        fail("the split needs training and test examples")
    log(f"{args.data}: {len(label_names)} labels; {len(clients)} clients, "
        f"{sum(len(c[1]) for c in clients)} train / {len(test)} test examples")

    out = open(args.out, "w", encoding="utf-8") if args.out else None

    history = []

    def emit(record):
        history.append(record)
        line = json.dumps(record)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()
        unit = "round" if "round" in record else "epoch"
        log(f"seed {record['seed']} {unit} {record[unit]}: accuracy {record['accuracy']:.4f} "
            f"loss {record['loss']:.4f} ({record['seconds']:.1f}s)")

    for n, seed in enumerate(args.seeds):
        model = build_model(args, len(label_names), seed)
        params = trainable(model, announce=n == 0)
        if n == 0:
            check_head(model, test[:8], tok.pad_token_id)
        t0, history[:] = time.perf_counter(), []
        run = run_federated if args.mode == "federated" else run_centralised
        steps = run(args, model, params, clients, test, seed, emit, tok.pad_token_id)
        values = sum(p.numel() for _, p in params)
        summary = {"mode": args.mode, "seed": seed, "summary": True, "steps": steps,
                   "accuracy": history[-1]["accuracy"], "loss": history[-1]["loss"],
                   "best_accuracy": max(r["accuracy"] for r in history),
                   "seconds": time.perf_counter() - t0, "trainable_values": values,
                   "clients": len(clients), "train_examples": sum(len(c[1]) for c in clients),
                   "test_examples": len(test), "config": {k: v for k, v in vars(args).items() if k != "out"}}
        if args.mode == "federated":
            summary["upload_bytes_fp32"] = 4 * values
            if args.rounds_csv:
                write_rounds_csv(args.rounds_csv, history, len(clients) * 4 * values)
        line = json.dumps(summary)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
    if out:
        out.close()


if __name__ == "__main__":
    main()
