"""A downloaded checkpoint is untrusted input: its chat template is code (run in a sandbox,
under a deadline and size caps), its tokenizer files may be malformed or huge, and prompts
may not be valid text. Each ends in one clear error: a ValueError from the API, one line
on stderr and exit status 2 from the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jinja2
import pytest

from moeedge import chat_template as ct
from moeedge import template_limits
from moeedge.chat_template import ChatTemplate, ChatTemplateError
from moeedge.cli import main
from moeedge.formats.errors import CheckpointError
from moeedge.tokenizer import Tokenizer
from moeedge.tokenizer_gguf import GGUFTokenizer
from tiny_checkpoints import CHAT_TEMPLATE, make_decoder, write_tokenizer

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! \"Quotes\", <tags> & ünïcode ✓"},
        {"role": "user", "content": "What is 2+2?\nAnswer in one word."}]
CHAT_NO_SYSTEM = CHAT[1:]


# -- real chat templates, as their checkpoints ship them --------------------------------------------------
MIXTRAL = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""

QWEN2_CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
                "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

QWEN25_TOOLS = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

OLMOE = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
         "{{ '<|system|>\\n' + message['content'] + '\\n' }}{% elif message['role'] == 'user' %}"
         "{{ '<|user|>\\n' + message['content'] + '\\n' }}{% elif message['role'] == 'assistant' %}"
         "{% if not loop.last %}{{ '<|assistant|>\\n'  + message['content'] + eos_token + '\\n' }}"
         "{% else %}{{ '<|assistant|>\\n'  + message['content'] + eos_token }}{% endif %}{% endif %}"
         "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}{% endfor %}")

LLAMA31 = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# loop controls, a namespace, tojson's options, a macro, filters and a %-format
LOOP_CONTROLS = """{%- set ns = namespace(last_user=-1) %}
{%- for m in messages %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}
{%- macro turn(m) %}<{{ m.role | upper }}>{{ m.content | replace('\\n', ' ') | trim }}{% endmacro %}
{%- for m in messages %}
    {%- if m.role == 'system' %}{% continue %}{% endif %}
    {{- turn(m) }}|{{ m | tojson(indent=2, sort_keys=true) }}|{{ '%-6s|%3d' % (m.role, loop.index) }}
    {%- if loop.index0 == ns.last_user %}{% break %}{% endif %}
{%- endfor %}
{{- (messages | map(attribute='role') | join(',')) ~ '/' ~ (messages | length) ~ (range(3) | list | tojson(separators=(',', ':'))) }}
"""

# the bundled default model's template (moeedge.train.corpus.CHAT_TEMPLATE)
DEFAULT_MODEL = ("{{ bos_token }}{% for m in messages %}"
                 "{% if m['role'] == 'assistant' %}{{ m['content'] }}\n"
                 "{% else %}# {{ m['content'] | replace('\n', '\n# ') }}\n{% endif %}"
                 "{% endfor %}")

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string", "description": "Zürich, say"}},
                                               "required": ["city"]}}}]
TOOL_CALL_CHAT = [*CHAT_NO_SYSTEM[:1],
                  {"role": "assistant", "content": "",
                   "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                                     "arguments": {"city": "Zürich"}}}]},
                  {"role": "tool", "content": "{\"temperature\": 21}"}]


def plain_render(source: str, **variables) -> str:
    """What an unsandboxed jinja2 environment, set up as transformers sets up its own, renders."""
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = ct.tojson
    env.globals.update(raise_exception=ct.raise_exception, strftime_now=ct.strftime_now)
    return env.from_string(source).render(**variables)


VARIABLES = dict(add_generation_prompt=True, bos_token="<s>", eos_token="</s>", tools=None, documents=None)


@pytest.mark.parametrize("source, messages, extra", [
    (MIXTRAL, CHAT, {}),
    (MIXTRAL, CHAT_NO_SYSTEM, {}),
    (QWEN2_CHATML, CHAT, {}),
    (QWEN2_CHATML, CHAT_NO_SYSTEM, {}),
    (QWEN25_TOOLS, CHAT, {}),
    (QWEN25_TOOLS, TOOL_CALL_CHAT, {"tools": TOOLS}),
    (OLMOE, CHAT, {}),
    (LLAMA31, CHAT, {}),
    (LLAMA31, CHAT_NO_SYSTEM, {"tools": TOOLS}),
    (LLAMA31, TOOL_CALL_CHAT, {"tools": TOOLS, "tools_in_user_message": False}),
    (LOOP_CONTROLS, CHAT, {}),
    (DEFAULT_MODEL, CHAT, {}),
    (CHAT_TEMPLATE, CHAT, {}),
], ids=["mixtral", "mixtral-no-system", "qwen2", "qwen2-no-system", "qwen25", "qwen25-tools", "olmoe", "llama31",
        "llama31-tools", "llama31-tool-call", "loop-controls", "default-model", "tiny"])
def test_real_templates_render_as_plain_jinja2_does(source, messages, extra):
    variables = {**VARIABLES, "messages": messages, **extra}
    expected = plain_render(source, **variables)
    assert ChatTemplate(source).render(**variables) == expected
    assert len(expected) > 50


def test_tokenizer_renders_the_checkpoints_template_as_before(tmp_path):
    write_tokenizer(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": LLAMA31}))
    tok = Tokenizer({n: str(tmp_path / n) for n in ("tokenizer.json", "tokenizer_config.json")})
    assert tok.render_chat(CHAT) == plain_render(LLAMA31, **{**VARIABLES, "messages": CHAT})
    assert "Today Date: " + time.strftime("%d %b %Y") in tok.render_chat(CHAT)


def test_named_templates_use_the_default_one(tmp_path):
    write_tokenizer(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "tool_use", "template": "{{ raise_exception('not this one') }}"},
                            {"name": "default", "template": QWEN2_CHATML}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer({n: str(tmp_path / n) for n in ("tokenizer.json", "tokenizer_config.json")})
    assert tok.render_chat(CHAT) == plain_render(QWEN2_CHATML, **{**VARIABLES, "messages": CHAT})


def test_chat_template_jinja_and_special_tokens_map(tmp_path):
    """transformers >= 4.50 writes the template to chat_template.jinja; special_tokens_map.json
    names the end-of-sequence token where tokenizer_config.json does not."""
    write_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "chat_template": "unused"}))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|system|>", "eos_token": {"content": "</s>", "lstrip": False}, "unk_token": "<unk>",
         "additional_special_tokens": ["<|user|>", {"content": "<|assistant|>"}]}))
    (tmp_path / "chat_template.jinja").write_text(QWEN2_CHATML)
    names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
    tok = Tokenizer({n: str(tmp_path / n) for n in names})
    assert tok.eos_ids == [tok.token_id("</s>")] and tok.bos_id == tok.token_id("<s>")
    assert tok.render_chat(CHAT) == plain_render(QWEN2_CHATML, **{**VARIABLES, "messages": CHAT})


def test_generation_tag_renders_its_body():
    source = "{% for m in messages %}{% generation %}[{{ m.content }}]{% endgeneration %}{% endfor %}"
    expected = "[Hi there][Hello! \"Quotes\", <tags> & ünïcode ✓][What is 2+2?\nAnswer in one word.]"
    assert ChatTemplate(source).render(messages=CHAT_NO_SYSTEM) == expected


# -- templates that try to escape the sandbox --------------------------------------------------------------
ESCAPES = [
    "{{ cycler.__init__.__globals__.os.popen('touch MARKER').read() }}",
    "{{ joiner.__init__.__globals__.os.popen('touch MARKER').read() }}",
    "{{ namespace.__init__.__globals__.os.popen('touch MARKER').read() }}",
    "{{ raise_exception.__globals__.os.popen('touch MARKER').read() }}",
    "{% for c in ''.__class__.__mro__[1].__subclasses__() %}{% if c.__name__ == 'Popen' %}"
    "{{ c('touch MARKER', shell=True) }}{% endif %}{% endfor %}",
    "{{ self._TemplateReference__context.cycler.__init__.__globals__.os.popen('touch MARKER') }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ dict.__init__.__globals__ }}{{ dict.mro() }}",
    "{% set ns = namespace(__class__=1) %}",
    "{{ lipsum.__globals__['os'].popen('touch MARKER') }}",
    "{{ ('%s' % messages).__class__.__mro__ }}",
    "{{ 'x'.format.__globals__.os.popen('touch MARKER') }}",
    "{{ '{0.__class__.__init__.__globals__}'.format(cycler) }}",
    "{{ '{0.__init__.__globals__[os]}'.format_map({'0': cycler}) }}",
]


@pytest.mark.parametrize("source", ESCAPES)
def test_templates_cannot_reach_python(tmp_path, monkeypatch, source):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ChatTemplateError, match="chat template"):
        ChatTemplate(source, "tokenizer_config.json").render(messages=CHAT)
    assert not (tmp_path / "MARKER").exists()


def test_a_template_in_tokenizer_config_runs_no_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": ESCAPES[0]}))
    tok = Tokenizer({n: str(tmp_path / n) for n in ("tokenizer.json", "tokenizer_config.json")})
    with pytest.raises(ChatTemplateError, match=r"tokenizer_config\.json: chat_template: chat template failed: "
                                                r"SecurityError"):
        tok.encode_chat(CHAT)
    assert not (tmp_path / "MARKER").exists()


# -- templates that would take all the memory or all the time --------------------------------------------
S = "{% set s = 'abcd' * 1000000 %}"  # 4 MB, just under the cap on one string
BOMBS = {
    "repeat": ("{{ 'a' * 10**8 }}", "the result of '\\*' would be 100,000,000"),
    "repeat-list": ("{{ ([1] * 10**8) | length }}", "the result of '\\*'"),
    "power": ("{{ 7 ** 1000000 }}", "integer of about"),
    "squaring": ("{% set ns = namespace(x=3) %}{% for i in range(64) %}{% set ns.x = ns.x * ns.x %}{% endfor %}",
                 "integer of about"),
    "range": ("{% for i in range(10**9) %}x{% endfor %}", "range of 1,000,000,000 items"),
    "doubling-plus": ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
                      "{% endfor %}", "the result of '\\+'"),
    "doubling-tilde": ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                       "{% endfor %}", "the result of '~'"),
    "set-block": (S + "{% set b %}{% for i in range(1000) %}{{ s }}{% endfor %}{% endset %}", "a block's text"),
    "macro": (S + "{% macro m() %}{% for i in range(1000) %}{{ s }}{% endfor %}{% endmacro %}{{ m() | length }}",
              "a block's text"),
    "printed-list": (S + "{{ [s] * 1000 }}", "a printed value"),
    "filter-of-list": (S + "{{ ([s] * 1000) | upper }}", "the text upper\\(\\) works on"),
    "tojson": (S + "{{ ([s] * 1000) | tojson }}", "tojson\\(\\)"),
    "join-filter": (S + "{{ [s, s, s] | join }}", "join\\(\\)"),
    "join-method": (S + "{{ ''.join([s] * 1000) }}", "join\\(\\)"),
    "replace-method": (S + "{{ s.replace('a', s) }}", "replace\\(\\)"),
    "replace-filter": ("{% set s = 'a' * 100000 %}{{ s | replace('a', s) }}", "replace\\(\\)"),
    "center-filter": ("{{ 'a' | center(10**9) }}", "center\\(\\) got 1,000,000,000"),
    "center-method": ("{{ 'a'.center(10**9) }}", "center\\(\\) would be"),
    "format-method": ("{{ '{:>1000000000}'.format(1) }}", "format\\(\\) would be"),
    "format-filter": ("{{ '%1000000000d' | format(1) }}", "format\\(\\) would be"),
    "percent": ("{{ '%.1000000000f' % 1.0 }}", "the result of '%'"),
    "fromkeys": (S + "{{ dict.fromkeys(range(1000), s) }}", "a printed value"),
    # sum() of lists copies the growing list at every step: counted as it goes
    "sum": ("{{ ([[1] * 1000] * 100000) | sum(start=[]) }}", "built over the limit of 67,108,864"),
    "output": (S + "{% for i in range(1000) %}{{ s }}{% endfor %}", "rendered text is over the limit"),
    "total": ("{% for i in range(1000) %}{% set t = 'abcd' * 1000000 %}{% endfor %}",
              "built over the limit of 67,108,864"),
    "strftime": ("{{ strftime_now('%c' * 10000) }}", "strftime_now"),
    # textwrap grows faster than its input: 1e6 characters at width 1 ran past 30 s (moeedge.fuzz, seed 1)
    "wordwrap": ("{{ ('a' * 10**6) | wordwrap(1) }}", "wordwrap\\(\\) of 1,000,000 characters"),
}


@pytest.mark.parametrize("source, message", BOMBS.values(), ids=BOMBS.keys())
def test_templates_that_would_exhaust_memory_are_stopped(source, message):
    start = time.monotonic()
    with pytest.raises(ChatTemplateError, match=message):
        ChatTemplate(source).render(messages=CHAT)
    assert time.monotonic() - start < 4


@pytest.mark.parametrize("source", [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% set x = j %}{% endfor %}{% endfor %}",
    "{% for i in range(100000) %}{% for m in messages * 1000 %}{% if m.role %}{% endif %}{% endfor %}{% endfor %}",
    "{% for x in range(100000) recursive %}{% if loop.depth < 4 %}{{ loop(range(100000)) }}{% endif %}{% endfor %}",
    "{% macro f(n) %}{% for i in range(100000) %}{{ f(n) if n < 200 else '' }}{% endfor %}{% endmacro %}{{ f(0) }}",
    "{% for i in range(100000) %}{{ (range(100000) | list | sort | first) }}{% endfor %}",
], ids=["empty-loops", "output-loops", "set-loops", "message-loops", "recursive-loop", "recursive-macro", "filters"])
def test_templates_that_would_never_end_are_stopped(monkeypatch, source):
    monkeypatch.setattr(template_limits, "DEADLINE_S", 0.5)
    start = time.monotonic()
    with pytest.raises(ChatTemplateError, match=r"chat template: still running after the limit of 0.5 s|Recursion"):
        ChatTemplate(source).render(messages=CHAT)
    assert time.monotonic() - start < 3


@pytest.mark.parametrize("source, message", [
    ("{% for %}", "syntax error on line 1"),
    ("{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}", "cannot be compiled"),
    ("{% include 'other.jinja' %}", "chat template failed"),
    ("{{ x" * 10, "syntax error"),
    ("{{ m() }}{% macro m() %}{{ m() }}{% endmacro %}", "chat template failed"),
    ("{{ messages[0].content.nope.deeper }}", "UndefinedError"),
    ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ("{{ raise_exception('After the optional system message, roles must alternate') }}",
     "chat template raised an error: After the optional system message, roles must alternate"),
])
def test_broken_templates_give_one_clear_error(source, message):
    with pytest.raises(ChatTemplateError, match=message) as e:
        ChatTemplate(source, "x/tokenizer_config.json").render(messages=CHAT)
    assert str(e.value).startswith("x/tokenizer_config.json: chat template")
    assert "\n" not in str(e.value)


def test_a_template_too_long_is_refused():
    with pytest.raises(ChatTemplateError, match="over the limit of 262,144"):
        ChatTemplate("x" * (template_limits.MAX_TEMPLATE_CHARS + 1))


def test_the_sandbox_keeps_its_globals_apart():
    """Rendering leaves no budget behind, and the caller's messages are not the template's."""
    messages = [{"role": "user", "content": "hi", "extra": {"nested": [1, 2]}}]
    assert ChatTemplate("{{ messages[0].extra.nested | tojson }}").render(messages=messages) == "[1, 2]"
    assert template_limits.active_budget.get() is None


# -- malformed tokenizer files ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base(tmp_path_factory):
    directory = tmp_path_factory.mktemp("base")
    make_decoder(directory, "mixtral", seed=6)
    write_tokenizer(directory)
    return directory


def checkpoint(base: Path, directory: Path, files: dict[str, bytes | str | int]) -> Path:
    """base's weights and tokenizer, with `files` written over (an int: a sparse file that size)."""
    directory.mkdir(exist_ok=True)
    for f in base.iterdir():  # hard links: a symlink out of the directory would be refused
        os.link(f, directory / f.name)
    for name, content in files.items():
        (directory / name).unlink(missing_ok=True)
        if isinstance(content, int):
            with open(directory / name, "wb") as f:
                f.truncate(content)
        else:
            (directory / name).write_bytes(content.encode() if isinstance(content, str) else content)
    return directory


