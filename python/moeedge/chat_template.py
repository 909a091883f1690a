"""Chat templates rendered as transformers renders them, but treated as the untrusted code
they are.

A checkpoint's chat template (tokenizer_config.json's "chat_template", a GGUF file's
tokenizer.chat_template) is a Jinja program written by whoever published the download. It
runs in jinja2's ImmutableSandboxedEnvironment, as in transformers, so it cannot reach
Python's internals (os.popen through __globals__, __subclasses__, ...) or change its inputs.
The sandbox bounds neither time nor memory, so this module adds:

- a deadline, checked at every loop step, call, attribute access, operator and output chunk;
- a cap on each string or list the template builds (with *, **, +, %, ~, filters, string
  methods, {% set %} blocks and macros), checked before it is built, and on their total;
- a cap on range() lengths and on the rendered text.

Every limit exceeded, every error inside the template and raise_exception() end in one
ChatTemplateError, a ValueError whose message starts with "chat template".
"""
from __future__ import annotations

import contextvars
import functools
import itertools
import json
import re
import string
import time
import types
from collections.abc import ItemsView, KeysView, Mapping, ValuesView
from dataclasses import dataclass
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils
import jinja2.visitor

# Real templates are a few KB (the longest, with tool calling, under 20 KB); real prompts are
# bounded by a context of at most ~1M tokens. Each limit is far above what a real template
# does, and far below what would hurt the machine. Module-level so tests can lower them.
MAX_TEMPLATE_CHARS = 256 << 10  # compiling takes ~20 us a character, outside the deadline
MAX_OUTPUT_CHARS = 4 << 20     # the rendered prompt
MAX_VALUE_CHARS = 4 << 20      # one string (characters) or list (items) the template builds
MAX_TOTAL_CHARS = 64 << 20     # all of them, in one rendering
MAX_RANGE = 100_000            # items of one range()
MAX_INT_BITS = 4096            # an integer the template computes (** and * on ints)
DEADLINE_S = 5.0               # one rendering, wall clock


class ChatTemplateError(ValueError):
    """A chat template that cannot be rendered: a syntax error, an error raised while it runs
    (raise_exception included), or a limit it went past."""


def check_messages(messages) -> list[dict]:
    """The conversation as plain data: a list of {"role": str, "content": str, ...} dicts.

    Other keys pass through, converted to plain JSON-like data, so that the template sees no
    object whose methods the sandbox does not know (as transformers does)."""
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, "
                         f"not {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty: a chat needs at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"message {i} is {type(m).__name__}, not a {{'role': ..., 'content': ...}} dict")
        for key in ("role", "content"):
            if key not in m:
                raise ValueError(f"message {i} has no {key!r}")
            if not isinstance(m[key], str):
                raise ValueError(f"message {i}'s {key} is {type(m[key]).__name__}, not a string")
            _check_text(m[key], f"message {i}'s {key}")
    return [_plain(m) for m in messages]


def _check_text(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid text: {text[e.start]!r} at character {e.start} is a lone surrogate "
                         f"(was the input valid UTF-8?)") from None


def _plain(value):
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # subclasses (enums, ...) may carry methods: strip them
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


class ChatTemplate:
    """A compiled chat template; render() is safe to call whatever the template's text.
    `origin` (a file, say) starts every error message."""

    def __init__(self, source: str, origin: str = ""):
        self.where = f"{origin}: " if origin else ""
        if not isinstance(source, str):
            raise ChatTemplateError(f"{self.where}chat template is {type(source).__name__}, not a string")
        if len(source) > MAX_TEMPLATE_CHARS:
            raise ChatTemplateError(f"{self.where}chat template is {len(source):,} characters, over the limit "
                                    f"of {MAX_TEMPLATE_CHARS:,}")
        try:
            with _Budgeted():
                self._template = _environment().from_string(source)
        except ChatTemplateError as e:
            raise ChatTemplateError(f"{self.where}{e}") from None
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"{self.where}chat template has a syntax error on line {e.lineno}: "
                                    f"{_one_line(e.message)}") from None
        except Exception as e:  # RecursionError on deep nesting, SyntaxError from Python's compiler, ...
            raise ChatTemplateError(f"{self.where}chat template cannot be compiled: {_describe(e)}") from None

    def render(self, **variables) -> str:
        out: list[str] = []
        size = 0
        try:
            with _Budgeted() as budget:
                for chunk in self._template.generate(**variables):
                    size += len(chunk)
                    if size > MAX_OUTPUT_CHARS:
                        raise ChatTemplateError(f"chat template: the rendered text is over the limit of "
                                                f"{MAX_OUTPUT_CHARS:,} characters")
                    budget.tick()
                    out.append(chunk)
        except ChatTemplateError as e:
            raise ChatTemplateError(f"{self.where}{e}") from None
        except Exception as e:  # whatever the template did: UndefinedError, TypeError, RecursionError, ...
            raise ChatTemplateError(f"{self.where}chat template failed: {_describe(e)}") from None
        return "".join(out)


