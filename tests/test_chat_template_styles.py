"""Loss masks for chat templates written in the style of the model families people fine-tune.

Each template below is a short one written for this test, with the structure and the quirks of
its family (where the system prompt goes, which turn shows reasoning, what is appended after the
conversation, headers a template leaves out). Each family gets a byte-level BPE trained here with
its markers as special tokens; the trained text of every conversation is written out by hand:
every assistant turn as the whole conversation renders it, plus the token that closes it.
"""

import random
from collections import Counter

import pytest
from test_data_masks import encode, trained_runs, untrained_text
from tuneplex.data.pipeline import build, load_tokenizer
from tuneplex.data.spec import DataSpec
from tuneplex.data.targets import IGNORE_INDEX
from tuneplex.errors import UsageError

# -- templates -------------------------------------------------------------------------------

# Qwen2.5: ChatML; tools listed as JSON in the system turn; calls as <tool_call> JSON blocks;
# tool results folded into one user turn of <tool_response> blocks; a default system prompt.
QWEN25 = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content }}"
    "{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}"
    "{{- '\\n\\n# Tools\\n\\nFunction signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    '{{- \'\\n</tools>\\n\\nAnswer a call as <tool_call>\\n{"name": <name>, "arguments": '
    "<args>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first)"
    " or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant' }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for call in message.tool_calls %}"
    "{%- if call.function is defined %}{%- set call = call.function %}{%- endif %}"
    '{{- \'\\n<tool_call>\\n{"name": "\' + call.name + \'", "arguments": \' }}'
    "{{- call.arguments | tojson }}{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}"
    "{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}"
    "{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Llama 3.1: header ids, the tool list put into the first user message, one JSON call per turn,
# tool results under the `ipython` role.
LLAMA31 = (
    "{{- bos_token }}"
    "{%- if messages[0].role == 'system' %}"
    "{%- set system_message = messages[0].content | trim %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{%- if tools %}{{- 'Environment: ipython\\n' }}{%- endif %}"
    "{{- 'Cutting Knowledge Date: December 2023\\n\\n' + system_message + '<|eot_id|>' }}"
    "{%- if tools %}"
    "{%- set first_user = loop_messages[0].content | trim %}"
    "{%- set loop_messages = loop_messages[1:] %}"
    "{{- '<|start_header_id|>user<|end_header_id|>\\n\\n' }}"
    '{{- \'Answer with a JSON function call {"name": ..., "parameters": ...}.\\n\\n\' }}'
    "{%- for tool in tools %}{{- tool | tojson(indent=4) }}{{- '\\n\\n' }}{%- endfor %}"
    "{{- first_user + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}"
    "{%- if message.tool_calls | length != 1 %}"
    "{{- raise_exception('This model only supports single tool-calls at once!') }}{%- endif %}"
    "{%- set call = message.tool_calls[0].function %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    '{{- \'{"name": "\' + call.name + \'", "parameters": \' }}'
    "{{- call.arguments | tojson }}{{- '}<|eot_id|>' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + message.content + '<|eot_id|>' }}"
    "{%- else %}"
    "{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' }}"
    "{{- message.content | trim }}{{- '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def _mistral(space: str, system_when: str | None) -> str:
    """Mistral's [INST] family: v0.3 (`space` " ", the system message dropped) and Nemo (`space`
    "", the system prompt put into the user message that `system_when` picks). Tools go before
    the last user message only."""
    s = space
    plain = "{{- '" + s + "[INST]" + s + "' + message.content + '" + s + "[/INST]' }}"
    system = plain
    if system_when is not None:
        system = (
            "{%- if system_message is defined and " + system_when + " %}"
            "{{- '" + s + "[INST]" + s + "' + system_message + '\\n\\n' + message.content }}"
            "{{- '" + s + "[/INST]' }}"
            "{%- else %}" + plain + "{%- endif %}"
        )
    return (
        "{%- if messages[0].role == 'system' %}"
        "{%- set system_message = messages[0].content %}"
        "{%- set loop_messages = messages[1:] %}"
        "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
        "{%- set user_messages = loop_messages | selectattr('role', 'equalto', 'user') | list %}"
        "{{- bos_token }}"
        "{%- for message in loop_messages %}"
        "{%- if message.role == 'user' %}"
        "{%- if tools and message == user_messages[-1] %}"
        "{{- '[AVAILABLE_TOOLS]" + s + "' + (tools | tojson) + '[/AVAILABLE_TOOLS]' }}"
        "{%- endif %}" + system + "{%- elif message.role == 'assistant' and message.tool_calls %}"
        "{{- '[TOOL_CALLS]" + s + "[' }}"
        "{%- for call in message.tool_calls %}"
        '{{- \'{"name": "\' + call.function.name + \'", "arguments": \' }}'
        "{{- call.function.arguments | tojson }}{{- ', \"id\": \"' + call.id + '\"}' }}"
        "{%- if not loop.last %}{{- ', ' }}{%- endif %}"
        "{%- endfor %}"
        "{{- ']' + eos_token }}"
        "{%- elif message.role == 'assistant' %}"
        "{{- '" + s + "' + (message.content | trim) + eos_token }}"
        "{%- elif message.role == 'tool' %}"
        "{{- '[TOOL_RESULTS]" + s + "' }}"
        "{{- {'content': message.content, 'call_id': message.tool_call_id} | tojson }}"
        "{{- '[/TOOL_RESULTS]' }}"
        "{%- else %}"
        "{{- raise_exception('Only user, assistant and tool roles are supported!') }}"
        "{%- endif %}"
        "{%- endfor %}"
    )


MISTRAL_V3 = _mistral(" ", None)
MISTRAL_NEMO = _mistral("", "message == user_messages[-1]")
# Nemo as released: the system prompt goes into the last message only if it is a user message,
# so a conversation that ends with an answer loses it
MISTRAL_NEMO_LAST_MESSAGE = _mistral("", "loop.last")

# Qwen3: ChatML with a <think> block only on assistant turns after the last user query (always
# on the last turn, empty without reasoning); reasoning from `reasoning_content` or inline. A
# user message that is all <tool_response> is a tool result, not a query.
QWEN3 = (
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content }}"
    "{%- if tools %}{{- '\\n\\n' }}{%- endif %}"
    "{%- elif tools %}{{- '<|im_start|>system\\n' }}{%- endif %}"
    "{%- if tools %}"
    "{{- '# Tools\\n\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>' }}"
    "{%- endif %}"
    "{%- if messages[0].role == 'system' or tools %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- set ns = namespace(last_query=messages | length - 1, searching=true) %}"
    "{%- for message in messages[::-1] %}"
    "{%- if ns.searching and message.role == 'user' and not (message.content is string"
    " and message.content.startswith('<tool_response>')"
    " and message.content.endswith('</tool_response>')) %}"
    "{%- set ns.searching = false %}"
    "{%- set ns.last_query = messages | length - 1 - loop.index0 %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- for message in messages %}"
    "{%- set content = message.content if message.content is string else '' %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- set reasoning = '' %}"
    "{%- if message.reasoning_content is string %}"
    "{%- set reasoning = message.reasoning_content %}"
    "{%- elif '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].rstrip('\\n')"
    ".split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if loop.index0 > ns.last_query and (loop.last or reasoning) %}"
    "{{- '<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{{- content.lstrip('\\n') }}"
    "{%- for call in message.tool_calls or [] %}"
    "{%- if (loop.first and content) or not loop.first %}{{- '\\n' }}{%- endif %}"
    '{{- \'<tool_call>\\n{"name": "\' + call.function.name + \'", "arguments": \' }}'
    "{{- call.function.arguments | tojson }}{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}"
    "{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}"
    "{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Gemma: no system role (its text opens the first user turn), `model` for the assistant,
