"""`python -m lora_cai.chat RUN_DIR`: chat with a run's policy in the terminal, optionally side by side with the base model.

    python -m lora_cai.chat runs/smoke                       # interactive: /reset clears the history, /quit exits
    python -m lora_cai.chat runs/smoke --base                # the base model's answer next to the policy's
    python -m lora_cai.chat runs/smoke --upto 1              # round 1's policy (base + adapter 1)
    python -m lora_cai.chat runs/smoke --prompt "Hi" --base  # one answer (or two), printed, then exit
    python -m lora_cai.chat runs/smoke --compare [--changed] # the held-out answers of every round side by side

The policy is the run's base model (4-bit unless the run said otherwise) with the adapters of the
manifest's stack applied, loaded once through `models.load_policy`. The base model's answer comes from the
same model object with every adapter switched off (`model.disable_adapter()`), so `--base` costs no
second copy in memory. Greedy by default (`--temperature 0`). Each side keeps its own multi-turn history
(the policy sees its own earlier answers, the base model its own); a conversation longer than the model's
context loses its oldest tokens.

Mistakes (not a run directory, a damaged manifest, a bad option) print one `error:` line and exit 2
before any model loads. torch, transformers and peft are imported only once the run directory checks out.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

from lora_cai.errors import UserError

COMMANDS = {"/reset": "forget the conversation so far", "/quit": "leave (or /exit, Ctrl-D)"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lora_cai.chat",
        description="Chat with a run's policy in the terminal, optionally side by side with the base model.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory made by python -m lora_cai.recipe (e.g. runs/smoke)")
    p.add_argument("--base", action="store_true",
                   help="also show the base model's answer (the same model with its adapters switched off)")
    p.add_argument("--upto", type=int, metavar="K", help="use the adapters of rounds 1..K only (default: the whole "
                                                         "stack; 0 = the base model)")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="tokens per answer (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="sampling temperature (default 0: greedy, the same answer every time)")
    p.add_argument("--prompt", metavar="TEXT", help="answer TEXT once, print the answer(s) and exit (for scripts)")
    p.add_argument("--compare", action="store_true",
                   help="print the held-out answers of the base model and of each round side by side, with the "
                        "evaluation's refusal verdicts (read from the run; no model loads)")
    p.add_argument("--changed", action="store_true",
                   help="with --compare: only the prompts whose answer changed or whose verdict flipped")
    return p


# --------------------------------------------------------------------------------------------------
# Checks that need no heavy import
# --------------------------------------------------------------------------------------------------

def finished_run(run_dir: str | Path, upto: int | None = None) -> dict:
    """The run's manifest, after checking the directory, the manifest and the adapters `upto` needs."""
    root = Path(run_dir)
    hint = "give the output directory of a run made by python -m lora_cai.recipe, e.g. runs/smoke"
    if not root.exists():
        raise UserError(f"{root}: no such directory; {hint}")
    if not root.is_dir():
        raise UserError(f"{root}: not a directory; {hint}")
    path = root / "manifest.json"
    if not path.is_file():
        raise UserError(f"{root}: no manifest.json, so not a lora_cai run directory (or no round has started); {hint}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path}: not a readable run manifest ({type(e).__name__}); the file is damaged: "
                        f"rerun the recipe to rewrite it") from None
    model = manifest.get("model") if isinstance(manifest, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("name"), str):
        raise UserError(f"{path}: key 'model.name' missing, so the base model is unknown; the file is damaged: "
                        f"rerun the recipe to rewrite it")
    stack = manifest.get("stack", [])
    if not isinstance(stack, list) or not all(isinstance(s, str) for s in stack):
        raise UserError(f"{path}: key 'stack' must be a list of adapter folders; the file is damaged: "
                        f"rerun the recipe to rewrite it")
    if upto is not None and not 0 <= upto <= len(stack):
        raise UserError(f"--upto {upto}: {root} has {len(stack)} finished round(s); give 0..{len(stack)}")
    for rel in stack[:upto] if upto is not None else stack:
        if not (root / rel / "adapter_config.json").is_file():
            raise UserError(f"{root / rel}: adapter listed in manifest.json 'stack' is missing or damaged; restore "
                            f"it, or chat with the earlier rounds only (--upto)")
    return manifest