def _one_line(text) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= 300 else text[:300] + "..."


def _describe(e: BaseException) -> str:
    line = f" (template line {e.lineno})" if isinstance(e, jinja2.TemplateError) and getattr(e, "lineno", None) else ""
    return f"{type(e).__name__}: {_one_line(e)}{line}"


# -- the budget of one rendering ---------------------------------------------------------
@dataclass
class _Budget:
    deadline: float
    seconds: float
    made: int = 0

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise ChatTemplateError(f"chat template: still running after the limit of {self.seconds:g} s")


_active: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("chat_template_budget", default=None)


class _Budgeted:
    """Within it, the hooks below count against a fresh budget (contextvars: per thread)."""

    def __enter__(self) -> _Budget:
        budget = _Budget(time.monotonic() + DEADLINE_S, DEADLINE_S)
        self._token = _active.set(budget)
        return budget

    def __exit__(self, *exc) -> None:
        _active.reset(self._token)


def _tick() -> None:
    budget = _active.get()
    if budget is not None:
        budget.tick()


def _allow(size: int, what: str) -> None:
    """Refuse to build something of `size` characters or items; count it otherwise."""
    if size > MAX_VALUE_CHARS:
        raise ChatTemplateError(f"chat template: {what} would be {size:,} characters or items, over the limit "
                                f"of {MAX_VALUE_CHARS:,}")
    budget = _active.get()
    if budget is not None:
        budget.made += size
        if budget.made > MAX_TOTAL_CHARS:
            raise ChatTemplateError(f"chat template: built over the limit of {MAX_TOTAL_CHARS:,} characters or "
                                    f"items in all")
        budget.tick()


def _counted(result, what: str):
    if isinstance(result, (str, bytes, list, tuple, dict)):
        _allow(len(result), what)
    return result


_END = object()


def _printed_size(*values, indent: int = 0) -> int:
    """How many characters str() or json.dumps() of the values have together, about: every
    string, item and indentation counted each time it appears, so a list of a thousand
    references to one long string counts a thousand times. Stops counting past the cap, so
    it costs at most that many steps, however large or shared the values."""
    total = 0
    stack = [iter(values)]
    while stack and total <= MAX_VALUE_CHARS:
        v = next(stack[-1], _END)
        if v is _END:
            stack.pop()
            continue
        inside = len(stack) > 1
        if inside:  # quotes or a separator, and the indentation of json.dumps(indent=...)
            total += 2 + indent * (len(stack) - 1)
        if isinstance(v, str):
            total += len(v)
        elif isinstance(v, (bytes, bytearray)):
            total += 4 * len(v)
        elif isinstance(v, Mapping):
            total += 2
            stack.append(itertools.chain.from_iterable(v.items()))
        elif isinstance(v, (list, tuple, set, frozenset, KeysView, ValuesView, ItemsView)):
            total += 2
            stack.append(iter(v))
        elif isinstance(v, jinja2.utils.Namespace):
            stack.append(iter((v._Namespace__attrs,)))
        else:
            total += 24  # numbers, None, undefined, and objects whose repr is short
    return total


