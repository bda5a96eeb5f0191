"""Autoscaling: `elastic autoscale` reads a server's /metrics and resizes it through POST /scale.

A client of the HTTP API only (it never imports engine, front-end or scaling code), so it runs as a sidecar,
a Deployment of its own or in a benchmark's process alike.

  signals.py     one scrape of /metrics + GET /scale + /health as a `Sample`; histogram quantiles; JSON traces
  policy.py      `decide(window, config)`: the pure scaling decision over a window of samples
  controller.py  the loop: scrape, decide, call /scale (idempotent retries, 409 waits, never two at once)
  config.py      the loop's settings (kept apart so building the CLI never imports httpx)
  cli.py         `elastic autoscale --url URL --min N --max M [--dry-run]`
"""
