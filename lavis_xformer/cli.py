"""One command line: ``lavis-xformer COMMAND [ARGS]`` (or ``python -m lavis_xformer COMMAND``).

Each command is the module that has always run it (``python -m lavis_xformer.train`` ...), imported only when named,
with its own arguments; ``lavis-xformer COMMAND --help`` shows them and examples. A user error (a bad config, a
missing file, a checkpoint that does not fit) prints one ``error:`` line per problem and exits 1; ``--debug`` (before
the command) shows the traceback instead. Repeated identical log warnings are shown once.
"""

import importlib
import logging
import os
import sys
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple


class Command(NamedTuple):
    modules: Tuple[str, ...]  # the first that imports runs the command (``experiment`` may live in either place)
    function: str
    summary: str
    examples: str
    prefix: Tuple[str, ...] = ()  # arguments put before the user's (export / inspect: the checkpoints sub-command)


COMMANDS: Dict[str, Command] = {
    "train": Command(("lavis_xformer.train",), "main", "train with a LAVIS run yaml (runs `check` first)", """
  lavis-xformer train --cfg-path projects/xformer/demo/pretrain_stage1_shapes.yaml --options run.max_iters=2
  lavis-xformer train --cfg-path projects/xformer/demo/pretrain_stage1_shapes.yaml --options run.resume_ckpt_path=auto
  torchrun --nproc_per_node=8 -m lavis_xformer train --cfg-path projects/xformer/train/pretrain_stage1.yaml"""),
    "evaluate": Command(("lavis_xformer.evaluate",), "main", "evaluate a checkpoint on a yaml's test splits", """
  lavis-xformer evaluate --cfg-path projects/xformer/demo/ret_shapes_eval.yaml --options model.finetuned=CKPT.pth"""),
    "check": Command(("lavis_xformer.check",), "main", "check a run yaml: config, data, checkpoints, hub, memory", """
  lavis-xformer check --cfg-path projects/xformer/train/pretrain_stage2_opt2.7b.yaml
  lavis-xformer check --cfg-path projects/xformer/demo/vqa_ft_shapes.yaml --options model.pretrained=CKPT.pth"""),
    "export": Command(("lavis_xformer.checkpoints.cli",), "main", "export a checkpoint (safetensors file or folder)", """
  lavis-xformer export output/.../checkpoint_1.pth my_xformer/        # config.json + model.safetensors + card
  lavis-xformer export output/.../checkpoint_1.pth my_xformer/ --trainable-only --max-shard-size 2GB
  lavis-xformer export output/.../checkpoint_1.pth my_xformer/ --push-to-hub me/my-xformer   # trainable only
  lavis-xformer export output/.../checkpoint_1.pth weights.safetensors --trainable-only""", ("export",)),
    "inspect": Command(("lavis_xformer.checkpoints.cli",), "main", "summarise a checkpoint (read safely)", """
  lavis-xformer inspect output/xformer/demo/pretrain_stage1_shapes/JOB/checkpoint_1.pth""", ("inspect",)),
    "compare": Command(("lavis_xformer.analysis.compare",), "main", "X-Former vs BLIP-2 on equal footing", """
  lavis-xformer compare --help   (the options name the checkpoints and benchmarks to compare)"""),
    "params": Command(("lavis_xformer.analysis.params",), "main", "trainable/frozen parameters of every type", """
  lavis-xformer params
  lavis-xformer params --json"""),
    "bench": Command(("lavis_xformer.analysis.bench",), "main", "speed and memory against BLIP-2 in one run", """
  lavis-xformer bench --help"""),
    "demo": Command(("lavis_xformer.demo.__main__",), "main", "the whole pipeline at demo scale (make demo)", """
  lavis-xformer demo --smoke"""),
    "experiment": Command(("lavis_xformer.experiment.__main__", "lavis_xformer.experiment",
                           "lavis_xformer.demo.experiment"), "main", "a controlled experiment over seeds", """
  lavis-xformer experiment --help"""),
}

# What counts as the user's mistake (one line, exit 1) rather than a bug (traceback)
USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, KeyError, RuntimeError, AssertionError)


