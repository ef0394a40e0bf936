"""Render a GGUF's ``tokenizer.chat_template`` (a Jinja2 string) without jinja2.

A small interpreter for the Jinja subset that chat templates use, with the environment
Hugging Face and llama-cpp-python render them in: ``trim_blocks``, ``lstrip_blocks``,
loop controls, a ``tojson`` that is ``json.dumps(ensure_ascii=False)``, the globals
``raise_exception``, ``strftime_now``, ``namespace`` and ``range``, and jinja2's
"undefined" rules (a missing key prints as "", is false, and fails when used further).

Supported: ``{{ }}``, ``{% %}``, ``{# #}`` with ``-``/``+`` whitespace control;
``if/elif/else``, ``for`` (tuple targets, ``else``, inline ``if``, ``loop.*``),
``set`` (names, tuples, ``ns.attr``, block form), ``break``/``continue``; expressions
with literals, ``. [] [a:b] ()``, filters, ``is`` tests, ``~ + - * / // % **``,
comparisons, ``in``, ``and/or/not`` and ``x if c else y``. Anything else (macros,
``include``, ``call`` blocks, unknown filters) raises ``ChatTemplateError`` naming it.

    render_chat(template, messages, add_generation_prompt=True, bos_token="<s>")
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any, Callable, Iterable

from tabmesh.errors import TabmeshError


class ChatTemplateError(TabmeshError):
    """The chat template is malformed or uses Jinja beyond what tabmesh interprets."""

    code = "bad_chat_template"


class ChatTemplateRaised(ChatTemplateError):
    """The template itself refused the conversation (``raise_exception``), e.g. roles
    that do not alternate; the message is the template's."""

    code = "chat_template_raised"


# ---------------------------------------------------------------------------------------
# Undefined, loop and namespace objects (jinja2.runtime semantics)

class Undefined:
    """A missing variable, key or attribute: prints as "", is false and empty, and
    raises when used any further (jinja2's default ``Undefined``)."""

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def _fail(self, *_: Any) -> Any:
        raise ChatTemplateError(f"{self._name} is undefined")

    __add__ = __radd__ = __sub__ = __mul__ = __truediv__ = __mod__ = __lt__ = __le__ = _fail
    __gt__ = __ge__ = __call__ = __getitem__ = _fail

    def __str__(self) -> str:
        return ""

    def __bool__(self) -> bool:
        return False

    def __iter__(self):
        return iter(())

    def __len__(self) -> int:
        return 0

    def __eq__(self, other: Any) -> bool:
        return type(other) is Undefined

    def __hash__(self) -> int:
        return 0


class Namespace:
    """``namespace(a=1)``: the one object a ``set`` inside a loop may change."""

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


class LoopContext:
    def __init__(self, items: list) -> None:
        self._items, self.index0, self.length, self.depth, self.depth0 = items, 0, len(items), 1, 0

    index = property(lambda s: s.index0 + 1)
    revindex = property(lambda s: s.length - s.index0)
    revindex0 = property(lambda s: s.length - s.index0 - 1)
    first = property(lambda s: s.index0 == 0)
    last = property(lambda s: s.index0 == s.length - 1)
    previtem = property(lambda s: s._items[s.index0 - 1] if s.index0 else Undefined("loop.previtem"))
    nextitem = property(lambda s: s._items[s.index0 + 1] if s.index0 + 1 < s.length else Undefined("loop.nextitem"))

    def cycle(self, *args: Any) -> Any:
        return args[self.index0 % len(args)]


class _Break(Exception):
    pass


class _Continue(Exception):
    pass


# ---------------------------------------------------------------------------------------
# Lexer: template text -> ("text", s) | ("var", tokens, line) | ("block", tokens, line)

_TOKEN_RE = re.compile(r"""
    (?P<ws>\s+)
  | (?P<float>\d[\d_]*\.\d[\d_]*(?:[eE][+-]?\d+)?|\d[\d_]*[eE][+-]?\d+)
  | (?P<int>\d[\d_]*)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<string>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
  | (?P<op>//|\*\*|==|!=|<=|>=|[-+*/%~<>()\[\]{},.:|=])
""", re.S | re.X)


_TAG_START_RE = re.compile(r"\{\{|\{%|\{#")


def _unescape(lit: str) -> str:
    return lit[1:-1].encode("ascii", "backslashreplace").decode("unicode-escape")


