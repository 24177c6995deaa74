"""`ember launch --emit k8s|pytorchjob`: Kubernetes manifests for a multi-node job, checked against
the Kubernetes API's own schemas.

- Service and Indexed Job: deserialized by the `kubernetes` Python client into V1Service/V1Job
  (its models refuse a missing required field) and serialized back: a field the API does not
  know (a typo) would be dropped on the way and the round trip would differ.
- PyTorchJob (a CRD): its structure against the training operator's published openAPIV3Schema
  (tests/k8s/, a trimmed copy, source noted there), strictly (unknown fields fail); each
  replica's pod template as a V1PodTemplateSpec; and the operator's admission rules
  (pkg/webhooks/pytorch/pytorchjob_webhook.go at v1.9.0).
Then the rendezvous: each pod's environment, as Kubernetes or the operator fills it in, gives
`ember launch` its node rank, the node count and node 0's address.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import pytest
import yaml

kubernetes = pytest.importorskip("kubernetes", reason="the kubernetes client validates the manifests "
                                 "(pip install kubernetes)")

CRD = Path(__file__).resolve().parent / "k8s" / "kubeflow.org_pytorchjobs.trimmed.yaml"
TRAIN = ["--model", "tiny-llama", "--data-path", "/data/corpus_text_document", "--micro-batch-size", "1",
         "--global-batch-size", "96", "--train-iters", "100", "--save", "/ckpt/run"]


def _emit(capsys, monkeypatch, *argv: str) -> list[dict]:
    from ember.commands.launch import add_arguments, run

    for name in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "GPUS_PER_NODE", "EMBER_TINY"):
        monkeypatch.delenv(name, raising=False)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args([*argv, "--", *TRAIN])) == 0
    return list(yaml.safe_load_all(capsys.readouterr().out))


def _round_trip(document: dict, model: str) -> dict:
    """The document as the API's model reads it, written back."""
    client = kubernetes.client.ApiClient()
    obj = client._ApiClient__deserialize(document, model)  # the client's own JSON -> model reader
    return client.sanitize_for_serialization(obj)


def _plan_in_pod(monkeypatch, env: dict[str, str]):
    from ember.commands.launch import add_arguments, plan_from_args

    for name in list(os.environ):
        if name.startswith(("SLURM_", "PET_")) or name in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
                                                           "GPUS_PER_NODE"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    container_args = parser.parse_args(["--", *TRAIN])
    return plan_from_args(container_args)


# --------------------------------------------------------------------------- Service + Indexed Job


def test_indexed_job_and_headless_service_are_valid_api_objects(capsys, monkeypatch):
    service, job = _emit(capsys, monkeypatch, "--emit", "k8s", "--nnodes", "3", "--nproc-per-node", "8",
                         "--master-port", "29400", "--job-name", "llama-pretrain", "--image", "registry/ember:1")
    assert (service["kind"], job["kind"]) == ("Service", "Job")
    assert _round_trip(service, "V1Service") == service
    assert _round_trip(job, "V1Job") == job

    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 3, 3)
    assert service["spec"]["clusterIP"] == "None" and pod["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": "llama-pretrain"}  # the Job's pods
    container = pod["containers"][0]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "8"}
    assert container["command"][:2] == ["ember", "launch"] and container["command"][-len(TRAIN):] == TRAIN

    # what Kubernetes puts in each pod: its completion index (the annotation the fieldRef reads)
    env = {item["name"]: item for item in container["env"]}
    path = env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert path == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    for index in range(3):
        values = {name: item["value"] for name, item in env.items() if "value" in item}
        plan = _plan_in_pod(monkeypatch, dict(values, NODE_RANK=str(index)))
        assert (plan.node_rank, plan.nnodes, plan.nproc_per_node, plan.world_size) == (index, 3, 8, 24)
        # pod 0's DNS name through the headless Service: <job>-<index>.<subdomain>
        assert plan.master_addr == f"{job['metadata']['name']}-0.{pod['subdomain']}"
        assert plan.master_port == 29400 == service["spec"]["ports"][0]["port"]


