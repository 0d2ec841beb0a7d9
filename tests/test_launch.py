"""`kiln launch`: hostfiles, dry-run renderings for 2 nodes x 8 GPUs, early errors, and real launches on one box."""

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from factories import free_port

from pipeline.cli import main
from pipeline.commands.launch import launched_train_config
from pipeline.config import ConfigError, KilnError
from pipeline.launcher import common, deepspeed_job, node_env, slurm_job, torchrun_job
from pipeline.launcher.hostfile import parse_hostfile, select

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ["kiln", "train", "--config", str(ROOT / "configs/train/1.3b-2x8.yaml")]
BIN = Path(sys.executable).parent


def check_train(command: list[str], world_size: int, data: bool | str = True) -> None:
    """What `kiln launch` does with a command: read it once, hand the launcher's check its RunConfig."""
    common.check_train(launched_train_config(command), world_size, data)


@pytest.fixture
def hosts(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("# cluster\nnode0 slots=8\nnode1 slots=8  # second\n\n")
    return path


@pytest.mark.fault
def test_hostfile_parsing_and_selection(hosts, tmp_path):
    assert parse_hostfile(hosts) == {"node0": 8, "node1": 8}
    assert select(parse_hostfile(hosts), include="node1:0,2") == {"node1": [0, 2]}
    assert select(parse_hostfile(hosts), exclude="node0") == {"node1": list(range(8))}
    assert select(parse_hostfile(hosts), num_nodes=1, gpus_per_node=4) == {"node0": [0, 1, 2, 3]}
    bad = tmp_path / "bad"
    bad.write_text("node0 slots=8\nnode1 slot=8\n")
    with pytest.raises(ConfigError, match=r"bad:2: expected `hostname slots=N`, got 'node1 slot=8'"):
        parse_hostfile(bad)
    bad.write_text("node0 slots=8\nnode0 slots=4\n")
    with pytest.raises(ConfigError, match=r"bad:2: host node0 listed twice"):
        parse_hostfile(bad)
    with pytest.raises(ConfigError, match="only 2 hosts"):
        select(parse_hostfile(hosts), num_nodes=3)


def test_deepspeed_dry_run_2x8(hosts):
    job = deepspeed_job.plan(TRAIN, str(hosts), master_port=29600, train=launched_train_config(TRAIN))
    assert job["world_size"] == 16 and job["nodes"] == {"node0": 8, "node1": 8}
    # each rank starts by loading the environment file (values kept off the command line: node_env.py)
    ranks = " ".join([*node_env.wrap([], Path.cwd() / node_env.ENV_FILE), *TRAIN])
    assert job["command"] == (f"deepspeed --hostfile {hosts} --master_addr node0 --master_port 29600 "
                              f"--no_python --no_local_rank {ranks}")
    world_info = "eyJub2RlMCI6IFswLCAxLCAyLCAzLCA0LCA1LCA2LCA3XSwgIm5vZGUxIjogWzAsIDEsIDIsIDMsIDQsIDUsIDYsIDddfQ=="
    for rank, host in enumerate(["node0", "node1"]):
        assert job["per_node"][host] == (
            f"python -u -m deepspeed.launcher.launch --world_info={world_info} --node_rank={rank} "
            f"--master_addr=node0 --master_port=29600 --no_python --no_local_rank {ranks}")
    assert "PYTHONUNBUFFERED" in job["deepspeed_env"]


def test_torchrun_dry_run_2x8():
    job = torchrun_job.plan(TRAIN, nodes=2, gpus_per_node=8, master_addr="node0", master_port=29500,
                           train=launched_train_config(TRAIN))
    for rank in (0, 1):
        assert job["per_node"][rank] == (f"torchrun --nnodes 2 --nproc-per-node 8 --node-rank {rank} "
                                         f"--master-addr node0 --master-port 29500 --no-python {' '.join(TRAIN)}")
    c10d = torchrun_job.plan(TRAIN, nodes=2, gpus_per_node=8, master_addr="node0", rdzv="c10d", run_id="job7")
    assert "--rdzv-backend c10d --rdzv-endpoint node0:29500 --rdzv-id job7" in c10d["per_node"][1]


def test_slurm_render_2x8(tmp_path):
    text = slurm_job.render(TRAIN, nodes=2, gpus_per_node=8, time_limit="48:00:00", partition="h100",
                            account="proj", env={"NCCL_SOCKET_IFNAME": "ib0"}, train=launched_train_config(TRAIN))
    for line in ["#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8", "#SBATCH --time=48:00:00",
                 "#SBATCH --partition=h100", "#SBATCH --account=proj", "#SBATCH --requeue",
                 "#SBATCH --signal=B:USR1@180", "export NCCL_SOCKET_IFNAME=ib0", f"set -- {' '.join(TRAIN)}",
                 'GPUS_PER_NODE="${GPUS_PER_NODE:-8}"', "scontrol requeue", "NODE_RANK=\"$SLURM_NODEID\""]:
        assert line in text, line
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


@pytest.mark.fault
def test_layout_mismatch_is_one_line_before_launch(capsys):
    code = main(["launch", "slurm", "--nodes", "1", "--gpus-per-node", "3", "--dry-run", "--",
                 "kiln", "train", "--config", str(ROOT / "configs/train/6.7b-4x8.yaml")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["kiln launch slurm: error: world size 3 is not divisible by parallel.tp x parallel.pp = 2"]
    code = main(["launch", "slurm", "--nodes", "2", "--gpus-per-node", "3", "--dry-run", "--",  # dp 3
                 "kiln", "train", "--config", str(ROOT / "configs/train/6.7b-4x8.yaml")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "train.global_batch_tokens: 2,097,152 is not a multiple" in err[0], err
    with pytest.raises(ConfigError, match="world size 3"):
        check_train(["kiln", "train", "--set", "parallel.tp=2"], 3, data=False)
    check_train(["kiln", "train", "--set=parallel.tp=2"], 4, data=False)
    assert launched_train_config(["python", "train.py"]) is None  # not kiln train: nothing to check
    common.check_train(None, 3)


def test_the_launcher_reads_kiln_train_with_kiln_trains_own_arguments(monkeypatch, tmp_path, capsys):
    """`kiln train`'s flags have one owner (pipeline/commands/train.py): a flag added there, mapped onto its
    config key by its dest, reaches the launcher's checks with no edit to the launch command or launchers."""
    from pipeline.commands import train

    cmd = ["kiln", "train", "--conf", str(ROOT / "configs/train/tiny-cpu.yaml"), f"--out={tmp_path / 'run'}"]
    cfg = launched_train_config(cmd)  # `--conf`: an abbreviation, as kiln train's argparse allows
    assert cfg.out == str(tmp_path / "run") and cfg.model.n_layer == 2
    assert launched_train_config([sys.executable, "-m", "pipeline.cli", *cmd[1:]]) == cfg
    with pytest.raises(ConfigError, match="the launched `kiln train` would not start: .*unrecognized arguments: --stepz"):
        launched_train_config([*cmd, "--stepz", "5"])  # refused here, not after queueing on every node
    add_arguments = train.add_arguments

    def with_a_new_flag(parser):
        add_arguments(parser)
        parser.add_argument("--steps", type=int, dest="train.steps")

    monkeypatch.setattr(train, "add_arguments", with_a_new_flag)
    assert launched_train_config([*cmd, "--steps", "5"]).train.steps == 5
    with pytest.raises(ConfigError, match="world size 3"):  # and the layout check sees what the new flag set
        check_train([*cmd, "--steps", "5", "--set", "parallel.tp=2"], 3, data=False)
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--steps" in capsys.readouterr().out  # `kiln train` itself has it too: one parser


@pytest.mark.fault
def test_data_and_checkpoint_problems_are_refused_before_launch(tmp_path, capsys):
    """On the launching node, before torchrun starts a rank: missing corpus, vocab too small, changed shape."""
    from factories import fake_corpus

    corpus = fake_corpus(tmp_path / "corpus", vocab_size=128)
    cmd = ["kiln", "train", "--config", str(ROOT / "configs/train/tiny-cpu.yaml"), "--out", str(tmp_path / "run"),
           "--set", f"data.paths=[{corpus}]"]
    check_train(cmd, 2)  # a run that can start
    with pytest.raises(ConfigError, match="model.vocab_size: 100 is smaller than the tokenizer's 128"):
        check_train([*cmd, "--set", "model.vocab_size=100"], 2)
    # --out already holds a checkpoint of a 2-layer model: a 3-layer rerun is refused, the 2-layer one is not
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000004"
    ckpt.mkdir(parents=True)
    cfg = launched_train_config(cmd)
    cfg.model.vocab_size = 128
    (ckpt / "kiln_state.json").write_text(json.dumps({"step": 4, "config": cfg.model_dump(mode="json"),
                                                       "data_digests": [json.loads((corpus / "manifest.json").read_text())["digest"]]}))
    check_train(cmd, 2)
    with pytest.raises(KilnError, match=r"step_0000004: the model shape changed since this checkpoint \(model.n_layer 2 -> 3\)"):
        check_train([*cmd, "--set", "model.n_layer=3"], 2)
    # through the CLI: one line, nothing launched (torchrun would print its own banner / rank output)
    missing = tmp_path / "nowhere"
    code = main(["launch", "torchrun", "--gpus-per-node", "2", "--", *cmd[:-1], f"data.paths=[{missing}]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("kiln launch torchrun: error: ") and str(missing) in err[0]
    # SLURM: checked at submission where the data is visible (a shared filesystem), else left to the ranks
    check_train([*cmd[:-1], f"data.paths=[{missing}]"], 2, data="if-visible")
    assert "data.paths are not all visible on this host" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="smaller than the tokenizer's"):
        check_train([*cmd, "--set", "model.vocab_size=100"], 2, data="if-visible")
    code = main(["launch", "slurm", "--nodes", "1", "--gpus-per-node", "2", "--", *cmd, "--set", "model.vocab_size=100"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["kiln launch slurm: error: model.vocab_size: 100 is smaller than the tokenizer's 128"]


@pytest.mark.fault
def test_master_errors():
    with pytest.raises(KilnError, match="cannot resolve"):
        common.check_master("no-such-host.invalid", 29500, 1, wait_s=0)
    port = free_port()
    with pytest.raises(KilnError, match=rf"master 127.0.0.1:{port} unreachable after 1s"):
        common.check_master("127.0.0.1", port, 1, wait_s=1)
    with socket.socket() as busy:
        busy.bind(("", port))
        busy.listen()
        with pytest.raises(KilnError, match=f"--master-port {port}: already in use"):
            common.check_master("127.0.0.1", port, 0)
        common.check_master("127.0.0.1", port, 1, wait_s=1)  # a listening master is reachable


def test_env_overrides_and_no_command():
    env = common.launch_env({"NCCL_DEBUG": "INFO"})
    assert env["NCCL_DEBUG"] == "INFO" and env["PYTHONUNBUFFERED"] == "1"
    with pytest.raises(ConfigError, match="expected NAME=value"):
        common.parse_env(["oops"])
    with pytest.raises(ConfigError, match="no command to launch"):
        common.strip_dashdash(["--"])


RANK_SCRIPT = textwrap.dedent("""
    import os, torch.distributed as dist
    dist.init_process_group("gloo")
    t = __import__("torch").tensor([dist.get_rank() + 1.0])
    dist.all_reduce(t)
    print(f"RANK {dist.get_rank()} WORLD {dist.get_world_size()} SUM {int(t.item())} NODE {os.environ.get('GROUP_RANK', os.environ.get('NODE_RANK', '?'))}", flush=True)
    dist.destroy_process_group()
""")


def _env():
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "KILN_FORCE_CPU": "1", "DS_ACCELERATOR": "cpu"}


@pytest.mark.slow
def test_torchrun_two_nodes_on_one_box(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    port = free_port()
    base = [str(BIN / "kiln"), "launch", "torchrun", "--nodes", "2", "--gpus-per-node", "2",
            "--master-addr", "127.0.0.1", "--master-port", str(port)]
    cmd = ["--", sys.executable, str(script)]
    node0 = subprocess.Popen(base + ["--node-rank", "0"] + cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env=_env())
    node1 = subprocess.run(base + ["--node-rank", "1"] + cmd, capture_output=True, text=True, env=_env(), timeout=180)
    out0, _ = node0.communicate(timeout=180)
    out = out0 + node1.stdout
    assert node0.returncode == 0 and node1.returncode == 0, out + node1.stderr
    # ranks share a node's stdout, so their lines may interleave: find the reports anywhere in it
    reports = re.findall(r"RANK (\d+) WORLD (\d+) SUM (\d+)", out)
    assert sorted(int(r) for r, _, _ in reports) == [0, 1, 2, 3]
    assert all((w, s) == ("4", "10") for _, w, s in reports)


@pytest.mark.slow
def test_deepspeed_launcher_localhost_hostfile(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    res = subprocess.run([str(BIN / "kiln"), "launch", "deepspeed", "--hostfile", str(hostfile), "--master-addr",
                          "127.0.0.1", "--master-port", str(free_port()), "--", sys.executable, str(script)],
                         capture_output=True, text=True, env=_env(), timeout=240, cwd=tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    found = re.findall(r"RANK (\d) WORLD (\d) SUM (\d+)", out)  # ranks' lines may interleave
    assert sorted(int(r) for r, _, _ in found) == [0, 1], out[-2000:]
    assert all((w, s) == ("2", "3") for _, w, s in found)
    assert (tmp_path / ".deepspeed_env").read_text().count("PYTHONUNBUFFERED=1") == 1


@pytest.mark.slow
def test_ray_job_on_local_head_and_worker(tmp_path):
    from ray.cluster_utils import Cluster

    port = free_port()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port})
    try:
        cluster.add_node(num_cpus=1)
        job_py = tmp_path / "job.py"
        job_py.write_text("import ray\nray.init()\nprint('NODES', len(ray.nodes()), 'CPUS', int(ray.cluster_resources()['CPU']))\n")
        res = subprocess.run([str(BIN / "kiln"), "launch", "ray", "--address", f"http://127.0.0.1:{port}",
                              "--working-dir", str(tmp_path), "--json", "--", sys.executable, "job.py"],
                             capture_output=True, text=True, env=_env(), timeout=600)  # agent wait is <= 300 s
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        assert "NODES 2 CPUS 2" in res.stdout
        summary = json.loads(res.stdout.strip().splitlines()[-1])
        assert summary["status"] == "SUCCEEDED" and summary["job_id"].startswith("raysubmit_")
        assert f"ray job logs {summary['job_id']}" in res.stdout
    finally:
        cluster.shutdown()


def test_ray_submit_waits_for_the_job_agent_with_progress(capsys):
    """A head whose job agent is not up yet answers 503 'No available agent': wait (bounded), say so."""
    from pipeline.launcher import ray_job

    class Head:
        def __init__(self, busy: int):
            self.busy, self.calls = busy, 0

        def submit_job(self, **_):
            self.calls += 1
            if self.calls <= self.busy:
                raise RuntimeError("Request failed with status code 503: No available agent to submit job")
            return "raysubmit_1"

    job = ray_job.plan(["echo"], address="http://head:8265")
    head = Head(busy=3)
    assert ray_job._submit(head, job, wait_s=60, every_s=0) == "raysubmit_1" and head.calls == 4
    assert capsys.readouterr().err.count("waiting for the job agent of the Ray head at http://head:8265") == 3
    with pytest.raises(KilnError, match=r"No available agent.*\(waited \d+s for a job agent\)"):
        ray_job._submit(Head(busy=10**6), job, wait_s=1.5, every_s=100)
    with pytest.raises(KilnError, match="status code 500"):  # other errors are not waited on
        ray_job._submit(type("Bad", (), {"submit_job": lambda self, **_: (_ for _ in ()).throw(
            RuntimeError("Request failed with status code 500"))})(), job, wait_s=60)


def _train_cmd(corpus, out, seed_cfg):
    return ["--", "kiln", "train", "--config", str(ROOT / "configs/train/tiny-cpu.yaml"),
            "--set", f"data.paths=[{corpus}]", "--set", f"out={out}", "--set", "parallel.tp=2",
            "--set", "train.steps=6", "--set", "checkpoint.every=100", *seed_cfg]


@pytest.mark.slow
def test_two_node_training_equals_single_node(tmp_path):
    """2 'nodes' x 2 processes (torchrun static rendezvous on 127.0.0.1) == 1 node x 4 processes, step for step."""
    from factories import fake_corpus

    corpus = fake_corpus(tmp_path / "corpus", vocab_size=128)
    env = {**_env(), "OMP_NUM_THREADS": "1"}
    base = [str(BIN / "kiln"), "launch", "torchrun", "--master-addr", "127.0.0.1"]
    single = subprocess.run(base + ["--nodes", "1", "--gpus-per-node", "4", "--master-port", str(free_port())]
                            + _train_cmd(corpus, tmp_path / "one", []), capture_output=True, text=True, env=env,
                            timeout=400)
    assert single.returncode == 0, single.stderr[-3000:]
    port = str(free_port())
    two = base + ["--nodes", "2", "--gpus-per-node", "2", "--master-port", port]
    node0 = subprocess.Popen(two + ["--node-rank", "0"] + _train_cmd(corpus, tmp_path / "two", []),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    node1 = subprocess.run(two + ["--node-rank", "1"] + _train_cmd(corpus, tmp_path / "two", []),
                           capture_output=True, text=True, env=env, timeout=400)
    _, err0 = node0.communicate(timeout=400)
    assert node0.returncode == 0 and node1.returncode == 0, err0[-2000:] + node1.stderr[-2000:]

    def losses(run):
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in rows]

    one, two_nodes = losses("one"), losses("two")
    assert [s for s, _ in one] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in two_nodes] == [s for s, _ in one]
    for (_, a), (_, b) in zip(one, two_nodes, strict=True):
        assert abs(a - b) < 1e-5, (one, two_nodes)


def test_the_node_env_file_is_read_only_when_private(tmp_path):
    """`.kiln-node-env` carries credentials to the ranks: written 0600, read only when it is a regular file of
    this user's that nobody else may read (a file others could have written or read is refused)."""
    path = tmp_path / node_env.ENV_FILE
    node_env.write({"MLFLOW_TRACKING_PASSWORD": "p$(x) 'q'"}, path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert node_env.read(str(path)) == {"MLFLOW_TRACKING_PASSWORD": "p$(x) 'q'"}
    path.chmod(0o644)
    with pytest.raises(SystemExit, match="not a private regular file of this user's"):
        node_env.read(str(path))
    link = tmp_path / "link"
    link.symlink_to(path)
    with pytest.raises(SystemExit, match="cannot open"):
        node_env.read(str(link))
