"""Rendering a model's Jinja chat template the way ``transformers.apply_chat_template`` does.

Owns: the sandboxed Jinja environment (``trim_blocks``, ``lstrip_blocks``, loop controls,
``raise_exception``, a ``tojson`` that does not HTML-escape, ``strftime_now``, the ``{% generation %}``
tag), picking the named template (``tool_use`` when tools are given), message clean-up (keys whose value
is None are dropped), and ``continue_final_message``.

Does not own: where templates come from or tokenizing the result (``tokenizer.py``). Templates are
untrusted code from model files, hence the immutable sandbox.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Appended to the message being continued, to find where its text ends in the rendered chat.
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


class ChatTemplateError(ValueError):
    """The model has no chat template, or its template rejected the conversation."""


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks; renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.datetime.now().strftime(format)


@functools.lru_cache(maxsize=16)
def compile_chat_template(source: str) -> jinja2.Template:
    """The compiled template (cached by source text); raises ChatTemplateError on a syntax error."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not compile (line {e.lineno}): {e.message}") from e


def select_chat_template(templates: Mapping[str, str], *, tools: Any = None, source: str = "the model") -> str:
    """The template to use: ``tool_use`` when tools are given and it exists, else ``default``."""
    if tools is not None and "tool_use" in templates:
        return templates["tool_use"]
    if "default" in templates:
        return templates["default"]
    if not templates:
        raise ChatTemplateError(f"{source} has no chat template; pass a formatted prompt instead of messages")
    raise ChatTemplateError(f"{source} has no default chat template; named templates: {sorted(templates)}")


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    continue_final_message: bool = False,
    **variables: Any,
) -> str:
    """Renders ``messages`` (dicts with ``role`` and ``content``); ``variables`` include bos_token etc.

    ``continue_final_message`` leaves the last message open (no end-of-turn after it) so the model
    continues it; it excludes ``add_generation_prompt``.
    """
    if not messages:
        raise ChatTemplateError("cannot render a chat template for an empty conversation")
    if continue_final_message and add_generation_prompt:
        raise ChatTemplateError("continue_final_message and add_generation_prompt cannot both be set")
    chat = [_clean_message(m, i) for i, m in enumerate(messages)]
    final_text = None
    if continue_final_message:
        final_text = chat[-1].get("content")
        if not isinstance(final_text, str):
            raise ChatTemplateError(f"continue_final_message needs string content in the last message: {final_text!r}")
        chat[-1] = {**chat[-1], "content": final_text + _CONTINUE_TAG}
    try:
        rendered = compile_chat_template(template).render(
            messages=chat, tools=tools, documents=documents, add_generation_prompt=add_generation_prompt, **variables
        )
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template rejected the conversation: {e}") from e
    return rendered if final_text is None else _cut_at_continue_tag(rendered, final_text)


def _clean_message(message: Any, index: int) -> dict[str, Any]:
    if not isinstance(message, Mapping):
        raise ChatTemplateError(f"message {index} must be a dict with 'role' and 'content', got {message!r}")
    if "role" not in message:
        raise ChatTemplateError(f"message {index} has no 'role': {dict(message)!r}")
    # APIs send content=None or tool_calls=None; templates handle a missing key, not a None value.
    return {key: value for key, value in message.items() if value is not None}


def _cut_at_continue_tag(rendered: str, final_text: str) -> str:
    tag = _CONTINUE_TAG.strip()
    if tag not in rendered or final_text.strip() not in rendered:
        raise ChatTemplateError("continue_final_message: the template dropped or rewrote the final message")
    at = rendered.rindex(tag)
    if rendered[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return rendered[:at]
    return rendered[:at].rstrip()  # the template trimmed the message's trailing space
