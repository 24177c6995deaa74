"""The seed workflows' example scripts and configs, end to end.

Each example runs as written with EMBER_TINY=1 (tiny model of the same family, built-in corpus,
CPU processes, a few iterations) and keeps its parallel layout, except where the layout needs more
processes than CI's two cores can run: Grok-1 (TP=4 PP=2 EP=2, 16 ranks) runs with TP=2 PP=1 EP=2
and Llama3-70B (TP=8 PP=8, 64 ranks) with TP=2 PP=2, both through the same script or config with
the layout overridden. Every full-size example is checked instead by `ember plan` against its
target cluster, with the settings the script actually passes (recorded by a stand-in `ember`).
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dist_utils import free_port, read_metrics

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
BIN = str(Path(sys.executable).parent)
TIMEOUT = 300


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    from ember.compat.tiny_assets import prepare

    root = tmp_path_factory.mktemp("tiny-cache")
    prepare(root / "v1")  # built once here; every script then finds it
    return root


def _env(tiny_cache, **extra) -> dict[str, str]:
    env = dict(os.environ, PATH=BIN + os.pathsep + os.environ.get("PATH", ""), EMBER_TINY="1",
               EMBER_TINY_CACHE=str(tiny_cache), MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run(command: list[str], cwd: Path, env: dict[str, str], timeout: float = TIMEOUT) -> str:
    """Run a command in its own process group; its whole group is killed past the timeout."""
    log = cwd / f"command-{len(list(cwd.glob('command-*')))}.log"
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            code = process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            code = "timeout"
    output = log.read_text()
    assert code == 0, f"{' '.join(command)} -> {code}\n{output[-6000:]}"
    return output


def _train_state(save: Path) -> dict:
    latest = (save / "latest").read_text().strip()
    return json.loads((save / latest / "train_state.json").read_text())


def _check_tiny_run(save: Path, model: str, iterations: int = 3, **layout) -> dict:
    """The run finished its iterations on the tiny model, with the script's layout."""
    state = _train_state(save)
    config = state["config"]
    assert state["state"]["iteration"] == iterations
    assert config["model"]["name"] == model
    for name, value in layout.items():
        assert config["parallel"][name] == value, (name, config["parallel"])
    return config


# --------------------------------------------------------------------------- ModelLink (000, 001, 004)


def test_llama2_ptd_script_with_blended_data(tmp_path, tiny_cache):
    """Seed 000: the ModelLink Llama2 script, TP=1 PP=2, two datasets blended 0.5/0.5."""
    env = _env(tiny_cache, DATA_PATH="0.5 ./dataset/enwiki_text_document1 0.5 ./dataset/enwiki_text_document2")
    output = run(["bash", str(EXAMPLES / "llama2" / "pretrain_llama2_7b_ptd.sh")], tmp_path, env)
    config = _check_tiny_run(tmp_path / "ckpt" / "llama-2-7b", "tiny-llama", tensor_model_parallel_size=1,
                             pipeline_model_parallel_size=2, dp_mode="zero1")
    weights, prefixes = config["data"]["data_path"][0::2], config["data"]["data_path"][1::2]
    assert [float(w) for w in weights] == [0.5, 0.5] and len(set(prefixes)) == 2
    assert sorted(p.name for p in (tmp_path / "logs").glob("worker_*.log")) == ["worker_0.log", "worker_1.log"]
    train, _ = read_metrics(tmp_path / "ckpt" / "llama-2-7b")
    assert sorted(train) == [1, 2, 3] and "EMBER_TINY" in output


