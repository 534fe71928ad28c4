from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTCOME_UNSPECIFIED: _ClassVar[Outcome]
    OK: _ClassVar[Outcome]
    RATE_LIMITED: _ClassVar[Outcome]
    OVERLOADED: _ClassVar[Outcome]
    ERROR: _ClassVar[Outcome]
    CANCELLED: _ClassVar[Outcome]

class ReservationState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESERVATION_STATE_UNSPECIFIED: _ClassVar[ReservationState]
    OPEN: _ClassVar[ReservationState]
    REPORTED: _ClassVar[ReservationState]
    RELEASED: _ClassVar[ReservationState]
    EXPIRED: _ClassVar[ReservationState]
OUTCOME_UNSPECIFIED: Outcome
OK: Outcome
RATE_LIMITED: Outcome
OVERLOADED: Outcome
ERROR: Outcome
CANCELLED: Outcome
RESERVATION_STATE_UNSPECIFIED: ReservationState
OPEN: ReservationState
REPORTED: ReservationState
RELEASED: ReservationState
EXPIRED: ReservationState

class AcquireRequest(_message.Message):
    __slots__ = ("scope", "model", "user", "input_tokens", "max_output_tokens", "max_wait_ms", "lease_ms", "request_id", "marks_sent")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MARKS_SENT_FIELD_NUMBER: _ClassVar[int]
    scope: str
    model: str
    user: str
    input_tokens: int
    max_output_tokens: int
    max_wait_ms: int
    lease_ms: int
    request_id: str
    marks_sent: bool
    def __init__(self, scope: _Optional[str] = ..., model: _Optional[str] = ..., user: _Optional[str] = ..., input_tokens: _Optional[int] = ..., max_output_tokens: _Optional[int] = ..., max_wait_ms: _Optional[int] = ..., lease_ms: _Optional[int] = ..., request_id: _Optional[str] = ..., marks_sent: _Optional[bool] = ...) -> None: ...

class AcquireResponse(_message.Message):
    __slots__ = ("reservation_id", "lease_expires_at_ms", "waited_ms", "reserved_requests", "reserved_input_tokens", "reserved_output_tokens", "granted_at_ms", "replayed", "model_overloaded", "overloaded_until_ms", "mark_sent_wanted")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    WAITED_MS_FIELD_NUMBER: _ClassVar[int]
    RESERVED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    RESERVED_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RESERVED_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GRANTED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    MODEL_OVERLOADED_FIELD_NUMBER: _ClassVar[int]
    OVERLOADED_UNTIL_MS_FIELD_NUMBER: _ClassVar[int]
    MARK_SENT_WANTED_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    lease_expires_at_ms: int
    waited_ms: int
    reserved_requests: int
    reserved_input_tokens: int
    reserved_output_tokens: int
    granted_at_ms: int
    replayed: bool
    model_overloaded: bool
    overloaded_until_ms: int
    mark_sent_wanted: bool
    def __init__(self, reservation_id: _Optional[str] = ..., lease_expires_at_ms: _Optional[int] = ..., waited_ms: _Optional[int] = ..., reserved_requests: _Optional[int] = ..., reserved_input_tokens: _Optional[int] = ..., reserved_output_tokens: _Optional[int] = ..., granted_at_ms: _Optional[int] = ..., replayed: _Optional[bool] = ..., model_overloaded: _Optional[bool] = ..., overloaded_until_ms: _Optional[int] = ..., mark_sent_wanted: _Optional[bool] = ...) -> None: ...

class AcquireEvent(_message.Message):
    __slots__ = ("queued", "granted")
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    queued: Queued
    granted: AcquireResponse
    def __init__(self, queued: _Optional[_Union[Queued, _Mapping]] = ..., granted: _Optional[_Union[AcquireResponse, _Mapping]] = ...) -> None: ...

class Queued(_message.Message):
    __slots__ = ("position", "estimated_wait_ms", "queue_depth", "waited_ms", "model_overloaded")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    WAITED_MS_FIELD_NUMBER: _ClassVar[int]
    MODEL_OVERLOADED_FIELD_NUMBER: _ClassVar[int]
    position: int
    estimated_wait_ms: int
    queue_depth: int
    waited_ms: int
    model_overloaded: bool
    def __init__(self, position: _Optional[int] = ..., estimated_wait_ms: _Optional[int] = ..., queue_depth: _Optional[int] = ..., waited_ms: _Optional[int] = ..., model_overloaded: _Optional[bool] = ...) -> None: ...

class ProviderInfo(_message.Message):
    __slots__ = ("http_status", "error_type", "error_code", "request_id", "headers", "fell_back")
    class HeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    HTTP_STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_TYPE_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    FELL_BACK_FIELD_NUMBER: _ClassVar[int]
    http_status: int
    error_type: str
    error_code: str
    request_id: str
    headers: _containers.ScalarMap[str, str]
    fell_back: bool
    def __init__(self, http_status: _Optional[int] = ..., error_type: _Optional[str] = ..., error_code: _Optional[str] = ..., request_id: _Optional[str] = ..., headers: _Optional[_Mapping[str, str]] = ..., fell_back: _Optional[bool] = ...) -> None: ...

