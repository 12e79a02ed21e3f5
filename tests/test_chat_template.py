"""Chat templates rendered like transformers: the SmolLM2 GGUF template, and a template using every helper."""

import os

import pytest

from autoglm_jax.chat_template import ChatTemplateError, render_chat_template, select_chat_template
from autoglm_jax.default_model import default_model_path
from autoglm_jax.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
from transformers.utils.chat_template_utils import render_jinja_template  # noqa: E402

CONVERSATIONS = {
    "user_only": [{"role": "user", "content": "What is 2+2?"}],
    "with_system": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi there"}],
    "multi_turn": [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another, in 日本語 please 😀"},
    ],
    "ends_with_assistant": [
        {"role": "system", "content": "You are a poet."},
        {"role": "user", "content": "Line one?"},
        {"role": "assistant", "content": "Roses are red,\n  violets are blue"},
    ],
}

# Uses namespace, loop controls, tojson (no HTML escaping), raise_exception, strftime_now, the generation
# tag, whitespace control, tools and None-valued keys (dropped before rendering).
RICH_TEMPLATE = """
{%- set ns = namespace(turns=0) -%}
{{ bos_token }}
{%- if tools %}<tools>{{ tools | tojson }}</tools>{% endif %}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}
        {{ raise_exception('bad role: ' + message['role']) }}
    {% endif %}
    {% if message['role'] == 'tool' %}{% continue %}{% endif %}
    {% set ns.turns = ns.turns + 1 %}
<|{{ message['role'] }}|>
    {% if message['role'] == 'assistant' %}
{% generation %}{{ message['content'] | trim }}{% endgeneration %}
    {% else %}
{{ message['content'] }}
    {% endif %}
    {% if message.tool_calls is defined %}calls={{ message.tool_calls | tojson(indent=2) }}{% endif %}
    {% if message.content is not defined %}(no content){% endif %}
{{ eos_token }}
{% endfor %}
turns={{ ns.turns }} year={{ strftime_now('%Y') | length }}
{%- if add_generation_prompt %}
<|assistant|>
{% endif %}"""

WEATHER_PARAMETERS = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather <now> & 'later'",
                                           "parameters": WEATHER_PARAMETERS}}]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_gguf(default_model_path())


@pytest.fixture(scope="module")
def reference():
    path = default_model_path()
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_gguf_template_matches_transformers(tokenizer, reference, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    expected = reference.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert text == expected
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    assert ids == reference.encode(expected, add_special_tokens=False)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("with_tools", [True, False])
def test_rich_template_matches_transformers(tokenizer, reference, add_generation_prompt, with_tools):
    messages = [
        {"role": "system", "content": "sys", "name": None},
        {"role": "user", "content": "weather in <Paris> & \"Lyon\"?"},
        {"role": "assistant", "content": None, "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "  It is sunny.  "},
    ]
    tools = TOOLS if with_tools else None
    rich = Tokenizer(tokenizer.backend, special_tokens=tokenizer.special_tokens,
                     chat_templates={"default": RICH_TEMPLATE})
    ours = rich.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools)
    expected = reference.apply_chat_template(messages, chat_template=RICH_TEMPLATE, tools=tools, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    assert ours == expected
    assert ours.startswith("<|im_start|>") and "(no content)" in ours and "calls=[\n" in ours
    assert ('"Weather <now> & \'later\'"' in ours) == with_tools  # tojson does not HTML-escape
    assert ours.endswith("<|assistant|>\n") == add_generation_prompt


def test_renderer_matches_transformers_renderer_on_clean_messages():
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": " b "}]
    variables = {"bos_token": "<s>", "eos_token": "</s>", "custom_flag": True}
    ours = render_chat_template(RICH_TEMPLATE, messages, add_generation_prompt=True, tools=TOOLS, **variables)
    expected, _ = render_jinja_template(conversations=[messages], tools=TOOLS, chat_template=RICH_TEMPLATE,
                                        add_generation_prompt=True, **variables)
    assert ours == expected[0]


def test_continue_final_message_matches_transformers(tokenizer, reference):
    messages = CONVERSATIONS["ends_with_assistant"]
    ours = tokenizer.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True)
    expected = reference.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    assert ours == expected and ours.endswith("violets are blue")


def test_raise_exception_becomes_chat_template_error():
    with pytest.raises(ChatTemplateError, match="bad role: robot"):
        render_chat_template(RICH_TEMPLATE, [{"role": "robot", "content": "x"}], bos_token="", eos_token="")


def test_sandbox_blocks_mutation_and_syntax_errors_are_clear():
    with pytest.raises(ChatTemplateError, match="rejected"):
        render_chat_template("{% set _ = messages.append(1) %}x", [{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="line 1"):
        render_chat_template("{% for m in messages %}", [{"role": "user", "content": "x"}])


def test_missing_or_named_templates():
    with pytest.raises(ChatTemplateError, match="my-model has no chat template"):
        select_chat_template({}, source="my-model")
    templates = {"default": "D", "tool_use": "T"}
    assert select_chat_template(templates) == "D"
    assert select_chat_template(templates, tools=TOOLS) == "T"
    with pytest.raises(ChatTemplateError, match="'rag'"):
        select_chat_template({"rag": "R"})


def test_tokenizer_without_template_raises(tokenizer):
    bare = Tokenizer(tokenizer.backend, special_tokens=tokenizer.special_tokens, source="bare-model")
    with pytest.raises(ChatTemplateError, match="bare-model has no chat template"):
        bare.apply_chat_template(CONVERSATIONS["user_only"])


def test_bad_messages_are_rejected():
    with pytest.raises(ChatTemplateError, match="empty conversation"):
        render_chat_template("x", [])
    with pytest.raises(ChatTemplateError, match="no 'role'"):
        render_chat_template("x", [{"content": "hi"}])
