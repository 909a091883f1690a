"""Input class (f): chat templates, in tokenizer_config.json or in a GGUF file's
tokenizer.chat_template, rendered through model.chat and Tokenizer.render_chat.

Payloads of three kinds: sandbox escapes (each does something harmless but visible --
writes targets.ESCAPE_MARKER in the working directory, or prints the canary variable of
the environment -- so that the child can tell it happened), resource exhaustion (huge
loops, huge strings and lists, deep recursion), and plain errors (syntax errors,
undefined names, raise_exception with odd messages). A template is a payload alone,
spliced into the seed's template, two payloads together, or either mutated at the
character level."""
from __future__ import annotations

import copy
import json
import random

from moeedge.fuzz import gguf_file as G
from moeedge.fuzz.inputs import FuzzInput
from moeedge.fuzz.mutate import dump_json, mutate_bytes
from moeedge.fuzz.seeds import CHAT_TEMPLATE, Seeds

M = "fuzz-escape-marker"  # targets.ESCAPE_MARKER
ESCAPES = (
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    f"{{{{ cycler.__init__.__globals__.os.popen('touch {M}').read() }}}}",
    f"{{{{ joiner.__init__.__globals__.os.system('touch {M}') }}}}",
    "{{ namespace.__init__.__globals__.os.environ }}",
    "{{ lipsum.__globals__['os'].environ['MOEEDGE_FUZZ_CANARY'] }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{% for c in ''.__class__.__mro__[1].__subclasses__() %}{% if c.__name__ == 'Popen' %}"
    f"{{{{ c(['touch', '{M}']).wait() }}}}{{% endif %}}{{% endfor %}}",
    f"{{{{ self.__init__.__globals__.__builtins__.__import__('os').system('touch {M}') }}}}",
    f"{{{{ self._TemplateReference__context.cycler.__init__.__globals__.os.system('touch {M}') }}}}",
    f"{{{{ raise_exception.__globals__['__builtins__']['open']('{M}', 'w').write('x') }}}}",
    "{{ raise_exception.__globals__ }}",
    f"{{{{ bos_token.__class__.__mro__[1].__subclasses__()[0].__init__.__globals__ }}}}",
    "{{ (messages|first).items.__self__.__class__ }}",
    "{{ lipsum.__globals__.__builtins__.__import__('os').environ.MOEEDGE_FUZZ_CANARY }}",
    "{% set x = cycler.__init__.__globals__ %}{{ x.os.environ.get('MOEEDGE_FUZZ_CANARY') }}",
    "{{ messages.append({'role': 'user', 'content': 'injected'}) }}{{ messages|length }}",
    "{{ messages.clear() }}{{ messages|length }}",
    "{{ range.__self__.eval('1+1') }}",
    "{{ ''.format.__self__.__class__.__mro__ }}",
    "{{ '{0.__class__.__mro__}'.format('') }}",
    "{{ '%s'.__mod__(bos_token.__class__) }}",
)
EXHAUSTION = (
    "{% for i in range(10**9) %}{% endfor %}",
    "{% for i in range(10**5) %}{% for j in range(10**5) %}{% endfor %}{% endfor %}",
    "{{ 'a' * 10**9 }}",
    "{{ 'a' * 10**7 }}",
    "{% set s = 'a' * 10**8 %}{{ s ~ s ~ s ~ s }}",
    "{{ 'a'|center(10**9) }}",
    "{{ 'x'|indent(10**9) }}",
    "{{ range(10**9)|list|length }}",
    "{{ messages * 10**9 }}",
    "{% set x = [1] %}{% for i in range(40) %}{% set x = x + x %}{% endfor %}{{ x|length }}",
    "{{ 9**9**9 }}",
    "{{ 10**10**7 }}",
    "{{ lipsum(10**6) }}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "{% macro f(n) %}{{ f(n) ~ f(n) }}{% endmacro %}{{ f(0) }}",
    "{% for m in messages recursive %}{{ loop(messages) }}{% endfor %}",
    "{% set ns = namespace(x=0) %}{% for i in range(10**7) %}{% set ns.x = ns.x + 1 %}{% endfor %}{{ ns.x }}",
    "{{ '{:>1000000000}'.format('a') }}",
    "{{ ('a' * 10**6)|wordwrap(1) }}",
    "{{ '(' * 10**5 }}",
    "{{ " + "(" * 1000 + "1" + ")" * 1000 + " }}",
    "{% if true %}" * 2000 + "x" + "{% endif %}" * 2000,
    "{{ messages" + "|list" * 5000 + " }}",
)
ERRORS = (
    "{{ raise_exception('no system role') }}",
    "{{ raise_exception('line one\\nline two\\nline three') }}",
    "{{ raise_exception('') }}",
    "{{ raise_exception(none) }}",
    "{{ raise_exception('x' * 100000) }}",
    "{{ raise_exception() }}",
    "{{ undefined_name }}",
    "{{ messages[10].content }}",
    "{{ messages[0].nope }}",
    "{{ 1 / 0 }}",
    "{{ 1 // 0 }}",
    "{{ [][5] }}",
    "{% for x in 5 %}{% endfor %}",
    "{{ messages|join(5) }}",
    "{% include 'other.jinja' %}",
    "{% extends '/etc/passwd' %}",
    "{% import 'os' as os %}",
    "{% raw %}",
    "{% for %}",
    "{{ }}",
    "{% endfor %}",
    "{{ messages[0]['content']|int + 'a' }}",
    "{{ messages|selectattr('role', 'nope') }}",
    "{{ 'a'|wordwrap(0) }}",
    "{{ '%d'|format('a') }}",
    "{{ messages|tojson(indent='x') }}",
    "{{ {}.__missing__ }}",
    "\x00{{ bos_token }}\udcff",
    "{% set x = 5 %}{{ x.real.imag.bit_length() }}",
    "{{ messages|sort(attribute='nope') }}",
    "{{ messages|batch(0)|list }}",
    "{{ messages|slice(0)|list }}",
)
PAYLOADS = ESCAPES + EXHAUSTION + ERRORS