def _lex(src: str, trim_blocks: bool = True, lstrip_blocks: bool = True) -> list[tuple]:
    lines = re.split(r"\r\n|\r|\n", src)
    if lines[-1] == "":                      # keep_trailing_newline=False
        lines.pop()
    src = "\n".join(lines)
    out: list[tuple] = []
    pos, line_starting, n = 0, True, len(src)
    while pos < n:
        m = _TAG_START_RE.search(src, pos)
        text = src[pos:m.start()] if m else src[pos:]
        if not m:
            out.append(("text", text))
            break
        kind = m.group()
        ctl = src[m.end():m.end() + 1]
        if ctl == "-":
            text = text.rstrip()
        elif ctl != "+" and kind != "{{" and lstrip_blocks:
            l_pos = text.rfind("\n") + 1
            if (l_pos > 0 or line_starting) and text[l_pos:] and not text[l_pos:].strip():
                text = text[:l_pos]
        if text:
            out.append(("text", text))
        line = src.count("\n", 0, m.start()) + 1
        p = m.end() + (ctl in ("-", "+"))
        if kind == "{#":
            e = src.find("#}", p)
            if e < 0:
                raise ChatTemplateError(f"line {line}: comment never closed with #}}")
            end, strip = e + 2, src[e - 1] == "-" and e - 1 >= p
            keep = src[e - 1] == "+" and e - 1 >= p
            tokens = None
        else:
            closer = "}}" if kind == "{{" else "%}"
            tokens, depth = [], 0
            while True:
                if p >= n:
                    raise ChatTemplateError(f"line {line}: {kind} never closed with {closer}")
                if depth == 0 and src.startswith(closer, p):
                    end, strip, keep = p + 2, False, False
                    break
                if depth == 0 and src[p] in "-+" and src.startswith(closer, p + 1):
                    end, strip, keep = p + 3, src[p] == "-", src[p] == "+"
                    break
                tm = _TOKEN_RE.match(src, p)
                if not tm:
                    raise ChatTemplateError(f"line {line}: unexpected character {src[p]!r} in {kind} tag")
                p = tm.end()
                typ = tm.lastgroup
                if typ == "ws":
                    continue
                val = tm.group()
                if typ == "op":
                    depth += val in "([{"
                    depth -= val in ")]}"
                tokens.append((typ, val))
        pos = end
        if strip:
            while pos < n and src[pos].isspace():
                pos += 1
        elif kind != "{{" and trim_blocks and not keep and src.startswith("\n", pos):
            pos += 1
        line_starting = src[pos - 1] == "\n"
        if tokens is not None:
            out.append(("var" if kind == "{{" else "block", tokens, line))
    return out


# ---------------------------------------------------------------------------------------
# Parser: expressions become nested tuples ("kind", ...); statements likewise.