class ReportRequest(_message.Message):
    __slots__ = ("reservation_id", "actual_input_tokens", "actual_output_tokens", "outcome", "retry_after_ms", "provider")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    ACTUAL_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ACTUAL_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    actual_input_tokens: int
    actual_output_tokens: int
    outcome: Outcome
    retry_after_ms: int
    provider: ProviderInfo
    def __init__(self, reservation_id: _Optional[str] = ..., actual_input_tokens: _Optional[int] = ..., actual_output_tokens: _Optional[int] = ..., outcome: _Optional[_Union[Outcome, str]] = ..., retry_after_ms: _Optional[int] = ..., provider: _Optional[_Union[ProviderInfo, _Mapping]] = ...) -> None: ...

class Settlement(_message.Message):
    __slots__ = ("reservation_id", "state", "settled_at_ms", "refunded_requests", "refunded_input_tokens", "refunded_output_tokens", "overrun_input_tokens", "overrun_output_tokens")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SETTLED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    REFUNDED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    REFUNDED_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REFUNDED_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OVERRUN_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OVERRUN_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    state: ReservationState
    settled_at_ms: int
    refunded_requests: int
    refunded_input_tokens: int
    refunded_output_tokens: int
    overrun_input_tokens: int
    overrun_output_tokens: int
    def __init__(self, reservation_id: _Optional[str] = ..., state: _Optional[_Union[ReservationState, str]] = ..., settled_at_ms: _Optional[int] = ..., refunded_requests: _Optional[int] = ..., refunded_input_tokens: _Optional[int] = ..., refunded_output_tokens: _Optional[int] = ..., overrun_input_tokens: _Optional[int] = ..., overrun_output_tokens: _Optional[int] = ...) -> None: ...