def tokenizer_files(directory: Path) -> dict[str, str]:
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
    return {n: str(directory / n) for n in names if (directory / n).is_file()}


CONFIG = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE}
MALFORMED = {
    "tokenizer.json-not-json": ({"tokenizer.json": "{not json"}, "tokenizer.json: not a tokenizer.json"),
    "tokenizer.json-wrong-shape": ({"tokenizer.json": '{"model": 5}'}, "tokenizer.json: not a tokenizer.json"),
    "tokenizer.json-not-utf8": ({"tokenizer.json": b'{"\xff"}'}, "tokenizer.json: not UTF-8 text \\(byte 0xff"),
    "tokenizer.json-huge": ({"tokenizer.json": (128 << 20) + 1}, "tokenizer.json: 128.0 MiB, over the limit of "
                                                                 "128.0 MiB for a tokenizer.json"),
    "config-not-json": ({"tokenizer_config.json": "{'single': 'quotes'}"},
                        "tokenizer_config.json: not valid JSON \\(Expecting property name"),
    "config-a-list": ({"tokenizer_config.json": "[1, 2]"}, "tokenizer_config.json: a JSON list, not an object"),
    "config-bos-int": ({"tokenizer_config.json": json.dumps({**CONFIG, "bos_token": 5})},
                       "tokenizer_config.json: bos_token is 5, not a string"),
    "config-eos-list": ({"tokenizer_config.json": json.dumps({**CONFIG, "eos_token": ["</s>"]})},
                        "tokenizer_config.json: eos_token is \\['</s>'\\], not a string"),
    "config-eos-content-int": ({"tokenizer_config.json": json.dumps({**CONFIG, "eos_token": {"content": 2}})},
                               "tokenizer_config.json: eos_token is 2, not a string"),
    "config-add-bos": ({"tokenizer_config.json": json.dumps({**CONFIG, "add_bos_token": "yes"})},
                       "tokenizer_config.json: add_bos_token is 'yes', not true or false"),
    "config-surrogate": ({"tokenizer_config.json": '{"bos_token": "\\udcff"}'},
                         "tokenizer_config.json: bos_token is not valid text"),
    "config-deep": ({"tokenizer_config.json": "[" * 100000 + "]" * 100000}, "nested too deeply"),
    "config-huge": ({"tokenizer_config.json": (16 << 20) + 1}, "tokenizer_config.json: 16.0 MiB, over the limit"),
    "special-map-not-json": ({"special_tokens_map.json": "nope"}, "special_tokens_map.json: not valid JSON"),
    "special-map-eos-int": ({"special_tokens_map.json": '{"eos_token": 7}'},
                            "special_tokens_map.json: eos_token is 7, not a string"),
    "special-map-extra": ({"special_tokens_map.json": '{"additional_special_tokens": "<x>"}'},
                          "special_tokens_map.json: additional_special_tokens is '<x>', not a list"),
}


