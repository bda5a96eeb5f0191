"""Elastic scaling: resize data/expert parallelism at run time (`POST /scale`), with no failed request.

    operation.py     the state machine (idle -> preparing -> committing -> idle, or -> rolling_back),
                     operation ids (idempotent retries, 409 on a different one), timings
    capacity.py      which sizes are possible (400 otherwise)
    orchestrator.py  the phases over the launcher: start ranks, prepare beside serving, commit, roll back;
                     a deadline on every phase
    service.py       how an API server reaches the orchestrator: in process (one API server) or over ZMQ to
                     the launcher's process (--api-server-count K)
    metrics.py       elastic:data_parallel_size, elastic:scale_operations_total, elastic:scale_duration_seconds

The engine's side (groups built in the background, the agreed commit step) is elastic/engine/scale_agent.py.
"""
