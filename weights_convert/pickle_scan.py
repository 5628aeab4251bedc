"""A pre-pass over a pickle's opcodes: how deeply its objects nest, measured before anything is unpickled.

Why: a pickle of a few hundred kilobytes can build a tuple nested 300,000 deep
(EMPTY_TUPLE followed by TUPLE1 over and over). Unpickling it is iterative and
harmless, but the first thing that walks the object recursively (hashing it as a
dict key, comparing it, printing it) overflows the C stack and kills the
process with a segmentation fault, on `torch.load(weights_only=True)` and on our
restricted unpickler alike. No checkpoint nests more than a few levels (a dict
of dicts of tensors; a tensor is rebuilt from a tuple of tuples), so the scan
refuses any pickle that nests deeper than `MAX_DEPTH`.

How: `pickletools.genops` decodes one opcode at a time without building any
object. We simulate the unpickler's stack with stand-ins that carry only a
depth: a new container is one deeper than its deepest item; an item added later
(APPEND, SETITEM, BUILD, ...) deepens its container, and that change is passed
up to every container already holding it (an object shared through the memo can
be filled after it was placed). Atoms (numbers, strings, globals) have depth 0.
"""
from __future__ import annotations

import pickletools
import re
import zipfile
from pathlib import Path
from typing import BinaryIO, Dict, List, Optional, Union

# Deeper than any real checkpoint (a Lightning .ckpt nests about 8 levels), far shallower than the C stack allows.
MAX_DEPTH = 100

ATOM = 0  # the one stand-in shared by all atoms: depth 0, never deepens

# opcodes that push one atom, after popping `n` items (STACK_GLOBAL pops module and name, BINPERSID the id)
PUSH_ATOM = {name: 0 for name in (
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "STRING", "BINSTRING", "SHORT_BINSTRING",
    "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE",
    "BINUNICODE8", "FLOAT", "BINFLOAT", "NONE", "NEWTRUE", "NEWFALSE", "GLOBAL", "EXT1", "EXT2", "EXT4",
    "NEXT_BUFFER", "PERSID")}
PUSH_ATOM.update(STACK_GLOBAL=2, BINPERSID=1)
# opcodes that pop `n` items and push a new object holding them
NEW_FROM_ITEMS = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3, "REDUCE": 2, "NEWOBJ": 2, "NEWOBJ_EX": 3}
# opcodes that pop everything down to the MARK and push a new object holding it
NEW_FROM_MARK = {"TUPLE", "LIST", "DICT", "FROZENSET", "OBJ", "INST"}
# opcodes that pop `n` items and add them to the object below them
ADD_ITEMS = {"APPEND": 1, "SETITEM": 2, "BUILD": 1}
# opcodes that pop everything down to the MARK and add it to the object below the MARK
ADD_FROM_MARK = {"APPENDS", "SETITEMS", "ADDITEMS"}
NEW_EMPTY = {"EMPTY_LIST", "EMPTY_DICT", "EMPTY_TUPLE", "EMPTY_SET"}
NO_STACK_EFFECT = {"PROTO", "FRAME", "STOP", "READONLY_BUFFER"}
MARK = -1


class PickleTooDeep(ValueError):
    """The pickle's objects nest deeper than MAX_DEPTH."""


class _Depths:
    """Stand-ins for the pickle's objects: a depth each and the containers each one was put into."""

    def __init__(self, limit: int):
        self.limit = limit
        self.depth: List[int] = [0]          # index ATOM
        self.holders: List[List[int]] = [[]]

    def new(self, items: List[int]) -> int:
        self.depth.append(0)
        self.holders.append([])
        obj = len(self.depth) - 1
        self.add(obj, items)
        return obj

    def add(self, container: int, items: List[int]) -> None:
        """depth(container) >= 1 + depth(item) for each item, passed up to every holder of the container."""
        if container == ATOM:
            return  # adding to a number or a string is an error the unpickler itself reports
        deepest = max((self.depth[i] for i in items), default=0)
        for item in items:
            if item != ATOM:
                self.holders[item].append(container)
        work = [(container, deepest + 1)]
        while work:
            obj, depth = work.pop()
            if depth <= self.depth[obj]:
                continue
            if depth > self.limit:
                raise PickleTooDeep(f"the pickle nests objects more than {self.limit} levels deep")
            self.depth[obj] = depth
            work.extend((holder, depth + 1) for holder in self.holders[obj])


