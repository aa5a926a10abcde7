"""End-to-end training steps: fastft against the stack people would otherwise use.

Two workloads, each a full optimizer step (forward, backward, AdamW step) on random
weights and random tokens, measured side by side in one process:

  bert-mlm    BertForMaskedLM, masked-LM with 15% of tokens labelled.
              baseline: transformers with attn_implementation="sdpa" (full logits loss)
              fastft:   fastft.patch(model): fused attention + logits-free loss
  llama-lora  LlamaForCausalLM with LoRA (rank 16, alpha 32) on every attention and MLP
              projection.
              baseline: transformers (sdpa) + PEFT's get_peft_model
              fastft:   fastft.patch + fastft.peft.apply(method="lora") (lora_linear)

Sizes: on a GPU, BERT-base (12 x 768, seq 512, batch 16) and a Llama-3.2-1B-shaped model
(16 x 2048, GQA 32/8, vocab 128256, seq 2048, batch 1) in bf16 autocast; on a CPU,
scaled-down configurations of the same shapes (so the CPU numbers measure the same code
paths, not the GPU workloads). Reported: median step time, tokens/s, peak extra memory.

    python -m benchmarks.bench_train [--quick] [--out DIR]
"""

from __future__ import annotations

import contextlib

import torch

from benchmarks.common import (bar_chart, environment, failure_recorded, median_ms, peak_extra_bytes, print_row, report,
                               suite_main)

COLUMNS = ["workload", "impl", "batch", "seq", "ms_per_step", "tokens_per_s", "speedup", "peak_extra_MiB", "status"]


def bert_config(gpu: bool):
    from transformers import BertConfig

    if gpu:
        return BertConfig(), 16, 512  # BERT-base
    return BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024), 8, 128


def llama_config(gpu: bool):
    from transformers import LlamaConfig

    if gpu:  # the shape of Llama-3.2-1B
        return LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                           num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096,
                           tie_word_embeddings=True), 1, 2048
    return LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=2, vocab_size=32000, max_position_embeddings=1024), 1, 512


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(workload: str, impl: str, device: torch.device):
    """A model ready to train and a function producing its labelled batch."""
    from transformers import BertForMaskedLM, LlamaForCausalLM

    gpu = device.type == "cuda"
    torch.manual_seed(0)
    if workload == "bert-mlm":
        config, batch, seq = bert_config(gpu)
        model = BertForMaskedLM._from_config(config, attn_implementation="sdpa")
    else:
        config, batch, seq = llama_config(gpu)
        model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", torch_dtype=torch.bfloat16 if gpu else torch.float32)
    model.to(device).train()
    if impl == "fastft":
        import fastft

        fastft.patch(model)
    if workload == "llama-lora":
        if impl == "fastft":
            import fastft.peft

            fastft.peft.apply(model, "lora", target_modules=LORA_TARGETS, rank=16, alpha=32)
        else:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS))
    input_ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    labels = input_ids.clone()
    if workload == "bert-mlm":
        labels[torch.rand(labels.shape, device=device) >= 0.15] = -100
    return model, dict(input_ids=input_ids, labels=labels), batch, seq


def measure(workload: str, impl: str, device: torch.device) -> dict:
    row = dict(workload=workload, impl=impl)
    with failure_recorded(row, device, ours=impl == "fastft"):
        model, batch, batch_size, seq = build(workload, impl, device)
        row.update(batch=batch_size, seq=seq)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext())

        def step():
            with autocast:
                loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()  # allocate optimizer state outside the measurement
        ms = median_ms(step, device, warmup=1, repeat=3)
        row.update(ms_per_step=ms, tokens_per_s=batch_size * seq / (ms * 1e-3),
                   peak_extra_MiB=peak_extra_bytes(step, device) / 2**20, status="ok")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    print_row(row)
    return row


def plot(rows: list[dict], path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    bar_chart(ax, rows, lambda r: (r["workload"], r["batch"], r["seq"]), lambda c: "{}\nbatch {} x seq {}".format(*c),
              value="tokens_per_s", log=False)
    ax.set_ylabel("tokens/s (one optimizer step)")
    ax.set_title("end-to-end training steps")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(quick: bool = False, out_dir=None) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment(device)
    print(f"end-to-end training steps on {env['device']}", flush=True)
    rows = []
    for workload, baseline in (("bert-mlm", "transformers-sdpa"), ("llama-lora", "transformers-sdpa+peft")):
        base = measure(workload, baseline, device)
        ours = measure(workload, "fastft", device)
        if base.get("ms_per_step") and ours.get("ms_per_step"):
            ours["speedup"] = base["ms_per_step"] / ours["ms_per_step"]
        rows += [base, ours]
    notes = ("Each row is one full optimizer step (forward, backward, AdamW) on random weights; "
             "speedup is the baseline's step time over fastft's, measured in this same run.")
    report("train", rows, env, COLUMNS, out_dir, plot, notes=notes)
    return rows


def main(argv=None) -> None:
    suite_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
