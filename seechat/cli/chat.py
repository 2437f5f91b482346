"""`seechat chat --model DIR [--image PATH ...]`: multi-turn terminal chat about images, streaming.

Type a question and the reply streams in. Commands:

    /image PATH [PATH ...]   attach image(s) to your next question (any number over the chat)
    /clear                   start a new conversation (forgets messages and images)
    /help                    this list
    /quit                    leave (also /exit, Ctrl-D)

Ctrl-C while a reply streams stops that reply and keeps the chat going. Every turn sends the
whole conversation to the engine, which reuses the KV of earlier turns and never re-encodes an
image, so long chats stay fast. Reads questions from stdin, so it also works in a pipe.
The conversation itself is `seechat.infer.chat.ChatSession`; this module is the terminal.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import TextIO

from PIL import Image

from seechat.cli._sampling import add_sampling_arguments, sampling_from_args
from seechat.data.images import ImageError, load_image_file
from seechat.infer.sampling import SamplingParams

HELP = """commands:
  /image PATH [PATH ...]   attach image(s) to your next question
  /clear                   start a new conversation
  /help                    show this list
  /quit                    leave (also /exit, Ctrl-D)"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a seechat checkpoint directory")
    parser.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="PATH",
        help="image(s) for the first question (repeatable; /image adds more later)",
    )
    parser.add_argument("--system", default=None, help="a system message")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    add_sampling_arguments(parser)


def _chat_loop(
    chat, params: SamplingParams, stop: list[str], pending: list[Image.Image], stdin: TextIO, stdout: TextIO
) -> None:
    """The REPL over a `ChatSession`; `pending` images go with the next question."""
    interactive = stdin.isatty()
    print("seechat chat — /help for commands, /quit to leave", file=stdout)
    if pending:
        print(f"({len(pending)} image(s) attached to your first question)", file=stdout)
    while True:
        if interactive:
            print("你> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, rest = line.partition(" ")
            if cmd in ("/quit", "/exit"):
                break
            if cmd == "/help":
                print(HELP, file=stdout)
            elif cmd == "/clear":
                chat.clear()
                pending.clear()
                print("(new conversation)", file=stdout)
            elif cmd == "/image":
                paths = shlex.split(rest)
                if not paths:
                    print("usage: /image PATH [PATH ...]", file=stdout)
                for path in paths:
                    try:
                        pending.append(load_image_file(path))
                        print(f"(attached {path}; it goes with your next question)", file=stdout)
                    except ImageError as e:
                        print(f"error: {e}", file=stdout)
            else:
                print(f"unknown command {cmd}; /help lists them", file=stdout)
            continue
        print("助手> ", end="", file=stdout, flush=True)
        stream = chat.stream(line, list(pending), params, stop)
        pending.clear()
        try:
            for piece in stream:
                print(piece, end="", file=stdout, flush=True)
        except KeyboardInterrupt:
            stream.close()  # cancels the request; the partial reply stays in the history
            print(" [stopped]", end="", file=stdout)
        except (RuntimeError, ValueError) as e:  # e.g. the conversation outgrew the context: /clear
            print(f"\nerror: {e}", end="", file=stdout)
        print(file=stdout, flush=True)


def run(args: argparse.Namespace) -> int:
    import torch

    from seechat.infer.chat import ChatSession
    from seechat.infer.engine import Engine
    from seechat.model import load

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        pending = [load_image_file(p) for p in args.image]
    except ImageError as e:
        print(f"seechat chat: {e}", file=sys.stderr)
        return 2
    model, processor = load(args.model, device=args.device)
    with Engine(model, processor) as engine:
        chat = ChatSession(engine, processor, system=args.system)
        try:
            _chat_loop(chat, sampling_from_args(args), args.stop, pending, sys.stdin, sys.stdout)
        except KeyboardInterrupt:
            print(file=sys.stdout)
    return 0
