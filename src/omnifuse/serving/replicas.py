"""Replicas of ``omnifuse serve`` on Ray Serve (the optional ``omnifuse[ray]`` extra).

The server keeps no state a request depends on apart from its caches, so replicas need nothing
shared: Ray Serve's proxy takes HTTP on one port and hands each request to a replica, and every
replica runs the same app ``create_app`` builds for a single server: its own engine thread, batch,
KV and encoder caches and metrics. Nothing heavy is pickled: each replica is given the model
options and the settings (plain values) and loads the model itself when Ray starts it, so a
checkpoint folder must exist at the same path on every node that runs a replica.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable

from omnifuse.config import ConfigError
from omnifuse.serving.app import ServeSettings

DEPLOYMENT = "omnifuse"


def _ray():
    try:
        import ray
        from ray import serve
    except ImportError:
        raise ConfigError("--ray needs Ray Serve: pip install 'omnifuse[ray]'") from None
    return ray, serve


def replica_builder(model_options: dict, settings: ServeSettings, threads: int | None) -> Callable:
    """The function a replica calls at start-up for its ASGI app (it loads the model there)."""

    def build():
        import torch

        from omnifuse.pipeline import load_pipeline
        from omnifuse.serving.app import create_app
        from omnifuse.serving.engine import on_fresh_thread

        if threads:
            torch.set_num_threads(threads)
        sys.setswitchinterval(0.0002)  # as cmd_serve: the engine thread and the event loop share the GIL
        return create_app(on_fresh_thread(load_pipeline, **model_options), settings)

    return build


def deployment(model_options: dict, settings: ServeSettings, *, replicas: int, cpus: float, gpus: float):
    """The Ray Serve application: ``replicas`` copies of the server, ``cpus`` / ``gpus`` each."""
    _, serve = _ray()
    ingress = serve.ingress(replica_builder(model_options, settings, max(1, int(cpus))))()
    return serve.deployment(
        ingress, name=DEPLOYMENT, num_replicas=replicas,
        # A replica queues requests itself (429 beyond --max-queue): Ray only has to let them through.
        max_ongoing_requests=settings.max_batch + settings.max_queue + 1,
        ray_actor_options={"num_cpus": cpus, "num_gpus": gpus},
    ).bind()


def start(model_options: dict, settings: ServeSettings, *, replicas: int, host: str, port: int,
          address: str | None = None, cpus: float | None = None) -> None:
    """Start Ray (a local instance, or join the cluster at ``address``) and run the replicas; returns
    once every replica answers. ``cpus`` per replica: by default this machine's cores shared out."""
    if replicas < 1:
        raise ConfigError(f"--replicas must be >= 1, got {replicas}")
    ray, serve = _ray()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report over the network
    if cpus is None:
        cpus = max(1, (os.cpu_count() or 1) // replicas)
    gpus = 1 if model_options.get("device") == "cuda" else 0
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=max(cpus * replicas, os.cpu_count() or 1), include_dashboard=False,
                     log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    try:
        serve.run(deployment(model_options, settings, replicas=replicas, cpus=cpus, gpus=gpus),
                  name=DEPLOYMENT, route_prefix="/", blocking=False)
    except Exception as exc:  # a replica failed to start: say why, leave no Ray behind
        stop()
        raise ConfigError(f"Ray Serve could not start the replicas: {exc}") from exc


def stop() -> None:
    ray, serve = _ray()
    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()


def run(model_options: dict, settings: ServeSettings, *, replicas: int, host: str, port: int,
        address: str | None = None, cpus: float | None = None) -> int:
    """``omnifuse serve --ray``: start the replicas, serve until Ctrl-C or SIGTERM, then stop them."""
    start(model_options, settings, replicas=replicas, host=host, port=port, address=address, cpus=cpus)
    print(f"omnifuse serve: {replicas} replica(s) of {settings.model_name} on Ray Serve at "
          f"http://{host}:{port}/v1", file=sys.stderr)

    def _terminate(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        stop()
    return 0
