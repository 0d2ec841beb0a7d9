"""How the MODEL dirs beside this file were written: by Kiln at commit 4737dc8, before the quantization
registry, when config.json named its loader as a Python import path and the method name carried the bits
("gptq4" with bits 3). tests/test_quant_formats.py loads them with today's code and compares the logits
with expected.safetensors, the logits the old code gave. Kept for the record: run from a checkout of 4737dc8
(`python tests/data/quant-v1/build.py`), not from today's tree.
"""

import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[2]), str(HERE.parents[1])]

from factories import fake_corpus  # noqa: E402

from pipeline.config import ModelConfig, QuantizeConfig  # noqa: E402
from pipeline.model.gpt import GPT  # noqa: E402
from pipeline.model.io import load_model_dir, save_model_dir  # noqa: E402
from pipeline.post.quantize import quantize  # noqa: E402

IDS = torch.arange(32).reshape(2, 16) % 64  # the input the expected logits are for

torch.manual_seed(0)
with tempfile.TemporaryDirectory() as tmp:
    parent = Path(tmp) / "parent"
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64)
    save_model_dir(GPT(cfg), cfg, parent)
    data = fake_corpus(Path(tmp) / "data", vocab_size=64, train_docs=40, val_docs=8, shards=1)
    runs = {"int8-weight": QuantizeConfig(method="int8-weight", eval_windows=0),
            "rtn4": QuantizeConfig(method="rtn4", group_size=16, quantize_head=True, eval_windows=0),
            "gptq4-bits3": QuantizeConfig(method="gptq4", bits=3, group_size=16, calib=str(data), calib_samples=8,
                                          calib_seq_len=16, eval_windows=0)}
    expected = {}
    for name, cfg in runs.items():
        shutil.rmtree(HERE / name, ignore_errors=True)
        quantize(parent, cfg, HERE / name)
        with torch.no_grad():
            expected[name] = load_model_dir(HERE / name)[0](IDS)[0].contiguous()
    save_file(expected, str(HERE / "expected.safetensors"))