def test_grok1_data_convert_and_pretrain(tmp_path, tiny_cache):
    """Seed 001: Alpaca data converted, then the Grok-1 MoE script (16 ranks as written: run with
    TP=2 PP=1 EP=2 here; the full layout is checked by ember plan below)."""
    from ember.data.indexed import IndexedDataset

    env = _env(tiny_cache)
    run(["bash", str(EXAMPLES / "grok1" / "data_convert_grok1_pretrain.sh")], tmp_path, env)
    converted = IndexedDataset(str(tmp_path / "dataset" / "grok1-40B" / "alpaca_text_document"))
    assert len(converted.sequence_lengths) > 0
    run(["bash", str(EXAMPLES / "grok1" / "pretrain_grok1_40b_ptd.sh")], tmp_path,
        _env(tiny_cache, TP=2, PP=1, EP=2))
    config = _check_tiny_run(tmp_path / "ckpt" / "grok1-40B", "tiny-grok1", tensor_model_parallel_size=2,
                             expert_model_parallel_size=2, sequence_parallel=True, overlap_grad_reduce=True)
    assert config["model"]["num_experts"] in (None, 4)


def test_qwen3_data_convert_and_pretrain(tmp_path, tiny_cache):
    """Seed 004: enwiki-style data converted, then Qwen3-8B at its own layout TP=1 PP=4."""
    env = _env(tiny_cache)
    output = run(["bash", str(EXAMPLES / "qwen3" / "data_convert_qwen3_pretrain.sh")], tmp_path, env)
    assert (tmp_path / "dataset" / "enwiki_text_document.bin").is_file(), output
    run(["bash", str(EXAMPLES / "qwen3" / "pretrain_qwen3_8b_4K_ptd.sh")], tmp_path, env)
    _check_tiny_run(tmp_path / "ckpt" / "qwen3-8b", "tiny-qwen3", tensor_model_parallel_size=1,
                    pipeline_model_parallel_size=4)


# --------------------------------------------------------------------------- PAI-Megatron-Patch (002)


def _pai_pretrain_args(out: Path) -> list[str]:
    # the seed's DSW example, with this test's output folder
    return ["dsw", "/unused/Megatron-LM", "/unused/PAI-Megatron-Patch/", "1.7B", "4", "32", "256", "1e-5", "1e-6",
            "bf16", "1", "1", "sel", "true", "false", "10000", "./wudao/wudao_bloombpe_text_document",
            "./bloom-ckpts/bloomz-1b7-ember", "1000000", "100000", str(out)]


def test_bloom_pai_pretrain_then_finetune(tmp_path, tiny_cache):
    """Seed 002: the positional-argument scripts; the fine-tune starts from the pretrain's checkpoint."""
    env = _env(tiny_cache)
    out = tmp_path / "output_megatron_bloom"
    run(["sh", str(EXAMPLES / "bloom" / "run_pretrain_bloom.sh"), *_pai_pretrain_args(out)], tmp_path, env)
    (pretrained,) = (out / "checkpoint").iterdir()
    assert pretrained.name.startswith("dsw-pretrain-megatron-bloom-1.7B-lr-1e-5-bs-4-seqlen-256-pr-bf16")
    _check_tiny_run(pretrained, "tiny-bloom", dp_mode="zero1")
    assert _train_state(pretrained)["config"]["train"]["recompute_granularity"] == "selective"

    finetune = ["dsw", "/unused/Megatron-LM", "/unused/PAI-Megatron-Patch/", "1.7B", "4", "256", "1e-5", "1e-6",
                "bf16", "1", "1", "sel", "true", "false", "./instruct_latest.json", "./dev.json", str(pretrained),
                "16", str(out)]
    output = run(["sh", str(EXAMPLES / "bloom" / "run_finetune_bloom.sh"), *finetune], tmp_path, env)
    assert (out / "data" / "train_packed_input_ids_document.bin").is_file()
    (tuned,) = (p for p in (out / "checkpoint").iterdir() if "finetune" in p.name)
    config = _check_tiny_run(tuned, "tiny-bloom")
    assert config["train"]["finetune"] and "fine-tuning from the weights of" in output
    # it trained on something: the responses survive --seq-length 64 (the prompts are cut instead)
    train, _ = read_metrics(tuned)
    assert sorted(train) == [1, 2, 3], train
    for record in train.values():
        assert math.isfinite(record["loss"]) and record["loss"] > 1.0, record
        assert record["grad_norm"] is not None and record["grad_norm"] > 0, record
    assert "their prompts were cut from the start to keep their responses" in output


