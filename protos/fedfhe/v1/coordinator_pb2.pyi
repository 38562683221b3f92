from fedfhe.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RoundOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROUND_OUTCOME_UNSPECIFIED: _ClassVar[RoundOutcome]
    ROUND_OUTCOME_AGGREGATED: _ClassVar[RoundOutcome]
    ROUND_OUTCOME_FAILED: _ClassVar[RoundOutcome]

class ShareKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SHARE_KIND_UNSPECIFIED: _ClassVar[ShareKind]
    SHARE_KIND_SELF_MASK: _ClassVar[ShareKind]
    SHARE_KIND_MASK_KEY: _ClassVar[ShareKind]
ROUND_OUTCOME_UNSPECIFIED: RoundOutcome
ROUND_OUTCOME_AGGREGATED: RoundOutcome
ROUND_OUTCOME_FAILED: RoundOutcome
SHARE_KIND_UNSPECIFIED: ShareKind
SHARE_KIND_SELF_MASK: ShareKind
SHARE_KIND_MASK_KEY: ShareKind

class RegisterRequest(_message.Message):
    __slots__ = ("worker_name", "num_records", "key_check_value", "no_dp", "pii_scrubbed", "epsilon_budget")
    WORKER_NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_RECORDS_FIELD_NUMBER: _ClassVar[int]
    KEY_CHECK_VALUE_FIELD_NUMBER: _ClassVar[int]
    NO_DP_FIELD_NUMBER: _ClassVar[int]
    PII_SCRUBBED_FIELD_NUMBER: _ClassVar[int]
    EPSILON_BUDGET_FIELD_NUMBER: _ClassVar[int]
    worker_name: str
    num_records: int
    key_check_value: bytes
    no_dp: bool
    pii_scrubbed: bool
    epsilon_budget: float
    def __init__(self, worker_name: _Optional[str] = ..., num_records: _Optional[int] = ..., key_check_value: _Optional[bytes] = ..., no_dp: _Optional[bool] = ..., pii_scrubbed: _Optional[bool] = ..., epsilon_budget: _Optional[float] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("worker_id", "federation_id", "key_check_value", "latest_patch_round")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    FEDERATION_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_CHECK_VALUE_FIELD_NUMBER: _ClassVar[int]
    LATEST_PATCH_ROUND_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    federation_id: str
    key_check_value: bytes
    latest_patch_round: int
    def __init__(self, worker_id: _Optional[str] = ..., federation_id: _Optional[str] = ..., key_check_value: _Optional[bytes] = ..., latest_patch_round: _Optional[int] = ...) -> None: ...

class RoundConfig(_message.Message):
    __slots__ = ("local_steps", "batch_size", "learning_rate", "lora_rank", "lora_alpha", "lora_targets", "ffa", "lora_seed", "max_seq_len", "total_rounds")
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    LORA_ALPHA_FIELD_NUMBER: _ClassVar[int]
    LORA_TARGETS_FIELD_NUMBER: _ClassVar[int]
    FFA_FIELD_NUMBER: _ClassVar[int]
    LORA_SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    local_steps: int
    batch_size: int
    learning_rate: float
    lora_rank: int
    lora_alpha: float
    lora_targets: _containers.RepeatedScalarFieldContainer[str]
    ffa: bool
    lora_seed: int
    max_seq_len: int
    total_rounds: int
    def __init__(self, local_steps: _Optional[int] = ..., batch_size: _Optional[int] = ..., learning_rate: _Optional[float] = ..., lora_rank: _Optional[int] = ..., lora_alpha: _Optional[float] = ..., lora_targets: _Optional[_Iterable[str]] = ..., ffa: _Optional[bool] = ..., lora_seed: _Optional[int] = ..., max_seq_len: _Optional[int] = ..., total_rounds: _Optional[int] = ...) -> None: ...

class RoundStarted(_message.Message):
    __slots__ = ("round", "config", "deadline_unix_ms", "base_round", "secure_aggregation")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    BASE_ROUND_FIELD_NUMBER: _ClassVar[int]
    SECURE_AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    round: int
    config: RoundConfig
    deadline_unix_ms: int
    base_round: int
    secure_aggregation: SecureAggregation
    def __init__(self, round: _Optional[int] = ..., config: _Optional[_Union[RoundConfig, _Mapping]] = ..., deadline_unix_ms: _Optional[int] = ..., base_round: _Optional[int] = ..., secure_aggregation: _Optional[_Union[SecureAggregation, _Mapping]] = ...) -> None: ...

class SecureAggregation(_message.Message):
    __slots__ = ("enabled", "threshold", "scheme")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    SCHEME_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    threshold: int
    scheme: str
    def __init__(self, enabled: _Optional[bool] = ..., threshold: _Optional[int] = ..., scheme: _Optional[str] = ...) -> None: ...

class MaskKeys(_message.Message):
    __slots__ = ("worker_id", "cipher_public_key", "mask_public_key", "self_mask_commitment", "signature", "certificate_pem")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    CIPHER_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    MASK_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SELF_MASK_COMMITMENT_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    cipher_public_key: bytes
    mask_public_key: bytes
    self_mask_commitment: bytes
    signature: bytes
    certificate_pem: bytes
    def __init__(self, worker_id: _Optional[str] = ..., cipher_public_key: _Optional[bytes] = ..., mask_public_key: _Optional[bytes] = ..., self_mask_commitment: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., certificate_pem: _Optional[bytes] = ...) -> None: ...

class EncryptedShare(_message.Message):
    __slots__ = ("worker_id", "ciphertext")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    ciphertext: bytes
    def __init__(self, worker_id: _Optional[str] = ..., ciphertext: _Optional[bytes] = ...) -> None: ...

class MaskKeysReady(_message.Message):
    __slots__ = ("round", "threshold", "members")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    round: int
    threshold: int
    members: _containers.RepeatedCompositeFieldContainer[MaskKeys]
    def __init__(self, round: _Optional[int] = ..., threshold: _Optional[int] = ..., members: _Optional[_Iterable[_Union[MaskKeys, _Mapping]]] = ...) -> None: ...

class MaskSharesReady(_message.Message):
    __slots__ = ("round", "members", "shares")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    round: int
    members: _containers.RepeatedScalarFieldContainer[str]
    shares: _containers.RepeatedCompositeFieldContainer[EncryptedShare]
    def __init__(self, round: _Optional[int] = ..., members: _Optional[_Iterable[str]] = ..., shares: _Optional[_Iterable[_Union[EncryptedShare, _Mapping]]] = ...) -> None: ...

class UnmaskRequested(_message.Message):
    __slots__ = ("round", "survivors")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    round: int
    survivors: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, round: _Optional[int] = ..., survivors: _Optional[_Iterable[str]] = ...) -> None: ...