class _Parser:
    def __init__(self, tokens: list[tuple[str, str]], line: int) -> None:
        self.toks, self.i, self.line = tokens, 0, line

    def error(self, msg: str) -> ChatTemplateError:
        return ChatTemplateError(f"line {self.line}: {msg}")

    def peek(self, k: int = 0) -> tuple[str, str]:
        j = self.i + k
        return self.toks[j] if j < len(self.toks) else ("end", "")

    def at(self, val: str, k: int = 0) -> bool:
        t = self.peek(k)
        return t[1] == val and t[0] in ("op", "name")

    def take(self, val: str | None = None) -> tuple[str, str]:
        t = self.peek()
        if t[0] == "end" or (val is not None and not self.at(val)):
            raise self.error(f"expected {val or 'more'!r}, found {t[1] or 'end of tag'!r}")
        self.i += 1
        return t

    def name(self) -> str:
        t = self.take()
        if t[0] != "name":
            raise self.error(f"expected a name, found {t[1]!r}")
        return t[1]

    def done(self) -> None:
        if self.i < len(self.toks):
            raise self.error(f"unexpected {self.peek()[1]!r}")

    # expression grammar, jinja2.parser precedence
    def expr(self, cond: bool = True) -> tuple:
        node = self.or_()
        while cond and self.at("if"):
            self.take()
            test = self.or_()
            other: tuple = ("const", Undefined("else branch"))
            if self.at("else"):
                self.take()
                other = self.expr()
            node = ("cond", test, node, other)
        return node

    def or_(self) -> tuple:
        node = self.and_()
        while self.at("or"):
            self.take()
            node = ("or", node, self.and_())
        return node

    def and_(self) -> tuple:
        node = self.not_()
        while self.at("and"):
            self.take()
            node = ("and", node, self.not_())
        return node

    def not_(self) -> tuple:
        if self.at("not"):
            self.take()
            return ("not", self.not_())
        return self.compare()

    def compare(self) -> tuple:
        node, ops = self.math1(), []
        while True:
            t = self.peek()
            if t[0] == "op" and t[1] in ("==", "!=", "<", "<=", ">", ">="):
                self.take()
                ops.append((t[1], self.math1()))
            elif self.at("in"):
                self.take()
                ops.append(("in", self.math1()))
            elif self.at("not") and self.at("in", 1):
                self.i += 2
                ops.append(("notin", self.math1()))
            else:
                break
        return ("compare", node, ops) if ops else node

    def _binary(self, ops: tuple[str, ...], sub: Callable[[], tuple]) -> tuple:
        node = sub()
        while self.peek()[0] == "op" and self.peek()[1] in ops:
            op = self.take()[1]
            node = ("bin", op, node, sub())
        return node

    def math1(self) -> tuple:
        return self._binary(("+", "-"), self.concat)

    def concat(self) -> tuple:
        return self._binary(("~",), self.math2)

    def math2(self) -> tuple:
        return self._binary(("*", "/", "//", "%"), self.pow_)

    def pow_(self) -> tuple:
        return self._binary(("**",), self.unary)

    def unary(self, with_filter: bool = True) -> tuple:
        if self.peek() in (("op", "-"), ("op", "+")):
            op = self.take()[1]
            node = ("neg", self.unary(False)) if op == "-" else self.unary(False)
        else:
            node = self.postfix(self.primary())
        return self.filters(node) if with_filter else node

    def primary(self) -> tuple:
        typ, val = self.take()
        if typ == "name":
            consts = {"true": True, "True": True, "false": False, "False": False, "none": None, "None": None}
            return ("const", consts[val]) if val in consts else ("name", val)
        if typ == "string":
            s = _unescape(val)
            while self.peek()[0] == "string":
                s += _unescape(self.take()[1])
            return ("const", s)
        if typ == "int":
            return ("const", int(val.replace("_", "")))
        if typ == "float":
            return ("const", float(val.replace("_", "")))
        if val == "(":
            if self.at(")"):
                self.take()
                return ("tuple", [])
            node = self.expr()
            if self.at(","):
                items = [node]
                while self.at(","):
                    self.take()
                    if self.at(")"):
                        break
                    items.append(self.expr())
                node = ("tuple", items)
            self.take(")")
            return node
        if val == "[":
            items = []
            while not self.at("]"):
                items.append(self.expr())
                if not self.at("]"):
                    self.take(",")
            self.take("]")
            return ("list", items)
        if val == "{":
            pairs = []
            while not self.at("}"):
                k = self.expr()
                self.take(":")
                pairs.append((k, self.expr()))
                if not self.at("}"):
                    self.take(",")
            self.take("}")
            return ("dict", pairs)
        raise self.error(f"unexpected {val!r}")

    def postfix(self, node: tuple) -> tuple:
        while True:
            if self.at("."):
                self.take()
                t = self.take()
                node = ("getattr", node, int(t[1]) if t[0] == "int" else t[1])
            elif self.at("["):
                self.take()
                node = self.subscript(node)
            elif self.at("("):
                node = ("call", node, *self.call_args())
            else:
                return node

    def subscript(self, node: tuple) -> tuple:
        parts: list[tuple | None] = [None]
        while not self.at("]"):
            if self.at(":"):
                self.take()
                parts.append(None)
            else:
                parts[-1] = self.expr()
        self.take("]")
        if len(parts) == 1:
            if parts[0] is None:
                raise self.error("empty subscript []")
            return ("getitem", node, parts[0])
        return ("slice", node, *(parts + [None])[:3])

    def call_args(self) -> tuple[list, dict]:
        self.take("(")
        args, kwargs = [], {}
        while not self.at(")"):
            if self.peek()[0] == "name" and self.at("=", 1):
                key = self.name()
                self.take("=")
                kwargs[key] = self.expr()
            else:
                args.append(self.expr())
            if not self.at(")"):
                self.take(",")
        self.take(")")
        return args, kwargs

    def filters(self, node: tuple) -> tuple:
        while True:
            if self.at("|"):
                self.take()
                name = self.name()
                args, kwargs = self.call_args() if self.at("(") else ([], {})
                node = ("filter", name, node, args, kwargs, self.line)
            elif self.at("is"):
                self.take()
                neg = self.at("not") and bool(self.take())
                name = self.name()
                args: list = []
                if self.at("("):
                    args = self.call_args()[0]
                elif self.peek()[0] in ("name", "string", "int", "float") or self.at("[") or self.at("{"):
                    if not (self.at("else") or self.at("or") or self.at("and")):
                        args = [self.postfix(self.primary())]
                node = ("test", name, node, args, neg, self.line)
            else:
                return node

    def target(self) -> tuple:
        names = [self.name()]
        if self.at("."):
            self.take()
            return ("attr_target", names[0], self.name())
        while self.at(","):
            self.take()
            names.append(self.name())
        return ("names", names)


