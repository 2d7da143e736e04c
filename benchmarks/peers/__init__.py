"""lmserve against peer servers (llama-server, llama-cpp-python's servers): see README.md here.

    .venv/bin/python -m benchmarks.peers.run_peers
    .venv/bin/python -m benchmarks.peers.paired
"""
