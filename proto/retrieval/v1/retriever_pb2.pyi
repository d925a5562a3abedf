from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]
    DTYPE_UINT16: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]
    DTYPE_INT16: _ClassVar[DType]
    DTYPE_INT8: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]
    DTYPE_UINT32: _ClassVar[DType]
    DTYPE_UINT64: _ClassVar[DType]
    DTYPE_BOOL: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_INT64: DType
DTYPE_INT32: DType
DTYPE_UINT16: DType
DTYPE_UINT8: DType
DTYPE_INT16: DType
DTYPE_INT8: DType
DTYPE_FLOAT64: DType
DTYPE_UINT32: DType
DTYPE_UINT64: DType
DTYPE_BOOL: DType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class IdRange(_message.Message):
    __slots__ = ("start", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class Exclusion(_message.Message):
    __slots__ = ("ids", "ranges")
    IDS_FIELD_NUMBER: _ClassVar[int]
    RANGES_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    ranges: _containers.RepeatedCompositeFieldContainer[IdRange]
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., ranges: _Optional[_Iterable[_Union[IdRange, _Mapping]]] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("queries", "k", "nprobe", "exact_rerank", "rerank_candidates", "payloads", "return_keys", "exclude", "exclude_per_query", "allow_partial", "expected_datastore_version", "successors")
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    NPROBE_FIELD_NUMBER: _ClassVar[int]
    EXACT_RERANK_FIELD_NUMBER: _ClassVar[int]
    RERANK_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    PAYLOADS_FIELD_NUMBER: _ClassVar[int]
    RETURN_KEYS_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_PER_QUERY_FIELD_NUMBER: _ClassVar[int]
    ALLOW_PARTIAL_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_DATASTORE_VERSION_FIELD_NUMBER: _ClassVar[int]
    SUCCESSORS_FIELD_NUMBER: _ClassVar[int]
    queries: Tensor
    k: int
    nprobe: int
    exact_rerank: bool
    rerank_candidates: int
    payloads: _containers.RepeatedScalarFieldContainer[str]
    return_keys: bool
    exclude: Exclusion
    exclude_per_query: _containers.RepeatedCompositeFieldContainer[Exclusion]
    allow_partial: bool
    expected_datastore_version: str
    successors: int
    def __init__(self, queries: _Optional[_Union[Tensor, _Mapping]] = ..., k: _Optional[int] = ..., nprobe: _Optional[int] = ..., exact_rerank: _Optional[bool] = ..., rerank_candidates: _Optional[int] = ..., payloads: _Optional[_Iterable[str]] = ..., return_keys: _Optional[bool] = ..., exclude: _Optional[_Union[Exclusion, _Mapping]] = ..., exclude_per_query: _Optional[_Iterable[_Union[Exclusion, _Mapping]]] = ..., allow_partial: _Optional[bool] = ..., expected_datastore_version: _Optional[str] = ..., successors: _Optional[int] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("ids", "distances", "payloads", "keys", "partial", "failed_shards", "datastore_version", "successor_ids", "successor_payloads", "successor_keys")
    class PayloadsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    class SuccessorPayloadsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    IDS_FIELD_NUMBER: _ClassVar[int]
    DISTANCES_FIELD_NUMBER: _ClassVar[int]
    PAYLOADS_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    FAILED_SHARDS_FIELD_NUMBER: _ClassVar[int]
    DATASTORE_VERSION_FIELD_NUMBER: _ClassVar[int]
    SUCCESSOR_IDS_FIELD_NUMBER: _ClassVar[int]
    SUCCESSOR_PAYLOADS_FIELD_NUMBER: _ClassVar[int]
    SUCCESSOR_KEYS_FIELD_NUMBER: _ClassVar[int]
    ids: Tensor
    distances: Tensor
    payloads: _containers.MessageMap[str, Tensor]
    keys: Tensor
    partial: bool
    failed_shards: _containers.RepeatedCompositeFieldContainer[ShardFailure]
    datastore_version: str
    successor_ids: Tensor
    successor_payloads: _containers.MessageMap[str, Tensor]
    successor_keys: Tensor
    def __init__(self, ids: _Optional[_Union[Tensor, _Mapping]] = ..., distances: _Optional[_Union[Tensor, _Mapping]] = ..., payloads: _Optional[_Mapping[str, Tensor]] = ..., keys: _Optional[_Union[Tensor, _Mapping]] = ..., partial: _Optional[bool] = ..., failed_shards: _Optional[_Iterable[_Union[ShardFailure, _Mapping]]] = ..., datastore_version: _Optional[str] = ..., successor_ids: _Optional[_Union[Tensor, _Mapping]] = ..., successor_payloads: _Optional[_Mapping[str, Tensor]] = ..., successor_keys: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ShardFailure(_message.Message):
    __slots__ = ("shard", "reason")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    shard: str
    reason: str
    def __init__(self, shard: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PayloadInfo(_message.Message):
    __slots__ = ("name", "dtype", "row_shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    ROW_SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    row_shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., row_shape: _Optional[_Iterable[int]] = ...) -> None: ...

class ShardInfo(_message.Message):
    __slots__ = ("name", "id_start", "id_end", "ntotal", "replicas")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ID_START_FIELD_NUMBER: _ClassVar[int]
    ID_END_FIELD_NUMBER: _ClassVar[int]
    NTOTAL_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    name: str
    id_start: int
    id_end: int
    ntotal: int
    replicas: int
    def __init__(self, name: _Optional[str] = ..., id_start: _Optional[int] = ..., id_end: _Optional[int] = ..., ntotal: _Optional[int] = ..., replicas: _Optional[int] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("dimension", "metric", "factory", "ntotal", "shard", "replica", "datastore_version", "datastore_checksum", "payloads", "has_keys", "shards", "nlist", "default_nprobe", "max_k", "max_batch", "role", "metadata", "gpu", "num_shards", "datastore_ntotal", "max_request_bytes")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    FACTORY_FIELD_NUMBER: _ClassVar[int]
    NTOTAL_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    DATASTORE_VERSION_FIELD_NUMBER: _ClassVar[int]
    DATASTORE_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    PAYLOADS_FIELD_NUMBER: _ClassVar[int]
    HAS_KEYS_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    NLIST_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_NPROBE_FIELD_NUMBER: _ClassVar[int]
    MAX_K_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    DATASTORE_NTOTAL_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_BYTES_FIELD_NUMBER: _ClassVar[int]
    dimension: int
    metric: str
    factory: str
    ntotal: int
    shard: str
    replica: int
    datastore_version: str
    datastore_checksum: str
    payloads: _containers.RepeatedCompositeFieldContainer[PayloadInfo]
    has_keys: bool
    shards: _containers.RepeatedCompositeFieldContainer[ShardInfo]
    nlist: int
    default_nprobe: int
    max_k: int
    max_batch: int
    role: str
    metadata: _containers.ScalarMap[str, str]
    gpu: bool
    num_shards: int
    datastore_ntotal: int
    max_request_bytes: int
    def __init__(self, dimension: _Optional[int] = ..., metric: _Optional[str] = ..., factory: _Optional[str] = ..., ntotal: _Optional[int] = ..., shard: _Optional[str] = ..., replica: _Optional[int] = ..., datastore_version: _Optional[str] = ..., datastore_checksum: _Optional[str] = ..., payloads: _Optional[_Iterable[_Union[PayloadInfo, _Mapping]]] = ..., has_keys: _Optional[bool] = ..., shards: _Optional[_Iterable[_Union[ShardInfo, _Mapping]]] = ..., nlist: _Optional[int] = ..., default_nprobe: _Optional[int] = ..., max_k: _Optional[int] = ..., max_batch: _Optional[int] = ..., role: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., gpu: _Optional[bool] = ..., num_shards: _Optional[int] = ..., datastore_ntotal: _Optional[int] = ..., max_request_bytes: _Optional[int] = ...) -> None: ...