class SurvivorSignature(_message.Message):
    __slots__ = ("worker_id", "signature")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    signature: bytes
    def __init__(self, worker_id: _Optional[str] = ..., signature: _Optional[bytes] = ...) -> None: ...

class SurvivorsConfirmed(_message.Message):
    __slots__ = ("round", "survivors", "signatures")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    SIGNATURES_FIELD_NUMBER: _ClassVar[int]
    round: int
    survivors: _containers.RepeatedScalarFieldContainer[str]
    signatures: _containers.RepeatedCompositeFieldContainer[SurvivorSignature]
    def __init__(self, round: _Optional[int] = ..., survivors: _Optional[_Iterable[str]] = ..., signatures: _Optional[_Iterable[_Union[SurvivorSignature, _Mapping]]] = ...) -> None: ...

class Participant(_message.Message):
    __slots__ = ("worker_id", "num_samples", "epsilon", "no_dp", "nonce", "train_loss")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    NO_DP_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    num_samples: int
    epsilon: float
    no_dp: bool
    nonce: bytes
    train_loss: float
    def __init__(self, worker_id: _Optional[str] = ..., num_samples: _Optional[int] = ..., epsilon: _Optional[float] = ..., no_dp: _Optional[bool] = ..., nonce: _Optional[bytes] = ..., train_loss: _Optional[float] = ...) -> None: ...

