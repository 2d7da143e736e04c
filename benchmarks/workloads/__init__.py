"""Issue 19's workloads: lmserve against llama-server where serving decides."""