# contents trimmed, strict alternation.
GEMMA = (
    "{{- bos_token }}"
    "{%- if messages[0].role == 'system' %}"
    "{%- set first_user_prefix = (messages[0].content | trim) + '\\n\\n' %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set first_user_prefix = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if (message.role == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- set role = 'model' if message.role == 'assistant' else message.role %}"
    "{{- '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{- message.content | trim }}"
    "{{- '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)

# Phi-3: <|role|> lines closed by <|end|>; eos appended after a conversation that is not
# waiting for an answer.
PHI3 = (
    "{%- for message in messages %}"
    "{{- '<|' + message.role + '|>\\n' + message.content + '<|end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}"
    "{%- else %}{{- eos_token }}{%- endif %}"
)

# Phi-4: the user turn renders the assistant header; add_generation_prompt adds nothing.
PHI4 = (
    "{%- for message in messages %}"
    "{%- if message.role == 'system' %}"
    "{{- '<|im_start|>system<|im_sep|>' + message.content + '<|im_end|>' }}"
    "{%- elif message.role == 'user' %}"
    "{{- '<|im_start|>user<|im_sep|>' + message.content + '<|im_end|>' }}"
    "{{- '<|im_start|>assistant<|im_sep|>' }}"
    "{%- elif message.role == 'assistant' %}{{- message.content + '<|im_end|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
)

# DeepSeek-R1: full-width markers, the system prompt bare after BOS, `...</think>` cut from
# assistant contents; `is_first` is never reset, so a second tool-call turn has no
# <｜Assistant｜> header (nor <｜tool▁calls▁begin｜>), and the answer after tool outputs opens
# with <｜tool▁outputs▁end｜> instead of a header.
DEEPSEEK_R1 = (
    "{%- set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system='') %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' %}{%- set ns.system = ns.system + message.content %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{{- bos_token + ns.system }}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' %}"
    "{%- set ns.is_tool = false %}{{- '<｜User｜>' + message.content }}"
    "{%- elif message.role == 'assistant' and message.tool_calls %}"
    "{%- set ns.is_tool = false %}"
    "{%- for tool in message.tool_calls %}"
    "{%- set call = '<｜tool▁call▁begin｜>' + tool.type + '<｜tool▁sep｜>' + tool.function.name"
    " + '\\n```json\\n' + (tool.function.arguments | tojson) + '\\n```<｜tool▁call▁end｜>' %}"
    "{%- if not ns.is_first %}"
    "{{- '<｜Assistant｜>' + (message.content or '') + '<｜tool▁calls▁begin｜>' + call }}"
    "{%- set ns.is_first = true %}"
    "{%- else %}{{- '\\n' + call }}{%- endif %}"
    "{%- endfor %}"
    "{{- '<｜tool▁calls▁end｜><｜end▁of▁sentence｜>' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- set content = message.content %}"
    "{%- if '</think>' in content %}{%- set content = content.split('</think>')[-1] %}{%- endif %}"
    "{%- if ns.is_tool %}"
    "{{- '<｜tool▁outputs▁end｜>' + content + '<｜end▁of▁sentence｜>' }}"
    "{%- set ns.is_tool = false %}"
    "{%- else %}{{- '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}{%- endif %}"
    "{%- elif message.role == 'tool' %}"
    "{%- set ns.is_tool = true %}"
    "{%- if ns.is_output_first %}"
    "{{- '<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message.content }}"
    "{{- '<｜tool▁output▁end｜>' }}"
    "{%- set ns.is_output_first = false %}"
    "{%- else %}"
    "{{- '<｜tool▁output▁begin｜>' + message.content + '<｜tool▁output▁end｜>' }}"
    "{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if ns.is_tool %}{{- '<｜tool▁outputs▁end｜>' }}{%- endif %}"
    "{%- if add_generation_prompt and not ns.is_tool %}"
    "{{- '<｜Assistant｜><think>\\n' }}{%- endif %}"
)

# Granite 3: <|start_of_role|>role<|end_of_role|>...<|end_of_text|>, a default system prompt,
# tools as their own turn, calls after <|tool_call|>, results as `tool_response`.
GRANITE = (
    "{%- if messages[0].role == 'system' %}"
    "{%- set system_message = messages[0].content %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{%- set system_message = 'You are Granite, a helpful assistant.' %}"
    "{%- if tools %}"
    "{%- set system_message = system_message + ' Call tools with <|tool_call|> and a list.' %}"
    "{%- endif %}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{{- '<|start_of_role|>system<|end_of_role|>' + system_message + '<|end_of_text|>\\n' }}"
    "{%- if tools %}"
    "{{- '<|start_of_role|>tools<|end_of_role|>' + (tools | tojson(indent=4)) }}"
    "{{- '<|end_of_text|>\\n' }}"
    "{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}"
    "{{- '<|start_of_role|>assistant<|end_of_role|><|tool_call|>' }}"
    "{{- message.tool_calls | map(attribute='function') | list | tojson }}"
    "{{- '<|end_of_text|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|start_of_role|>tool_response<|end_of_role|>' + message.content }}"
    "{{- '<|end_of_text|>\\n' }}"
    "{%- else %}"
    "{{- '<|start_of_role|>' + message.role + '<|end_of_role|>' + message.content }}"
    "{{- '<|end_of_text|>\\n' }}"
    "{%- endif %}"
    "{%- if loop.last and add_generation_prompt %}"
    "{{- '<|start_of_role|>assistant<|end_of_role|>' }}{%- endif %}"
    "{%- endfor %}"
)

# SmolLM3: ChatML with a metadata system turn; `{% generation %}` wraps each assistant turn,
# header included; in /no_think mode the header carries an empty think block.
SMOLLM3 = (
    "{%- set mode = '/think' %}"
    "{%- if messages[0].role == 'system' and '/no_think' in messages[0].content %}"
    "{%- set mode = '/no_think' %}{%- endif %}"
    "{{- '<|im_start|>system\\n## Metadata\\n\\nReasoning Mode: ' + mode + '\\n\\n' }}"
    "{{- '## Custom Instructions\\n\\n' }}"
    "{%- if messages[0].role == 'system' %}"
    "{{- messages[0].content.replace('/no_think', '').replace('/think', '').strip() }}"
    "{%- else %}{{- 'You are a helpful AI assistant named SmolLM.' }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' %}"
    "{{- '<|im_start|>user\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{% generation %}"
    "{%- if mode == '/think' %}"
    "{{- '<|im_start|>assistant\\n' + message.content.lstrip('\\n') + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n' + message.content.lstrip('\\n') }}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{% endgeneration %}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message.content }}"
    "{{- '\\n</tool_response><|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{%- if mode == '/think' %}{{- '<|im_start|>assistant\\n' }}"
    "{%- else %}{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n' }}{%- endif %}"
    "{%- endif %}"
)

# Llama 2 (for the SentencePiece-style tokenizer): [INST] as plain text, the system prompt in
# <<SYS>> inside the first user turn, BOS before every user turn, " answer </s>".
LLAMA2 = (
    "{%- if messages[0].role == 'system' %}"
    "{%- set loop_messages = messages[1:] %}{%- set system_message = messages[0].content %}"
    "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if (message.role == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if loop.index0 == 0 and system_message is defined %}"
    "{%- set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message.content %}"
    "{%- else %}{%- set content = message.content %}{%- endif %}"
    "{%- if message.role == 'user' %}"
    "{{- bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{%- elif message.role == 'assistant' %}{{- ' ' + content.strip() + ' ' + eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
)

MISTRAL_MARKERS = (
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_CALLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
)
CHATML_MARKERS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)
# name: (template, special tokens, bos, eos, whether the tokenizer adds BOS by itself)
FAMILIES = {
    "qwen25": (QWEN25, CHATML_MARKERS, None, "<|im_end|>", False),
    "llama31": (
        LLAMA31,
        ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        "<|begin_of_text|>",
        "<|eot_id|>",
        True,
    ),
    "mistral_v3": (MISTRAL_V3, MISTRAL_MARKERS, "<s>", "</s>", True),
    "mistral_nemo": (MISTRAL_NEMO, MISTRAL_MARKERS, "<s>", "</s>", True),
    "qwen3": (QWEN3, CHATML_MARKERS, None, "<|im_end|>", False),
    "gemma": (
        GEMMA,
        ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"),
        "<bos>",
        "<eos>",
        True,
    ),
    "phi3": (
        PHI3,
        ("<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
        "<s>",
        "<|endoftext|>",
        False,
    ),
    "phi4": (PHI4, ("<|im_start|>", "<|im_sep|>", "<|im_end|>"), None, "<|im_end|>", False),
    "deepseek_r1": (
        DEEPSEEK_R1,
        (
            "<｜begin▁of▁sentence｜>",
            "<｜end▁of▁sentence｜>",
            "<｜User｜>",
            "<｜Assistant｜>",
            "<think>",
            "</think>",
            "<｜tool▁calls▁begin｜>",
            "<｜tool▁calls▁end｜>",
            "<｜tool▁call▁begin｜>",
            "<｜tool▁call▁end｜>",
            "<｜tool▁sep｜>",
            "<｜tool▁outputs▁begin｜>",
            "<｜tool▁outputs▁end｜>",
            "<｜tool▁output▁begin｜>",
            "<｜tool▁output▁end｜>",
        ),
        "<｜begin▁of▁sentence｜>",
        "<｜end▁of▁sentence｜>",
        True,
    ),
    "granite": (
        GRANITE,
        ("<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>", "<|tool_call|>"),
        None,
        "<|end_of_text|>",
        False,
    ),
    "smollm3": (SMOLLM3, CHATML_MARKERS, None, "<|im_end|>", False),
}

# -- conversations ---------------------------------------------------------------------------

SYSTEM = "You answer weather questions briefly."
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def call(name, arguments, id=None):
    out = {"type": "function", "function": {"name": name, "arguments": arguments}}
    return {**out, "id": id} if id else out


def user(text):
    return {"role": "user", "content": text}


def bot(text, **extra):
    return {"role": "assistant", "content": text, **extra}


def calls(*tool_calls, content=None):
    return {"role": "assistant", "content": content, "tool_calls": list(tool_calls)}


def tool(text, call_id=None):
    return {"role": "tool", "content": text, **({"tool_call_id": call_id} if call_id else {})}


def system(text=SYSTEM):
    return {"role": "system", "content": text}


# -- tokenizers ------------------------------------------------------------------------------


def _extra() -> list[str]:
    """Weather-talk sentences, so the BPE learns whole-word tokens with a leading space."""
    rng = random.Random(0)
    extra = [
        "It is sunny in Paris.",
        "It is 22C and sunny in Paris.",
        "It is 12C and rainy in London.",
        "What is the weather in Paris today?",
        "And in London? Thanks! You are welcome. Hello! Goodbye. Rome. Paris is the capital.",
        '{"name": "get_weather", "arguments": {"city": "Paris"}}',
        "Let me check. I should call the tool. The tool answered.",
    ]
    return [rng.choice(extra) for _ in range(1000)]


def _corpus() -> list[str]:
    from tuneplex.testing.tiny import corpus

    return corpus(random.Random(0), lines=2000) + _extra()


def _bpe_tokenizer(out, *, template, specials, bos, eos, add_bos):
    from tuneplex.testing.tiny import build_tokenizer

    style = {"template": template, "specials": specials, "bos": bos, "eos": eos}
    build_tokenizer(out, style={**style, "add_bos": add_bos}, vocab_size=700, texts=_extra())
    return load_tokenizer(str(out))


def _unigram_tokenizer(out):
    """SentencePiece-like: Unigram pieces, spaces as ▁ (Metaspace), as Llama 2 and Mistral."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.Unigram())
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=600,
        special_tokens=["<unk>", "<s>", "</s>"],
        unk_token="<unk>",
        show_progress=False,
    )
    tk.train_from_iterator(_corpus(), trainer=trainer)
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tk.token_to_id("<s>"))]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
        chat_template=LLAMA2,
    ).save_pretrained(out)
    return load_tokenizer(str(out))


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("family_tokenizers")
    out = {}
    for name, (template, specials, bos, eos, add_bos) in FAMILIES.items():
        out[name] = _bpe_tokenizer(
            root / name, template=template, specials=specials, bos=bos, eos=eos, add_bos=add_bos
        )
    out["llama2_unigram"] = _unigram_tokenizer(root / "llama2_unigram")
    return out


# -- helpers ---------------------------------------------------------------------------------


def masks(tok, rows, **kw):
    """(split, [(ids, labels)]) for `rows`; each example is the template's whole rendering."""
    split, encoded = encode(tok, rows, **kw)
    assert len(encoded) == len(rows)
    for row, (ids, _) in zip(rows, encoded, strict=True):
        rendered = tok.apply_chat_template(
            row["messages"],
            tools=row.get("tools"),
            chat_template=kw.get("chat_template"),
            tokenize=False,
        )
        assert tok.decode(ids, skip_special_tokens=False) == rendered
    return split, encoded


def prompts_untrained(tok, ids, labels, messages, *, roles=("system", "user", "tool")):
    """Every non-assistant content (as trimmed by templates that trim) lies in untrained text."""
    rest = untrained_text(tok, ids, labels)
    for m in messages:
        if m["role"] in roles:
            assert m["content"].strip() in rest, m


# -- one test per family ---------------------------------------------------------------------


def test_qwen25_chatml_with_tools(toks):
    tok = toks["qwen25"]
    msgs = [
        system(),
        user("What is the weather in Paris today?"),
        calls(
            call("get_weather", {"city": "Paris"}),
            call("get_time", {"city": "Paris", "utc": True}),
            content="Let me check.",
        ),
        tool("22C and sunny"),
        tool("14:05"),
        bot("It is 22C and sunny in Paris at 14:05."),
        user("And in London tomorrow?"),
        bot("Rainy, I think."),
    ]
    only_calls = [user("Weather in Paris?"), calls(call("get_weather", {"city": "Paris"}))]
    plain = [user("Hello?"), bot("Hello! How can I help?")]
    rows = [
        {"messages": msgs, "tools": [WEATHER_TOOL, TIME_TOOL]},
        {"messages": only_calls, "tools": [WEATHER_TOOL]},
        {"messages": plain},
    ]
    split, [(ids, labels), (ids2, labels2), (ids3, labels3)] = masks(tok, rows)
    assert trained_runs(tok, ids, labels) == [
        "Let me check.\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {"city": "Paris", "utc": true}}\n'
        "</tool_call><|im_end|>",
        "It is 22C and sunny in Paris at 14:05.<|im_end|>",
        "Rainy, I think.<|im_end|>",
    ]
    prompts_untrained(tok, ids, labels, msgs)
    assert "<tool_response>\n22C and sunny\n</tool_response>\n<tool_response>\n14:05" in (
        untrained_text(tok, ids, labels)
    )
    # a turn of calls alone: the template's newline before <tool_call> ends the header
    assert trained_runs(tok, ids2, labels2) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        "</tool_call><|im_end|>"
    ]
    assert trained_runs(tok, ids3, labels3) == ["Hello! How can I help?<|im_end|>"]
    assert untrained_text(tok, ids3, labels3).startswith(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHello?"
    )
    assert split.stats.template_drops == {}


