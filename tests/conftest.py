import glob
import json
import multiprocessing
import os
import runpy
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

import forked_run

# no hub access in tests: a hub name fails at once instead of stalling; wandb never goes online
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# tiny models: threading each small op costs more than it gains, and on a loaded machine (OpenMP threads spinning
# against other processes) one small op took 7 ms instead of microseconds; torchrun sets 1 for its processes too
os.environ["OMP_NUM_THREADS"] = "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    """One folder for the scripts' runs, shared by pytest's workers, so that the tiny models and data (runs/tiny) are
    written once (tiny.one_writer)."""
    path = tmp_path_factory.getbasetemp().parent / "runs" if "PYTEST_XDIST_WORKER" in os.environ else \
        tmp_path_factory.mktemp("runs")
    path.mkdir(exist_ok=True)
    return path


# Every script imports torch, transformers, peft or diffusers: 5-7 s of a tiny run on 2 cores, paid by each of the
# suite's ~35 single-process runs. Those runs are forked from one process that has imported these libraries once
# (with this file's environment), and run there as `python SCRIPT FLAGS` runs them (forked_run.py): as __main__, with
# their own argv, folder, environment variables, stdout, stderr and exit status. What differs from a fresh process:
# what the libraries read at import, and the hash seed, are the preloading process's (rebel_tldr.py's resume test runs
# its reference run as a fresh process, so that a run's results depending on either would show there). Not datasets:
# it names cache files with a random generator made at import, which every fork would share. torchrun runs are fresh.
FORKSERVER = multiprocessing.get_context("forkserver")
FORKSERVER.set_forkserver_preload(["torch", "transformers", "transformers.modeling_utils", "peft", "diffusers", "tyro"])


def start_script(script, workdir, *flags, env=None, tiny=True):
    """`python SCRIPT --tiny FLAGS` (without --tiny if not `tiny`) in `workdir`, forked (see FORKSERVER); returns the
    process and the files of its stdout and stderr."""
    out, err = (f"{workdir}/.{script}.{time.time_ns()}.{name}" for name in ["out", "err"])
    proc = FORKSERVER.Process(target=forked_run.run_as_main, args=(
        f"{ROOT}/{script}", ["--tiny"] * tiny + list(flags), str(workdir), env or dict(os.environ), out, err))
    proc.start()
    return proc, out, err


def run_script(script, workdir, *flags, torchrun=False, fresh=False, check=True, env=None, tiny=True):
    """`python SCRIPT --tiny FLAGS` in `workdir`, forked (see FORKSERVER) unless `fresh`, or under torchrun with 2 CPU
    processes; checks that it exits 0. Returns its exit status, stdout and stderr."""
    if torchrun or fresh:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if torchrun \
            else [sys.executable]
        proc = subprocess.run(launcher + [f"{ROOT}/{script}", "--tiny", *flags], cwd=workdir, env=env or dict(os.environ),
                              capture_output=True, text=True, timeout=600)
    else:
        process, out, err = start_script(script, workdir, *flags, env=env, tiny=tiny)
        process.join(600)
        if process.exitcode is None:
            process.kill()
            process.join()
        proc = finished(process, out, err)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def finished(process, out, err):
    """The exit status, stdout and stderr of a forked run that has ended; its output files are removed."""
    if not os.path.exists(err):  # it ended before redirecting its output: the forkserver's stderr has the reason
        return SimpleNamespace(returncode=process.exitcode, stdout="", stderr="the forked run ended before its start")
    with open(out) as f, open(err) as g:
        output = SimpleNamespace(returncode=process.exitcode, stdout=f.read(), stderr=g.read())
    os.remove(out)
    os.remove(err)
    return output


def assert_tokenization_is_cached(script, loader, tokenizer, **fields):
    """datasets reuses an earlier run's tokenized data only if it can hash the transforms: SCRIPT's `loader`, defined
    as `python SCRIPT` defines it (in a module that cannot be imported, so that dill pickles its Args by value, which
    tyro's markers forbid), gives the same fingerprint twice; with a random one, each run tokenizes into new files."""
    program = runpy.run_path(f"{ROOT}/{script}", run_name="as_a_program")
    args = program["Args"](**fields)
    assert len({program[loader](args, tokenizer, "train", 0)._fingerprint for _ in range(2)}) == 1


def tensor_layout(model):
    """Name, shape and dtype of every tensor and buffer of `model`."""
    return {k: (v.shape, v.dtype) for k, v in [*model.state_dict().items(), *model.named_buffers()]}


def save_with_custom_code(model, path, auto_class):
    """Save MODEL to PATH with a config that maps AUTO_CLASS to custom code in the checkpoint (`custom.py`): a subclass
    that marks itself and each of its modules with an attribute `custom`, so that a test sees whether that code ran."""
    model.config.auto_map = {auto_class: "custom.Custom"}
    model.save_pretrained(path)
    base = type(model).__name__
    with open(f"{path}/custom.py", "w") as f:
        f.write(f"from transformers import {base}\n\n\nclass Custom({base}):\n    def __init__(self, config):\n"
                "        super().__init__(config)\n        for module in self.modules():\n            module.custom = True\n")


def read_metrics(workdir, run_prefix):
    """The one run folder runs/{run_prefix}__* and the lines of its metrics.jsonl."""
    (run_dir,) = glob.glob(f"{workdir}/runs/{run_prefix}__*")
    with open(f"{run_dir}/metrics.jsonl") as f:
        return run_dir, [json.loads(line) for line in f]


def checkpoint_update(checkpoint):
    import torch
    return torch.load(f"{checkpoint}/state.pt", weights_only=True)["update"]


def leave_as_killed_mid_swap(checkpoint):
    """The run folder of CHECKPOINT as a kill between the checkpoint swap's two renames leaves it (the checkpoint moved
    to checkpoint.old, a torn checkpoint.tmp), with a torn last line in metrics.jsonl (a kill while logging)."""
    os.rename(checkpoint, f"{checkpoint}.old")
    os.makedirs(f"{checkpoint}.tmp")
    with open(f"{checkpoint}.tmp/model.safetensors", "wb") as f:
        f.write(b"torn")
    with open(f"{os.path.dirname(checkpoint)}/metrics.jsonl", "a") as f:
        f.write('{"update": 1000, "objective/sco')


def assert_resume_reproduces(script, workdir, name, *flags, task="tldr", fresh=False):
    """Run SCRIPT straight for 3 updates (a fresh process if `fresh`); run it again, SIGKILL it once its update-2
    checkpoint exists, leave it as a kill mid-swap would (leave_as_killed_mid_swap) and resume from it: the resumed run
    logs the same metrics (timings aside). Returns both runs' metrics and the killed run's folder."""
    flags = ["--total_episodes", "96", "--eval_every", "2", "--eval_samples", "16", *flags]
    run_script(script, workdir, "--exp_name", f"{name}_straight", *flags, fresh=fresh)
    process, out, err = start_script(script, workdir, "--exp_name", f"{name}_killed", "--save_every", "2", *flags)
    deadline = time.time() + 300
    while not glob.glob(f"{workdir}/runs/{task}__{name}_killed__*/checkpoint/state.pt") and time.time() < deadline:
        assert process.is_alive(), finished(process, out, err).stderr[-3000:]
        time.sleep(0.05)
    process.kill()  # SIGKILL
    process.join()
    finished(process, out, err)
    (checkpoint,) = glob.glob(f"{workdir}/runs/{task}__{name}_killed__*/checkpoint")
    assert checkpoint_update(checkpoint) == 2
    leave_as_killed_mid_swap(checkpoint)
    proc = run_script(script, workdir, "--exp_name", f"{name}_killed", "--resume_from", checkpoint, *flags)
    assert f"resuming from {checkpoint}.old" in proc.stdout
    _, straight = read_metrics(workdir, f"{task}__{name}_straight")
    _, resumed = read_metrics(workdir, f"{task}__{name}_killed")
    assert [m["update"] for m in resumed] == [0, 1, 2, 3]
    for a, b in zip(straight, resumed):
        for key in a:
            if not key.startswith(("time/", "episodes_per_s", "memory/")):
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (key, a["update"])
    return straight, resumed, os.path.dirname(checkpoint)


def assert_recomputed_with_the_same_gradients(model, enable, mlp, loss):
    """After `enable(model)` (--gradient_checkpointing), a decoder layer's `mlp` runs again in the backward pass of
    `loss(model)`, although the model is in eval mode (dropout off), and the gradients are those without it."""
    import torch
    calls, forward = [], mlp.forward
    mlp.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    grads = []
    for checkpointing in [False, True]:
        if checkpointing:
            enable(model)
        calls.clear()
        loss(model).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        model.zero_grad()
        assert len(calls) == (2 if checkpointing else 1)
    assert not mlp.training
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def assert_tiny_run_learns(script, workdir, name, keys, min_gain):
    """`SCRIPT --tiny` on the TL;DR tiny models: one metrics line per update with `keys`, the held-out RM score (Gamma
    without EOS) up by more than `min_gain`, the KL to pi_0 0 before and positive after, finite gradients, and a saved
    model whose LoRA is merged into its weights. Returns the run folder and the metrics."""
    run_script(script, workdir, "--exp_name", name)
    run_dir, metrics = read_metrics(workdir, f"tldr__{name}")
    assert [m["update"] for m in metrics] == list(range(len(metrics))) and len(metrics) > 10
    assert all(keys <= set(m) for m in metrics[1:])
    before, after = metrics[0], metrics[-1]
    assert after["eval/scores"] > before["eval/scores"] + min_gain, (before, after)
    for kl in ["eval/kl_at_eval_temperature", "eval/kl_at_train_temperature"]:  # Table 1's, and at temperature 0.7
        assert after[kl] > 0 and before[kl] == pytest.approx(0, abs=1e-4)
    assert all(0 < m["train/grad_norm"] < float("inf") for m in metrics[1:])
    assert all(m["policy/entropy"] > 0 for m in metrics[1:])  # measured in each update's first epoch
    import torch
    from transformers import AutoModelForCausalLM
    weight = "gpt_neox.layers.0.attention.query_key_value.weight"
    trained = AutoModelForCausalLM.from_pretrained(f"{run_dir}/model").state_dict()[weight]
    assert not torch.equal(trained, AutoModelForCausalLM.from_pretrained(f"{workdir}/runs/tiny/sft").state_dict()[weight])
    return run_dir, metrics


def assert_tiny_math_run_learns(script, workdir, name, keys):
    """`SCRIPT --tiny` on the tiny math task: 20 updates logged with `keys`, held-out accuracy up by more than 0.25
    (the smallest gain of the three math scripts over seeds 1-3 was 0.46). Returns the run folder and the metrics."""
    run_script(script, workdir, "--exp_name", name)
    run_dir, metrics = read_metrics(workdir, f"math__{name}")
    assert [m["update"] for m in metrics] == list(range(21)) and all(keys <= set(m) for m in metrics[1:])
    assert metrics[-1]["eval/accuracy"] > metrics[0]["eval/accuracy"] + 0.25, (metrics[0], metrics[-1])
    return run_dir, metrics


# pytest.ini runs the suite in two workers: test files that need the same tiny asset go to the same one, so that no
# worker waits while the other writes it (tiny.one_writer)
SHARED_ASSETS = {"test_judge_tldr": "judge", "test_rebel_spo_tldr": "judge", "test_rebel_math": "math",
                 "test_grpo_math": "math", "test_apo_math": "math"}


# the groups that take longest, first: pytest-xdist hands the groups out in the order of the items (pytest.ini's
# --no-loadscope-reorder), so none of them starts when the other worker is nearly done
LONGEST_FIRST = ["test_rebel_tldr", "math", "judge", "test_rebel_chat", "test_iterative_dpo_tldr", "test_ppo_tldr"]


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook, which reads the marks
def pytest_collection_modifyitems(items):
    group = {item: SHARED_ASSETS.get(item.module.__name__, item.module.__name__) for item in items}
    for item in items:
        item.add_marker(pytest.mark.xdist_group(group[item]))
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(group[item], len(rank)))


def save_killed_at(save, module, kill_at, monkeypatch):
    """Call `save()` with MODULE's file operations (os.rename, shutil.rmtree, save_file, torch.save) raising at the
    call after the first `kill_at`, where a kill would stop a checkpoint write; returns whether it was stopped."""
    class Killed(Exception):
        pass

    calls = []

    def killing(function):
        def wrapped(*args, **kwargs):
            calls.append(function)
            if len(calls) > kill_at:
                raise Killed
            return function(*args, **kwargs)
        return wrapped

    with monkeypatch.context() as patch:
        for owner, name in [(module.os, "rename"), (module.shutil, "rmtree"), (module, "save_file"),
                            (module.torch, "save")]:
            patch.setattr(owner, name, killing(getattr(owner, name)))
        try:
            save()
        except Killed:
            return True
    return False
