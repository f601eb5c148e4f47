"""`mcit launch`: the deepspeed launcher flags for one node, a --hostfile and --no-ssh nodes, the refusals, and the
environment file a multi-node launch forwards. A fake `deepspeed` on PATH records what it was given, so no process
group starts; one slow test hands the generated flags to the real launcher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mcit.cli import build_parser, main
from mcit.cli.launch import _launcher_args

FAKE_DEEPSPEED = """#!{python}
# Records its arguments, the hostfile it was given and the environment file the multi-node runner would read.
import json, os, sys
argv = sys.argv[1:]
name = os.environ.get("DS_ENV_FILE", ".deepspeed_env")
exported = {{}}
for base in (os.path.expanduser("~"), "."):  # the runner's DEEPSPEED_ENVIRONMENT_PATHS, in its order
    path = os.path.join(base, name)
    if os.path.isfile(path):
        for line in open(path):
            key, value = line.split("=", 1)  # as the runner parses it: a line without '=' fails the launch
            exported[key.strip()] = value.strip()
hostfile = argv[argv.index("--hostfile") + 1] if "--hostfile" in argv else None
record = {{"argv": argv, "exported": exported, "hostfile": open(hostfile).read() if hostfile else None,
          "env": {{k: os.environ.get(k) for k in ("DS_ACCELERATOR", "OMP_NUM_THREADS")}}}}
json.dump(record, open(os.environ["FAKE_DEEPSPEED_RECORD"], "w"))
"""


@pytest.fixture
def fake_deepspeed(tmp_path, monkeypatch):
    """A `deepspeed` first on PATH; HOME and the working folder in tmp_path. Returns a function reading its record."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "deepspeed"
    script.write_text(FAKE_DEEPSPEED.format(python=sys.executable))
    script.chmod(0o755)
    record = tmp_path / "record.json"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_DEEPSPEED_RECORD", str(record))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    for key in [k for k in os.environ if k.startswith("MCIT_")] + ["CUDA_VISIBLE_DEVICES", "DS_ENV_FILE",
                                                                     "DS_ACCELERATOR", "HF_HOME"]:
        monkeypatch.delenv(key, raising=False)

    def read() -> dict:
        return json.loads(record.read_text()) if record.exists() else None

    return read


def gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_single_node_uses_every_visible_gpu(fake_deepspeed, monkeypatch):
    gpus(monkeypatch, 4)
    assert main(["launch", "r.yaml", "train.lr=1e-4"]) == 0
    argv = fake_deepspeed()["argv"]
    assert flag(argv, "--num_gpus") == "4" and "--include" not in argv and "--hostfile" not in argv
    # mcit reads LOCAL_RANK from the environment; the recipe and its overrides reach `mcit train` unchanged.
    assert argv[argv.index("--no_local_rank"):] == ["--no_local_rank", "--module", "mcit", "train", "r.yaml",
                                                     "train.lr=1e-4"]
    assert flag(argv, "--master_port") == "29500"


