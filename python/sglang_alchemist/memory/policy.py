"""Which requests get their prefill recorded (``--alchemist-record``).

- ``all``: every request; ``none``: no request (recording off; feedback still trains, by
  recomputation).
- ``sample``: a fraction (``--alchemist-record-sample-rate``) chosen by a hash of the request
  id, so the choice is reproducible and independent of arrival order.
- ``opt-in``: only requests whose body sets ``"custom_params": {"alchemist_record": true}``
  (from the official client: ``extra_body={"custom_params": {"alchemist_record": True}}``).

Under ``all`` and ``sample`` a request can also opt out with ``"alchemist_record": false``, and
under ``sample`` opt in with ``true``. ``custom_params`` is SGLang's own per-request field; it
reaches the scheduler untouched, so no request-parsing code of SGLang is changed.
"""

from __future__ import annotations

import zlib
from typing import Any

REQUEST_FIELD = "alchemist_record"


class RecordingPolicy:
    def __init__(self, mode: str, sample_rate: float) -> None:
        self.mode = mode
        self.sample_rate = sample_rate

    def should_record(self, rid: str, custom_params: dict[str, Any] | None) -> bool:
        if self.mode == "none":
            return False
        choice = (custom_params or {}).get(REQUEST_FIELD)
        if isinstance(choice, bool):
            return choice
        if self.mode == "all":
            return True
        if self.mode == "sample":
            return zlib.crc32(rid.encode()) / 2**32 < self.sample_rate
        return False  # opt-in without the field