_END_TAGS = {"if": ("elif", "else", "endif"), "for": ("else", "endfor"), "set": ("endset",)}
_UNSUPPORTED = ("call", "include", "import", "from", "extends", "block", "filter",
                "with", "raw", "autoescape", "do")


def _parse(items: list[tuple]) -> list[tuple]:
    pos = 0

    def body(stop: tuple[str, ...]) -> tuple[list[tuple], str | None, _Parser | None]:
        nonlocal pos
        nodes: list[tuple] = []
        while pos < len(items):
            item = items[pos]
            pos += 1
            if item[0] == "text":
                nodes.append(("text", item[1]))
                continue
            p = _Parser(item[1], item[2])
            if item[0] == "var":
                e = p.expr()
                p.done()
                nodes.append(("output", e))
                continue
            kw = p.name()
            if kw in stop:
                return nodes, kw, p
            if kw == "if":
                branches, else_body = [], []
                cond = p.expr()
                p.done()
                while True:
                    b, end, ep = body(_END_TAGS["if"])
                    branches.append((cond, b))
                    if end == "elif":
                        cond = ep.expr()
                        ep.done()
                        continue
                    if end == "else":
                        ep.done()
                        else_body, end, ep = body(("endif",))
                    if end != "endif":
                        raise p.error("{% if %} without {% endif %}")
                    break
                nodes.append(("if", branches, else_body))
            elif kw == "for":
                tgt = p.target()
                p.take("in")
                it = p.expr(cond=False)
                filt = None
                if p.at("if"):
                    p.take()
                    filt = p.expr()
                if p.at("recursive"):
                    raise p.error("unsupported construct: recursive for-loops")
                p.done()
                b, end, ep = body(_END_TAGS["for"])
                else_body: list[tuple] = []
                if end == "else":
                    else_body, end, ep = body(("endfor",))
                if end != "endfor":
                    raise p.error("{% for %} without {% endfor %}")
                nodes.append(("for", tgt, it, filt, b, else_body))
            elif kw == "set":
                tgt = p.target()
                if p.at("="):
                    p.take()
                    value = p.expr()
                    if p.at(","):              # set a, b = x, y
                        vals = [value]
                        while p.at(","):
                            p.take()
                            vals.append(p.expr())
                        value = ("tuple", vals)
                    p.done()
                    nodes.append(("set", tgt, value))
                else:
                    p.done()
                    b, end, _ = body(("endset",))
                    if end != "endset":
                        raise p.error("{% set %} block without {% endset %}")
                    nodes.append(("setblock", tgt, b))
            elif kw == "macro":
                name = p.name()
                p.take("(")
                params: list[tuple[str, tuple | None]] = []
                while not p.at(")"):
                    pname = p.name()
                    default = None
                    if p.at("="):
                        p.take()
                        default = p.expr()
                    params.append((pname, default))
                    if not p.at(")"):
                        p.take(",")
                p.take(")")
                p.done()
                b, end, _ = body(("endmacro",))
                if end != "endmacro":
                    raise p.error("{% macro %} without {% endmacro %}")
                nodes.append(("macro", name, params, b))
            elif kw == "generation":             # HF's assistant-mask marker: renders its body
                p.done()
                b, end, _ = body(("endgeneration",))
                if end != "endgeneration":
                    raise p.error("{% generation %} without {% endgeneration %}")
                nodes.extend(b)
            elif kw in ("break", "continue"):
                p.done()
                nodes.append((kw,))
            elif kw in _UNSUPPORTED:
                raise p.error(f"unsupported construct: {{% {kw} %}}")
            else:
                raise p.error(f"unexpected tag {{% {kw} %}}")
        return nodes, None, None

    return body(())[0]


# ---------------------------------------------------------------------------------------
# Evaluation

_STR_METHODS = {"strip", "lstrip", "rstrip", "split", "rsplit", "splitlines", "startswith", "endswith",
                "upper", "lower", "title", "capitalize", "replace", "find", "rfind", "count", "join",
                "isdigit", "isalpha", "isalnum", "isspace", "islower", "isupper", "center", "format",
                "removeprefix", "removesuffix", "zfill", "partition", "rpartition", "swapcase"}
_DICT_METHODS = {"items", "keys", "values", "get"}
_LIST_METHODS = {"index", "count"}