def test_cuda_visible_devices_are_the_gpus_the_ranks_get(fake_deepspeed, monkeypatch, capsys):
    gpus(monkeypatch, 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert main(["launch", "r.yaml"]) == 0
    argv = fake_deepspeed()["argv"]
    # Given --num_gpus the launcher would take GPUs 0..N-1 and drop CUDA_VISIBLE_DEVICES.
    assert flag(argv, "--include") == "localhost:2,5" and "--num_gpus" not in argv
    assert main(["launch", "r.yaml", "--nproc", "1"]) == 0
    assert flag(fake_deepspeed()["argv"], "--include") == "localhost:2"
    assert main(["launch", "r.yaml", "--nproc", "3"]) == 2
    assert "--nproc 3: only 2 GPU(s)" in capsys.readouterr().err


def test_no_gpu_needs_cpu_or_nproc(fake_deepspeed, monkeypatch, capsys):
    gpus(monkeypatch, 0)
    assert main(["launch", "r.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no GPU is visible" in err and "--cpu" in err and "--nproc" in err
    assert fake_deepspeed() is None
    assert main(["launch", "r.yaml", "--cpu"]) == 0
    record = fake_deepspeed()
    assert flag(record["argv"], "--num_gpus") == "2" and record["env"]["DS_ACCELERATOR"] == "cpu"
    assert main(["launch", "r.yaml", "--nproc", "3"]) == 0
    assert flag(fake_deepspeed()["argv"], "--num_gpus") == "3"


@pytest.mark.parametrize(("argv", "named"), [
    (["--no-ssh", "--master-addr", "10.0.0.1", "--nnodes", "2"], "--node-rank"),
    (["--no-ssh", "--node-rank", "1", "--nnodes", "2"], "--master-addr"),
    (["--no-ssh", "--node-rank", "1", "--master-addr", "10.0.0.1"], "--nnodes"),
    (["--no-ssh", "--node-rank", "2", "--master-addr", "10.0.0.1", "--nnodes", "2"], "--node-rank"),
    (["--node-rank", "1", "--master-addr", "10.0.0.1", "--hostfile", "h"], "--node-rank"),
    (["--master-addr", "10.0.0.1"], "--master-addr"),
    (["--nproc", "0", "--cpu"], "--nproc"),
    (["--hostfile", "missing-hostfile"], "--hostfile"),
])
def test_incomplete_multi_node_flags_are_refused_naming_the_flag(fake_deepspeed, monkeypatch, capsys, argv, named):
    gpus(monkeypatch, 2)
    assert main(["launch", "r.yaml", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("mcit launch: error: ") and named in err
    assert fake_deepspeed() is None


def test_no_ssh_node_gets_a_hostfile_and_its_rank(fake_deepspeed, monkeypatch):
    gpus(monkeypatch, 4)
    assert main(["launch", "r.yaml", "--no-ssh", "--node-rank", "1", "--nnodes", "3", "--master-addr", "10.0.0.1",
                 "--master-port", "29611"]) == 0
    record = fake_deepspeed()
    argv = record["argv"]
    assert "--no_ssh" in argv and flag(argv, "--node_rank") == "1"
    assert flag(argv, "--master_addr") == "10.0.0.1" and flag(argv, "--master_port") == "29611"
    assert flag(argv, "--num_gpus") == "4"
    # Every node writes the same node list, so the launcher numbers the ranks alike everywhere.
    assert record["hostfile"].splitlines() == ["node-0 slots=4", "node-1 slots=4", "node-2 slots=4"]
    assert record["exported"] == {}  # each node starts its own processes with its own environment


def test_no_ssh_with_a_users_hostfile_passes_it_through(fake_deepspeed, tmp_path, capsys):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("a slots=8\nb slots=8\n")
    assert main(["launch", "r.yaml", "--no-ssh", "--hostfile", str(hostfile), "--node-rank", "0",
                 "--master-addr", "a"]) == 0
    argv = fake_deepspeed()["argv"]
    assert flag(argv, "--hostfile") == str(hostfile) and flag(argv, "--node_rank") == "0"
    assert "--num_gpus" not in argv  # the hostfile's slots decide, even on a node without a GPU
    assert main(["launch", "r.yaml", "--no-ssh", "--hostfile", str(hostfile), "--node-rank", "2",
                 "--master-addr", "a"]) == 2
    assert "--node-rank 2 is outside 0..1" in capsys.readouterr().err


def test_hostfile_forwards_mcit_variables_merged_with_the_users_env_files(fake_deepspeed, monkeypatch, capsys,
                                                                           tmp_path):
    home_file = tmp_path / "home" / ".deepspeed_env"
    home_file.write_text("NCCL_DEBUG=INFO\nMCIT_UCIT_ROOT=/shared/ucit\n")
    work_file = tmp_path / "work" / ".deepspeed_env"
    work_file.write_text("WANDB_MODE=offline\n")
    monkeypatch.setenv("MCIT_UCIT_ROOT", "/local/ucit")
    monkeypatch.setenv("MCIT_DCL_ROOT", "/data/dcl root")
    monkeypatch.setenv("HF_HOME", "/data/hf")
    monkeypatch.setenv("UNRELATED_SETTING", "1")
    hostfile = tmp_path / "hosts"
    hostfile.write_text("a slots=2\nb slots=2\n")
    assert main(["launch", "r.yaml", "--hostfile", str(hostfile), "--nnodes", "2", "--master-addr", "a"]) == 0
    record = fake_deepspeed()
    assert record["exported"] == {"NCCL_DEBUG": "INFO", "MCIT_UCIT_ROOT": "/shared/ucit", "WANDB_MODE": "offline",
                                  "MCIT_DCL_ROOT": "/data/dcl root", "HF_HOME": "/data/hf"}
    argv = record["argv"]
    assert flag(argv, "--hostfile") == str(hostfile) and flag(argv, "--num_nodes") == "2"
    assert "--num_gpus" not in argv and "--no_ssh" not in argv
    err = capsys.readouterr().err
    assert "forwarding to every node: HF_HOME, MCIT_DCL_ROOT, MCIT_UCIT_ROOT" in err
    assert "MCIT_UCIT_ROOT" in err.split("kept the value")[1]
    # The user's files are read, never rewritten; the merged file lives only as long as the launch.
    assert home_file.read_text() == "NCCL_DEBUG=INFO\nMCIT_UCIT_ROOT=/shared/ucit\n"
    assert work_file.read_text() == "WANDB_MODE=offline\n"


def test_hostfile_with_cpu_forwards_the_accelerator(fake_deepspeed, monkeypatch, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("a slots=2\nb slots=2\n")
    assert main(["launch", "r.yaml", "--hostfile", str(hostfile), "--cpu"]) == 0
    assert fake_deepspeed()["exported"] == {"DS_ACCELERATOR": "cpu"}


@pytest.mark.slow
def test_real_launcher_numbers_no_ssh_nodes_from_the_generated_hostfile(tmp_path, monkeypatch):
    """Two emulated nodes on this machine, each started with its own --node-rank: the real deepspeed runner gives
    them disjoint global ranks of one world, and node 1 runs on the GPUs CUDA_VISIBLE_DEVICES named."""
    script = tmp_path / "record_rank.py"
    script.write_text("import json, os, sys\n"
                      "keys = ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT', 'CUDA_VISIBLE_DEVICES')\n"
                      "path = os.path.join(sys.argv[1], 'rank-' + os.environ['RANK'] + '.json')\n"
                      "json.dump({k: os.environ.get(k) for k in keys}, open(path, 'w'))\n")
    out = tmp_path / "ranks"
    out.mkdir()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    parser = build_parser()
    launches = []
    for node, visible in ((0, None), (1, "3,6")):
        if visible:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        args = parser.parse_args(["launch", "r.yaml", "--no-ssh", "--nnodes", "2", "--node-rank", str(node),
                                  "--master-addr", "127.0.0.1", "--master-port", "29733"])
        workdir = tmp_path / f"node-{node}"
        workdir.mkdir()
        flags = _launcher_args(args, workdir)
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
        launches.append(subprocess.Popen(
            [str(Path(sys.executable).parent / "deepspeed"), *flags, "--no_local_rank", str(script), str(out)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for proc in launches:
        output = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, output[-3000:]
    ranks = {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in out.glob("rank-*.json")}
    assert sorted(ranks) == [0, 1, 2, 3]
    assert {r["WORLD_SIZE"] for r in ranks.values()} == {"4"}
    assert {r["MASTER_ADDR"] for r in ranks.values()} == {"127.0.0.1"}
    assert [ranks[r]["LOCAL_RANK"] for r in range(4)] == ["0", "1", "0", "1"]
    assert [ranks[r]["CUDA_VISIBLE_DEVICES"] for r in (2, 3)] == ["3,6", "3,6"]
    assert [ranks[r]["CUDA_VISIBLE_DEVICES"] for r in (0, 1)] == ["0,1", "0,1"]


def test_overrides_may_follow_the_options():
    from mcit.cli import parse

    args = parse(["launch", "r.yaml", "a.b=1", "--nproc", "2", "train.lr=1e-4", "--cpu"])
    assert args.overrides == ["a.b=1", "train.lr=1e-4"] and args.nproc == 2 and args.cpu
    assert parse(["train", "r.yaml", "--dry-run", "x=1"]).overrides == ["x=1"]
    with pytest.raises(SystemExit):
        parse(["launch", "r.yaml", "--nproc", "2", "stray"])  # not key=value: still refused
    with pytest.raises(SystemExit):
        parse(["eval", "--checkpoint", "c", "--benchmark", "b", "x=1"])  # a verb without overrides takes none
