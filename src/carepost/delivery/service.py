"""Secure delivery logic over the database, by subject:

* ``domains`` — sending domains: ownership proof, DKIM keys, the DNS records to publish, live checks, and the queries the API, CLI and doctor use.
* ``recipient_keys`` — recipients' PGP and S/MIME keys on file: validation on upload, look-up by address, expiry, listing.
* ``preview`` — the pre-send security preview: which secure method each address would get, and why.
* ``outcomes`` — recording delivery outcomes: a recipient's events, and one attempt's result applied to its row.
* ``protection`` — one recipient's copy protected: PGP/MIME or S/MIME encryption of the composed message.
* ``settings`` — an organization's delivery settings (security mode, default purpose) and the purposes a message may name.
* ``messages`` — accepting messages (API, batch, SMTP submission): validation, idempotency, storage, the eligibility check at acceptance; and reading them back.

Plain functions taking a session (ARCHITECTURE.md section 3); the caller commits. Audit events
for people and API clients touching recipient keys or messages are written by the routes that
call these functions (``audit.service.record_for``), which know the principal. This module keeps
the names callers import from ``delivery.service``.
"""

from __future__ import annotations

from carepost.delivery.domains import (  # noqa: F401
    DOMAIN_TAKEN,
    OWNERSHIP,
    UNVERIFIED_REASON,
    DnsRecord,
    RecordCheck,
    _selector,
    _txt_check,
    apply_checks,
    apply_dns_check,
    apply_ownership_check,
    check_dns,
    check_ownership,
    confirm_ownership,
    create_sending_domain,
    delete_sending_domain,
    dkim_keys,
    dns_records,
    domain_view,
    get_sending_domain,
    is_verified,
    list_sending_domains,
    local_capture,
    mail_host,
    may_send,
    mta_sts_policy,
    notice_sending_domain,
    ownership_record,
    records_to_check,
    sending_domain_by_id,
    sending_domain_for,
    smime_signing_key,
    unproven_sending_domains,
    unverified_sending_domains,
    verified_owner,
)
from carepost.delivery.recipient_keys import (  # noqa: F401
    KEY_EXPIRY_WARNING,
    KEY_KINDS,
    KeyInfo,
    _key_info,
    add_recipient_key,
    delete_recipient_key,
    expiring_recipient_keys,
    key_info,
    list_recipient_keys,
    recipient_key_infos,
    recipient_key_material,
    recipient_keys,
)
from carepost.delivery.preview import (  # noqa: F401
    PreviewRow,
    keys_on_file,
    security_preview,
)
from carepost.delivery.outcomes import (  # noqa: F401
    add_event,
    record_result,
    result_changes,
)
from carepost.delivery.protection import (  # noqa: F401
    Delivered,
    deliver_one,
    protect,
)
from carepost.delivery.settings import (  # noqa: F401
    DEFAULT_SECURITY_MODE,
    _PURPOSE_SHAPE,
    check_purpose,
    delivery_settings,
    known_purposes,
    update_delivery_settings,
)
from carepost.delivery.messages import (  # noqa: F401
    Accepted,
    BLOCKED_EXTENSIONS,
    BLOCKED_TYPES,
    PreparedMessage,
    _EXECUTABLE_MAGIC,
    _RESERVED_HEADER_PREFIX,
    _SIGNATURES,
    _check_attachment,
    _evidence_view,
    _link_contacts,
    _mailbox_text,
    _prefixed,
    _prepare,
    accept_batch,
    accept_message,
    check_idempotency_key,
    exclude_ineligible,
    find_idempotent,
    get_message,
    idempotency_hash,
    list_messages,
    message_view,
    prepare_message,
    recipient_address,
    request_fingerprint,
    sandbox_captures,
    store_message,
    store_messages,
)
