"""The device's audit ledger: every outbound payload, append-only and hash-chained.

One JSON object per line (JSONL), written in canonical form (sorted keys, no spaces)::

    {"seq": 1, "time": "2025-01-01T12:00:00.000Z", "channel": "flower",
     "destination": "superlink run 7", "message_type": "train",
     "arrays": [{"name": "lora/w", "shape": [8, 576], "dtype": "float32", "bytes": 18432,
                 "sha256": "..."}],
     "payload_bytes": 18560, "fields": {"metrics": {...}}, "meta": {"group_id": "3"},
     "consent_rule": "upload.stage1_lora", "prev_hash": "000...0", "hash": "..."}

``hash`` is the sha256 of the canonical JSON of the entry without ``hash`` (so it covers
``prev_hash``); ``prev_hash`` is the previous entry's hash, 64 zeros for the first entry;
``seq`` counts from 1 and equals the line number. :func:`verify` therefore finds an edited,
removed, inserted or reordered entry and a truncated last line. Removing whole entries from
the *end* leaves a valid shorter chain: note the head hash (``pfl audit summary``) and pass it
to ``pfl audit verify --head`` later to detect that too.

Array sha256s are over the array's raw elements in row-major order (what the tensor holds),
so a person can check them against a local tensor; Flower arrays also get the size and sha256
of their serialized wire bytes. Text is never copied into the ledger: other fields are
summarized as keys, types and sizes (numbers and booleans are kept as values).

By role:

- :mod:`.ledger`: the format, :class:`AuditLedger` (thread- and process-safe appends) and the
  readers :func:`read_entries`, :func:`verify`, :func:`summary`;
- :mod:`.flower`: :func:`audit_mod`, the ClientApp mod that records every reply;
- :mod:`.interceptor`: :class:`AuditClientInterceptor`, the gRPC client interceptor that
  records every request to the piece pool;
- :mod:`.cli`: the ``pfl audit show | summary | verify`` commands.
"""

from edge_client.audit.cli import add_audit_commands, format_entries, format_summary
from edge_client.audit.flower import (audit_mod, describe_record_dict, message_bytes,
                                      note_consent_rule)
from edge_client.audit.interceptor import AuditClientInterceptor
from edge_client.audit.ledger import (GENESIS_HASH, AuditLedger, VerifyResult, canonical_json,
                                      describe_array, describe_arrays, entry_hash, read_entries,
                                      summarize_value, summary, verify)

__all__ = ["AuditClientInterceptor", "AuditLedger", "GENESIS_HASH", "VerifyResult",
           "add_audit_commands", "audit_mod", "canonical_json", "describe_array",
           "describe_arrays", "describe_record_dict", "entry_hash", "format_entries",
           "format_summary", "message_bytes", "note_consent_rule", "read_entries",
           "summarize_value", "summary", "verify"]