class _Once(logging.Filter):
    """Drops a log record whose level and message were already emitted (analysis.params built 44 models, each
    warning the same thing)."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.levelno, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def warn_once() -> None:
    """Each identical warning once: on the root logger (``logging.warning``) and the plugin's loggers."""
    once = _Once()
    for name in ("", "lavis_xformer", "lavis_xformer.checkpoints"):
        logging.getLogger(name).addFilter(once)
    import warnings

    warnings.simplefilter("once")


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()]
    return ("usage: lavis-xformer [--debug] COMMAND [ARGS]   (lavis-xformer COMMAND --help for its options)\n\n"
            "X-Former (arXiv 2407.13851) and its BLIP-2 twins on LAVIS.\n\ncommands:\n" + "\n".join(lines) +
            "\n\nexamples:\n  lavis-xformer check --cfg-path projects/xformer/demo/pretrain_stage1_shapes.yaml\n"
            "  lavis-xformer train --cfg-path projects/xformer/demo/pretrain_stage1_shapes.yaml --options "
            "run.max_iters=2\n")


def resolve(name: str) -> Callable:
    """The command's entry function, importing its module now (a command whose module is absent: ``SystemExit``)."""
    command = COMMANDS[name]
    for module_name in command.modules:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name and module_name.startswith(error.name):
                continue  # this place does not hold it; try the next
            raise
        if hasattr(module, command.function):
            return getattr(module, command.function)
    raise SystemExit(f"error: `lavis-xformer {name}` is not available in this version "
                     f"(none of {', '.join(command.modules)} exists)")


class _ProgAndExamples:
    """While a command parses its arguments: its parser's usage line says ``lavis-xformer COMMAND`` and its help
    ends with the examples (argparse's ``prog`` / ``epilog`` of the first parser the command builds)."""

    def __init__(self, name: str):
        self.name, self.original = name, None

    def __enter__(self):
        import argparse

        self.original = original = argparse.ArgumentParser.__init__
        command, name, state = COMMANDS[self.name], self.name, {"done": False}

        def init(parser, *args, **kwargs):
            first, state["done"] = not state["done"], True
            # a command reached through a sub-command (export, inspect): its sub-parser gets the examples
            target = (first if not command.prefix else
                      str(kwargs.get("prog", "")).endswith(f" {command.prefix[0]}"))
            if first:
                kwargs["prog"] = "lavis-xformer" if command.prefix else f"lavis-xformer {name}"
            if target:
                kwargs["epilog"] = (kwargs.get("epilog") or "") + "examples:" + command.examples
                if kwargs.get("formatter_class", argparse.HelpFormatter) is argparse.HelpFormatter:
                    kwargs["formatter_class"] = argparse.RawDescriptionHelpFormatter
            original(parser, *args, **kwargs)

        argparse.ArgumentParser.__init__ = init
        return self

    def __exit__(self, *exc):
        import argparse

        argparse.ArgumentParser.__init__ = self.original


def _one_line_each(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    return "\n".join(f"error: {line[len('ERROR: '):] if line.startswith('ERROR: ') else line}" for line in lines)


_DEBUG = [False]  # set while ``lavis-xformer --debug COMMAND`` runs its command
DEBUG_ENV = "LAVIS_XFORMER_DEBUG"  # =1: tracebacks, also under torchrun


def split_debug(argv: Optional[List[str]]) -> Tuple[List[str], bool]:
    """``argv`` without ``--debug``, and whether a traceback was asked for (``--debug`` anywhere in it,
    ``lavis-xformer --debug COMMAND``, or ``$LAVIS_XFORMER_DEBUG=1``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or _DEBUG[0] or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    return [arg for arg in argv if arg != "--debug"], debug


def report_user_error(error: BaseException) -> int:
    """Print a user error as one ``error:`` line per line of its message (no traceback) and return exit status 1."""
    print(_one_line_each(error) + "\n(--debug shows the traceback)", file=sys.stderr)
    return 1


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv[:1]
    if debug:
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"error: unknown command {name!r}{hint}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    warn_once()
    _DEBUG[0] = debug
    try:
        function = resolve(name)
        with _ProgAndExamples(name):
            result = function([*COMMANDS[name].prefix, *rest])
    except SystemExit as exit_:  # argparse's --help / usage errors, a command's own exit status
        if isinstance(exit_.code, str):
            print(exit_.code, file=sys.stderr)
            return 1
        return int(exit_.code or 0)
    except KeyboardInterrupt:
        return 130
    except USER_ERRORS as error:
        if debug:
            raise
        print(_one_line_each(error) + "\n(lavis-xformer --debug " + name + " ... shows the traceback)",
              file=sys.stderr)
        return 1
    finally:
        _DEBUG[0] = False
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
