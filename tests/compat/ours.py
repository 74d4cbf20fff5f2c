"""Builds v2 messages with meshserve's generated classes (run as its own process: our
`inference` protos and tritonclient's cannot share one descriptor pool).

    python ours.py emit          prints {message name: base64 bytes}
    python ours.py check < json  parses {name: base64} with our classes and compares each
                                 with the message `emit` builds; prints "ok" or the diff
"""

import base64
import json
import sys

from meshserve.common.repository import ModelRepository
from meshserve.gateway import convert
from meshserve.pb.inference import grpc_service_pb2 as pb
from meshserve.pb.meshserve.v1 import batcher_pb2


def messages(models_dir: str) -> dict:
    config = ModelRepository(models_dir).config("digits")
    req = pb.ModelInferRequest(model_name="digits", model_version="2", id="req-1")
    req.inputs.add(name="input", datatype="FP32", shape=[2, 64])
    req.raw_input_contents.append(bytes(range(256)) * 2)
    req.outputs.add(name="probabilities").parameters["binary_data"].bool_param = True
    req.parameters["priority"].int64_param = 1
    req.parameters["timeout"].int64_param = 5000
    req.parameters["note"].string_param = "x"
    req.parameters["ratio"].double_param = 0.5
    req.parameters["big"].uint64_param = 2**63
    resp = pb.ModelInferResponse(model_name="digits", model_version="2", id="req-1")
    resp.outputs.add(name="predictions", datatype="INT64", shape=[2])
    resp.raw_output_contents.append((3).to_bytes(8, "little") + (8).to_bytes(8, "little"))
    resp.parameters["cache_hit"].bool_param = True
    stats = batcher_pb2.ModelStats(
        model="digits", version="2", last_inference_ms=1_700_000_000_000, inference_count=40,
        execution_count=3, success=batcher_pb2.Duration(count=10, ns=5000),
        queue=batcher_pb2.Duration(count=10, ns=700),
        compute_infer=batcher_pb2.Duration(count=3, ns=900),
        batch_stats=[batcher_pb2.BatchSizeStats(
            batch_size=16, compute_infer=batcher_pb2.Duration(count=2, ns=600))],
    )
    index = pb.RepositoryIndexResponse(models=[
        pb.RepositoryIndexResponse.ModelIndex(name="digits", version="1", state="READY"),
        pb.RepositoryIndexResponse.ModelIndex(
            name="digits", version="2", state="UNAVAILABLE", reason="unloaded"),
    ])
    return {
        "ModelInferRequest": req,
        "ModelInferResponse": resp,
        "ModelStreamInferResponse": pb.ModelStreamInferResponse(
            error_message="boom", infer_response=resp),
        "ModelMetadataResponse": convert.model_metadata(config, ["1", "2"]),
        "ModelConfigResponse": pb.ModelConfigResponse(config=convert.model_config(config)),
        "ModelStatisticsResponse": pb.ModelStatisticsResponse(
            model_stats=[convert.model_statistics(stats, (5, 7, 300), (4, 200))]),
        "RepositoryIndexResponse": index,
    }


def main() -> None:
    mode, models_dir = sys.argv[1], sys.argv[2]
    built = messages(models_dir)
    if mode == "emit":
        print(json.dumps({k: base64.b64encode(m.SerializeToString()).decode()
                          for k, m in built.items()}))
        return
    received = json.loads(sys.stdin.read())
    bad = []
    for name, data in received.items():
        parsed = type(built[name]).FromString(base64.b64decode(data))
        if parsed != built[name]:
            bad.append(f"{name}:\n{parsed}\n!=\n{built[name]}")
    print("ok" if not bad and set(received) == set(built) else "\n".join(bad) or "missing")


if __name__ == "__main__":
    main()
