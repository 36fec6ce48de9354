from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "sha256")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    sha256: str
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., sha256: _Optional[str] = ...) -> None: ...

class Piece(_message.Message):
    __slots__ = ("piece_id", "sharer", "layer", "module", "rank", "scaling", "a", "b", "gate", "signature", "public_key", "consent", "created_at")
    class ConsentEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bool
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bool] = ...) -> None: ...
    PIECE_ID_FIELD_NUMBER: _ClassVar[int]
    SHARER_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    MODULE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    SCALING_FIELD_NUMBER: _ClassVar[int]
    A_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    GATE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    CONSENT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    piece_id: str
    sharer: str
    layer: int
    module: str
    rank: int
    scaling: float
    a: Tensor
    b: Tensor
    gate: Tensor
    signature: bytes
    public_key: bytes
    consent: _containers.ScalarMap[str, bool]
    created_at: float
    def __init__(self, piece_id: _Optional[str] = ..., sharer: _Optional[str] = ..., layer: _Optional[int] = ..., module: _Optional[str] = ..., rank: _Optional[int] = ..., scaling: _Optional[float] = ..., a: _Optional[_Union[Tensor, _Mapping]] = ..., b: _Optional[_Union[Tensor, _Mapping]] = ..., gate: _Optional[_Union[Tensor, _Mapping]] = ..., signature: _Optional[bytes] = ..., public_key: _Optional[bytes] = ..., consent: _Optional[_Mapping[str, bool]] = ..., created_at: _Optional[float] = ...) -> None: ...

class GateEntry(_message.Message):
    __slots__ = ("piece_id", "sharer", "layer", "module", "rank", "gate", "signature", "public_key")
    PIECE_ID_FIELD_NUMBER: _ClassVar[int]
    SHARER_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    MODULE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    GATE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    piece_id: str
    sharer: str
    layer: int
    module: str
    rank: int
    gate: Tensor
    signature: bytes
    public_key: bytes
    def __init__(self, piece_id: _Optional[str] = ..., sharer: _Optional[str] = ..., layer: _Optional[int] = ..., module: _Optional[str] = ..., rank: _Optional[int] = ..., gate: _Optional[_Union[Tensor, _Mapping]] = ..., signature: _Optional[bytes] = ..., public_key: _Optional[bytes] = ...) -> None: ...