def _take(iterable, what: str) -> list:
    """The items of an iterable (a generator from map(), say), refusing more than the cap."""
    items = list(itertools.islice(iterable, MAX_VALUE_CHARS + 1))
    _allow(len(items), what)
    return items


# -- sizes of what an operation would build, worked out before it is done ------------------
_SEQ = (str, list, tuple)
_PERCENT_FIELD = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?[a-zA-Z%]")
_UNBOUNDED = MAX_VALUE_CHARS + 1


def _format_size(fmt: str, pads: list[int], values, each_once: bool = False) -> int:
    """The length of fmt filled in, at most: each field padded by the widths and precisions
    written in it, and printing one value once (each_once: fmt % tuple) or any value (a
    name or index may come back)."""
    size = len(fmt) + sum(pads)
    if each_once:
        return size + _printed_size(*values)
    biggest = 0
    for v in values:
        _tick()
        biggest = max(biggest, _printed_size(v))
        if size + len(pads) * biggest > MAX_VALUE_CHARS:
            break
    return size + len(pads) * biggest


def _percent_size(fmt: str, args) -> int:
    """fmt % args. A * width or precision comes from the arguments: taken as unbounded."""
    pads = [sum(_UNBOUNDED if n == "*" else int(n) if n else 0 for n in m.groups())
            for m in _PERCENT_FIELD.finditer(fmt)]
    if isinstance(args, Mapping):
        return _format_size(fmt, pads, args.values())
    return _format_size(fmt, pads, args if isinstance(args, tuple) else (args,), each_once=True)


def _str_format_size(fmt: str, args, kwargs) -> int:
    """fmt.format(*args, **kwargs). A width written as a field ({:{w}}) is taken as unbounded."""
    pads = [_UNBOUNDED if "{" in (spec or "") else sum(map(int, re.findall(r"\d+", spec or "")))
            for _, name, spec, _ in string.Formatter().parse(fmt) if name is not None]
    return _format_size(fmt, pads, [*args, *kwargs.values()])


def _binop(operator: str, a, b):
    _tick()
    size = None
    if operator == "+" and isinstance(a, _SEQ) and isinstance(b, _SEQ):
        size = len(a) + len(b)
    elif operator == "*" and isinstance(a, _SEQ) and isinstance(b, int):
        size = len(a) * max(b, 0)
    elif operator == "*" and isinstance(b, _SEQ) and isinstance(a, int):
        size = len(b) * max(a, 0)
    elif operator == "*" and isinstance(a, int) and isinstance(b, int):
        _allow_int(a.bit_length() + b.bit_length())
    elif operator == "**" and isinstance(a, int) and isinstance(b, int) and b > 0 and abs(a) > 1:
        _allow_int(a.bit_length() * b)
    elif operator == "%" and isinstance(a, str):
        size = _percent_size(a, b)
    if size is not None:
        _allow(size, f"the result of {operator!r}")
    return jinja2.sandbox.SandboxedEnvironment.default_binop_table[operator](a, b)


def _allow_int(bits: int) -> None:
    if bits > MAX_INT_BITS:
        raise ChatTemplateError(f"chat template: an integer of about {bits:,} bits, over the limit of {MAX_INT_BITS:,}")


def _str_method_size(name: str, s: str, args: tuple, kwargs: dict) -> int | None:
    """The length of s.name(*args, **kwargs) at most, for the str methods that can build
    something much longer than s; None for the others (their result is counted after)."""
    arg = args[0] if args else None
    if name in ("center", "ljust", "rjust", "zfill"):
        width = kwargs.get("width", arg)
        return max(len(s), width) if isinstance(width, int) else None
    if name == "expandtabs":
        tab = kwargs.get("tabsize", 8 if arg is None else arg)
        return len(s) + s.count("\t") * max(tab, 0) if isinstance(tab, int) else None
    if name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        n = s.count(args[0]) if args[0] else len(s) + 1
        if len(args) > 2 and isinstance(args[2], int) and args[2] >= 0:
            n = min(n, args[2])
        return len(s) + n * len(args[1])
    if name == "join" and isinstance(arg, (list, tuple)):
        return _printed_size(*arg) + len(s) * len(arg)
    if name == "format":
        return _str_format_size(s, args, kwargs)
    if name == "format_map" and isinstance(arg, Mapping):
        return _str_format_size(s, (), arg)
    if name == "translate" and isinstance(arg, Mapping):
        return len(s) * max(1, _printed_size(*arg.values()))
    if name == "encode":
        return 4 * len(s)
    return None


