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

    def number(self, fmt: str) -> int | float:
        """One fixed-width number in ``struct`` format ``fmt``."""
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def sized(self, fmt: str) -> bytes:
        """Bytes preceded by their length in ``struct`` format ``fmt``."""
        return self.take(self.number(fmt))


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


# Opcodes that push one value read from the stream, and how each reads it.
_LITERALS: dict[bytes, Callable[[_Reader], Any]] = {
    NONE: lambda rd: None,
    NEWTRUE: lambda rd: True,
    NEWFALSE: lambda rd: False,
    BININT1: lambda rd: rd.number("<B"),
    BININT2: lambda rd: rd.number("<H"),
    BININT: lambda rd: rd.number("<i"),
    LONG1: lambda rd: _decode_long(rd.sized("<B")),
    LONG4: lambda rd: _decode_long(rd.sized("<i")),
    INT: lambda rd: _parse_int_line(rd.line()),
    LONG: lambda rd: _parse_int_line(rd.line().rstrip(LONG)),
    BINFLOAT: lambda rd: rd.number(">d"),
    FLOAT: lambda rd: _parse_float_line(rd.line()),
    SHORT_BINUNICODE: lambda rd: _utf8(rd.sized("<B")),
    BINUNICODE: lambda rd: _utf8(rd.sized("<I")),
    BINUNICODE8: lambda rd: _utf8(rd.sized("<Q")),
    UNICODE: lambda rd: rd.line().decode("raw_unicode_escape"),
    SHORT_BINBYTES: lambda rd: rd.sized("<B"),
    BINBYTES: lambda rd: rd.sized("<I"),
    BINBYTES8: lambda rd: rd.sized("<Q"),
    SHORT_BINSTRING: lambda rd: rd.sized("<B").decode("latin-1"),
    BINSTRING: lambda rd: rd.sized("<i").decode("latin-1"),
    EMPTY_LIST: lambda rd: [],
    EMPTY_TUPLE: lambda rd: (),
    EMPTY_DICT: lambda rd: {},
    EMPTY_SET: lambda rd: set(),  # a set's items are text, as dict keys (the authors' flux table has an empty set)
}

# Memo opcodes and how each reads its key: PUT stores the stack's top under it, GET pushes what it holds.
_PUT_KEYS: dict[bytes, Callable[[_Reader], int]] = {
    PUT: lambda rd: _memo_key(rd.line()),
    BINPUT: lambda rd: rd.number("<B"),
    LONG_BINPUT: lambda rd: rd.number("<I"),
}
_GET_KEYS: dict[bytes, Callable[[_Reader], int]] = {
    GET: lambda rd: _memo_key(rd.line()),
    BINGET: lambda rd: rd.number("<B"),
    LONG_BINGET: lambda rd: rd.number("<I"),
}