def test_llama31_headers_ipython_tool_results(toks):
    tok = toks["llama31"]
    msgs = [
        system(),
        user("What is the weather in Paris today?"),
        calls(call("get_weather", {"city": "Paris"}), content=""),
        tool("22C and sunny"),
        bot("It is 22C and sunny in Paris."),
        user("Thanks!"),
        bot("  You are welcome.  \n"),
    ]
    split, [(ids, labels)] = masks(tok, [{"messages": msgs, "tools": [WEATHER_TOOL]}])
    assert trained_runs(tok, ids, labels) == [
        '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
        "It is 22C and sunny in Paris.<|eot_id|>",
        "You are welcome.<|eot_id|>",
    ]
    prompts_untrained(tok, ids, labels, msgs)
    rest = untrained_text(tok, ids, labels)
    assert rest.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n")
    assert "<|start_header_id|>ipython<|end_header_id|>\n\n22C and sunny<|eot_id|>" in rest
    assert rest.count("<|start_header_id|>assistant<|end_header_id|>\n\n") == 3
    assert split.stats.template_drops == {}


def test_llama31_refuses_parallel_calls_naming_the_row(toks):
    tok = toks["llama31"]
    good = [user("Hi"), bot("Hello.")]
    two = [
        user("Weather and time in Paris?"),
        calls(call("get_weather", {"city": "Paris"}), call("get_time", {"city": "Paris"})),
    ]
    with pytest.raises(UsageError) as info:
        encode(tok, [{"messages": good}, {"messages": two, "tools": [WEATHER_TOOL, TIME_TOOL]}])
    assert info.value.lines() == [
        "t.jsonl:2: chat template error: This model only supports single tool-calls at once!"
    ]