def _range(*args):
    try:
        r = range(*args)
    except TypeError as e:
        raise ChatTemplateError(f"chat template: range{args}: {e}") from None
    if len(r) > MAX_RANGE:
        raise ChatTemplateError(f"chat template: range of {len(r):,} items, over the limit of {MAX_RANGE:,}")
    return r


# -- filters: the sizes they may build, checked first ------------------------------------
# Filters that do not print their input (they count, pick, sort or regroup it). Every
# other filter turns a non-string input into text first, so that text is sized first.
_STRUCTURAL = frozenset("""abs attr batch count d default dictsort first float groupby int items last length
    list map max min random reject rejectattr reverse round select selectattr slice sort sum tojson unique""".split())


def _filter_args(name: str, value, args: tuple, kwargs: dict):
    """Check what filter `name` would build; return the (value, args, kwargs) to call it with
    (an iterable it would take whole is taken here, with a cap)."""
    for x in (*args, *kwargs.values()):
        if isinstance(x, int) and x > MAX_VALUE_CHARS:  # widths, counts, lengths
            raise ChatTemplateError(f"chat template: {name}() got {x:,}, over the limit of {MAX_VALUE_CHARS:,}")
    if name not in _STRUCTURAL:
        _allow(_printed_size(value, *args, *kwargs.values()), f"the text {name}() works on")
        if name in ("replace", "indent", "wordwrap", "format"):
            value = str(value)
    if name == "replace" and len(args) >= 2:
        _allow(_str_method_size("replace", value, (str(args[0]), str(args[1]), *args[2:]), {}), "replace()")
    elif name == "indent":
        width = kwargs.get("width", args[0] if args else 4)
        width = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        _allow(len(value) + (value.count("\n") + 1) * width, "indent()")
    elif name == "wordwrap":
        wrap = kwargs.get("wrapstring", args[2] if len(args) > 2 else None)
        _allow(len(value) * (1 + len(wrap if isinstance(wrap, str) else "\n")), "wordwrap()")
    elif name == "format":
        _allow(_percent_size(value, kwargs or args), "format()")
    elif name == "join":
        value = value if isinstance(value, (str, list, tuple)) else _take(value, "join()")
        sep = kwargs.get("d", args[0] if args else "")
        _allow(_printed_size(*value) + _printed_size(sep) * len(value), "join()")
    elif name == "tojson":
        indent = kwargs.get("indent", args[1] if len(args) > 1 else None)
        width = len(indent) if isinstance(indent, str) else indent if isinstance(indent, int) else 0
        _allow(_printed_size(value, indent=width), "tojson()")
    elif name == "sum":
        value = _summed(value)
    return value, args, kwargs


def _summed(iterable):
    """The items of sum(), each one checked: sum() of lists builds a longer list at each step."""
    size = 0
    for item in iterable:
        _tick()
        if isinstance(item, (list, tuple)):
            size += len(item)
            _allow(size, "sum()")
        yield item


def _guard_filter(name: str, func):
    # pass_context: jinja2 then never runs the filter at compile time (constant folding),
    # where no deadline applies, and the guard can hand the filter what it asks for.
    kind = getattr(getattr(func, "jinja_pass_arg", None), "name", None)

    @jinja2.pass_context
    @functools.wraps(func, assigned=("__name__", "__doc__"), updated=())
    def guarded(context, value, *args, **kwargs):
        _tick()
        value, args, kwargs = _filter_args(name, value, args, kwargs)
        first = {"context": (context,), "eval_context": (context.eval_ctx,),
                 "environment": (context.environment,)}.get(kind, ())
        return _counted(func(*first, value, *args, **kwargs), f"{name}()")

    return guarded


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """transformers' tojson: json.dumps, without the HTML escaping of jinja2's own, with options."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def strftime_now(format):
    """The time now, as Llama 3's template writes the date."""
    if not isinstance(format, str) or len(format) > 256:
        raise ChatTemplateError("chat template: strftime_now() takes a format string of at most 256 characters")
    return datetime.now().strftime(format)


