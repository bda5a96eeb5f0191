"""Fault recovery: a dead rank, coordinator or API server costs no request.

    supervisor.py  detection reported to one place (process exits, missed heartbeats, collectives that
                   failed or hung) and the recovery policy: abort the broken groups, shrink to the
                   survivors (elastic_ep's shrink_dead; a single engine: restart_dead), then, with
                   --restart-failed-ranks, grow back with a replacement rank (elastic_ep's scale); the DP
                   coordinator is restarted on its old addresses
    metrics.py     elastic:rank_failures_total, elastic:recoveries_total, elastic:recovery_seconds,
                   elastic:requests_rerun_total

The engine's side (leave a failed step, rebuild over the survivors, restore lost experts) is
elastic/engine/recovery.py; the front end's (re-run a dead rank's requests from what it streamed) is in
elastic/frontend/async_llm.py; a dead API server is restarted by elastic/entrypoints/multi_server.py.
See docs/reliability.md.
"""