def test_mistral_v3_spaced_inst_tools_before_last_user_system_dropped(toks):
    tok = toks["mistral_v3"]
    msgs = [
        system(),
        user("What is the weather in Paris today?"),
        bot("It is sunny in Paris."),
        user("And in London? Say [/INST] if unsure."),
        calls(call("get_weather", {"city": "London"}, id="call00001")),
        tool("12C and rainy", call_id="call00001"),
        bot("It is 12C and rainy in London."),
    ]
    rows = [
        {"messages": [user("Hi"), bot("Hello!")]},
        {"messages": msgs, "tools": [WEATHER_TOOL]},
        {"messages": [system("Be brief."), user("Hi"), bot("Hello!")]},
    ]
    split, [(ids1, labels1), (ids, labels), (ids3, labels3)] = masks(tok, rows)
    assert trained_runs(tok, ids1, labels1) == [" Hello!</s>"]
    assert trained_runs(tok, ids, labels) == [
        " It is sunny in Paris.</s>",
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "London"}, '
        '"id": "call00001"}]</s>',
        " It is 12C and rainy in London.</s>",
    ]
    assert trained_runs(tok, ids3, labels3) == [" Hello!</s>"]
    rest = untrained_text(tok, ids, labels)
    prompts_untrained(tok, ids, labels, msgs, roles=("user", "tool"))
    # the tool list stands before the last user message only
    assert rest.startswith(
        "<s> [INST] What is the weather in Paris today? [/INST][AVAILABLE_TOOLS] [{"
    )
    assert SYSTEM not in tok.decode(ids)
    # the system prompt of rows 2 and 3 is left out by the template, and the run says so
    assert split.stats.template_drops == {"system messages": {"rows": 2, "first": "t.jsonl:2"}}


