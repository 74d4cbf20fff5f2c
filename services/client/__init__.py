"""meshserve's client: the Python SDK (sdk.py, re-exported here) and the `meshserve`
client commands (commands.py; their output in format.py).

    async with AsyncClient("127.0.0.1:8001") as client:
        result = await client.infer("digits", {"input": np.zeros((1, 64), np.float32)})
        result.outputs["predictions"]
"""

from meshserve.client.sdk import (
    AsyncClient,
    InferResponse,
    TaskResult,
    bearer_auth,
    infer_request,
    infer_result,
    task_result,
)

__all__ = ["AsyncClient", "InferResponse", "TaskResult", "bearer_auth", "infer_request",
           "infer_result", "task_result"]
