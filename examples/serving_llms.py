"""Serve one model over the native and OpenAI dialects, with generation defaults.

    lmserve run examples.serving_llms:app            (or: python examples/serving_llms.py)

LMSERVE_EXAMPLE_MODEL picks the GGUF (a path, or a bundled name such as smollm2).
"""

import os

import lmserve
from lmserve import App

app = App(
    openapi={
        "info": {
            "title": "Generative AI API",
            "version": "1.0.0",
            "description": "Serving large language models with lmserve",
        },
    },
    docs="/docs/",
    store=os.environ.get("LMSERVE_STORE"),
)

app.models.add_model(
    path="/llm/",
    model=os.environ.get("LMSERVE_EXAMPLE_MODEL", "smollm2"),
    name="assistant",
    serving=("native", "openai"),
    params={"temperature": 0.7, "max_tokens": 512},
)

if __name__ == "__main__":
    lmserve.run(app, host="0.0.0.0", port=8000)