def test_mistral_nemo_system_in_last_user_message_multi_turn(toks):
    tok = toks["mistral_nemo"]
    msgs = [
        system(),
        user("What is the weather in Paris today?"),
        bot("It is sunny in Paris."),
        user("And in London?"),
        calls(call("get_weather", {"city": "London"}, id="call00002")),
        tool("12C and rainy", call_id="call00002"),
        bot("It is 12C and rainy in London."),
        user("Thanks!"),
        bot("You are welcome."),
    ]
    no_tools = [system("Be brief."), user("One?"), bot("One."), user("Two?"), bot("Two.")]
    rows = [{"messages": msgs, "tools": [WEATHER_TOOL]}, {"messages": no_tools}]
    split, [(ids, labels), (ids2, labels2)] = masks(tok, rows)
    assert trained_runs(tok, ids, labels) == [
        "It is sunny in Paris.</s>",
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "London"}, '
        '"id": "call00002"}]</s>',
        "It is 12C and rainy in London.</s>",
        "You are welcome.</s>",
    ]
    prompts_untrained(tok, ids, labels, msgs)
    rest = untrained_text(tok, ids, labels)
    assert f"[/AVAILABLE_TOOLS][INST]{SYSTEM}\n\nThanks![/INST]" in rest
    assert trained_runs(tok, ids2, labels2) == ["One.</s>", "Two.</s>"]
    assert (
        untrained_text(tok, ids2, labels2) == "<s>[INST]One?[/INST][INST]Be brief.\n\nTwo?[/INST]"
    )
    assert split.stats.template_drops == {}


def test_mistral_v3_trimmed_answers_located_when_tools_move(toks):
    """The template trims answers; with tools the cut renderings differ from the whole (the tool
    list moves to the last user message), and an answer with trailing spaces must still be
    found as the template renders it."""
    tok = toks["mistral_v3"]
    msgs = [
        user("What is the weather in Paris today?"),
        bot("It is sunny in Paris.  "),
        user("And in London?"),
        bot("  It is rainy.\n"),
    ]
    split, [(ids, labels)] = masks(tok, [{"messages": msgs, "tools": [WEATHER_TOOL]}])
    assert trained_runs(tok, ids, labels) == [" It is sunny in Paris.</s>", " It is rainy.</s>"]
    assert split.stats.template_drops == {}


def test_mistral_nemo_as_released_drops_system_of_answered_conversations(toks):
    tok = toks["mistral_nemo"]
    msgs = [system("Be brief."), user("One?"), bot("One."), user("Two?"), bot("Two.")]
    split, [(ids, labels)] = masks(
        tok, [{"messages": msgs}], chat_template=MISTRAL_NEMO_LAST_MESSAGE
    )
    assert trained_runs(tok, ids, labels) == ["One.</s>", "Two.</s>"]
    assert untrained_text(tok, ids, labels) == "<s>[INST]One?[/INST][INST]Two?[/INST]"
    assert split.stats.template_drops == {"system messages": {"rows": 1, "first": "t.jsonl:1"}}


