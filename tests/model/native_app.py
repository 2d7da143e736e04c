"""An App built in code for the app-API tests (served with `lmserve run`)."""

from lmserve import App, LLMResource
from lmserve.models.resolve import resolve
from lmserve.service import EngineSettings

MODEL = resolve("smollm2").path

app = App(store="memory", settings=EngineSettings(parallel=2, n_ctx=4096, threads=2))

app.models.add_model(path="/llm/", model=MODEL, name="assistant",
                     params={"temperature": 0, "max_tokens": 5})


@app.models.model_resource("/beat/")
class Beat(LLMResource):
    name = "beat"
    verbose_name = "Heartbeat probe"
    model_path = MODEL
    serving = ("native", "anthropic")
    heartbeat_interval = 0.2