def getattr_(obj: Any, name: Any) -> Any:
    """``obj.name``: a safe method, else a key, else Undefined (jinja2 sandbox getattr)."""
    if isinstance(name, str):
        if isinstance(obj, Undefined):
            obj._fail()
        if name.startswith("_"):
            return Undefined(f"attribute {name!r}")
        if isinstance(obj, str) and name in _STR_METHODS or isinstance(obj, dict) and name in _DICT_METHODS \
                or isinstance(obj, (list, tuple)) and name in _LIST_METHODS:
            return getattr(obj, name)
        if isinstance(obj, (Namespace, LoopContext)):
            return getattr(obj, name, Undefined(f"attribute {name!r}"))
        if not isinstance(obj, (str, dict, list, tuple, int, float, type(None))):
            try:
                return getattr(obj, name)
            except AttributeError:
                pass
    try:
        return obj[name]
    except (KeyError, IndexError, TypeError):
        return Undefined(f"{type(obj).__name__} key or attribute {name!r}")


def getitem(obj: Any, key: Any) -> Any:
    """``obj[key]``: an item, else an attribute of that name, else Undefined."""
    if isinstance(obj, Undefined):
        obj._fail()
    try:
        return obj[key]
    except (KeyError, IndexError, TypeError):
        if isinstance(key, str):
            return getattr_(obj, key)
        return Undefined(f"{type(obj).__name__} item {key!r}")


def to_str(v: Any) -> str:
    return "" if isinstance(v, Undefined) else str(v)


def _binop(op: str, a: Any, b: Any) -> Any:
    try:
        if op == "~":
            return to_str(a) + to_str(b)
        if op == "+":
            return a + b
        if op == "-":
            return a - b
        if op == "*":
            return a * b
        if op == "/":
            return a / b
        if op == "//":
            return a // b
        if op == "%":
            return a % b
        return a ** b
    except TypeError as e:
        raise ChatTemplateError(f"cannot apply {op!r} to {type(a).__name__} and {type(b).__name__}: {e}") from None


def _compare(op: str, a: Any, b: Any) -> bool:
    if op == "==":
        return a == b
    if op == "!=":
        return a != b
    if op in ("in", "notin"):
        try:
            return (a in b) == (op == "in")
        except TypeError as e:
            raise ChatTemplateError(f"'in' with {type(b).__name__}: {e}") from None
    try:
        return a < b if op == "<" else a <= b if op == "<=" else a > b if op == ">" else a >= b
    except TypeError as e:
        raise ChatTemplateError(f"cannot compare {type(a).__name__} {op} {type(b).__name__}: {e}") from None


class _Scope:
    def __init__(self, parent: "_Scope | None", vars: dict[str, Any]) -> None:
        self.parent, self.vars = parent, vars

    def lookup(self, name: str) -> Any:
        s: _Scope | None = self
        while s is not None:
            if name in s.vars:
                return s.vars[name]
            s = s.parent
        return Undefined(f"'{name}'")


def _eval(node: tuple, sc: _Scope) -> Any:
    kind = node[0]
    if kind == "const":
        return node[1]
    if kind == "name":
        return sc.lookup(node[1])
    if kind == "getattr":
        return getattr_(_eval(node[1], sc), node[2])
    if kind == "getitem":
        return getitem(_eval(node[1], sc), _eval(node[2], sc))
    if kind == "slice":
        obj = _eval(node[1], sc)
        if isinstance(obj, Undefined):
            obj._fail()
        a, b, c = (None if x is None else _eval(x, sc) for x in node[2:5])
        return obj[a:b:c]
    if kind == "call":
        fn = _eval(node[1], sc)
        args = [_eval(a, sc) for a in node[2]]
        kwargs = {k: _eval(v, sc) for k, v in node[3].items()}
        if not callable(fn) or isinstance(fn, Undefined):
            raise ChatTemplateError(f"{to_str(fn) or 'an undefined value'} is not callable")
        return fn(*args, **kwargs)
    if kind == "filter":
        f = FILTERS.get(node[1])
        if f is None:                            # as jinja2: an error only once it runs
            raise ChatTemplateError(f"line {node[5]}: unsupported filter '{node[1]}'")
        value = _eval(node[2], sc)
        return f(value, *[_eval(a, sc) for a in node[3]], **{k: _eval(v, sc) for k, v in node[4].items()})
    if kind == "test":
        t = TESTS.get(node[1])
        if t is None:
            raise ChatTemplateError(f"line {node[5]}: unsupported test '{node[1]}'")
        r = t(_eval(node[2], sc), *[_eval(a, sc) for a in node[3]])
        return not r if node[4] else r
    if kind == "bin":
        return _binop(node[1], _eval(node[2], sc), _eval(node[3], sc))
    if kind == "compare":
        left = _eval(node[1], sc)
        for op, e in node[2]:
            right = _eval(e, sc)
            if not _compare(op, left, right):
                return False
            left = right
        return True
    if kind == "and":
        a = _eval(node[1], sc)
        return _eval(node[2], sc) if a else a
    if kind == "or":
        a = _eval(node[1], sc)
        return a if a else _eval(node[2], sc)
    if kind == "not":
        return not _eval(node[1], sc)
    if kind == "neg":
        return _binop("-", 0, _eval(node[1], sc))
    if kind == "cond":
        return _eval(node[2], sc) if _eval(node[1], sc) else _eval(node[3], sc)
    if kind == "list":
        return [_eval(x, sc) for x in node[1]]
    if kind == "tuple":
        return tuple(_eval(x, sc) for x in node[1])
    if kind == "dict":
        return {_eval(k, sc): _eval(v, sc) for k, v in node[1]}
    raise ChatTemplateError(f"internal: unknown node {kind}")


