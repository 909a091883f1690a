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

import functools
import json
import types
from collections.abc import Mapping
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils
import jinja2.visitor

from moeedge import template_limits as limits
from moeedge.template_limits import (Budgeted, ChatTemplateError, allow, binop, bounded_range, counted, guard_filter,
                                     one_line, printed_size, str_method_size, take, tick)

# Read through the module when used, so that a test lowering a limit there lowers it here.
__all__ = ["ChatTemplate", "ChatTemplateError", "check_messages", "raise_exception", "strftime_now", "tojson"]


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
        if len(source) > limits.MAX_TEMPLATE_CHARS:
            raise ChatTemplateError(f"{self.where}chat template is {len(source):,} characters, over the limit "
                                    f"of {limits.MAX_TEMPLATE_CHARS:,}")
        try:
            with Budgeted():
                self._template = _environment().from_string(source)
        except ChatTemplateError as e:
            raise ChatTemplateError(f"{self.where}{e}") from None
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"{self.where}chat template has a syntax error on line {e.lineno}: "
                                    f"{one_line(e.message)}") from None
        except Exception as e:  # RecursionError on deep nesting, SyntaxError from Python's compiler, ...
            raise ChatTemplateError(f"{self.where}chat template cannot be compiled: {_describe(e)}") from None

    def render(self, **variables) -> str:
        out: list[str] = []
        size = 0
        try:
            with Budgeted() as budget:
                for chunk in self._template.generate(**variables):
                    size += len(chunk)
                    if size > limits.MAX_OUTPUT_CHARS:
                        raise ChatTemplateError(f"chat template: the rendered text is over the limit of "
                                                f"{limits.MAX_OUTPUT_CHARS:,} characters")
                    budget.tick()
                    out.append(chunk)
        except ChatTemplateError as e:
            raise ChatTemplateError(f"{self.where}{e}") from None
        except Exception as e:  # whatever the template did: UndefinedError, TypeError, RecursionError, ...
            raise ChatTemplateError(f"{self.where}chat template failed: {_describe(e)}") from None
        return "".join(out)


def _describe(e: BaseException) -> str:
    line = f" (template line {e.lineno})" if isinstance(e, jinja2.TemplateError) and getattr(e, "lineno", None) else ""
    return f"{type(e).__name__}: {one_line(e)}{line}"



def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """transformers' tojson: json.dumps, without the HTML escaping of jinja2's own, with options."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def strftime_now(format):
    """The time now, as Llama 3's template writes the date."""
    if not isinstance(format, str) or len(format) > 256:
        raise ChatTemplateError("chat template: strftime_now() takes a format string of at most 256 characters")
    return datetime.now().strftime(format)


def raise_exception(message):
    raise ChatTemplateError(f"chat template raised an error: {one_line(message)}")


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
        return binop(operator, left, right)

    def getattr(self, obj, attribute):
        tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        tick()
        return super().getitem(obj, argument)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's own signature)
        tick()
        method = getattr(__obj, "__wrapped__", __obj)  # str.format comes wrapped by the sandbox
        if isinstance(method, types.BuiltinMethodType) and isinstance(getattr(method, "__self__", None), str):
            if method.__name__ == "join" and args and not isinstance(args[0], (str, list, tuple)):
                args = (take(args[0], "join()"), *args[1:])  # a generator from map(), say
            size = str_method_size(method.__name__, method.__self__, args, kwargs)
            if size is not None:
                allow(size, f"{method.__name__}()")
        return counted(super().call(__context, __obj, *args, **kwargs), "a call's result")

    # Output of a block, macro, call or filter block ({% set x %}...{% endset %}): jinja2
    # joins it with environment.concat.
    def concat(self, parts):
        parts = parts if isinstance(parts, list) else take(parts, "a block's text")
        allow(sum(map(len, parts)), "a block's text")
        return "".join(parts)

    def _guard_concat(self, *parts):
        allow(printed_size(*parts), "the result of '~'")
        return "".join(map(str, parts))

    @staticmethod
    def _guard_loop(iterable):
        for item in iterable:
            tick()
            yield item


def _finalize(value):
    """Every {{ expression }} is printed with str(): size what that would print first."""
    if not isinstance(value, str):
        allow(printed_size(value), "a printed value")
    return value


@functools.lru_cache(maxsize=1)
def _environment() -> _Sandbox:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, finalize=_finalize,
                   extensions=[jinja2.ext.loopcontrols, _GenerationTag])
    env.filters["tojson"] = tojson
    env.filters.pop("pprint", None)  # pretty-printed nesting is hard to size, and no chat template uses it
    env.filters = {name: guard_filter(name, f) for name, f in env.filters.items()}
    env.globals.pop("lipsum", None)  # lipsum(n) writes n paragraphs; no chat template uses it
    env.globals.update(range=bounded_range, dict=_Dict(), namespace=_Namespace, raise_exception=raise_exception,
                       strftime_now=strftime_now)
    return env
