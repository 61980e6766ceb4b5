"""The official Kubernetes Python client against kpx-control, on the two things it broke on:
its watches send `watch=True` (kpx answered a list, so every watch was a tight LIST loop), and
its ReplicaSet model requires `status.replicas` (kpx created ReplicaSets with `status: {}`).

usage: watch_true_and_replicasets.py KUBECONFIG
Prints OK once a watch has delivered an event and ReplicaSets list."""

import sys

from kubernetes import client, config, watch


def main():
    (kubeconfig,) = sys.argv[1:2]
    config.load_kube_config(config_file=kubeconfig)
    v1 = client.CoreV1Api()
    apps = client.AppsV1Api()

    apps.create_namespaced_replica_set(
        "default",
        {
            "apiVersion": "apps/v1",
            "kind": "ReplicaSet",
            "metadata": {"name": "py-rs"},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": "py"}},
                "template": {
                    "metadata": {"labels": {"app": "py"}},
                    "spec": {"containers": [{"name": "c", "image": "nginx"}]},
                },
            },
        },
    )
    # The model refuses a ReplicaSet whose status has no replicas.
    listed = apps.list_namespaced_replica_set("default")
    assert [rs.metadata.name for rs in listed.items] == ["py-rs"], listed.items
    assert listed.items[0].status.replicas == 0, listed.items[0].status

    services = v1.list_namespaced_service("default")
    v1.create_namespaced_service(
        "default",
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "py-late"},
            "spec": {"ports": [{"port": 80}]},
        },
    )
    # From the list's resourceVersion the watch replays the create: one request, one event.
    w = watch.Watch()
    for event in w.stream(
        v1.list_namespaced_service,
        "default",
        resource_version=services.metadata.resource_version,
        timeout_seconds=30,
    ):
        if event["type"] == "ADDED" and event["object"].metadata.name == "py-late":
            w.stop()
            print("OK", flush=True)
            return 0
        print(f"unexpected {event['type']}", flush=True)
    print("the watch ended without the expected event", flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())
