"""A pickle reader that only builds plain data.

Python's ``pickle`` runs whatever callables a file names. This module is a
small, independent pickle virtual machine: it builds ``None``, bools,
numbers, strings, bytes, lists, tuples, dicts and sets itself, and every
``GLOBAL`` must appear in an explicit allow-list supplied by the caller that
maps the name to a handler written in this project. Nothing is ever imported
from a name found in a file. Memory is bounded by the input size (a memo is a
dict, lengths are checked against the remaining bytes) and nothing recurses.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .params import shown

__all__ = ["PickleRefused", "Global", "Opaque", "load_one"]


class PickleRefused(ValueError):
    """The pickle stream is malformed or asks for something not allowed."""


@dataclass(frozen=True)
class Global:
    """A reference to an allow-listed global (``module.qualname``)."""

    name: str


@dataclass
class Opaque:
    """An allow-listed object that is kept as data: its class name and state."""

    name: str
    args: tuple = ()
    state: Any = None
    extra: dict = field(default_factory=dict)


# handler(args) -> object, for REDUCE / NEWOBJ of an allow-listed global.
Handler = Callable[[tuple], Any]

# The opcodes this reader understands, named as in the pickle protocol (``pickletools`` documents each).
ADDITEMS = b"\x90"
APPEND = b"a"
APPENDS = b"e"
BINBYTES = b"B"
BINBYTES8 = b"\x8e"
BINFLOAT = b"G"
BINGET = b"h"
BININT = b"J"
BININT1 = b"K"
BININT2 = b"M"
BINPERSID = b"Q"
BINPUT = b"q"
BINSTRING = b"T"
BINUNICODE = b"X"
BINUNICODE8 = b"\x8d"
BUILD = b"b"
DICT = b"d"
DUP = b"2"
EMPTY_DICT = b"}"
EMPTY_LIST = b"]"
EMPTY_SET = b"\x8f"
EMPTY_TUPLE = b")"
FLOAT = b"F"
FRAME = b"\x95"
FROZENSET = b"\x91"
GET = b"g"
GLOBAL = b"c"
INT = b"I"
LIST = b"l"
LONG = b"L"
LONG1 = b"\x8a"
LONG4 = b"\x8b"
LONG_BINGET = b"j"
LONG_BINPUT = b"r"
MARK = b"("
MEMOIZE = b"\x94"
NEWFALSE = b"\x89"
NEWOBJ = b"\x81"
NEWOBJ_EX = b"\x92"
NEWTRUE = b"\x88"
NONE = b"N"
PERSID = b"P"
POP = b"0"
POP_MARK = b"1"
PROTO = b"\x80"
PUT = b"p"
REDUCE = b"R"
SETITEM = b"s"
SETITEMS = b"u"
SHORT_BINBYTES = b"C"
SHORT_BINSTRING = b"U"
SHORT_BINUNICODE = b"\x8c"
STACK_GLOBAL = b"\x93"
STOP = b"."
TUPLE = b"t"
TUPLE1 = b"\x85"
TUPLE2 = b"\x86"
TUPLE3 = b"\x87"
UNICODE = b"V"

_MAX_PROTO = 5


class _Reader:
    def __init__(self, data: bytes, pos: int) -> None:
        self.data = data
        self.pos = pos

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise PickleRefused(f"truncated stream (needs {n} bytes at offset {self.pos})")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def line(self) -> bytes:
        end = self.data.find(b"\n", self.pos)
        if end < 0:
            raise PickleRefused("truncated stream (unterminated text line)")
        out = self.data[self.pos : end]
        self.pos = end + 1
        return out


def _pop_mark(stack: list, marks: list) -> list:
    if not marks:
        raise PickleRefused("no MARK on the stack")
    start = marks.pop()
    items = stack[start:]
    del stack[start:]
    return items


def _key(key: Any) -> str:
    """A dict key, which in an EPD table is text: any other key could be made to hash alike (Python's integer hash is
    not randomised) or to hash slowly (a tuple of a memoized tuple's 65,536 items, named again and again), making the
    load quadratic in the file's size."""
    if not isinstance(key, str):
        raise PickleRefused(f"key of type {type(key).__name__}; an EPD table's keys are text")
    return key


_MAX_DEPTH = 64  # nested containers in the value a pickle returns
_MAX_EXPANDED = 1 << 20  # its size as repr, str or == walk it: every repeat of a shared item counted, text by length


_CONTAINERS = (dict, list, tuple, set, frozenset, Opaque)


def _children(item: Any) -> tuple | None:
    """The values inside a container (a dict's keys and values, an :class:`Opaque`'s parts), None for a leaf."""
    if isinstance(item, dict):
        return (*item.keys(), *item.values())
    if isinstance(item, (list, tuple, set, frozenset)):
        return tuple(item)
    if isinstance(item, Opaque):
        return (item.name, item.args, item.state, item.extra)
    return None


def _check_expanded(value: Any) -> Any:
    """``value``, checked before anything walks it: memo references let a few hundred bytes hold a list that holds
    itself ten times over, ten levels deep, whose ``repr`` or comparison takes minutes and gigabytes; its expanded
    size and depth are measured from each distinct container once."""
    depth: dict[int, int] = {}
    size: dict[int, int] = {}
    open_: set[int] = set()  # containers whose contents are being measured
    stack: list[tuple[Any, bool]] = [(value, False)]
    while stack:
        item, done = stack.pop()
        if not isinstance(item, _CONTAINERS):
            continue
        if not done and id(item) in open_:
            raise PickleRefused("a value contains itself; not an EPD table")
        if not done and id(item) in depth:  # measured already: n references to it cost n steps, not n copies
            continue
        children = _children(item)
        if done:
            open_.discard(id(item))
            depth[id(item)] = 1 + max((depth.get(id(v), 0) for v in children), default=0)
            size[id(item)] = 1 + sum(
                size.get(id(v), 1 + len(v) // 16 if isinstance(v, (str, bytes, bytearray)) else 1) for v in children
            )
            if depth[id(item)] > _MAX_DEPTH:
                raise PickleRefused(f"values nested more than {_MAX_DEPTH} deep; not an EPD table")
            if size[id(item)] > _MAX_EXPANDED:
                raise PickleRefused("values repeated by reference past any EPD table's size; not an EPD table")
        else:  # depth-first: a shared item's first visit ends before its next is popped
            open_.add(id(item))
            stack.append((item, True))
            stack.extend((v, False) for v in children)
    return value


def _decode_long(raw: bytes) -> int:
    if len(raw) > 64:
        raise PickleRefused("integer wider than 512 bits")
    return int.from_bytes(raw, "little", signed=True)


def load_one(
    data: bytes,
    handlers: Mapping[str, Handler],
    *,
    pos: int = 0,
    persistent_load: Callable[[Any], Any] | None = None,
) -> tuple[Any, int]:
    """Run one pickle from ``data[pos:]``; return the value and the offset after STOP.

    ``handlers`` maps ``"module.qualname"`` to a function that receives the
    call's argument tuple. A global absent from ``handlers`` is refused as
    soon as it is named. ``persistent_load`` receives persistent ids; without
    it they are refused.
    """
    rd = _Reader(data, pos)
    stack: list[Any] = []
    marks: list[int] = []
    memo: dict[int, Any] = {}

    def fence() -> None:
        if len(stack) <= (marks[-1] if marks else 0):
            raise PickleRefused("stack underflow")

    def pop() -> Any:
        fence()
        return stack.pop()

    def top() -> Any:
        fence()
        return stack[-1]

    def resolve(module: str, name: str) -> Global:
        full = f"{module}.{name}"
        if full not in handlers:
            raise PickleRefused(f"forbidden global {shown(full)}")
        return Global(full)

    def call(fn: Any, args: Any) -> Any:
        if not isinstance(fn, Global):
            raise PickleRefused(f"call of a non-global ({type(fn).__name__})")
        if not isinstance(args, tuple):
            raise PickleRefused("call arguments are not a tuple")
        return handlers[fn.name](args)

    def setitems(target: Any, items: list) -> None:
        if len(items) % 2:
            raise PickleRefused("odd number of items for a dict")
        if not isinstance(target, dict):
            raise PickleRefused(f"SETITEMS on {type(target).__name__}")
        for i in range(0, len(items), 2):
            target[_key(items[i])] = items[i + 1]

    while True:
        op = rd.take(1)
        if op == STOP:
            if len(stack) != 1 or marks:
                raise PickleRefused("malformed stream at STOP")
            return _check_expanded(stack[0]), rd.pos
        if op == PROTO:
            if rd.take(1)[0] > _MAX_PROTO:
                raise PickleRefused("unsupported pickle protocol")
        elif op == FRAME:
            rd.take(8)
        elif op == MARK:
            marks.append(len(stack))
        elif op == POP:
            pop()
        elif op == POP_MARK:
            _pop_mark(stack, marks)
        elif op == DUP:
            stack.append(top())
        # memo
        elif op == PUT:
            memo[_memo_key(rd.line())] = top()
        elif op == BINPUT:
            memo[rd.take(1)[0]] = top()
        elif op == LONG_BINPUT:
            memo[struct.unpack("<I", rd.take(4))[0]] = top()
        elif op == MEMOIZE:
            memo[len(memo)] = top()
        elif op in (GET, BINGET, LONG_BINGET):
            if op == GET:
                key = _memo_key(rd.line())
            elif op == BINGET:
                key = rd.take(1)[0]
            else:
                key = struct.unpack("<I", rd.take(4))[0]
            if key not in memo:
                raise PickleRefused(f"memo entry {key} is missing")
            stack.append(memo[key])
        # constants and numbers
        elif op == NONE:
            stack.append(None)
        elif op == NEWTRUE:
            stack.append(True)
        elif op == NEWFALSE:
            stack.append(False)
        elif op == BININT1:
            stack.append(rd.take(1)[0])
        elif op == BININT2:
            stack.append(struct.unpack("<H", rd.take(2))[0])
        elif op == BININT:
            stack.append(struct.unpack("<i", rd.take(4))[0])
        elif op == LONG1:
            stack.append(_decode_long(rd.take(rd.take(1)[0])))
        elif op == LONG4:
            stack.append(_decode_long(rd.take(struct.unpack("<i", rd.take(4))[0])))
        elif op == INT:
            stack.append(_parse_int_line(rd.line()))
        elif op == LONG:
            stack.append(_parse_int_line(rd.line().rstrip(LONG)))
        elif op == BINFLOAT:
            stack.append(struct.unpack(">d", rd.take(8))[0])
        elif op == FLOAT:
            stack.append(_parse_float_line(rd.line()))
        # strings and bytes
        elif op == SHORT_BINUNICODE:
            stack.append(_utf8(rd.take(rd.take(1)[0])))
        elif op == BINUNICODE:
            stack.append(_utf8(rd.take(struct.unpack("<I", rd.take(4))[0])))
        elif op == BINUNICODE8:
            stack.append(_utf8(rd.take(struct.unpack("<Q", rd.take(8))[0])))
        elif op == UNICODE:
            stack.append(rd.line().decode("raw_unicode_escape"))
        elif op == SHORT_BINBYTES:
            stack.append(rd.take(rd.take(1)[0]))
        elif op == BINBYTES:
            stack.append(rd.take(struct.unpack("<I", rd.take(4))[0]))
        elif op == BINBYTES8:
            stack.append(rd.take(struct.unpack("<Q", rd.take(8))[0]))
        elif op == SHORT_BINSTRING:
            stack.append(rd.take(rd.take(1)[0]).decode("latin-1"))
        elif op == BINSTRING:
            stack.append(rd.take(struct.unpack("<i", rd.take(4))[0]).decode("latin-1"))
        # containers
        elif op == EMPTY_LIST:
            stack.append([])
        elif op == LIST:
            stack.append(_pop_mark(stack, marks))
        elif op == APPEND:
            item = pop()
            lst = top()
            if not isinstance(lst, list):
                raise PickleRefused(f"APPEND on {type(lst).__name__}")
            lst.append(item)
        elif op == APPENDS:
            items = _pop_mark(stack, marks)
            lst = top()
            if not isinstance(lst, list):
                raise PickleRefused(f"APPENDS on {type(lst).__name__}")
            lst.extend(items)
        elif op == EMPTY_TUPLE:
            stack.append(())
        elif op == TUPLE:
            stack.append(tuple(_pop_mark(stack, marks)))
        elif op in (TUPLE1, TUPLE2, TUPLE3):
            n = (TUPLE1, TUPLE2, TUPLE3).index(op) + 1
            items = [pop() for _ in range(n)][::-1]
            stack.append(tuple(items))
        elif op == EMPTY_DICT:
            stack.append({})
        elif op == DICT:
            d: dict = {}
            setitems(d, _pop_mark(stack, marks))
            stack.append(d)
        elif op == SETITEM:
            value = pop()
            key = pop()
            setitems(top(), [key, value])
        elif op == SETITEMS:
            items = _pop_mark(stack, marks)
            setitems(top(), items)
        elif op == EMPTY_SET:  # a set's items are text, as dict keys (the authors' flux table has an empty set)
            stack.append(set())
        elif op == ADDITEMS:
            items = _pop_mark(stack, marks)
            target = top()
            if not isinstance(target, set):
                raise PickleRefused(f"ADDITEMS on {type(target).__name__}")
            target.update(_key(x) for x in items)
        elif op == FROZENSET:
            stack.append(frozenset(_key(x) for x in _pop_mark(stack, marks)))
        # globals and calls
        elif op == GLOBAL:
            module = rd.line().decode("utf-8", "replace")
            name = rd.line().decode("utf-8", "replace")
            stack.append(resolve(module, name))
        elif op == STACK_GLOBAL:
            name = pop()
            module = pop()
            if not isinstance(module, str) or not isinstance(name, str):
                raise PickleRefused("STACK_GLOBAL with non-string names")
            stack.append(resolve(module, name))
        elif op == REDUCE:
            args = pop()
            fn = pop()
            stack.append(call(fn, args))
        elif op == NEWOBJ:
            args = pop()
            cls = pop()
            stack.append(call(cls, args))
        elif op == NEWOBJ_EX:
            kwargs = pop()
            args = pop()
            cls = pop()
            if kwargs:
                raise PickleRefused("NEWOBJ_EX with keyword arguments")
            stack.append(call(cls, args))
        elif op == BUILD:
            state = pop()
            obj = top()
            if not isinstance(obj, Opaque):
                raise PickleRefused(f"BUILD on {type(obj).__name__}")
            obj.state = state
        elif op == BINPERSID:
            pid = pop()
            if persistent_load is None:
                raise PickleRefused("persistent id not allowed here")
            stack.append(persistent_load(pid))
        elif op == PERSID:
            raise PickleRefused("text persistent ids are not supported")
        else:
            raise PickleRefused(f"unsupported opcode {op!r} at offset {rd.pos - 1}")


def _memo_key(raw: bytes) -> int:
    try:
        return int(raw)
    except ValueError as exc:
        raise PickleRefused("bad memo key") from exc


def _parse_int_line(raw: bytes) -> int | bool:
    if raw == b"00":
        return False
    if raw == b"01":
        return True
    if len(raw) > 160:
        raise PickleRefused("integer literal too long")
    try:
        return int(raw)
    except ValueError as exc:
        raise PickleRefused("bad integer literal") from exc


def _parse_float_line(raw: bytes) -> float:
    if len(raw) > 64:
        raise PickleRefused("float literal too long")
    try:
        return float(raw)
    except ValueError as exc:
        raise PickleRefused("bad float literal") from exc


def _utf8(raw: bytes) -> str:
    try:
        return raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError as exc:
        raise PickleRefused("invalid UTF-8 string") from exc