def _check_options(args) -> None:
    if args.max_new_tokens <= 0:
        raise UserError(f"--max-new-tokens {args.max_new_tokens}: must be a positive number of tokens, e.g. 256")
    if args.temperature < 0:
        raise UserError(f"--temperature {args.temperature:g}: must be >= 0 (0 = greedy)")
    if args.prompt is not None and not args.prompt.strip():
        raise UserError("--prompt: empty; give the text to answer, e.g. --prompt \"How do I bake bread?\"")


# --------------------------------------------------------------------------------------------------
# The conversation
# --------------------------------------------------------------------------------------------------

class ChatSession:
    """A loaded policy and one conversation per side (policy, and base with `--base`)."""

    def __init__(self, model, tokenizer, *, with_base: bool = False, max_new_tokens: int = 256,
                 temperature: float = 0.0):
        self.model, self.tokenizer = model, tokenizer
        # A model without adapters (an empty stack, --upto 0) is its own base: nothing to compare.
        self.with_base = with_base and hasattr(model, "disable_adapter")
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.reset()

    def reset(self) -> None:
        self.history: dict[str, list[dict]] = {"policy": [], "base": []}
        self.turns = 0

    def _answer(self, messages: list[dict], side: str) -> str:
        import contextlib

        from lora_cai.engine.generation import generate, render_chat

        off = self.model.disable_adapter() if side == "base" else contextlib.nullcontext()
        with off:
            (text,) = generate(self.model, self.tokenizer, [render_chat(self.tokenizer, messages)],
                               max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                               top_p=0.9 if self.temperature > 0 else 1.0, seed=self.turns,
                               on_too_long="truncate")
        return text or ""

    def ask(self, text: str) -> dict[str, str]:
        """Answer `text` on each side, extending each side's history; {"policy": ..., "base": ...}."""
        sides = ["policy", "base"] if self.with_base else ["policy"]
        out = {}
        for side in sides:
            messages = self.history[side] + [{"role": "user", "content": text}]
            out[side] = self._answer(messages, side)
            self.history[side] = messages + [{"role": "assistant", "content": out[side]}]
        self.turns += 1
        return out


def _labels(manifest: dict, upto: int | None) -> dict[str, str]:
    stack = manifest.get("stack", [])
    stack = stack if upto is None else stack[:upto]
    name = manifest["model"]["name"]
    policy = (f"policy ({name} + {len(stack)} adapter{'s' if len(stack) != 1 else ''}: {', '.join(stack)})"
              if stack else f"policy ({name}, no adapters)")
    return {"policy": policy, "base": f"base ({name}, adapters off)"}


def _plain(text: str, style: str = ""):
    """A rich Text: printed as is (no markup parsing, so brackets in answers stay)."""
    from rich.text import Text

    return Text(text, style=style)


def print_answers(console, answers: dict[str, str], labels: dict[str, str]) -> None:
    """Side by side in a wide terminal, else one labelled block per side; piped output gets the exact texts."""
    from rich.table import Table
    from rich.text import Text

    if not console.is_terminal:  # a script reads this: no styling, no wrapping, nothing stripped
        for i, side in enumerate(answers):
            if len(answers) > 1:
                console.file.write(("\n" if i else "") + labels[side] + ":\n")
            console.file.write(answers[side] + "\n")
        console.file.flush()
        return
    if len(answers) > 1 and console.is_terminal and console.width >= 100:
        table = Table(show_header=True, header_style="bold", expand=True, show_lines=False)
        for side in answers:
            table.add_column(Text(labels[side]), ratio=1, overflow="fold")
        table.add_row(*(Text(answers[side]) for side in answers))
        console.print(table)
        return
    for i, side in enumerate(answers):
        if len(answers) > 1:
            if i:
                console.print()
            console.print(Text(labels[side] + ":", style="bold"), soft_wrap=True)
        console.print(Text(answers[side]), soft_wrap=True)


def interactive(session: ChatSession, console, labels: dict[str, str]) -> None:
    from rich.prompt import Prompt

    console.print(_plain(f"chatting with {labels['policy']}"
                        + (f", side by side with the {labels['base']}" if session.with_base else "")
                        + "; " + ", ".join(f"{c} to {h}" for c, h in COMMANDS.items())), soft_wrap=True)
    while True:
        try:
            text = Prompt.ask("[bold cyan]you[/]", console=console)
        except EOFError:
            console.print()
            return
        command = text.strip().lower()
        if not command:
            continue
        if command in ("/quit", "/exit", "/q"):
            return
        if command == "/reset":
            session.reset()
            console.print(_plain("(conversation reset)", style="dim"))
            continue
        if command.startswith("/"):
            console.print(_plain(f"unknown command {text.strip()}; " + ", ".join(f"{c} to {h}" for c, h in COMMANDS.items()),
                                style="yellow"), soft_wrap=True)
            continue
        print_answers(console, session.ask(text), labels)