class RecipeItem(_message.Message):
    __slots__ = ("piece_id", "weight")
    PIECE_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    piece_id: str
    weight: float
    def __init__(self, piece_id: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class RecipeEntry(_message.Message):
    __slots__ = ("layer", "module", "items")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    MODULE_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    module: str
    items: _containers.RepeatedCompositeFieldContainer[RecipeItem]
    def __init__(self, layer: _Optional[int] = ..., module: _Optional[str] = ..., items: _Optional[_Iterable[_Union[RecipeItem, _Mapping]]] = ...) -> None: ...

class Recipe(_message.Message):
    __slots__ = ("combination", "config_json", "entries")
    COMBINATION_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    combination: str
    config_json: str
    entries: _containers.RepeatedCompositeFieldContainer[RecipeEntry]
    def __init__(self, combination: _Optional[str] = ..., config_json: _Optional[str] = ..., entries: _Optional[_Iterable[_Union[RecipeEntry, _Mapping]]] = ...) -> None: ...

class SharerGrant(_message.Message):
    __slots__ = ("grant_id", "run", "max_pieces", "expires_at", "signature", "public_key")
    GRANT_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    MAX_PIECES_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    grant_id: str
    run: str
    max_pieces: int
    expires_at: float
    signature: bytes
    public_key: bytes
    def __init__(self, grant_id: _Optional[str] = ..., run: _Optional[str] = ..., max_pieces: _Optional[int] = ..., expires_at: _Optional[float] = ..., signature: _Optional[bytes] = ..., public_key: _Optional[bytes] = ...) -> None: ...

class SubmitPiecesRequest(_message.Message):
    __slots__ = ("pieces", "grant")
    PIECES_FIELD_NUMBER: _ClassVar[int]
    GRANT_FIELD_NUMBER: _ClassVar[int]
    pieces: _containers.RepeatedCompositeFieldContainer[Piece]
    grant: SharerGrant
    def __init__(self, pieces: _Optional[_Iterable[_Union[Piece, _Mapping]]] = ..., grant: _Optional[_Union[SharerGrant, _Mapping]] = ...) -> None: ...

class SubmitResult(_message.Message):
    __slots__ = ("piece_id", "created")
    PIECE_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    piece_id: str
    created: bool
    def __init__(self, piece_id: _Optional[str] = ..., created: _Optional[bool] = ...) -> None: ...

class SubmitPiecesReply(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SubmitResult]
    def __init__(self, results: _Optional[_Iterable[_Union[SubmitResult, _Mapping]]] = ...) -> None: ...

class ListGatesRequest(_message.Message):
    __slots__ = ("layers", "modules", "sharers", "run")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    MODULES_FIELD_NUMBER: _ClassVar[int]
    SHARERS_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedScalarFieldContainer[int]
    modules: _containers.RepeatedScalarFieldContainer[str]
    sharers: _containers.RepeatedScalarFieldContainer[str]
    run: str
    def __init__(self, layers: _Optional[_Iterable[int]] = ..., modules: _Optional[_Iterable[str]] = ..., sharers: _Optional[_Iterable[str]] = ..., run: _Optional[str] = ...) -> None: ...

class FetchPiecesRequest(_message.Message):
    __slots__ = ("piece_ids",)
    PIECE_IDS_FIELD_NUMBER: _ClassVar[int]
    piece_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, piece_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class LoraFactor(_message.Message):
    __slots__ = ("layer", "module", "a", "b", "scaling")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    MODULE_FIELD_NUMBER: _ClassVar[int]
    A_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    SCALING_FIELD_NUMBER: _ClassVar[int]
    layer: int
    module: str
    a: Tensor
    b: Tensor
    scaling: float
    def __init__(self, layer: _Optional[int] = ..., module: _Optional[str] = ..., a: _Optional[_Union[Tensor, _Mapping]] = ..., b: _Optional[_Union[Tensor, _Mapping]] = ..., scaling: _Optional[float] = ...) -> None: ...

class UploadAdapterRequest(_message.Message):
    __slots__ = ("factors",)
    FACTORS_FIELD_NUMBER: _ClassVar[int]
    factors: _containers.RepeatedCompositeFieldContainer[LoraFactor]
    def __init__(self, factors: _Optional[_Iterable[_Union[LoraFactor, _Mapping]]] = ...) -> None: ...

class UploadAdapterReply(_message.Message):
    __slots__ = ("adapter_id", "created")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    created: bool
    def __init__(self, adapter_id: _Optional[str] = ..., created: _Optional[bool] = ...) -> None: ...

class InterventionLayer(_message.Message):
    __slots__ = ("layer", "r", "w", "b")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    R_FIELD_NUMBER: _ClassVar[int]
    W_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    layer: int
    r: Tensor
    w: Tensor
    b: Tensor
    def __init__(self, layer: _Optional[int] = ..., r: _Optional[_Union[Tensor, _Mapping]] = ..., w: _Optional[_Union[Tensor, _Mapping]] = ..., b: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class PerFitParams(_message.Message):
    __slots__ = ("layers",)
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedCompositeFieldContainer[InterventionLayer]
    def __init__(self, layers: _Optional[_Iterable[_Union[InterventionLayer, _Mapping]]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "max_new_tokens", "base", "perpcs", "perfit", "oppu_adapter", "min_new_tokens")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    PERPCS_FIELD_NUMBER: _ClassVar[int]
    PERFIT_FIELD_NUMBER: _ClassVar[int]
    OPPU_ADAPTER_FIELD_NUMBER: _ClassVar[int]
    MIN_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    max_new_tokens: int
    base: bool
    perpcs: Recipe
    perfit: PerFitParams
    oppu_adapter: str
    min_new_tokens: int
    def __init__(self, prompt: _Optional[str] = ..., max_new_tokens: _Optional[int] = ..., base: _Optional[bool] = ..., perpcs: _Optional[_Union[Recipe, _Mapping]] = ..., perfit: _Optional[_Union[PerFitParams, _Mapping]] = ..., oppu_adapter: _Optional[str] = ..., min_new_tokens: _Optional[int] = ...) -> None: ...

class GenerateReply(_message.Message):
    __slots__ = ("text", "new_tokens", "batch_rows", "queue_seconds", "compute_seconds")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BATCH_ROWS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    text: str
    new_tokens: int
    batch_rows: int
    queue_seconds: float
    compute_seconds: float
    def __init__(self, text: _Optional[str] = ..., new_tokens: _Optional[int] = ..., batch_rows: _Optional[int] = ..., queue_seconds: _Optional[float] = ..., compute_seconds: _Optional[float] = ...) -> None: ...
