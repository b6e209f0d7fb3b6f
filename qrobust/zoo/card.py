"""Quality measurements of a built-in model and its model card (README.md beside the weights)."""
from __future__ import annotations

import ast
import gzip
import json
import random
import textwrap
from importlib import resources
from pathlib import Path

import torch

from qrobust.zoo.corpus import Document, read_split
from qrobust.zoo.metrics import windows

VAL_SAMPLE = "data/val_sample.jsonl.gz"


def function_headers(docs: list[Document], n: int, seed: int = 0) -> list[str]:
    """Headers of held-out functions: decorators, the def line(s) and the docstring if any."""
    headers = []
    for d in docs:
        try:
            tree = ast.parse(d.text)
        except SyntaxError:
            continue
        lines = d.text.splitlines()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
                first = node.body[0]
                is_doc = isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant) \
                    and isinstance(first.value.value, str)
                end = first.end_lineno if is_doc else node.body[0].lineno - 1
                start = min([node.lineno] + [x.lineno for x in node.decorator_list])
                # No trailing newline: BPE merges "\n" with the next line's indentation, so a prompt
                # ending in "\n" would cut that token in half and push the model to module level.
                header = textwrap.dedent("\n".join(lines[start - 1:end])).rstrip()
                if len(header) < 1500:
                    headers.append(header)
    random.Random(seed).shuffle(headers)
    return headers[:n]


def completes_to_python(header: str, completion: str) -> bool:
    """Does header + completion parse, up to where the completion returns to module level?"""
    first, *rest = completion.split("\n")
    body, ended = [], False
    for line in rest:
        if line.strip() and not line.startswith((" ", "\t")):
            ended = True  # dedent back to module level: the function is over
            break
        body.append(line)
    if not ended and body:
        body.pop()  # cut off by the token budget, not by the model: judge the complete lines only
    if not any(line.strip() for line in body):
        return False  # the model must write some of the body; a docstring alone would parse
    try:
        ast.parse("\n".join([header + first, *body]))
        return True
    except SyntaxError:
        return False


def parse_rate(adapter, docs: list[Document], n: int = 100, max_new_tokens: int = 128, batch_size: int = 8) -> dict:
    headers = function_headers(docs, n)
    gens = adapter.generate(headers, max_new_tokens=max_new_tokens, batch_size=batch_size)
    ok = sum(completes_to_python(h, g.text) for h, g in zip(headers, gens))
    return {"headers": len(headers), "parses": ok, "rate": ok / len(headers) if headers else float("nan"),
            "max_new_tokens": max_new_tokens}


def read_val_sample() -> list[Document]:
    with resources.files("qrobust.zoo").joinpath(VAL_SAMPLE).open("rb") as raw, gzip.open(raw, "rt") as f:
        return [Document(**json.loads(line)) for line in f if line.strip()]


