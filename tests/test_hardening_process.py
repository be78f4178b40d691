"""A run and the world around its process: a full disk while the tokenizer is copied, stop signals at
every moment of a run (set-up, training, the final save, twice), a rendezvous nobody answers and a
launcher that dies. The signal and process tests run `slmforge pretrain` as a real process; a small
script in front of the CLI holds it at the moment under test."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slmforge import config
from slmforge.errors import SlmforgeError
from slmforge.train.config import PretrainConfig
from slmforge.train.pretrain import pretrain

DISTRIBUTED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                   "TORCHELASTIC_USE_AGENT_STORE", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")


def run_config(data, out, *extra) -> PretrainConfig:
    return config.load(PretrainConfig, overrides=[
        "model.preset=test-tiny", f"train.data={data}", "train.seq_len=64", "train.batch_size=16",
        f"train.out_dir={out}", "train.eval_every=0", "train.device=cpu", *extra])


def child_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in DISTRIBUTED_ENV}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def pretrain_args(data: Path, run: Path, *extra: str) -> list[str]:
    return ["pretrain", "model.preset=test-tiny", f"train.data={data}", f"train.out_dir={run}", "train.seq_len=64",
            "train.batch_size=16", "train.eval_every=0", "train.log_every=1", "train.device=cpu", *extra]


def wait_for(condition, proc: subprocess.Popen, what: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert proc.poll() is None, f"the process ended before {what}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"no {what} within {seconds} s"
        time.sleep(0.02)


# ---------------------------------------------------------------- 9. a full disk copying the tokenizer

def _enospc(path) -> OSError:
    return OSError(errno.ENOSPC, "No space left on device", str(path))


@pytest.mark.parametrize("fails", ["the copy", "a file inside the copy"])
def test_a_full_disk_copying_the_tokenizer_is_one_line_and_leaves_no_half_copy(mlm_markov_shards, tmp_path,
                                                                                 monkeypatch, fails):
    import shutil

    _, data = mlm_markov_shards
    run = tmp_path / "run"
    if fails == "the copy":
        def copytree(source, target, *args, **kwargs):
            Path(target).mkdir()
            (Path(target) / "tokenizer.json").write_text("{\"half")  # the disk filled mid-copy
            raise _enospc(Path(target) / "tokenizer.json")

        monkeypatch.setattr(shutil, "copytree", copytree)
    else:  # the real copytree, whose file copy fails: it reports that as shutil.Error, without errno
        real_copyfile = shutil.copyfile

        def copyfile(source, target, *args, **kwargs):
            real_copyfile(source, target, *args, **kwargs)
            raise _enospc(target)

        monkeypatch.setattr(shutil, "copyfile", copyfile)
    with pytest.raises(SlmforgeError) as caught:
        pretrain(run_config(data, run, "train.max_steps=1"))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{run}: disk full while writing tokenizer/ (needs about ")
    assert "nothing half-copied is left: free space and run the same command" in message
    assert not run.exists()  # no tokenizer.partial, no tokenizer: the failed run took away the folder it made
    monkeypatch.undo()
    pretrain(run_config(data, run, "train.max_steps=1"))  # space freed: the same command goes ahead
    assert (run / "tokenizer" / "tokenizer.json").is_file()


# ---------------------------------------------------------------- 11. stop signals at every moment

# Holds the first `import torch` (the parser's imports, the first seconds of every training verb)
# until the test has sent its signal.
HOLD_IMPORT = """
import builtins, sys, time
from pathlib import Path
flag = Path(sys.argv.pop(1))
real_import = builtins.__import__
def held(name, *args, **kwargs):
    if name == "torch" and not flag.exists():
        flag.touch()
        time.sleep(60)
    return real_import(name, *args, **kwargs)
builtins.__import__ = held
from slmforge.cli import main
sys.exit(main(sys.argv[1:]))
"""

# Holds the model build (after the run lock, the data and the tokenizer) until the test has signalled.
HOLD_MODEL_BUILD = """
import sys, time
from pathlib import Path
import slmforge.models
flag = Path(sys.argv.pop(1))
real_build = slmforge.models.build_model
def held(*args, **kwargs):
    flag.touch()
    time.sleep(60)
    return real_build(*args, **kwargs)