def raise_exception(message):
    raise ChatTemplateError(f"chat template raised an error: {_one_line(message)}")


class _Dict:
    """dict() and dict.fromkeys(), without the type itself (its attributes are Python's
    internals; as in transformers)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args):
        return dict.fromkeys(*args)


class _Namespace(jinja2.utils.Namespace):
    """namespace() whose attributes cannot start with an underscore (as in transformers)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for key in attrs:
            _Namespace._check(key)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.sandbox.SecurityError(f"a namespace attribute may not start with '_': {name!r}")


class _GenerationTag(jinja2.ext.Extension):
    """{% generation %}...{% endgeneration %}, which transformers uses to find the assistant's
    tokens for training: renders its body."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


class _Guards(jinja2.visitor.NodeTransformer):
    """Rewrites the parsed template: each for loop's iterable is checked at every step, and
    each ~ goes through a size check (jinja2 compiles both to code no sandbox hook sees)."""

    def visit_For(self, node):
        self.generic_visit(node)
        node.iter = _call_env("_guard_loop", [node.iter], node.lineno)
        return node

    def visit_Concat(self, node):
        self.generic_visit(node)
        return _call_env("_guard_concat", node.nodes, node.lineno)


def _call_env(attr: str, args: list, lineno: int):
    return jinja2.nodes.Call(jinja2.nodes.EnvironmentAttribute(attr, lineno=lineno), args, [], None, None,
                             lineno=lineno)


class _Sandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset(("+", "*", "**", "%"))

    def _parse(self, source, name, filename):
        return _Guards().visit(super()._parse(source, name, filename))

    def call_binop(self, context, operator, left, right):
        return _binop(operator, left, right)

    def getattr(self, obj, attribute):
        _tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        _tick()
        return super().getitem(obj, argument)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's own signature)
        _tick()
        method = getattr(__obj, "__wrapped__", __obj)  # str.format comes wrapped by the sandbox
        if isinstance(method, types.BuiltinMethodType) and isinstance(getattr(method, "__self__", None), str):
            if method.__name__ == "join" and args and not isinstance(args[0], (str, list, tuple)):
                args = (_take(args[0], "join()"), *args[1:])  # a generator from map(), say
            size = _str_method_size(method.__name__, method.__self__, args, kwargs)
            if size is not None:
                _allow(size, f"{method.__name__}()")
        return _counted(super().call(__context, __obj, *args, **kwargs), "a call's result")

    # Output of a block, macro, call or filter block ({% set x %}...{% endset %}): jinja2
    # joins it with environment.concat.
    def concat(self, parts):
        parts = parts if isinstance(parts, list) else _take(parts, "a block's text")
        _allow(sum(map(len, parts)), "a block's text")
        return "".join(parts)

    def _guard_concat(self, *parts):
        _allow(_printed_size(*parts), "the result of '~'")
        return "".join(map(str, parts))

    @staticmethod
    def _guard_loop(iterable):
        for item in iterable:
            _tick()
            yield item


def _finalize(value):
    """Every {{ expression }} is printed with str(): size what that would print first."""
    if not isinstance(value, str):
        _allow(_printed_size(value), "a printed value")
    return value


@functools.lru_cache(maxsize=1)
def _environment() -> _Sandbox:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, finalize=_finalize,
                   extensions=[jinja2.ext.loopcontrols, _GenerationTag])
    env.filters["tojson"] = tojson
    env.filters.pop("pprint", None)  # pretty-printed nesting is hard to size, and no chat template uses it
    env.filters = {name: _guard_filter(name, f) for name, f in env.filters.items()}
    env.globals.pop("lipsum", None)  # lipsum(n) writes n paragraphs; no chat template uses it
    env.globals.update(range=_range, dict=_Dict(), namespace=_Namespace, raise_exception=raise_exception,
                       strftime_now=strftime_now)
    return env
