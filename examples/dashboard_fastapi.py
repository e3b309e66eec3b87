"""The astages dashboard mounted in a FastAPI app, its Redis pool made and closed by the
app's lifespan:

    pip install -e '.[web]' fastapi uvicorn
    REDIS_URL=redis://127.0.0.1:6379/0 uvicorn examples.dashboard_fastapi:app   # http://127.0.0.1:8000/stages/
"""

import os
from contextlib import asynccontextmanager

from arq.connections import RedisSettings, create_pool
from fastapi import FastAPI

from astages.web import create_app

REDIS = RedisSettings.from_dsn(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))


@asynccontextmanager
async def lifespan(app: FastAPI):
    redis = await create_pool(REDIS)
    # login=(user, password) for anything beyond your own machine; see the README
    app.mount("/stages", create_app(redis, prefix="astages"))
    yield
    await redis.aclose()


app = FastAPI(lifespan=lifespan)


@app.get("/")
async def home() -> dict[str, str]:
    return {"dashboard": "/stages/"}