def test_layout_errors_stop_the_emit(capsys, monkeypatch):
    from ember.errors import EmberError

    with pytest.raises(EmberError, match="not divisible by micro batch size 1 x data-parallel size 40"):
        _emit(capsys, monkeypatch, "--emit", "k8s", "--nnodes", "5", "--nproc-per-node", "8")


# --------------------------------------------------------------------------- PyTorchJob


def _check_schema(value, schema: dict, path: str = "") -> list[str]:
    """A strict reading of a CRD's structural schema: types, int32/int64 ranges, required fields,
    and no field the schema does not name (kubectl --validate=strict)."""
    errors: list[str] = []
    if schema.get("x-kubernetes-int-or-string"):
        return [] if isinstance(value, (int, str)) and not isinstance(value, bool) else [f"{path}: int or string"]
    kind = schema.get("type")
    checks = {"object": dict, "array": list, "string": str, "boolean": bool}
    if kind == "integer":
        if not isinstance(value, int) or isinstance(value, bool):
            return [f"{path}: expected integer, got {value!r}"]
        bits = {"int32": 31, "int64": 63}.get(schema.get("format", ""), 63)
        if not -(2 ** bits) <= value < 2 ** bits:
            errors.append(f"{path}: {value} out of {schema['format']} range")
    elif kind in checks and not isinstance(value, checks[kind]):
        return [f"{path}: expected {kind}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} not in {schema['enum']}")
    if kind == "object":
        for name in schema.get("required", []):
            if name not in value:
                errors.append(f"{path}.{name}: required")
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return errors
        properties, extra = schema.get("properties"), schema.get("additionalProperties")
        for name, item in value.items():
            if properties is not None and name in properties:
                errors += _check_schema(item, properties[name], f"{path}.{name}")
            elif isinstance(extra, dict):
                errors += _check_schema(item, extra, f"{path}.{name}")
            elif properties is not None or extra is False:
                errors.append(f"{path}.{name}: unknown field")
    if kind == "array":
        for i, item in enumerate(value):
            errors += _check_schema(item, schema.get("items", {}), f"{path}[{i}]")
    return errors


def _crd_schema() -> dict:
    crd = yaml.safe_load(CRD.read_text())
    assert crd["spec"]["names"]["kind"] == "PyTorchJob"
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _operator_admission(job: dict) -> list[str]:
    """The training operator's webhook (v1.9.0 pkg/webhooks/pytorch/pytorchjob_webhook.go)."""
    errors, spec = [], job["spec"]
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", job["metadata"]["name"]):
        errors.append("metadata.name: not a DNS-1035 label")
    replicas = spec.get("pytorchReplicaSpecs") or {}
    if "elasticPolicy" in spec and "Worker" not in replicas:
        errors.append("Worker: must be configured if elastic policy is used")
    if spec.get("elasticPolicy", {}).get("nProcPerNode") is not None and spec.get("nprocPerNode") is not None:
        errors.append("elasticPolicy.nProcPerNode: must not be used with nprocPerNode")
    for role, replica in replicas.items():
        if role not in ("Master", "Worker"):
            errors.append(f"{role}: not a PyTorchJob role")
        containers = replica["template"]["spec"].get("containers") or []
        if not containers or any(not c.get("image") for c in containers):
            errors.append(f"{role}: containers with images required")
        if not any(c["name"] == "pytorch" for c in containers):
            errors.append(f"{role}: must have a container named pytorch")
        if role == "Master" and replica.get("replicas") != 1:
            errors.append("Master.replicas: must be 1")
        if replica.get("replicas", 1) < 1:
            errors.append(f"{role}.replicas: must be at least 1")
    return errors


