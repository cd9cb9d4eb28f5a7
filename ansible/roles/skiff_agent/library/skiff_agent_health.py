#!/usr/bin/python
"""Ansible module: wait until a skiffd answers the gRPC health check (grpc.health.v1)."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: skiff_agent_health
short_description: Wait until skiffd answers gRPC health
description:
  - Asks skiffd's C(grpc.health.v1.Health/Check) until it answers SERVING or the timeout passes.
  - Over TCP it uses mutual TLS with a client certificate from the fleet CA, verifying the agent's
    certificate against the CA for the address it dials; over a unix socket it needs no certificate.
  - Needs grpcio and grpcio-health-checking in the Python it runs with.
options:
  address:
    description: C(HOST:PORT) (mutual TLS) or C(unix:///path/to/skiffd.sock).
    type: str
    required: true
  cacert:
    description: The fleet CA's certificate (TCP).
    type: path
  cert:
    description: The client certificate (TCP).
    type: path
  key:
    description: The client certificate's key (TCP).
    type: path
  timeout:
    description: Seconds to keep asking.
    type: float
    default: 60
author: skiff
"""

EXAMPLES = r"""
- name: Wait for the agent
  skiff_agent_health:
    address: "10.0.0.5:2376"
    cacert: ~/.skiff/ca/ca.pem
    cert: ~/.skiff/ca/clients/ansible/cert.pem
    key: ~/.skiff/ca/clients/ansible/key.pem
  delegate_to: localhost
"""

RETURN = r"""
status:
  description: The health status the agent answered.
  type: str
  returned: success
  sample: SERVING
elapsed:
  description: Seconds until it answered.
  type: float
  returned: success
"""

import time

from ansible.module_utils.basic import AnsibleModule


def _read(module: AnsibleModule, name: str) -> bytes:
    path = module.params[name]
    if not path:
        module.fail_json(msg=f"{module.params['address']}: {name} is required for a TCP address (mutual TLS)")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        module.fail_json(msg=f"cannot read {name} {path}: {exc.strerror}")
    raise AssertionError("unreachable")


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            address=dict(type="str", required=True),
            cacert=dict(type="path"),
            cert=dict(type="path"),
            key=dict(type="path", no_log=False),
            timeout=dict(type="float", default=60.0),
        ),
        supports_check_mode=True,
    )
    address = module.params["address"]
    try:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc
    except ImportError as exc:
        module.fail_json(msg=f"skiff_agent_health needs grpcio and grpcio-health-checking in this Python: {exc}")

    if address.startswith("unix://"):
        def channel() -> grpc.Channel:
            return grpc.insecure_channel(address)
    else:
        creds = grpc.ssl_channel_credentials(_read(module, "cacert"), _read(module, "key"), _read(module, "cert"))

        def channel() -> grpc.Channel:
            return grpc.secure_channel(address, creds)

    began = time.monotonic()
    deadline = began + module.params["timeout"]
    last = "no answer yet"
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            module.fail_json(msg=f"skiffd at {address} did not answer gRPC health within "
                                 f"{module.params['timeout']:g}s: {last}")
        with channel() as ch:
            try:
                answer = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""),
                                                             timeout=min(5.0, max(remaining, 0.1)))
            except grpc.RpcError as exc:
                last = f"{exc.code().name}: {exc.details()}"
                if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    module.fail_json(msg=f"skiffd at {address} refused the client certificate: {last}")
            else:
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    module.exit_json(changed=False, status=status, elapsed=round(time.monotonic() - began, 3))
                last = f"status {status}"
        time.sleep(0.3)


if __name__ == "__main__":
    main()