class ReportResponse(_message.Message):
    __slots__ = ("settlement", "replayed")
    SETTLEMENT_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    settlement: Settlement
    replayed: bool
    def __init__(self, settlement: _Optional[_Union[Settlement, _Mapping]] = ..., replayed: _Optional[bool] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("reservation_id",)
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    def __init__(self, reservation_id: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("settlement", "replayed")
    SETTLEMENT_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    settlement: Settlement
    replayed: bool
    def __init__(self, settlement: _Optional[_Union[Settlement, _Mapping]] = ..., replayed: _Optional[bool] = ...) -> None: ...

class KeepAliveRequest(_message.Message):
    __slots__ = ("reservation_id", "lease_ms")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    lease_ms: int
    def __init__(self, reservation_id: _Optional[str] = ..., lease_ms: _Optional[int] = ...) -> None: ...

class MarkSentRequest(_message.Message):
    __slots__ = ("reservation_id",)
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    def __init__(self, reservation_id: _Optional[str] = ...) -> None: ...

class MarkSentResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class KeepAliveResponse(_message.Message):
    __slots__ = ("reservation_id", "lease_expires_at_ms")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    lease_expires_at_ms: int
    def __init__(self, reservation_id: _Optional[str] = ..., lease_expires_at_ms: _Optional[int] = ...) -> None: ...

class ListLeasesRequest(_message.Message):
    __slots__ = ("scope", "model", "page_size", "page_token")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    scope: str
    model: str
    page_size: int
    page_token: str
    def __init__(self, scope: _Optional[str] = ..., model: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class Lease(_message.Message):
    __slots__ = ("reservation_id", "scope", "scope_alias", "model", "user", "request_id", "granted_at_ms", "lease_expires_at_ms", "reserved_requests", "reserved_input_tokens", "reserved_output_tokens")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    SCOPE_ALIAS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    GRANTED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    RESERVED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    RESERVED_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RESERVED_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    scope: str
    scope_alias: str
    model: str
    user: str
    request_id: str
    granted_at_ms: int
    lease_expires_at_ms: int
    reserved_requests: int
    reserved_input_tokens: int
    reserved_output_tokens: int
    def __init__(self, reservation_id: _Optional[str] = ..., scope: _Optional[str] = ..., scope_alias: _Optional[str] = ..., model: _Optional[str] = ..., user: _Optional[str] = ..., request_id: _Optional[str] = ..., granted_at_ms: _Optional[int] = ..., lease_expires_at_ms: _Optional[int] = ..., reserved_requests: _Optional[int] = ..., reserved_input_tokens: _Optional[int] = ..., reserved_output_tokens: _Optional[int] = ...) -> None: ...

class ListLeasesResponse(_message.Message):
    __slots__ = ("leases", "next_page_token")
    LEASES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    leases: _containers.RepeatedCompositeFieldContainer[Lease]
    next_page_token: str
    def __init__(self, leases: _Optional[_Iterable[_Union[Lease, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetBucketsRequest(_message.Message):
    __slots__ = ("scope", "model", "page_size", "page_token")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    scope: str
    model: str
    page_size: int
    page_token: str
    def __init__(self, scope: _Optional[str] = ..., model: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class Dimension(_message.Message):
    __slots__ = ("name", "level", "capacity", "refill_per_s", "learned")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    REFILL_PER_S_FIELD_NUMBER: _ClassVar[int]
    LEARNED_FIELD_NUMBER: _ClassVar[int]
    name: str
    level: float
    capacity: int
    refill_per_s: float
    learned: bool
    def __init__(self, name: _Optional[str] = ..., level: _Optional[float] = ..., capacity: _Optional[int] = ..., refill_per_s: _Optional[float] = ..., learned: _Optional[bool] = ...) -> None: ...

class Bucket(_message.Message):
    __slots__ = ("scope", "scope_alias", "model", "user", "dimensions", "queue_depth", "paused_until_ms", "open_reservations", "overloaded_until_ms")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    SCOPE_ALIAS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    PAUSED_UNTIL_MS_FIELD_NUMBER: _ClassVar[int]
    OPEN_RESERVATIONS_FIELD_NUMBER: _ClassVar[int]
    OVERLOADED_UNTIL_MS_FIELD_NUMBER: _ClassVar[int]
    scope: str
    scope_alias: str
    model: str
    user: str
    dimensions: _containers.RepeatedCompositeFieldContainer[Dimension]
    queue_depth: int
    paused_until_ms: int
    open_reservations: int
    overloaded_until_ms: int
    def __init__(self, scope: _Optional[str] = ..., scope_alias: _Optional[str] = ..., model: _Optional[str] = ..., user: _Optional[str] = ..., dimensions: _Optional[_Iterable[_Union[Dimension, _Mapping]]] = ..., queue_depth: _Optional[int] = ..., paused_until_ms: _Optional[int] = ..., open_reservations: _Optional[int] = ..., overloaded_until_ms: _Optional[int] = ...) -> None: ...

class GetBucketsResponse(_message.Message):
    __slots__ = ("buckets", "now_ms", "next_page_token")
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    NOW_MS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    buckets: _containers.RepeatedCompositeFieldContainer[Bucket]
    now_ms: int
    next_page_token: str
    def __init__(self, buckets: _Optional[_Iterable[_Union[Bucket, _Mapping]]] = ..., now_ms: _Optional[int] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ResetBucketRequest(_message.Message):
    __slots__ = ("scope", "model", "user")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    scope: str
    model: str
    user: str
    def __init__(self, scope: _Optional[str] = ..., model: _Optional[str] = ..., user: _Optional[str] = ...) -> None: ...

class ResetBucketResponse(_message.Message):
    __slots__ = ("buckets",)
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    buckets: _containers.RepeatedCompositeFieldContainer[Bucket]
    def __init__(self, buckets: _Optional[_Iterable[_Union[Bucket, _Mapping]]] = ...) -> None: ...

class ReloadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReloadResponse(_message.Message):
    __slots__ = ("ok", "message", "source")
    OK_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    message: str
    source: str
    def __init__(self, ok: _Optional[bool] = ..., message: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class ListErrorsRequest(_message.Message):
    __slots__ = ("model", "http_status", "since_ms", "limit")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    HTTP_STATUS_FIELD_NUMBER: _ClassVar[int]
    SINCE_MS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    model: str
    http_status: int
    since_ms: int
    limit: int
    def __init__(self, model: _Optional[str] = ..., http_status: _Optional[int] = ..., since_ms: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class ProviderErrorEntry(_message.Message):
    __slots__ = ("at_ms", "scope_alias", "model", "outcome", "http_status", "error_type", "error_code", "provider_request_id", "fell_back")
    AT_MS_FIELD_NUMBER: _ClassVar[int]
    SCOPE_ALIAS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    HTTP_STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_TYPE_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FELL_BACK_FIELD_NUMBER: _ClassVar[int]
    at_ms: int
    scope_alias: str
    model: str
    outcome: Outcome
    http_status: int
    error_type: str
    error_code: str
    provider_request_id: str
    fell_back: bool
    def __init__(self, at_ms: _Optional[int] = ..., scope_alias: _Optional[str] = ..., model: _Optional[str] = ..., outcome: _Optional[_Union[Outcome, str]] = ..., http_status: _Optional[int] = ..., error_type: _Optional[str] = ..., error_code: _Optional[str] = ..., provider_request_id: _Optional[str] = ..., fell_back: _Optional[bool] = ...) -> None: ...

class ListErrorsResponse(_message.Message):
    __slots__ = ("errors",)
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    errors: _containers.RepeatedCompositeFieldContainer[ProviderErrorEntry]
    def __init__(self, errors: _Optional[_Iterable[_Union[ProviderErrorEntry, _Mapping]]] = ...) -> None: ...