slmforge.models.build_model = held
from slmforge.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("moment", ["importing torch", "building the model"])
def test_sigterm_during_set_up_stops_in_one_line(markov_shards, tmp_path, moment):
    _, data = markov_shards
    run, flag = tmp_path / "run", tmp_path / "held"
    script = HOLD_IMPORT if moment == "importing torch" else HOLD_MODEL_BUILD
    proc = subprocess.Popen([sys.executable, "-c", script, str(flag), *pretrain_args(data, run, "train.max_steps=5")],
                            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(flag.exists, proc, moment)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert err.endswith("slmforge: stopped by SIGTERM during set-up; nothing to save\n"), err[-2000:]
    assert "Traceback" not in err and out == ""
    assert not (run / "checkpoints").exists()


# Sends SIGTERM twice inside the save of step FINAL (the last): the write goes on to the end.
SIGNAL_IN_FINAL_SAVE = """
import os, signal, sys
import slmforge.train.checkpointer as checkpointer
final = int(sys.argv.pop(1))
real_save = checkpointer.save_checkpoint
def save(run_dir, step, *args, **kwargs):
    if step == final:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
    return real_save(run_dir, step, *args, **kwargs)
checkpointer.save_checkpoint = save
from slmforge.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_twice_during_the_final_save_finishes_it_then_stops(markov_shards, tmp_path):
    from slmforge.checkpoint.reading import newest_good_checkpoint

    _, data = markov_shards
    run = tmp_path / "run"
    result = subprocess.run([sys.executable, "-c", SIGNAL_IN_FINAL_SAVE, "3",
                             *pretrain_args(data, run, "train.max_steps=3")],
                            env=child_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 143, result.stderr[-2000:]
    lines = result.stderr.splitlines()
    assert "SIGTERM again: finishing the checkpoint being written, then stopping (SIGTERM once more to abort it)" \
        in lines
    assert lines[-1] == (f"terminated (SIGTERM) at the end of the run: saved {run / 'checkpoints' / 'step-000003'}, "
                         f"the last step; the run is complete")
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000003"
    assert newest_good_checkpoint(run, print).name == "step-000003"  # whole: checksums verified


# Sends SIGTERM twice in a row before step 3, outside any save: the second one ends the run at once.
TWO_SIGNALS_MID_RUN = """
import os, signal, sys
from slmforge.train.trainer import Trainer
real_step = Trainer.train_step
def step(self):
    if self.state.step == 2:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
    return real_step(self)
Trainer.train_step = step
from slmforge.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_second_sigterm_outside_a_save_stops_at_once_in_one_line(markov_shards, tmp_path):
    _, data = markov_shards
    run = tmp_path / "run"
    result = subprocess.run([sys.executable, "-c", TWO_SIGNALS_MID_RUN, *pretrain_args(data, run, "train.max_steps=6")],
                            env=child_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 143, result.stderr[-2000:]
    assert result.stderr.endswith("slmforge: SIGTERM again: stopped at once without saving; the same command "
                                  "resumes from the newest checkpoint\n"), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not list((run / "checkpoints").glob("step-*"))


# ---------------------------------------------------------------- 17. rendezvous and launcher

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(port: int, **extra: str) -> dict[str, str]:
    """A rank-1 worker of a 2-process job, as torchrun or srun would start it."""
    return child_env(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                     **extra)


@pytest.mark.parametrize("launcher", ["torchrun", "by hand"])
def test_a_worker_with_nobody_at_the_rendezvous_fails_in_one_line(markov_shards, tmp_path, launcher):
    """Without the connect timeout the worker waited parallel.timeout_minutes (an hour) in
    init_process_group. Under torchrun (the launcher's store listens before workers start) a refused
    connection ends it at once; otherwise parallel.connect_timeout_seconds does."""
    _, data = markov_shards
    port = free_port()  # nobody listens there
    if launcher == "torchrun":
        env, extra = worker_env(port, TORCHELASTIC_RUN_ID="test", TORCHELASTIC_USE_AGENT_STORE="True"), []
        expected = f"nothing listens at 127.0.0.1:{port}, where torchrun's rendezvous should be"
    else:
        env, extra = worker_env(port), ["parallel.connect_timeout_seconds=2"]
        expected = f"could not join the others at 127.0.0.1:{port} (The client socket has timed out after 2000ms"
    result = subprocess.run([sys.executable, "-m", "slmforge", *pretrain_args(data, tmp_path / "run", *extra)],
                            env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count("\n") == 1, result.stderr[-3000:]  # no c10d retry logs, no traceback
    assert result.stderr.startswith("slmforge: error: parallel: rank 1") and expected in result.stderr


# Starts the worker given on its command line, writing its stderr to a file, prints its pid and
# waits: the launcher, which the test then kills.
LAUNCHER = """
import subprocess, sys, time
with open(sys.argv[1], "w") as err:
    worker = subprocess.Popen(sys.argv[2:], stdout=subprocess.DEVNULL, stderr=err)
print(worker.pid, flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie has exited; its new parent may not have reaped it yet


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_a_worker_whose_launcher_dies_exits_in_one_line(markov_shards, tmp_path):
    """The worker waits in init_process_group for rank 0, which never comes, with a 10-minute connect
    timeout; the launcher's store stays up. Only the launcher's death can end the wait, at once."""
    import torch.distributed as dist

    _, data = markov_shards
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # the launcher's store
    err_file = tmp_path / "worker.err"
    args = pretrain_args(data, tmp_path / "run", "parallel.connect_timeout_seconds=600")
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(err_file), sys.executable, "-m", "slmforge",
                                 *args], env=worker_env(store.port, TORCHELASTIC_RUN_ID="test",
                                                        TORCHELASTIC_USE_AGENT_STORE="True"),
                                stdout=subprocess.PIPE, text=True)
    worker = int(launcher.stdout.readline())
    try:
        wait_for(lambda: store.num_keys() > 0, launcher, "worker at the rendezvous")  # it waits for rank 0 now
        time.sleep(0.5)
        assert _alive(worker)
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 15
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(worker), "the worker outlived its launcher"
        assert err_file.read_text() == f"slmforge: error: rank 1: the launcher (pid {launcher.pid}) is gone; stopping\n"
    finally:
        if _alive(worker):
            os.kill(worker, signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_training_workers_whose_torchrun_is_killed_save_and_exit(markov_shards, tmp_path):
    """kill -9 of torchrun mid-run: its two workers notice, stop at the same step boundary, save, and
    end, instead of training on (or hanging) without a launcher. Their exit skips torch's teardown,
    where a gloo process group can deadlock once its peer has gone (seen in about half the runs)."""
    from slmforge.checkpoint.reading import newest_good_checkpoint

    _, data = markov_shards
    run, log = tmp_path / "run", tmp_path / "torchrun.log"
    with open(log, "w") as out:
        agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                                  "-m", "slmforge", *pretrain_args(data, run, "train.max_steps=100000",
                                                                   "train.log_every=10", "train.batch_size=8")],
                                 env=child_env(), stdout=out, stderr=out)
    workers: list[int] = []
    try:
        metrics = run / "metrics.jsonl"
        wait_for(lambda: metrics.is_file() and metrics.read_text().count("\n") >= 2, agent, "training", 300)
        workers = _children(agent.pid)
        assert len(workers) == 2, workers
        agent.kill()
        agent.wait()
        deadline = time.monotonic() + 60
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers), f"workers outlived torchrun: {log.read_text()[-2000:]}"
        text = log.read_text()
        assert f"the launcher (pid {agent.pid}) is gone; stopping" in text
        saved = newest_good_checkpoint(run, print)
        assert saved is not None and f"terminated (SIGTERM): saved {saved}; run the same command to resume" in text
        assert "Traceback" not in text
    finally:
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if agent.poll() is None:
            agent.kill()
            agent.wait()
