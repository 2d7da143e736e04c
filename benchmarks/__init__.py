"""Research and peer benchmarks of lmserve: scripts run from the repository root as modules,

    .venv/bin/python -m benchmarks.run_server_bench     # also `make bench`
    .venv/bin/python -m benchmarks.peers.paired         # see benchmarks/peers/README.md

`benchmarks.harness` holds what only these scripts share (server processes, /metrics step
timings, paired rounds, peer ratio tables, raw decode timing); `lmserve.bench` is the load
generator behind `lmserve bench`, which they build on. Results go to benchmarks/results/.
"""
