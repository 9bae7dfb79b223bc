"""``deepscan serve``: one loaded model, detector and worker pool behind a local socket.

    engine   the long-lived scan: a feed of every request's inputs into one Scanner run
             (clips of concurrent requests share model batches), records routed back
    app      the HTTP API (Starlette): /v1/health, /v1/info, /v1/scan, /v1/shutdown
    server   the doors (a Unix socket, 0600; optional TCP) under one uvicorn server; lifecycle
    client   what `deepscan scan --server` and `serve --status/--stop` speak (the standard
             library's http.client: no torch, nothing heavy, for a cold client start)

The API and its records: docs/service.md.
"""
