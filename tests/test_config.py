"""Config loading, `extends:`, `--set` overrides and every validation error path."""

from pathlib import Path

import pytest

from pipeline.config import (
    SCHEMAS,
    ConfigError,
    RunConfig,
    flatten,
    load_config,
    load_yaml,
    parse_override,
    validate_world,
)

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_every_shipped_config_validates():
    kinds = {"train": "train", "prep": "prep"}
    for sub, kind in kinds.items():
        for path in sorted((ROOT / "configs" / sub).glob("*.yaml")):
            load_config(kind, path)
    for path in (ROOT / "configs" / "model").glob("*.yaml"):
        load_config("train", path)
    for name, kind in [("int8", "quantize"), ("rtn4", "quantize"), ("distill", "distill"), ("prune", "prune")]:
        load_config(kind, ROOT / "configs" / "post" / f"{name}.yaml")
    for kind in ("eval", "generate"):
        paths = sorted((ROOT / "configs" / kind).glob("*.yaml"))
        assert paths and all(load_config(kind, path) for path in paths)
    gptq = load_config("quantize", ROOT / "configs/post/gptq4.yaml", ["calib=data/prepped"])  # calib comes with the run
    assert (gptq.method, gptq.bits) == ("gptq", 4)


def test_extends_merges_deeply_and_child_wins(tmp_path):
    write(tmp_path, "model/base.yaml", "model: {n_layer: 4, n_head: 4, n_embd: 64}\ntrain: {lr: 0.1}\n")
    child = write(tmp_path, "train/child.yaml", "extends: ../model/base.yaml\nmodel: {n_layer: 2}\ntrain: {steps: 7}\n")
    cfg = load_config("train", child)
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd) == (2, 4, 64)
    assert cfg.train.lr == 0.1 and cfg.train.steps == 7