def test_qwen3_reasoning_only_after_last_query(toks):
    tok = toks["qwen3"]
    multi_turn = [
        system("You are brief."),
        user("What is 2+2?"),
        bot("<think>\nAdd them.\n</think>\n\nIt is 4."),  # stripped: a user message follows
        user("And 3+3?"),
        bot("It is 6.", reasoning_content="Add again."),
    ]
    tools = [
        user("Weather in Paris?"),
        calls(call("get_weather", {"city": "Paris"}), content=""),
        tool("22C"),
        bot("It is 22C in Paris.", reasoning_content="The tool answered."),
    ]
    tools[1]["reasoning_content"] = "I should call the tool."
    no_reasoning = [user("Hi"), bot("Hello!")]
    stripped_later = [
        user("Hi"),
        bot("Hello!", reasoning_content="Greet back."),
        user("Bye"),
        bot("Goodbye."),
    ]
    rows = [
        {"messages": no_reasoning},
        {"messages": multi_turn},
        {"messages": tools, "tools": [WEATHER_TOOL]},
        {"messages": stripped_later},
    ]
    split, encoded = masks(tok, rows)
    runs = [trained_runs(tok, ids, labels) for ids, labels in encoded]
    assert runs == [
        # the last turn always renders a think block, empty without reasoning
        ["<think>\n\n</think>\n\nHello!<|im_end|>"],
        ["It is 4.<|im_end|>", "<think>\nAdd again.\n</think>\n\nIt is 6.<|im_end|>"],
        [
            "<think>\nI should call the tool.\n</think>\n\n"
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            "</tool_call><|im_end|>",
            "<think>\nThe tool answered.\n</think>\n\nIt is 22C in Paris.<|im_end|>",
        ],
        ["Hello!<|im_end|>", "<think>\n\n</think>\n\nGoodbye.<|im_end|>"],
    ]
    for row, (ids, labels) in zip(rows, encoded, strict=True):
        prompts_untrained(tok, ids, labels, row["messages"])
    assert "Add them." not in tok.decode(encoded[1][0])
    assert untrained_text(tok, *encoded[2]).endswith(
        "<|im_start|>user\n<tool_response>\n22C\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n\n"
    )
    assert split.stats.template_drops == {"assistant reasoning": {"rows": 2, "first": "t.jsonl:2"}}


def test_qwen3_user_messages_that_are_tool_responses_are_not_queries(toks):
    tok = toks["qwen3"]
    # the tool result comes as a user message: the last query is "Q2?", so the first two
    # answers lose their reasoning and the last keeps it
    msgs = [
        user("Q1?"),
        bot("A1.", reasoning_content="R1."),
        user("<tool_response>\nx\n</tool_response>"),
        bot("A2.", reasoning_content="R2."),
        user("Q2?"),
        bot("A3.", reasoning_content="R3."),
    ]
    # here the last query is "Q1?": both answers keep their reasoning
    steps = msgs[:4]
    split, encoded = masks(tok, [{"messages": steps}, {"messages": msgs}])
    runs = [trained_runs(tok, ids, labels) for ids, labels in encoded]
    assert runs == [
        ["<think>\nR1.\n</think>\n\nA1.<|im_end|>", "<think>\nR2.\n</think>\n\nA2.<|im_end|>"],
        ["A1.<|im_end|>", "A2.<|im_end|>", "<think>\nR3.\n</think>\n\nA3.<|im_end|>"],
    ]
    assert split.stats.template_drops == {"assistant reasoning": {"rows": 1, "first": "t.jsonl:2"}}


def test_gemma_model_role_system_in_first_user_trimmed(toks):
    tok = toks["gemma"]
    msgs = [
        system("Answer briefly. "),
        user("  What is the capital of France?\n"),
        bot("\n  Paris is the capital.  \n"),
        user("And of Italy?"),
        bot("Rome."),
    ]
    split, [(ids, labels)] = masks(tok, [{"messages": msgs}])
    assert trained_runs(tok, ids, labels) == [
        "Paris is the capital.<end_of_turn>",
        "Rome.<end_of_turn>",
    ]
    assert untrained_text(tok, ids, labels) == (
        "<bos><start_of_turn>user\nAnswer briefly.\n\nWhat is the capital of France?"
        "<end_of_turn>\n<start_of_turn>model\n\n<start_of_turn>user\nAnd of Italy?"
        "<end_of_turn>\n<start_of_turn>model\n\n"
    )
    assert split.stats.template_drops == {}


def test_phi3_trailing_eos_never_trained(toks):
    tok = toks["phi3"]
    msgs = [
        system("You are a helpful assistant."),
        user("Why is the sky blue?"),
        bot("Because of Rayleigh scattering."),
        user("Is that all?"),
        bot("Mostly, yes."),
    ]
    rows = [{"messages": msgs}, {"messages": [user("Hi"), bot("Hello!")]}]
    _, [(ids, labels), (ids2, labels2)] = masks(tok, rows)
    assert trained_runs(tok, ids, labels) == [
        "Because of Rayleigh scattering.<|end|>",
        "Mostly, yes.<|end|>",
    ]
    assert trained_runs(tok, ids2, labels2) == ["Hello!<|end|>"]
    for i, lab in ((ids, labels), (ids2, labels2)):
        assert i[-1] == tok.eos_token_id and lab[-1] == IGNORE_INDEX
        assert untrained_text(tok, i, lab).endswith("<|end|>\n<|assistant|>\n\n<|endoftext|>")
    prompts_untrained(tok, ids, labels, msgs)


def test_phi4_assistant_header_rendered_by_the_user_turn(toks):
    tok = toks["phi4"]
    msgs = [
        system("You are a helpful assistant."),
        user("Color of the sky?"),
        bot("Blue."),
        user("And of grass?"),
        bot("Green."),
    ]
    _, [(ids, labels)] = masks(tok, [{"messages": msgs}])
    assert trained_runs(tok, ids, labels) == ["Blue.<|im_end|>", "Green.<|im_end|>"]
    assert untrained_text(tok, ids, labels) == (
        "<|im_start|>system<|im_sep|>You are a helpful assistant.<|im_end|>"
        "<|im_start|>user<|im_sep|>Color of the sky?<|im_end|><|im_start|>assistant<|im_sep|>"
        "<|im_start|>user<|im_sep|>And of grass?<|im_end|><|im_start|>assistant<|im_sep|>"
    )