class _Macro:
    """``{% macro name(a, b=1) %}``: called, it renders its body in a scope of its own."""

    def __init__(self, name: str, params: list, body: list, scope: _Scope) -> None:
        self.name, self.params, self.body, self.scope = name, params, body, scope

    def __call__(self, *args: Any, **kwargs: Any) -> str:
        if len(args) > len(self.params):
            raise ChatTemplateError(f"macro {self.name!r} takes {len(self.params)} arguments, got {len(args)}")
        s = _Scope(self.scope, {})
        for i, (pname, default) in enumerate(self.params):
            if i < len(args):
                s.vars[pname] = args[i]
            elif pname in kwargs:
                s.vars[pname] = kwargs.pop(pname)
            else:
                s.vars[pname] = Undefined(f"parameter {pname!r}") if default is None else _eval(default, s)
        if kwargs:
            raise ChatTemplateError(f"macro {self.name!r} got unexpected arguments {', '.join(kwargs)}")
        out: list[str] = []
        _exec(self.body, s, out)
        return "".join(out)


def _assign(target: tuple, value: Any, sc: _Scope) -> None:
    if target[0] == "attr_target":
        ns = sc.lookup(target[1])
        if not isinstance(ns, Namespace):
            raise ChatTemplateError(f"cannot assign attribute {target[2]!r} on {target[1]!r}: not a namespace()")
        setattr(ns, target[2], value)
    elif len(target[1]) == 1:
        sc.vars[target[1][0]] = value
    else:
        vals = list(value)
        if len(vals) != len(target[1]):
            raise ChatTemplateError(f"cannot unpack {len(vals)} values into {', '.join(target[1])}")
        sc.vars.update(zip(target[1], vals))


def _exec(nodes: list[tuple], sc: _Scope, out: list[str]) -> None:
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "output":
            out.append(to_str(_eval(node[1], sc)))
        elif kind == "if":
            for cond, body in node[1]:
                if _eval(cond, sc):
                    _exec(body, sc, out)
                    break
            else:
                _exec(node[2], sc, out)
        elif kind == "for":
            _, tgt, it, filt, body, else_body = node
            seq = _eval(it, sc)
            if isinstance(seq, dict):
                seq = list(seq)                  # iterating a mapping gives its keys
            items = list(seq)
            if filt is not None:
                kept = []
                for x in items:
                    s = _Scope(sc, {})
                    _assign(tgt, x, s)
                    if _eval(filt, s):
                        kept.append(x)
                items = kept
            loop = LoopContext(items)
            for i, x in enumerate(items):
                loop.index0 = i
                s = _Scope(sc, {"loop": loop})
                _assign(tgt, x, s)
                try:
                    _exec(body, s, out)
                except _Continue:
                    continue
                except _Break:
                    break
            if not items:
                _exec(else_body, sc, out)
        elif kind == "set":
            _assign(node[1], _eval(node[2], sc), sc)
        elif kind == "setblock":
            buf: list[str] = []
            _exec(node[2], sc, buf)
            _assign(node[1], "".join(buf), sc)
        elif kind == "macro":
            sc.vars[node[1]] = _Macro(node[1], node[2], node[3], sc)
        elif kind == "break":
            raise _Break()
        elif kind == "continue":
            raise _Continue()


# ---------------------------------------------------------------------------------------
# Filters and tests (jinja2.filters / jinja2.tests)

def _tojson(x: Any, indent: int | None = None, ensure_ascii: bool = False,
            separators: Any = None, sort_keys: bool = False) -> str:
    if isinstance(x, Undefined):
        x._fail()
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                      separators=tuple(separators) if separators else None, sort_keys=sort_keys)


