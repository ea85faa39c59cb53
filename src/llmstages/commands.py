"""The commands of ``llmstages`` besides the stages and ``params``: ``generate`` (answer prompts with stage
outputs, side by side), ``chat`` (a conversation in the terminal), ``compare`` (tracked runs side by side) and
``export`` (a Hugging Face checkpoint). Argument parsing only; the work is in :mod:`llmstages.generation`,
:mod:`llmstages.chat`, :mod:`llmstages.compare` and :mod:`llmstages.export`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import STAGES


def _number(kind: type, low: float, high: float | None = None, low_open: bool = False):
    """An argparse ``type``: ``kind(text)`` within ``[low, high]`` (``(low, high]`` if ``low_open``), else a
    usage error naming the value and the range."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number")
        if value < low or (low_open and value == low) or (high is not None and value > high):
            span = f"{'(' if low_open else '['}{low}, {high}]" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: expected {span}")
        return value
    return parse


def generate_cmd(argv: list[str]) -> int:
    """``llmstages generate``: a table of each stage output's answer to each prompt (exit status 0)."""
    parser = argparse.ArgumentParser(
        prog="llmstages generate", description="Answer a prompt with each given stage output, side by side.")
    parser.add_argument("prompt", nargs="+", help="prompt text(s)")
    parser.add_argument("--model", action="append", default=None,
                        help="stage output folder (repeatable); default: every one of outputs/{pretrain,sft,rlhf}")
    parser.add_argument("--max-new-tokens", type=_number(int, 1), default=48, help="at least 1 (default: %(default)s)")
    parser.add_argument("--temperature", type=_number(float, 0), default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=_number(int, 0), default=0, help="0 = off (default)")
    parser.add_argument("--top-p", type=_number(float, 0, 1, low_open=True), default=1.0,
                        help="nucleus mass in (0, 1]; 1 = off (default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for p in args.prompt:  # `llmstages generate outputs/rlhf "..."` (as `llmstages chat outputs/rlhf` takes it)
        if "\n" not in p and len(p) < 4096 and Path(p).is_dir() and any(
                (Path(p) / f).is_file() for f in ("config.json", "meta.json", "model.safetensors")):
            sys.exit(f"llmstages generate: {p!r} is a model folder, not a prompt; pass it as --model {p}")
    models = args.model or [f"outputs/{s}" for s in ("pretrain", "sft", "rlhf") if Path(f"outputs/{s}").is_dir()]
    if not models:
        sys.exit("llmstages generate: no stage output found under outputs/; run `dvc repro` or pass --model DIR")
    import torch
    from rich.console import Console
    from rich.table import Table

    from .export import is_reward_model, load_model
    from .generation import generate

    table = Table(title="llmstages generate", show_lines=True)
    table.add_column("model")
    table.add_column("prompt")
    table.add_column("response")
    for path in models:
        try:
            if is_reward_model(path):
                sys.exit(f"llmstages generate: {path} is a reward model (it scores answers, it does not write "
                         "them); pass a policy such as outputs/sft or outputs/rlhf")
            model, _, tok = load_model(path)  # a stage output or a Hugging Face Llama folder
        except (FileNotFoundError, NotADirectoryError, ValueError) as err:
            sys.exit(f"llmstages generate: {err}")
        ids, ctx = [tok.encode_prompt(p) for p in args.prompt], model.cfg.max_seq_len
        if args.max_new_tokens >= ctx:
            sys.exit(f"llmstages generate: --max-new-tokens {args.max_new_tokens} leaves no room for a prompt in "
                     f"{path}'s {ctx}-token context")
        for p, i in zip(args.prompt, ids):
            if len(i) >= ctx:  # the chat template's tokens included
                short = p if len(p) <= 40 else p[:40] + "..."
                sys.exit(f"llmstages generate: the prompt {short!r} is {len(i)} tokens in the chat template; "
                         f"{path}'s context holds {ctx} tokens, prompt and answer together")
        if (longest := max(map(len, ids))) + args.max_new_tokens > ctx:
            print(f"llmstages generate: note: {path}'s {ctx}-token context leaves {ctx - longest} token(s) for the "
                  f"answer to a {longest}-token prompt (--max-new-tokens {args.max_new_tokens})", file=sys.stderr)
        gen = torch.Generator().manual_seed(args.seed)
        g = generate(model, ids, args.max_new_tokens, tok.eos_id, tok.pad_id,
                     temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=gen)
        for p, r in zip(args.prompt, g.responses):
            table.add_row(str(path), p, tok.decode(r.tolist()))
    Console().print(table)
    return 0


def chat_cmd(argv: list[str]) -> int:
    """``llmstages chat``: a multi-turn conversation with one model (:func:`llmstages.chat.chat`)."""
    from .chat import HELP, Sampling

    d = Sampling()
    parser = argparse.ArgumentParser(
        prog="llmstages chat", description="Talk with a model in the terminal: each reply is sampled with the chat "
        "template from the whole conversation and printed as it comes. " + HELP + ".",
        epilog="example: llmstages chat outputs/rlhf --temperature 0  (input may also be piped, one message a line)")
    parser.add_argument("model", nargs="?", help="a stage output or a Hugging Face Llama folder (default: "
                        "outputs/rlhf, else outputs/sft)")
    parser.add_argument("--system", help="a system message that starts the conversation")
    parser.add_argument("--max-new-tokens", type=_number(int, 1), default=d.max_new_tokens,
                        help="reply length limit in tokens (default: %(default)s)")
    parser.add_argument("--temperature", type=_number(float, 0), default=d.temperature,
                        help="0 = greedy (default: %(default)s)")
    parser.add_argument("--top-k", type=_number(int, 0), default=d.top_k, help="0 = off (default)")
    parser.add_argument("--top-p", type=_number(float, 0, 1, low_open=True), default=d.top_p,
                        help="nucleus mass in (0, 1]; 1 = off (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=d.seed, help="sampling seed (default: %(default)s)")
    args = parser.parse_args(argv)
    path = args.model or next((f"outputs/{s}" for s in ("rlhf", "sft") if Path(f"outputs/{s}").is_dir()), None)
    if path is None:
        sys.exit("llmstages chat: no outputs/rlhf or outputs/sft here; run `dvc repro` or name a model folder")
    from .chat import chat, read_lines
    from .export import is_reward_model, load_model

    try:
        if is_reward_model(path):
            sys.exit(f"llmstages chat: {path} is a reward model (it scores answers, it does not write them); "
                     "chat with a policy such as outputs/sft or outputs/rlhf")
        model, _, tok = load_model(path)
    except (FileNotFoundError, NotADirectoryError, ValueError) as err:
        sys.exit(f"llmstages chat: {err}")
    budget = model.cfg.max_seq_len - args.max_new_tokens
    if budget < 8:
        sys.exit(f"llmstages chat: --max-new-tokens {args.max_new_tokens} leaves no room for the conversation in "
                 f"the model's {model.cfg.max_seq_len}-token context")
    if args.system and (n := len(tok.encode_prompt([{"role": "system", "content": args.system}]))) > budget - 8:
        sys.exit(f"llmstages chat: the --system message is {n} tokens in the chat template; the model's "
                 f"{model.cfg.max_seq_len}-token context less --max-new-tokens {args.max_new_tokens} leaves {budget} "
                 "for the whole conversation: shorten it")

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    write(f"chatting with {path} ({model.cfg.max_seq_len}-token context, temperature {args.temperature})\n")
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    try:
        chat(model, tok, sampling, read_lines(sys.stdin), write, system=args.system, echo=not sys.stdin.isatty())
    except KeyboardInterrupt:
        write("\n")
    return 0


def compare_cmd(argv: list[str]) -> int:
    """``llmstages compare``: tracked runs side by side (:func:`llmstages.compare.compare`)."""
    parser = argparse.ArgumentParser(
        prog="llmstages compare", description="Compare tracked stage runs: one row per run with the params that "
        "differ between them and their final metrics; optionally plot metric curves.")
    parser.add_argument("--tracking-uri", default="sqlite:///outputs/mlflow.db",
                        help="MLflow store (default: %(default)s)")
    parser.add_argument("--stage", choices=STAGES, help="only runs of this stage")
    parser.add_argument("--experiment", action="append", metavar="NAME",
                        help="MLflow experiment name (repeatable; default: all)")
    parser.add_argument("--tag", action="append", metavar="KEY=VALUE", help="only runs with this tag (repeatable)")
    status = parser.add_mutually_exclusive_group()
    status.add_argument("--status", default="FINISHED", type=str.upper,
                        choices=("FINISHED", "FAILED", "RUNNING", "KILLED", "SCHEDULED"), help="default: FINISHED")
    status.add_argument("--all-status", action="store_true", help="runs of any status (failed, running, ...)")
    parser.add_argument("--last", type=int, metavar="N", help="only the N most recent runs (after filtering)")
    parser.add_argument("--metric", action="append", metavar="NAME",
                        help="metric column, final value (repeatable; 'all': every final metric; default: per stage, "
                        "e.g. pretrain val_loss, sft exact_match_arithmetic)")
    parser.add_argument("--lineage", action="store_true", help="add the columns that trace each row to its code and "
                        "data: git commit and dirty flag, DVC experiment, sweep, inputs MD5, upstream run id")
    parser.add_argument("--format", choices=("rich", "markdown", "csv"), default="rich")
    parser.add_argument("-o", "--output", metavar="FILE", help="write the table to FILE instead of stdout")
    parser.add_argument("--plot", action="append", metavar="METRIC", help="plot this metric's history per run "
                        "(repeatable, e.g. train/lm_loss)")
    parser.add_argument("--plot-file", default="compare.png", help="PNG for --plot (default: %(default)s)")
    args = parser.parse_args(argv)
    for flag, path in (("--output", args.output), ("--plot-file", args.plot and args.plot_file)):
        if path and (Path(path).is_dir() or not Path(path).resolve().parent.is_dir()):
            sys.exit(f"llmstages compare: {flag} {path}: not a file in an existing folder")
    from .compare import CompareError, compare

    try:
        compare(tracking_uri=args.tracking_uri, stage=args.stage, experiments=args.experiment, tags=args.tag,
                status=None if args.all_status else args.status, last=args.last, metrics=args.metric,
                fmt=args.format, output=args.output, plots=args.plot, plot_file=args.plot_file,
                lineage=args.lineage)
    except CompareError as err:
        sys.exit(f"llmstages compare: {err}")
    except Exception as err:  # the store's own errors (MLflow, SQLAlchemy): one line unless LLMSTAGES_DEBUG
        if os.environ.get("LLMSTAGES_DEBUG"):
            raise
        sys.exit(f"llmstages compare: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    return 0


def export_cmd(argv: list[str]) -> int:
    """``llmstages export``: a stage output as a Hugging Face checkpoint (:func:`llmstages.export.export_hf`)."""
    parser = argparse.ArgumentParser(
        prog="llmstages export", description="Write a stage output as a Hugging Face transformers checkpoint (Llama "
        "architecture, no custom code): AutoModelForCausalLM / AutoTokenizer load it; a reward model loads as "
        "AutoModelForSequenceClassification. The chat template is in tokenizer_config.json "
        "(apply_chat_template gives llmstages' prompt ids).",
        epilog="example: llmstages export outputs/rlhf exported/rlhf  then in Python: "
               "AutoModelForCausalLM.from_pretrained('exported/rlhf')")
    parser.add_argument("output", help="a stage output folder, e.g. outputs/sft, outputs/rlhf, outputs/reward")
    parser.add_argument("folder", help="the folder to write: new, empty, or an earlier export (its files are "
                        "replaced); a folder holding other files is refused")
    args = parser.parse_args(argv)
    if Path(args.folder).resolve() == Path(args.output).resolve():
        sys.exit("llmstages export: the folder to write must differ from the stage output")
    from .cli import _check_writable
    from .export import export_hf

    _check_writable("export", Path(args.folder))
    try:
        folder = export_hf(args.output, args.folder)
    except (FileNotFoundError, NotADirectoryError, ValueError) as err:
        sys.exit(f"llmstages export: {err}")
    auto = "AutoModelForSequenceClassification" if json.loads((folder / "config.json").read_text())[
        "architectures"] == ["LlamaForSequenceClassification"] else "AutoModelForCausalLM"
    print(f"exported {args.output} -> {folder} (transformers: {auto}.from_pretrained('{folder}'))")
    return 0
