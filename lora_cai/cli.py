"""The one command-line wrapper of every entry point (`recipe`, `train`, `chat`, `export`, `report`, `serve`):
argument errors, user mistakes, a full disk and out-of-memory each end in one `error:` line with exit code 2;
Ctrl-C ends with 130. Anything else is a bug and keeps its traceback."""

from __future__ import annotations

import errno
import sys
from typing import Callable

from lora_cai.errors import UserError

OOM_ADVICE = ("run the same command with --dry-run to see the memory plan, then lower sft.batch_size / "
              "dpo.batch_size (raise grad_accum), max_length or lora.r, or set vram_gb to your card and rerun "
              "(committed work is kept)")


def main(parser, body: Callable, argv: list[str] | None = None, *, interrupted: str = "",
         oom_advice: str = "free GPU memory (another process or notebook cell may hold it) and rerun") -> int:
    """Parse `argv` with `parser` and return `body(args)` (0 when it returns None) as the process's exit code.

    `body` may set `args.writes_to` to the directory it writes into, so a library that fills the disk without
    saying so (torch.save: "unexpected pos") is still reported as a full disk.
    """
    prog = parser.prog

    def _one_line(message: str):  # argparse's own errors print usage + error (two lines); keep the one-line promise
        raise UserError(f"{message} (see {prog} --help)")

    parser.error = _one_line
    args = None
    try:
        args = parser.parse_args(argv)
        code = body(args)
        return 0 if code is None else code
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    except Exception as e:
        full = disk_full(e)
        writes_to = getattr(args, "writes_to", None)
        if full is None and writes_to is not None and nearly_full(writes_to):
            full = ""  # libraries that hit ENOSPC mid-file do not always say so (torch.save: "unexpected pos")
        if full is not None:
            print(f"error: disk full while writing {full or 'the run directory'}: free some space and rerun the same "
                  f"command (committed work is kept)", file=sys.stderr)
            return 2
        if type(e).__name__ != "OutOfMemoryError":
            raise
        print(f"error: the GPU ran out of memory; {oom_advice}", file=sys.stderr)
        return 2


def disk_full(exc: BaseException) -> str | None:
    """The file being written when the disk filled ('' if unknown), or None when `exc` is not a full disk.

    Libraries wrap ENOSPC in their own errors (safetensors: SafetensorError "... (os error 28)").
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return exc.filename or ""
        if "No space left on device" in str(exc):
            return ""
        exc = exc.__cause__ or exc.__context__
    return None


def nearly_full(path) -> bool:
    """Less than 1 MiB free on the filesystem of `path`."""
    import shutil

    try:
        return shutil.disk_usage(path).free < (1 << 20)
    except OSError:
        return False
