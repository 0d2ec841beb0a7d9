"""The chat format: how a conversation becomes token ids, in Kiln and in transformers alike.

One owner for both sides. Kiln renders a conversation itself (`ChatTokenizer.render`), turn by turn:

    <|system|> content <|end|> <|user|> content <|end|> <|assistant|> content <|end|> ...

each marker one id (a control piece of the sentencepiece model: data_prep/tokenizer.py names them and
reserves them), each content encoded on its own by sentencepiece, nothing between them. `CHAT_TEMPLATE`
is the Jinja string that pipeline/hf/tokenizer.py writes into `tokenizer_config.json`: it renders the same
markers and contents as one string with nothing between them, and the transformers tokenizer splits that
string at the markers (added tokens, matched whole) and encodes each content piece alone — so
`AutoTokenizer.apply_chat_template(messages)` gives exactly `render(messages).ids`
(tests/test_chat.py holds the two together on many conversations).

That equality needs one rule on content: it may not contain a marker's text. transformers would read it as
the marker, sentencepiece as plain text; Kiln refuses such a message (`marker_in_content`) rather than
train on ids its own transformers form would not give. The same rule keeps a user from forging a turn.

Training labels the assistant's content and the `<|end|>` closing it (`Rendered.assistant`); generation
stops at `<|end|>` (`ChatTokenizer.stop_ids`, with the document EOS).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from data_prep.errors import KilnError
from data_prep.tokenizer import CHAT_MARKERS, END_OF_TURN, ROLE_MARKERS

ROLES = tuple(ROLE_MARKERS)


def _template() -> str:
    """The Jinja chat template, written from ROLE_MARKERS (an unknown role raises, as Kiln refuses it)."""
    branches = "".join(f"{'if' if i == 0 else 'elif'} message['role'] == '{role}' -%}}{marker}{{%- "
                       for i, (role, marker) in enumerate(ROLE_MARKERS.items()))
    return ("{%- for message in messages -%}"
            "{%- " + branches + "else -%}{{ raise_exception('unknown role: ' + message['role']) }}{%- endif -%}"
            "{{- message['content'] -}}" + END_OF_TURN +
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}" + ROLE_MARKERS["assistant"] + "{%- endif -%}")


CHAT_TEMPLATE = _template()
MARKER_SPLIT = re.compile("(" + "|".join(re.escape(m) for m in CHAT_MARKERS) + ")")


def render_text(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The string CHAT_TEMPLATE renders (what lm-eval's --apply_chat_template hands a model to encode)."""
    text = "".join(ROLE_MARKERS[m["role"]] + m["content"] + END_OF_TURN for m in messages)
    return text + (ROLE_MARKERS["assistant"] if add_generation_prompt else "")


def problem(messages, training: bool = True) -> str | None:
    """Why `messages` is not a conversation Kiln renders (a quarantine reason), or None.

    An optional system message first, then user and assistant alternating from a user turn; every content a
    string without a marker's text. For training (`training`) it ends with a non-blank assistant turn and no
    assistant turn is blank; a prompt (to generate from) ends with a user turn instead."""
    if not isinstance(messages, list) or not messages:
        return "no_messages"
    roles = []
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return "malformed_message"
        if m["role"] not in ROLES:
            return "unknown_role"
        if not isinstance(m["content"], str):
            return "non_string_content"
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError:
            return "lone_surrogate"
        if any(marker in m["content"] for marker in CHAT_MARKERS):
            return "marker_in_content"
        roles.append(m["role"])
    turns = roles[1:] if roles[0] == "system" else roles
    if not turns or any(r != ("user", "assistant")[i % 2] for i, r in enumerate(turns)):
        return "wrong_role_order"
    if training:
        if turns[-1] != "assistant":
            return "no_final_assistant_turn"
        if any(m["role"] == "assistant" and not m["content"].strip() for m in messages):
            return "empty_assistant_turn"
    elif turns[-1] != "user":
        return "wrong_role_order"
    return None


def missing_markers(sp) -> list[str]:
    """The chat markers a sentencepiece processor does not hold as control pieces (none: it can chat)."""
    return [m for m in CHAT_MARKERS if sp.piece_to_id(m) == sp.unk_id() or not sp.is_control(sp.piece_to_id(m))]


@dataclass(frozen=True)
class Rendered:
    """A rendered conversation: its ids and, per id, whether it is assistant output (content or closing end)."""

    ids: list[int]
    assistant: list[bool]


class ChatTokenizer:
    """Kiln's renderer over a sentencepiece processor whose model holds the chat markers."""

    def __init__(self, sp, where: str = "tokenizer"):
        self.sp = sp
        if missing := missing_markers(sp):
            raise KilnError(f"{where}: no chat marker piece(s) {' '.join(missing)}; train it with prep's chat_tokens "
                            "or add them to an existing model (pipeline/sft/vocab.py add_chat_markers)")
        self.role_ids = {role: sp.piece_to_id(marker) for role, marker in ROLE_MARKERS.items()}
        self.end_id = sp.piece_to_id(END_OF_TURN)

    @property
    def stop_ids(self) -> list[int]:
        """What ends generation: the end of a turn, and the document EOS a base model may still emit."""
        return [self.end_id, *([self.sp.eos_id()] if self.sp.eos_id() >= 0 else [])]

    def encode_text(self, text: str) -> list[int]:
        """A rendered string's ids as transformers' tokenizer gives them: the markers are matched whole, and each
        piece between them is encoded alone."""
        ids: list[int] = []
        marker_ids = {**{m: self.role_ids[r] for r, m in ROLE_MARKERS.items()}, END_OF_TURN: self.end_id}
        for part in MARKER_SPLIT.split(text):
            if part in marker_ids:
                ids.append(marker_ids[part])
            elif part:
                ids += self.sp.encode(part)
        return ids

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> Rendered:
        """The ids of `messages` (checked by `problem` beforehand; a marker in content raises here too)."""
        contents = [m["content"] for m in messages]
        if any(marker in c for c in contents for marker in CHAT_MARKERS):
            raise KilnError("a message's content contains a chat marker's text; refusing to render it")
        ids: list[int] = []
        assistant: list[bool] = []
        for m, encoded in zip(messages, self.sp.encode(contents), strict=True):
            own = m["role"] == "assistant"
            ids += [self.role_ids[m["role"]], *encoded, self.end_id]
            assistant += [False, *[own] * (len(encoded) + 1)]
        if add_generation_prompt:
            ids.append(self.role_ids["assistant"])
            assistant.append(False)
        return Rendered(ids, assistant)