def compare_rows(run_dir: Path, manifest: dict, changed_only: bool = False) -> tuple[list[int], list[tuple[str, list[dict]]]]:
    """The policies evaluated (0: base) and the held-out prompts per set with every policy's answer and verdicts
    (`report.side_by_side`, read from the run's evaluations); with `changed_only`, the changed prompts only."""
    from lora_cai.export.dataset import heldout_answers
    from lora_cai.report.blocks import side_by_side

    policies, groups = side_by_side(heldout_answers(run_dir, sorted(int(k) for k in manifest.get("rounds", {}))))
    groups = [(title, [r for r in rows if r["changed"] or not changed_only]) for title, rows in groups]
    return policies, [(title, rows) for title, rows in groups if rows]


def print_compare(console, run_dir: Path, manifest: dict, changed_only: bool, max_chars: int = 400) -> int:
    from rich.table import Table

    from lora_cai.report.blocks import refusal_label

    policies, groups = compare_rows(run_dir, manifest, changed_only)
    if not policies:
        raise UserError(f"{run_dir}: no evaluation yet (no baseline-eval.json or round eval.json); run the recipe "
                        f"until a round has been evaluated")
    for title, group in groups:
        table = Table(title=f"{title} ({len(group)})", show_lines=True, expand=True)
        table.add_column("prompt", ratio=1)
        for k in policies:
            table.add_column("base" if k == 0 else f"round {k}", ratio=2)
        for r in group:
            cells = []
            for k in policies:
                cell = r["cells"].get(k, {})
                answer = cell.get("answer")
                text = "" if answer is None else (answer if len(answer) <= max_chars else answer[:max_chars] + "…")
                cells.append(_plain(f"{refusal_label(cell)}\n", "bold") + _plain(text))
            table.add_row(_plain(r["prompt"]), *cells)
        console.print(table)
    shown = sum(len(group) for _, group in groups)
    console.print(_plain(f"{shown} prompts" + (" whose answer or verdict changed" if changed_only else "")))
    return 0


def _main(args) -> int:
    _check_options(args)
    if args.changed and not args.compare:
        raise UserError("--changed filters --compare; add --compare")
    if args.compare:
        if args.prompt is not None or args.base or args.upto is not None:
            raise UserError("--compare prints the run's stored held-out answers; drop --prompt, --base and --upto")
        from rich.console import Console

        manifest = finished_run(args.run_dir)
        return print_compare(Console(highlight=False), Path(args.run_dir), manifest, args.changed)
    manifest = finished_run(args.run_dir, args.upto)
    from rich.console import Console

    from lora_cai.engine.models import load_policy

    err = Console(stderr=True, highlight=False)
    labels = _labels(manifest, args.upto)
    err.print(_plain(f"loading {labels['policy']} ..."), soft_wrap=True)
    model, tokenizer = load_policy(args.run_dir, upto=args.upto)
    session = ChatSession(model, tokenizer, with_base=args.base, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature)
    if args.base and not session.with_base:
        err.print(_plain("--base: this policy has no adapters, so it is the base model; showing one answer"))
    out = Console(highlight=False)
    if args.prompt is not None:
        print_answers(out, session.ask(args.prompt), labels)
    else:
        interactive(session, out, labels)
    return 0


def main(argv: list[str] | None = None) -> int:
    from lora_cai.cli import main as cli_main

    return cli_main(build_parser(), _main, argv)


# `lora_cai.chat(...)` is also the package's one-answer function (lora_cai/__init__.py). Importing this module
# makes Python rebind the package attribute `chat` to the module; the module stays callable and forwards to that
# function, so `lora_cai.chat(run_dir, prompt)` keeps working either way.
_package = sys.modules.get(__package__ or "")
_api_chat = getattr(_package, "chat", None)
if isinstance(_api_chat, types.ModuleType) or not callable(_api_chat):
    _api_chat = getattr(_api_chat, "_api_chat", None)


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        if _api_chat is None:
            raise TypeError("lora_cai.chat: the package's chat() function is unavailable")
        return _api_chat(*args, **kwargs)


if __name__ != "__main__":
    sys.modules[__name__].__class__ = _CallableModule


if __name__ == "__main__":
    sys.exit(main())