def _title(s: Any) -> str:
    return "".join(w[0].upper() + w[1:].lower() for w in re.split(r"([-\s({\[<]+)", to_str(s)) if w)


def _attr_path(x: Any, attribute: Any) -> Any:
    for part in str(attribute).split(".") if isinstance(attribute, str) else [attribute]:
        x = getitem(x, int(part) if isinstance(part, str) and part.isdigit() else part)
    return x


class Markup(str):
    """What ``|safe`` returns: adding a plain string to it HTML-escapes that string
    (markupsafe semantics, which some templates rely on by accident)."""

    def __add__(self, other: Any) -> "Markup":
        return Markup(str.__add__(self, _escape(other)))

    def __radd__(self, other: Any) -> "Markup":
        return Markup(str.__add__(_escape(other), self))


def _escape(v: Any) -> Markup:
    if isinstance(v, Markup):
        return v
    s = to_str(v)
    return Markup(s.replace("&", "&amp;").replace(">", "&gt;").replace("<", "&lt;")
                  .replace("'", "&#39;").replace('"', "&#34;"))


def _select(value: Iterable, args: tuple, want: bool, attribute: str | None = None) -> list:
    if not value:
        return []
    test = (lambda v: TESTS[args[0]](v, *args[1:])) if args else bool
    if args and args[0] not in TESTS:
        raise ChatTemplateError(f"unsupported test '{args[0]}' in select/reject")
    return [x for x in value if bool(test(x if attribute is None else _attr_path(x, attribute))) == want]


def _map(value: Iterable, *args: Any, attribute: Any = None, default: Any = None) -> list:
    if not value:
        return []
    if attribute is not None:
        out = [_attr_path(x, attribute) for x in value]
        return [default if isinstance(v, Undefined) and default is not None else v for v in out]
    if not args or args[0] not in FILTERS:
        raise ChatTemplateError(f"unsupported map filter {args[0] if args else None!r}")
    return [FILTERS[args[0]](x, *args[1:]) for x in value]


def _default(v: Any, default: Any = "", boolean: bool = False) -> Any:
    return default if isinstance(v, Undefined) or (boolean and not v) else v


def _indent(s: Any, width: Any = 4, first: bool = False, blank: bool = False) -> str:
    pad = width if isinstance(width, str) else " " * width
    lines = to_str(s).split("\n")
    body = "\n".join(lines[:1] + [(pad + ln) if (ln or blank) else ln for ln in lines[1:]])
    return pad + body if first else body


def _int(v: Any, default: int = 0, base: int = 10) -> int:
    try:
        return int(v, base) if isinstance(v, str) else int(v)
    except (TypeError, ValueError):
        try:
            return int(float(v))
        except (TypeError, ValueError):
            return default


def _float(v: Any, default: float = 0.0) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return default


def _sort(v: Iterable, reverse: bool = False, case_sensitive: bool = False, attribute: Any = None) -> list:
    def key(x: Any) -> Any:
        x = x if attribute is None else _attr_path(x, attribute)
        return x.lower() if isinstance(x, str) and not case_sensitive else x
    return sorted(v, key=key, reverse=reverse)


def _unique(v: Iterable, case_sensitive: bool = False, attribute: Any = None) -> list:
    seen, out = set(), []
    for x in v:
        k = x if attribute is None else _attr_path(x, attribute)
        k = k.lower() if isinstance(k, str) and not case_sensitive else k
        if k not in seen:
            seen.add(k)
            out.append(x)
    return out


def _round(v: float, precision: int = 0, method: str = "common") -> float:
    import math
    if method == "common":
        return round(v, precision)
    f = math.ceil if method == "ceil" else math.floor
    return f(v * 10 ** precision) / 10 ** precision