def write_val_sample(corpus_dir: str | Path, out: str | Path, count: int = 4) -> list[str]:
    docs = [d for d in read_split(corpus_dir, "val") if 5_000 <= len(d.text) <= 20_000][:count]
    with gzip.open(out, "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"path": d.path, "text": d.text}) + "\n")
    return [d.path for d in docs]


def sample_loss(adapter, seq_len: int, elbo_samples: int, seed: int) -> float:
    """The model's own loss on the validation sample shipped with the package (tests use it)."""
    from qrobust.zoo.train import tokenize_docs

    ids = windows(tokenize_docs(adapter.tokenizer, read_val_sample()), seq_len).to(adapter.device)
    return float(adapter.held_out_loss_rows(ids, samples=elbo_samples, seed=seed).mean())


def evaluate_zoo_model(model_dir: str | Path, corpus_dir: str | Path, out_dir: str | Path, headers: int = 100,
                       limit: int | None = None, workers: int = 2, device: str = "cpu", batch_size: int = 8) -> dict:
    """Parse rate, HumanEval/MBPP pass@1 and the shipped-sample loss, added to card.json."""
    from harness import EvalConfig, evaluate
    from qrobust.models import load_model

    model_dir = Path(model_dir)
    card = json.loads((model_dir / "card.json").read_text())
    adapter = load_model(str(model_dir), device=device)
    cfg = card["config"]
    with torch.no_grad():
        quality = {
            "parse_rate": parse_rate(adapter, read_split(corpus_dir, "val"), headers, batch_size=batch_size),
            "val_sample_loss": sample_loss(adapter, cfg["seq_len"], cfg["elbo_samples"], cfg["seed"]),
        }
    eval_config = EvalConfig(max_new_tokens=128, limit=limit, batch_size=batch_size, workers=workers)
    total = evaluate(adapter, eval_config, out_dir, card["name"], progress=False)
    quality["pass@1"] = {b: s["pass@1"] for b, s in total["benchmarks"].items()}
    quality["eval_command"] = (f"qrobust zoo evaluate {model_dir} --corpus {corpus_dir} --device {device} "
                               f"--batch-size {batch_size}")
    quality["eval_device"] = torch.cuda.get_device_name() if adapter.device.type == "cuda" else "cpu"
    card["quality"] = quality
    (model_dir / "card.json").write_text(json.dumps(card, indent=2))
    (model_dir / "README.md").write_text(render_card(card))
    return card


def render_card(card: dict) -> str:
    c, env, corpus = card["config"], card["environment"], card["corpus"]
    q = card.get("quality", {})
    ov = corpus.get("benchmark_overlap", {})
    lines = [
        f"# {card['name']}",
        "",
        f"A {'autoregressive' if card['kind'] == 'ar' else 'masked-diffusion'} code model built into qrobust: "
        f"{card['parameters'] / 1e6:.2f}M parameters, a Qwen3-shaped transformer "
        f"({'causal' if card['kind'] == 'ar' else 'bidirectional'} attention). Its sibling differs only in the "
        "attention mask and the training objective: same architecture, tokenizer, initialisation, data order, "
        "optimizer and steps.",
        "",
        "## Data",
        f"- {corpus['source']}, Python {corpus['python_version']}; file list sha256 `{corpus['file_list_sha256']}`.",
        f"- {corpus['files']['train']} training files ({card['train_tokens']:,} tokens), {corpus['files']['val']} "
        "validation files (split by file: sha256(path) mod 100 < 5).",
        f"- Tokenizer: byte-level BPE, {c['vocab_size']} tokens, trained on the training split; special tokens "
        "`<|endoftext|>`, `<|pad|>`, `<|mask|>`.",
    ]
    if ov:
        he, mb = ov["humaneval"], ov["mbpp"]
        lines.append("- Overlap with benchmark reference solutions (problems sharing a run of n code tokens with "
                     "the corpus): " + "; ".join(
                         f"n={n}: HumanEval {he[str(n)]['problems_with_overlap']}/{he[str(n)]['problems']}, "
                         f"MBPP {mb[str(n)]['problems_with_overlap']}/{mb[str(n)]['problems']}"
                         for n in ov["ngram_tokens"]) + ". Runs of 10 tokens are common idioms; of 30, copied code.")
    lines += [
        "",
        "## Training",
        f"- hidden {c['hidden_size']}, MLP {c['intermediate_size']}, {c['num_hidden_layers']} layers, "
        f"{c['num_attention_heads']} query / {c['num_key_value_heads']} KV heads of {c['head_dim']}, tied embeddings, "
        f"RoPE θ 10000, context {c['seq_len']}.",
        f"- {c['steps']} steps × {c['batch_size']} windows of {c['seq_len']} tokens, AdamW (β 0.9/0.95, weight decay "
        f"{c['weight_decay']}), peak lr {c['lr']} with {c['warmup']} warm-up steps and cosine decay to "
        f"{c['min_lr_ratio']}×, grad clip {c['grad_clip']}, bf16 autocast, seed {c['seed']}."
        + (f" Diffusion: mask ratio t ~ U({c['eps']}, 1), loss Σ_masked CE / t / (B·L)."
           if card["kind"] != "ar" else ""),
        f"- Wall time {card['train_seconds']:.0f} s on {env.get('gpu', env['device'])} (torch {env['torch']}); "
        "weights stored in float16.",
        "",
        "## Quality (nats per token)",
        f"- Final training loss (mean of the last logging window): {card['final_train_loss']:.3f}",
        f"- Validation loss, {card['val_loss_kind']}, on {card['val_tokens_used']:,} tokens: "
        f"**{card['val_loss']:.3f}**",
        f"- Unigram baseline on the same validation tokens: {card['unigram_val_nll']:.3f}",
    ]
    if q:
        pr = q["parse_rate"]
        lines += [
            f"- Held-out stdlib function headers completed (greedy, {pr['max_new_tokens']} new tokens) that parse as "
            f"Python: {pr['parses']}/{pr['headers']} = {pr['rate']:.2f}",
            "- pass@1 (greedy, default prompts, 128 new tokens): " + ", ".join(
                f"{b} {v['value']:.3f} [{v['ci_low']:.3f}, {v['ci_high']:.3f}]" for b, v in q["pass@1"].items())
            + ". Near zero is expected at this size and data.",
            f"- Loss on the validation sample shipped in the package (`qrobust/zoo/{VAL_SAMPLE}`): "
            f"{q['val_sample_loss']:.3f}",
            f"- Measured on {q.get('eval_device', 'an unrecorded device')} with `{q['eval_command']}`.",
        ]
    lines += ["", "Produced by `qrobust zoo train`; see the repository README for the exact commands.", ""]
    return "\n".join(lines)