# --------------------------------------------------------------------------- MindFormers (003)


def _msrun(config: Path, mode: str, port: int, workers: int, *extra: str) -> list[str]:
    command = f"run_mindformer.py --config {config} --train_dataset_dir ./dataset/wiki4096_text_document " \
              f"--use_parallel True --run_mode {mode} {' '.join(extra)}"
    return ["ember", "launch", "--msrun", command, str(workers), str(min(workers, 8)), "127.0.0.1", str(port),
            "0", "output/msrun_log", "True", "300"]


def test_mindformers_llama2_yaml_train_then_predict(tmp_path, tiny_cache):
    """Seed 003, single node: the msrun command line, then --run_mode predict from its checkpoint."""
    env = _env(tiny_cache)
    config = EXAMPLES / "llama2" / "pretrain_llama2_7b.yaml"
    run(_msrun(config, "train", free_port(), 8), tmp_path, env)
    trained = _check_tiny_run(tmp_path / "output" / "checkpoint", "tiny-llama", dp_mode="fsdp")
    assert trained["data"]["split"] == "100,0,0"
    assert trained["data"]["data_path"][-1].endswith("_text_document")  # pretraining text, not instructions
    assert (tmp_path / "output" / "msrun_log" / "worker_1.log").is_file()

    prompt = "Return the"
    run(_msrun(config, "predict", free_port(), 1, "--predict_data", f"'{prompt}'"), tmp_path, env)
    predicted = (tmp_path / "output" / "msrun_log" / "worker_0.log").read_text()
    # the reference: ember generate on the same checkpoint, greedy, as many new tokens
    new_tokens = int(re.search(r"\[(\d+) tokens in", predicted).group(1))
    reference = subprocess.run(["ember", "generate", "--load", "output/checkpoint", "--prompt", prompt, "--greedy",
                                "--max-new-tokens", str(new_tokens), "--device", "cpu"], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=120, check=True).stdout
    assert reference.startswith(prompt) and len(reference.strip()) > len(prompt)
    assert reference.strip() in predicted


def test_mindformers_llama3_yaml_multi_node_form(tmp_path, tiny_cache):
    """Seed 003, multi-node form (64 8 MASTER_ADDR 8118 NODE_RANK LOG_DIR JOIN TIMEOUT). 64 ranks
    as written: run with model_parallel 2, pipeline_stage 2 here; ember plan checks the full one."""
    config = EXAMPLES / "llama3" / "pretrain_llama3_70b.yaml"
    overrides = ("--register_path research/llama3 parallel.tensor_model_parallel_size=2 "
                 "parallel.pipeline_model_parallel_size=2")
    run(_msrun(config, "train", free_port(), 64, overrides), tmp_path, _env(tiny_cache))
    _check_tiny_run(tmp_path / "output" / "checkpoint", "tiny-llama", tensor_model_parallel_size=2,
                    pipeline_model_parallel_size=2, sequence_parallel=True)


# --------------------------------------------------------------------------- full size, by ember plan


FAKE_EMBER = """#!{python}
import json, os, sys
keep = ("GPUS_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")
with open(os.environ["EMBER_RECORD"], "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "env": {{k: os.environ[k] for k in keep if k in os.environ}}}}) + "\\n")
"""

