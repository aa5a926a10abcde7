"""The example report of README "Fewer labels, and an audit of what was learned": every
file in this directory comes from running this script (CPU, a few minutes on 2 cores).

    python docs/active-audit/make_example.py            # writes docs/active-audit/{simulation,audit}/

It builds a tiny BERT (1 layer, hidden 32, random initialisation: no download, no
pretraining) and generated data, then runs the commands the README shows:

1. ``fastft active --simulate``: a pool where one topic is rare (10% "b"), a balanced test
   set; learning curves of random, entropy and BADGE over 5 seeds -> simulation/.
2. ``fastft finetune`` twice on a biased set (a spurious adjective goes with the topic in
   90% of the rows, against it in the other 10%, column ``group``): plain, and with
   ``balance_by=group``; both with ``calibrate=true``.
3. ``fastft eval --slice-by group --compare <plain> --ood shifted --calibration
   --swap-terms pairs.txt --report-dir audit/`` on the balanced bundle, and the probe on
   the plain one -> audit/.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from _finetune_fixtures import biased_rows, rare_class_rows  # noqa: E402 - the tests' own tasks


def write(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def run(argv, log):
    from fastft import cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = cli.main(argv)
    log.write("$ fastft " + " ".join(argv) + "\n" + out.getvalue() + "\n")
    if status:
        raise SystemExit(f"fastft {' '.join(argv)} failed ({status})")
    return out.getvalue()


def main():
    import torch
    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from _tiny_models import bert_config

    work = tempfile.mkdtemp(prefix="fastft-example-")
    tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.join(ROOT, "tests", "data", "toy_bert_tokenizer"))
    base = os.path.join(work, "base")
    torch.manual_seed(0)
    transformers.BertForMaskedLM(bert_config(len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=64, max_position_embeddings=128)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    for name in ("simulation", "audit"):
        shutil.rmtree(os.path.join(HERE, name), ignore_errors=True)
    log = open(os.path.join(HERE, "commands.txt"), "w")

    # 1. simulate: which strategy, on labels already known?
    pool = write(os.path.join(work, "pool.jsonl"), rare_class_rows(400, 1, 0.1))
    test = write(os.path.join(work, "test.jsonl"), rare_class_rows(200, 2, 0.5))
    run(["active", "--simulate", "--model", base, "--pool", pool, "--test", test, "--strategies", "random", "entropy",
         "badge", "--seeds", "0", "1", "2", "3", "4", "--initial", "10", "--k", "10", "--rounds", "5", "--output-dir",
         os.path.join(HERE, "simulation"), "max_steps=24", "lr=1e-2", "batch_size=16", "fused=false",
         "balance_by=label", "balance=reweight", "progress=false"], log)
    shutil.rmtree(os.path.join(HERE, "simulation", "runs"), ignore_errors=True)
    os.remove(os.path.join(HERE, "simulation", "curves.jsonl"))  # the per-round record (labelled indices): large

    # 2. fine-tune on a biased set, plain and balanced, with a temperature fitted on validation
    files = {name: write(os.path.join(work, f"{name}.jsonl"), rows) for name, rows in (
        ("train", biased_rows(200, 1, 0.1)), ("validation", biased_rows(100, 3, 0.1)), ("test", biased_rows(200, 2, 0.5)))}
    rng = random.Random(4)
    shifted = [{"text": f"{rng.choice(['the', 'one'])} {rng.choice(['careful', 'sleepy', 'enormous'])} "
                        f"{rng.choice(['elephant', 'scientist', 'river', 'mountaineer'])} "
                        f"{rng.choice(['admires', 'follows'])} a {rng.choice(['quick', 'unbelievable'])} "
                        f"{rng.choice(['elephant', 'scientist', 'river'])} ."} for _ in range(100)]
    files["shifted"] = write(os.path.join(work, "shifted.jsonl"), shifted)  # words the task never uses
    with open(os.path.join(work, "pairs.txt"), "w") as f:
        f.write("# the spurious adjectives, then two core words of the topics\nred,tiny\ndog,cat\n")
    bundles = {}
    for name, extra in (("plain", ["slice_by=group"]), ("balanced", ["balance_by=group"])):
        out = os.path.join(work, name)
        run(["finetune", "--model", base, "--train", files["train"], "--eval", f"validation={files['validation']}",
             f"test={files['test']}", f"output_dir={out}", "epochs=4", "lr=1e-2", "batch_size=16", "fused=false",
             "calibrate=true", "progress=false", "plot=false", *extra], log)
        bundles[name] = os.path.join(out, "finetuned")

    # 3. the audit: slices before / after, OOD, calibration, the counterfactual probe
    data = ["--data", f"test={files['test']}", f"shifted={files['shifted']}"]
    run(["eval", "--model", bundles["balanced"], *data, "--compare", bundles["plain"], "--slice-by", "group",
         "--ood", "shifted", "--calibration", "--swap-terms", os.path.join(work, "pairs.txt"), "--report-dir",
         os.path.join(HERE, "audit")], log)
    run(["eval", "--model", bundles["plain"], *data, "--ood", "shifted", "--calibration", "--swap-terms",
         os.path.join(work, "pairs.txt")], log)
    log.close()
    text = open(os.path.join(HERE, "commands.txt")).read().replace(work, "<work>").replace(HERE, "docs/active-audit")
    with open(os.path.join(HERE, "commands.txt"), "w") as f:
        f.write(text)
    for name in ("report.md", "report.json"):
        path = os.path.join(HERE, "audit", name)
        with open(path) as f:
            content = f.read().replace(work, "<work>").replace(HERE, "docs/active-audit")
        with open(path, "w") as f:
            f.write(content)
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
