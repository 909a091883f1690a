"""The budget of one chat-template rendering (moeedge.chat_template): a deadline, and
caps on every string, list, number and range the template builds, each checked before
the thing is built. The sandboxed environment calls these hooks; tests may lower the
limits here."""
from __future__ import annotations

import contextvars
import functools
import itertools
import re
import string
import time
from collections.abc import ItemsView, KeysView, Mapping, ValuesView
from dataclasses import dataclass

import jinja2

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
# wordwrap runs Python's textwrap, which no deadline check interrupts and which grows faster
# than its input (a million characters at width 1 ran past 30 s; 64 Ki take 0.25 s here).
MAX_WRAP_CHARS = 64 << 10



class ChatTemplateError(ValueError):
    """A chat template that cannot be rendered: a syntax error, an error raised while it runs
    (raise_exception included), or a limit it went past."""



def one_line(text) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= 300 else text[:300] + "..."



# -- the budget of one rendering ---------------------------------------------------------
@dataclass
class _Budget:
    deadline: float
    seconds: float
    made: int = 0

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise ChatTemplateError(f"chat template: still running after the limit of {self.seconds:g} s")


active_budget: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("chat_template_budget", default=None)


class Budgeted:
    """Within it, the hooks below count against a fresh budget (contextvars: per thread)."""

    def __enter__(self) -> _Budget:
        budget = _Budget(time.monotonic() + DEADLINE_S, DEADLINE_S)
        self._token = active_budget.set(budget)
        return budget

    def __exit__(self, *exc) -> None:
        active_budget.reset(self._token)


def tick() -> None:
    budget = active_budget.get()
    if budget is not None:
        budget.tick()


def allow(size: int, what: str) -> None:
    """Refuse to build something of `size` characters or items; count it otherwise."""
    if size > MAX_VALUE_CHARS:
        raise ChatTemplateError(f"chat template: {what} would be {size:,} characters or items, over the limit "
                                f"of {MAX_VALUE_CHARS:,}")
    budget = active_budget.get()
    if budget is not None:
        budget.made += size
        if budget.made > MAX_TOTAL_CHARS:
            raise ChatTemplateError(f"chat template: built over the limit of {MAX_TOTAL_CHARS:,} characters or "
                                    f"items in all")
        budget.tick()


def counted(result, what: str):
    if isinstance(result, (str, bytes, list, tuple, dict)):
        allow(len(result), what)
    return result


_END = object()


def printed_size(*values, indent: int = 0) -> int:
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


def take(iterable, what: str) -> list:
    """The items of an iterable (a generator from map(), say), refusing more than the cap."""
    items = list(itertools.islice(iterable, MAX_VALUE_CHARS + 1))
    allow(len(items), what)
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
        return size + printed_size(*values)
    biggest = 0
    for v in values:
        tick()
        biggest = max(biggest, printed_size(v))
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


def binop(operator: str, a, b):
    tick()
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
        allow(size, f"the result of {operator!r}")
    return jinja2.sandbox.SandboxedEnvironment.default_binop_table[operator](a, b)


def _allow_int(bits: int) -> None:
    if bits > MAX_INT_BITS:
        raise ChatTemplateError(f"chat template: an integer of about {bits:,} bits, over the limit of {MAX_INT_BITS:,}")


def str_method_size(name: str, s: str, args: tuple, kwargs: dict) -> int | None:
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
        return printed_size(*arg) + len(s) * len(arg)
    if name == "format":
        return _str_format_size(s, args, kwargs)
    if name == "format_map" and isinstance(arg, Mapping):
        return _str_format_size(s, (), arg)
    if name == "translate" and isinstance(arg, Mapping):
        return len(s) * max(1, printed_size(*arg.values()))
    if name == "encode":
        return 4 * len(s)
    return None


def bounded_range(*args):
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
        allow(printed_size(value, *args, *kwargs.values()), f"the text {name}() works on")
        if name in ("replace", "indent", "wordwrap", "format"):
            value = str(value)
    if name == "replace" and len(args) >= 2:
        allow(str_method_size("replace", value, (str(args[0]), str(args[1]), *args[2:]), {}), "replace()")
    elif name == "indent":
        width = kwargs.get("width", args[0] if args else 4)
        width = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        allow(len(value) + (value.count("\n") + 1) * width, "indent()")
    elif name == "wordwrap":
        if len(value) > MAX_WRAP_CHARS:
            raise ChatTemplateError(f"chat template: wordwrap() of {len(value):,} characters, over the limit of "
                                    f"{MAX_WRAP_CHARS:,}")
        wrap = kwargs.get("wrapstring", args[2] if len(args) > 2 else None)
        allow(len(value) * (1 + len(wrap if isinstance(wrap, str) else "\n")), "wordwrap()")
    elif name == "format":
        allow(_percent_size(value, kwargs or args), "format()")
    elif name == "join":
        value = value if isinstance(value, (str, list, tuple)) else take(value, "join()")
        sep = kwargs.get("d", args[0] if args else "")
        allow(printed_size(*value) + printed_size(sep) * len(value), "join()")
    elif name == "tojson":
        indent = kwargs.get("indent", args[1] if len(args) > 1 else None)
        width = len(indent) if isinstance(indent, str) else indent if isinstance(indent, int) else 0
        allow(printed_size(value, indent=width), "tojson()")
    elif name == "sum":
        value = _summed(value)
    return value, args, kwargs


def _summed(iterable):
    """The items of sum(), each one checked: sum() of lists builds a longer list at each step."""
    size = 0
    for item in iterable:
        tick()
        if isinstance(item, (list, tuple)):
            size += len(item)
            allow(size, "sum()")
        yield item


def guard_filter(name: str, func):
    # pass_context: jinja2 then never runs the filter at compile time (constant folding),
    # where no deadline applies, and the guard can hand the filter what it asks for.
    kind = getattr(getattr(func, "jinja_pass_arg", None), "name", None)

    @jinja2.pass_context
    @functools.wraps(func, assigned=("__name__", "__doc__"), updated=())
    def guarded(context, value, *args, **kwargs):
        tick()
        value, args, kwargs = _filter_args(name, value, args, kwargs)
        first = {"context": (context,), "eval_context": (context.eval_ctx,),
                 "environment": (context.environment,)}.get(kind, ())
        return counted(func(*first, value, *args, **kwargs), f"{name}()")

    return guarded