def _operator_env(job: dict, role: str, index: int) -> dict[str, str]:
    """What the operator adds to a pod (v1.9.0 pkg/controller.v1/pytorch/envvar.go, elastic.go)."""
    spec = job["spec"]
    replicas = spec["pytorchReplicaSpecs"]
    nproc = int(spec.get("nprocPerNode") or 1)
    total = sum(r["replicas"] for r in replicas.values())
    container = replicas[role]["template"]["spec"]["containers"][0]
    port = next(p["containerPort"] for p in container["ports"] if p["name"] == "pytorchjob-port")
    env = {"PYTHONUNBUFFERED": "1", "PET_NPROC_PER_NODE": spec["nprocPerNode"]}
    name = job["metadata"]["name"]
    if "Master" in replicas:
        rank = index + (1 if role == "Worker" else 0)
        env.update(MASTER_ADDR=f"{name}-master-0", MASTER_PORT=str(port), WORLD_SIZE=str(total * nproc),
                   RANK=str(rank), PET_NODE_RANK=str(rank))
    policy = spec.get("elasticPolicy")
    if policy:
        env.update(PET_RDZV_BACKEND=policy["rdzvBackend"], PET_RDZV_ENDPOINT=f"{name}-worker-0:{policy['rdzvPort']}",
                   PET_RDZV_ID=name, PET_NNODES=f"{policy['minReplicas']}:{policy['maxReplicas']}")
    else:
        env["PET_NNODES"] = str(total)
    return env


@pytest.mark.parametrize("nnodes", ["4", "2:4"])
def test_pytorchjob_matches_the_training_operator_schema(capsys, monkeypatch, nnodes):
    job, = _emit(capsys, monkeypatch, "--emit", "pytorchjob", "--nnodes", nnodes, "--nproc-per-node", "8",
                 "--master-port", "23456", "--max-restarts", "3", "--image", "registry/ember:1")
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    assert _check_schema(job, _crd_schema()) == []
    assert _operator_admission(job) == []
    for role, replica in job["spec"]["pytorchReplicaSpecs"].items():
        assert _round_trip(replica["template"], "V1PodTemplateSpec") == replica["template"], role

    low, high = (int(n) for n in (nnodes.split(":") * 2)[:2])
    ranks = set()
    for role, replica in job["spec"]["pytorchReplicaSpecs"].items():
        for index in range(replica["replicas"]):
            plan = _plan_in_pod(monkeypatch, _operator_env(job, role, index))
            assert (plan.min_nnodes, plan.nnodes, plan.nproc_per_node) == (low, high, 8)
            if low == high:  # fixed size: ranks from the operator, node 0 the master pod
                assert plan.rdzv_backend == "static" and plan.master_addr == "ember-train-master-0"
                ranks.add(plan.node_rank)
            else:  # elastic: ranks assigned at the c10d rendezvous on worker 0
                assert plan.rdzv_backend == "c10d" and (plan.master_addr, plan.master_port) == (
                    "ember-train-worker-0", 23456)
                assert "--rdzv-backend=c10d" in plan.torchrun_flags()
    if low == high:
        assert ranks == set(range(high))


def test_the_schema_check_can_fail():
    """The strict reading catches what the API server or kubectl would refuse."""
    schema = _crd_schema()
    good = {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": "x"},
            "spec": {"pytorchReplicaSpecs": {"Master": {"replicas": 1, "template": {}}}}}
    assert _check_schema(good, schema) == []
    assert _check_schema({**good, "spec": {}}, schema) == [".spec.pytorchReplicaSpecs: required"]
    typo = {**good, "spec": {**good["spec"], "runPolicy": {"cleanPodPolicy": "None", "backofLimit": 3}}}
    assert _check_schema(typo, schema) == [".spec.runPolicy.backofLimit: unknown field"]
    wrong = {**good, "spec": {**good["spec"], "nprocPerNode": 8}}
    assert _check_schema(wrong, schema) == [".spec.nprocPerNode: expected string, got int"]
    assert _operator_admission({**good, "spec": {"pytorchReplicaSpecs": {"Launcher": {
        "replicas": 1, "template": {"spec": {"containers": [{"name": "pytorch", "image": "i"}]}}}}}}) == [
        "Launcher: not a PyTorchJob role"]
    with pytest.raises(ValueError, match="containers"):  # the client's models: required fields
        _round_trip({"spec": {}}, "V1PodTemplateSpec")
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
               "spec": {"clusterIP": "None", "publishNotReadyAdresses": True}}  # a typo: dropped on the way
    assert _round_trip(service, "V1Service") != service