def test_extends_list_and_cycle(tmp_path):
    write(tmp_path, "a.yaml", "train: {steps: 1, lr: 0.5}\n")
    write(tmp_path, "b.yaml", "train: {steps: 2}\n")
    c = write(tmp_path, "c.yaml", "extends: [a.yaml, b.yaml]\n")
    cfg = load_config("train", c)
    assert cfg.train.steps == 2 and cfg.train.lr == 0.5
    write(tmp_path, "x.yaml", "extends: y.yaml\n")
    write(tmp_path, "y.yaml", "extends: x.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_yaml(tmp_path / "x.yaml")


def test_overrides_coerce_types():
    cfg = load_config("train", None, ["train.lr=3e-4", "data.paths=[a,b]", "train.activation_checkpointing=true",
                                      "parallel.tp=2", "model.n_head=4", "model.n_embd=64"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.data.paths == ["a", "b"]
    assert cfg.train.activation_checkpointing == "full"  # a bool from old configs still reads
    assert cfg.parallel.tp == 2
    assert parse_override("a.b.c=1") == (["a", "b", "c"], 1)
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("novalue")


@pytest.mark.fault
def test_error_names_file_and_key(tmp_path):
    bad = write(tmp_path, "configs/train/x.yaml", "parallel: {zero_stage: 4}\n")
    with pytest.raises(ConfigError) as err:
        load_config("train", bad)
    assert str(err.value) == f"{bad}: parallel.zero_stage: 4 is not one of 0,1,2,3"


@pytest.mark.fault
def test_error_names_the_override_that_caused_it(tmp_path):
    good = write(tmp_path, "ok.yaml", "train: {steps: 3}\n")
    with pytest.raises(ConfigError) as err:
        load_config("train", good, ["train.precision=fp8"])
    assert str(err.value).startswith("--set train.precision=fp8: train.precision: 'fp8' is not one of")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.lrr=1"], "train.lrr: unknown key"),
        (["train.steps=0"], "train.steps: 0: Input should be greater than or equal to 1"),
        (["train.lr=abc"], "train.lr: 'abc'"),
        (["parallel.tp=5"], "parallel.tp: 5 does not divide model.n_head 12"),
        (["parallel.tp=4", "model.n_kv_heads=2"], "parallel.tp: 4 does not divide model.n_head 12 and model.n_kv_heads 2"),
        (["model.n_kv_heads=5"], "model.n_kv_heads: 5 does not divide model.n_head 12"),
        (["parallel.pp=5"], "parallel.pp: 5 does not divide model.n_layer 12"),
        (["parallel.pp=2", "parallel.zero_stage=2"], "parallel.zero_stage: 2 with parallel.pp 2"),
        (["parallel.pp=2", "parallel.zero_stage=3"], "allows ZeRO 0 or 1"),
        (["parallel.pp=2", "parallel.zero_stage=0", "train.precision=bf16"], "cannot resume its own checkpoint"),
        (["parallel.offload=cpu", "parallel.zero_stage=0"], "parallel.offload: cpu needs"),
        (["parallel.sequence_parallel=true"], "parallel.sequence_parallel needs parallel.tp > 1"),
        (["parallel.sequence_parallel=true", "parallel.tp=3", "model.block_size=256"], "dividing model.block_size 256"),
        (["parallel.sequence_parallel=true", "parallel.tp=2", "model.dropout=0.1"], "model.dropout 0 (tp 2, dropout 0.1)"),
        (["model.n_head=5"], "not divisible by n_head 5"),
        (["model.style=bert"], "model.style: 'bert' is not one of llama,gpt2"),
        (["train.min_lr=1", "train.lr=0.1"], "min_lr 1.0 is larger than lr 0.1"),
        (["data.paths=[a]", "data.weights=[1,2]"], "2 weights for 1 paths"),
    ],
)
@pytest.mark.fault
def test_validation_errors(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config("train", None, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.fault
def test_yaml_syntax_error_names_line(tmp_path):
    bad = write(tmp_path, "bad.yaml", "train:\n  lr: [1,\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+: not valid YAML"):
        load_config("train", bad)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config("train", tmp_path / "missing.yaml")
    scalar = write(tmp_path, "scalar.yaml", "3\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config("train", scalar)


@pytest.mark.fault
def test_world_size_must_fit_layout():
    cfg = load_config("train", None, ["parallel.tp=2", "parallel.pp=2"])
    assert validate_world(cfg, 8) == 2
    with pytest.raises(ConfigError, match="world size 6 is not divisible by parallel.tp x parallel.pp = 4"):
        validate_world(cfg, 6)


def test_prep_and_post_schemas():
    prep = load_config("prep", None, ["langs=[en,de]", "minhash.bands=20"], base={"workers": 4})
    assert prep.langs == ["en", "de"] and prep.minhash.bands == 20 and prep.workers == 4
    with pytest.raises(ConfigError, match="quantize|method"):
        load_config("quantize", None, ["method=int3"])
    with pytest.raises(ConfigError, match="pattern"):
        load_config("prune", None, ["pattern=3:4"])


def test_flatten_roundtrip():
    flat = flatten(RunConfig())
    assert flat["parallel.zero_stage"] == 1 and flat["model.style"] == "llama"
    assert all(not isinstance(v, dict) for v in flat.values())


@pytest.mark.parametrize("kind", sorted(SCHEMAS))
@pytest.mark.fault
def test_every_key_refuses_a_wrong_type_or_an_unknown_name_in_one_line(kind):
    """Every pydantic error path of every schema: each leaf key given a mapping, and an unknown key at every
    level, is a ConfigError of one line that names the key."""
    keys = flatten(load_config(kind, None, []))
    assert len(keys) > 3
    for key in keys:
        with pytest.raises(ConfigError) as err:
            load_config(kind, None, [f"{key}={{bad: 1}}"])
        assert key in str(err.value) and "\n" not in str(err.value), (key, str(err.value))
    for level in {k.rpartition(".")[0] for k in keys}:
        key = f"{level}.no_such_key" if level else "no_such_key"
        with pytest.raises(ConfigError, match=f"{key}: unknown key") as err:
            load_config(kind, None, [f"{key}=1"])
        assert "\n" not in str(err.value)


def test_eval_and_generate_schemas():
    cfg = load_config("eval", None, ["tasks=kiln_pydoc, kiln_stdlib_mc", "limit=0.5"])
    assert cfg.tasks == ["kiln_pydoc", "kiln_stdlib_mc"] and cfg.limit == 0.5 and cfg.batch_size == 8
    assert load_config("eval", None, ["tasks=[a,b]"]).tasks == ["a", "b"]
    with pytest.raises(ConfigError, match="split: 'test' is not one of train,val"):
        load_config("eval", None, ["split=test"])
    with pytest.raises(ConfigError, match="--top-k: top_k: -1: Input should be greater than or equal to 0"):
        load_config("generate", None, base={"top_k": -1}, flags={"top_k": "--top-k"})
    assert load_config("generate", None, ["seed=3"], base={"seed": 2}, flags={"seed": "--seed"}).seed == 3
