"""Loss targets and packing (pipeline/sft/packing.py): the mask is exact — a packed row's loss is the sum of its
conversations' losses computed one by one, through Kiln's GPT (rotary and learned positions) and a small
attention model."""

import random

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ModelConfig
from pipeline.model.gpt import GPT
from pipeline.model.layers import Packing
from pipeline.sft.packing import IGNORE, pack, targets, tensors

VOCAB, BLOCK, D = 40, 32, 16


class TinyAttention(torch.nn.Module):
    """Two attention layers with learned positions: any leak across conversations or any shifted position
    changes the logits."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.tok, self.pos = torch.nn.Embedding(VOCAB, D), torch.nn.Embedding(BLOCK, D)
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(D, 3 * D) for _ in range(2))
        self.head = torch.nn.Linear(D, VOCAB)
        self.double()

    def forward(self, ids, pos, mask):
        x = self.tok(ids) + self.pos(pos)
        for qkv in self.qkv:
            q, k, v = (t.view(*ids.shape, 2, D // 2).transpose(1, 2) for t in qkv(x).split(D, -1))
            x = x + F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(x.shape)
        return self.head(x)


def summed_loss(logits, y):
    return F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1), ignore_index=IGNORE, reduction="sum")


def examples(n: int, seed: int) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(2, 14)
        ids = [rng.randrange(VOCAB) for _ in range(length)]
        assistant = [rng.random() < 0.5 for _ in range(length)]
        out.append((ids, targets(ids, assistant, rng.choice(["completion_only", "all"]))))
    return out


def test_targets_learn_assistant_content_and_end_only():
    # <|user|> a b <|end|> <|assistant|> c d <|end|>   (assistant: c d and its <|end|>)
    ids = [4, 10, 11, 6, 5, 12, 13, 6]
    assistant = [False, False, False, False, False, True, True, True]
    assert targets(ids, assistant) == [IGNORE, IGNORE, IGNORE, IGNORE, 12, 13, 6, IGNORE]
    assert targets(ids, assistant, "all") == [10, 11, 6, 5, 12, 13, 6, IGNORE]
    assert targets([], []) == []


def test_packed_loss_equals_the_sum_of_unpacked_losses():
    model = TinyAttention()
    exs = examples(24, seed=1)
    rows = pack(exs, BLOCK, pad_id=0)
    assert all(len(r.ids) == BLOCK for r in rows) and len(rows) < len(exs)  # really packed
    assert [x for r in rows for x, s in zip(r.ids, r.segments, strict=True) if s >= 0] == [t for x, _ in exs for t in x]
    batch = tensors(rows)
    packing = Packing(batch["segments"])
    packed = summed_loss(model(batch["ids"], packing.positions, packing.mask), batch["targets"])
    alone = sum(summed_loss(model(torch.tensor([x]), torch.arange(len(x))[None],
                                  torch.ones(len(x), len(x), dtype=torch.bool).tril()), torch.tensor([y]))
                for x, y in exs)
    assert torch.allclose(packed, alone, rtol=1e-10), (packed.item(), alone.item())


@pytest.mark.parametrize("style", ["llama", "gpt2"])  # rotary positions; learned positions
def test_kiln_gpt_scores_a_packed_row_as_its_conversations_alone(style):
    torch.manual_seed(0)
    cfg = ModelConfig.model_validate({"style": style, "n_layer": 2, "n_head": 2, "n_embd": 16, "block_size": BLOCK,
                                      "vocab_size": VOCAB, "dropout": 0.0})
    model = GPT(cfg).double().eval()
    exs = examples(16, seed=2)
    batch = tensors(pack(exs, BLOCK, pad_id=0))
    logits, _ = model(batch["ids"], segments=batch["segments"])
    packed = summed_loss(logits, batch["targets"])
    alone = sum(summed_loss(model(torch.tensor([x]))[0], torch.tensor([y])) for x, y in exs)
    assert torch.allclose(packed, alone, rtol=1e-10), (packed.item(), alone.item())
    mean = model(batch["ids"], batch["targets"], segments=batch["segments"])[1]  # the loss SFT steps on
    assert torch.allclose(mean.double() * (batch["targets"] != IGNORE).sum(), alone, rtol=1e-6)  # fp32 loss


def test_positions_and_mask_of_a_row():
    packing = Packing(torch.tensor([[0, 0, 0, 1, 1, -1, -1]]))
    assert packing.positions.tolist() == [[0, 1, 2, 0, 1, 0, 1]]
    m = packing.mask[0, 0].int().tolist()
    assert m[4] == [0, 0, 0, 1, 1, 0, 0]  # conversation 1 sees itself only
    assert m[2] == [1, 1, 1, 0, 0, 0, 0]  # causal
    assert m[6] == [0, 0, 0, 0, 0, 1, 1]  # padding: its own run, never an empty row


def test_pack_refuses_an_example_that_does_not_fit():
    with pytest.raises(ValueError, match="example 1"):
        pack([([1, 2], [2, IGNORE]), (list(range(BLOCK + 1)), [IGNORE] * (BLOCK + 1))], BLOCK, 0)