def _pop(stack: List[int], n: int) -> List[int]:
    if n > len(stack) or MARK in stack[len(stack) - n:]:
        raise ValueError("malformed pickle: stack underflow")
    items = stack[len(stack) - n:]
    del stack[len(stack) - n:]
    return items


def _top(stack: List[int]) -> int:
    if not stack or stack[-1] == MARK:
        raise ValueError("malformed pickle: stack underflow")
    return stack[-1]


def _pop_to_mark(stack: List[int]) -> List[int]:
    if MARK not in stack:
        raise ValueError("malformed pickle: no MARK on the stack")
    at = len(stack) - 1 - stack[::-1].index(MARK)
    items = stack[at + 1:]
    del stack[at:]
    return items


def check_nesting_depth(stream: BinaryIO, limit: int = MAX_DEPTH) -> int:
    """Read one pickle from `stream` (up to its STOP) and return how deeply its objects nest.

    Raises PickleTooDeep past `limit`, ValueError if the opcodes do not form a
    pickle. Nothing is built, imported or called.
    """
    depths = _Depths(limit)
    stack: List[int] = []
    memo: Dict[int, int] = {}
    for opcode, arg, _pos in pickletools.genops(stream):
        name = opcode.name
        if name in PUSH_ATOM:
            _pop(stack, PUSH_ATOM[name])
            stack.append(ATOM)
        elif name in NEW_EMPTY:
            stack.append(depths.new([]))
        elif name == "MARK":
            stack.append(MARK)
        elif name in NEW_FROM_ITEMS:
            stack.append(depths.new(_pop(stack, NEW_FROM_ITEMS[name])))
        elif name in NEW_FROM_MARK:
            stack.append(depths.new(_pop_to_mark(stack)))
        elif name in ADD_ITEMS:
            items = _pop(stack, ADD_ITEMS[name])
            depths.add(_top(stack), items)
        elif name in ADD_FROM_MARK:
            items = _pop_to_mark(stack)
            depths.add(_top(stack), items)
        elif name == "POP":
            _pop(stack, 1)
        elif name == "POP_MARK":
            _pop_to_mark(stack)
        elif name == "DUP":
            stack.append(_top(stack))
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = _top(stack)
        elif name == "MEMOIZE":
            memo[len(memo)] = _top(stack)
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            if arg not in memo:
                raise ValueError(f"malformed pickle: memo key {arg} read before it was written")
            stack.append(memo[arg])
        elif name not in NO_STACK_EFFECT:
            raise ValueError(f"unsupported pickle opcode {name}")
    return max(depths.depth)


# A checkpoint's pickle holds names and shapes, not data: a few megabytes at most. Anything larger is refused
# before it is read (or inflated, for a compressed zip record).
MAX_PICKLE_BYTES = 256 << 20
# torch's legacy (pre-1.6) format: magic number, protocol, system info, the object, the storage keys
LEGACY_PICKLES = 5


def check_checkpoint_pickle(path: Union[str, Path]) -> None:
    """check_nesting_depth on the pickle(s) of a torch checkpoint file, zip or legacy, before it is loaded.

    Raises ValueError (PickleTooDeep among them) saying what is wrong.
    """
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.filename.endswith("data.pkl") and info.filename.count("/") == 1:
                    if info.file_size > MAX_PICKLE_BYTES:
                        raise ValueError(f"{info.filename} declares {info.file_size} bytes, more than a checkpoint's "
                                         f"pickle holds ({MAX_PICKLE_BYTES} at most)")
                    with archive.open(info) as stream:
                        check_nesting_depth(stream)
        return
    with open(path, "rb") as stream:
        for _ in range(LEGACY_PICKLES):
            if not stream.peek(1):
                break  # fewer pickles than torch writes: torch.load reports the file as unreadable
            check_nesting_depth(stream)


ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|[\x00-\x08\x0b-\x1f\x7f]")


def describe_refusal(error: BaseException) -> str:
    """One line saying why `torch.load(weights_only=True)` refused a pickle, without its advice to disable safety.

    torch's message spans several lines, may carry terminal escape codes, and suggests
    `weights_only=False`, which would run whatever the file holds: we name the global instead.
    """
    message = ANSI_ESCAPE.sub("", str(error))
    found = re.search(r"GLOBAL ([\w.]+)", message)
    if found:
        return f"refused: the pickle refers to {found[1]}, which is not a tensor type; nothing in the file was run"
    if "weights_only" in message or "Weights only" in message:
        return "refused: the pickle holds objects other than tensors; nothing in the file was run"
    return f"unreadable checkpoint ({type(error).__name__}: {' '.join(message.split())})"