def test_deepseek_r1_two_tool_call_turns(toks):
    tok = toks["deepseek_r1"]
    msgs = [
        system("You can check the weather."),
        user("Weather in Paris and then London?"),
        calls(call("get_weather", {"city": "Paris"})),
        tool("22C"),
        calls(call("get_weather", {"city": "London"})),  # rendered without a header
        tool("12C"),
        bot("<think>Compare them.</think>Paris is 22C, London 12C."),
        user("Thanks!"),
        bot("You are welcome."),
    ]
    split, [(ids, labels)] = masks(tok, [{"messages": msgs}])
    assert trained_runs(tok, ids, labels) == [
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n"
        '```json\n{"city": "Paris"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>'
        "<｜end▁of▁sentence｜>",
        "\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n"
        '```json\n{"city": "London"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>'
        "<｜end▁of▁sentence｜>",
        "Paris is 22C, London 12C.<｜end▁of▁sentence｜>",
        "You are welcome.<｜end▁of▁sentence｜>",
    ]
    assert untrained_text(tok, ids, labels) == (
        "<｜begin▁of▁sentence｜>You can check the weather."
        "<｜User｜>Weather in Paris and then London?<｜Assistant｜>"
        "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>22C<｜tool▁output▁end｜>"
        "<｜tool▁output▁begin｜>12C<｜tool▁output▁end｜><｜tool▁outputs▁end｜>"
        "<｜User｜>Thanks!<｜Assistant｜>"
    )
    assert split.stats.template_drops == {"assistant reasoning": {"rows": 1, "first": "t.jsonl:1"}}


def test_granite_roles_default_system_tool_calls(toks):
    tok = toks["granite"]
    with_tools = [
        user("What is the weather in Paris today?"),
        calls(call("get_weather", {"city": "Paris"})),
        tool("22C and sunny"),
        bot("It is 22C and sunny in Paris."),
    ]
    with_system = [system("Be brief."), user("Hi"), bot("Hello!"), user("Bye"), bot("Goodbye!")]
    rows = [{"messages": with_tools, "tools": [WEATHER_TOOL]}, {"messages": with_system}]
    _, [(ids, labels), (ids2, labels2)] = masks(tok, rows)
    assert trained_runs(tok, ids, labels) == [
        '<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris"}}]<|end_of_text|>',
        "It is 22C and sunny in Paris.<|end_of_text|>",
    ]
    rest = untrained_text(tok, ids, labels)
    assert rest.startswith(
        "<|start_of_role|>system<|end_of_role|>You are Granite, a helpful assistant."
    )
    assert "<|start_of_role|>tool_response<|end_of_role|>22C and sunny<|end_of_text|>\n" in rest
    prompts_untrained(tok, ids, labels, with_tools)
    assert trained_runs(tok, ids2, labels2) == ["Hello!<|end_of_text|>", "Goodbye!<|end_of_text|>"]
    assert untrained_text(tok, ids2, labels2) == (
        "<|start_of_role|>system<|end_of_role|>Be brief.<|end_of_text|>\n"
        "<|start_of_role|>user<|end_of_role|>Hi<|end_of_text|>\n"
        "<|start_of_role|>assistant<|end_of_role|>\n"
        "<|start_of_role|>user<|end_of_role|>Bye<|end_of_text|>\n"
        "<|start_of_role|>assistant<|end_of_role|>\n"
    )


def test_smollm3_generation_tags_do_not_train_the_header(toks):
    tok = toks["smollm3"]
    no_think = [system("Be brief. /no_think"), user("Hi"), bot("Hello!"), user("Bye"), bot("Bye.")]
    rows = [{"messages": no_think}, {"messages": [user("Hi"), bot("\nHello!")]}]
    _, [(ids, labels), (ids2, labels2)] = masks(tok, rows)
    # in /no_think mode the empty think block is part of the generation prompt: a header
    assert trained_runs(tok, ids, labels) == ["Hello!<|im_end|>", "Bye.<|im_end|>"]
    rest = untrained_text(tok, ids, labels)
    assert rest.count("<|im_start|>assistant\n<think>\n\n</think>\n") == 2
    assert "Be brief." in rest and "<|im_start|>user\nBye<|im_end|>" in rest
    assert trained_runs(tok, ids2, labels2) == ["Hello!<|im_end|>"]
    assert untrained_text(tok, ids2, labels2).endswith(
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n\n"
    )


# -- a SentencePiece-style tokenizer -----------------------------------------------------------


def test_unigram_metaspace_tokenizer_llama2_inst(toks):
    tok = toks["llama2_unigram"]
    msgs = [
        system("Be brief."),
        user("What is the weather in Paris today?"),
        bot("It is sunny in Paris."),
        user("And in London?"),
        bot(" It is 12C and rainy in London. "),
    ]
    _, [(ids, labels)] = encode(tok, [{"messages": msgs}])
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is the weather in Paris today? [/INST]"
        " It is sunny in Paris. </s><s>[INST] And in London? [/INST]"
        " It is 12C and rainy in London. </s>"
    )
    # Metaspace puts a ▁ before every piece after a special token, and the decoder turns it
    # into a space that the text does not have ("<s> [INST]"): compare characters via offsets
    enc = tok.backend_tokenizer.encode(text, add_special_tokens=False)
    assert enc.ids == list(ids)
    spans = []
    for i, lab in enumerate(labels):
        if lab == IGNORE_INDEX:
            continue
        a, b = enc.offsets[i]
        if spans and labels[i - 1] != IGNORE_INDEX:
            spans[-1][1] = b
        else:
            spans.append([a, b])
    # the space after [/INST] is held by the answer's first piece ("▁It"): trained
    assert [text[a:b] for a, b in spans] == [
        " It is sunny in Paris. </s>",
        " It is 12C and rainy in London. </s>",
    ]
    outside = "".join(
        text[a:b]
        for a, b in zip(
            [0] + [e for _, e in spans], [s for s, _ in spans] + [len(text)], strict=True
        )
    )
    assert outside == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is the weather in Paris today? [/INST]"
        "<s>[INST] And in London? [/INST]"
    )
    # decoded, a run loses the ▁ that opens it
    assert trained_runs(tok, ids, labels) == [
        "It is sunny in Paris. </s>",
        "It is 12C and rainy in London. </s>",
    ]


