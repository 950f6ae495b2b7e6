"""Queue tasks of the core: key maintenance. Tasks take no PHI (no arguments at all here).

* ``reencrypt_data_keys`` re-encrypts ciphertexts of old data-key versions under the current
  one and retires the versions nothing needs any more (``carepost.core.reencrypt``). Queued by
  ``carepost keys rotate --reencrypt``, run nightly, and run in-process by ``carepost keys retire``.
  Idempotent: a second run re-encrypts nothing.
"""

from __future__ import annotations

from huey import crontab

from carepost.core.logging import get_logger
from carepost.core.queue import huey

log = get_logger("carepost.core.tasks")


@huey.task(retries=2, retry_delay=60)
def reencrypt_data_keys() -> None:
    run_reencryption()


@huey.periodic_task(crontab(minute="41", hour="2"))
def reencrypt_data_keys_nightly() -> None:
    run_reencryption()


def run_reencryption():
    from carepost.core.database import session_factory
    from carepost.core.reencrypt import reencrypt_and_retire

    report = reencrypt_and_retire(session_factory())
    log.info("data_keys_reencrypted", scanned_count=report.scanned, reencrypted_count=report.reencrypted,
             undecodable_count=report.undecodable, retired_count=len(report.retired), kept_count=len(report.kept))
    return report
