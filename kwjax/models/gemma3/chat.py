"""Gemma 3's chat format: the turn markers, the `-it` models' template, and one exchange as token ids.

The embedded 270M checkpoint is the pretrained model and carries no template; fine-tuning teaches it
this format, so training, sampling and the exported tokenizer_config.json all take it from here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kwjax.tokenizer import Tokenizer

START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"

# google/gemma-3-*-it tokenizer_config.json. Contents are `trim`med and every turn ends "<end_of_turn>\n".
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)


def format_user_prompt(prompt: str) -> str:
    """A user turn and the opening of the model turn; the prompt is stripped like the template's `trim`."""
    return f"{START_OF_TURN}user\n{prompt.strip()}{END_OF_TURN}\n{START_OF_TURN}model\n"


def encode_chat(tokenizer: Tokenizer, prompt: str,
                response: str | None = None) -> tuple[list[int], list[int]]:
    """(ids, response_mask) of one exchange, ids equal to transformers' `apply_chat_template`.

    `<bos><start_of_turn>user\\n{prompt}<end_of_turn>\\n<start_of_turn>model\\n{response}<end_of_turn>\\n`.
    The mask is 1 on the response and its `<end_of_turn>` (the loss must teach the model to stop) and 0
    on the prompt and the trailing "\\n", which the template adds after every turn but is never generated.
    Without a response: the generation prompt, mask all 0. Parts are encoded separately: they meet at
    special tokens and "\\n" (a piece matched whole), so no merge crosses a boundary.
    """
    ids = tokenizer.encode(format_user_prompt(prompt), add_bos=True)
    mask = [0] * len(ids)
    if response is None:
        return ids, mask
    answer = tokenizer.encode(response.strip()) + [tokenizer.end_of_turn_id]
    tail = tokenizer.encode("\n")
    return ids + answer + tail, mask + [1] * len(answer) + [0] * len(tail)