class RoundClosed(_message.Message):
    __slots__ = ("round", "participants", "total_samples", "outcome", "reason")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    round: int
    participants: _containers.RepeatedCompositeFieldContainer[Participant]
    total_samples: int
    outcome: RoundOutcome
    reason: str
    def __init__(self, round: _Optional[int] = ..., participants: _Optional[_Iterable[_Union[Participant, _Mapping]]] = ..., total_samples: _Optional[int] = ..., outcome: _Optional[_Union[RoundOutcome, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class FederationFinished(_message.Message):
    __slots__ = ("last_round",)
    LAST_ROUND_FIELD_NUMBER: _ClassVar[int]
    last_round: int
    def __init__(self, last_round: _Optional[int] = ...) -> None: ...

class WatchRoundsRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class WatchRoundsResponse(_message.Message):
    __slots__ = ("started", "closed", "finished", "mask_keys", "mask_shares", "unmask", "survivors_confirmed")
    STARTED_FIELD_NUMBER: _ClassVar[int]
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    MASK_KEYS_FIELD_NUMBER: _ClassVar[int]
    MASK_SHARES_FIELD_NUMBER: _ClassVar[int]
    UNMASK_FIELD_NUMBER: _ClassVar[int]
    SURVIVORS_CONFIRMED_FIELD_NUMBER: _ClassVar[int]
    started: RoundStarted
    closed: RoundClosed
    finished: FederationFinished
    mask_keys: MaskKeysReady
    mask_shares: MaskSharesReady
    unmask: UnmaskRequested
    survivors_confirmed: SurvivorsConfirmed
    def __init__(self, started: _Optional[_Union[RoundStarted, _Mapping]] = ..., closed: _Optional[_Union[RoundClosed, _Mapping]] = ..., finished: _Optional[_Union[FederationFinished, _Mapping]] = ..., mask_keys: _Optional[_Union[MaskKeysReady, _Mapping]] = ..., mask_shares: _Optional[_Union[MaskSharesReady, _Mapping]] = ..., unmask: _Optional[_Union[UnmaskRequested, _Mapping]] = ..., survivors_confirmed: _Optional[_Union[SurvivorsConfirmed, _Mapping]] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class GetPatchRequest(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    def __init__(self, round: _Optional[int] = ...) -> None: ...

class PatchHeader(_message.Message):
    __slots__ = ("round", "participants", "total_samples", "tensors", "size_bytes", "federation_id", "key_check_value", "digest", "restored", "config")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    FEDERATION_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_CHECK_VALUE_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    RESTORED_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    round: int
    participants: _containers.RepeatedCompositeFieldContainer[Participant]
    total_samples: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    size_bytes: int
    federation_id: str
    key_check_value: bytes
    digest: bytes
    restored: bool
    config: RoundConfig
    def __init__(self, round: _Optional[int] = ..., participants: _Optional[_Iterable[_Union[Participant, _Mapping]]] = ..., total_samples: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., size_bytes: _Optional[int] = ..., federation_id: _Optional[str] = ..., key_check_value: _Optional[bytes] = ..., digest: _Optional[bytes] = ..., restored: _Optional[bool] = ..., config: _Optional[_Union[RoundConfig, _Mapping]] = ...) -> None: ...

class GetPatchResponse(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: PatchHeader
    chunk: _common_pb2.Chunk
    def __init__(self, header: _Optional[_Union[PatchHeader, _Mapping]] = ..., chunk: _Optional[_Union[_common_pb2.Chunk, _Mapping]] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("round", "num_samples", "epsilon_spent", "tensors", "size_bytes", "digest", "worker_id", "key_check_value", "no_dp", "nonce", "masked", "train_loss")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    EPSILON_SPENT_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_CHECK_VALUE_FIELD_NUMBER: _ClassVar[int]
    NO_DP_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    MASKED_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    round: int
    num_samples: int
    epsilon_spent: float
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    size_bytes: int
    digest: bytes
    worker_id: str
    key_check_value: bytes
    no_dp: bool
    nonce: bytes
    masked: bool
    train_loss: float
    def __init__(self, round: _Optional[int] = ..., num_samples: _Optional[int] = ..., epsilon_spent: _Optional[float] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., size_bytes: _Optional[int] = ..., digest: _Optional[bytes] = ..., worker_id: _Optional[str] = ..., key_check_value: _Optional[bytes] = ..., no_dp: _Optional[bool] = ..., nonce: _Optional[bytes] = ..., masked: _Optional[bool] = ..., train_loss: _Optional[float] = ...) -> None: ...

class SubmitUpdateRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    chunk: _common_pb2.Chunk
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., chunk: _Optional[_Union[_common_pb2.Chunk, _Mapping]] = ...) -> None: ...

class SubmitUpdateResponse(_message.Message):
    __slots__ = ("round", "accepted")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    round: int
    accepted: bool
    def __init__(self, round: _Optional[int] = ..., accepted: _Optional[bool] = ...) -> None: ...

class DeclineRoundRequest(_message.Message):
    __slots__ = ("round", "reason", "worker_id")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    round: int
    reason: str
    worker_id: str
    def __init__(self, round: _Optional[int] = ..., reason: _Optional[str] = ..., worker_id: _Optional[str] = ...) -> None: ...

class DeclineRoundResponse(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    def __init__(self, round: _Optional[int] = ...) -> None: ...

class StartRoundRequest(_message.Message):
    __slots__ = ("config", "deadline_seconds")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    config: RoundConfig
    deadline_seconds: float
    def __init__(self, config: _Optional[_Union[RoundConfig, _Mapping]] = ..., deadline_seconds: _Optional[float] = ...) -> None: ...

class StartRoundResponse(_message.Message):
    __slots__ = ("round", "deadline_unix_ms", "eligible")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    ELIGIBLE_FIELD_NUMBER: _ClassVar[int]
    round: int
    deadline_unix_ms: int
    eligible: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, round: _Optional[int] = ..., deadline_unix_ms: _Optional[int] = ..., eligible: _Optional[_Iterable[str]] = ...) -> None: ...

class FinishFederationRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FinishFederationResponse(_message.Message):
    __slots__ = ("last_round",)
    LAST_ROUND_FIELD_NUMBER: _ClassVar[int]
    last_round: int
    def __init__(self, last_round: _Optional[int] = ...) -> None: ...

class RestoreHeader(_message.Message):
    __slots__ = ("round", "tensors", "size_bytes", "digest", "key_check_value", "worker_id", "nonce", "config")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    KEY_CHECK_VALUE_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    round: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    size_bytes: int
    digest: bytes
    key_check_value: bytes
    worker_id: str
    nonce: bytes
    config: RoundConfig
    def __init__(self, round: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., size_bytes: _Optional[int] = ..., digest: _Optional[bytes] = ..., key_check_value: _Optional[bytes] = ..., worker_id: _Optional[str] = ..., nonce: _Optional[bytes] = ..., config: _Optional[_Union[RoundConfig, _Mapping]] = ...) -> None: ...

class RestorePatchRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: RestoreHeader
    chunk: _common_pb2.Chunk
    def __init__(self, header: _Optional[_Union[RestoreHeader, _Mapping]] = ..., chunk: _Optional[_Union[_common_pb2.Chunk, _Mapping]] = ...) -> None: ...

class RestorePatchResponse(_message.Message):
    __slots__ = ("round", "accepted")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    round: int
    accepted: bool
    def __init__(self, round: _Optional[int] = ..., accepted: _Optional[bool] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("worker_id", "connected", "last_round", "epsilon", "num_records", "no_dp", "declined", "pii_scrubbed", "epsilon_budget")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    LAST_ROUND_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    NUM_RECORDS_FIELD_NUMBER: _ClassVar[int]
    NO_DP_FIELD_NUMBER: _ClassVar[int]
    DECLINED_FIELD_NUMBER: _ClassVar[int]
    PII_SCRUBBED_FIELD_NUMBER: _ClassVar[int]
    EPSILON_BUDGET_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    connected: bool
    last_round: int
    epsilon: float
    num_records: int
    no_dp: bool
    declined: str
    pii_scrubbed: bool
    epsilon_budget: float
    def __init__(self, worker_id: _Optional[str] = ..., connected: _Optional[bool] = ..., last_round: _Optional[int] = ..., epsilon: _Optional[float] = ..., num_records: _Optional[int] = ..., no_dp: _Optional[bool] = ..., declined: _Optional[str] = ..., pii_scrubbed: _Optional[bool] = ..., epsilon_budget: _Optional[float] = ...) -> None: ...

class Evaluation(_message.Message):
    __slots__ = ("worker_id", "eval_loss", "records")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    eval_loss: float
    records: int
    def __init__(self, worker_id: _Optional[str] = ..., eval_loss: _Optional[float] = ..., records: _Optional[int] = ...) -> None: ...

class Decline(_message.Message):
    __slots__ = ("worker_id", "reason")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    reason: str
    def __init__(self, worker_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class RoundStatus(_message.Message):
    __slots__ = ("round", "state", "participants", "buffer_bytes", "eligible", "reason", "seconds", "bytes_received", "mask_recovery", "evaluations", "eval_loss", "declines")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    BUFFER_BYTES_FIELD_NUMBER: _ClassVar[int]
    ELIGIBLE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    MASK_RECOVERY_FIELD_NUMBER: _ClassVar[int]
    EVALUATIONS_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    DECLINES_FIELD_NUMBER: _ClassVar[int]
    round: int
    state: str
    participants: _containers.RepeatedCompositeFieldContainer[Participant]
    buffer_bytes: int
    eligible: _containers.RepeatedScalarFieldContainer[str]
    reason: str
    seconds: float
    bytes_received: int
    mask_recovery: MaskRecovery
    evaluations: _containers.RepeatedCompositeFieldContainer[Evaluation]
    eval_loss: float
    declines: _containers.RepeatedCompositeFieldContainer[Decline]
    def __init__(self, round: _Optional[int] = ..., state: _Optional[str] = ..., participants: _Optional[_Iterable[_Union[Participant, _Mapping]]] = ..., buffer_bytes: _Optional[int] = ..., eligible: _Optional[_Iterable[str]] = ..., reason: _Optional[str] = ..., seconds: _Optional[float] = ..., bytes_received: _Optional[int] = ..., mask_recovery: _Optional[_Union[MaskRecovery, _Mapping]] = ..., evaluations: _Optional[_Iterable[_Union[Evaluation, _Mapping]]] = ..., eval_loss: _Optional[float] = ..., declines: _Optional[_Iterable[_Union[Decline, _Mapping]]] = ...) -> None: ...

class MaskRecovery(_message.Message):
    __slots__ = ("threshold", "phase", "members", "survivors", "dropped", "revealed_by")
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    REVEALED_BY_FIELD_NUMBER: _ClassVar[int]
    threshold: int
    phase: str
    members: _containers.RepeatedScalarFieldContainer[str]
    survivors: _containers.RepeatedScalarFieldContainer[str]
    dropped: _containers.RepeatedScalarFieldContainer[str]
    revealed_by: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, threshold: _Optional[int] = ..., phase: _Optional[str] = ..., members: _Optional[_Iterable[str]] = ..., survivors: _Optional[_Iterable[str]] = ..., dropped: _Optional[_Iterable[str]] = ..., revealed_by: _Optional[_Iterable[str]] = ...) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("federation_id", "current_round", "workers", "rounds", "buffer_bytes_total", "min_workers", "keep_rounds", "buffers_locked", "finished", "secure_aggregation", "baseline_evaluations")
    FEDERATION_ID_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    BUFFER_BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    MIN_WORKERS_FIELD_NUMBER: _ClassVar[int]
    KEEP_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_LOCKED_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    SECURE_AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    BASELINE_EVALUATIONS_FIELD_NUMBER: _ClassVar[int]
    federation_id: str
    current_round: int
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStatus]
    rounds: _containers.RepeatedCompositeFieldContainer[RoundStatus]
    buffer_bytes_total: int
    min_workers: int
    keep_rounds: int
    buffers_locked: bool
    finished: bool
    secure_aggregation: SecureAggregation
    baseline_evaluations: _containers.RepeatedCompositeFieldContainer[Evaluation]
    def __init__(self, federation_id: _Optional[str] = ..., current_round: _Optional[int] = ..., workers: _Optional[_Iterable[_Union[WorkerStatus, _Mapping]]] = ..., rounds: _Optional[_Iterable[_Union[RoundStatus, _Mapping]]] = ..., buffer_bytes_total: _Optional[int] = ..., min_workers: _Optional[int] = ..., keep_rounds: _Optional[int] = ..., buffers_locked: _Optional[bool] = ..., finished: _Optional[bool] = ..., secure_aggregation: _Optional[_Union[SecureAggregation, _Mapping]] = ..., baseline_evaluations: _Optional[_Iterable[_Union[Evaluation, _Mapping]]] = ...) -> None: ...

class ReportEvaluationRequest(_message.Message):
    __slots__ = ("round", "worker_id", "eval_loss", "records")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    round: int
    worker_id: str
    eval_loss: float
    records: int
    def __init__(self, round: _Optional[int] = ..., worker_id: _Optional[str] = ..., eval_loss: _Optional[float] = ..., records: _Optional[int] = ...) -> None: ...

class ReportEvaluationResponse(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    def __init__(self, round: _Optional[int] = ...) -> None: ...

class AdvertiseMaskKeysRequest(_message.Message):
    __slots__ = ("round", "keys")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    round: int
    keys: MaskKeys
    def __init__(self, round: _Optional[int] = ..., keys: _Optional[_Union[MaskKeys, _Mapping]] = ...) -> None: ...

class AdvertiseMaskKeysResponse(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    def __init__(self, round: _Optional[int] = ...) -> None: ...

class ShareMaskSecretsRequest(_message.Message):
    __slots__ = ("round", "worker_id", "shares")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    round: int
    worker_id: str
    shares: _containers.RepeatedCompositeFieldContainer[EncryptedShare]
    def __init__(self, round: _Optional[int] = ..., worker_id: _Optional[str] = ..., shares: _Optional[_Iterable[_Union[EncryptedShare, _Mapping]]] = ...) -> None: ...

class ShareMaskSecretsResponse(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    def __init__(self, round: _Optional[int] = ...) -> None: ...

class ConfirmSurvivorsRequest(_message.Message):
    __slots__ = ("round", "worker_id", "signature")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    round: int
    worker_id: str
    signature: bytes
    def __init__(self, round: _Optional[int] = ..., worker_id: _Optional[str] = ..., signature: _Optional[bytes] = ...) -> None: ...

class ConfirmSurvivorsResponse(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    def __init__(self, round: _Optional[int] = ...) -> None: ...

class RevealedShare(_message.Message):
    __slots__ = ("owner", "kind", "index", "value")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    owner: str
    kind: ShareKind
    index: int
    value: bytes
    def __init__(self, owner: _Optional[str] = ..., kind: _Optional[_Union[ShareKind, str]] = ..., index: _Optional[int] = ..., value: _Optional[bytes] = ...) -> None: ...

class RevealMaskSharesRequest(_message.Message):
    __slots__ = ("round", "worker_id", "shares")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    round: int
    worker_id: str
    shares: _containers.RepeatedCompositeFieldContainer[RevealedShare]
    def __init__(self, round: _Optional[int] = ..., worker_id: _Optional[str] = ..., shares: _Optional[_Iterable[_Union[RevealedShare, _Mapping]]] = ...) -> None: ...

class RevealMaskSharesResponse(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    def __init__(self, round: _Optional[int] = ...) -> None: ...
