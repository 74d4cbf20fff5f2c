"""Domain errors. Each maps to exactly one gRPC status code (grpcutil.status_of, by code_name).

Domain modules raise these; only the gRPC layer turns them into statuses.
"""


class MeshError(Exception):
    """Base of every error meshserve answers with a specific status."""

    code_name = "INTERNAL"


class InvalidInput(MeshError):
    code_name = "INVALID_ARGUMENT"


class NotFound(MeshError):
    code_name = "NOT_FOUND"


class Overloaded(MeshError):
    code_name = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(MeshError):
    code_name = "DEADLINE_EXCEEDED"


class Unavailable(MeshError):
    code_name = "UNAVAILABLE"


class Cancelled(MeshError):
    code_name = "CANCELLED"


class FailedPrecondition(MeshError):
    code_name = "FAILED_PRECONDITION"


class Internal(MeshError):
    code_name = "INTERNAL"


class Unauthenticated(MeshError):
    code_name = "UNAUTHENTICATED"


class PermissionDenied(MeshError):
    code_name = "PERMISSION_DENIED"


class ConfigError(MeshError, ValueError):
    """An invalid model config or setting; the message names the file and the field.
    Answered FAILED_PRECONDITION: the repository must be fixed before the call can work."""

    code_name = "FAILED_PRECONDITION"


ERRORS_BY_CODE_NAME = {
    cls.code_name: cls
    for cls in (
        InvalidInput,
        NotFound,
        Overloaded,
        DeadlineExceeded,
        Unavailable,
        Cancelled,
        FailedPrecondition,
        Internal,
        Unauthenticated,
        PermissionDenied,
    )
}