def make_template(rng: random.Random) -> tuple[str, str]:
    """A template and its description."""
    payload = rng.choice(PAYLOADS)
    op = rng.random()
    if op < 0.5:
        return payload, f"payload {payload[:80]!r}"
    if op < 0.7:  # inside the seed's template, where a real template would hide it
        at = rng.choice([i for i, ch in enumerate(CHAT_TEMPLATE) if ch == "{"] + [len(CHAT_TEMPLATE)])
        return CHAT_TEMPLATE[:at] + payload + CHAT_TEMPLATE[at:], f"seed template with {payload[:80]!r} at {at}"
    if op < 0.8:
        other = rng.choice(PAYLOADS)
        return payload + other, f"payloads {payload[:50]!r} + {other[:50]!r}"
    base = rng.choice((payload, CHAT_TEMPLATE))
    raw, how = mutate_bytes(base.encode("utf-8", "surrogatepass"), rng)
    return raw.decode("utf-8", "surrogateescape"), f"{base[:60]!r} mutated: {how}"


def template_input(rng: random.Random, seeds: Seeds) -> FuzzInput:
    template, description = make_template(rng)
    host = rng.choice(("mixtral", "qwen2_moe", "mixtral-f32"))
    if host in seeds.gguf:
        spec = copy.deepcopy(seeds.gguf[host])
        spec.kv("tokenizer.chat_template").value = template
        return FuzzInput("", 0, host, f"tokenizer.chat_template: {description}", "chat",
                         {"model.gguf": G.to_bytes(spec)})
    config = json.loads((seeds.hf[host] / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    return FuzzInput("", 0, host, f"tokenizer_config.json chat_template: {description}", "chat",
                     {"tokenizer_config.json": dump_json(config)})
