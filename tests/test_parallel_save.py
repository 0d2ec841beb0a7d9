"""Issue 26 item 1: the end-of-run MODEL dir is written by every rank at once (model/parallel_save.py), each
rank a shard of ~1/world of the bytes, in the weights' own dtype; every reader takes the sharded form.

Two gloo processes (no DeepSpeed, no training: the weights are a tiny model's, in bf16) write it twice: first
with rank 1 failing mid-write over an existing MODEL dir (both ranks raise, the old dir stays), then for real.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.config import KilnError, ModelConfig
from pipeline.model.gpt import GPT
from pipeline.model.io import SHARD_SUMS, SUMS, load_model_dir, save_model_dir, unique_state_dict, verify_sums
from pipeline.model.parallel_save import WRITERS, assign, save_model_dir_parallel
from pipeline.model.weights import INDEX, DictWeights, open_weights

CFG = ModelConfig(style="llama", n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=97)


def bf16_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.to(torch.bfloat16) for k, v in unique_state_dict(GPT(CFG)).items()}


class FailingOnRank1(DictWeights):
    def get(self, name):
        if dist.get_rank() == 1:
            raise OSError("No space left on device")
        return super().get(name)


def _worker(rank: int, port: int, out: str, errors) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        with pytest.raises(KilnError, match=r"model: the MODEL dir was not written \(rank 1: No space left on device"):
            save_model_dir_parallel(FailingOnRank1(bf16_state()), CFG, Path(out) / "model", None, {"kiln": {}})
        meta = {"kiln": {"stage": "pretrain"}} if rank == 0 else None  # only rank 0's is used
        if rank == 0:  # as in training: rank 0 knows where the weights are (its newest checkpoint), rank 1 not yet
            save_model_dir(bf16_state(), CFG, Path(out) / "src")
        save_model_dir_parallel(Path(out) / "src" if rank == 0 else None, CFG, Path(out) / "model", None, meta)
        dist.barrier()
    except BaseException as err:  # noqa: BLE001 - reported to the test
        errors.put(f"rank {rank}: {type(err).__name__}: {err}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("parallel_save")
    save_model_dir({"old": torch.zeros(3)}, CFG, base / "model")  # what a failed write must leave in place
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    errors = mp.get_context("spawn").Queue()
    mp.start_processes(_worker, args=(port, str(base), errors), nprocs=2, start_method="spawn", join=True)
    problems = []
    while not errors.empty():
        problems.append(errors.get())
    assert not problems, "\n".join(problems)
    return base / "model"


@pytest.mark.slow
def test_each_rank_writes_a_shard_of_about_half_the_bytes(sharded):
    files = sorted(p.name for p in sharded.iterdir())
    assert files == [SUMS, "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                     INDEX]
    index = json.loads((sharded / INDEX).read_text())
    assert index["metadata"][WRITERS] == {"model-00001-of-00002.safetensors": 0, "model-00002-of-00002.safetensors": 1}
    sizes = [(sharded / f).stat().st_size for f in files[2:4]]
    assert max(sizes) < 0.6 * sum(sizes), sizes
    assert not [p for p in sharded.parent.iterdir() if p.name.startswith(".")]  # no temp dir left


@pytest.mark.slow
def test_sharded_model_dir_loads_the_same_weights_in_bf16(sharded):
    model, config = load_model_dir(sharded)
    assert config["kiln"] == {"stage": "pretrain"}
    want = bf16_state()
    got = open_weights(sharded).to_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) and got[k].dtype == torch.bfloat16 for k in want)
    assert torch.equal(model.state_dict()["embed.wte.weight"], want["embed.wte.weight"])


@pytest.mark.slow
def test_sharded_model_dir_exports_and_identifies(sharded, tmp_path):
    from pipeline.export import export
    from pipeline.model.io import sha256_file
    from pipeline.tracking.registry import weights_sha256

    export(sharded, tmp_path / "one", "safetensors")
    assert torch.equal(load_model_dir(tmp_path / "one")[0].state_dict()["embed.wte.weight"],
                       bf16_state()["embed.wte.weight"].float())
    assert export(sharded, tmp_path / "hf", "hf")["format"] == "hf"
    verify_sums(tmp_path / "hf")
    assert weights_sha256(sharded) == sha256_file(sharded / INDEX)


@pytest.mark.slow
def test_a_bf16_sharded_model_dir_quantizes_with_its_index_as_parent_digest(sharded, tmp_path):
    from pipeline.config import QuantizeConfig
    from pipeline.model.io import read_config, sha256_file
    from pipeline.post.quantize import quantize

    quantize(sharded, QuantizeConfig(method="rtn", group_size=0, eval_windows=0), tmp_path / "q")
    model, config = load_model_dir(tmp_path / "q")
    assert read_config(tmp_path / "q")["kiln"]["parent_sha256"] == sha256_file(sharded / INDEX)
    assert torch.isfinite(model(torch.arange(8)[None])[0]).all()


@pytest.mark.slow
def test_a_shard_swapped_with_its_sums_line_is_refused(sharded, tmp_path):
    """SHA256SUMS rewritten to match a changed shard: the index (the weights' identity) still disagrees."""
    import shutil

    copy = tmp_path / "m"
    shutil.copytree(sharded, copy)
    shard = copy / "model-00002-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    from pipeline.model.io import write_sums

    write_sums(copy)
    with pytest.raises(KilnError, match=f"{SHARD_SUMS} of model-00002-of-00002.safetensors disagrees"):
        load_model_dir(copy)


@pytest.mark.slow
def test_a_shard_holding_other_tensors_than_the_index_says_is_refused(sharded, tmp_path):
    import shutil

    copy = tmp_path / "m"
    shutil.copytree(sharded, copy)
    index = json.loads((copy / INDEX).read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "model-00002-of-00002.safetensors" if index["weight_map"][name].startswith(
        "model-00001") else "model-00001-of-00002.safetensors"
    (copy / INDEX).write_text(json.dumps(index))
    with pytest.raises(KilnError, match="first difference: " + name.replace(".", r"\.")):
        load_model_dir(copy, verify=False)


def test_assign_balances_bytes_deterministically():
    sizes = {"a": 10, "b": 40, "c": 30, "d": 20, "e": 5}
    assert assign(sizes, 2) == [["a", "b", "e"], ["c", "d"]]  # 55 / 50: largest first, model order kept
    assert assign(sizes, 5) == [["b"], ["c"], ["d"], ["a"], ["e"]]