@pytest.mark.parametrize("files, message", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_tokenizer_files_api(base, tmp_path, files, message):
    d = checkpoint(base, tmp_path / "ckpt", files)
    with pytest.raises(CheckpointError, match=message) as e:
        Tokenizer(tokenizer_files(d))
    assert str(d) in str(e.value)


@pytest.mark.parametrize("files, message", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_tokenizer_files_cli(base, tmp_path, capsys, files, message):
    d = checkpoint(base, tmp_path / "ckpt", files)
    assert main(["run", str(d), "--prompt", "hello", "--max-new-tokens", "2", "--memory-budget", "4GiB"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moeedge: error: ") and len(err.strip().splitlines()) == 1
    assert __import__("re").search(message, err), err


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("sp")
    (d / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 50)
    spm.SentencePieceTrainer.train(input=str(d / "corpus.txt"), model_prefix=str(d / "tokenizer"), vocab_size=60,
                                   model_type="bpe", byte_fallback=False, bos_id=1, eos_id=2, unk_id=0,
                                   minloglevel=2)
    return d / "tokenizer.model"


@pytest.mark.parametrize("content, message", [
    (b"\x00junk, not a protobuf" * 10, "tokenizer.model: not a sentencepiece model"),
    ((32 << 20) + 1, "tokenizer.model: 32.0 MiB, over the limit of 32.0 MiB"),
])
def test_malformed_sentencepiece_model(tmp_path, content, message):
    path = tmp_path / "tokenizer.model"
    if isinstance(content, int):
        with open(path, "wb") as f:
            f.truncate(content)
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        Tokenizer({"tokenizer.model": str(path)})


def test_a_tokenizer_file_that_is_not_a_regular_file_is_refused_unread(tmp_path):
    os.mkfifo(tmp_path / "tokenizer.json")  # open() would wait for a writer forever
    with pytest.raises(CheckpointError, match="not a regular file"):
        Tokenizer({"tokenizer.json": str(tmp_path / "tokenizer.json")})


@pytest.mark.parametrize("template, message", [
    (5, "chat_template: is 5, not a string or a list"),
    ({"default": "x"}, "chat_template: is \\{'default': 'x'\\}, not a string"),
    ([{"name": "default"}], "chat_template: \\{'name': 'default'\\} is not a \\{\"name\": string, \"template\": "
                            "string\\} entry"),
    ([{"name": "tool_use", "template": "x"}], "chat_template: has no template named 'default'"),
    ("{% if %}", "chat_template: chat template has a syntax error on line 1"),
])
def test_a_malformed_chat_template_is_reported_when_the_chat_is_rendered(base, tmp_path, template, message):
    d = checkpoint(base, tmp_path / "ckpt", {"tokenizer_config.json": json.dumps({**CONFIG,
                                                                                  "chat_template": template})})
    tok = Tokenizer(tokenizer_files(d))  # a plain prompt needs no template
    assert tok.decode(tok.encode("hello world")) == "hello world"
    with pytest.raises(ChatTemplateError, match=message):
        tok.encode_chat(CHAT)


def test_a_gguf_chat_template_that_is_not_a_string_is_reported():
    tok = GGUFTokenizer(["<unk>", "<s>", "</s>", "a"], [0.0, 0.0, 0.0, -1.0], [2, 3, 3, 1], bos_id=1, eos_ids=[2],
                        chat_template=["not", "a", "template"])
    assert tok.encode("a")[-1] == 3  # a plain prompt needs no template
    with pytest.raises(ChatTemplateError, match="GGUF metadata tokenizer.chat_template: 'not' is not a"):
        tok.render_chat(CHAT)


def test_a_gguf_chat_template_runs_in_the_sandbox(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tok = GGUFTokenizer(["<unk>", "<s>", "</s>", "a"], [0.0, 0.0, 0.0, -1.0], [2, 3, 3, 1], bos_id=1, eos_ids=[2],
                        chat_template=ESCAPES[0])
    with pytest.raises(ChatTemplateError, match="GGUF metadata tokenizer.chat_template: chat template failed"):
        tok.encode_chat(CHAT)
    assert not (tmp_path / "MARKER").exists()


# -- prompts, messages and token ids ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizers(base, sp_model):
    gguf = GGUFTokenizer(["<unk>", "<s>", "</s>", "\u2581", "a"], [0.0, 0.0, 0.0, -1.0, -1.0], [2, 3, 3, 1, 1],
                         bos_id=1, eos_ids=[2], chat_template=CHAT_TEMPLATE)
    return {"tokenizer.json": Tokenizer(tokenizer_files(base)), "tokenizer.model": Tokenizer(
        {"tokenizer.model": str(sp_model)}), "gguf": gguf}


@pytest.mark.parametrize("kind", ["tokenizer.json", "tokenizer.model", "gguf"])
def test_prompts_that_are_not_valid_text(tokenizers, kind):
    tok = tokenizers[kind]
    with pytest.raises(ValueError, match=r"the prompt is not valid text: '\\udcff' at character 3 is a lone "
                                         r"surrogate \(was the input valid UTF-8\?\)"):
        tok.encode("abc\udcff")
    with pytest.raises(ValueError, match="lone surrogate"):
        tok.encode("\ud800")
    with pytest.raises(TypeError, match="the prompt must be a str, not bytes"):
        tok.encode(b"abc")


@pytest.mark.parametrize("kind", ["tokenizer.json", "tokenizer.model", "gguf"])
def test_token_ids_that_are_not_tokens(tokenizers, kind):
    tok = tokenizers[kind]
    assert tok.decode([]) == ""
    assert tok.decode([10 ** 6]) == ""  # past the vocabulary (an embedding's padding rows): skipped
    with pytest.raises(ValueError, match="token id -1 is negative"):
        tok.decode([-1])
    with pytest.raises(TypeError, match="token ids must be a list of integers"):
        tok.decode(["a"])


@pytest.mark.parametrize("messages, message", [
    ([{"content": "hi"}], "message 0 has no 'role'"),
    ([{"role": "user"}], "message 0 has no 'content'"),
    ([{"role": "user", "content": "hi"}, {"role": "user", "content": 5}], "message 1's content is int, not a string"),
    ([{"role": "user", "content": None}], "message 0's content is NoneType, not a string"),
    ([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "message 0's content is list, not a string"),
    ([{"role": 1, "content": "hi"}], "message 0's role is int, not a string"),
    ([{"role": "user", "content": "bad \udcff"}], "message 0's content is not valid text"),
    (["hello"], "message 0 is str, not a"),
    ([], "messages is empty"),
    ("hello", "messages must be a list"),
])
@pytest.mark.parametrize("kind", ["tokenizer.json", "gguf"])
def test_malformed_messages(tokenizers, kind, messages, message):
    with pytest.raises(ValueError, match=message):
        tokenizers[kind].encode_chat(messages)


def test_a_chat_that_renders_no_tokens_is_refused(tmp_path):
    write_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{# nothing #}"}))
    tok = Tokenizer({n: str(tmp_path / n) for n in ("tokenizer.json", "tokenizer_config.json")})
    assert tok.bos_id is None and tok.encode("") == []
    with pytest.raises(ValueError, match="the chat rendered as '', which is no tokens"):
        tok.encode_chat(CHAT)


def test_model_chat_gives_the_errors_too(base):
    import moeedge

    with moeedge.load(base, memory_budget="4GiB", max_context=64) as model:
        with pytest.raises(ValueError, match="message 0's content is int"):
            model.chat([{"role": "user", "content": 3}])
        with pytest.raises(ValueError, match="lone surrogate"):
            model.generate("\udcff", max_new_tokens=2, temperature=0)


# -- the same through the command line -------------------------------------------------------------------
def moeedge(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moeedge.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=180)


def test_cli_prompt_of_invalid_utf8_exits_2(base):
    run = subprocess.run([sys.executable, "-m", "moeedge.cli", "run", str(base), "--prompt", b"caf\xe9",
                          "--max-new-tokens", "2", "--memory-budget", "4GiB"], capture_output=True, timeout=180)
    err = run.stderr.decode("utf-8", "replace")
    assert run.returncode == 2, err
    assert "the prompt is not valid text: '\\udce9' at character 3 is a lone surrogate" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_prompt_of_no_tokens_exits_2(base, tmp_path, capsys):
    d = checkpoint(base, tmp_path / "ckpt", {"tokenizer_config.json": json.dumps({"eos_token": "</s>"})})
    assert main(["run", str(d), "--prompt", "", "--max-new-tokens", "2", "--memory-budget", "4GiB"]) == 2
    err = capsys.readouterr().err
    assert err == "moeedge: error: --prompt '' is no tokens: give some text\n"


@pytest.mark.parametrize("template, message", [
    ("{{ raise_exception('This model needs a system message') }}",
     "chat template raised an error: This model needs a system message"),
    (ESCAPES[0], "chat template failed: SecurityError: access to attribute '__init__'"),
    ("{{ 'a' * 10**9 }}", "over the limit of 4,194,304"),
    ("{% for x %}", "chat template has a syntax error on line 1"),
    (["not a template"], "is not a {\"name\": string, \"template\": string} entry"),
])
def test_cli_chat_with_a_broken_template_exits_2(base, tmp_path, template, message):
    d = checkpoint(base, tmp_path / "ckpt", {"tokenizer_config.json": json.dumps({**CONFIG,
                                                                                  "chat_template": template})})
    run = moeedge("chat", str(d), "--max-new-tokens", "2", stdin="hello\n/quit\n")
    assert run.returncode == 2, run.stdout + run.stderr
    assert run.stderr.startswith(f"moeedge: error: {d}/tokenizer_config.json: chat_template: ")
    assert message in run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert not (Path.cwd() / "MARKER").exists()


def test_cli_chat_refuses_a_bad_turn_and_goes_on(base, tmp_path):
    d = checkpoint(base, tmp_path / "ckpt", {"tokenizer_config.json": json.dumps({**CONFIG, "chat_template": (
        "{% for m in messages %}{% if 'forbidden' in m.content %}{{ raise_exception('no forbidden words') }}"
        "{% endif %}{{ m.content }}{% endfor %}")})})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": 5}]}))
    script = b"a forbidden word\ncaf\xe9\n/load " + str(bad).encode() + b"\nhello\n/quit\n"
    run = subprocess.run([sys.executable, "-m", "moeedge.cli", "chat", str(d), "--max-new-tokens", "2"],
                         input=script, capture_output=True, timeout=180)
    out = run.stdout.decode()
    assert run.returncode == 0, run.stderr.decode()
    assert "chat template raised an error: no forbidden words)" in out
    assert "(that line is not valid text: '\\udce9' at character 3 is a lone surrogate" in out
    assert f"(cannot load {bad}: message 0's content is int, not a string)" in out
    assert out.count("tok/s") == 1  # only "hello" was answered
