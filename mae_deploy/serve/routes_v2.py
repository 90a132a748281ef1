"""KServe v2 / Open Inference Protocol routes: health, model metadata and inference on the bundle's graphs.

Models are the bundle's graphs by part name (``encoder``, ``decoder``); version "1". Inference accepts JSON
tensors and Triton's binary-tensor extension, so ``tritonclient.http`` works against this server unchanged.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from mae_deploy import __version__
from mae_deploy.serve.errors import ApiError
from mae_deploy.serve.protocol_v2 import HEADER_LENGTH, encode_infer_response, parse_infer_request
from mae_deploy.serve.service import ModelService

router = APIRouter(prefix="/v2", tags=["v2 (KServe / Open Inference Protocol)"])
VERSION = "1"
_INFER_BODY = {
    "requestBody": {
        "required": True,
        "description": "v2 inference request JSON; with the Inference-Header-Content-Length header, the JSON "
        "is followed by the binary tensors (binary_data_size in each input's parameters)",
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def _service(request: Request) -> ModelService:
    return request.app.state.service


def _check_version(version: str | None) -> None:
    if version is not None and version != VERSION:
        raise ApiError(404, "unknown_version", f"model version {version!r} does not exist; this server has {VERSION!r}")


@router.get("", summary="Server metadata")
async def server_metadata() -> dict:
    return {"name": "mae-deploy", "version": __version__, "extensions": ["binary_tensor_data"]}


@router.get("/health/live", summary="Liveness")
async def live() -> dict:
    return {"live": True}


@router.get("/health/ready", summary="Readiness (503 while loading or draining)")
async def ready(request: Request) -> dict:
    _service(request).check_ready()
    return {"ready": True}


@router.get("/models/{name}", summary="Model metadata")
@router.get("/models/{name}/versions/{version}", summary="Model metadata (one version)")
async def model_metadata(request: Request, name: str, version: str | None = None) -> dict:
    _check_version(version)
    return _service(request).graph_metadata(name)


@router.get("/models/{name}/ready", summary="Model readiness")
@router.get("/models/{name}/versions/{version}/ready", summary="Model readiness (one version)")
async def model_ready(request: Request, name: str, version: str | None = None) -> dict:
    _check_version(version)
    svc = _service(request)
    svc.graph_metadata(name)  # 404 for an unknown model
    svc.check_ready()
    return {"name": name, "ready": True}


@router.post("/models/{name}/infer", summary="Inference", openapi_extra=_INFER_BODY, response_class=Response)
@router.post(
    "/models/{name}/versions/{version}/infer",
    summary="Inference (one version)",
    openapi_extra=_INFER_BODY,
    response_class=Response,
)
async def infer(request: Request, name: str, version: str | None = None) -> Response:
    _check_version(version)
    svc = _service(request)
    svc.check_ready()
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding not in ("identity", ""):
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Content-Encoding {encoding} is not supported; send the request uncompressed",
        )
    body = await request.body()
    parsed = parse_infer_request(body, request.headers.get(HEADER_LENGTH))
    results = await svc.infer(name, parsed, svc.deadline(request.state.start))
    svc.metrics.images_done(f"/v2/models/{name}/infer", next(iter(parsed.inputs.values())).shape[0])
    payload, headers = encode_infer_response(name, VERSION, results, parsed)
    return Response(payload, headers=headers)
