"""`kiln sft` (pipeline/sft/train.py on the post-training loop, pipeline/post/loop.py), through the real CLI:
a random base model fine-tuned on a deterministic instruction task built here reaches a held-out exact-match
accuracy the base does not, bad records are quarantined with their reasons, the result is registered with its
lineage and data digest, it chats through `kiln generate --chat` and through transformers, and a resumed run
ends where an uninterrupted one does."""

import json
import random
import shutil
import subprocess
import sys

import pytest
import torch

from pipeline.config import load_config
from pipeline.generate import generate
from pipeline.model.io import load_model_dir
from tests.factories import ROOT, TRAIN_ENV

# words the tiny family's tokenizer (trained on Python's docs) has seen: the task is about order, not spelling
WORDS = ("list string value file module class object function error number line name type method data key "
         "time code test path text dict call format source table").split()
STEPS = 240
SETS = ["train.lr=3e-3", "train.min_lr=3e-4", "train.warmup_steps=10", "train.micro_batch_size=8",
        "data.val_fraction=0.1", "checkpoint.every=120", "checkpoint.keep=3"]


def task(pairs) -> list[dict]:
    """The instruction: repeat two words in the opposite order."""
    return [{"prompt": f"swap: {a} {b}", "completion": f"{b} {a}"} for a, b in pairs]


def split_pairs():
    pairs = [(a, b) for a in WORDS for b in WORDS if a != b]
    random.Random(0).shuffle(pairs)
    return pairs[:-40], pairs[-40:]  # held out: pairs never trained on


def exact_match(model_dir, records) -> float:
    hits = sum(generate(model_dir, r["prompt"], max_new_tokens=8, temperature=0.0, chat=True,
                        device="cpu")["text"].strip() == r["completion"] for r in records)
    return hits / len(records)


