"""FusionSpec <-> the reranker.v1 `Fusion` message, shared by the gRPC servicer and the Python client."""

from __future__ import annotations

from typing import Any

from sidecar._proto.reranker.v1 import reranker_pb2 as pb
from sidecar.errors import InvalidInput
from sidecar.fusion import FusionMethod, FusionSpec, Normalization

_METHOD = {
    FusionMethod.NONE: pb.FUSION_METHOD_NONE,
    FusionMethod.BLEND: pb.FUSION_METHOD_BLEND,
    FusionMethod.RRF: pb.FUSION_METHOD_RRF,
    FusionMethod.ERANK_HYBRID: pb.FUSION_METHOD_ERANK_HYBRID,
}
_NORMALIZATION = {
    Normalization.MINMAX: pb.NORMALIZATION_MIN_MAX,
    Normalization.ZSCORE: pb.NORMALIZATION_Z_SCORE,
}
_METHOD_OF = {v: k for k, v in _METHOD.items()}
_NORMALIZATION_OF = {pb.NORMALIZATION_UNSPECIFIED: Normalization.MINMAX} | {
    v: k for k, v in _NORMALIZATION.items()
}


def fusion_to_proto(spec: FusionSpec) -> pb.Fusion:
    """Method always set; parameters only where the method uses them (as `FusionSpec.to_dict`)."""
    message = pb.Fusion(method=_METHOD[spec.method])
    if spec.method is FusionMethod.BLEND:
        message.alpha = spec.alpha
        message.normalization = _NORMALIZATION[spec.normalization]
    elif spec.method is FusionMethod.RRF:
        message.rrf_k = spec.rrf_k
    elif spec.method is FusionMethod.ERANK_HYBRID:
        message.alpha = spec.alpha
    return message


def fusion_from_proto(message: pb.Fusion) -> FusionSpec | None:
    """None for an unspecified method (the server's default); InvalidInput for what cannot apply."""
    if message.method == pb.FUSION_METHOD_UNSPECIFIED:
        if message.HasField("alpha") or message.HasField("rrf_k") or message.normalization:
            raise InvalidInput(
                "fusion parameters are set but fusion.method is unspecified: set the method (FUSION_METHOD_"
                "BLEND or FUSION_METHOD_RRF), or clear the parameters to use the server default"
            )
        return None
    method = _METHOD_OF.get(message.method)
    if method is None:
        raise InvalidInput(f"fusion.method {message.method} is unknown: use NONE, BLEND, RRF or ERANK_HYBRID")
    normalization = _NORMALIZATION_OF.get(message.normalization)
    if normalization is None:
        raise InvalidInput(f"fusion.normalization {message.normalization} is unknown: use MIN_MAX or Z_SCORE")
    params: dict[str, Any] = {}
    if message.HasField("alpha"):
        params["alpha"] = message.alpha
    if message.HasField("rrf_k"):
        params["rrf_k"] = message.rrf_k
    return FusionSpec(method, normalization=normalization, **params)