FILTERS: dict[str, Callable[..., Any]] = {
    "trim": lambda s, chars=None: to_str(s).strip(chars),
    "length": len, "count": len,
    "tojson": _tojson,
    "join": lambda v, d="", attribute=None: d.join(
        to_str(x if attribute is None else _attr_path(x, attribute)) for x in v),
    "upper": lambda s: to_str(s).upper(), "lower": lambda s: to_str(s).lower(),
    "capitalize": lambda s: to_str(s).capitalize(), "title": _title,
    "replace": lambda s, old, new, count=None: to_str(s).replace(old, new, -1 if count is None else count),
    "default": _default, "d": _default,
    "string": to_str, "safe": lambda s: s if isinstance(s, Markup) else Markup(to_str(s)),
    "escape": _escape, "e": _escape, "int": _int, "float": _float,
    "list": lambda v: list(v), "first": lambda v: next(iter(v), Undefined("first item")),
    "last": lambda v: list(v)[-1] if len(list(v)) else Undefined("last item"),
    "reverse": lambda v: v[::-1] if isinstance(v, str) else list(reversed(list(v))),
    "items": lambda v: [] if isinstance(v, Undefined) else list(v.items()),
    "dictsort": lambda v, case_sensitive=False, by="key", reverse=False: sorted(
        v.items(), key=lambda kv: (lambda x: x.lower() if isinstance(x, str) and not case_sensitive else x)(
            kv[0] if by == "key" else kv[1]), reverse=reverse),
    "select": lambda v, *a: _select(v, a, True), "reject": lambda v, *a: _select(v, a, False),
    "selectattr": lambda v, attr, *a: _select(v, a, True, attr),
    "rejectattr": lambda v, attr, *a: _select(v, a, False, attr),
    "map": _map, "sort": _sort, "unique": _unique,
    "min": lambda v: min(v), "max": lambda v: max(v),
    "sum": lambda v, attribute=None, start=0: sum(
        (x if attribute is None else _attr_path(x, attribute) for x in v), start),
    "abs": abs, "round": _round, "indent": _indent,
    "wordcount": lambda s: len(re.findall(r"\w+", to_str(s))),
    "center": lambda s, width=80: to_str(s).center(width),
    "format": lambda s, *a, **kw: to_str(s) % (kw or a),
}

TESTS: dict[str, Callable[..., bool]] = {
    "defined": lambda v: not isinstance(v, Undefined),
    "undefined": lambda v: isinstance(v, Undefined),
    "none": lambda v: v is None,
    "boolean": lambda v: v is True or v is False,
    "true": lambda v: v is True, "false": lambda v: v is False,
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, float),
    "number": lambda v: isinstance(v, (int, float)),
    "string": lambda v: isinstance(v, str),
    "mapping": lambda v: isinstance(v, dict),
    "sequence": lambda v: hasattr(v, "__len__") and hasattr(v, "__getitem__"),
    "iterable": lambda v: hasattr(v, "__iter__"),
    "callable": callable,
    "sameas": lambda v, other: v is other,
    "equalto": lambda v, other: v == other, "eq": lambda v, other: v == other, "==": lambda v, o: v == o,
    "ne": lambda v, other: v != other, "!=": lambda v, o: v != o,
    "lt": lambda v, o: v < o, "le": lambda v, o: v <= o, "gt": lambda v, o: v > o, "ge": lambda v, o: v >= o,
    "in": lambda v, seq: v in seq,
    "odd": lambda v: v % 2 == 1, "even": lambda v: v % 2 == 0,
    "divisibleby": lambda v, n: v % n == 0,
    "lower": lambda v: to_str(v).islower(), "upper": lambda v: to_str(v).isupper(),
}


# ---------------------------------------------------------------------------------------

def _raise_exception(message: Any) -> None:
    raise ChatTemplateRaised(to_str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    """A compiled template: parse once, ``render(**variables)`` many times."""

    def __init__(self, source: str) -> None:
        self.source = source
        self._nodes = _parse(_lex(source))

    def render(self, **variables: Any) -> str:
        base = {"raise_exception": _raise_exception, "strftime_now": _strftime_now,
                "namespace": Namespace, "range": range, "dict": dict}
        root = _Scope(_Scope(None, base), dict(variables))
        out: list[str] = []
        try:
            _exec(self._nodes, root, out)
        except (_Break, _Continue):
            raise ChatTemplateError("{% break %} or {% continue %} outside a for-loop") from None
        except ChatTemplateError:
            raise
        except Exception as e:   # a filter or method given the wrong kind of value
            raise ChatTemplateError(f"rendering the chat template failed: {type(e).__name__}: {e}") from e
        return "".join(out)


_cache: dict[str, ChatTemplate] = {}


def render_chat(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "", **variables: Any) -> str:
    """Render a conversation with a model's chat template.

    ``messages`` are OpenAI-style dicts (``role``, ``content``, maybe ``tool_calls``).
    Extra keyword arguments (``tools``, ``date_string``, ``strftime_now``, ...) become
    template variables, as in ``transformers``' ``apply_chat_template``.
    """
    compiled = _cache.get(template)
    if compiled is None:
        compiled = _cache[template] = ChatTemplate(template)
        if len(_cache) > 16:
            _cache.pop(next(iter(_cache)))
    return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                           bos_token=bos_token, eos_token=eos_token, **variables)