BAD = ['{"messages": [{"role": "assistant", "content": "hi"}]}',  # wrong_role_order
       '{"prompt": "swap: a b", "completion": "   "}',  # empty_assistant_turn
       'not json at all',  # malformed_json
       '{"text": "plain text"}']  # unknown_format


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_family):
    tmp = tmp_path_factory.mktemp("sft")
    train, held = split_pairs()
    data = tmp / "chats.jsonl"
    lines = [json.dumps(r) for r in task(train)]
    for i, bad in enumerate(BAD):  # spread among the good ones
        lines.insert(7 * (i + 1), bad)
    data.write_text("\n".join(lines) + "\n")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    out = tmp / "out"
    cmd = [sys.executable, "-m", "pipeline.cli", "sft", str(tiny_family["plain"]), "--data", str(data),
           "--out", str(out), "--steps", str(STEPS), "--tracking-uri", uri, "--json",
           *[a for s in [*SETS, "tracking.register_as=tiny", "tracking.alias=sft"] for a in ("--set", s)]]
    res = subprocess.run(cmd, env=TRAIN_ENV, cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    return {"tmp": tmp, "out": out, "data": data, "summary": summary, "held": task(held), "uri": uri,
            "base": tiny_family["plain"]}


def test_sft_learns_a_held_out_task_the_base_cannot(run, tmp_path):
    from pipeline.sft.vocab import chat_model

    base, _, proto = chat_model(run["base"])  # the base given chat markers, untrained
    (tmp_path / "tok.model").write_bytes(proto)
    from pipeline.model.io import save_model_dir

    save_model_dir(base, base.cfg, tmp_path / "base", tmp_path / "tok.model")
    held = run["held"]
    base_em, sft_em = exact_match(tmp_path / "base", held), exact_match(run["out"] / "model", held)
    print(f"held-out exact match: base {base_em:.2f}, sft {sft_em:.2f}")
    assert base_em == 0.0 and sft_em >= 0.6, (base_em, sft_em)
    s = run["summary"]
    assert s["val_loss"] < 0.5 * s["base_val_loss"], s  # held-out conversations of the training file too


def test_bad_records_are_quarantined_with_their_reason_and_the_run_goes_on(run):
    s, out = run["summary"], run["out"]
    assert s["left_out"] == len(BAD) and s["conversations_train"] + s["conversations_val"] == len(split_pairs()[0])
    reasons = {json.loads(line)["reason"]: json.loads(line)["source"]
               for line in (out / "quarantine.jsonl").read_text().splitlines()}
    assert set(reasons) == {"wrong_role_order", "empty_assistant_turn", "malformed_json", "unknown_format"}
    assert reasons["malformed_json"].endswith("chats.jsonl:22")  # the file and line of the record
    counts = json.loads((out / "sft_data.json").read_text())["counts"]
    assert counts["left_out:malformed_json"] == 1 and counts["records"] == len(split_pairs()[0]) + len(BAD)


def test_registered_at_sft_with_lineage_and_the_data_digest(run):
    from mlflow import MlflowClient

    client = MlflowClient(run["uri"])
    version = client.get_model_version_by_alias("tiny", "sft")
    assert version.tags["kiln.stage"] == "sft"
    tags = client.get_run(version.run_id).data.tags
    assert tags["kiln.data_digest"] == run["summary"]["data_sha256"]
    _, config = load_model_dir(run["out"] / "model")
    assert config["kiln"]["stage"] == "sft" and config["kiln"]["parent_model"] == str(run["base"])
    assert config["kiln"]["data_sha256"] == run["summary"]["data_sha256"]


def test_kiln_generate_chat_and_transformers_give_the_same_reply(run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, record = run["out"] / "model", run["held"][0]
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "generate", str(model_dir), "--chat", "--prompt",
                          record["prompt"], "--temperature", "0", "--max-new-tokens", "8", "--json"],
                         env=TRAIN_ENV, cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    kiln = json.loads(res.stdout.strip().splitlines()[-1])
    assert kiln["stopped_at_eos"] and kiln["chat"]  # ended at the end of turn
    from pipeline.export import export

    export(model_dir, tmp_path / "hf", "hf")
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = tok.apply_chat_template([{"role": "user", "content": record["prompt"]}], add_generation_prompt=True)
    ids = torch.tensor([ids if isinstance(ids, list) else ids["input_ids"]])  # (a BatchEncoding in transformers 5)
    end = tok.convert_tokens_to_ids("<|end|>")
    out = hf.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=end, pad_token_id=end)
    assert out[0, ids.shape[1]:].tolist() == kiln["tokens"]


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(run, tmp_path):
    from pipeline.sft.train import sft

    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    half = run["out"] / "checkpoints" / f"step_{STEPS // 2:07d}"
    shutil.copytree(half, out / "checkpoints" / half.name)
    cfg = load_config("sft", None, [*SETS, f"train.steps={STEPS}", f"data.paths=[{run['data']}]",
                                    "tracking.enabled=false"])
    summary = sft(run["base"], cfg, out)
    assert summary["resumed_from"] == STEPS // 2
    done, _ = load_model_dir(run["out"] / "model")
    again, _ = load_model_dir(out / "model")
    for (name, a), b in zip(done.state_dict().items(), again.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_kiln_eval_apply_chat_template_scores_the_chat_model_as_it_chats(run, tmp_path):
    """An lm-eval generation task over the held-out pairs: the model answers in its chat format only."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "held.jsonl").write_text("".join(json.dumps(r) + "\n" for r in run["held"][:12]))
    (tasks / "swap.yaml").write_text(
        "task: kiln_swap_words\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tasks / 'held.jsonl'}\ntest_split: test\noutput_type: generate_until\n"
        "doc_to_text: '{{prompt}}'\ndoc_to_target: '{{completion}}'\n"
        "generation_kwargs: {until: ['\\n'], max_gen_toks: 8, do_sample: false}\n"
        "metric_list: [{metric: exact_match, aggregation: mean, higher_is_better: true}]\n")
    scores = {}
    for chat in (True, False):
        res = subprocess.run([sys.executable, "-m", "pipeline.cli", "eval", str(run["out"] / "model"), "--tasks",
                              "kiln_swap_words", "--include-path", str(tasks), "--json",
                              "--set", "tracking.enabled=false", *(["--apply-chat-template"] if chat else [])],
                             env=TRAIN_ENV, cwd=ROOT, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-3000:]
        row = json.loads(res.stdout.strip().splitlines()[-1])["lm_eval"]["results"]["kiln_swap_words"]
        scores[chat] = next(v for k, v in row.items() if k.startswith("exact_match"))
    print(f"kiln_swap_words exact match: with the chat template {scores[True]:.2f}, without {scores[False]:.2f}")
    assert scores[True] >= 0.5 and scores[False] < scores[True], scores


def test_lora_trains_adapters_and_embeddings_only_and_merges_into_a_plain_model_dir(run, tmp_path):
    from pipeline.model.gpt import GPT
    from pipeline.sft import lora
    from pipeline.sft.train import sft

    cfg = load_config("sft", None, [*SETS, "train.steps=30", f"data.paths=[{run['data']}]", "lora.rank=4",
                                    "tracking.enabled=false"])
    summary = sft(run["base"], cfg, tmp_path / "lora")
    base, _ = load_model_dir(run["base"])
    merged, config = load_model_dir(tmp_path / "lora" / "model")
    assert isinstance(merged, GPT) and config["kiln"]["method"] == "sft-completion_only-lora4"
    adapters = sum(4 * sum(m.weight.shape) for b in merged.blocks for m in b.modules()
                   if isinstance(m, torch.nn.Linear))  # A (4 x in) and B (out x 4) per adapted layer
    embeddings = merged.embed.wte.weight.numel() + merged.head.lm_head.weight.numel() * (not merged.cfg.tie_embeddings)
    assert summary["trainable_params"] == adapters + embeddings, summary["trainable_params"]
    base_blocks = {k: v for k, v in base.state_dict().items() if k.startswith("blocks.")}
    moved = [k for k, v in merged.state_dict().items() if k in base_blocks and not torch.equal(v, base_blocks[k])]
    linears = {f"{n}.weight" for n, m in merged.named_modules() if isinstance(m, torch.nn.Linear) and "blocks" in n}
    assert set(moved) == linears  # the adapters merged into every block linear, norms untouched
    assert summary["val_loss"] < summary["base_val_loss"]
    assert lora.block_linear_names(merged) == sorted({n.rsplit(".", 2)[-2] for n in linears})
