"""What the benchmark scripts share beyond `lmserve.bench`: server processes (procs), lmserve's
/metrics step timings (engine_metrics), backends taking turns (paired), lmserve/peer ratio
tables (compare), raw llama_decode timing (raw) and local clusters' counters (cluster)."""