# -- packing ---------------------------------------------------------------------------------


def test_packed_masks_equal_unpacked(toks):
    tok = toks["qwen3"]
    rows = []
    for k in range(12):
        msgs = [user(f"Question {k}: what is {k}+{k}?")]
        msgs.append(bot(f"<think>\nAdd {k} twice.\n</think>\n\nIt is {2 * k}."))
        for j in range(k % 3):
            msgs += [user(f"And {j}?"), bot(f"It is {j}.", reasoning_content=f"Just {j}.")]
        rows.append({"messages": msgs})
        if k % 4 == 0:
            rows.append(
                {
                    "messages": [
                        user(f"Weather in city {k}?"),
                        calls(call("get_weather", {"city": f"c{k}"}), content=""),
                        tool(f"{k}C"),
                        bot(f"It is {k}C."),
                    ],
                    "tools": [WEATHER_TOOL],
                }
            )
    split, encoded = encode(tok, rows, packing=True, max_seq_length=512)
    packed = split.packed
    assert packed is not None and split.stats.packed_rows == len(packed)
    assert any(len(r["seq_lens"]) > 1 for r in packed)  # rows really are shared
    pieces = []
    for r in packed:
        start = 0
        for n in r["seq_lens"]:
            assert r["position_ids"][start : start + n] == list(range(n))
            ids, labels = r["input_ids"][start : start + n], r["labels"][start : start + n]
            pieces.append((tuple(ids), tuple(labels)))
            start += n
        assert start == len(r["input_ids"])
    assert Counter(pieces) == Counter((tuple(i), tuple(lab)) for i, lab in encoded)
    assert sum(len(r["seq_lens"]) for r in packed) == len(rows)


# -- rows that cannot be used ----------------------------------------------------------------

BAD_KINDS = {
    "alternate": (
        {"messages": [user("a"), user("b"), bot("c")]},
        "chat template error: Conversation roles must alternate user/assistant/user/assistant/...",
    ),
    "robot": (
        {"messages": [{"role": "robot", "content": "x"}, bot("y")]},
        "messages[0].role: must be one of system, user, assistant, tool (got 'robot')",
    ),
    "missing": (
        {"messages": [user("q"), {"role": "assistant"}]},
        "messages[1].content: missing",
    ),
    "int": (
        {"messages": [{"role": "user", "content": 3}, bot("y")]},
        "messages[0].content: must be a string, got int",
    ),
    "system_twice": (
        {"messages": [system(), user("q"), system(), bot("a")]},
        "chat template error: Conversation roles must alternate user/assistant/user/assistant/...",
    ),
}
BAD_LINES = [2, 3, 5, 7, 8, 10, 12, 13, 15, 17, 18, 20, 22, 23, 25, 27, 28, 30, 32, 33, 35, 37]
BAD_LINES += [38, 40, 42]  # 25 bad rows of 45


def _rows_with_bad_ones():
    kinds = list(BAD_KINDS)
    rows, expected = [], []
    for n in range(1, 46):
        if n in BAD_LINES:
            row, message = BAD_KINDS[kinds[n % len(kinds)]]
            rows.append((f"t.jsonl:{n}", row))
            expected.append(f"t.jsonl:{n}: {message}")
        else:
            rows.append(
                (f"t.jsonl:{n}", {"messages": [user(f"Question {n}?"), bot(f"Answer {n}.")]})
            )
    return rows, expected


def test_every_bad_row_reported_at_once_in_file_order(toks):
    tok = toks["gemma"]
    rows, expected = _rows_with_bad_ones()
    assert len(expected) == 25
    spec = DataSpec(train="t.jsonl", tokenizer="tok", max_seq_length=256)
    with pytest.raises(UsageError) as info:
        build(rows, spec, tok, key="dataset.training")
    lines = info.value.lines()
    assert lines[:20] == expected[:20]
    assert lines[20] == "... and 5 more rows"
    assert len(lines) == 22
    assert lines[21].startswith("dataset.training: 25 of 45 rows cannot be used")
    assert "dataset.skip_invalid_rows" in lines[21]


def test_skip_invalid_rows_builds_the_good_ones(toks):
    tok = toks["gemma"]
    rows, expected = _rows_with_bad_ones()
    spec = DataSpec(train="t.jsonl", tokenizer="tok", max_seq_length=256, skip_invalid_rows=True)
    split = build(rows, spec, tok, key="dataset.training")
    assert split.stats.skipped_invalid_rows == 25
    assert split.stats.first_skipped == expected[0]
    assert split.stats.rows == 45 and split.stats.examples == 20
    assert split.stats.formats == {"chat": 20}
    good = [n for n in range(1, 46) if n not in BAD_LINES]
    runs = [trained_runs(tok, r["input_ids"], r["labels"]) for r in split.examples]
    assert runs == [[f"Answer {n}.<end_of_turn>"] for n in good]


def test_private_use_characters_in_rows_do_not_confuse_the_alignment(toks):
    """Turns are aligned with private-use anchors; a row that holds such characters itself is
    aligned with the other plane, and one that holds both is refused by name, never mis-masked."""
    tok = toks["qwen3"]

    def chat(extra):
        return [user("Q1?" + extra), bot("A1."), user("Q2?"), bot("A2.")]

    expected = ["A1.<|im_end|>", "<think>\n\n</think>\n\nA2.<|im_end|>"]
    for extra in ("", "\U000f0001", "\U00100007"):
        _, [(ids, labels)] = masks(tok, [{"messages": chat(extra)}])
        assert trained_runs(tok, ids, labels) == expected, repr(extra)
    with pytest.raises(UsageError) as info:
        masks(tok, [{"messages": chat("\U000f0001\U00100001")}])
    assert info.value.lines() == [
        "t.jsonl:1: cannot locate assistant turn 1 in the chat template's rendering (its end "
        "cannot be located); fix the row or use another template"
    ]
