"""Kubernetes manifests for `ember launch --emit k8s|pytorchjob`: one pod per node, each running
`ember launch` with the same training arguments, the rendezvous wired through the environment.

- `k8s`: a headless Service and an Indexed Job (plain Kubernetes >= 1.24). Pod i is node i
  (NODE_RANK from its completion index); node 0 is reachable as `<name>-0.<name>` through the
  Service, which publishes the pods before they are ready so that the rendezvous can start.
- `pytorchjob`: a Kubeflow training-operator PyTorchJob. The operator sets, on every pod, what
  PAI-DLC sets too: MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK, and torchrun's PET_NNODES,
  PET_NODE_RANK, PET_NPROC_PER_NODE, which `ember launch` reads when NNODES etc. are absent. With
  `--nnodes MIN:MAX` it gets an elasticPolicy (c10d rendezvous at worker 0).
"""

from __future__ import annotations

from ember.commands.launch_plan import TRAIN_MODULE

GPU_RESOURCE = "nvidia.com/gpu"
PYTORCHJOB_CONTAINER = "pytorch"  # the names the training operator looks for
PYTORCHJOB_PORT_NAME = "pytorchjob-port"


def _command(plan, extra: list[str] | None = None) -> list[str]:
    flags = [f"--max-restarts={plan.max_restarts}", f"--log-dir={plan.log_dir}"]
    if plan.timeout:
        flags.append(f"--timeout={plan.timeout}")
    if plan.module != TRAIN_MODULE:
        flags.append(f"--module={plan.module}")
    return ["ember", "launch", *flags, *(extra or []), "--", *plan.train_args]


def _resources(plan) -> dict:
    if plan.nproc_per_node < 1:
        return {}
    gpus = str(plan.nproc_per_node)
    return {"resources": {"limits": {GPU_RESOURCE: gpus}, "requests": {GPU_RESOURCE: gpus}}}


def _shared_memory() -> tuple[dict, dict]:
    """(volume, mount): the data loader's workers and NCCL need more /dev/shm than a pod's 64 MB."""
    return ({"name": "dshm", "emptyDir": {"medium": "Memory"}}, {"name": "dshm", "mountPath": "/dev/shm"})


def indexed_job(plan, image: str, name: str) -> list[dict]:
    """[headless Service, Indexed Job] for `plan.nnodes` nodes of `plan.nproc_per_node` devices."""
    labels = {"app.kubernetes.io/name": "ember", "app.kubernetes.io/instance": name}
    port = plan.master_port
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "labels": labels},
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                 "selector": {"batch.kubernetes.io/job-name": name},
                 "ports": [{"name": "rendezvous", "port": port, "targetPort": port, "protocol": "TCP"}]},
    }
    volume, mount = _shared_memory()
    env = [
        {"name": "NNODES", "value": plan.nnodes_spec},
        {"name": "NODE_RANK", "valueFrom": {"fieldRef": {
            "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
        {"name": "MASTER_ADDR", "value": f"{name}-0.{name}"},  # pod 0's hostname in the Service's domain
        {"name": "MASTER_PORT", "value": str(port)},
        {"name": "GPUS_PER_NODE", "value": str(plan.nproc_per_node)},
    ]
    container = {"name": "ember", "image": image, "command": _command(plan), "env": env,
                 "ports": [{"name": "rendezvous", "containerPort": port, "protocol": "TCP"}],
                 "volumeMounts": [mount], **_resources(plan)}
    job = {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "completionMode": "Indexed", "completions": plan.nnodes, "parallelism": plan.nnodes,
            # a failed rank restarts inside its pod (--max-restarts); a lost pod fails the Job, whose
            # resubmission resumes from the last checkpoint under --save
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": labels},
                "spec": {"subdomain": name, "restartPolicy": "Never", "containers": [container],
                         "volumes": [volume]},
            },
        },
    }
    return [service, job]


def pytorch_job(plan, image: str, name: str) -> list[dict]:
    """[PyTorchJob]: Master + (nnodes - 1) Workers, or, elastic, MIN..MAX Workers."""
    volume, mount = _shared_memory()
    elastic = plan.min_nnodes is not None and plan.min_nnodes != plan.nnodes
    container = {"name": PYTORCHJOB_CONTAINER, "image": image, "command": _command(plan),
                 "ports": [{"name": PYTORCHJOB_PORT_NAME, "containerPort": plan.master_port, "protocol": "TCP"}],
                 "volumeMounts": [mount], **_resources(plan)}

    def replicas(count: int) -> dict:
        return {"replicas": count, "restartPolicy": "OnFailure",
                "template": {"spec": {"containers": [container], "volumes": [volume]}}}

    spec: dict = {"nprocPerNode": str(plan.nproc_per_node)}
    if elastic:
        spec["elasticPolicy"] = {"rdzvBackend": "c10d", "rdzvPort": plan.master_port,
                                 "minReplicas": plan.min_nnodes, "maxReplicas": plan.nnodes,
                                 "maxRestarts": plan.max_restarts}
        spec["pytorchReplicaSpecs"] = {"Worker": replicas(plan.nnodes)}
    else:
        spec["pytorchReplicaSpecs"] = {"Master": replicas(1)}
        if plan.nnodes > 1:
            spec["pytorchReplicaSpecs"]["Worker"] = replicas(plan.nnodes - 1)
    spec["runPolicy"] = {"cleanPodPolicy": "None", "backoffLimit": max(plan.max_restarts, 0)}
    return [{"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
             "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "ember"}}, "spec": spec}]


def to_yaml(documents: list[dict]) -> str:
    import yaml

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data) -> bool:  # no &id001 anchors: each object written out in full
            return True

    header = "# generated by `ember launch --emit`; apply with: kubectl apply -f FILE\n"
    return header + yaml.dump_all(documents, Dumper=Dumper, sort_keys=False, default_flow_style=False, width=100)

