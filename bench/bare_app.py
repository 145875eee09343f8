"""The baseline for the bench: Starlette on uvicorn that only parses the alert's JSON and answers."""

from __future__ import annotations

import argparse
import json

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


async def webhook(request: Request) -> JSONResponse:
    """Parse the body and answer in the shape fksroute answers with, doing nothing else."""
    alert = json.loads(await request.body())
    return JSONResponse({"success": True, "order_id": None, "error": None,
                         "alert_id": str(alert.get("id")), "duplicate": False, "results": []})


async def ready(request: Request) -> JSONResponse:
    """Answers 200 once the server is up, as fksroute's /-/ready does."""
    return JSONResponse({"ready": True})


app = Starlette(routes=[Route("/webhook/tradingview", webhook, methods=["POST"]), Route("/-/ready", ready)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