class _Machine:
    """The pickle virtual machine: the stream, the stack with its marks, and the memo. Each opcode that is not a
    literal or a memo access is one method, named after it in :data:`_OPERATIONS`."""

    def __init__(
        self, data: bytes, pos: int, handlers: Mapping[str, Handler], persistent_load: Callable[[Any], Any] | None
    ) -> None:
        self.rd = _Reader(data, pos)
        self.handlers = handlers
        self.persistent_load = persistent_load
        self.stack: list[Any] = []
        self.marks: list[int] = []
        self.memo: dict[int, Any] = {}

    def run(self) -> Any:
        """Execute opcodes up to STOP and return the one value left on the stack."""
        rd, stack = self.rd, self.stack
        while True:
            op = rd.take(1)
            if op == STOP:
                if len(stack) != 1 or self.marks:
                    raise PickleRefused("malformed stream at STOP")
                return _check_expanded(stack[0])
            if op in _LITERALS:
                stack.append(_LITERALS[op](rd))
            elif op in _PUT_KEYS:
                self.memo[_PUT_KEYS[op](rd)] = self.top()
            elif op == MEMOIZE:
                self.memo[len(self.memo)] = self.top()
            elif op in _GET_KEYS:
                key = _GET_KEYS[op](rd)
                if key not in self.memo:
                    raise PickleRefused(f"memo entry {key} is missing")
                stack.append(self.memo[key])
            elif op in _OPERATIONS:
                _OPERATIONS[op](self)
            else:
                raise PickleRefused(f"unsupported opcode {op!r} at offset {rd.pos - 1}")

    # the stack
    def fence(self) -> None:
        if len(self.stack) <= (self.marks[-1] if self.marks else 0):
            raise PickleRefused("stack underflow")

    def pop(self) -> Any:
        self.fence()
        return self.stack.pop()

    def top(self) -> Any:
        self.fence()
        return self.stack[-1]

    def pop_mark(self) -> list:
        if not self.marks:
            raise PickleRefused("no MARK on the stack")
        start = self.marks.pop()
        items = self.stack[start:]
        del self.stack[start:]
        return items

    def proto(self) -> None:
        if self.rd.take(1)[0] > _MAX_PROTO:
            raise PickleRefused("unsupported pickle protocol")

    def frame(self) -> None:
        self.rd.take(8)

    def mark(self) -> None:
        self.marks.append(len(self.stack))

    def dup(self) -> None:
        self.stack.append(self.top())

    # containers
    def list_(self) -> None:
        self.stack.append(self.pop_mark())

    def append(self) -> None:
        item = self.pop()
        self.extend_list([item], "APPEND")

    def appends(self) -> None:
        self.extend_list(self.pop_mark(), "APPENDS")

    def extend_list(self, items: list, op: str) -> None:
        target = self.top()
        if not isinstance(target, list):
            raise PickleRefused(f"{op} on {type(target).__name__}")
        target.extend(items)

    def tuple_(self) -> None:
        self.stack.append(tuple(self.pop_mark()))

    def small_tuple(self, n: int) -> None:
        items = [self.pop() for _ in range(n)][::-1]
        self.stack.append(tuple(items))

    def dict_(self) -> None:
        d: dict = {}
        _set_items(d, self.pop_mark())
        self.stack.append(d)

    def setitem(self) -> None:
        value = self.pop()
        key = self.pop()
        _set_items(self.top(), [key, value])

    def setitems(self) -> None:
        items = self.pop_mark()
        _set_items(self.top(), items)

    def additems(self) -> None:
        items = self.pop_mark()
        target = self.top()
        if not isinstance(target, set):
            raise PickleRefused(f"ADDITEMS on {type(target).__name__}")
        target.update(_key(x) for x in items)

    def frozenset_(self) -> None:
        self.stack.append(frozenset(_key(x) for x in self.pop_mark()))

    # globals and calls: only names in ``handlers``, called through the project's handler
    def resolve(self, module: str, name: str) -> Global:
        full = f"{module}.{name}"
        if full not in self.handlers:
            raise PickleRefused(f"forbidden global {shown(full)}")
        return Global(full)

    def global_(self) -> None:
        module = self.rd.line().decode("utf-8", "replace")
        name = self.rd.line().decode("utf-8", "replace")
        self.stack.append(self.resolve(module, name))

    def stack_global(self) -> None:
        name = self.pop()
        module = self.pop()
        if not isinstance(module, str) or not isinstance(name, str):
            raise PickleRefused("STACK_GLOBAL with non-string names")
        self.stack.append(self.resolve(module, name))

    def call(self) -> None:
        """REDUCE and NEWOBJ: a global and its argument tuple."""
        args = self.pop()
        fn = self.pop()
        self.stack.append(self.called(fn, args))

    def newobj_ex(self) -> None:
        kwargs = self.pop()
        args = self.pop()
        cls = self.pop()
        if kwargs:
            raise PickleRefused("NEWOBJ_EX with keyword arguments")
        self.stack.append(self.called(cls, args))

    def called(self, fn: Any, args: Any) -> Any:
        if not isinstance(fn, Global):
            raise PickleRefused(f"call of a non-global ({type(fn).__name__})")
        if not isinstance(args, tuple):
            raise PickleRefused("call arguments are not a tuple")
        return self.handlers[fn.name](args)

    def build(self) -> None:
        state = self.pop()
        obj = self.top()
        if not isinstance(obj, Opaque):
            raise PickleRefused(f"BUILD on {type(obj).__name__}")
        obj.state = state

    def binpersid(self) -> None:
        pid = self.pop()
        if self.persistent_load is None:
            raise PickleRefused("persistent id not allowed here")
        self.stack.append(self.persistent_load(pid))

    def persid(self) -> None:
        raise PickleRefused("text persistent ids are not supported")


def _set_items(target: Any, items: list) -> None:
    """SETITEM(S) and DICT: ``items`` are alternate keys and values; keys must be text (:func:`_key`)."""
    if len(items) % 2:
        raise PickleRefused("odd number of items for a dict")
    if not isinstance(target, dict):
        raise PickleRefused(f"SETITEMS on {type(target).__name__}")
    for i in range(0, len(items), 2):
        target[_key(items[i])] = items[i + 1]


_OPERATIONS: dict[bytes, Callable[[_Machine], None]] = {
    PROTO: _Machine.proto,
    FRAME: _Machine.frame,
    MARK: _Machine.mark,
    POP: _Machine.pop,
    POP_MARK: _Machine.pop_mark,
    DUP: _Machine.dup,
    LIST: _Machine.list_,
    APPEND: _Machine.append,
    APPENDS: _Machine.appends,
    TUPLE: _Machine.tuple_,
    TUPLE1: lambda m: m.small_tuple(1),
    TUPLE2: lambda m: m.small_tuple(2),
    TUPLE3: lambda m: m.small_tuple(3),
    DICT: _Machine.dict_,
    SETITEM: _Machine.setitem,
    SETITEMS: _Machine.setitems,
    ADDITEMS: _Machine.additems,
    FROZENSET: _Machine.frozenset_,
    GLOBAL: _Machine.global_,
    STACK_GLOBAL: _Machine.stack_global,
    REDUCE: _Machine.call,
    NEWOBJ: _Machine.call,
    NEWOBJ_EX: _Machine.newobj_ex,
    BUILD: _Machine.build,
    BINPERSID: _Machine.binpersid,
    PERSID: _Machine.persid,
}


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
    machine = _Machine(data, pos, handlers, persistent_load)
    value = machine.run()
    return value, machine.rd.pos


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
