"""The official Kubernetes Python client against kpx-control: list, then watch from the list's
resourceVersion until a Service created by the test harness arrives.

usage: list_watch.py KUBECONFIG EXPECTED_EXISTING EXPECTED_NEW
Prints LISTED <rv> once the list is done, then EVENT <type> <name> per event."""

import sys

from kubernetes import client, config, watch


def main():
    kubeconfig, existing, expected = sys.argv[1:4]
    config.load_kube_config(config_file=kubeconfig)
    v1 = client.CoreV1Api()

    listed = v1.list_namespaced_service("default")
    names = [s.metadata.name for s in listed.items]
    assert existing in names, f"{existing} not in {names}"
    everywhere = v1.list_service_for_all_namespaces(label_selector="suite=python")
    assert [s.metadata.name for s in everywhere.items] == [existing], everywhere.items
    svc = v1.read_namespaced_service(existing, "default")
    assert svc.spec.cluster_ip and svc.spec.ports[0].port == 80, svc.spec
    print(f"LISTED {listed.metadata.resource_version}", flush=True)

    w = watch.Watch()
    for event in w.stream(
        v1.list_namespaced_service,
        "default",
        resource_version=listed.metadata.resource_version,
        timeout_seconds=30,
    ):
        name = event["object"].metadata.name
        print(f"EVENT {event['type']} {name}", flush=True)
        if name == expected and event["type"] == "ADDED":
            w.stop()
            return 0
    print("the watch ended without the expected event", flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())
