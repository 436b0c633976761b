"""The ``engramlm`` command line: one sub-module per command group, each exposing ``register``.

Each command module defines ``register(subparsers)`` which adds its parser(s) and sets
``func`` (a callable taking the parsed ``argparse.Namespace`` and returning an exit code).

Every failure ends in exactly one line on stderr, never a traceback, mapped here once for all
commands (library code raises, it never exits):

* an :class:`EngramError` (bad config, corrupt or foreign file, ...): its message, exit 2;
* an ``OSError`` (missing file, permission, full disk, read-only file system, file too large):
  the path and what the system said, exit 1;
* a ``UnicodeDecodeError``: the file (when known) that is not UTF-8, exit 2;
* Ctrl-C: ``interrupted``, exit 130 (``train`` saves a checkpoint first and prints how to resume);
* anything else is a bug: one line naming the exception and ``ENGRAMLM_DEBUG=1``, which re-raises it
  with its traceback, exit 70.

Numeric options are checked at the edge too (:func:`check_numeric_options`): ``--threads 0`` is an
argparse usage error naming the option, not a failure deep inside torch.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from engramlm import __version__
from engramlm.errors import EngramError

# Command modules, in help order. A module missing here is simply not offered.
COMMAND_MODULES = (
    "engramlm.cli.demo_cmd",
    "engramlm.cli.hash_cmd",
    "engramlm.cli.info_cmd",
    "engramlm.cli.data_cmd",
    "engramlm.cli.store_cmd",
    "engramlm.cli.train_cmd",
    "engramlm.cli.eval_cmd",
    "engramlm.cli.plot_cmd",
    "engramlm.cli.analyze_cmd",
    "engramlm.cli.generate_cmd",
    "engramlm.cli.export_hf_cmd",
    "engramlm.cli.serve_cmd",
)

EXIT_OS_ERROR = 1
EXIT_USAGE = 2
EXIT_BUG = 70  # sysexits EX_SOFTWARE
EXIT_INTERRUPTED = 130

# The allowed range of every int/float option, by its dest. An option missing here fails
# tests/test_cli_faults.py until it is classified, so a new option cannot skip the edge check.
POSITIVE = frozenset(
    {
        "accel_tflops",
        "batch",
        "batch_size",
        "dedup",
        "limit",
        "max_batch",
        "max_batches",
        "max_bytes",
        "max_examples",
        "max_len",
        "max_new_tokens",
        "max_queue",
        "max_tokens",
        "mfu",
        "mooncake_segment_mb",
        "page_bytes",
        "prefill_tokens",
        "ref_bytes_per_s",
        "ref_iops",
        "seq_len",
        "threads",
        "tokens_per_s",
        "top_p",
        "unique_fraction",
        "vocab_size",
        "workers",
        "zipf_s",
        "zipf_types",
    }
)
NON_NEGATIVE = frozenset({"cache_mb", "drain_timeout", "port", "seed", "smooth", "temperature", "top_k"})
ANY_VALUE = frozenset({"position"})


def _ranged(kind: type, positive: bool) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)  # a ValueError here is argparse's "invalid int value"
        if value != value or (value <= 0 if positive else value < 0):  # NaN, or out of range
            raise argparse.ArgumentTypeError(f"must be {'> 0' if positive else '>= 0'}, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in "invalid int value"
    return parse


def iter_actions(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple[str, argparse.Action]]:
    """Every option of ``parser`` and its sub-commands, as ``("data prepare", action)``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from iter_actions(sub, (*path, name))
        else:
            yield " ".join(path), action


def check_numeric_options(parser: argparse.ArgumentParser) -> None:
    """Give every plain ``int``/``float`` option its range (``POSITIVE`` / ``NON_NEGATIVE``)."""
    for _, action in iter_actions(parser):
        if action.type in (int, float) and action.dest not in ANY_VALUE:
            if action.dest in POSITIVE:
                action.type = _ranged(action.type, positive=True)
            elif action.dest in NON_NEGATIVE:
                action.type = _ranged(action.type, positive=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engramlm", description="Engram conditional memory: hashing, models, stores.")
    parser.add_argument("--version", action="version", version=f"engramlm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.register(sub)
    check_numeric_options(parser)
    return parser


def describe_os_error(exc: OSError) -> str:
    """``PATH: what the system said`` (both paths of a rename/copy), with a hint for a full disk."""
    reason = os.strerror(exc.errno) if exc.errno else (exc.strerror or str(exc) or type(exc).__name__)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        reason += " (the disk or the file-size limit is full: free space and rerun; finished files are intact)"
    names = [str(n) for n in (exc.filename, exc.filename2) if n is not None]
    if exc.errno in (errno.ENOTDIR, errno.EEXIST) and names:  # a file where a directory must be
        blocker = next((p for p in (Path(names[0]), *Path(names[0]).parents) if p.is_file()), None)
        if blocker is not None:
            where = "" if str(blocker) == names[0] else f" ({names[0]})"
            return f"{blocker} is a file where a directory is needed{where}: move it or choose another path"
    return f"{' -> '.join(names)}: {reason}" if names else reason


def describe_decode_error(exc: UnicodeDecodeError) -> str:
    where = getattr(exc, "path", None) or _decoding_file(exc)
    what = f"{where}: " if where else ""
    return f"{what}not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}): convert it to UTF-8"


def _decoding_file(exc: BaseException) -> str | None:
    """The file being read when ``exc`` was raised: the innermost frame holding an open text file."""
    tb, found = exc.__traceback__, None
    while tb is not None:
        for value in tb.tb_frame.f_locals.values():
            name = getattr(value, "name", None)
            if hasattr(value, "encoding") and hasattr(value, "read") and isinstance(name, str):
                found = name
        tb = tb.tb_next
    return found


def _error(message: str) -> None:
    print(f"engramlm: error: {' '.join(message.split())}", file=sys.stderr)  # exactly one line


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        parser = build_parser()  # imports every command module: seconds, so Ctrl-C may land here
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        print("engramlm: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # e.g. piped into `head`: the reader is gone, which is not an error
        # (Python's documented recipe) point stdout at /dev/null so the flush at exit cannot fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("engramlm: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except EngramError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except UnicodeDecodeError as exc:
        _error(describe_decode_error(exc))
        return EXIT_USAGE
    except OSError as exc:
        _error(describe_os_error(exc))
        return EXIT_OS_ERROR
    except MemoryError:
        _error("out of memory: use a smaller model, batch or sequence length")
        return EXIT_OS_ERROR
    except Exception as exc:  # a bug: say so in one line, keep the traceback one env var away
        if os.environ.get("ENGRAMLM_DEBUG", "") not in ("", "0"):
            raise
        _error(
            f"internal error: {type(exc).__name__}: {exc} (a bug: please report it; "
            "rerun with ENGRAMLM_DEBUG=1 for the traceback)"
        )
        return EXIT_BUG


if __name__ == "__main__":
    raise SystemExit(main())
