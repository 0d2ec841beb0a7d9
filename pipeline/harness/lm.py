"""lm-evaluation-harness's model interface over a Kiln model, as Kiln serves it.

The model comes from `load_model_dir`, so int8 runs on torchao's int8 weights and GPTQ-4 on its
dequantized codes, exactly as `kiln generate` and `kiln eval` run them; text goes through the
model's own sentencepiece tokenizer. lm-eval's TemplateLM does the request bookkeeping (context /
continuation split, rolling windows); this class scores token ids and decodes greedily.

    loglikelihood          sum log p(continuation | context), and whether it is the greedy choice
    loglikelihood_rolling  a whole text in windows of block_size, each token scored once
    generate_until         greedy decoding until a stop string, the end of a turn (a chat model) or max_gen_toks

With `--apply-chat-template` lm-eval renders each request in the chat format (pipeline/chat.py) as a string;
`tok_encode` reads the markers in it as their ids, as the model's transformers tokenizer does.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from pipeline.chat import CHAT_TEMPLATE, ChatTokenizer, missing_markers, render_text
from pipeline.config import KilnError
from pipeline.generate import generate_ids


class KilnLM(TemplateLM):
    """One loaded Kiln model + its tokenizer, scored in batches of `batch_size` sequences."""

    def __init__(self, model: torch.nn.Module, tokenizer: str | Path, batch_size: int = 8, device: str = "cpu"):
        import sentencepiece as spm

        super().__init__()
        self.model, self.batch_size, self._device = model.eval(), int(batch_size), device
        self.sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
        self.max_length = model.cfg.block_size
        self.tokenizer_file = Path(tokenizer)
        self.chat = None if missing_markers(self.sp) else ChatTokenizer(self.sp, str(tokenizer))
        self.stops = set(self.chat.stop_ids) if self.chat else {self.eot_token_id}

    @property
    def eot_token_id(self) -> int:
        return self.sp.eos_id()  # also the prefix of an empty context: every Kiln document follows an EOS

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.chat.encode_text(string) if self.chat else self.sp.encode(string)

    # --apply-chat-template (a `kiln sft` model): lm-eval renders each request with the chat format
    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer_file.name

    def chat_template(self, chat_template: bool | str = False) -> str:
        return CHAT_TEMPLATE if self.chat else ""

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        if self.chat is None:
            raise KilnError(f"{self.tokenizer_file}: no chat markers; --apply-chat-template needs a chat model "
                            "(`kiln sft`)")
        return render_text(chat_history, add_generation_prompt)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.sp.decode(tokens)

    @torch.inference_mode()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum log p, greedy?) of each continuation after its context, the context cut to fit."""
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        out: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            rows = [(pairs[i][0] + pairs[i][1])[-(self.max_length + 1):][:-1] for i in batch]
            width = max(len(r) for r in rows)
            x = torch.zeros(len(rows), width, dtype=torch.long)
            for j, r in enumerate(rows):
                x[j, :len(r)] = torch.tensor(r)
            logits, _ = self.model(x.to(self._device))
            logprobs = F.log_softmax(logits.float(), dim=-1).cpu()
            for j, i in enumerate(batch):
                cont = pairs[i][1]
                end = len(rows[j])
                lp = logprobs[j, end - len(cont):end]
                target = torch.tensor(cont)
                out[i] = (float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        return self._score([(ctx, cont) for _, ctx, cont in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        results = []
        for (text,) in (req.args for req in requests):
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok_encode(text), self.prefix_token_id, self.max_length, context_len=1)]
            results.append(sum(lp for lp, _ in self._score(windows)))
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results = []
        for context, gen_kwargs in (req.args for req in requests):
            until = gen_kwargs.get("until") or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", 256))
            prompt = self.tok_encode(context)[-self.max_length:] or [self.eot_token_id]
            new: list[int] = []
            text = ""
            for token in generate_ids(self.model, prompt, max_new, temperature=0.0, eos_id=self.stops):
                if token in self.stops:
                    break
                new.append(token)
                text = self.tok_decode(new)
                if any(stop in text for stop in until):
                    break
            for stop in until:
                text = text.split(stop)[0]
            results.append(text)
        return results
