"""``fastft eval``: held-out loss and perplexity of a language model on text, or a
fine-tuning bundle's task metrics on labelled sets.

    fastft eval --model runs/bert/final --data held_out.txt
    fastft eval --model runs/fastft/finetuned --data test=test.jsonl ood=ood.jsonl
    fastft eval --model runs/fastft/finetuned --data test=test.jsonl news=news.jsonl --ood news \
        --slice-by dialect --calibration --swap-terms pairs.txt --report-dir audit/     # fastft.audit
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from fastft.errors import loading
from fastft.finetuning.bundle import BUNDLE_FILE, load_finetuned
from fastft.models.loading import load_pretrained, new_head_weights
from fastft.finetuning.evaluation import evaluate_sets
from fastft.recipes.finetune import named_sets
from fastft.train.evaluation import evaluate
from fastft.train.objectives import objective_for
from fastft.train.runtime import resolve_device

__all__ = ["main"]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fastft eval",
        description="Held-out loss and perplexity of a checkpoint or exported model on a text set; for a "
        "fine-tuning bundle (fastft finetune's …/finetuned), the task's metrics on labelled sets.",
    )
    parser.add_argument("--model", required=True, help="a fastft checkpoint directory, an export (final/), or a Hub name")
    parser.add_argument("--data", required=True, nargs="+",
                        help="text file(s) (.txt/.json/.jsonl/.csv/.parquet) or a Hub name; for a bundle: labelled "
                             "files, NAME=PATH to name them")
    parser.add_argument("--objective", choices=["mlm", "clm", "mlm+nsp"], help="default: from the model's architecture")
    parser.add_argument("--tokenizer", help="default: --model")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--no-packing", action="store_true", help="pad per batch instead of packing")
    parser.add_argument("--txt-mode", choices=["line", "paragraph"], default="line")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-batches", type=int)
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0, help="seeds the evaluation masks (masked-LM)")
    parser.add_argument("--output", help="also write the metrics as JSON to this file")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    audit = parser.add_argument_group("audit of a classification bundle (fastft.audit)")
    audit.add_argument("--slice-by", metavar="COLUMN", help="metrics per value of COLUMN with bootstrap intervals, "
                       "worst slice, gaps, parity / opportunity differences (binary tasks)")
    audit.add_argument("--ood", nargs="+", default=[], metavar="NAME",
                       help="sets (names from --data) that are out of distribution: MSP / energy AUROC and FPR@95%%TPR")
    audit.add_argument("--in-distribution", metavar="NAME", help="the set OOD sets are told apart from (default: the "
                       "first set not in --ood)")
    audit.add_argument("--calibration", action="store_true", help="expected calibration error per set (with "
                       "--report-dir: reliability diagrams)")
    audit.add_argument("--swap-terms", metavar="FILE", help="counterfactual probe: 'term,term' per line")
    audit.add_argument("--compare", metavar="BUNDLE", help="another bundle (e.g. trained without balance_by): its "
                       "slice report beside this one's")
    audit.add_argument("--report-dir", metavar="DIR", help="write report.md, report.json, reliability-<set>.png here")
    audit.add_argument("--overwrite", action="store_true", help="replace a report already in --report-dir")
    audit.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples per slice")
    audit.add_argument("--min-slice", type=int, default=30, help="slices with fewer rows are flagged small")
    audit.add_argument("--positive", help="the positive label of a binary task (default: the second label)")
    args = parser.parse_args(argv)
    bundle = os.path.exists(os.path.join(args.model, BUNDLE_FILE))
    if not bundle and any((args.slice_by, args.ood, args.calibration, args.swap_terms, args.compare, args.report_dir)):
        raise ValueError(f"{args.model} is not a fine-tuning bundle ({BUNDLE_FILE} not found): the audit flags "
                         "(--slice-by, --ood, --calibration, --swap-terms, --compare, --report-dir) need one")
    result = _evaluate_bundle(args) if bundle else _evaluate_language_model(args)
    markdown = result.pop("audit_markdown", None)  # slices, probes: printed below the table
    text = json.dumps(result, indent=2, default=str)
    print(text if args.json else _table(result) + (f"\n\n{markdown}" if markdown else ""))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0


def _evaluate_language_model(args) -> dict:
    import transformers

    with loading("model", args.model):
        hf_config = transformers.AutoConfig.from_pretrained(args.model)
    objective = args.objective or objective_for(hf_config)
    auto = {
        "mlm": transformers.AutoModelForMaskedLM,
        "clm": transformers.AutoModelForCausalLM,
        "mlm+nsp": transformers.AutoModelForPreTraining,
    }[objective]
    model, missing = load_pretrained(auto, args.model)
    model.to(resolve_device(args.device))
    fresh = new_head_weights(model, missing)
    warning = None
    if fresh:
        warning = (f"{args.model} has no pretrained {objective} head ({', '.join(fresh[:3])} ... initialised at random): "
                   "this perplexity is a random head's and says nothing about the model")
        print(f"fastft eval: WARNING: {warning}", file=sys.stderr)
    with loading("tokenizer", args.tokenizer or args.model):
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    metrics = evaluate(
        model,
        args.data if len(args.data) > 1 else args.data[0],
        objective,
        tokenizer=tokenizer,
        batch_size=args.batch_size,
        max_batches=args.max_batches,
        precision=args.precision,
        seed=args.seed,
        block_size=args.block_size,
        packing=not args.no_packing,
        txt_mode=args.txt_mode,
        text_column=args.text_column,
    )
    return {"model": args.model, "objective": objective, **metrics, **({"warning": warning} if warning else {})}


def _evaluate_bundle(args) -> dict:
    """The task's metrics on labelled sets, from a fine-tuning bundle."""
    audit = any((args.slice_by, args.ood, args.calibration, args.swap_terms, args.compare, args.report_dir))
    if not audit:
        for flag in ("in_distribution", "positive"):
            if getattr(args, flag):
                raise ValueError(f"--{flag.replace('_', '-')} belongs to an audit (--slice-by, --ood, --calibration ...)")
    sets = named_sets(args.data)
    if audit:  # what needs no model, first: a refusal costs no work and writes nothing
        from fastft.audit.report import check_audit_inputs, labelled_sets

        check_audit_inputs(sets, ood=args.ood, in_distribution=args.in_distribution, swap_terms=args.swap_terms,
                           report_dir=args.report_dir, overwrite=args.overwrite)
    model, tokenizer, task = load_finetuned(args.model, device=resolve_device(args.device))
    labelled = list(sets)
    if audit:
        labelled = labelled_sets(task, sets, args.ood)  # an OOD set may come without labels
    for name in labelled:
        task.check_columns(sets[name], name)
        task.check_labels(sets[name], name)
    if not audit:
        return {"model": args.model, "task": task.name,
                "sets": evaluate_sets(model, tokenizer, task, sets, batch_size=args.batch_size)}
    from fastft.audit.report import audit as audit_sets

    options = dict(slice_by=args.slice_by, ood=args.ood, in_distribution=args.in_distribution,
                   swap_terms=args.swap_terms, calibration=args.calibration, n_bootstrap=args.bootstrap,
                   min_slice=args.min_slice, positive=args.positive, seed=args.seed, batch_size=args.batch_size)
    before = None
    if args.compare:  # first: a bad second bundle leaves nothing written
        before = audit_sets(args.compare, sets, device=resolve_device(args.device), **{**options, "swap_terms": None})
    report = audit_sets(model, sets, tokenizer=tokenizer, task=task, report_dir=args.report_dir,
                        overwrite=args.overwrite, compare=before, **options)
    metrics = evaluate_sets(model, tokenizer, task, {n: sets[n] for n in labelled}, batch_size=args.batch_size)
    for name, columns in report.columns.items():
        metrics.setdefault(name, {}).update({k: v for k, v in columns.items() if k != "accuracy" or name not in labelled})
    markdown = report.markdown(compare=before, table=False)
    if before is not None:
        markdown = f"before: {args.compare}; after: {args.model}\n\n{markdown}"
    result = {"model": args.model, "task": task.name, "sets": metrics, "audit": report.as_dict(),
              "audit_markdown": markdown}
    if before is not None:
        result["compare"] = {"model": args.compare, "audit": before.as_dict()}
    return result


def _table(result: dict) -> str:
    """The metrics as a markdown table: one row per labelled set (a bundle), or metric / value."""
    if "sets" in result:
        names = sorted({k for m in result["sets"].values() for k, v in m.items()
                        if isinstance(v, (int, float)) and not k.startswith("num_")})
        lines = [f"model {result['model']} ({result['task']})", "",
                 "| set | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for name, metrics in result["sets"].items():
            cells = [f"{metrics[n]:.4g}" if isinstance(metrics.get(n), (int, float)) else "" for n in names]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        return "\n".join(lines)
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in result.items()]
    return "\n".join(lines)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