# example -> (how to run it, the cluster it targets: nodes, devices per node, memory, extra env)
FULL_SIZE = {
    "llama2-ptd": (["bash", "llama2/pretrain_llama2_7b_ptd.sh"], "64GB", {}),
    "grok1-ptd": (["bash", "grok1/pretrain_grok1_40b_ptd.sh"], "64GB", {}),
    "qwen3-ptd": (["bash", "qwen3/pretrain_qwen3_8b_4K_ptd.sh"], "64GB", {}),
    "bloom-1b7": (["sh", "bloom/run_pretrain_bloom.sh", *_pai_pretrain_args(Path("out"))], "80GB", {}),
    "bloomz-176b-tp8-pp10": (
        ["sh", "bloom/run_pretrain_bloom.sh", "dlc", "-", "-", "176B", "1", "512", "2048", "1e-5", "1e-6", "bf16",
         "8", "10", "full", "true", "false", "1000", "./data_text_document", "none", "1000000000", "10000000",
         "out"], "80GB", {"WORLD_SIZE": "10", "RANK": "0", "KUBERNETES_CONTAINER_RESOURCE_GPU": "8",
                          "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "6000"}),
    "llama2-yaml": (_msrun(EXAMPLES / "llama2" / "pretrain_llama2_7b.yaml", "train", 8118, 8), "64GB", {}),
    "llama3-yaml": (_msrun(EXAMPLES / "llama3" / "pretrain_llama3_70b.yaml", "train", 8118, 64), "64GB", {}),
}


def _recorded_launch(name: str, tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    command, _, extra_env = FULL_SIZE[name]
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "ember").write_text(FAKE_EMBER.format(python=sys.executable))
    (fake_bin / "ember").chmod(0o755)
    record = tmp_path / "record.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in ("EMBER_TINY", "WORLD_SIZE", "RANK")}
    env.update(PATH=str(fake_bin) + os.pathsep + env["PATH"], EMBER_RECORD=str(record), **extra_env)
    if command[0] == "ember":
        command = [str(fake_bin / "ember"), *command[1:]]
    else:
        command = [command[0], str(EXAMPLES / command[1]), *command[2:]]
    subprocess.run(command, cwd=tmp_path, env=env, check=True, timeout=60, capture_output=True)
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    (launch,) = [c for c in calls if c["argv"][:1] == ["launch"]]
    return launch["argv"][1:], launch["env"]


@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_full_size_example_fits_its_cluster(name, tmp_path, monkeypatch):
    """The layout, batch, precision, sharding and recomputation each full-size example passes to
    `ember launch` fit its target cluster by `ember plan` (and its processes match the layout)."""
    from ember.cli import main
    from ember.commands.launch import add_arguments, plan_from_args, training_config

    argv, env = _recorded_launch(name, tmp_path)
    for key in ("GPUS_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("EMBER_TINY", raising=False)
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    plan = plan_from_args(parser.parse_args(argv))
    config, _ = training_config(plan.train_args)
    p, t = config.parallel, config.train
    recompute = {None: "none", "selective": "selective", "full": "full"}[t.recompute_granularity]
    plan_argv = ["plan", config.model.name, "--nodes", str(plan.nnodes), "--gpus", str(plan.nproc_per_node),
                 "--gpu-mem", FULL_SIZE[name][1], "--seq-length", str(config.data.seq_length),
                 "--global-batch-size", str(t.global_batch_size), "--micro-batch-size", str(t.micro_batch_size),
                 "--tp", str(p.tensor_model_parallel_size), "--pp", str(p.pipeline_model_parallel_size),
                 "--ep", str(p.expert_model_parallel_size), "--cp", str(p.context_parallel_size),
                 "--dp-mode", p.dp_mode, "--recompute", recompute, f"--{t.precision}",
                 "--sequence-parallel" if p.sequence_parallel else "--no-sequence-parallel"]
    assert main(plan_argv) == 0, f"ember {' '.join(plan_argv)} does not fit"


# --------------------------------------------------------------------------- docs


def test_every_example_has_a_docs_page():
    docs = "\n".join(p.read_text() for p in (ROOT / "docs").glob("*.md"))
    examples = [p for p in EXAMPLES.rglob("*") if p.suffix in (".sh", ".yaml")]
    assert examples
    missing = [str(p.relative_to(ROOT)) for p in examples if str(p.relative_to(ROOT)) not in docs]
    assert not missing, f"examples without a docs page: {missing}"
