"""``hybridtune ui``: a FastAPI app serving one static page (and its script) and a small JSON API over ``Workdir``."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from .backend import UIError, Workdir, inspect_model, method_catalog

STATIC = Path(__file__).parent / "static"


class ChatRequest(BaseModel):
    prompt: str = Field(min_length=1, max_length=4000)
    runs: list[str] = []
    max_new_tokens: int = Field(32, ge=1, le=256)


class ChatService:
    """One base model per model source, every chosen run's adapters loaded as a set on it."""

    def __init__(self, workdir: Workdir) -> None:
        self.workdir = workdir
        self.lock = threading.Lock()
        self.models: dict[str, tuple[Any, Any, dict[str, tuple[str, float]]]] = {}

    def answer(self, request: ChatRequest) -> dict[str, str]:
        from ..core import adapter_io as checkpoint
        from ..core.base_models import load_base
        from ..core.model import HybridModel, add_saved_set
        from ..training.data import render_prompt, saved_template
        from ..training.evaluation import generate_batch

        directories = {}
        for name in request.runs:
            adapters = self.workdir.run_dir(name) / "adapters"
            if not (adapters / checkpoint.CONFIG_NAME).is_file():
                raise UIError(f"run '{name}' has no final adapters yet")
            directories[name] = adapters
        source = self._base_of(directories)
        with self.lock:  # one generation at a time: the sets live on one shared model
            if source not in self.models:
                base, tokenizer = load_base(source)
                self.models[source] = (base.eval(), tokenizer, {})
            model, tokenizer, loaded = self.models[source]
            for name, directory in directories.items():
                stamp = (directory / checkpoint.WEIGHTS_NAME).stat().st_mtime
                if name in loaded and loaded[name][1] == stamp:
                    continue
                if name in loaded:
                    model.delete_set(loaded.pop(name)[0])
                internal = f"run{len(loaded)}_{abs(hash((name, stamp))) % 10**8}"
                model = add_saved_set(model, internal, directory)
                self.models[source] = (model, tokenizer, loaded)
                loaded[name] = (internal, stamp)
            messages = [{"role": "user", "content": request.prompt}]
            prompts = [render_prompt(tokenizer, messages)]  # the base, then each run in its trained template
            prompts += [
                render_prompt(tokenizer, messages, template=saved_template(directories[n])) for n in request.runs
            ]
            rows = [None, *(loaded[n][0] for n in request.runs)]
            route = {"adapter_sets": rows} if isinstance(model, HybridModel) else {}
            texts = generate_batch(model, tokenizer, prompts, request.max_new_tokens, **route)
        return dict(zip(["base", *request.runs], texts, strict=True))

    def _base_of(self, directories: dict[str, Path]) -> str:
        from ..core import adapter_io as checkpoint

        sources = {checkpoint.read_meta(d)["base_model"].get("name_or_path") for d in directories.values()}
        if len(sources) > 1:
            raise UIError(f"the chosen runs were trained on different base models: {sorted(sources)}")
        source = sources.pop() if sources else self.workdir.models()[0]
        if (self.workdir.root / source).is_dir():  # runs record the model as the config named it
            return str(self.workdir.path(source))
        return source


def create_app(workdir: str | Path) -> FastAPI:
    work = Workdir(workdir)
    chat = ChatService(work)
    app = FastAPI(title="hybridtune ui", docs_url=None, redoc_url=None)

    def guarded(fn, *args):
        try:
            return fn(*args)
        except UIError as exc:
            raise HTTPException(400, str(exc)) from None

    @app.get("/")
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")  # methods.js: the generated method forms

    @app.get("/api/options")
    def options() -> dict[str, Any]:
        return {"models": work.models(), "data_files": work.data_files(), "workdir": str(work.root)}

    @app.get("/api/methods")
    def methods() -> dict[str, Any]:
        return method_catalog()

    @app.get("/api/modules")
    def modules(model: str) -> dict[str, Any]:
        try:
            return inspect_model(work.model_source(model))
        except UIError as exc:
            raise HTTPException(400, str(exc)) from None
        except Exception as exc:
            raise HTTPException(400, f"cannot read model '{model}': {exc}") from None

    @app.post("/api/check")
    def check(raw: dict[str, Any]) -> dict[str, Any]:
        return work.check(raw)

    @app.post("/api/runs")
    def start(raw: dict[str, Any]) -> dict[str, Any]:
        return guarded(work.start, raw)

    @app.get("/api/runs")
    def runs() -> list[dict[str, Any]]:
        return work.runs()

    @app.get("/api/runs/{name}")
    def run(name: str) -> dict[str, Any]:
        return guarded(work.run, name)

    @app.post("/api/runs/{name}/stop")
    def stop(name: str) -> dict[str, Any]:
        return guarded(work.stop, name)

    @app.post("/api/runs/{name}/resume")
    def resume(name: str) -> dict[str, Any]:
        return guarded(work.resume, name)

    @app.post("/api/runs/{name}/export/{fmt}")
    def export(name: str, fmt: str) -> dict[str, Any]:
        return guarded(work.export, name, fmt)

    @app.post("/api/chat")
    def answer(request: ChatRequest) -> dict[str, str]:
        return guarded(chat.answer, request)

    app.state.workdir = work
    return app
